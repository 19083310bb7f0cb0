"""carpool's HAST replication wire: round trips, streaming, limits, corruption, auth."""

from __future__ import annotations

import contextlib
import itertools
import os
import random
import struct
import zlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from carpool.errors import ProtocolError
from carpool.hast.common import Checksum, Compression
from carpool.hast.wire import (
    HEADER,
    MAGIC,
    VERSION,
    AckFlag,
    Auth,
    BadChecksum,
    Error,
    Flush,
    Hello,
    HelloFlag,
    Keepalive,
    Malformed,
    Message,
    MessageTooLarge,
    MsgType,
    Read,
    ReadReply,
    SyncData,
    Trim,
    Verify,
    WireDecoder,
    WireError,
    Write,
    WriteAck,
    WriteFlag,
    WriteZeroes,
    auth_mac,
    digest,
    encode,
    encode_bytes,
    verify_auth,
)

u64 = st.integers(0, 2**64 - 1)
u32 = st.integers(0, 2**32 - 1)
data_st = st.one_of(
    st.binary(max_size=3000),
    st.integers(0, 5000).map(bytes),
    st.integers(1, 3000).map(lambda n: b"ab" * n),
)

messages: st.SearchStrategy[Message] = st.one_of(
    st.builds(
        Hello,
        st.text(max_size=40),
        u64,
        u64,
        u64,
        u64,
        u32,
        st.binary(min_size=16, max_size=16),
        st.integers(0, 7),
        st.binary(max_size=200),
    ),
    st.builds(Auth, st.binary(min_size=32, max_size=32)),
    st.builds(Write, u64, u64, data_st, st.integers(0, 3)),
    st.builds(WriteAck, u64, st.integers(0, 3), st.integers(0, 200)),
    st.builds(Read, u64, u64, st.integers(0, 32 << 20)),
    st.builds(ReadReply, u64, u64, data_st),
    st.builds(ReadReply, u64, u64, st.just(b""), st.integers(1, 200)),
    st.builds(Flush, u64),
    st.builds(Trim, u64, u64, u32),
    st.builds(WriteZeroes, u64, u64, u32),
    st.just(Keepalive()),
    st.builds(SyncData, u64, u64, data_st),
    st.builds(Error, st.integers(0, 65535), st.text(max_size=50), u64),
    st.builds(Verify, u64, u64, u32, st.sampled_from(list(Checksum))),
    st.sampled_from(list(Checksum)).flatmap(
        lambda alg: st.builds(
            Verify, u64, u64, u32, st.just(alg), st.just(digest(alg, b"x")), st.just(True)
        )
    ),
)


def normalise(msg: Message) -> Message:
    """Data fields compare as bytes."""
    if isinstance(msg, Write):
        return Write(msg.seq, msg.offset, bytes(msg.data), msg.flags)
    if isinstance(msg, SyncData):
        return SyncData(msg.seq, msg.offset, bytes(msg.data))
    if isinstance(msg, ReadReply):
        return ReadReply(msg.seq, msg.offset, bytes(msg.data), msg.error)
    return msg


@settings(max_examples=400, deadline=None)
@given(messages, st.sampled_from(list(Checksum)), st.sampled_from(list(Compression)))
def test_round_trip(msg: Message, checksum: Checksum, compression: Compression) -> None:
    wire = encode_bytes(msg, checksum=checksum, compression=compression)
    dec = WireDecoder()
    (out,) = dec.feed(wire)
    assert normalise(out) == normalise(msg)
    assert dec.buffered == 0


@settings(max_examples=100, deadline=None)
@given(st.lists(messages, max_size=8), st.lists(st.integers(0, 20000), max_size=10))
def test_stream_any_split(msgs: list[Message], cuts: list[int]) -> None:
    wire = b"".join(encode_bytes(m, checksum=Checksum.CRC32, compression=Compression.FAST)
                    for m in msgs)  # fmt: skip
    dec = WireDecoder()
    out: list[Message] = []
    bounds = sorted({0, len(wire), *(c for c in cuts if c < len(wire))})
    for a, b in itertools.pairwise(bounds):
        out += dec.feed(wire[a:b])
    assert [normalise(m) for m in out] == [normalise(m) for m in msgs]


