"""HAST metadata: layout, block encoding with two slots, resync decisions, write helper."""

from __future__ import annotations

import contextlib
import os
import zlib
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from carpool.errors import CarpoolError
from carpool.hast.common import Role
from carpool.hast.metadata import (
    METADATA_SIZE,
    SLOT_SIZE,
    CorruptMetadata,
    LayoutError,
    Metadata,
    MetadataError,
    MetadataLayout,
    NodeCounters,
    NotHastMetadata,
    SyncDirection,
    WrongResource,
    after_sync,
    bump_localcnt,
    decide_sync,
    decode,
    encode,
    update_block,
    write_at,
)


def test_layout_matches_hastctl_create_example() -> None:
    lay = MetadataLayout.compute(2 * 1024**3)
    assert lay.nextents == 1024
    assert lay.mapsize == 512
    assert lay.data_offset == 4608
    assert lay.datasize == 2_147_479_040
    assert (lay.metadata_offset, lay.metadata_size, lay.activemap_offset) == (0, 4096, 4096)
    assert (lay.extentsize, lay.keepdirty) == (2 * 1024 * 1024, 64)


def test_layout_rounding_and_sectors() -> None:
    lay = MetadataLayout.compute(4096 + 10 * 4096 + 1, extentsize=4096, sectorsize=4096)
    assert lay.nextents == 11
    assert lay.mapsize == 4096
    assert lay.datasize == lay.mediasize - 4096 - 4096


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"mediasize": 1 << 30, "sectorsize": 500}, "power of 2"),
        ({"mediasize": 1 << 30, "extentsize": 1000}, "multiple"),
        ({"mediasize": 1 << 30, "keepdirty": 0}, "keepdirty"),
        ({"mediasize": 4096}, "not enough"),
        ({"mediasize": 4097, "sectorsize": 4096, "extentsize": 4096}, "nothing left"),
    ],
)
def test_layout_errors(kwargs: dict[str, int], message: str) -> None:
    with pytest.raises(LayoutError, match=message):
        MetadataLayout.compute(**kwargs)


def test_create_encode_decode() -> None:
    md = Metadata.create("shared", MetadataLayout.compute(2 * 1024**3))
    assert (md.resuid, md.localcnt, md.remotecnt, md.prevrole) == (0, 0, 0, Role.INIT)
    assert md.localoff == 4608 and md.nextents == 1024
    block = encode(md)
    assert len(block) == METADATA_SIZE
    assert decode(block, resource="shared") == md
    with pytest.raises(WrongResource, match="check 'local'"):
        decode(block, resource="other")


def test_updates_alternate_slots_and_survive_torn_writes() -> None:
    md = Metadata("r", 1 << 20, resuid=99)
    block = bytearray(encode(md))
    current = md
    for i in range(1, 6):
        offset, new, slot = update_block(current.replace(localcnt=i))
        assert offset == (i % 2) * SLOT_SIZE and len(slot) == SLOT_SIZE
        torn = bytearray(block)
        torn[offset : offset + 100] = slot[:100]  # a crash in the middle of the write
        assert decode(torn) == current  # the previous state survives
        block[offset : offset + SLOT_SIZE] = slot
        assert decode(block) == new
        current = new


def test_generation_wraps() -> None:
    md = Metadata("r", 1, generation=2**32 - 1)
    block = bytearray(encode(md))
    offset, new, slot = update_block(md)
    assert new.generation == 0
    block[offset : offset + SLOT_SIZE] = slot
    assert decode(block).generation == 0


def test_decode_errors() -> None:
    with pytest.raises(NotHastMetadata, match="hastctl create"):
        decode(bytes(METADATA_SIZE))
    with pytest.raises(CorruptMetadata, match="truncated"):
        decode(b"abc")
    block = bytearray(encode(Metadata("r", 100)))
    block[20] ^= 0xFF
    block[SLOT_SIZE + 20] ^= 0xFF
    with pytest.raises(CorruptMetadata):
        decode(block)
    assert issubclass(CorruptMetadata, CarpoolError)
    with pytest.raises(MetadataError):
        encode(Metadata("", 1))
    with pytest.raises(MetadataError):
        encode(Metadata("r", -1))


