"""Progress of a replication stream for ``zfs-replicate run``: a bar on a terminal, lines otherwise.

The executors call a :class:`Reporter` around each stream: ``begin(label,
estimate)`` before it (``estimate`` from ``zfs send -nvP`` or the size of a
btrfs snapshot, None when the backend cannot tell), then ``update(count)``
with the running byte count, then ``end()``. Nothing here is used by the
daemon.

* :class:`Meter` holds the arithmetic (rate over a sliding window, ETA from
  the estimate) and takes the time as an argument, so it is tested without a
  clock or a terminal; :func:`format_line` turns a reading into one line.
* :class:`LineReporter` writes that line at most once per second to a
  non-terminal stream (a log, cron mail); a stream shorter than a second
  prints nothing.
* :class:`BarReporter` draws a ``rich.progress`` bar (bytes, rate, ETA) when
  the stream is a terminal. rich is imported only then.
* :func:`parse_zfs_estimate` / :func:`parse_du_total` read the size estimates.
"""

from __future__ import annotations

import sys
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol, TextIO

__all__ = [
    "BarReporter",
    "LineReporter",
    "Meter",
    "Reading",
    "Reporter",
    "format_line",
    "human_bytes",
    "human_duration",
    "make_reporter",
    "parse_du_total",
    "parse_zfs_estimate",
]

WINDOW = 5.0  # seconds of samples the rate is computed over


class Reporter(Protocol):
    def begin(self, label: str, estimate: int | None) -> None: ...

    def update(self, count: int) -> None: ...

    def end(self) -> None: ...


# --------------------------------------------------------------------------- estimates


def parse_zfs_estimate(text: str) -> int | None:
    """The stream size from ``zfs send -nvP`` output (its ``size`` line, else the per-send lines).

    OpenZFS prints ``full\\tpool/fs@b\\t<bytes>`` or ``incremental\\t@a\\tpool/fs@b\\t<bytes>``
    per stream and, with ``-I`` or several streams, a final ``size\\t<bytes>``.
    """
    total: int | None = None
    parts: list[int] = []
    for line in text.splitlines():
        fields = line.split("\t") if "\t" in line else line.split()
        if len(fields) < 2 or not fields[-1].isdigit():
            continue
        if fields[0] == "size":
            total = int(fields[-1])
        elif fields[0] in ("full", "incremental"):
            parts.append(int(fields[-1]))
    if total is not None:
        return total
    return sum(parts) if parts else None


def parse_du_total(text: str) -> int | None:
    """``Total`` of the last row of ``btrfs filesystem du -s --raw PATH`` (None if unreadable)."""
    rows = [line.split() for line in text.splitlines() if line.strip()]
    for fields in reversed(rows):
        if fields and fields[0].isdigit():
            return int(fields[0])
    return None


# --------------------------------------------------------------------------- formatting


def human_bytes(count: float) -> str:
    value = float(count)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def human_duration(seconds: float) -> str:
    """``m:ss`` under an hour, ``h:mm:ss`` above."""
    whole = max(0, round(seconds))
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


@dataclass(frozen=True)
class Reading:
    """One look at a stream: bytes so far, the estimate, bytes/s, seconds left (None: unknown)."""

    count: int
    estimate: int | None
    rate: float | None
    eta: float | None
    elapsed: float

    @property
    def fraction(self) -> float | None:
        if not self.estimate:
            return None
        return min(1.0, self.count / self.estimate)


def format_line(label: str, reading: Reading) -> str:
    """``label: 12.0 MiB / 50.0 MiB (24%), 3.0 MiB/s, ETA 0:13`` (parts left out when unknown)."""
    text = f"{label}: {human_bytes(reading.count)}"
    if reading.estimate:
        fraction = reading.fraction or 0.0
        text += f" / ~{human_bytes(reading.estimate)} ({fraction * 100:.0f}%)"
    if reading.rate is not None:
        text += f", {human_bytes(reading.rate)}/s"
    if reading.eta is not None:
        text += f", ETA {human_duration(reading.eta)}"
    return text + f", {human_duration(reading.elapsed)} elapsed"


class Meter:
    """Rate and ETA of one stream from ``(time, count)`` samples; pure (time is an argument)."""

    def __init__(self, started: float, estimate: int | None, window: float = WINDOW) -> None:
        self.started = started
        self.estimate = estimate if estimate and estimate > 0 else None
        self.window = window
        self.count = 0
        self._samples: deque[tuple[float, int]] = deque([(started, 0)])

    def update(self, now: float, count: int) -> None:
        self.count = count
        self._samples.append((now, count))
        while len(self._samples) > 2 and now - self._samples[1][0] >= self.window:
            self._samples.popleft()

    def rate(self, now: float) -> float | None:
        first_time, first_count = self._samples[0]
        span = now - first_time
        if span <= 0:
            return None
        return (self.count - first_count) / span

    def reading(self, now: float) -> Reading:
        rate = self.rate(now)
        eta: float | None = None
        if self.estimate is not None and rate:
            eta = max(0.0, (self.estimate - self.count) / rate)
        return Reading(self.count, self.estimate, rate, eta, now - self.started)


# --------------------------------------------------------------------------- reporters


class LineReporter:
    """At most one :func:`format_line` per ``interval`` seconds on ``out``, none in the first."""

    def __init__(
        self,
        out: TextIO,
        prefix: str = "",
        *,
        interval: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.out = out
        self.prefix = prefix
        self.interval = interval
        self.clock = clock
        self.meter: Meter | None = None
        self.label = ""
        self._next = 0.0
        self.lines = 0

    def begin(self, label: str, estimate: int | None) -> None:
        now = self.clock()
        self.label = f"{self.prefix}{label}"
        self.meter = Meter(now, estimate)
        self._next = now + self.interval

    def update(self, count: int) -> None:
        if self.meter is None:
            return
        now = self.clock()
        self.meter.update(now, count)
        if now >= self._next:
            self._next = now + self.interval
            self.out.write(format_line(self.label, self.meter.reading(now)) + "\n")
            self.out.flush()
            self.lines += 1

    def end(self) -> None:
        self.meter = None


class BarReporter:
    """A ``rich.progress`` bar per stream: bytes, estimate, rate and ETA (pulsing without one)."""

    def __init__(self, out: TextIO, prefix: str = "") -> None:
        self.out = out
        self.prefix = prefix
        self._progress: Any = None
        self._task: Any = None
        self._total: int | None = None

    def begin(self, label: str, estimate: int | None) -> None:
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            Progress,
            TextColumn,
            TimeRemainingColumn,
            TransferSpeedColumn,
        )

        self.end()
        self._progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            DownloadColumn(binary_units=True),
            TransferSpeedColumn(),
            TimeRemainingColumn(),
            console=Console(file=self.out),
            transient=True,
        )
        self._total = estimate if estimate and estimate > 0 else None
        self._task = self._progress.add_task(f"{self.prefix}{label}", total=self._total)
        self._progress.start()

    def update(self, count: int) -> None:
        if self._progress is None:
            return
        if self._total is not None and count > self._total:
            self._total = count  # the estimate was low: keep the bar honest
            self._progress.update(self._task, total=count)
        self._progress.update(self._task, completed=count)

    def end(self) -> None:
        if self._progress is not None:
            self._progress.stop()
        self._progress = None
        self._task = None


def make_reporter(out: TextIO | None = None, prefix: str = "") -> Reporter:
    """A bar when ``out`` (stdout by default) is a terminal, one line per second otherwise."""
    stream = out if out is not None else sys.stdout
    if stream.isatty():
        return BarReporter(stream, prefix)
    return LineReporter(stream, prefix)
