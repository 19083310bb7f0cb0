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
from collections.abc import AsyncIterator, Awaitable, Callable

from carpool.errors import CarpoolError
from carpool.hast.common import Checksum, Compression
from carpool.hast.wire import (
    Message,
    WireDecoder,
    WireError,
    encode,
)

log = logging.getLogger("carpool.hastd")

READ_CHUNK = 1 << 20
SOCKET_BUFFER = 4 << 20
BACKOFF_MIN, BACKOFF_MAX = 0.2, 5.0


class LinkError(CarpoolError):
    """The link is unusable: the peer vanished, timed out, lied, or refused us."""


class PeerLink:
    """A connected link; :meth:`messages` yields what the peer sends until it is gone."""

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        *,
        timeout: float | None = None,
        checksum: Checksum = Checksum.NONE,
        compression: Compression = Compression.NONE,
    ) -> None:
        self.reader = reader
        self.writer = writer
        self.timeout = timeout
        self.checksum = checksum
        self.compression = compression
        self.decoder = WireDecoder()
        self.peer = writer.get_extra_info("peername")
        self.last_sent = time.monotonic()
        self.bytes_sent = 0
        self.bytes_received = 0
        self._pending: collections.deque[Message] = collections.deque()
        sock = writer.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SOCKET_BUFFER)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SOCKET_BUFFER)

    def send(self, message: Message) -> None:
        """Queue ``message`` (call :meth:`drain` to wait for the socket to take it)."""
        buffers = encode(message, checksum=self.checksum, compression=self.compression)
        self.bytes_sent += sum(len(b) for b in buffers)
        self.writer.writelines(buffers)
        self.last_sent = time.monotonic()

    async def drain(self) -> None:
        try:
            await self.writer.drain()
        except (ConnectionError, OSError) as error:
            raise LinkError(f"peer {self.peer} is gone: {error}") from None

    async def messages(self) -> AsyncIterator[Message]:
        """Every message until the peer closes (or, with a ``timeout``, falls silent)."""
        while True:
            yield await self.next_message()

    async def next_message(self) -> Message:
        """The next message (several may arrive in one read: the rest wait their turn)."""
        while not self._pending:
            try:
                data = await asyncio.wait_for(self.reader.read(READ_CHUNK), self.timeout)
            except TimeoutError:
                raise LinkError(f"peer {self.peer} sent nothing for {self.timeout} s") from None
            except (ConnectionError, OSError) as error:
                raise LinkError(f"peer {self.peer} is gone: {error}") from None
            if not data:
                raise LinkError(f"peer {self.peer} closed the connection")
            self.bytes_received += len(data)
            try:
                decoded = self.decoder.feed(data)
            except WireError as error:
                raise LinkError(f"peer {self.peer} sent garbage: {error}") from None
            self._pending.extend(decoded)
        return self._pending.popleft()

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(ConnectionError, OSError):
            await self.writer.wait_closed()


async def dial(
    host: str,
    port: int,
    *,
    timeout: float,
    checksum: Checksum = Checksum.NONE,
    compression: Compression = Compression.NONE,
    source: str | None = None,
) -> PeerLink:
    """One connection attempt to the secondary (LinkError if it fails)."""
    try:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(
                host, port, limit=READ_CHUNK, local_addr=(source, 0) if source else None
            ),
            timeout,
        )
    except (OSError, TimeoutError) as error:
        raise LinkError(f"cannot reach {host}:{port}: {error}") from None
    return PeerLink(reader, writer, timeout=timeout, checksum=checksum, compression=compression)


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
