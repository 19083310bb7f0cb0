"""Addresses and link state through netlink (pyroute2), for the daemons' asyncio loops."""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from pyroute2 import AsyncIPRoute
from pyroute2.netlink.exceptions import NetlinkError
from pyroute2.netlink.rtnl import RTMGRP_LINK

from carpool.errors import CarpoolError

log = logging.getLogger("carpool.net")

IFA_F_NODAD = 0x02
IFF_UP = 0x1
IFF_LOWER_UP = 0x10000

InterfaceAddress = ipaddress.IPv4Interface | ipaddress.IPv6Interface


@dataclass(frozen=True)
class LinkState:
    ifname: str
    index: int
    up: bool  # administratively up and with carrier (FreeBSD's LINK_STATE_UP)
    mac: str


def _link_state(message: Any) -> LinkState:
    flags = int(message["flags"])
    return LinkState(
        ifname=str(message.get("IFLA_IFNAME")),
        index=int(message["index"]),
        up=bool(flags & IFF_UP) and bool(flags & IFF_LOWER_UP),
        mac=str(message.get("IFLA_ADDRESS") or ""),
    )


class Netlink:
    """One netlink socket for requests: links, addresses."""

    def __init__(self) -> None:
        self._route = AsyncIPRoute()

    async def close(self) -> None:
        self._route.close()

    async def index(self, ifname: str) -> int:
        indexes = await self._route.link_lookup(ifname=ifname)
        if not indexes:
            raise CarpoolError(f"no interface named {ifname}: check the configuration")
        return int(indexes[0])

    async def link(self, ifname: str) -> LinkState:
        index = await self.index(ifname)
        async for message in await self._route.get_links(index):
            return _link_state(message)
        raise CarpoolError(f"interface {ifname} disappeared")

    async def links(self) -> list[LinkState]:
        """Every link of the namespace, with its current state."""
        return [_link_state(message) async for message in await self._route.get_links()]

    async def addresses(self, ifname: str) -> list[InterfaceAddress]:
        index = await self.index(ifname)
        found: list[InterfaceAddress] = []
        async for message in await self._route.get_addr(index=index):
            address = message.get("IFA_ADDRESS")
            if address is None:
                continue
            found.append(ipaddress.ip_interface(f"{address}/{message['prefixlen']}"))
        return found

    async def add_address(self, ifname: str, address: InterfaceAddress) -> bool:
        """Add ``address``; False if it was already there."""
        index = await self.index(ifname)
        arguments: dict[str, Any] = {
            "index": index,
            "address": str(address.ip),
            "prefixlen": address.network.prefixlen,
        }
        if isinstance(address, ipaddress.IPv6Interface):
            arguments["flags"] = IFA_F_NODAD
        try:
            await self._route.addr("add", **arguments)
        except NetlinkError as error:
            if error.code == errno.EEXIST:
                return False
            raise CarpoolError(f"cannot add {address} to {ifname}: {error}") from None
        return True

    async def remove_address(self, ifname: str, address: InterfaceAddress) -> bool:
        """Remove ``address`` (any prefix length); False if it was not there."""
        removed = False
        for present in await self.addresses(ifname):
            if present.ip != address.ip:
                continue
            index = await self.index(ifname)
            try:
                await self._route.addr(
                    "del", index=index, address=str(present.ip), prefixlen=present.network.prefixlen
                )
                removed = True
            except NetlinkError as error:
                if error.code not in (errno.EADDRNOTAVAIL, errno.ENODEV):
                    raise CarpoolError(f"cannot remove {address} from {ifname}: {error}") from None
        return removed


    async def create_macvlan(self, parent: str, name: str, mac: str) -> None:
        index = await self.index(parent)
        try:
            await self._route.link(
                "add", ifname=name, kind="macvlan", link=index, macvlan_mode="bridge", address=mac
            )
        except NetlinkError as error:
            raise CarpoolError(f"cannot create {name} on {parent}: {error}") from None

    async def exists(self, name: str) -> bool:
        return bool(await self._route.link_lookup(ifname=name))

    async def set_up(self, name: str, up: bool) -> None:
        index = await self.index(name)
        await self._route.link("set", index=index, state="up" if up else "down")

    async def delete(self, name: str) -> bool:
        indexes = await self._route.link_lookup(ifname=name)
        if not indexes:
            return False
        try:
            await self._route.link("del", index=indexes[0])
        except NetlinkError as error:
            if error.code != errno.ENODEV:
                raise CarpoolError(f"cannot delete {name}: {error}") from None
        return True

async def watch_links() -> AsyncIterator[LinkState]:
    """Every link change the kernel reports, as it happens."""
    monitor = AsyncIPRoute()
    try:
        await monitor.bind(groups=RTMGRP_LINK)
        while True:
            async for message in monitor.get():
                if message.get("event") in ("RTM_NEWLINK", "RTM_DELLINK"):
                    state = _link_state(message)
                    if message.get("event") == "RTM_DELLINK":
                        state = LinkState(state.ifname, state.index, False, state.mac)
                    yield state
            await asyncio.sleep(0)
    finally:
        monitor.close()


def set_interface_sysctl(ifname: str, name: str, value: int, family: str = "ipv4") -> None:
    """Write ``net.<family>.conf.<ifname>.<name>`` (of the caller's network namespace)."""
    path = f"/proc/sys/net/{family}/conf/{ifname}/{name}"
    try:
        with open(path, "w", encoding="ascii") as handle:
            handle.write(f"{value}\n")
    except OSError as error:
        raise CarpoolError(f"cannot set {path}: {error.strerror or error}") from None

