"""``zfs-replicate`` on real btrfs filesystems on loop devices.

Two 256 MiB images, each with its loop device and mount, are recorded in a
:class:`carpool.lab.Lab` (per-run prefix) so that they are removed at the end
of the module, also after a failure or a crash of the test process
(``carpool lab clean``).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from carpool.lab import Lab
from carpool.replicate.btrfs import BtrfsCli
from carpool.replicate.cli import main
from carpool.replicate.snapshots import parse_snapshot_name
from carpool.replicate.state import StateStore

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root: loop devices and mounts"),
    pytest.mark.skipif(
        shutil.which("mkfs.btrfs") is None or shutil.which("losetup") is None,
        reason="needs btrfs-progs and losetup (run `make setup`)",
    ),
]


def _run(*argv: str) -> str:
    done = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, f"{' '.join(argv)}: {done.stderr}"
    return done.stdout


@dataclass
class Disks:
    primary: Path
    backup: Path
    work: Path


@pytest.fixture(scope="module")
def disks() -> Iterator[Disks]:
    with Lab() as lab:
        work = lab.directory / "btrfs"
        work.mkdir()
        mounts: list[Path] = []
        loops: list[str] = []
        try:
            for name in ("primary", "backup"):
                image = work / f"{name}.img"
                with open(image, "wb") as handle:
                    handle.truncate(256 * 1024 * 1024)
                _run("mkfs.btrfs", "-q", "-f", str(image))
                loop = _run("losetup", "--show", "-f", str(image)).strip()
                lab.remember_loop_device(loop, str(image))
                loops.append(loop)
                mount = work / name
                mount.mkdir()
                _run("mount", loop, str(mount))
                lab.remember_mount(str(mount))
                mounts.append(mount)
            yield Disks(mounts[0], mounts[1], work)
        finally:
            for mount in reversed(mounts):
                subprocess.run(["umount", str(mount)], capture_output=True, check=False)
            for loop in loops:
                subprocess.run(["losetup", "-d", loop], capture_output=True, check=False)


def digests(root: Path) -> dict[str, str]:
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.iterdir())
        if p.is_file()
    }


def write_files(root: Path, files: dict[str, bytes]) -> None:
    for name, data in files.items():
        with open(root / name, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())


def write_config(path: Path, name: str, **table: object) -> Path:
    lines = [f"[job.{name}]"]
    lines += [f"{key} = {json.dumps(value)}" for key, value in table.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


def cli(config: Path, state: Path, *args: str) -> int:
    return main(["-c", str(config), "--state-dir", str(state), *args])


def snapshots(directory: Path) -> list[str]:
    """carpool's snapshots in ``directory``, oldest first (time, then same-second counter)."""

    def order(name: str) -> tuple[str, int]:
        stamp = name[len("autorep-") :][:15]
        tail = name[len("autorep-") + 15 :]
        return stamp, int(tail[1:]) if tail else 0

    names = [p.name for p in directory.iterdir() if parse_snapshot_name("autorep", p.name)]
    return sorted(names, key=order)


def make_job(disks: Disks, name: str, tmp_path: Path) -> tuple[Path, Path, Path, Path]:
    btrfs = BtrfsCli()
    live = disks.primary / name
    btrfs.endpoint.run(["btrfs", "subvolume", "create", str(live)])
    replica = disks.backup / name
    replica.mkdir()
    config = write_config(
        tmp_path / "b.toml",
        name,
        backend="btrfs",
        source=str(live),
        target=str(replica),
        snapshot_dir=str(disks.primary / f".snap-{name}"),
    )
    return live, replica, config, tmp_path / "state"


