"""``zfs-replicate``: run, schedule, inspect and fail over replication jobs.

    zfs-replicate [-c FILE] [--state-dir DIR] run [JOB...]
    zfs-replicate [-c FILE] daemon [--run-dir DIR] [--metrics ADDR] [-d]
    zfs-replicate [-c FILE] status [-j] [JOB...]
    zfs-replicate [-c FILE] promote JOB | reverse JOB | failback JOB

``run`` does one cycle per job (all jobs without a name); ``daemon`` runs
each job on its schedule (cron, or ``continuous`` with ``interval`` between
cycles), serves ``status`` and ``run`` on the control socket
(``<run-dir>/zfs-replicate.sock``), emits ``replication_done`` /
``replication_failed`` events and Prometheus metrics. ``status`` reads the
recorded state (no daemon needed). A user error prints one line and exits 1.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Callable, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from carpool.errors import CarpoolError
from carpool.replicate.config import DEFAULT_PATH, Job, ReplicateConfig, load_config
from carpool.replicate.job import CycleResult, FailoverResult, JobRunner
from carpool.replicate.progress import Reporter, make_reporter
from carpool.replicate.state import DEFAULT_STATE_DIR, JobState, StateStore
from carpool.service import run_command

__all__ = ["main", "status_record"]

PROGRAM = "zfs-replicate"


# --------------------------------------------------------------------------- formatting


def _human_bytes(count: int) -> str:
    value = float(count)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{count} B"


def _human_seconds(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 120:
        return f"{seconds:.1f}s"
    if seconds < 7200:
        return f"{seconds / 60:.1f}m"
    if seconds < 172800:
        return f"{seconds / 3600:.1f}h"
    return f"{seconds / 86400:.1f}d"


def _when(stamp: float | None) -> str:
    if stamp is None:
        return "never"
    return datetime.fromtimestamp(stamp).astimezone().strftime("%Y-%m-%d %H:%M:%S")


def status_record(state: JobState, now: float) -> dict[str, Any]:
    """The JSON form of a job's state for ``status -j`` and the control socket."""
    record = state.to_dict()
    record["lag"] = state.lag(now)
    return record


def _format_cycle(result: CycleResult) -> str:
    pruned = len(result.pruned_source) + len(result.pruned_target)
    return (
        f"{result.job}: {result.reason}; {_human_bytes(result.bytes_sent)} in "
        f"{result.seconds:.2f} s"
        + (f", {result.attempts} attempts" if result.attempts > 1 else "")
        + (f", {pruned} snapshot(s) pruned" if pruned else "")
    )


def _format_failover(result: FailoverResult) -> str:
    text = f"{result.job}: {result.action}: {result.reason}"
    if result.kept_aside:
        text += f"; kept aside: {', '.join(result.kept_aside)}"
    if result.destroyed:
        text += f"; destroyed: {', '.join(result.destroyed)}"
    return text + f" (role now {result.role})"


# --------------------------------------------------------------------------- commands


class _Context:
    def __init__(self, arguments: argparse.Namespace) -> None:
        self.arguments = arguments
        self.store = StateStore(arguments.state_dir)

    def config(self) -> ReplicateConfig:
        return load_config(self.arguments.config)

    def jobs(self, names: Sequence[str]) -> list[Job]:
        config = self.config()
        return [config.job(n) for n in names] if names else list(config.jobs)

    def runner(self, job: Job, reporter: Reporter | None = None) -> JobRunner:
        """A runner for ``job``; the daemon's have no reporter (no progress, no estimates)."""
        return JobRunner(
            job,
            self.store,
            zfs_command=self.arguments.zfs_command,
            btrfs_command=self.arguments.btrfs_command,
            retries=self.arguments.retries,
            reporter=reporter,
        )


def command_run(context: _Context) -> int:
    failed = 0
    for job in context.jobs(context.arguments.jobs):
        reporter = None if context.arguments.quiet else make_reporter(prefix=f"{job.name}: ")
        try:
            result = context.runner(job, reporter).run()
        except CarpoolError as error:
            print(f"{PROGRAM}: {job.name}: {error}", file=sys.stderr)
            failed += 1
            continue
        if not context.arguments.quiet:
            print(_format_cycle(result))
    return 1 if failed else 0


