"""The secondary machine: handshake, refusals, acknowledgements, ordering and verify."""

from __future__ import annotations

from typing import Any, TypeVar

from hypothesis import given, settings
from hypothesis import strategies as st

from carpool.hast import wire
from carpool.hast.actions import (
    REFUSE_AUTH,
    REFUSE_GEOMETRY,
    REFUSE_PROTOCOL,
    REFUSE_RESOURCE,
    REFUSE_RESUID,
    REFUSE_SPLIT_BRAIN,
    ClosePeer,
    Event,
    LocalFlush,
    LocalRead,
    LocalTrim,
    LocalWrite,
    LocalWriteZeroes,
    SendToPeer,
    WriteActivemap,
    WriteMetadata,
)
from carpool.hast.common import Checksum
from carpool.hast.metadata import Metadata
from carpool.hast.secondary import SecondaryMachine, SecondaryState

EXT = 16 * 1024
SIZE = 16 * EXT
NP, NS = b"p" * 16, b"s" * 16
T = TypeVar("T")


def of(acts: list[Any], kind: type[T]) -> list[T]:
    return [a for a in acts if isinstance(a, kind)]


def sent(acts: list[Any]) -> list[wire.Message]:
    return [a.message for a in of(acts, SendToPeer)]


def hello(resuid: int = 7, local: int = 0, remote: int = 0, flags: int = 0,
          size: int = SIZE, name: str = "r") -> wire.Hello:  # fmt: skip
    return wire.Hello(name, resuid, local, remote, size, EXT, NP, flags)


def secondary(md: Metadata | None = None, **kw: Any) -> SecondaryMachine:
    s = SecondaryMachine("r", md or Metadata("r", SIZE, EXT, 4), kw.pop("bitmap", None),
                         now=0.0, **kw)  # fmt: skip
    s.peer_connected(0.0, NS)
    return s


def up(**kw: Any) -> SecondaryMachine:
    s = secondary(**kw)
    acts = s.peer_message(0.0, hello(flags=int(wire.HelloFlag.VIRGIN)))
    assert s.state is SecondaryState.UP and Event("connect") in acts
    return s


def refused(acts: list[Any], code: int) -> bool:
    return any(isinstance(m, wire.Error) and m.code == code for m in sent(acts)) and bool(
        of(acts, ClosePeer)
    )


def test_fresh_secondary_adopts_the_resuid_and_answers_with_its_counters() -> None:
    s = secondary()
    acts = s.peer_message(0.0, hello(resuid=42, flags=int(wire.HelloFlag.VIRGIN)))
    (reply,) = sent(acts)
    assert isinstance(reply, wire.Hello) and reply.flags & wire.HelloFlag.REPLY
    assert (reply.resuid, reply.localcnt, reply.remotecnt) == (0, 0, 0)  # before adoption
    (md,) = of(acts, WriteMetadata)
    assert md.metadata.resuid == 42 and s.metadata.resuid == 42


def test_requests_before_hello_are_refused_and_never_reach_the_disk() -> None:
    s = secondary()
    acts = s.peer_message(0.0, wire.Write(1, 0, b"x" * 512))
    assert refused(acts, REFUSE_PROTOCOL)
    assert of(acts, LocalWrite) == [] and s.state is SecondaryState.IDLE
    # a keyed secondary refuses requests between HELLO and AUTH
    s = secondary(key=b"k" * 32)
    s.peer_message(0.0, hello(flags=int(wire.HelloFlag.AUTH)))
    assert s.state is SecondaryState.AUTH
    acts = s.peer_message(0.0, wire.Write(1, 0, b"x" * 512))
    assert refused(acts, REFUSE_PROTOCOL) and of(acts, LocalWrite) == []


def test_refusals_name_the_reason() -> None:
    assert refused(secondary().peer_message(0.0, hello(name="other")), REFUSE_RESOURCE)
    assert refused(secondary().peer_message(0.0, hello(size=SIZE - 512)), REFUSE_GEOMETRY)
    keyed = secondary(key=b"k" * 32)
    assert refused(keyed.peer_message(0.0, hello()), REFUSE_AUTH)
    md = Metadata("r", SIZE, EXT, 4, resuid=9)
    assert refused(secondary(md).peer_message(0.0, hello(resuid=7)), REFUSE_RESUID)


def test_split_brain_is_refused_with_the_hook() -> None:
    md = Metadata("r", SIZE, EXT, 4, resuid=7, localcnt=2, remotecnt=1)
    s = secondary(md)
    acts = s.peer_message(0.0, hello(local=2, remote=1))
    assert refused(acts, REFUSE_SPLIT_BRAIN)
    assert any(isinstance(a, Event) and a.name == "split-brain" for a in acts)


