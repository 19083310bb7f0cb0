"""relayd's relays: listeners, host choice, backend connections and layer-4 sessions.

A :class:`Relay` owns a relay's listeners (plain or TLS), its tables (the first
with an up host serves; later ones are backups), its live sessions and their
counters.  What happens to the bytes is the session's business: a
:class:`TcpSession` passes them both ways untouched, an HTTP session
(``relayd.http_relay``) parses heads and applies the protocol's rules.

Each session is two asyncio Protocols wired to each other: what one side
receives is written to the other at once, and when a side's write buffer fills
its peer stops reading (flow control), so a slow client stalls only its own
session.  Protocol callbacks never raise: uvloop aborts the process on some
exceptions escaping a callback, so every callback ends the session instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import socket
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol as TypingProtocol
from typing import cast

from carpool.relayd.balance import Balancer, NoHostError
from carpool.relayd.proxy_protocol import proxy_header

log = logging.getLogger("carpool.relayd")

HIGH_WATER = 1 << 20
CONNECT_TIMEOUT = 5.0


@dataclass
class Backend:
    """A table as a relay uses it: its balancer and hosts' addresses, and the port."""

    table: str
    port: int
    balancer: Balancer
    addresses: dict[int, str]
    retry: dict[int, int] = field(default_factory=dict)  #: host id -> connect retries


@dataclass
class RelayCounters:
    sessions_total: int = 0
    sessions_active: int = 0
    sessions_failed: int = 0
    requests_total: int = 0
    http_errors: int = 0
    blocked: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    per_host: dict[str, int] = field(default_factory=dict)  #: "table:port/host" -> sessions


class RelaySession(TypingProtocol):
    """What a :class:`Relay` needs of a session of any kind."""

    id: int
    started: float
    last_active: float  #: updated from ``activity`` by the relay's sweeps
    seen_activity: int
    closed: bool
    client_address: tuple[str, int]
    backend_address: tuple[str, int]

    @property
    def activity(self) -> int:
        """Bumped on every read; cheaper than reading the clock each time."""

    def close(self) -> None: ...

    def client_protocol(self) -> asyncio.Protocol: ...


@dataclass(frozen=True, slots=True)
class SessionInfo:
    """One live session as ``relayctl show sessions`` prints it."""

    id: int
    client_addr: str
    client_port: int
    backend_addr: str
    backend_port: int
    age: float
    idle: float


