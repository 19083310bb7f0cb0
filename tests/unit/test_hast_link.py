"""The replication link over a real TCP connection on loopback."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TypeVar

import pytest

from carpool.hast.common import Checksum, Compression
from carpool.hast.link import LinkError, PeerLink, dial, handshake, new_nonce
from carpool.hast.wire import Hello, HelloFlag, Write

T = TypeVar("T")


def hello(resource: str = "shared_storage") -> Hello:
    return Hello(resource=resource, resuid=7, localcnt=1, remotecnt=0, datasize=1 << 30,
                 extentsize=2 << 20, nonce=new_nonce())  # fmt: skip


async def pair(
    timeout: float = 5.0,
) -> tuple[PeerLink, asyncio.Future[PeerLink], asyncio.AbstractServer]:
    accepted: asyncio.Future[PeerLink] = asyncio.get_running_loop().create_future()

    async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.set_result(
            PeerLink(reader, writer, timeout=timeout, checksum=Checksum.CRC32,
                     compression=Compression.FAST)
        )  # fmt: skip

    server = await asyncio.start_server(on_connect, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    dialer = await dial("127.0.0.1", port, timeout=timeout, checksum=Checksum.CRC32,
                        compression=Compression.FAST)  # fmt: skip
    return dialer, accepted, server


def run(main: Callable[[], Awaitable[T]]) -> T:
    async def bounded() -> T:
        return await asyncio.wait_for(main(), 30)

    return asyncio.run(bounded())


def test_handshake_with_a_key_then_data_flows_with_checksums_and_compression() -> None:
    async def main() -> None:
        primary, accepted, server = await pair()
        secondary = await accepted
        key = b"shared secret"
        mine, theirs = hello(), hello()
        peer_of_primary, peer_of_secondary = await asyncio.gather(
            handshake(primary, mine, key, dialing=True),
            handshake(secondary, theirs, key, dialing=False),
        )
        assert peer_of_primary.nonce == theirs.nonce
        assert peer_of_primary.flags & HelloFlag.REPLY
        assert peer_of_secondary.nonce == mine.nonce
        payload = bytes(range(256)) * 512
        primary.send(Write(seq=1, offset=4096, data=payload))
        await primary.drain()
        message = await secondary.next_message()
        assert isinstance(message, Write) and bytes(message.data) == payload
        assert primary.bytes_sent < len(payload)  # compressed on the wire
        for link in (primary, secondary):
            await link.close()
        server.close()

    run(main)


def test_wrong_key_and_wrong_resource_are_refused_on_both_sides() -> None:
    async def main() -> None:
        primary, accepted, server = await pair()
        secondary = await accepted
        results = await asyncio.gather(
            handshake(primary, hello(), b"one key", dialing=True),
            handshake(secondary, hello(), b"another key", dialing=False),
            return_exceptions=True,
        )
        assert all(isinstance(r, LinkError) for r in results), results
        assert "authentication" in str(results[0]) or "authentication" in str(results[1])
        primary, accepted, server2 = await pair()
        secondary = await accepted
        results = await asyncio.gather(
            handshake(primary, hello("pgdata"), None, dialing=True),
            handshake(secondary, hello("shared_storage"), None, dialing=False),
            return_exceptions=True,
        )
        assert isinstance(results[1], LinkError) and "pgdata" in str(results[1])
        assert isinstance(results[0], LinkError) and "refused" in str(results[0])
        server.close()
        server2.close()

    run(main)


def test_keepalives_hold_an_idle_link_and_silence_times_out() -> None:
    async def main() -> None:
        primary, accepted, server = await pair(timeout=0.6)
        secondary = await accepted
        await asyncio.gather(
            handshake(primary, hello(), None, dialing=True),
            handshake(secondary, hello(), None, dialing=False),
        )

        async def quiet_for(link: PeerLink, seconds: float) -> None:
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(link.next_message(), seconds)

        await quiet_for(secondary, 2.0)  # 3 x the timeout: keepalives kept it up
        primary._keepalive.cancel()  # type: ignore[union-attr]  # the primary hangs
        with pytest.raises(LinkError, match="sent nothing"):
            await secondary.next_message()
        server.close()

    run(main)


def test_garbage_from_the_peer_is_a_link_error() -> None:
    async def main() -> None:
        primary, accepted, server = await pair()
        secondary = await accepted
        primary.writer.write(b"GET / HTTP/1.1\r\n\r\n" * 4)
        await primary.drain()
        with pytest.raises(LinkError, match="garbage"):
            await secondary.next_message()
        server.close()

    run(main)
