"""``carpool lab``: bring a lab up for people, show it, enter it, remove it."""

from __future__ import annotations

import argparse
import os
import sys

from carpool.errors import CarpoolError
from carpool.lab.cluster import Lab, describe_record
from carpool.lab.registry import LabRecord, clean, list_labs


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    lab = subparsers.add_parser("lab", help="clusters of network namespaces")
    commands = lab.add_subparsers(dest="lab_command", required=True, metavar="COMMAND")

    up = commands.add_parser("up", help="create a lab that stays until `carpool lab down`")
    up.add_argument("--nodes", type=int, default=2, help="number of nodes (default 2)")
    up.add_argument("--sync", action="store_true", help="add the sync network (em1)")
    up.add_argument("--client", action="store_true", help="add a client node on the LAN")
    up.add_argument("--prefix", help="name prefix (default: a fresh random one)")

    show = commands.add_parser("show", help="print the map of a lab")
    show.add_argument("--prefix")

    execute = commands.add_parser("exec", help="run a command inside a node")
    execute.add_argument("--prefix")
    execute.add_argument("node")
    execute.add_argument("argv", nargs=argparse.REMAINDER, metavar="COMMAND")

    down = commands.add_parser("down", help="remove a lab made by `carpool lab up`")
    down.add_argument("--prefix")

    cleaning = commands.add_parser(
        "clean", help="remove leftovers of labs whose owner died (or one lab, by prefix)"
    )
    cleaning.add_argument("--prefix", help="remove this lab whatever its state")
    cleaning.add_argument(
        "--all", action="store_true", help="also remove labs made by `carpool lab up`"
    )
    cleaning.add_argument(
        "--stale", action="store_true", help="only labs whose owner died (the default)"
    )


def build_standard_lab(lab: Lab, nodes: int, *, sync: bool, client: bool) -> None:
    """The guide's topology: node1..N on the LAN (em0), optionally a sync link (em1)."""
    lab.network("lan")
    if sync:
        lab.network("sync")
    for index in range(1, nodes + 1):
        node = lab.node(f"node{index}")
        lab.attach(node, "lan", ifname="em0")
        if sync:
            lab.attach(node, "sync", ifname="em1")
    if client:
        lab.attach(lab.node("client"), "lan", ifname="em0", host=10)


def _persistent_lab(prefix: str | None) -> LabRecord:
    if prefix:
        return LabRecord.load(prefix)
    candidates = [record for record in list_labs() if record.persistent]
    if not candidates:
        raise CarpoolError("no lab is up: create one with `carpool lab up`")
    if len(candidates) > 1:
        names = ", ".join(record.prefix for record in candidates)
        raise CarpoolError(f"several labs are up ({names}): choose one with --prefix")
    return candidates[0]


def run(arguments: argparse.Namespace) -> int:
    if os.geteuid() != 0:
        raise CarpoolError("the lab needs root (network namespaces): run it with sudo or as root")
    command = arguments.lab_command
    if command == "up":
        if arguments.nodes < 1 or arguments.nodes > 9:
            raise CarpoolError("--nodes takes 1 to 9")
        lab = Lab(arguments.prefix, persistent=True)
        lab.create()
        try:
            build_standard_lab(lab, arguments.nodes, sync=arguments.sync, client=arguments.client)
        except BaseException:
            lab.destroy()
            raise
        print(lab.describe())
        print(f"\nenter a node: carpool lab exec --prefix {lab.prefix} node1 -- ip addr")
        print(f"remove it:    carpool lab down --prefix {lab.prefix}")
        return 0
    if command == "show":
        print(describe_record(_persistent_lab(arguments.prefix)))
        return 0
    if command == "exec":
        record = _persistent_lab(arguments.prefix)
        if arguments.node not in record.nodes:
            known = ", ".join(record.nodes)
            raise CarpoolError(
                f"lab {record.prefix} has no node {arguments.node!r} (nodes: {known})"
            )
        argv = list(arguments.argv)
        if argv[:1] == ["--"]:
            argv = argv[1:]
        argv = argv or ["sh"]
        namespace = record.nodes[arguments.node]["netns"]
        os.execvp("ip", ["ip", "netns", "exec", namespace, *argv])
    if command == "down":
        record = _persistent_lab(arguments.prefix)
        for line in clean(record.prefix):
            print(f"removed {line}")
        return 0
    if command == "clean":
        removed = clean(arguments.prefix, include_live=arguments.all)
        for line in removed:
            print(f"removed {line}")
        if not removed:
            print("nothing to clean")
        return 0
    print(f"unknown lab command {command}", file=sys.stderr)
    return 2
