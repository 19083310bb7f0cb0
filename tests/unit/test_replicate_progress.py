"""Progress of a stream: size estimates, rate/ETA arithmetic, the line and bar reporters."""

from __future__ import annotations

import io
import subprocess
from collections.abc import Sequence
from pathlib import Path

import pytest

from carpool.replicate.btrfs import BtrfsCli
from carpool.replicate.executor import stream_label, with_reporter
from carpool.replicate.plan import Send
from carpool.replicate.progress import (
    BarReporter,
    LineReporter,
    Meter,
    Reading,
    format_line,
    human_duration,
    make_reporter,
    parse_du_total,
    parse_zfs_estimate,
)
from carpool.replicate.transport import DEFAULT_TIMEOUT, Result
from carpool.replicate.zfs import ZfsCli

MiB = 1024 * 1024

# --------------------------------------------------------------------------- estimates


def test_zfs_estimate_full_incremental_and_size_line() -> None:
    assert parse_zfs_estimate("full\ttank/a@s2\t52584032\nsize\t52584032\n") == 52584032
    assert parse_zfs_estimate("incremental\t@s1\ttank/a@s2\t4096\n") == 4096
    several = "incremental\ts1\ttank/a@s2\t1000\nincremental\ts2\ttank/a@s3\t2000\nsize\t3000\n"
    assert parse_zfs_estimate(several) == 3000
    assert parse_zfs_estimate("incremental\ts1\ttank/a@s2\t1000\nfull\ttank/b@x\t24\n") == 1024


def test_zfs_estimate_unknown() -> None:
    assert parse_zfs_estimate("") is None
    assert parse_zfs_estimate("invalid option 'n'\nusage:\n\tsend [-RDp] ...") is None
    assert parse_zfs_estimate("full\ttank/a@s2\t-\n") is None


def test_du_total() -> None:
    text = (
        "     Total   Exclusive  Set shared  Filename\n"
        "   5242880           0     5242880  /mnt/snaps/autorep-1\n"
    )
    assert parse_du_total(text) == 5242880
    assert parse_du_total("     Total   Exclusive  Set shared  Filename\n") is None
    assert parse_du_total("") is None


class Answering:
    """An endpoint whose commands print ``stdout`` / ``stderr`` and exit ``rc``; records argv."""

    def __init__(self, rc: int, stdout: str = "", stderr: str = "") -> None:
        self.answer = Result(rc, stdout, stderr)
        self.commands: list[list[str]] = []

    def describe(self) -> str:
        return "recorded"

    def wrap(self, argv: Sequence[str]) -> list[str]:
        return list(argv)

    def run(
        self,
        argv: Sequence[str],
        input: str | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        *,
        check: bool = True,
    ) -> Result:
        self.commands.append(list(argv))
        return self.answer

    def start(
        self, argv: Sequence[str], *, stdin: int | None = None, stdout: int | None = None
    ) -> subprocess.Popen[bytes]:
        raise AssertionError("no stream in these tests")


def test_zfs_cli_estimate_runs_send_dry_run() -> None:
    endpoint = Answering(0, "incremental\t@a\ttank/fs@b\t123456\nsize\t123456\n")
    zfs = ZfsCli(endpoint)
    step = Send("source", "incremental", "b", "a", intermediates=True)
    assert zfs.estimate(step, "tank/fs") == 123456
    assert endpoint.commands == [["zfs", "send", "-nvP", "-I", "tank/fs@a", "tank/fs@b"]]


def test_zfs_cli_estimate_off_after_invalid_option() -> None:
    endpoint = Answering(2, "", "invalid option 'n'\nusage:\n\tsend [-RDp] [-[iI] snapshot]")
    zfs = ZfsCli(endpoint)
    step = Send("source", "full", "b")
    assert zfs.estimate(step, "tank/fs") is None
    assert zfs.estimate(step, "tank/fs") is None
    assert len(endpoint.commands) == 1  # zfs-fuse: asked once per endpoint


def test_btrfs_estimate_only_for_full_sends() -> None:
    endpoint = Answering(0, "  Total  Exclusive  Set shared  Filename\n  4096  0  4096  /s/x\n")
    btrfs = BtrfsCli(endpoint)
    assert btrfs.estimate(Send("source", "full", "x"), "/s") == 4096
    assert endpoint.commands == [["btrfs", "filesystem", "du", "-s", "--raw", "/s/x"]]
    assert btrfs.estimate(Send("source", "incremental", "y", "x"), "/s") is None
    assert len(endpoint.commands) == 1
    assert BtrfsCli(Answering(1, "", "ERROR")).estimate(Send("source", "full", "x"), "/s") is None


# --------------------------------------------------------------------------- meter, lines


def test_meter_rate_and_eta() -> None:
    meter = Meter(started=100.0, estimate=100 * MiB)
    assert meter.reading(100.0).rate is None
    meter.update(101.0, 10 * MiB)
    meter.update(102.0, 20 * MiB)
    reading = meter.reading(102.0)
    assert reading.rate == pytest.approx(10 * MiB)
    assert reading.eta == pytest.approx(8.0)
    assert reading.fraction == pytest.approx(0.2)
    assert reading.elapsed == pytest.approx(2.0)


