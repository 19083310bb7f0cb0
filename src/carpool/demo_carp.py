"""``make demo-carp``: the guide's CARP pair in a lab, failing over while a client watches.

It builds two routers and a client in network namespaces, starts carpd on both
routers with the guide's rc.conf lines, shows ``carpctl em0`` on each, then crashes
the master and shows the backup taking the virtual IP. Everything is torn down at
the end, also on failure.
"""

from __future__ import annotations

import os
import sys
import time

from carpool.errors import CarpoolError
from carpool.lab import Lab
from carpool.lab.services import (
    carpctl_text,
    holders,
    seed_lan,
    start_carpd,
    wait_carp_state,
    write_file,
)

NODE_CONF = """\
ifconfig_em0="inet 10.0.0.{n} netmask 255.255.255.0"
ifconfig_em0_alias0="vhid 1 advskew {skew} pass secretpass alias 10.0.0.100/32"
net.inet.carp.preempt=1
"""
VIP = "10.0.0.100"


def step(text: str) -> None:
    print(f"\n== {text}", flush=True)


def show(lab: Lab, name: str) -> None:
    text = carpctl_text(lab.nodes[name], "em0")
    print(f"[{name}]# carpctl em0")
    print("\n".join("    " + line for line in text.splitlines()))


def run_demo() -> None:
    with Lab() as lab:
        step("a LAN with node1 (10.0.0.1), node2 (10.0.0.2) and a client (10.0.0.10)")
        seed_lan(lab)
        print(lab.describe())
        node1, node2, client = (lab.nodes[n] for n in ("node1", "node2", "client"))
        step("carpd on both routers, with the guide's lines (advskew 0 and 100)")
        for node, skew in ((node1, 0), (node2, 100)):
            conf = write_file(node, "rc.conf", NODE_CONF.format(n=node.index, skew=skew))
            print(f"[{node.name}] {conf.name}:")
            print("\n".join("    " + line for line in conf.read_text().splitlines()))
            start_carpd(node, conf)
            wait_carp_state(node, "MASTER" if skew == 0 else "BACKUP")
        show(lab, "node1")
        show(lab, "node2")
        print(f"client -> {VIP}: {'answers' if client.ping(VIP) else 'NO ANSWER'}"
              f" (VIP on {', '.join(holders(lab, VIP))})")  # fmt: skip
        step("node1 crashes: its link goes down and its processes are killed")
        started = time.monotonic()
        lab.crash(node1)
        wait_carp_state(node2, "MASTER")
        print(f"node2 is MASTER {time.monotonic() - started:.1f} s later (3 x advbase + 100/256)")
        show(lab, "node2")
        print(f"client -> {VIP}: {'answers' if client.ping(VIP) else 'NO ANSWER'}"
              f" (VIP on {', '.join(holders(lab, VIP))})")  # fmt: skip
        step("node1 comes back: with preempt it takes the VIP again")
        lab.link_up(node1, "em0")
        start_carpd(node1, node1.dir / "rc.conf")
        wait_carp_state(node1, "MASTER", timeout=30)
        wait_carp_state(node2, "BACKUP")
        show(lab, "node1")
        step("a planned handover: carpctl em0 vhid 1 state backup on node1")
        carpctl_text(node1, "set", "net.inet.carp.preempt=0")
        started = time.monotonic()
        carpctl_text(node1, "em0", "vhid", "1", "state", "backup")
        wait_carp_state(node2, "MASTER")
        print(f"node2 is MASTER {time.monotonic() - started:.2f} s later (the leave advert)")
        step("tearing the lab down")
    print("done: nothing of the lab is left")


def main() -> int:
    if os.geteuid() != 0:
        print("demo: run as root (the lab uses network namespaces)", file=sys.stderr)
        return 1
    try:
        run_demo()
    except (CarpoolError, AssertionError) as error:
        print(f"demo: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
