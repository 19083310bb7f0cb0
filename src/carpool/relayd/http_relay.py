"""relayd's HTTP relays: one client connection, one backend connection at a time, rules applied.

An :class:`HttpSession` reads request heads from the client with
``relayd.http`` (which refuses malformed and smuggling-prone heads: they are
answered 400/431/505 here and never reach a backend), applies the protocol's
request rules (header append/set/remove, pass/block, per-rule ``forward to``),
picks a host (the first request, or a request whose ``forward to`` names
another table, opens a backend connection), forwards the head and then the body
as its framing says (Content-Length or chunked, validated as it streams).
Responses are parsed the same way, response rules applied, and their bodies
framed, so that the connection can be kept alive for the next request.

One request is in flight at a time: a pipelined request waits in the buffer
until the response before it is complete (the client is not read meanwhile),
which keeps request and response in step and costs nothing for clients that
wait for each answer.  Flow control as in ``relayd.relay``: a full write
buffer on one side stops reading on the other, so a slow client holds up only
its own session.
"""

from __future__ import annotations

import asyncio
import dataclasses
import email.utils
import html
import logging
import ssl
import time
from collections.abc import Callable
from typing import cast

from carpool.relayd.http import (
    BodyFraming,
    ChunkedDecoder,
    FramingKind,
    HttpError,
    RequestHead,
    ResponseHead,
    RuleContext,
    RuleSet,
    apply_verdict,
    parse_request_head,
    parse_response_head,
    request_framing,
    response_framing,
    scan_response_head,
    scan_response_length,
)
from carpool.relayd.http_fast import (
    HeaderEdits,
    RequestScan,
    scan_plain_request,
    scan_request_head,
)
from carpool.relayd.model import Direction, KeyAction, Protocol, Rule, RuleAction
from carpool.relayd.relay import HIGH_WATER, Backend, Relay, tune_socket

log = logging.getLogger("carpool.relayd")

REASONS = {
    400: "Bad Request", 403: "Forbidden", 408: "Request Timeout", 431:
    "Request Header Fields Too Large", 500: "Internal Server Error", 502: "Bad Gateway",
    503: "Service Unavailable", 505: "HTTP Version Not Supported",
}  # fmt: skip
RESPONSE_HEAD_LIMIT = 65536

_HEAD, _LENGTH, _CHUNKED, _UNTIL_CLOSE, _TUNNEL = range(5)


def rule_has_effect(rule: Rule) -> bool:
    """Whether evaluating ``rule`` can change anything: a ``match`` rule with conditions
    only (``match response header "Content-Type" value "text/html*"``) cannot."""
    if rule.action is not RuleAction.MATCH:
        return True
    return bool(
        any(kv.action is not KeyAction.NONE for kv in rule.keys)
        or rule.tag is not None or rule.untag or rule.label is not None or rule.unlabel
        or rule.forward_to is not None or rule.path_strip is not None
    )


@dataclasses.dataclass(frozen=True)
class HttpPolicy:
    """What an HTTP relay does with messages, built once from its ``http protocol``.

    A direction whose rules cannot change anything is not evaluated at all."""

    request_rules: RuleSet | None
    response_rules: RuleSet | None
    headerlen: int
    return_error: bool
    error_style: str | None
    websockets: bool
    response_host: bool = False  #: response rules use $HOST (the request's Host)
    request_edits: HeaderEdits | None = None  #: the request rules as raw edits, if they are
    server_name: str = "relayd"

    @classmethod
    def from_protocol(cls, protocol: Protocol) -> HttpPolicy:
        def active(direction: Direction) -> RuleSet | None:
            rules = [r for r in protocol.rules if r.direction is direction]
            return RuleSet(protocol, direction) if any(map(rule_has_effect, rules)) else None

        response_host = any(
            kv.value is not None and "$HOST" in kv.value
            for r in protocol.rules if r.direction is Direction.RESPONSE for kv in r.keys
        )  # fmt: skip
        return cls(
            request_rules=active(Direction.REQUEST),
            response_rules=active(Direction.RESPONSE),
            headerlen=protocol.http.headerlen,
            return_error=protocol.return_error,
            error_style=protocol.return_error_style,
            websockets=protocol.http.websockets,
            response_host=response_host,
            request_edits=HeaderEdits.compile(protocol.rules, Direction.REQUEST),
        )


