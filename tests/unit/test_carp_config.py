"""carpd's configuration from rc.conf lines (carpool.carp.config)."""

from __future__ import annotations

import re
from ipaddress import IPv4Address, IPv4Interface, IPv6Address, IPv6Interface
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from carpool.carp.config import (
    CarpConfig,
    InterfaceConfig,
    VhidConfig,
    load_config,
    parse_config,
)
from carpool.errors import ConfigError

# The guide, "Basic CARP Setup", node 1 and node 2, as sysrc lines.
BASIC_NODE1 = """\
# Physical interface
sysrc ifconfig_em0="inet 10.0.0.1 netmask 255.255.255.0"
# CARP virtual IP
sysrc ifconfig_em0_alias0="vhid 1 advskew 0 pass secretpass alias 10.0.0.100/32"
# Allow CARP protocol
sysrc net.inet.carp.preempt=1
"""
BASIC_NODE2 = """\
# Physical interface
sysrc ifconfig_em0="inet 10.0.0.2 netmask 255.255.255.0"
# CARP virtual IP (higher advskew = lower priority)
sysrc ifconfig_em0_alias0="vhid 1 advskew 100 pass secretpass alias 10.0.0.100/32"
# Allow CARP protocol
sysrc net.inet.carp.preempt=1
"""
# "CARP with Multiple Virtual IPs"
MULTI_NODE1 = """\
sysrc ifconfig_em0_alias0="vhid 1 advskew 0 pass pass1 alias 10.0.0.100/32"
sysrc ifconfig_em0_alias1="vhid 2 advskew 100 pass pass2 alias 10.0.0.101/32"
"""
MULTI_NODE2 = """\
sysrc ifconfig_em0_alias0="vhid 1 advskew 100 pass pass1 alias 10.0.0.100/32"
sysrc ifconfig_em0_alias1="vhid 2 advskew 0 pass pass2 alias 10.0.0.101/32"
"""
# "HA Load Balancer Pair" with the pfsync lines of "Pfsync Setup"
LB_NODE1 = """\
sysrc ifconfig_em0_alias0="vhid 1 advskew 0 pass lbpass alias 10.0.0.100/32"
sysrc relayd_enable="YES"
sysrc pfsync_enable="YES"
sysrc pfsync_syncdev="em1"
sysrc ifconfig_em1="inet 192.168.255.1 netmask 255.255.255.252"
sysrc pfsync_syncpeer="192.168.255.2"
"""
LB_NODE2 = """\
sysrc ifconfig_em0_alias0="vhid 1 advskew 100 pass lbpass alias 10.0.0.100/32"
sysrc relayd_enable="YES"
sysrc pfsync_enable="YES"
sysrc pfsync_syncdev="em1"
"""

VIP = IPv4Interface("10.0.0.100/32")


def error(text: str) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        parse_config(text, "carp.conf")
    return info.value


# -- the guide's configurations ----------------------------------------------------------


def test_basic_setup_node1() -> None:
    config = parse_config(BASIC_NODE1, "/etc/carpool/rc.conf")
    assert config == CarpConfig(
        vhids=(
            VhidConfig(
                ifname="em0", vhid=1, advbase=1, advskew=0, password=b"secretpass", addresses=(VIP,)
            ),
        ),
        interfaces=(InterfaceConfig("em0", (IPv4Interface("10.0.0.1/24"),)),),
        preempt=True,
        path="/etc/carpool/rc.conf",
    )
    (vhid,) = config.vhids
    assert vhid.key == ("em0", 1)
    assert vhid.addresses4 == (IPv4Address("10.0.0.100"),)
    assert vhid.addresses6 == ()
    assert config.find_vhid("em0", 1) is vhid
    assert config.find_vhid("em0", 2) is None
    assert config.ifnames == ("em0",)


def test_basic_setup_node2() -> None:
    config = parse_config(BASIC_NODE2)
    (vhid,) = config.vhids
    assert (vhid.vhid, vhid.advskew, vhid.password, vhid.addresses) == (
        1,
        100,
        b"secretpass",
        (VIP,),
    )
    assert config.interfaces == (InterfaceConfig("em0", (IPv4Interface("10.0.0.2/24"),)),)
    assert config.preempt


