"""pfsyncd's sync protocol: datagrams to typed messages and back. Pure.

pfsync itself (IP protocol 240) carries pf states and has no authentication;
this protocol carries conntrack entries in UDP datagrams on the sync link,
reliably (sequence numbers, selective acknowledgement, retransmission, like
conntrackd's FTFW) and authenticated with HMAC-SHA256 under a shared key.

Every datagram (all numbers big endian)::

    offset size
     0      4   magic  b"CPsy"
     4      1   version (1)
     5      1   type: 1 DATA, 2 ACK, 3 HELLO, 4 ALIVE, 5 BULK_REQUEST,
                      6 BULK_START, 7 BULK_END
     6      1   flags: HELLO 0x01 = answer with a HELLO
     7      1   reserved, 0
     8      2   length of the whole datagram, trailer included
    10      2   record count (DATA), else 0
    12      8   session: random per daemon start (a new one = the peer restarted)
    20      4   sequence: DATA its own number; every other type the sender's last
                data sequence number (so the receiver sees a lost tail)
    24      -   body (by type)
    end-32 32   HMAC-SHA256(key, every byte before the trailer)

Bodies:

* DATA: ``count`` records, each ``u8 action (1 INS, 2 UPD, 3 DEL)`` + entry::

      u8 family (4|6)  u8 proto  u8 flags (0x01 tcp info, 0x02 mark, 0x04 timeout)
      u8 tcp state  u8 wscale orig  u8 wscale reply  u8 tcp flags orig
      u8 tcp flags reply  u32 status  u32 timeout  u32 mark  u16 zone  u16 reserved
      original tuple, reply tuple: src addr, dst addr (4 or 16 bytes each),
          u16 src port, u16 dst port, u16 icmp id, u8 icmp type, u8 icmp code

* ACK: ``u32 cumulative`` (every sequence number up to it received),
  ``u16 n``, ``u16 reserved``, then ``n`` ranges ``u32 first, u32 last`` of
  sequence numbers missing above it (a NACK).
* BULK_REQUEST, BULK_START, BULK_END: ``u32 bulk id``; BULK_END's header
  sequence is the last data message of the bulk.
* HELLO, ALIVE: empty.

Decoding is strict: wrong magic, version, type, length, record count, reserved
bits, address family, trailing bytes or MAC raise a :class:`WireError`
subclass whose ``stat`` names the counter (``netstat -s -p pfsync`` words).
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import struct
from collections.abc import Sequence
from dataclasses import dataclass

from carpool.errors import ProtocolError
from carpool.pfsync.ctnetlink import (
    ConntrackEntry,
    ConntrackTuple,
    TcpInfo,
    TcpState,
    address_from_bytes,
)

__all__ = [
    "MAGIC",
    "MAX_DATAGRAM",
    "VERSION",
    "Ack",
    "Action",
    "Alive",
    "BadAuth",
    "BadLength",
    "BadValue",
    "BadVersion",
    "BulkEnd",
    "BulkRequest",
    "BulkStart",
    "Data",
    "Hello",
    "Message",
    "Record",
    "WireError",
    "decode",
    "encode",
    "record_size",
]

MAGIC = b"CPsy"
VERSION = 1
HEADER = struct.Struct("!4sBBBBHHQI")
MAC_SIZE = 32
#: the largest datagram we build or accept (fits one Ethernet frame with IPv6 and UDP)
MAX_DATAGRAM = 1400
MAX_NACK_RANGES = 64
_ENTRY = struct.Struct("!BBBBBBBBIIIHH")
_PORTS = struct.Struct("!HHHBB")
_ACK = struct.Struct("!IHH")
_RANGE = struct.Struct("!II")
_U32 = struct.Struct("!I")

FLAG_TCP = 0x01
FLAG_MARK = 0x02
FLAG_TIMEOUT = 0x04
HELLO_ANSWER = 0x01


class WireError(ProtocolError):
    stat = "badval"


class BadLength(WireError):
    stat = "badlen"


class BadVersion(WireError):
    stat = "badver"


class BadAuth(WireError):
    stat = "badauth"


class BadValue(WireError):
    stat = "badval"


class MessageType(enum.IntEnum):
    DATA = 1
    ACK = 2
    HELLO = 3
    ALIVE = 4
    BULK_REQUEST = 5
    BULK_START = 6
    BULK_END = 7


class Action(enum.IntEnum):
    INS = 1
    UPD = 2
    DEL = 3


@dataclass(frozen=True, slots=True)
class Record:
    action: Action
    entry: ConntrackEntry


@dataclass(frozen=True, slots=True)
class Data:
    session: int
    sequence: int
    records: tuple[Record, ...]


@dataclass(frozen=True, slots=True)
class Ack:
    session: int
    #: the sender's last data sequence number
    sequence: int
    cumulative: int
    missing: tuple[tuple[int, int], ...] = ()


@dataclass(frozen=True, slots=True)
class Hello:
    session: int
    sequence: int
    answer_wanted: bool = False


@dataclass(frozen=True, slots=True)
class Alive:
    session: int
    sequence: int


@dataclass(frozen=True, slots=True)
class BulkRequest:
    session: int
    sequence: int
    bulk_id: int


@dataclass(frozen=True, slots=True)
class BulkStart:
    session: int
    sequence: int
    bulk_id: int


@dataclass(frozen=True, slots=True)
class BulkEnd:
    session: int
    sequence: int
    bulk_id: int


Message = Data | Ack | Hello | Alive | BulkRequest | BulkStart | BulkEnd


# --------------------------------------------------------------------------- records


def _address_size(family: int) -> int:
    return 4 if family == 4 else 16


def record_size(entry: ConntrackEntry) -> int:
    """Bytes one record of ``entry`` takes in a DATA body."""
    return 1 + _ENTRY.size + 2 * (2 * _address_size(entry.original.src.version) + _PORTS.size)


def _encode_tuple(value: ConntrackTuple) -> bytes:
    return (
        value.src.packed
        + value.dst.packed
        + _PORTS.pack(
            value.src_port, value.dst_port, value.icmp_id, value.icmp_type, value.icmp_code
        )
    )


def _encode_record(record: Record) -> bytes:
    entry = record.entry
    original, reply = entry.original, entry.reply
    if original.src.version != original.dst.version or any(
        a.version != original.src.version for a in (reply.src, reply.dst)
    ):
        raise ValueError("an entry's addresses must all be of one family")
    flags = 0
    tcp = entry.tcp
    if tcp is not None:
        flags |= FLAG_TCP
    if entry.mark is not None:
        flags |= FLAG_MARK
    if entry.timeout is not None:
        flags |= FLAG_TIMEOUT
    head = _ENTRY.pack(
        original.src.version,
        original.proto,
        flags,
        int(tcp.state) if tcp else 0,
        tcp.wscale_original if tcp else 0,
        tcp.wscale_reply if tcp else 0,
        tcp.flags_original if tcp else 0,
        tcp.flags_reply if tcp else 0,
        entry.status & 0xFFFFFFFF,
        entry.timeout or 0,
        entry.mark or 0,
        entry.zone,
        0,
    )
    return bytes((record.action,)) + head + _encode_tuple(original) + _encode_tuple(reply)


_ACTIONS = {int(action): action for action in Action}
_TCP_STATES = tuple(TcpState)
#: a whole IPv4 record: action, entry fields, two tuples
_V4_RECORD = struct.Struct("!B" + _ENTRY.format.lstrip("!") + "4s4sHHHBB4s4sHHHBB")
_V6_TUPLES = struct.Struct("!16s16sHHHBB16s16sHHHBB")


def _decode_record(buf: bytes, offset: int, end: int) -> tuple[Record, int]:
    if end - offset < _V4_RECORD.size:
        raise BadLength("DATA record cut short")
    family = buf[offset + 1]
    if family == 4:
        values = _V4_RECORD.unpack_from(buf, offset)
        size = _V4_RECORD.size
    elif family == 6:
        size = 1 + _ENTRY.size + _V6_TUPLES.size
        if end - offset < size:
            raise BadLength("DATA record cut short in its tuples")
        values = _ENTRY.unpack_from(buf, offset + 1)
        values = (buf[offset], *values, *_V6_TUPLES.unpack_from(buf, offset + 1 + _ENTRY.size))
    else:
        raise BadValue(f"record of address family {family}")
    (
        raw_action, _, proto, flags, state, wscale_original, wscale_reply, flags_original,
        flags_reply, status, timeout, mark, zone, reserved,
        o_src, o_dst, o_sport, o_dport, o_id, o_type, o_code,
        r_src, r_dst, r_sport, r_dport, r_id, r_type, r_code,
    ) = values  # fmt: skip
    action = _ACTIONS.get(raw_action)
    if action is None:
        raise BadValue(f"unknown record action {raw_action}")
    if flags & ~(FLAG_TCP | FLAG_MARK | FLAG_TIMEOUT) or reserved:
        raise BadValue("record with reserved bits set")
    tcp = None
    if flags & FLAG_TCP:
        if proto != 6:
            raise BadValue("tcp information on a record that is not TCP")
        if state >= len(_TCP_STATES):
            raise BadValue(f"unknown tcp state {state}")
        tcp = TcpInfo(
            _TCP_STATES[state], wscale_original, wscale_reply, flags_original, flags_reply
        )
    elif state or wscale_original or wscale_reply or flags_original or flags_reply:
        raise BadValue("tcp fields set without the tcp flag")
    if not flags & FLAG_MARK and mark:
        raise BadValue("mark set without the mark flag")
    if not flags & FLAG_TIMEOUT and timeout:
        raise BadValue("timeout set without the timeout flag")
    original = ConntrackTuple(
        address_from_bytes(o_src), address_from_bytes(o_dst), proto,
        o_sport, o_dport, o_id, o_type, o_code,
    )  # fmt: skip
    reply = ConntrackTuple(
        address_from_bytes(r_src), address_from_bytes(r_dst), proto,
        r_sport, r_dport, r_id, r_type, r_code,
    )  # fmt: skip
    entry = ConntrackEntry(
        original,
        reply,
        status,
        timeout if flags & FLAG_TIMEOUT else None,
        mark if flags & FLAG_MARK else None,
        zone,
        tcp,
    )
    return Record(action, entry), offset + size


# --------------------------------------------------------------------------- messages


def _mac(key: bytes, data: bytes) -> bytes:
    return hmac.new(key, data, hashlib.sha256).digest()


def encode(message: Message, key: bytes) -> bytes:
    """The datagram for ``message``, authenticated with ``key``."""
    count = 0
    flags = 0
    if isinstance(message, Data):
        kind = MessageType.DATA
        count = len(message.records)
        body = b"".join(_encode_record(r) for r in message.records)
    elif isinstance(message, Ack):
        kind = MessageType.ACK
        if len(message.missing) > MAX_NACK_RANGES:
            raise ValueError(f"at most {MAX_NACK_RANGES} missing ranges per ACK")
        body = _ACK.pack(message.cumulative & 0xFFFFFFFF, len(message.missing), 0) + b"".join(
            _RANGE.pack(first & 0xFFFFFFFF, last & 0xFFFFFFFF) for first, last in message.missing
        )
    elif isinstance(message, Hello):
        kind = MessageType.HELLO
        flags = HELLO_ANSWER if message.answer_wanted else 0
        body = b""
    elif isinstance(message, Alive):
        kind = MessageType.ALIVE
        body = b""
    else:
        kind = {
            BulkRequest: MessageType.BULK_REQUEST,
            BulkStart: MessageType.BULK_START,
            BulkEnd: MessageType.BULK_END,
        }[type(message)]
        body = _U32.pack(message.bulk_id & 0xFFFFFFFF)
    length = HEADER.size + len(body) + MAC_SIZE
    if length > 0xFFFF:
        raise ValueError(f"message of {length} bytes is too long")
    head = HEADER.pack(
        MAGIC,
        VERSION,
        kind,
        flags,
        0,
        length,
        count,
        message.session & 0xFFFFFFFFFFFFFFFF,
        message.sequence & 0xFFFFFFFF,
    )
    signed = head + body
    return signed + _mac(key, signed)


def decode(datagram: bytes, key: bytes) -> Message:
    """The message in ``datagram``; authentication is checked before anything else is read."""
    size = len(datagram)
    if size < HEADER.size + MAC_SIZE:
        raise BadLength(f"datagram of {size} bytes is shorter than a header and its MAC")
    expected = _mac(key, datagram[:-MAC_SIZE])
    if not hmac.compare_digest(expected, datagram[-MAC_SIZE:]):
        raise BadAuth("bad HMAC: the sender does not use our pfsync_key")
    magic, version, raw_kind, flags, reserved, length, count, session, sequence = (
        HEADER.unpack_from(datagram, 0)
    )
    if magic != MAGIC:
        raise BadValue("not a pfsyncd datagram (bad magic)")
    if version != VERSION:
        raise BadVersion(f"protocol version {version}, we speak {VERSION}")
    if length != size:
        raise BadLength(f"header says {length} bytes, the datagram has {size}")
    if reserved:
        raise BadValue("reserved header byte set")
    try:
        kind = MessageType(raw_kind)
    except ValueError:
        raise BadValue(f"unknown message type {raw_kind}") from None
    if flags & ~(HELLO_ANSWER if kind is MessageType.HELLO else 0):
        raise BadValue(f"unknown flags {flags:#x} on a {kind.name} message")
    if count and kind is not MessageType.DATA:
        raise BadValue(f"record count on a {kind.name} message")
    start, end = HEADER.size, size - MAC_SIZE
    body_size = end - start
    if kind is MessageType.DATA:
        records = []
        offset = start
        for _ in range(count):
            record, offset = _decode_record(datagram, offset, end)
            records.append(record)
        if offset != end:
            raise BadLength(f"{end - offset} bytes after the last DATA record")
        return Data(session, sequence, tuple(records))
    if kind is MessageType.ACK:
        if body_size < _ACK.size:
            raise BadLength("ACK body cut short")
        cumulative, ranges, pad = _ACK.unpack_from(datagram, start)
        if pad:
            raise BadValue("reserved ACK bytes set")
        if ranges > MAX_NACK_RANGES:
            raise BadValue(f"{ranges} missing ranges, at most {MAX_NACK_RANGES}")
        if body_size != _ACK.size + ranges * _RANGE.size:
            raise BadLength(f"ACK with {ranges} ranges has a {body_size}-byte body")
        missing = tuple(
            _RANGE.unpack_from(datagram, start + _ACK.size + index * _RANGE.size)
            for index in range(ranges)
        )
        return Ack(session, sequence, cumulative, missing)
    if kind in (MessageType.HELLO, MessageType.ALIVE):
        if body_size:
            raise BadLength(f"{kind.name} with a {body_size}-byte body")
        if kind is MessageType.HELLO:
            return Hello(session, sequence, bool(flags & HELLO_ANSWER))
        return Alive(session, sequence)
    if body_size != _U32.size:
        raise BadLength(f"{kind.name} with a {body_size}-byte body")
    (bulk_id,) = _U32.unpack_from(datagram, start)
    if kind is MessageType.BULK_REQUEST:
        return BulkRequest(session, sequence, bulk_id)
    if kind is MessageType.BULK_START:
        return BulkStart(session, sequence, bulk_id)
    return BulkEnd(session, sequence, bulk_id)


def pack_records(records: Sequence[Record], limit: int = MAX_DATAGRAM) -> list[list[Record]]:
    """Split records into groups that each fit one DATA datagram of ``limit`` bytes."""
    room = limit - HEADER.size - MAC_SIZE
    groups: list[list[Record]] = []
    current: list[Record] = []
    used = 0
    for record in records:
        size = record_size(record.entry)
        if current and used + size > room:
            groups.append(current)
            current, used = [], 0
        current.append(record)
        used += size
    if current:
        groups.append(current)
    return groups


DATA_ROOM = MAX_DATAGRAM - HEADER.size - MAC_SIZE
