"""The replication planner: what to send, what to roll back, what to prune.

This module owns every replication decision and is pure: it takes both
sides' snapshot lists (records from :mod:`carpool.replicate.snapshots`) and a
:class:`ReplicationPolicy`, and returns a :class:`Plan` whose ``steps`` the
executor runs one by one, stopping at the first failure. It never runs a
command, reads the clock or touches a pool.

Rules (the "safety beyond the seed's script" of issue 6):

* Snapshots are matched by identity, never by name: ZFS by ``guid``; btrfs by
  ``uuid``/``received_uuid`` (a received snapshot's ``received_uuid`` is the
  sender's ``uuid``; in the reverse direction the roles swap).
* No blind ``recv -F``: an incremental is received without force after an
  explicit :class:`Rollback` that names every snapshot it destroys, and only
  when ``policy.allow_rollback``; a full send over a target with no common
  snapshot needs ``policy.allow_destroy_target`` and lists what goes.
* Pruning (retention) never removes the new common base, a held snapshot or
  a protected name; it runs only after the transfer steps succeeded.

Names in steps: ``snapshot`` fields are short snapshot names (``autorep-...``,
without ``dataset@``); ``side`` says on which end the step runs. Dataset
fields are ``""`` for the side's job dataset (ZFS) / live subvolume (btrfs),
or the name of a sibling of it (same parent). The executor maps them to
``pool/fs@name`` or a path in the snapshot directory.

A :class:`Send` is always immediately followed by its :class:`Receive`; the
executor pipes the one into the other.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import Literal

from carpool.errors import CarpoolError
from carpool.replicate.retention import RetentionPolicy, plan_retention
from carpool.replicate.snapshots import BtrfsSnapshot, ZfsSnapshot, parse_snapshot_name

__all__ = [
    "Action",
    "Bookmark",
    "Clone",
    "Destroy",
    "Hold",
    "Mount",
    "Plan",
    "PlanError",
    "PromoteClone",
    "Receive",
    "Release",
    "Rename",
    "ReplicationPolicy",
    "ReplicationRefused",
    "Rollback",
    "Send",
    "SetProperty",
    "Side",
    "Snapshot",
    "Step",
    "plan_failback",
    "plan_promote",
    "plan_replication",
    "plan_reverse",
]

Side = Literal["source", "target"]
Backend = Literal["zfs", "btrfs"]
AnySnapshot = ZfsSnapshot | BtrfsSnapshot


class PlanError(CarpoolError):
    """The planner's input cannot be planned on (mixed backends, missing guid...)."""


class ReplicationRefused(CarpoolError):
    """A plan refused by policy; the message says why and which setting would allow it."""


# --------------------------------------------------------------------------- steps


@dataclass(frozen=True)
class Snapshot:
    """Take snapshot ``name`` of the side's dataset (btrfs: read-only snapshot of live)."""

    side: Side
    name: str


@dataclass(frozen=True)
class Send:
    """Send ``snapshot``: full, or incremental from ``base``.

    ZFS: ``zfs send [-i|-I base] snapshot`` (``-I`` when ``intermediates``;
    ``base`` is a bookmark ``#base`` when ``base_is_bookmark``). btrfs:
    ``btrfs send [-p base] snapshot`` (never ``intermediates``: the planner
    chains one send per snapshot instead).
    """

    side: Side
    kind: Literal["full", "incremental"]
    snapshot: str
    base: str | None = None
    intermediates: bool = False
    base_is_bookmark: bool = False


@dataclass(frozen=True)
class Receive:
    """Receive the stream of the preceding :class:`Send` (ZFS: ``zfs recv -u``).

    ``force`` (``recv -F``) is only ever set for a full send over a target
    whose snapshots the plan destroyed first (``allow_destroy_target``).
    ``snapshot`` is the newest snapshot the stream creates.
    """

    side: Side
    snapshot: str
    force: bool = False


@dataclass(frozen=True)
class Rollback:
    """Roll the side's dataset back to ``to``, destroying exactly ``destroys`` (newest first).

    ZFS: ``zfs rollback -r dataset@to``; the executor must check that the
    snapshots ``-r`` removes are exactly ``destroys``. btrfs has no rollback:
    the executor deletes the ``destroys`` subvolumes.
    """

    side: Side
    to: str
    destroys: tuple[str, ...] = ()