def test_multiple_virtual_ips() -> None:
    node1, node2 = parse_config(MULTI_NODE1), parse_config(MULTI_NODE2)
    assert [(v.vhid, v.advskew, v.password, v.addresses) for v in node1.vhids] == [
        (1, 0, b"pass1", (VIP,)),
        (2, 100, b"pass2", (IPv4Interface("10.0.0.101/32"),)),
    ]
    assert [(v.vhid, v.advskew) for v in node2.vhids] == [(1, 100), (2, 0)]
    assert not node1.preempt


def test_load_balancer_pair_ignores_other_daemons_lines() -> None:
    node1, node2 = parse_config(LB_NODE1), parse_config(LB_NODE2)
    assert [(v.ifname, v.vhid, v.advskew, v.password) for v in node1.vhids] == [
        ("em0", 1, 0, b"lbpass")
    ]
    assert node1.interfaces == (InterfaceConfig("em1", (IPv4Interface("192.168.255.1/30"),)),)
    assert [(v.vhid, v.advskew) for v in node2.vhids] == [(1, 100)]


def test_defaults() -> None:
    config = parse_config("")
    assert config == CarpConfig()
    assert (config.allow, config.log, config.dscp, config.demotion) == (True, 1, 56, 0)
    assert (config.ifdown_demotion_factor, config.senderr_demotion_factor) == (240, 240)


def test_sysctls() -> None:
    config = parse_config(
        """\
net.inet.carp.preempt=1
net.inet.carp.allow=0
net.inet.carp.log=2
net.inet.carp.demotion=-20
net.inet.carp.dscp=46
net.inet.carp.ifdown_demotion_factor=100
net.inet.carp.senderr_demotion_factor=0
net.inet.tcp.blackhole=2
kern.ipc.somaxconn=1024
"""
    )
    assert (config.preempt, config.allow, config.log, config.demotion, config.dscp) == (
        True,
        False,
        2,
        -20,
        46,
    )
    assert (config.ifdown_demotion_factor, config.senderr_demotion_factor) == (100, 0)


def test_the_last_assignment_of_a_name_wins() -> None:
    config = parse_config(
        'ifconfig_em0_alias0="vhid 1 advskew 0 alias 10.0.0.100/32"\n'
        "net.inet.carp.preempt=1\n"
        'ifconfig_em0_alias0="vhid 1 advskew 50 alias 10.0.0.100/32"\n'
        "net.inet.carp.preempt=0\n"
    )
    assert config.vhids[0].advskew == 50
    assert not config.preempt


# -- the alias grammar ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "value",
    [
        "vhid 1 advskew 0 pass x alias 10.0.0.100/32",
        "inet 10.0.0.100/32 vhid 1 advskew 0 pass x",
        "inet vhid 1 pass x 10.0.0.100 netmask 255.255.255.255",
        "vhid 1 pass x alias 10.0.0.100 netmask 0xffffffff",
        "alias 10.0.0.100 vhid 1 pass x",
        "vhid 1 pass x 10.0.0.100 prefixlen 32",
    ],
)
def test_word_orders_freebsd_accepts(value: str) -> None:
    (vhid,) = parse_config(f'ifconfig_em0_alias0="{value}"').vhids
    assert (vhid.vhid, vhid.password, vhid.addresses) == (1, b"x", (VIP,))


