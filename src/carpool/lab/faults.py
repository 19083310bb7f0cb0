"""nftables rules that make a lab's switch lose frames.

The rules live in a bridge-family table of the switch namespace, in a chain on the
forward hook, which sees every frame once per output port (flooded multicast too).
Building the rule text is pure; applying it runs ``nft`` in the switch namespace.
"""

from __future__ import annotations

from collections.abc import Sequence

from carpool.lab.shell import run

CHAIN = "faults"


def table_name(prefix: str) -> str:
    return f"{prefix}_faults"


def _nft(switch: str, script: str) -> None:
    run(["ip", "netns", "exec", switch, "nft", "-f", "-"], input=script)


def _ensure_table(prefix: str) -> str:
    """nft commands creating the table and chain if missing (they are idempotent).

    The table must be created after the switch's first bridge exists: a bridge-family
    chain registered in a namespace that has no bridge yet never sees a frame.
    """
    table = table_name(prefix)
    return (
        f"add table bridge {table}\n"
        f"add chain bridge {table} {CHAIN} "
        "{ type filter hook forward priority 0; policy accept; }\n"
    )


def drop_rules(ports: Sequence[str], percent: int) -> list[str]:
    """Rules dropping ``percent`` % of frames entering or leaving any of ``ports``."""
    if not 0 < percent <= 100:
        raise ValueError(f"drop percent must be 1..100, not {percent}")
    chance = "" if percent == 100 else f"numgen random mod 100 < {percent} "
    rules = []
    for port in ports:
        rules.append(f'iifname "{port}" {chance}drop')
        rules.append(f'oifname "{port}" {chance}drop')
    return rules


def partition_rules(side_a: Sequence[str], side_b: Sequence[str]) -> list[str]:
    """Rules dropping every frame between a port of one side and a port of the other."""
    rules = []
    for a in side_a:
        for b in side_b:
            rules.append(f'iifname "{a}" oifname "{b}" drop')
            rules.append(f'iifname "{b}" oifname "{a}" drop')
    return rules


def add_rules(switch: str, prefix: str, rules: Sequence[str]) -> None:
    table = table_name(prefix)
    script = _ensure_table(prefix)
    script += "".join(f"add rule bridge {table} {CHAIN} {rule}\n" for rule in rules)
    _nft(switch, script)


def flush(switch: str, prefix: str) -> None:
    _nft(switch, _ensure_table(prefix) + f"flush chain bridge {table_name(prefix)} {CHAIN}\n")