@dataclass(frozen=True)
class Destroy:
    """Destroy one snapshot (ZFS ``zfs destroy ds@snap``; btrfs ``subvolume delete``)."""

    side: Side
    snapshot: str


@dataclass(frozen=True)
class Hold:
    """``zfs hold tag ds@snapshot``: the snapshot cannot be destroyed until released."""

    side: Side
    snapshot: str
    tag: str


@dataclass(frozen=True)
class Release:
    """``zfs release tag ds@snapshot``; with ``missing_ok`` a missing hold is not an error."""

    side: Side
    snapshot: str
    tag: str
    missing_ok: bool = True


@dataclass(frozen=True)
class Bookmark:
    """``zfs bookmark ds@snapshot ds#bookmark`` (OpenZFS only; not on zfs-fuse)."""

    side: Side
    snapshot: str
    bookmark: str


@dataclass(frozen=True)
class SetProperty:
    """Set a property on a dataset (``zfs set readonly=on``; btrfs ``property set ro``)."""

    side: Side
    name: str
    value: str
    dataset: str = ""


@dataclass(frozen=True)
class Mount:
    """Mount the side's dataset (``zfs mount``)."""

    side: Side
    dataset: str = ""


@dataclass(frozen=True)
class Clone:
    """A writable copy of ``snapshot`` named ``clone``.

    ZFS: ``zfs clone origin@snapshot clone`` where ``origin`` is the dataset
    holding the snapshot. btrfs: ``btrfs subvolume snapshot SNAPDIR/snapshot
    clone`` (writable), which is how a received snapshot becomes live.
    """

    side: Side
    snapshot: str
    clone: str
    origin: str = ""


@dataclass(frozen=True)
class PromoteClone:
    """``zfs promote dataset``: the clone takes over its origin's older snapshots."""

    side: Side
    dataset: str = ""


@dataclass(frozen=True)
class Rename:
    """Rename a dataset/live subvolume (``kind="dataset"``) or a snapshot (``"snapshot"``)."""

    side: Side
    old: str
    new: str
    kind: Literal["dataset", "snapshot"] = "dataset"


Step = (
    Snapshot
    | Send
    | Receive
    | Rollback
    | Destroy
    | Hold
    | Release
    | Bookmark
    | SetProperty
    | Mount
    | Clone
    | PromoteClone
    | Rename
)


# --------------------------------------------------------------------------- policy, plan


@dataclass(frozen=True)
class ReplicationPolicy:
    """What a job allows the planner to do.

    ``protected`` names are never pruned on either side (e.g. the bases of
    other targets of the same source). ``hold_tag`` holds the common base on
    both ZFS sides (None: no holds, e.g. when a release would be refused).
    ``keep_divergent`` makes :func:`plan_reverse` keep the old primary's
    divergent data aside instead of rolling it back.
    """

    prefix: str = "autorep"
    intermediates: bool = True
    allow_rollback: bool = False
    allow_destroy_target: bool = False
    use_bookmarks: bool = False
    hold_tag: str | None = "carpool"
    readonly_target: bool = True
    keep_divergent: bool = True
    source_retention: RetentionPolicy = field(default_factory=RetentionPolicy)
    target_retention: RetentionPolicy = field(default_factory=RetentionPolicy)
    protected: frozenset[str] = frozenset()


class Action(StrEnum):
    NOTHING = "nothing"
    FULL = "full"
    INCREMENTAL = "incremental"
    REFUSE = "refuse"
    PROMOTE = "promote"
    REVERSE = "reverse"
    FAILBACK = "failback"


@dataclass(frozen=True)
class Plan:
    """A planner's decision.

    ``base`` is the common snapshot an incremental starts from (its name on
    the target), ``newest`` the snapshot that ends newest on the target,
    ``destroys`` every target snapshot the transfer steps destroy, ``kept``
    the divergent snapshots a reverse keeps aside, ``prune_*`` what the
    retention steps at the end destroy.
    """

    action: Action
    reason: str
    backend: Backend = "zfs"
    steps: tuple[Step, ...] = ()
    base: str | None = None
    newest: str | None = None
    destroys: tuple[str, ...] = ()
    kept: tuple[str, ...] = ()
    prune_source: tuple[str, ...] = ()
    prune_target: tuple[str, ...] = ()

    @property
    def refused(self) -> bool:
        return self.action is Action.REFUSE

    def require(self) -> Plan:
        """The plan itself; ReplicationRefused with the reason when it was refused."""
        if self.refused:
            raise ReplicationRefused(self.reason)
        return self