@pytest.mark.parametrize(
    ("value", "address"),
    [
        ("vhid 1 10.0.0.100 netmask 255.255.255.0", IPv4Interface("10.0.0.100/24")),
        ("vhid 1 10.0.0.100 netmask 0xffffff00", IPv4Interface("10.0.0.100/24")),
        ("vhid 1 10.0.0.100/24", IPv4Interface("10.0.0.100/24")),
        ("vhid 1 10.0.0.100", IPv4Interface("10.0.0.100/32")),
        ("vhid 1 inet6 2001:db8::100 prefixlen 64", IPv6Interface("2001:db8::100/64")),
        ("vhid 1 2001:db8::100/64", IPv6Interface("2001:db8::100/64")),
        ("vhid 1 inet6 2001:db8::100", IPv6Interface("2001:db8::100/64")),
        ("vhid 1 2001:db8::100/128", IPv6Interface("2001:db8::100/128")),
    ],
)
def test_address_forms(value: str, address: IPv4Interface | IPv6Interface) -> None:
    (vhid,) = parse_config(f'ifconfig_em0_alias0="{value}"').vhids
    assert vhid.addresses == (address,)


def test_lines_of_one_vhid_merge_their_addresses() -> None:
    config = parse_config(
        """\
ifconfig_em0_alias0="vhid 1 advskew 100 pass x alias 10.0.0.100/32"
ifconfig_em0_alias1="vhid 1 alias 10.0.0.101/32"
ifconfig_em0_alias2="inet6 2001:db8::100/64 vhid 1 advskew 100 pass x"
ifconfig_em1_alias0="vhid 1 alias 192.0.2.1/32"
"""
    )
    em0, em1 = config.vhids
    assert em0.key == ("em0", 1) and em1.key == ("em1", 1)
    assert em0.addresses4 == (IPv4Address("10.0.0.100"), IPv4Address("10.0.0.101"))
    assert em0.addresses6 == (IPv6Address("2001:db8::100"),)
    assert em0.ip_addresses == em0.addresses4 + em0.addresses6
    assert (em0.advskew, em0.password) == (100, b"x")
    assert (em1.advskew, em1.password) == (0, b"")
    assert config.ifnames == ("em0", "em1")


def test_unicast_peers() -> None:
    config = parse_config(
        'ifconfig_em0_alias0="vhid 1 peer 192.0.2.2 peer6 2001:db8::2 alias 10.0.0.100/32"\n'
        'ifconfig_em0_alias1="vhid 2 peer 192.0.2.2 mcast alias 10.0.0.101/32"\n'
    )
    first, second = config.vhids
    assert (first.peer, first.peer6) == (IPv4Address("192.0.2.2"), IPv6Address("2001:db8::2"))
    assert (second.peer, second.peer6) == (None, None)


def test_advbase_zero_and_limits() -> None:
    config = parse_config(
        'ifconfig_em0_alias0="vhid 255 advbase 0 advskew 254 pass 12345678901234567890 '
        'alias 10.0.0.100/32"'
    )
    (vhid,) = config.vhids
    assert (vhid.vhid, vhid.advbase, vhid.advskew, len(vhid.password)) == (255, 0, 254, 20)


def test_interface_lines() -> None:
    config = parse_config(
        """\
ifconfig_em0="inet 10.0.0.1/24"
ifconfig_em0_ipv6="inet6 2001:db8::1 prefixlen 64"
ifconfig_em1="DHCP"
ifconfig_em2="up mtu 9000 -rxcsum"
ifconfig_em3="inet 192.0.2.1 netmask 0xffffff00 broadcast 192.0.2.255 up"
ifconfig_em3_alias0="inet 192.0.2.2/32"
ifconfig_vlan0_100="inet6 2001:db8:1::1/64"
ifconfig_DEFAULT="SYNCDHCP"
ifconfig_em0_name="lan0"
ifconfig_em0_descr="uplink"
ifconfig_em0_aliases="inet 10.9.9.9/32"
"""
    )
    assert config.vhids == ()
    assert config.interfaces == (
        InterfaceConfig("em0", (IPv4Interface("10.0.0.1/24"), IPv6Interface("2001:db8::1/64"))),
        InterfaceConfig("em1", ()),
        InterfaceConfig("em2", ()),
        InterfaceConfig("em3", (IPv4Interface("192.0.2.1/24"), IPv4Interface("192.0.2.2/32"))),
        InterfaceConfig("vlan0_100", (IPv6Interface("2001:db8:1::1/64"),)),
    )
    assert config.find_interface("em3") is config.interfaces[3]
    assert config.find_interface("em9") is None


