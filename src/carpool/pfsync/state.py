"""A conntrack entry as one flat byte string ("state"), the currency of the hot path. Pure.

pfsyncd never builds Python objects for the entries it moves: the event or dump
message from the kernel is turned into a state with one ``struct`` unpack and
one pack, the state is what the machine keeps and what a DATA record carries,
and the receiver turns it into the netlink request for its own kernel with a
few packs.  :class:`~carpool.pfsync.ctnetlink.ConntrackEntry` is built only on
the rare paths (other shapes than IPv4 with ports, logging, tests).

Layout (big endian; ``A`` = 4 for IPv4, 16 for IPv6)::

    offset      size
    0           1   family (4|6)
    1           1   protocol
    2           2   zone
    4           2A+8 original tuple: src, dst, u16 src port, u16 dst port,
                     u16 icmp id, u8 icmp type, u8 icmp code
    12+2A       2A+8 reply tuple, same shape
    K=20+4A     1   flags: 0x01 tcp info, 0x02 mark, 0x04 timeout
    K+1         1   tcp state
    K+2         2   tcp window scale original, reply
    K+4         2   tcp flags original, reply
    K+6         2   reserved, 0
    K+8         4   status
    K+12        4   mark
    K+16        4   timeout (the last four bytes)

The first ``12 + 2A`` bytes (family, protocol, zone, original tuple) are the
entry's key.  IPv4 states are 56 bytes, IPv6 states 104.
"""

from __future__ import annotations

import ipaddress
import socket
import struct
from collections.abc import Iterable

from carpool.pfsync import ctnetlink
from carpool.pfsync.ctnetlink import (
    BE_LIBERAL,
    IPS_CONFIRMED,
    NLA_F_NESTED,
    PORT_PROTOCOLS,
    SETTABLE_STATUS,
    ConntrackEntry,
    ConntrackTuple,
    CtnetlinkError,
    TcpInfo,
    TcpState,
    address_from_bytes,
)

__all__ = [
    "FLAG_MARK",
    "FLAG_TCP",
    "FLAG_TIMEOUT",
    "V4_SIZE",
    "V6_SIZE",
    "content",
    "from_kernel",
    "has_nat",
    "is_liberal",
    "key_of",
    "merge",
    "pack",
    "state_size",
    "timeout_of",
    "unpack",
]

FLAG_TCP = 0x01
FLAG_MARK = 0x02
FLAG_TIMEOUT = 0x04
FLAGS = FLAG_TCP | FLAG_MARK | FLAG_TIMEOUT

_V4 = struct.Struct("!BBH4s4s2s2sHBB4s4s2s2sHBBBBBBBBHIII")
_V6 = struct.Struct("!BBH16s16s2s2sHBB16s16s2s2sHBBBBBBBBHIII")
V4_SIZE = _V4.size
V6_SIZE = _V6.size
V4_KEY = 20
V6_KEY = 44
_TAIL = 20  # flags .. timeout
_TCP_STATES = tuple(TcpState)
_SETTABLE_BYTES = tuple(bytes((bits & SETTABLE_STATUS,)) for bits in range(256))


def state_size(family: int) -> int:
    """Bytes of a state of ``family`` (4 or 6); 0 for anything else."""
    return V4_SIZE if family == 4 else V6_SIZE if family == 6 else 0


def key_of(state: bytes) -> bytes:
    return state[:V4_KEY] if state[0] == 4 else state[:V6_KEY]


def timeout_of(state: bytes) -> int:
    """The timeout, 0 when the state carries none."""
    return int.from_bytes(state[-4:], "big")


def content(state: bytes) -> bytes:
    """What the peer would need to hear of: reply tuple, tcp state, mark and the
    status bits it can set.  The other status bits are the kernel's own (its NAT
    bookkeeping, for one, differs between an entry and its injected copy)."""
    key = V4_KEY if state[0] == 4 else V6_KEY
    return state[key:-_TAIL] + state[-19:-18] + _SETTABLE_BYTES[state[-9]] + state[-8:-4]


