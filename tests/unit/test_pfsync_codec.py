"""pfsyncd's codecs: ctnetlink messages and the sync wire, round trips and fuzzing."""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import socket
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from carpool.errors import ProtocolError
from carpool.pfsync import ctnetlink, wire
from carpool.pfsync import state as states
from carpool.pfsync.ctnetlink import (
    ConntrackEntry,
    ConntrackMessage,
    ConntrackTuple,
    CtnetlinkError,
    EventKind,
    NetlinkAck,
    NetlinkDone,
    TcpInfo,
    TcpState,
)

KEY = b"a shared key of enough bytes"

ipv4 = st.builds(ipaddress.IPv4Address, st.integers(0, 2**32 - 1))
ipv6 = st.builds(ipaddress.IPv6Address, st.integers(0, 2**128 - 1))
u8, u16, u32 = st.integers(0, 255), st.integers(0, 65535), st.integers(0, 2**32 - 1)


@st.composite
def tuples(draw: st.DrawFn, version: int, proto: int) -> ConntrackTuple:
    address: st.SearchStrategy[ipaddress.IPv4Address | ipaddress.IPv6Address] = (
        ipv4 if version == 4 else ipv6
    )
    if proto in ctnetlink.PORT_PROTOCOLS:
        return ConntrackTuple(draw(address), draw(address), proto, draw(u16), draw(u16))
    if proto in (1, 58):
        return ConntrackTuple(
            draw(address), draw(address), proto, icmp_id=draw(u16), icmp_type=draw(u8),
            icmp_code=draw(u8),
        )  # fmt: skip
    return ConntrackTuple(draw(address), draw(address), proto)


@st.composite
def entries(draw: st.DrawFn) -> ConntrackEntry:
    version = draw(st.sampled_from([4, 6]))
    proto = draw(st.sampled_from([6, 17, 132, 47, 1 if version == 4 else 58]))
    tcp = None
    if proto == 6 and draw(st.booleans()):
        tcp = TcpInfo(
            draw(st.sampled_from(list(TcpState))),
            draw(st.integers(0, 14)),
            draw(st.integers(0, 14)),
            draw(u8),
            draw(u8),
        )
    return ConntrackEntry(
        original=draw(tuples(version, proto)),
        reply=draw(tuples(version, proto)),
        status=draw(u32),
        timeout=draw(st.none() | u32),
        mark=draw(st.none() | u32),
        zone=draw(u16),
        tcp=tcp,
        kernel_id=draw(st.none() | u32),
    )


def established(nat: bool = False) -> ConntrackEntry:
    original = ConntrackTuple(
        ipaddress.IPv4Address("10.78.1.2"), ipaddress.IPv4Address("10.78.2.2"), 6, 40000, 7000
    )
    reply = original.inverted()
    if nat:
        reply = ConntrackTuple(reply.src, ipaddress.IPv4Address("10.78.2.1"), 6, 7000, 61000)
    return ConntrackEntry(
        original, reply, status=0x19E if nat else 0xE, timeout=431999, mark=0,
        tcp=TcpInfo(TcpState.ESTABLISHED, 7, 7, 0x23, 0x23),
    )  # fmt: skip


# -- ctnetlink --------------------------------------------------------------------------


@given(entries(), st.sampled_from(list(EventKind)), u32)
def test_ctnetlink_kernel_messages_round_trip(
    entry: ConntrackEntry, kind: EventKind, sequence: int
) -> None:
    data = ctnetlink.build_dump_reply(entry, sequence, kind=kind)
    [message] = list(ctnetlink.decode_messages(data))
    assert isinstance(message, ConntrackMessage)
    assert message.kind is kind and message.sequence == sequence
    expected_tcp = entry.tcp
    if expected_tcp is not None:
        assert message.entry.tcp is not None
        assert message.entry.tcp.state == expected_tcp.state
    assert message.entry.original == entry.original
    assert message.entry.reply == entry.reply
    assert (message.entry.status, message.entry.timeout, message.entry.mark) == (
        entry.status,
        entry.timeout,
        entry.mark,
    )
    assert message.entry.zone == entry.zone and message.entry.kernel_id == entry.kernel_id


@settings(max_examples=300)
@given(st.binary(max_size=400))
def test_ctnetlink_garbage_raises_only_protocol_errors(data: bytes) -> None:
    with contextlib.suppress(ProtocolError):
        list(ctnetlink.decode_messages(data))


