"""carpd's configuration: the CARP lines of an rc.conf-style file.

This module owns the *meaning* of the lines FreeBSD puts in ``/etc/rc.conf``
and ``/etc/sysctl.conf`` for CARP, read through :mod:`carpool.rcconf`:

``ifconfig_<if>="inet 10.0.0.1 netmask 255.255.255.0"``
    the interface's own address (:class:`InterfaceConfig`); ``up``, ``DHCP``
    and other interface flags are tolerated and ignored.
``ifconfig_<if>_ipv6="inet6 2001:db8::1 prefixlen 64"``
    the same for IPv6.
``ifconfig_<if>_alias<N>="vhid 1 advskew 0 pass secret alias 10.0.0.100/32"``
    a CARP address (:class:`VhidConfig`).  The words may come in any order
    FreeBSD's ifconfig accepts: ``inet``/``inet6``, ``vhid N``, ``advbase N``,
    ``advskew N``, ``pass WORD``, ``peer A.B.C.D``, ``peer6 X::Y``,
    ``mcast``/``mcast6``, ``alias``, and the address as ``A.B.C.D/len``,
    ``A.B.C.D netmask M`` (dotted or ``0x``), ``X::Y/len`` or
    ``X::Y prefixlen N``.  Lines of the same (interface, vhid) add their
    addresses to one vhid; a setting given on two lines must agree.
    carpool adds one word, ``vmac``: the vhid's addresses then live on a
    macvlan with FreeBSD's virtual MAC 00:00:5e:00:01:<vhid>, so that
    neighbours and switches never have to relearn a MAC on failover.
``net.inet.carp.<name>=<value>``
    carp(4)'s sysctls: preempt, allow, log, demotion, dscp,
    ifdown_demotion_factor, senderr_demotion_factor.

Everything else (``pfsync_enable``, ``hastd_enable``, ``relayd_enable``, other
sysctls...) belongs to other daemons and is ignored.  As in sh, when a variable
is assigned twice the last assignment counts.

Limits use FreeBSD's numbers: vhid 1..255, advskew 0..254, a key of at most
20 bytes.  advbase may be 0..255: 0 is OpenBSD's sub-second mode, where a
master advertises every advskew/256 s (1/256 s when advskew is 0) and a backup
declares it dead after 3*advskew/256 s (3/256 s).  Addresses without a prefix
get /32 (IPv4) or /64 (IPv6).  Every error is a :class:`ConfigError` pointing
at file, line and column of the offending word.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from ipaddress import (
    AddressValueError,
    IPv4Address,
    IPv4Interface,
    IPv6Address,
    IPv6Interface,
    NetmaskValueError,
    ip_address,
    ip_interface,
)
from typing import Generic, TypeVar

from carpool.configfile import read_config_text
from carpool.errors import ConfigError
from carpool.rcconf import RcAssignment, effective_assignments, parse_rcconf

__all__ = [
    "CARP_SYSCTL_PREFIX",
    "DEFAULT_ADVBASE",
    "MAX_ADVBASE",
    "MAX_ADVSKEW",
    "MAX_PASSWORD_BYTES",
    "MAX_VHID",
    "CarpConfig",
    "InterfaceConfig",
    "VhidConfig",
    "load_config",
    "parse_config",
]

CARP_SYSCTL_PREFIX = "net.inet.carp."
MAX_VHID = 255
MAX_ADVBASE = 255
MAX_ADVSKEW = 254
MAX_PASSWORD_BYTES = 20
DEFAULT_ADVBASE = 1
#: ifconfig's prefix length for an inet6 address given without one.
DEFAULT_PREFIXLEN6 = 64

Interface = IPv4Interface | IPv6Interface
_T = TypeVar("_T")


@dataclass(frozen=True, slots=True)
class VhidConfig:
    """One CARP virtual host: a vhid on an interface with its addresses."""

    ifname: str
    vhid: int
    advbase: int = DEFAULT_ADVBASE
    advskew: int = 0
    password: bytes = b""
    addresses: tuple[IPv4Interface | IPv6Interface, ...] = ()
    peer: IPv4Address | None = None
    peer6: IPv6Address | None = None
    vmac: bool = False

    def __post_init__(self) -> None:
        if not 1 <= self.vhid <= MAX_VHID:
            raise ValueError(f"vhid must be in 1..{MAX_VHID}, not {self.vhid}")
        if not 0 <= self.advbase <= MAX_ADVBASE:
            raise ValueError(f"advbase must be in 0..{MAX_ADVBASE}, not {self.advbase}")
        if not 0 <= self.advskew <= MAX_ADVSKEW:
            raise ValueError(f"advskew must be in 0..{MAX_ADVSKEW}, not {self.advskew}")
        if len(self.password) > MAX_PASSWORD_BYTES:
            raise ValueError(f"password must be at most {MAX_PASSWORD_BYTES} bytes")

    @property
    def key(self) -> tuple[str, int]:
        """(ifname, vhid): what identifies the vhid on this host."""
        return (self.ifname, self.vhid)

    @property
    def addresses4(self) -> tuple[IPv4Address, ...]:
        """The IPv4 addresses (without prefix), as the HMAC needs them."""
        return tuple(a.ip for a in self.addresses if isinstance(a, IPv4Interface))

    @property
    def addresses6(self) -> tuple[IPv6Address, ...]:
        """The IPv6 addresses (without prefix), as the HMAC needs them."""
        return tuple(a.ip for a in self.addresses if isinstance(a, IPv6Interface))

    @property
    def ip_addresses(self) -> tuple[IPv4Address | IPv6Address, ...]:
        """All addresses without prefix: ``addresses4 + addresses6``."""
        return self.addresses4 + self.addresses6


@dataclass(frozen=True, slots=True)
class InterfaceConfig:
    """An interface's own (non-CARP) addresses from ``ifconfig_<if>``."""

    ifname: str
    addresses: tuple[IPv4Interface | IPv6Interface, ...] = ()


