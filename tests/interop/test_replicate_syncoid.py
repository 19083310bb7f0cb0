"""zfs-replicate and Debian's syncoid continue each other's replication on real zfs-fuse pools.

syncoid (sanoid 2.1.0) matches snapshots by guid and sends ``-I`` from the
newest common one; zfs-replicate's planner matches by guid too. So either
tool can do the first, full replication and the other continues from the
common snapshot with an incremental: the run's plan says "incremental", and
the bytes on the wire are those of the change, not of the dataset.

Pools come from the zfs-fuse fixture of
:mod:`tests.integration.test_replicate_zfs` (one daemon per machine, started
and stopped by PID only when the fixture started it; per-run pool names),
module-scoped like the other zfs-fuse test modules.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from carpool.replicate.cli import main
from carpool.replicate.state import StateStore
from carpool.replicate.zfs import ZfsCli
from tests.integration.test_replicate_zfs import (
    Pools,
    digests,
    fresh_view,
    mountpoint,
    write_files,
    zfs_pools,
)
from tests.integration.test_replicate_zfs import pytestmark as zfs_marks

SYNCOID = "/usr/sbin/syncoid"
DATA = 4 * 1024 * 1024  # the first replication
CHANGE = 256 * 1024  # what changes before the tool that continues runs

pytestmark = [
    *zfs_marks,
    pytest.mark.skipif(
        not os.path.exists(SYNCOID), reason=f"needs syncoid ({SYNCOID}, Debian package sanoid)"
    ),
]


@pytest.fixture(scope="module")
def pools(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pools]:
    with zfs_pools(tmp_path_factory.mktemp("zfs")) as made:
        yield made


def syncoid(src: str, dst: str) -> subprocess.CompletedProcess[str]:
    """One syncoid run; its sync snapshot names have one-second resolution, so wait a second."""
    time.sleep(1.1)
    env = {**os.environ, "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}
    done = subprocess.run(
        [SYNCOID, "--no-privilege-elevation", src, dst],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        env=env,
    )
    assert done.returncode == 0, f"syncoid failed:\n{done.stdout}\n{done.stderr}"
    return done


def write_config(path: Path, src: str, dst: str) -> Path:
    path.write_text(
        f'[job.app]\nsource = "{src}"\ntarget = "{dst}"\nprefix = "autorep"\n'
        "[job.app.retention]\nkeep_last = 3\n"
    )
    return path


def run(config: Path, state: Path, capsys: pytest.CaptureFixture[str]) -> str:
    capsys.readouterr()
    assert main(["-c", str(config), "--state-dir", str(state), "run", "app"]) == 0, (
        capsys.readouterr().err
    )
    out: str = capsys.readouterr().out
    return out


def guids(zfs: ZfsCli, dataset: str) -> list[int | None]:
    return [s.guid for s in zfs.snapshots(dataset)]


def syncoid_snapshots(zfs: ZfsCli, dataset: str) -> list[str]:
    return [s.name for s in zfs.snapshots(dataset) if s.name.startswith("syncoid_")]


def test_syncoid_full_then_zfs_replicate_incremental(
    pools: Pools, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    zfs = pools.zfs
    src, dst = f"{pools.source}/sy1", f"{pools.target}/sy1"
    zfs.create(src)
    root = mountpoint(zfs, src)
    write_files(root, {f"f{i}": os.urandom(DATA // 4) for i in range(4)})

    syncoid(src, dst)
    [common] = syncoid_snapshots(zfs, dst)
    assert guids(zfs, dst) == guids(zfs, src)

    write_files(root, {"f1": os.urandom(CHANGE), "new": b"after syncoid"})
    config = write_config(tmp_path / "replicate.toml", src, dst)
    state = tmp_path / "state"
    out = run(config, state, capsys)
    assert f"incremental from {common} to autorep-" in out, out
    record = StateStore(state).load("app")
    assert record.last_action == "incremental"
    assert CHANGE <= record.last_bytes < DATA // 2, record.last_bytes
    assert fresh_view(zfs, dst) == digests(root)
    assert guids(zfs, dst) == guids(zfs, src)
    newest = zfs.snapshots(dst)[-1]
    assert newest.name.startswith("autorep-") and newest.held
    assert zfs.snapshots(src)[-1].held

    # and again: zfs-replicate continues from its own snapshot, syncoid's is left alone
    write_files(root, {"f2": os.urandom(CHANGE)})
    out = run(config, state, capsys)
    assert "incremental from autorep-" in out, out
    assert syncoid_snapshots(zfs, src) == syncoid_snapshots(zfs, dst) == [common]
    assert fresh_view(zfs, dst) == digests(root)


def test_zfs_replicate_full_then_syncoid_incremental_and_back(
    pools: Pools, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    zfs = pools.zfs
    src, dst = f"{pools.source}/sy2", f"{pools.target}/sy2"
    zfs.create(src)
    root = mountpoint(zfs, src)
    write_files(root, {f"f{i}": os.urandom(DATA // 4) for i in range(4)})
    config = write_config(tmp_path / "replicate.toml", src, dst)
    state = tmp_path / "state"
    assert "full send" in run(config, state, capsys)
    [ours] = [s.name for s in zfs.snapshots(dst)]
    assert StateStore(state).load("app").last_bytes > DATA

    # syncoid continues with -I from zfs-replicate's (held, read-only) replica
    write_files(root, {"f0": os.urandom(CHANGE), "new": b"before syncoid"})
    syncoid(src, dst)
    # an incremental: the replica keeps zfs-replicate's snapshot (same guid) and its hold
    [theirs] = syncoid_snapshots(zfs, dst)
    assert [s.name for s in zfs.snapshots(dst)] == [ours, theirs]
    assert guids(zfs, dst) == guids(zfs, src)
    assert fresh_view(zfs, dst) == digests(root)
    assert zfs.snapshots(dst)[0].held  # syncoid left zfs-replicate's hold in place

    # zfs-replicate continues from syncoid's snapshot and moves its hold forward
    write_files(root, {"f3": os.urandom(CHANGE)})
    out = run(config, state, capsys)
    assert f"incremental from {theirs} to autorep-" in out, out
    record = StateStore(state).load("app")
    assert record.last_action == "incremental"
    assert CHANGE <= record.last_bytes < DATA // 2, record.last_bytes
    assert fresh_view(zfs, dst) == digests(root)
    assert guids(zfs, dst) == guids(zfs, src)
    held = [s.name for s in zfs.snapshots(dst) if s.held]
    assert held == [zfs.snapshots(dst)[-1].name]
    assert [s.name for s in zfs.snapshots(src) if s.held] == held
