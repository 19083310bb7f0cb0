"""HTTP heads for the relays: parsing, smuggling defences, framing, chunked bodies, rules."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from carpool.relayd import parse_relayd_config
from carpool.relayd.http import (
    BadRequest,
    BadResponse,
    ChunkedDecoder,
    FramingKind,
    HeaderTooLarge,
    HttpError,
    RequestHead,
    ResponseHead,
    RuleContext,
    RuleSet,
    UnsupportedVersion,
    apply_verdict,
    parse_request_head,
    parse_response_head,
    request_framing,
    response_framing,
)
from carpool.relayd.model import (
    Direction,
    KeyAction,
    KeyField,
    KeyValue,
    Protocol,
    ProtocolType,
    Rule,
    RuleAction,
)

SEED = (Path(__file__).parent / "data" / "relayd" / "seed.conf").read_text()
CTX = RuleContext(remote_addr="192.0.2.7", remote_port=51344, server_addr="10.0.0.100",
                  server_port=443)


def req(raw: bytes) -> RequestHead:
    got = parse_request_head(raw)
    assert got is not None
    return got[0]


def test_parse_request() -> None:
    raw = b"GET /a/b?x=1 HTTP/1.1\r\nHost: www.example.com\r\nX-Thing:  v a l \t\r\n\r\nBODY"
    got = parse_request_head(raw)
    assert got is not None
    head, used = got
    assert raw[used:] == b"BODY"
    assert (head.method, head.target, head.version) == (b"GET", b"/a/b?x=1", b"1.1")
    assert head.headers == [(b"Host", b"www.example.com"), (b"X-Thing", b"v a l")]
    assert head.get(b"host") == b"www.example.com" and head.get(b"nope") is None
    assert head.path == b"/a/b" and head.query == b"x=1"
    assert request_framing(head).kind is FramingKind.NONE
    # leading empty lines are skipped; HTTP/1.0 needs no Host
    head = req(b"\r\n\r\nGET / HTTP/1.0\r\n\r\n")
    assert head.version == b"1.0" and head.query is None


def test_incomplete_and_limits() -> None:
    assert parse_request_head(b"GET / HTTP/1.1\r\nHost: a\r\n") is None
    assert parse_request_head(b"") is None
    big = b"GET / HTTP/1.1\r\nHost: a\r\nX: " + b"a" * 9000
    with pytest.raises(HeaderTooLarge) as e:
        parse_request_head(big)
    assert e.value.status == 431
    with pytest.raises(HeaderTooLarge):
        parse_request_head(big + b"\r\n\r\n")
    assert parse_request_head(big + b"\r\n\r\n", headerlen=16384) is not None


@pytest.mark.parametrize(
    "raw",
    [
        b"GET / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a\r\nContent-Length: 5, 6\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a\r\nContent-Length: -5\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a\r\nContent-Length: 0x5\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a\r\nContent-Length:\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked, gzip\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked"
        b"\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: \x0bchunked\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: ,\r\n\r\n",
        b"GET / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a\r\nX: y\r\n folded\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a\r\nBad Name: y\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding : chunked\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a\r\n: y\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a\r\nNoColon\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a\r\nX: a\x00b\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a\r\nX: a\rb\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a\nX: b\r\n\r\n",
        b"GET / HTTP/1.1\nHost: a\n\n",
        b"GET / HTTP/1.1\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
        b"GET  / HTTP/1.1\r\nHost: a\r\n\r\n",
        b"GET / HTTP/1.1 x\r\nHost: a\r\n\r\n",
        b"G(T / HTTP/1.1\r\nHost: a\r\n\r\n",
        b"GET / HTTP/11\r\nHost: a\r\n\r\n",
        b"GET / HTTPS/1.1\r\nHost: a\r\n\r\n",
        b"GET /\x7f HTTP/1.1\r\nHost: a\r\n\r\n",
    ],
)
def test_bad_requests(raw: bytes) -> None:
    with pytest.raises(BadRequest) as e:
        parse_request_head(raw)
    assert e.value.status == 400


def test_unsupported_version() -> None:
    with pytest.raises(UnsupportedVersion) as e:
        parse_request_head(b"GET / HTTP/2.0\r\nHost: a\r\n\r\n")
    assert e.value.status == 505


def test_request_framing() -> None:
    h = req(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 007\r\n\r\n")
    f = request_framing(h)
    assert f.kind is FramingKind.LENGTH and f.length == 7
    h = req(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 7, 7\r\n\r\n")
    assert request_framing(h).length == 7
    h = req(b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip, Chunked\r\n\r\n")
    assert request_framing(h).kind is FramingKind.CHUNKED


def resp(raw: bytes) -> ResponseHead:
    got = parse_response_head(raw)
    assert got is not None
    return got[0]


def test_response_parse_and_framing() -> None:
    r = resp(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\n")
    assert (r.status, r.reason) == (200, b"OK")
    assert response_framing(r, b"GET").length == 3
    assert response_framing(r, b"HEAD").kind is FramingKind.NONE
    r = resp(b"HTTP/1.1 204 No Content\r\n\r\n")
    assert response_framing(r, b"GET").kind is FramingKind.NONE
    r = resp(b"HTTP/1.0 200 \r\n\r\n")
    assert response_framing(r, b"GET").kind is FramingKind.UNTIL_CLOSE
    r = resp(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n")
    assert response_framing(r, b"GET").kind is FramingKind.CHUNKED
    r = resp(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n")
    assert response_framing(r, b"GET").kind is FramingKind.UNTIL_CLOSE
    r = resp(b"HTTP/1.1 200 OK\r\n\r\n")
    assert response_framing(r, b"CONNECT").kind is FramingKind.TUNNEL
    r = resp(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n")
    with pytest.raises(BadResponse):
        response_framing(r, b"GET")
    for bad in (b"HTTP/1.1 20 OK\r\n\r\n", b"HTTP/2.0 200 OK\r\n\r\n", b"HTTP/1.1 099 x\r\n\r\n",
                b"HTTP/1.1 200 OK\r\n folded\r\n\r\n"):
        with pytest.raises(BadResponse) as e:
            parse_response_head(bad)
        assert e.value.status == 502


# -- chunked --------------------------------------------------------------------------------

BODY = b"5\r\nhello\r\n6;ext=1\r\n world\r\n0\r\nTrailer-X: t\r\n\r\nNEXT"


def decode(data: bytes, step: int) -> tuple[bytes, int, ChunkedDecoder]:
    d = ChunkedDecoder()
    out = b""
    total = 0
    for i in range(0, len(data), step):
        piece = data[i : i + step]
        r = d.feed(piece)
        out += b"".join(piece[a:b] for a, b in r.spans)
        total += r.consumed
        if r.done:
            break
    return out, total, d


@pytest.mark.parametrize("step", [1, 2, 3, 7, 1000])
def test_chunked_any_split(step: int) -> None:
    out, used, d = decode(BODY, step)
    assert out == b"hello world"
    assert BODY[used:] == b"NEXT"
    assert d.done and d.trailers == [(b"Trailer-X", b"t")]


@pytest.mark.parametrize(
    "bad",
    [b"x\r\n", b"5\r\nhelloXX", b"5\nhello\r\n", b"-1\r\n", b"\r\n", b"5 5\r\n",
     b"1" * 20 + b"\r\n", b"0\r\nbad trailer\r\n\r\n", b"0\r\n folded\r\n\r\n",
     b"1;\x01\r\n", b"0\r\nX: a\rb\r\n\r\n"],
)
def test_chunked_errors(bad: bytes) -> None:
    d = ChunkedDecoder()
    with pytest.raises(BadRequest):
        d.feed(bad)
    with pytest.raises(BadResponse):
        ChunkedDecoder(response=True).feed(bad)


def test_chunked_limits() -> None:
    with pytest.raises(BadRequest):
        ChunkedDecoder().feed(b"1;" + b"a" * 5000)
    d = ChunkedDecoder()
    with pytest.raises(BadRequest):
        for _ in range(1000):
            d.feed(b"0\r\n" if not d.trailers and _ == 0 else b"X-A: " + b"b" * 50 + b"\r\n")


@settings(max_examples=200, deadline=None)
@given(chunks=st.lists(st.binary(min_size=1, max_size=40), max_size=6),
       step=st.integers(1, 50))
def test_chunked_round_trip(chunks: list[bytes], step: int) -> None:
    enc = b"".join(b"%x\r\n%s\r\n" % (len(c), c) for c in chunks) + b"0\r\n\r\n"
    out, used, d = decode(enc + b"rest", step)
    assert out == b"".join(chunks) and used == len(enc) and d.done


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_chunked_fuzz(data: bytes) -> None:
    d = ChunkedDecoder()
    try:
        r = d.feed(data)
    except HttpError:
        return
    assert 0 <= r.consumed <= len(data)
    assert all(0 <= a <= b <= r.consumed for a, b in r.spans)


# -- fuzz and round trip -----------------------------------------------------------------------

@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=300))
def test_request_fuzz(data: bytes) -> None:
    try:
        got = parse_request_head(data, headerlen=256)
    except HttpError:
        return
    if got is not None:
        head, used = got
        assert 0 < used <= len(data)
        request_framing(head)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_response_fuzz(data: bytes) -> None:
    try:
        got = parse_response_head(data)
        if got is not None:
            response_framing(got[0], b"GET")
    except HttpError:
        return


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from([b"GET / HTTP/1.1\r\n", b"Host: a\r\n", b"\r\n", b"\n", b"\r",
                                 b"Content-Length: 1\r\n", b"Transfer-Encoding: chunked\r\n",
                                 b" x\r\n", b"X:\x00\r\n", b"0\r\n"]), max_size=12))
def test_request_fuzz_structured(parts: list[bytes]) -> None:
    try:
        got = parse_request_head(b"".join(parts))
    except HttpError:
        return
    if got is not None:
        request_framing(got[0])


TOKEN = st.text(alphabet="!#$%&'*+-.^_`|~0123456789ABCDEFXYZabcxyz", min_size=1, max_size=12)
VALUE = st.binary(max_size=30).map(
    lambda b: bytes(c for c in b if c >= 0x21 and c != 0x7F)
)


@settings(max_examples=200, deadline=None)
@given(
    method=TOKEN,
    target=st.binary(min_size=1, max_size=30).map(
        lambda b: b"/" + bytes(c for c in b if c >= 0x21 and c != 0x7F)),
    headers=st.lists(st.tuples(TOKEN.map(str.encode), VALUE), max_size=8),
)
def test_request_round_trip(method: str, target: bytes, headers: list[tuple[bytes, bytes]]
                            ) -> None:
    hs = [(k, v) for k, v in headers
          if k.lower() not in (b"host", b"content-length", b"transfer-encoding")]
    head = RequestHead(method.encode(), target, b"1.1", [(b"Host", b"h"), *hs])
    raw = head.to_bytes()
    got = parse_request_head(raw, headerlen=65536)
    assert got is not None
    assert got[0] == head and got[1] == len(raw)


def test_response_round_trip() -> None:
    r = ResponseHead(404, b"Not Found", b"1.0", [(b"Content-Type", b"text/html")])
    got = parse_response_head(r.to_bytes())
    assert got is not None and got[0] == r


# -- rules --------------------------------------------------------------------------------------

def test_seed_protocol_rules() -> None:
    cfg = parse_relayd_config(SEED, check_certs=False)
    proto = cfg.protocol("http_check")
    rs = RuleSet(proto, Direction.REQUEST)
    head = req(b"GET / HTTP/1.1\r\nHost: www\r\nX-Forwarded-For: 203.0.113.1\r\n\r\n")
    v = rs.evaluate(head, CTX)
    assert not v.block and v.rule is None
    apply_verdict(head, v)
    assert head.headers == [
        (b"Host", b"www"),
        (b"X-Forwarded-For", b"203.0.113.1, 192.0.2.7"),
        (b"X-Forwarded-Port", b"51344"),
    ]
    out = RuleSet(proto, Direction.RESPONSE)
    r = resp(b"HTTP/1.1 200 OK\r\nContent-Type: TEXT/HTML; charset=utf-8\r\n\r\n")
    assert not out.evaluate(r, CTX).block


def proto(*rules: Rule) -> Protocol:
    return Protocol("p", ProtocolType.HTTP, rules=rules)


def hdr(key: str, value: str | None = None, action: KeyAction = KeyAction.NONE) -> KeyValue:
    return KeyValue(KeyField.HEADER, action, key, value)


def test_last_match_wins_and_quick() -> None:
    head = req(b"GET /admin/x HTTP/1.1\r\nHost: www.example.com\r\n\r\n")
    block_admin = Rule(RuleAction.BLOCK, keys=(KeyValue(KeyField.PATH, key="/admin/*"),))
    pass_all = Rule(RuleAction.PASS)
    assert RuleSet(proto(block_admin), Direction.REQUEST).evaluate(head, CTX).block
    v = RuleSet(proto(block_admin, pass_all), Direction.REQUEST).evaluate(head, CTX)
    assert not v.block and v.rule is pass_all
    quick = Rule(RuleAction.BLOCK, quick=True, keys=block_admin.keys)
    assert RuleSet(proto(quick, pass_all), Direction.REQUEST).evaluate(head, CTX).block
    other = req(b"GET /public HTTP/1.1\r\nHost: www.example.com\r\n\r\n")
    assert not RuleSet(proto(quick), Direction.REQUEST).evaluate(other, CTX).block


def test_match_actions_and_conditions() -> None:
    head = req(b"POST /api/v1?user=bob&x=1 HTTP/1.1\r\nHost: api.example.com:8443\r\n"
               b"Cookie: session=abc; theme=dark\r\nX-Drop: 1\r\n\r\n")
    rules = (
        Rule(RuleAction.MATCH, keys=(hdr("Host", "api.*"),), forward_to="api", tag="API"),
        Rule(RuleAction.MATCH, tagged="API", label="api traffic",
             keys=(hdr("X-Via", "$SERVER_ADDR:$SERVER_PORT $HOST", KeyAction.SET),)),
        Rule(RuleAction.MATCH, keys=(hdr("X-Drop", action=KeyAction.REMOVE),)),
        Rule(RuleAction.MATCH, method="GET", forward_to="never"),
        Rule(RuleAction.MATCH, keys=(KeyValue(KeyField.QUERY, key="user", value="bob"),),
             path_strip=1),
        Rule(RuleAction.MATCH, keys=(KeyValue(KeyField.COOKIE, KeyAction.HASH, "session"),)),
        Rule(RuleAction.MATCH, keys=(KeyValue(KeyField.URL, key="example.com/api/"),),
             source="192.0.2.0/24", destination="10.0.0.0/8", family="inet"),
        Rule(RuleAction.BLOCK, source="198.51.100.0/24"),
        Rule(RuleAction.MATCH, keys=(KeyValue(KeyField.COOKIE, KeyAction.SET, "theme", "x"),)),
    )
    v = RuleSet(proto(*rules), Direction.REQUEST).evaluate(head, CTX)
    assert not v.block
    assert v.forward_to == "api" and v.tag == "API" and v.label == "api traffic"
    assert v.hash_data == b"abc" and v.path_strip == 1
    apply_verdict(head, v)
    assert head.get(b"x-via") == b"10.0.0.100:443 api.example.com:8443"
    assert head.get(b"x-drop") is None
    assert head.target == b"/v1?user=bob&x=1"
    assert head.get(b"cookie") == b"session=abc; theme=x"
    bad_ctx = RuleContext(remote_addr="198.51.100.9")
    assert RuleSet(proto(*rules), Direction.REQUEST).evaluate(head, bad_ctx).block


def test_header_value_glob_and_set_remove() -> None:
    head = req(b"GET / HTTP/1.1\r\nHost: a\r\nConnection: keep-alive\r\nConnection: x\r\n\r\n")
    rs = RuleSet(proto(
        Rule(RuleAction.BLOCK, keys=(hdr("Connection", "KEEP-*"),)),
        Rule(RuleAction.MATCH, keys=(hdr("Connection", "close", KeyAction.SET),)),
        Rule(RuleAction.MATCH, keys=(hdr("X-*", action=KeyAction.REMOVE),)),
    ), Direction.REQUEST)
    v = rs.evaluate(head, CTX)
    assert v.block  # case-insensitive value glob
    apply_verdict(head, v)
    assert head.get_all(b"connection") == [b"close"]
    # remove needs the header: a missing one makes the rule not match
    h2 = req(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
    rs2 = RuleSet(proto(Rule(RuleAction.BLOCK, keys=(hdr("X-Gone", action=KeyAction.REMOVE),))),
                  Direction.REQUEST)
    assert not rs2.evaluate(h2, CTX).block


def test_url_digest_and_response_only_headers() -> None:
    import hashlib

    head = req(b"GET /img/a.png HTTP/1.1\r\nHost: www.example.com\r\n\r\n")
    d = hashlib.sha1(b"example.com/img/").hexdigest()
    rs = RuleSet(proto(Rule(RuleAction.BLOCK,
                            keys=(KeyValue(KeyField.URL, key=d, digest=True),))),
                 Direction.REQUEST)
    assert rs.evaluate(head, CTX).block
    r = resp(b"HTTP/1.1 200 OK\r\n\r\n")
    rs = RuleSet(proto(Rule(RuleAction.BLOCK, Direction.RESPONSE,
                            keys=(KeyValue(KeyField.PATH, key="/*"),))), Direction.RESPONSE)
    assert not rs.evaluate(r, CTX).block
