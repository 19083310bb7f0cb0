"""hast.conf parsing: the seed's texts, hastd's grammar, inheritance, defaults, errors."""

from __future__ import annotations

import contextlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from carpool.errors import ConfigError
from carpool.hast.common import Checksum, Compression, Replication
from carpool.hast.config import (
    DEFAULT_CONTROL,
    DEFAULT_PIDFILE,
    Address,
    load_config,
    parse_address,
    parse_config,
)

SEED_SHARED = (
    "resource shared_storage { on node1 { local /dev/gpt/hast0 remote 192.168.255.2 } "
    "on node2 { local /dev/gpt/hast0 remote 192.168.255.1 } }"
)
SEED_PGDATA = (
    "resource pgdata { on db1 { local /dev/gpt/pgdata remote 192.168.255.2 } "
    "on db2 { local /dev/gpt/pgdata remote 192.168.255.1 } replication fullsync }"
)


def test_seed_shared_storage_on_one_line() -> None:
    cfg = parse_config(SEED_SHARED, node="node1")
    (res,) = cfg.resources
    assert res.name == "shared_storage"
    assert res.node == "node1"
    assert res.provname == "shared_storage"
    assert res.local == "/dev/gpt/hast0"
    assert res.remote is not None
    assert (res.remote.host, res.remote.port, res.remote.scheme) == ("192.168.255.2", 8457, "tcp")
    assert res.remote_host == "192.168.255.2" and res.remote_port == 8457
    assert res.replication is Replication.MEMSYNC
    assert res.checksum is Checksum.NONE
    assert res.compression is Compression.HOLE
    assert res.timeout == 20
    assert res.metaflush is True
    assert res.exec is None and res.key is None and res.source is None
    other = parse_config(SEED_SHARED, node="node2").resource("shared_storage")
    assert other.remote is not None and other.remote.host == "192.168.255.1"


def test_seed_pgdata_replication_after_on_blocks() -> None:
    text = SEED_PGDATA.replace(" { ", " {\n  ").replace(" } ", "\n}\n")
    for variant in (SEED_PGDATA, text):
        res = parse_config(variant, node="db2").resource("pgdata")
        assert res.replication is Replication.FULLSYNC
        assert res.remote is not None and res.remote.host == "192.168.255.1"


def test_defaults() -> None:
    cfg = parse_config(SEED_SHARED, node="node1")
    assert cfg.control == Address(DEFAULT_CONTROL, "uds", path=DEFAULT_CONTROL)
    assert cfg.pidfile == DEFAULT_PIDFILE
    assert [str(a) for a in cfg.listen] == ["tcp4://0.0.0.0:8457", "tcp6://[::]:8457"]
    assert cfg.names == ("shared_storage",)


FULL = """
# global section
control uds:///var/run/hastctl
pidfile /var/run/hastd.pid
listen tcp4://10.0.0.1:9000
replication async
checksum sha256
compression lzf
timeout 7
exec /usr/local/sbin/hast-hook
metaflush off
key "global secret"

on alpha {
  listen tcp6://[fe80::1]:9001
  control /tmp/alpha.sock
}
on beta { pidfile /tmp/beta.pid }

resource r1 {
  checksum crc32
  name r1dev
  local /dev/sdb
  on alpha {
    remote tcp4://10.0.0.2:9002
    source 10.0.0.1
    metaflush on
    key res-node-key
  }
  on beta { local /dev/sdc remote 10.0.0.1 }
}

resource r2 {
  replication fullsync
  compression none
  on alpha { local /tmp/r2.img name r2dev remote none }
  on beta { local /tmp/r2.img remote none }
}
"""


