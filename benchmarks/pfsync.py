#!/usr/bin/env python3
"""Conntrack state sync: pfsyncd beside conntrackd (FTFW, DisableExternalCache) on one topology.

    client ── inside ── R1 / R2 (carpd VIPs .1) ── outside ── server
                        em1: dedicated sync link

Both routers forward with a strict stateful nftables ruleset,
``nf_conntrack_tcp_loose=0`` and SNAT to the outside VIP.  conntrackd runs in
FTFW mode over UDP on the sync link and injects received states straight into
the kernel (``DisableExternalCache on``), like pfsyncd, so neither needs a
commit step on takeover.

Metrics (median of the trials; every system measured in the same run):

  survived_pct            established TCP connections (half client-first, half
                          server-first) still exchanging verified lines after R1
                          crashes and R2 takes over
  new_state_latency_ms    new connection's NEW event on R1 -> the entry exists in
                          R2's kernel (conntrack events on both, one clock);
                          median, and p99 as new_state_latency_p99_ms
  lossfree_states_per_s   N synthetic ESTABLISHED entries injected on R1 as fast as
                          the injector goes; N / time until R2 holds all of them
                          (0 if some never arrive)
  bulk_50k_s              R2 starts empty while R1 holds 50k entries: time until R2
                          holds them (pfsyncd: its bulk update; conntrackd: -n)

usage: pfsync.py [--quick] [--trials N] [--systems carpool,conntrackd]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from typing import Any

from carpool.lab import Lab, LabProcess, Node
from carpool.lab.services import BIN, carp_state, start_carpd, wait_until, write_file

SYSTEMS = ("carpool", "conntrackd")
KEY = "benchmark shared key 0123456789abcdef"
SERVER = "10.78.2.2"
PORT = 7000
ROUTERS = {
    "r1": (252, "192.168.255.1", "192.168.255.2", 0),
    "r2": (253, "192.168.255.2", "192.168.255.1", 100),
}
ROUTER_ADDRESSES = "10.78.1.252 10.78.1.253 10.78.2.252 10.78.2.253"

RC_CONF = """\
ifconfig_em0="inet 10.78.1.{host} netmask 255.255.255.0"
ifconfig_em0_alias0="vhid 1 advskew {skew} pass benchpass alias 10.78.1.1/32"
ifconfig_em2="inet 10.78.2.{host} netmask 255.255.255.0"
ifconfig_em2_alias0="vhid 2 advskew {skew} pass benchpass alias 10.78.2.1/32"
net.inet.carp.preempt=1
pfsync_enable="YES"
pfsync_syncdev="em1"
pfsync_syncpeer="{peer}"
pfsync_key="{key}"
pfsync_ignore="{ignore}"
"""

CONNTRACKD_CONF = """\
Sync {{
    Mode FTFW {{
        DisableExternalCache On
    }}
    UDP {{
        IPv4_address {address}
        IPv4_Destination_Address {peer}
        Port 3780
        Interface em1
        SndSocketBuffer 8388608
        RcvSocketBuffer 8388608
        Checksum on
    }}
}}
General {{
    HashSize 65536
    HashLimit 262144
    LogFile {dir}/conntrackd.log
    Syslog off
    LockFile {dir}/conntrackd.lock
    UNIX {{ Path {dir}/conntrackd.ctl }}
    NetlinkBufferSize 2097152
    NetlinkBufferSizeMaxGrowth 33554432
    NetlinkOverrunResync On
    Filter From Userspace {{
        Protocol Accept {{ TCP UDP }}
        Address Ignore {{
            IPv4_address 127.0.0.1
            IPv4_address 192.168.255.0/24
{ignore}
        }}
    }}
}}
"""

RULESET = """\
flush ruleset
table inet bench {
  chain forward {
    type filter hook forward priority 0; policy drop;
    ct state invalid counter drop
    ct state established,related counter accept
    iifname "em0" oifname "em2" ct state new counter accept
  }
}
table ip benchnat {
  chain post {
    type nat hook postrouting priority 100;
    ip saddr 10.78.1.0/24 oifname "em2" snat to 10.78.2.1
  }
}
"""

SERVER_SCRIPT = """\
import asyncio, sys
async def handle(reader, writer):
    try:
        if (await reader.readline()).startswith(b"PUSH"):
            number = 0
            while True:
                writer.write(b"%d\\n" % number); await writer.drain(); number += 1
                await asyncio.sleep(0.2)
        while line := await reader.readline():
            writer.write(line); await writer.drain()
    except OSError:
        pass