@given(entries(), st.integers(0, 400), st.integers(1, 255))
def test_ctnetlink_corrupted_messages_raise_only_protocol_errors(
    entry: ConntrackEntry, position: int, value: int
) -> None:
    data = bytearray(ctnetlink.build_dump_reply(entry, 1, kind=EventKind.DUMP))
    data[position % len(data)] ^= value
    with contextlib.suppress(ProtocolError):
        list(ctnetlink.decode_messages(bytes(data)))


def test_ctnetlink_truncated_message_is_refused() -> None:
    data = ctnetlink.build_dump_reply(established(), 1, kind=EventKind.NEW)
    for cut in (3, 15, 19, len(data) - 1):
        with pytest.raises(CtnetlinkError):
            list(ctnetlink.decode_messages(data[:cut]))


def test_ctnetlink_acks_and_done() -> None:
    data = ctnetlink.build_error(5, errno.EEXIST) + ctnetlink.build_error(6, 0)
    data += struct.pack("=IHHII", 20, ctnetlink.NLMSG_DONE, 2, 7, 0) + bytes(4)
    assert list(ctnetlink.decode_messages(data)) == [
        NetlinkAck(5, errno.EEXIST),
        NetlinkAck(6, 0),
        NetlinkDone(7),
    ]


def _attribute_types(data: bytes, start: int, end: int) -> dict[int, bytes]:
    found = {}
    while start < end:
        length, kind = struct.unpack_from("=HH", data, start)
        found[kind & 0x3FFF] = data[start + 4 : start + length]
        start += (length + 3) & ~3
    return found


def test_create_sets_be_liberal_confirmed_and_nat_from_the_unnated_reply() -> None:
    entry = established(nat=True)
    data = ctnetlink.build_create(entry, 9)
    length, kind, flags, sequence, _ = struct.unpack_from("=IHHII", data)
    assert length == len(data) and sequence == 9
    assert kind == (1 << 8) | 0
    assert flags & (ctnetlink.NLM_F_CREATE | ctnetlink.NLM_F_EXCL) == 0x600
    attrs = _attribute_types(data, 20, len(data))
    assert (
        struct.unpack("!I", attrs[ctnetlink.CTA_STATUS])[0] == 0xE
    )  # SEEN_REPLY|ASSURED|CONFIRMED
    assert ctnetlink.CTA_NAT_SRC in attrs and ctnetlink.CTA_NAT_DST not in attrs
    reply = ctnetlink._decode_tuple(
        data, _span(data, ctnetlink.CTA_TUPLE_REPLY), socket.AF_INET, "reply"
    )
    assert reply == entry.original.inverted()  # the kernel NATs it itself
    tcp = _attribute_types(attrs[ctnetlink.CTA_PROTOINFO], 0, len(attrs[ctnetlink.CTA_PROTOINFO]))
    inner = tcp[ctnetlink.CTA_PROTOINFO_TCP]
    fields = _attribute_types(inner, 0, len(inner))
    flags_original = fields[ctnetlink.CTA_PROTOINFO_TCP_FLAGS_ORIGINAL]
    assert flags_original[0] & ctnetlink.BE_LIBERAL and flags_original[1] == 0xFF
    assert not flags_original[0] & 0x20  # MAXACK_SET is the kernel's, not ours to copy


def _span(data: bytes, wanted: int) -> tuple[int, int]:
    offset = 20
    while offset < len(data):
        length, kind = struct.unpack_from("=HH", data, offset)
        if kind & 0x3FFF == wanted:
            return offset + 4, offset + length
        offset += (length + 3) & ~3
    raise AssertionError(f"attribute {wanted} missing")


def test_update_never_carries_nat_and_delete_only_the_key() -> None:
    entry = established(nat=True)
    data = ctnetlink.build_update(entry, 1)
    attrs = _attribute_types(data, 20, len(data))
    assert ctnetlink.CTA_NAT_SRC not in attrs and ctnetlink.CTA_TUPLE_REPLY not in attrs
    assert struct.unpack_from("=H", data, 6)[0] & ctnetlink.NLM_F_CREATE == 0
    data = ctnetlink.build_delete(entry, 2)
    assert set(_attribute_types(data, 20, len(data))) == {ctnetlink.CTA_TUPLE_ORIG}


def test_update_event_merges_over_what_was_known() -> None:
    known = established()
    partial = ConntrackEntry(known.original, known.reply, status=0xE, timeout=120)
    merged = partial.merged_over(known)
    assert merged.tcp == known.tcp and merged.timeout == 120 and merged.mark == 0


