"""The resync planner: chunking, exact byte accounting, rate limit, interruption and resume."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from carpool.hast.activemap import ActiveMap, encode_bitmap
from carpool.hast.metadata import Metadata, NodeCounters, SyncDirection
from carpool.hast.resync import Chunk, Resync

EXT = 16 * 1024
DIRTY = SyncDirection.PRIMARY_TO_SECONDARY_DIRTY


def _map(datasize: int, dirty: list[int]) -> ActiveMap:
    am = ActiveMap(datasize, EXT, keepdirty=4)
    am.merge(encode_bitmap(dirty, am.nextents))
    return am


def _drain(rs: Resync, now: float = 0.0) -> list[Chunk]:
    out = []
    while True:
        chunk = rs.next_chunk(now)
        if chunk is None:
            break
        out.append(chunk)
        rs.chunk_done(chunk)
    return out


def test_chunks_walk_dirty_extents_in_order_without_crossing_extents() -> None:
    am = _map(10 * EXT, [1, 4])
    rs = Resync(am, DIRTY, chunk_size=6 * 1024)
    chunks = _drain(rs)
    assert [(c.ext, c.offset, c.length, c.last) for c in chunks] == [
        (1, EXT, 6144, False), (1, EXT + 6144, 6144, False), (1, EXT + 12288, 4096, True),
        (4, 4 * EXT, 6144, False), (4, 4 * EXT + 6144, 6144, False),
        (4, 4 * EXT + 12288, 4096, True),
    ]  # fmt: skip
    assert rs.finished and rs.done_bytes == rs.total_bytes == 2 * EXT
    assert am.nsync == 0 and rs.progress == 1.0


def test_last_extent_may_be_short() -> None:
    am = _map(3 * EXT + 1000, [3])
    rs = Resync(am, DIRTY, chunk_size=EXT)
    chunks = _drain(rs)
    assert chunks == [Chunk(3, 3 * EXT, 1000, True)]
    assert rs.total_bytes == rs.done_bytes == 1000


@settings(max_examples=60, deadline=None)
@given(
    st.integers(1, 64).flatmap(
        lambda n: st.tuples(st.just(n), st.sets(st.integers(0, n - 1)), st.integers(1, 3 * EXT))
    )
)
def test_bytes_sent_equal_the_dirty_extents(arg: tuple[int, set[int], int]) -> None:
    n, dirty, chunk = arg
    datasize = n * EXT - 123  # a short last extent
    am = _map(datasize, sorted(dirty))
    expected = sum(min(EXT, datasize - e * EXT) for e in dirty)
    rs = Resync(am, DIRTY, chunk_size=chunk, window=3)
    sent = sum(c.length for c in _drain(rs))
    assert sent == expected == rs.total_bytes == rs.done_bytes
    assert rs.finished and am.nsync == 0


def test_window_limits_chunks_in_flight() -> None:
    am = _map(10 * EXT, [0, 1, 2])
    rs = Resync(am, DIRTY, chunk_size=4096, window=2)
    a, b = rs.next_chunk(0), rs.next_chunk(0)
    assert a is not None and b is not None and rs.next_chunk(0) is None
    assert rs.in_flight == 2
    rs.chunk_done(a)
    assert rs.next_chunk(0) is not None


def test_extent_is_synced_only_after_all_its_chunks() -> None:
    am = _map(4 * EXT, [0])
    rs = Resync(am, DIRTY, chunk_size=EXT // 2, window=4)
    c1, c2 = rs.next_chunk(0), rs.next_chunk(0)
    assert c1 is not None and c2 is not None and c2.last
    assert rs.chunk_done(c2) is None and am.needs_sync(0)
    bitmap = rs.chunk_done(c1)
    assert not am.needs_sync(0)
    assert bitmap is not None and not any(bitmap)


def test_rate_limit_paces_chunks_with_now() -> None:
    am = _map(10 * EXT, list(range(10)))
    rs = Resync(am, DIRTY, chunk_size=4096, window=100, rate=8192, now=0.0)
    got = 0
    # the bucket starts full (max(rate, chunk) = 8192 bytes): two chunks at once
    while (c := rs.next_chunk(0.0)) is not None:
        got += c.length
    assert got == 8192
    assert rs.wake_at() == pytest.approx(0.5)
    assert rs.next_chunk(0.25) is None
    assert rs.next_chunk(0.5) is not None
    # over 10 s at most rate * 10 + burst bytes
    total = 4096
    t = 0.5
    while t < 10.5:
        t += 0.1
        while (c := rs.next_chunk(t)) is not None:
            total += c.length
    assert 8192 * 10 - 4096 <= total <= 8192 * 10 + 8192


def test_interrupt_keeps_unfinished_extents_for_the_next_run() -> None:
    am = _map(10 * EXT, [2, 5, 7])
    rs = Resync(am, DIRTY, chunk_size=EXT // 2, window=10)
    first = [rs.next_chunk(0) for _ in range(3)]  # extent 2 whole, half of 5
    assert all(first)
    for c in first:
        assert c is not None
        rs.chunk_done(c)
    rs.interrupt()
    assert rs.next_chunk(0) is None and not rs.finished
    assert am.sync_queue() is not None and list(am.sync_queue()) == [5, 7]
    again = Resync(am, DIRTY, chunk_size=EXT // 2)
    assert again.total_bytes == 2 * EXT  # extent 5 is copied again in full
    assert sum(c.length for c in _drain(again)) == 2 * EXT


def test_extents_queued_during_the_run_are_picked_up() -> None:
    am = _map(10 * EXT, [5])
    rs = Resync(am, DIRTY, chunk_size=EXT)
    c = rs.next_chunk(0)
    assert c is not None
    am.need_sync(EXT, 10)  # extent 1, behind the walk
    rs.chunk_done(c)
    rest = _drain(rs)
    assert [x.ext for x in rest] == [1]
    assert rs.finished and rs.total_bytes == rs.done_bytes == 2 * EXT


def test_refused_directions_and_bad_arguments() -> None:
    am = _map(4 * EXT, [])
    with pytest.raises(ValueError):
        Resync(am, SyncDirection.SPLIT_BRAIN)
    with pytest.raises(ValueError):
        Resync(am, DIRTY, chunk_size=0)
    with pytest.raises(ValueError):
        Resync(am, DIRTY, rate=0)
    rs = Resync(am, DIRTY)
    assert rs.finished and rs.total_bytes == 0 and rs.progress == 1.0


def test_final_metadata_takes_the_peer_counters() -> None:
    am = _map(4 * EXT, [1])
    rs = Resync(am, SyncDirection.SECONDARY_TO_PRIMARY_DIRTY)
    assert rs.from_secondary
    md = Metadata("r", 4 * EXT, EXT, resuid=5, localcnt=3, remotecnt=2)
    with pytest.raises(ValueError):
        rs.final_metadata(md, NodeCounters(5, 3, 3))
    _drain(rs)
    new = rs.final_metadata(md, NodeCounters(5, 3, 3))
    assert (new.localcnt, new.remotecnt) == (3, 3)
