"""CARP wire format: header codec, checksum, HMAC, IPv4 envelope (carpool.carp.packet)."""

from __future__ import annotations

import contextlib
import struct
from ipaddress import IPv4Address, IPv6Address

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from carpool.carp.packet import (
    CARP_DEFAULT_TOS,
    CARP_GROUP_V4,
    CARP_HEADER_LENGTH,
    CARP_PROTO,
    BadAuthentication,
    BadChecksum,
    BadLength,
    BadTtl,
    BadVersion,
    BadVhid,
    CarpHeader,
    CarpPacketError,
    NotCarp,
    ShortPacket,
    build_advert,
    carp_hmac,
    carp_hmac_message,
    check_ttl,
    decode_ipv4_datagram,
    decode_ipv6_payload,
    encode_ipv4_datagram,
    internet_checksum,
    verify_advert,
)
from carpool.errors import ProtocolError

# A ucarp advert captured on the wire (reference section 1.5).
CAPTURED = bytes.fromhex("2101000700012d8c4fd6acde6f3da8b33672c1346010feb7d12a0c95b48ea7cbf12e1b0c")
CAPTURED_VIP = IPv4Address("10.77.0.100")
SOURCE = IPv4Address("10.77.0.1")
GROUP = IPv4Address(CARP_GROUP_V4)


def advert(**changes: int) -> CarpHeader:
    fields = {"vhid": 1, "advbase": 1, "advskew": 0, "counter": 42} | changes
    return build_advert(
        vhid=fields["vhid"],
        advbase=fields["advbase"],
        advskew=fields["advskew"],
        password=b"secretpw",
        addresses=[CAPTURED_VIP],
        counter=fields["counter"],
    )


# -- the captured vector -------------------------------------------------------------


def test_captured_ucarp_advert_decodes_and_authenticates() -> None:
    header = CarpHeader.decode(CAPTURED)
    assert (header.version, header.type, header.vhid) == (2, 1, 1)
    assert (header.advskew, header.authlen, header.demote, header.advbase) == (0, 7, 0, 1)
    assert header.counter == 0x4FD6ACDE6F3DA8B3
    verify_advert(header, b"secretpw", [CAPTURED_VIP])
    assert header.encode() == CAPTURED
    assert carp_hmac(b"secretpw", 1, [CAPTURED_VIP], header.counter) == CAPTURED[16:]


def test_captured_advert_fails_with_wrong_password_vhid_or_address() -> None:
    header = CarpHeader.decode(CAPTURED)
    with pytest.raises(BadAuthentication, match="failed authentication") as info:
        verify_advert(header, b"secretpx", [CAPTURED_VIP], source=SOURCE)
    assert info.value.stat == "badauth"
    assert "10.77.0.1" in str(info.value)
    with pytest.raises(BadAuthentication):
        verify_advert(header, b"secretpw", [IPv4Address("10.77.0.101")])
    with pytest.raises(BadAuthentication):
        verify_advert(header, b"secretpw", [CAPTURED_VIP, IPv4Address("10.77.0.101")])


def test_build_advert_reproduces_the_capture() -> None:
    header = build_advert(1, 1, 0, b"secretpw", [CAPTURED_VIP], 0x4FD6ACDE6F3DA8B3)
    assert header.encode() == CAPTURED


# -- HMAC message ---------------------------------------------------------------------


def test_hmac_message_orders_addresses_like_freebsd() -> None:
    message = carp_hmac_message(
        7,
        [
            IPv6Address("2001:db8::2"),
            IPv4Address("10.0.0.200"),
            IPv6Address("2001:db8::1"),
            IPv4Address("9.255.0.1"),
            IPv4Address("10.0.0.3"),
        ],
        0x0102030405060708,
    )
    assert message == (
        bytes([2, 1, 7])
        + IPv4Address("9.255.0.1").packed
        + IPv4Address("10.0.0.3").packed
        + IPv4Address("10.0.0.200").packed
        + IPv6Address("2001:db8::1").packed
        + IPv6Address("2001:db8::2").packed
        + bytes.fromhex("0102030405060708")
    )


