"""The primary machine, rule by rule, with hand-fed completions and peer messages."""

from __future__ import annotations

import itertools
from typing import Any, TypeVar

import pytest

from carpool.hast import nbd, wire
from carpool.hast.actions import (
    REFUSE_SPLIT_BRAIN,
    ClosePeer,
    ConnectPeer,
    Event,
    LocalFlush,
    LocalRead,
    LocalTrim,
    LocalWrite,
    LocalWriteZeroes,
    ReplyToClient,
    SendToPeer,
    StatusChanged,
    WriteActivemap,
    WriteMetadata,
)
from carpool.hast.activemap import encode_bitmap
from carpool.hast.common import Replication
from carpool.hast.metadata import Metadata
from carpool.hast.primary import Link, PrimaryMachine

EXT = 16 * 1024
SIZE = 16 * EXT
N1, N2 = b"1" * 16, b"2" * 16
T = TypeVar("T")


def of(acts: list[Any], kind: type[T]) -> list[T]:
    return [a for a in acts if isinstance(a, kind)]


def sent(acts: list[Any]) -> list[wire.Message]:
    return [a.message for a in of(acts, SendToPeer)]


def req(cookie: int, cmd: nbd.NbdCommand, offset: int = 0, length: int = 0,
        data: bytes | None = None, fua: bool = False) -> nbd.Request:  # fmt: skip
    flags = int(nbd.CommandFlag.FUA) if fua else 0
    return nbd.Request(cookie, cmd, flags, offset, length,
                       memoryview(data) if data is not None else None)  # fmt: skip


def wreq(cookie: int, offset: int, length: int = 4096, fua: bool = False) -> nbd.Request:
    return req(cookie, nbd.NbdCommand.WRITE, offset, length, bytes([cookie % 256]) * length, fua)


def machine(mode: Replication = Replication.FULLSYNC, **kw: Any) -> PrimaryMachine:
    md = Metadata("r", SIZE, EXT, 4, resuid=7, localcnt=kw.pop("localcnt", 0),
                  remotecnt=kw.pop("remotecnt", 0))  # fmt: skip
    return PrimaryMachine("r", md, kw.pop("bitmap", None), now=0.0, replication=mode, **kw)


def hello_reply(p: PrimaryMachine, local: int = 0, remote: int = 0, resuid: int = 0,
                bitmap: bytes = b"", flags: int = 0) -> wire.Hello:  # fmt: skip
    return wire.Hello("r", resuid, local, remote, SIZE, EXT, N2,
                      int(wire.HelloFlag.REPLY) | flags, bitmap)  # fmt: skip


def connected(mode: Replication = Replication.FULLSYNC, **kw: Any) -> PrimaryMachine:
    p = machine(mode, virgin=True, **kw)
    acts = p.start(0.0)
    assert StatusChanged("degraded") in acts and ConnectPeer() in acts
    acts = p.peer_connected(0.0, N1)
    (hello,) = sent(acts)
    assert isinstance(hello, wire.Hello) and hello.flags & wire.HelloFlag.VIRGIN
    acts = p.peer_message(0.0, hello_reply(p))
    assert StatusChanged("complete") in acts and Event("connect") in acts
    assert p.connected and p.status == "complete"
    return p


def issue(p: PrimaryMachine, r: nbd.Request) -> list[Any]:
    """Submit and complete the activemap barrier if one is asked for."""
    acts = p.request(0.0, r)
    for w in of(acts, WriteActivemap):
        assert not of(acts, LocalWrite)  # the data write waits for the map
        acts += p.metadata_written(w.token)
    return acts


def test_fullsync_replies_after_local_and_peer_written() -> None:
    p = connected(Replication.FULLSYNC)
    acts = issue(p, wreq(1, 0))
    (lw,) = of(acts, LocalWrite)
    (msg,) = [m for m in sent(acts) if isinstance(m, wire.Write)]
    assert msg.seq == lw.id and msg.flags == 0  # issued together
    assert p.local_write_done(lw.id, True) == []
    assert of(p.peer_message(0.1, wire.WriteAck(lw.id, wire.AckFlag.RECEIVED)), ReplyToClient) == []
    acts = p.peer_message(0.2, wire.WriteAck(lw.id, wire.AckFlag.WRITTEN))
    assert of(acts, ReplyToClient) == [ReplyToClient(1, 0)]
    assert p.in_flight == 0