def test_inheritance_global_resource_node() -> None:
    cfg = parse_config(FULL, node="alpha", path="/etc/hast.conf")
    assert cfg.control.path == "/tmp/alpha.sock"
    assert cfg.pidfile == "/var/run/hastd.pid"
    assert [(a.host, a.port) for a in cfg.listen] == [("10.0.0.1", 9000), ("fe80::1", 9001)]
    r1 = cfg.resource("r1")
    assert r1.checksum is Checksum.CRC32  # resource over global
    assert r1.replication is Replication.ASYNC  # global
    assert r1.compression is Compression.FAST  # lzf → fast
    assert r1.timeout == 7
    assert r1.exec == "/usr/local/sbin/hast-hook"
    assert r1.metaflush is True  # node over global off
    assert r1.key == b"res-node-key"
    assert r1.provname == "r1dev"
    assert r1.local == "/dev/sdb"
    assert r1.source is not None and (r1.source.host, r1.source.port) == ("10.0.0.1", 8457)
    assert r1.remote is not None and r1.remote.port == 9002
    r2 = cfg.resource("r2")
    assert r2.remote is None and r2.remote_host is None
    assert r2.provname == "r2dev"
    assert r2.replication is Replication.FULLSYNC
    assert r2.compression is Compression.NONE
    assert r2.metaflush is False
    assert r2.key == b"global secret"
    beta = parse_config(FULL, node="beta")
    assert beta.pidfile == "/tmp/beta.pid"
    assert beta.control.path == "/var/run/hastctl"
    assert beta.resource("r1").local == "/dev/sdc"
    assert "res-node-key" not in repr(cfg.resource("r1"))  # the key stays out of logs


def test_node_by_several_names_and_uuid_case() -> None:
    text = "resource r { on 0F8E2A6C-1111-2222-3333-444455556666 { local /a remote h } }"
    cfg = parse_config(text, node=("host.example", "0f8e2a6c-1111-2222-3333-444455556666"))
    assert cfg.resource("r").local == "/a"


def test_load_config_from_file(tmp_path: pytest.TempPathFactory) -> None:
    path = tmp_path / "hast.conf"  # type: ignore[operator]
    path.write_text(SEED_SHARED)
    cfg = load_config(str(path), node="node1")
    assert cfg.path == str(path)
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(str(path) + ".missing", node="node1")


def test_unknown_resource_lookup_names_known() -> None:
    cfg = parse_config(SEED_SHARED, node="node1")
    with pytest.raises(ConfigError, match="shared_storage"):
        cfg.resource("nope")


@pytest.mark.parametrize(
    ("text", "line", "column", "token", "message"),
    [
        ("timeout 0", 1, 9, "0", "Negative or zero timeout"),
        ("timeout x", 1, 9, "x", "timeout needs a number"),
        ("replication sometimes", 1, 13, "sometimes", "replication must be one of"),
        ("checksum md5", 1, 10, "md5", "checksum must be one of"),
        ("compression lz4", 1, 13, "lz4", "compression must be one of"),
        ("metaflush yes", 1, 11, "yes", "metaflush must be one of"),
        ("\n\n  bogus 1", 3, 3, "bogus", "expected a statement"),
        ("resource on { }", 1, 10, "on", "reserved word"),
        ("resource 123 { }", 1, 10, "123", "number cannot be used"),
        ("resource r {\n remote 1.2.3.4 }", 2, 2, "remote", "not allowed in a resource"),
        ("resource r { on n { replication async } }", 1, 21, "replication", "not allowed"),
        ("on n { timeout 5 }", 1, 8, "timeout", "not allowed in a global 'on'"),
        ("resource r { on n { local /x remote 1.2.3.4 }", 1, 46, None, "'}' is missing"),
        ("resource r { on n { local /x; remote h } }", 1, 29, ";", "unexpected character"),
        ('exec "/bin/x"', 1, 6, "/bin/x", "exec needs a value"),
        ('key "abc', 1, 5, None, "unterminated"),
        ('key ""', 1, 5, None, "key is empty"),
        ("listen tcp4://[::1]:5", 1, 8, "tcp4://[::1]:5", "invalid listen address"),
        ("listen 1.2.3.4:99999", 1, 8, "1.2.3.4:99999", "port"),
        ("control ftp://x", 1, 9, "ftp://x", "unknown protocol"),
        ("resource r { on n { local /x remote /sock } }", 1, 37, "/sock", "invalid remote"),
        ("Replication async", 1, 1, "Replication", "expected a statement"),
        ("resource r { }", 1, 10, "r", "No resource r configuration for this node"),
        ("resource r { on n { remote h } }", 1, 10, "r", "Local path not configured"),
        ("resource r { on n { local /x } }", 1, 10, "r", "Remote address not configured"),
        (
            "resource r { on n { local /x remote h } }\nresource r { }",
            2,
            10,
            "r",
            'Resource "r" configured more than once',
        ),
    ],
)
def test_errors_point_at_the_token(
    text: str, line: int, column: int, token: str | None, message: str
) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(text, node="n", path="/etc/hast.conf")
    err = info.value
    assert message in err.message
    assert (err.line, err.column) == (line, column)
    if token is not None:
        assert err.token == token
    assert str(err).startswith(f"/etc/hast.conf:{line}:{column}: ")