@dataclass(frozen=True, slots=True)
class CarpConfig:
    """Everything carpd reads from its configuration file."""

    vhids: tuple[VhidConfig, ...] = ()
    interfaces: tuple[InterfaceConfig, ...] = ()
    preempt: bool = False
    allow: bool = True
    log: int = 1
    dscp: int = 56
    demotion: int = 0
    ifdown_demotion_factor: int = 240
    senderr_demotion_factor: int = 240
    path: str = "<string>"

    def find_vhid(self, ifname: str, vhid: int) -> VhidConfig | None:
        """The vhid configured as ``vhid`` on ``ifname``, if any."""
        for candidate in self.vhids:
            if candidate.ifname == ifname and candidate.vhid == vhid:
                return candidate
        return None

    def find_interface(self, ifname: str) -> InterfaceConfig | None:
        """The interface configuration of ``ifname``, if any."""
        for candidate in self.interfaces:
            if candidate.ifname == ifname:
                return candidate
        return None

    @property
    def ifnames(self) -> tuple[str, ...]:
        """Interfaces that carry vhids, in order of first appearance."""
        return tuple(dict.fromkeys(v.ifname for v in self.vhids))


def load_config(path: str) -> CarpConfig:
    """Read carpd's configuration file."""
    return parse_config(read_config_text(path), path)


def parse_config(text: str, path: str = "<string>") -> CarpConfig:
    """Parse carpd's configuration from rc.conf-style ``text``."""
    builder = _ConfigBuilder(path)
    winners = effective_assignments(parse_rcconf(text, path))
    for assignment in sorted(winners.values(), key=lambda a: (a.line, a.name_column)):
        builder.feed(assignment)
    return builder.finish()


# --------------------------------------------------------------------------
# Parsing of ifconfig words
# --------------------------------------------------------------------------

_INTEGER = re.compile(r"[0-9]+")
_SIGNED_INTEGER = re.compile(r"-?[0-9]+")
_ALIAS = re.compile(r"ifconfig_(?P<ifname>.+)_alias(?P<number>[0-9]+)")
_IPV6_LINE = re.compile(r"ifconfig_(?P<ifname>.+)_ipv6")
_ALIASES = re.compile(r"ifconfig_(?P<ifname>.+)_aliases")
_IGNORED_IFCONFIG = re.compile(r"ifconfig_(?:DEFAULT|.+_(?:name|descr))")
_INTERFACE_LINE = re.compile(r"ifconfig_(?P<ifname>.+)")