def test_memsync_replies_after_local_and_received() -> None:
    p = connected(Replication.MEMSYNC)
    acts = issue(p, wreq(1, 0))
    (lw,) = of(acts, LocalWrite)
    (msg,) = [m for m in sent(acts) if isinstance(m, wire.Write)]
    assert msg.flags & wire.WriteFlag.MEMSYNC
    assert of(p.peer_message(0.1, wire.WriteAck(lw.id, wire.AckFlag.RECEIVED)), ReplyToClient) == []
    assert of(p.local_write_done(lw.id, True), ReplyToClient) == [ReplyToClient(1, 0)]
    assert p.in_flight == 1  # still waiting for WRITTEN
    p.peer_message(0.2, wire.WriteAck(lw.id, wire.AckFlag.WRITTEN))
    assert p.in_flight == 0


def test_async_replies_after_the_local_write() -> None:
    p = connected(Replication.ASYNC)
    acts = issue(p, wreq(1, 0))
    (lw,) = of(acts, LocalWrite)
    assert of(p.local_write_done(lw.id, True), ReplyToClient) == [ReplyToClient(1, 0)]
    assert p.activemap.in_flight(0) == 1
    p.peer_message(0.2, wire.WriteAck(lw.id, wire.AckFlag.WRITTEN))
    assert p.activemap.in_flight(0) == 0 and p.in_flight == 0


@pytest.mark.parametrize("mode", [Replication.MEMSYNC, Replication.ASYNC])
def test_fua_waits_for_the_peer_written_in_every_mode(mode: Replication) -> None:
    p = connected(mode)
    acts = issue(p, wreq(1, 0, fua=True))
    (lw,) = of(acts, LocalWrite)
    assert lw.fua
    (msg,) = [m for m in sent(acts) if isinstance(m, wire.Write)]
    assert msg.flags & wire.WriteFlag.FUA
    p.peer_message(0.1, wire.WriteAck(lw.id, wire.AckFlag.RECEIVED))
    assert of(p.local_write_done(lw.id, True), ReplyToClient) == []
    acts = p.peer_message(0.2, wire.WriteAck(lw.id, wire.AckFlag.WRITTEN))
    assert of(acts, ReplyToClient) == [ReplyToClient(1, 0)]


def test_flush_completes_after_local_and_peer_flush() -> None:
    p = connected(Replication.ASYNC)
    acts = p.request(0.0, req(5, nbd.NbdCommand.FLUSH))
    (lf,) = of(acts, LocalFlush)
    assert sent(acts) == [wire.Flush(lf.id)]
    assert p.peer_message(0.1, wire.WriteAck(lf.id, wire.AckFlag.WRITTEN)) == []
    assert of(p.local_flush_done(lf.id, True), ReplyToClient) == [ReplyToClient(5, 0)]
    acts = p.request(0.0, req(6, nbd.NbdCommand.FLUSH))
    (lf,) = of(acts, LocalFlush)
    p.peer_message(0.1, wire.WriteAck(lf.id, wire.AckFlag.WRITTEN))
    acts = p.local_flush_done(lf.id, False)
    assert ReplyToClient(6, 5) in acts and Event("flush-error") in acts


def test_trim_and_write_zeroes_go_to_both_sides() -> None:
    p = connected()
    acts = issue(p, req(1, nbd.NbdCommand.TRIM, 0, 8192))
    (lt,) = of(acts, LocalTrim)
    assert wire.Trim(lt.id, 0, 8192) in sent(acts)
    acts = issue(p, req(2, nbd.NbdCommand.WRITE_ZEROES, EXT, 512, fua=True))
    (lz,) = of(acts, LocalWriteZeroes)
    assert lz.fua and wire.WriteZeroes(lz.id, EXT, 512) in sent(acts)


def test_first_write_to_an_extent_waits_for_the_activemap() -> None:
    p = connected()
    acts = p.request(0.0, wreq(1, 0))
    (wm,) = of(acts, WriteActivemap)
    assert of(acts, LocalWrite) == [] and sent(acts) == []
    assert wm.bitmap[0] & 1
    acts = p.metadata_written(wm.token)
    assert len(of(acts, LocalWrite)) == 1
    # same extent again: no map write, issued at once
    acts = p.request(0.0, wreq(2, 4096))
    assert of(acts, WriteActivemap) == [] and len(of(acts, LocalWrite)) == 1


def test_overlapping_writes_wait_for_earlier_ones() -> None:
    p = connected(Replication.ASYNC)
    a = of(issue(p, wreq(1, 0, 8192)), LocalWrite)[0]
    acts = p.request(0.0, wreq(2, 4096, 8192))
    assert of(acts, LocalWrite) == []  # overlaps write 1
    acts = p.request(0.0, wreq(3, 12288, 4096))
    assert len(of(acts, LocalWrite)) == 1  # disjoint: goes at once
    acts = p.local_write_done(a.id, True)
    assert of(acts, LocalWrite) == []  # 1 is not retired until the peer wrote it
    acts = p.peer_message(0.1, wire.WriteAck(a.id, wire.AckFlag.WRITTEN))
    (b,) = of(acts, LocalWrite)
    assert b.offset == 4096