def test_hmac_message_hashes_each_address_once_and_skips_the_extremes() -> None:
    once = carp_hmac_message(1, [IPv4Address("10.0.0.1")], 0)
    twice = carp_hmac_message(1, [IPv4Address("10.0.0.1")] * 2, 0)
    assert once == twice
    extremes = [
        IPv4Address("0.0.0.0"),
        IPv4Address("255.255.255.255"),
        IPv6Address("::"),
        IPv6Address("ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff"),
    ]
    assert carp_hmac_message(1, extremes, 0) == bytes([2, 1, 1]) + bytes(8)


def test_hmac_message_clears_the_embedded_scope_of_link_local_addresses() -> None:
    kame = IPv6Address("fe80:5::1")  # KAME-style embedded interface index 5
    plain = IPv6Address("fe80::1")
    assert carp_hmac_message(1, [kame], 0) == carp_hmac_message(1, [plain], 0)
    # a global address keeps bytes 2..3
    assert IPv6Address("2001:5::1").packed in carp_hmac_message(1, [IPv6Address("2001:5::1")], 0)


def test_key_is_at_most_twenty_bytes() -> None:
    long = b"0123456789abcdefghijKLMNO"
    assert carp_hmac(long, 1, [CAPTURED_VIP], 5) == carp_hmac(long[:20], 1, [CAPTURED_VIP], 5)
    # an empty password is twenty zero bytes, as FreeBSD's key array is
    assert carp_hmac(b"", 1, [CAPTURED_VIP], 5) == carp_hmac(bytes(20), 1, [CAPTURED_VIP], 5)


# -- header validation -----------------------------------------------------------------


def test_short_header() -> None:
    with pytest.raises(ShortPacket, match="35 bytes") as info:
        CarpHeader.decode(CAPTURED[:35], source=SOURCE)
    assert info.value.stat == "hdrops"
    assert info.value.source == SOURCE


def test_trailing_bytes_are_ignored() -> None:
    assert CarpHeader.decode(CAPTURED + b"padding") == CarpHeader.decode(CAPTURED)


def test_bad_checksum() -> None:
    damaged = bytearray(CAPTURED)
    damaged[2] = 50  # advskew changed, checksum not
    with pytest.raises(BadChecksum) as info:
        CarpHeader.decode(bytes(damaged))
    assert info.value.stat == "badsum"


def reencoded(data: bytes) -> bytes:
    """``data`` with a correct checksum."""
    body = data[:6] + b"\x00\x00" + data[8:]
    return body[:6] + struct.pack("!H", internet_checksum(body)) + body[8:]


def test_bad_version_mentions_vrrp() -> None:
    with pytest.raises(BadVersion, match=r"version 3, expected 2 \(VRRPv3") as info:
        CarpHeader.decode(reencoded(b"\x31" + CAPTURED[1:]))
    assert info.value.stat == "badver"


def test_vhid_zero() -> None:
    with pytest.raises(BadVhid) as info:
        CarpHeader.decode(reencoded(CAPTURED[:1] + b"\x00" + CAPTURED[2:]))
    assert info.value.stat == "badvhid"


def test_type_is_not_checked_like_freebsd() -> None:
    header = CarpHeader.decode(reencoded(b"\x22" + CAPTURED[1:]))
    assert header.type == 2


def test_constructor_rejects_values_that_do_not_fit() -> None:
    good = CarpHeader.decode(CAPTURED)
    for field, value in [
        ("vhid", 0),
        ("vhid", 256),
        ("advskew", 256),
        ("advbase", -1),
        ("demote", 300),
        ("version", 16),
        ("counter", 1 << 64),
    ]:
        with pytest.raises(ValueError):
            CarpHeader(**{**_fields(good), field: value})
    with pytest.raises(ValueError):
        CarpHeader(**{**_fields(good), "hmac": b"short"})


def _fields(header: CarpHeader) -> dict[str, object]:
    return {name: getattr(header, name) for name in CarpHeader.__dataclass_fields__}


