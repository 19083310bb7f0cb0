"""The replication planner, against a simulated pair of datasets.

The simulation applies steps with the strict semantics zfs-fuse has: an
incremental lands only when the target's newest snapshot is the base and the
target is unmodified, a full stream only on a target without snapshots,
rollback removes exactly the snapshots after ``to``, a held snapshot cannot
be destroyed.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st

from carpool.replicate.plan import (
    Action,
    Bookmark,
    Clone,
    Destroy,
    Hold,
    Mount,
    Plan,
    PlanError,
    PromoteClone,
    Receive,
    Release,
    Rename,
    ReplicationPolicy,
    ReplicationRefused,
    Rollback,
    Send,
    SetProperty,
    Snapshot,
    Step,
    plan_failback,
    plan_promote,
    plan_replication,
    plan_reverse,
)
from carpool.replicate.retention import RetentionPolicy
from carpool.replicate.snapshots import BtrfsSnapshot, ZfsSnapshot, snapshot_name

T0 = datetime(2026, 4, 9, 12, 0, tzinfo=UTC)
NO_RETENTION = RetentionPolicy(keep_last=1000)


def name_at(i: int) -> str:
    return snapshot_name("autorep", T0 + timedelta(minutes=15 * i))


# --------------------------------------------------------------------------- the model


class SimError(Exception):
    pass


@dataclass
class Snap:
    name: str
    origin: int  # identity: guid for ZFS, the sender's uuid for btrfs
    when: datetime
    holds: set[str] = field(default_factory=set)


@dataclass
class Dataset:
    snaps: list[Snap] = field(default_factory=list)
    bookmarks: list[Snap] = field(default_factory=list)
    dirty: bool = False
    props: dict[str, str] = field(default_factory=dict)
    renamed: list[tuple[str, str]] = field(default_factory=list)
    aside: list[Snap] = field(default_factory=list)

    def find(self, name: str) -> Snap:
        for snap in self.snaps:
            if snap.name == name:
                return snap
        raise SimError(f"no snapshot {name}")


class World:
    """Two datasets and the steps applied to them."""

    def __init__(self, source: Dataset, target: Dataset, backend: str = "zfs") -> None:
        self.sides = {"source": source, "target": target}
        self.backend = backend
        self.counter = itertools.count(10_000)
        self.pending: Send | None = None
        self.clone_of = ""
        self.clock = max(
            [s.when for d in (source, target) for s in d.snaps], default=T0
        ) + timedelta(minutes=1)

    def __repr__(self) -> str:
        def show(ds: Dataset) -> str:
            snaps = " ".join(f"{s.name}={s.origin}{'*' if s.holds else ''}" for s in ds.snaps)
            marks = " ".join(f"#{b.name}" for b in ds.bookmarks)
            return f"[{snaps}{' ' + marks if marks else ''}{' dirty' if ds.dirty else ''}]"

        return (
            f"World({self.backend} source={show(self.sides['source'])} "
            f"target={show(self.sides['target'])})"
        )

    def records(self, side: str) -> list[ZfsSnapshot] | list[BtrfsSnapshot]:
        ds = self.sides[side]
        if self.backend == "zfs":
            zfs = [
                ZfsSnapshot(side, s.name, s.origin, i, s.when, len(s.holds))
                for i, s in enumerate(ds.snaps)
            ]
            zfs += [
                ZfsSnapshot(side, b.name, b.origin, None, b.when, bookmark=True)
                for b in ds.bookmarks
            ]
            if ds.bookmarks:  # createtxg unknown for bookmarks here: keep snapshots' order
                zfs = [
                    ZfsSnapshot(s.dataset, s.name, s.guid, None, s.creation, s.userrefs, s.bookmark)
                    for s in zfs
                ]
                zfs = _ordered_with_bookmarks(ds, side)
            return zfs
        result: list[BtrfsSnapshot] = []
        for i, s in enumerate(ds.snaps):
            own = f"{side}-{s.origin}"
            if side == "source" and s.origin >= 0:
                result.append(BtrfsSnapshot(f"snaps/{s.name}", f"u{s.origin}", None, cgen=i))
            else:
                result.append(
                    BtrfsSnapshot(f"snaps/{s.name}", own, f"u{s.origin}", cgen=i, otime=s.when)
                )
        return result

    def apply(self, steps: tuple[Step, ...]) -> None:
        for step in steps:
            self.step(step)

    def step(self, step: Step) -> None:
        ds = self.sides[step.side]
        match step:
            case Snapshot(name=name):
                if any(s.name == name for s in ds.snaps):
                    raise SimError(f"snapshot {name} exists")
                self.clock += timedelta(minutes=1)
                ds.snaps.append(Snap(name, next(self.counter), self.clock))
                ds.dirty = False
            case Send():
                self.pending = step
            case Receive(snapshot=snapshot, force=force):
                send, self.pending = self.pending, None
                if send is None or send.snapshot != snapshot:
                    raise SimError("receive without its send")
                self.receive(send, ds, force)
            case Rollback(to=to, destroys=destroys):
                index = [s.name for s in ds.snaps].index(to)
                gone = tuple(s.name for s in ds.snaps[index + 1 :])[::-1]
                if gone != destroys:
                    raise SimError(f"rollback would destroy {gone}, plan said {destroys}")
                if any(s.holds for s in ds.snaps[index + 1 :]):
                    raise SimError("rollback over a held snapshot")
                del ds.snaps[index + 1 :]
                ds.dirty = False
            case Destroy(snapshot=snapshot):
                snap = ds.find(snapshot)
                if snap.holds:
                    raise SimError(f"dataset is busy: {snapshot} is held")
                ds.snaps.remove(snap)
            case Hold(snapshot=snapshot, tag=tag):
                ds.find(snapshot).holds.add(tag)
            case Release(snapshot=snapshot, tag=tag):
                ds.find(snapshot).holds.discard(tag)
            case Bookmark(snapshot=snapshot, bookmark=bookmark):
                snap = ds.find(snapshot)
                ds.bookmarks.append(Snap(bookmark, snap.origin, snap.when))
            case SetProperty(name=name, value=value):
                ds.props[name] = value
            case Mount():
                ds.props["mounted"] = "yes"
            case Rename(old=old, new=new, kind=kind):
                ds.renamed.append((old, new))
                if kind == "snapshot":
                    ds.find(old).name = new
            case Clone(snapshot=snapshot, clone="", origin=origin) if ds.renamed:
                # zfs clone ASIDE@snapshot DATASET after DATASET was renamed to ASIDE
                assert ds.renamed[-1] == ("", origin)
                self.clone_of = snapshot
            case PromoteClone(dataset=""):
                # the clone takes the snapshots up to its origin; later ones stay aside
                index = [s.name for s in ds.snaps].index(self.clone_of)
                ds.aside = ds.snaps[index + 1 :]
                del ds.snaps[index + 1 :]
                ds.dirty = False
            case Clone():
                ds.props["Clone"] = "done"
            case _:
                raise SimError(f"unknown step {step}")

    def receive(self, send: Send, ds: Dataset, force: bool) -> None:
        src = self.sides[send.side]
        if send.kind == "full":
            if ds.snaps and not force:
                raise SimError("destination exists")
            if ds.snaps:
                raise SimError("destination has snapshots")
            snap = src.find(send.snapshot)
            ds.snaps = [Snap(snap.name, snap.origin, snap.when)]
            ds.dirty = False
            return
        assert send.base is not None
        pool = src.bookmarks if send.base_is_bookmark else src.snaps
        base = next((s for s in pool if s.name == send.base), None)
        if base is None:
            raise SimError(f"incremental source {send.base} does not exist")
        if self.backend == "btrfs":
            # btrfs receive finds the parent anywhere by uuid; the live subvolume is not involved
            if not any(s.origin == base.origin for s in ds.snaps):
                raise SimError("cannot find parent subvolume")
        elif not ds.snaps or ds.snaps[-1].origin != base.origin:
            raise SimError("most recent snapshot does not match incremental source")
        elif ds.dirty and not force:
            raise SimError("destination has been modified since most recent snapshot")
        end = src.find(send.snapshot)
        names = [s.name for s in src.snaps]
        if send.intermediates:
            start = names.index(base.name) if not send.base_is_bookmark else -1
            if send.base_is_bookmark:
                start = max(i for i, s in enumerate(src.snaps) if s.when <= base.when)
            carried = src.snaps[start + 1 : names.index(end.name) + 1]
        else:
            carried = [end]
        for snap in carried:
            if any(s.name == snap.name for s in ds.snaps):
                raise SimError(f"{snap.name} exists on the target")
            ds.snaps.append(Snap(snap.name, snap.origin, snap.when))
        ds.dirty = False


def _ordered_with_bookmarks(ds: Dataset, side: str) -> list[ZfsSnapshot]:
    items = [(s.when, 1, s, False) for s in ds.snaps] + [(b.when, 0, b, True) for b in ds.bookmarks]
    items.sort(key=lambda t: (t[0], t[1]))
    return [
        ZfsSnapshot(side, s.name, s.origin, txg, s.when, len(s.holds), bookmark)
        for txg, (_, _, s, bookmark) in enumerate(items)
    ]


def replicate(world: World, policy: ReplicationPolicy, modified: bool | None = None) -> Plan:
    plan = plan_replication(
        world.records("source"),
        world.records("target"),
        policy,
        now=world.clock,
        target_modified=modified,
    )
    if not plan.refused:
        world.apply(plan.steps)
    return plan


def zfs_world(source: list[str], target: list[str] | None = None) -> World:
    """Source snapshots by name; the target holds copies of the names given."""
    src = Dataset([Snap(n, i + 1, T0 + timedelta(minutes=15 * i)) for i, n in enumerate(source)])
    tgt = Dataset()
    for name in target or []:
        if any(s.name == name for s in src.snaps):
            original = src.find(name)
            tgt.snaps.append(Snap(name, original.origin, original.when))
        else:
            tgt.snaps.append(Snap(name, 900 + len(tgt.snaps), T0 + timedelta(days=1)))
    return World(src, tgt)


# --------------------------------------------------------------------------- examples


def test_first_run_is_a_full_send_of_the_newest() -> None:
    world = zfs_world([name_at(0), name_at(1)])
    plan = replicate(world, ReplicationPolicy())
    assert plan.action is Action.FULL
    assert plan.steps[:2] == (Send("source", "full", name_at(1)), Receive("target", name_at(1)))
    assert SetProperty("target", "readonly", "on") in plan.steps
    assert Hold("source", name_at(1), "carpool") in plan.steps
    assert [s.name for s in world.sides["target"].snaps] == [name_at(1)]


def test_second_run_is_incremental_with_intermediates() -> None:
    world = zfs_world([name_at(i) for i in range(4)], [name_at(0)])
    plan = replicate(world, ReplicationPolicy(source_retention=NO_RETENTION))
    assert plan.action is Action.INCREMENTAL
    assert plan.base == name_at(0)
    assert plan.steps[0] == Send("source", "incremental", name_at(3), name_at(0), True)
    assert [s.name for s in world.sides["target"].snaps] == [name_at(i) for i in range(4)]
    assert Release("target", name_at(0), "carpool") in plan.steps


def test_minus_i_without_intermediates() -> None:
    world = zfs_world([name_at(i) for i in range(4)], [name_at(0)])
    plan = replicate(world, ReplicationPolicy(intermediates=False))
    assert plan.steps[0] == Send("source", "incremental", name_at(3), name_at(0), False)
    assert [s.name for s in world.sides["target"].snaps] == [name_at(0), name_at(3)]


def test_nothing_to_do() -> None:
    world = zfs_world([name_at(0), name_at(1)], [name_at(0), name_at(1)])
    plan = replicate(world, ReplicationPolicy())
    assert plan.action is Action.NOTHING
    assert plan.steps == ()
    assert "up to date" in plan.reason


def test_source_without_snapshots_is_refused() -> None:
    plan = plan_replication([], [], ReplicationPolicy())
    assert plan.refused and "no snapshot" in plan.reason
    with pytest.raises(ReplicationRefused, match="take one first"):
        plan.require()


def test_no_common_snapshot_is_refused_and_names_what_would_go() -> None:
    world = zfs_world([name_at(5)], ["manual-a", "manual-b"])
    plan = replicate(world, ReplicationPolicy())
    assert plan.refused
    assert plan.destroys == ("manual-b", "manual-a")
    assert "none in common" in plan.reason and "allow_destroy_target" in plan.reason
    assert [s.name for s in world.sides["target"].snaps] == ["manual-a", "manual-b"]


def test_no_common_hints_at_a_pruned_base() -> None:
    world = zfs_world([name_at(5)], [name_at(1)])
    world.sides["target"].snaps[0].origin = 777  # the source's copy is gone
    plan = replicate(world, ReplicationPolicy())
    assert plan.refused and "pruned" in plan.reason


def test_no_common_with_allow_destroy_target() -> None:
    world = zfs_world([name_at(5)], ["manual-a", "manual-b"])
    plan = replicate(world, ReplicationPolicy(allow_destroy_target=True))
    assert plan.action is Action.FULL
    assert plan.steps[:3] == (
        Destroy("target", "manual-b"),
        Destroy("target", "manual-a"),
        Send("source", "full", name_at(5)),
    )
    assert plan.steps[3] == Receive("target", name_at(5), force=True)
    assert [s.name for s in world.sides["target"].snaps] == [name_at(5)]


def test_divergent_target_is_refused_without_destroying() -> None:
    world = zfs_world([name_at(0), name_at(1), name_at(2)], [name_at(0), name_at(1), "local-x"])
    plan = replicate(world, ReplicationPolicy())
    assert plan.refused
    assert plan.destroys == ("local-x",)
    assert (
        "diverged" in plan.reason and "local-x" in plan.reason and "allow_rollback" in plan.reason
    )


def test_divergent_target_rolled_back_when_allowed() -> None:
    world = zfs_world([name_at(0), name_at(1), name_at(2)], [name_at(0), name_at(1), "local-x"])
    plan = replicate(world, ReplicationPolicy(allow_rollback=True))
    assert plan.action is Action.INCREMENTAL
    assert plan.steps[0] == Rollback("target", name_at(1), ("local-x",))
    assert plan.destroys == ("local-x",)
    assert [s.name for s in world.sides["target"].snaps] == [name_at(i) for i in range(3)]


def test_held_target_snapshots_are_never_destroyed() -> None:
    world = zfs_world([name_at(0), name_at(1)], [name_at(0), "local-x"])
    world.sides["target"].snaps[1].holds.add("backup-tool")
    plan = replicate(world, ReplicationPolicy(allow_rollback=True))
    assert plan.refused and "held" in plan.reason and "zfs release" in plan.reason
    world = zfs_world([name_at(5)], ["manual-a"])
    world.sides["target"].snaps[0].holds.add("x")
    plan = replicate(world, ReplicationPolicy(allow_destroy_target=True))
    assert plan.refused and "manual-a" in plan.reason


def test_require_returns_an_accepted_plan() -> None:
    world = zfs_world([name_at(0)])
    plan = plan_replication(world.records("source"), [], ReplicationPolicy())
    assert plan.require() is plan


def test_modified_target_needs_rollback() -> None:
    world = zfs_world([name_at(0), name_at(1)], [name_at(0)])
    world.sides["target"].dirty = True
    refused = plan_replication(
        world.records("source"), world.records("target"), ReplicationPolicy(), target_modified=True
    )
    assert refused.refused and "changes written" in refused.reason
    plan = replicate(world, ReplicationPolicy(allow_rollback=True), modified=True)
    assert plan.steps[0] == Rollback("target", name_at(0), ())


def test_modified_target_with_nothing_to_send_is_left_alone() -> None:
    world = zfs_world([name_at(0)], [name_at(0)])
    plan = replicate(world, ReplicationPolicy(), modified=True)
    assert plan.action is Action.NOTHING and plan.steps == ()


def test_retention_prunes_old_snapshots_but_never_the_base() -> None:
    names = [name_at(i) for i in range(8)]
    world = zfs_world(names, names[:7])
    policy = ReplicationPolicy(
        source_retention=RetentionPolicy(keep_last=2),
        target_retention=RetentionPolicy(keep_last=3),
        hold_tag=None,
    )
    plan = replicate(world, policy)
    assert plan.prune_source == tuple(names[:6])
    assert plan.prune_target == tuple(names[:5])
    assert [s.name for s in world.sides["source"].snaps] == names[6:]
    assert [s.name for s in world.sides["target"].snaps] == names[5:]
    # idempotent
    again = replicate(world, policy)
    assert again.action is Action.NOTHING and again.steps == ()


def test_held_and_protected_snapshots_are_not_pruned() -> None:
    names = [name_at(i) for i in range(6)]
    world = zfs_world(names, names[:5])
    world.sides["source"].snaps[0].holds.add("other-target")
    policy = ReplicationPolicy(
        source_retention=RetentionPolicy(keep_last=1),
        target_retention=RetentionPolicy(keep_last=1),
        protected=frozenset({names[1]}),
        hold_tag=None,
    )
    plan = replicate(world, policy)
    assert names[0] not in plan.prune_source and names[1] not in plan.prune_source
    assert names[1] not in plan.prune_target
    assert names[5] not in plan.prune_source + plan.prune_target


def test_foreign_snapshots_are_never_pruned() -> None:
    world = zfs_world(["manual", name_at(1), name_at(2)], ["manual", name_at(1)])
    policy = ReplicationPolicy(
        source_retention=RetentionPolicy(keep_last=1),
        target_retention=RetentionPolicy(keep_last=1),
    )
    plan = replicate(world, policy)
    assert "manual" not in plan.prune_source + plan.prune_target


def test_bookmark_as_base_when_the_snapshot_is_gone() -> None:
    world = zfs_world([name_at(0), name_at(1), name_at(2), name_at(3)], [name_at(0), name_at(1)])
    src = world.sides["source"]
    gone = src.find(name_at(1))
    src.bookmarks.append(Snap(gone.name, gone.origin, gone.when))
    src.snaps.remove(gone)
    without = plan_replication(
        world.records("source"), world.records("target"), ReplicationPolicy()
    )
    assert without.refused  # common is @0, target has @1 after it
    plan = replicate(world, ReplicationPolicy(use_bookmarks=True))
    assert plan.action is Action.INCREMENTAL
    assert plan.steps[0] == Send("source", "incremental", name_at(2), name_at(1), False, True)
    assert plan.steps[2] == Send("source", "incremental", name_at(3), name_at(2), True)
    assert Bookmark("source", name_at(3), name_at(3)) in plan.steps
    assert [s.name for s in world.sides["target"].snaps][-1] == name_at(3)


def test_mixed_backends_and_missing_guid_are_plan_errors() -> None:
    zfs = ZfsSnapshot("p/a", "s", 1, 1)
    btrfs = BtrfsSnapshot("d/s", "u1")
    with pytest.raises(PlanError, match="mix"):
        plan_replication([zfs], [btrfs], ReplicationPolicy())
    with pytest.raises(PlanError, match="guid"):
        plan_replication([ZfsSnapshot("p/a", "s")], [], ReplicationPolicy())
    with pytest.raises(PlanError, match="several datasets"):
        plan_replication([zfs, ZfsSnapshot("p/b", "t", 2, 2)], [], ReplicationPolicy())
    with pytest.raises(PlanError, match="listed twice"):
        plan_replication([zfs, zfs], [], ReplicationPolicy())
    with pytest.raises(PlanError, match="no uuid"):
        plan_replication([BtrfsSnapshot("d/s")], [], ReplicationPolicy())


def test_btrfs_incremental_chain_matches_by_received_uuid() -> None:
    source = [BtrfsSnapshot(f"snaps/{name_at(i)}", f"u{i}", cgen=i) for i in range(3)]
    target = [BtrfsSnapshot(f"dst/{name_at(0)}", "t0", "u0", cgen=7)]
    plan = plan_replication(source, target, ReplicationPolicy())
    assert plan.backend == "btrfs"
    assert plan.steps == (
        Send("source", "incremental", name_at(1), name_at(0)),
        Receive("target", name_at(1)),
        Send("source", "incremental", name_at(2), name_at(1)),
        Receive("target", name_at(2)),
    )
    single = plan_replication(source, target, ReplicationPolicy(intermediates=False))
    assert single.steps == (
        Send("source", "incremental", name_at(2), name_at(0)),
        Receive("target", name_at(2)),
    )


def test_btrfs_reverse_direction_matches_uuid_to_received_uuid() -> None:
    # B's s2 was received from A's s2: A/s2.uuid == B/s2.received_uuid.
    b = [BtrfsSnapshot("b/s2", "b2", "a2", cgen=1), BtrfsSnapshot("b/s3", "b3", cgen=2)]
    a = [BtrfsSnapshot("a/s1", "a1", cgen=1), BtrfsSnapshot("a/s2", "a2", cgen=2)]
    plan = plan_replication(b, a, ReplicationPolicy())
    assert plan.base == "s2" and plan.steps[0] == Send("source", "incremental", "s3", "s2")


# --------------------------------------------------------------------------- failover


def test_promote_zfs() -> None:
    replica = [ZfsSnapshot("tank/r", name_at(i), i + 1, i + 1) for i in range(2)]
    plan = plan_promote(replica)
    assert plan.action is Action.PROMOTE
    assert plan.steps == (
        Rollback("target", name_at(1), ()),
        SetProperty("target", "readonly", "off"),
        Mount("target"),
    )
    assert plan_promote([], live="x").steps == (
        SetProperty("target", "readonly", "off"),
        Mount("target"),
    )


def test_promote_btrfs_uses_a_writable_snapshot() -> None:
    replica = [BtrfsSnapshot("d/s1", "t1", "u1", cgen=1), BtrfsSnapshot("d/s2", "t2", "u2", cgen=2)]
    plan = plan_promote(replica, live="app")
    assert plan.steps == (Clone("target", "s2", "app"),)
    refused = plan_promote(replica, live="app", live_exists=True)
    assert refused.refused and "aside" in refused.reason
    moved = plan_promote(replica, live="app", live_exists=True, aside="app.old")
    assert moved.steps == (Rename("target", "app", "app.old"), Clone("target", "s2", "app"))


def test_promote_btrfs_without_snapshots_is_refused() -> None:
    plan = plan_promote([], backend="btrfs")
    assert plan.refused and "replicate at least once" in plan.reason
    assert not plan_promote([]).refused  # ZFS: just made writable


def test_reverse_without_common_snapshot_is_refused() -> None:
    plan = plan_reverse(
        [BtrfsSnapshot("b/s", "b1")],
        [BtrfsSnapshot("a/t", "a9")],
        ReplicationPolicy(),
        new_snapshot="n",
        aside="x",
    )
    assert plan.refused and "no snapshot in common" in plan.reason


def reverse_world() -> tuple[World, World]:
    """A (old primary) and B (promoted replica) after a failover, as in func2.sh."""
    a = Dataset([Snap("repl-1", 1, T0), Snap("repl-2", 2, T0 + timedelta(minutes=15))])
    b = Dataset([Snap("repl-1", 1, T0), Snap("repl-2", 2, T0 + timedelta(minutes=15))])
    a.snaps.append(Snap("local-x", 50, T0 + timedelta(minutes=30)))  # divergent on A
    a.dirty = True
    b.snaps.append(Snap("repl-3", 3, T0 + timedelta(minutes=31)))  # written on B
    forward = World(b, a)  # reverse direction: B -> A
    return forward, World(a, b)


def test_reverse_zfs_keeps_divergent_data_aside() -> None:
    world, _ = reverse_world()
    plan = plan_reverse(
        world.records("source"),
        world.records("target"),
        ReplicationPolicy(),
        new_snapshot="repl-4",
        aside="app-diverged",
    )
    assert plan.action is Action.REVERSE
    assert plan.base == "repl-2"
    assert plan.kept == ("local-x", "app-diverged")
    assert plan.destroys == ()
    assert plan.steps[:6] == (
        Snapshot("source", "repl-4"),
        Snapshot("target", "app-diverged"),
        Rename("target", "", "app-diverged"),
        Clone("target", "repl-2", "", origin="app-diverged"),
        PromoteClone("target"),
        SetProperty("target", "readonly", "on"),
    )
    assert plan.steps[6] == Send("source", "incremental", "repl-4", "repl-2", True)
    assert not any(isinstance(s, Rollback | Destroy) for s in plan.steps)


def test_reverse_zfs_rollback_variant_and_refusal() -> None:
    world, _ = reverse_world()
    src, tgt = world.records("source"), world.records("target")
    keep_off = ReplicationPolicy(keep_divergent=False)
    refused = plan_reverse(src, tgt, keep_off, new_snapshot="repl-4", aside="x")
    assert refused.refused and "local-x" in refused.reason
    policy = ReplicationPolicy(keep_divergent=False, allow_rollback=True)
    plan = plan_reverse(src, tgt, policy, new_snapshot="repl-4", aside="x")
    assert Rollback("target", "repl-2", ("local-x",)) in plan.steps
    assert plan.destroys == ("local-x",)
    world.apply(plan.steps)
    assert [s.name for s in world.sides["target"].snaps] == [
        "repl-1",
        "repl-2",
        "repl-3",
        "repl-4",
    ]
    with pytest.raises(PlanError, match="already exists"):
        plan_reverse(src, tgt, policy, new_snapshot="repl-3", aside="x")


def test_reverse_clean_old_primary_needs_no_aside() -> None:
    world, _ = reverse_world()
    target = world.sides["target"]
    target.snaps.pop()
    plan = plan_reverse(
        world.records("source"),
        world.records("target"),
        ReplicationPolicy(),
        new_snapshot="repl-4",
        aside="x",
        target_modified=False,
    )
    assert plan.kept == ()
    target.dirty = False
    world.apply(plan.steps)
    assert target.snaps[-1].name == "repl-4"


def test_reverse_btrfs_moves_live_and_divergent_snapshots_aside() -> None:
    b = [
        BtrfsSnapshot("b/s1", "b1", "a1", cgen=1),
        BtrfsSnapshot("b/s2", "b2", "a2", cgen=2),
        BtrfsSnapshot("b/s3", "b3", cgen=3),
    ]
    a = [
        BtrfsSnapshot("a/s1", "a1", cgen=1),
        BtrfsSnapshot("a/s2", "a2", cgen=2),
        BtrfsSnapshot(f"a/{name_at(9)}", "a9", cgen=3),
    ]
    plan = plan_reverse(b, a, ReplicationPolicy(), new_snapshot="s4", aside="diverged", live="fo")
    assert plan.steps == (
        Snapshot("source", "s4"),
        Rename("target", "fo", "diverged"),
        Rename("target", name_at(9), f"{name_at(9)}.diverged", kind="snapshot"),
        Send("source", "incremental", "s3", "s2"),
        Receive("target", "s3"),
        Send("source", "incremental", "s4", "s3"),
        Receive("target", "s4"),
    )
    assert plan.kept == (name_at(9), "diverged")


def test_failback_zfs() -> None:
    # After reverse: A is a replica of B with the same history.
    b = [ZfsSnapshot("tank/app", f"repl-{i}", i, i) for i in range(1, 5)]
    a = [ZfsSnapshot("tank/app", f"repl-{i}", i, i + 10) for i in range(1, 5)]
    plan = plan_failback(b, a, ReplicationPolicy(), final_snapshot="repl-5")
    assert plan.action is Action.FAILBACK
    assert plan.steps == (
        SetProperty("source", "readonly", "on"),
        Snapshot("source", "repl-5"),
        Send("source", "incremental", "repl-5", "repl-4"),
        Receive("target", "repl-5"),
        Hold("source", "repl-5", "carpool"),
        Hold("target", "repl-5", "carpool"),
        SetProperty("target", "readonly", "off"),
        Mount("target"),
    )


def test_failback_refusals_and_btrfs() -> None:
    b = [BtrfsSnapshot("b/s3", "b3", "a3", cgen=3)]
    a = [BtrfsSnapshot("a/s3", "a3", cgen=3), BtrfsSnapshot("a/x", "ax", cgen=4)]
    refused = plan_failback(b, a, ReplicationPolicy(), final_snapshot="s4")
    assert refused.refused and "reverse" in refused.reason
    plan = plan_failback(
        b, a[:1], ReplicationPolicy(), final_snapshot="s4", live="fo", live_exists=True, aside="o"
    )
    assert plan.steps == (
        SetProperty("source", "ro", "true", dataset="fo"),
        Snapshot("source", "s4"),
        Send("source", "incremental", "s4", "s3"),
        Receive("target", "s4"),
        Rename("target", "fo", "o"),
        Clone("target", "s4", "fo"),
    )
    unrelated = plan_failback(
        b, [BtrfsSnapshot("a/q", "q")], ReplicationPolicy(), final_snapshot="z"
    )
    assert unrelated.refused and "reverse" in unrelated.reason


def test_promote_reverse_failback_round_trip_in_the_model() -> None:
    names = [name_at(i) for i in range(3)]
    primary = zfs_world(names, [])
    policy = ReplicationPolicy(source_retention=NO_RETENTION, target_retention=NO_RETENTION)
    replicate(primary, policy)
    replicate(primary, policy)
    a, b = primary.sides["source"], primary.sides["target"]
    assert [s.name for s in b.snaps] == [names[2]]
    # failover: B promoted, A writes on
    b_world = World(b, a)
    b_world.apply(plan_promote(b_world.records("source")).steps)
    a.dirty = True
    b_world.step(Snapshot("source", "b-1"))
    plan = plan_reverse(
        b_world.records("source"),
        b_world.records("target"),
        policy,
        new_snapshot="b-2",
        aside="diverged",
    )
    b_world.apply(plan.steps)
    assert a.snaps[-1].name == "b-2"
    assert [s.name for s in a.aside] == ["diverged"]  # A's writes, kept aside
    back = plan_failback(
        b_world.records("source"), b_world.records("target"), policy, final_snapshot="b-3"
    )
    b_world.apply(back.steps)
    assert a.snaps[-1].origin == b.snaps[-1].origin
    assert a.props["readonly"] == "off" and b.props["readonly"] == "on"


# --------------------------------------------------------------------------- properties


@st.composite
def scenarios(draw: st.DrawFn) -> tuple[World, ReplicationPolicy, bool | None, bool]:
    backend = draw(st.sampled_from(["zfs", "btrfs"]))
    common = draw(st.integers(0, 6))
    extra = draw(st.integers(0, 4))
    total = common + extra
    names = [name_at(i) if draw(st.integers(0, 5)) else f"manual-{i}" for i in range(total)]
    source = Dataset([Snap(n, i + 1, T0 + timedelta(minutes=15 * i)) for i, n in enumerate(names)])
    target = Dataset([Snap(s.name, s.origin, s.when) for s in source.snaps[:common]])
    # the target may have lost some of the common snapshots (pruned there)
    target.snaps = [s for s in target.snaps if draw(st.integers(0, 3))]
    # and gained divergent ones
    for j in range(draw(st.integers(0, 2))):
        target.snaps.append(Snap(f"local-{j}", 500 + j, T0 + timedelta(minutes=15 * total + j)))
    # the source may have pruned some (bookmarks kept for some of those)
    kept: list[Snap] = []
    for snap in source.snaps:
        if draw(st.integers(0, 4)) or snap is source.snaps[-1]:
            kept.append(snap)
        elif backend == "zfs" and draw(st.booleans()):
            source.bookmarks.append(Snap(snap.name, snap.origin, snap.when))
    source.snaps = kept
    for snap in [*source.snaps, *target.snaps]:
        if backend == "zfs" and draw(st.integers(0, 9)) == 0:
            snap.holds.add("someone")  # btrfs has no holds
    target.dirty = draw(st.booleans())
    tell = draw(st.sampled_from([None, target.dirty]))
    policy = ReplicationPolicy(
        intermediates=draw(st.booleans()),
        allow_rollback=draw(st.booleans()),
        allow_destroy_target=draw(st.booleans()),
        use_bookmarks=backend == "zfs" and draw(st.booleans()),
        hold_tag=draw(st.sampled_from([None, "carpool"])) if backend == "zfs" else None,
        source_retention=RetentionPolicy(keep_last=draw(st.integers(0, 4))),
        target_retention=RetentionPolicy(keep_last=draw(st.integers(0, 4))),
    )
    world = World(source, target, backend)
    return world, policy, tell, target.dirty


def destroyed_on_target(plan: Plan) -> list[str]:
    names: list[str] = []
    for step in plan.steps:
        if isinstance(step, Rollback) and step.side == "target":
            names += step.destroys
        if isinstance(step, Destroy) and step.side == "target":
            names.append(step.snapshot)
    return names


@given(scenarios())
@settings(max_examples=400, deadline=None)
def test_planner_properties(scenario: tuple[World, ReplicationPolicy, bool | None, bool]) -> None:
    world, policy, tell, dirty = scenario
    source_before = world.records("source")
    target_before = world.records("target")
    target_names = {s.name for s in world.sides["target"].snaps}
    held_target = {s.name for s in world.sides["target"].snaps if s.holds}
    held_source = {s.name for s in world.sides["source"].snaps if s.holds}
    plan = plan_replication(
        source_before, target_before, policy, now=world.clock, target_modified=tell
    )

    event(f"{world.backend} {plan.action.value}")
    # A plan destroys a target snapshot only when the policy allows it and it is listed.
    destroyed = destroyed_on_target(plan)
    for name in destroyed:
        assert name in plan.destroys or name in plan.prune_target
    if plan.destroys:
        assert plan.refused or policy.allow_rollback or policy.allow_destroy_target
    assert not set(plan.destroys) - target_names
    if plan.refused:
        assert plan.steps == ()
        return
    # Retention never touches held snapshots or the newest.
    assert not set(plan.prune_source) & held_source
    assert not set(plan.prune_target) & held_target
    assert plan.newest not in plan.prune_source + plan.prune_target
    # Incremental bases are common snapshots (first send) or snapshots received just before.
    origin_on_target = {s.origin for s in world.sides["target"].snaps}
    sends = [s for s in plan.steps if isinstance(s, Send)]
    received: set[str] = set()
    for send in sends:
        if send.kind == "incremental":
            assert send.base is not None
            if send.base not in received:
                pool = (
                    world.sides["source"].bookmarks
                    if send.base_is_bookmark
                    else world.sides["source"].snaps
                )
                base = next(s for s in pool if s.name == send.base)
                assert base.origin in origin_on_target
        received.add(send.snapshot)

    try:
        world.apply(plan.steps)
    except SimError as exc:
        # Only an unannounced modification may stop a plan; the caller re-plans knowing it.
        assert tell is None and dirty and "modified" in str(exc), exc
        plan = replicate(world, policy, modified=True)
        if plan.refused:
            assert not policy.allow_rollback
            return
    # Both sides agree on the newest snapshot.
    assert world.sides["target"].snaps[-1].origin == world.sides["source"].snaps[-1].origin
    # Planning again converges: at most one more round of pruning (released holds).
    replicate(world, policy)
    third = replicate(world, policy)
    assert third.action is Action.NOTHING and third.steps == ()


@st.composite
def failovers(draw: st.DrawFn) -> tuple[World, ReplicationPolicy, bool]:
    """B (promoted replica, the new source) and A (old primary, the new target)."""
    backend = draw(st.sampled_from(["zfs", "btrfs"]))
    shared = draw(st.integers(1, 5))
    history = [Snap(name_at(i), i + 1, T0 + timedelta(minutes=15 * i)) for i in range(shared)]
    a = Dataset([Snap(s.name, s.origin, s.when) for s in history])
    b = Dataset([Snap(s.name, s.origin, s.when) for s in history])
    # A may have lost B's newest snapshot (replication lag): B got one more before failover
    if draw(st.booleans()):
        b.snaps.append(Snap(name_at(shared), 99, T0 + timedelta(minutes=15 * shared)))
    for j in range(draw(st.integers(0, 3))):
        a.snaps.append(Snap(f"a-{j}", 200 + j, T0 + timedelta(hours=5, minutes=j)))
    for j in range(draw(st.integers(0, 3))):
        b.snaps.append(Snap(f"b-{j}", 300 + j, T0 + timedelta(hours=6, minutes=j)))
    a.dirty = draw(st.booleans())
    policy = ReplicationPolicy(
        intermediates=draw(st.booleans()),
        keep_divergent=draw(st.booleans()),
        allow_rollback=draw(st.booleans()),
        hold_tag=None if backend == "btrfs" else "carpool",
    )
    return World(b, a, backend), policy, a.dirty


@given(failovers())
@settings(max_examples=200, deadline=None)
def test_reverse_then_failback_properties(scenario: tuple[World, ReplicationPolicy, bool]) -> None:
    world, policy, dirty = scenario
    a, b = world.sides["target"], world.sides["source"]
    a_before = [s.name for s in a.snaps]
    plan = plan_reverse(
        world.records("source"),
        world.records("target"),
        policy,
        new_snapshot="rev",
        aside="diverged",
        target_modified=dirty,
    )
    event(f"{world.backend} reverse {plan.action.value}")
    destroyed = destroyed_on_target(plan)
    assert set(destroyed) <= set(plan.destroys)
    if destroyed:
        assert policy.allow_rollback and not policy.keep_divergent
    if plan.refused:
        assert plan.steps == ()
        return
    world.apply(plan.steps)
    assert a.snaps[-1].origin == b.snaps[-1].origin and b.snaps[-1].name == "rev"
    # nothing of A's is lost unless the policy said so and the plan listed it
    kept_names = (
        {s.name for s in a.snaps}
        | {s.name for s in a.aside}
        | {n.removesuffix(".diverged") for n in (s.name for s in a.snaps)}
    )
    lost = set(a_before) - kept_names
    assert lost <= set(plan.destroys)
    if world.backend == "zfs":
        assert a.props["readonly"] == "on"
    # fail back: A becomes primary again with B's final state
    back = plan_failback(
        world.records("source"), world.records("target"), policy, final_snapshot="final"
    )
    assert not back.refused, back.reason
    world.apply(back.steps)
    assert a.snaps[-1].name == "final" and a.snaps[-1].origin == b.snaps[-1].origin


# --------------------------------------------------------------------------- reused names


def test_a_name_reused_after_pruning_is_refused_not_sent() -> None:
    """The source pruned a name and reused it within the same second; the target kept the old."""
    reused, base = "autorep-20260409-120000", "autorep-20260409-120000-1"
    source = [
        ZfsSnapshot("p/a", base, guid=2, createtxg=2),
        ZfsSnapshot("p/a", reused, guid=3, createtxg=3),
    ]
    target = [
        ZfsSnapshot("q/a", reused, guid=1, createtxg=1),
        ZfsSnapshot("q/a", base, guid=2, createtxg=2),
    ]
    plan = plan_replication(source, target, ReplicationPolicy(), now=T0 + timedelta(hours=1))
    assert plan.refused
    assert reused in plan.reason and "reused" in plan.reason and not plan.steps


def test_reverse_and_failback_refuse_a_name_the_peer_has() -> None:
    source = [ZfsSnapshot("p/a", name_at(0), guid=1, createtxg=1)]
    target = [
        ZfsSnapshot("q/a", name_at(0), guid=1, createtxg=1),
        ZfsSnapshot("q/a", name_at(1), guid=7, createtxg=2),
    ]
    with pytest.raises(PlanError, match="unique on both sides"):
        plan_reverse(source, target, ReplicationPolicy(), new_snapshot=name_at(1), aside="x")
    with pytest.raises(PlanError, match="unique on both sides"):
        plan_failback(source, target, ReplicationPolicy(), final_snapshot=name_at(1))


def test_another_tools_snapshot_as_base_releases_our_previous_holds() -> None:
    """syncoid replicated after us: the cycle starts from its snapshot and still moves our hold."""
    world = zfs_world([name_at(0)])
    policy = ReplicationPolicy(source_retention=NO_RETENTION, target_retention=NO_RETENTION)
    replicate(world, policy)
    assert [s.holds for d in world.sides.values() for s in d.snaps] == [{"carpool"}] * 2
    # syncoid: its own snapshot, sent -I from the common one, no holds
    world.apply(
        (
            Snapshot("source", "syncoid_host_2026-11-26:12:00:00"),
            Send("source", "incremental", "syncoid_host_2026-11-26:12:00:00", name_at(0), True),
            Receive("target", "syncoid_host_2026-11-26:12:00:00"),
        )
    )
    world.apply((Snapshot("source", name_at(5)),))
    plan = replicate(world, policy)
    assert plan.action is Action.INCREMENTAL
    assert plan.base == "syncoid_host_2026-11-26:12:00:00"
    assert Release("target", name_at(0), "carpool") in plan.steps
    assert Release("source", name_at(0), "carpool") in plan.steps
    for side in ("source", "target"):
        held = [s.name for s in world.sides[side].snaps if s.holds]
        assert held == [name_at(5)], (side, world)
