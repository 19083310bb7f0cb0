"""Carrying out a planner :class:`~carpool.replicate.plan.Plan` on two btrfs endpoints.

A btrfs side is a :class:`BtrfsSide`: a *live* subvolume (``live_dir/live_name``)
and a *snapshot directory* holding the read-only snapshots carpool names
(``autorep-...``). Plan names map to paths as :mod:`carpool.replicate.plan`
defines: a snapshot name is ``snapshot_dir/NAME``; a dataset name ``""`` is the
live subvolume and any other dataset name is a sibling ``live_dir/NAME``.

Steps: ``Snapshot`` → ``btrfs subvolume snapshot -r``; ``Send``/``Receive`` →
``btrfs send [-p base] | btrfs receive DIR`` through
:func:`carpool.replicate.transport.pipe`, then a ``btrfs filesystem sync`` of
the target (a received snapshot is not durable before); ``Destroy`` and
``Rollback`` → ``btrfs subvolume delete`` (btrfs has no rollback: the
snapshots the plan names are deleted); ``Clone`` → a writable snapshot (how a
received snapshot becomes live); ``SetProperty ro`` → ``btrfs property set``;
``Rename`` → ``mv``. Holds, bookmarks, mounts and clone promotion do not
exist on btrfs and are skipped.

A failed receive leaves a writable, partial subvolume without a
received_uuid (btrbk calls these "garbled"); it is deleted before the error
is raised, so a retry starts clean.
"""

from __future__ import annotations

import posixpath
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

from carpool.errors import CarpoolError
from carpool.replicate.btrfs import BtrfsCli
from carpool.replicate.executor import (
    ExecutionError,
    ExecutionReport,
    bookkeeping_only,
    run_sides_at_once,
    stream_label,
    with_reporter,
)
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
    Snapshot,
    Step,
)
from carpool.replicate.progress import Reporter
from carpool.replicate.snapshots import (
    BtrfsSnapshot,
    parse_btrfs_subvolume_show,
    parse_snapshot_name,
)
from carpool.replicate.transport import CommandError, PipeError, TokenBucket, compressed, pipe

__all__ = ["BtrfsSide", "execute_btrfs", "list_btrfs_snapshots", "show_snapshot"]


@dataclass(frozen=True)
class BtrfsSide:
    """Where one side's live subvolume and snapshots are (paths on that side's host)."""

    cli: BtrfsCli
    snapshot_dir: str
    live_dir: str
    live_name: str

    def live(self, name: str = "") -> str:
        """The live subvolume (``name`` empty) or its sibling ``name``."""
        return posixpath.join(self.live_dir, name or self.live_name)

    def snapshot(self, name: str) -> str:
        return posixpath.join(self.snapshot_dir, name)

    def describe(self) -> str:
        return f"{self.cli.endpoint.describe()}:{self.snapshot_dir}"


def list_btrfs_snapshots(
    side: BtrfsSide, prefix: str, *, missing: list[str] | None = None
) -> list[BtrfsSnapshot]:
    """The read-only snapshots named ``PREFIX-YYYYmmdd-HHMMSS[-n]`` in the snapshot dir.

    Snapshots kept aside by ``reverse`` (``NAME.aside``) and anything else are
    left out, so neither planning nor retention ever touches them. A missing
    directory has no snapshots (and is appended to ``missing`` when given).
    One ``find`` and one ``btrfs subvolume show`` per candidate, oldest first.
    """
    listing = side.cli.endpoint.run(
        ["find", side.snapshot_dir, "-mindepth", "1", "-maxdepth", "1", "-type", "d", "-print0"],
        check=False,
    )
    if listing.returncode != 0:
        if "No such file" in listing.stderr:
            if missing is not None:
                missing.append(side.snapshot_dir)
            return []
        raise CommandError(
            ["find", side.snapshot_dir],
            listing.returncode,
            listing.stderr,
            side.cli.endpoint.describe(),
        )
    records = []
    for path in sorted(p for p in listing.stdout.split("\0") if p):
        if parse_snapshot_name(prefix, posixpath.basename(path)) is None:
            continue
        record = show_snapshot(side, path)
        if record is not None and record.readonly:
            records.append(record)
    return sorted(records, key=lambda r: (r.cgen or 0, r.name))


def show_snapshot(side: BtrfsSide, path: str) -> BtrfsSnapshot | None:
    """``btrfs subvolume show PATH`` as a record with ``path`` kept; None if not a subvolume."""
    shown = side.cli.endpoint.run([side.cli.btrfs, "subvolume", "show", path], check=False)
    if shown.returncode != 0:
        return None
    return replace(parse_btrfs_subvolume_show(shown.stdout), path=path)


def _describe(step: Step) -> str:
    return f"{type(step).__name__}({', '.join(f'{k}={v!r}' for k, v in vars(step).items())})"