def test_full_incremental_and_retention(
    disks: Disks, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    live, replica, config, state = make_job(disks, "data", tmp_path)
    write_files(live, {f"f{i}": os.urandom(512 * 1024) for i in range(4)})
    assert cli(config, state, "run") == 0
    assert "full send" in capsys.readouterr().out
    [first] = snapshots(replica)
    assert digests(replica / first) == digests(live)
    for round_ in range(6):
        write_files(live, {"f1": os.urandom(100_000), f"r{round_}": os.urandom(10_000)})
        assert cli(config, state, "run") == 0
        assert "incremental" in capsys.readouterr().out
    kept = snapshots(replica)
    assert len(kept) == 5  # keep last 5, as the seed
    assert kept == snapshots(disks.primary / ".snap-data")
    assert digests(replica / kept[-1]) == digests(live)
    shown = BtrfsCli().show(str(replica / kept[-1]))
    assert shown.readonly and shown.received_uuid is not None
    record = StateStore(state).load("data")
    assert record.successes == 7 and record.last_snapshot == kept[-1]
    assert 0 < record.last_bytes < 1024 * 1024


def test_interrupted_stream_is_retried_cleanly(
    disks: Disks, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    live, replica, config, state = make_job(disks, "flaky", tmp_path)
    write_files(live, {"big": os.urandom(4 * 1024 * 1024)})
    marker = tmp_path / "cut-once"
    wrapper = tmp_path / "btrfs-cut"
    wrapper.write_text(
        "#!/bin/sh\n"
        f'if [ "$1" = send ] && [ ! -e {marker} ]; then\n'
        f"  touch {marker}\n"
        '  btrfs "$@" | head -c 300000\n'
        "  exit 1\n"
        "fi\n"
        'exec btrfs "$@"\n'
    )
    wrapper.chmod(0o755)
    done = main(
        ["-c", str(config), "--state-dir", str(state), "--btrfs-command", str(wrapper), "run"]
    )
    assert done == 0, capsys.readouterr().err
    assert marker.exists()
    assert "2 attempts" in capsys.readouterr().out
    [snap] = snapshots(replica)
    assert digests(replica / snap) == digests(live)
    assert BtrfsCli().show(str(replica / snap)).received_uuid is not None


def test_promote_write_reverse_failback(
    disks: Disks, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    live, replica, config, state = make_job(disks, "db", tmp_path)
    write_files(live, {"blob": os.urandom(1024 * 1024), "state": b"one"})
    assert cli(config, state, "run") == 0
    write_files(live, {"state": b"two"})
    assert cli(config, state, "run") == 0
    replicated = digests(live)

    assert cli(config, state, "promote", "db") == 0
    promoted = replica / "db"  # writable snapshot of the newest received one
    assert digests(promoted) == replicated
    write_files(promoted, {"state": b"three-on-replica", "new": os.urandom(100_000)})
    on_replica = digests(promoted)
    assert cli(config, state, "run") == 1
    assert "promoted" in capsys.readouterr().err

    write_files(live, {"state": b"divergent"})  # the old primary comes back, diverged
    divergent = digests(live)

    assert cli(config, state, "reverse", "db") == 0
    assert "kept aside" in capsys.readouterr().out
    [aside] = [p for p in disks.primary.iterdir() if p.name.startswith("db.diverged-")]
    assert digests(aside) == divergent
    assert not live.exists()
    snapdir = disks.primary / ".snap-db"
    newest = snapshots(snapdir)[-1]
    assert digests(snapdir / newest) == on_replica

    write_files(promoted, {"state": b"four-on-replica"})
    assert cli(config, state, "run") == 0  # reversed: replica -> old primary
    assert digests(snapdir / snapshots(snapdir)[-1]) == digests(promoted)

    write_files(promoted, {"state": b"five-final"})
    final = digests(promoted)
    assert cli(config, state, "failback", "db") == 0
    assert "role now normal" in capsys.readouterr().out
    assert digests(live) == final  # old primary live again, writable
    write_files(live, {"state": b"six-after-failback"})
    with pytest.raises(OSError):
        write_files(promoted, {"x": b"the old replica live is read-only now"})
    assert cli(config, state, "run") == 0
    assert digests(replica / snapshots(replica)[-1]) == digests(live)
    assert StateStore(state).load("db").role == "normal"


def test_missing_source_and_target_are_one_line_errors(
    disks: Disks, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    state = tmp_path / "state"
    config = write_config(
        tmp_path / "m.toml",
        "nosource",
        backend="btrfs",
        source=str(disks.primary / "no-such-subvolume"),
        target=str(disks.backup),
    )
    assert cli(config, state, "run") == 1
    err = capsys.readouterr().err
    assert "source subvolume" in err and "btrfs subvolume create" in err
    assert err.count("\n") == 1
    assert not (disks.primary / ".snapshots").exists() or not any(
        (disks.primary / ".snapshots").iterdir()
    )
    live = disks.primary / "orphan"
    BtrfsCli().endpoint.run(["btrfs", "subvolume", "create", str(live)])
    config = write_config(
        tmp_path / "t.toml",
        "notarget",
        backend="btrfs",
        source=str(live),
        target=str(disks.backup / "no" / "such"),
    )
    assert cli(config, state, "run") == 1
    err = capsys.readouterr().err
    assert "target directory" in err and err.count("\n") == 1
    assert not (disks.primary / ".snapshots").exists() or not any(
        (disks.primary / ".snapshots").iterdir()
    )
