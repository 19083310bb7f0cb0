"""The virtual MAC of a vhid (00:00:5e:00:01:<vhid>, as FreeBSD uses) and its macvlan's name."""

from __future__ import annotations

IFNAMSIZ = 15


def vmac_address(vhid: int) -> str:
    """FreeBSD's virtual MAC for ``vhid``: the IANA VRRP/CARP block, 00:00:5e:00:01:<vhid>."""
    if not 1 <= vhid <= 255:
        raise ValueError(f"vhid must be 1..255, not {vhid}")
    return f"00:00:5e:00:01:{vhid:02x}"


def vmac_ifname(ifname: str, vhid: int, ifindex: int) -> str:
    """The macvlan carrying the vhid's addresses: ``vh1.em0``, or ``vh1.i<index>`` if too long."""
    name = f"vh{vhid}.{ifname}"
    if len(name) <= IFNAMSIZ:
        return name
    return f"vh{vhid}.i{ifindex}"