def command_status(context: _Context) -> int:
    now = time.time()
    jobs = context.jobs(context.arguments.jobs)
    states = [context.store.load(job.name) for job in jobs]
    if context.arguments.json:
        print(json.dumps([status_record(s, now) for s in states], indent=1))
        return 0
    rows = [("JOB", "ROLE", "LAST SUCCESS", "LAG", "LAST BYTES", "TOTAL", "FAILURES", "ERROR")]
    for state in states:
        rows.append(
            (
                state.job,
                state.role,
                _when(state.last_success),
                _human_seconds(state.lag(now)),
                _human_bytes(state.last_bytes),
                _human_bytes(state.total_bytes),
                str(state.consecutive_failures),
                state.last_error or "-",
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    for row in rows:
        print(
            "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=False)) + "  " + row[-1]
        )
    return 0


def command_failover(context: _Context, action: str) -> int:
    job = context.config().job(context.arguments.job)
    runner = context.runner(job, make_reporter(prefix=f"{job.name}: "))
    method: Callable[[], FailoverResult] = getattr(runner, action)
    result = method()
    print(_format_failover(result))
    return 0


def command_daemon(context: _Context) -> int:
    import asyncio

    from carpool.events import setup_logging
    from carpool.replicate.daemon import ReplicateDaemon

    setup_logging(logging.DEBUG if context.arguments.debug else logging.INFO)
    config = context.config()
    daemon = ReplicateDaemon(
        config,
        context.store,
        context.runner,
        context.arguments.run_dir,
        context.arguments.metrics,
    )
    asyncio.run(daemon.run())
    return 0


# --------------------------------------------------------------------------- entry point


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROGRAM, description="ZFS and btrfs send/receive replication with failover."
    )
    parser.add_argument("-c", dest="config", default=DEFAULT_PATH, help="replicate.toml")
    parser.add_argument("--state-dir", default=DEFAULT_STATE_DIR, help="job state and locks")
    parser.add_argument("--zfs-command", default="zfs", help=argparse.SUPPRESS)
    parser.add_argument("--btrfs-command", default="btrfs", help=argparse.SUPPRESS)
    parser.add_argument(
        "--retries", type=int, default=2, help="retries of an interrupted stream (default 2)"
    )
    parser.add_argument("-v", dest="verbose", action="store_true", help="log debug messages")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    run = commands.add_parser("run", help="one replication cycle of the jobs (all by default)")
    run.add_argument("jobs", nargs="*", metavar="JOB")
    run.add_argument("-q", dest="quiet", action="store_true", help="print nothing on success")
    daemon = commands.add_parser("daemon", help="run the jobs on their schedules")
    daemon.add_argument("--run-dir", type=Path, default=Path("/run/carpool"))
    daemon.add_argument("--metrics", metavar="ADDR", help="serve Prometheus metrics on ADDR")
    daemon.add_argument("-d", dest="debug", action="store_true", help="log debug messages")
    status = commands.add_parser("status", help="last success, lag and bytes per job")
    status.add_argument("jobs", nargs="*", metavar="JOB")
    status.add_argument("-j", "--json", action="store_true", help="JSON output")
    for name, text in (
        ("promote", "make the job's replica writable (failover)"),
        ("reverse", "make the old primary a replica of the promoted target"),
        ("failback", "hand the primary role back to the job's source"),
    ):
        sub = commands.add_parser(name, help=text)
        sub.add_argument("job", metavar="JOB")
    return parser


def main(argv: list[str] | None = None) -> int:
    arguments = build_parser().parse_args(argv)
    if arguments.verbose:
        arguments.debug = True
    logging.basicConfig(
        level=logging.DEBUG if getattr(arguments, "debug", False) else logging.WARNING,
        format="%(message)s",
    )
    context = _Context(arguments)

    def body() -> int:
        if arguments.command == "run":
            return command_run(context)
        if arguments.command == "status":
            return command_status(context)
        if arguments.command == "daemon":
            return command_daemon(context)
        return command_failover(context, arguments.command)

    return run_command(PROGRAM, body)


if __name__ == "__main__":
    sys.exit(main())