def test_a_carp_address_on_the_interface_line() -> None:
    config = parse_config('ifconfig_em0="inet 10.0.0.100/32 vhid 1 pass x"')
    assert config.vhids[0].addresses == (VIP,)
    assert config.interfaces == ()


# -- errors --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "token", "message"),
    [
        ("vhid 0 alias 10.0.0.100/32", "0", "vhid must be a number in 1..255"),
        ("vhid 256 alias 10.0.0.100/32", "256", "vhid must be a number in 1..255"),
        ("vhid x alias 10.0.0.100/32", "x", "vhid must be a number"),
        ("vhid", "vhid", "vhid needs a value"),
        ("vhid 1 advskew 255 alias 10.0.0.100/32", "255", "advskew must be a number in 0..254"),
        ("vhid 1 advskew -1 alias 10.0.0.100/32", "-1", "advskew must be a number in 0..254"),
        ("vhid 1 advbase 256 alias 10.0.0.100/32", "256", "advbase must be a number in 0..255"),
        (
            "vhid 1 pass 123456789012345678901 alias 10.0.0.100/32",
            "pass",  # the key itself is never quoted
            "pass is longer than 20 bytes; FreeBSD uses at most 20",
        ),
        ("vhid 1 pass", "pass", "pass needs a value"),
        (
            "vhid 1 state master alias 10.0.0.100/32",
            "state",
            "state is a runtime command; use carpctl",
        ),
        ("vhid 1 peer 2001:db8::1 alias 10.0.0.100/32", "2001:db8::1", "peer needs an IPv4"),
        ("vhid 1 peer6 192.0.2.1 alias 10.0.0.100/32", "192.0.2.1", "peer6 needs an IPv6"),
        ("vhid 1 ether 00:11:22:33:44:55", "ether", "must be inet or inet6, not ether"),
        ("vhid 1 link 00:11:22:33:44:55", "link", "must be inet or inet6, not link"),
        ("vhid 1 mtu 9000 alias 10.0.0.100/32", "mtu", "is not a CARP word"),
        ("vhid 1 bogus alias 10.0.0.100/32", "bogus", "is not a CARP word"),
        ("vhid 1 -alias 10.0.0.100/32", "-alias", "removes an address"),
        ("vhid 1 10.0.0.300/32", "10.0.0.300/32", "not a valid IPv4 or IPv6 address"),
        ("vhid 1 10.0.0.1/33", "10.0.0.1/33", "prefix length after '/' must be a number in 0..32"),
        ("vhid 1 2001:db8::1/129", "2001:db8::1/129", "in 0..128"),
        ("vhid 1 10.0.0.1/32 10.0.0.2/32", "10.0.0.2/32", "more than one address"),
        ("vhid 1 inet6 10.0.0.1", "10.0.0.1", "is not an inet6 address"),
        ("vhid 1 inet 2001:db8::1", "2001:db8::1", "is not an inet address"),
        ("vhid 1 10.0.0.1 inet6", "inet6", "does not match the address"),
        ("vhid 1 inet inet6 10.0.0.1", "inet6", "one address family per line"),
        ("vhid 1 10.0.0.1/24 netmask 255.255.255.0", "netmask", "given twice"),
        ("vhid 1 10.0.0.1 netmask 255.0.255.0", "255.0.255.0", "contiguous mask"),
        ("vhid 1 10.0.0.1 netmask 0xfffffff", "0xfffffff", "contiguous mask"),
        ("vhid 1 10.0.0.1 netmask 0xgg", "0xgg", "contiguous mask"),
        ("vhid 1 inet6 2001:db8::1 netmask 255.255.255.0", "netmask", "use prefixlen for inet6"),
        ("vhid 1 2001:db8::1 netmask 255.255.255.0", "netmask", "use prefixlen for inet6"),
        ("vhid 1 10.0.0.1 prefixlen 40", "prefixlen", "too long for 10.0.0.1"),
        ("vhid 1 inet 10.0.0.1 prefixlen 33", "33", "prefixlen must be a number in 0..32"),
        ("vhid 1 netmask 255.255.255.0", "netmask", "without an address"),
        ("advskew 100 alias 10.0.0.100/32", "advskew", "advskew needs vhid N on the same line"),
        ("pass x alias 10.0.0.100/32", "pass", "pass needs vhid N"),
        ("vhid 1 advskew 100", "vhid", "vhid 1 on em0 has no address"),
    ],
)
def test_alias_errors_point_at_the_offending_word(value: str, token: str, message: str) -> None:
    line = f'# comment\nsysrc ifconfig_em0_alias0="{value}"'
    exc = error(line)
    assert message in exc.message
    assert (exc.path, exc.line, exc.token) == ("carp.conf", 2, token)
    value_column = len('sysrc ifconfig_em0_alias0="') + 1
    offset = next(m.start() for m in re.finditer(r"\S+", value) if m.group() == token)
    assert exc.column == value_column + offset
    assert str(exc).startswith(f"carp.conf:2:{exc.column}: ")