# ifconfig words carpd ignores on an interface line, and how many arguments
# each takes.  Bare flags (up, DHCP, -rxcsum, ...) need no entry.
_OPTION_ARGUMENTS = {
    "broadcast": 1,
    "mtu": 1,
    "media": 1,
    "mediaopt": 1,
    "-mediaopt": 1,
    "metric": 1,
    "description": 1,
    "descr": 1,
    "name": 1,
    "vlan": 1,
    "vlandev": 1,
    "vlanpcp": 1,
    "vlanproto": 1,
    "laggproto": 1,
    "laggport": 1,
    "-laggport": 1,
    "fib": 1,
    "tunnelfib": 1,
    "ether": 1,
    "lladdr": 1,
    "link": 1,
    "ssid": 1,
    "channel": 1,
    "wlandev": 1,
    "country": 1,
    "tunnel": 2,
}
_NON_INET_FAMILIES = frozenset({"ether", "lladdr", "link", "atalk", "ipx"})
_CARP_WORDS = ("advbase", "advskew", "pass", "peer", "peer6", "mcast", "mcast6", "vmac")


@dataclass(slots=True)
class _Word:
    text: str
    offset: int


@dataclass(slots=True)
class _Setting(Generic[_T]):
    """A value given explicitly on one line, with where it was given."""

    value: _T
    line: int
    column: int
    token: str


@dataclass(slots=True)
class _IfconfigLine:
    """What one ifconfig value says, before it is merged with other lines."""

    assignment: RcAssignment
    ifname: str
    family: str | None = None
    address: IPv4Interface | IPv6Interface | None = None
    address_word: _Word | None = None
    vhid: _Setting[int] | None = None
    advbase: _Setting[int] | None = None
    advskew: _Setting[int] | None = None
    password: _Setting[bytes] | None = None
    peer: _Setting[IPv4Address | None] | None = None
    peer6: _Setting[IPv6Address | None] | None = None
    vmac: _Setting[bool] | None = None
    carp_word: _Word | None = None
    foreign_family: _Word | None = None
    ignored: list[_Word] = field(default_factory=list)


def _split_words(value: str) -> list[_Word]:
    return [_Word(m.group(), m.start()) for m in re.finditer(r"\S+", value)]


