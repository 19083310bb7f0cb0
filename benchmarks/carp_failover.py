#!/usr/bin/env python3
"""Client-visible outage when the virtual IP moves: carpd beside ucarp and keepalived.

Two routers (node1 preferred: advskew 0 / priority 200; node2: advskew 100 /
priority 100) and a client in a lab. Each router runs a UDP echo responder on the
VIP; the client probes the VIP every 10 ms. Outage = the longest run of unanswered
probes after the event.

Events:
  crash         node1's link goes down and all its processes are SIGKILLed
  clean_stop    SIGTERM to node1's daemon
  state_backup  the operator hands over with the daemon running: carpctl ... state
                backup (carpd), SIGUSR2 (ucarp), lowering the priority through a
                vrrp_track_file (keepalived, which has no runtime state command)

The fast profile (carpd only) uses advbase 0 (sub-second adverts): node1 advskew 10,
node2 advskew 26, and a steady run with both cores busy counts false takeovers.

usage: carp_failover.py [--quick] [--trials N]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from carpool.lab import Lab, LabProcess, Node
from carpool.lab.probe import ProbeResult
from carpool.lab.services import (
    BIN,
    carp_state,
    holders,
    seed_lan,
    start_carpd,
    start_keepalived,
    start_ucarp,
    wait_until,
    write_file,
)

VIP = "10.0.0.100"
PASSWORD = "secretpass"
PROBE_INTERVAL = 0.01
SYSTEMS = ("carpool", "ucarp", "keepalived")
SCENARIOS = ("crash", "clean_stop", "state_backup")


@dataclass
class Router:
    node: Node
    daemon: LabProcess | None = None
    others: list[LabProcess] = field(default_factory=list)


def carpd_conf(node: Node, advbase: int, advskew: int, preempt: int) -> Path:
    return write_file(
        node,
        "rc.conf",
        f'ifconfig_em0="inet {node.ipv4("lan")} netmask 255.255.255.0"\n'
        f'ifconfig_em0_alias0="vhid 1 advbase {advbase} advskew {advskew} pass {PASSWORD} '
        f'alias {VIP}/32"\nnet.inet.carp.preempt={preempt}\n',
    )


def operstate(node: Node) -> str:
    return node.run(["cat", "/sys/class/net/em0/operstate"]).stdout.strip()


class Bench:
    def __init__(self, lab: Lab) -> None:
        self.lab = lab
        seed_lan(lab)
        self.node1, self.node2, self.client = (lab.nodes[n] for n in ("node1", "node2", "client"))
        self.routers = {n.name: Router(n) for n in (self.node1, self.node2)}

    # -- setup ---------------------------------------------------------------------------

    def reset(self) -> None:
        for router in self.routers.values():
            router.node.kill_everything()
            router.node.processes.clear()
            router.daemon = None
            self.lab.link_up(router.node, "em0")
            router.node.run(["ip", "addr", "del", f"{VIP}/32", "dev", "em0"], check=False)
            echo = router.node.spawn(
                [sys.executable, "-m", "carpool.lab.probe", "echo", VIP, router.node.name],
                name="echo",
            )
            router.others = [echo]
        self.client.run(["ip", "neigh", "flush", "dev", "em0"], check=False)
        for router in self.routers.values():  # ucarp sleeps 10 s if it starts on a dead link
            wait_until(lambda node=router.node: operstate(node) == "up", 10, "carrier")

    def start(self, system: str, *, fast: bool = False) -> None:
        """node1 first, until it holds the VIP; then node2, which must settle as backup."""
        for router, (skew, priority) in zip(
            self.routers.values(), ((0, 200), (100, 100)), strict=True
        ):
            node = router.node
            if system == "carpool":
                advbase, advskew = (0, 10 if skew == 0 else 26) if fast else (1, skew)
                router.daemon = start_carpd(node, carpd_conf(node, advbase, advskew, preempt=0))
            elif system == "ucarp":
                router.daemon = start_ucarp(
                    node, vhid=1, password=PASSWORD, vip=VIP, advskew=skew, preempt=False
                )
            else:
                track = write_file(node, "demote", "0\n")
                router.daemon = start_keepalived(
                    node, vrid=1, vip=VIP, priority=priority, track_file=track
                )
            if node is self.node1:
                wait_until(lambda: holders(self.lab, VIP) == ["node1"], 20, f"{system} on node1")
        time.sleep(2.0)  # node2 settles as backup; a few adverts pass
        if holders(self.lab, VIP) != ["node1"]:
            raise RuntimeError(f"{system}: node2 took the VIP before the event")

    # -- events --------------------------------------------------------------------------

    def event(self, system: str, scenario: str) -> None:
        router = self.routers["node1"]
        assert router.daemon is not None
        if scenario == "crash":
            self.lab.crash(router.node)
        elif scenario == "clean_stop":
            router.daemon.signal(signal.SIGTERM)
        elif system == "carpool":
            router.node.run(
                [str(BIN / "carpctl"), "--run-dir", str(router.node.dir), "em0", "vhid", "1",
                 "state", "backup"]
            )  # fmt: skip
        elif system == "ucarp":
            router.daemon.signal(signal.SIGUSR2)
        else:
            (router.node.dir / "demote").write_text("-150\n")

    # -- one trial -----------------------------------------------------------------------

    def trial(self, system: str, scenario: str, *, fast: bool = False) -> float:
        self.reset()
        self.start(system, fast=fast)
        before = 1.0 + random.uniform(0.0, 1.0)  # random phase against the advert schedule
        after = 1.5 if fast else 6.0
        probe = self.client.spawn(
            [sys.executable, "-m", "carpool.lab.probe", "probe", VIP, str(PROBE_INTERVAL),
             str(before + after)],
            name="probe",
        )  # fmt: skip
        time.sleep(before)
        t0 = time.monotonic()
        self.event(system, scenario)
        probe.wait(before + after + 30)
        data = json.loads(probe.output().strip().splitlines()[-1])
        result = ProbeResult(sent=data["sent"], answered_by=data["answered_by"])
        answers = [who for who in result.answered_by if who is not None]
        if not answers or answers[-1] != "node2":
            daemon = self.routers["node1"].daemon
            tail = daemon.output()[-2000:] if daemon else ""
            raise RuntimeError(f"{system} {scenario}: node2 never took over\n{tail}")
        outage, _ = result.longest_outage(t0 - 0.3, PROBE_INTERVAL)
        return outage * 1000

    def steady_false_takeovers(self, seconds: float) -> int:
        """Fast profile, no event, both cores busy: how often node2 wrongly became MASTER."""
        self.reset()
        self.start("carpool", fast=True)
        burners = [
            self.client.spawn([sys.executable, "-c", "while True: pass"], name="burn")
            for _ in range(os.cpu_count() or 2)
        ]
        log = self.routers["node2"].daemon
        assert log is not None
        mark = log.output().count("-> MASTER")
        try:
            time.sleep(seconds)
        finally:
            for burner in burners:
                burner.kill()
        if carp_state(self.node1) != "MASTER":
            return max(1, log.output().count("-> MASTER") - mark)
        return log.output().count("-> MASTER") - mark


def median(values: list[float]) -> float:
    return round(statistics.median(values), 1) if values else float("nan")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer trials, short steady run")
    parser.add_argument("--trials", type=int, help="trials per system and event (default 5)")
    parser.add_argument("--systems", default=",".join(SYSTEMS))
    arguments = parser.parse_args()
    if os.geteuid() != 0:
        print("carp_failover: run as root (network namespaces)", file=sys.stderr)
        return 1
    trials = arguments.trials or (1 if arguments.quick else 5)
    steady = 15.0 if arguments.quick else 60.0
    systems = [s for s in arguments.systems.split(",") if s]
    results: dict[str, dict[str, list[float]]] = {s: {} for s in SCENARIOS}
    fast: list[float] = []
    false_takeovers = 0
    with Lab() as lab:
        bench = Bench(lab)
        for scenario in SCENARIOS:
            for system in systems:
                values = results[scenario].setdefault(system, [])
                for number in range(trials):
                    outage = bench.trial(system, scenario)
                    values.append(outage)
                    print(f"{scenario:<13} {system:<10} trial {number + 1}: {outage:7.0f} ms",
                          flush=True)  # fmt: skip
        if "carpool" in systems:
            for number in range(trials):
                outage = bench.trial("carpool", "crash", fast=True)
                fast.append(outage)
                print(f"fast crash    carpool    trial {number + 1}: {outage:7.0f} ms", flush=True)
            false_takeovers = bench.steady_false_takeovers(steady)
            print(f"fast steady {steady:.0f} s, cores busy: {false_takeovers} false takeovers")
    metrics = []
    print("\nmedians (ms)")
    for scenario in SCENARIOS:
        values = {s: median(v) for s, v in results[scenario].items()}
        print(f"  {scenario:<13} " + "  ".join(f"{s} {v:.0f}" for s, v in values.items()))
        metrics.append(
            {"name": f"{scenario}_outage_ms", "unit": "ms", "better": "lower",
             "values": values, "trials": trials}
        )  # fmt: skip
    if fast:
        print(f"  fast crash    carpool {median(fast):.0f}")
        metrics.append(
            {"name": "fast_crash_outage_ms", "unit": "ms", "better": "lower",
             "values": {"carpool": median(fast)}, "trials": trials}
        )  # fmt: skip
        metrics.append(
            {"name": "fast_false_takeovers", "unit": "count", "better": "lower",
             "values": {"carpool": false_takeovers}, "trials": 1}
        )  # fmt: skip
    print(json.dumps({"benchmark": "carp_failover", "metrics": metrics}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
