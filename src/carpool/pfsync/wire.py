"""pfsyncd's sync protocol: datagrams to typed messages and back. Pure.

pfsync itself (IP protocol 240) carries pf states and has no authentication;
this protocol carries conntrack entries in UDP datagrams on the sync link,
reliably (sequence numbers, selective acknowledgement, retransmission, like
conntrackd's FTFW) and authenticated with HMAC-SHA256 under a shared key.

Every datagram (all numbers big endian)::

    offset size
     0      4   magic  b"CPsy"
     4      1   version (2)
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

* DATA: ``count`` records, each ``u8 action (1 INS, 2 UPD, 3 DEL)`` + the
  entry as a *state*, the flat layout of :mod:`carpool.pfsync.state` (56 bytes
  for IPv4, 104 for IPv6; its first byte, the address family, gives its size)::

      u8 family (4|6)  u8 proto  u16 zone
      original tuple, reply tuple: src addr, dst addr (4 or 16 bytes each),
          u16 src port, u16 dst port, u16 icmp id, u8 icmp type, u8 icmp code
      u8 flags (0x01 tcp info, 0x02 mark, 0x04 timeout)  u8 tcp state
      u8 wscale orig  u8 wscale reply  u8 tcp flags orig  u8 tcp flags reply
      u16 reserved  u32 status  u32 mark  u32 timeout

  A state is what both daemons keep for an entry and what the receiver turns
  into its kernel's netlink request without building objects in between.

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
import hmac
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

from carpool.errors import ProtocolError
from carpool.pfsync import state as state_module
from carpool.pfsync.ctnetlink import ConntrackEntry

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
VERSION = 2
HEADER = struct.Struct("!4sBBBBHHQI")
MAC_SIZE = 32
#: the largest datagram we build or accept (fits one Ethernet frame with IPv6 and UDP)
MAX_DATAGRAM = 1400
MAX_NACK_RANGES = 64
_ACK = struct.Struct("!IHH")
_RANGE = struct.Struct("!II")
_U32 = struct.Struct("!I")

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


class Record(NamedTuple):
    """One record: what to do and the entry as a state (:mod:`carpool.pfsync.state`)."""

    action: Action
    state: bytes

    @property
    def entry(self) -> ConntrackEntry:
        return state_module.unpack(self.state)

    @classmethod
    def of(cls, action: Action, entry: ConntrackEntry) -> Record:
        return cls(action, state_module.pack(entry))


@dataclass(frozen=True, slots=True)
class Data:
    session: int
    sequence: int
    #: (action, state) pairs; :class:`Record` is one with names
    records: tuple[tuple[Action, bytes], ...]


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


def record_size(state: bytes) -> int:
    """Bytes one record of ``state`` takes in a DATA body."""
    return 1 + len(state)


_ACTIONS = {int(action): action for action in Action}
_ACTION_BYTES = {action: bytes((action,)) for action in Action}
_SIZES = {4: state_module.V4_SIZE, 6: state_module.V6_SIZE}


def _decode_records(
    buf: bytes, offset: int, end: int, count: int
) -> tuple[tuple[Action, bytes], ...]:
    records = []
    actions = _ACTIONS
    sizes = _SIZES
    check = state_module.check
    for _ in range(count):
        if end - offset < 2:
            raise BadLength("DATA record cut short")
        action = actions.get(buf[offset])
        if action is None:
            raise BadValue(f"unknown record action {buf[offset]}")
        size = sizes.get(buf[offset + 1])
        if size is None:
            raise BadValue(f"record of address family {buf[offset + 1]}")
        offset += 1
        if end - offset < size:
            raise BadLength("DATA record cut short")
        state = buf[offset : offset + size]
        why = check(state)
        if why is not None:
            raise BadValue(why)
        records.append((action, state))
        offset += size
    if offset != end:
        raise BadLength(f"{end - offset} bytes after the last DATA record")
    return tuple(records)


# --------------------------------------------------------------------------- messages


def _mac(key: bytes, data: bytes) -> bytes:
    return hmac.digest(key, data, "sha256")


def encode(message: Message, key: bytes) -> bytes:
    """The datagram for ``message``, authenticated with ``key``."""
    count = 0
    flags = 0
    if isinstance(message, Data):
        kind = MessageType.DATA
        count = len(message.records)
        action_bytes = _ACTION_BYTES
        body = b"".join([action_bytes[action] + state for action, state in message.records])
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
        return Data(session, sequence, _decode_records(datagram, start, end, count))
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
        size = record_size(record.state)
        if current and used + size > room:
            groups.append(current)
            current, used = [], 0
        current.append(record)
        used += size
    if current:
        groups.append(current)
    return groups


DATA_ROOM = MAX_DATAGRAM - HEADER.size - MAC_SIZE
