"""The ``btrfs`` command line on one endpoint (local or ssh).

:class:`BtrfsCli` runs ``btrfs`` through a :mod:`carpool.replicate.transport`
endpoint. A btrfs job has a *live* subvolume and a *snapshot directory*
holding read-only snapshots named as carpool names them; the target has a
snapshot directory that ``btrfs receive`` writes into. Records come from
``btrfs subvolume show`` (exact uuid / received_uuid / parent / cgen, with the
creation time's zone), parsed by :mod:`carpool.replicate.snapshots`.

Planner steps map to: :class:`~carpool.replicate.plan.Snapshot` →
``btrfs subvolume snapshot -r LIVE DIR/NAME``; ``Send`` → ``btrfs send [-p
DIR/BASE] DIR/NAME``; ``Receive`` → ``btrfs receive DIR``; ``Destroy`` →
``btrfs subvolume delete DIR/NAME``; ``Clone`` → a writable ``btrfs
subvolume snapshot``; ``SetProperty`` → ``btrfs property set -ts PATH ro
true|false``.
"""

from __future__ import annotations

import posixpath

from carpool.errors import CarpoolError
from carpool.replicate.plan import Receive, Send
from carpool.replicate.progress import parse_du_total
from carpool.replicate.snapshots import BtrfsSnapshot, parse_btrfs_subvolume_show
from carpool.replicate.transport import CommandError, Endpoint, Local

__all__ = ["BtrfsCli", "BtrfsError"]


class BtrfsError(CarpoolError):
    """A btrfs operation that could not be done; the message names the path and the cause."""


class BtrfsCli:
    """``btrfs`` on ``endpoint``; ``btrfs`` is the command (a path, or a wrapper in tests)."""

    def __init__(self, endpoint: Endpoint | None = None, *, btrfs: str = "btrfs") -> None:
        self.endpoint: Endpoint = endpoint if endpoint is not None else Local()
        self.btrfs = btrfs

    def _run(self, *args: str, timeout: float = 120.0) -> str:
        return self.endpoint.run([self.btrfs, *args], timeout=timeout).stdout

    # ------------------------------------------------------------------ queries

    def is_subvolume(self, path: str) -> bool:
        result = self.endpoint.run([self.btrfs, "subvolume", "show", path], check=False)
        return result.returncode == 0

    def show(self, path: str) -> BtrfsSnapshot:
        record = parse_btrfs_subvolume_show(self._run("subvolume", "show", path))
        # `show` prints the path relative to the filesystem root; keep the one asked for
        return BtrfsSnapshot(
            path=path,
            uuid=record.uuid,
            received_uuid=record.received_uuid,
            parent_uuid=record.parent_uuid,
            generation=record.generation,
            cgen=record.cgen,
            subvol_id=record.subvol_id,
            otime=record.otime,
            readonly=record.readonly,
        )

    def snapshots(self, directory: str, prefix: str | None = None) -> list[BtrfsSnapshot]:
        """Read-only subvolumes directly in ``directory`` (names starting ``prefix``), by cgen."""
        listing = self.endpoint.run(
            ["find", directory, "-mindepth", "1", "-maxdepth", "1", "-type", "d", "-print0"]
        )
        records = []
        for path in sorted(p for p in listing.stdout.split("\0") if p):
            name = posixpath.basename(path)
            if prefix is not None and not name.startswith(prefix):
                continue
            if not self.is_subvolume(path):
                continue
            record = self.show(path)
            if record.readonly:
                records.append(record)
        return sorted(records, key=lambda r: (r.cgen or 0, r.name))

    # ------------------------------------------------------------------ changes

    def snapshot(self, live: str, dest: str, *, readonly: bool = True) -> None:
        self._run("subvolume", "snapshot", *(["-r"] if readonly else []), live, dest)

    def delete(self, path: str, *, commit: bool = False) -> None:
        """``btrfs subvolume delete``; with ``commit`` it waits for the transaction (slow)."""
        self._run("subvolume", "delete", *(["--commit-after"] if commit else []), path)

    def set_readonly(self, path: str, readonly: bool) -> None:
        """``btrfs property set -ts PATH ro``; refused (by btrfs) on a received snapshot."""
        try:
            self._run("property", "set", "-ts", path, "ro", "true" if readonly else "false")
        except CommandError as exc:
            if "received_uuid" in exc.stderr:
                raise BtrfsError(
                    f"{path} is a received snapshot and cannot be made writable (btrfs keeps its "
                    "received_uuid); make a writable snapshot of it instead (promote does)"
                ) from exc
            raise

    def rename(self, old: str, new: str) -> None:
        self.endpoint.run(["mv", "-T", "--", old, new])

    def sync(self, path: str) -> None:
        """Flush the filesystem holding ``path`` (a received stream is not durable before)."""
        self._run("filesystem", "sync", path)

    # ------------------------------------------------------------------ streams

    def send_argv(self, step: Send, directory: str) -> list[str]:
        """``btrfs send [-p DIR/base] DIR/snapshot`` for a planner :class:`Send`."""
        if step.intermediates:
            raise BtrfsError("btrfs sends one snapshot per stream; the plan must chain them")
        argv = [self.btrfs, "send"]
        if step.kind == "incremental":
            if step.base is None:
                raise BtrfsError(f"incremental send of {step.snapshot} has no base")
            argv += ["-p", posixpath.join(directory, step.base)]
        argv.append(posixpath.join(directory, step.snapshot))
        return argv

    def estimate(self, step: Send, directory: str) -> int | None:
        """The size of a full send (``btrfs filesystem du`` of the snapshot); None otherwise.

        ``btrfs send`` has no dry run; an incremental's size is unknown.
        """
        if step.kind != "full":
            return None
        path = posixpath.join(directory, step.snapshot)
        try:
            result = self.endpoint.run(
                [self.btrfs, "filesystem", "du", "-s", "--raw", path], timeout=60.0, check=False
            )
        except CommandError:
            return None
        return parse_du_total(result.stdout) if result.returncode == 0 else None

    def recv_argv(self, step: Receive, directory: str) -> list[str]:
        """``btrfs receive DIR`` (the stream names the snapshot it creates)."""
        del step  # btrfs receive takes no per-snapshot argument
        return [self.btrfs, "receive", directory]