def _run_step(sides: dict[str, BtrfsSide], step: Step) -> None:
    side = sides[step.side]
    cli = side.cli
    if isinstance(step, Snapshot):
        cli.endpoint.run(["mkdir", "-p", "--", side.snapshot_dir])
        cli.snapshot(side.live(), side.snapshot(step.name), readonly=True)
    elif isinstance(step, Destroy):
        cli.delete(side.snapshot(step.snapshot))
    elif isinstance(step, Rollback):
        present = {r.name for r in cli.snapshots(side.snapshot_dir)}
        if step.to not in present:
            raise CarpoolError(f"snapshot {step.to} to roll back to is not on the {step.side}")
        for name in step.destroys:
            cli.delete(side.snapshot(name))
    elif isinstance(step, SetProperty):
        if step.name in ("ro", "readonly"):
            cli.set_readonly(side.live(step.dataset), step.value in ("true", "on"))
        else:
            raise CarpoolError(f"btrfs has no property {step.name!r}; the plan is malformed")
    elif isinstance(step, Clone):
        cli.snapshot(side.snapshot(step.snapshot), side.live(step.clone), readonly=False)
    elif isinstance(step, Rename):
        if step.kind == "snapshot":
            cli.rename(side.snapshot(step.old), side.snapshot(step.new))
        else:
            cli.rename(side.live(step.old), side.live(step.new))
    elif isinstance(step, Hold | Release | Bookmark | Mount | PromoteClone):
        return  # no such thing on btrfs
    else:
        raise CarpoolError(f"{_describe(step)} cannot run on its own")


def _remove_garbled(side: BtrfsSide, name: str) -> None:
    """Delete a partial subvolume a failed ``btrfs receive`` left behind (no received_uuid)."""
    path = side.snapshot(name)
    if not side.cli.is_subvolume(path):
        return
    record = side.cli.show(path)
    if record.received_uuid is None:
        side.cli.delete(path)


def _transfer(
    sides: dict[str, BtrfsSide],
    send: Send,
    recv: Receive,
    progress: Callable[[int], None] | None,
    limit: float | None,
    compression: str = "none",
    reporter: Reporter | None = None,
) -> int:
    if reporter is None:
        return _stream(sides, send, recv, progress, limit, compression)
    sender = sides[send.side]
    reporter.begin(
        stream_label(send),
        sender.cli.estimate(send, sender.snapshot_dir),
    )
    try:
        return _stream(sides, send, recv, with_reporter(progress, reporter), limit, compression)
    finally:
        reporter.end()


def _stream(
    sides: dict[str, BtrfsSide],
    send: Send,
    recv: Receive,
    progress: Callable[[int], None] | None,
    limit: float | None,
    compression: str,
) -> int:
    sender = sides[send.side]
    receiver = sides[recv.side]
    send_argv = sender.cli.send_argv(send, sender.snapshot_dir)
    send_argv.insert(2, "-q")
    send_argv = compressed(send_argv, compression, sending=True)
    recv_argv = compressed(
        receiver.cli.recv_argv(recv, receiver.snapshot_dir), compression, sending=False
    )
    recv_proc = receiver.cli.endpoint.start(recv_argv, stdin=subprocess.PIPE)
    try:
        send_proc = sender.cli.endpoint.start(send_argv, stdout=subprocess.PIPE)
    except BaseException:
        if recv_proc.stdin is not None:
            recv_proc.stdin.close()
        recv_proc.kill()
        recv_proc.wait()
        raise
    bucket = TokenBucket(limit) if limit is not None else None
    try:
        copied = pipe(send_proc, recv_proc, bucket=bucket, progress=progress).bytes_copied
    except PipeError:
        _remove_garbled(receiver, recv.snapshot)
        raise
    receiver.cli.sync(receiver.snapshot_dir)
    return copied


def execute_btrfs(
    plan: Plan,
    source: BtrfsSide,
    target: BtrfsSide,
    *,
    progress: Callable[[int], None] | None = None,
    limit: float | None = None,
    compression: str = "none",
    reporter: Reporter | None = None,
) -> ExecutionReport:
    """Run ``plan`` (which must not be refused) on btrfs; stop at the first failing step.

    ``reporter`` as for :func:`carpool.replicate.executor.execute` (the estimate of a full
    send is the snapshot's ``btrfs filesystem du`` total; incrementals have none).
    """
    plan.require()
    sides = {"source": source, "target": target}
    started = time.monotonic()
    sent = 0
    streaming = 0.0
    done = 0
    steps = plan.steps
    index = 0
    while index < len(steps):
        if bookkeeping_only(steps[index:]):
            done += run_sides_at_once(lambda step: _run_step(sides, step), steps, index, done)
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
            raise ExecutionError(
                f"step {index + 1} of {len(steps)} ({_describe(step)}) failed: {exc}",
                step=step,
                index=index,
                steps_done=done,
            ) from exc
        except (CarpoolError, CommandError) as exc:
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