def test_every_packet_error_is_a_protocol_error_with_a_carpstats_name() -> None:
    stats = {
        ShortPacket: "hdrops",
        NotCarp: "hdrops",
        BadLength: "badlen",
        BadChecksum: "badsum",
        BadVersion: "badver",
        BadTtl: "badttl",
        BadAuthentication: "badauth",
        BadVhid: "badvhid",
    }
    for error, stat in stats.items():
        assert issubclass(error, CarpPacketError)
        assert issubclass(error, ProtocolError)
        assert error.stat == stat


# -- TTL --------------------------------------------------------------------------------


def test_ttl_rule() -> None:
    check_ttl(255, SOURCE, unicast=False)
    check_ttl(64, SOURCE, unicast=True)  # unicast peers may be routed (FreeBSD 14)
    with pytest.raises(
        BadTtl, match=r"CARP advert from 10\.77\.0\.1 has TTL 64, expected 255"
    ) as info:
        check_ttl(64, SOURCE, unicast=False)
    assert info.value.stat == "badttl"
    with pytest.raises(BadTtl, match="hop limit 1"):
        check_ttl(1, IPv6Address("fe80::2"), unicast=False)


# -- IPv4 envelope ------------------------------------------------------------------------


def test_ipv4_datagram_round_trip() -> None:
    header = advert(advskew=100)
    data = encode_ipv4_datagram(SOURCE, GROUP, header, ident=0x1234)
    assert len(data) == 20 + CARP_HEADER_LENGTH
    assert internet_checksum(data[:20]) == 0
    assert data[0] == 0x45 and data[1] == CARP_DEFAULT_TOS == 0xE0
    assert data[6] & 0x40  # DF
    envelope, decoded = decode_ipv4_datagram(data)
    assert decoded == header
    assert (envelope.source, envelope.destination) == (SOURCE, GROUP)
    assert (envelope.ttl, envelope.protocol, envelope.tos) == (255, CARP_PROTO, 0xE0)


def test_ipv4_datagram_with_options_and_low_ttl_decodes() -> None:
    data = encode_ipv4_datagram(SOURCE, GROUP, advert(), ttl=1, tos=0x10)
    with_options = bytes([0x46]) + data[1:2] + struct.pack("!H", len(data) + 4) + data[4:20]
    with_options += b"\x01\x01\x01\x00" + data[20:]  # NOP NOP NOP EOL
    envelope, header = decode_ipv4_datagram(with_options)
    assert envelope.ttl == 1 and envelope.tos == 0x10
    assert header == advert()


def ipv4(data: bytes, **fields: int) -> bytes:
    """Patch the IPv4 header of ``data``."""
    patched = bytearray(data)
    if "ihl" in fields:
        patched[0] = 0x40 | fields["ihl"]
    if "version" in fields:
        patched[0] = fields["version"] << 4 | (patched[0] & 0x0F)
    if "total" in fields:
        patched[2:4] = struct.pack("!H", fields["total"])
    if "protocol" in fields:
        patched[9] = fields["protocol"]
    return bytes(patched)


@pytest.mark.parametrize(
    ("patch", "error"),
    [
        ({"ihl": 4}, BadLength),
        ({"ihl": 15}, BadLength),
        ({"total": 19}, BadLength),
        ({"total": 57}, BadLength),
        ({"total": 40}, ShortPacket),  # CARP part shorter than its header
        ({"protocol": 17}, NotCarp),
        ({"version": 6}, NotCarp),
    ],
)
def test_ipv4_datagram_errors(patch: dict[str, int], error: type[CarpPacketError]) -> None:
    data = encode_ipv4_datagram(SOURCE, GROUP, advert())
    with pytest.raises(error) as info:
        decode_ipv4_datagram(ipv4(data, **patch))
    assert info.value.source == SOURCE


def test_ipv4_datagram_too_short_for_an_ip_header() -> None:
    with pytest.raises(ShortPacket, match="shorter than an IPv4 header"):
        decode_ipv4_datagram(b"\x45\x00")


def test_ipv4_payload_beyond_total_length_is_ignored() -> None:
    data = encode_ipv4_datagram(SOURCE, GROUP, advert())
    assert decode_ipv4_datagram(data + b"\x00" * 10)[1] == advert()