# -- wire --------------------------------------------------------------------------------

sessions = st.integers(0, 2**64 - 1)


@st.composite
def messages(draw: st.DrawFn) -> wire.Message:
    session, sequence = draw(sessions), draw(u32)
    kind = draw(st.sampled_from(["data", "ack", "hello", "alive", "req", "start", "end"]))
    if kind == "data":
        records = draw(
            st.lists(
                st.builds(
                    wire.Record.of,
                    st.sampled_from(list(wire.Action)),
                    entries().map(
                        lambda e: ConntrackEntry(
                            e.original, e.reply, e.status, e.timeout, e.mark, e.zone, e.tcp
                        )
                    ),
                ),
                max_size=12,
            )
        )
        return wire.Data(session, sequence, tuple(records))
    if kind == "ack":
        missing = draw(st.lists(st.tuples(u32, u32), max_size=wire.MAX_NACK_RANGES))
        return wire.Ack(session, sequence, draw(u32), tuple(missing))
    if kind == "hello":
        return wire.Hello(session, sequence, draw(st.booleans()))
    if kind == "alive":
        return wire.Alive(session, sequence)
    if kind == "req":
        return wire.BulkRequest(session, sequence, draw(u32))
    if kind == "start":
        return wire.BulkStart(session, sequence, draw(u32))
    return wire.BulkEnd(session, sequence, draw(u32))


@given(messages())
def test_wire_round_trip(message: wire.Message) -> None:
    assert wire.decode(wire.encode(message, KEY), KEY) == message


@given(messages(), st.integers(0, 10_000), st.integers(1, 255))
def test_wire_any_flipped_bit_fails_authentication(
    message: wire.Message, position: int, value: int
) -> None:
    data = bytearray(wire.encode(message, KEY))
    data[position % len(data)] ^= value
    with pytest.raises(wire.WireError):
        wire.decode(bytes(data), KEY)


@settings(max_examples=300)
@given(st.binary(max_size=300))
def test_wire_garbage_raises_only_wire_errors(data: bytes) -> None:
    with pytest.raises(wire.WireError):
        wire.decode(data, KEY)


def _signed(body: bytes) -> bytes:
    return body + wire._mac(KEY, body)


def _header(
    kind: int, length: int, count: int = 0, flags: int = 0, version: int = wire.VERSION
) -> bytes:
    return wire.HEADER.pack(wire.MAGIC, version, kind, flags, 0, length, count, 1, 1)


def test_wire_strict_decoding_of_well_signed_nonsense() -> None:
    size = wire.HEADER.size + wire.MAC_SIZE
    cases = [
        (_signed(_header(2, size + 4) + bytes(4)), wire.BadLength),  # short ACK body
        (_signed(_header(2, size + 8) + struct.pack("!IHH", 1, 1, 0)), wire.BadLength),
        (_signed(_header(9, size)), wire.BadValue),  # unknown type
        (_signed(_header(4, size, version=1)), wire.BadVersion),
        (_signed(_header(4, size + 1)), wire.BadLength),  # length field lies
        (_signed(_header(4, size, flags=1)), wire.BadValue),  # HELLO's flag on ALIVE
        (_signed(_header(4, size, count=1)), wire.BadValue),  # records on ALIVE
        (_signed(_header(1, size, count=1)), wire.BadLength),  # record missing
    ]
    for data, error in cases:
        with pytest.raises(error):
            wire.decode(data, KEY)


def test_wire_data_fits_a_datagram_and_wrong_key_is_bad_auth() -> None:
    records = [wire.Record.of(wire.Action.INS, established()) for _ in range(100)]
    groups = wire.pack_records(records)
    assert sum(len(g) for g in groups) == 100
    for group in groups:
        data = wire.encode(wire.Data(1, 1, tuple(group)), KEY)
        assert len(data) <= wire.MAX_DATAGRAM
        with pytest.raises(wire.BadAuth):
            wire.decode(data, b"another key, same length!!!!")


