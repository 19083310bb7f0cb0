"""The HTTP relays' fast path: whole-head scans and raw header edits.  Pure (sans-I/O).

Most requests are plain: a request line, a few well-formed fields, one Host,
at most one Content-Length, no Transfer-Encoding.  :func:`scan_request_head`
checks exactly that with a handful of C-level operations on the whole head
(one ``translate``, one regular expression over the field block, searches in
the lower-cased head) and hands everything else to
:func:`carpool.relayd.http.parse_request_head`, so that the verdict on any
request, and every error, is the full parser's.

:class:`HeaderEdits` applies a protocol's unconditional ``match request|response
header append|set|remove`` rules (the common relayd.conf: X-Forwarded-For,
X-Forwarded-Port, ``Connection: close``) to the raw head bytes, with the same
result as :func:`carpool.relayd.http.apply_verdict` on a parsed head.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from carpool.relayd.http import (
    _OWS,
    BodyFraming,
    FramingKind,
    RequestHead,
    RuleContext,
    parse_request_head,
    request_framing,
)
from carpool.relayd.model import Direction, KeyAction, KeyField, Protocol, Rule, RuleAction

__all__ = ["HeaderEdits", "RequestScan", "scan_plain_request", "scan_request_head"]

_TOKEN = rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"
#: field lines: a token name, a colon, a value of VCHAR, obs-text, SP and HTAB
FIELDS = rb"(?:\r\n" + _TOKEN + rb":[\t\x20-\x7e\x80-\xff]*)*\r\n\r\n"
_REQUEST = re.compile(
    rb"(" + _TOKEN + rb") ([\x21-\x7e\x80-\xff]+) HTTP/1\.([01])(?=\r\n)" + FIELDS
)
_NO_BODY = BodyFraming(FramingKind.NONE)


@dataclass(slots=True)
class RequestScan:
    """One request head: what the relay needs to forward it, and its raw bytes.

    ``head`` is the head without its final blank line (``\\r\\n\\r\\n``); when the full
    parser read it, ``parsed`` holds the parsed head and ``head`` is its re-serialised
    form."""

    method: bytes
    target: bytes
    version: bytes
    framing: BodyFraming
    keep_alive: bool
    host: bytes | None
    upgrade: bytes | None
    used: int
    head: bytes
    parsed: RequestHead | None = None


def _keep_alive(version: bytes, connection: bytes | None) -> bool:
    tokens = () if connection is None else [t.strip(_OWS).lower() for t in connection.split(b",")]
    if version == b"1.1":
        return b"close" not in tokens
    return b"keep-alive" in tokens


def _from_parsed(head: RequestHead, used: int) -> RequestScan:
    raw = head.to_bytes()[:-4]
    return RequestScan(
        head.method, head.target, head.version, request_framing(head),
        _keep_alive(head.version, head.get(b"connection")), head.get(b"host"),
        head.get(b"upgrade"), used, raw, head,
    )  # fmt: skip


def scan_request_head(buf: bytes, headerlen: int) -> RequestScan | None:
    """The request head at the front of ``buf``, or None while it is incomplete.

    Raises the full parser's :class:`~carpool.relayd.http.HttpError` for anything it
    refuses."""
    match = _REQUEST.match(buf)
    if match is not None:
        end = match.end()
        if end - 4 <= headerlen:
            scanned = _scan_fields(buf[: end - 4], match[1], match[2], b"1." + match[3], end)
            if scanned is not None:
                return scanned
    parsed = parse_request_head(buf, headerlen)
    if parsed is None:
        return None
    return _from_parsed(*parsed)


_INTERESTING = re.compile(
    rb"\r\n(host|content-length|transfer-encoding|connection|upgrade):([^\r]*)", re.IGNORECASE
)


def scan_plain_request(
    buf: bytes, headerlen: int
) -> tuple[bytes, bytes, bool, bytes | None] | None:
    """``(head, method, keep-alive, Host)`` when ``buf`` is exactly one complete request
    without a body, an upgrade or anything unusual (the head without its blank line);
    else None, and :func:`scan_request_head` has the answer."""
    match = _REQUEST.match(buf)
    if match is None or match.end() != len(buf) or len(buf) - 4 > headerlen:
        return None
    head = buf[:-4]
    host = connection = None
    hosts = 0
    for name, value in _INTERESTING.findall(head):
        key = name.lower()
        if key == b"host":
            hosts += 1
            host = value.strip(_OWS)
        elif key == b"connection" and connection is None:
            connection = value.strip(_OWS)
        else:
            return None
    version = b"1." + match[3]
    if hosts > 1 or (hosts == 0 and version == b"1.1"):
        return None
    return head, match[1], _keep_alive(version, connection), host


def _scan_fields(head: bytes, method: bytes, target: bytes, version: bytes, used: int
                 ) -> RequestScan | None:
    host = connection = upgrade = None
    framing = _NO_BODY
    hosts = 0
    for name, value in _INTERESTING.findall(head):
        key = name.lower()
        if key == b"host":
            hosts += 1
            host = value.strip(_OWS)
        elif key == b"content-length":
            value = value.strip(_OWS)
            if framing is not _NO_BODY or not value.isdigit() or len(value) > 18:
                return None
            framing = BodyFraming(FramingKind.LENGTH, int(value))
        elif key == b"connection":
            if connection is not None:
                return None
            connection = value.strip(_OWS)
        elif key == b"upgrade":
            if upgrade is None:
                upgrade = value.strip(_OWS)
        else:
            return None  # Transfer-Encoding: the full parser decides
    if hosts > 1 or (hosts == 0 and version == b"1.1"):
        return None
    if framing is not _NO_BODY and not framing.length:
        framing = _NO_BODY
    return RequestScan(method, target, version, framing, _keep_alive(version, connection), host,
                       upgrade, used, head)  # fmt: skip


# -- raw header edits -------------------------------------------------------------------------

_MACRO_NAMES = (b"$REMOTE_ADDR", b"$REMOTE_PORT", b"$SERVER_ADDR", b"$SERVER_PORT",
                b"$SERVER_NAME", b"$HOST", b"$TIMEOUT")  # fmt: skip
_GLOB = frozenset("*?[\\")


def _simple(rule: Rule) -> bool:
    """An unconditional ``match`` rule whose only actions are literal header edits."""
    return (
        rule.action is RuleAction.MATCH and not rule.quick and rule.family is None
        and rule.source is None and rule.destination is None and rule.method is None
        and rule.path_strip is None and rule.forward_to is None and rule.tag is None
        and not rule.untag and rule.tagged is None and rule.label is None and not rule.unlabel
        and all(kv.field is KeyField.HEADER and kv.key is not None and not kv.digest
                and kv.action in (KeyAction.APPEND, KeyAction.SET, KeyAction.REMOVE)
                and not _GLOB & set(kv.key) for kv in rule.keys)
    )  # fmt: skip


@dataclass(frozen=True, slots=True)
class _Edit:
    op: KeyAction
    name: bytes
    lines: re.Pattern[bytes]  #: the field's lines (CRLF, name, value), any case
    value: bytes
    macros: tuple[bytes, ...]


class HeaderEdits:
    """A direction's rules when all of them are unconditional header edits (else None
    from :meth:`compile`); :meth:`apply` edits a raw head as ``apply_verdict`` would."""

    __slots__ = ("distinct", "edits", "fields", "uses_host")

    def __init__(self, edits: Sequence[_Edit]) -> None:
        self.edits = tuple(edits)
        self.uses_host = any(b"$HOST" in e.macros for e in edits)
        names = [e.name.lower() for e in edits]
        self.distinct = len(set(names)) == len(names)
        #: any of the edited fields, to tell heads that have none of them
        self.fields = re.compile(
            rb"\r\n(?:" + b"|".join(re.escape(n) for n in names) + rb"):", re.IGNORECASE
        ) if names else None

    def absent_suffix(self, values: Sequence[bytes]) -> bytes | None:
        """What :meth:`apply` adds to a head that has none of the edited fields (the
        edits then neither see nor touch each other's fields when their names are
        distinct), blank line included; None when names repeat."""
        if not self.distinct:
            return None
        out = [b"\r\n" + e.name + b": " + v for e, v in zip(self.edits, values, strict=True)
               if e.op is not KeyAction.REMOVE]  # fmt: skip
        return b"".join(out) + b"\r\n\r\n"

    def edit(self, head: bytes, values: Sequence[bytes], suffix: bytes | None) -> bytes:
        """:meth:`apply`, with the short way for heads without any edited field."""
        fields = self.fields
        if suffix is not None and (fields is None or fields.search(head) is None):
            return head + suffix
        return self.apply(head, values)

    @classmethod
    def compile(cls, rules: Sequence[Rule], direction: Direction) -> HeaderEdits | None:
        edits = []
        for rule in rules:
            if rule.direction is not direction:
                continue
            if not _simple(rule):
                return None
            for kv in rule.keys:
                assert kv.key is not None
                name = kv.key.encode("latin-1")
                value = (kv.value or "").encode("latin-1")
                macros = tuple(m for m in _MACRO_NAMES if m in value)
                lines = re.compile(rb"\r\n(" + re.escape(name) + rb"):([^\r]*)", re.IGNORECASE)
                edits.append(_Edit(kv.action, name, lines, value, macros))
        return cls(edits)

    @classmethod
    def from_protocol(cls, protocol: Protocol, direction: Direction) -> HeaderEdits | None:
        return cls.compile(protocol.rules, direction)

    def values(self, context: RuleContext, host: bytes | None) -> list[bytes]:
        """The edits' values with the run-time macros expanded."""
        out = []
        for edit in self.edits:
            value = edit.value
            for macro in edit.macros:
                value = value.replace(macro, _expand(macro, context, host))
            out.append(value)
        return out

    def apply(self, head: bytes, values: Sequence[bytes]) -> bytes:
        """``head`` (no final blank line) with the edits applied, plus the blank line.

        As in rule evaluation, a ``remove`` rule matches only a field the message
        arrived with (not one an earlier rule added)."""
        original = head
        for edit, value in zip(self.edits, values, strict=True):
            lines = edit.lines
            op = edit.op
            if op is KeyAction.APPEND:
                last = None
                for last in lines.finditer(head):  # noqa: B007 - the last one is wanted
                    pass
                if last is None:
                    head = head + b"\r\n" + edit.name + b": " + value
                else:
                    old = last[2].strip(_OWS)
                    line = last[1] + b": " + (old + b", " + value if old else value)
                    head = head[: last.start() + 2] + line + head[last.end() :]
            elif op is KeyAction.SET:
                spans = [(m.start(), m.end(), m[1]) for m in lines.finditer(head)]
                if not spans:
                    head = head + b"\r\n" + edit.name + b": " + value
                    continue
                for start, end, _ in reversed(spans[1:]):
                    head = head[:start] + head[end:]
                start, end, name = spans[0]
                head = head[: start + 2] + name + b": " + value + head[end:]
            elif lines.search(original) is not None:
                head = lines.sub(b"", head)
        return head + b"\r\n\r\n"


def _expand(macro: bytes, context: RuleContext, host: bytes | None) -> bytes:
    if macro == b"$REMOTE_ADDR":
        return context.remote_addr.encode()
    if macro == b"$REMOTE_PORT":
        return b"%d" % context.remote_port
    if macro == b"$SERVER_ADDR":
        return context.server_addr.encode()
    if macro == b"$SERVER_PORT":
        return b"%d" % context.server_port
    if macro == b"$SERVER_NAME":
        return context.server_name.encode()
    if macro == b"$HOST":
        return host or b""
    return b"%d" % context.timeout
