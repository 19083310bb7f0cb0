"""The response scanner of the HTTP relays agrees with the full parser on every head."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from carpool.relayd.http import (
    BadResponse,
    HttpError,
    parse_response_head,
    response_framing,
    scan_response_head,
)

HEADS = [
    b"HTTP/1.1 200 OK\r\nContent-Length: 75\r\nContent-Type: text/html\r\n\r\nbody",
    b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n",
    b"HTTP/1.0 404 Not Found\r\nContent-Length: 3\r\n\r\nabc",
    b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    b"HTTP/1.1 204 No Content\r\nContent-Length: 5\r\n\r\n",
    b"HTTP/1.1 304 Not Modified\r\nContent-Length: 5\r\n\r\n",
    b"HTTP/1.1 100 Continue\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n X-Folded: 1\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Length: -5\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Length: 5, 5\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Length: 5\nX: y\r\n\r\n",
    b"HTTP/1.1 200\r\nContent-Length: 2\r\n\r\n",
    b"HTTP/2.0 200 OK\r\nContent-Length: 2\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nServer: x\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Length: 5",
]


def verdict(scan: bool, data: bytes, method: bytes) -> object:
    try:
        if scan:
            return scan_response_head(data, method)
        parsed = parse_response_head(data)
        if parsed is None:
            return None
        head, used = parsed
        return head.status, response_framing(head, method), used
    except HttpError as error:
        return type(error)


@pytest.mark.parametrize("data", HEADS)
@pytest.mark.parametrize("method", [b"GET", b"HEAD"])
def test_scanner_agrees_with_the_parser(data: bytes, method: bytes) -> None:
    assert verdict(True, data, method) == verdict(False, data, method)


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.sampled_from([b"Content-Length: 12", b"content-length:7", b"X-A: b",
                              b"Transfer-Encoding: chunked", b" folded", b"Content-Length: 1x",
                              b"Bad\x01: y", b"Set-Cookie: a=b"]), max_size=4),
    st.sampled_from([b"200 OK", b"204 No", b"301 Moved", b"500 Err", b"101 Up", b"2000"]),
)
def test_scanner_agrees_on_generated_heads(lines: list[bytes], status: bytes) -> None:
    data = b"HTTP/1.1 " + status + b"\r\n" + b"".join(x + b"\r\n" for x in lines) + b"\r\n"
    assert verdict(True, data, b"GET") == verdict(False, data, b"GET")


def test_bad_status_is_bad_response() -> None:
    assert verdict(True, b"HTTP/1.1 abc OK\r\n\r\n", b"GET") is BadResponse