@settings(max_examples=200, deadline=None)
@given(
    st.text(min_size=1, max_size=100).filter(lambda s: 0 < len(s.encode()) <= 1024),
    st.integers(0, 2**64 - 1),
    st.integers(1, 2**32 - 1),
    st.integers(0, 2**64 - 1),
    st.integers(0, 2**64 - 1),
    st.sampled_from(list(Role)),
)
def test_round_trip(name: str, size: int, ext: int, uid: int, cnt: int, role: Role) -> None:
    md = Metadata(name, size, ext, 64, 4608, uid, cnt, cnt // 2, role)
    assert decode(encode(md)) == md


@settings(max_examples=300, deadline=None)
@given(
    st.binary(max_size=200),
    st.booleans(),
    st.lists(st.tuples(st.integers(0, 4095), st.integers(1, 255)), max_size=5),
)
def test_garbage_only_raises_metadata_errors(
    head: bytes, fix_crc: bool, flips: list[tuple[int, int]]
) -> None:
    block = bytearray(encode(Metadata("r", 1 << 20)))
    for index, xor in flips:
        block[index] ^= xor
    slot = bytearray(b"CPHASTMD" + head + bytes(SLOT_SIZE))[: SLOT_SIZE - 4]
    if fix_crc:
        slot += zlib.crc32(slot).to_bytes(4, "big")
        block[:SLOT_SIZE] = slot
    with contextlib.suppress(MetadataError):
        decode(block)


def c(resuid: int, local: int, remote: int) -> NodeCounters:
    return NodeCounters(resuid, local, remote)


@pytest.mark.parametrize(
    ("sec", "pri", "virgin", "direction", "adopt"),
    [
        (c(0, 0, 0), c(7, 0, 0), True, SyncDirection.NONE, True),
        (c(0, 0, 0), c(7, 1, 0), False, SyncDirection.PRIMARY_TO_SECONDARY_FULL, True),
        (c(8, 0, 0), c(7, 0, 0), False, SyncDirection.RESUID_MISMATCH, False),
        # S.local > P.remote, S.remote == P.local: the primary is out of date
        (c(7, 2, 1), c(7, 1, 1), False, SyncDirection.SECONDARY_TO_PRIMARY_DIRTY, False),
        # both equal: regular sync of the dirty extents
        (c(7, 1, 1), c(7, 1, 1), False, SyncDirection.PRIMARY_TO_SECONDARY_DIRTY, False),
        # S.local == P.remote, S.remote < P.local: the secondary is out of date
        (c(7, 1, 1), c(7, 2, 1), False, SyncDirection.PRIMARY_TO_SECONDARY_DIRTY, False),
        # both ahead: split-brain
        (c(7, 2, 1), c(7, 2, 1), False, SyncDirection.SPLIT_BRAIN, False),
        # anything else: full sync, from the secondary when it is ahead
        (c(7, 3, 5), c(7, 1, 1), False, SyncDirection.SECONDARY_TO_PRIMARY_FULL, False),
        (c(7, 0, 5), c(7, 1, 1), False, SyncDirection.PRIMARY_TO_SECONDARY_FULL, False),
    ],
)
def test_decide_sync_table(
    sec: NodeCounters, pri: NodeCounters, virgin: bool, direction: SyncDirection, adopt: bool
) -> None:
    decision = decide_sync(sec, pri, primary_virgin=virgin)
    assert decision.direction is direction
    assert decision.adopt_resuid is adopt
    assert decision.reason


def test_decision_properties_and_messages() -> None:
    sb = decide_sync(c(7, 2, 1), c(7, 2, 1))
    assert sb.direction.refused and "Split-brain condition!" in sb.reason
    assert "hastctl create" in sb.reason
    assert SyncDirection.SECONDARY_TO_PRIMARY_FULL.full
    assert SyncDirection.SECONDARY_TO_PRIMARY_FULL.from_secondary
    assert not SyncDirection.PRIMARY_TO_SECONDARY_DIRTY.from_secondary
    with pytest.raises(ValueError):
        decide_sync(c(1, 0, 0), c(0, 0, 0))


def test_counter_lifecycle_leads_to_split_brain_only_when_both_wrote() -> None:
    # Both in sync at (1, 1); the primary loses its peer and writes.
    p = Metadata("r", 1 << 20, resuid=7, localcnt=1, remotecnt=1)
    s = NodeCounters(7, 1, 1)
    p2 = bump_localcnt(p, s.remotecnt)
    assert p2 is not None and p2.localcnt == 2 and p2.prevrole is Role.PRIMARY
    assert bump_localcnt(p2, s.remotecnt) is None  # once per generation
    # The secondary returns: secondary out of date, dirty sync, counters realigned.
    d = decide_sync(s, NodeCounters(7, p2.localcnt, p2.remotecnt))
    assert d.direction is SyncDirection.PRIMARY_TO_SECONDARY_DIRTY
    done = after_sync(p2, s)
    assert (done.localcnt, done.remotecnt) == (1, 1)
    # Split-brain: the old secondary was promoted and wrote too.
    s_promoted = NodeCounters(7, 2, 1)
    assert decide_sync(s_promoted, NodeCounters(7, 2, 1)).direction is SyncDirection.SPLIT_BRAIN


def test_write_at(tmp_path: Path) -> None:
    path = tmp_path / "disk"
    path.write_bytes(bytes(8192))
    md = Metadata("r", 4096)
    fd = os.open(path, os.O_RDWR)
    try:
        write_at(fd, 0, encode(md))
        offset, new, slot = update_block(md.replace(resuid=5))
        write_at(fd, offset, memoryview(slot), sync=False)
    finally:
        os.close(fd)
    data = path.read_bytes()
    assert len(data) == 8192
    assert decode(data[:METADATA_SIZE]) == new
