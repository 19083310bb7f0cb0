"""Carrying out a planner :class:`~carpool.replicate.plan.Plan` on two ZFS endpoints.

:func:`execute` runs the plan's steps in order, each on its side
(``source`` / ``target``), and stops at the first failure with an
:class:`ExecutionError` that names the step. A :class:`Send` is started
together with the :class:`Receive` that follows it and the stream is copied
between them by :func:`carpool.replicate.transport.pipe`. The holds,
releases, properties and pruning that end a plan run as one chain per side,
the two chains at once (they depend only on their own side). Nothing is run
that the plan does not contain; the only extra commands are read-only
(listing the target before a :class:`Rollback`, to check that ``-r``
destroys exactly the snapshots the plan says).

Dataset names in steps are ``""`` for the side's job dataset or the name of
a sibling of it (same parent), as :mod:`carpool.replicate.plan` defines.
"""

from __future__ import annotations

import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from carpool.errors import CarpoolError
from carpool.replicate.plan import (
    Bookmark,
    Clone,
    Destroy,
    Hold,
    Mount,
    Plan,
    PromoteClone,
    Receive,
    Release,
    Rename,
    Rollback,
    Send,
    SetProperty,
    Side,
    Snapshot,
    Step,
)
from carpool.replicate.progress import Reporter
from carpool.replicate.transport import PipeError, TokenBucket, compressed, pipe
from carpool.replicate.zfs import ZfsCli

__all__ = [
    "ExecutionError",
    "ExecutionReport",
    "TargetModified",
    "bookkeeping_only",
    "execute",
    "run_sides_at_once",
    "stream_label",
    "with_reporter",
]


class ExecutionError(CarpoolError):
    """A step that failed; ``index`` is its position in the plan, ``steps_done`` how many ran."""

    def __init__(self, message: str, *, step: Step, index: int, steps_done: int) -> None:
        super().__init__(message)
        self.step = step
        self.index = index
        self.steps_done = steps_done


class TargetModified(ExecutionError):
    """The receive was refused because the target changed since its newest snapshot.

    Plan again with ``target_modified=True``: the planner then refuses or
    rolls back, as the policy says.
    """


@dataclass(frozen=True)
class ExecutionReport:
    """Bytes streamed, steps run, seconds for the plan and for its streams alone."""

    bytes_sent: int
    steps_done: int
    seconds: float
    stream_seconds: float = 0.0


def _describe(step: Step) -> str:
    return f"{type(step).__name__}({', '.join(f'{k}={v!r}' for k, v in vars(step).items())})"


class _Sides:
    def __init__(self, source: ZfsCli, target: ZfsCli, source_ds: str, target_ds: str) -> None:
        self.cli: dict[Side, ZfsCli] = {"source": source, "target": target}
        self.dataset: dict[Side, str] = {"source": source_ds, "target": target_ds}

    def ds(self, side: Side, name: str = "") -> str:
        """The full dataset name: the job's dataset, or its sibling ``name``."""
        job = self.dataset[side]
        if not name:
            return job
        parent, sep, _ = job.rpartition("/")
        if not sep:
            raise CarpoolError(
                f"step names a sibling {name!r} of {job!r}, which is a pool root and has none"
            )
        return f"{parent}/{name}"

    def snap(self, side: Side, name: str, dataset: str = "") -> str:
        return f"{self.ds(side, dataset)}@{name}"


def _check_rollback(sides: _Sides, step: Rollback) -> None:
    snaps = sides.cli[step.side].snapshots(sides.ds(step.side))
    names = [s.name for s in snaps]
    if step.to not in names:
        raise CarpoolError(f"snapshot {step.to} to roll back to is not on the {step.side}")
    newer = set(names[names.index(step.to) + 1 :])
    if newer != set(step.destroys):
        raise CarpoolError(
            f"rolling back to {step.to} would destroy {sorted(newer) or 'nothing'}, but the plan "
            f"allows {sorted(step.destroys) or 'nothing'}: the {step.side} changed since it was "
            "listed; plan again"
        )