def test_error_columns_are_exact() -> None:
    exc = error('ifconfig_em0_alias0="vhid 1 advskew 999 alias 10.0.0.100/32"')
    assert (exc.line, exc.column, exc.token) == (1, 37, "999")


def test_conflicting_settings_name_the_earlier_line() -> None:
    text = """\
ifconfig_em0_alias0="vhid 1 advskew 0 pass one alias 10.0.0.100/32"
ifconfig_em0_alias1="vhid 1 alias 10.0.0.101/32"
ifconfig_em0_alias2="vhid 1 advskew 100 alias 10.0.0.102/32"
"""
    exc = error(text)
    assert exc.message == "advskew 100 for vhid 1 on em0 conflicts with advskew 0 given at line 1"
    assert (exc.line, exc.column, exc.token) == (3, 37, "100")
    exc = error(text.replace("pass one", "pass s3cretA").replace("advskew 100", "pass s3cretB"))
    assert exc.message == "pass for vhid 1 on em0 differs from the one given at line 1"
    assert (exc.line, exc.column, exc.token) == (3, 29, "pass")
    assert "s3cret" not in str(exc)
    exc = error(
        'ifconfig_em0_alias0="vhid 1 peer 192.0.2.9 alias 10.0.0.100/32"\n'
        'ifconfig_em0_alias1="vhid 1 mcast alias 10.0.0.101/32"\n'
    )
    assert (
        exc.message == "peer mcast for vhid 1 on em0 conflicts with peer 192.0.2.9 given at line 1"
    )
    assert exc.token == "mcast"


def test_duplicate_addresses() -> None:
    exc = error(
        'ifconfig_em0_alias0="vhid 1 alias 10.0.0.100/32"\n'
        'ifconfig_em0_alias1="vhid 2 alias 10.0.0.100/24"\n'
    )
    assert exc.message == "address 10.0.0.100 is already configured (vhid 1 on em0) at line 1"
    assert (exc.line, exc.token) == (2, "10.0.0.100/24")
    exc = error('ifconfig_em0="inet 10.0.0.1/24"\nifconfig_em0_alias0="vhid 1 alias 10.0.0.1/32"')
    assert "already configured (on em0) at line 1" in exc.message


@pytest.mark.parametrize(
    ("line", "column", "token", "message"),
    [
        ("net.inet.carp.preempt=yes", 23, "yes", "must be 0 or 1"),
        ("net.inet.carp.allow=2", 21, "2", "must be 0 or 1"),
        ("net.inet.carp.dscp=64", 20, "64", "0..63"),
        ("net.inet.carp.log=-1", 19, "-1", "a number >= 0"),
        ("net.inet.carp.demotion=x", 24, "x", "a signed number"),
        ("net.inet.carp.bogus=1", 1, "net.inet.carp.bogus", "unknown CARP sysctl"),
        ("sysrc net.inet.carp.stats=0", 7, "net.inet.carp.stats", "read-only"),
    ],
)
def test_sysctl_errors(line: str, column: int, token: str, message: str) -> None:
    exc = error(line)
    assert message in exc.message
    assert (exc.line, exc.column, exc.token) == (1, column, token)