# --------------------------------------------------------------------------- normalizing


@dataclass(frozen=True)
class _Point:
    name: str
    keys: frozenset[str]
    time: datetime | None
    held: bool
    bookmark: bool


def _backend(*lists: Sequence[AnySnapshot]) -> Backend:
    kinds = {type(s) for snaps in lists for s in snaps}
    if kinds == {BtrfsSnapshot}:
        return "btrfs"
    if kinds <= {ZfsSnapshot}:
        return "zfs"
    raise PlanError("snapshot lists mix ZFS and btrfs records; plan one backend at a time")


def _points(snaps: Sequence[AnySnapshot], side: str) -> list[_Point]:
    indexed = list(enumerate(snaps))
    if all(isinstance(s, ZfsSnapshot) for s in snaps):
        datasets = {s.dataset for s in snaps if isinstance(s, ZfsSnapshot)}
        if len(datasets) > 1:
            raise PlanError(
                f"the {side} list holds snapshots of several datasets "
                f"({', '.join(sorted(datasets))}); list one dataset (zfs list -d 1)"
            )

    def txg(snap: AnySnapshot) -> int | None:
        return snap.createtxg if isinstance(snap, ZfsSnapshot) else snap.cgen

    if all(txg(s) is not None for s in snaps):
        indexed.sort(key=lambda item: (txg(item[1]) or 0, item[0]))
    points: list[_Point] = []
    seen: set[str] = set()
    for _, snap in indexed:
        if isinstance(snap, ZfsSnapshot):
            if snap.guid is None:
                raise PlanError(
                    f"the guid of {side} snapshot {snap.full_name} is unknown; read it with "
                    "'zfs get -H -p -o name,property,value guid' (zfs-fuse has no 'zfs list -p')"
                )
            keys = frozenset({f"guid:{snap.guid}"})
            point = _Point(snap.name, keys, snap.creation, snap.held, snap.bookmark)
        else:
            ids = {u for u in (snap.uuid, snap.received_uuid) if u}
            if not ids:
                raise PlanError(
                    f"{side} subvolume {snap.path} has no uuid; list with "
                    "'btrfs subvolume list -u -R' or use 'btrfs subvolume show'"
                )
            keys = frozenset(f"uuid:{u}" for u in ids)
            point = _Point(snap.name, keys, snap.otime, False, False)
        tag = ("#" if point.bookmark else "@") + point.name
        if tag in seen:
            raise PlanError(f"{side} snapshot {point.name!r} is listed twice")
        seen.add(tag)
        points.append(point)
    return points


# --------------------------------------------------------------------------- transfer core


@dataclass(frozen=True)
class _Common:
    target_index: int
    source: _Point


def _find_common(src: Sequence[_Point], tgt: Sequence[_Point]) -> _Common | None:
    """The newest target snapshot that the source has (snapshot preferred to bookmark)."""
    by_key: dict[str, _Point] = {}
    for point in src:
        for key in point.keys:
            if key not in by_key or (by_key[key].bookmark and not point.bookmark):
                by_key[key] = point
    for index in range(len(tgt) - 1, -1, -1):
        for key in sorted(tgt[index].keys):
            if key in by_key:
                return _Common(index, by_key[key])
    return None


def _sends(
    backend: Backend,
    src: Sequence[_Point],
    base: _Point | None,
    newest: str,
    intermediates: bool,
) -> tuple[list[Step], list[str]]:
    """Send/Receive pairs from ``base`` (None: full) to ``newest``, and the names received."""
    snaps = [p for p in src if not p.bookmark]
    names = [p.name for p in snaps]
    if base is None:
        return [Send("source", "full", newest), Receive("target", newest)], [newest]
    # source snapshots after the base, up to and including ``newest``
    after = [
        p.name
        for p in snaps
        if src.index(base) < src.index(p) <= src.index(snaps[names.index(newest)])
    ]
    if not after:
        return [], []
    steps: list[Step] = []
    received: list[str] = []
    if backend == "btrfs":
        chain = after if intermediates else [newest]
        previous = base.name
        for name in chain:
            steps += [Send("source", "incremental", name, previous), Receive("target", name)]
            previous = name
        return steps, chain
    if base.bookmark:
        first = after[0] if intermediates else newest
        steps += [
            Send("source", "incremental", first, base.name, base_is_bookmark=True),
            Receive("target", first),
        ]
        received.append(first)
        if first != newest:
            steps += [
                Send("source", "incremental", newest, first, intermediates=True),
                Receive("target", newest),
            ]
            received += after[1:]
        return steps, received
    use_i = intermediates and len(after) > 1
    steps += [
        Send("source", "incremental", newest, base.name, intermediates=use_i),
        Receive("target", newest),
    ]
    return steps, (after if use_i else [newest])


