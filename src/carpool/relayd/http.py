"""HTTP/1.x message heads for the relays: parsing, framing, rules.  Pure (sans-I/O).

This module owns what a relay decides about an HTTP message; the protocol
objects that own the sockets only feed it bytes.

* :func:`parse_request_head` / :func:`parse_response_head`: one head from the
  front of a buffer, or ``None`` while it is incomplete.  Limits: ``headerlen``
  (relayd's ``http { headerlen N }``, default 8192) → :class:`HeaderTooLarge`
  (431).  Everything RFC 9112 calls a smuggling vector is refused with
  :class:`BadRequest` (400): obs-fold, bare CR or LF, invalid field names or
  values, whitespace before the colon, Content-Length together with
  Transfer-Encoding, differing Content-Lengths, a Transfer-Encoding whose last
  coding is not ``chunked``, Transfer-Encoding in HTTP/1.0, a missing or
  repeated Host in HTTP/1.1.
* :func:`request_framing` / :func:`response_framing`: how the body is
  delimited (RFC 9112 §6.3).
* :class:`ChunkedDecoder`: validates a chunked body incrementally; tells the
  caller which input bytes are payload and where the message ends.
* :class:`RuleSet`: a protocol's ``pass``/``block``/``match`` rules for one
  direction, evaluated as relay.c does: every matching rule's actions apply
  (header append/set/remove, hash, log, tag, label, forward to, path strip);
  the last matching ``pass``/``block`` decides, ``quick`` stops; no match
  passes.  Values are fnmatch globs; header names and values compare
  case-insensitively (the reference's reading of relay_http.c).  Values of
  ``append``/``set`` expand ``$REMOTE_ADDR $REMOTE_PORT $SERVER_ADDR
  $SERVER_PORT $SERVER_NAME $HOST $TIMEOUT``.

Heads keep header order and the case of names; :meth:`RequestHead.to_bytes`
writes them back.  The scanner works on whole-head bytes operations
(``translate``, ``count``, ``split``), with no regex per header.
"""

from __future__ import annotations

import hashlib
import ipaddress
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import Enum

from carpool.errors import ProtocolError
from carpool.relayd.glob import glob_regex
from carpool.relayd.model import (
    DEFAULT_HEADERLEN,
    Direction,
    KeyAction,
    KeyField,
    KeyValue,
    Protocol,
    Rule,
    RuleAction,
)

__all__ = [
    "BadRequest",
    "BadResponse",
    "BodyFraming",
    "ChunkedDecoder",
    "ChunkedResult",
    "FramingKind",
    "HeaderTooLarge",
    "Headers",
    "HttpError",
    "RequestHead",
    "ResponseHead",
    "RuleContext",
    "RuleSet",
    "RuleVerdict",
    "UnsupportedVersion",
    "apply_verdict",
    "parse_request_head",
    "parse_response_head",
    "request_framing",
    "response_framing",
    "scan_response_head",
    "scan_response_length",
]

Headers = list[tuple[bytes, bytes]]


class HttpError(ProtocolError):
    """A message the relay refuses; ``status`` is the code to answer with."""

    status = 400
    stat = "http_errors"


class BadRequest(HttpError):
    status = 400


class HeaderTooLarge(HttpError):
    status = 431


class UnsupportedVersion(HttpError):
    status = 505


class BadResponse(HttpError):
    """A backend reply that cannot be relayed (answered with 502)."""

    status = 502


# -- byte classes ----------------------------------------------------------------

_TCHAR = b"!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
#: bytes allowed anywhere in a head: VCHAR, obs-text, SP, HTAB, CR, LF
_HEAD_OK = bytes([9, 10, 13, *range(0x20, 0x7F), *range(0x80, 0x100)])
_TARGET_OK = bytes(range(0x21, 0x7F)) + bytes(range(0x80, 0x100))
_HEX = b"0123456789abcdefABCDEF"
_OWS = b" \t"
_MAX_CHUNK_LINE = 4096
_MAX_TRAILERS = 8192


def _is_token(b: bytes) -> bool:
    return bool(b) and not b.translate(None, _TCHAR)


