"""hastctl: FreeBSD's words and formats for HAST.

    hastctl create [-e extentsize] [-k keepdirty] [-m mediasize] name ...   (offline)
    hastctl role <init | primary | secondary> all | name ...
    hastctl status [all | name ...]
    hastctl list   [all | name ...]
    hastctl dump   [all | name ...]                                        (offline)
    hastctl verify [all | name ...]            (online: both disks compared, on the primary)

``-c`` names hast.conf (default $CARPOOL_HAST_CONF or /etc/hast.conf); ``-j`` prints JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from carpool.control import ControlClient, default_run_dir, socket_path
from carpool.errors import CarpoolError
from carpool.hast.config import HastConfig, default_config_path, load_config
from carpool.hast.metadata import METADATA_SIZE, decode
from carpool.hast.provider import create_provider

SUFFIXES = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def expand_number(text: str) -> int:
    """FreeBSD's expand_number: 64k, 2M, 1G (powers of 1024)."""
    word = text.strip().lower().removesuffix("b")
    factor = SUFFIXES.get(word[-1:], 1)
    digits = word[:-1] if word[-1:] in SUFFIXES else word
    if not digits.isdigit():
        raise CarpoolError(f"{text!r} is not a size (use a number with k, M, G or T)")
    return int(digits) * factor


def humanize(size: int) -> str:
    value = float(size)
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if value < 1024 or unit == "TB":
            return f"{value:.0f}{unit}" if unit == "B" else f"{value:.1f}{unit}"
        value /= 1024
    return f"{size}B"


def format_status(entries: list[dict[str, Any]]) -> str:
    lines = ["Name\tStatus\t Role\t\tComponents"]
    for e in entries:
        lines.append(
            f"{e['name']}\t{e['status']:<9}{e['role']:<15}{e['localpath']}\t{e['remoteaddr']}"
        )
    return "\n".join(lines)


def format_list(entries: list[dict[str, Any]]) -> str:
    lines = []
    for e in entries:
        lines.append(f"{e['name']}:")
        lines.append(f"  role: {e['role']}")
        lines.append(f"  provname: {e['provname']}")
        lines.append(f"  localpath: {e['localpath']}")
        if "extentsize" in e:
            lines.append(f"  extentsize: {e['extentsize']} ({humanize(e['extentsize'])})")
            lines.append(f"  keepdirty: {e['keepdirty']}")
        lines.append(f"  remoteaddr: {e['remoteaddr']}")
        lines.append(f"  replication: {e['replication']}")
        lines.append(f"  status: {e['status']}")
        if "nbd_tcp" in e:
            lines.append(f"  nbd tcp: {e['nbd_tcp']}")
        if e["role"] == "primary":
            lines.append(f"  dirty: {e['dirty']} ({humanize(e['dirty'])})")
        stats = e.get("statistics")
        if stats:
            lines.append("  statistics:")
            for key in ("reads", "writes", "deletes", "flushes"):
                lines.append(f"    {key}: {stats.get(key, 0)}")
            if "activemap_updates" in stats:
                lines.append(f"    activemap updates: {stats['activemap_updates']}")
            lines.append(
                f"    local errors: read: {stats.get('local_read_errors', 0)}, "
                f"write: {stats.get('local_write_errors', 0)}, "
                f"flush: {stats.get('local_flush_errors', 0)}"
            )
            lines.append(f"    in flight: {e.get('in_flight', 0)}")
    return "\n".join(lines)


def format_verify(results: list[dict[str, Any]]) -> str:
    lines = []
    for r in results:
        summary = (f"{r['name']}: compared {humanize(r['checked'])} of {humanize(r['size'])}"
                   f" ({r['algorithm']})")  # fmt: skip
        if not r["differing"] and not r["errors"]:
            lines.append(f"{summary}: both disks hold the same data")
            continue
        lines.append(f"{summary}: {len(r['differing'])} extent(s) differ")
        for d in r["differing"]:
            lines.append(f"  differs at offset {d['offset']} length {d['length']}")
        for error in r["errors"]:
            lines.append(f"  not compared: {error}")
    return "\n".join(lines)