def _managed(prefix: str, points: Sequence[_Point]) -> list[tuple[str, datetime | None]]:
    result: list[tuple[str, datetime | None]] = []
    for p in points:
        if p.bookmark:
            continue
        stamp = parse_snapshot_name(prefix, p.name)
        if stamp is None:
            continue
        result.append((p.name, p.time if p.time is not None else stamp))
    return result


def _prune(
    points: Sequence[_Point],
    now: datetime,
    policy: ReplicationPolicy,
    retention: RetentionPolicy,
    keep: set[str],
) -> tuple[str, ...]:
    managed = _managed(policy.prefix, points)
    protected = set(policy.protected) | keep | {p.name for p in points if p.held}
    decision = plan_retention(managed, now, retention, protected)
    return tuple(name for name, _ in managed if name in decision.prune)


def _stale_holds(
    src: Sequence[_Point], tgt: Sequence[_Point], base: _Point
) -> list[tuple[Side, str]]:
    """Held target snapshots older than or equal to ``base`` (other than it), and their sources.

    Each cycle holds its new base on both sides and releases the previous
    one. When another tool (syncoid) replicated in between, the previous base
    is no longer the common snapshot this cycle starts from, so its holds
    would stay forever; they are released here (``missing_ok``: a hold with
    another tag is left alone).
    """
    stale: list[tuple[Side, str]] = []
    for point in tgt[: tgt.index(base) + 1]:
        if not point.held or point is base:
            continue
        stale.append(("target", point.name))
        stale += [
            ("source", p.name) for p in src if p.held and not p.bookmark and p.keys & point.keys
        ]
    return stale


def _post_steps(
    backend: Backend,
    policy: ReplicationPolicy,
    newest: str,
    old_source_base: _Point | None,
    old_target_base: str | None,
    stale: Sequence[tuple[Side, str]] = (),
) -> list[Step]:
    if backend != "zfs":
        return []
    steps: list[Step] = []
    if policy.readonly_target:
        steps.append(SetProperty("target", "readonly", "on"))
    if policy.hold_tag:
        tag = policy.hold_tag
        steps += [Hold("source", newest, tag), Hold("target", newest, tag)]
        if (
            old_source_base is not None
            and not old_source_base.bookmark
            and old_source_base.name != newest
        ):
            steps.append(Release("source", old_source_base.name, tag))
        if old_target_base is not None and old_target_base != newest:
            steps.append(Release("target", old_target_base, tag))
        for side, name in stale:
            release = Release(side, name, tag)
            if name != newest and release not in steps:
                steps.append(release)
    if policy.use_bookmarks:
        steps.append(Bookmark("source", newest, newest))
    return steps


def _names(points: Sequence[_Point]) -> list[str]:
    return [p.name for p in points if not p.bookmark]


def _listing(names: Sequence[str], limit: int = 10) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _held_refusal(
    points: Sequence[_Point], doomed: Sequence[str], backend: Backend, base: str | None
) -> Plan | None:
    """A refusal when a snapshot the plan would destroy carries a hold, else None."""
    held = [p.name for p in points if p.held and p.name in doomed]
    if not held:
        return None
    return Plan(
        Action.REFUSE,
        f"target snapshot(s) {_listing(held)} would be destroyed but are held (zfs hold); "
        "nothing was destroyed. Release the holds (zfs release TAG SNAPSHOT) if they may go",
        backend,
        base=base,
        destroys=tuple(doomed),
    )


# --------------------------------------------------------------------------- replication


