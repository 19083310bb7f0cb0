"""pfsyncd on the real kernel: established TCP connections survive a router's death.

    client 10.78.1.2 ── inside ── R1 .252 / R2 .253 (VIP .1) ── outside ── server 10.78.2.2
                                  em1: sync link 192.168.255.1 / .2

Both routers forward with a strict stateful nftables ruleset (policy drop,
``ct state invalid drop``, new connections only from inside) and
``nf_conntrack_tcp_loose=0``, and SNAT to the outside VIP; carpd holds the
gateway VIPs on both sides.  Half of the connections are client-first (echo),
half server-first (the server pushes numbered lines); every line is checked.
"""

from __future__ import annotations

import ipaddress
import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from carpool.lab import Lab
from carpool.lab.cluster import LabProcess, Node
from carpool.lab.services import (
    BIN,
    carp_state,
    carpctl,
    daemon_status,
    start_carpd,
    wait_carp_state,
    wait_until,
    write_file,
)
from carpool.pfsync import wire
from carpool.pfsync.ctnetlink import ConntrackEntry, ConntrackTuple, TcpInfo, TcpState

KEY = "carpool pfsync test key 0123456789"
CONNECTIONS = 200
PORT = 7000
SERVER = "10.78.2.2"
#: router: (host number on inside and outside, sync address, sync peer, advskew)
ROUTERS = {
    "r1": (252, "192.168.255.1", "192.168.255.2", 0),
    "r2": (253, "192.168.255.2", "192.168.255.1", 100),
}

RC_CONF = """\
ifconfig_em0="inet 10.78.1.{host} netmask 255.255.255.0"
ifconfig_em0_alias0="vhid 1 advskew {skew} pass secretpass alias 10.78.1.1/32"
ifconfig_em2="inet 10.78.2.{host} netmask 255.255.255.0"
ifconfig_em2_alias0="vhid 2 advskew {skew} pass secretpass alias 10.78.2.1/32"
net.inet.carp.preempt=1
pfsync_enable="YES"
pfsync_syncdev="em1"
pfsync_syncpeer="{peer}"
pfsync_key="{key}"
pfsync_ignore="10.78.1.252 10.78.1.253 10.78.2.252 10.78.2.253"
"""

RULESET = """\
flush ruleset
table inet pfsynctest {
  chain forward {
    type filter hook forward priority 0; policy drop;
    ct state invalid counter drop comment "invalid"
    ct state established,related counter accept comment "established"
    iifname "em0" oifname "em2" ct state new counter accept comment "new-from-inside"
    counter comment "policy-drop"
  }
}
table ip pfsyncnat {
  chain post {
    type nat hook postrouting priority 100;
    ip saddr 10.78.1.0/24 oifname "em2" counter snat to 10.78.2.1
  }
}
"""

SERVER_SCRIPT = """\
import asyncio, sys

async def handle(reader, writer):
    try:
        mode = await reader.readline()
        if mode.startswith(b"PUSH"):
            number = 0
            while True:
                writer.write(b"%d\\n" % number)
                await writer.drain()
                number += 1
                await asyncio.sleep(0.2)
        else:
            while True:
                line = await reader.readline()
                if not line:
                    break
                writer.write(line)
                await writer.drain()
    except OSError:
        pass
    finally:
        writer.close()

async def main():
    server = await asyncio.start_server(handle, "0.0.0.0", int(sys.argv[1]), backlog=512)
    print("listening", flush=True)
    async with server:
        await server.serve_forever()

asyncio.run(main())
"""

CLIENT_SCRIPT = """\
import asyncio, json, os, sys, time

host, port, count, status_path = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
lines = [0] * count
errors = {}
connected = [False] * count

async def echo(index):
    reader, writer = await asyncio.open_connection(host, port)
    connected[index] = True
    writer.write(b"ECHO\\n")
    number = 0
    while True:
        expected = b"%d.%d\\n" % (index, number)
        writer.write(expected)
        await writer.drain()
        line = await reader.readline()
        if line != expected:
            raise ValueError("echo %r, expected %r" % (line, expected))
        lines[index] += 1
        number += 1
        await asyncio.sleep(0.2)

async def push(index):
    reader, writer = await asyncio.open_connection(host, port)
    connected[index] = True
    writer.write(b"PUSH\\n")
    await writer.drain()
    number = 0
    while True:
        line = await reader.readline()
        if line != b"%d\\n" % number:
            raise ValueError("pushed %r, expected %d" % (line, number))
        lines[index] += 1
        number += 1

async def run(index):
    try:
        await (echo(index) if index % 2 == 0 else push(index))
    except Exception as error:
        errors[index] = repr(error)

async def report():
    while True:
        data = {"time": time.monotonic(), "connected": sum(connected), "lines": lines,
                "errors": errors}
        with open(status_path + ".tmp", "w") as handle:
            json.dump(data, handle)
        os.replace(status_path + ".tmp", status_path)
        await asyncio.sleep(0.25)

async def main():
    reporter = asyncio.ensure_future(report())
    tasks = []
    for index in range(count):
        tasks.append(asyncio.ensure_future(run(index)))
        await asyncio.sleep(0.005)
    await asyncio.gather(*tasks)
    await asyncio.sleep(0.5)
    reporter.cancel()

asyncio.run(main())
"""


