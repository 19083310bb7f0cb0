"""carpd on the real kernel: the guide's setups, failovers, bad input, demotion, IPv6."""

from __future__ import annotations

import sys
import threading
import time

import pytest

from carpool.control import ControlClient
from carpool.events import Event
from carpool.lab import Lab, faults
from carpool.lab.services import (
    carp_state,
    carpctl,
    carpctl_text,
    holders,
    seed_lan,
    start_carpd,
    wait_carp_state,
    wait_until,
    write_file,
)

NODE1 = """\
ifconfig_em0="inet 10.0.0.1 netmask 255.255.255.0"
ifconfig_em0_alias0="vhid 1 advskew 0 pass secretpass alias 10.0.0.100/32"
net.inet.carp.preempt={preempt}
"""
NODE2 = """\
ifconfig_em0="inet 10.0.0.2 netmask 255.255.255.0"
ifconfig_em0_alias0="vhid 1 advskew 100 pass secretpass alias 10.0.0.100/32"
net.inet.carp.preempt={preempt}
"""
VIP = "10.0.0.100"


def start_pair(lab: Lab, preempt: int = 1) -> None:
    seed_lan(lab)
    node1, node2 = lab.nodes["node1"], lab.nodes["node2"]
    start_carpd(node1, write_file(node1, "rc.conf", NODE1.format(preempt=preempt)))
    wait_carp_state(node1, "MASTER")
    start_carpd(node2, write_file(node2, "rc.conf", NODE2.format(preempt=preempt)))
    wait_carp_state(node2, "BACKUP")


def test_seed_pair_one_master_and_the_client_reaches_it() -> None:
    with Lab() as lab:
        start_pair(lab)
        node1, node2, client = (lab.nodes[n] for n in ("node1", "node2", "client"))
        time.sleep(3.5)  # several adverts: the backup must stay backup
        assert carp_state(node1) == "MASTER" and carp_state(node2) == "BACKUP"
        assert holders(lab, VIP) == ["node1"]
        assert client.ping(VIP)
        neighbour = client.run(["ip", "neigh", "show", VIP]).stdout
        assert node1.mac("em0") in neighbour
        text = carpctl_text(node1, "em0")
        assert "carp: MASTER vhid 1 advbase 1 advskew 0" in text
        assert "inet 10.0.0.100 netmask 0xffffffff broadcast 10.0.0.100 vhid 1" in text
        assert "carp: BACKUP vhid 1 advbase 1 advskew 100" in carpctl_text(node2, "em0")


def test_master_link_down_fails_over_and_preempt_brings_it_back() -> None:
    with Lab() as lab:
        start_pair(lab, preempt=1)
        node1, node2, client = (lab.nodes[n] for n in ("node1", "node2", "client"))
        lab.link_down(node1, "em0")
        wait_carp_state(node2, "MASTER")
        assert carp_state(node1) == "INIT"
        assert "node2" in holders(lab, VIP)
        assert client.ping(VIP, count=2)
        assert node2.mac("em0") in client.run(["ip", "neigh", "show", VIP]).stdout
        lab.link_up(node1, "em0")
        wait_carp_state(node1, "MASTER")
        wait_carp_state(node2, "BACKUP")
        assert holders(lab, VIP) == ["node1"]
        wait_until(lambda: node1.mac("em0") in client.run(["ip", "neigh", "show", VIP]).stdout)


def test_without_preempt_the_recovered_master_stays_backup() -> None:
    with Lab() as lab:
        start_pair(lab, preempt=0)
        node1, node2 = lab.nodes["node1"], lab.nodes["node2"]
        lab.unplug(node1, "em0")
        wait_carp_state(node2, "MASTER")
        lab.plug(node1, "em0")
        wait_carp_state(node1, "BACKUP")
        time.sleep(4)  # more than a master-down interval
        assert carp_state(node1) == "BACKUP" and carp_state(node2) == "MASTER"
        assert holders(lab, VIP) == ["node2"]


def test_master_crash_fails_over() -> None:
    with Lab() as lab:
        start_pair(lab)
        node1, node2, client = (lab.nodes[n] for n in ("node1", "node2", "client"))
        lab.crash(node1)
        wait_carp_state(node2, "MASTER")
        assert client.ping(VIP, count=2)