def plan_replication(
    source: Sequence[AnySnapshot],
    target: Sequence[AnySnapshot],
    policy: ReplicationPolicy,
    *,
    now: datetime | None = None,
    target_modified: bool | None = None,
) -> Plan:
    """One replication cycle from ``source`` to ``target`` (both oldest first).

    Decides nothing-to-do / full send of the newest source snapshot (target
    empty) / incremental from the newest common snapshot / refusal, then the
    holds and, when ``now`` is given, the retention pruning of both sides.
    ``target_modified`` is whether the target changed since its newest
    snapshot (ZFS ``written``; None = unknown: the receive will tell, and the
    caller plans again with True). Take the new source snapshot first
    (:class:`Snapshot` step, name from ``unique_snapshot_name``), list, then plan.
    """
    backend = _backend(source, target)
    src = _points(source, "source")
    if not policy.use_bookmarks:
        src = [p for p in src if not p.bookmark]
    tgt = [p for p in _points(target, "target") if not p.bookmark]
    snaps = [p for p in src if not p.bookmark]
    if not snaps:
        return Plan(
            Action.REFUSE,
            "the source has no snapshot to send; take one first",
            backend,
        )
    newest = snaps[-1]
    steps: list[Step] = []

    if not tgt:
        steps, _ = _sends(backend, src, None, newest.name, policy.intermediates)
        return _finish(
            Action.FULL,
            f"the target is empty: full send of {newest.name}",
            backend,
            policy,
            steps,
            src,
            [newest.name],
            now,
            base=None,
            newest=newest.name,
            old_source_base=None,
            old_target_base=None,
        )

    common = _find_common(src, tgt)
    target_names = _names(tgt)
    if common is None:
        hint = ""
        pruned = [n for n in target_names if parse_snapshot_name(policy.prefix, n) is not None]
        if pruned:
            hint = (
                f" (the target's newest {policy.prefix} snapshot {pruned[-1]} is gone from the"
                " source: was the base pruned? hold it, or use bookmarks where supported)"
            )
        if not policy.allow_destroy_target:
            return Plan(
                Action.REFUSE,
                f"the target has {len(target_names)} snapshot(s) but none in common with the "
                f"source{hint}; a full send would destroy {_listing(target_names[::-1])}: "
                "point the job at an empty target, or set allow_destroy_target = true to "
                "overwrite it",
                backend,
                destroys=tuple(reversed(target_names)),
            )
        destroyed = tuple(reversed(target_names))
        refusal = _held_refusal(tgt, destroyed, backend, None)
        if refusal is not None:
            return refusal
        steps = [Destroy("target", name) for name in destroyed]
        send_steps, _ = _sends(backend, src, None, newest.name, policy.intermediates)
        send_steps[1] = Receive("target", newest.name, force=backend == "zfs")
        steps += send_steps
        return _finish(
            Action.FULL,
            f"no snapshot in common: destroying {len(destroyed)} target snapshot(s) "
            f"(allow_destroy_target) and sending {newest.name} in full",
            backend,
            policy,
            steps,
            src,
            [newest.name],
            now,
            base=None,
            newest=newest.name,
            old_source_base=None,
            old_target_base=None,
            destroys=destroyed,
        )

    base_t = tgt[common.target_index]
    base_s = common.source
    diverged = target_names[common.target_index + 1 :]
    nothing_new = src.index(base_s) >= src.index(newest)
    if diverged or (target_modified and not nothing_new):
        what = (
            f"snapshot(s) newer than the common snapshot {base_t.name}: {_listing(diverged[::-1])}"
            if diverged
            else f"changes written since its newest snapshot {base_t.name}"
        )
        if not policy.allow_rollback:
            return Plan(
                Action.REFUSE,
                f"the target has diverged: it has {what}; nothing was destroyed. Roll it back "
                "by hand, or set allow_rollback = true to let replication destroy them",
                backend,
                base=base_t.name,
                destroys=tuple(reversed(diverged)),
            )
        refusal = _held_refusal(tgt, diverged[::-1], backend, base_t.name)
        if refusal is not None:
            return refusal
        steps.append(Rollback("target", base_t.name, tuple(reversed(diverged))))
    if nothing_new:
        kept = [*target_names[: common.target_index + 1]]
        return _finish(
            Action.NOTHING,
            f"the target is up to date with {base_t.name}"
            + (f"; rolled back past {len(diverged)} snapshot(s)" if diverged else ""),
            backend,
            policy,
            steps,
            src,
            kept,
            now,
            base=base_t.name,
            newest=base_t.name,
            old_source_base=None,
            old_target_base=None,
            destroys=tuple(reversed(diverged)),
            transfer=False,
            target_points=tgt,
            keep_keys=base_t.keys,
        )
    send_steps, received = _sends(backend, src, base_s, newest.name, policy.intermediates)
    kept_names = set(target_names[: common.target_index + 1])
    clash = [name for name in received if name in kept_names]
    if clash:
        return Plan(
            Action.REFUSE,
            f"the target already has a different snapshot named {_listing(clash)} (other "
            f"{'guid' if backend == 'zfs' else 'uuid'}): a snapshot name was reused after "
            "pruning; nothing was sent. Rename the source snapshot, or destroy the target's "
            "old one if it may go, then run again",
            backend,
            base=base_t.name,
        )
    steps += send_steps
    after = [*target_names[: common.target_index + 1], *received]
    return _finish(
        Action.INCREMENTAL,
        f"incremental from {base_t.name} to {newest.name}"
        + (f" carrying {len(received) - 1} intermediate snapshot(s)" if len(received) > 1 else "")
        + (f" after rolling back {len(diverged)} target snapshot(s)" if diverged else ""),
        backend,
        policy,
        steps,
        src,
        after,
        now,
        base=base_t.name,
        newest=newest.name,
        old_source_base=base_s,
        old_target_base=base_t.name,
        destroys=tuple(reversed(diverged)),
        target_points=tgt,
        stale_holds=_stale_holds(src, tgt, base_t),
    )