class _IfconfigParser:
    """Reads the words of one ``ifconfig_*`` value."""

    def __init__(self, assignment: RcAssignment, ifname: str, family: str | None) -> None:
        self.assignment = assignment
        self.words = _split_words(assignment.value)
        self.index = 0
        self.result = _IfconfigLine(assignment=assignment, ifname=ifname, family=family)
        self.prefix: int | None = None
        self.prefix_word: _Word | None = None
        self.cidr = False

    def error(self, message: str, word: _Word | None) -> ConfigError:
        if word is None:
            return self.assignment.error(message)
        return self.assignment.error(message, offset=word.offset, token=word.text)

    def setting(self, word: _Word, value: _T) -> _Setting[_T]:
        column = self.assignment.column_of(word.offset)
        return _Setting(value, self.assignment.line, column, word.text)

    def argument(self, keyword: _Word) -> _Word:
        if self.index >= len(self.words):
            raise self.error(f"{keyword.text} needs a value", keyword)
        word = self.words[self.index]
        self.index += 1
        return word

    def integer(self, keyword: _Word, low: int, high: int, explain: str = "") -> tuple[_Word, int]:
        word = self.argument(keyword)
        if not _INTEGER.fullmatch(word.text) or not low <= int(word.text) <= high:
            raise self.error(f"{keyword.text} must be a number in {low}..{high}{explain}", word)
        return word, int(word.text)

    def parse(self) -> _IfconfigLine:
        result = self.result
        while self.index < len(self.words):
            word = self.words[self.index]
            self.index += 1
            self.word(word)
        if result.address is not None and self.prefix is not None:
            result.address = ip_interface(f"{result.address.ip}/{self.prefix}")
        elif isinstance(result.address, IPv6Interface) and not self.cidr:
            result.address = IPv6Interface(f"{result.address.ip}/{DEFAULT_PREFIXLEN6}")
        elif self.prefix_word is not None and result.address is None:
            raise self.error(f"{self.prefix_word.text} without an address", self.prefix_word)
        return result

    def word(self, word: _Word) -> None:
        result = self.result
        text = word.text
        if text in ("inet", "inet6"):
            if result.family is not None and result.family != text:
                raise self.error(f"{text} after {result.family}: one address family per line", word)
            if result.address is not None and _family_of(result.address) != text:
                raise self.error(f"{text} does not match the address {result.address.ip}", word)
            result.family = text
        elif text == "vhid":
            number_word, number = self.integer(word, 1, MAX_VHID)
            result.vhid = self.setting(word, number)
        elif text == "advbase":
            number_word, number = self.integer(
                word, 0, MAX_ADVBASE, " (0 is OpenBSD's sub-second mode)"
            )
            result.advbase = self.setting(number_word, number)
            result.carp_word = result.carp_word or word
        elif text == "advskew":
            number_word, number = self.integer(word, 0, MAX_ADVSKEW)
            result.advskew = self.setting(number_word, number)
            result.carp_word = result.carp_word or word
        elif text == "pass":
            # errors about the key point at the word "pass", so the key itself
            # never ends up in an error message or a log
            password = self.argument(word).text.encode("utf-8")
            if len(password) > MAX_PASSWORD_BYTES:
                raise self.error(
                    f"pass is longer than {MAX_PASSWORD_BYTES} bytes; "
                    f"FreeBSD uses at most {MAX_PASSWORD_BYTES}",
                    word,
                )
            result.password = self.setting(word, password)
            result.carp_word = result.carp_word or word
        elif text == "peer":
            target = self.argument(word)
            result.peer = self.setting(target, self.peer4(target))
            result.carp_word = result.carp_word or word
        elif text == "peer6":
            target = self.argument(word)
            result.peer6 = self.setting(target, self.peer6(target))
            result.carp_word = result.carp_word or word
        elif text == "mcast":
            result.peer = self.setting(word, None)
            result.carp_word = result.carp_word or word
        elif text == "mcast6":
            result.peer6 = self.setting(word, None)
            result.carp_word = result.carp_word or word
        elif text == "vmac":
            result.vmac = self.setting(word, True)
            result.carp_word = result.carp_word or word
        elif text == "state":
            raise self.error("state is a runtime command; use carpctl", word)
        elif text == "alias":
            pass
        elif text in ("-alias", "delete", "remove"):
            raise self.error(
                f"{text} removes an address; it has no place in a configuration file", word
            )
        elif text == "netmask":
            self.netmask(word)
        elif text == "prefixlen":
            self.prefixlen(word)
        elif text in _NON_INET_FAMILIES:
            result.foreign_family = result.foreign_family or word
            self.skip_arguments(word)
        elif text in _OPTION_ARGUMENTS:
            result.ignored.append(word)
            self.skip_arguments(word)
        elif _looks_like_address(text):
            self.address(word)
        else:
            result.ignored.append(word)

    def skip_arguments(self, word: _Word) -> None:
        for _ in range(_OPTION_ARGUMENTS.get(word.text, 0)):
            self.argument(word)

    def peer4(self, word: _Word) -> IPv4Address:
        address = _ip_or_none(word.text)
        if not isinstance(address, IPv4Address):
            raise self.error("peer needs an IPv4 address (peer6 is for IPv6)", word)
        return address

    def peer6(self, word: _Word) -> IPv6Address:
        address = _ip_or_none(word.text)
        if not isinstance(address, IPv6Address):
            raise self.error("peer6 needs an IPv6 address (peer is for IPv4)", word)
        return address

    def address(self, word: _Word) -> None:
        result = self.result
        if result.address is not None:
            raise self.error(
                "more than one address on one line; use one ifconfig_<if>_alias<N> per address",
                word,
            )
        text, slash, prefix_text = word.text.partition("/")
        address = _ip_or_none(text)
        if address is None:
            raise self.error("not a valid IPv4 or IPv6 address", word)
        if slash and (
            not _INTEGER.fullmatch(prefix_text) or int(prefix_text) > address.max_prefixlen
        ):
            raise self.error(
                f"the prefix length after '/' must be a number in 0..{address.max_prefixlen}",
                word,
            )
        parsed = ip_interface(f"{address}/{int(prefix_text) if slash else address.max_prefixlen}")
        if result.family is not None and _family_of(parsed) != result.family:
            raise self.error(f"{word.text.split('/')[0]} is not an {result.family} address", word)
        if "/" in word.text:
            if self.prefix_word is not None:
                raise self.error("the prefix length is given twice", word)
            self.cidr = True
        result.address = parsed
        result.address_word = word
        if self.prefix is not None:
            self.check_prefix_family()

    def netmask(self, word: _Word) -> None:
        mask_word = self.argument(word)
        self.claim_prefix(word)
        prefix = _netmask_prefix(mask_word.text)
        if prefix is None:
            raise self.error(
                "netmask must be a contiguous mask, dotted (255.255.255.0) or hex (0xffffff00)",
                mask_word,
            )
        self.prefix = prefix
        self.prefix_word = word
        if self.result.family == "inet6":
            raise self.error("netmask is for inet; use prefixlen for inet6", word)
        self.check_prefix_family()

    def prefixlen(self, word: _Word) -> None:
        number_word = self.argument(word)
        self.claim_prefix(word)
        high = 32 if self.result.family == "inet" else 128
        if not _INTEGER.fullmatch(number_word.text) or int(number_word.text) > high:
            raise self.error(f"prefixlen must be a number in 0..{high}", number_word)
        self.prefix = int(number_word.text)
        self.prefix_word = word
        self.check_prefix_family()

    def claim_prefix(self, word: _Word) -> None:
        if self.cidr or self.prefix_word is not None:
            raise self.error("the prefix length is given twice", word)

    def check_prefix_family(self) -> None:
        address = self.result.address
        if address is None or self.prefix is None or self.prefix_word is None:
            return
        if self.prefix_word.text == "netmask" and isinstance(address, IPv6Interface):
            raise self.error("netmask is for inet; use prefixlen for inet6", self.prefix_word)
        if self.prefix > address.max_prefixlen:
            raise self.error(
                f"prefix length {self.prefix} is too long for {address.ip}", self.prefix_word
            )