async def main():
    server = await asyncio.start_server(handle, "0.0.0.0", int(sys.argv[1]), backlog=1024)
    print("listening", flush=True)
    await server.serve_forever()
asyncio.run(main())
"""

CLIENT_SCRIPT = """\
import asyncio, json, os, sys, time
host, port, count, path = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
lines, errors, up = [0] * count, {}, [False] * count
async def one(i):
    try:
        reader, writer = await asyncio.open_connection(host, port)
        up[i] = True
        if i % 2:
            writer.write(b"PUSH\\n"); await writer.drain(); n = 0
            while True:
                if await reader.readline() != b"%d\\n" % n: raise ValueError("bad line")
                lines[i] += 1; n += 1
        writer.write(b"ECHO\\n"); n = 0
        while True:
            want = b"%d.%d\\n" % (i, n); writer.write(want); await writer.drain()
            if await reader.readline() != want: raise ValueError("bad echo")
            lines[i] += 1; n += 1; await asyncio.sleep(0.2)
    except Exception as error:
        errors[i] = repr(error)
async def report():
    while True:
        data = {"up": sum(up), "lines": lines, "errors": errors}
        with open(path + ".tmp", "w") as f: json.dump(data, f)
        os.replace(path + ".tmp", path); await asyncio.sleep(0.25)
async def main():
    asyncio.ensure_future(report()); tasks = []
    for i in range(count):
        tasks.append(asyncio.ensure_future(one(i))); await asyncio.sleep(0.005)
    await asyncio.gather(*tasks)