def test_byte_by_byte() -> None:
    msgs: list[Message] = [Write(1, 4096, b"x" * 100, WriteFlag.MEMSYNC), Keepalive(), Flush(2)]
    wire = b"".join(encode_bytes(m, checksum=Checksum.SHA256) for m in msgs)
    dec = WireDecoder()
    out: list[Message] = []
    for i in range(len(wire)):
        out += dec.feed(wire[i : i + 1])
    assert [normalise(m) for m in out] == msgs


def test_header_layout() -> None:
    wire = encode_bytes(Read(7, 8192, 4096))
    assert HEADER.size == 36 == len(wire)
    assert HEADER.unpack(wire) == (MAGIC, VERSION, MsgType.READ, 0, 7, 8192, 4096, 0, 0, 0, 0)


def test_write_data_is_not_copied_without_compression() -> None:
    data = memoryview(bytearray(b"q" * 4096))
    bufs = encode(Write(1, 0, data), checksum=Checksum.CRC32)
    assert bufs[1] is data
    assert bufs[0][-4:] == struct.pack(">I", zlib.crc32(data))


def test_hole_and_fast_compression_sizes() -> None:
    zero = bytes(1 << 20)
    hole = encode_bytes(Write(1, 0, zero), compression=Compression.HOLE)
    assert len(hole) == HEADER.size
    assert HEADER.unpack_from(hole)[9] == 1
    text = b"hello world " * 10000
    fast = encode_bytes(Write(1, 0, text), compression=Compression.FAST)
    assert len(fast) < len(text) // 10 and HEADER.unpack_from(fast)[9] == 2
    rand = os.urandom(4096)
    raw = encode_bytes(Write(1, 0, rand), compression=Compression.FAST)
    assert len(raw) == HEADER.size + 4096 and HEADER.unpack_from(raw)[9] == 0
    small = encode_bytes(Write(1, 0, b"a" * 1000), compression=Compression.FAST)
    assert HEADER.unpack_from(small)[9] == 0  # below 1 KiB: not worth compressing
    (dec,) = WireDecoder().feed(hole)
    assert isinstance(dec, Write) and bytes(dec.data) == zero


def test_ack_flags() -> None:
    (ack,) = WireDecoder().feed(encode_bytes(WriteAck(5, AckFlag.RECEIVED)))
    assert ack == WriteAck(5, AckFlag.RECEIVED, 0)
    assert WriteAck(1).flags == AckFlag.WRITTEN


def _header(mtype: int, size: int, length: int = 0, csum: int = 0, comp: int = 0) -> bytes:
    return HEADER.pack(MAGIC, VERSION, mtype, 0, 1, 0, length, size, csum, comp, 0)


@pytest.mark.parametrize(
    ("wire", "error"),
    [
        (b"XXXX" + bytes(32), Malformed),
        (HEADER.pack(MAGIC, 9, 1, 0, 0, 0, 0, 0, 0, 0, 0), Malformed),
        (_header(99, 0), Malformed),
        (_header(MsgType.HELLO, 2**32 - 1), MessageTooLarge),
        (_header(MsgType.WRITE, 10, length=(32 << 20) + 1), MessageTooLarge),
        (_header(MsgType.READ, 0, length=2**32 - 1), MessageTooLarge),
        (_header(MsgType.WRITE, 5, length=4), Malformed),
        (_header(MsgType.WRITE, 3, length=4, csum=1), Malformed),
        (_header(MsgType.WRITE, 4, length=4, comp=1) + b"abcd", Malformed),
        (_header(MsgType.FLUSH, 1) + b"x", Malformed),
        (_header(MsgType.WRITE, 0, csum=7), Malformed),
        (_header(MsgType.WRITE, 0, comp=7), Malformed),
        (_header(MsgType.AUTH, 3) + b"abc", Malformed),
        (_header(MsgType.HELLO, 3) + b"\x00\x01a", Malformed),
        (_header(MsgType.HELLO, 1) + b"\x00", Malformed),
        (_header(MsgType.VERIFY, 3) + b"abc", Malformed),
        (_header(MsgType.WRITE, 4, length=100, comp=2) + b"zzzz", Malformed),
        (_header(MsgType.READ_REPLY, 0, length=0), None),
    ],
)
def test_bad_input(wire: bytes, error: type[WireError] | None) -> None:
    dec = WireDecoder()
    if error is None:
        dec.feed(wire)
        return
    with pytest.raises(error):
        dec.feed(wire)
    with pytest.raises(error):  # a failed decoder stays failed
        dec.feed(b"")


