"""A simulated HAST pair: properties over random workloads, delays and link cuts."""

from __future__ import annotations

import random

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from carpool.hast import nbd
from carpool.hast.common import Replication, Role
from carpool.hast.primary import PrimaryMachine
from carpool.hast.roles import change_role
from carpool.hast.secondary import SecondaryMachine

from .hast_sim import Sim, connected_pair

SECTOR = 512
FAST = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _random_write(rng: random.Random, sim: Sim, *, fua: bool = False) -> tuple[int, int]:
    size = len(sim.a.disk)
    length = rng.choice([SECTOR, 4096, 3 * 4096, 20 * 1024])
    offset = rng.randrange(0, (size - length) // SECTOR + 1) * SECTOR
    sim.write(sim.a, offset, rng.randbytes(length), fua=fua)
    return offset, length


def _extents(sim: Sim, ranges: list[tuple[int, int]]) -> set[int]:
    ext = sim.a.md.extentsize
    out: set[int] = set()
    for off, ln in ranges:
        out.update(range(off // ext, (off + ln - 1) // ext + 1))
    return out


@FAST
@given(st.integers(0, 2**32), st.sampled_from(list(Replication)))
def test_acknowledged_writes_obey_the_mode(seed: int, mode: Replication) -> None:
    sim = connected_pair(seed, mode=mode)
    rng = random.Random(seed)
    for _ in range(40):
        _random_write(rng, sim, fua=rng.random() < 0.2)
        if rng.random() < 0.2:
            sim.submit(sim.a, nbd.NbdCommand.FLUSH)
        sim.run_until(sim.now + rng.uniform(0, 0.01))
    sim.settle()
    assert sim.violations == []
    assert all(err == 0 for err, _ in sim.replies.values())
    assert sim.a.disk == sim.b.disk  # nothing lost once quiet
    p = sim.a.machine
    assert isinstance(p, PrimaryMachine)
    assert p.activemap.nsync == 0


@FAST
@given(st.integers(0, 2**32), st.sampled_from(list(Replication)))
def test_overlapping_writes_land_in_submission_order(seed: int, mode: Replication) -> None:
    sim = connected_pair(seed, mode=mode)
    rng = random.Random(seed)
    last = b""
    for i in range(10):
        last = bytes([i + 1]) * 4096
        sim.write(sim.a, 8192, last)
    sim.settle()
    assert sim.a.disk[8192 : 8192 + 4096] == last
    assert sim.b.disk[8192 : 8192 + 4096] == last
    assert sorted(sim.replies) == list(range(1, 11))
    del rng


@FAST
@given(st.integers(0, 2**32), st.sampled_from(list(Replication)))
def test_reconnect_resyncs_exactly_the_dirty_extents(seed: int, mode: Replication) -> None:
    sim = connected_pair(seed, mode=mode)
    rng = random.Random(seed)
    for _ in range(10):
        _random_write(rng, sim)
    sim.settle()
    sim.partitioned = True
    sim.cut()
    p = sim.a.machine
    assert isinstance(p, PrimaryMachine)
    assert p.status == "degraded" and "disconnect" in sim.a.events
    localcnt_before = sim.a.md.localcnt
    degraded: list[tuple[int, int]] = []
    for _ in range(rng.randrange(1, 12)):
        degraded.append(_random_write(rng, sim))
    sim.settle()
    assert sim.a.md.localcnt == localcnt_before + 1  # bumped once
    assert all(err == 0 for err, _ in sim.replies.values())
    dirty = _extents(sim, degraded)
    ext = sim.a.md.extentsize
    expected = sum(min(ext, len(sim.a.disk) - e * ext) for e in dirty)
    assert p.activemap.sync_bytes == expected
    sent_before = p.sync_bytes_sent
    sim.partitioned = False
    sim.run_until(sim.now + 12.0)  # reconnect backoff
    sim.settle()
    assert p.connected
    assert "syncstart" in sim.a.events and "syncdone" in sim.a.events
    assert p.sync_bytes_sent - sent_before == expected
    assert sim.a.disk == sim.b.disk
    assert p.activemap.nsync == 0
    # counters agree again: the secondary's remotecnt equals the primary's localcnt
    assert sim.a.md.localcnt == sim.b.md.remotecnt and sim.a.md.remotecnt == sim.b.md.localcnt


@FAST
@given(st.integers(0, 2**32))
def test_random_cuts_during_writes_and_resync_converge(seed: int) -> None:
    sim = connected_pair(seed, mode=Replication.MEMSYNC)
    rng = random.Random(seed)
    for _ in range(60):
        _random_write(rng, sim)
        if rng.random() < 0.08:
            sim.cut()
        sim.run_until(sim.now + rng.uniform(0, 0.05))
    sim.settle()
    sim.run_until(sim.now + 12.0)
    sim.settle()
    p = sim.a.machine
    assert isinstance(p, PrimaryMachine)
    assert p.connected and p.activemap.nsync == 0
    assert sim.a.disk == sim.b.disk
    assert sim.violations == []


@FAST
@given(st.integers(0, 2**32))
def test_interrupted_resync_resumes_with_what_is_left(seed: int) -> None:
    sim = connected_pair(seed, mode=Replication.FULLSYNC)
    rng = random.Random(seed)
    sim.partitioned = True
    sim.cut()
    for i in range(len(sim.a.disk) // (16 * 1024)):
        sim.write(sim.a, i * 16 * 1024, rng.randbytes(4096))
    sim.settle()
    p = sim.a.machine
    assert isinstance(p, PrimaryMachine)
    total = p.activemap.sync_bytes
    sim.partitioned = False
    # cut in the middle of the resync
    end = sim.now + 15.0
    while sim.now < end and (p.resync is None or p.resync.done_bytes == 0):
        sim.run_until(sim.now + 0.001)
    assert p.resync is not None
    sim.cut()
    left = p.activemap.sync_bytes
    assert 0 < left <= total
    assert "syncintr" in sim.a.events
    sent = p.sync_bytes_sent
    sim.run_until(sim.now + 12.0)
    sim.settle()
    assert p.connected and p.activemap.nsync == 0
    assert p.sync_bytes_sent - sent == left  # only what was left
    assert sim.a.disk == sim.b.disk


def test_failed_local_read_is_served_by_the_peer() -> None:
    sim = connected_pair(7)
    sim.write(sim.a, 0, b"q" * 4096)
    sim.settle()
    sim.a.read_fail = True
    cookie = sim.submit(sim.a, nbd.NbdCommand.READ, 0, 4096)
    sim.settle()
    assert sim.replies[cookie] == (0, b"q" * 4096)
    assert "read-error" in sim.a.events
    sim.cut()
    cookie = sim.submit(sim.a, nbd.NbdCommand.READ, 0, 4096)
    sim.settle()
    assert sim.replies[cookie][0] == 5  # EIO without a peer


def test_split_brain_is_detected_and_nothing_is_overwritten() -> None:
    sim = connected_pair(11, mode=Replication.FULLSYNC)
    sim.write(sim.a, 0, b"A" * 4096)
    sim.settle()
    sim.partitioned = True
    sim.cut()
    # a keeps writing as primary
    sim.write(sim.a, 4096, b"1" * 4096)
    sim.settle()
    # b is promoted and written
    assert isinstance(sim.b.machine, SecondaryMachine)
    ch = change_role("shared", Role.SECONDARY, Role.PRIMARY, sim.b.md, new_resuid=lambda: 99)
    assert ch.metadata is not None
    sim.b.md = ch.metadata
    sim.b.machine = None
    sim.make_primary(sim.b)
    sim.write(sim.b, 8192, b"2" * 4096)
    sim.settle()
    # b goes back to secondary, the link heals: a connects and is refused
    ch = change_role("shared", Role.PRIMARY, Role.SECONDARY, sim.b.md, new_resuid=lambda: 99)
    assert ch.metadata is not None
    sim.b.md = ch.metadata
    sim.make_secondary(sim.b)
    disk_a, disk_b = bytes(sim.a.disk), bytes(sim.b.disk)
    sim.partitioned = False
    sim.run_until(sim.now + 25.0)
    assert "split-brain" in sim.a.events and "split-brain" in sim.b.events
    p = sim.a.machine
    assert isinstance(p, PrimaryMachine) and not p.connected
    assert bytes(sim.a.disk) == disk_a and bytes(sim.b.disk) == disk_b
    assert sim.b.disk[8192 : 8192 + 4096] == b"2" * 4096
    assert sim.a.disk[4096:8192] == b"1" * 4096


def test_recovery_after_split_brain_is_a_full_sync() -> None:
    sim = connected_pair(12, mode=Replication.FULLSYNC, datasize=16 * 4096)
    sim.write(sim.a, 0, b"A" * 4096)
    sim.settle()
    sim.partitioned = True
    sim.cut()
    sim.write(sim.a, 4096, b"1" * 4096)
    sim.settle()
    # the loser (b) runs role init; create; role secondary
    from carpool.hast.metadata import Metadata

    sim.b.md = Metadata("shared", sim.b.md.datasize, sim.b.md.extentsize, sim.b.md.keepdirty,
                        localoff=sim.b.md.localoff)  # fmt: skip
    sim.b.bitmap = bytes(len(sim.b.bitmap))
    sim.b.disk[:] = b"\xee" * len(sim.b.disk)
    sim.make_secondary(sim.b)
    sim.partitioned = False
    sim.run_until(sim.now + 12.0)
    sim.settle()
    p = sim.a.machine
    assert isinstance(p, PrimaryMachine) and p.connected
    assert p.sync_bytes_sent == len(sim.a.disk)  # every byte, once
    assert sim.a.disk == sim.b.disk
    assert sim.b.md.resuid == sim.a.md.resuid


def test_authenticated_pair_replicates_and_a_wrong_key_is_refused() -> None:
    sim = connected_pair(3, key=b"k" * 32)
    sim.write(sim.a, 0, b"z" * 512)
    sim.settle()
    assert sim.b.disk[:512] == b"z" * 512
    sim2 = Sim(4, key=b"k" * 32)
    sim2.make_secondary(sim2.b)
    s = sim2.b.machine
    assert isinstance(s, SecondaryMachine)
    s.key = b"other" * 4
    sim2.make_primary(sim2.a, virgin=True)
    sim2.run_until(3.0)
    assert not sim2.up
    assert sim2.b.disk == bytearray(len(sim2.b.disk))


def test_resync_rate_limit_through_the_primary() -> None:
    sim = connected_pair(21, sync_rate=64 * 1024)
    sim.partitioned = True
    sim.cut()
    for i in range(16):
        sim.write(sim.a, i * 16 * 1024, b"r" * 512)
    sim.settle()
    sim.partitioned = False
    p = sim.a.machine
    assert isinstance(p, PrimaryMachine)
    end = sim.now + 15.0
    while sim.now < end and p.resync is None:
        sim.run_until(sim.now + 0.01)
    assert p.resync is not None
    start = sim.now
    while p.resync is not None and sim.now < start + 30:
        sim.run_until(sim.now + 0.05)
    # 256 KiB at 64 KiB/s with a 64 KiB burst: at least 3 s
    assert sim.now - start >= 2.9
    assert p.sync_bytes_sent == 256 * 1024 and sim.a.disk == sim.b.disk


@FAST
@given(st.integers(0, 2**32), st.sampled_from(list(Replication)))
def test_mixed_workload_with_cuts_and_partitions_converges(seed: int, mode: Replication) -> None:
    sim = Sim(seed, mode=mode, max_delay=0.02)
    sim.make_secondary(sim.b)
    sim.make_primary(sim.a, virgin=True)
    rng = random.Random(seed)
    size = len(sim.a.disk)
    for _ in range(60):
        r = rng.random()
        ln = rng.choice([512, 4096, 20480])
        off = rng.randrange(0, (size - ln) // SECTOR + 1) * SECTOR
        if r < 0.6:
            sim.write(sim.a, off, rng.randbytes(ln), fua=rng.random() < 0.2)
        elif r < 0.7:
            sim.submit(sim.a, nbd.NbdCommand.TRIM, off, ln)
        elif r < 0.8:
            sim.submit(sim.a, nbd.NbdCommand.WRITE_ZEROES, off, ln)
        elif r < 0.9:
            sim.submit(sim.a, nbd.NbdCommand.FLUSH)
        else:
            sim.submit(sim.a, nbd.NbdCommand.READ, off, ln)
        if rng.random() < 0.05:
            sim.cut()
        if rng.random() < 0.03:
            sim.partitioned = not sim.partitioned
        sim.run_until(sim.now + rng.uniform(0, 0.3))
    sim.partitioned = False
    sim.settle()
    sim.run_until(sim.now + 12.0)
    sim.settle()
    p = sim.a.machine
    assert isinstance(p, PrimaryMachine)
    assert sim.violations == []
    assert len(sim.replies) == sim._cookie  # every request answered
    assert p.connected and p.in_flight == 0 and p.activemap.nsync == 0
    assert sim.a.disk == sim.b.disk


@FAST
@given(st.integers(0, 2**32), st.sampled_from(list(Replication)))
def test_verify_sees_equal_disks_even_with_writes_racing_it(seed: int, mode: Replication) -> None:
    sim = connected_pair(seed, mode=mode)
    rng = random.Random(seed)
    size = len(sim.a.disk)
    extent = sim.a.md.extentsize
    ids = []
    for _ in range(30):
        _random_write(rng, sim)
        if rng.random() < 0.5:
            start = rng.randrange(0, size // extent) * extent
            ids.append(sim.verify(start, min(extent, size - start)))
        sim.run_until(sim.now + rng.uniform(0, 0.01))
    sim.settle()
    assert sim.violations == []
    assert [sim.verified[i].same for i in ids] == [True] * len(ids)


def test_verify_finds_the_extent_that_differs_and_only_it() -> None:
    sim = connected_pair(7)
    extent = sim.a.md.extentsize
    sim.write(sim.a, 0, b"\x01" * len(sim.a.disk))
    sim.settle()
    sim.b.disk[3 * extent + 100] ^= 0xFF  # the secondary's disk rots
    ids = [sim.verify(n * extent, extent) for n in range(len(sim.a.disk) // extent)]
    sim.settle()
    differing = [n for n, i in enumerate(ids) if sim.verified[i].same is False]
    assert differing == [3]
    assert all(sim.verified[i].same is not None for i in ids)


def test_verify_without_the_secondary_says_why() -> None:
    sim = connected_pair(8)
    sim.partitioned = True
    sim.cut()
    done = sim.verified[sim.verify(0, 4096)]
    assert done.same is None and "not connected" in done.error
    outside = connected_pair(9)
    result = outside.verified[outside.verify(len(outside.a.disk), 4096)]
    assert result.same is None and "outside" in result.error


def test_verify_interrupted_by_a_cut_answers_with_an_error() -> None:
    sim = connected_pair(10)
    id = sim.verify(0, 4096)
    sim.cut()
    sim.settle()
    assert sim.verified[id].same is None