# -- topology ------------------------------------------------------------------------------


def build(lab: Lab) -> dict[str, Node]:
    for name in ("inside", "outside", "sync"):
        lab.network(name)
    client, server = lab.node("client"), lab.node("server")
    lab.attach(client, "inside", address="10.78.1.2/24", address6="none")
    lab.attach(server, "outside", address=f"{SERVER}/24", address6="none")
    client.run(["ip", "route", "add", "default", "via", "10.78.1.1"])
    server.run(["ip", "route", "add", "default", "via", "10.78.2.1"])
    nodes = {"client": client, "server": server}
    for name, (host, sync_address, _, _) in ROUTERS.items():
        router = lab.node(name)
        lab.attach(router, "inside", ifname="em0", address=f"10.78.1.{host}/24", address6="none")
        lab.attach(router, "sync", ifname="em1", address=f"{sync_address}/24", address6="none")
        lab.attach(router, "outside", ifname="em2", address=f"10.78.2.{host}/24", address6="none")
        router.run(["nft", "-f", "-"], input=RULESET)
        router.run(["sysctl", "-q", "-w", "net.ipv4.ip_forward=1"])
        router.run(["sysctl", "-q", "-w", "net.netfilter.nf_conntrack_tcp_loose=0"])
        _, _, peer, skew = ROUTERS[name]
        write_file(router, "rc.conf", RC_CONF.format(host=host, skew=skew, peer=peer, key=KEY))
        nodes[name] = router
    return nodes


def start_pfsyncd(node: Node) -> LabProcess:
    argv = [str(BIN / "pfsyncd"), "-f", str(node.dir / "rc.conf"), "--run-dir", str(node.dir)]
    process = node.spawn(argv, name="pfsyncd")
    wait_until(lambda: pfsync_status(node) is not None, 20, f"pfsyncd on {node.name}")
    return process


def pfsync_status(node: Node) -> dict[str, Any] | None:
    status = daemon_status(node, "pfsyncd")
    return status if isinstance(status, dict) else None


def counter(node: Node, name: str) -> int:
    status = pfsync_status(node)
    assert status is not None, f"pfsyncd on {node.name} does not answer"
    return int(status["counters"].get(name, 0))


def start_router(node: Node, *, pfsync: bool) -> None:
    if pfsync:
        start_pfsyncd(node)  # first, so that carpd is demoted before it could preempt
    start_carpd(node, node.dir / "rc.conf")


def carp_demotion(node: Node) -> int | None:
    """carpd's demotion, or None while carpd does not answer."""
    result = carpctl(node, check=False)
    return int(result["demotion"]) if isinstance(result, dict) else None


def router_state(node: Node) -> tuple[str | None, str | None]:
    return carp_state(node, "em0", 1), carp_state(node, "em2", 2)


def wait_master(node: Node, timeout: float = 30.0) -> None:
    wait_carp_state(node, "MASTER", "em0", 1, timeout)
    wait_carp_state(node, "MASTER", "em2", 2, timeout)


def kernel_states(node: Node) -> int:
    result = node.run(
        ["conntrack", "-L", "-p", "tcp", "--dport", str(PORT)], check=False, timeout=20
    )
    return sum(1 for line in result.stdout.splitlines() if "ESTABLISHED" in line)


# -- traffic -------------------------------------------------------------------------------


class Traffic:
    def __init__(self, nodes: dict[str, Node]) -> None:
        self.client, self.server = nodes["client"], nodes["server"]
        server_script = write_file(self.server, "tcp_server.py", SERVER_SCRIPT)
        client_script = write_file(self.client, "tcp_client.py", CLIENT_SCRIPT)
        self.status_path = self.client.dir / "tcp_client.json"
        self.server_process = self.server.spawn(
            self.server.python(str(server_script), str(PORT)), name="tcp_server"
        )
        assert self.server_process.wait_for_output("listening", 20)
        self.client_process = self.client.spawn(
            self.client.python(
                str(client_script), SERVER, str(PORT), str(CONNECTIONS), str(self.status_path)
            ),
            name="tcp_client",
        )

    def status(self) -> dict[str, Any]:
        try:
            data: dict[str, Any] = json.loads(self.status_path.read_text())
            return data
        except (OSError, ValueError):
            return {"connected": 0, "lines": [0] * CONNECTIONS, "errors": {}}

    def lines(self) -> list[int]:
        return list(self.status()["lines"])

    def wait_flowing(self, minimum: int = 3) -> None:
        def flowing() -> bool:
            status = self.status()
            return bool(status["connected"] == CONNECTIONS and min(status["lines"]) >= minimum)

        wait_until(flowing, 60, f"{CONNECTIONS} connections exchanging lines")
        assert self.status()["errors"] == {}

    def progressed_since(self, before: list[int], lines: int) -> list[int]:
        """Indexes of the connections that got ``lines`` more verified lines."""
        now = self.lines()
        return [i for i in range(CONNECTIONS) if now[i] >= before[i] + lines]


