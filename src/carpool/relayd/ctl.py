"""relayctl: relayd's control words and output formats, over carpool's control channel."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from carpool.control import ControlClient, RemoteError, default_run_dir, socket_path
from carpool.errors import CarpoolError, CommandError
from carpool.events import Event
from carpool.relayd.relayctl_format import (
    Action,
    CommandParseError,
    HostStatus,
    RedirectStatus,
    RelaydStatus,
    RelayStatus,
    SessionStats,
    SessionStatus,
    TableStatus,
    parse_command,
    render,
)

SHOW = {
    Action.SHOW_SUMMARY, Action.SHOW_HOSTS, Action.SHOW_RELAYS, Action.SHOW_REDIRECTS,
    Action.SHOW_ROUTERS,
}  # fmt: skip

#: relayd's imsg numbers for the events monitor prints (relayd.h, 2019), by name
IMSG_TYPES = {
    "ctl_rdr_disable": 16, "ctl_rdr_enable": 17, "ctl_table_disable": 18,
    "ctl_table_enable": 19, "ctl_host_disable": 22, "ctl_host_enable": 23,
    "ctl_table_changed": 24, "ctl_pull_ruleset": 25, "ctl_push_ruleset": 26,
    "host_status": 37, "sync": 39,
}  # fmt: skip


def _table(entry: dict[str, Any]) -> TableStatus:
    hosts = tuple(HostStatus(**host) for host in entry["hosts"])
    return TableStatus(id=entry["id"], name=entry["name"], hosts=hosts,
                       disabled=entry["disabled"])  # fmt: skip


def status_from_json(data: dict[str, Any]) -> RelaydStatus:
    """Rebuild relayd's status snapshot from the daemon's JSON answer."""
    redirects = tuple(
        RedirectStatus(
            id=rdr["id"], name=rdr["name"], table=_table(rdr["table"]),
            backup=_table(rdr["backup"]) if rdr.get("backup") else None,
            disabled=rdr["disabled"], stats=SessionStats(**rdr["stats"]),
        )
        for rdr in data.get("redirects", ())
    )  # fmt: skip
    relays = tuple(
        RelayStatus(
            id=relay["id"], name=relay["name"], tables=tuple(_table(t) for t in relay["tables"]),
            disabled=relay["disabled"], stats=SessionStats(**relay["stats"]),
        )
        for relay in data.get("relays", ())
    )  # fmt: skip
    return RelaydStatus(redirects=redirects, relays=relays)


def monitor_lines(event: Event) -> str:
    """One event as relayctl monitor prints it."""
    attributes = dict(event.attributes.items())
    if event.name in ("host_up", "host_down"):
        name = "host_status"
        body = f"\tid: {attributes.get('id', 0)}\n\tstate: {attributes.get('state', 'unknown')}\n"
    else:
        name = event.name
        body = f"\tid: {attributes.get('id', 0)}\n"
        if "name" in attributes:
            body += f"\tname: {attributes['name']}\n"
    stamp = int(event.wall)
    return (f"{name}: imsg type {IMSG_TYPES.get(name, 0)} len {16 + len(body)} peerid 0 pid 0\n"
            f"\ttimestamp: {stamp}, {time.ctime(stamp)}\n{body}")  # fmt: skip


def run(arguments: argparse.Namespace) -> int:
    try:
        command = parse_command(arguments.words)
    except CommandParseError as error:
        print(error.message, file=sys.stderr, end="" if error.message.endswith("\n") else "\n")
        return 1
    path = arguments.socket or socket_path(arguments.run_dir, "relayd")
    action = command.action
    target = command.name if command.name is not None else command.id
    with ControlClient(path) as client:
        if action in SHOW:
            data = client.request("show")
            print(json.dumps(data, indent=2) if arguments.json else
                  render(command, status_from_json(data)), end="")  # fmt: skip
            return 0
        if action is Action.SHOW_SESSIONS:
            sessions = client.request("sessions")
            if arguments.json:
                print(json.dumps(sessions, indent=2))
            else:
                print(render(command, RelaydStatus(),
                             [SessionStatus(**s) for s in sessions]), end="")  # fmt: skip
            return 0
        if action is Action.MONITOR:
            for event in client.events():
                print(json.dumps(event.to_dict()) if arguments.json else monitor_lines(event),
                      end="\n" if arguments.json else "", flush=True)  # fmt: skip
            return 0
        if action in (Action.RELOAD, Action.LOAD):
            client.request("reload")  # relayctl sends the request and prints nothing
            return 0
        if action in (Action.LOG_VERBOSE, Action.LOG_BRIEF):
            client.request("log", verbose=action is Action.LOG_VERBOSE)
            print("logging request sent.")
            return 0
        try:
            if action in (Action.HOST_ENABLE, Action.HOST_DISABLE):
                client.request("host", host=target, enable=action is Action.HOST_ENABLE)
            elif action in (Action.TABLE_ENABLE, Action.TABLE_DISABLE):
                client.request("table", table=target, enable=action is Action.TABLE_ENABLE)
            elif action in (Action.REDIRECT_ENABLE, Action.REDIRECT_DISABLE):
                client.request("redirect", redirect=target,
                               enable=action is Action.REDIRECT_ENABLE)  # fmt: skip
            elif action is Action.POLL:
                client.request("poll")
            else:
                raise CommandError(f"{action.value} is not available in carpool's relayd")
        except RemoteError:
            print("command failed")
            return 1
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
    except KeyboardInterrupt:
        return 0
    except CarpoolError as error:
        print(f"relayctl: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
