"""CARP wire format: the 36-byte advertisement, its checksum and its HMAC.

This module owns the bytes.  It turns them into a frozen :class:`CarpHeader`
and back, validates every field it can validate without knowing the local
configuration, computes FreeBSD's HMAC-SHA1 exactly, and unwraps the IPv4
datagrams a Linux ``socket(AF_INET, SOCK_RAW, 112)`` returns.  It never reads
a clock or touches a socket; the daemon does that and calls in here.

Facts this module follows (FreeBSD sys/netinet/ip_carp.[ch], OpenBSD
ip_carp.c, checked byte-for-byte against captured ucarp adverts):

* header: ``version<<4 | type`` (0x21), vhid, advskew, authlen (7), a reserved
  byte (OpenBSD's demote count; FreeBSD writes 0 and ignores it), advbase,
  checksum, a 64-bit counter, a 20-byte HMAC-SHA1;
* the checksum is the RFC 1071 Internet checksum over the 36 header bytes
  only, without a pseudo-header, for IPv4 *and* IPv6.  Bytes after the header
  are accepted and ignored (FreeBSD only requires ``len >= header``);
* the HMAC key is the password (at most 20 bytes, zero padded: plain RFC 2104)
  and the message is ``02 01 vhid``, the vhid's IPv4 addresses in ascending
  numeric order, its IPv6 addresses in ascending byte order (the scope word of
  link-local addresses zeroed), then the 8 counter bytes as sent.  Like
  FreeBSD's selection loop, each address is hashed once, and ``0.0.0.0``,
  ``255.255.255.255``, ``::`` and ``ffff:...:ffff`` never are.

Errors are :class:`CarpPacketError` subclasses whose ``stat`` names the
``struct carpstats`` counter (``netstat -s -p carp``) the daemon increments.
"""

from __future__ import annotations

import hashlib
import hmac
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv6Address

from carpool.errors import ProtocolError

__all__ = [
    "CARP_AUTHLEN",
    "CARP_DEFAULT_TOS",
    "CARP_GROUP_V4",
    "CARP_GROUP_V6",
    "CARP_HEADER_LENGTH",
    "CARP_HMAC_LENGTH",
    "CARP_KEY_LENGTH",
    "CARP_PROTO",
    "CARP_TTL",
    "CARP_TYPE_ADVERTISEMENT",
    "CARP_VERSION",
    "IPV4_HEADER_LENGTH",
    "BadAuthentication",
    "BadChecksum",
    "BadLength",
    "BadTtl",
    "BadVersion",
    "BadVhid",
    "CarpHeader",
    "CarpPacketError",
    "Ipv4Envelope",
    "NotCarp",
    "ShortPacket",
    "build_advert",
    "carp_hmac",
    "carp_hmac_message",
    "check_ttl",
    "decode_ipv4_datagram",
    "decode_ipv6_payload",
    "encode_ipv4_datagram",
    "internet_checksum",
    "verify_advert",
]

CARP_PROTO = 112
CARP_GROUP_V4 = "224.0.0.18"
CARP_GROUP_V6 = "ff02::12"
CARP_TTL = 255
CARP_HEADER_LENGTH = 36
CARP_VERSION = 2
CARP_TYPE_ADVERTISEMENT = 1
CARP_AUTHLEN = 7
CARP_KEY_LENGTH = 20
CARP_HMAC_LENGTH = 20
#: TOS byte of FreeBSD's adverts: DSCP 56 (``net.inet.carp.dscp``) shifted left by 2.
CARP_DEFAULT_TOS = 56 << 2
IPV4_HEADER_LENGTH = 20

_HEADER = struct.Struct("!BBBBBBHQ20s")
_IPV4 = struct.Struct("!BBHHHBBH4s4s")
_IPV4_DONT_FRAGMENT = 0x4000
_COUNTER_MAX = (1 << 64) - 1

Address = IPv4Address | IPv6Address


class CarpPacketError(ProtocolError):
    """Bytes that are not a valid CARP advertisement."""

    stat = "hdrops"

    def __init__(self, message: str, *, source: Address | None = None) -> None:
        super().__init__(message)
        self.source = source