def test_carpd_sigkilled_under_the_supervisor_leaves_no_vip_behind() -> None:
    with Lab() as lab:
        start_pair(lab)
        node1, node2 = lab.nodes["node1"], lab.nodes["node2"]
        carpd_pid = carpctl(node1)["pid"]
        node1.run(["kill", "-KILL", str(carpd_pid)])
        wait_carp_state(node2, "MASTER")
        wait_until(lambda: holders(lab, VIP) == ["node2"], what="the VIP only on node2")


def test_state_backup_hands_over_at_once() -> None:
    with Lab() as lab:
        start_pair(lab, preempt=0)
        node1, node2 = lab.nodes["node1"], lab.nodes["node2"]
        carpctl(node1, "em0", "vhid", "1", "state", "backup")
        wait_carp_state(node2, "MASTER", timeout=5)
        assert carp_state(node1) == "BACKUP"


def test_clean_stop_hands_over_with_the_leave_advert() -> None:
    with Lab() as lab:
        start_pair(lab, preempt=0)
        node1, node2 = lab.nodes["node1"], lab.nodes["node2"]
        carpd = node1.processes[0]
        carpd.terminate()
        wait_carp_state(node2, "MASTER", timeout=2.5)  # well below the 3 s master-down time
        assert holders(lab, VIP) == ["node2"]


ACTIVE1 = """\
ifconfig_em0="inet 10.0.0.1 netmask 255.255.255.0"
ifconfig_em0_alias0="vhid 1 advskew 0 pass pass1 alias 10.0.0.100/32"
ifconfig_em0_alias1="vhid 2 advskew 100 pass pass2 alias 10.0.0.101/32"
net.inet.carp.preempt=1
"""
ACTIVE2 = """\
ifconfig_em0="inet 10.0.0.2 netmask 255.255.255.0"
ifconfig_em0_alias0="vhid 1 advskew 100 pass pass1 alias 10.0.0.100/32"
ifconfig_em0_alias1="vhid 2 advskew 0 pass pass2 alias 10.0.0.101/32"
net.inet.carp.preempt=1
"""


def test_active_active_pair_and_one_node_failing_hands_over_both() -> None:
    with Lab() as lab:
        seed_lan(lab)
        node1, node2, client = (lab.nodes[n] for n in ("node1", "node2", "client"))
        start_carpd(node1, write_file(node1, "rc.conf", ACTIVE1))
        start_carpd(node2, write_file(node2, "rc.conf", ACTIVE2))
        wait_carp_state(node1, "MASTER", vhid=1)
        wait_carp_state(node2, "MASTER", vhid=2)
        wait_carp_state(node1, "BACKUP", vhid=2)
        wait_carp_state(node2, "BACKUP", vhid=1)
        assert holders(lab, "10.0.0.100") == ["node1"]
        assert holders(lab, "10.0.0.101") == ["node2"]
        lab.crash(node2)
        wait_carp_state(node1, "MASTER", vhid=2)
        assert client.ping("10.0.0.100") and client.ping("10.0.0.101")


def skew_conf(address: str, skew: int) -> str:
    return (
        f'ifconfig_em0="inet {address} netmask 255.255.255.0"\n'
        f'ifconfig_em0_alias0="vhid 7 advskew {skew} pass three alias 10.0.0.107/32"\n'
        "net.inet.carp.preempt=1\n"
    )


def test_three_nodes_lowest_skew_wins_through_a_chain_of_failures() -> None:
    with Lab() as lab:
        seed_lan(lab, routers=3)
        nodes = [lab.nodes[f"node{i}"] for i in (1, 2, 3)]
        skews = {"node1": 50, "node2": 0, "node3": 100}
        for node in nodes:
            start_carpd(
                node,
                write_file(node, "rc.conf", skew_conf(str(node.ipv4("lan")), skews[node.name])),
            )
        node1, node2, node3 = nodes
        wait_carp_state(node2, "MASTER", vhid=7)
        wait_carp_state(node1, "BACKUP", vhid=7)
        wait_carp_state(node3, "BACKUP", vhid=7)
        lab.crash(node2)
        wait_carp_state(node1, "MASTER", vhid=7)
        assert carp_state(node3, vhid=7) == "BACKUP"
        lab.crash(node1)
        wait_carp_state(node3, "MASTER", vhid=7)
        assert holders(lab, "10.0.0.107") == ["node3"]


IPV6 = """\
ifconfig_em0="inet 10.0.0.{n} netmask 255.255.255.0"
ifconfig_em0_alias0="inet6 vhid 3 advskew {skew} pass six alias fd00:0:0:1::100/64"
net.inet.carp.preempt=1
"""


