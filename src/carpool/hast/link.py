"""The replication link between a HAST primary and its secondary: one TCP connection.

It carries ``hast.wire`` messages, opens with the HELLO exchange (and, when the
resource has a ``key``, mutual authentication: each side proves it knows the key
over both nonces), keeps itself alive (a KEEPALIVE whenever nothing else was sent
for a third of the timeout) and declares the peer gone when nothing at all arrives
for ``timeout`` seconds, as hastd does. The primary dials with backoff; the
secondary listens. What the messages mean is the role machines' business.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import logging
import os
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable

from carpool.errors import CarpoolError
from carpool.hast.common import Checksum, Compression
from carpool.hast.wire import (
    NONCE_SIZE,
    Auth,
    Error,
    Hello,
    HelloFlag,
    Keepalive,
    Message,
    WireDecoder,
    WireError,
    auth_mac,
    encode,
    verify_auth,
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
        timeout: float,
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
        self._keepalive: asyncio.Task[None] | None = None
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
        """Every message until the peer closes or falls silent for ``timeout`` seconds."""
        while True:
            yield await self.next_message()

    async def next_message(self) -> Message:
        """The next message (several may arrive in one read: the rest wait their turn)."""
        while not self._pending:
            try:
                data = await asyncio.wait_for(self.reader.read(READ_CHUNK), self.timeout)
            except TimeoutError:
                raise LinkError(f"peer {self.peer} sent nothing for {self.timeout:g} s") from None
            except (ConnectionError, OSError) as error:
                raise LinkError(f"peer {self.peer} is gone: {error}") from None
            if not data:
                raise LinkError(f"peer {self.peer} closed the connection")
            self.bytes_received += len(data)
            try:
                decoded = self.decoder.feed(data)
            except WireError as error:
                raise LinkError(f"peer {self.peer} sent garbage: {error}") from None
            self._pending.extend(m for m in decoded if not isinstance(m, Keepalive))
        return self._pending.popleft()

    def start_keepalive(self) -> None:
        self._keepalive = asyncio.ensure_future(self._keep_alive())

    async def _keep_alive(self) -> None:
        interval = max(0.05, self.timeout / 3)
        while not self.writer.is_closing():
            idle = time.monotonic() - self.last_sent
            if idle >= interval:
                self.send(Keepalive())
                with contextlib.suppress(LinkError):
                    await self.drain()
                idle = 0.0
            await asyncio.sleep(interval - idle)

    async def close(self) -> None:
        if self._keepalive is not None:
            self._keepalive.cancel()
        self.writer.close()
        with contextlib.suppress(ConnectionError, OSError):
            await self.writer.wait_closed()


def new_nonce() -> bytes:
    return os.urandom(NONCE_SIZE)


async def handshake(link: PeerLink, mine: Hello, key: bytes | None, *, dialing: bool) -> Hello:
    """Exchange HELLOs (the dialer speaks first), then AUTH both ways if there is a key.

    Returns the peer's HELLO; LinkError if the peer refuses, lies about the resource,
    or fails authentication (it is then told why, so its operator sees it too).
    """
    if dialing:
        link.send(mine)
        await link.drain()
    message = await link.next_message()
    if isinstance(message, Error):
        raise LinkError(f"peer {link.peer} refused: {message.message}")
    if not isinstance(message, Hello):
        raise LinkError(f"peer {link.peer} opened with {type(message).__name__}, not HELLO")
    if message.resource != mine.resource:
        refuse = f"resource {message.resource!r} is not configured here as {mine.resource!r}"
        link.send(Error(code=1, message=refuse))
        await link.drain()
        raise LinkError(f"peer {link.peer} asked for {refuse}")
    if not dialing:
        link.send(dataclasses.replace(mine, flags=mine.flags | HelloFlag.REPLY))
        await link.drain()
    if key is not None:
        link.send(Auth(mac=auth_mac(key, mine.resource, mine.nonce, message.nonce)))
        await link.drain()
        answer = await link.next_message()
        if not isinstance(answer, Auth) or not verify_auth(
            key, mine.resource, mine.nonce, message.nonce, answer
        ):
            link.send(Error(code=13, message="authentication failed: check the resource's key"))
            with contextlib.suppress(LinkError):
                await link.drain()
            raise LinkError(f"peer {link.peer} failed authentication (wrong or missing key)")
    link.start_keepalive()
    return message


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