def is_liberal(state: bytes) -> bool:
    """True unless a TCP state still checks sequence windows in some direction."""
    if state[1] != 6 or not state[-_TAIL] & FLAG_TCP:
        return True
    return bool(state[-16] & state[-15] & BE_LIBERAL)


def has_tcp(state: bytes) -> bool:
    return bool(state[-_TAIL] & FLAG_TCP)


def has_nat(state: bytes) -> bool:
    """The reply tuple is not the inverted original one (source or destination NAT)."""
    if state[0] == 4:
        # orig src 4:8 dst 8:12 sport 12:14 dport 14:16; reply src 20:24 dst 24:28 ...
        return (
            state[24:28] != state[4:8]
            or state[20:24] != state[8:12]
            or (
                state[1] in PORT_PROTOCOLS
                and (state[30:32] != state[12:14] or state[28:30] != state[14:16])
            )
        )
    entry = unpack(state)
    return entry.source_nat or entry.destination_nat


def merge(new: bytes, old: bytes) -> bytes:
    """``new`` (a partial update event) with what it lacks taken from ``old``."""
    flags = new[-_TAIL]
    if flags & FLAGS == FLAGS and new[-12:-8] != b"\0\0\0\0":
        return new
    old_flags = old[-_TAIL]
    head = new[:-_TAIL]
    tcp = new[-19:-14]
    status = new[-12:-8]
    mark = new[-8:-4]
    timeout = new[-4:]
    if not flags & FLAG_TCP and old_flags & FLAG_TCP:
        tcp = old[-19:-14]
        flags |= FLAG_TCP
    if status == b"\0\0\0\0":
        status = old[-12:-8]
    if not flags & FLAG_MARK and old_flags & FLAG_MARK:
        mark = old[-8:-4]
        flags |= FLAG_MARK
    if not flags & FLAG_TIMEOUT and old_flags & FLAG_TIMEOUT:
        timeout = old[-4:]
        flags |= FLAG_TIMEOUT
    return head + bytes((flags,)) + tcp + b"\0\0" + status + mark + timeout


# --------------------------------------------------------------------------- entries


def pack(entry: ConntrackEntry) -> bytes:
    """The state of ``entry`` (all four addresses must be of one family)."""
    original, reply = entry.original, entry.reply
    version = original.src.version
    if any(a.version != version for a in (original.dst, reply.src, reply.dst)):
        raise ValueError("an entry's addresses must all be of one family")
    flags = 0
    tcp = entry.tcp
    if tcp is not None:
        flags |= FLAG_TCP
    if entry.mark is not None:
        flags |= FLAG_MARK
    if entry.timeout is not None:
        flags |= FLAG_TIMEOUT
    layout = _V4 if version == 4 else _V6
    return layout.pack(
        version,
        original.proto,
        entry.zone,
        original.src.packed,
        original.dst.packed,
        original.src_port.to_bytes(2, "big"),
        original.dst_port.to_bytes(2, "big"),
        original.icmp_id,
        original.icmp_type,
        original.icmp_code,
        reply.src.packed,
        reply.dst.packed,
        reply.src_port.to_bytes(2, "big"),
        reply.dst_port.to_bytes(2, "big"),
        reply.icmp_id,
        reply.icmp_type,
        reply.icmp_code,
        flags,
        int(tcp.state) if tcp else 0,
        tcp.wscale_original if tcp else 0,
        tcp.wscale_reply if tcp else 0,
        tcp.flags_original if tcp else 0,
        tcp.flags_reply if tcp else 0,
        0,
        entry.status & 0xFFFFFFFF,
        (entry.mark or 0) & 0xFFFFFFFF,
        (entry.timeout or 0) & 0xFFFFFFFF,
    )