@dataclass(slots=True)
class RequestHead:
    method: bytes
    target: bytes
    version: bytes = b"1.1"  #: "1.1" or "1.0"
    headers: Headers = field(default_factory=list)

    def get(self, name: bytes) -> bytes | None:
        return _get(self.headers, name)

    def get_all(self, name: bytes) -> list[bytes]:
        n = name.lower()
        return [v for k, v in self.headers if k.lower() == n]

    @property
    def path(self) -> bytes:
        return self.target.split(b"?", 1)[0]

    @property
    def query(self) -> bytes | None:
        parts = self.target.split(b"?", 1)
        return parts[1] if len(parts) == 2 else None

    def to_bytes(self) -> bytes:
        out = [self.method, b" ", self.target, b" HTTP/", self.version, b"\r\n"]
        for k, v in self.headers:
            out += (k, b": ", v, b"\r\n")
        out.append(b"\r\n")
        return b"".join(out)


@dataclass(slots=True)
class ResponseHead:
    status: int
    reason: bytes = b""
    version: bytes = b"1.1"
    headers: Headers = field(default_factory=list)

    def get(self, name: bytes) -> bytes | None:
        return _get(self.headers, name)

    def to_bytes(self) -> bytes:
        out = [b"HTTP/", self.version, b" ", b"%03d" % self.status, b" ", self.reason, b"\r\n"]
        for k, v in self.headers:
            out += (k, b": ", v, b"\r\n")
        out.append(b"\r\n")
        return b"".join(out)


def _get(headers: Headers, name: bytes) -> bytes | None:
    n = name.lower()
    for k, v in headers:
        if k.lower() == n:
            return v
    return None


# -- head parsing ----------------------------------------------------------------------


def _split_head(
    buf: bytes | bytearray, limit: int, err: type[HttpError]
) -> tuple[list[bytes], int] | None:
    start = 0
    # RFC 9112 §2.2: ignore empty lines before the start line
    while buf.startswith(b"\r\n", start):
        start += 2
    end = buf.find(b"\r\n\r\n", start)
    if end < 0:
        if len(buf) - start > limit:
            raise HeaderTooLarge(f"head longer than {limit} bytes")
        if buf.find(b"\n\n", start) >= 0 or buf.find(b"\r\r", start) >= 0:
            raise err("bare CR or LF in head")
        return None
    if end - start > limit:
        raise HeaderTooLarge(f"head longer than {limit} bytes")
    head = bytes(buf[start:end])
    if head.translate(None, _HEAD_OK):
        raise err("control character in head")
    crlf = head.count(b"\r\n")
    if head.count(b"\r") != crlf or head.count(b"\n") != crlf:
        raise err("bare CR or LF in head")
    return head.split(b"\r\n"), end + 4


def _parse_fields(lines: Sequence[bytes], err: type[HttpError]) -> Headers:
    headers: Headers = []
    append = headers.append
    for line in lines:
        name, colon, value = line.partition(b":")
        if not colon or not name:
            if line[:1] in (b" ", b"\t"):
                raise err("obsolete line folding")
            raise err("header line without a colon or a name")
        append((name, value.strip(_OWS)))
    # one translate over all names instead of one per header
    if b"".join([n for n, _ in headers]).translate(None, _TCHAR):
        for n, _ in headers:
            if n[:1] in (b" ", b"\t"):
                raise err("obsolete line folding")
            if not _is_token(n):
                raise err(f"invalid header name {n[:40]!r}")
    return headers


def _version(v: bytes, err: type[HttpError]) -> bytes:
    if len(v) != 8 or not v.startswith(b"HTTP/") or v[6] != 0x2E:
        raise err("malformed HTTP version")
    if not (v[5:6].isdigit() and v[7:8].isdigit()):
        raise err("malformed HTTP version")
    if v[5] != 0x31:
        raise UnsupportedVersion(f"HTTP version {v[5:].decode()} not supported")
    return v[5:]


