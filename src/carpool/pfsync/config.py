"""pfsyncd's configuration: the pfsync lines of ``/etc/carpool/rc.conf``.

FreeBSD's lines, as the guide writes them::

    pfsync_enable="YES"
    pfsync_syncdev="em1"
    pfsync_syncpeer="192.168.255.2"     # optional: unicast; else multicast

carpool's own (pfsync has no authentication; this protocol does)::

    pfsync_key="a long shared secret"    # or
    pfsync_keyfile="/etc/carpool/pfsync.key"
    pfsync_port="8240"                   # UDP port (default 8240)
    pfsync_group="224.0.0.240"           # multicast group without syncpeer (pfsync's)
    pfsync_ignore="10.0.0.1 10.9.0.0/16" # addresses never synchronised (besides the
                                         # sync link's own subnet and loopback)
    pfsync_carp_demotion_factor="240"    # net.pfsync.carp_demotion_factor
    pfsync_refresh="30"                  # seconds between timeout refreshes

Every other name in the file is someone else's (carpd's ifconfig lines) and is
ignored.  Errors point at ``file:line:column``.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

from carpool.configfile import read_config_text
from carpool.errors import ConfigError
from carpool.rcconf import RcAssignment, effective_assignments, parse_rcconf

__all__ = ["DEFAULT_GROUP", "DEFAULT_PORT", "PfsyncConfig", "load_config", "parse_config"]

DEFAULT_GROUP = ipaddress.IPv4Address("224.0.0.240")
DEFAULT_PORT = 8240
MIN_KEY_BYTES = 16

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network

_KNOWN = (
    "pfsync_enable",
    "pfsync_syncdev",
    "pfsync_syncpeer",
    "pfsync_key",
    "pfsync_keyfile",
    "pfsync_port",
    "pfsync_group",
    "pfsync_ignore",
    "pfsync_carp_demotion_factor",
    "pfsync_refresh",
)
_IFNAME = re.compile(r"[A-Za-z0-9_.:-]{1,15}")


@dataclass(frozen=True, slots=True)
class PfsyncConfig:
    enabled: bool
    syncdev: str
    syncpeer: Address | None
    group: Address
    port: int
    key: bytes
    ignore: tuple[Network, ...]
    demotion_factor: int
    refresh_interval: float
    path: str

    @property
    def destination(self) -> Address:
        """Where datagrams go: the peer, or the multicast group."""
        return self.syncpeer if self.syncpeer is not None else self.group


def load_config(path: str) -> PfsyncConfig:
    return parse_config(read_config_text(path), path)


def parse_config(text: str, path: str = "<string>") -> PfsyncConfig:
    winners = effective_assignments(parse_rcconf(text, path))
    values = {name: a for name, a in winners.items() if name.startswith("pfsync_")}
    for name, assignment in values.items():
        if name not in _KNOWN:
            raise ConfigError(
                f"unknown pfsync setting; known: {', '.join(_KNOWN)}",
                path=path,
                line=assignment.line,
                column=assignment.name_column,
                token=name,
            )

    enable = values.get("pfsync_enable")
    enabled = False
    if enable is not None:
        word = enable.value.strip().upper()
        if word not in ("YES", "NO", "TRUE", "FALSE", "ON", "OFF", "1", "0"):
            raise enable.error('pfsync_enable must be "YES" or "NO"', token=enable.value)
        enabled = word in ("YES", "TRUE", "ON", "1")

    syncdev_line = values.get("pfsync_syncdev")
    if syncdev_line is None or not syncdev_line.value.strip():
        raise ConfigError(
            'pfsync_syncdev is not set: name the sync interface, e.g. pfsync_syncdev="em1"',
            path=path,
        )
    syncdev = syncdev_line.value.strip()
    if not _IFNAME.fullmatch(syncdev):
        raise syncdev_line.error("not an interface name", token=syncdev)

    syncpeer = _address(values.get("pfsync_syncpeer"), "pfsync_syncpeer")
    group_line = values.get("pfsync_group")
    group = _address(group_line, "pfsync_group") or DEFAULT_GROUP
    if group_line is not None and not group.is_multicast:
        raise group_line.error("pfsync_group must be a multicast address", token=group_line.value)
    if syncpeer is not None and syncpeer.is_multicast:
        group = syncpeer
        syncpeer = None

    port = _integer(values.get("pfsync_port"), 1, 65535, DEFAULT_PORT)
    factor = _integer(values.get("pfsync_carp_demotion_factor"), 0, 240, 240)
    refresh = _integer(values.get("pfsync_refresh"), 1, 86400, 30)

    key = _key(values.get("pfsync_key"), values.get("pfsync_keyfile"), path)

    ignore: list[Network] = []
    ignore_line = values.get("pfsync_ignore")
    if ignore_line is not None:
        offset = 0
        for word in ignore_line.value.split():
            offset = ignore_line.value.index(word, offset)
            try:
                ignore.append(ipaddress.ip_network(word, strict=False))
            except ValueError:
                raise ignore_line.error(
                    "not an address or network (write e.g. 10.0.0.1 or 10.9.0.0/16)",
                    offset=offset,
                    token=word,
                ) from None
            offset += len(word)

    return PfsyncConfig(
        enabled=enabled,
        syncdev=syncdev,
        syncpeer=syncpeer,
        group=group,
        port=port,
        key=key,
        ignore=tuple(ignore),
        demotion_factor=factor,
        refresh_interval=float(refresh),
        path=path,
    )


def _address(assignment: RcAssignment | None, name: str) -> Address | None:
    if assignment is None or not assignment.value.strip():
        return None
    try:
        return ipaddress.ip_address(assignment.value.strip())
    except ValueError:
        raise assignment.error(
            f"{name} must be an IPv4 or IPv6 address", token=assignment.value
        ) from None


def _integer(assignment: RcAssignment | None, low: int, high: int, default: int) -> int:
    if assignment is None:
        return default
    text = assignment.value.strip()
    if not text.isascii() or not text.isdigit() or not low <= int(text) <= high:
        raise assignment.error(f"{assignment.name} must be a number in {low}..{high}", token=text)
    return int(text)


def _key(key: RcAssignment | None, keyfile: RcAssignment | None, path: str) -> bytes:
    if key is not None and keyfile is not None:
        raise ConfigError(
            "pfsync_key and pfsync_keyfile are both set: keep one",
            path=path,
            line=keyfile.line,
            column=keyfile.name_column,
            token="pfsync_keyfile",
        )
    if key is not None:
        secret = key.value.encode()
        where = key
    elif keyfile is not None:
        try:
            with open(keyfile.value, "rb") as handle:
                secret = handle.read().strip()
        except OSError as error:
            raise keyfile.error(
                f"cannot read the key file: {error.strerror or error}", token=keyfile.value
            ) from None
        where = keyfile
    else:
        raise ConfigError(
            "no sync key: set pfsync_key (or pfsync_keyfile) to the same secret on both "
            "routers; sync packets are authenticated with it",
            path=path,
        )
    if len(secret) < MIN_KEY_BYTES:
        raise where.error(
            f"the sync key is {len(secret)} bytes; use at least {MIN_KEY_BYTES}",
            token=where.name,
        )
    return secret