def test_meter_rate_follows_the_recent_window() -> None:
    meter = Meter(started=0.0, estimate=None, window=5.0)
    for second in range(1, 11):  # 1 MiB/s for 10 s
        meter.update(float(second), second * MiB)
    for second in range(11, 21):  # then 3 MiB/s
        meter.update(float(second), 10 * MiB + (second - 10) * 3 * MiB)
    reading = meter.reading(20.0)
    assert reading.rate == pytest.approx(3 * MiB, rel=0.01)
    assert reading.eta is None and reading.fraction is None


def test_meter_estimate_exceeded_and_stalled() -> None:
    meter = Meter(started=0.0, estimate=10 * MiB)
    meter.update(1.0, 12 * MiB)
    reading = meter.reading(1.0)
    assert reading.eta == 0.0 and reading.fraction == 1.0
    stalled = Meter(started=0.0, estimate=10 * MiB)
    stalled.update(3.0, 0)
    assert stalled.reading(3.0).rate == 0.0 and stalled.reading(3.0).eta is None
    assert Meter(started=0.0, estimate=0).estimate is None


def test_format_line() -> None:
    known = Reading(12 * MiB, 48 * MiB, 3 * MiB, 12.0, 4.0)
    assert format_line("app", known) == (
        "app: 12.0 MiB / ~48.0 MiB (25%), 3.0 MiB/s, ETA 0:12, 0:04 elapsed"
    )
    unknown = Reading(1536, None, None, None, 0.4)
    assert format_line("app", unknown) == "app: 1.5 KiB, 0:00 elapsed"
    assert human_duration(3725) == "1:02:05"
    assert human_duration(59.6) == "1:00"


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_line_reporter_prints_once_per_second() -> None:
    out = io.StringIO()
    clock = Clock()
    reporter = LineReporter(out, "job: ", clock=clock)
    reporter.begin("tank/a@s2", 40 * MiB)
    for tenth in range(1, 36):  # 3.5 s at 10 MiB/s, a callback every 0.1 s
        clock.now = tenth / 10
        reporter.update(tenth * MiB)
    reporter.end()
    lines = out.getvalue().splitlines()
    assert len(lines) == 3 == reporter.lines
    assert lines[0].startswith("job: tank/a@s2: 10.0 MiB / ~40.0 MiB (25%), 10.0 MiB/s, ETA 0:03")
    assert lines[-1].startswith("job: tank/a@s2: 30.0 MiB / ~40.0 MiB (75%)")
    reporter.update(99 * MiB)  # after end(): nothing
    assert out.getvalue().count("\n") == 3


def test_line_reporter_short_stream_prints_nothing() -> None:
    out = io.StringIO()
    clock = Clock()
    reporter = LineReporter(out, clock=clock)
    reporter.begin("tank/a@s2", None)
    clock.now = 0.5
    reporter.update(MiB)
    reporter.end()
    assert out.getvalue() == ""


# --------------------------------------------------------------------------- choosing


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_make_reporter_bar_only_on_a_terminal() -> None:
    assert isinstance(make_reporter(io.StringIO()), LineReporter)
    assert isinstance(make_reporter(Terminal()), BarReporter)


def test_bar_reporter_draws_bytes_and_survives_a_low_estimate() -> None:
    out = Terminal()
    bar = BarReporter(out, "job: ")
    bar.begin("tank/a@s2", 4 * MiB)
    bar.update(2 * MiB)
    bar.update(6 * MiB)  # more than estimated
    bar.end()
    bar.begin("tank/a@s3 (from @s2)", None)
    bar.update(MiB)
    bar.end()
    bar.end()
    assert "job: tank/a@s2" in out.getvalue()


def test_stream_label_and_tee() -> None:
    assert stream_label(Send("source", "full", "s2"), "tank/a") == "tank/a@s2"
    step = Send("source", "incremental", "s3", "s2", base_is_bookmark=True)
    assert stream_label(step, "tank/a") == "tank/a@s3 (from #s2)"
    assert stream_label(Send("source", "incremental", "s3", "s2")) == "s3 (from s2)"
    seen: list[int] = []
    out = io.StringIO()
    clock = Clock()
    reporter = LineReporter(out, clock=clock)
    reporter.begin("x", None)
    feed = with_reporter(seen.append, reporter)
    assert feed is not None
    clock.now = 2.0
    feed(5)
    assert seen == [5] and reporter.lines == 1
    assert with_reporter(None, None) is None
    assert with_reporter(seen.append, None) == seen.append


def test_the_daemon_runs_jobs_without_a_reporter(tmp_path: Path) -> None:
    from carpool.replicate.cli import _Context, build_parser
    from carpool.replicate.config import parse_config

    config = parse_config('[job.a]\nsource = "p/a"\ntarget = "q/a"\n', "r.toml")
    arguments = build_parser().parse_args(["--state-dir", str(tmp_path), "daemon"])
    runner = _Context(arguments).runner(config.job("a"))  # what ReplicateDaemon calls
    assert runner.reporter is None and runner.progress is None