class ShortPacket(CarpPacketError):
    """Fewer bytes than a header (IPv4 or CARP) needs."""

    stat = "hdrops"


class NotCarp(CarpPacketError):
    """Not an IPv4 datagram carrying IP protocol 112."""

    stat = "hdrops"


class BadLength(CarpPacketError):
    """IPv4 header length fields that contradict each other or the data."""

    stat = "badlen"


class BadChecksum(CarpPacketError):
    """The CARP checksum does not add up."""

    stat = "badsum"


class BadVersion(CarpPacketError):
    """A CARP version other than 2 (VRRPv3 also uses protocol 112)."""

    stat = "badver"


class BadTtl(CarpPacketError):
    """A multicast advert whose TTL or hop limit is not 255 (it was routed)."""

    stat = "badttl"


class BadAuthentication(CarpPacketError):
    """The HMAC does not match our password and address list."""

    stat = "badauth"


class BadVhid(CarpPacketError):
    """A vhid this host does not run (or vhid 0, which nobody may run)."""

    stat = "badvhid"


def _origin(source: Address | None) -> str:
    return f" from {source}" if source is not None else ""


def internet_checksum(data: bytes) -> int:
    """RFC 1071 one's-complement checksum of ``data`` (odd lengths zero padded)."""
    if len(data) % 2:
        data += b"\x00"
    total: int = sum(int.from_bytes(data[i : i + 2], "big") for i in range(0, len(data), 2))
    while total > 0xFFFF:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def _check_range(name: str, value: int, low: int, high: int) -> None:
    if not low <= value <= high:
        raise ValueError(f"{name} must be in {low}..{high}, not {value}")


@dataclass(frozen=True, slots=True)
class CarpHeader:
    """One CARP header as it travels (``struct carp_header``)."""

    version: int
    type: int
    vhid: int
    advskew: int
    authlen: int
    demote: int
    advbase: int
    counter: int
    hmac: bytes

    def __post_init__(self) -> None:
        _check_range("version", self.version, 0, 15)
        _check_range("type", self.type, 0, 15)
        _check_range("vhid", self.vhid, 1, 255)
        for name in ("advskew", "authlen", "demote", "advbase"):
            _check_range(name, getattr(self, name), 0, 255)
        _check_range("counter", self.counter, 0, _COUNTER_MAX)
        if len(self.hmac) != CARP_HMAC_LENGTH:
            raise ValueError(f"hmac must be {CARP_HMAC_LENGTH} bytes, not {len(self.hmac)}")

    def encode(self) -> bytes:
        """The 36 header bytes with the checksum filled in."""
        unsummed = self._pack(0)
        return self._pack(internet_checksum(unsummed))

    def _pack(self, checksum: int) -> bytes:
        return _HEADER.pack(
            self.version << 4 | self.type,
            self.vhid,
            self.advskew,
            self.authlen,
            self.demote,
            self.advbase,
            checksum,
            self.counter,
            self.hmac,
        )

    @classmethod
    def decode(cls, data: bytes, *, source: Address | None = None) -> CarpHeader:
        """Parse and validate the CARP header at the start of ``data``.

        ``source`` only serves the error messages.  Raises ShortPacket,
        BadChecksum, BadVersion or BadVhid.
        """
        if len(data) < CARP_HEADER_LENGTH:
            raise ShortPacket(
                f"CARP packet{_origin(source)} has {len(data)} bytes, "
                f"shorter than the {CARP_HEADER_LENGTH}-byte header",
                source=source,
            )
        header = bytes(data[:CARP_HEADER_LENGTH])
        residue = internet_checksum(header)
        if residue != 0:
            (sent,) = struct.unpack_from("!H", header, 6)
            raise BadChecksum(
                f"CARP advert{_origin(source)} has a bad checksum "
                f"(0x{sent:04x} does not sum to zero over the {CARP_HEADER_LENGTH} bytes)",
                source=source,
            )
        version_type, vhid, advskew, authlen, demote, advbase, _sum, counter, digest = (
            _HEADER.unpack(header)
        )
        version = version_type >> 4
        if version != CARP_VERSION:
            hint = " (VRRPv3 uses the same protocol number)" if version == 3 else ""
            raise BadVersion(
                f"CARP advert{_origin(source)} has version {version}, "
                f"expected {CARP_VERSION}{hint}",
                source=source,
            )
        if vhid == 0:
            raise BadVhid(
                f"CARP advert{_origin(source)} has vhid 0; vhids are 1..255", source=source
            )
        return cls(
            version=version,
            type=version_type & 0x0F,
            vhid=vhid,
            advskew=advskew,
            authlen=authlen,
            demote=demote,
            advbase=advbase,
            counter=counter,
            hmac=digest,
        )


