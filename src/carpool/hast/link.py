"""The replication link between a HAST primary and its secondary: one TCP connection.

A transport only: it carries ``hast.wire`` messages (encoded with the resource's
checksum and compression), several per read when they arrive together. What the
messages mean — HELLO, authentication, keepalives and the peer's timeout — is
the role machines' business (``hast.primary``, ``hast.secondary``). The primary
dials; the secondary listens.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import socket
import time
import typing
from collections.abc import Awaitable, Callable
from typing import Any

from carpool.errors import CarpoolError
from carpool.hast.common import Checksum, Compression
from carpool.hast.wire import (
    Message,
    WireDecoder,
    WireError,
    encode,
)

log = logging.getLogger("carpool.hastd")

READ_CHUNK = 256 * 1024
SOCKET_BUFFER = 4 << 20
BACKOFF_MIN, BACKOFF_MAX = 0.2, 5.0
DRAIN_ABOVE = 8 << 20


class LinkError(CarpoolError):
    """The link is unusable: the peer vanished, timed out, lied, or refused us."""


class PeerLink(asyncio.BufferedProtocol):
    """A connection to the peer, as an asyncio protocol.

    Bytes arrive in :meth:`get_buffer`/:meth:`buffer_updated`: the body of a large
    data message is received straight into its own buffer, which then becomes the
    message's ``data`` (no copy before the disk write). Messages are handed to
    :attr:`on_message` when one is set, else queued for :meth:`next_message`.
    """

    def __init__(
        self,
        *,
        timeout: float | None = None,
        checksum: Checksum = Checksum.NONE,
        compression: Compression = Compression.NONE,
        on_connect: Callable[[PeerLink], None] | None = None,
    ) -> None:
        self.timeout = timeout
        self.checksum = checksum
        self.compression = compression
        self.decoder = WireDecoder()
        self.transport: asyncio.Transport | None = None
        self.peer: Any = None
        self.last_sent = time.monotonic()
        self.bytes_sent = 0
        self.bytes_received = 0
        self.on_message: Callable[[Message], None] | None = None
        self.on_error: Callable[[LinkError], None] | None = None
        self._on_connect = on_connect
        self._pending: collections.deque[Message] = collections.deque()
        self._error: LinkError | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._writable: asyncio.Future[None] | None = None
        self._closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._scratch = bytearray(READ_CHUNK)
        self._into_payload = False
        self._outbox: list[bytes | bytearray | memoryview] = []

    # -- asyncio.BufferedProtocol -----------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but behave as one.
        self.transport = typing.cast(asyncio.Transport, transport)
        self.peer = transport.get_extra_info("peername")
        self.transport.set_write_buffer_limits(high=DRAIN_ABOVE, low=DRAIN_ABOVE // 4)
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SOCKET_BUFFER)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SOCKET_BUFFER)
        if self._on_connect is not None:
            self._on_connect(self)

    def get_buffer(self, sizehint: int) -> memoryview:
        target = self.decoder.payload_buffer()
        if target is not None:
            self._into_payload = True
            return target
        self._into_payload = False
        return memoryview(self._scratch)

    def buffer_updated(self, nbytes: int) -> None:
        self.bytes_received += nbytes
        try:
            if self._into_payload:
                messages = self.decoder.payload_received(nbytes)
            else:
                messages = self.decoder.feed(memoryview(self._scratch)[:nbytes])
        except WireError as error:
            self._fail(LinkError(f"peer {self.peer} sent garbage: {error}"))
            if self.transport is not None:
                self.transport.abort()
            return
        if self.on_message is not None:
            for message in messages:
                if self._error is not None:
                    break
                self.on_message(message)
        else:
            self._pending.extend(messages)
            self._wake()

    def eof_received(self) -> bool:
        self._fail(LinkError(f"peer {self.peer} closed the connection"))
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        reason = f"is gone: {exc}" if exc is not None else "closed the connection"
        self._fail(LinkError(f"peer {self.peer} {reason}"))
        if not self._closed.done():
            self._closed.set_result(None)
        if self._writable is not None and not self._writable.done():
            self._writable.set_result(None)

    def pause_writing(self) -> None:
        if self._writable is None or self._writable.done():
            self._writable = asyncio.get_running_loop().create_future()

    def resume_writing(self) -> None:
        if self._writable is not None and not self._writable.done():
            self._writable.set_result(None)

    # -- for the daemon ---------------------------------------------------------------------

    def _fail(self, error: LinkError) -> None:
        if self._error is None:
            self._error = error
            self._wake()
            if self.on_error is not None:
                self.on_error(error)

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def deliver_to(
        self, on_message: Callable[[Message], None], on_error: Callable[[LinkError], None]
    ) -> None:
        """From now on, hand each message (and the link's failure) to these callbacks."""
        self.on_message, self.on_error = on_message, on_error
        while self._pending and self._error is None:
            on_message(self._pending.popleft())
        if self._error is not None:
            on_error(self._error)

    def send(self, message: Message) -> None:
        """Queue ``message`` (call :meth:`drain` to wait for the socket to take it)."""
        if self.transport is None or self.transport.is_closing():
            return
        buffers = encode(message, checksum=self.checksum, compression=self.compression)
        self.bytes_sent += sum(len(b) for b in buffers)
        # Everything sent while the loop runs this callback leaves in one system call.
        if not self._outbox:
            asyncio.get_running_loop().call_soon(self._flush)
        self._outbox += buffers
        self.last_sent = time.monotonic()

    def _flush(self) -> None:
        outbox, self._outbox = self._outbox, []
        if self.transport is not None and not self.transport.is_closing():
            self.transport.writelines(outbox)

    def send_raw(self, data: bytes) -> None:
        """Bytes as they are (tests use it to play a peer that speaks garbage)."""
        if self.transport is not None:
            self.transport.write(data)

    @property
    def needs_drain(self) -> bool:
        """Whether the socket's send buffer is past its high-water mark."""
        if self.transport is None:
            return False
        queued = self.transport.get_write_buffer_size() + sum(len(b) for b in self._outbox)
        return queued > DRAIN_ABOVE

    async def drain(self) -> None:
        self._flush()
        if self._error is not None and self.transport is not None and self.transport.is_closing():
            raise self._error
        while self._writable is not None and not self._writable.done():
            await asyncio.shield(self._writable)
        if self._error is not None and self.transport is not None and self.transport.is_closing():
            raise self._error

    async def next_message(self) -> Message:
        """The next message (several may arrive in one read: the rest wait their turn)."""
        while not self._pending:
            if self._error is not None:
                raise self._error
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                if self.timeout is None:
                    await self._waiter
                else:
                    await asyncio.wait_for(asyncio.shield(self._waiter), self.timeout)
            except TimeoutError:
                raise LinkError(f"peer {self.peer} sent nothing for {self.timeout} s") from None
            finally:
                self._waiter = None
        return self._pending.popleft()

    async def close(self) -> None:
        if self.transport is not None:
            self._flush()
            self.transport.close()
            await self._closed


async def dial(
    host: str,
    port: int,
    *,
    timeout: float,
    checksum: Checksum = Checksum.NONE,
    compression: Compression = Compression.NONE,
    source: str | None = None,
) -> PeerLink:
    """One connection attempt to the secondary (LinkError if it fails).

    Silence on an open link is the role machines' to time out (they tick).
    """
    loop = asyncio.get_running_loop()
    try:
        _, link = await asyncio.wait_for(
            loop.create_connection(
                lambda: PeerLink(checksum=checksum, compression=compression),
                host, port, local_addr=(source, 0) if source else None,
            ),
            timeout,
        )  # fmt: skip
    except (OSError, TimeoutError) as error:
        raise LinkError(f"cannot reach {host}:{port}: {error}") from None
    return link


async def listen(
    host: str, port: int, on_connect: Callable[[PeerLink], None], **options: Any
) -> asyncio.AbstractServer:
    """Accept links on ``host:port``; ``on_connect`` gets each new one."""
    loop = asyncio.get_running_loop()
    return await loop.create_server(lambda: PeerLink(on_connect=on_connect, **options), host, port)


async def dial_until_connected(
    attempt: Callable[[], Awaitable[PeerLink]], stopping: asyncio.Event
) -> PeerLink | None:
    """Retry ``attempt`` with exponential backoff until it works or ``stopping`` is set."""
    delay = BACKOFF_MIN
    while not stopping.is_set():
        try:
            return await attempt()
        except LinkError as error:
            log.debug("%s; retrying in %.1f s", error, delay)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stopping.wait(), delay)
        delay = min(delay * 2, BACKOFF_MAX)
    return None