def check(state: bytes) -> str | None:
    """Why ``state`` is not a well-formed state (``None``: it is)."""
    if (
        len(state) == V4_SIZE
        and state[0] == 4
        and state[1] == 6
        and state[-_TAIL] == FLAGS
        and state[-19] < len(_TCP_STATES)
        and state[-14:-12] == b"\0\0"
    ):
        return None  # the usual state: TCP with everything
    family = state[0] if state else 0
    if family not in (4, 6):
        return f"state of address family {family}"
    if len(state) != state_size(family):
        return f"state of {len(state)} bytes"
    flags = state[-_TAIL]
    if flags & ~FLAGS or state[-14:-12] != b"\0\0":
        return "state with reserved bits set"
    if flags & FLAG_TCP:
        if state[1] != 6:
            return "tcp information on a state that is not TCP"
        if state[-19] >= len(_TCP_STATES):
            return f"unknown tcp state {state[-19]}"
    elif state[-19:-14] != b"\0\0\0\0\0":
        return "tcp fields set without the tcp flag"
    if not flags & FLAG_MARK and state[-8:-4] != b"\0\0\0\0":
        return "mark set without the mark flag"
    if not flags & FLAG_TIMEOUT and state[-4:] != b"\0\0\0\0":
        return "timeout set without the timeout flag"
    return None


def unpack(state: bytes) -> ConntrackEntry:
    """The entry of a well-formed state (see :func:`check`)."""
    layout = _V4 if state[0] == 4 else _V6
    (
        _, proto, zone, o_src, o_dst, o_sport, o_dport, o_id, o_type, o_code,
        r_src, r_dst, r_sport, r_dport, r_id, r_type, r_code,
        flags, tcp_state, wso, wsr, flo, flr, _, status, mark, timeout,
    ) = layout.unpack(state)  # fmt: skip
    original = ConntrackTuple(
        address_from_bytes(o_src), address_from_bytes(o_dst), proto,
        int.from_bytes(o_sport, "big"), int.from_bytes(o_dport, "big"), o_id, o_type, o_code,
    )  # fmt: skip
    reply = ConntrackTuple(
        address_from_bytes(r_src), address_from_bytes(r_dst), proto,
        int.from_bytes(r_sport, "big"), int.from_bytes(r_dport, "big"), r_id, r_type, r_code,
    )  # fmt: skip
    tcp = TcpInfo(_TCP_STATES[tcp_state], wso, wsr, flo, flr) if flags & FLAG_TCP else None
    return ConntrackEntry(
        original,
        reply,
        status,
        timeout if flags & FLAG_TIMEOUT else None,
        mark if flags & FLAG_MARK else None,
        zone,
        tcp,
    )


# --------------------------------------------------------------------------- from the kernel

_NLA = struct.Struct("=HH")
_U32 = struct.Struct("!I")
_U16 = struct.Struct("!H")
_FAST_TCP = ctnetlink._FAST_TCP
_FAST_TCP_HEADERS = ctnetlink._FAST_TCP_HEADERS


_K_ORIG = struct.pack("=HHHHHH", 52, 1 | NLA_F_NESTED, 20, 1 | NLA_F_NESTED, 8, 1)
_K_REPLY = struct.pack("=HHHHHH", 52, 2 | NLA_F_NESTED, 20, 1 | NLA_F_NESTED, 8, 1)
_K_DST = struct.pack("=HH", 8, 2)
_K_PROTO = struct.pack("=HHHH", 28, 2 | NLA_F_NESTED, 5, 1)
_K_SPORT = struct.pack("=HH", 6, 2)
_K_DPORT = struct.pack("=HH", 6, 3)