def test_aliases_variable_with_carp_words_is_refused() -> None:
    exc = error('ifconfig_em0_aliases="inet 10.0.0.100/32 vhid 1"')
    assert "ifconfig_<if>_alias<N>" in exc.message
    assert (exc.column, exc.token) == (1, "ifconfig_em0_aliases")


def test_syntax_errors_come_from_the_rcconf_layer() -> None:
    exc = error('ifconfig_em0_alias0="vhid 1 alias 10.0.0.100/32')
    assert (exc.line, exc.column, exc.token) == (1, 21, '"vhid')
    assert "unterminated double quote" in exc.message


def test_vhid_config_validates_programmatic_values() -> None:
    with pytest.raises(ValueError):
        VhidConfig(ifname="em0", vhid=0)
    with pytest.raises(ValueError):
        VhidConfig(ifname="em0", vhid=1, advskew=255)
    with pytest.raises(ValueError):
        VhidConfig(ifname="em0", vhid=1, advbase=256)
    with pytest.raises(ValueError):
        VhidConfig(ifname="em0", vhid=1, password=b"x" * 21)


def test_load_config(tmp_path: Path) -> None:
    path = tmp_path / "rc.conf"
    path.write_text(BASIC_NODE1, encoding="utf-8")
    config = load_config(str(path))
    assert config.path == str(path)
    assert config.vhids[0].password == b"secretpass"
    with pytest.raises(ConfigError, match="cannot read the file"):
        load_config(str(tmp_path / "absent"))
    path.write_bytes(b'ifconfig_em0="\xff"\n')
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_config(str(path))
    path.write_text('ifconfig_em0_alias0="vhid 1"\n', encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        load_config(str(path))
    assert str(info.value).startswith(f"{path}:1:22: ")


# -- properties --------------------------------------------------------------------------------

words = st.sampled_from(
    [
        "vhid",
        "advbase",
        "advskew",
        "pass",
        "peer",
        "peer6",
        "mcast",
        "mcast6",
        "state",
        "alias",
        "-alias",
        "inet",
        "inet6",
        "netmask",
        "prefixlen",
        "broadcast",
        "mtu",
        "up",
        "DHCP",
        "ether",
        "1",
        "0",
        "255",
        "256",
        "-1",
        "x",
        "10.0.0.100",
        "10.0.0.100/32",
        "10.0.0.1/99",
        "2001:db8::1",
        "2001:db8::1/64",
        "fe80::1%em0",
        "0xffffff00",
        "255.255.255.0",
        "1.2.3",
        "::",
        "a:b",
    ]
)
names = st.sampled_from(
    [
        "ifconfig_em0",
        "ifconfig_em0_alias0",
        "ifconfig_em0_alias1",
        "ifconfig_em1_alias0",
        "ifconfig_em0_ipv6",
        "ifconfig_em0_aliases",
        "net.inet.carp.preempt",
        "net.inet.carp.dscp",
        "net.inet.carp.demotion",
        "net.inet.carp.nope",
        "pfsync_enable",
    ]
)


@settings(max_examples=400)
@given(st.lists(st.tuples(names, st.lists(words, max_size=8)), max_size=6))
def test_random_ifconfig_lines_only_raise_config_errors(
    lines: list[tuple[str, list[str]]],
) -> None:
    text = "\n".join(f'{name}="{" ".join(value)}"' for name, value in lines)
    try:
        config = parse_config(text, "fuzz.conf")
    except ConfigError as exc:
        assert exc.path == "fuzz.conf" and exc.line >= 1 and exc.column >= 1
    else:
        for vhid in config.vhids:
            assert vhid.addresses


@settings(max_examples=300)
@given(st.text(max_size=300))
def test_garbage_text_only_raises_config_errors(text: str) -> None:
    try:
        parse_config(text, "fuzz.conf")
    except ConfigError as exc:
        assert exc.path == "fuzz.conf"
