"""PROXY protocol headers sent to backends."""

from __future__ import annotations

import pytest

from carpool.relayd.proxy_protocol import V2_SIGNATURE, proxy_header


def test_v1_lines() -> None:
    assert proxy_header("v1", ("192.0.2.1", 56324), ("10.0.0.5", 443)) == \
        b"PROXY TCP4 192.0.2.1 10.0.0.5 56324 443\r\n"
    assert proxy_header("v1", ("2001:db8::1", 1), ("2001:db8::5", 80)) == \
        b"PROXY TCP6 2001:db8::1 2001:db8::5 1 80\r\n"
    assert proxy_header("v1", ("::ffff:192.0.2.1", 7), ("10.0.0.5", 80)) == \
        b"PROXY TCP4 192.0.2.1 10.0.0.5 7 80\r\n"


def test_v2_binary() -> None:
    header = proxy_header("v2", ("192.0.2.1", 56324), ("10.0.0.5", 443))
    assert header[:12] == V2_SIGNATURE
    assert header[12:16] == b"\x21\x11\x00\x0c"
    assert header[16:] == bytes([192, 0, 2, 1, 10, 0, 0, 5]) + (56324).to_bytes(2, "big") + \
        (443).to_bytes(2, "big")
    six = proxy_header("v2", ("2001:db8::1", 1), ("2001:db8::5", 80))
    assert six[12:16] == b"\x21\x21\x00\x24" and len(six) == 16 + 36


def test_unknown_version_is_refused() -> None:
    with pytest.raises(ValueError, match="use v1 or v2"):
        proxy_header("v3", ("192.0.2.1", 1), ("10.0.0.5", 2))