def _finish(
    action: Action,
    reason: str,
    backend: Backend,
    policy: ReplicationPolicy,
    steps: list[Step],
    src: Sequence[_Point],
    target_after: Sequence[str],
    now: datetime | None,
    *,
    base: str | None,
    newest: str,
    old_source_base: _Point | None,
    old_target_base: str | None,
    destroys: tuple[str, ...] = (),
    transfer: bool = True,
    target_points: Sequence[_Point] = (),
    keep_keys: frozenset[str] = frozenset(),
    stale_holds: Sequence[tuple[Side, str]] = (),
) -> Plan:
    if transfer:
        steps = steps + _post_steps(
            backend, policy, newest, old_source_base, old_target_base, stale_holds
        )
    prune_source: tuple[str, ...] = ()
    prune_target: tuple[str, ...] = ()
    if now is not None:
        source_keep = {newest} | ({old_source_base.name} if old_source_base else set())
        if not transfer:
            source_keep = {newest} | {p.name for p in src if p.keys & keep_keys}
        prune_source = _prune(
            [p for p in src if not p.bookmark], now, policy, policy.source_retention, source_keep
        )
        times = {p.name: p.time for p in src if not p.bookmark}
        times.update({p.name: p.time for p in target_points if p.time is not None})
        held = {p.name for p in target_points if p.held}
        after = [
            _Point(name, frozenset(), times.get(name), name in held, False) for name in target_after
        ]
        prune_target = _prune(after, now, policy, policy.target_retention, {newest})
        steps = steps + [Destroy("source", n) for n in prune_source]
        steps = steps + [Destroy("target", n) for n in prune_target]
    return Plan(
        action,
        reason,
        backend,
        tuple(steps),
        base=base,
        newest=newest,
        destroys=destroys,
        prune_source=prune_source,
        prune_target=prune_target,
    )


# --------------------------------------------------------------------------- failover


def plan_promote(
    replica: Sequence[AnySnapshot],
    *,
    live: str = "live",
    live_exists: bool = False,
    aside: str | None = None,
    backend: Backend | None = None,
) -> Plan:
    """Make the replica (the job's target side) writable: the seed's failover.

    ZFS: roll back to the newest received snapshot (discarding nothing but
    partial state; it destroys no snapshot), ``readonly=off``, mount. btrfs:
    a received snapshot must not be flipped read-write (its received_uuid
    would lie), so a writable snapshot of the newest one becomes ``live``; an
    existing ``live`` is renamed to ``aside`` first. ``backend`` is only
    needed when ``replica`` is empty (it is otherwise read from the records).
    """
    if backend is None or replica:
        backend = _backend(replica)
    points = [p for p in _points(replica, "replica") if not p.bookmark]
    if backend == "zfs":
        steps: list[Step] = []
        if points:
            steps.append(Rollback("target", points[-1].name, ()))
        steps += [SetProperty("target", "readonly", "off"), Mount("target")]
        newest = points[-1].name if points else None
        return Plan(
            Action.PROMOTE,
            "replica made writable"
            + (f" at {newest}" if newest else " (it has no snapshot to roll back to)"),
            backend,
            tuple(steps),
            newest=newest,
        )
    if not points:
        return Plan(
            Action.REFUSE,
            "the btrfs replica has no received snapshot to promote; replicate at least once first",
            backend,
        )
    steps = []
    if live_exists:
        if not aside:
            return Plan(
                Action.REFUSE,
                f"the replica already has a live subvolume {live!r}; give a name to move it "
                "aside to",
                backend,
            )
        steps.append(Rename("target", live, aside))
    steps.append(Clone("target", points[-1].name, live))
    return Plan(
        Action.PROMOTE,
        f"writable snapshot {live!r} of {points[-1].name} made live",
        backend,
        tuple(steps),
        newest=points[-1].name,
    )