def from_kernel(buf: bytes, start: int, end: int) -> bytes:
    """The state of a conntrack message body (from its nfgenmsg header to ``end``).

    An IPv4 entry with ports, laid out as the kernel does (the two tuples first),
    is read by comparing the tuples' attribute headers with what they must be and
    slicing the values out, then one pass over the other top-level attributes;
    everything else goes through :func:`ctnetlink.decode_entry`.  Raises
    :class:`CtnetlinkError`.
    """
    o = start + 4
    if not (
        end - o >= 104
        and buf[start] == socket.AF_INET
        and buf[o : o + 12] == _K_ORIG
        and buf[o + 52 : o + 64] == _K_REPLY
        and buf[o + 16 : o + 20] == _K_DST
        and buf[o + 68 : o + 72] == _K_DST
        and buf[o + 24 : o + 32] == _K_PROTO
        and buf[o + 76 : o + 84] == _K_PROTO
        and buf[o + 36 : o + 40] == _K_SPORT
        and buf[o + 88 : o + 92] == _K_SPORT
        and buf[o + 44 : o + 48] == _K_DPORT
        and buf[o + 96 : o + 100] == _K_DPORT
        and buf[o + 32] == buf[o + 84]
        and buf[o + 32] in PORT_PROTOCOLS
    ):
        return pack(ctnetlink.decode_entry(buf, start, end))
    proto = buf[o + 32]
    protoinfo = -1
    status = mark = timeout = zone = 0
    flags = 0
    offset = o + 104
    unpack_nla = _NLA.unpack_from
    while offset < end:
        if end - offset < 4:
            raise CtnetlinkError("conntrack message: trailing bytes shorter than a header")
        length, kind = unpack_nla(buf, offset)
        if length < 4 or offset + length > end:
            raise CtnetlinkError(f"conntrack attribute {kind & 0x3FFF} has length {length}")
        kind &= 0x3FFF
        if kind == 3 and length == 8:
            (status,) = _U32.unpack_from(buf, offset + 4)
        elif kind == 7 and length == 8:
            (timeout,) = _U32.unpack_from(buf, offset + 4)
            flags |= FLAG_TIMEOUT
        elif kind == 4:
            protoinfo = offset if length == 48 else -2
        elif kind == 8 and length == 8:
            (mark,) = _U32.unpack_from(buf, offset + 4)
            flags |= FLAG_MARK
        elif kind == 18 and length == 6:
            (zone,) = _U16.unpack_from(buf, offset + 4)
        elif kind in (1, 2):
            return pack(ctnetlink.decode_entry(buf, start, end))
        offset += (length + 3) & ~3
    if protoinfo == -2:
        return pack(ctnetlink.decode_entry(buf, start, end))
    tcp_state = wso = wsr = flo = flr = 0
    if protoinfo > 0 and proto == 6:
        t = _FAST_TCP.unpack_from(buf, protoinfo + 4)
        if t[0:4] + t[5:7] + t[8:10] + t[11:13] + t[14:16] != _FAST_TCP_HEADERS or t[4] >= len(
            _TCP_STATES
        ):
            return pack(ctnetlink.decode_entry(buf, start, end))
        tcp_state, wso, wsr, flo, flr = t[4], t[7], t[10], t[13], t[16]
        flags |= FLAG_TCP
    return _V4.pack(
        4, proto, zone,
        buf[o + 12 : o + 16], buf[o + 20 : o + 24], buf[o + 40 : o + 42], buf[o + 48 : o + 50],
        0, 0, 0,
        buf[o + 64 : o + 68], buf[o + 72 : o + 76], buf[o + 92 : o + 94], buf[o + 100 : o + 102],
        0, 0, 0,
        flags, tcp_state, wso, wsr, flo, flr, 0, status, mark, timeout,
    )  # fmt: skip


# --------------------------------------------------------------------------- to the kernel

_HEADER = struct.Struct("=IHHIIBBH")
_FLAGS = struct.Struct("=H")
_TUPLE_V4 = struct.Struct("=HHHHHH4sHH4sHHHHB3xHH2s2xHH2s2x")
_COMMON = struct.Struct("=HHIHHI")  # status, timeout (values big endian, packed before)
_ATTR_U32 = struct.Struct("=HH4s")
_ZONE = struct.Struct("=HH2s2x")
_TCP = struct.Struct("=HHHHHHB3xHHB3xHHB3xHHBBxxHHBBxx")
_TYPE_NEW = (1 << 8) | 0
_TYPE_DELETE = (1 << 8) | 2
NLM_F_REQUEST = 0x1
NLM_F_ACK = 0x4
NLM_F_EXCL = 0x200
NLM_F_CREATE = 0x400
_NESTED_ORIG = ctnetlink.CTA_TUPLE_ORIG | NLA_F_NESTED
_NESTED_REPLY = ctnetlink.CTA_TUPLE_REPLY | NLA_F_NESTED
_NESTED_IP = ctnetlink.CTA_TUPLE_IP | NLA_F_NESTED
_NESTED_PROTO = ctnetlink.CTA_TUPLE_PROTO | NLA_F_NESTED
_KEEP_FLAGS = ctnetlink._TCP_FLAGS_KEPT


