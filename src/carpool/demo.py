"""``make demo``: bring up the guide's two-node lab, show it working, tear it down."""

from __future__ import annotations

import os
import sys

from carpool.errors import CarpoolError
from carpool.lab import Lab
from carpool.lab.cli import build_standard_lab


def step(text: str) -> None:
    print(f"\n== {text}", flush=True)


def main() -> int:
    if os.geteuid() != 0:
        print("demo: run as root (the lab uses network namespaces)", file=sys.stderr)
        return 1
    try:
        with Lab() as lab:
            step("two nodes on a LAN (em0) and a sync link (em1), plus a client")
            build_standard_lab(lab, 2, sync=True, client=True)
            print(lab.describe())
            node1, node2, client = lab.nodes["node1"], lab.nodes["node2"], lab.nodes["client"]
            step("every node reaches every other (IPv4 and IPv6)")
            for source in (node1, node2, client):
                for target in (node1, node2, client):
                    if source is target:
                        continue
                    for address in (target.ipv4("lan"), target.ipv6("lan")):
                        verdict = "ok" if source.ping(address) else "FAILED"
                        print(f"  {source.name:>6} -> {target.name:<6} {address!s:<14} {verdict}")
            step("partition node1 from node2, then heal")
            peer = node2.ipv4("lan")
            lab.partition([node1], [node2])
            print(f"  partitioned: node1 -> node2 {'ok' if node1.ping(peer) else 'lost'}")
            lab.heal()
            print(f"  healed:      node1 -> node2 {'ok' if node1.ping(peer) else 'lost'}")
            step("tearing the lab down")
        print("done: nothing of the lab is left")
    except CarpoolError as error:
        print(f"demo: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