def _ip_or_none(text: str) -> IPv4Address | IPv6Address | None:
    try:
        return ip_address(text)
    except ValueError:
        return None


def _family_of(address: IPv4Interface | IPv6Interface) -> str:
    return "inet" if isinstance(address, IPv4Interface) else "inet6"


def _looks_like_address(text: str) -> bool:
    head = text.split("/", 1)[0]
    return bool(head) and (":" in head or (head[0].isdigit() and "." in head))


def _netmask_prefix(text: str) -> int | None:
    if text.lower().startswith("0x"):
        digits = text[2:]
        if not re.fullmatch(r"[0-9a-fA-F]{1,8}", digits):
            return None
        value = int(digits, 16)
    else:
        try:
            value = int(IPv4Address(text))
        except (AddressValueError, NetmaskValueError):
            return None
    inverted = ~value & 0xFFFFFFFF
    if inverted & (inverted + 1):
        return None
    return 32 - inverted.bit_length()


# --------------------------------------------------------------------------
# Merging lines into a configuration
# --------------------------------------------------------------------------


@dataclass(slots=True)
class _VhidBuilder:
    ifname: str
    vhid: int
    first: _Setting[int]
    advbase: _Setting[int] | None = None
    advskew: _Setting[int] | None = None
    password: _Setting[bytes] | None = None
    peer: _Setting[IPv4Address | None] | None = None
    peer6: _Setting[IPv6Address | None] | None = None
    vmac: _Setting[bool] | None = None
    addresses: list[IPv4Interface | IPv6Interface] = field(default_factory=list)

    def build(self) -> VhidConfig:
        return VhidConfig(
            ifname=self.ifname,
            vhid=self.vhid,
            advbase=self.advbase.value if self.advbase else DEFAULT_ADVBASE,
            advskew=self.advskew.value if self.advskew else 0,
            password=self.password.value if self.password else b"",
            addresses=tuple(self.addresses),
            peer=self.peer.value if self.peer else None,
            peer6=self.peer6.value if self.peer6 else None,
            vmac=self.vmac.value if self.vmac else False,
        )


def _describe_peer(value: object) -> str:
    return "mcast" if value is None else str(value)


