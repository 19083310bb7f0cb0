"""Starting carpool's daemons and their third-party peers in lab nodes, and watching them.

Tests, benchmarks and the demo share these, so that every one of them starts carpd
the way the shipped systemd unit does (under a supervisor whose stop-post command
removes the virtual addresses) and reads its state the way an operator would
(``carpctl -j``).
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from carpool.lab.cluster import Lab, LabProcess, Node

BIN = Path(sys.executable).parent


def wait_until(condition: Callable[[], bool], timeout: float = 20.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what or condition}")


def seed_lan(lab: Lab, routers: int = 2, client: bool = True) -> None:
    """The guide's LAN: node1 10.0.0.1, node2 10.0.0.2 (...) on em0, and a client 10.0.0.10."""
    lab.network("lan")
    for index in range(1, routers + 1):
        lab.attach(lab.node(f"node{index}"), "lan", ifname="em0")
    if client:
        lab.attach(lab.node("client"), "lan", ifname="em0", host=10)


def write_file(node: Node, name: str, text: str) -> Path:
    path = node.dir / name
    path.write_text(text)
    return path


def holds(node: Node, address: str, ifname: str = "em0") -> bool:
    """True if ``address`` is on ``ifname`` and the link is up (a dead host's is not)."""
    result = node.run(["ip", "-br", "addr", "show", "dev", ifname], check=False)
    words = result.stdout.split()
    if len(words) < 2 or words[1] not in ("UP", "UNKNOWN"):
        return False
    return any(word.split("/")[0] == address for word in words[2:])


def holders(lab: Lab, address: str, ifname: str = "em0") -> list[str]:
    """The nodes that carry ``address`` on ``ifname`` right now."""
    return [name for name, node in lab.nodes.items() if holds(node, address, ifname)]


# -- carpd -------------------------------------------------------------------------------


def start_carpd(
    node: Node, conf: Path, *, supervised: bool = True, extra: tuple[str, ...] = ()
) -> LabProcess:
    """carpd as its systemd unit runs it: with ``carpctl cleanup`` after it, however it ends."""
    carpd = [str(BIN / "carpd"), "-f", str(conf), "--run-dir", str(node.dir), *extra]
    if not supervised:
        return node.spawn(carpd, name="carpd")
    cleanup = f"{BIN / 'carpctl'} -f {conf} cleanup"
    return node.spawn(
        [str(BIN / "carpool"), "supervise", "--exec-stop-post", cleanup, "--", *carpd],
        name="carpd",
    )


def carpctl(node: Node, *words: str, check: bool = True) -> Any:
    """``carpctl -j WORDS`` in the node: the parsed JSON, or the failed run if not ``check``."""
    argv = [str(BIN / "carpctl"), "-j", "--run-dir", str(node.dir), *words]
    result = node.run(argv, check=check)
    return json.loads(result.stdout) if result.returncode == 0 else result


def carpctl_text(node: Node, *words: str) -> str:
    return node.run([str(BIN / "carpctl"), "--run-dir", str(node.dir), *words]).stdout


def carp_state(node: Node, ifname: str = "em0", vhid: int = 1) -> str | None:
    """The vhid's state as carpd reports it, or None if carpd does not answer."""
    argv = [str(BIN / "carpctl"), "-j", "--run-dir", str(node.dir)]
    result = node.run(argv, check=False, timeout=10)
    if result.returncode != 0:
        return None
    for entry in json.loads(result.stdout)["interfaces"].get(ifname, {}).get("vhids", []):
        if entry["vhid"] == vhid:
            return str(entry["state"])
    return None


def wait_carp_state(
    node: Node, wanted: str, ifname: str = "em0", vhid: int = 1, timeout: float = 20.0
) -> None:
    wait_until(
        lambda: carp_state(node, ifname, vhid) == wanted,
        timeout,
        f"{node.name} {ifname} vhid {vhid} to be {wanted}",
    )


# -- ucarp and keepalived ----------------------------------------------------------------