def test_memsync_write_is_acked_received_then_written() -> None:
    s = up()
    acts = s.peer_message(0.0, wire.Write(5, 512, b"d" * 512, int(wire.WriteFlag.MEMSYNC)))
    assert sent(acts) == [wire.WriteAck(5, wire.AckFlag.RECEIVED)]
    (lw,) = of(acts, LocalWrite)
    assert not lw.fua and bytes(lw.data) == b"d" * 512
    assert sent(s.local_write_done(lw.id, True)) == [wire.WriteAck(5, wire.AckFlag.WRITTEN)]
    acts = s.peer_message(0.0, wire.Write(6, 0, b"e" * 512, int(wire.WriteFlag.FUA)))
    assert sent(acts) == []  # fullsync/async: WRITTEN only
    (lw,) = of(acts, LocalWrite)
    assert lw.fua
    assert sent(s.local_write_done(lw.id, False)) == [wire.WriteAck(6, 0, 5)]


def test_bad_ranges_are_refused_per_request() -> None:
    s = up()
    assert sent(s.peer_message(0.0, wire.Write(1, SIZE - 256, b"x" * 512))) == [
        wire.WriteAck(1, 0, 22)
    ]
    assert sent(s.peer_message(0.0, wire.Trim(2, 0, 0))) == [wire.WriteAck(2, 0, 22)]
    assert sent(s.peer_message(0.0, wire.Read(3, SIZE, 512))) == [wire.ReadReply(3, SIZE, b"", 22)]
    small = up(max_data=1024)
    assert sent(small.peer_message(0.0, wire.SyncData(4, 0, b"x" * 2048))) == [
        wire.WriteAck(4, 0, 22)
    ]
    assert s.state is SecondaryState.UP


def test_overlapping_writes_are_serialized_and_flush_waits() -> None:
    s = up()
    (w1,) = of(s.peer_message(0.0, wire.Write(1, 0, b"a" * 1024)), LocalWrite)
    assert of(s.peer_message(0.0, wire.Write(2, 512, b"b" * 1024)), LocalWrite) == []
    (w3,) = of(s.peer_message(0.0, wire.SyncData(3, 4096, b"c" * 512)), LocalWrite)
    assert of(s.peer_message(0.0, wire.Flush(4)), LocalFlush) == []
    assert of(s.peer_message(0.0, wire.Read(5, 0, 512)), LocalRead) == []
    acts = s.local_write_done(w1.id, True)
    (w2,) = of(acts, LocalWrite)
    assert w2.offset == 512
    assert len(of(acts, LocalRead)) == 1  # the read only overlapped write 1
    s.local_write_done(w3.id, True)
    acts = s.local_write_done(w2.id, True)
    (fl,) = of(acts, LocalFlush)
    assert sent(s.local_flush_done(fl.id, True)) == [wire.WriteAck(4, wire.AckFlag.WRITTEN)]


def test_trim_and_zeroes_are_made_durable() -> None:
    s = up()
    (lt,) = of(s.peer_message(0.0, wire.Trim(1, 0, 4096)), LocalTrim)
    (lz,) = of(s.peer_message(0.0, wire.WriteZeroes(2, 8192, 4096)), LocalWriteZeroes)
    assert lt.fua and lz.fua
    assert sent(s.local_write_done(lz.id, True)) == [wire.WriteAck(2, wire.AckFlag.WRITTEN)]


def test_read_and_verify_answers() -> None:
    s = up()
    (lr,) = of(s.peer_message(0.0, wire.Read(1, 0, 4)), LocalRead)
    assert sent(s.local_read_done(lr.id, b"abcd")) == [wire.ReadReply(1, 0, b"abcd")]
    (lr,) = of(s.peer_message(0.0, wire.Read(2, 0, 4)), LocalRead)
    assert sent(s.local_read_done(lr.id, None)) == [wire.ReadReply(2, 0, b"", 5)]
    (lv,) = of(s.peer_message(0.0, wire.Verify(3, 0, 4, Checksum.SHA256)), LocalRead)
    (rep,) = sent(s.local_read_done(lv.id, b"abcd"))
    assert rep == wire.Verify(3, 0, 4, Checksum.SHA256, wire.digest(Checksum.SHA256, b"abcd"),
                              reply=True)  # fmt: skip
    (err,) = sent(s.peer_message(0.0, wire.Verify(4, 0, 4, Checksum.NONE)))
    assert isinstance(err, wire.Error)