def _run_step(sides: _Sides, step: Step) -> None:
    cli = sides.cli[step.side]
    if isinstance(step, Snapshot):
        cli.snapshot(sides.snap(step.side, step.name))
    elif isinstance(step, Rollback):
        _check_rollback(sides, step)
        cli.rollback(sides.snap(step.side, step.to), recursive=bool(step.destroys))
    elif isinstance(step, Destroy):
        cli.destroy(sides.snap(step.side, step.snapshot))
    elif isinstance(step, Hold):
        cli.hold(step.tag, sides.snap(step.side, step.snapshot))
    elif isinstance(step, Release):
        cli.release(step.tag, sides.snap(step.side, step.snapshot), missing_ok=step.missing_ok)
    elif isinstance(step, Bookmark):
        cli.bookmark(sides.snap(step.side, step.snapshot), f"{sides.ds(step.side)}#{step.bookmark}")
    elif isinstance(step, SetProperty):
        cli.set(sides.ds(step.side, step.dataset), step.name, step.value)
    elif isinstance(step, Mount):
        cli.mount(sides.ds(step.side, step.dataset))
    elif isinstance(step, Clone):
        cli.clone(
            sides.snap(step.side, step.snapshot, step.origin), sides.ds(step.side, step.clone)
        )
    elif isinstance(step, PromoteClone):
        cli.promote(sides.ds(step.side, step.dataset))
    elif isinstance(step, Rename):
        if step.kind == "snapshot":
            cli.rename(sides.snap(step.side, step.old), sides.snap(step.side, step.new))
        else:
            # zfs-fuse answers "dataset is busy" for as long as the dataset stays mounted
            old, new = sides.ds(step.side, step.old), sides.ds(step.side, step.new)
            cli.umount(old)
            cli.rename(old, new)
            cli.mount(new)
    else:  # Send/Receive are handled as a pair by execute()
        raise CarpoolError(f"{_describe(step)} cannot run on its own")


def stream_label(send: Send, where: str = "") -> str:
    """``pool/fs@new`` or ``pool/fs@new (from @base)``: what a progress line calls a stream.

    Without ``where`` (btrfs, whose snapshot paths are long) only the snapshot names.
    """
    name = f"{where}@{send.snapshot}" if where else send.snapshot
    if send.kind == "full" or send.base is None:
        return name
    mark = "#" if send.base_is_bookmark else "@"
    return f"{name} (from {mark}{send.base})" if where else f"{name} (from {send.base})"


def with_reporter(
    progress: Callable[[int], None] | None, reporter: Reporter | None
) -> Callable[[int], None] | None:
    """The byte-count callback that feeds both ``progress`` and ``reporter``."""
    if reporter is None:
        return progress
    if progress is None:
        return reporter.update
    update = reporter.update

    def both(count: int) -> None:
        progress(count)
        update(count)

    return both


def _transfer(
    sides: _Sides,
    send: Send,
    recv: Receive,
    progress: Callable[[int], None] | None,
    limit: float | None,
    compression: str = "none",
    reporter: Reporter | None = None,
) -> int:
    sender = sides.cli[send.side]
    if reporter is None:
        return _stream(sides, send, recv, progress, limit, compression)
    dataset = sides.ds(send.side)
    reporter.begin(stream_label(send, dataset), sender.estimate(send, dataset))
    try:
        return _stream(sides, send, recv, with_reporter(progress, reporter), limit, compression)
    finally:
        reporter.end()


def _stream(
    sides: _Sides,
    send: Send,
    recv: Receive,
    progress: Callable[[int], None] | None,
    limit: float | None,
    compression: str,
) -> int:
    sender = sides.cli[send.side]
    receiver = sides.cli[recv.side]
    send_argv = compressed(sender.send_argv(send, sides.ds(send.side)), compression, sending=True)
    recv_argv = compressed(
        receiver.recv_argv(recv, sides.ds(recv.side)), compression, sending=False
    )
    recv_proc = receiver.endpoint.start(recv_argv, stdin=subprocess.PIPE)
    try:
        send_proc = sender.endpoint.start(send_argv, stdout=subprocess.PIPE)
    except BaseException:
        if recv_proc.stdin is not None:
            recv_proc.stdin.close()
        recv_proc.kill()
        recv_proc.wait()
        raise
    bucket = TokenBucket(limit) if limit is not None else None
    return pipe(send_proc, recv_proc, bucket=bucket, progress=progress).bytes_copied


