"""Clusters of network namespaces: nodes, the networks joining them, their processes.

A ``Lab`` owns one switch namespace (``<prefix>-sw``) holding one Linux bridge per
network, and one namespace per node (``<prefix>-<node>``). A node's interface is one
end of a veth pair whose other end is a port of the network's bridge. Nothing is
created in the host's own namespace, so no lab frame can leave the machine.

Faults are injected where a real network would fail: a node's link (``link_down``),
the cable at the switch (``unplug``), and the switch itself (``drop``, ``partition``:
nftables rules in the switch namespace's bridge family).
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import IO, Any

from carpool.lab import faults
from carpool.lab.registry import (
    LabRecord,
    check_prefix,
    namespace_pids,
    new_prefix,
    process_start_time,
    remove_lab,
)
from carpool.lab.shell import LabError
from carpool.lab.shell import run as _run

Command = str | Sequence[str]

# Default subnets, as the FreeBSD guide numbers its networks.
DEFAULT_SUBNETS: dict[str, tuple[str, str]] = {
    "lan": ("10.0.0.0/24", "fd00:0:0:1::/64"),
    "sync": ("192.168.255.0/24", "fd00:0:0:ff::/64"),
}


@dataclass
class Interface:
    node: str
    ifname: str
    network: str
    port: str
    addresses: list[ipaddress.IPv4Interface | ipaddress.IPv6Interface] = field(default_factory=list)

    @property
    def ipv4(self) -> ipaddress.IPv4Address | None:
        for address in self.addresses:
            if isinstance(address, ipaddress.IPv4Interface):
                return address.ip
        return None

    @property
    def ipv6(self) -> ipaddress.IPv6Address | None:
        for address in self.addresses:
            if isinstance(address, ipaddress.IPv6Interface):
                return address.ip
        return None


@dataclass
class Network:
    name: str
    index: int
    bridge: str
    subnet4: ipaddress.IPv4Network
    subnet6: ipaddress.IPv6Network


class LabProcess:
    """A process started in a node: its pid, its captured output, and ways to end it."""

    def __init__(self, node: Node, argv: list[str], popen: subprocess.Popen[bytes], log: Path):
        self.node = node
        self.argv = argv
        self.popen = popen
        self.log = log

    @property
    def pid(self) -> int:
        return self.popen.pid

    @property
    def returncode(self) -> int | None:
        return self.popen.poll()

    def running(self) -> bool:
        return self.popen.poll() is None

    def output(self) -> str:
        """Everything the process wrote so far (stdout and stderr, interleaved)."""
        try:
            return self.log.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def signal(self, signum: int) -> None:
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.popen.pid, signum)

    def kill(self) -> None:
        """SIGKILL to the process and everything it started, as a crash would end them."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.popen.pid, signal.SIGKILL)  # spawned as a session leader
        self.signal(signal.SIGKILL)
        self.popen.wait()

    def terminate(self, timeout: float = 10.0) -> int:
        """SIGTERM, then SIGKILL if it has not exited within ``timeout``."""
        self.signal(signal.SIGTERM)
        try:
            return self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            return self.popen.wait()

    def wait(self, timeout: float | None = None) -> int:
        return self.popen.wait(timeout)

    def wait_for_output(self, text: str, timeout: float = 10.0) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if text in self.output():
                return True
            if self.popen.poll() is not None:
                return text in self.output()
            time.sleep(0.05)
        return False

    def __repr__(self) -> str:
        return f"<LabProcess {self.node.name}:{self.pid} {shlex.join(self.argv)}>"


