"""Gratuitous ARP and unsolicited neighbour advertisements: frames (pure) and their senders.

A new master announces each IPv4 address with an ARP request whose sender and target
are the address (what FreeBSD's ``carp_send_arp`` and ``arping -U`` send), and each IPv6
address with an unsolicited neighbour advertisement to ff02::1 carrying the Override
flag, so that neighbours and switches move to the new owner at once.
"""

from __future__ import annotations

import ipaddress
import socket
import struct

ETH_P_ARP = 0x0806
BROADCAST_MAC = b"\xff" * 6
ALL_NODES = "ff02::1"
ICMPV6_NEIGHBOR_ADVERT = 136
NA_FLAG_ROUTER = 0x80
NA_FLAG_OVERRIDE = 0x20
ND_OPTION_TARGET_LINK_ADDRESS = 2


def mac_bytes(mac: str) -> bytes:
    """``"02:00:5e:00:01:01"`` as 6 bytes; ValueError for anything else."""
    parts = mac.split(":")
    if len(parts) != 6:
        raise ValueError(f"not a MAC address: {mac!r}")
    return bytes(int(part, 16) for part in parts)


def gratuitous_arp_frame(mac: bytes, address: ipaddress.IPv4Address) -> bytes:
    """An Ethernet broadcast ARP request announcing that ``address`` is at ``mac``."""
    if len(mac) != 6:
        raise ValueError("a MAC address has 6 bytes")
    ethernet = BROADCAST_MAC + mac + struct.pack("!H", ETH_P_ARP)
    arp = struct.pack("!HHBBH", 1, 0x0800, 6, 4, 1)
    arp += mac + address.packed + b"\x00" * 6 + address.packed
    return ethernet + arp


def neighbor_advert_payload(
    mac: bytes, address: ipaddress.IPv6Address, *, router: bool = False
) -> bytes:
    """ICMPv6 neighbour advertisement for ``address`` (checksum left 0: the kernel fills it)."""
    if len(mac) != 6:
        raise ValueError("a MAC address has 6 bytes")
    flags = NA_FLAG_OVERRIDE | (NA_FLAG_ROUTER if router else 0)
    header = struct.pack("!BBHB3x", ICMPV6_NEIGHBOR_ADVERT, 0, 0, flags)
    option = struct.pack("!BB", ND_OPTION_TARGET_LINK_ADDRESS, 1) + mac
    return header + address.packed + option


def send_gratuitous_arp(ifname: str, mac: bytes, address: ipaddress.IPv4Address) -> None:
    with socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ARP)) as sock:
        sock.bind((ifname, ETH_P_ARP))
        sock.send(gratuitous_arp_frame(mac, address))


def send_unsolicited_na(
    ifname: str, mac: bytes, address: ipaddress.IPv6Address, *, router: bool = False
) -> None:
    with socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_ICMPV6) as sock:
        index = socket.if_nametoindex(ifname)
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_HOPS, 255)
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_IF, index)
        sock.sendto(neighbor_advert_payload(mac, address, router=router), (ALL_NODES, 0, 0, index))