def plan_reverse(
    new_source: Sequence[AnySnapshot],
    new_target: Sequence[AnySnapshot],
    policy: ReplicationPolicy,
    *,
    new_snapshot: str,
    aside: str,
    target_modified: bool | None = None,
    live: str = "live",
) -> Plan:
    """Turn the old primary (``new_target``) into a replica of the promoted one (``new_source``).

    Steps: snapshot the new primary as ``new_snapshot``; find the newest
    common snapshot; keep the old primary's divergent data (its snapshots
    after the common one and, unless ``target_modified`` is False, its
    unsnapshotted writes) aside under the name ``aside``; make it read-only;
    send the incremental back. ZFS keeps aside by snapshot ``aside``, renaming
    the dataset to ``aside``, cloning ``aside@common`` back to the dataset's
    name and promoting the clone (the divergent snapshots stay on ``aside``).
    With ``policy.keep_divergent`` false it rolls back instead, which needs
    ``allow_rollback``. btrfs renames the old live subvolume and the divergent
    snapshots aside (``NAME.aside``), so retention never prunes them.
    """
    backend = _backend(new_source, new_target)
    src = [p for p in _points(new_source, "new source") if not p.bookmark]
    tgt = [p for p in _points(new_target, "new target") if not p.bookmark]
    if any(p.name == new_snapshot for p in [*src, *tgt]):
        raise PlanError(
            f"snapshot {new_snapshot!r} already exists on the new primary or its peer; "
            "pick a name unique on both sides"
        )
    new_point = _Point(new_snapshot, frozenset({f"new:{new_snapshot}"}), None, False, False)
    src_after = [*src, new_point]
    common = _find_common(src, tgt)
    if common is None:
        return Plan(
            Action.REFUSE,
            "the old primary has no snapshot in common with the new primary, so it cannot be "
            "turned into a replica incrementally; rename it aside and replicate in full",
            backend,
        )
    base_t = tgt[common.target_index]
    target_names = _names(tgt)
    diverged = target_names[common.target_index + 1 :]
    steps: list[Step] = [Snapshot("source", new_snapshot)]
    kept: tuple[str, ...] = ()
    destroys: tuple[str, ...] = ()
    if backend == "zfs":
        if diverged or target_modified is not False:
            if policy.keep_divergent:
                steps += [
                    Snapshot("target", aside),
                    Rename("target", "", aside),
                    Clone("target", base_t.name, "", origin=aside),
                    PromoteClone("target", ""),
                ]
                kept = (*diverged, aside)
            elif policy.allow_rollback:
                destroys = tuple(reversed(diverged))
                refusal = _held_refusal(tgt, destroys, backend, base_t.name)
                if refusal is not None:
                    return refusal
                steps.append(Rollback("target", base_t.name, destroys))
            else:
                return Plan(
                    Action.REFUSE,
                    "the old primary has data after the common snapshot "
                    f"{base_t.name} ({_listing(diverged[::-1]) or 'unsnapshotted writes'}); "
                    "set keep_divergent = true to keep it aside, or allow_rollback = true "
                    "to destroy it",
                    backend,
                    base=base_t.name,
                    destroys=tuple(reversed(diverged)),
                )
        steps.append(SetProperty("target", "readonly", "on"))
    else:
        steps.append(Rename("target", live, aside))
        for name in diverged:
            steps.append(Rename("target", name, f"{name}.{aside}", kind="snapshot"))
        kept = (*diverged, aside)
    send_steps, _ = _sends(backend, src_after, common.source, new_snapshot, policy.intermediates)
    steps += send_steps
    if backend == "zfs" and policy.hold_tag:
        steps += [
            Hold("source", new_snapshot, policy.hold_tag),
            Hold("target", new_snapshot, policy.hold_tag),
        ]
    return Plan(
        Action.REVERSE,
        f"old primary becomes a replica: incremental from {base_t.name} to {new_snapshot}"
        + (f", {len(kept)} divergent item(s) kept aside as {aside}" if kept else ""),
        backend,
        tuple(steps),
        base=base_t.name,
        newest=new_snapshot,
        destroys=destroys,
        kept=kept,
    )