def dump(config: HastConfig, names: list[str]) -> list[dict[str, Any]]:
    result = []
    for name in names:
        resource = config.resource(name)
        try:
            with open(resource.local, "rb") as provider:
                block = provider.read(METADATA_SIZE)
        except OSError as error:
            raise CarpoolError(f"cannot read {resource.local}: {error.strerror}") from None
        md = decode(block, resource=name)
        result.append(
            {
                "resource": md.resource, "datasize": md.datasize, "extentsize": md.extentsize,
                "keepdirty": md.keepdirty, "localoff": md.localoff, "resuid": md.resuid,
                "localcnt": md.localcnt, "remotecnt": md.remotecnt,
                "prevrole": md.prevrole.value,
            }
        )  # fmt: skip
    return result


def format_dump(entries: list[dict[str, Any]]) -> str:
    lines = []
    for e in entries:
        lines.append(f"resource: {e['resource']}")
        lines.append(f"    datasize: {e['datasize']} ({humanize(e['datasize'])})")
        lines.append(f"    extentsize: {e['extentsize']} ({humanize(e['extentsize'])})")
        for key in ("keepdirty", "localoff", "resuid", "localcnt", "remotecnt", "prevrole"):
            lines.append(f"    {key}: {e[key]}")
    return "\n".join(lines)


def _names(config: HastConfig, words: list[str]) -> list[str]:
    if not words or words == ["all"]:
        return list(config.names)
    for word in words:
        config.resource(word)  # a clear error for an unknown name
    return words


def run(arguments: argparse.Namespace) -> int:
    node = arguments.node or os.environ.get("CARPOOL_NODE")
    config = load_config(arguments.config, node=node)
    command, words = arguments.command, list(arguments.words)
    emit_json: bool = arguments.json
    if command == "create":
        options = {"e": None, "k": None, "m": None}
        names = []
        index = 0
        while index < len(words):
            word = words[index]
            if word in ("-e", "-k", "-m") and index + 1 < len(words):
                options[word[1]] = words[index + 1]
                index += 2
                continue
            names.append(word)
            index += 1
        if not names:
            raise CarpoolError("usage: hastctl create [-e extentsize] [-k keepdirty] "
                               "[-m mediasize] name ...")  # fmt: skip
        for name in _names(config, names):
            create_provider(
                config.resource(name).local, name,
                extentsize=expand_number(options["e"]) if options["e"] else None,
                keepdirty=int(options["k"]) if options["k"] else None,
                mediasize=expand_number(options["m"]) if options["m"] else None,
            )  # fmt: skip
        return 0
    if command == "dump":
        entries = dump(config, _names(config, words))
        print(json.dumps(entries, indent=2) if emit_json else format_dump(entries))
        return 0
    path = arguments.socket or socket_path(arguments.run_dir, "hastd")
    # verify reads both disks whole: give it the time a large resource needs.
    with ControlClient(path, *([3600.0] if command == "verify" else [])) as client:
        if command == "role":
            if not words:
                raise CarpoolError(
                    "usage: hastctl role <init | primary | secondary> all | name ..."
                )
            role, targets = words[0], words[1:]
            if not targets:
                raise CarpoolError(f"say which resources: hastctl role {role} all | name ...")
            result = client.request("role", role=role, resources=_names(config, targets))
            if emit_json:
                print(json.dumps(result, indent=2))
            return 0
        if command == "verify":
            targets = ["all"] if not words or words == ["all"] else _names(config, words)
            results = client.request("verify", resources=targets)
            print(json.dumps(results, indent=2) if emit_json else format_verify(results))
            return 1 if any(r["differing"] or r["errors"] for r in results) else 0
        entries = client.request("status", resources=_names(config, words))
        if emit_json:
            print(json.dumps(entries, indent=2))
        elif command == "status":
            print(format_status(entries))
        else:
            print(format_list(entries))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="hastctl", description="Control HAST resources.")
    parser.add_argument("-c", dest="config", default=default_config_path())
    parser.add_argument("-d", dest="debug", action="count", default=0)
    parser.add_argument("-j", "--json", action="store_true")
    parser.add_argument("--node", help="this node's name in hast.conf (default: the hostname)")
    parser.add_argument("--run-dir", type=Path, default=default_run_dir())
    parser.add_argument("--socket", type=Path)
    parser.add_argument("command", choices=("create", "role", "status", "list", "dump", "verify"))
    parser.add_argument("words", nargs=argparse.REMAINDER)
    arguments = parser.parse_args(argv)
    try:
        return run(arguments)
    except CarpoolError as error:
        print(f"hastctl: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