def error_page(status: int, detail: str, style: str | None, server_name: str) -> bytes:
    """relayd's error reply: a small HTML page, then the connection closes."""
    reason = REASONS.get(status, "Error")
    css = style or "body { background-color: white; color: black; font-family: sans-serif; }"
    body = (
        "<!DOCTYPE html>\n<html>\n<head>\n<meta charset=\"utf-8\">\n"
        f"<title>{status} {reason}</title>\n<style type=\"text/css\"><!--\n{css}\n--></style>\n"
        f"</head>\n<body>\n<h1>{status} {reason}</h1>\n<div id='m'>{html.escape(detail)}</div>\n"
        f"<hr><address>{html.escape(server_name)}</address>\n</body>\n</html>\n"
    ).encode()
    head = (
        f"HTTP/1.1 {status} {reason}\r\nDate: {email.utils.formatdate(usegmt=True)}\r\n"
        f"Server: {server_name}\r\nConnection: close\r\nContent-Type: text/html\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode()
    return head + body


def _keep_alive(head: RequestHead) -> bool:
    value = head.get(b"connection")
    tokens = () if value is None else [t.strip().lower() for t in value.split(b",")]
    if head.version == b"1.1":
        return b"close" not in tokens
    return b"keep-alive" in tokens


class _BackendProtocol(asyncio.Protocol):
    __slots__ = ("session", "transport")

    def __init__(self, session: HttpSession) -> None:
        self.session = session
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.transport.set_write_buffer_limits(high=HIGH_WATER)

    def data_received(self, data: bytes) -> None:
        try:
            self.session.backend_data(self, data)
        except Exception:
            log.exception("http relay: backend data handling failed")
            self.session.close()

    def eof_received(self) -> bool:
        try:
            self.session.backend_gone(self)
        except Exception:
            log.exception("http relay: backend EOF handling failed")
            self.session.close()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        try:
            self.session.backend_gone(self)
        except Exception:
            log.exception("http relay: backend close handling failed")
            self.session.close()

    def pause_writing(self) -> None:
        self.session.hold_client("backend-full", True)

    def resume_writing(self) -> None:
        self.session.hold_client("backend-full", False)


class HttpSession(asyncio.Protocol):
    """One client connection of an HTTP relay (see the module docstring); it is the
    client connection's protocol.  Its callbacks end the session instead of raising."""

    def __init__(self, relay: Relay, policy: HttpPolicy) -> None:
        self.relay = relay
        self.policy = policy
        self.id = relay.new_session_id()
        self.started = time.monotonic()
        self.last_active = self.started
        self.activity = 0
        self.seen_activity = 0
        self.closed = False
        self.client_address: tuple[str, int] = ("", 0)
        self.backend_address: tuple[str, int] = ("", 0)
        self.local_address: tuple[str, int] = ("", 0)
        self.context = RuleContext()
        self.client: asyncio.Transport | None = None
        self._holds: set[str] = set()
        self._client_full = False
        self._client_eof = False
        # requests
        self._inbuf = b""
        self._req_state = _HEAD
        self._req_remaining = 0
        self._req_chunks: ChunkedDecoder | None = None
        self._in_flight = False
        self._keep_alive = True
        self._method = b"GET"
        self._host: bytes | None = None
        # backend
        self._backend: _BackendProtocol | None = None
        self._backend_table: Backend | None = None
        self._backend_rule: str | None = None  #: the ``forward to`` table it was opened for
        self._connecting = False
        self._pending: list[bytes] = []
        self._connect_task: asyncio.Task[None] | None = None
        # responses
        self._respbuf = b""
        self._resp_state = _HEAD
        self._resp_remaining = 0
        self._resp_chunks: ChunkedDecoder | None = None
        self._resp_started = False
        self._out: list[bytes] = []
        self._backend_out: list[bytes] = []
        self._edit_values: list[bytes] | None = None
        self._edit_suffix: bytes | None = None
        self._response_limit = max(policy.headerlen, RESPONSE_HEAD_LIMIT)
        self._resend: bytes | None = None  #: a request sent on a reused backend connection

    def client_protocol(self) -> asyncio.Protocol:
        return self

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        try:
            self.client_made(transport)
        except Exception:
            log.exception("http relay: session setup failed")
            self.close()

    def eof_received(self) -> bool:
        try:
            return self.client_eof()
        except Exception:
            log.exception("http relay: client EOF handling failed")
            self.close()
            return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.close()

    def pause_writing(self) -> None:
        self.client_full(True)

    def resume_writing(self) -> None:
        self.client_full(False)

    # -- client side ---------------------------------------------------------------------

    def client_made(self, transport: asyncio.BaseTransport) -> None:
        self.client = client = cast(asyncio.Transport, transport)
        client.set_write_buffer_limits(high=HIGH_WATER)
        tune_socket(client)
        peer = transport.get_extra_info("peername") or ("", 0)
        local = transport.get_extra_info("sockname") or ("", 0)
        self.client_address = (str(peer[0]), int(peer[1]))
        self.local_address = (str(local[0]), int(local[1]))
        sni = None
        ssl_object = transport.get_extra_info("ssl_object")
        if isinstance(ssl_object, ssl.SSLObject):
            sni = ssl_object.server_hostname
        self.context = RuleContext(
            remote_addr=self.client_address[0], remote_port=self.client_address[1],
            server_addr=self.local_address[0], server_port=self.local_address[1],
            timeout=int(self.relay.session_timeout),
            server_name=sni or self.policy.server_name,
        )  # fmt: skip
        self.relay.opened(self)
        if self.relay.disabled:
            self.close()

    def data_received(self, data: bytes) -> None:
        try:
            if self.closed:
                return
            self.activity += 1
            self.relay.counters.bytes_in += len(data)
            if self._req_state == _TUNNEL:
                self._send_backend(data)
                self._flush_backend()
                return
            if self._inbuf:
                self._inbuf += data
            else:
                edits = self.policy.request_edits
                backend = self._backend
                if (edits is not None and not self._in_flight and self._req_state == _HEAD
                        and backend is not None and not self._connecting
                        and backend.transport is not None):  # fmt: skip
                    # the common case, inline: one whole plain request, a connected backend
                    plain = scan_plain_request(data, self.policy.headerlen)
                    if plain is not None and self._backend_rule is None:
                        head, method, keep_alive, host = plain
                        self.relay.counters.requests_total += 1
                        if edits.edits:
                            values = self._edit_values
                            if values is None or edits.uses_host:
                                values = self._edit_values = edits.values(self.context, host)
                                self._edit_suffix = edits.absent_suffix(values)
                            data = edits.edit(head, values, self._edit_suffix)
                        self._keep_alive = keep_alive
                        self._method = method
                        self._host = host
                        self._in_flight = True
                        self._resp_state = _HEAD
                        self._resp_started = False
                        backend.transport.write(data)
                        self._resend = data
                        return
                self._inbuf = data
            self._process_requests()
        except Exception:
            log.exception("http relay: client data handling failed")
            self.close()

    def client_eof(self) -> bool:
        self._client_eof = True
        if self._req_state == _TUNNEL:
            backend = self._backend
            if backend is not None and backend.transport is not None \
                    and backend.transport.can_write_eof():
                backend.transport.write_eof()
                return True
            self.close()
            return False
        if self._in_flight and self._req_state == _HEAD:
            return True  # the answer still goes out, then the session closes
        self.close()
        return False

    def client_full(self, full: bool) -> None:
        self._client_full = full
        backend = self._backend
        if backend is not None and backend.transport is not None:
            if full:
                backend.transport.pause_reading()
            else:
                backend.transport.resume_reading()

    def hold_client(self, reason: str, hold: bool) -> None:
        """Stop (or go on) reading the client for ``reason``; it reads while no reason holds."""
        client = self.client
        if client is None or self.closed:
            return
        if hold:
            if not self._holds:
                client.pause_reading()
            self._holds.add(reason)
        elif reason in self._holds:
            self._holds.discard(reason)
            if not self._holds:
                client.resume_reading()

    def _process_requests(self) -> None:
        self._process_requests_loop()
        self._flush_backend()

    def _flush_backend(self) -> None:
        out = self._backend_out
        if out:
            backend = self._backend
            if backend is not None and backend.transport is not None:
                backend.transport.write(out[0] if len(out) == 1 else b"".join(out))
            out.clear()

    def _process_requests_loop(self) -> None:
        while not self.closed:
            state = self._req_state
            buf = self._inbuf
            if state == _HEAD:
                if not buf:
                    return
                if self._in_flight:
                    if len(buf) > self.policy.headerlen:
                        self.hold_client("pipelined", True)
                    return
                edits = self.policy.request_edits
                try:
                    if edits is not None:
                        scan = scan_request_head(buf, self.policy.headerlen)
                        if scan is None:
                            return
                        used = scan.used
                    else:
                        parsed = parse_request_head(buf, self.policy.headerlen)
                        if parsed is None:
                            return
                        head, used = parsed
                except HttpError as error:
                    self._refuse(error.status, str(error))
                    return
                self._inbuf = buf[used:]
                if edits is not None:
                    assert scan is not None
                    if not self._start_scanned_request(scan, edits, buf):
                        return
                elif not self._start_request(head, buf, used):
                    return
            elif state == _LENGTH:
                if not buf:
                    return
                n = self._req_remaining
                if len(buf) <= n:
                    self._inbuf = b""
                    self._req_remaining = n - len(buf)
                    self._send_backend(buf)
                else:
                    self._inbuf = buf[n:]
                    self._req_remaining = 0
                    self._send_backend(buf[:n])
                if self._req_remaining == 0:
                    self._req_state = _HEAD
            elif state == _CHUNKED:
                if not buf:
                    return
                decoder = self._req_chunks
                assert decoder is not None
                try:
                    result = decoder.feed(bytes(buf))
                except HttpError as error:
                    self._refuse(error.status, str(error), after_head=True)
                    return
                self._inbuf = buf[result.consumed :]
                self._send_backend(buf[: result.consumed])
                if result.done:
                    self._req_state = _HEAD
                    self._req_chunks = None
            else:
                return

    def _start_request(self, head: RequestHead, raw: bytes, used: int) -> bool:
        policy = self.policy
        counters = self.relay.counters
        counters.requests_total += 1
        try:
            framing = request_framing(head)
        except HttpError as error:
            self._refuse(error.status, str(error))
            return False
        upgrade = head.get(b"upgrade")
        if upgrade is not None and upgrade.lower() == b"websocket" and not policy.websockets:
            self._refuse(403, "Websocket Forbidden")
            return False
        table = None
        hash_data = b""
        data = raw[:used] if len(raw) != used else raw
        if policy.request_rules is not None:
            verdict = policy.request_rules.evaluate(head, self.context)
            if verdict.block:
                counters.blocked += 1
                if policy.return_error:
                    self._refuse(403, "Forbidden", count=False)
                else:
                    self.close()
                return False
            if verdict.edits or verdict.path_strip:
                apply_verdict(head, verdict)
                data = head.to_bytes()
            table = verdict.forward_to
            hash_data = verdict.hash_data
        self._dispatch(data, framing, _keep_alive(head), head.method, head.get(b"host"), table,
                       hash_data)
        return True

    def _start_scanned_request(self, scan: RequestScan, edits: HeaderEdits, raw: bytes) -> bool:
        """A request whose rules are all unconditional header edits (or none at all)."""
        self.relay.counters.requests_total += 1
        upgrade = scan.upgrade
        if upgrade is not None and upgrade.lower() == b"websocket" and not self.policy.websockets:
            self._refuse(403, "Websocket Forbidden")
            return False
        if edits.edits:
            values = self._edit_values
            if values is None or edits.uses_host:
                values = self._edit_values = edits.values(self.context, scan.host)
                self._edit_suffix = edits.absent_suffix(values)
            data = edits.edit(scan.head, values, self._edit_suffix)
        elif scan.parsed is None:
            data = raw[: scan.used] if len(raw) != scan.used else raw
        else:
            data = scan.head + b"\r\n\r\n"
        self._dispatch(data, scan.framing, scan.keep_alive, scan.method, scan.host, None, b"")
        return True

    def _dispatch(self, data: bytes, framing: BodyFraming, keep_alive: bool, method: bytes,
                  host: bytes | None, table: str | None, hash_data: bytes) -> None:
        """Send a request head on (opening a backend connection if needed), and expect its
        body and its response."""
        self._keep_alive = keep_alive
        self._method = method
        self._host = host
        self._in_flight = True
        self._resp_state = _HEAD
        self._resp_started = False
        if framing.kind is FramingKind.LENGTH:
            self._req_state = _LENGTH
            self._req_remaining = framing.length
        elif framing.kind is FramingKind.CHUNKED:
            self._req_state = _CHUNKED
            self._req_chunks = ChunkedDecoder()
        if self._backend is not None and table == self._backend_rule:
            self._send_backend(data)
            self._resend = data if framing.kind is FramingKind.NONE else None
        else:
            self._resend = None
            self._open_backend(data, table, hash_data)

    def _refuse(self, status: int, detail: str, *, after_head: bool = False,
                count: bool = True) -> None:
        """Answer ``status`` and close; nothing of this request goes (further) to a backend."""
        if count:
            self.relay.counters.http_errors += 1
        log.info("relay %s: %s:%d: %d %s", self.relay.name, self.client_address[0],
                 self.client_address[1], status, detail)  # fmt: skip
        client = self.client
        if client is not None and not client.is_closing() and not (after_head
                                                                    and self._resp_started):
            client.write(error_page(status, detail, self.policy.error_style,
                                    self.policy.server_name))  # fmt: skip
        self.close()

    # -- backend side --------------------------------------------------------------------

    def _send_backend(self, data: bytes) -> None:
        backend = self._backend
        if backend is not None and backend.transport is not None and not self._connecting:
            self._backend_out.append(data)
        else:
            self._pending.append(data)

    def _open_backend(self, first: bytes, table: str | None, hash_data: bytes) -> None:
        self._flush_backend()
        old = self._backend
        if old is not None and old.transport is not None:
            old.transport.close()
        self._backend = None
        self._backend_table = None
        self._backend_rule = table
        self._connecting = True
        self._pending = [first]
        self.hold_client("connecting", True)
        self._connect_task = asyncio.ensure_future(self._connect(table, hash_data))

    async def _connect(self, table: str | None, hash_data: bytes) -> None:
        try:
            await self._connect_backend(table, hash_data)
        except Exception:
            log.exception("relay %s: connecting a session failed", self.relay.name)
            self.close()

    async def _connect_backend(self, table: str | None, hash_data: bytes) -> None:
        relay = self.relay
        choice = relay.choose(self.client_address[0], self.local_address[0],
                              self.local_address[1], hash_data, table)  # fmt: skip
        if choice is None:
            relay.counters.sessions_failed += 1
            self._refuse(503, "no host of the table is up")
            return
        backend, host = choice
        protocol = _BackendProtocol(self)
        try:
            await relay.connect(backend, host, lambda: protocol, self.client_address,
                                self.local_address)
        except (OSError, TimeoutError, ssl.SSLError) as error:
            relay.counters.sessions_failed += 1
            self._refuse(502, f"{backend.addresses[host]}:{backend.port} unreachable: {error}")
            return
        transport = protocol.transport
        assert transport is not None
        if self.closed:
            transport.close()
            return
        self.backend_address = (backend.addresses[host], backend.port)
        self._backend = protocol
        self._backend_table = backend
        self._connecting = False
        if self._client_full:
            transport.pause_reading()
        pending, self._pending = self._pending, []
        transport.writelines(pending) if len(pending) > 1 else transport.write(pending[0])
        self.hold_client("connecting", False)

    def backend_data(self, protocol: _BackendProtocol, data: bytes) -> None:
        if protocol is not self._backend or self.closed:
            return
        self.activity += 1
        self.relay.counters.bytes_out += len(data)
        state = self._resp_state
        client = self.client
        assert client is not None
        if state in (_UNTIL_CLOSE, _TUNNEL):
            client.write(data)
            return
        if not self._in_flight:
            # a backend that talks between requests is out of step: drop it
            self._drop_backend()
            return
        if not self._respbuf and state == _HEAD and self.policy.response_rules is None:
            # the common case, inline: one whole response with a Content-Length
            quick = scan_response_length(data, self._method, self._response_limit)
            if quick is not None and quick[2] + quick[1] == len(data):
                self._resp_started = True
                client.write(data)
                self._in_flight = False
                if not self._keep_alive or self._client_eof or self._req_state != _HEAD:
                    self.close()
                elif self._inbuf or self._holds:
                    self.hold_client("pipelined", False)
                    if self._inbuf:
                        self._process_requests()
                return
        self._respbuf = self._respbuf + data if self._respbuf else data
        self._process_responses()

    def _process_responses(self) -> None:
        self._process_responses_loop()
        self._flush_client()

    def _flush_client(self) -> None:
        out = self._out
        if out and self.client is not None:
            self.client.write(out[0] if len(out) == 1 else b"".join(out))
            out.clear()

    def _process_responses_loop(self) -> None:
        while not self.closed:
            state = self._resp_state
            buf = self._respbuf
            if state == _HEAD:
                if not buf:
                    return
                limit = max(self.policy.headerlen, RESPONSE_HEAD_LIMIT)
                try:
                    if self.policy.response_rules is None:
                        scanned = scan_response_head(buf, self._method, limit)
                        if scanned is None:
                            return
                        status, framing, used = scanned
                        head = None
                    else:
                        parsed = parse_response_head(buf, limit)
                        if parsed is None:
                            return
                        head, used = parsed
                        status = head.status
                        framing = response_framing(head, self._method)
                except HttpError as error:
                    self._bad_gateway(str(error))
                    return
                self._respbuf = buf[used:]
                if status < 200 and status != 101:
                    self._out.append(buf[:used])  # 100 Continue and friends
                    continue
                if not self._start_response(status, head, buf, used, framing):
                    return
            elif state == _LENGTH:
                if not buf:
                    return
                n = self._resp_remaining
                if len(buf) <= n:
                    self._respbuf = b""
                    self._resp_remaining = n - len(buf)
                    self._out.append(buf)
                else:
                    self._respbuf = buf[n:]
                    self._resp_remaining = 0
                    self._out.append(buf[:n])
                if self._resp_remaining == 0:
                    self._finish_response()
            elif state == _CHUNKED:
                if not buf:
                    return
                decoder = self._resp_chunks
                assert decoder is not None
                try:
                    result = decoder.feed(bytes(buf))
                except HttpError as error:
                    self._bad_gateway(str(error))
                    return
                self._respbuf = buf[result.consumed :]
                self._out.append(buf[: result.consumed])
                if result.done:
                    self._resp_chunks = None
                    self._finish_response()
            else:
                if buf:
                    self._respbuf = b""
                    self._out.append(buf)
                return

    def _start_response(self, status: int, head: ResponseHead | None, raw: bytes, used: int,
                        framing: BodyFraming) -> bool:
        policy = self.policy
        data = raw[:used] if len(raw) != used else raw
        if policy.response_rules is not None and head is not None:
            context = self.context
            if policy.response_host and context.host != self._host:
                context = self.context = dataclasses.replace(context, host=self._host)
            verdict = policy.response_rules.evaluate(head, context)
            if verdict.block:
                self.relay.counters.blocked += 1
                if policy.return_error:
                    self._refuse(403, "Forbidden", count=False)
                else:
                    self.close()
                return False
            if verdict.edits:
                apply_verdict(head, verdict)
                data = head.to_bytes()
        self._resp_started = True
        if status == 101:
            self._out.append(data)
            self._resp_state = _TUNNEL
            self._req_state = _TUNNEL
            rest, self._inbuf = self._inbuf, b""
            if rest:
                self._send_backend(rest)
                self._flush_backend()
            return True
        kind = framing.kind
        if kind is FramingKind.UNTIL_CLOSE or kind is FramingKind.TUNNEL:
            self._keep_alive = False
            self._resp_state = _UNTIL_CLOSE if kind is FramingKind.UNTIL_CLOSE else _TUNNEL
            if kind is FramingKind.TUNNEL:
                self._req_state = _TUNNEL
            self._out.append(data)
            return True
        self._out.append(data)
        if kind is FramingKind.LENGTH and framing.length:
            self._resp_state = _LENGTH
            self._resp_remaining = framing.length
        elif kind is FramingKind.CHUNKED:
            self._resp_state = _CHUNKED
            self._resp_chunks = ChunkedDecoder(response=True)
        else:
            self._finish_response()
        return True

    def _finish_response(self) -> None:
        self._flush_client()
        self._in_flight = False
        self._resp_state = _HEAD
        if self._respbuf:
            self._respbuf = b""
            self._drop_backend()  # bytes after the response: the backend is out of step
        if not self._keep_alive or self._client_eof or self._req_state != _HEAD:
            self.close()
            return
        self.hold_client("pipelined", False)
        if self._inbuf:
            self._process_requests()

    def _bad_gateway(self, detail: str) -> None:
        self.relay.counters.http_errors += 1
        log.info("relay %s: backend %s:%d: %s", self.relay.name, *self.backend_address, detail)
        client = self.client
        if client is not None and not self._resp_started and not client.is_closing():
            client.write(error_page(502, detail, self.policy.error_style,
                                    self.policy.server_name))  # fmt: skip
        self.close()

    def backend_gone(self, protocol: _BackendProtocol) -> None:
        """The backend closed (EOF or lost)."""
        if protocol is not self._backend or self.closed:
            return
        if self._resp_state in (_UNTIL_CLOSE, _TUNNEL):
            self.close()  # the response ends here; what was written is still sent
        elif self._in_flight:
            resend = self._resend
            if self._resp_started:
                self.close()
            elif resend is not None and self._req_state == _HEAD:
                # a kept-alive backend connection closed as the request went out:
                # send it once more on a new connection (no body, nothing answered)
                self._resend = None
                self._backend = None
                self._open_backend(resend, self._backend_rule, b"")
            else:
                self._bad_gateway("connection closed before a complete response")
        else:
            self._drop_backend()

    def _drop_backend(self) -> None:
        self._backend_out.clear()
        backend = self._backend
        self._backend = None
        self._backend_table = None
        if backend is not None and backend.transport is not None:
            backend.transport.close()
        if self._req_state == _TUNNEL:
            self.close()

    # -- end -------------------------------------------------------------------------------

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        task = self._connect_task
        if task is not None and not task.done() and task is not asyncio.current_task():
            task.cancel()
        if self.client is not None:
            if self._out and not self.client.is_closing():
                self._flush_client()
            self.client.close()
        backend = self._backend
        if backend is not None and backend.transport is not None:
            backend.transport.close()
        self._backend = None
        self.relay.closed(self)


def http_session_factory(policy: HttpPolicy) -> Callable[[Relay], HttpSession]:
    """A session factory for :class:`~carpool.relayd.relay.Relay` serving ``policy``."""

    def make(relay: Relay) -> HttpSession:
        return HttpSession(relay, policy)

    return make


__all__ = ["HttpPolicy", "HttpSession", "error_page", "http_session_factory"]