def test_ipv6_vip_fails_over() -> None:
    with Lab() as lab:
        seed_lan(lab)
        node1, node2, client = (lab.nodes[n] for n in ("node1", "node2", "client"))
        start_carpd(node1, write_file(node1, "rc.conf", IPV6.format(n=1, skew=0)))
        wait_carp_state(node1, "MASTER", vhid=3)
        start_carpd(node2, write_file(node2, "rc.conf", IPV6.format(n=2, skew=100)))
        wait_carp_state(node2, "BACKUP", vhid=3)
        assert client.ping("fd00:0:0:1::100")
        lab.crash(node1)
        wait_carp_state(node2, "MASTER", vhid=3)
        wait_until(lambda: client.ping("fd00:0:0:1::100"), what="the IPv6 VIP to answer again")


INJECT = r"""
import socket, sys
from ipaddress import IPv4Address
from carpool.carp import packet
kind = sys.argv[1]
vip = [IPv4Address("10.0.0.100")]
source, group = IPv4Address("10.0.0.10"), IPv4Address("224.0.0.18")
def advert(password=b"secretpass", vhid=1, advskew=0, advbase=1, addresses=vip):
    return packet.build_advert(vhid=vhid, advbase=advbase, advskew=advskew, password=password,
                               addresses=addresses, counter=12345)
ttl = 255
if kind == "password":
    body = packet.encode_ipv4_datagram(source, group, advert(password=b"wrong"))
elif kind == "forged":
    header = advert()
    forged = packet.CarpHeader(**{**{f: getattr(header, f) for f in header.__dataclass_fields__},
                                  "hmac": bytes(20)})
    body = packet.encode_ipv4_datagram(source, group, forged)
elif kind == "vhid":
    body = packet.encode_ipv4_datagram(source, group, advert(vhid=9))
elif kind == "ttl":
    body = packet.encode_ipv4_datagram(source, group, advert(), ttl=64)
elif kind == "short":
    body = packet.encode_ipv4_datagram(source, group, advert())[:30]
    body = body[:2] + len(body).to_bytes(2, "big") + body[4:]
elif kind == "garbage":
    header = packet.encode_ipv4_datagram(source, group, advert())[:20]
    body = header + b"\x99" * 36
else:
    raise SystemExit("unknown kind")
s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
s.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, b"em0")
for _ in range(5):
    s.sendto(body, (str(group), 0))
"""


@pytest.mark.parametrize(
    ("kind", "counter"),
    [
        ("password", "badauth"),
        ("forged", "badauth"),
        ("vhid", "badvhid"),
        ("ttl", "badttl"),
        ("short", "hdrops"),
        ("garbage", "badsum"),
    ],
)
def test_bad_adverts_are_counted_and_change_nothing(kind: str, counter: str) -> None:
    with Lab() as lab:
        start_pair(lab, preempt=1)
        node1, node2, client = (lab.nodes[n] for n in ("node1", "node2", "client"))
        before = carpctl(node2, "stats")
        client.run([sys.executable, "-c", INJECT, kind])
        wait_until(lambda: carpctl(node2, "stats")[counter] >= before[counter] + 5, timeout=5)
        time.sleep(1.0)
        assert carp_state(node1) == "MASTER" and carp_state(node2) == "BACKUP"
        assert holders(lab, VIP) == ["node1"]


def test_demotion_moves_the_master_and_negative_demotion_keeps_one() -> None:
    with Lab() as lab:
        start_pair(lab, preempt=1)
        node1, node2 = lab.nodes["node1"], lab.nodes["node2"]
        result = carpctl(node1, "-g", "carp", "carpdemote", "200")
        assert result["demotion"] == 200
        wait_carp_state(node2, "MASTER")
        wait_carp_state(node1, "BACKUP")
        carpctl(node1, "-carpdemote", "200")
        wait_carp_state(node1, "MASTER")
        wait_carp_state(node2, "BACKUP")
        carpctl(node2, "-g", "carp", "-carpdemote", "50")  # negative: below zero
        assert carpctl(node2, "get", "net.inet.carp.demotion")["net.inet.carp.demotion"] == -50
        time.sleep(4)
        masters = [n for n in (node1, node2) if carp_state(n) == "MASTER"]
        assert len(masters) == 1 and holders(lab, VIP) == [masters[0].name]


