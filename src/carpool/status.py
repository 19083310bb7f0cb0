"""``carpool status``: every carpool daemon of this node in one view.

Asks each daemon whose control socket is in the run directory for its status
(carpd, pfsyncd, hastd, relayd, devd, ifstated, zfs-replicate) and prints one
block per daemon in its own words; ``-j`` prints them as one JSON object. A
daemon whose socket is there but that does not answer is reported as such.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from carpool.control import ControlClient, default_run_dir, socket_path
from carpool.errors import CarpoolError

DAEMONS = ("carpd", "pfsyncd", "hastd", "relayd", "devd", "ifstated", "zfs-replicate")


def collect(run_dir: Path, timeout: float = 5.0) -> dict[str, Any]:
    """``{daemon: status}`` for every daemon with a socket in ``run_dir``."""
    found: dict[str, Any] = {}
    for daemon in DAEMONS:
        path = socket_path(run_dir, daemon)
        if not path.exists():
            continue
        try:
            with ControlClient(path, timeout) as client:
                found[daemon] = client.request("status")
        except CarpoolError as error:
            found[daemon] = {"error": str(error)}
    return found


def _carpd(status: Any) -> list[str]:
    lines = []
    for ifname, entry in sorted(status.get("interfaces", {}).items()):
        for vhid in entry.get("vhids", []):
            lines.append(
                f"{ifname}: carp: {vhid['state']} vhid {vhid['vhid']} advbase "
                f"{vhid['advbase']} advskew {vhid['advskew']}  "
                + " ".join(vhid.get("addresses", []))
            )
    lines.append(f"demotion {status.get('demotion', 0)}, preempt {status.get('preempt')}")
    return lines


def _hastd(status: Any) -> list[str]:
    lines = []
    for entry in status if isinstance(status, list) else []:
        line = f"{entry['name']}: {entry['role']} {entry['status']}"
        if entry.get("role") == "primary":
            line += f", dirty {entry.get('dirty', 0)} bytes"
            if entry.get("resyncing"):
                line += ", resyncing"
        if entry.get("dev"):
            line += f", {entry['dev']}"
        lines.append(line + f"  (remote {entry.get('remoteaddr')})")
    return lines


def _generic(status: Any) -> list[str]:
    if isinstance(status, dict):
        simple = {k: v for k, v in status.items() if isinstance(v, str | int | float | bool)}
        nested = [k for k, v in status.items() if isinstance(v, dict | list)]
        text = ", ".join(f"{k} {v}" for k, v in simple.items())
        lines = [text] if text else []
        if nested:
            lines.append("(" + ", ".join(nested) + ": see -j)")
        return lines
    return [json.dumps(status)[:200]]


def _relayd(status: Any) -> list[str]:
    lines = []
    for kind in ("redirects", "relays", "tables"):
        for entry in status.get(kind, []) if isinstance(status, dict) else []:
            if not isinstance(entry, dict):
                continue
            name = entry.get("name", "?")
            state = "disabled" if entry.get("disabled") else entry.get("status", "active")
            hosts = entry.get("hosts")
            up = (f", {sum(1 for h in hosts if h.get('status') == 'up')}/{len(hosts)} hosts up"
                  if isinstance(hosts, list) else "")  # fmt: skip
            lines.append(f"{kind[:-1]} {name}: {state}{up}")
    return lines or _generic(status)


FORMATTERS: dict[str, Callable[[Any], list[str]]] = {
    "carpd": _carpd, "hastd": _hastd, "relayd": _relayd,
}  # fmt: skip


def render(found: dict[str, Any]) -> str:
    if not found:
        return "no carpool daemon runs here (no control socket in the run directory)"
    blocks = []
    for daemon, status in found.items():
        if isinstance(status, dict) and set(status) == {"error"}:
            lines = [f"not answering: {status['error']}"]
        else:
            lines = FORMATTERS.get(daemon, _generic)(status)
        blocks.append("\n".join([f"{daemon}:"] + [f"  {line}" for line in lines]))
    return "\n".join(blocks)


def add_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser("status", help="every carpool daemon of this node")
    parser.add_argument("-j", "--json", action="store_true")
    parser.add_argument("--run-dir", type=Path, default=default_run_dir())


def run(arguments: argparse.Namespace) -> int:
    found = collect(arguments.run_dir)
    print(json.dumps(found, indent=2) if arguments.json else render(found))
    return 0
