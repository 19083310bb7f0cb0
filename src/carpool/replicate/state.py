"""What zfs-replicate remembers between runs, and the one-lock-per-dataset rule.

Each job's :class:`JobState` is one JSON file ``<state-dir>/jobs/<job>.json``
written with write, fsync, rename and an fsync of the directory, so a crash
leaves either the old or the new state, never half of one. ``status`` reads
these files; the daemon and ``run`` write them.

:class:`DatasetLock` is an exclusive ``flock`` on
``<state-dir>/locks/<dataset>.lock``: two runs (a cron ``run`` and the
daemon, or two jobs sharing a dataset) never work on one dataset at once. The
kernel drops the lock when the holder dies, so a crash leaves no stale lock.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from types import TracebackType
from typing import Any

from carpool.errors import CarpoolError

__all__ = [
    "DEFAULT_STATE_DIR",
    "DatasetLock",
    "DatasetLocked",
    "JobState",
    "StateStore",
    "write_atomically",
]

DEFAULT_STATE_DIR = "/var/lib/carpool/replicate"


class DatasetLocked(CarpoolError):
    """Another zfs-replicate holds the lock of a dataset this run needs."""


@dataclass(frozen=True)
class JobState:
    """The last outcome of one job (times are seconds since the epoch).

    ``snapshot_time`` is when the newest snapshot now on the target was taken
    on the source: the replication lag is ``now - snapshot_time``.
    ``last_stream_seconds`` is the part of the last cycle spent streaming. ``role``
    is ``normal`` (source is primary), ``promoted`` (the target was made
    writable), ``reversed`` (the target is primary and the source its
    replica).
    """

    job: str
    last_attempt: float | None = None
    last_success: float | None = None
    last_snapshot: str | None = None
    snapshot_time: float | None = None
    last_bytes: int = 0
    total_bytes: int = 0
    last_seconds: float | None = None
    last_stream_seconds: float | None = None
    last_action: str | None = None
    successes: int = 0
    failures: int = 0
    consecutive_failures: int = 0
    last_error: str | None = None
    role: str = "normal"

    def lag(self, now: float) -> float | None:
        """Seconds between ``now`` and the newest replicated snapshot (None: never replicated)."""
        return None if self.snapshot_time is None else max(0.0, now - self.snapshot_time)

    def succeeded(
        self,
        *,
        at: float,
        snapshot: str | None,
        snapshot_time: float | None,
        sent: int,
        seconds: float,
        action: str,
        stream_seconds: float | None = None,
    ) -> JobState:
        return replace(
            self,
            last_attempt=at,
            last_success=at,
            last_snapshot=snapshot if snapshot is not None else self.last_snapshot,
            snapshot_time=snapshot_time if snapshot_time is not None else self.snapshot_time,
            last_bytes=sent,
            total_bytes=self.total_bytes + sent,
            last_seconds=seconds,
            last_stream_seconds=stream_seconds,
            last_action=action,
            successes=self.successes + 1,
            consecutive_failures=0,
            last_error=None,
        )

    def failed(self, *, at: float, error: str, seconds: float) -> JobState:
        return replace(
            self,
            last_attempt=at,
            last_seconds=seconds,
            last_action="failed",
            failures=self.failures + 1,
            consecutive_failures=self.consecutive_failures + 1,
            last_error=error,
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: object) -> JobState:
        if not isinstance(data, dict) or not isinstance(data.get("job"), str):
            raise ValueError("not a job state object")
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


def write_atomically(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data``: temporary file, fsync, rename, fsync of the directory."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)
    try:
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            temporary.unlink()
        raise
    directory = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def _file_name(text: str) -> str:
    """A file name for a job or dataset: unsafe characters become ``_`` plus a checksum."""
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", text)
    if safe == text and not text.startswith("."):
        return text
    return f"{safe.lstrip('.')}-{abs(hash_text(text)):08x}"


def hash_text(text: str) -> int:
    """A stable (not per-process randomized) 32-bit hash of ``text``."""
    value = 2166136261
    for byte in text.encode():
        value = ((value ^ byte) * 16777619) & 0xFFFFFFFF
    return value


class StateStore:
    """Job states under ``directory`` (created on first write)."""

    def __init__(self, directory: str | os.PathLike[str] = DEFAULT_STATE_DIR) -> None:
        self.directory = Path(directory)

    def path(self, job: str) -> Path:
        return self.directory / "jobs" / f"{_file_name(job)}.json"

    def load(self, job: str) -> JobState:
        """The job's state; a fresh one when nothing was recorded yet."""
        path = self.path(job)
        try:
            text = path.read_text()
        except FileNotFoundError:
            return JobState(job)
        except OSError as exc:
            raise CarpoolError(f"cannot read the state of job {job!r} ({path}): {exc}") from exc
        try:
            return JobState.from_dict(json.loads(text))
        except (ValueError, TypeError) as exc:
            raise CarpoolError(
                f"the state file {path} is damaged ({exc}); remove it and the next run "
                "records a fresh one"
            ) from exc

    def save(self, state: JobState) -> None:
        try:
            write_atomically(
                self.path(state.job), json.dumps(state.to_dict(), indent=1).encode() + b"\n"
            )
        except OSError as exc:
            raise CarpoolError(
                f"cannot record the state of job {state.job!r} under {self.directory}: {exc}; "
                "pick a writable --state-dir"
            ) from exc


class DatasetLock:
    """Exclusive, non-blocking lock of one or more datasets (``with`` statement)."""

    def __init__(self, directory: str | os.PathLike[str], *names: str) -> None:
        self.directory = Path(directory) / "locks"
        self.names = sorted(set(names))
        self._fds: list[int] = []

    def acquire(self) -> None:
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise CarpoolError(
                f"cannot create the lock directory {self.directory}: {exc}; "
                "pick a writable --state-dir"
            ) from exc
        try:
            for name in self.names:
                path = self.directory / f"{_file_name(name)}.lock"
                fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    holder = os.pread(fd, 32, 0).decode(errors="replace").strip()
                    os.close(fd)
                    raise DatasetLocked(
                        f"{name} is being replicated by another zfs-replicate"
                        + (f" (pid {holder})" if holder else "")
                        + "; wait for it to finish"
                    ) from None
                os.ftruncate(fd, 0)
                os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
                self._fds.append(fd)
        except BaseException:
            self.release()
            raise

    def release(self) -> None:
        while self._fds:
            fd = self._fds.pop()
            with contextlib.suppress(OSError):
                fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def __enter__(self) -> DatasetLock:
        self.acquire()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.release()
