"""ZFS replication on real zfs-fuse pools (file-backed): plan_replication + execute.

zfs-fuse is one daemon per machine on a fixed socket, so the fixture uses a
running daemon when there is one and otherwise starts its own (as the
Debian init script does) and stops only that one, by its PID. Pools get
unique per-run names ("cpr" + random) so a stale pool of another run never
collides.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import secrets
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from carpool.replicate.executor import TargetModified, execute
from carpool.replicate.plan import (
    Action,
    Plan,
    ReplicationPolicy,
    ReplicationRefused,
)
from carpool.replicate.retention import RetentionPolicy
from carpool.replicate.snapshots import ZfsSnapshot, unique_snapshot_name
from carpool.replicate.transport import Local
from carpool.replicate.zfs import ZfsCli, ZfsError, is_busy

ZFS_FUSE = "/usr/sbin/zfs-fuse"

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root: runs the zfs-fuse daemon"),
    pytest.mark.skipif(
        not os.path.exists(ZFS_FUSE),
        reason=f"needs zfs-fuse ({ZFS_FUSE}); install the Debian package zfs-fuse",
    ),
]


# --------------------------------------------------------------------------- daemon


def _run(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)


def _daemon_running() -> bool:
    found = _run("pgrep", "-x", "zfs-fuse").stdout.split()
    return any(_alive(int(pid)) for pid in found)


def _alive(pid: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    return "\nState:\tZ" not in status  # a zombie (no reaping init here) counts as gone


class Daemon:
    """A zfs-fuse daemon this module started (and so may stop)."""

    def __init__(self, pidfile: Path) -> None:
        self.pidfile = pidfile
        self.pid: int | None = None

    def start(self) -> None:
        if self.pidfile.exists():
            self.pidfile.unlink()  # a stale pidfile makes zfs-fuse exit 1 silently
        started = _run(
            "sh",
            "-c",
            f"ulimit -v unlimited; ulimit -s unlimited; exec {ZFS_FUSE} --pidfile {self.pidfile}",
        )
        assert started.returncode == 0, f"zfs-fuse did not start: {started.stderr}"
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            text = self.pidfile.read_text().strip() if self.pidfile.exists() else ""
            if text and _run("zpool", "list").returncode == 0:
                self.pid = int(text)
                return
            time.sleep(0.2)
        raise AssertionError("zfs-fuse started but 'zpool list' did not answer within 30 s")

    def stop(self) -> None:
        if self.pid is None:
            return
        pid, self.pid = self.pid, None
        if _alive(pid):
            os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + 10
            while _alive(pid) and time.monotonic() < deadline:
                time.sleep(0.1)
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
                while _alive(pid):
                    time.sleep(0.1)
        if self.pidfile.exists():
            self.pidfile.unlink()


def _destroy_pool(pool: str, window: float) -> bool:
    deadline = time.monotonic() + window
    while True:
        result = _run("zpool", "destroy", "-f", pool)
        if result.returncode == 0 or "no such pool" in result.stderr:
            return True
        if not is_busy(result.stderr) or time.monotonic() > deadline:
            return False
        time.sleep(0.5)


@dataclass
class Pools:
    source: str
    target: str
    zfs: ZfsCli
    mounts: Path


@pytest.fixture(scope="module")
def pools(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pools]:
    with zfs_pools(tmp_path_factory.mktemp("zfs")) as made:
        yield made


@contextlib.contextmanager
def zfs_pools(work: Path) -> Iterator[Pools]:
    """Two file-backed pools (and the daemon, when none runs); everything removed after."""
    daemon: Daemon | None = None
    if not _daemon_running():
        daemon = Daemon(work / "zfs-fuse.pid")
        daemon.start()
    tag = "cpr" + secrets.token_hex(3)
    names = [f"{tag}s", f"{tag}d"]
    images = [work / f"{name}.img" for name in names]
    created: list[str] = []
    try:
        for name, image in zip(names, images, strict=True):
            with open(image, "wb") as handle:
                handle.truncate(256 * 1024 * 1024)
            result = _run("zpool", "create", "-m", str(work / "mnt" / name), name, str(image))
            assert result.returncode == 0, f"zpool create {name}: {result.stderr}"
            created.append(name)
        yield Pools(names[0], names[1], ZfsCli(Local()), work / "mnt")
    finally:
        failed = [p for p in created if not _destroy_pool(p, 20)]
        if failed and daemon is not None:
            daemon.stop()  # "pool is busy" until the daemon restarts (reference §1.1)
            daemon.start()
            failed = [p for p in failed if not _destroy_pool(p, 20)]
        if daemon is not None:
            daemon.stop()
        for image in images:
            image.unlink(missing_ok=True)
        assert not failed, f"could not destroy pool(s) {failed}"


# --------------------------------------------------------------------------- helpers


def listing(zfs: ZfsCli, dataset: str) -> list[ZfsSnapshot]:
    return zfs.snapshots(dataset) if zfs.exists(dataset) else []


def take(zfs: ZfsCli, dataset: str, target: str | None = None) -> str:
    """A new snapshot, named uniquely on both sides (a pruned name may live on on the target)."""
    existing = {s.name for s in listing(zfs, dataset)}
    if target is not None:
        existing |= {s.name for s in listing(zfs, target)}
    name = unique_snapshot_name("autorep", datetime.now(UTC), existing)
    zfs.snapshot(f"{dataset}@{name}")
    return name


def later() -> datetime:
    return datetime.now(UTC) + timedelta(minutes=1)


def cycle(zfs: ZfsCli, src: str, dst: str, policy: ReplicationPolicy, **kw: bool) -> Plan:
    return plan_cycle(zfs, src, dst, policy, now=later(), **kw)


def plan_cycle(
    zfs: ZfsCli,
    src: str,
    dst: str,
    policy: ReplicationPolicy,
    *,
    now: datetime | None = None,
    target_modified: bool | None = None,
) -> Plan:
    from carpool.replicate.plan import plan_replication

    return plan_replication(
        listing(zfs, src), listing(zfs, dst), policy, now=now, target_modified=target_modified
    )


def mountpoint(zfs: ZfsCli, dataset: str) -> Path:
    return Path(zfs.get(dataset, "mountpoint"))


def write_files(root: Path, files: dict[str, bytes]) -> None:
    for name, data in files.items():
        with open(root / name, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())


def digests(root: Path) -> dict[str, str]:
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.iterdir())
        if p.is_file()
    }


def fresh_view(zfs: ZfsCli, dataset: str) -> dict[str, str]:
    """Checksums through a fresh mount: FUSE caches pages across an incremental receive."""
    zfs.umount(dataset)
    zfs.mount(dataset)
    return digests(mountpoint(zfs, dataset))


def guids(snaps: list[ZfsSnapshot]) -> dict[str, int | None]:
    return {s.name: s.guid for s in snaps}


# --------------------------------------------------------------------------- tests


def test_probe_reports_zfs_fuse_limits(pools: Pools) -> None:
    caps = pools.zfs.probe()
    assert not caps.bookmarks
    assert not caps.list_parsable
    assert not caps.resume_tokens
    assert not caps.size_estimate


def test_full_then_incremental(pools: Pools) -> None:
    zfs = pools.zfs
    src, dst = f"{pools.source}/app", f"{pools.target}/app"
    zfs.create(src)
    root = mountpoint(zfs, src)
    write_files(root, {f"f{i}": os.urandom(512 * 1024 + i) for i in range(4)})
    policy = ReplicationPolicy()

    first = take(zfs, src)
    plan = cycle(zfs, src, dst, policy)
    assert plan.action is Action.FULL, plan.reason
    report = execute(plan, zfs, zfs, src, dst)
    assert report.bytes_sent > 2 * 1024 * 1024
    assert report.steps_done == len(plan.steps)
    assert fresh_view(zfs, dst) == digests(root)
    assert zfs.get(dst, "readonly") in ("on", "off")  # zfs-fuse misreports; set, not read

    write_files(root, {"f1": os.urandom(300_000), "new": os.urandom(100_000)})
    (root / "f2").unlink()
    expected = digests(root)
    second = take(zfs, src)
    plan = cycle(zfs, src, dst, policy)
    assert plan.action is Action.INCREMENTAL, plan.reason
    assert plan.base == first and plan.newest == second
    seen: list[int] = []
    report = execute(plan, zfs, zfs, src, dst, progress=seen.append)
    assert 0 < report.bytes_sent < 2 * 1024 * 1024
    assert seen and seen[-1] == report.bytes_sent
    assert fresh_view(zfs, dst) == expected
    src_snaps, dst_snaps = zfs.snapshots(src), zfs.snapshots(dst)
    assert guids(dst_snaps) == guids(src_snaps)
    held = {s.name: s.userrefs for s in dst_snaps}
    assert held == {first: 0, second: 1}  # new base held, old base released
    assert {s.name: s.userrefs for s in src_snaps} == {first: 0, second: 1}

    assert cycle(zfs, src, dst, policy).action is Action.NOTHING


def test_retention_keeps_the_base(pools: Pools) -> None:
    zfs = pools.zfs
    src, dst = f"{pools.source}/ret", f"{pools.target}/ret"
    zfs.create(src)
    root = mountpoint(zfs, src)
    policy = ReplicationPolicy(
        source_retention=RetentionPolicy(keep_last=1),
        target_retention=RetentionPolicy(keep_last=2),
    )
    write_files(root, {"a": os.urandom(64 * 1024)})
    first = take(zfs, src, dst)
    first_guid = guids(zfs.snapshots(src))[first]
    execute(cycle(zfs, src, dst, policy), zfs, zfs, src, dst)
    for round_ in range(3):
        # two snapshots per round, only the last one is the replication's newest
        write_files(root, {f"r{round_}": os.urandom(32 * 1024)})
        take(zfs, src, dst)
        write_files(root, {"a": os.urandom(64 * 1024)})
        take(zfs, src, dst)
        plan = cycle(zfs, src, dst, policy)
        assert plan.action is Action.INCREMENTAL, plan.reason
        assert plan.base is not None
        assert plan.base not in plan.prune_source and plan.base not in plan.prune_target
        assert plan.newest not in plan.prune_source and plan.newest not in plan.prune_target
        assert plan.prune_source, "keep_last=1 should prune something on the source"
        execute(plan, zfs, zfs, src, dst)
        src_names = [s.name for s in zfs.snapshots(src)]
        dst_snaps = zfs.snapshots(dst)
        assert plan.newest in src_names
        # keep_last=2, plus the previous base: still held while this cycle planned
        assert len(dst_snaps) <= 3
        assert dst_snaps[-1].name == plan.newest and dst_snaps[-1].held
        assert [s.name for s in dst_snaps if s.held] == [plan.newest]
    # the first base was pruned on both sides once it stopped being the base (names may be
    # reused within one second after pruning, so compare by guid)
    assert first_guid not in {s.guid for s in zfs.snapshots(src)}
    assert first_guid not in {s.guid for s in zfs.snapshots(dst)}
    assert fresh_view(zfs, dst) == digests(root)
    # the held base cannot be destroyed by hand: a clear error, no minute of EBUSY retries
    newest = zfs.snapshots(src)[-1].full_name
    started = time.monotonic()
    with pytest.raises(ZfsError, match="held"):
        zfs.destroy(newest)
    assert time.monotonic() - started < 10


def test_modified_target_is_refused_and_nothing_destroyed(pools: Pools) -> None:
    zfs = pools.zfs
    src, dst = f"{pools.source}/mod", f"{pools.target}/mod"
    zfs.create(src)
    root = mountpoint(zfs, src)
    write_files(root, {"a": os.urandom(128 * 1024)})
    policy = ReplicationPolicy()
    take(zfs, src)
    execute(cycle(zfs, src, dst, policy), zfs, zfs, src, dst)

    # 1. writes on the replica since its newest snapshot
    zfs.set(dst, "readonly", "off")
    zfs.mount(dst)
    write_files(mountpoint(zfs, dst), {"local": b"written on the replica"})
    write_files(root, {"b": os.urandom(64 * 1024)})
    take(zfs, src)
    before = guids(zfs.snapshots(dst))
    plan = cycle(zfs, src, dst, policy)
    assert plan.action is Action.INCREMENTAL  # zfs-fuse has no 'written': the receive tells
    with pytest.raises(TargetModified, match="modified"):
        execute(plan, zfs, zfs, src, dst)
    assert guids(zfs.snapshots(dst)) == before
    refused = cycle(zfs, src, dst, policy, target_modified=True)
    assert refused.refused
    assert "changes written since" in refused.reason and "nothing was destroyed" in refused.reason
    with pytest.raises(ReplicationRefused):
        execute(refused, zfs, zfs, src, dst)

    # 2. a snapshot taken on the replica
    zfs.snapshot(f"{dst}@manual")
    before = guids(zfs.snapshots(dst))
    refused = cycle(zfs, src, dst, policy)
    assert refused.refused
    assert "diverged" in refused.reason and "manual" in refused.reason
    with pytest.raises(ReplicationRefused, match="allow_rollback"):
        execute(refused, zfs, zfs, src, dst)
    assert guids(zfs.snapshots(dst)) == before
    assert (mountpoint(zfs, dst) / "local").read_bytes() == b"written on the replica"