def execute(
    plan: Plan,
    source: ZfsCli,
    target: ZfsCli,
    source_dataset: str,
    target_dataset: str,
    *,
    progress: Callable[[int], None] | None = None,
    limit: float | None = None,
    compression: str = "none",
    reporter: Reporter | None = None,
) -> ExecutionReport:
    """Run ``plan`` (which must not be refused); stop at the first failing step.

    ``progress`` gets the running byte count of the current stream, ``limit``
    caps streams at that many bytes per second, ``compression`` (``zstd``,
    ``lz4``...) compresses each stream on the sending host. A ``reporter``
    (interactive runs only) is told each stream's label and size estimate
    (``zfs send -nvP``, one extra command per stream) and its byte count.
    """
    plan.require()
    sides = _Sides(source, target, source_dataset, target_dataset)
    started = time.monotonic()
    sent = 0
    streaming = 0.0
    done = 0
    steps = plan.steps
    index = 0
    while index < len(steps):
        if bookkeeping_only(steps[index:]):
            done += _run_sides_at_once(sides, steps, index, done)
            break
        step = steps[index]
        try:
            if isinstance(step, Send):
                following = steps[index + 1] if index + 1 < len(steps) else None
                if not isinstance(following, Receive):
                    raise CarpoolError(
                        "a Send must be followed by its Receive; the plan is malformed"
                    )
                stream_started = time.monotonic()
                sent += _transfer(sides, step, following, progress, limit, compression, reporter)
                streaming += time.monotonic() - stream_started
                done += 2
                index += 2
                continue
            if isinstance(step, Receive):
                raise CarpoolError("a Receive without the Send before it; the plan is malformed")
            _run_step(sides, step)
        except PipeError as exc:
            modified = exc.side == "receive" and "modified" in exc.stderr
            kind = TargetModified if modified else ExecutionError
            hint = (
                "; plan again with target_modified=True (the planner decides whether to roll back)"
                if modified
                else ""
            )
            raise kind(
                f"step {index + 1} of {len(steps)} ({_describe(step)} into "
                f"{_describe(steps[index + 1])}) failed: {exc}{hint}",
                step=step,
                index=index,
                steps_done=done,
            ) from exc
        except CarpoolError as exc:
            raise ExecutionError(
                f"step {index + 1} of {len(steps)} ({_describe(step)}) failed after {done} "
                f"step(s) done: {exc}",
                step=step,
                index=index,
                steps_done=done,
            ) from exc
        done += 1
        index += 1
    return ExecutionReport(sent, done, time.monotonic() - started, streaming)


_BOOKKEEPING = (Hold, Release, SetProperty, Destroy, Bookmark)


def bookkeeping_only(rest: tuple[Step, ...]) -> bool:
    """True when ``rest`` is holds, releases, properties and pruning on both sides.

    Those steps depend only on earlier steps of their own side, so the
    source's and the target's run at the same time (two hosts, two zfs).
    """
    return len({s.side for s in rest}) == 2 and all(isinstance(s, _BOOKKEEPING) for s in rest)


def _run_sides_at_once(sides: _Sides, steps: tuple[Step, ...], first: int, done: int) -> int:
    """Run ``steps[first:]`` as one chain per side, both chains at once; the steps run."""
    return run_sides_at_once(lambda step: _run_step(sides, step), steps, first, done)


def run_sides_at_once(
    run_step: Callable[[Step], None], steps: tuple[Step, ...], first: int, done: int
) -> int:
    """``steps[first:]`` as a source chain and a target chain run at the same time.

    Each chain stops at its first failure; the earliest failing step is
    raised as :class:`ExecutionError` once both chains ended. Returns the
    number of steps run.
    """
    chains: dict[Side, list[int]] = {"source": [], "target": []}
    for index in range(first, len(steps)):
        chains[steps[index].side].append(index)
    failures: list[tuple[int, CarpoolError]] = []
    counts = {"source": 0, "target": 0}

    def run_chain(side: Side) -> None:
        for index in chains[side]:
            try:
                run_step(steps[index])
            except CarpoolError as exc:
                failures.append((index, exc))
                return
            counts[side] += 1

    helper = threading.Thread(target=run_chain, args=("target",), daemon=True)
    helper.start()
    try:
        run_chain("source")
    finally:
        helper.join()
    if failures:
        index, exc = min(failures, key=lambda item: item[0])
        ran = done + counts["source"] + counts["target"]
        raise ExecutionError(
            f"step {index + 1} of {len(steps)} ({_describe(steps[index])}) failed after {ran} "
            f"step(s) done: {exc}",
            step=steps[index],
            index=index,
            steps_done=ran,
        ) from exc
    return counts["source"] + counts["target"]
