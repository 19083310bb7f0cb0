"""pfsyncctl: pfsyncd's status in the words of ``pfctl -s info`` and ``netstat -s -p pfsync``.

pfsyncctl [--run-dir DIR | -s SOCKET] [-j] [status]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from carpool.control import ControlClient, default_run_dir, socket_path
from carpool.service import run_command

__all__ = ["format_status", "main"]

# (counter, text) in netstat -s -p pfsync's order; ours go last
_RECEIVED = (
    ("badttl", "packets discarded for bad ttl"),
    ("badsrc", "packets discarded from a source other than the sync peer"),
    ("badlen", "packets discarded for bad length"),
    ("badver", "packets discarded for bad version"),
    ("badauth", "packets discarded for bad authentication"),
    ("badval", "packets discarded for bad values"),
    ("duplicates", "packets received twice (stale)"),
    ("badstate", "records discarded for missing TCP state"),
    ("ins_in", "insert records received"),
    ("upd_in", "update records received"),
    ("del_in", "delete records received"),
)
_SENT = (
    ("ins_out", "insert records sent"),
    ("upd_out", "update records sent"),
    ("del_out", "delete records sent"),
    ("resent", "data packets sent again after a NACK"),
    ("nacks_out", "NACKs sent"),
    ("onomem", "send failed for lack of buffer space"),
    ("oerrors", "send errors"),
)
_KERNEL = (
    ("kernel_created", "states inserted into the kernel"),
    ("kernel_updated", "states updated in the kernel"),
    ("kernel_deleted", "states removed from the kernel"),
    ("kernel_errors", "changes refused by the kernel"),
    ("table_full", "states not inserted: conntrack table full"),
    ("netlink_overruns", "conntrack event overruns (table re-read)"),
    ("refreshes", "timeout refreshes"),
)


def _duration(seconds: float) -> str:
    whole = int(seconds)
    days, rest = divmod(whole, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{days} days {hours:02d}:{minutes:02d}:{secs:02d}"


def format_status(status: dict[str, Any]) -> str:
    counters: dict[str, int] = status.get("counters", {})
    running = float(status.get("running_seconds", 0)) or 1.0

    def rate(name: str) -> str:
        return f"{counters.get(name, 0) / running:14.1f}/s"

    peer = status.get("syncpeer") or f"multicast {status.get('destination')}"
    lines = [
        f"Status: Enabled for {_duration(running)}"
        f"{'':>10}syncok: {'yes' if status.get('syncok') else 'no'}",
        f"pfsync: syncdev {status.get('syncdev')} syncpeer {peer} port {status.get('port')}"
        f" peer {status.get('peer')}",
        f"Bulk update: {status.get('bulk')} ({status.get('bulk_tries')} tries)"
        f"   CARP demotion: {status.get('demotion')}",
        "",
        f"{'State Table':<32}{'Total':>10}{'Rate':>17}",
        f"  {'current entries':<30}{status.get('states', 0):>10}",
        f"  {'inserts':<30}{counters.get('inserts', 0):>10}{rate('inserts')}",
        f"  {'removals':<30}{counters.get('removals', 0):>10}{rate('removals')}",
        "",
        "pfsync:",
        f"\t{counters.get('ipackets', 0)} packets received (messages in)",
    ]
    lines += [f"\t\t{counters.get(name, 0)} {text}" for name, text in _RECEIVED]
    lines.append(f"\t{counters.get('opackets', 0)} packets sent (messages out)")
    lines += [f"\t\t{counters.get(name, 0)} {text}" for name, text in _SENT]
    lines.append("conntrack:")
    lines += [f"\t{counters.get(name, 0)} {text}" for name, text in _KERNEL]
    errors = sum(counters.get(name, 0) for name in ("kernel_errors", "table_full", "oerrors"))
    lines.append(f"\t{errors} errors")
    return "\n".join(lines)


def parse_arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="pfsyncctl", description="pfsyncd status.")
    parser.add_argument("-j", "--json", action="store_true", help="print JSON")
    parser.add_argument("--run-dir", type=Path, default=default_run_dir())
    parser.add_argument("-s", "--socket", type=Path, help="pfsyncd's control socket")
    parser.add_argument("command", nargs="?", default="status", choices=["status"])
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    arguments = parse_arguments(argv)

    def body() -> int:
        path = arguments.socket or socket_path(arguments.run_dir, "pfsyncd")
        with ControlClient(path) as client:
            status = client.request("status")
        if arguments.json:
            print(json.dumps(status, indent=2, sort_keys=True))
        else:
            print(format_status(status))
        return 0

    return run_command("pfsyncctl", body)


if __name__ == "__main__":
    sys.exit(main())