def parse_request_head(
    buf: bytes | bytearray, headerlen: int = DEFAULT_HEADERLEN
) -> tuple[RequestHead, int] | None:
    """The request head at the front of ``buf`` and its length in bytes, or None if
    incomplete.  Raises :class:`HttpError` subclasses only."""
    split = _split_head(buf, headerlen, BadRequest)
    if split is None:
        return None
    lines, used = split
    parts = lines[0].split(b" ")
    if len(parts) != 3:
        raise BadRequest("malformed request line")
    method, target, version = parts
    if not _is_token(method):
        raise BadRequest("invalid method")
    if not target or target.translate(None, _TARGET_OK):
        raise BadRequest("invalid request target")
    head = RequestHead(method, target, _version(version, BadRequest),
                       _parse_fields(lines[1:], BadRequest))
    _check_request(head)
    return head, used


def parse_response_head(
    buf: bytes | bytearray, headerlen: int = DEFAULT_HEADERLEN
) -> tuple[ResponseHead, int] | None:
    """The response head at the front of ``buf`` and its length, or None if incomplete."""
    split = _split_head(buf, headerlen, BadResponse)
    if split is None:
        return None
    lines, used = split
    version, _, rest = lines[0].partition(b" ")
    code, _, reason = rest.partition(b" ")
    if len(code) != 3 or not code.isdigit() or code[0] == 0x30:
        raise BadResponse("malformed status line")
    try:
        ver = _version(version, BadResponse)
    except UnsupportedVersion as e:
        raise BadResponse(str(e)) from None
    return ResponseHead(int(code), reason, ver, _parse_fields(lines[1:], BadResponse)), used


_RESPONSE = re.compile(
    rb"HTTP/1\.[01] ([2-5][0-9][0-9])(?: [\t\x20-\x7e\x80-\xff]*)?(?=\r\n)"
    rb"(?:\r\n[!#$%&'*+\-.^_`|~0-9A-Za-z]+:[\t\x20-\x7e\x80-\xff]*)*\r\n\r\n"
)


_FRAMING_FIELDS = re.compile(rb"\r\n(content-length|transfer-encoding):([^\r]*)", re.IGNORECASE)


def scan_response_length(
    buf: bytes | bytearray, request_method: bytes, headerlen: int = DEFAULT_HEADERLEN
) -> tuple[int, int, int] | None:
    """``(status, content length, head length)`` when the response at the front of
    ``buf`` is the plain kind (a final status, one Content-Length, nothing unusual),
    else None: then :func:`scan_response_head` has the answer."""
    match = _RESPONSE.match(buf)
    if match is None:
        return None
    used = match.end()
    if used - 4 > headerlen:
        return None
    found = _FRAMING_FIELDS.findall(buf, 0, used - 2)
    if len(found) != 1 or request_method == b"HEAD" or request_method == b"CONNECT":
        return None
    name, value = found[0]
    value = value.strip(_OWS)
    status = int(match[1])
    if name.lower() != b"content-length" or status == 204 or status == 304 \
            or not value.isdigit() or len(value) > 18:
        return None
    return status, int(value), used


def scan_response_head(
    buf: bytes | bytearray, request_method: bytes, headerlen: int = DEFAULT_HEADERLEN
) -> tuple[int, BodyFraming, int] | None:
    """Status, body framing and head length of the response at the front of ``buf``,
    for relays that forward the head unchanged; None while incomplete.

    The common case (status line ``HTTP/1.x NNN``, one plain Content-Length, no
    Transfer-Encoding) is read with a few whole-head searches; anything else goes
    through :func:`parse_response_head` and :func:`response_framing`, so the
    verdict is always theirs.  Raises :class:`HttpError` subclasses only."""
    quick = scan_response_length(buf, request_method, headerlen)
    if quick is not None:
        return quick[0], BodyFraming(FramingKind.LENGTH, quick[1]), quick[2]
    parsed = parse_response_head(buf, headerlen)
    if parsed is None:
        return None
    head_obj, used = parsed
    return head_obj.status, response_framing(head_obj, request_method), used


def _content_length(values: list[bytes], err: type[HttpError]) -> int:
    seen: set[bytes] = set()
    for v in values:
        for item in v.split(b","):
            item = item.strip(_OWS)
            if not item.isdigit() or len(item) > 18:
                raise err(f"invalid Content-Length {item[:20]!r}")
            seen.add(item.lstrip(b"0") or b"0")
    if len(seen) != 1:
        raise err("conflicting Content-Length values")
    return int(seen.pop())


