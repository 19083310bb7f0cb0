"""relayd's redirections on Linux: one nftables table of relayd's own, DNAT rules per redirect.

pf's ``rdr-to`` pools map onto nftables expressions:

* ``roundrobin``: ``dnat to numgen inc mod N map { 0 : host, ... } : port``
* ``random``: the same with ``numgen random``
* ``source-hash`` and ``sticky-address``: ``jhash ip saddr mod N seed S map {...}``,
  so a client keeps its host while the set of up hosts does not change
* ``least-states``: the daemon counts each host's conntrack entries and lists
  only the hosts with the fewest; the rule spreads round-robin over them and is
  rebuilt as the counts move

:func:`render_ruleset` is pure: it turns :class:`RedirectRules` into the text of
one ``nft -f`` transaction that creates the table if it is missing, deletes it
and writes it anew, so the kernel swaps old rules for new ones atomically and a
packet sees either.  :class:`NftTable` runs it.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import zlib
from collections.abc import Sequence
from dataclasses import dataclass

from carpool.errors import CarpoolError
from carpool.relayd.model import Mode

__all__ = [
    "DEFAULT_NFT_TABLE", "NftTable", "RedirectListener", "RedirectRules", "redirect_counters",
    "render_ruleset",
]  # fmt: skip

DEFAULT_NFT_TABLE = "relayd"


@dataclass(frozen=True, slots=True)
class RedirectListener:
    address: str
    port: int
    port_end: int | None = None
    ip_proto: str = "tcp"
    interface: str | None = None


@dataclass(frozen=True, slots=True)
class RedirectRules:
    """What one redirect asks of the kernel right now."""

    name: str
    listeners: tuple[RedirectListener, ...]
    hosts: tuple[str, ...]  #: the addresses to spread over (up hosts, in table order)
    port: int  #: the backends' port
    mode: Mode = Mode.ROUNDROBIN
    sticky: bool = False
    seed: int = 0  #: jhash seed for source-hash
    tag: str | None = None
    match_tag: bool = False
    log: bool = False


def _family(address: str) -> str:
    try:
        return "ip6" if ipaddress.ip_address(address).version == 6 else "ip"
    except ValueError:
        return "ip"


def tag_mark(tag: str) -> int:
    """The packet mark that stands for a ``pftag`` name (stable across runs)."""
    return zlib.crc32(tag.encode()) & 0x7FFFFFFF or 1


def _target(rules: RedirectRules, family: str) -> str | None:
    hosts = [h for h in rules.hosts if _family(h) == family]
    if not hosts:
        return None
    port = rules.port
    items = [f"[{h}]" for h in hosts] if family == "ip6" else hosts
    if len(hosts) == 1:
        return f"{items[0]}:{port}"
    mapping = ", ".join(f"{i} : {h}" for i, h in enumerate(hosts))
    n = len(hosts)
    if rules.mode is Mode.SOURCE_HASH or rules.sticky:
        saddr = "ip6 saddr" if family == "ip6" else "ip saddr"
        expr = f"jhash {saddr} mod {n} seed 0x{rules.seed & 0xFFFFFFFF:08x}"
    elif rules.mode is Mode.RANDOM:
        expr = f"numgen random mod {n}"
    else:
        expr = f"numgen inc mod {n}"
    return f"{expr} map {{ {mapping} }}:{port}"


def _rule(rules: RedirectRules, listener: RedirectListener, family: str, target: str,
          output: bool) -> str:
    parts = []
    if listener.interface is not None and not output:
        parts.append(f'iifname "{listener.interface}"')
    daddr = "ip6 daddr" if family == "ip6" else "ip daddr"
    parts.append(f"{daddr} {listener.address}")
    ports = str(listener.port) if listener.port_end is None \
        else f"{listener.port}-{listener.port_end}"
    parts.append(f"{listener.ip_proto} dport {ports}")
    if rules.tag is not None:
        parts.append(f"meta mark set 0x{tag_mark(rules.tag):x}")
    if rules.log:
        parts.append(f'log prefix "relayd {rules.name}: "')
    parts.append(f'counter dnat to {target} comment "{rules.name}"')
    return " ".join(parts)


def render_ruleset(table: str, redirects: Sequence[RedirectRules]) -> str:
    """One ``nft -f`` transaction replacing relayd's tables with rules for ``redirects``."""
    out: list[str] = []
    for family in ("ip", "ip6"):
        rules_pre: list[str] = []
        rules_out: list[str] = []
        for rdr in redirects:
            target = _target(rdr, family)
            if target is None:
                continue
            for listener in rdr.listeners:
                if _family(listener.address) != family:
                    continue
                rules_pre.append(_rule(rdr, listener, family, target, False))
                rules_out.append(_rule(rdr, listener, family, target, True))
        out.append(f"table {family} {table} {{}}")
        out.append(f"delete table {family} {table}")
        if not rules_pre:
            continue
        out.append(f"table {family} {table} {{")
        out.append("\tchain prerouting {")
        out.append("\t\ttype nat hook prerouting priority dstnat; policy accept;")
        out += [f"\t\t{r}" for r in rules_pre]
        out.append("\t}")
        out.append("\tchain output {")
        out.append("\t\ttype nat hook output priority -100; policy accept;")
        out += [f"\t\t{r}" for r in rules_out]
        out.append("\t}")
        out.append("}")
    return "\n".join(out) + "\n"