def _fast(state: bytes) -> bool:
    return state[0] == 4 and state[1] in PORT_PROTOCOLS


def _tuple(kind: int, proto: int, src: bytes, dst: bytes, sport: bytes, dport: bytes) -> bytes:
    return _TUPLE_V4.pack(
        52, kind, 20, _NESTED_IP, 8, 1, src, 8, 2, dst,
        28, _NESTED_PROTO, 5, 1, proto, 6, 2, sport, 6, 3, dport,
    )  # fmt: skip


def _attributes(state: bytes, default_timeout: int) -> bytes:
    """Status, timeout, mark, zone and tcp protoinfo as a create or update carries them."""
    status = (int.from_bytes(state[-12:-8], "big") & SETTABLE_STATUS) | IPS_CONFIRMED
    timeout = int.from_bytes(state[-4:], "big") or default_timeout
    parts = _ATTR_U32.pack(8, 3, status.to_bytes(4, "big")) + _ATTR_U32.pack(
        8, 7, timeout.to_bytes(4, "big")
    )
    flags = state[-_TAIL]
    if flags & FLAG_MARK:
        parts += _ATTR_U32.pack(8, 8, state[-8:-4])
    if state[2:4] != b"\0\0":
        parts += _ZONE.pack(6, 18, state[2:4])
    if flags & FLAG_TCP and state[1] == 6:
        parts += _protoinfo(state[-19:-14])
    return parts


def _message(kind: int, flags: int, sequence: int, family: int, body: bytes) -> bytes:
    return _HEADER.pack(20 + len(body), kind, flags, sequence & 0xFFFFFFFF, 0, family, 0, 0) + body


#: a whole create-or-update of an IPv4 TCP state with mark and timeout in zone 0, as
#: constant runs of bytes between the state's fields: one ``pack`` of 29 values
_UPSERT_TCP = struct.Struct("=IHHI8s12s4s4s4s16s2s6s2s14s4s4s4s16s2s6s2s6s4s4s4s4s4s48s")
_C_NFGEN = struct.pack("=IBBH", 0, socket.AF_INET, 0, 0)
_C_TUPLE = struct.pack("=HHHHHH", 52, _NESTED_ORIG, 20, _NESTED_IP, 8, 1)
_C_REPLY = b"\0\0" + struct.pack("=HHHHHH", 52, _NESTED_REPLY, 20, _NESTED_IP, 8, 1)
_C_DST = struct.pack("=HH", 8, 2)
_C_PROTO_TCP = struct.pack("=HHHHB3xHH", 28, _NESTED_PROTO, 5, 1, 6, 6, 2)
_C_DPORT = b"\0\0" + struct.pack("=HH", 6, 3)
_C_STATUS = b"\0\0" + struct.pack("=HH", 8, 3)
_C_TIMEOUT = struct.pack("=HH", 8, 7)
_C_MARK = struct.pack("=HH", 8, 8)
_STATUS_BYTES = tuple(
    ((bits & SETTABLE_STATUS) | IPS_CONFIRMED).to_bytes(4, "big") for bits in range(256)
)
_NO_TIMEOUT = bytes(4)
#: protoinfo attributes by the five tcp bytes of a state (few distinct values)
_PROTOINFO_CACHE: dict[bytes, bytes] = {}


def _protoinfo(tcp: bytes) -> bytes:
    found = _PROTOINFO_CACHE.get(tcp)
    if found is None:
        found = _TCP.pack(
            48, ctnetlink.CTA_PROTOINFO | NLA_F_NESTED,
            44, ctnetlink.CTA_PROTOINFO_TCP | NLA_F_NESTED,
            5, 1, tcp[0], 5, 2, tcp[1], 5, 3, tcp[2],
            6, 4, (tcp[3] & _KEEP_FLAGS) | BE_LIBERAL, 0xFF,
            6, 5, (tcp[4] & _KEEP_FLAGS) | BE_LIBERAL, 0xFF,
        )  # fmt: skip
        if len(_PROTOINFO_CACHE) >= 4096:
            _PROTOINFO_CACHE.clear()
        _PROTOINFO_CACHE[tcp] = found
    return found