def test_first_request_zeroes_the_old_activemap() -> None:
    s = up(bitmap=b"\x05\x00")
    acts = s.peer_message(0.0, wire.Keepalive())
    assert sent(acts) == [wire.Keepalive()] and of(acts, WriteActivemap) == []
    acts = s.peer_message(0.0, wire.Write(1, 0, b"x" * 512))
    assert of(acts, WriteActivemap)[0].bitmap == b"\x00\x00"
    acts = s.peer_message(0.0, wire.Write(2, 4096, b"x" * 512))
    assert of(acts, WriteActivemap) == []


def test_hello_reply_carries_the_bitmap_and_counters_stay() -> None:
    md = Metadata("r", SIZE, EXT, 4, resuid=7, localcnt=3, remotecnt=2)
    s = secondary(md, bitmap=b"\x02\x00")
    acts = s.peer_message(0.0, hello(local=2, remote=2))  # primary out of date
    (reply,) = sent(acts)
    assert isinstance(reply, wire.Hello) and reply.bitmap == b"\x02\x00"
    assert of(acts, WriteMetadata) == []  # counters untouched while secondary
    assert s.decision is not None and s.decision.from_secondary


def test_authenticated_handshake() -> None:
    key = b"k" * 32
    s = secondary(key=key)
    acts = s.peer_message(0.0, hello(flags=int(wire.HelloFlag.AUTH)))
    auth = [m for m in sent(acts) if isinstance(m, wire.Auth)]
    assert auth == [wire.Auth(wire.auth_mac(key, "r", NS, NP))]
    acts = s.peer_message(0.0, wire.Auth(wire.auth_mac(b"bad" * 8, "r", NP, NS)))
    assert refused(acts, REFUSE_AUTH)
    s = secondary(key=key)
    s.peer_message(0.0, hello(flags=int(wire.HelloFlag.AUTH)))
    acts = s.peer_message(0.0, wire.Auth(wire.auth_mac(key, "r", NP, NS)))
    assert s.state is SecondaryState.UP and Event("connect") in acts


def test_timeout_and_disconnect_events() -> None:
    s = up()
    assert s.tick(10.0) == []
    acts = s.tick(25.0)
    assert of(acts, ClosePeer) and any(isinstance(a, Event) and a.name == "disconnect"
                                       for a in acts)  # fmt: skip
    assert s.state is SecondaryState.IDLE
    assert s.peer_message(26.0, wire.Write(1, 0, b"x")) == []  # nothing after close


_MESSAGES = st.one_of(
    st.builds(
        wire.Write,
        st.integers(1, 9),
        st.integers(0, SIZE),
        st.binary(min_size=1, max_size=64),
        st.integers(0, 3),
    ),
    st.builds(wire.SyncData, st.integers(1, 9), st.integers(0, SIZE), st.binary(min_size=1)),
    st.builds(wire.Trim, st.integers(1, 9), st.integers(0, SIZE), st.integers(0, SIZE)),
    st.builds(wire.WriteZeroes, st.integers(1, 9), st.integers(0, SIZE), st.integers(0, SIZE)),
    st.builds(wire.Flush, st.integers(1, 9)),
    st.builds(wire.Read, st.integers(1, 9), st.integers(0, SIZE), st.integers(0, 4096)),
    st.builds(wire.WriteAck, st.integers(1, 9)),
    st.just(wire.Keepalive()),
)


@settings(max_examples=200, deadline=None)
@given(st.lists(_MESSAGES, max_size=8), st.booleans())
def test_nothing_reaches_the_disk_before_the_handshake(msgs: list[wire.Message],
                                                       keyed: bool) -> None:  # fmt: skip
    s = secondary(key=b"k" * 32 if keyed else None)
    if keyed:
        s.peer_message(0.0, hello(flags=int(wire.HelloFlag.AUTH)))
    acts: list[Any] = []
    for m in msgs:
        acts += s.peer_message(0.0, m)
    assert not of(acts, LocalWrite) and not of(acts, LocalTrim) and not of(acts, LocalFlush)
    assert not of(acts, LocalWriteZeroes) and not of(acts, LocalRead)


@settings(max_examples=200, deadline=None)
@given(st.lists(_MESSAGES, max_size=12))
def test_connected_secondary_never_touches_outside_the_data(msgs: list[wire.Message]) -> None:
    s = up()
    for m in msgs:
        for a in s.peer_message(0.0, m):
            if isinstance(a, LocalWrite):
                assert a.offset >= 0 and a.offset + len(a.data) <= SIZE
            elif isinstance(a, LocalTrim | LocalWriteZeroes | LocalRead):
                assert a.offset >= 0 and a.length > 0 and a.offset + a.length <= SIZE