def _codings(values: list[bytes], err: type[HttpError]) -> list[bytes]:
    codings: list[bytes] = []
    for v in values:
        for item in v.split(b","):
            item = item.strip(_OWS)
            if not item:
                continue
            name = item.split(b";", 1)[0].strip(_OWS).lower()
            if not _is_token(name):
                raise err("invalid Transfer-Encoding")
            codings.append(name)
    if not codings:
        raise err("empty Transfer-Encoding")
    if codings.count(b"chunked") > 1 or (b"chunked" in codings and codings[-1] != b"chunked"):
        raise err("chunked must be the last transfer coding, once")
    return codings


def _scan(headers: Headers) -> tuple[list[bytes], list[bytes], int]:
    cl: list[bytes] = []
    te: list[bytes] = []
    hosts = 0
    for k, v in headers:
        if len(k) in (4, 14, 17):
            lk = k.lower()
            if lk == b"content-length":
                cl.append(v)
            elif lk == b"transfer-encoding":
                te.append(v)
            elif lk == b"host":
                hosts += 1
    return cl, te, hosts


def _check_request(head: RequestHead) -> None:
    cl, te, hosts = _scan(head.headers)
    if head.version == b"1.1" and hosts != 1:
        raise BadRequest("HTTP/1.1 request needs exactly one Host header")
    if hosts > 1:
        raise BadRequest("more than one Host header")
    if te:
        if cl:
            raise BadRequest("both Content-Length and Transfer-Encoding")
        if head.version == b"1.0":
            raise BadRequest("Transfer-Encoding in an HTTP/1.0 request")
        if _codings(te, BadRequest)[-1] != b"chunked":
            raise BadRequest("request Transfer-Encoding does not end in chunked")
    elif cl:
        _content_length(cl, BadRequest)


# -- framing ------------------------------------------------------------------------------


class FramingKind(Enum):
    NONE = "none"
    LENGTH = "content-length"
    CHUNKED = "chunked"
    UNTIL_CLOSE = "until-close"
    TUNNEL = "tunnel"


@dataclass(frozen=True, slots=True)
class BodyFraming:
    kind: FramingKind
    length: int = 0


_NO_BODY = BodyFraming(FramingKind.NONE)


def request_framing(head: RequestHead) -> BodyFraming:
    """How the request body is delimited (the head passed :func:`parse_request_head`)."""
    cl, te, _ = _scan(head.headers)
    if te:
        return BodyFraming(FramingKind.CHUNKED)
    if cl:
        n = _content_length(cl, BadRequest)
        return BodyFraming(FramingKind.LENGTH, n) if n else _NO_BODY
    return _NO_BODY


def response_framing(head: ResponseHead, request_method: bytes) -> BodyFraming:
    """How the response body is delimited, given the request's method (RFC 9112 §6.3)."""
    s = head.status
    if request_method == b"HEAD" or s < 200 or s in (204, 304):
        return _NO_BODY
    if request_method == b"CONNECT" and s < 300:
        return BodyFraming(FramingKind.TUNNEL)
    cl, te, _ = _scan(head.headers)
    if te:
        if _codings(te, BadResponse)[-1] == b"chunked":
            return BodyFraming(FramingKind.CHUNKED)
        return BodyFraming(FramingKind.UNTIL_CLOSE)
    if cl:
        return BodyFraming(FramingKind.LENGTH, _content_length(cl, BadResponse))
    return BodyFraming(FramingKind.UNTIL_CLOSE)


# -- chunked bodies ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ChunkedResult:
    """What one :meth:`ChunkedDecoder.feed` found: payload spans ``(start, end)`` of
    the fed bytes, how many of them belong to the body, and whether it ended."""

    spans: list[tuple[int, int]]
    consumed: int
    done: bool


