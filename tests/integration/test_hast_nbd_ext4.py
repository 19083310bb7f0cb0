"""ext4 on the HAST NBD export through nbdfuse and a loop device, as the README attaches it."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys

from carpool.lab import Lab
from carpool.lab.services import wait_until
from tests.conftest import requires_tool

SERVE = """
import asyncio, sys
from carpool.hast.nbdserver import FileBackend, NbdServer

async def main() -> None:
    server = NbdServer("shared_storage", FileBackend(sys.argv[1]))
    await server.listen_unix(sys.argv[2])
    print("serving", flush=True)
    await asyncio.Event().wait()

asyncio.run(main())
"""


@requires_tool("nbdfuse", "losetup", "mkfs.ext4", "e2fsck")
def test_ext4_on_the_export_keeps_every_fsynced_file() -> None:
    with Lab() as lab:
        node = lab.node("storage", mount_namespace=True)
        disk = node.dir / "disk.img"
        with open(disk, "wb") as handle:
            handle.truncate(96 * 1024 * 1024)
        socket, fuse, mnt = node.dir / "nbd.sock", node.dir / "fuse", node.dir / "mnt"
        fuse.mkdir()
        mnt.mkdir()
        server = node.spawn([sys.executable, "-c", SERVE, str(disk), str(socket)], name="nbd")
        assert server.wait_for_output("serving")
        nbdfuse = node.spawn(["nbdfuse", str(fuse), "--unix", str(socket)], name="nbdfuse")
        wait_until(lambda: node.run(["test", "-e", str(fuse / "nbd")], check=False).returncode == 0)
        loop = node.run(["losetup", "--show", "-f", str(fuse / "nbd")]).stdout.strip()
        lab.remember_loop_device(loop, str(fuse / "nbd"))
        digests = {}
        try:
            node.run(["mkfs.ext4", "-q", loop])
            node.run(["mount", loop, str(mnt)])
            for number in range(5):
                payload = os.urandom(1024 * 1024 + number)
                digests[f"f{number}"] = hashlib.sha256(payload).hexdigest()
                source = node.dir / f"payload{number}"
                source.write_bytes(payload)
                node.run(
                    ["dd", f"if={source}", f"of={mnt}/f{number}", "bs=1M", "conv=fsync",
                     "status=none"]
                )  # fmt: skip
            listing = node.run(["sh", "-c", f"cd {mnt} && sha256sum f*"]).stdout
            node.run(["umount", str(mnt)])
        finally:
            node.run(["umount", str(mnt)], check=False)
            node.run(["losetup", "-d", loop], check=False)
            nbdfuse.terminate()
            server.terminate()
        for line in listing.splitlines():
            digest, name = line.split()
            assert digests[name] == digest
        check = subprocess.run(["e2fsck", "-fn", str(disk)], capture_output=True, text=True)
        assert check.returncode == 0, check.stdout + check.stderr