UCARP_UP = '#!/bin/sh\nip addr add "$2"/32 dev "$1"\nexit 0\n'
UCARP_DOWN = '#!/bin/sh\nip addr del "$2"/32 dev "$1" 2>/dev/null\nexit 0\n'


def start_ucarp(
    node: Node,
    *,
    vhid: int,
    password: str,
    vip: str,
    advskew: int,
    advbase: int = 1,
    preempt: bool = True,
    ifname: str = "em0",
) -> LabProcess:
    """Debian's ucarp with up/down scripts that add and remove the VIP (``-z``: on exit too)."""
    up = write_file(node, "vip-up.sh", UCARP_UP)
    down = write_file(node, "vip-down.sh", UCARP_DOWN)
    up.chmod(0o755)
    down.chmod(0o755)
    argv = [
        "ucarp", "-i", ifname, "-s", str(node.ipv4("lan")), "-v", str(vhid), "-p", password,
        "-a", vip, "-b", str(advbase), "-k", str(advskew), "-z", "-D",
        "-u", str(up), "-d", str(down),
    ]  # fmt: skip
    if preempt:
        argv.append("-P")
    return node.spawn(argv, name="ucarp")


def start_keepalived(
    node: Node,
    *,
    vrid: int,
    vip: str,
    priority: int,
    advert_int: float = 1,
    ifname: str = "em0",
    track_file: Path | None = None,
) -> LabProcess:
    """keepalived (VRRPv3) for one VIP; ``track_file`` lets a test lower its priority."""
    tracking = ""
    if track_file is not None:
        tracking = f"vrrp_track_file demote {{\n  file {track_file}\n  weight 1\n}}\n"
    track_use = "  track_file {\n    demote\n  }\n" if track_file is not None else ""
    conf = write_file(
        node,
        "keepalived.conf",
        f"global_defs {{\n  router_id {node.name}\n  vrrp_version 3\n}}\n{tracking}"
        f"vrrp_instance VI_{vrid} {{\n  state BACKUP\n  interface {ifname}\n"
        f"  virtual_router_id {vrid}\n  priority {priority}\n  advert_int {advert_int}\n"
        f"{track_use}  virtual_ipaddress {{\n    {vip}/32 dev {ifname}\n  }}\n}}\n",
    )
    for pidfile in ("keepalived.pid", "keepalived-vrrp.pid"):
        # A SIGKILLed keepalived leaves them; a reused pid would make it refuse to start.
        (node.dir / pidfile).unlink(missing_ok=True)
    argv = [
        "keepalived", "-n", "-l", "-D", "-G", "-P", "-f", str(conf),
        "-p", str(node.dir / "keepalived.pid"), "-r", str(node.dir / "keepalived-vrrp.pid"),
    ]  # fmt: skip
    return node.spawn(argv, name="keepalived")


# -- devd and ifstated ---------------------------------------------------------------------


def start_devd(
    node: Node, conf: Path, *, timeout: float = 60.0, path_prefix: Path | None = None
) -> LabProcess:
    """devd following the node's carpool daemons; ``path_prefix`` goes first in PATH."""
    environment = {}
    if path_prefix is not None:
        environment["PATH"] = f"{path_prefix}:{BIN}:/usr/sbin:/usr/bin:/sbin:/bin"
    argv = [
        str(BIN / "devd"),
        "-f",
        str(conf),
        "--run-dir",
        str(node.dir),
        "--timeout",
        str(timeout),
    ]
    return node.spawn(argv, name="devd", env=environment)


def start_ifstated(node: Node, conf: Path, *, timeout: float = 60.0) -> LabProcess:
    argv = [
        str(BIN / "ifstated"), "-f", str(conf), "--run-dir", str(node.dir),
        "--timeout", str(timeout),
    ]  # fmt: skip
    return node.spawn(argv, name="ifstated")


def daemon_status(node: Node, daemon: str) -> Any:
    """The ``status`` answer of a daemon in the node, or None if it does not answer."""
    from carpool.control import ControlClient, ControlError, socket_path

    try:
        with ControlClient(socket_path(node.dir, daemon), timeout=5) as client:
            return client.request("status")
    except ControlError:
        return None