class Node:
    """One host of the lab: a network namespace, a directory, optionally a mount namespace."""

    def __init__(self, lab: Lab, name: str, index: int, mount_namespace: bool):
        self.lab = lab
        self.name = name
        self.index = index
        self.netns = f"{lab.prefix}-{name}"
        self.dir = lab.directory / name
        self.interfaces: dict[str, Interface] = {}
        self.processes: list[LabProcess] = []
        self._mount_holder: subprocess.Popen[bytes] | None = None
        self._create(mount_namespace)

    def _create(self, mount_namespace: bool) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        self.lab.record.namespaces.append(self.netns)
        self.lab.record.nodes[self.name] = {"netns": self.netns, "dir": str(self.dir)}
        self.lab.record.save()
        _run(["ip", "netns", "add", self.netns])
        _run(["ip", "-n", self.netns, "link", "set", "lo", "up"])
        # Like FreeBSD, keep IPv6 addresses across a link flap (Linux drops them by default).
        for scope in ("all", "default"):
            _run(["ip", "netns", "exec", self.netns, "sysctl", "-q", "-w",
                  f"net.ipv6.conf.{scope}.keep_addr_on_down=1"])  # fmt: skip
        if mount_namespace:
            self._hold_mount_namespace()

    def _hold_mount_namespace(self) -> None:
        """A process that holds a private mount namespace; commands enter it with nsenter."""
        holder = subprocess.Popen(
            ["ip", "netns", "exec", self.netns, "unshare", "--mount", "--propagation",
             "private", "sleep", "infinity"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )  # fmt: skip
        self._mount_holder = holder
        self.lab.remember_pid(holder.pid)
        deadline = time.monotonic() + 5.0
        while time.monotonic() < deadline:
            if self._holder_ready():
                break
            time.sleep(0.01)
        else:
            raise LabError(f"node {self.name}: its mount namespace did not come up")
        self.lab.record.nodes[self.name]["mount_holder"] = holder.pid
        self.lab.record.save()

    def reboot(self) -> None:
        """What a reboot does to a crashed node: every process ends and, with a private
        mount namespace, its mounts go away with it (a fresh, empty one replaces it).
        Links stay as they are: bring them up with ``lab.link_up``."""
        self.kill_everything()
        holder = self._mount_holder
        if holder is not None:
            holder.kill()
            holder.wait(10)
            self._hold_mount_namespace()

    def _holder_ready(self) -> bool:
        assert self._mount_holder is not None
        pid = self._mount_holder.pid
        try:
            return os.readlink(f"/proc/{pid}/ns/mnt") != os.readlink("/proc/self/ns/mnt") and (
                os.readlink(f"/proc/{pid}/exe").endswith("sleep")
            )
        except OSError:
            return False

    @property
    def has_mount_namespace(self) -> bool:
        return self._mount_holder is not None

    def wrap(self, argv: Sequence[str]) -> list[str]:
        """The argv that runs ``argv`` inside this node."""
        if self._mount_holder is not None:
            holder = str(self._mount_holder.pid)
            return ["nsenter", "--target", holder, "--mount", "--net", "--", *argv]
        return ["ip", "netns", "exec", self.netns, *argv]

    @staticmethod
    def _argv(command: Command) -> list[str]:
        if isinstance(command, str):
            return ["sh", "-c", command]
        return list(command)

    def run(
        self,
        command: Command,
        *,
        check: bool = True,
        timeout: float = 60.0,
        input: str | None = None,
        env: Mapping[str, str] | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run a command in the node and wait for it; raises LabError if it fails and ``check``."""
        argv = self._argv(command)
        result = subprocess.run(
            self.wrap(argv),
            capture_output=True,
            text=True,
            timeout=timeout,
            input=input,
            env=self._environment(env),
            check=False,
        )
        if check and result.returncode != 0:
            raise LabError(
                f"{self.name}: {shlex.join(argv)} exited {result.returncode}: "
                f"{(result.stderr or result.stdout).strip()}"
            )
        return result

    def spawn(
        self,
        command: Command,
        *,
        name: str | None = None,
        env: Mapping[str, str] | None = None,
        stdin: int | IO[Any] | None = subprocess.DEVNULL,
    ) -> LabProcess:
        """Start a command in the node without waiting; its output goes to a log in the node dir."""
        argv = self._argv(command)
        label = name or Path(argv[0]).name
        log = self.dir / f"{label}.{len(self.processes)}.log"
        with open(log, "wb") as output:
            popen = subprocess.Popen(
                self.wrap(argv),
                stdout=output,
                stderr=subprocess.STDOUT,
                stdin=stdin,
                env=self._environment(env),
                start_new_session=True,
            )
        process = LabProcess(self, argv, popen, log)
        self.processes.append(process)
        self.lab.remember_pid(popen.pid)
        return process

    def python(self, *arguments: str) -> list[str]:
        """argv running this Python (the project's venv) with ``arguments``."""
        return [sys.executable, *arguments]

    def _environment(self, extra: Mapping[str, str] | None) -> dict[str, str]:
        environment = dict(os.environ)
        environment["CARPOOL_NODE"] = self.name
        environment["CARPOOL_NODE_DIR"] = str(self.dir)
        if extra:
            environment.update(extra)
        return environment

    def ipv4(self, network: str) -> ipaddress.IPv4Address:
        for interface in self.interfaces.values():
            if interface.network == network and interface.ipv4 is not None:
                return interface.ipv4
        raise LabError(f"node {self.name} has no IPv4 address on network {network}")

    def ipv6(self, network: str) -> ipaddress.IPv6Address:
        for interface in self.interfaces.values():
            if interface.network == network and interface.ipv6 is not None:
                return interface.ipv6
        raise LabError(f"node {self.name} has no IPv6 address on network {network}")

    def interface_on(self, network: str) -> Interface:
        for interface in self.interfaces.values():
            if interface.network == network:
                return interface
        raise LabError(f"node {self.name} is not attached to network {network}")

    def mac(self, ifname: str) -> str:
        return self.run(["cat", f"/sys/class/net/{ifname}/address"]).stdout.strip()

    def addresses_of(self, ifname: str) -> list[str]:
        """Addresses currently on ``ifname`` (as ``ip -br addr`` shows them, without scope)."""
        out = self.run(["ip", "-o", "addr", "show", "dev", ifname]).stdout
        found = []
        for line in out.splitlines():
            words = line.split()
            if len(words) > 3 and words[2] in ("inet", "inet6"):
                found.append(words[3])
        return found

    def ping(
        self,
        address: str | ipaddress.IPv4Address | ipaddress.IPv6Address,
        count: int = 1,
        timeout: float = 2.0,
    ) -> bool:
        """True if ``address`` answers an ICMP echo from this node."""
        result = self.run(
            ["ping", "-n", "-q", "-c", str(count), "-W", str(max(1, int(timeout))), str(address)],
            check=False,
            timeout=timeout * count + 5,
        )
        return result.returncode == 0

    def kill_processes(self, signum: int = signal.SIGKILL) -> None:
        """Signal every process started here, with their children; wait for them to end."""
        for process in self.processes:
            if signum == signal.SIGKILL:
                process.kill()
            else:
                process.signal(signum)
        for process in self.processes:
            try:
                process.popen.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()

    def kill_everything(self) -> None:
        """SIGKILL every process in the node's namespace (what a power cut does)."""
        holder = self._mount_holder.pid if self._mount_holder is not None else None
        for pid in namespace_pids(self.netns):
            if pid != holder:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)
        self.kill_processes(signal.SIGKILL)

    def __repr__(self) -> str:
        return f"<Node {self.name} netns={self.netns}>"


class Lab:
    """A cluster of namespaces; a context manager that always removes what it created."""

    def __init__(self, prefix: str | None = None, *, persistent: bool = False):
        self.prefix = check_prefix(prefix) if prefix else new_prefix()
        self.persistent = persistent
        owner = None if persistent else os.getpid()
        self.record = LabRecord(
            prefix=self.prefix,
            owner_pid=owner,
            owner_start=process_start_time(owner) if owner else None,
        )
        self.switch = f"{self.prefix}-sw"
        self.nodes: dict[str, Node] = {}
        self.networks: dict[str, Network] = {}
        self._created = False

    @property
    def directory(self) -> Path:
        return self.record.directory

    # -- lifecycle -------------------------------------------------------------------------

    def __enter__(self) -> Lab:
        self.create()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if not self.persistent:
            self.destroy()

    def create(self) -> None:
        if self._created:
            return
        if (self.directory / "lab.json").exists():
            raise LabError(
                f"a lab with prefix {self.prefix!r} already exists; "
                f"remove it with `carpool lab clean --prefix {self.prefix}`"
            )
        self.record.namespaces.append(self.switch)
        self.record.save()
        (self.directory / "pids").mkdir(exist_ok=True)
        self._created = True
        _run(["ip", "netns", "add", self.switch])
        _run(["ip", "-n", self.switch, "link", "set", "lo", "up"])

    def destroy(self) -> None:
        """Stop every process, then remove namespaces, mounts, loop devices and the record."""
        for node in self.nodes.values():
            for process in node.processes:
                process.signal(signal.SIGTERM)
        deadline = time.monotonic() + 5.0
        for node in self.nodes.values():
            for process in node.processes:
                remaining = max(0.0, deadline - time.monotonic())
                try:
                    process.popen.wait(remaining)
                except subprocess.TimeoutExpired:
                    process.kill()
        remove_lab(self.prefix)
        self._created = False

    def remember_pid(self, pid: int) -> None:
        start = process_start_time(pid)
        if start is not None:
            (self.directory / "pids" / str(pid)).write_text(str(start))
        self.record.pids.append(pid)
        self.record.save()

    def remember_mount(self, mountpoint: str) -> None:
        self.record.mounts.append(mountpoint)
        self.record.save()

    def remember_loop_device(self, device: str, backing: str) -> None:
        self.record.loop_devices.append((device, backing))
        self.record.save()

    # -- topology --------------------------------------------------------------------------

    def node(self, name: str, *, mount_namespace: bool = False) -> Node:
        if name in self.nodes:
            return self.nodes[name]
        if not name.replace("-", "").isalnum() or len(name) > 20:
            raise LabError(f"node name {name!r}: use up to 20 letters, digits and dashes")
        node = Node(self, name, len(self.nodes) + 1, mount_namespace)
        self.nodes[name] = node
        return node

    def network(
        self, name: str, *, subnet4: str | None = None, subnet6: str | None = None
    ) -> Network:
        if name in self.networks:
            return self.networks[name]
        if not name.isalnum() or len(name) > 10:
            raise LabError(f"network name {name!r}: use up to 10 letters and digits")
        index = len(self.networks) + 1
        default4, default6 = DEFAULT_SUBNETS.get(
            name, (f"10.{100 + index}.0.0/24", f"fd00:0:0:{100 + index:x}::/64")
        )
        network = Network(
            name=name,
            index=index,
            bridge=f"br-{name}",
            subnet4=ipaddress.IPv4Network(subnet4 or default4),
            subnet6=ipaddress.IPv6Network(subnet6 or default6),
        )
        _run(
            [
                "ip",
                "-n",
                self.switch,
                "link",
                "add",
                network.bridge,
                "type",
                "bridge",
                "stp_state",
                "0",
                "forward_delay",
                "0",
                "mcast_snooping",
                "0",
            ]
        )
        _run(["ip", "-n", self.switch, "link", "set", network.bridge, "up"])
        self.networks[name] = network
        self.record.networks[name] = {
            "bridge": network.bridge,
            "subnet4": str(network.subnet4),
            "subnet6": str(network.subnet6),
        }
        self.record.save()
        return network

    def attach(
        self,
        node: Node | str,
        network: Network | str,
        *,
        ifname: str = "em0",
        address: str | None = None,
        address6: str | None = None,
        host: int | None = None,
    ) -> Interface:
        """Give ``node`` an interface ``ifname`` on ``network``.

        Addresses default to host number ``host`` (the node's index) in the network's
        subnets; pass ``address="none"`` to leave the interface without IPv4.
        """
        node = self.nodes[node] if isinstance(node, str) else node
        network = self.network(network) if isinstance(network, str) else network
        if ifname in node.interfaces:
            raise LabError(f"node {node.name} already has an interface {ifname}")
        number = host if host is not None else node.index
        port = f"n{node.index}{ifname}"[:15]
        _run(
            [
                "ip",
                "-n",
                self.switch,
                "link",
                "add",
                port,
                "type",
                "veth",
                "peer",
                "name",
                ifname,
                "netns",
                node.netns,
            ]
        )
        _run(["ip", "-n", self.switch, "link", "set", port, "master", network.bridge, "up"])
        # Duplicate address detection would delay IPv6 for a second or more: lab links are ours.
        node.run(["sysctl", "-q", "-w", f"net.ipv6.conf.{ifname}.accept_dad=0"], check=False)
        _run(["ip", "-n", node.netns, "link", "set", ifname, "up"])
        interface = Interface(node=node.name, ifname=ifname, network=network.name, port=port)
        if address != "none":
            address4 = ipaddress.IPv4Interface(
                address or f"{network.subnet4.network_address + number}/{network.subnet4.prefixlen}"
            )
            _run(["ip", "-n", node.netns, "addr", "add", str(address4), "dev", ifname])
            interface.addresses.append(address4)
        if address6 != "none":
            address6_value = ipaddress.IPv6Interface(
                address6
                or f"{network.subnet6.network_address + number}/{network.subnet6.prefixlen}"
            )
            _run(
                ["ip", "-n", node.netns, "addr", "add", str(address6_value), "dev", ifname, "nodad"]
            )
            interface.addresses.append(address6_value)
        node.interfaces[ifname] = interface
        self.record.nodes[node.name].setdefault("interfaces", {})[ifname] = {
            "network": network.name,
            "port": port,
            "addresses": [str(a) for a in interface.addresses],
        }
        self.record.save()
        return interface

    def describe(self) -> str:
        return describe_record(self.record)

    # -- faults ----------------------------------------------------------------------------

    def link_down(self, node: Node | str, ifname: str = "em0") -> None:
        """``ifconfig em0 down`` on the node."""
        node = self.nodes[node] if isinstance(node, str) else node
        _run(["ip", "-n", node.netns, "link", "set", ifname, "down"])

    def link_up(self, node: Node | str, ifname: str = "em0") -> None:
        node = self.nodes[node] if isinstance(node, str) else node
        _run(["ip", "-n", node.netns, "link", "set", ifname, "up"])

    def unplug(self, node: Node | str, ifname: str = "em0") -> None:
        """Pull the cable at the switch: the node's interface stays up but loses carrier."""
        node = self.nodes[node] if isinstance(node, str) else node
        _run(["ip", "-n", self.switch, "link", "set", node.interfaces[ifname].port, "down"])

    def plug(self, node: Node | str, ifname: str = "em0") -> None:
        node = self.nodes[node] if isinstance(node, str) else node
        _run(["ip", "-n", self.switch, "link", "set", node.interfaces[ifname].port, "up"])

    def drop(self, node: Node | str, *, network: str | None = None, percent: int = 100) -> None:
        """Drop ``percent`` of the frames a node sends or receives (on one network or all)."""
        node = self.nodes[node] if isinstance(node, str) else node
        ports = [i.port for i in node.interfaces.values() if network in (None, i.network)]
        faults.add_rules(self.switch, self.prefix, faults.drop_rules(ports, percent))

    def partition(
        self,
        side_a: Iterable[Node | str],
        side_b: Iterable[Node | str],
        *,
        network: str | None = None,
    ) -> None:
        """Stop all frames between the two sides (both directions, multicast included)."""
        ports_a = self._ports(side_a, network)
        ports_b = self._ports(side_b, network)
        faults.add_rules(self.switch, self.prefix, faults.partition_rules(ports_a, ports_b))

    def heal(self) -> None:
        """Undo every ``drop`` and ``partition``."""
        faults.flush(self.switch, self.prefix)

    def crash(self, node: Node | str) -> None:
        """The host dies: its links go down and every process it runs is SIGKILLed."""
        node = self.nodes[node] if isinstance(node, str) else node
        for ifname in node.interfaces:
            self.link_down(node, ifname)
        node.kill_everything()

    def _ports(self, nodes: Iterable[Node | str], network: str | None) -> list[str]:
        ports: list[str] = []
        for item in nodes:
            node = self.nodes[item] if isinstance(item, str) else item
            ports += [i.port for i in node.interfaces.values() if network in (None, i.network)]
        return ports


def describe_record(record: LabRecord) -> str:
    """The lab's map, for people: nodes, their interfaces, networks and addresses."""
    lines = [f"lab {record.prefix}" + (" (persistent)" if record.persistent else "")]
    for name, network in record.networks.items():
        lines.append(
            f"  network {name:<6} bridge {network['bridge']:<10} "
            f"{network['subnet4']}  {network['subnet6']}"
        )
    for name, node in record.nodes.items():
        lines.append(f"  node {name}  (netns {node['netns']})")
        for ifname, interface in node.get("interfaces", {}).items():
            addresses = "  ".join(interface["addresses"]) or "-"
            lines.append(f"    {ifname:<5} on {interface['network']:<6} {addresses}")
    return "\n".join(lines)
