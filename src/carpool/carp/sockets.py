"""CARP's raw sockets on one interface: protocol 112 over IPv4 and IPv6, multicast or unicast.

The kernel builds the IP header on send (TTL / hop limit 255, FreeBSD's DSCP); on
receive the IPv4 socket returns the whole datagram (header included) and the IPv6
socket returns the CARP header with the hop limit as ancillary data.
"""

from __future__ import annotations

import ipaddress
import socket
import struct
from dataclasses import dataclass

from carpool.carp.packet import CARP_GROUP_V4, CARP_GROUP_V6, CARP_PROTO

IP_MULTICAST_ALL = 49
IPV6_MULTICAST_ALL = 29
CARP_TTL = 255


@dataclass(frozen=True)
class ReceivedDatagram:
    data: bytes
    source: ipaddress.IPv4Address | ipaddress.IPv6Address
    hop_limit: int | None  # IPv6 only; IPv4 carries its TTL inside ``data``


def _bind_to_device(sock: socket.socket, ifname: str) -> None:
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, ifname.encode())


def open_ipv4(ifname: str, *, dscp: int = 56, join: bool = True) -> socket.socket:
    """A protocol-112 socket on ``ifname`` that has joined 224.0.0.18."""
    index = socket.if_nametoindex(ifname)
    sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, CARP_PROTO)
    try:
        _bind_to_device(sock, ifname)
        mreqn = struct.pack("4s4si", socket.inet_aton(CARP_GROUP_V4), b"\0" * 4, index)
        if join:
            sock.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP, mreqn)
        sock.setsockopt(socket.IPPROTO_IP, IP_MULTICAST_ALL, 0)
        sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, mreqn)
        sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, CARP_TTL)
        sock.setsockopt(socket.IPPROTO_IP, socket.IP_TTL, CARP_TTL)
        sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_LOOP, 0)
        sock.setsockopt(socket.IPPROTO_IP, socket.IP_TOS, (dscp & 0x3F) << 2)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def open_ipv6(ifname: str, *, dscp: int = 56, join: bool = True) -> socket.socket:
    """A protocol-112 socket on ``ifname`` that has joined ff02::12."""
    index = socket.if_nametoindex(ifname)
    sock = socket.socket(socket.AF_INET6, socket.SOCK_RAW, CARP_PROTO)
    try:
        _bind_to_device(sock, ifname)
        if join:
            mreq = socket.inet_pton(socket.AF_INET6, CARP_GROUP_V6) + struct.pack("@I", index)
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_JOIN_GROUP, mreq)
        sock.setsockopt(socket.IPPROTO_IPV6, IPV6_MULTICAST_ALL, 0)
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_IF, index)
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_HOPS, CARP_TTL)
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_UNICAST_HOPS, CARP_TTL)
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_LOOP, 0)
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_TCLASS, (dscp & 0x3F) << 2)
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_RECVHOPLIMIT, 1)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def receive_ipv4(sock: socket.socket) -> ReceivedDatagram:
    data, (source, _port) = sock.recvfrom(65535)
    return ReceivedDatagram(data=data, source=ipaddress.IPv4Address(source), hop_limit=None)


def receive_ipv6(sock: socket.socket) -> ReceivedDatagram:
    data, ancillary, _flags, address = sock.recvmsg(65535, socket.CMSG_SPACE(4))
    hop_limit = None
    for level, kind, value in ancillary:
        if level == socket.IPPROTO_IPV6 and kind == socket.IPV6_HOPLIMIT and len(value) >= 4:
            hop_limit = struct.unpack("@i", value[:4])[0]
    source = ipaddress.IPv6Address(address[0].split("%")[0])
    return ReceivedDatagram(data=data, source=source, hop_limit=hop_limit)


def send_ipv4(sock: socket.socket, payload: bytes, destination: str = CARP_GROUP_V4) -> None:
    sock.sendto(payload, (destination, 0))


def send_ipv6(
    sock: socket.socket, payload: bytes, ifname: str, destination: str = CARP_GROUP_V6
) -> None:
    sock.sendto(payload, (destination, 0, 0, socket.if_nametoindex(ifname)))