class ChunkedDecoder:
    """Incremental validator/decoder of a chunked body (RFC 9112 §7.1)."""

    _SIZE, _DATA, _DATA_END, _TRAILER, _DONE = range(5)

    __slots__ = ("_err", "_line", "_remaining", "_state", "_trailer_bytes", "trailers")

    def __init__(self, *, response: bool = False) -> None:
        self._state = self._SIZE
        self._line = b""
        self._remaining = 0
        self._trailer_bytes = 0
        self._err: type[HttpError] = BadResponse if response else BadRequest
        self.trailers: Headers = []

    @property
    def done(self) -> bool:
        return self._state == self._DONE

    def _take_line(self, data: bytes, pos: int, limit: int) -> tuple[bytes | None, int]:
        nl = data.find(b"\n", pos)
        if nl < 0:
            self._line += data[pos:]
            if len(self._line) > limit:
                raise self._err("chunk line too long")
            return None, len(data)
        line = self._line + data[pos : nl + 1]
        self._line = b""
        if len(line) > limit:
            raise self._err("chunk line too long")
        if not line.endswith(b"\r\n") or b"\r" in line[:-2]:
            raise self._err("bare CR or LF in chunked body")
        return line[:-2], nl + 1

    def feed(self, data: bytes) -> ChunkedResult:
        err = self._err
        spans: list[tuple[int, int]] = []
        pos = 0
        n = len(data)
        while pos < n and self._state != self._DONE:
            st = self._state
            if st == self._DATA:
                take = min(self._remaining, n - pos)
                spans.append((pos, pos + take))
                pos += take
                self._remaining -= take
                if self._remaining == 0:
                    self._state = self._DATA_END
            elif st == self._DATA_END:
                need = b"\r\n"[len(self._line):]
                got = data[pos : pos + len(need)]
                if not need.startswith(got):
                    raise err("chunk data not followed by CRLF")
                pos += len(got)
                if got == need:
                    self._line = b""
                    self._state = self._SIZE
                else:
                    self._line += got
            elif st == self._SIZE:
                line, pos = self._take_line(data, pos, _MAX_CHUNK_LINE)
                if line is None:
                    break
                size, _, ext = line.partition(b";")
                size = size.rstrip(_OWS)
                if not size or size.translate(None, _HEX) or len(size) > 15:
                    raise err("invalid chunk size")
                if ext and ext.translate(None, _HEAD_OK[3:] + b"\t"):
                    raise err("invalid chunk extension")
                self._remaining = int(size, 16)
                self._state = self._DATA if self._remaining else self._TRAILER
            else:  # trailer section
                line, pos = self._take_line(data, pos, _MAX_TRAILERS)
                if line is None:
                    break
                if not line:
                    self._state = self._DONE
                    break
                self._trailer_bytes += len(line) + 2
                if self._trailer_bytes > _MAX_TRAILERS:
                    raise err("trailer section too long")
                if line.translate(None, _HEAD_OK):
                    raise err("control character in trailer")
                self.trailers += _parse_fields([line], err)
        return ChunkedResult(spans, pos, self._state == self._DONE)


# -- rules ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RuleContext:
    """The connection a message belongs to, for rule conditions and value macros."""

    remote_addr: str = ""
    remote_port: int = 0
    server_addr: str = ""
    server_port: int = 0
    timeout: int = 600  #: the relay's session timeout, seconds ($TIMEOUT)
    server_name: str = "carpool relayd"  #: $SERVER_NAME
    host: bytes | None = None  #: the request's Host ($HOST), for response rules
    tag: str | None = None  #: the session's tag so far (``tagged``)


@dataclass(slots=True)
class RuleVerdict:
    """The outcome of a rule set on one message."""

    block: bool = False
    rule: Rule | None = None  #: the deciding pass/block rule (None: default pass)
    tag: str | None = None
    label: str | None = None
    forward_to: str | None = None
    path_strip: int | None = None
    hash_data: bytes = b""
    log: list[tuple[bytes, bytes]] = field(default_factory=list)
    #: header edits in rule order: ("append"|"set"|"remove", name or glob, value)
    edits: list[tuple[str, bytes, bytes]] = field(default_factory=list)


_MACROS = (b"$REMOTE_ADDR", b"$REMOTE_PORT", b"$SERVER_ADDR", b"$SERVER_PORT",
           b"$SERVER_NAME", b"$HOST", b"$TIMEOUT")