def build_upsert(state: bytes, sequence: int, *, ack: bool, default_timeout: int) -> bytes:
    """Create the entry, or update it if it exists (``CREATE`` without ``EXCL``).

    Only for states without NAT: the kernel refuses NAT attributes on an
    existing entry (EOPNOTSUPP), so NAT states are created with :func:`build_create`.
    The usual state (IPv4 TCP, zone 0) is packed with a single ``struct`` call.
    """
    if state[1] == 6 and state[0] == 4 and state[-_TAIL] == FLAGS and state[2:4] == b"\0\0":
        timeout = state[-4:]
        if timeout == _NO_TIMEOUT:
            timeout = default_timeout.to_bytes(4, "big")
        return _UPSERT_TCP.pack(
            196, _TYPE_NEW, NLM_F_REQUEST | NLM_F_CREATE | (NLM_F_ACK if ack else 0),
            sequence & 0xFFFFFFFF, _C_NFGEN,
            _C_TUPLE, state[4:8], _C_DST, state[8:12],
            _C_PROTO_TCP, state[12:14], _C_DPORT, state[14:16],
            _C_REPLY, state[20:24], _C_DST, state[24:28],
            _C_PROTO_TCP, state[28:30], _C_DPORT, state[30:32],
            _C_STATUS, _STATUS_BYTES[state[-9]], _C_TIMEOUT, timeout, _C_MARK, state[-8:-4],
            _protoinfo(state[-19:-14]),
        )  # fmt: skip
    if not _fast(state):
        return build_create(state, sequence, ack=ack, default_timeout=default_timeout, excl=False)
    proto = state[1]
    body = (
        _tuple(_NESTED_ORIG, proto, state[4:8], state[8:12], state[12:14], state[14:16])
        + _tuple(_NESTED_REPLY, proto, state[20:24], state[24:28], state[28:30], state[30:32])
        + _attributes(state, default_timeout)
    )
    flags = NLM_F_REQUEST | NLM_F_CREATE | (NLM_F_ACK if ack else 0)
    return _message(_TYPE_NEW, flags, sequence, socket.AF_INET, body)


def build_create(
    state: bytes, sequence: int, *, ack: bool, default_timeout: int, excl: bool = True
) -> bytes:
    """Create (``CREATE|EXCL``); a NAT entry from the un-NATed reply tuple plus CTA_NAT_*."""
    if not _fast(state):
        message = ctnetlink.build_create(
            unpack(state), sequence, ack=ack, default_timeout=default_timeout
        )
        if not excl:
            (flags,) = _FLAGS.unpack_from(message, 6)
            message = message[:6] + _FLAGS.pack(flags & ~NLM_F_EXCL) + message[8:]
        return message
    proto = state[1]
    o_src, o_dst, o_sport, o_dport = state[4:8], state[8:12], state[12:14], state[14:16]
    r_src, r_dst, r_sport, r_dport = state[20:24], state[24:28], state[28:30], state[30:32]
    body = _tuple(_NESTED_ORIG, proto, o_src, o_dst, o_sport, o_dport)
    body += _tuple(_NESTED_REPLY, proto, o_dst, o_src, o_dport, o_sport)
    body += _attributes(state, default_timeout)
    if r_dst != o_src or r_dport != o_sport:
        body += _nat(ctnetlink.CTA_NAT_SRC, r_dst, r_dport)
    if r_src != o_dst or r_sport != o_dport:
        body += _nat(ctnetlink.CTA_NAT_DST, r_src, r_sport)
    flags = NLM_F_REQUEST | NLM_F_CREATE | (NLM_F_EXCL if excl else 0) | (NLM_F_ACK if ack else 0)
    return _message(_TYPE_NEW, flags, sequence, socket.AF_INET, body)


