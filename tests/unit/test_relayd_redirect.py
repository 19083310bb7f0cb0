"""nftables rules for relayd's redirects (pure rendering)."""

from __future__ import annotations

from carpool.relayd.model import Mode
from carpool.relayd.redirect import (
    RedirectListener,
    RedirectRules,
    remove_ruleset,
    render_ruleset,
    tag_mark,
)

LISTEN = (RedirectListener("10.0.0.100", 80),)
HOSTS = ("10.0.0.10", "10.0.0.11", "10.0.0.12")


def rules(**changes: object) -> RedirectRules:
    base: dict[str, object] = {"name": "web_redirect", "listeners": LISTEN, "hosts": HOSTS,
                               "port": 8080}  # fmt: skip
    base.update(changes)
    return RedirectRules(**base)  # type: ignore[arg-type]


def test_roundrobin_is_numgen_inc_in_one_atomic_transaction() -> None:
    text = render_ruleset("relayd", [rules()])
    lines = text.splitlines()
    assert lines[:2] == ["table ip relayd {}", "delete table ip relayd"]
    assert (
        "\t\tip daddr 10.0.0.100 tcp dport 80 counter dnat to numgen inc mod 3 map "
        '{ 0 : 10.0.0.10, 1 : 10.0.0.11, 2 : 10.0.0.12 }:8080 comment "web_redirect"'
    ) in lines
    assert "type nat hook prerouting priority dstnat; policy accept;" in text
    assert "type nat hook output priority -100; policy accept;" in text
    assert "table ip6 relayd {}\ndelete table ip6 relayd\n" in text


def test_modes_map_to_nft_expressions() -> None:
    assert "numgen random mod 3" in render_ruleset("relayd", [rules(mode=Mode.RANDOM)])
    hashed = render_ruleset("relayd", [rules(mode=Mode.SOURCE_HASH, seed=0xBEEF)])
    assert "jhash ip saddr mod 3 seed 0x0000beef map" in hashed
    assert "jhash ip saddr" in render_ruleset("relayd", [rules(sticky=True)])


def test_one_host_is_a_plain_dnat_and_no_host_no_rule() -> None:
    assert "dnat to 10.0.0.11:8080" in render_ruleset("relayd", [rules(hosts=("10.0.0.11",))])
    text = render_ruleset("relayd", [rules(hosts=())])
    assert "dnat" not in text and "chain" not in text


def test_ports_interfaces_tags_and_ipv6() -> None:
    listener = RedirectListener("2001:db8::1", 8000, 8010, "tcp", "em0")
    text = render_ruleset("relayd", [rules(listeners=(listener,), hosts=("2001:db8::10",),
                                           tag="web")])  # fmt: skip
    assert (f'iifname "em0" ip6 daddr 2001:db8::1 tcp dport 8000-8010 '
            f"meta mark set 0x{tag_mark('web'):x} counter dnat to [2001:db8::10]:8080") in text
    assert "table ip6 relayd {\n" in text


def test_remove_tolerates_missing_tables() -> None:
    assert remove_ruleset("relayd") == (
        "table ip relayd {}\ndelete table ip relayd\ntable ip6 relayd {}\ndelete table ip6 relayd\n"
    )
