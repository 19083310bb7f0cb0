"""Running one configured job: a replication cycle, or a failover command.

:class:`JobRunner` is the I/O shell around the planner for one
:class:`~carpool.replicate.config.Job`. A cycle (the seed script's job, done
safely) takes the lock of both datasets, takes a new snapshot named with the
job's prefix (unique on *both* sides, so a name pruned on the source but kept
on the target is never reused), lists both sides, plans, executes, and
records the outcome in the job's :class:`~carpool.replicate.state.JobState`.

* A receive refused because the target was modified is planned again with
  ``target_modified=True``: the policy then refuses (nothing destroyed) or
  rolls back.
* An interrupted stream (truncated, connection lost) is retried from a fresh
  listing, up to ``retries`` more times; zfs and btrfs leave nothing
  behind (a partial btrfs subvolume is deleted by the executor).

Failover: ``promote`` makes the replica writable (ZFS ``readonly=off`` and
mount; btrfs a writable snapshot of the newest received one), ``reverse``
makes the old primary a replica of the promoted one (divergent data kept
aside), and ``failback`` hands the primary role back. While a job is
*reversed*, ``run`` replicates from the job's target to its source.
"""

from __future__ import annotations

import posixpath
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any, TypeVar

from carpool.errors import CarpoolError
from carpool.replicate.btrfs import BtrfsCli
from carpool.replicate.btrfs_executor import (
    BtrfsSide,
    execute_btrfs,
    list_btrfs_snapshots,
    show_snapshot,
)
from carpool.replicate.config import Endpoint as JobEndpoint
from carpool.replicate.config import Job
from carpool.replicate.executor import ExecutionError, ExecutionReport, TargetModified, execute
from carpool.replicate.plan import (
    Action,
    Plan,
    ReplicationPolicy,
    plan_failback,
    plan_promote,
    plan_replication,
    plan_reverse,
)
from carpool.replicate.progress import Reporter
from carpool.replicate.snapshots import ZfsSnapshot, unique_snapshot_name
from carpool.replicate.state import DatasetLock, JobState, StateStore
from carpool.replicate.transport import CommandError, Endpoint, Local, PipeError, Ssh
from carpool.replicate.zfs import ZfsCli

__all__ = ["CycleResult", "FailoverResult", "JobRunner", "endpoint_for"]

ROLES = ("normal", "promoted", "reversed")
A = TypeVar("A")
B = TypeVar("B")
_TRANSIENT = (
    "invalid backup stream",
    "short read",
    "closed its input",
    "unexpected end",
    "broken pipe",
    "connection",
    "exited 255",
    "did not finish within",
)
_FULL = ("out of space", "no space left", "quota exceeded")


@dataclass(frozen=True)
class CycleResult:
    """What one replication cycle did."""

    job: str
    action: str
    reason: str
    snapshot: str | None
    bytes_sent: int
    seconds: float
    attempts: int
    stream_seconds: float = 0.0
    pruned_source: tuple[str, ...] = ()
    pruned_target: tuple[str, ...] = ()


@dataclass(frozen=True)
class FailoverResult:
    """What ``promote`` / ``reverse`` / ``failback`` did."""

    job: str
    action: str
    reason: str
    role: str
    snapshot: str | None = None
    kept_aside: tuple[str, ...] = ()
    destroyed: tuple[str, ...] = ()
    bytes_sent: int = 0


def endpoint_for(job: Job, where: JobEndpoint) -> Endpoint:
    """The transport endpoint for one end of ``job``: local, or ssh with the job's options."""
    if where.local:
        return Local()
    options: list[str] = []
    raw = list(job.ssh.options)
    index = 0
    while index < len(raw):
        if raw[index] == "-o" and index + 1 < len(raw):
            options.append(raw[index + 1])
            index += 2
        else:
            options.append(raw[index])
            index += 1
    assert where.host is not None
    return Ssh(
        where.host,
        user=where.user,
        port=job.ssh.port,
        identity=job.ssh.identity,
        options=tuple(options),
    )


def both(first: Callable[[], A], second: Callable[[], B]) -> tuple[A, B]:
    """Run two independent queries (one per side) at once; the first error is raised."""
    results: list[Any] = [None, None]
    errors: list[BaseException] = []

    def run_second() -> None:
        try:
            results[1] = second()
        except BaseException as exc:  # handed to the caller below
            errors.append(exc)

    thread = threading.Thread(target=run_second, daemon=True)
    thread.start()
    try:
        results[0] = first()
    finally:
        thread.join()
    if errors:
        raise errors[0]
    return results[0], results[1]