def test_peer_write_error_keeps_the_extent_dirty() -> None:
    p = connected()
    lw = of(issue(p, wreq(1, 3 * EXT)), LocalWrite)[0]
    p.local_write_done(lw.id, True)
    acts = p.peer_message(0.1, wire.WriteAck(lw.id, 0, 5))
    assert of(acts, ReplyToClient) == [ReplyToClient(1, 0)]  # the local copy is good
    assert p.activemap.needs_sync(3) and p.stats["remote_errors"] == 1


def test_local_write_error_answers_eio() -> None:
    p = connected()
    lw = of(issue(p, wreq(1, 0)), LocalWrite)[0]
    acts = p.local_write_done(lw.id, False)
    assert ReplyToClient(1, 5) in acts
    assert any(isinstance(a, Event) and a.name == "write-error" for a in acts)


def test_degraded_writes_bump_localcnt_once_before_the_data() -> None:
    p = machine(Replication.FULLSYNC)
    p.start(0.0)
    acts = p.request(0.0, wreq(1, 0))
    wm = of(acts, WriteActivemap)
    assert len(wm) == 1 and of(acts, LocalWrite) == []
    acts = p.metadata_written(wm[0].token)
    (md,) = of(acts, WriteMetadata)
    assert md.metadata.localcnt == 1 and of(acts, LocalWrite) == []
    acts = p.metadata_written(md.token)
    (lw,) = of(acts, LocalWrite)
    assert sent(acts) == []
    assert of(p.local_write_done(lw.id, True), ReplyToClient) == [ReplyToClient(1, 0)]
    assert p.activemap.needs_sync(0)
    acts = issue(p, wreq(2, 5 * EXT))
    assert of(acts, WriteMetadata) == [] and len(of(acts, LocalWrite)) == 1
    assert p.metadata.localcnt == 1


def test_disconnect_completes_writes_waiting_for_the_peer() -> None:
    p = connected(Replication.FULLSYNC)
    lw = of(issue(p, wreq(1, 2 * EXT)), LocalWrite)[0]
    p.local_write_done(lw.id, True)
    acts = p.peer_disconnected(1.0)
    assert ReplyToClient(1, 0) in acts
    assert StatusChanged("degraded") in acts
    assert any(isinstance(a, Event) and a.name == "disconnect" for a in acts)
    (md,) = of(acts, WriteMetadata)
    assert md.metadata.localcnt == 1
    assert p.activemap.needs_sync(2) and not p.connected


def test_failed_local_read_goes_to_the_peer() -> None:
    p = connected()
    (lr,) = of(p.request(0.0, req(9, nbd.NbdCommand.READ, 512, 512)), LocalRead)
    acts = p.local_read_done(lr.id, None)
    assert wire.Read(lr.id, 512, 512) in sent(acts)
    acts = p.peer_message(0.1, wire.ReadReply(lr.id, 512, b"p" * 512))
    assert acts == [ReplyToClient(9, 0, b"p" * 512)]
    (lr,) = of(p.request(0.0, req(10, nbd.NbdCommand.READ, 0, 512)), LocalRead)
    p.local_read_done(lr.id, b"short")
    assert p.peer_message(0.1, wire.ReadReply(lr.id, 0, b"", 5)) == [ReplyToClient(10, 5)]
    (lr,) = of(p.request(0.0, req(11, nbd.NbdCommand.READ, 0, 512)), LocalRead)
    assert p.local_read_done(lr.id, b"x" * 512) == [ReplyToClient(11, 0, b"x" * 512)]


def test_out_of_range_and_unknown_requests_get_einval() -> None:
    p = connected()
    assert p.request(0.0, wreq(1, SIZE - 512, 4096)) == [ReplyToClient(1, 22)]
    assert p.request(0.0, req(2, nbd.NbdCommand.READ, 0, 0)) == [ReplyToClient(2, 22)]
    assert p.request(0.0, req(3, nbd.NbdCommand.CACHE, 0, 512)) == [ReplyToClient(3, 22)]
    bad = nbd.Request(4, nbd.NbdCommand.WRITE, 0, 0, 512, memoryview(b"x" * 10))
    assert p.request(0.0, bad) == [ReplyToClient(4, 22)]


