"""``zfs-replicate run`` over ssh to Debian's sshd inside a lab node: ZFS push and pull, btrfs push.

Node ``backup`` runs ``/usr/sbin/sshd`` with a host key and an authorized
key this module makes; it has a private mount namespace with its own ``/run``
(sshd needs ``/run/sshd``) where only zfs-fuse's socket directory is bound
back in. Node ``primary`` runs ``zfs-replicate``; the ssh traffic stays on
the lab bridge. Both nodes reach the one zfs-fuse daemon of the machine
through its socket, so source and target are pools of the same daemon. The
two btrfs filesystems (loop devices, recorded in the lab so they are removed
also after a crash) are mounted before the backup node copies the mount
table, so ``btrfs receive`` run by sshd sees its target.

* push: local source, ``root@backup:dataset`` target;
* pull: ``root@backup:dataset`` source, local target (the stream is sent by
  the remote side and received here);
* btrfs push: local live subvolume, ``root@backup:/path`` target directory.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from carpool.lab import Lab, Node
from carpool.replicate.btrfs import BtrfsCli
from carpool.replicate.snapshots import parse_snapshot_name
from carpool.replicate.state import StateStore
from tests.integration.test_replicate_zfs import (
    Pools,
    digests,
    fresh_view,
    mountpoint,
    pytestmark,
    write_files,
    zfs_pools,
)

SSHD = "/usr/sbin/sshd"
pytestmark = [
    *pytestmark,
    pytest.mark.skipif(not os.path.exists(SSHD), reason="needs openssh-server (/usr/sbin/sshd)"),
    pytest.mark.skipif(shutil.which("ssh") is None, reason="needs the openssh client"),
    pytest.mark.skipif(
        shutil.which("mkfs.btrfs") is None or shutil.which("losetup") is None,
        reason="needs btrfs-progs and losetup (run `make setup`)",
    ),
]


@pytest.fixture(scope="module")
def pools(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pools]:
    with zfs_pools(tmp_path_factory.mktemp("zfs")) as made:
        yield made


def keygen(path: Path) -> str:
    done = os.system(f"ssh-keygen -q -t ed25519 -N '' -f {path} </dev/null >/dev/null")
    assert done == 0
    return (path.parent / f"{path.name}.pub").read_text().strip()


def _run(*argv: str) -> str:
    done = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, f"{' '.join(argv)}: {done.stderr}"
    return done.stdout


@dataclass
class Site:
    primary: Node
    address: str
    ssh_defaults: str  # the [defaults.ssh] table of a job file
    btrfs_primary: Path
    btrfs_backup: Path


@pytest.fixture(scope="module")
def site(pools: Pools, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    del pools  # the zfs-fuse daemon must run before the backup node binds its socket directory
    work = tmp_path_factory.mktemp("ssh")
    keys = work / "keys"
    keys.mkdir(mode=0o700)
    host_public = keygen(keys / "host")
    client_public = keygen(keys / "client")
    (keys / "authorized_keys").write_text(client_public + "\n")
    hostrun = work / "hostrun"
    hostrun.mkdir()
    with Lab() as lab:
        mounts: list[Path] = []
        loops: list[str] = []
        try:
            for name in ("bprimary", "bbackup"):
                image = lab.directory / f"{name}.img"
                with open(image, "wb") as handle:
                    handle.truncate(256 * 1024 * 1024)
                _run("mkfs.btrfs", "-q", "-f", str(image))
                loop = _run("losetup", "--show", "-f", str(image)).strip()
                lab.remember_loop_device(loop, str(image))
                loops.append(loop)
                mount = work / name  # not under /run: the backup node mounts its own /run
                mount.mkdir()
                _run("mount", loop, str(mount))
                lab.remember_mount(str(mount))
                mounts.append(mount)
            yield _start_sshd(lab, keys, host_public, hostrun, mounts)
        finally:
            for mount in reversed(mounts):
                subprocess.run(["umount", str(mount)], capture_output=True, check=False)
            for loop in loops:
                subprocess.run(["losetup", "-d", loop], capture_output=True, check=False)


def _start_sshd(lab: Lab, keys: Path, host_public: str, hostrun: Path, mounts: list[Path]) -> Site:
    lab.network("lan")
    primary = lab.node("primary")
    backup = lab.node("backup", mount_namespace=True)
    lab.attach(primary, "lan")
    lab.attach(backup, "lan")
    address = str(backup.ipv4("lan"))
    backup.run(
        f"mount --bind /run {hostrun} && mount -t tmpfs -o size=4m,mode=755 tmpfs /run "
        f"&& mkdir -p /run/sshd /run/zfs && mount --bind {hostrun}/zfs /run/zfs"
    )
    sshd = backup.spawn(
        [SSHD, "-D", "-e", "-f", "/dev/null", "-h", str(keys / "host"),
         "-o", f"ListenAddress={address}", "-o", f"AuthorizedKeysFile={keys}/authorized_keys",
         "-o", "StrictModes=no", "-o", "UsePAM=no", "-o", "PasswordAuthentication=no",
         "-o", "PermitRootLogin=prohibit-password", "-o", "PidFile=none"],
        name="sshd",
    )  # fmt: skip
    (keys / "known_hosts").write_text(f"{address} {host_public}\n")
    options = [
        "-o", f"UserKnownHostsFile={keys}/known_hosts",
        "-o", "StrictHostKeyChecking=yes",
        "-o", "ConnectTimeout=10",
    ]  # fmt: skip
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        probe = primary.run(
            ["ssh", "-i", str(keys / "client"), "-o", "BatchMode=yes", *options,
             f"root@{address}", "true"],
            check=False,
        )  # fmt: skip
        if probe.returncode == 0:
            break
        assert sshd.running(), sshd.output()
        time.sleep(0.3)
    else:
        raise AssertionError(f"sshd did not answer: {probe.stderr}\n{sshd.output()}")
    defaults = (
        "[defaults.ssh]\n"
        f"identity = {json.dumps(str(keys / 'client'))}\n"
        f"options = {json.dumps(options)}\n"
    )
    return Site(primary, address, defaults, mounts[0], mounts[1])


def replicate(site: Site, config: Path, state: Path, job: str) -> subprocess.CompletedProcess[str]:
    command = site.primary.python(
        "-m", "carpool.replicate.cli", "-c", str(config), "--state-dir", str(state), "run", job
    )
    return site.primary.run(command, check=False, timeout=300)


def test_run_pushes_over_ssh_and_unreachable_host_is_one_line(
    pools: Pools, site: Site, tmp_path: Path
) -> None:
    zfs = pools.zfs
    src, dst = f"{pools.source}/ssh", f"{pools.target}/ssh"
    zfs.create(src)
    write_files(mountpoint(zfs, src), {f"f{i}": os.urandom(256 * 1024) for i in range(4)})
    config = tmp_path / "ssh.toml"
    config.write_text(
        site.ssh_defaults + "[job.remote]\n"
        f'source = "{src}"\n'
        f'target = "root@{site.address}:{dst}"\n'
        'compression = "zstd"\n'
        "[job.refused]\n"
        f'source = "{src}"\n'
        f'target = "root@{site.address}:{dst}x"\n'
        "ssh = { port = 2 }\n"
    )
    state = tmp_path / "state"
    first = replicate(site, config, state, "remote")
    assert first.returncode == 0, first.stderr
    assert "full send" in first.stdout
    write_files(mountpoint(zfs, src), {"f1": os.urandom(100_000), "new": b"over ssh"})
    second = replicate(site, config, state, "remote")
    assert second.returncode == 0, second.stderr
    assert "incremental" in second.stdout
    assert fresh_view(zfs, dst) == digests(mountpoint(zfs, src))
    assert [s.guid for s in zfs.snapshots(src)] == [s.guid for s in zfs.snapshots(dst)]
    assert StateStore(state).load("remote").successes == 2

    refused = replicate(site, config, state, "refused")
    assert refused.returncode == 1
    assert refused.stderr.count("\n") == 1, refused.stderr
    assert "Connection refused" in refused.stderr and "Traceback" not in refused.stderr
    assert not zfs.exists(f"{dst}x")


def test_run_pulls_over_ssh(pools: Pools, site: Site, tmp_path: Path) -> None:
    zfs = pools.zfs
    src, dst = f"{pools.source}/pull", f"{pools.target}/pull"
    zfs.create(src)
    write_files(mountpoint(zfs, src), {f"f{i}": os.urandom(256 * 1024) for i in range(4)})
    config = tmp_path / "pull.toml"
    config.write_text(
        site.ssh_defaults + "[job.pull]\n"
        f'source = "root@{site.address}:{src}"\n'
        f'target = "{dst}"\n'
        "[job.pull.retention]\nkeep_last = 2\n"
    )
    state = tmp_path / "state"
    first = replicate(site, config, state, "pull")
    assert first.returncode == 0, first.stderr
    assert "full send" in first.stdout
    for round_ in range(2):
        write_files(mountpoint(zfs, src), {"f1": os.urandom(100_000), f"r{round_}": b"pulled"})
        again = replicate(site, config, state, "pull")
        assert again.returncode == 0, again.stderr
        assert "incremental" in again.stdout
    assert fresh_view(zfs, dst) == digests(mountpoint(zfs, src))
    src_snaps, dst_snaps = zfs.snapshots(src), zfs.snapshots(dst)
    assert [s.guid for s in src_snaps] == [s.guid for s in dst_snaps]
    assert len(dst_snaps) == 2  # keep_last = 2 pruned both sides, the remote one over ssh
    assert src_snaps[-1].held and dst_snaps[-1].held
    record = StateStore(state).load("pull")
    assert record.successes == 3 and 0 < record.last_bytes < 1024 * 1024

    # a pull from a dataset that is not there: one line naming the remote host
    config.write_text(
        site.ssh_defaults + "[job.gone]\n"
        f'source = "root@{site.address}:{pools.source}/nothing"\n'
        f'target = "{pools.target}/nothing"\n'
    )
    gone = replicate(site, config, state, "gone")
    assert gone.returncode == 1
    assert gone.stderr.count("\n") == 1, gone.stderr
    assert "does not exist" in gone.stderr and site.address in gone.stderr
    assert not zfs.exists(f"{pools.target}/nothing")


def _tree(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _carpool_snapshots(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if parse_snapshot_name("autorep", p.name))


def test_btrfs_push_over_ssh(site: Site, tmp_path: Path) -> None:
    btrfs = BtrfsCli()
    live = site.btrfs_primary / "data"
    btrfs.endpoint.run(["btrfs", "subvolume", "create", str(live)])
    (live / "dir").mkdir()
    write_files(live, {f"f{i}": os.urandom(512 * 1024) for i in range(3)})
    write_files(live / "dir", {"inner": os.urandom(10_000)})
    replica = site.btrfs_backup / "data"
    replica.mkdir()
    snapdir = site.btrfs_primary / ".snap-data"
    config = tmp_path / "btrfs.toml"
    config.write_text(
        site.ssh_defaults + "[job.bpush]\n"
        'backend = "btrfs"\n'
        f'source = "{live}"\n'
        f'target = "root@{site.address}:{replica}"\n'
        f'snapshot_dir = "{snapdir}"\n'
        'compression = "zstd"\n'
        "[job.bpush.retention]\nkeep_last = 2\n"
    )
    state = tmp_path / "state"
    first = replicate(site, config, state, "bpush")
    assert first.returncode == 0, first.stderr
    assert "full send" in first.stdout
    [snap] = _carpool_snapshots(replica)
    assert _tree(replica / snap) == _tree(live)
    for round_ in range(2):
        write_files(live, {"f0": os.urandom(100_000), f"r{round_}": b"over ssh"})
        again = replicate(site, config, state, "bpush")
        assert again.returncode == 0, again.stderr
        assert "incremental" in again.stdout
    kept = _carpool_snapshots(replica)
    assert len(kept) == 2 and kept == _carpool_snapshots(snapdir)
    assert _tree(replica / kept[-1]) == _tree(live)
    shown = btrfs.show(str(replica / kept[-1]))
    assert shown.readonly and shown.received_uuid == btrfs.show(str(snapdir / kept[-1])).uuid
    record = StateStore(state).load("bpush")
    assert record.successes == 3 and 0 < record.last_bytes < 1024 * 1024
