"""The HTTP relays' fast path agrees with the full parser and with apply_verdict."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from carpool.relayd import parse_relayd_config
from carpool.relayd.http import (
    FramingKind,
    HttpError,
    RuleContext,
    RuleSet,
    apply_verdict,
    parse_request_head,
    request_framing,
)
from carpool.relayd.http_fast import HeaderEdits, scan_plain_request, scan_request_head
from carpool.relayd.model import Direction

LINES = [
    b"Host: a", b"host:b", b"Content-Length: 5", b"content-length: 0", b"Content-Length: 5, 5",
    b"Transfer-Encoding: chunked", b"Connection: close", b"connection: keep-alive",
    b"Upgrade: websocket", b"X-Forwarded-For: 192.0.2.1", b"x-forwarded-for:", b" folded",
    b"Bad Name: x", b"X-A:\tb ", b"Cookie: a=b", b"Content-Length: +5", b"Host : a",
    b"X-Ctl: \x01", b"Connection: close", b":novalue",
]
START = [b"GET / HTTP/1.1", b"POST /x?y=1 HTTP/1.1", b"GET / HTTP/1.0", b"GET / HTTP/2.0",
         b"GET  / HTTP/1.1", b"G@T / HTTP/1.1", b"GET / HTTP/1.1 x", b"GET /\x7f HTTP/1.1"]


def outcome(data: bytes, fast: bool) -> object:
    try:
        if fast:
            scan = scan_request_head(data, 8192)
            if scan is None:
                return None
            return (scan.method, scan.target, scan.version, scan.framing, scan.keep_alive,
                    scan.host, scan.upgrade, scan.used)  # fmt: skip
        parsed = parse_request_head(data, 8192)
        if parsed is None:
            return None
        head, used = parsed
        from carpool.relayd.http_fast import _keep_alive

        return (head.method, head.target, head.version, request_framing(head),
                _keep_alive(head.version, head.get(b"connection")), head.get(b"host"),
                head.get(b"upgrade"), used)  # fmt: skip
    except HttpError as error:
        return type(error), error.status


@settings(max_examples=500, deadline=None)
@given(st.sampled_from(START), st.lists(st.sampled_from(LINES), max_size=5),
       st.sampled_from([b"\r\n\r\n", b"\r\n\r\nbody", b"\r\n", b"\n\n"]))
def test_scan_agrees_with_the_parser(start: bytes, lines: list[bytes], end: bytes) -> None:
    data = start + b"".join(b"\r\n" + line for line in lines) + end
    assert outcome(data, True) == outcome(data, False)


@settings(max_examples=500, deadline=None)
@given(st.sampled_from(START), st.lists(st.sampled_from(LINES), max_size=5),
       st.sampled_from([b"\r\n\r\n", b"\r\n\r\nbody", b"\r\n"]))
def test_plain_scan_answers_only_for_plain_requests_and_agrees(
    start: bytes, lines: list[bytes], end: bytes
) -> None:
    data = start + b"".join(b"\r\n" + line for line in lines) + end
    plain = scan_plain_request(data, 8192)
    if plain is None:
        return
    scan = scan_request_head(data, 8192)
    assert scan is not None and scan.parsed is None
    assert scan.used == len(data) and scan.framing.kind is FramingKind.NONE
    assert scan.upgrade is None
    assert plain == (scan.head, scan.method, scan.keep_alive, scan.host)


def test_oversized_heads_are_refused_like_the_parser() -> None:
    data = b"GET / HTTP/1.1\r\nHost: a\r\nX: " + b"y" * 9000 + b"\r\n\r\n"
    assert outcome(data, True) == outcome(data, False)


CONF = """
table <t> {{ 10.0.0.1 }}
http protocol "p" {{
{rules}
}}
relay "r" {{ listen on 10.0.0.5 port 80 protocol "p" forward to <t> port 80 }}
"""
RULES = [
    'match request header append "X-Forwarded-For" value "$REMOTE_ADDR"',
    'match request header append "X-Forwarded-Port" value "$REMOTE_PORT"',
    'match request header set "Connection" value "close"',
    'match request header set "X-Relay" value "$SERVER_ADDR:$SERVER_PORT $HOST"',
    'match request header remove "Cookie"',
    'match request header remove "X-Forwarded-For"',
]
CONTEXT = RuleContext("192.0.2.9", 5555, "10.0.0.5", 80)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(RULES), min_size=1, max_size=4),
       st.lists(st.sampled_from([b"Host: www", b"X-Forwarded-For: 1.2.3.4", b"cookie: a=b",
                                 b"Cookie: c=d", b"connection: keep-alive", b"X-Relay: old",
                                 b"x-forwarded-for:", b"Accept: */*"]), max_size=5))
def test_raw_edits_match_apply_verdict(rules: list[str], lines: list[bytes]) -> None:
    config = parse_relayd_config(CONF.format(rules="\n".join(rules)), check_certs=False)
    protocol = config.protocol("p")
    edits = HeaderEdits.compile(protocol.rules, Direction.REQUEST)
    assert edits is not None
    data = b"GET / HTTP/1.1" + b"".join(b"\r\n" + line for line in lines) + b"\r\n\r\n"
    try:
        parsed = parse_request_head(data, 8192)
    except HttpError:
        return
    assert parsed is not None
    head, _ = parsed
    raw = data[:-4]
    values = edits.values(CONTEXT, head.get(b"host"))
    edited = edits.apply(raw, values)
    assert edits.edit(raw, values, edits.absent_suffix(values)) == edited
    verdict = RuleSet(protocol, Direction.REQUEST).evaluate(head, CONTEXT)
    apply_verdict(head, verdict)
    again = parse_request_head(edited, 8192)
    assert again is not None
    assert again[0].headers == head.headers


@pytest.mark.parametrize("rule", [
    'block request quick path "/x*"',
    'match request header "Host" value "a" forward to <t>',
    'match request header remove "X-*"',
    'match request path "/a" tag "x"',
])
def test_rules_with_conditions_take_the_full_path(rule: str) -> None:
    config = parse_relayd_config(CONF.format(rules=rule), check_certs=False)
    assert HeaderEdits.compile(config.protocol("p").rules, Direction.REQUEST) is None