def test_missing_node_lists_acceptable_names() -> None:
    with pytest.raises(ConfigError, match=r"acceptable node names: n1, n2"):
        parse_config(SEED_SHARED, node=("n1", "n2"))


def test_comments_and_last_setting_wins() -> None:
    text = "replication async # comment { }\nreplication fullsync\n" + SEED_SHARED + "#end"
    res = parse_config(text, node="node1").resources[0]
    assert res.replication is Replication.FULLSYNC


def test_quoted_key_escapes() -> None:
    text = 'key "a \\"b\\" \\\\ c"\n' + SEED_SHARED
    assert parse_config(text, node="node1").resources[0].key == b'a "b" \\ c'


@pytest.mark.parametrize(
    ("text", "scheme", "host", "port"),
    [
        ("10.0.0.1", "tcp", "10.0.0.1", 8457),
        ("10.0.0.1:1234", "tcp", "10.0.0.1", 1234),
        ("tcp4://0.0.0.0:8457", "tcp4", "0.0.0.0", 8457),
        ("tcp6://[::]:8457", "tcp6", "::", 8457),
        ("tcp6://[fe80::1]", "tcp6", "fe80::1", 8457),
        ("[2001:db8::1]:77", "tcp", "2001:db8::1", 77),
        ("2001:db8::1", "tcp", "2001:db8::1", 8457),
        ("tcp://node-b.example", "tcp", "node-b.example", 8457),
        ("tcp6://node-b", "tcp6", "node-b", 8457),
    ],
)
def test_tcp_addresses(text: str, scheme: str, host: str, port: int) -> None:
    addr = parse_address(text)
    assert (addr.scheme, addr.host, addr.port, addr.text) == (scheme, host, port, text)
    assert not addr.is_unix


@pytest.mark.parametrize(
    ("text", "path"),
    [("uds:///var/run/hastctl", "/var/run/hastctl"), ("unix:///x/y", "/x/y"), ("/s", "/s")],
)
def test_unix_addresses(text: str, path: str) -> None:
    addr = parse_address(text, unix_ok=True)
    assert addr.is_unix and addr.path == path and str(addr) == f"uds://{path}"


@pytest.mark.parametrize(
    "text",
    ["", "tcp://", "[::1", "[::1]x", "[nothost]", "a:b", "uds://rel", "1:2:zz", "tcp4://[::1]"],
)
def test_bad_addresses(text: str) -> None:
    with pytest.raises(ValueError):
        parse_address(text, unix_ok=True)


_ALPHABET = st.sampled_from(
    [
        *'{}#"\\ \n\tabz019.-_/:[]',
        *("on ", "resource ", "local ", "remote ", "none ", "timeout ", "key ", "listen "),
    ]
)


@settings(max_examples=400, deadline=None)
@given(st.lists(_ALPHABET, max_size=60).map("".join))
def test_random_text_only_raises_config_error(text: str) -> None:
    try:
        parse_config(text, node="n")
    except ConfigError as exc:
        assert str(exc)


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=80))
def test_random_unicode_only_raises_config_error(text: str) -> None:
    with contextlib.suppress(ConfigError):
        parse_config(text, node="n")


def test_local_node_names_include_hostname() -> None:
    import socket

    from carpool.hast.config import local_node_names

    names = local_node_names()
    assert socket.gethostname() in names
    text = f"resource r {{ on {socket.gethostname()} {{ local /x remote none }} }}"
    if all(ch.isalnum() or ch in ".-_" for ch in socket.gethostname()):
        assert parse_config(text).resource("r").node == socket.gethostname()