def test_lying_size_waits_without_allocating() -> None:
    dec = WireDecoder()
    assert dec.feed(_header(MsgType.HELLO, 30 << 20)) == []
    assert dec.feed(b"partial") == []
    assert dec.buffered == HEADER.size + 7


def test_checksum_mismatch() -> None:
    for alg in (Checksum.CRC32, Checksum.SHA256):
        wire = bytearray(encode_bytes(Write(1, 0, b"payload!"), checksum=alg))
        wire[-1] ^= 1
        with pytest.raises(BadChecksum):
            WireDecoder().feed(bytes(wire))


def test_decompression_bomb_is_refused() -> None:
    bomb = zlib.compress(bytes(10 << 20), 9)
    wire = _header(MsgType.WRITE, len(bomb), length=4096, comp=2) + bomb
    with pytest.raises(Malformed):
        WireDecoder().feed(wire)


def test_encode_refuses_out_of_range() -> None:
    with pytest.raises(MessageTooLarge):
        encode(Write(1, 0, bytes((32 << 20) + 1)))
    with pytest.raises(Malformed):
        encode(Read(-1, 0, 1))
    with pytest.raises(Malformed):
        encode(Hello("r", 0, 0, 0, 0, 0, b"short"))
    with pytest.raises(TypeError):
        encode("nope")  # type: ignore[arg-type]


def test_auth() -> None:
    key = b"secret"
    na, nb = os.urandom(16), os.urandom(16)
    mac_a = Auth(auth_mac(key, "res", na, nb))
    assert verify_auth(key, "res", nb, na, mac_a)  # B checks A
    assert not verify_auth(b"other", "res", nb, na, mac_a)
    assert not verify_auth(key, "res2", nb, na, mac_a)
    assert not verify_auth(key, "res", na, nb, mac_a)  # reflected back to A: refused
    hello = Hello("res", 1, 2, 3, 4, 5, na, HelloFlag.AUTH | HelloFlag.VIRGIN, b"\xff")
    (out,) = WireDecoder().feed(encode_bytes(hello))
    assert out == hello


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=400))
def test_fuzz_only_wire_errors(data: bytes) -> None:
    try:
        WireDecoder(max_body=1 << 16).feed(data)
    except WireError as exc:
        assert isinstance(exc, ProtocolError)


@settings(max_examples=300, deadline=None)
@given(messages, st.integers(0, 10_000), st.integers(0, 255))
def test_fuzz_corrupted_messages(msg: Message, where: int, xor: int) -> None:
    wire = bytearray(encode_bytes(msg, checksum=Checksum.CRC32, compression=Compression.FAST))
    wire[where % len(wire)] ^= xor
    with contextlib.suppress(WireError):
        WireDecoder().feed(bytes(wire))


@settings(max_examples=80, deadline=None)
@given(
    st.lists(st.binary(min_size=1, max_size=300_000), min_size=1, max_size=4),
    st.sampled_from([Checksum.NONE, Checksum.CRC32]),
    st.randoms(use_true_random=False),
)
def test_large_bodies_received_in_place_decode_like_fed_ones(
    payloads: list[bytes], checksum: Checksum, rng: random.Random
) -> None:
    stream = b"".join(
        encode_bytes(Write(seq, 4096 * seq, data), checksum=checksum) + encode_bytes(Keepalive())
        for seq, data in enumerate(payloads)
    )
    expected = WireDecoder().feed(stream)
    decoder = WireDecoder()
    got: list[Message] = []
    pos = 0
    while pos < len(stream):
        target = decoder.payload_buffer()
        if target is not None and rng.random() < 0.8:
            count = min(len(target), len(stream) - pos, rng.randint(1, 200_000))
            target[:count] = stream[pos : pos + count]
            got += decoder.payload_received(count)
        else:
            count = min(len(stream) - pos, rng.randint(1, 100_000))
            got += decoder.feed(stream[pos : pos + count])
        pos += count
    assert [type(m) for m in got] == [type(m) for m in expected]
    for mine, theirs in zip(got, expected, strict=True):
        if isinstance(mine, Write):
            assert isinstance(theirs, Write)
            assert (mine.seq, mine.offset, bytes(mine.data)) == (
                theirs.seq, theirs.offset, bytes(theirs.data))  # fmt: skip
    assert decoder.buffered == 0 and decoder.payload_buffer() is None
