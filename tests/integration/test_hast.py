"""hastd and hastctl in the lab: the guide's shared_storage resource over the sync link."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from carpool.hast.metadata import METADATA_SIZE, decode
from carpool.lab import Lab, LabProcess, Node
from carpool.lab.services import daemon_status, wait_until, write_file
from tests.conftest import requires_tool

MIB = 1 << 20
SIZE = 64 * MIB

# The guide's hast.conf, the local paths pointing at each node's own file.
HAST_CONF = """resource shared_storage {{
	on node1 {{
		local {node1}/hast0.img
		remote 192.168.255.2
	}}
	on node2 {{
		local {node2}/hast0.img
		remote 192.168.255.1
	}}
	replication {replication}
}}
"""


def hastctl(node: Node, *words: str, check: bool = True) -> Any:
    argv = [sys.executable, "-m", "carpool.hast.ctl", "-c", str(node.dir / "hast.conf"),
            "--run-dir", str(node.dir), "-j", *words]  # fmt: skip
    result = node.run(argv, check=check)
    if not check:
        return result
    return json.loads(result.stdout) if result.stdout.strip() else None


def start_hastd(node: Node, *extra: str) -> LabProcess:
    argv = [sys.executable, "-m", "carpool.hast.daemon", "-c", str(node.dir / "hast.conf"),
            "--run-dir", str(node.dir), *extra]  # fmt: skip
    process = node.spawn(argv, name="hastd")
    wait_until(lambda: daemon_status(node, "hastd") is not None, 15, "hastd to answer")
    return process


def replicate(
    primary: Node, secondary: Node, *primary_flags: str
) -> tuple[LabProcess, LabProcess]:
    """hastd on both nodes, the roles of the guide, until the resource is complete."""
    daemons = start_hastd(primary, *primary_flags), start_hastd(secondary)
    hastctl(secondary, "role", "secondary", "shared_storage")
    hastctl(primary, "role", "primary", "shared_storage")
    wait_until(lambda: status(primary).get("status") == "complete", 20, "complete")
    return daemons


def status(node: Node) -> dict[str, Any]:
    result = hastctl(node, "status", check=False)
    if result.returncode != 0:
        return {}
    return dict(json.loads(result.stdout)[0])


def nbdsh(node: Node, script: str) -> str:
    sock = node.dir / "hast" / "shared_storage.sock"
    uri = f"nbd+unix:///shared_storage?socket={sock}"
    return node.run(["/usr/bin/python3", "-m", "nbd", "-u", uri, "-c", script]).stdout


def data_area(path: Path) -> bytes:
    raw = path.read_bytes()
    md = decode(raw[:METADATA_SIZE], resource="shared_storage")
    return raw[md.localoff : md.localoff + md.datasize]


def pair(lab: Lab, replication: str, *, mount_namespace: bool = False) -> tuple[Node, Node]:
    lab.network("sync")
    nodes = []
    for name in ("node1", "node2"):
        node = lab.node(name, mount_namespace=mount_namespace)
        lab.attach(node, "sync", ifname="em1")
        nodes.append(node)
    node1, node2 = nodes
    text = HAST_CONF.format(node1=node1.dir, node2=node2.dir, replication=replication)
    for node in nodes:
        with open(node.dir / "hast0.img", "wb") as image:
            image.truncate(SIZE)
        write_file(node, "hast.conf", text)
        node.run([sys.executable, "-m", "carpool.hast.ctl", "-c", str(node.dir / "hast.conf"),
                  "create", "shared_storage"])  # fmt: skip
    return node1, node2


@requires_tool("nbdsh")
def test_primary_writes_land_on_both_disks_and_status_reads_like_freebsd() -> None:
    with Lab() as lab:
        node1, node2 = pair(lab, "fullsync")
        replicate(node1, node2)
        text = node1.run([sys.executable, "-m", "carpool.hast.ctl", "-c",
                          str(node1.dir / "hast.conf"), "--run-dir", str(node1.dir),
                          "status"]).stdout  # fmt: skip
        assert text.splitlines()[0] == "Name\tStatus\t Role\t\tComponents"
        assert text.splitlines()[1].startswith("shared_storage\tcomplete primary        ")
        payload = os.urandom(3 * MIB)
        (node1.dir / "payload").write_bytes(payload)
        nbdsh(node1, f"h.pwrite(open('{node1.dir}/payload','rb').read(), {5 * MIB}); h.flush()")
        one, two = data_area(node1.dir / "hast0.img"), data_area(node2.dir / "hast0.img")
        assert one[5 * MIB : 8 * MIB] == payload
        assert one == two
        dumped = hastctl(node2, "dump", "shared_storage")[0]
        assert dumped["resuid"] == status(node1)["resuid"] != 0


@requires_tool("nbdsh")
def test_secondary_away_then_back_resyncs_only_the_dirty_extents() -> None:
    with Lab() as lab:
        node1, node2 = pair(lab, "memsync")
        _, secondary = replicate(node1, node2)
        secondary.kill()
        node2.processes.remove(secondary)
        wait_until(lambda: status(node1).get("status") == "degraded", 40, "degraded")
        # Writes in two extents (2 MiB each) while the secondary is away.
        nbdsh(node1, f"h.pwrite(b'x' * 65536, {1 * MIB}); h.pwrite(b'y' * 4096, {9 * MIB});"
                     " h.flush()")  # fmt: skip
        assert status(node1)["dirty"] == 2 * 2 * MIB
        start_hastd(node2)
        hastctl(node2, "role", "secondary", "shared_storage")
        wait_until(lambda: status(node1).get("status") == "complete", 40, "complete again")
        # Exactly the two dirty extents travel (HAST keeps them counted as dirty
        # afterwards, in its keepdirty window, as FreeBSD's `dirty` does).
        wait_until(lambda: status(node1).get("sync_bytes_sent") == 2 * 2 * MIB, 40, "resync")
        assert data_area(node1.dir / "hast0.img") == data_area(node2.dir / "hast0.img")


@requires_tool("nbdsh")
def test_failover_the_secondary_becomes_primary_with_the_data() -> None:
    with Lab() as lab:
        node1, node2 = pair(lab, "fullsync")
        replicate(node1, node2)
        nbdsh(node1, f"h.pwrite(b'seed' * 1024, {2 * MIB}, nbd.CMD_FLAG_FUA)")
        lab.crash(node1)
        hastctl(node2, "role", "primary", "shared_storage")
        out = nbdsh(node2, f"print(h.pread(4096, {2 * MIB}) == b'seed' * 1024)")
        assert out.strip() == "True"
        assert status(node2)["role"] == "primary"
        subprocess.run(["true"], check=True)


HOOK = '#!/bin/sh\necho "$@" >> "$(dirname "$0")/hook.log"\n'


@requires_tool("nbdsh")
def test_split_brain_is_detected_reported_and_overwrites_nothing() -> None:
    with Lab() as lab:
        node1, node2 = pair(lab, "fullsync")
        for node in (node1, node2):
            hook = write_file(node, "hast-hook", HOOK)
            hook.chmod(0o755)
            conf = node.dir / "hast.conf"
            text = conf.read_text()
            conf.write_text(
                text.replace("replication fullsync", f"replication fullsync\n\texec {hook}")
            )
        replicate(node1, node2)
        lab.partition([node1], [node2], network="sync")
        wait_until(lambda: status(node1).get("status") == "degraded", 60, "node1 degraded")
        hastctl(node2, "role", "primary", "shared_storage")  # the operator's mistake
        nbdsh(node1, f"h.pwrite(b'1' * 4096, {4 * MIB}); h.flush()")
        nbdsh(node2, f"h.pwrite(b'2' * 4096, {4 * MIB}); h.flush()")
        one, two = data_area(node1.dir / "hast0.img"), data_area(node2.dir / "hast0.img")
        hastctl(node2, "role", "secondary", "shared_storage")
        lab.heal()
        wait_until(lambda: "split-brain" in (node2.dir / "hook.log").read_text(), 60,
                   "the split-brain hook on the secondary")  # fmt: skip
        assert status(node1)["status"] == "degraded"
        assert data_area(node1.dir / "hast0.img") == one
        assert data_area(node2.dir / "hast0.img") == two
        assert one[4 * MIB : 4 * MIB + 4096] == b"1" * 4096
        assert two[4 * MIB : 4 * MIB + 4096] == b"2" * 4096
        assert "role shared_storage init primary" in (node1.dir / "hook.log").read_text()


@requires_tool("nbdsh")
def test_a_failing_local_read_is_served_from_the_peer() -> None:
    with Lab() as lab:
        node1, node2 = pair(lab, "fullsync")
        replicate(node1, node2)
        nbdsh(node1, f"h.pwrite(b'peer' * 1024, {60 * MIB}); h.flush()")
        # The end of the local disk goes away under the primary: reads there fail locally.
        os.truncate(node1.dir / "hast0.img", 40 * MIB)
        out = nbdsh(node1, f"print(h.pread(4096, {60 * MIB}) == b'peer' * 1024)")
        assert out.strip() == "True"


@requires_tool("nbdsh", "nbdinfo")
def test_verify_compares_both_disks_online_and_finds_the_extent_that_rotted() -> None:
    with Lab() as lab:
        node1, node2 = pair(lab, "memsync")
        replicate(node1, node2, "--nbd-tcp", "shared_storage=127.0.0.1:10809",
                  "--metrics", "127.0.0.1:9108")  # fmt: skip
        nbdsh(node1, f"h.pwrite(b'v' * (3 * {MIB}), {MIB}); h.flush()")
        report = hastctl(node1, "verify", "shared_storage")[0]
        assert report["checked"] == report["size"] and report["differing"] == []
        # A byte of the secondary's disk changes behind HAST's back (bit rot).
        md = decode((node2.dir / "hast0.img").read_bytes()[:METADATA_SIZE],
                    resource="shared_storage")
        with open(node2.dir / "hast0.img", "r+b") as disk:
            disk.seek(md.localoff + 10 * MIB + 12345)
            disk.write(b"\xff")
        result = node1.run([sys.executable, "-m", "carpool.hast.ctl", "-c",
                            str(node1.dir / "hast.conf"), "--run-dir", str(node1.dir),
                            "verify", "shared_storage"], check=False)  # fmt: skip
        assert result.returncode == 1
        assert f"differs at offset {10 * MIB} length {2 * MIB}" in result.stdout
        # The same export over TCP, for clients that cannot use the unix socket.
        info = node1.run(["nbdinfo", "--size", "nbd://127.0.0.1:10809/shared_storage"])
        assert int(info.stdout) == status(node1)["datasize"]
        listing = node1.run([sys.executable, "-m", "carpool.hast.ctl", "-c",
                             str(node1.dir / "hast.conf"), "--run-dir", str(node1.dir),
                             "list"]).stdout  # fmt: skip
        assert "  statistics:\n    reads: " in listing and "nbd tcp: 127.0.0.1:10809" in listing
        metrics = node1.run(["python3", "-c", "import urllib.request; print(urllib.request."
                             "urlopen('http://127.0.0.1:9108/metrics').read().decode())"]).stdout
        assert 'carpool_hast_role{resource="shared_storage",role="primary"} 1.0' in metrics
        assert 'carpool_hast_operations_total{kind="writes",resource="shared_storage"}' in metrics


@requires_tool("nbdfuse", "losetup", "mkfs.ext4")
def test_the_primary_gets_a_dev_hast_device_that_a_mount_keeps_from_going_away() -> None:
    with Lab() as lab:
        node1, node2 = pair(lab, "fullsync", mount_namespace=True)
        dev = node1.dir / "dev" / "hast"
        replicate(node1, node2, "--dev-dir", str(dev))
        device = dev / "shared_storage"
        wait_until(device.is_symlink, 20, "the device link")
        assert status(node1)["dev"] == str(device)
        mnt = node1.dir / "mnt"
        mnt.mkdir()
        node1.run(["mkfs.ext4", "-q", str(device)])
        node1.run(["mount", str(device), str(mnt)])
        try:
            refused = hastctl(node1, "role", "secondary", "shared_storage", check=False)
            assert refused.returncode == 1 and "in use" in refused.stderr
            assert status(node1)["role"] == "primary"
        finally:
            node1.run(["umount", str(mnt)])
        hastctl(node1, "role", "secondary", "shared_storage")
        assert not device.exists() and not device.is_symlink()