def _macro(m: bytes, ctx: RuleContext, host: bytes | None) -> bytes:
    if m == b"$REMOTE_ADDR":
        return ctx.remote_addr.encode()
    if m == b"$REMOTE_PORT":
        return b"%d" % ctx.remote_port
    if m == b"$SERVER_ADDR":
        return ctx.server_addr.encode()
    if m == b"$SERVER_PORT":
        return b"%d" % ctx.server_port
    if m == b"$SERVER_NAME":
        return ctx.server_name.encode()
    if m == b"$HOST":
        return host or b""
    return b"%d" % ctx.timeout


def _expand(value: bytes, macros: tuple[bytes, ...], ctx: RuleContext, host: bytes | None
            ) -> bytes:
    """Replace the run-time macros (``macros``: those that occur in ``value``)."""
    if len(macros) == 1 and value == macros[0]:
        return _macro(value, ctx, host)
    for m in macros:
        value = value.replace(m, _macro(m, ctx, host))
    return value


def _net(spec: str | None) -> ipaddress.IPv4Network | ipaddress.IPv6Network | None:
    return None if spec is None else ipaddress.ip_network(spec, strict=False)


def _in(addr: str, net: ipaddress.IPv4Network | ipaddress.IPv6Network) -> bool:
    try:
        return ipaddress.ip_address(addr) in net
    except ValueError:
        return False


def _url_candidates(host: bytes | None, path: bytes, query: bytes | None) -> list[str]:
    """relay_lookup_url: host suffixes by path prefixes, most specific first."""
    hosts = [""]
    if host:
        h = host.decode("latin-1").lower().rsplit(":", 1)[0] if not host.startswith(b"[") \
            else host.decode("latin-1").lower()
        labels = h.split(".")
        hosts = [".".join(labels[i:]) for i in range(max(len(labels) - 1, 1))][:5]
    p = path.decode("latin-1")
    paths = []
    if query is not None:
        paths.append(p + "?" + query.decode("latin-1"))
    paths.append(p)
    cut = p.rstrip("/")
    while "/" in cut:
        cut = cut[: cut.rfind("/")]
        paths.append(cut + "/")
    seen: dict[str, None] = {}
    for hh in hosts:
        for pp in paths[:5 + (query is not None)]:
            seen.setdefault(hh + pp, None)
    return list(seen)


_Act = tuple[KeyValue, bytes, bytes, tuple[bytes, ...]]