def test_set_liberal_sends_flags_only() -> None:
    data = ctnetlink.build_set_liberal(established(nat=True), 3)
    attrs = _attribute_types(data, 20, len(data))
    assert set(attrs) == {ctnetlink.CTA_TUPLE_ORIG, ctnetlink.CTA_PROTOINFO}
    info = attrs[ctnetlink.CTA_PROTOINFO]
    tcp = _attribute_types(info, 0, len(info))[ctnetlink.CTA_PROTOINFO_TCP]
    fields = _attribute_types(tcp, 0, len(tcp))
    assert set(fields) == {
        ctnetlink.CTA_PROTOINFO_TCP_FLAGS_ORIGINAL,
        ctnetlink.CTA_PROTOINFO_TCP_FLAGS_REPLY,
    }
    assert fields[ctnetlink.CTA_PROTOINFO_TCP_FLAGS_REPLY] == bytes((8, 8))
    assert not ctnetlink.is_liberal(established())


# -- states ------------------------------------------------------------------------------


def _without_id(entry: ConntrackEntry) -> ConntrackEntry:
    return ConntrackEntry(
        entry.original, entry.reply, entry.status, entry.timeout, entry.mark, entry.zone, entry.tcp
    )


@given(entries())
def test_state_round_trip_and_key(entry: ConntrackEntry) -> None:
    packed = states.pack(entry)
    assert states.check(packed) is None
    assert len(packed) == states.state_size(entry.original.src.version)
    assert states.unpack(packed) == _without_id(entry)
    same_key = ConntrackEntry(entry.original, entry.original.inverted(), zone=entry.zone)
    assert states.key_of(packed) == states.key_of(states.pack(same_key))
    assert states.timeout_of(packed) == (entry.timeout or 0)
    assert states.has_nat(packed) == (entry.source_nat or entry.destination_nat)


@given(entries(), st.sampled_from(list(EventKind)))
def test_state_from_kernel_message_matches_the_full_decoder(
    entry: ConntrackEntry, kind: EventKind
) -> None:
    data = ctnetlink.build_dump_reply(entry, 1, kind=kind)
    assert states.from_kernel(data, 16, len(data)) == states.pack(
        ctnetlink.decode_entry(data, 16, len(data))
    )


@given(entries(), u32)
def test_state_requests_are_the_entry_requests(entry: ConntrackEntry, sequence: int) -> None:
    packed = states.pack(entry)
    created = ctnetlink.build_create(entry, sequence, default_timeout=600)
    assert states.build_create(packed, sequence, ack=False, default_timeout=600) == created
    assert states.build_update(packed, sequence, ack=True, default_timeout=600) == (
        ctnetlink.build_update(entry, sequence, ack=True, default_timeout=600)
    )
    assert states.build_delete(packed, sequence, ack=False) == ctnetlink.build_delete(
        entry, sequence
    )
    upsert = states.build_upsert(packed, sequence, ack=False, default_timeout=600)
    flags = struct.unpack_from("=H", created, 6)[0] & ~ctnetlink.NLM_F_EXCL
    if not states.has_nat(packed):
        assert upsert == created[:6] + struct.pack("=H", flags) + created[8:]


def test_state_requests_of_the_usual_entries() -> None:
    for entry in (established(), established(nat=True)):
        for timeout, zone in ((431999, 0), (None, 0), (431999, 7)):
            item = ConntrackEntry(
                entry.original, entry.reply, entry.status, timeout, entry.mark, zone, entry.tcp
            )
            test_state_requests_are_the_entry_requests.hypothesis.inner_test(item, 77)  # type: ignore[attr-defined]


def test_state_merge_takes_what_an_update_event_lacks() -> None:
    old = established()
    partial = ConntrackEntry(old.original, old.reply, status=0x8E)
    merged = states.unpack(states.merge(states.pack(partial), states.pack(old)))
    assert merged == partial.merged_over(old)


networks = st.builds(
    lambda version, value, length: ipaddress.ip_network(
        (value % (2 ** (32 if version == 4 else 128)), length % (33 if version == 4 else 129)),
        strict=False,
    ),
    st.sampled_from([4, 6]),
    st.integers(0, 2**128 - 1),
    st.integers(0, 128),
)


@given(entries(), st.lists(networks, max_size=6))
def test_state_filter_matches_ipaddress(entry: ConntrackEntry, ignored: list[object]) -> None:
    nets = [n for n in ignored if isinstance(n, ipaddress.IPv4Network | ipaddress.IPv6Network)]
    expected = any(
        address.version == network.version and address in network
        for address in (entry.original.src, entry.reply.src)
        for network in nets
    )
    assert states.AddressFilter(nets).ignores(states.pack(entry)) == expected
    address = entry.original.src
    own = ipaddress.ip_network((address, address.max_prefixlen))
    assert states.AddressFilter([own]).ignores(states.pack(entry))
