"""carpd: the asyncio shell around ``carp.machine``.

It owns the raw sockets, netlink, timers, the control socket, events and metrics.
Every protocol decision is the machine's: this module turns packets, timers, link
changes and commands into machine inputs, and performs the actions it returns.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ipaddress
import logging
import os
import secrets
import socket
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, Gauge
from prometheus_client import Counter as PromCounter

from carpool.carp import packet, sockets
from carpool.carp.config import CarpConfig, VhidConfig, load_config
from carpool.carp.machine import (
    Announce,
    CarpHost,
    CarpState,
    DemotionChanged,
    ReceivedAdvert,
    ReleaseAddresses,
    SendAdvert,
    StateChanged,
    TakeAddresses,
)
from carpool.carp.vmac import vmac_address, vmac_ifname
from carpool.control import default_run_dir
from carpool.errors import CarpoolError, CommandError, ProtocolError
from carpool.events import Event, EventBus, setup_logging
from carpool.net import announce
from carpool.net.netlink import LinkState, Netlink, set_interface_sysctl, watch_links
from carpool.service import DaemonShell, run_command

log = logging.getLogger("carpool.carpd")

Addresses = tuple[ipaddress.IPv4Interface | ipaddress.IPv6Interface, ...]

DEFAULT_CONFIG = "/etc/carpool/rc.conf"
DAEMON = "carpd"

# struct carpstats, in FreeBSD's order.
STAT_NAMES = (
    "ipackets", "ipackets6", "badif", "badttl", "hdrops", "badsum", "badver", "badlen",
    "badauth", "badvhid", "badaddrs", "opackets", "opackets6", "onomem", "ostates", "preempt",
)  # fmt: skip


@dataclass
class InterfaceSockets:
    ifname: str
    ipv4: socket.socket | None = None
    ipv6: socket.socket | None = None
    mac: bytes = b""
    own_addresses: list[ipaddress.IPv4Address | ipaddress.IPv6Address] = field(default_factory=list)

    def local(self, version: int) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
        """The address our adverts leave from (the interface's first of that family)."""
        for address in self.own_addresses:
            if address.version == version and not address.is_link_local:
                return address
        for address in self.own_addresses:
            if address.version == version:
                return address
        return None


class CarpDaemon:
    def __init__(self, config_path: str, run_dir: Path, metrics_address: str | None) -> None:
        self.config_path = config_path
        self.run_dir = run_dir
        self.metrics_address = metrics_address
        self.config: CarpConfig = load_config(config_path)
        self.host = CarpHost(self.config, time.monotonic())
        self.stats: Counter[str] = Counter()
        self.registry = CollectorRegistry()
        self.bus = EventBus(registry=self.registry)
        self.netlink = Netlink()
        self.interfaces: dict[str, InterfaceSockets] = {}
        self.link_up: dict[str, bool] = {}
        self.vmacs: dict[tuple[str, int], str] = {}
        self.actions: asyncio.Queue[object] = asyncio.Queue()
        self.stopping = asyncio.Event()
        self.timer: asyncio.TimerHandle | None = None
        self.tasks: list[asyncio.Task[None]] = []
        self._state_gauge = Gauge(
            "carpool_carp_state",
            "1 for the state each vhid is in",
            ["ifname", "vhid", "state"],
            registry=self.registry,
        )
        self._packets = PromCounter(
            "carpool_carp_packets",
            "CARP packets by counter of netstat -s -p carp",
            ["counter"],
            registry=self.registry,
        )
        self._demotion = Gauge(
            "carpool_carp_demotion", "net.inet.carp.demotion", registry=self.registry
        )

    # -- machine plumbing ----------------------------------------------------------------

    def feed(self, actions: list[Any]) -> None:
        """Queue the machine's actions, then re-arm the timer for its next deadline."""
        for action in actions:
            self.actions.put_nowait(action)
        self.arm_timer()

    def arm_timer(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        deadline = self.host.next_deadline()
        if deadline is None:
            return
        loop = asyncio.get_running_loop()
        delay = max(0.0, deadline - time.monotonic())
        self.timer = loop.call_at(loop.time() + delay, self.on_timer)

    def on_timer(self) -> None:
        self.timer = None
        self.feed(self.host.advance(time.monotonic()))

    def count(self, name: str) -> None:
        self.stats[name] += 1
        self._packets.labels(name).inc()

    async def perform_actions(self) -> None:
        while True:
            action = await self.actions.get()
            try:
                await self.perform(action)
            except CarpoolError as error:
                log.error("action failed: %s", error)
            except Exception:
                log.exception("action %r failed", action)

    async def perform(self, action: object) -> None:
        if isinstance(action, SendAdvert):
            self.send_advert(action)
        elif isinstance(action, TakeAddresses):
            await self.take_addresses(action.ifname, action.vhid, action.addresses)
        elif isinstance(action, ReleaseAddresses):
            device = self.vmacs.get((action.ifname, action.vhid), action.ifname)
            for address in action.addresses:
                await self.netlink.remove_address(device, address)
            if device != action.ifname:
                await self.netlink.set_up(device, False)
        elif isinstance(action, Announce):
            self.announce(action.ifname, action.vhid, action.addresses)
        elif isinstance(action, StateChanged):
            self.state_changed(action)
        elif isinstance(action, DemotionChanged):
            log.info(
                "carp: demoted by %d to %d (%s)",
                action.new - action.old,
                action.new,
                action.reason,
            )
            self._demotion.set(action.new)
            self.bus.publish(
                Event.now(DAEMON, "DEMOTION", old=action.old, new=action.new, reason=action.reason)
            )

    def vhid_config(self, ifname: str, vhid: int) -> VhidConfig:
        for config in self.config.vhids:
            if config.ifname == ifname and config.vhid == vhid:
                return config
        raise CarpoolError(f"no vhid {vhid} on {ifname}")

    def state_changed(self, change: StateChanged) -> None:
        log.info(
            "carp: %d@%s: %s -> %s (%s)",
            change.vhid,
            change.ifname,
            change.old.value,
            change.new.value,
            change.reason,
        )
        for state in CarpState:
            self._state_gauge.labels(change.ifname, str(change.vhid), state.value).set(
                1 if state is change.new else 0
            )
        if change.new is CarpState.MASTER and change.reason == "preempting a slower master":
            self.stats["preempt"] += 1
        self.stats["ostates"] += 1
        self.bus.publish(
            Event.now(
                DAEMON,
                change.new.value,
                system="CARP",
                subsystem=f"{change.vhid}@{change.ifname}",
                type=change.new.value,
                ifname=change.ifname,
                vhid=change.vhid,
                previous=change.old.value,
                reason=change.reason,
            )
        )

    # -- sending ---------------------------------------------------------------------------

    def send_advert(self, action: SendAdvert) -> None:
        sockets_ = self.interfaces.get(action.ifname)
        if sockets_ is None:
            return
        addresses = [a.ip for a in action.addresses]
        header = packet.build_advert(
            vhid=action.vhid,
            advbase=action.advbase,
            advskew=action.advskew,
            password=action.password,
            addresses=addresses,
            counter=secrets.randbits(64),
            demote=action.demote,
        )
        payload = header.encode()
        failed = False
        has4 = any(a.version == 4 for a in addresses)
        has6 = any(a.version == 6 for a in addresses)
        if sockets_.ipv4 is not None and (has4 or action.peer is not None):
            group = str(action.peer) if action.peer is not None else packet.CARP_GROUP_V4
            try:
                sockets.send_ipv4(sockets_.ipv4, payload, group)
                self.count("opackets")
            except OSError as error:
                failed = True
                log.debug("advert for vhid %d on %s: %s", action.vhid, action.ifname, error)
        if sockets_.ipv6 is not None and (has6 or action.peer6 is not None):
            group = str(action.peer6) if action.peer6 is not None else packet.CARP_GROUP_V6
            try:
                sockets.send_ipv6(sockets_.ipv6, payload, action.ifname, group)
                self.count("opackets6")
            except OSError as error:
                failed = True
                log.debug("advert6 for vhid %d on %s: %s", action.vhid, action.ifname, error)
        if action.leaving:
            return
        now = time.monotonic()
        if failed:
            self.feed(self.host.send_failed(action.ifname, action.vhid, now))
        else:
            self.feed(self.host.send_succeeded(action.ifname, action.vhid, now))

    async def take_addresses(self, ifname: str, vhid: int, addresses: Addresses) -> None:
        device = self.vmacs.get((ifname, vhid), ifname)
        if device != ifname:
            await self.netlink.set_up(device, True)
        for address in addresses:
            await self.netlink.add_address(device, address)
        self.announce(ifname, vhid, addresses)
        # Once more a moment later, for neighbours and switches that missed the first.
        asyncio.get_running_loop().call_later(
            0.5, self._announce_if_master, ifname, vhid, addresses
        )

    def _announce_if_master(self, ifname: str, vhid: int, addresses: Addresses) -> None:
        if self.host.state(ifname, vhid) is CarpState.MASTER:
            self.announce(ifname, vhid, addresses)

    def announce(self, ifname: str, vhid: int, addresses: Addresses) -> None:
        """Gratuitous ARP for each IPv4 address, unsolicited NA for each IPv6 address."""
        sockets_ = self.interfaces.get(ifname)
        if sockets_ is None or not sockets_.mac:
            return
        device, mac = ifname, sockets_.mac
        if (ifname, vhid) in self.vmacs:
            device, mac = self.vmacs[(ifname, vhid)], announce.mac_bytes(vmac_address(vhid))
        for address in addresses:
            try:
                if isinstance(address, ipaddress.IPv4Interface):
                    announce.send_gratuitous_arp(device, mac, address.ip)
                else:
                    announce.send_unsolicited_na(device, mac, address.ip)
            except OSError as error:
                log.warning("could not announce %s on %s: %s", address.ip, device, error)

    # -- receiving -------------------------------------------------------------------------

    def on_readable(self, ifname: str, family: int) -> None:
        sockets_ = self.interfaces.get(ifname)
        if sockets_ is None:
            return
        sock = sockets_.ipv4 if family == socket.AF_INET else sockets_.ipv6
        if sock is None:
            return
        for _ in range(64):  # bounded, so a flood cannot starve the timers
            try:
                if family == socket.AF_INET:
                    datagram = sockets.receive_ipv4(sock)
                else:
                    datagram = sockets.receive_ipv6(sock)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as error:
                log.warning("receive on %s failed: %s", ifname, error)
                return
            self.handle_datagram(sockets_, family, datagram)

    def handle_datagram(
        self, sockets_: InterfaceSockets, family: int, datagram: sockets.ReceivedDatagram
    ) -> None:
        ifname = sockets_.ifname
        self.count("ipackets" if family == socket.AF_INET else "ipackets6")
        if datagram.source in sockets_.own_addresses:
            return
        try:
            if family == socket.AF_INET:
                envelope, header = packet.decode_ipv4_datagram(datagram.data)
                ttl = envelope.ttl
            else:
                header = packet.decode_ipv6_payload(datagram.data)
                ttl = datagram.hop_limit if datagram.hop_limit is not None else 255
            config = self._find_vhid(ifname, header.vhid, datagram.source)
            packet.check_ttl(ttl, datagram.source, unicast=self._unicast(config, family))
            packet.verify_advert(header, config.password, config.ip_addresses)
        except ProtocolError as error:
            self.count(error.stat)
            if self.config.log > 1:
                log.info("carp: dropped advert on %s: %s", ifname, error)
            else:
                log.debug("carp: dropped advert on %s: %s", ifname, error)
            return
        advert = ReceivedAdvert(
            ifname=ifname,
            vhid=header.vhid,
            advbase=header.advbase,
            advskew=header.advskew,
            demote=header.demote,
            source=datagram.source,
            local=sockets_.local(datagram.source.version),
        )
        self.feed(self.host.advert_received(advert, time.monotonic()))

    def _find_vhid(
        self, ifname: str, vhid: int, source: ipaddress.IPv4Address | ipaddress.IPv6Address
    ) -> VhidConfig:
        for config in self.config.vhids:
            if config.ifname == ifname and config.vhid == vhid:
                return config
        raise packet.BadVhid(f"advert from {source} on {ifname} for vhid {vhid}, not ours")

    @staticmethod
    def _unicast(config: VhidConfig, family: int) -> bool:
        return (config.peer if family == socket.AF_INET else config.peer6) is not None

    # -- interfaces ------------------------------------------------------------------------

    async def open_interfaces(self) -> None:
        wanted: dict[str, tuple[bool, bool]] = {}
        for config in self.config.vhids:
            v4, v6 = wanted.get(config.ifname, (False, False))
            wanted[config.ifname] = (
                v4 or bool(config.addresses4) or config.peer is not None,
                v6 or bool(config.addresses6) or config.peer6 is not None,
            )
        loop = asyncio.get_running_loop()
        for ifname in list(self.interfaces):
            if ifname not in wanted:
                self.close_interface(ifname)
        for ifname, (v4, v6) in wanted.items():
            if ifname in self.interfaces:
                continue
            link = await self.netlink.link(ifname)
            entry = InterfaceSockets(ifname=ifname, mac=announce.mac_bytes(link.mac))
            try:
                if v4:
                    entry.ipv4 = sockets.open_ipv4(ifname, dscp=self.config.dscp)
                    loop.add_reader(entry.ipv4.fileno(), self.on_readable, ifname, socket.AF_INET)
                if v6:
                    entry.ipv6 = sockets.open_ipv6(ifname, dscp=self.config.dscp)
                    loop.add_reader(entry.ipv6.fileno(), self.on_readable, ifname, socket.AF_INET6)
            except OSError as error:
                raise CarpoolError(f"cannot open CARP sockets on {ifname}: {error}") from None
            self.interfaces[ifname] = entry
            await self.refresh_own_addresses(ifname)
            self.link_up[ifname] = link.up
            self.feed(self.host.link_changed(ifname, link.up, time.monotonic()))

    async def refresh_own_addresses(self, ifname: str) -> None:
        entry = self.interfaces[ifname]
        virtual = {a.ip for c in self.config.vhids if c.ifname == ifname for a in c.addresses}
        present = [a.ip for a in await self.netlink.addresses(ifname)]
        entry.own_addresses = [a for a in present if a not in virtual]

    def close_interface(self, ifname: str) -> None:
        entry = self.interfaces.pop(ifname)
        loop = asyncio.get_running_loop()
        for sock in (entry.ipv4, entry.ipv6):
            if sock is not None:
                loop.remove_reader(sock.fileno())
                sock.close()

    async def prepare_vmacs(self) -> None:
        """One macvlan per ``vmac`` vhid, down until the vhid is MASTER.

        Neither the parent nor the macvlan answers ARP for addresses it does not
        carry (``arp_ignore=1``) nor announces them (``arp_announce=2``), so the VIP
        is only ever seen at the virtual MAC.
        """
        wanted = {c.key for c in self.config.vhids if c.vmac}
        for key in [k for k in self.vmacs if k not in wanted]:
            await self.netlink.delete(self.vmacs.pop(key))
        for config in self.config.vhids:
            if not config.vmac or config.key in self.vmacs:
                continue
            name = vmac_ifname(config.ifname, config.vhid, await self.netlink.index(config.ifname))
            if await self.netlink.delete(name):
                log.info("removed stale %s", name)
            await self.netlink.create_macvlan(config.ifname, name, vmac_address(config.vhid))
            for device in (config.ifname, name):
                set_interface_sysctl(device, "arp_ignore", 1)
                # ARP requests the host sends must not carry the VIP as their source,
                # or neighbours would learn the VIP at the parent's real MAC.
                set_interface_sysctl(device, "arp_announce", 2)
            self.vmacs[config.key] = name

    async def remove_vmacs(self) -> None:
        for name in self.vmacs.values():
            with contextlib.suppress(CarpoolError):
                await self.netlink.delete(name)
        self.vmacs.clear()

    async def remove_stale_addresses(self, configs: tuple[VhidConfig, ...]) -> None:
        """A previous carpd killed without cleanup may have left its VIPs: remove them."""
        for config in configs:
            for address in config.addresses:
                try:
                    if await self.netlink.remove_address(config.ifname, address):
                        log.info("removed stale address %s from %s", address, config.ifname)
                except CarpoolError as error:
                    log.warning("%s", error)

    async def watch_links(self) -> None:
        async for state in watch_links():
            self.on_link(state)

    def on_link(self, state: LinkState) -> None:
        if state.ifname not in self.interfaces:
            return
        if self.link_up.get(state.ifname) == state.up:
            return
        self.link_up[state.ifname] = state.up
        log.info("link %s is %s", state.ifname, "up" if state.up else "down")
        self.bus.publish(
            Event.now(
                DAEMON,
                "LINK_UP" if state.up else "LINK_DOWN",
                system="IFNET",
                subsystem=state.ifname,
                type="LINK_UP" if state.up else "LINK_DOWN",
                ifname=state.ifname,
            )
        )
        self.feed(self.host.link_changed(state.ifname, state.up, time.monotonic()))

    # -- control ---------------------------------------------------------------------------

    def handlers(self) -> dict[str, Callable[[dict[str, Any]], Any]]:
        return {
            "status": self.cmd_status,
            "set_state": self.cmd_set_state,
            "set_advskew": self.cmd_set_advskew,
            "set_advbase": self.cmd_set_advbase,
            "demote": self.cmd_demote,
            "sysctl": self.cmd_sysctl,
            "stats": self.cmd_stats,
            "reload": self.cmd_reload,
        }

    async def cmd_status(self, args: dict[str, Any]) -> dict[str, Any]:
        result = self.status()
        for ifname, entry in result["interfaces"].items():
            try:
                link = await self.netlink.link(ifname)
                entry["mac"] = link.mac
                entry["kernel_addresses"] = [str(a) for a in await self.netlink.addresses(ifname)]
            except CarpoolError:
                entry["kernel_addresses"] = []
        return result

    def status(self) -> dict[str, Any]:
        interfaces: dict[str, Any] = {}
        for status in self.host.status():
            entry = interfaces.setdefault(
                status.ifname, {"link_up": self.link_up.get(status.ifname, False), "vhids": []}
            )
            config = self.vhid_config(status.ifname, status.vhid)
            entry["vhids"].append(
                {
                    "vhid": status.vhid,
                    "state": status.state.value,
                    "advbase": status.advbase,
                    "advskew": status.advskew,
                    "advertised_skew": status.advertised_skew,
                    "addresses": [str(a) for a in config.addresses],
                    "peer": str(config.peer) if config.peer else None,
                    "peer6": str(config.peer6) if config.peer6 else None,
                    "vmac": vmac_address(config.vhid) if config.vmac else None,
                    "device": self.vmacs.get(config.key, config.ifname),
                }
            )
        return {
            "interfaces": interfaces,
            "preempt": self.host.preempt,
            "demotion": self.host.demotion,
            "allow": self.config.allow,
            "pid": os.getpid(),
        }

    def _vhid_args(self, args: dict[str, Any]) -> tuple[str, int]:
        ifname = args.get("ifname")
        vhid = args.get("vhid")
        if not isinstance(ifname, str) or not isinstance(vhid, int):
            raise CommandError("give an interface and a vhid, e.g. `carpctl em0 vhid 1 ...`")
        if not any(c.ifname == ifname and c.vhid == vhid for c in self.config.vhids):
            raise CommandError(f"{ifname} has no vhid {vhid}")
        return ifname, vhid

    async def cmd_set_state(self, args: dict[str, Any]) -> dict[str, Any]:
        ifname, vhid = self._vhid_args(args)
        name = str(args.get("state", "")).upper()
        if name not in ("MASTER", "BACKUP"):
            raise CommandError("state must be master or backup")
        self.feed(self.host.force_state(ifname, vhid, CarpState(name), time.monotonic()))
        return await self.cmd_status({})

    async def cmd_set_advskew(self, args: dict[str, Any]) -> dict[str, Any]:
        ifname, vhid = self._vhid_args(args)
        value = args.get("advskew")
        if not isinstance(value, int) or not 0 <= value <= 254:
            raise CommandError("advskew must be 0..254")
        self.feed(self.host.set_advskew(ifname, vhid, value, time.monotonic()))
        return await self.cmd_status({})

    async def cmd_set_advbase(self, args: dict[str, Any]) -> dict[str, Any]:
        ifname, vhid = self._vhid_args(args)
        value = args.get("advbase")
        if not isinstance(value, int) or not 0 <= value <= 255:
            raise CommandError("advbase must be 0..255")
        self.feed(self.host.set_advbase(ifname, vhid, value, time.monotonic()))
        return await self.cmd_status({})

    def cmd_demote(self, args: dict[str, Any]) -> dict[str, Any]:
        delta = args.get("delta")
        if not isinstance(delta, int):
            raise CommandError("demotion must be a whole number")
        self.feed(self.host.adjust_demotion(delta, "carpctl", time.monotonic()))
        return {"demotion": self.host.demotion}

    def cmd_sysctl(self, args: dict[str, Any]) -> dict[str, Any]:
        name = args.get("name")
        value = args.get("value")
        if name is None:
            return {
                "net.inet.carp.allow": int(self.config.allow),
                "net.inet.carp.preempt": int(self.host.preempt),
                "net.inet.carp.log": self.config.log,
                "net.inet.carp.demotion": self.host.demotion,
                "net.inet.carp.dscp": self.config.dscp,
            }
        if not isinstance(value, int):
            raise CommandError(f"{name} takes a whole number")
        if name == "net.inet.carp.preempt":
            self.host.set_preempt(bool(value))
        elif name == "net.inet.carp.demotion":
            self.feed(self.host.adjust_demotion(value, "sysctl", time.monotonic()))
        else:
            raise CommandError(
                f"{name} cannot be set at run time; known: net.inet.carp.preempt, "
                "net.inet.carp.demotion (others: edit the configuration and reload)"
            )
        return {name: int(self.host.preempt) if name.endswith("preempt") else self.host.demotion}

    def cmd_stats(self, args: dict[str, Any]) -> dict[str, int]:
        result = {name: self.stats.get(name, 0) for name in STAT_NAMES}
        if args.get("reset"):
            self.stats.clear()
        return result

    async def cmd_reload(self, args: dict[str, Any]) -> dict[str, Any]:
        await self.reload()
        return await self.cmd_status({})

    async def reload(self) -> None:
        try:
            config = load_config(self.config_path)
        except CarpoolError as error:
            log.error("reload refused, keeping the running configuration: %s", error)
            raise
        self.config = config
        self.feed(self.host.reconfigure(config, time.monotonic()))
        await self._drain()
        await self.prepare_vmacs()
        await self.open_interfaces()
        log.info("configuration reloaded from %s", self.config_path)

    # -- lifecycle -------------------------------------------------------------------------

    async def run(self) -> None:
        async with DaemonShell(
            DAEMON, self.run_dir, self.handlers(), self.bus, self.registry, self.metrics_address,
            on_hup=self._on_hup,
        ) as shell:  # fmt: skip
            self.stopping = shell.stopping
            self.tasks.append(asyncio.ensure_future(self.perform_actions()))
            try:
                await self.remove_stale_addresses(self.config.vhids)
                await self.prepare_vmacs()
                self.tasks.append(asyncio.ensure_future(self.watch_links()))
                await self.open_interfaces()
                log.info(
                    "carpd started: %d vhids on %s",
                    len(self.config.vhids), ", ".join(self.interfaces),
                )  # fmt: skip
                await self.stopping.wait()
                log.info("carpd stopping: leaving every vhid")
                self.feed(self.host.shutdown(time.monotonic()))
                await asyncio.wait_for(self._drain(), timeout=5.0)
                await self.remove_vmacs()
            finally:
                if self.timer is not None:
                    self.timer.cancel()
                for task in self.tasks:
                    task.cancel()
                for ifname in list(self.interfaces):
                    self.close_interface(ifname)
                await self.netlink.close()

    async def _drain(self) -> None:
        while not self.actions.empty():
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.01)

    def _on_hup(self) -> None:
        self.tasks.append(asyncio.ensure_future(self._reload_quietly()))

    async def _reload_quietly(self) -> None:
        with contextlib.suppress(CarpoolError):
            await self.reload()


def parse_arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="carpd", description="CARP: virtual IP addresses shared by hosts on a LAN."
    )
    parser.add_argument("-f", "--config", default=DEFAULT_CONFIG, help="rc.conf-style file")
    parser.add_argument("-n", dest="check", action="store_true", help="check the file and exit")
    parser.add_argument("-d", dest="debug", action="store_true", help="log debugging details")
    parser.add_argument("-v", dest="verbose", action="store_true", help="log dropped packets")
    parser.add_argument("--run-dir", type=Path, default=default_run_dir())
    parser.add_argument("--metrics", metavar="ADDR", help="serve Prometheus metrics on ADDR")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    arguments = parse_arguments(argv)
    setup_logging(logging.DEBUG if arguments.debug else logging.INFO)
    logging.getLogger("pyroute2").setLevel(logging.WARNING)

    def body() -> int:
        if arguments.check:
            config = load_config(arguments.config)
            print(f"{arguments.config}: configuration OK ({len(config.vhids)} vhids)")
            return 0
        daemon = CarpDaemon(arguments.config, arguments.run_dir, arguments.metrics)
        # The stdlib loop, not uvloop: uvloop cannot carry pyroute2's netlink endpoints.
        asyncio.run(daemon.run())
        return 0

    return run_command("carpd", body)


if __name__ == "__main__":
    sys.exit(main())