def remove_ruleset(table: str) -> str:
    """The transaction that removes relayd's tables (also when they do not exist)."""
    return "".join(f"table {f} {table} {{}}\ndelete table {f} {table}\n" for f in ("ip", "ip6"))


class NftTable:
    """relayd's nftables tables: replaced whole with each change, removed on exit."""

    def __init__(self, name: str = DEFAULT_NFT_TABLE, nft: str = "nft") -> None:
        self.name = name
        self.nft = nft
        self.applied: str | None = None

    async def _run(self, text: str) -> None:
        try:
            process = await asyncio.create_subprocess_exec(
                self.nft, "-f", "-", stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            )  # fmt: skip
        except OSError as error:
            raise CarpoolError(
                f"cannot run {self.nft}: {error.strerror}; install nftables for redirects"
            ) from None
        _, err = await process.communicate(text.encode())
        if process.returncode != 0:
            raise CarpoolError(
                f"nft refused relayd's rules: {err.decode(errors='replace').strip()}"
            )

    async def apply(self, redirects: Sequence[RedirectRules]) -> bool:
        """Install the rules for ``redirects`` (one atomic transaction); False if unchanged."""
        text = render_ruleset(self.name, redirects)
        if text == self.applied:
            return False
        await self._run(text)
        self.applied = text
        return True

    async def remove(self) -> None:
        await self._run(remove_ruleset(self.name))
        self.applied = None


async def redirect_counters(table: str = DEFAULT_NFT_TABLE, nft: str = "nft") -> dict[str, int]:
    """Connections each redirect has sent on so far (its rules' packet counters: the nat
    chains see the first packet of each connection only)."""
    totals: dict[str, int] = {}
    for family in ("ip", "ip6"):
        try:
            process = await asyncio.create_subprocess_exec(
                nft, "-j", "list", "table", family, table,
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL,
            )  # fmt: skip
        except OSError:
            return totals
        out, _ = await process.communicate()
        if process.returncode != 0:
            continue
        try:
            items = json.loads(out).get("nftables", [])
        except ValueError:
            continue
        for item in items:
            rule = item.get("rule") if isinstance(item, dict) else None
            if not isinstance(rule, dict) or "comment" not in rule:
                continue
            for expr in rule.get("expr", []):
                if isinstance(expr, dict) and "counter" in expr:
                    name = str(rule["comment"])
                    totals[name] = totals.get(name, 0) + int(expr["counter"].get("packets", 0))
    return totals


async def conntrack_counts(addresses: Sequence[str], port: int) -> dict[str, int]:
    """Live conntrack entries whose reply comes from each ``address:port`` (least-states)."""
    counts = dict.fromkeys(addresses, 0)
    try:
        process = await asyncio.create_subprocess_exec(
            "conntrack", "-L", "-p", "tcp", "--reply-port-src", str(port),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL,
        )  # fmt: skip
    except OSError:
        return counts
    out, _ = await process.communicate()
    for line in out.decode(errors="replace").splitlines():
        if "ESTABLISHED" not in line and "SYN_" not in line:
            continue
        fields = line.split()
        sources = [f[4:] for f in fields if f.startswith("src=")]
        if len(sources) >= 2 and sources[1] in counts:
            counts[sources[1]] += 1
    return counts