_NAT = struct.Struct("=HHHH4sHH4sHHHH2s2xHH2s2x")


def _nat(kind: int, address: bytes, port: bytes) -> bytes:
    return _NAT.pack(
        40, kind | NLA_F_NESTED, 8, ctnetlink.CTA_NAT_V4_MINIP, address,
        8, ctnetlink.CTA_NAT_V4_MAXIP, address, 20, ctnetlink.CTA_NAT_PROTO | NLA_F_NESTED,
        6, ctnetlink.CTA_PROTONAT_PORT_MIN, port, 6, ctnetlink.CTA_PROTONAT_PORT_MAX, port,
    )  # fmt: skip


def build_update(state: bytes, sequence: int, *, ack: bool, default_timeout: int) -> bytes:
    """Update an existing entry (no ``CREATE``, never NAT)."""
    if not _fast(state):
        return ctnetlink.build_update(
            unpack(state), sequence, ack=ack, default_timeout=default_timeout
        )
    body = _tuple(
        _NESTED_ORIG, state[1], state[4:8], state[8:12], state[12:14], state[14:16]
    ) + _attributes(state, default_timeout)
    return _message(
        _TYPE_NEW, NLM_F_REQUEST | (NLM_F_ACK if ack else 0), sequence, socket.AF_INET, body
    )


def build_delete(state: bytes, sequence: int, *, ack: bool) -> bytes:
    if not _fast(state):
        return ctnetlink.build_delete(unpack(state), sequence, ack=ack)
    body = _tuple(_NESTED_ORIG, state[1], state[4:8], state[8:12], state[12:14], state[14:16])
    if state[2:4] != b"\0\0":
        body += _ZONE.pack(6, 18, state[2:4])
    return _message(
        _TYPE_DELETE, NLM_F_REQUEST | (NLM_F_ACK if ack else 0), sequence, socket.AF_INET, body
    )


def build_set_liberal(state: bytes, sequence: int, *, ack: bool) -> bytes:
    return ctnetlink.build_set_liberal(unpack(state), sequence, ack=ack)


# --------------------------------------------------------------------------- filter


class AddressFilter:
    """Is a state's original or reply source in one of some networks?  On raw bytes."""

    def __init__(self, networks: Iterable[ipaddress.IPv4Network | ipaddress.IPv6Network]):
        by_length: dict[tuple[int, int], set[int]] = {}
        pairs: set[bytes] = set()
        octets: set[int] = set()
        self.v4_wide = False
        for network in networks:
            bits = 32 if network.version == 4 else 128
            shift = bits - network.prefixlen
            by_length.setdefault((network.version, shift), set()).add(
                int(network.network_address) >> shift
            )
            if network.version == 4:
                packed = network.network_address.packed
                if network.prefixlen >= 16:
                    pairs.add(packed[:2])
                elif network.prefixlen >= 8:
                    octets.add(packed[0])
                else:
                    self.v4_wide = True
        self.v4 = tuple((shift, frozenset(v)) for (f, shift), v in by_length.items() if f == 4)
        self.v6 = tuple((shift, frozenset(v)) for (f, shift), v in by_length.items() if f == 6)
        #: first two bytes / first byte of the IPv4 networks: most states miss them all
        self.v4_pairs = frozenset(pairs)
        self.v4_octets = frozenset(octets)

    def ignores(self, state: bytes) -> bool:
        if state[0] == 4:
            if not self.v4:
                return False
            if not self.v4_wide:
                pairs, octets = self.v4_pairs, self.v4_octets
                if (
                    state[4:6] not in pairs
                    and state[20:22] not in pairs
                    and state[4] not in octets
                    and state[20] not in octets
                ):
                    return False
            sources = (int.from_bytes(state[4:8], "big"), int.from_bytes(state[20:24], "big"))
            tests = self.v4
        else:
            if not self.v6:
                return False
            sources = (int.from_bytes(state[4:20], "big"), int.from_bytes(state[44:60], "big"))
            tests = self.v6
        for shift, networks in tests:
            if sources[0] >> shift in networks or sources[1] >> shift in networks:
                return True
        return False