def _is_transient(exc: ExecutionError) -> bool:
    cause = exc.__cause__
    if not isinstance(cause, PipeError):
        return False
    text = str(cause).lower()
    return not any(m in text for m in _FULL) and any(m in text for m in _TRANSIENT)


def _explain(exc: CarpoolError) -> str:
    text = str(exc)
    low = text.lower()
    if any(m in low for m in _FULL):
        text += "; the target is full: free space on it (or grow it) and run again"
    return " ".join(text.split())


class _ZfsEnds:
    def __init__(self, runner: JobRunner, reversed_: bool) -> None:
        job = runner.job
        ends = (job.target, job.source) if reversed_ else (job.source, job.target)
        self.source_end, self.target_end = ends
        self.source = ZfsCli(endpoint_for(job, self.source_end), zfs=runner.zfs_command)
        self.target = ZfsCli(endpoint_for(job, self.target_end), zfs=runner.zfs_command)
        self.source_ds = self.source_end.path
        self.target_ds = self.target_end.path

    def listing(self, cli: ZfsCli, dataset: str) -> list[ZfsSnapshot]:
        return cli.snapshots(dataset) if cli.exists(dataset) else []


class _BtrfsEnds:
    def __init__(self, runner: JobRunner, reversed_: bool) -> None:
        job = runner.job
        live_name = posixpath.basename(job.source.path.rstrip("/"))
        snapdir = job.snapshot_dir or posixpath.join(
            posixpath.dirname(job.source.path.rstrip("/")), ".snapshots"
        )
        primary = BtrfsSide(
            BtrfsCli(endpoint_for(job, job.source), btrfs=runner.btrfs_command),
            snapdir,
            posixpath.dirname(job.source.path.rstrip("/")),
            live_name,
        )
        replica = BtrfsSide(
            BtrfsCli(endpoint_for(job, job.target), btrfs=runner.btrfs_command),
            job.target.path,
            job.target.path,
            live_name,
        )
        self.source, self.target = (replica, primary) if reversed_ else (primary, replica)