def test_stats_and_sysctl_through_carpctl() -> None:
    with Lab() as lab:
        start_pair(lab, preempt=0)
        node1, node2 = lab.nodes["node1"], lab.nodes["node2"]
        text = carpctl_text(node2, "stats")
        assert text.startswith("carp:\n")
        assert "received (IPv4)" in text
        assert carpctl(node1, "stats")["opackets"] > 0
        result = carpctl(node2, "set", "net.inet.carp.preempt=1")
        assert result == {"net.inet.carp.preempt": 1}
        wrong = carpctl(node2, "em0", "vhid", "9", "state", "backup", check=False)
        assert wrong.returncode == 1 and "vhid 9" in wrong.stderr


PEER = """\
ifconfig_em0="inet 10.0.0.{n} netmask 255.255.255.0"
ifconfig_em0_alias0="vhid 5 advskew {skew} peer 10.0.0.{other} pass uni alias 10.0.0.105/32"
"""


def test_unicast_peers_work_with_multicast_blocked() -> None:
    with Lab() as lab:
        seed_lan(lab)
        node1, node2 = lab.nodes["node1"], lab.nodes["node2"]
        # The switch drops every frame to CARP's multicast group: only unicast gets through.
        faults.add_rules(lab.switch, lab.prefix, ["ether daddr 01:00:5e:00:00:12 drop"])
        start_carpd(node1, write_file(node1, "rc.conf", PEER.format(n=1, skew=0, other=2)))
        wait_carp_state(node1, "MASTER", vhid=5)
        start_carpd(node2, write_file(node2, "rc.conf", PEER.format(n=2, skew=100, other=1)))
        wait_carp_state(node2, "BACKUP", vhid=5)
        time.sleep(4)
        assert carp_state(node2, vhid=5) == "BACKUP"
        assert carpctl(node2, "stats")["ipackets"] >= 3
        assert "peer 10.0.0.1 peer6 ff02::12" in carpctl_text(node2, "em0")
        lab.crash(node1)
        wait_carp_state(node2, "MASTER", vhid=5)


def test_sighup_reloads_and_a_bad_file_keeps_the_running_configuration() -> None:
    with Lab() as lab:
        start_pair(lab)
        node1 = lab.nodes["node1"]
        conf = node1.dir / "rc.conf"
        conf.write_text(
            NODE1.format(preempt=1)
            + 'ifconfig_em0_alias1="vhid 2 advskew 0 pass two alias 10.0.0.102/32"\n'
        )
        node1.run(["kill", "-HUP", str(carpctl(node1)["pid"])])
        wait_carp_state(node1, "MASTER", vhid=2)
        assert holders(lab, "10.0.0.102") == ["node1"]
        conf.write_text('ifconfig_em0_alias0="vhid 300 alias 10.0.0.1/32"\n')
        node1.run(["kill", "-HUP", str(carpctl(node1)["pid"])])
        time.sleep(1)
        assert carp_state(node1, vhid=2) == "MASTER" and carp_state(node1, vhid=1) == "MASTER"
        log = node1.processes[0].output()
        assert "rc.conf:1" in log and "vhid" in log


def test_stale_vip_of_a_previous_run_is_removed_at_start() -> None:
    with Lab() as lab:
        start_pair(lab)
        node2 = lab.nodes["node2"]
        node2.processes[0].kill()  # supervisor and carpd at once: no cleanup runs
        node2.processes.clear()
        node2.run(["ip", "addr", "add", f"{VIP}/32", "dev", "em0"])
        assert sorted(holders(lab, VIP)) == ["node1", "node2"]
        start_carpd(node2, node2.dir / "rc.conf")
        wait_carp_state(node2, "BACKUP")
        assert holders(lab, VIP) == ["node1"]


TWO_LINKS = """\
ifconfig_em0="inet 10.0.0.{n} netmask 255.255.255.0"
ifconfig_em1="inet 192.168.255.{n} netmask 255.255.255.0"
ifconfig_em0_alias0="vhid 1 advskew {skew} pass lan alias 10.0.0.100/32"
ifconfig_em1_alias0="vhid 2 advskew {skew} pass sync alias 192.168.255.100/32"
net.inet.carp.preempt=1
"""


