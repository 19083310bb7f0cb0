"""The replication link (transport only) over a real TCP connection on loopback."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable, Callable
from typing import TypeVar

import pytest

from carpool.hast.common import Checksum, Compression
from carpool.hast.link import LinkError, PeerLink, dial, dial_until_connected, listen
from carpool.hast.wire import Flush, Keepalive, Write

T = TypeVar("T")


async def pair(timeout: float | None = 5.0) -> tuple[PeerLink, PeerLink, asyncio.AbstractServer]:
    accepted: asyncio.Future[PeerLink] = asyncio.get_running_loop().create_future()

    server = await listen("127.0.0.1", 0, accepted.set_result, timeout=timeout,
                          checksum=Checksum.CRC32, compression=Compression.FAST)  # fmt: skip
    port = server.sockets[0].getsockname()[1]
    dialer = await dial("127.0.0.1", port, timeout=5.0, checksum=Checksum.CRC32,
                        compression=Compression.FAST)  # fmt: skip
    return dialer, await accepted, server


def run(main: Callable[[], Awaitable[T]]) -> T:
    async def bounded() -> T:
        return await asyncio.wait_for(main(), 30)

    return asyncio.run(bounded())


def test_messages_flow_compressed_and_several_per_read_are_all_delivered() -> None:
    async def main() -> None:
        primary, secondary, server = await pair()
        payload = bytes(range(256)) * 512
        primary.send(Write(seq=1, offset=4096, data=payload))
        primary.send(Keepalive())
        primary.send(Flush(seq=2))
        await primary.drain()
        first = await secondary.next_message()
        assert isinstance(first, Write) and bytes(first.data) == payload
        assert isinstance(await secondary.next_message(), Keepalive)
        assert await secondary.next_message() == Flush(seq=2)
        assert primary.bytes_sent < len(payload)  # compressed on the wire
        await primary.close()
        with pytest.raises(LinkError, match="closed"):
            await secondary.next_message()
        await secondary.close()
        server.close()

    run(main)


def test_silence_times_out_and_garbage_is_a_link_error() -> None:
    async def main() -> None:
        primary, secondary, server = await pair(timeout=0.3)
        with pytest.raises(LinkError, match="sent nothing"):
            await secondary.next_message()
        primary2, secondary2, server2 = await pair()
        primary2.send_raw(b"GET / HTTP/1.1\r\n\r\n" * 4)
        await primary2.drain()
        with pytest.raises(LinkError, match="garbage"):
            await secondary2.next_message()
        for link in (primary, secondary, primary2, secondary2):
            await link.close()
        server.close()
        server2.close()

    run(main)


def test_dialing_retries_until_the_listener_appears() -> None:
    async def main() -> None:
        probe = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
        port = probe.sockets[0].getsockname()[1]
        probe.close()
        await probe.wait_closed()
        stopping = asyncio.Event()

        async def attempt() -> PeerLink:
            return await dial("127.0.0.1", port, timeout=1.0)

        dialing = asyncio.ensure_future(dial_until_connected(attempt, stopping))
        await asyncio.sleep(0.5)
        assert not dialing.done()
        server = await asyncio.start_server(lambda r, w: None, "127.0.0.1", port)
        link = await asyncio.wait_for(dialing, 10)
        assert link is not None
        await link.close()
        server.close()

    run(main)


def test_a_large_write_arrives_whole_in_place_and_callbacks_see_every_message() -> None:
    async def main() -> None:
        primary, secondary, server = await pair()
        seen: list[object] = []
        failures: list[LinkError] = []
        secondary.deliver_to(seen.append, failures.append)
        payloads = [os.urandom(3 << 20), os.urandom(100_000), b"x" * 10]
        for seq, data in enumerate(payloads):
            primary.send(Write(seq=seq, offset=0, data=data))
            primary.send(Keepalive())
        await primary.drain()
        for _ in range(200):
            if len(seen) == 2 * len(payloads):
                break
            await asyncio.sleep(0.05)
        writes = [m for m in seen if isinstance(m, Write)]
        assert [bytes(m.data) for m in writes] == payloads
        await primary.close()
        for _ in range(100):
            if failures:
                break
            await asyncio.sleep(0.05)
        assert failures and "closed" in str(failures[0])
        await secondary.close()
        server.close()

    run(main)