@contextmanager
def topology(*, pfsync: bool) -> Iterator[tuple[Lab, dict[str, Node]]]:
    with Lab() as lab:
        nodes = build(lab)
        for name in ("r1", "r2"):
            start_router(nodes[name], pfsync=pfsync)
            if name == "r1":
                wait_master(nodes["r1"])
        wait_carp_state(nodes["r2"], "BACKUP", "em0", 1)
        wait_carp_state(nodes["r2"], "BACKUP", "em2", 2)
        if pfsync:
            for name in ("r1", "r2"):
                wait_until(
                    lambda n=nodes[name]: bool((pfsync_status(n) or {}).get("syncok")),  # type: ignore[misc]
                    30,
                    f"pfsyncd on {name} to finish its bulk update",
                )
        yield lab, nodes


def test_established_connections_survive_switchover_crash_and_failback() -> None:
    with topology(pfsync=True) as (lab, nodes):
        r1, r2 = nodes["r1"], nodes["r2"]
        traffic = Traffic(nodes)
        traffic.wait_flowing()
        wait_until(lambda: kernel_states(r2) >= CONNECTIONS, 30, "r2 to hold every state")
        wait_until(lambda: carp_demotion(r2) == 0, 10, "r2 without demotion")

        # Planned switchover: the operator demotes r1, r2 preempts; then back.
        carpctl(r1, "-g", "carp", "carpdemote", "200")
        wait_master(r2)
        before = traffic.lines()
        wait_until(
            lambda: len(traffic.progressed_since(before, 5)) == CONNECTIONS,
            60,
            "every connection to carry on through r2 after the switchover",
        )
        carpctl(r1, "-g", "carp", "-carpdemote", "200")
        wait_master(r1)
        before = traffic.lines()
        wait_until(
            lambda: len(traffic.progressed_since(before, 5)) == CONNECTIONS,
            60,
            "every connection to carry on through r1 after switching back",
        )
        assert traffic.status()["errors"] == {}

        # R1 dies: R2 takes the VIPs and carries on with the states it was sent.
        before = traffic.lines()
        lab.crash(r1)
        wait_master(r2)
        wait_until(
            lambda: len(traffic.progressed_since(before, 10)) == CONNECTIONS,
            60,
            "every connection to carry on through r2",
        )
        assert traffic.status()["errors"] == {}

        # R1 comes back with an empty table; its sync link is still cut, so no bulk
        # update can arrive: it must stay demoted and BACKUP although it preempts.
        r1.run(["conntrack", "-F"], check=False)
        lab.drop(r1, network="sync")
        for ifname in ("em0", "em1", "em2"):
            lab.link_up(r1, ifname)
        start_router(r1, pfsync=True)
        wait_until(lambda: carp_demotion(r1) == 240, 20, "pfsyncd to demote carpd on r1")
        wait_carp_state(r1, "BACKUP", "em0", 1)
        time.sleep(4)  # several adverts of r2 with advskew 100 against our 0 + 240
        assert router_state(r1) == ("BACKUP", "BACKUP"), (
            router_state(r2),
            [p.output()[-3000:] for p in r1.processes if "carpd" in p.log.name],
        )
        status = pfsync_status(r1)
        assert status is not None and not status["syncok"] and status["bulk"] == "waiting"

        # The sync link heals: the next bulk request is answered, then r1 preempts.
        lab.heal()
        wait_until(lambda: bool((pfsync_status(r1) or {}).get("syncok")), 30, "r1 bulk done")
        assert kernel_states(r1) >= CONNECTIONS
        wait_until(lambda: carp_demotion(r1) == 0, 10, "r1 demotion lifted")
        wait_master(r1)
        wait_carp_state(r2, "BACKUP", "em0", 1)
        before = traffic.lines()
        wait_until(
            lambda: len(traffic.progressed_since(before, 10)) == CONNECTIONS,
            60,
            "every connection to carry on through r1 again",
        )
        assert traffic.status()["errors"] == {}
        r1_status = pfsync_status(r1)
        assert r1_status is not None
        assert r1_status["counters"]["bulk_done"] == 1
        assert r1_status["counters"]["kernel_created"] >= CONNECTIONS