def plan_failback(
    current_primary: Sequence[AnySnapshot],
    old_primary: Sequence[AnySnapshot],
    policy: ReplicationPolicy,
    *,
    final_snapshot: str,
    target_modified: bool | None = None,
    live: str = "live",
    live_exists: bool = False,
    aside: str | None = None,
) -> Plan:
    """Give the primary role back to ``old_primary`` (now a replica of ``current_primary``).

    Steps run with ``source`` = the current primary and ``target`` = the old
    one: fence writes on the source (read-only), take ``final_snapshot``,
    send it incrementally (divergence on the target handled as in
    :func:`plan_replication`), then promote the target (ZFS: readonly=off and
    mount; btrfs: writable snapshot of ``final_snapshot`` as ``live``). The
    source stays read-only: it is the replica from now on.
    """
    backend = _backend(current_primary, old_primary)
    src = [p for p in _points(current_primary, "current primary") if not p.bookmark]
    tgt = [p for p in _points(old_primary, "old primary") if not p.bookmark]
    if any(p.name == final_snapshot for p in [*src, *tgt]):
        raise PlanError(
            f"snapshot {final_snapshot!r} already exists on the current primary or its peer; "
            "pick a name unique on both sides"
        )
    common = _find_common(src, tgt)
    if common is None:
        return Plan(
            Action.REFUSE,
            "the old primary has no snapshot in common with the current primary; run "
            "'reverse' first so that it becomes a replica, then fail back",
            backend,
        )
    base_t = tgt[common.target_index]
    diverged = _names(tgt)[common.target_index + 1 :]
    steps: list[Step] = []
    if backend == "zfs":
        steps.append(SetProperty("source", "readonly", "on"))
    else:
        steps.append(SetProperty("source", "ro", "true", dataset=live))
    steps.append(Snapshot("source", final_snapshot))
    destroys: tuple[str, ...] = ()
    if diverged or target_modified:
        if not policy.allow_rollback:
            return Plan(
                Action.REFUSE,
                f"the old primary has diverged after {base_t.name} "
                f"({_listing(diverged[::-1]) or 'unsnapshotted writes'}); nothing was changed. "
                "Run 'reverse' to keep that data aside, or set allow_rollback = true",
                backend,
                base=base_t.name,
                destroys=tuple(reversed(diverged)),
            )
        destroys = tuple(reversed(diverged))
        refusal = _held_refusal(tgt, destroys, backend, base_t.name)
        if refusal is not None:
            return refusal
        steps.append(Rollback("target", base_t.name, destroys))
    new_point = _Point(final_snapshot, frozenset({f"new:{final_snapshot}"}), None, False, False)
    send_steps, _ = _sends(
        backend, [*src, new_point], common.source, final_snapshot, policy.intermediates
    )
    steps += send_steps
    if backend == "zfs":
        if policy.hold_tag:
            steps += [
                Hold("source", final_snapshot, policy.hold_tag),
                Hold("target", final_snapshot, policy.hold_tag),
            ]
        steps += [SetProperty("target", "readonly", "off"), Mount("target")]
    else:
        if live_exists:
            if not aside:
                return Plan(
                    Action.REFUSE,
                    f"the old primary still has a live subvolume {live!r}; give a name to move "
                    "it aside to",
                    backend,
                )
            steps.append(Rename("target", live, aside))
        steps.append(Clone("target", final_snapshot, live))
    return Plan(
        Action.FAILBACK,
        f"final incremental from {base_t.name} to {final_snapshot}, then the old primary "
        "becomes primary again",
        backend,
        tuple(steps),
        base=base_t.name,
        newest=final_snapshot,
        destroys=destroys,
    )
