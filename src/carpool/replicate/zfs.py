"""The ``zfs`` command line on one endpoint (local or ssh).

:class:`ZfsCli` builds exact argv lists and runs them through a
:mod:`carpool.replicate.transport` endpoint. It works with OpenZFS and with
Debian's zfs-fuse (pool v23), whose limits shape it:

* no ``zfs list -p``: snapshot names come from ``zfs list -H -o name``, and the
  exact guid/createtxg/creation/userrefs from ``zfs get -Hp`` (parsed by
  :mod:`carpool.replicate.snapshots`);
* no bookmarks, resume tokens, ``send -nvP`` or raw sends: :meth:`ZfsCli.probe`
  finds out by running harmless commands and reading their errors;
* "dataset is busy" (EBUSY) right after a receive is common and can last
  seconds: destroy, rollback, rename, promote, mount and umount retry it with
  backoff for up to ``busy_timeout`` seconds.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from carpool.errors import CarpoolError
from carpool.replicate.plan import Receive, Send
from carpool.replicate.progress import parse_zfs_estimate
from carpool.replicate.snapshots import (
    ZfsSnapshot,
    parse_zfs_get,
    parse_zfs_list,
    zfs_snapshots_from_get,
)
from carpool.replicate.transport import CommandError, Endpoint, Local, Result

__all__ = ["BUSY_MARKERS", "ZfsCapabilities", "ZfsCli", "ZfsError", "is_busy"]

BUSY_MARKERS = ("dataset is busy", "pool is busy", "device busy", "resource busy")
_SNAPSHOT_PROPS = "guid,createtxg,creation,userrefs"


class ZfsError(CarpoolError):
    """A zfs operation that could not be done; the message names the dataset and the cause."""


def is_busy(stderr: str) -> bool:
    """True when a zfs error is the transient EBUSY ("dataset is busy")."""
    low = stderr.lower()
    return any(marker in low for marker in BUSY_MARKERS)


@dataclass(frozen=True)
class ZfsCapabilities:
    """What this ``zfs`` can do (all False on zfs-fuse 0.7.0)."""

    bookmarks: bool
    list_parsable: bool
    resume_tokens: bool
    size_estimate: bool
    raw_send: bool


def _unsupported(result: Result, *markers: str) -> bool:
    text = (result.stderr + result.stdout).lower()
    return any(marker in text for marker in markers)


class ZfsCli:
    """``zfs`` on ``endpoint``. ``zfs`` is the command (a path, or a wrapper in tests)."""

    def __init__(
        self,
        endpoint: Endpoint | None = None,
        *,
        zfs: str = "zfs",
        busy_timeout: float = 60.0,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.endpoint: Endpoint = endpoint if endpoint is not None else Local()
        self.zfs = zfs
        self.busy_timeout = busy_timeout
        self._sleep = sleep
        self._clock = clock
        self._estimates: bool | None = None

    # ------------------------------------------------------------------ running

    def run(self, *args: str, check: bool = True, timeout: float = 120.0) -> Result:
        return self.endpoint.run([self.zfs, *args], timeout=timeout, check=check)

    def _run_busy(self, *args: str) -> Result:
        """Run, retrying while zfs says the dataset is busy (0.25 s doubling to 4 s)."""
        deadline = self._clock() + self.busy_timeout
        delay = 0.25
        attempts = 0
        while True:
            attempts += 1
            result = self.run(*args, check=False)
            if result.returncode == 0:
                return result
            if not is_busy(result.stderr) or self._clock() + delay > deadline:
                error = CommandError(
                    [self.zfs, *args], result.returncode, result.stderr, self.endpoint.describe()
                )
                if is_busy(result.stderr):
                    raise ZfsError(
                        f"{error} (still busy after {attempts} attempts over "
                        f"{self.busy_timeout:g} s; retry later or restart zfs-fuse)"
                    ) from error
                raise error
            self._sleep(delay)
            delay = min(delay * 2, 4.0)

    # ------------------------------------------------------------------ probing

    def probe(self) -> ZfsCapabilities:
        """Capabilities, from harmless commands that only print usage or an error."""
        bookmark = self.run("bookmark", check=False)
        listing = self.run("list", "-H", "-p", "-o", "name", "-d", "0", check=False)
        resume = self.run("recv", "-A", check=False)
        estimate = self.run("send", "-nvP", check=False)
        raw = self.run("send", "-w", check=False)
        return ZfsCapabilities(
            bookmarks=not _unsupported(bookmark, "unrecognized command"),
            list_parsable=listing.returncode == 0
            or not _unsupported(listing, "invalid option", "unrecognized"),
            resume_tokens=not _unsupported(resume, "invalid option"),
            size_estimate=not _unsupported(estimate, "invalid option"),
            raw_send=not _unsupported(raw, "invalid option"),
        )

    # ------------------------------------------------------------------ queries

    def exists(self, dataset: str) -> bool:
        result = self.run("list", "-H", "-o", "name", dataset, check=False)
        if result.returncode == 0:
            return True
        if "does not exist" in result.stderr:
            return False
        raise CommandError(
            [self.zfs, "list", "-H", "-o", "name", dataset],
            result.returncode,
            result.stderr,
            self.endpoint.describe(),
        )

    def snapshots(self, dataset: str) -> list[ZfsSnapshot]:
        """Snapshots of ``dataset`` itself (not its children), oldest first, exact numbers."""
        listing = self.run(
            "list", "-H", "-o", "name", "-t", "snapshot", "-s", "creation", "-r", "-d", "1", dataset
        )
        return self._complete(listing.stdout, dataset)

    def _complete(self, listing: str, dataset: str) -> list[ZfsSnapshot]:
        records = [s for s in parse_zfs_list(listing, columns=("name",)) if s.dataset == dataset]
        if not records:
            return []
        got = self.run(
            "get",
            "-Hp",
            "-o",
            "name,property,value",
            _SNAPSHOT_PROPS,
            *(s.full_name for s in records),
        )
        completed = zfs_snapshots_from_get(parse_zfs_get(got.stdout), base=records)
        missing = [s.full_name for s in completed if s.guid is None or s.createtxg is None]
        if missing:
            raise ZfsError(
                f"zfs get printed no guid/createtxg for {', '.join(missing)}; "
                "was a snapshot destroyed while listing? list again"
            )
        return sorted(completed, key=lambda s: s.createtxg or 0)

    def snapshots_if_exists(self, dataset: str) -> list[ZfsSnapshot] | None:
        """:meth:`snapshots`, or None when ``dataset`` does not exist (one command fewer)."""
        argv = ["list", "-H", "-o", "name", "-t", "snapshot", "-s", "creation", "-r", "-d", "1"]
        listing = self.run(*argv, dataset, check=False)
        if listing.returncode != 0:
            if "does not exist" in listing.stderr:
                return None
            raise CommandError(
                [self.zfs, *argv, dataset],
                listing.returncode,
                listing.stderr,
                self.endpoint.describe(),
            )
        return self._complete(listing.stdout, dataset)

    def snapshot_record(self, full_name: str) -> ZfsSnapshot:
        """One snapshot's record (guid, createtxg, creation, userrefs) from one ``zfs get``."""
        got = self.run("get", "-Hp", "-o", "name,property,value", _SNAPSHOT_PROPS, full_name)
        records = zfs_snapshots_from_get(parse_zfs_get(got.stdout))
        if len(records) != 1 or records[0].guid is None or records[0].createtxg is None:
            raise ZfsError(f"zfs get printed no guid/createtxg for {full_name}; list it again")
        return records[0]

    def get(self, dataset: str, prop: str) -> str:
        return self.run("get", "-Hp", "-o", "value", prop, dataset).stdout.rstrip("\n")

    # ------------------------------------------------------------------ changes

    def create(self, dataset: str, *, properties: Sequence[tuple[str, str]] = ()) -> None:
        args: list[str] = ["create"]
        for name, value in properties:
            args += ["-o", f"{name}={value}"]
        self.run(*args, dataset)

    def snapshot(self, full_name: str, *, recursive: bool = False) -> None:
        self.run("snapshot", *(["-r"] if recursive else []), full_name)

    def destroy(self, name: str, *, recursive: bool = False) -> None:
        """``zfs destroy [-r] name``; a held snapshot fails at once instead of being retried.

        A hold makes ``zfs destroy`` say "dataset is busy" just like the
        transient EBUSY, so the first busy answer for a snapshot checks
        ``userrefs`` before retrying.
        """
        args = ["destroy", *(["-r"] if recursive else []), name]
        result = self.run(*args, check=False)
        if result.returncode == 0:
            return
        if is_busy(result.stderr) and "@" in name:
            refs = self.run("get", "-Hp", "-o", "value", "userrefs", name, check=False)
            if refs.returncode == 0 and refs.stdout.strip() not in ("", "-", "0"):
                raise ZfsError(
                    f"cannot destroy {name}: it is held ({refs.stdout.strip()} zfs hold(s)); "
                    "release the hold (zfs release TAG SNAPSHOT) first"
                )
        if not is_busy(result.stderr):
            raise CommandError(
                [self.zfs, *args], result.returncode, result.stderr, self.endpoint.describe()
            )
        self._run_busy(*args)

    def rollback(self, full_name: str, *, recursive: bool = False) -> None:
        self._run_busy("rollback", *(["-r"] if recursive else []), full_name)

    def hold(self, tag: str, full_name: str) -> None:
        self.run("hold", tag, full_name)

    def release(self, tag: str, full_name: str, *, missing_ok: bool = False) -> None:
        result = self.run("release", tag, full_name, check=False)
        if result.returncode == 0:
            return
        if missing_ok and ("no such tag" in result.stderr or "does not exist" in result.stderr):
            return
        raise CommandError(
            [self.zfs, "release", tag, full_name],
            result.returncode,
            result.stderr,
            self.endpoint.describe(),
        )

    def bookmark(self, full_name: str, bookmark: str) -> None:
        self.run("bookmark", full_name, bookmark)

    def set(self, dataset: str, prop: str, value: str) -> None:
        self.run("set", f"{prop}={value}", dataset)

    def mount(self, dataset: str) -> None:
        result = self.run("mount", dataset, check=False)
        if result.returncode == 0 or "already mounted" in result.stderr:
            return
        self._run_busy("mount", dataset)

    def umount(self, dataset: str) -> None:
        result = self.run("umount", dataset, check=False)
        if result.returncode == 0 or "not currently mounted" in result.stderr:
            return
        self._run_busy("umount", dataset)

    def clone(self, full_name: str, clone: str) -> None:
        self.run("clone", full_name, clone)

    def promote(self, dataset: str) -> None:
        self._run_busy("promote", dataset)

    def rename(self, old: str, new: str) -> None:
        self._run_busy("rename", old, new)

    # ------------------------------------------------------------------ streams

    def send_argv(self, step: Send, dataset: str) -> list[str]:
        """``zfs send [-i|-I base] dataset@snapshot`` for a planner :class:`Send`."""
        argv = [self.zfs, "send"]
        if step.kind == "incremental":
            if step.base is None:
                raise ZfsError(f"incremental send of {step.snapshot} has no base")
            sep = "#" if step.base_is_bookmark else "@"
            argv += ["-I" if step.intermediates else "-i", f"{dataset}{sep}{step.base}"]
        argv.append(f"{dataset}@{step.snapshot}")
        return argv

    def estimate(self, step: Send, dataset: str) -> int | None:
        """The stream size ``zfs send -nvP`` predicts for ``step``; None where it cannot.

        zfs-fuse has no ``-n``/``-P``: the first "invalid option" answer turns
        the estimate off for this endpoint. Failures never stop a transfer.
        """
        if self._estimates is False:
            return None
        argv = self.send_argv(step, dataset)
        try:
            result = self.run("send", "-nvP", *argv[2:], check=False, timeout=60.0)
        except CommandError:
            return None
        if result.returncode != 0:
            if _unsupported(result, "invalid option", "usage:"):
                self._estimates = False
            return None
        self._estimates = True
        return parse_zfs_estimate(result.stdout + "\n" + result.stderr)

    def recv_argv(self, step: Receive, dataset: str) -> list[str]:
        """``zfs recv [-F] -u dataset`` for a planner :class:`Receive` (never mounted by recv)."""
        return [self.zfs, "recv", *(["-F"] if step.force else []), "-u", dataset]