def tune_socket(transport: asyncio.BaseTransport, nodelay: bool = True) -> None:
    sock = transport.get_extra_info("socket")
    if sock is not None and nodelay:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class Relay:
    """One relay: listeners, its tables (the first with an up host serves), its sessions.

    ``session_factory`` makes the session for each accepted connection.
    """

    def __init__(
        self,
        name: str,
        backends: list[Backend],
        *,
        session_timeout: float,
        session_factory: Callable[[Relay], RelaySession] | None = None,
        backend_tls: ssl.SSLContext | None = None,
        connect_timeout: float = CONNECT_TIMEOUT,
        backlog: int = 512,
        proxy_protocol: str | None = None,
        log_connections: bool = False,
    ) -> None:
        self.name = name
        self.proxy_protocol = proxy_protocol
        self.log_connections = log_connections  #: relayd.conf ``log connection``
        self.backends = backends
        self.session_timeout = session_timeout
        self.session_factory: Callable[[Relay], RelaySession] = (
            session_factory if session_factory is not None else TcpSession
        )
        self.backend_tls = backend_tls
        self.connect_timeout = connect_timeout
        self.backlog = backlog
        self.disabled = False
        self.counters = RelayCounters()
        self.sessions: dict[int, RelaySession] = {}
        self.servers: list[asyncio.AbstractServer] = []
        self._ids = itertools.count(1)
        self._sweeper: asyncio.Task[None] | None = None

    def new_session_id(self) -> int:
        return next(self._ids)

    async def listen(
        self, address: str, port: int, tls: ssl.SSLContext | None = None, *,
        reuse_port: bool = False,
    ) -> None:  # fmt: skip
        loop = asyncio.get_running_loop()
        server = await loop.create_server(
            lambda: self.session_factory(self).client_protocol(),
            address, port, reuse_address=True, reuse_port=reuse_port or None,
            backlog=self.backlog, ssl=tls,
        )  # fmt: skip
        self.servers.append(server)
        if self._sweeper is None:
            self._sweeper = asyncio.ensure_future(self._sweep())

    def opened(self, session: RelaySession) -> None:
        self.sessions[session.id] = session
        self.counters.sessions_total += 1
        self.counters.sessions_active += 1

    def closed(self, session: RelaySession) -> None:
        if self.sessions.pop(session.id, None) is not None:
            self.counters.sessions_active -= 1
            if self.log_connections:
                client, backend = session.client_address, session.backend_address
                log.info("relay %s, session %d (%d active), %s:%d -> %s:%d, done, %.0fs",
                         self.name, session.id, self.counters.sessions_active, client[0],
                         client[1], backend[0], backend[1], time.monotonic() - session.started)

    def choose(
        self,
        client: str,
        relay_addr: str,
        relay_port: int,
        hash_data: bytes = b"",
        table: str | None = None,
    ) -> tuple[Backend, int] | None:
        """The table and host for a new backend connection, or None if no host is up.

        ``table`` (a rule's ``forward to``) restricts the choice to that table."""
        for backend in self.backends:  # the main table, then the backup tables
            if table is not None and backend.table != table:
                continue
            try:
                host = backend.balancer.select(
                    client_addr=client, relay_addr=relay_addr, relay_port=relay_port,
                    hash_data=hash_data,
                )  # fmt: skip
            except NoHostError:
                continue
            return backend, host
        return None

    async def connect(
        self, backend: Backend, host: int, factory: Callable[[], asyncio.Protocol],
        client: tuple[str, int] = ("", 0), local: tuple[str, int] = ("", 0),
    ) -> asyncio.Transport:
        """Connect to ``host`` of ``backend``; relayd retries the same host ``retry`` times.

        With ``proxy-protocol``, the PROXY header for ``client`` (who connected to the
        relay's ``local`` address) is the first thing written."""  # fmt: skip
        loop = asyncio.get_running_loop()
        address = backend.addresses[host]
        attempts = 1 + backend.retry.get(host, 0)
        for attempt in range(attempts):
            try:
                transport, _ = await asyncio.wait_for(
                    loop.create_connection(
                        factory, address, backend.port, ssl=self.backend_tls,
                        server_hostname="" if self.backend_tls is not None else None,
                    ),
                    self.connect_timeout,
                )  # fmt: skip
            except (OSError, TimeoutError, ssl.SSLError):
                if attempt + 1 == attempts:
                    raise
                continue
            tune_socket(transport)
            if self.proxy_protocol is not None:
                transport.write(proxy_header(self.proxy_protocol, client, local))
            key = f"{backend.table}:{backend.port}/{address}"
            self.counters.per_host[key] = self.counters.per_host.get(key, 0) + 1
            return transport
        raise OSError("no connection attempt made")

    def refresh_activity(self, now: float) -> None:
        for s in list(self.sessions.values()):
            if s.activity != s.seen_activity:
                s.seen_activity = s.activity
                s.last_active = now

    def session_infos(self) -> list[SessionInfo]:
        now = time.monotonic()
        self.refresh_activity(now)
        return [
            SessionInfo(s.id, s.client_address[0], s.client_address[1], s.backend_address[0],
                        s.backend_address[1], now - s.started, now - s.last_active)
            for s in list(self.sessions.values())
        ]

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(min(5.0, max(0.5, self.session_timeout / 4)))
            now = time.monotonic()
            self.refresh_activity(now)
            limit = now - self.session_timeout
            for session in [s for s in self.sessions.values() if s.last_active < limit]:
                session.close()

    def stop_listening(self) -> None:
        for server in self.servers:
            server.close()

    async def close(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
        self.stop_listening()
        for session in list(self.sessions.values()):
            session.close()
        for server in self.servers:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(server.wait_closed(), 2.0)


# -- layer 4 -------------------------------------------------------------------------------


class _Side(asyncio.Protocol):
    __slots__ = ("activity", "name", "out", "peer", "session", "transport")

    def __init__(self, session: TcpSession, name: str) -> None:
        self.session = session
        self.name = name
        self.transport: asyncio.Transport | None = None
        self.peer: _Side | None = None
        self.out: asyncio.Transport | None = None  #: the peer's transport, once wired
        self.activity = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        try:
            self.transport = cast(asyncio.Transport, transport)
            self.transport.set_write_buffer_limits(high=HIGH_WATER)
            self.session.connected(self)
        except Exception:
            log.exception("relay session setup failed")
            self.session.close()

    def data_received(self, data: bytes) -> None:
        out = self.out
        if out is None:
            self.session.pending.append(data)  # the backend is not connected yet
            return
        out.write(data)
        self.activity += 1

    def eof_received(self) -> bool:
        try:
            peer = self.peer
            if peer is None:
                self.session.eof_early = True
                return True
            if peer.transport is not None and peer.transport.can_write_eof():
                peer.transport.write_eof()
                self.session.half_closed(self)
                return True  # half-close: the other direction goes on
        except Exception:
            log.exception("relay half-close failed")
        self.session.close()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.session.close()

    def pause_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.resume_reading()


class TcpSession:
    """A layer-4 session: bytes both ways, half-close passed on."""

    def __init__(self, relay: Relay) -> None:
        self.relay = relay
        self.id = relay.new_session_id()
        self.client = _Side(self, "client")
        self.backend: _Side | None = None
        self.pending: list[bytes] = []
        self.started = time.monotonic()
        self.last_active = self.started
        self.seen_activity = 0
        self.closed = False
        self.eof_early = False
        self.client_address: tuple[str, int] = ("", 0)
        self.local_address: tuple[str, int] = ("", 0)
        self.backend_address: tuple[str, int] = ("", 0)
        self._half = 0
        self._connecting: asyncio.Task[None] | None = None

    def client_protocol(self) -> asyncio.Protocol:
        return self.client

    @property
    def activity(self) -> int:
        backend = self.backend
        return self.client.activity + (backend.activity if backend is not None else 0)

    def connected(self, side: _Side) -> None:
        if side is not self.client:
            return
        assert side.transport is not None
        tune_socket(side.transport)
        peer = side.transport.get_extra_info("peername") or ("", 0)
        local = side.transport.get_extra_info("sockname") or ("", 0)
        self.client_address = (str(peer[0]), int(peer[1]))
        self.local_address = (str(local[0]), int(local[1]))
        self.relay.opened(self)
        if self.relay.disabled:
            self.close()
            return
        self._connecting = asyncio.ensure_future(self._connect())

    async def _connect(self) -> None:
        try:
            await self._connect_backend()
        except Exception:
            log.exception("relay %s: connecting a session failed", self.relay.name)
            self.close()

    async def _connect_backend(self) -> None:
        relay = self.relay
        transport = self.client.transport
        assert transport is not None
        choice = relay.choose(self.client_address[0], *self.local_address)
        if choice is None:
            relay.counters.sessions_failed += 1
            log.info("relay %s: no host up, closing the session from %s", relay.name,
                     self.client_address[0])  # fmt: skip
            self.close()
            return
        backend, host = choice
        side = _Side(self, "backend")
        try:
            await relay.connect(backend, host, lambda: side, self.client_address,
                                self.local_address)
        except (OSError, TimeoutError, ssl.SSLError) as error:
            relay.counters.sessions_failed += 1
            log.info("relay %s: %s:%d unreachable: %s", relay.name, backend.addresses[host],
                     backend.port, error)  # fmt: skip
            self.close()
            return
        if self.closed:
            if side.transport is not None:
                side.transport.close()
            return
        self.backend_address = (backend.addresses[host], backend.port)
        self.backend = side
        side.peer, self.client.peer = self.client, side
        assert side.transport is not None
        side.out, self.client.out = self.client.transport, side.transport
        for data in self.pending:
            side.transport.write(data)
        self.pending.clear()
        if self.eof_early and side.transport.can_write_eof():
            side.transport.write_eof()
            self.half_closed(self.client)

    def half_closed(self, side: _Side) -> None:
        self._half += 1
        if self._half >= 2:
            self.close()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self._connecting is not None and not self._connecting.done():
            self._connecting.cancel()
        for side in (self.client, self.backend):
            if side is not None and side.transport is not None:
                side.transport.close()
        self.relay.closed(self)
