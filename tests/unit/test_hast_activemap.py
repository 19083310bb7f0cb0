"""The activemap: FreeBSD's dirty-extent semantics, as properties and examples."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from carpool.hast.activemap import ActiveMap, decode_bitmap, encode_bitmap

EXT = 4096


def test_bitmap_encoding_is_bitstring_lsb_first() -> None:
    assert encode_bitmap([0, 9, 15], 16) == b"\x01\x82"
    assert encode_bitmap([], 16, mapsize=512) == bytes(512)
    assert decode_bitmap(b"\x01\x82", 16) == [0, 9, 15]
    assert decode_bitmap(b"\xff\xff", 10) == list(range(10))  # bits past the end ignored
    with pytest.raises(ValueError):
        encode_bitmap([16], 16)
    with pytest.raises(ValueError):
        decode_bitmap(b"\x00", 9)


@given(st.integers(1, 300).flatmap(lambda n: st.tuples(st.just(n), st.sets(st.integers(0, n - 1)))))
def test_bitmap_round_trip(arg: tuple[int, set[int]]) -> None:
    n, exts = arg
    assert decode_bitmap(encode_bitmap(exts, n), n) == sorted(exts)


def test_first_write_flushes_then_reuse_does_not() -> None:
    am = ActiveMap(100 * EXT, EXT, keepdirty=4, mapsize=512)
    bm = am.write_start(0, 2 * EXT)  # extents 0 and 1
    assert bm is not None and len(bm) == 512 and decode_bitmap(bm, 100) == [0, 1]
    assert am.in_flight(0) == 1 and am.ndirty == 2 and am.dirty_bytes == 2 * EXT
    assert am.write_start(EXT, 10) is None  # extent 1 already dirty on disk
    assert am.write_complete(0, 2 * EXT) is None  # still in keepdirty: stays dirty
    assert am.write_complete(EXT, 10) is None
    assert am.is_dirty(0) and am.is_dirty(1)
    assert am.keepdirty_extents() == [1, 0]


def test_keepdirty_eviction_cleans() -> None:
    am = ActiveMap(100 * EXT, EXT, keepdirty=2)
    for ext in range(3):
        am.write_start(ext * EXT, EXT)
        am.write_complete(ext * EXT, EXT)
    assert am.keepdirty_extents() == [2, 1]
    assert not am.is_dirty(0) and am.is_dirty(1) and am.is_dirty(2)
    assert decode_bitmap(am.bitmap(), am.nextents) == [1, 2]


def test_in_flight_extent_stays_dirty_after_eviction() -> None:
    am = ActiveMap(10 * EXT, EXT, keepdirty=1)
    am.write_start(0, EXT)
    am.write_start(EXT, EXT)  # evicts 0 from the LRU, but 0 has a write in flight
    assert am.is_dirty(0)
    am.write_complete(0, EXT)
    assert not am.is_dirty(0)


def test_need_sync_keeps_extent_dirty_until_synced() -> None:
    am = ActiveMap(10 * EXT + 100, EXT, keepdirty=0)
    assert am.nextents == 11
    assert am.write_start(3 * EXT, EXT) is not None
    assert am.need_sync(3 * EXT, EXT) is None  # already on disk
    assert am.write_complete(3 * EXT, EXT) is None
    assert am.is_dirty(3) and am.nsync == 1
    bm = am.need_sync(10 * EXT, 100)
    assert bm is not None and decode_bitmap(bm, 11) == [3, 10]
    assert am.sync_range(10) == (10 * EXT, 100)
    assert am.sync_bytes == EXT + 100
    assert list(am.sync_queue()) == [3, 10]
    assert am.next_sync() == 3 and am.next_sync(4) == 10 and am.next_sync(11) is None
    bm = am.extent_synced(3)
    assert bm is not None and decode_bitmap(bm, 11) == [10]
    assert am.extent_synced(3) is None
    assert am.extent_synced(10) is not None and am.ndirty == 0 and am.nsync == 0


def test_copyin_merge_sync_all_clear() -> None:
    am = ActiveMap(64 * EXT, EXT, keepdirty=8)
    am.copyin(encode_bitmap([1, 5], 64))
    assert am.on_disk(1) and am.nsync == 2
    assert am.merge(encode_bitmap([5], 64)) is None
    bm = am.merge(encode_bitmap([7, 63], 64))
    assert bm is not None and decode_bitmap(bm, 64) == [1, 5, 7, 63]
    assert am.next_sync(8) == 63
    bm = am.sync_all()
    assert bm is not None and am.nsync == 64 and am.ndirty == 64
    am.write_start(0, 1)
    with pytest.raises(ValueError):
        am.clear()
    am.write_complete(0, 1)
    assert am.clear() == bytes(8) and am.ndirty == 0


def test_range_errors() -> None:
    am = ActiveMap(10 * EXT, EXT)
    with pytest.raises(ValueError):
        am.write_start(9 * EXT, EXT + 1)
    with pytest.raises(ValueError):
        am.write_complete(0, EXT)  # nothing started
    assert am.write_start(0, 0) is None
    with pytest.raises(ValueError):
        ActiveMap(0, EXT)


ops = st.lists(
    st.tuples(
        st.sampled_from(["start", "complete", "fail", "synced"]),
        st.integers(0, 31),
        st.integers(1, 3),
    ),
    max_size=120,
)


@settings(max_examples=300, deadline=None)
@given(ops, st.integers(0, 6))
def test_in_flight_write_is_dirty_on_disk_before_it_is_issued(
    steps: list[tuple[str, int, int]], keepdirty: int
) -> None:
    n = 32
    am = ActiveMap(n * EXT, EXT, keepdirty=keepdirty)
    disk: set[int] = set()  # what the caller has written
    inflight: list[tuple[int, int]] = []
    for op, ext, count in steps:
        count = min(count, n - ext)
        if op == "start":
            bm = am.write_start(ext * EXT, count * EXT)
            if bm is not None:
                disk = set(decode_bitmap(bm, n))
            inflight.append((ext, count))
            # the write is issued now: every extent it touches must be on disk
            for e in range(ext, ext + count):
                assert e in disk
        elif op in ("complete", "fail") and inflight:
            e0, c0 = inflight.pop(ext % len(inflight))
            if op == "fail":
                bm = am.need_sync(e0 * EXT, c0 * EXT)
                if bm is not None:
                    disk = set(decode_bitmap(bm, n))
            bm = am.write_complete(e0 * EXT, c0 * EXT)
            if bm is not None:
                disk = set(decode_bitmap(bm, n))
        elif op == "synced":
            e = am.next_sync(ext)
            if e is not None:
                bm = am.extent_synced(e)
                if bm is not None:
                    disk = set(decode_bitmap(bm, n))
        # invariants after every step
        for e0, c0 in inflight:
            for e in range(e0, e0 + c0):
                assert e in disk and am.is_dirty(e)
        for e in am.sync_queue():
            assert e in disk  # not yet resynced: stays dirty on disk
        assert am.ndirty == sum(am.is_dirty(e) for e in range(n))
        assert {e for e in range(n) if am.on_disk(e)} == disk  # the map knows what we wrote


@settings(max_examples=200, deadline=None)
@given(ops, st.integers(1, 6))
def test_clean_extents_leave_the_map_once_keepdirty_is_exceeded(
    steps: list[tuple[str, int, int]], keepdirty: int
) -> None:
    n = 32
    am = ActiveMap(n * EXT, EXT, keepdirty=keepdirty)
    disk: set[int] = set()
    for op, ext, count in steps:
        if op == "start":
            count = min(count, n - ext)
            bm = am.write_start(ext * EXT, count * EXT)
            if bm is not None:
                disk = set(decode_bitmap(bm, n))
            bm = am.write_complete(ext * EXT, count * EXT)
            if bm is not None:
                disk = set(decode_bitmap(bm, n))
    # Now write to keepdirty fresh extents at the end, one at a time.
    for e in range(n - keepdirty, n):
        for bm in (am.write_start(e * EXT, EXT), am.write_complete(e * EXT, EXT)):
            if bm is not None:
                disk = set(decode_bitmap(bm, n))
    expected = set(range(n - keepdirty, n))
    assert {e for e in range(n) if am.is_dirty(e)} == expected
    assert disk == expected
