"""relayd's relays, layer 4: accept, pick a host of the table, and pass bytes both ways.

Each session is two asyncio Protocols wired to each other: what one side receives
is written to the other at once, and when a side's write buffer fills its peer
stops reading (flow control), so a slow client stalls only its own session.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from carpool.relayd.balance import Balancer, NoHostError

log = logging.getLogger("carpool.relayd")

HIGH_WATER = 1 << 20


@dataclass
class Backend:
    """A table as a relay uses it: its balancer and hosts' addresses, and the port."""

    table: str
    port: int
    balancer: Balancer
    addresses: dict[int, str]


@dataclass
class RelayCounters:
    sessions_total: int = 0
    sessions_active: int = 0
    sessions_failed: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    per_host: dict[int, int] = field(default_factory=dict)


class _Side(asyncio.Protocol):
    def __init__(self, session: Session, name: str) -> None:
        self.session = session
        self.name = name
        self.transport: asyncio.Transport | None = None
        self.peer: _Side | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        transport.set_write_buffer_limits(high=HIGH_WATER)
        self.session.connected(self)

    def data_received(self, data: bytes) -> None:
        peer = self.peer
        if peer is None or peer.transport is None:
            self.session.pending.append(data)  # the backend is not connected yet
            return
        peer.transport.write(data)
        self.session.moved(self, len(data))

    def eof_received(self) -> bool:
        peer = self.peer
        if peer is not None and peer.transport is not None and peer.transport.can_write_eof():
            peer.transport.write_eof()
            return True  # half-close: the other direction goes on
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.session.close()

    def pause_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.resume_reading()


class Session:
    def __init__(self, relay: TcpRelay) -> None:
        self.relay = relay
        self.client = _Side(self, "client")
        self.backend: _Side | None = None
        self.host: int | None = None
        self.pending: list[bytes] = []
        self.started = time.monotonic()
        self.last_active = self.started
        self.closed = False
        self.connecting: asyncio.Task[None] | None = None

    def connected(self, side: _Side) -> None:
        if side is self.client:
            assert side.transport is not None
            self.relay.opened(self)
            self.connecting = asyncio.ensure_future(self.relay.connect_backend(self))

    def moved(self, side: _Side, nbytes: int) -> None:
        self.last_active = time.monotonic()
        if side is self.client:
            self.relay.counters.bytes_in += nbytes
        else:
            self.relay.counters.bytes_out += nbytes

    def wire(self, backend: _Side) -> None:
        self.backend = backend
        backend.peer, self.client.peer = self.client, backend
        assert backend.transport is not None
        for data in self.pending:
            backend.transport.write(data)
            self.moved(self.client, len(data))
        self.pending.clear()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        for side in (self.client, self.backend):
            if side is not None and side.transport is not None:
                side.transport.close()
        self.relay.closed(self)


class TcpRelay:
    """One relay: listeners, its tables (the first with an up host serves), its sessions."""

    def __init__(
        self,
        name: str,
        backends: list[Backend],
        *,
        session_timeout: float,
        connect_timeout: float = 5.0,
        on_event: Callable[[str, dict[str, str | int]], None] | None = None,
    ) -> None:
        self.name = name
        self.backends = backends
        self.session_timeout = session_timeout
        self.connect_timeout = connect_timeout
        self.on_event = on_event
        self.counters = RelayCounters()
        self.sessions: set[Session] = set()
        self.servers: list[asyncio.AbstractServer] = []
        self.listen_address = ""
        self.listen_port = 0
        self._sweeper: asyncio.Task[None] | None = None

    async def listen(self, address: str, port: int) -> None:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(
            lambda: Session(self).client, address, port, reuse_address=True, backlog=512
        )
        self.servers.append(server)
        self.listen_address, self.listen_port = address, port
        if self._sweeper is None:
            self._sweeper = asyncio.ensure_future(self._sweep())

    def opened(self, session: Session) -> None:
        self.sessions.add(session)
        self.counters.sessions_total += 1
        self.counters.sessions_active += 1

    def closed(self, session: Session) -> None:
        if session in self.sessions:
            self.sessions.discard(session)
            self.counters.sessions_active -= 1
            if session.host is not None:
                for backend in self.backends:
                    if session.host in backend.addresses:
                        backend.balancer.session_closed(session.host)

    def choose(self, client: str) -> tuple[Backend, int] | None:
        for backend in self.backends:  # the main table, then the backup tables
            try:
                host = backend.balancer.select(
                    client_addr=client, relay_addr=self.listen_address, relay_port=self.listen_port
                )
            except NoHostError:
                continue
            return backend, host
        return None

    async def connect_backend(self, session: Session) -> None:
        transport = session.client.transport
        assert transport is not None
        peer = transport.get_extra_info("peername") or ("", 0)
        choice = self.choose(str(peer[0]))
        if choice is None:
            self.counters.sessions_failed += 1
            log.info("relay %s: no host up, closing the session from %s", self.name, peer[0])
            session.close()
            return
        backend, host = choice
        address = backend.addresses[host]
        loop = asyncio.get_running_loop()
        side = _Side(session, "backend")
        try:
            await asyncio.wait_for(
                loop.create_connection(lambda: side, address, backend.port), self.connect_timeout
            )
        except (OSError, TimeoutError) as error:
            self.counters.sessions_failed += 1
            log.info("relay %s: %s:%d unreachable: %s", self.name, address, backend.port, error)
            session.close()
            return
        if session.closed:
            if side.transport is not None:
                side.transport.close()
            return
        session.host = host
        backend.balancer.session_opened(host)
        self.counters.per_host[host] = self.counters.per_host.get(host, 0) + 1
        sock = side.transport.get_extra_info("socket") if side.transport else None
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        session.wire(side)

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(min(5.0, max(0.5, self.session_timeout / 4)))
            limit = time.monotonic() - self.session_timeout
            for session in [s for s in self.sessions if s.last_active < limit]:
                session.close()

    async def close(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
        for server in self.servers:
            server.close()
        for session in list(self.sessions):
            session.close()
        for server in self.servers:
            await server.wait_closed()
