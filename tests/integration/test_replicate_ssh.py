"""``zfs-replicate run`` pushing over ssh to Debian's sshd inside a lab node.

Node ``backup`` runs ``/usr/sbin/sshd`` with a host key and an authorized
key this test makes; it has a private mount namespace with its own ``/run``
(sshd needs ``/run/sshd``) where only zfs-fuse's socket directory is bound
back in. Node ``primary`` runs ``zfs-replicate``; the ssh traffic stays on
the lab bridge. Both nodes reach the one zfs-fuse daemon of the machine
through its socket, so source and target are pools of the same daemon.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from carpool.lab import Lab
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
]


@pytest.fixture(scope="module")
def pools(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pools]:
    with zfs_pools(tmp_path_factory.mktemp("zfs")) as made:
        yield made


def keygen(path: Path) -> str:
    done = os.system(f"ssh-keygen -q -t ed25519 -N '' -f {path} </dev/null >/dev/null")
    assert done == 0
    return (path.parent / f"{path.name}.pub").read_text().strip()


def test_run_pushes_over_ssh_and_unreachable_host_is_one_line(pools: Pools, tmp_path: Path) -> None:
    zfs = pools.zfs
    src, dst = f"{pools.source}/ssh", f"{pools.target}/ssh"
    zfs.create(src)
    write_files(mountpoint(zfs, src), {f"f{i}": os.urandom(256 * 1024) for i in range(4)})
    keys = tmp_path / "keys"
    keys.mkdir(mode=0o700)
    host_public = keygen(keys / "host")
    client_public = keygen(keys / "client")
    (keys / "authorized_keys").write_text(client_public + "\n")
    hostrun = tmp_path / "hostrun"
    hostrun.mkdir()
    with Lab() as lab:
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
        config = tmp_path / "ssh.toml"
        config.write_text(
            "[defaults.ssh]\n"
            f"identity = {json.dumps(str(keys / 'client'))}\n"
            f"options = {json.dumps(options)}\n"
            "[job.remote]\n"
            f'source = "{src}"\n'
            f'target = "root@{address}:{dst}"\n'
            'compression = "zstd"\n'
            "[job.refused]\n"
            f'source = "{src}"\n'
            f'target = "root@{address}:{dst}x"\n'
            "ssh = { port = 2 }\n"
        )
        state = tmp_path / "state"
        command = primary.python(
            "-m", "carpool.replicate.cli", "-c", str(config), "--state-dir", str(state), "run"
        )
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

        first = primary.run([*command, "remote"], check=False, timeout=300)
        assert first.returncode == 0, first.stderr
        assert "full send" in first.stdout
        write_files(mountpoint(zfs, src), {"f1": os.urandom(100_000), "new": b"over ssh"})
        second = primary.run([*command, "remote"], check=False, timeout=300)
        assert second.returncode == 0, second.stderr
        assert "incremental" in second.stdout
        assert fresh_view(zfs, dst) == digests(mountpoint(zfs, src))
        assert [s.guid for s in zfs.snapshots(src)] == [s.guid for s in zfs.snapshots(dst)]
        assert StateStore(state).load("remote").successes == 2

        refused = primary.run([*command, "refused"], check=False, timeout=300)
        assert refused.returncode == 1
        assert refused.stderr.count("\n") == 1, refused.stderr
        assert "Connection refused" in refused.stderr and "Traceback" not in refused.stderr
        assert not zfs.exists(f"{dst}x")
        sshd.terminate()