def test_without_pfsyncd_the_connections_die_with_the_router() -> None:
    with topology(pfsync=False) as (lab, nodes):
        traffic = Traffic(nodes)
        traffic.wait_flowing()
        assert kernel_states(nodes["r2"]) == 0
        before = traffic.lines()
        lab.crash(nodes["r1"])
        wait_master(nodes["r2"])
        time.sleep(10)
        survivors = traffic.progressed_since(before, 10)
        assert len(survivors) < CONNECTIONS, "connections survived without state sync"
        assert survivors == []


def _send_from(node: Node, datagrams: list[bytes], ttl: int = 255) -> None:
    """UDP datagrams from the node's sync address to r1's pfsyncd."""
    script = (
        "import socket, sys\n"
        "s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
        f"s.setsockopt(socket.IPPROTO_IP, socket.IP_TTL, {ttl})\n"
        "for line in sys.stdin.read().split():\n"
        f"    s.sendto(bytes.fromhex(line), ('192.168.255.1', 8240))\n"
    )
    node.run(node.python("-c", script), input="\n".join(d.hex() for d in datagrams))


def test_forged_and_broken_sync_packets_are_rejected_and_counted() -> None:
    with Lab() as lab:
        nodes = build(lab)
        r1, r2 = nodes["r1"], nodes["r2"]
        start_pfsyncd(r1)
        wait_until(lambda: counter(r1, "bulk_requests_out") >= 1, 20, "r1 to ask for a bulk")
        original = ConntrackTuple(
            ipaddress.IPv4Address("10.78.1.99"), ipaddress.IPv4Address(SERVER), 6, 4444, 22
        )
        forged_entry = ConntrackEntry(
            original, original.inverted(), 14, 600, 0, 0, TcpInfo(TcpState.ESTABLISHED)
        )
        forged = wire.Data(7, 1, (wire.Record.of(wire.Action.INS, forged_entry),))
        wrong_key = wire.encode(forged, b"not the key of this cluster!!")
        good = wire.encode(forged, KEY.encode())
        _send_from(
            r2,
            [
                wrong_key,
                b"garbage" * 10,
                good[:30],
                good[:-1] + bytes([good[-1] ^ 1]),
            ],
        )
        _send_from(r2, [good], ttl=64)
        wait_until(lambda: counter(r1, "badauth") >= 3, 20, "bad authentication counted")
        wait_until(lambda: counter(r1, "badttl") >= 1, 20, "bad ttl counted")
        assert counter(r1, "badlen") >= 1
        assert counter(r1, "ins_in") == 0
        assert "10.78.1.99" not in r1.run(["conntrack", "-L"], check=False).stdout
        assert pfsync_status(r1) is not None  # still serving
        text = r1.run([str(BIN / "pfsyncctl"), "--run-dir", str(r1.dir)]).stdout
        assert "packets discarded for bad authentication" in text
        assert "current entries" in text
        # the same record, well signed and from the peer, is accepted
        _send_from(r2, [good])
        wait_until(
            lambda: "10.78.1.99" in r1.run(["conntrack", "-L"], check=False).stdout,
            20,
            "the authenticated state in r1's table",
        )


def test_multicast_sync_link_carries_inserts_and_deletes() -> None:
    with Lab() as lab:
        nodes = build(lab)
        r1, r2 = nodes["r1"], nodes["r2"]
        for router in (r1, r2):
            conf = router.dir / "rc.conf"
            lines = conf.read_text().splitlines()
            conf.write_text("\n".join(x for x in lines if "syncpeer" not in x) + "\n")
            start_pfsyncd(router)
        for router in (r1, r2):
            wait_until(
                lambda n=router: bool((pfsync_status(n) or {}).get("syncok")),  # type: ignore[misc]
                30,
                "bulk done",
            )
            status = pfsync_status(router)
            assert status is not None and status["destination"] == "224.0.0.240"
        flow = ["-p", "tcp", "-s", "10.78.1.77", "-d", SERVER, "--sport", "5555", "--dport", "80"]
        r1.run(["conntrack", "-I", *flow, "--state", "ESTABLISHED", "-t", "600",
                "-u", "SEEN_REPLY,ASSURED"])  # fmt: skip

        def on_r2() -> bool:
            return "10.78.1.77" in r2.run(["conntrack", "-L", *flow], check=False).stdout

        wait_until(on_r2, 20, "the state inserted on r1 to reach r2")
        r1.run(["conntrack", "-D", *flow])
        wait_until(lambda: not on_r2(), 20, "the state deleted on r1 to leave r2")
        assert counter(r2, "del_in") >= 1 and counter(r2, "badauth") == 0