class RuleSet:
    """A protocol's rules for one direction, ready to evaluate."""

    __slots__ = ("_plans", "direction", "rules")

    def __init__(self, protocol: Protocol, direction: Direction) -> None:
        self.direction = direction
        self.rules = tuple(r for r in protocol.rules if r.direction is direction)
        plans = []
        for r in self.rules:  # compile globs, networks and action values once
            _net(r.source)
            _net(r.destination)
            acts: list[_Act] = []
            for kv in r.keys:
                if kv.key is not None:
                    glob_regex(kv.key, True)
                if kv.value is not None:
                    glob_regex(kv.value, True)
                if kv.action is not KeyAction.NONE and kv.key is not None:
                    val = (kv.value or "").encode("latin-1")
                    acts.append((kv, kv.key.encode("latin-1"), val,
                                 tuple(m for m in _MACROS if m in val)))
            conditional = (
                r.tagged is not None or r.family is not None or r.source is not None
                or r.destination is not None or r.method is not None
                or any(kv.action not in (KeyAction.APPEND, KeyAction.SET)
                       or kv.field is not KeyField.HEADER for kv in r.keys)
            )
            plans.append((r, conditional, tuple(acts)))
        self._plans = tuple(plans)

    def evaluate(self, head: RequestHead | ResponseHead, ctx: RuleContext) -> RuleVerdict:
        v = RuleVerdict(tag=ctx.tag)
        request = head if isinstance(head, RequestHead) else None
        host = request.get(b"host") if request is not None else ctx.host
        block = False
        for r, conditional, acts in self._plans:
            if conditional and not self._matches(r, head, request, host, ctx, v):
                continue
            self._actions(r, acts, head, request, host, ctx, v)
            if r.action is not RuleAction.MATCH:
                block = r.action is RuleAction.BLOCK
                v.rule = r
            if r.quick:
                break
        v.block = block
        return v

    # conditions
    def _matches(self, r: Rule, head: RequestHead | ResponseHead, req: RequestHead | None,
                 host: bytes | None, ctx: RuleContext, v: RuleVerdict) -> bool:
        if r.tagged is not None and v.tag != r.tagged:
            return False
        if r.family is not None:
            fam = "inet6" if ":" in ctx.remote_addr else "inet"
            if fam != r.family:
                return False
        if r.source is not None:
            net = _net(r.source)
            if net is None or not _in(ctx.remote_addr, net):
                return False
        if r.destination is not None:
            net = _net(r.destination)
            if net is None or not _in(ctx.server_addr, net):
                return False
        if r.method is not None and (req is None or req.method.decode("latin-1") != r.method):
            return False
        return all(self._key_matches(kv, head, req, host) for kv in r.keys)

    def _key_matches(self, kv: KeyValue, head: RequestHead | ResponseHead,
                     req: RequestHead | None, host: bytes | None) -> bool:
        f = kv.field
        if f is KeyField.HEADER:
            if kv.action in (KeyAction.APPEND, KeyAction.SET) or kv.key is None:
                return True
            return _find_header(head.headers, kv) is not None
        if req is None:
            return False  # cookie, path, query and url are request-only
        if kv.key is None:
            return True
        if f is KeyField.PATH:
            if not _glob(kv.key, req.path):
                return False
            return kv.value is None or _glob(kv.value, req.query or b"")
        if f is KeyField.QUERY:
            return _pair_match(_query_pairs(req.query), kv)
        if f is KeyField.COOKIE:
            if kv.action in (KeyAction.APPEND, KeyAction.SET):
                return True
            return _pair_match(_cookie_pairs(req), kv)
        if f is KeyField.URL:
            cands = _url_candidates(host, req.path, req.query)
            if kv.digest:
                want = kv.key.lower()
                return any(hashlib.sha1(c.encode(), usedforsecurity=False).hexdigest() == want
                           or hashlib.md5(c.encode(), usedforsecurity=False).hexdigest() == want
                           for c in cands)
            rx = glob_regex(kv.key, True)
            return any(rx.fullmatch(c) for c in cands)
        return False  # ``file`` keys need the daemon to load them

    # actions
    def _actions(self, r: Rule, acts: tuple[_Act, ...], head: RequestHead | ResponseHead,
                 req: RequestHead | None, host: bytes | None, ctx: RuleContext, v: RuleVerdict
                 ) -> None:
        for kv, key, raw, macros in acts:
            assert kv.key is not None
            a = kv.action
            value = _expand(raw, macros, ctx, host) if macros else raw
            if kv.field is KeyField.HEADER:
                if a is KeyAction.APPEND:
                    v.edits.append(("append", key, value))
                elif a is KeyAction.SET:
                    v.edits.append(("set", key, value))
                elif a is KeyAction.REMOVE:
                    v.edits.append(("remove", key, b""))
                else:
                    found = _find_header(head.headers, kv)
                    got = found[1] if found is not None else b""
                    if a is KeyAction.HASH:
                        v.hash_data += got
                    elif a is KeyAction.LOG:
                        v.log.append((key, got))
            elif kv.field is KeyField.COOKIE and req is not None:
                if a in (KeyAction.APPEND, KeyAction.SET, KeyAction.REMOVE):
                    v.edits.append(("cookie-" + a.value, key, value))
                elif a in (KeyAction.HASH, KeyAction.LOG):
                    cval = next((cv for ck, cv in _cookie_pairs(req)
                                 if glob_regex(kv.key, True).fullmatch(ck)), "")
                    if a is KeyAction.HASH:
                        v.hash_data += cval.encode("latin-1")
                    else:
                        v.log.append((key, cval.encode("latin-1")))
            elif kv.field is KeyField.PATH and req is not None:
                if a is KeyAction.HASH:
                    v.hash_data += req.path
                elif a is KeyAction.LOG:
                    v.log.append((b"path", req.path))
                elif a in (KeyAction.SET, KeyAction.APPEND):
                    v.edits.append(("path-" + a.value, key, value))
            elif a is KeyAction.HASH and req is not None:
                v.hash_data += req.target
            elif a is KeyAction.LOG and req is not None:
                v.log.append((kv.field.value.encode(), req.target))
        if r.untag:
            v.tag = None
        if r.tag is not None:
            v.tag = r.tag
        if r.unlabel:
            v.label = None
        if r.label is not None:
            v.label = r.label
        if r.forward_to is not None:
            v.forward_to = r.forward_to
        if r.path_strip is not None:
            v.path_strip = r.path_strip


