"""carpd and Debian's ucarp share a vhid: each accepts the other's adverts, either can fail over.

ucarp hashes exactly one IPv4 address into its HMAC, so each vhid carries one VIP.
"""

from __future__ import annotations

import time

from carpool.lab import Lab
from carpool.lab.services import (
    carp_state,
    carpctl,
    holders,
    seed_lan,
    start_carpd,
    start_ucarp,
    wait_carp_state,
    wait_until,
    write_file,
)
from tests.conftest import requires_tool

VIP = "10.0.0.100"
PASSWORD = "secretpass"


def carpd_conf(address: str, skew: int) -> str:
    return (
        f'ifconfig_em0="inet {address} netmask 255.255.255.0"\n'
        f'ifconfig_em0_alias0="vhid 1 advskew {skew} pass {PASSWORD} alias {VIP}/32"\n'
        "net.inet.carp.preempt=1\n"
    )


@requires_tool("ucarp")
def test_ucarp_master_carpd_backup_then_failover_to_carpd() -> None:
    with Lab() as lab:
        seed_lan(lab)
        node1, node2, client = (lab.nodes[n] for n in ("node1", "node2", "client"))
        ucarp = start_ucarp(node1, vhid=1, password=PASSWORD, vip=VIP, advskew=0)
        wait_until(lambda: holders(lab, VIP) == ["node1"], what="ucarp to take the VIP")
        start_carpd(node2, write_file(node2, "rc.conf", carpd_conf("10.0.0.2", 100)))
        wait_carp_state(node2, "BACKUP")
        time.sleep(4)  # longer than carpd's master-down time: ucarp's adverts keep it backup
        assert carp_state(node2) == "BACKUP", ucarp.output()
        stats = carpctl(node2, "stats")
        assert stats["badauth"] == 0 and stats["ipackets"] >= 3
        assert holders(lab, VIP) == ["node1"]
        lab.crash(node1)
        wait_carp_state(node2, "MASTER")
        assert client.ping(VIP, count=2)


@requires_tool("ucarp")
def test_carpd_master_ucarp_backup_then_failover_to_ucarp() -> None:
    with Lab() as lab:
        seed_lan(lab)
        node1, node2, client = (lab.nodes[n] for n in ("node1", "node2", "client"))
        start_carpd(node1, write_file(node1, "rc.conf", carpd_conf("10.0.0.1", 0)))
        wait_carp_state(node1, "MASTER")
        ucarp = start_ucarp(node2, vhid=1, password=PASSWORD, vip=VIP, advskew=100)
        time.sleep(6)  # ucarp's own master-down time is about 3.4 s after its start
        assert holders(lab, VIP) == ["node1"], ucarp.output()
        assert "Bad digest" not in ucarp.output()
        lab.crash(node1)
        wait_until(lambda: holders(lab, VIP) == ["node2"], what="ucarp to take the VIP")
        wait_until(lambda: client.ping(VIP), what="the client to reach the VIP on ucarp")


@requires_tool("ucarp")
def test_carpd_clean_stop_hands_over_to_ucarp_at_once() -> None:
    with Lab() as lab:
        seed_lan(lab)
        node1, node2 = lab.nodes["node1"], lab.nodes["node2"]
        carpd = start_carpd(node1, write_file(node1, "rc.conf", carpd_conf("10.0.0.1", 0)))
        wait_carp_state(node1, "MASTER")
        ucarp = start_ucarp(node2, vhid=1, password=PASSWORD, vip=VIP, advskew=100)
        time.sleep(5)
        assert holders(lab, VIP) == ["node1"]
        carpd.terminate()
        # ucarp reads adverts up to ~1 s late (libpcap buffering), yet well under its 3.4 s timeout.
        wait_until(lambda: holders(lab, VIP) == ["node2"], timeout=3.0, what="ucarp to take over")
        assert "Putting MASTER DOWN" in ucarp.output() or holders(lab, VIP) == ["node2"]