def test_keepalive_timeout_and_reconnect_backoff() -> None:
    p = connected()
    assert sent(p.tick(5.0)) == []
    assert sent(p.tick(10.0)) == [wire.Keepalive()]
    p.peer_message(12.0, wire.Keepalive())
    acts = p.tick(32.5)
    assert of(acts, ClosePeer) and StatusChanged("degraded") in acts and p.link is Link.DOWN
    times = []
    t = 32.5
    while len(times) < 5 and t < 200:
        t += 0.5
        if ConnectPeer() in p.tick(t):
            times.append(t)
            p.peer_disconnected(t, "refused")
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert gaps[0] < gaps[-1] <= 10.5


def test_split_brain_from_counters_and_from_the_peer() -> None:
    p = machine(localcnt=2, remotecnt=1)
    p.start(0.0)
    p.peer_connected(0.0, N1)
    acts = p.peer_message(0.0, hello_reply(p, local=2, remote=1, resuid=7))
    assert any(isinstance(a, Event) and a.name == "split-brain" for a in acts)
    assert of(acts, ClosePeer) and not p.connected
    p.tick(20.0)
    p.peer_connected(20.0, N1)
    acts = p.peer_message(20.0, wire.Error(REFUSE_SPLIT_BRAIN, "Split-brain condition!"))
    assert any(isinstance(a, Event) and a.name == "split-brain" for a in acts)


def test_geometry_mismatch_and_bad_handshake_close() -> None:
    p = machine()
    p.start(0.0)
    p.peer_connected(0.0, N1)
    bad = wire.Hello("r", 0, 0, 0, SIZE + 512, EXT, N2, int(wire.HelloFlag.REPLY))
    assert of(p.peer_message(0.0, bad), ClosePeer)
    p.tick(5.0)
    p.peer_connected(5.0, N1)
    assert of(p.peer_message(5.0, wire.WriteAck(1)), ClosePeer)


def test_sync_from_secondary_fetches_and_redirects_reads() -> None:
    p = machine(localcnt=1, remotecnt=1)
    p.start(0.0)
    p.peer_connected(0.0, N1)
    bitmap = encode_bitmap([2], SIZE // EXT)
    acts = p.peer_message(0.0, hello_reply(p, local=2, remote=1, resuid=7, bitmap=bitmap))
    assert any(isinstance(a, Event) and a.name == "syncstart" for a in acts)
    assert p.resync is not None and p.resync.from_secondary
    for w in of(acts, WriteActivemap):
        acts += p.metadata_written(w.token)
    reads = [m for m in sent(acts) if isinstance(m, wire.Read)]
    assert reads and reads[0].offset == 2 * EXT
    # a client read now goes to the peer
    acts = p.request(0.0, req(1, nbd.NbdCommand.READ, 0, 512))
    assert of(acts, LocalRead) == [] and isinstance(sent(acts)[0], wire.Read)
    # feed the chunk
    for r in reads:
        acts = p.peer_message(0.1, wire.ReadReply(r.seq, r.offset, b"s" * r.length))
        (lw,) = of(acts, LocalWrite)
        acts = p.local_write_done(lw.id, True)
        reads += [m for m in sent(acts) if isinstance(m, wire.Read)]
    assert p.resync is None and not p.activemap.needs_sync(2)
    assert p.metadata.localcnt == 1 and p.metadata.remotecnt == 2  # after_sync


def test_authentication_is_required_when_keyed() -> None:
    key = b"k" * 32
    p = machine(key=key)
    p.start(0.0)
    (hello,) = sent(p.peer_connected(0.0, N1))
    assert isinstance(hello, wire.Hello) and hello.flags & wire.HelloFlag.AUTH
    acts = p.peer_message(0.0, hello_reply(p, resuid=7, flags=wire.HelloFlag.AUTH))
    assert p.link is Link.AUTH and not of(acts, StatusChanged)
    acts = p.peer_message(0.0, wire.Auth(wire.auth_mac(b"x" * 32, "r", N2, N1)))
    assert of(acts, ClosePeer) and not p.connected
    p.tick(5.0)
    p.peer_connected(5.0, N1)
    p.peer_message(5.0, hello_reply(p, resuid=7, flags=wire.HelloFlag.AUTH))
    acts = p.peer_message(5.0, wire.Auth(wire.auth_mac(key, "r", N2, N1)))
    assert p.connected and wire.Auth(wire.auth_mac(key, "r", N1, N2)) in sent(acts)


def test_wake_at_points_at_the_next_timer() -> None:
    p = connected()
    assert p.wake_at() == pytest.approx(10.0)  # keepalive after 10 s idle
    p.peer_disconnected(3.0)
    assert p.wake_at() == pytest.approx(4.0)  # reconnect after 1 s