def _glob(pattern: str, value: bytes) -> bool:
    return glob_regex(pattern, True).fullmatch(value.decode("latin-1")) is not None


def _find_header(headers: Headers, kv: KeyValue) -> tuple[bytes, bytes] | None:
    assert kv.key is not None
    if "*" not in kv.key and "?" not in kv.key and "[" not in kv.key and "\\" not in kv.key:
        name = kv.key.encode("latin-1").lower()
        cands = [(k, val) for k, val in headers if k.lower() == name]
    else:
        rx = glob_regex(kv.key, True)
        cands = [(k, val) for k, val in headers if rx.fullmatch(k.decode("latin-1"))]
    for k, val in cands:
        if kv.value is None or _glob(kv.value, val):
            return k, val
    return None


def _query_pairs(query: bytes | None) -> list[tuple[str, str]]:
    if not query:
        return []
    out = []
    for part in query.decode("latin-1").split("&"):
        k, _, val = part.partition("=")
        out.append((k, val))
    return out


def _cookie_pairs(req: RequestHead) -> list[tuple[str, str]]:
    out = []
    for line in req.get_all(b"cookie"):
        for part in line.decode("latin-1").split(";"):
            k, eq, val = part.strip().partition("=")
            if eq:
                out.append((k.strip(), val.strip()))
    return out


def _pair_match(pairs: list[tuple[str, str]], kv: KeyValue) -> bool:
    assert kv.key is not None
    krx = glob_regex(kv.key, True)
    vrx = glob_regex(kv.value, True) if kv.value is not None else None
    return any(krx.fullmatch(k) and (vrx is None or vrx.fullmatch(val)) for k, val in pairs)


def apply_verdict(head: RequestHead | ResponseHead, verdict: RuleVerdict) -> None:
    """Apply the verdict's header, cookie and path edits to ``head`` in place."""
    hs = head.headers
    for op, key, value in verdict.edits:
        lk = key.lower()
        if op == "append":
            for i in range(len(hs) - 1, -1, -1):
                if hs[i][0].lower() == lk:
                    hs[i] = (hs[i][0], hs[i][1] + b", " + value if hs[i][1] else value)
                    break
            else:
                hs.append((key, value))
        elif op == "set":
            idx = [i for i, (k, _) in enumerate(hs) if k.lower() == lk]
            if idx:
                hs[idx[0]] = (hs[idx[0]][0], value)
                for i in reversed(idx[1:]):
                    del hs[i]
            else:
                hs.append((key, value))
        elif op == "remove":
            rx = glob_regex(key.decode("latin-1"), True)
            hs[:] = [(k, v) for k, v in hs if not rx.fullmatch(k.decode("latin-1"))]
        elif op.startswith("cookie-") and isinstance(head, RequestHead):
            _edit_cookie(head, op[7:], key, value)
        elif op.startswith("path-") and isinstance(head, RequestHead):
            q = head.query
            path = value if op == "path-set" else head.path + value
            head.target = path + (b"?" + q if q is not None else b"")
    if verdict.path_strip and isinstance(head, RequestHead):
        q = head.query
        segs = head.path.split(b"/")
        kept = segs[1 + verdict.path_strip:] if len(segs) > 1 else []
        head.target = b"/" + b"/".join(kept) + (b"?" + q if q is not None else b"")


def _edit_cookie(head: RequestHead, op: str, key: bytes, value: bytes) -> None:
    pairs = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in _cookie_pairs(head)]
    lk = key.lower()
    if op == "remove":
        pairs = [(k, v) for k, v in pairs if k.lower() != lk]
    elif op == "set" and any(k.lower() == lk for k, _ in pairs):
        pairs = [(k, value if k.lower() == lk else v) for k, v in pairs]
    else:
        pairs.append((key, value))
    head.headers[:] = [(k, v) for k, v in head.headers if k.lower() != b"cookie"]
    if pairs:
        head.headers.append((b"Cookie", b"; ".join(k + b"=" + v for k, v in pairs)))