def test_with_preempt_a_dead_interface_moves_every_vhid_of_the_host() -> None:
    with Lab() as lab:
        seed_lan(lab)
        for name in ("node1", "node2"):
            lab.attach(lab.nodes[name], "sync", ifname="em1")
        node1, node2 = lab.nodes["node1"], lab.nodes["node2"]
        start_carpd(node1, write_file(node1, "rc.conf", TWO_LINKS.format(n=1, skew=0)))
        wait_carp_state(node1, "MASTER", "em0", 1)
        wait_carp_state(node1, "MASTER", "em1", 2)
        start_carpd(node2, write_file(node2, "rc.conf", TWO_LINKS.format(n=2, skew=100)))
        wait_carp_state(node2, "BACKUP", "em0", 1)
        lab.unplug(node1, "em1")
        wait_carp_state(node2, "MASTER", "em1", 2)
        wait_carp_state(node2, "MASTER", "em0", 1)  # follows: node1 advertises skew 240 now
        assert carpctl(node1, "get", "net.inet.carp.demotion")["net.inet.carp.demotion"] == 240
        lab.plug(node1, "em1")
        wait_carp_state(node1, "MASTER", "em0", 1)
        wait_carp_state(node1, "MASTER", "em1", 2)


def test_events_stream_and_metrics() -> None:
    with Lab() as lab:
        seed_lan(lab)
        node1, node2 = lab.nodes["node1"], lab.nodes["node2"]
        start_carpd(
            node1,
            write_file(node1, "rc.conf", NODE1.format(preempt=0)),
            extra=("--metrics", "127.0.0.1:9812"),
        )
        wait_carp_state(node1, "MASTER")
        start_carpd(node2, write_file(node2, "rc.conf", NODE2.format(preempt=0)))
        wait_carp_state(node2, "BACKUP")
        events: list[Event] = []

        def follow() -> None:
            for event in ControlClient(node2.dir / "carpd.sock").events():
                events.append(event)
                if event.name == "MASTER":
                    return

        follower = threading.Thread(target=follow, daemon=True)
        follower.start()
        time.sleep(0.5)
        carpctl(node1, "em0", "vhid", "1", "state", "backup")
        follower.join(10)
        master = [e for e in events if e.name == "MASTER"]
        assert master and master[0].attributes["subsystem"] == "1@em0"
        assert master[0].attributes["system"] == "CARP"
        page = node1.run(
            [sys.executable, "-c",
             "import urllib.request;"
             "print(urllib.request.urlopen('http://127.0.0.1:9812/metrics').read().decode())"]
        ).stdout  # fmt: skip
        assert 'carpool_carp_state{ifname="em0",state="BACKUP",vhid="1"} 1.0' in page
        assert "carpool_events_total" in page


def test_advskew_command_changes_what_is_advertised() -> None:
    with Lab() as lab:
        start_pair(lab, preempt=1)
        node1, node2 = lab.nodes["node1"], lab.nodes["node2"]
        interface = carpctl(node1, "em0", "vhid", "1", "advskew", "200")
        assert interface["vhids"][0]["advskew"] == 200
        wait_carp_state(node2, "MASTER")  # node2 (100) preempts the now slower node1
        assert "carp: BACKUP vhid 1 advbase 1 advskew 200" in carpctl_text(node1, "em0")


VMAC = """\
ifconfig_em0="inet 10.0.0.{n} netmask 255.255.255.0"
ifconfig_em0_alias0="vhid 1 advskew {skew} pass secretpass vmac alias 10.0.0.100/32"
net.inet.carp.preempt=1
"""


def test_virtual_mac_stays_the_same_across_failover() -> None:
    with Lab() as lab:
        seed_lan(lab)
        node1, node2, client = (lab.nodes[n] for n in ("node1", "node2", "client"))
        start_carpd(node1, write_file(node1, "rc.conf", VMAC.format(n=1, skew=0)))
        wait_carp_state(node1, "MASTER")
        start_carpd(node2, write_file(node2, "rc.conf", VMAC.format(n=2, skew=100)))
        wait_carp_state(node2, "BACKUP")
        assert holders(lab, VIP, ifname="vh1.em0") == ["node1"]
        assert client.ping(VIP)
        assert client.ping("10.0.0.1")

        def lladdr(address: str) -> str:
            return client.run(["ip", "neigh", "show", address]).stdout

        assert "00:00:5e:00:01:01" in lladdr(VIP)
        assert node1.mac("em0") in lladdr("10.0.0.1"), "the host's own address keeps its MAC"
        assert carpctl(node1)["interfaces"]["em0"]["vhids"][0]["vmac"] == "00:00:5e:00:01:01"
        lab.crash(node1)
        wait_carp_state(node2, "MASTER")
        wait_until(lambda: client.ping(VIP), what="the VIP to answer from node2")
        assert "00:00:5e:00:01:01" in lladdr(VIP)
        node2.processes[0].terminate()
        assert "vh1.em0" not in node2.run(["ip", "-o", "link"]).stdout, "macvlan removed on stop"