class JobRunner:
    """Runs ``job``'s cycles and failover commands, recording state in ``store``."""

    def __init__(
        self,
        job: Job,
        store: StateStore,
        *,
        zfs_command: str = "zfs",
        btrfs_command: str = "btrfs",
        retries: int = 2,
        progress: Callable[[int], None] | None = None,
        clock: Callable[[], float] = time.time,
        reporter: Reporter | None = None,
    ) -> None:
        self.job = job
        self.store = store
        self.zfs_command = zfs_command
        self.btrfs_command = btrfs_command
        self.retries = retries
        self.progress = progress
        self.clock = clock
        self.reporter = reporter

    # ------------------------------------------------------------------ helpers

    def _lock(self) -> DatasetLock:
        return DatasetLock(self.store.directory, str(self.job.source), str(self.job.target))

    def _where(self) -> str:
        where = f" ({self.job.name!r}"
        return where + (f", line {self.job.line})" if self.job.line else ")")

    def _policy(self, reversed_: bool) -> ReplicationPolicy:
        policy = self.job.policy()
        if reversed_:
            policy = replace(
                policy,
                source_retention=self.job.target_retention,
                target_retention=self.job.source_retention,
            )
        return policy

    def state(self) -> JobState:
        return self.store.load(self.job.name)

    # ------------------------------------------------------------------ cycle

    def run(self) -> CycleResult:
        """One cycle; the state records success or the one-line error (re-raised)."""
        started = self.clock()
        with self._lock():
            state = self.state()
            try:
                if state.role == "promoted":
                    raise CarpoolError(
                        f"job {self.job.name!r} was promoted (its target is writable); run "
                        f"'zfs-replicate reverse {self.job.name}' to make the old primary its "
                        "replica, or 'failback' to hand the role back"
                    )
                result = self._cycle(state.role == "reversed", started)
            except CarpoolError as exc:
                message = _explain(exc)
                self.store.save(
                    state.failed(at=self.clock(), error=message, seconds=self.clock() - started)
                )
                raise CarpoolError(message) from exc
            self.store.save(
                state.succeeded(
                    at=self.clock(),
                    snapshot=result.snapshot,
                    snapshot_time=started if result.snapshot else None,
                    sent=result.bytes_sent,
                    seconds=result.seconds,
                    action=result.action,
                    stream_seconds=result.stream_seconds,
                )
            )
            return result

    def _cycle(self, reversed_: bool, started: float) -> CycleResult:
        if self.job.backend == "btrfs":
            return self._btrfs_cycle(reversed_, started)
        return self._zfs_cycle(reversed_, started)

    def _zfs_missing_source(self, ends: _ZfsEnds) -> CarpoolError:
        return CarpoolError(
            f"source dataset {ends.source_ds} does not exist on "
            f"{ends.source.endpoint.describe()}{self._where()}: create it or correct "
            "'source' in the job"
        )

    def _check_zfs_parent(self, ends: _ZfsEnds) -> None:
        parent = ends.target_ds.rpartition("/")[0]
        if not parent or not ends.target.exists(parent):
            raise CarpoolError(
                f"the target's parent dataset {parent or ends.target_ds} does not exist on "
                f"{ends.target.endpoint.describe()}{self._where()}: create it (zfs create) or "
                "correct 'target' in the job"
            )

    def _check_zfs(self, ends: _ZfsEnds) -> bool:
        if not ends.source.exists(ends.source_ds):
            raise self._zfs_missing_source(ends)
        if ends.target.exists(ends.target_ds):
            return True
        self._check_zfs_parent(ends)
        return False

    def _zfs_cycle(self, reversed_: bool, started: float) -> CycleResult:
        ends = _ZfsEnds(self, reversed_)
        source_snaps, target_snaps = both(
            lambda: ends.source.snapshots_if_exists(ends.source_ds),
            lambda: ends.target.snapshots_if_exists(ends.target_ds),
        )
        if source_snaps is None:
            raise self._zfs_missing_source(ends)
        if target_snaps is None:
            self._check_zfs_parent(ends)
            target_snaps = []
        existing = {s.name for s in [*source_snaps, *target_snaps]}
        name = unique_snapshot_name(self.job.prefix, datetime.fromtimestamp(started, UTC), existing)
        ends.source.snapshot(f"{ends.source_ds}@{name}")
        source_snaps = [*source_snaps, ends.source.snapshot_record(f"{ends.source_ds}@{name}")]
        policy = self._policy(reversed_)
        modified: bool | None = None
        attempts = 0
        while True:
            attempts += 1
            plan = plan_replication(
                source_snaps,
                target_snaps,
                policy,
                now=datetime.fromtimestamp(self.clock(), UTC),
                target_modified=modified,
            ).require()
            try:
                report = execute(
                    plan,
                    ends.source,
                    ends.target,
                    ends.source_ds,
                    ends.target_ds,
                    progress=self.progress,
                    limit=self.job.bandwidth_limit,
                    compression=self.job.compression,
                    reporter=self.reporter,
                )
            except TargetModified:
                if modified:
                    raise
                modified = True
                continue
            except ExecutionError as exc:
                if attempts <= self.retries and _is_transient(exc):
                    source_snaps = ends.listing(ends.source, ends.source_ds)
                    target_snaps = ends.listing(ends.target, ends.target_ds)
                    continue
                raise
            break
        if plan.action is Action.FULL:
            ends.target.set(ends.target_ds, "atime", "off")
        return self._result(plan, report, name, started, attempts)

    def _result(
        self, plan: Plan, report: ExecutionReport, name: str, started: float, attempts: int
    ) -> CycleResult:
        return CycleResult(
            job=self.job.name,
            action=str(plan.action),
            reason=plan.reason,
            snapshot=plan.newest if plan.newest == name else None,
            bytes_sent=report.bytes_sent,
            seconds=self.clock() - started,
            attempts=attempts,
            stream_seconds=report.stream_seconds,
            pruned_source=plan.prune_source,
            pruned_target=plan.prune_target,
        )

    def _btrfs_missing_source(self, source: BtrfsSide) -> CarpoolError:
        return CarpoolError(
            f"source subvolume {source.live()} does not exist on "
            f"{source.cli.endpoint.describe()}{self._where()}: create it (btrfs subvolume "
            "create) or correct 'source' in the job"
        )

    def _btrfs_missing_target(self, target: BtrfsSide) -> CarpoolError:
        return CarpoolError(
            f"target directory {target.snapshot_dir} does not exist on "
            f"{target.cli.endpoint.describe()}{self._where()}: create it on a btrfs "
            "filesystem or correct 'target' in the job"
        )

    def _btrfs_cycle(self, reversed_: bool, started: float) -> CycleResult:
        ends = _BtrfsEnds(self, reversed_)
        prefix = self.job.prefix
        missing: list[str] = []
        target_missing: list[str] = []
        target_snaps, source_snaps = both(
            lambda: list_btrfs_snapshots(ends.target, prefix, missing=target_missing),
            lambda: list_btrfs_snapshots(ends.source, prefix, missing=missing),
        )
        if target_missing:
            raise self._btrfs_missing_target(ends.target)
        existing = {s.name for s in [*source_snaps, *target_snaps]}
        name = unique_snapshot_name(prefix, datetime.fromtimestamp(started, UTC), existing)
        if missing:
            ends.source.cli.endpoint.run(["mkdir", "-p", "--", ends.source.snapshot_dir])
        taken = ends.source.snapshot(name)
        try:
            ends.source.cli.snapshot(ends.source.live(), taken, readonly=True)
        except CommandError as exc:
            if ends.source.cli.is_subvolume(ends.source.live()):
                raise
            raise self._btrfs_missing_source(ends.source) from exc
        new = show_snapshot(ends.source, taken)
        if new is None:
            raise CarpoolError(f"the snapshot {taken} just taken is not a subvolume; check it")
        source_snaps.append(new)
        policy = self._policy(reversed_)
        attempts = 0
        while True:
            attempts += 1
            plan = plan_replication(
                source_snaps,
                target_snaps,
                policy,
                now=datetime.fromtimestamp(self.clock(), UTC),
            ).require()
            try:
                report = execute_btrfs(
                    plan,
                    ends.source,
                    ends.target,
                    progress=self.progress,
                    limit=self.job.bandwidth_limit,
                    compression=self.job.compression,
                    reporter=self.reporter,
                )
            except ExecutionError as exc:
                if attempts <= self.retries and _is_transient(exc):
                    source_snaps = list_btrfs_snapshots(ends.source, prefix)
                    target_snaps = list_btrfs_snapshots(ends.target, prefix)
                    continue
                raise
            break
        return self._result(plan, report, name, started, attempts)

    # ------------------------------------------------------------------ failover

    def _failover(self, action: str, body: Callable[[JobState], FailoverResult]) -> FailoverResult:
        with self._lock():
            state = self.state()
            try:
                result = body(state)
            except CommandError as exc:
                raise CarpoolError(f"{action} of job {self.job.name!r} failed: {exc}") from exc
            self.store.save(replace(state, role=result.role, last_action=action))
            return result

    def _stamp(self) -> str:
        return datetime.fromtimestamp(self.clock(), UTC).strftime("%Y%m%d-%H%M%S")

    def promote(self) -> FailoverResult:
        """Make the replica (the job target) writable: the seed's failover step."""

        def body(state: JobState) -> FailoverResult:
            if state.role != "normal":
                raise CarpoolError(
                    f"job {self.job.name!r} is already {state.role}: its target is the primary"
                )
            if self.job.backend == "btrfs":
                ends = _BtrfsEnds(self, reversed_=False)
                side = ends.target
                snaps = list_btrfs_snapshots(side, self.job.prefix)
                live_exists = side.cli.is_subvolume(side.live())
                plan = plan_promote(
                    snaps,
                    live=side.live_name,
                    live_exists=live_exists,
                    aside=f"{side.live_name}.before-promote-{self._stamp()}",
                    backend="btrfs",
                ).require()
                execute_btrfs(plan, ends.source, side)
            else:
                zends = _ZfsEnds(self, reversed_=False)
                if not zends.target.exists(zends.target_ds):
                    raise CarpoolError(
                        f"the replica {zends.target_ds} does not exist on "
                        f"{zends.target.endpoint.describe()}: replicate at least once first"
                    )
                plan = plan_promote(
                    zends.target.snapshots(zends.target_ds), backend="zfs"
                ).require()
                execute(plan, zends.source, zends.target, zends.source_ds, zends.target_ds)
            return FailoverResult(
                self.job.name, "promote", plan.reason, "promoted", snapshot=plan.newest
            )

        return self._failover("promote", body)

    def reverse(self) -> FailoverResult:
        """The old primary (job source) becomes a replica of the promoted target."""

        def body(state: JobState) -> FailoverResult:
            if state.role != "promoted":
                raise CarpoolError(
                    f"job {self.job.name!r} is {state.role}; 'reverse' follows 'promote'"
                )
            policy = self._policy(reversed_=True)
            aside_stamp = self._stamp()
            if self.job.backend == "btrfs":
                ends = _BtrfsEnds(self, reversed_=True)
                src = list_btrfs_snapshots(ends.source, self.job.prefix)
                tgt = list_btrfs_snapshots(ends.target, self.job.prefix)
                name = unique_snapshot_name(
                    self.job.prefix,
                    datetime.fromtimestamp(self.clock(), UTC),
                    {s.name for s in [*src, *tgt]},
                )
                live_exists = ends.target.cli.is_subvolume(ends.target.live())
                aside = f"{ends.target.live_name}.diverged-{aside_stamp}"
                plan = plan_reverse(
                    src, tgt, policy, new_snapshot=name, aside=aside, live=ends.target.live_name
                )
                if live_exists or plan.refused:
                    plan = plan.require()
                else:
                    plan = replace(
                        plan,
                        steps=tuple(
                            s
                            for s in plan.steps
                            if not (getattr(s, "kind", None) == "dataset" and s.side == "target")
                        ),
                    )
                report = execute_btrfs(plan, ends.source, ends.target, reporter=self.reporter)
            else:
                zends = _ZfsEnds(self, reversed_=True)
                self._check_zfs(zends)
                src_z = zends.source.snapshots(zends.source_ds)
                tgt_z = zends.listing(zends.target, zends.target_ds)
                name = unique_snapshot_name(
                    self.job.prefix,
                    datetime.fromtimestamp(self.clock(), UTC),
                    {s.name for s in [*src_z, *tgt_z]},
                )
                base = posixpath.basename(zends.target_ds)
                plan = plan_reverse(
                    src_z,
                    tgt_z,
                    policy,
                    new_snapshot=name,
                    aside=f"{base}-diverged-{aside_stamp}",
                ).require()
                report = execute(
                    plan,
                    zends.source,
                    zends.target,
                    zends.source_ds,
                    zends.target_ds,
                    reporter=self.reporter,
                )
            return FailoverResult(
                self.job.name,
                "reverse",
                plan.reason,
                "reversed",
                snapshot=name,
                kept_aside=plan.kept,
                destroyed=plan.destroys,
                bytes_sent=report.bytes_sent,
            )

        return self._failover("reverse", body)

    def failback(self) -> FailoverResult:
        """A final incremental from the promoted target, then the job source is primary again."""

        def body(state: JobState) -> FailoverResult:
            if state.role != "reversed":
                raise CarpoolError(
                    f"job {self.job.name!r} is {state.role}; 'failback' follows 'reverse' "
                    "(the old primary must be a replica first)"
                )
            policy = self._policy(reversed_=True)
            if self.job.backend == "btrfs":
                ends = _BtrfsEnds(self, reversed_=True)
                src = list_btrfs_snapshots(ends.source, self.job.prefix)
                tgt = list_btrfs_snapshots(ends.target, self.job.prefix)
                name = unique_snapshot_name(
                    self.job.prefix,
                    datetime.fromtimestamp(self.clock(), UTC),
                    {s.name for s in [*src, *tgt]},
                )
                live = ends.target.live_name
                plan = plan_failback(
                    src,
                    tgt,
                    policy,
                    final_snapshot=name,
                    live=live,
                    live_exists=ends.target.cli.is_subvolume(ends.target.live()),
                    aside=f"{live}.before-failback-{self._stamp()}",
                ).require()
                report = execute_btrfs(plan, ends.source, ends.target, reporter=self.reporter)
            else:
                zends = _ZfsEnds(self, reversed_=True)
                self._check_zfs(zends)
                src_z = zends.source.snapshots(zends.source_ds)
                tgt_z = zends.target.snapshots(zends.target_ds)
                name = unique_snapshot_name(
                    self.job.prefix,
                    datetime.fromtimestamp(self.clock(), UTC),
                    {s.name for s in [*src_z, *tgt_z]},
                )
                plan = plan_failback(src_z, tgt_z, policy, final_snapshot=name).require()
                report = execute(
                    plan,
                    zends.source,
                    zends.target,
                    zends.source_ds,
                    zends.target_ds,
                    reporter=self.reporter,
                )
            return FailoverResult(
                self.job.name,
                "failback",
                plan.reason,
                "normal",
                snapshot=name,
                destroyed=plan.destroys,
                bytes_sent=report.bytes_sent,
            )

        return self._failover("failback", body)