class _ConfigBuilder:
    def __init__(self, path: str) -> None:
        self.path = path
        self.vhids: dict[tuple[str, int], _VhidBuilder] = {}
        self.interfaces: dict[str, list[IPv4Interface | IPv6Interface]] = {}
        self.address_owners: dict[IPv4Address | IPv6Address, tuple[str, int]] = {}
        self.sysctls: dict[str, object] = {}

    def feed(self, assignment: RcAssignment) -> None:
        name = assignment.name
        if name.startswith(CARP_SYSCTL_PREFIX):
            self.sysctl(assignment)
        elif "." in name or not name.startswith("ifconfig_") or _IGNORED_IFCONFIG.fullmatch(name):
            return
        elif match := _ALIAS.fullmatch(name):
            self.ifconfig(assignment, match.group("ifname"), None)
        elif match := _IPV6_LINE.fullmatch(name):
            self.ifconfig(assignment, match.group("ifname"), "inet6")
        elif match := _ALIASES.fullmatch(name):
            if "vhid" in assignment.value.split():
                raise ConfigError(
                    "carpd does not read ifconfig_<if>_aliases; "
                    "write one ifconfig_<if>_alias<N> line per CARP address",
                    path=assignment.path,
                    line=assignment.line,
                    column=assignment.name_column,
                    token=name,
                )
        elif match := _INTERFACE_LINE.fullmatch(name):
            self.ifconfig(assignment, match.group("ifname"), None)

    # -- sysctls -----------------------------------------------------------

    def sysctl(self, assignment: RcAssignment) -> None:
        short = assignment.name[len(CARP_SYSCTL_PREFIX) :]
        handler = _SYSCTLS.get(short)
        if handler is None:
            if short == "stats":
                message = "net.inet.carp.stats is read-only"
            else:
                known = ", ".join(sorted(_SYSCTLS))
                message = f"unknown CARP sysctl; known: {known}"
            raise ConfigError(
                message,
                path=assignment.path,
                line=assignment.line,
                column=assignment.name_column,
                token=assignment.name,
            )
        self.sysctls[short] = handler(assignment)

    # -- ifconfig lines ----------------------------------------------------

    def ifconfig(self, assignment: RcAssignment, ifname: str, family: str | None) -> None:
        parser = _IfconfigParser(assignment, ifname, family)
        line = parser.parse()
        if line.vhid is None:
            if line.carp_word is not None:
                raise parser.error(
                    f"{line.carp_word.text} needs vhid N on the same line", line.carp_word
                )
            if line.address is not None:
                self.claim_address(line, None)
                self.interfaces.setdefault(ifname, []).append(line.address)
            else:
                self.interfaces.setdefault(ifname, [])
            return
        if line.foreign_family is not None:
            raise parser.error(
                f"CARP addresses must be inet or inet6, not {line.foreign_family.text}",
                line.foreign_family,
            )
        if line.ignored:
            word = line.ignored[0]
            raise parser.error(
                f"{word.text!r} is not a CARP word (vhid, advbase, advskew, pass, peer, peer6, "
                "mcast, mcast6, vmac, alias, inet, inet6, netmask, prefixlen or an address); "
                "put interface options in ifconfig_<if>",
                word,
            )
        self.merge(line)

    def claim_address(self, line: _IfconfigLine, vhid: int | None) -> None:
        address = line.address
        assert address is not None and line.address_word is not None
        owner = self.address_owners.get(address.ip)
        if owner is not None:
            where, earlier_line = owner
            raise line.assignment.error(
                f"address {address.ip} is already configured ({where}) at line {earlier_line}",
                offset=line.address_word.offset,
                token=line.address_word.text,
            )
        where = f"vhid {vhid} on {line.ifname}" if vhid is not None else f"on {line.ifname}"
        self.address_owners[address.ip] = (where, line.assignment.line)

    def merge(self, line: _IfconfigLine) -> None:
        assert line.vhid is not None
        key = (line.ifname, line.vhid.value)
        vhid = self.vhids.get(key)
        if vhid is None:
            vhid = _VhidBuilder(ifname=line.ifname, vhid=line.vhid.value, first=line.vhid)
            self.vhids[key] = vhid
        label = f"vhid {vhid.vhid} on {vhid.ifname}"
        vhid.advbase = _agree("advbase", label, vhid.advbase, line.advbase, self.path, str)
        vhid.advskew = _agree("advskew", label, vhid.advskew, line.advskew, self.path, str)
        vhid.password = _agree("pass", label, vhid.password, line.password, self.path, None)
        vhid.peer = _agree("peer", label, vhid.peer, line.peer, self.path, _describe_peer)
        vhid.peer6 = _agree("peer6", label, vhid.peer6, line.peer6, self.path, _describe_peer)
        vhid.vmac = _agree("vmac", label, vhid.vmac, line.vmac, self.path, str)
        if line.address is not None:
            self.claim_address(line, vhid.vhid)
            vhid.addresses.append(line.address)

    def finish(self) -> CarpConfig:
        for vhid in self.vhids.values():
            if not vhid.addresses:
                raise ConfigError(
                    f"vhid {vhid.vhid} on {vhid.ifname} has no address; "
                    "add one, e.g. alias 10.0.0.100/32",
                    path=self.path,
                    line=vhid.first.line,
                    column=vhid.first.column,
                    token=vhid.first.token,
                )
        settings = self.sysctls
        return CarpConfig(
            vhids=tuple(v.build() for v in self.vhids.values()),
            interfaces=tuple(
                InterfaceConfig(ifname=name, addresses=tuple(addresses))
                for name, addresses in self.interfaces.items()
            ),
            preempt=bool(settings.get("preempt", False)),
            allow=bool(settings.get("allow", True)),
            log=_as_int(settings.get("log", 1)),
            dscp=_as_int(settings.get("dscp", 56)),
            demotion=_as_int(settings.get("demotion", 0)),
            ifdown_demotion_factor=_as_int(settings.get("ifdown_demotion_factor", 240)),
            senderr_demotion_factor=_as_int(settings.get("senderr_demotion_factor", 240)),
            path=self.path,
        )