def _scope_cleared(address: IPv6Address) -> bytes:
    """``address`` as FreeBSD hashes it: the embedded scope word zeroed.

    Only scoped addresses (link-local unicast, interface- and link-local
    multicast) can carry the KAME embedded scope in bytes 2..3.
    """
    packed = address.packed
    scoped = (packed[0] == 0xFE and packed[1] & 0xC0 == 0x80) or (
        packed[0] == 0xFF and packed[1] & 0x0F in (1, 2)
    )
    if scoped:
        return packed[:2] + b"\x00\x00" + packed[4:]
    return packed


def carp_hmac_message(
    vhid: int, addresses: Iterable[IPv4Address | IPv6Address], counter: int
) -> bytes:
    """The bytes FreeBSD feeds to HMAC-SHA1 for an advert of ``vhid``."""
    _check_range("vhid", vhid, 0, 255)
    _check_range("counter", counter, 0, _COUNTER_MAX)
    inet: set[int] = set()
    inet6: set[bytes] = set()
    for address in addresses:
        if isinstance(address, IPv4Address):
            inet.add(int(address))
        else:
            inet6.add(_scope_cleared(address))
    message = bytearray((CARP_VERSION, CARP_TYPE_ADVERTISEMENT, vhid))
    for value in sorted(inet):
        if 0 < value < 0xFFFFFFFF:
            message += value.to_bytes(4, "big")
    lowest6, highest6 = bytes(16), b"\xff" * 16
    for packed in sorted(inet6):
        if lowest6 < packed < highest6:
            message += packed
    message += counter.to_bytes(8, "big")
    return bytes(message)


def carp_hmac(
    password: bytes,
    vhid: int,
    addresses: Iterable[IPv4Address | IPv6Address],
    counter: int,
) -> bytes:
    """FreeBSD's advert HMAC-SHA1 (``carp_hmac_generate``)."""
    key = password[:CARP_KEY_LENGTH]
    return hmac.new(key, carp_hmac_message(vhid, addresses, counter), hashlib.sha1).digest()


def build_advert(
    vhid: int,
    advbase: int,
    advskew: int,
    password: bytes,
    addresses: Iterable[IPv4Address | IPv6Address],
    counter: int,
    demote: int = 0,
) -> CarpHeader:
    """A signed advertisement header, ready for :meth:`CarpHeader.encode`."""
    return CarpHeader(
        version=CARP_VERSION,
        type=CARP_TYPE_ADVERTISEMENT,
        vhid=vhid,
        advskew=advskew,
        authlen=CARP_AUTHLEN,
        demote=demote,
        advbase=advbase,
        counter=counter,
        hmac=carp_hmac(password, vhid, addresses, counter),
    )


def verify_advert(
    header: CarpHeader,
    password: bytes,
    addresses: Iterable[IPv4Address | IPv6Address],
    *,
    source: Address | None = None,
) -> None:
    """Raise BadAuthentication unless ``header``'s HMAC matches (constant time)."""
    expected = carp_hmac(password, header.vhid, addresses, header.counter)
    if not hmac.compare_digest(expected, header.hmac):
        raise BadAuthentication(
            f"CARP advert{_origin(source)} for vhid {header.vhid} failed authentication; "
            "both nodes need the same pass and the same addresses on the vhid",
            source=source,
        )