def test_ipv6_payload_is_the_bare_header() -> None:
    header = advert(vhid=9)
    assert decode_ipv6_payload(header.encode()) == header
    with pytest.raises(ShortPacket, match="from fe80::2"):
        decode_ipv6_payload(b"\x21", source=IPv6Address("fe80::2"))


# -- properties ----------------------------------------------------------------------------

headers = st.builds(
    CarpHeader,
    version=st.just(2),
    type=st.integers(0, 15),
    vhid=st.integers(1, 255),
    advskew=st.integers(0, 255),
    authlen=st.integers(0, 255),
    demote=st.integers(0, 255),
    advbase=st.integers(0, 255),
    counter=st.integers(0, 2**64 - 1),
    hmac=st.binary(min_size=20, max_size=20),
)


@given(headers)
def test_round_trip(header: CarpHeader) -> None:
    data = header.encode()
    assert len(data) == CARP_HEADER_LENGTH
    assert internet_checksum(data) == 0
    assert CarpHeader.decode(data) == header


@given(headers, st.ip_addresses(v=4), st.ip_addresses(v=4), st.integers(0, 255))
def test_ipv4_round_trip(
    header: CarpHeader, source: IPv4Address, destination: IPv4Address, ttl: int
) -> None:
    envelope, decoded = decode_ipv4_datagram(
        encode_ipv4_datagram(source, destination, header, ttl=ttl)
    )
    assert decoded == header
    assert (envelope.source, envelope.destination, envelope.ttl) == (source, destination, ttl)


@settings(max_examples=300)
@given(st.binary(max_size=80))
def test_arbitrary_bytes_only_raise_packet_errors(data: bytes) -> None:
    for decode in (CarpHeader.decode, decode_ipv4_datagram):
        with contextlib.suppress(CarpPacketError):
            decode(data)


@settings(max_examples=300)
@given(headers, st.data())
def test_arbitrary_ipv4_mutations_only_raise_packet_errors(
    header: CarpHeader, data: st.DataObject
) -> None:
    datagram = bytearray(encode_ipv4_datagram(SOURCE, GROUP, header))
    for _ in range(data.draw(st.integers(1, 4))):
        index = data.draw(st.integers(0, len(datagram) - 1))
        datagram[index] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(datagram)))
    with contextlib.suppress(CarpPacketError):
        decode_ipv4_datagram(bytes(datagram[:cut]))


@given(
    vhid=st.integers(1, 255),
    advbase=st.integers(0, 255),
    advskew=st.integers(0, 255),
    counter=st.integers(0, 2**64 - 1),
    password=st.binary(max_size=20),
    bit=st.integers(0, CARP_HEADER_LENGTH * 8 - 1),
)
def test_any_single_bit_flip_is_detected(
    vhid: int, advbase: int, advskew: int, counter: int, password: bytes, bit: int
) -> None:
    addresses = [CAPTURED_VIP, IPv6Address("2001:db8::100")]
    data = bytearray(build_advert(vhid, advbase, advskew, password, addresses, counter).encode())
    data[bit // 8] ^= 0x80 >> (bit % 8)
    with pytest.raises(CarpPacketError):
        verify_advert(CarpHeader.decode(bytes(data)), password, addresses)


@given(
    counter=st.integers(0, 2**64 - 1),
    password=st.binary(max_size=20),
    bit=st.integers(8, CARP_HEADER_LENGTH * 8 - 1),
)
def test_a_flip_in_vhid_counter_or_hmac_fails_authentication_even_with_a_fixed_checksum(
    counter: int, password: bytes, bit: int
) -> None:
    covered = list(range(8, 16)) + list(range(64, CARP_HEADER_LENGTH * 8))  # vhid, counter, HMAC
    bit = covered[bit % len(covered)]
    data = bytearray(build_advert(1, 1, 0, password, [CAPTURED_VIP], counter).encode())
    data[bit // 8] ^= 0x80 >> (bit % 8)
    try:
        header = CarpHeader.decode(reencoded(bytes(data)))
    except BadVhid:
        return  # the flip made vhid 0, rejected before authentication
    with pytest.raises(BadAuthentication):
        verify_advert(header, password, [CAPTURED_VIP])