def _as_int(value: object) -> int:
    assert isinstance(value, int)
    return value


def _agree(
    what: str,
    label: str,
    earlier: _Setting[_T] | None,
    later: _Setting[_T] | None,
    path: str,
    show: Callable[[_T], str] | None,
) -> _Setting[_T] | None:
    """Merge a setting given on two lines; different values are an error."""
    if later is None:
        return earlier
    if earlier is None or earlier.value == later.value:
        return earlier or later
    if show is None:
        message = f"{what} for {label} differs from the one given at line {earlier.line}"
    else:
        message = (
            f"{what} {show(later.value)} for {label} conflicts with "
            f"{what} {show(earlier.value)} given at line {earlier.line}"
        )
    raise ConfigError(message, path=path, line=later.line, column=later.column, token=later.token)


# --------------------------------------------------------------------------
# sysctls
# --------------------------------------------------------------------------


def _int_sysctl(low: int, high: int, explain: str) -> Callable[[RcAssignment], int]:
    def parse(assignment: RcAssignment) -> int:
        text = assignment.value.strip()
        if not _SIGNED_INTEGER.fullmatch(text) or not low <= int(text) <= high:
            raise assignment.error(f"{assignment.name} must be {explain}", token=assignment.value)
        return int(text)

    return parse


def _bool_sysctl(assignment: RcAssignment) -> bool:
    text = assignment.value.strip()
    if text not in ("0", "1"):
        raise assignment.error(f"{assignment.name} must be 0 or 1", token=assignment.value)
    return text == "1"


_INT_MIN, _INT_MAX = -(2**31), 2**31 - 1

_SYSCTLS: dict[str, Callable[[RcAssignment], object]] = {
    "preempt": _bool_sysctl,
    "allow": _bool_sysctl,
    "log": _int_sysctl(0, _INT_MAX, "a number >= 0 (0 off, 1 state changes, 2 also bad packets)"),
    "demotion": _int_sysctl(_INT_MIN, _INT_MAX, "a signed number"),
    "dscp": _int_sysctl(0, 63, "a DSCP value in 0..63"),
    "ifdown_demotion_factor": _int_sysctl(_INT_MIN, _INT_MAX, "a signed number"),
    "senderr_demotion_factor": _int_sysctl(_INT_MIN, _INT_MAX, "a signed number"),
}
