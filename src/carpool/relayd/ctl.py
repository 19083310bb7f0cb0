"""relayctl: relayd's control words and output formats, over carpool's control channel."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from carpool.control import ControlClient, default_run_dir, socket_path
from carpool.errors import CarpoolError
from carpool.relayd.relayctl_format import (
    Action,
    CommandParseError,
    HostStatus,
    RelaydStatus,
    RelayStatus,
    SessionStats,
    TableStatus,
    parse_command,
    render,
)

SHOW = {
    Action.SHOW_SUMMARY, Action.SHOW_HOSTS, Action.SHOW_RELAYS, Action.SHOW_REDIRECTS,
    Action.SHOW_ROUTERS,
}  # fmt: skip


def status_from_json(data: dict[str, Any]) -> RelaydStatus:
    """Rebuild relayd's status snapshot from the daemon's JSON answer."""

    def table(entry: dict[str, Any]) -> TableStatus:
        hosts = tuple(HostStatus(**host) for host in entry["hosts"])
        return TableStatus(id=entry["id"], name=entry["name"], hosts=hosts,
                           disabled=entry["disabled"])  # fmt: skip

    relays = tuple(
        RelayStatus(
            id=relay["id"],
            name=relay["name"],
            tables=tuple(table(t) for t in relay["tables"]),
            disabled=relay["disabled"],
            stats=SessionStats(**relay["stats"]),
        )
        for relay in data["relays"]
    )
    return RelaydStatus(relays=relays)


def run(arguments: argparse.Namespace) -> int:
    try:
        command = parse_command(arguments.words)
    except CommandParseError as error:
        print(error.message, file=sys.stderr, end="" if error.message.endswith("\n") else "\n")
        return 1
    path = arguments.socket or socket_path(arguments.run_dir, "relayd")
    with ControlClient(path) as client:
        action = command.action
        if action in SHOW:
            data = client.request("show")
            print(json.dumps(data, indent=2) if arguments.json else
                  render(command, status_from_json(data)), end="")  # fmt: skip
            return 0
        target = command.name if command.name is not None else command.id
        if action in (Action.HOST_ENABLE, Action.HOST_DISABLE):
            client.request("host", host=target, enable=action is Action.HOST_ENABLE)
        elif action in (Action.TABLE_ENABLE, Action.TABLE_DISABLE):
            client.request("table", table=target, enable=action is Action.TABLE_ENABLE)
        elif action is Action.POLL:
            client.request("poll")
        else:
            raise CarpoolError(f"{action.value} is not available in this relayd yet")
        print("command succeeded")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="relayctl", description="Control relayd.")
    parser.add_argument("-j", "--json", action="store_true")
    parser.add_argument("-s", "--socket", type=Path, help="relayd's control socket")
    parser.add_argument("--run-dir", type=Path, default=default_run_dir())
    parser.add_argument("words", nargs=argparse.REMAINDER)
    arguments = parser.parse_args(argv)
    try:
        return run(arguments)
    except CarpoolError as error:
        print(f"relayctl: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
