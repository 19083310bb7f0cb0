"""The lab on the real kernel: reachability, faults, teardown, leftovers of a killed owner."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import pytest

from carpool.lab import Lab
from carpool.lab.registry import LAB_ROOT, clean, list_namespaces


def host_links() -> str:
    return subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout


def host_nft_tables() -> str:
    return subprocess.run(["nft", "list", "tables"], capture_output=True, text=True).stdout


def nothing_left(prefix: str) -> None:
    assert not [ns for ns in list_namespaces() if ns.startswith(prefix)]
    assert prefix not in host_links()
    assert prefix not in host_nft_tables()
    assert not (LAB_ROOT / prefix).exists()


def three_nodes(lab: Lab) -> None:
    for name in ("node1", "node2", "node3"):
        node = lab.node(name)
        lab.attach(node, "lan", ifname="em0")
        lab.attach(node, "sync", ifname="em1")


def test_three_nodes_reach_each_other_on_lan_and_sync_ipv4_and_ipv6() -> None:
    with Lab() as lab:
        three_nodes(lab)
        prefix = lab.prefix
        for source in lab.nodes.values():
            for target in lab.nodes.values():
                if source is target:
                    continue
                for network in ("lan", "sync"):
                    assert source.ping(target.ipv4(network)), (source, target, network)
                    assert source.ping(target.ipv6(network)), (source, target, network)
        names = {
            line.split(":")[1].strip().split("@")[0]
            for line in lab.nodes["node1"].run(["ip", "-o", "link"]).stdout.splitlines()
        }
        assert {"em0", "em1"} <= names
    nothing_left(prefix)


def test_partition_and_heal_are_proven_by_traffic() -> None:
    with Lab() as lab:
        three_nodes(lab)
        node1, node2, node3 = (lab.nodes[n] for n in ("node1", "node2", "node3"))
        lab.partition([node1], [node2, node3], network="lan")
        assert not node1.ping(node2.ipv4("lan"))
        assert not node1.ping(node3.ipv6("lan"))
        assert node2.ping(node3.ipv4("lan"))
        assert node1.ping(node2.ipv4("sync")), "only the LAN was partitioned"
        lab.heal()
        assert node1.ping(node2.ipv4("lan"))
        assert node1.ping(node3.ipv6("lan"))


def test_drop_all_and_a_share_of_packets() -> None:
    with Lab() as lab:
        three_nodes(lab)
        node1, node2 = lab.nodes["node1"], lab.nodes["node2"]
        node2.run(["ping", "-c", "1", "-W", "2", str(node1.ipv4("lan"))])  # warm the ARP caches
        lab.drop(node2, network="lan", percent=50)
        result = node1.run(
            ["ping", "-n", "-q", "-c", "200", "-i", "0.002", "-W", "1", str(node2.ipv4("lan"))],
            check=False,
        )
        # Each echo crosses node2's port twice, so about 25 % come back; the bounds are wide.
        received = int(result.stdout.split(" received")[0].split()[-1])
        assert 5 <= received <= 150, result.stdout
        lab.heal()
        lab.drop(node2, percent=100)
        assert not node1.ping(node2.ipv4("lan"))
        assert not node1.ping(node2.ipv4("sync"))
        lab.heal()
        assert node1.ping(node2.ipv4("sync"))


def test_link_down_and_unplug_change_carrier() -> None:
    with Lab() as lab:
        three_nodes(lab)
        node1, node2 = lab.nodes["node1"], lab.nodes["node2"]

        def state() -> str:
            return node1.run(["cat", "/sys/class/net/em0/operstate"]).stdout.strip()

        lab.unplug(node1, "em0")
        deadline = time.monotonic() + 10
        while state() != "down" and time.monotonic() < deadline:
            time.sleep(0.05)
        assert state() == "down"
        assert not node1.ping(node2.ipv4("lan"))
        lab.plug(node1, "em0")
        deadline = time.monotonic() + 10
        while state() != "up" and time.monotonic() < deadline:
            time.sleep(0.05)
        assert node1.ping(node2.ipv4("lan"), count=3)
        lab.link_down(node1, "em1")
        assert not node1.ping(node2.ipv4("sync"))
        lab.link_up(node1, "em1")
        assert node1.ping(node2.ipv4("sync"), count=3)


def test_spawn_captures_output_and_crash_kills() -> None:
    with Lab() as lab:
        three_nodes(lab)
        node1 = lab.nodes["node1"]
        process = node1.spawn(["sh", "-c", "echo started; ip -o addr show em0; exec sleep 600"])
        assert process.wait_for_output("started")
        assert process.wait_for_output("10.0.0.1/24")
        lab.crash(node1)
        assert process.returncode == -signal.SIGKILL
        assert "state DOWN" in node1.run(["ip", "link", "show", "em0"]).stdout


def test_node_with_its_own_mount_namespace() -> None:
    with Lab() as lab:
        node = lab.node("storage", mount_namespace=True)
        target = node.dir / "mnt"
        target.mkdir()
        node.run(["mount", "-t", "tmpfs", "tmpfs", str(target)])
        node.run(["sh", "-c", f"echo inside > {target}/file"])
        assert node.run(["cat", f"{target}/file"]).stdout == "inside\n"
        assert not (target / "file").exists(), "the mount must not be visible on the host"
        with open("/proc/mounts") as mounts:
            assert str(target) not in mounts.read()


def test_failed_test_still_tears_down() -> None:
    prefix = ""
    with pytest.raises(RuntimeError), Lab() as lab:
        prefix = lab.prefix
        three_nodes(lab)
        lab.nodes["node1"].spawn(["sleep", "600"])
        raise RuntimeError("the test failed here")
    nothing_left(prefix)


OWNER = """
import sys, time
from carpool.lab import Lab
lab = Lab()
lab.create()
lab.network("lan")
for name in ("node1", "node2"):
    lab.attach(lab.node(name), "lan")
lab.nodes["node1"].spawn(["sleep", "600"])
print(lab.prefix, flush=True)
time.sleep(600)
"""


def test_lab_of_a_sigkilled_owner_is_removed_by_clean() -> None:
    owner = subprocess.Popen([sys.executable, "-c", OWNER], stdout=subprocess.PIPE, text=True)
    try:
        assert owner.stdout is not None
        prefix = owner.stdout.readline().strip()
        assert prefix.startswith("cpl")
        assert f"{prefix}-node1" in list_namespaces()
        clean()  # the owner lives: its lab must stay
        assert f"{prefix}-node1" in list_namespaces()
        owner.send_signal(signal.SIGKILL)
        owner.wait()
        assert f"{prefix}-node1" in list_namespaces(), "nothing removed it yet"
        result = subprocess.run(
            [sys.executable, "-m", "carpool.cli", "lab", "clean"], capture_output=True, text=True
        )
        assert result.returncode == 0, result.stderr
        assert f"namespace {prefix}-node1" in result.stdout
        nothing_left(prefix)
    finally:
        if owner.poll() is None:
            owner.kill()
            owner.wait()