asyncio.run(main())
"""

# Conntrack helper run inside a router: inject synthetic entries, or log NEW events.
HELPER_SCRIPT = """\
import ipaddress, json, select, sys, time
from carpool.pfsync.conntrack import ChangeKind, EventSocket, KernelChange, TableWriter
from carpool.pfsync.ctnetlink import ConntrackEntry, ConntrackTuple, EventKind, TcpInfo, TcpState
def synthetic(i, base):
    src = ipaddress.IPv4Address("10.%d.%d.%d" % (base + i // 60000, (i // 250) % 240, i % 250 + 1))
    original = ConntrackTuple(src, ipaddress.IPv4Address("10.90.0.2"), 6, 1024 + i % 50000, 7000)
    return ConntrackEntry(original, original.inverted(), status=14, timeout=1200, mark=0,
                          tcp=TcpInfo(TcpState.ESTABLISHED, 7, 7, 3, 3))
if sys.argv[1] == "inject":
    count, base = int(sys.argv[2]), int(sys.argv[3])
    writer = TableWriter(default_timeout=1200)
    start = time.monotonic()
    changes = [KernelChange(ChangeKind.UPSERT, synthetic(i, base)) for i in range(count)]
    report = writer.apply(changes)
    print(json.dumps({"created": report.created, "seconds": time.monotonic() - start}), flush=True)
else:
    port, seconds, out = int(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
    events = EventSocket()
    seen = {}
    print("watching", flush=True)
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        select.select([events], [], [], 0.1)
        now = time.monotonic()
        for message in events.read().messages:
            original = message.entry.original
            if message.kind is EventKind.NEW and original.dst_port == port:
                seen.setdefault(original.src_port, now)
    with open(out, "w") as handle:
        json.dump(seen, handle)
"""


class Bench:
    def __init__(self, lab: Lab) -> None:
        self.lab = lab
        for name in ("inside", "outside", "sync"):
            lab.network(name)
        self.client, self.server = lab.node("client"), lab.node("server")
        lab.attach(self.client, "inside", address="10.78.1.2/24", address6="none")
        lab.attach(self.server, "outside", address=f"{SERVER}/24", address6="none")
        self.client.run(["ip", "route", "add", "default", "via", "10.78.1.1"])
        self.server.run(["ip", "route", "add", "default", "via", "10.78.2.1"])
        self.server.run(["ip", "route", "add", "10.90.0.0/16", "dev", "em0"], check=False)
        self.routers: dict[str, Node] = {}
        for name, (host, sync_address, peer, skew) in ROUTERS.items():
            node = lab.node(name)
            lab.attach(node, "inside", ifname="em0", address=f"10.78.1.{host}/24", address6="none")
            lab.attach(node, "sync", ifname="em1", address=f"{sync_address}/24", address6="none")
            lab.attach(node, "outside", ifname="em2", address=f"10.78.2.{host}/24", address6="none")
            node.run(["nft", "-f", "-"], input=RULESET)
            node.run(["sysctl", "-q", "-w", "net.ipv4.ip_forward=1"])
            node.run(["sysctl", "-q", "-w", "net.netfilter.nf_conntrack_tcp_loose=0"])
            node.run(["sysctl", "-q", "-w", "net.netfilter.nf_conntrack_max=262144"], check=False)
            write_file(
                node,
                "rc.conf",
                RC_CONF.format(host=host, skew=skew, peer=peer, key=KEY, ignore=ROUTER_ADDRESSES),
            )
            ignore = "\n".join(f"            IPv4_address {a}" for a in ROUTER_ADDRESSES.split())
            write_file(
                node,
                "conntrackd.conf",
                CONNTRACKD_CONF.format(
                    address=sync_address, peer=peer, dir=node.dir, ignore=ignore
                ),
            )
            write_file(node, "cthelper.py", HELPER_SCRIPT)
            self.routers[name] = node
        write_file(self.server, "server.py", SERVER_SCRIPT)
        write_file(self.client, "client.py", CLIENT_SCRIPT)

    # -- setup ---------------------------------------------------------------------------

    def reset(self) -> None:
        for node in (*self.routers.values(), self.client, self.server):
            node.kill_everything()
            node.processes.clear()
        for node in self.routers.values():
            for ifname in ("em0", "em1", "em2"):
                self.lab.link_up(node, ifname)
            node.run(["ip", "addr", "del", "10.78.1.1/32", "dev", "em0"], check=False)
            node.run(["ip", "addr", "del", "10.78.2.1/32", "dev", "em2"], check=False)
            node.run(["conntrack", "-F"], check=False)
            for stale in ("conntrackd.lock", "conntrackd.ctl", "pfsyncd.demotion"):
                (node.dir / stale).unlink(missing_ok=True)
        for node in (self.client, self.server):
            node.run(["ip", "neigh", "flush", "dev", "em0"], check=False)

    def start_sync(self, system: str, node: Node) -> LabProcess:
        if system == "carpool":
            argv = [
                str(BIN / "pfsyncd"),
                "-f",
                str(node.dir / "rc.conf"),
                "--run-dir",
                str(node.dir),
            ]
            process = node.spawn(argv, name="pfsyncd")
            wait_until(lambda: self.pfsync_status(node) is not None, 20, "pfsyncd")
            return process
        process = node.spawn(
            ["conntrackd", "-C", str(node.dir / "conntrackd.conf")], name="conntrackd"
        )
        wait_until(lambda: (node.dir / "conntrackd.ctl").exists(), 20, "conntrackd")
        return process

    def pfsync_status(self, node: Node) -> dict[str, Any] | None:
        from carpool.control import ControlClient, ControlError, socket_path

        try:
            with ControlClient(socket_path(node.dir, "pfsyncd"), timeout=5) as client:
                result: dict[str, Any] = client.request("status")
                return result
        except ControlError:
            return None

    def synced(self, system: str) -> None:
        """Both sync daemons up and talking (pfsyncd: bulk done on both)."""
        if system == "carpool":
            for node in self.routers.values():
                wait_until(
                    lambda n=node: bool((self.pfsync_status(n) or {}).get("syncok")), 60, "syncok"
                )
        else:
            time.sleep(2.0)

    def table_size(self, node: Node) -> int:
        result = node.run(["conntrack", "-C"], check=False)
        return int(result.stdout.strip() or 0)

    # -- metrics ---------------------------------------------------------------------------

    def survived(self, system: str, connections: int) -> float:
        self.reset()
        r1, r2 = self.routers["r1"], self.routers["r2"]
        for node in (r1, r2):
            self.start_sync(system, node)
        start_carpd(r1, r1.dir / "rc.conf")
        wait_until(
            lambda: carp_state(r1, "em0", 1) == "MASTER" and carp_state(r1, "em2", 2) == "MASTER",
            30,
            "r1 master",
        )
        start_carpd(r2, r2.dir / "rc.conf")
        wait_until(lambda: carp_state(r2, "em2", 2) == "BACKUP", 30, "r2 backup")
        self.synced(system)
        server = self.server.spawn(
            self.server.python(str(self.server.dir / "server.py"), str(PORT)), name="server"
        )
        assert server.wait_for_output("listening", 20)
        status_path = self.client.dir / "client.json"
        status_path.unlink(missing_ok=True)
        self.client.spawn(
            self.client.python(
                str(self.client.dir / "client.py"),
                SERVER,
                str(PORT),
                str(connections),
                str(status_path),
            ),
            name="client",
        )

        def status() -> dict[str, Any]:
            try:
                data: dict[str, Any] = json.loads(status_path.read_text())
                return data
            except (OSError, ValueError):
                return {"up": 0, "lines": [0] * connections, "errors": {}}

        wait_until(
            lambda: status()["up"] == connections and min(status()["lines"]) >= 3, 90, "traffic"
        )
        time.sleep(2.0)  # let the last states reach r2
        before = status()["lines"]
        self.lab.crash(r1)
        wait_until(lambda: carp_state(r2, "em2", 2) == "MASTER", 30, "r2 master")
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            now = status()
            alive = sum(
                1
                for i in range(connections)
                if now["lines"][i] >= before[i] + 10 and str(i) not in now["errors"]
            )
            if alive == connections:
                break
            time.sleep(0.25)
        return round(100.0 * alive / connections, 1)

    def latency(self, system: str, count: int) -> tuple[float, float]:
        self.reset()
        r1, r2 = self.routers["r1"], self.routers["r2"]
        for node in (r1, r2):
            self.start_sync(system, node)
        start_carpd(r1, r1.dir / "rc.conf")
        wait_until(
            lambda: carp_state(r1, "em2", 2) == "MASTER" and carp_state(r1, "em0", 1) == "MASTER",
            30,
            "r1 master",
        )
        self.synced(system)
        server = self.server.spawn(
            self.server.python(str(self.server.dir / "server.py"), str(PORT)), name="server"
        )
        assert server.wait_for_output("listening", 20)
        seconds = 6.0 + count * 0.03
        watchers = {}
        for node in (r1, r2):
            watchers[node.name] = node.spawn(
                node.python(
                    str(node.dir / "cthelper.py"),
                    "watch",
                    str(PORT),
                    str(seconds),
                    str(node.dir / "new.json"),
                ),
                name="watch",
            )
            assert watchers[node.name].wait_for_output("watching", 20)
        opener = (
            "import socket, time, sys\n"
            "held = []\n"
            f"for i in range({count}):\n"
            f"    held.append(socket.create_connection(('{SERVER}', {PORT})))\n"
            "    time.sleep(0.02)\n"
            "time.sleep(1)\n"
        )
        self.client.run(self.client.python("-c", opener), timeout=seconds + 30)
        delays = []
        for watcher in watchers.values():
            watcher.wait(seconds + 30)
        seen1 = json.loads((r1.dir / "new.json").read_text())
        seen2 = json.loads((r2.dir / "new.json").read_text())
        for port, t1 in seen1.items():
            if port in seen2:
                delays.append((seen2[port] - t1) * 1000)
        if not delays:
            return float("nan"), float("nan")
        delays.sort()
        p99 = delays[min(len(delays) - 1, round(0.99 * (len(delays) - 1)))]
        return round(statistics.median(delays), 3), round(p99, 3)

    def lossfree(self, system: str, count: int) -> float:
        self.reset()
        r1, r2 = self.routers["r1"], self.routers["r2"]
        for node in (r1, r2):
            self.start_sync(system, node)
        self.synced(system)
        base = self.table_size(r2)
        start = time.monotonic()
        r1.run(r1.python(str(r1.dir / "cthelper.py"), "inject", str(count), "20"), timeout=300)
        deadline = start + 120
        while time.monotonic() < deadline:
            if self.table_size(r2) - base >= count:
                return round(count / (time.monotonic() - start))
            time.sleep(0.02)
        return 0.0

    def bulk(self, system: str, count: int) -> float:
        self.reset()
        r1, r2 = self.routers["r1"], self.routers["r2"]
        self.start_sync(system, r1)
        r1.run(r1.python(str(r1.dir / "cthelper.py"), "inject", str(count), "40"), timeout=300)
        if system == "carpool":  # r1's daemon has taken in the whole table
            wait_until(
                lambda: (self.pfsync_status(r1) or {}).get("states", 0) >= count, 120, "r1 states"
            )
        else:
            time.sleep(1.0)  # let r1's internal cache take the events
        base = self.table_size(r2)
        start = time.monotonic()
        self.start_sync(system, r2)
        if system == "conntrackd":
            r2.run(["conntrackd", "-C", str(r2.dir / "conntrackd.conf"), "-n"], check=False)
        deadline = start + 120
        while time.monotonic() < deadline:
            if self.table_size(r2) - base >= count:
                return round(time.monotonic() - start, 2)
            time.sleep(0.02)
        return float("nan")


def median(values: list[float]) -> float:
    clean = [v for v in values if v == v]
    return round(statistics.median(clean), 3) if clean else float("nan")


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer trials and states")
    parser.add_argument("--trials", type=int, help="trials per system and metric (default 3)")
    parser.add_argument("--systems", default=",".join(SYSTEMS))
    arguments = parser.parse_args()
    if os.geteuid() != 0:
        print("pfsync: run as root (network namespaces)", file=sys.stderr)
        return 1
    trials = arguments.trials or (1 if arguments.quick else 3)
    connections = 50 if arguments.quick else 200
    new_states = 50 if arguments.quick else 200
    burst = 20000 if arguments.quick else 50000
    bulk_states = 50000
    systems = [s for s in arguments.systems.split(",") if s]
    results: dict[str, dict[str, list[float]]] = {}

    def record(metric: str, system: str, value: float) -> None:
        results.setdefault(metric, {}).setdefault(system, []).append(value)
        print(f"{metric:<26} {system:<11} {value}", flush=True)

    with Lab() as lab:
        bench = Bench(lab)
        for _ in range(trials):
            for system in systems:
                record("survived_pct", system, bench.survived(system, connections))
                median_ms, p99_ms = bench.latency(system, new_states)
                record("new_state_latency_ms", system, median_ms)
                record("new_state_latency_p99_ms", system, p99_ms)
                record("lossfree_states_per_s", system, bench.lossfree(system, burst))
                record("bulk_50k_s", system, bench.bulk(system, bulk_states))
    units = {
        "survived_pct": ("%", "higher"),
        "new_state_latency_ms": ("ms", "lower"),
        "new_state_latency_p99_ms": ("ms", "lower"),
        "lossfree_states_per_s": ("states/s", "higher"),
        "bulk_50k_s": ("s", "lower"),
    }
    metrics = []
    print("\nmedians")
    for name, (unit, better) in units.items():
        values = {system: median(v) for system, v in results.get(name, {}).items()}
        print(f"  {name:<26} " + "  ".join(f"{s} {v}" for s, v in values.items()))
        metrics.append(
            {"name": name, "unit": unit, "better": better, "values": values, "trials": trials}
        )
    print(json.dumps({"benchmark": "pfsync", "metrics": metrics}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
