"""The PROXY protocol header a relay sends first on a backend connection
(``forward to ... proxy-protocol v1|v2``), telling the backend who the client was.  Pure.

v1 is the text line ``PROXY TCP4 <client> <server> <client port> <server port>\\r\\n``;
v2 is the binary form (a 12-byte signature, version 2 ``PROXY`` command, the
address family and the addresses).  Both as the HAProxy specification gives them.
"""

from __future__ import annotations

import ipaddress
import struct

__all__ = ["V2_SIGNATURE", "proxy_header"]

V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"


def proxy_header(version: str, client: tuple[str, int], server: tuple[str, int]) -> bytes:
    """The header for a connection from ``client`` to the relay's ``server`` address."""
    source = ipaddress.ip_address(client[0].split("%", 1)[0])
    destination = ipaddress.ip_address(server[0].split("%", 1)[0])
    if source.version != destination.version:
        if isinstance(source, ipaddress.IPv6Address) and source.ipv4_mapped is not None:
            source = source.ipv4_mapped
        if isinstance(destination, ipaddress.IPv6Address) and destination.ipv4_mapped is not None:
            destination = destination.ipv4_mapped
    if version == "v1":
        if source.version != destination.version:
            return b"PROXY UNKNOWN\r\n"
        text_family = "TCP4" if source.version == 4 else "TCP6"
        return f"PROXY {text_family} {source} {destination} {client[1]} {server[1]}\r\n".encode()
    if version != "v2":
        raise ValueError(f"PROXY protocol version {version!r}: use v1 or v2")
    if source.version != destination.version:
        return V2_SIGNATURE + b"\x21\x00\x00\x00"  # PROXY, AF_UNSPEC: no addresses
    family = 0x11 if source.version == 4 else 0x21  # TCP over IPv4 / IPv6
    body = source.packed + destination.packed + struct.pack("!HH", client[1], server[1])
    return V2_SIGNATURE + bytes([0x21, family]) + struct.pack("!H", len(body)) + body
