"""The guide's failover with a filesystem on it: ext4 on the primary's export, the
primary crashes, the secondary becomes primary, fsck, mount, every fsynced file is there.

Each node attaches its export as the README shows (nbdfuse + loop) inside its own
mount namespace.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import Iterator

import pytest

from carpool.lab import Lab, LabProcess, Node
from carpool.lab.services import wait_until
from tests.conftest import requires_tool
from tests.integration.test_hast import hastctl, pair, replicate, status

FILES = 12


@contextlib.contextmanager
def attached(lab: Lab, node: Node) -> Iterator[str]:
    """The node's HAST export as a loop device: /dev/hast/shared_storage of FreeBSD."""
    sock = node.dir / "hast" / "shared_storage.sock"
    fuse = node.dir / "fuse"
    fuse.mkdir(exist_ok=True)
    nbdfuse: LabProcess = node.spawn(["nbdfuse", str(fuse), "--unix", str(sock)], name="nbdfuse")
    loop = None
    try:
        wait_until(lambda: node.run(["test", "-e", str(fuse / "nbd")], check=False).returncode
                   == 0, 20, "nbdfuse to attach")  # fmt: skip
        loop = node.run(["losetup", "--show", "-f", str(fuse / "nbd")]).stdout.strip()
        lab.remember_loop_device(loop, str(fuse / "nbd"))
        yield loop
    finally:
        if loop is not None:
            node.run(["losetup", "-d", loop], check=False)
        if nbdfuse.running:
            nbdfuse.kill()


@pytest.mark.parametrize("replication", ["fullsync", "memsync"])
@requires_tool("nbdfuse", "losetup", "mkfs.ext4", "e2fsck")
def test_primary_crash_loses_no_fsynced_file(replication: str) -> None:
    with Lab() as lab:
        node1, node2 = pair(lab, replication, mount_namespace=True)
        replicate(node1, node2)
        mnt1, mnt2 = node1.dir / "mnt", node2.dir / "mnt"
        mnt1.mkdir()
        mnt2.mkdir()
        digests: dict[str, str] = {}
        with attached(lab, node1) as loop:
            node1.run(["mkfs.ext4", "-q", loop])
            node1.run(["mount", loop, str(mnt1)])
            for number in range(FILES):
                payload = os.urandom(256 * 1024 + 4096 * number)
                digests[f"f{number}"] = hashlib.sha256(payload).hexdigest()
                source = node1.dir / f"payload{number}"
                source.write_bytes(payload)
                node1.run(["dd", f"if={source}", f"of={mnt1}/f{number}", "bs=64k",
                           "conv=fsync", "status=none"])  # fmt: skip
            node1.run(["sync", "-f", str(mnt1)])
            # Writes still in flight when the host dies (not fsynced: no promise on them).
            node1.spawn(["dd", "if=/dev/urandom", f"of={mnt1}/unsynced", "bs=64k",
                         "count=400", "status=none"], name="writer")  # fmt: skip
            lab.crash(node1)
        hastctl(node2, "role", "primary", "shared_storage")
        assert status(node2)["role"] == "primary"
        with attached(lab, node2) as loop:
            check = node2.run(["e2fsck", "-fy", loop], check=False, timeout=120)
            assert check.returncode in (0, 1), check.stdout + check.stderr
            node2.run(["mount", loop, str(mnt2)])
            try:
                listing = node2.run(["sh", "-c", f"cd {mnt2} && sha256sum f*"]).stdout
            finally:
                node2.run(["umount", str(mnt2)], check=False)
        found = dict(reversed(line.split()) for line in listing.splitlines())
        assert found == digests