def check_ttl(ttl: int, source: Address, unicast: bool) -> None:
    """FreeBSD's TTL rule: multicast adverts must arrive with TTL/hop limit 255.

    In unicast (``peer``) mode the check is skipped, as FreeBSD 14 does, so
    that peers may be routed.
    """
    if unicast or ttl == CARP_TTL:
        return
    what = "hop limit" if isinstance(source, IPv6Address) else "TTL"
    raise BadTtl(f"CARP advert from {source} has {what} {ttl}, expected {CARP_TTL}", source=source)


@dataclass(frozen=True, slots=True)
class Ipv4Envelope:
    """The IPv4 header fields of a received advert that carpd looks at."""

    source: IPv4Address
    destination: IPv4Address
    ttl: int
    protocol: int
    tos: int


def decode_ipv4_datagram(data: bytes) -> tuple[Ipv4Envelope, CarpHeader]:
    """Split what a Linux raw IPv4 socket returns into envelope and CARP header.

    Linux hands raw sockets the IPv4 header as it was on the wire (total length
    in network order, options included).  The TTL is *not* checked here; call
    :func:`check_ttl`, which knows about unicast mode.
    """
    if len(data) < IPV4_HEADER_LENGTH:
        raise ShortPacket(f"IPv4 datagram of {len(data)} bytes is shorter than an IPv4 header")
    (version_ihl, tos, total_length, _ident, _fragment, ttl, protocol, _checksum, src, dst) = (
        _IPV4.unpack_from(data)
    )
    source = IPv4Address(src)
    destination = IPv4Address(dst)
    if version_ihl >> 4 != 4:
        raise NotCarp(
            f"datagram from {source} has IP version {version_ihl >> 4}, expected 4", source=source
        )
    header_length = (version_ihl & 0x0F) * 4
    if header_length < IPV4_HEADER_LENGTH:
        raise BadLength(
            f"IPv4 datagram from {source} has header length {header_length}, "
            f"less than {IPV4_HEADER_LENGTH}",
            source=source,
        )
    if header_length > len(data):
        raise BadLength(
            f"IPv4 datagram from {source} has header length {header_length} "
            f"but only {len(data)} bytes",
            source=source,
        )
    if total_length < header_length or total_length > len(data):
        raise BadLength(
            f"IPv4 datagram from {source} has total length {total_length}, "
            f"received {len(data)} bytes with a {header_length}-byte header",
            source=source,
        )
    if protocol != CARP_PROTO:
        raise NotCarp(
            f"datagram from {source} carries IP protocol {protocol}, not CARP ({CARP_PROTO})",
            source=source,
        )
    envelope = Ipv4Envelope(
        source=source, destination=destination, ttl=ttl, protocol=protocol, tos=tos
    )
    header = CarpHeader.decode(data[header_length:total_length], source=source)
    return envelope, header


def encode_ipv4_datagram(
    source: IPv4Address,
    destination: IPv4Address,
    header: CarpHeader,
    ttl: int = CARP_TTL,
    tos: int = CARP_DEFAULT_TOS,
    ident: int = 0,
) -> bytes:
    """A complete IPv4 datagram (DF set, header checksum filled in) around ``header``."""
    _check_range("ttl", ttl, 0, 255)
    _check_range("tos", tos, 0, 255)
    _check_range("ident", ident, 0, 0xFFFF)
    payload = header.encode()
    total_length = IPV4_HEADER_LENGTH + len(payload)

    def pack(checksum: int) -> bytes:
        return _IPV4.pack(
            0x45,
            tos,
            total_length,
            ident,
            _IPV4_DONT_FRAGMENT,
            ttl,
            CARP_PROTO,
            checksum,
            source.packed,
            destination.packed,
        )

    return pack(internet_checksum(pack(0))) + payload


def decode_ipv6_payload(data: bytes, *, source: IPv6Address | None = None) -> CarpHeader:
    """The CARP header of an IPv6 advert (the kernel strips the IPv6 header).

    The hop limit comes from ancillary data (``IPV6_RECVHOPLIMIT``); check it
    with :func:`check_ttl`.
    """
    return CarpHeader.decode(data, source=source)
