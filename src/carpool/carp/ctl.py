"""carpctl: FreeBSD's ``ifconfig`` CARP words, ``netstat -s -p carp`` and ``sysctl``, for carpd.

    carpctl                         every interface carpd runs CARP on
    carpctl em0                     carp: MASTER vhid 1 advbase 1 advskew 0 ...
    carpctl em0 vhid 1 state backup
    carpctl em0 vhid 1 advskew 100 [advbase 1]
    carpctl -g carp carpdemote 50   (and -carpdemote 50)
    carpctl stats                   as netstat -s -p carp
    carpctl set net.inet.carp.preempt=1
    carpctl get [NAME]
    carpctl cleanup [-f FILE]       remove the VIPs of FILE (no daemon needed; for ExecStopPost)

Every command takes ``-j`` for JSON output and ``--run-dir`` (or ``--socket``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ipaddress
import json
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from carpool.carp.config import load_config
from carpool.carp.vmac import vmac_ifname
from carpool.control import ControlClient, default_run_dir, socket_path
from carpool.errors import CarpoolError
from carpool.net.netlink import Netlink

USAGE = """usage: carpctl [-j] [--run-dir DIR] [INTERFACE [vhid N [state master|backup]
                                                    [advskew N] [advbase N]]]
       carpctl [-j] -g carp carpdemote [N] | -carpdemote [N]
       carpctl [-j] stats [-z]
       carpctl [-j] set NAME=VALUE | get [NAME]
       carpctl cleanup [-f FILE]"""

SYSCTL_NAMES = ("net.inet.carp.preempt", "net.inet.carp.demotion")


def netmask_hex(prefixlen: int) -> str:
    return f"0x{(0xFFFFFFFF << (32 - prefixlen)) & 0xFFFFFFFF:08x}"


def format_address(text: str, vhid: int | None = None) -> str:
    """One ifconfig address line (without the leading tab)."""
    address = ipaddress.ip_interface(text)
    suffix = f" vhid {vhid}" if vhid is not None else ""
    if isinstance(address, ipaddress.IPv4Interface):
        broadcast = address.network.broadcast_address
        return (
            f"inet {address.ip} netmask {netmask_hex(address.network.prefixlen)} "
            f"broadcast {broadcast}{suffix}"
        )
    return f"inet6 {address.ip} prefixlen {address.network.prefixlen}{suffix}"


def format_interface(ifname: str, interface: Mapping[str, Any]) -> str:
    """The block ``ifconfig em0`` prints, restricted to what CARP adds and uses."""
    flags = "UP,BROADCAST,RUNNING,MULTICAST" if interface.get("link_up") else "BROADCAST,MULTICAST"
    lines = [f"{ifname}: flags=<{flags}> mtu {interface.get('mtu', 1500)}"]
    if interface.get("mac"):
        lines.append(f"\tether {interface['mac']}")
    virtual = {
        str(ipaddress.ip_interface(a).ip) for v in interface["vhids"] for a in v["addresses"]
    }
    for address in interface.get("kernel_addresses", []):
        if str(ipaddress.ip_interface(address).ip) not in virtual:
            lines.append("\t" + format_address(address))
    for entry in interface["vhids"]:
        for address in entry["addresses"]:
            lines.append("\t" + format_address(address, entry["vhid"]))
    for entry in interface["vhids"]:
        lines.append(
            f"\tcarp: {entry['state']} vhid {entry['vhid']} advbase {entry['advbase']} "
            f"advskew {entry['advskew']}"
        )
        lines.append(
            f"\t      peer {entry.get('peer') or '224.0.0.18'} "
            f"peer6 {entry.get('peer6') or 'ff02::12'}"
        )
    return "\n".join(lines)


STAT_LINES = (
    ("ipackets", "\t{n} packet{s} received (IPv4)"),
    ("ipackets6", "\t{n} packet{s} received (IPv6)"),
    ("badttl", "\t\t{n} packet{s} discarded for wrong TTL"),
    ("hdrops", "\t\t{n} packet{s} shorter than header"),
    ("badsum", "\t\t{n} discarded for bad checksum{s}"),
    ("badver", "\t\t{n} discarded packet{s} with a bad version"),
    ("badlen", "\t\t{n} discarded because packet too short"),
    ("badauth", "\t\t{n} discarded for bad authentication"),
    ("badvhid", "\t\t{n} discarded for bad vhid"),
    ("badaddrs", "\t\t{n} discarded because of a bad address list"),
    ("opackets", "\t{n} packet{s} sent (IPv4)"),
    ("opackets6", "\t{n} packet{s} sent (IPv6)"),
    ("onomem", "\t\t{n} send failed due to mbuf memory error"),
)


def format_stats(stats: Mapping[str, int]) -> str:
    """``netstat -s -p carp``."""
    lines = ["carp:"]
    for key, template in STAT_LINES:
        count = int(stats.get(key, 0))
        lines.append(template.format(n=count, s="" if count == 1 else "s"))
    return "\n".join(lines)


def _emit(result: Any, as_json: bool, text: str) -> None:
    print(json.dumps(result, indent=2, sort_keys=True) if as_json else text)


def _parse_vhid_words(words: Sequence[str]) -> dict[str, Any]:
    """``vhid 1 state backup advskew 100`` → {"vhid": 1, "state": "backup", "advskew": 100}."""
    settings: dict[str, Any] = {}
    index = 0
    while index < len(words):
        word = words[index]
        if index + 1 >= len(words):
            raise CarpoolError(f"{word!r} needs a value\n{USAGE}")
        value = words[index + 1]
        if word in ("vhid", "advskew", "advbase"):
            try:
                settings[word] = int(value)
            except ValueError:
                raise CarpoolError(f"{word} takes a number, not {value!r}") from None
        elif word == "state":
            if value not in ("master", "backup", "MASTER", "BACKUP"):
                raise CarpoolError(f"state is master or backup, not {value!r}")
            settings["state"] = value.lower()
        else:
            raise CarpoolError(f"unknown word {word!r}\n{USAGE}")
        index += 2
    if settings and "vhid" not in settings:
        raise CarpoolError("say which vhid, e.g. `carpctl em0 vhid 1 state backup`")
    return settings


async def _cleanup(config_path: str) -> list[str]:
    config = load_config(config_path)
    netlink = Netlink()
    removed = []
    try:
        for vhid in config.vhids:
            if vhid.vmac:
                with contextlib.suppress(CarpoolError):
                    index = await netlink.index(vhid.ifname)
                    name = vmac_ifname(vhid.ifname, vhid.vhid, index)
                    if await netlink.delete(name):
                        removed.append(f"{name} (vhid {vhid.vhid})")
            for address in vhid.addresses:
                try:
                    if await netlink.remove_address(vhid.ifname, address):
                        removed.append(f"{address} from {vhid.ifname} (vhid {vhid.vhid})")
                except CarpoolError as error:
                    print(f"carpctl: {error}", file=sys.stderr)
    finally:
        await netlink.close()
    return removed


def run(arguments: argparse.Namespace, words: list[str]) -> int:
    as_json: bool = arguments.json
    if words[:1] == ["cleanup"]:
        removed = asyncio.run(_cleanup(arguments.config))
        _emit({"removed": removed}, as_json, "\n".join(f"removed {r}" for r in removed) or "")
        return 0

    path = arguments.socket or socket_path(arguments.run_dir, "carpd")
    with ControlClient(path) as client:
        if arguments.group is not None or words[:1] in (["carpdemote"], ["-carpdemote"]):
            return _demote(client, arguments, words, as_json)
        if words[:1] == ["stats"]:
            stats = client.request("stats", reset="-z" in words[1:])
            _emit(stats, as_json, format_stats(stats))
            return 0
        if words[:1] == ["set"]:
            if len(words) != 2 or "=" not in words[1]:
                raise CarpoolError("usage: carpctl set net.inet.carp.preempt=1")
            name, _, value = words[1].partition("=")
            try:
                number = int(value)
            except ValueError:
                raise CarpoolError(f"{name} takes a whole number, not {value!r}") from None
            old = client.request("sysctl")
            result = client.request("sysctl", name=name, value=number)
            _emit(result, as_json, f"{name}: {old.get(name)} -> {result[name]}")
            return 0
        if words[:1] == ["get"]:
            values = client.request("sysctl")
            if len(words) > 1:
                if words[1] not in values:
                    raise CarpoolError(f"unknown name {words[1]!r}; known: {', '.join(values)}")
                values = {words[1]: values[words[1]]}
            _emit(values, as_json, "\n".join(f"{k}: {v}" for k, v in values.items()))
            return 0
        return _interface(client, words, as_json)


def _demote(
    client: ControlClient, arguments: argparse.Namespace, words: list[str], as_json: bool
) -> int:
    if arguments.group not in (None, "carp"):
        raise CarpoolError(f"only the carp group exists here, not {arguments.group!r}")
    if not words or words[0] not in ("carpdemote", "-carpdemote"):
        status = client.request("status")
        _emit(
            {"demotion": status["demotion"]},
            as_json,
            f"carp: carp demote count {status['demotion']}",
        )
        return 0
    amount = 1
    if len(words) > 1:
        try:
            amount = int(words[1])
        except ValueError:
            raise CarpoolError(f"carpdemote takes a number, not {words[1]!r}") from None
    delta = -amount if words[0].startswith("-") else amount
    result = client.request("demote", delta=delta)
    _emit(result, as_json, f"carp: carp demote count {result['demotion']}")
    return 0


def _interface(client: ControlClient, words: list[str], as_json: bool) -> int:
    if not words:
        status = client.request("status")
        _emit(
            status,
            as_json,
            "\n".join(format_interface(n, i) for n, i in sorted(status["interfaces"].items())),
        )
        return 0
    ifname, settings = words[0], _parse_vhid_words(words[1:])
    status = client.request("status")
    if ifname not in status["interfaces"]:
        known = ", ".join(sorted(status["interfaces"])) or "none"
        raise CarpoolError(f"carpd runs no vhid on {ifname} (interfaces: {known})")
    vhid = settings.get("vhid")
    if "advskew" in settings:
        status = client.request(
            "set_advskew", ifname=ifname, vhid=vhid, advskew=settings["advskew"]
        )
    if "advbase" in settings:
        status = client.request(
            "set_advbase", ifname=ifname, vhid=vhid, advbase=settings["advbase"]
        )
    if "state" in settings:
        status = client.request("set_state", ifname=ifname, vhid=vhid, state=settings["state"])
    interface = status["interfaces"][ifname]
    if vhid is not None and not any(v["vhid"] == vhid for v in interface["vhids"]):
        raise CarpoolError(f"{ifname} has no vhid {vhid}")
    _emit(interface, as_json, format_interface(ifname, interface))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="carpctl", usage=USAGE, add_help=True)
    parser.add_argument("-j", "--json", action="store_true", help="print JSON")
    parser.add_argument("--run-dir", type=Path, default=default_run_dir())
    parser.add_argument("--socket", type=Path, help="carpd's control socket")
    parser.add_argument("-g", dest="group", help="interface group (carp)")
    parser.add_argument("-f", dest="config", default="/etc/carpool/rc.conf", help="for cleanup")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # ``-carpdemote`` looks like an option to argparse: take it out first.
    words_tail: list[str] = []
    if "-carpdemote" in argv:
        position = argv.index("-carpdemote")
        words_tail = argv[position:]
        argv = argv[:position]
    arguments, words = build_parser().parse_known_args(argv)
    words += words_tail
    try:
        return run(arguments, words)
    except CarpoolError as error:
        print(f"carpctl: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
