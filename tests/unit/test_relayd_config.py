"""relayd.conf parsing: the seed's file, every construct of the grammar, relayd's checks, errors."""

from __future__ import annotations

import contextlib
import dataclasses
import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from carpool.errors import ConfigError
from carpool.relayd import load_relayd_config, parse_relayd_config, render_relayd_config
from carpool.relayd.lexer import KEYWORDS
from carpool.relayd.model import (
    CheckType,
    Direction,
    ForwardTarget,
    KeyAction,
    KeyField,
    Mode,
    ProtocolType,
    RelaydConfig,
    RuleAction,
)

DATA = Path(__file__).parent / "data" / "relayd"
SEED_PATH = DATA / "seed.conf"
SEED = SEED_PATH.read_text()

# The seed as the guide prints it once its line breaks are lost: one line, comments dropped.
SEED_ONE_LINE = (
    'ext_addr = "10.0.0.100" web1 = "10.0.0.10" web2 = "10.0.0.11" web3 = "10.0.0.12" '
    'http protocol "http_check" { match request header append "X-Forwarded-For" value '
    '"$REMOTE_ADDR" match request header append "X-Forwarded-Port" value "$REMOTE_PORT" '
    'match response header "Content-Type" value "text/html*" } '
    "table <webhosts> { $web1 $web2 $web3 } "
    'relay "www" { listen on $ext_addr port 443 tls protocol "http_check" '
    'forward to <webhosts> port 8080 mode loadbalance check http "/" code 200 } '
    'redirect "web_redirect" { listen on $ext_addr port 80 '
    'forward to <webhosts> port 8080 check http "/" code 200 }'
)

# One line per statement: each block written on a single line.
SEED_STATEMENT_LINES = "\n".join(
    [
        'ext_addr = "10.0.0.100"',
        'web1 = "10.0.0.10"',
        'web2 = "10.0.0.11"',
        'web3 = "10.0.0.12"',
        'http protocol "http_check" { match request header append "X-Forwarded-For" value '
        '"$REMOTE_ADDR" match request header append "X-Forwarded-Port" value "$REMOTE_PORT" '
        'match response header "Content-Type" value "text/html*" }',
        "table <webhosts> { $web1 $web2 $web3 }",
        'relay "www" { listen on $ext_addr port 443 tls protocol "http_check" forward to '
        '<webhosts> port 8080 mode loadbalance check http "/" code 200 }',
        'redirect "web_redirect" { listen on $ext_addr port 80 forward to <webhosts> port 8080 '
        'check http "/" code 200 }',
    ]
)

HEAD = "table <t> { 10.0.0.1 }\n"


@pytest.fixture
def ssl_dir(tmp_path: Path) -> str:
    """A certificate directory holding 10.0.0.100's certificate and key, as relayd wants them."""
    base = tmp_path / "ssl"
    (base / "private").mkdir(parents=True)
    (base / "10.0.0.100.crt").write_text("cert")
    (base / "private" / "10.0.0.100.key").write_text("key")
    return str(base)


def parse(text: str, **kw: object) -> RelaydConfig:
    kw.setdefault("check_certs", False)
    return parse_relayd_config(text, "relayd.conf", **kw)  # type: ignore[arg-type]


def error(text: str, **kw: object) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        parse(text, **kw)
    return info.value


def body(cfg: RelaydConfig) -> str:
    """The rendered config without its first line (which names the file)."""
    return render_relayd_config(cfg).split("\n", 1)[1]


def relay_conf(relay_body: str, extra: str = "") -> str:
    return HEAD + extra + 'relay "r" {\n' + relay_body + "\n}\n"


def rdr_conf(rdr_body: str) -> str:
    return HEAD + 'redirect "d" {\n' + rdr_body + "\n}\n"


def proto_conf(proto_body: str, kind: str = "http") -> str:
    return HEAD + f'{kind} protocol "p" {{\n' + proto_body + "\n}\n"


# ------------------------------------------------------------------------ the seed


def test_seed_as_written(ssl_dir: str) -> None:
    cfg = parse_relayd_config(SEED, str(SEED_PATH), base_dir=ssl_dir)
    assert (cfg.interval, cfg.timeout, cfg.prefork) == (10, 200, 3)
    assert dict(cfg.macros) == {
        "ext_addr": "10.0.0.100",
        "web1": "10.0.0.10",
        "web2": "10.0.0.11",
        "web3": "10.0.0.12",
    }
    assert cfg.warnings == ()

    (table,) = cfg.tables
    assert table.name == "webhosts" and not table.disabled
    assert [(h.name, h.id, h.kind, h.retry) for h in table.hosts] == [
        ("10.0.0.10", 1, "ipv4", 0),
        ("10.0.0.11", 2, "ipv4", 0),
        ("10.0.0.12", 3, "ipv4", 0),
    ]

    proto = cfg.protocol("http_check")
    assert proto.type is ProtocolType.HTTP
    assert proto.line == 8
    rules = proto.rules
    assert [(r.action, r.direction) for r in rules] == [
        (RuleAction.MATCH, Direction.REQUEST),
        (RuleAction.MATCH, Direction.REQUEST),
        (RuleAction.MATCH, Direction.RESPONSE),
    ]
    assert [(kv.field, kv.action, kv.key, kv.value) for r in rules for kv in r.keys] == [
        (KeyField.HEADER, KeyAction.APPEND, "X-Forwarded-For", "$REMOTE_ADDR"),
        (KeyField.HEADER, KeyAction.APPEND, "X-Forwarded-Port", "$REMOTE_PORT"),
        (KeyField.HEADER, KeyAction.NONE, "Content-Type", "text/html*"),
    ]
    assert not proto.return_error
    assert proto.tls.ciphers == "HIGH:!aNULL"
    assert proto.tls.protocols == ("tlsv1.2", "tlsv1.3")

    relay = cfg.relay("www")
    (listen,) = relay.listen
    assert (listen.address, listen.port, listen.tls) == ("10.0.0.100", 443, True)
    (kp,) = listen.keypairs
    assert kp.name == "10.0.0.100"
    assert kp.cert == os.path.join(ssl_dir, "10.0.0.100.crt")
    assert kp.key == os.path.join(ssl_dir, "private", "10.0.0.100.key")
    assert relay.protocol == "http_check"
    assert relay.session_timeout == 600 and not relay.forward_tls and not relay.transparent
    (fwd,) = relay.forwards
    assert fwd.target is ForwardTarget.TABLE and fwd.table is not None
    ref = fwd.table
    assert (ref.table, ref.port, ref.mode, ref.display_name) == (
        "webhosts",
        8080,
        Mode.LOADBALANCE,
        "webhosts:8080",
    )
    assert (ref.check.type, ref.check.path, ref.check.code) == (CheckType.HTTP, "/", 200)
    assert (ref.timeout, ref.interval) == (200, 10)

    rdr = cfg.redirect("web_redirect")
    (rl,) = rdr.listen
    assert (rl.address, rl.port, rl.ip_proto) == ("10.0.0.100", 80, "tcp")
    assert rdr.table.display_name == "webhosts:8080"
    assert rdr.table.mode is Mode.ROUNDROBIN
    assert rdr.table.check.type is CheckType.HTTP and rdr.table.check.code == 200
    assert rdr.backup is None and not rdr.sticky_address and rdr.session_timeout == 600


@pytest.mark.parametrize("text", [SEED_ONE_LINE, SEED_STATEMENT_LINES])
def test_seed_other_layouts_parse_the_same(text: str, ssl_dir: str) -> None:
    multi = parse_relayd_config(SEED, "a.conf", base_dir=ssl_dir)
    other = parse_relayd_config(text, "a.conf", base_dir=ssl_dir)
    assert body(other) == body(multi)
    assert other.relay("www").listen[0].keypairs == multi.relay("www").listen[0].keypairs
    assert other.protocols[0].rules[2].keys == multi.protocols[0].rules[2].keys


def test_seed_from_file(ssl_dir: str) -> None:
    cfg = load_relayd_config(str(SEED_PATH), base_dir=ssl_dir)
    assert cfg.path == str(SEED_PATH)
    assert cfg.relay("www").line == 18


def test_seed_without_certificate_says_where_relayd_looks(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        parse_relayd_config(SEED, "relayd.conf", base_dir=str(tmp_path))
    err = info.value
    assert err.line == 19
    assert f"{tmp_path}/10.0.0.100:443.crt" in err.message
    assert f"{tmp_path}/10.0.0.100.crt" in err.message
    assert "tls keypair" in err.message
    assert str(err).startswith("relayd.conf:19:15: relay 'www'")


def test_seed_defaults_to_etc_ssl() -> None:
    cfg = parse(SEED)
    assert cfg.relay("www").listen[0].keypairs[0].cert == "/etc/ssl/10.0.0.100.crt"
    if not os.path.exists("/etc/ssl/10.0.0.100.crt"):
        with pytest.raises(ConfigError, match=r"/etc/ssl/10\.0\.0\.100\.crt"):
            parse_relayd_config(SEED, "relayd.conf")


def test_certificate_with_port_wins_and_key_is_needed(tmp_path: Path) -> None:
    (tmp_path / "private").mkdir()
    (tmp_path / "10.0.0.100:443.crt").write_text("c")
    (tmp_path / "10.0.0.100.crt").write_text("c")
    with pytest.raises(ConfigError, match=r"no key \(.*private/10.0.0.100:443.key"):
        parse_relayd_config(SEED, "x", base_dir=str(tmp_path))
    (tmp_path / "private" / "10.0.0.100:443.key").write_text("k")
    cfg = parse_relayd_config(SEED, "x", base_dir=str(tmp_path))
    kp = cfg.relay("www").listen[0].keypairs[0]
    assert kp.cert.endswith("10.0.0.100:443.crt") and kp.key.endswith("10.0.0.100:443.key")


def test_tls_keypair_names_the_certificate(tmp_path: Path) -> None:
    (tmp_path / "private").mkdir()
    for name in ("www.example", "api.example"):
        (tmp_path / f"{name}.crt").write_text("c")
        (tmp_path / "private" / f"{name}.key").write_text("k")
    text = proto_conf('tls keypair "www.example"\ntls keypair api.example') + (
        'relay "r" { listen on 0.0.0.0 port 443 tls protocol "p" forward to <t> port 80 }'
    )
    cfg = parse_relayd_config(text, "x", base_dir=str(tmp_path))
    assert [k.name for k in cfg.relay("r").listen[0].keypairs] == ["www.example", "api.example"]
    assert cfg.protocol("p").tls.keypairs == ("www.example", "api.example")
    os.remove(tmp_path / "api.example.crt")
    with pytest.raises(ConfigError, match=r"api\.example") as info:
        parse_relayd_config(text, "x", base_dir=str(tmp_path))
    assert "tls keypair" not in info.value.message


# ------------------------------------------------------------------ lexer, macros


def test_macros_expand_bare_but_not_in_quotes() -> None:
    cfg = parse('a = "10.0.0.7"\ntable <t> { $a }\nx = "$a"\n' + 'socket "$a"')
    assert cfg.table("t").hosts[0].name == "10.0.0.7"
    assert cfg.socket == "$a"
    assert dict(cfg.macros)["x"] == "$a"


def test_macro_may_hold_several_tokens_and_glue() -> None:
    cfg = parse(
        'hosts = "10.0.0.1 retry 2, 10.0.0.2"\np = "80"\nnet = "127.0.0"\ntable <t> { $hosts }\n'
        'relay "r" { listen on $net.1 port 180 forward to <t> port $p }'
    )
    assert [(h.name, h.retry) for h in cfg.table("t").hosts] == [("10.0.0.1", 2), ("10.0.0.2", 0)]
    assert cfg.relay("r").listen[0].address == "127.0.0.1"
    table = cfg.relay("r").forwards[0].table
    assert table is not None
    assert table.port == 80


def test_macro_values_are_not_expanded_again() -> None:
    cfg = parse('a = "x"\nb = "$a"\nsocket $b')
    assert cfg.socket == "$a"


def test_macro_bare_value_and_number_value_and_redefinition() -> None:
    cfg = parse("a = 10.0.0.9\na = 10.0.0.8\nn = 5\ninterval $n\ntable <t> { $a }")
    assert cfg.interval == 5
    assert cfg.table("t").hosts[0].name == "10.0.0.8"


def test_cmdline_macros_override_the_file() -> None:
    cfg = parse('a = "10.0.0.1"\ntable <t> { $a }', macros={"a": "10.9.9.9"})
    assert cfg.table("t").hosts[0].name == "10.9.9.9"
    cfg = parse("table <t> { $b }", macros={"b": "10.1.1.1"})
    assert cfg.table("t").hosts[0].name == "10.1.1.1"


def test_undefined_macro_is_an_error_with_position() -> None:
    err = error('table <t> { 10.0.0.1 }\nrelay "r" { listen on $nope port 80 }')
    assert err.message == "macro 'nope' not defined"
    assert (err.line, err.column, err.token) == (2, 23, "$nope")
    assert str(err) == "relayd.conf:2:23: macro 'nope' not defined (near '$nope')"


def test_macro_must_be_defined_before_use() -> None:
    assert error('table <t> { $a }\na = "10.0.0.1"').message == "macro 'a' not defined"


def test_bare_dollar_and_bad_cmdline_macro() -> None:
    assert "macro name missing" in error("table <t> { $ }").message
    assert "invalid macro name" in error("interval 5", macros={"a b": "1"}).message


def test_unused_macros_are_warned_about() -> None:
    cfg = parse('a = "1"\nb = "2"\ninterval $b')
    assert cfg.warnings == ("macro 'a' not used",)


def test_macro_name_with_whitespace() -> None:
    assert "whitespace" in error('"a b" = "1"').message


def test_comments_and_line_continuation() -> None:
    text = (
        "# leading comment\n"
        "interval \\\n 20   # trailing comment\n"
        "table <t> {\n  10.0.0.1 # the first\n  # 10.0.0.2\n  10.0.0.3\n}\n"
        'socket "/tmp/a\\\nb"\n'
    )
    cfg = parse(text)
    assert cfg.interval == 20
    assert [h.name for h in cfg.table("t").hosts] == ["10.0.0.1", "10.0.0.3"]
    assert cfg.table("t").hosts[1].line == 7
    assert cfg.socket == "/tmp/ab"


def test_quote_escapes_and_single_quotes() -> None:
    cfg = parse(r"""socket 'a\'b\\c\ d\x'""")
    assert cfg.socket == "a'b\\c d\\x"


def test_unterminated_string() -> None:
    err = error('interval 5\nsocket "abc\ninterval 6')
    assert err.message == "unterminated quoted string" and err.line == 2 and err.column == 8


def test_keywords_are_reserved_unless_quoted() -> None:
    err = error("table <http> { 10.0.0.1 }")
    assert err.line == 1 and err.token == "http" and "syntax error" in err.message
    assert parse('table <"http"> { 10.0.0.1 }').table("http").hosts


def test_number_followed_by_letters_is_a_word() -> None:
    assert (
        "invalid port" in error(relay_conf("listen on 127.0.0.1 port 80x forward to <t>")).message
    )


def test_non_ascii_is_rejected() -> None:
    err = error("interval 5\ntable <t> { 10.0.0.1 é }")
    assert err.line == 2 and err.token == "é"


# ------------------------------------------------------------------------ include


def test_include_relative_to_including_file(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "hosts.conf").write_text("10.0.0.2\n10.0.0.3 retry 1\n")
    (tmp_path / "sub" / "macros.conf").write_text('x = "10.0.0.1"\ninclude "hosts.conf"\n')
    (tmp_path / "main.conf").write_text(
        'include "sub/macros.conf"\ntable <t> { $x\ninclude "sub/hosts.conf"\n}\n'
        'relay "r" { listen on 127.0.0.1 port 80 forward to <t> }\n'
    )
    with pytest.raises(ConfigError) as info:
        load_relayd_config(str(tmp_path / "main.conf"))
    # sub/macros.conf includes "hosts.conf" relative to itself: 10.0.0.2 at top level is wrong.
    assert info.value.path.endswith("hosts.conf") and info.value.line == 2
    (tmp_path / "sub" / "macros.conf").write_text('x = "10.0.0.1"\n')
    cfg = load_relayd_config(str(tmp_path / "main.conf"), check_certs=False)
    hosts = cfg.table("t").hosts
    assert [(h.name, h.retry) for h in hosts] == [
        ("10.0.0.1", 0),
        ("10.0.0.2", 0),
        ("10.0.0.3", 1),
    ]
    assert hosts[2].path.endswith("hosts.conf") and hosts[2].line == 2


def test_include_loop(tmp_path: Path) -> None:
    (tmp_path / "a.conf").write_text('include "b.conf"\n')
    (tmp_path / "b.conf").write_text('interval 5\ninclude "a.conf"\n')
    with pytest.raises(ConfigError, match="include loop") as info:
        load_relayd_config(str(tmp_path / "a.conf"))
    assert info.value.path.endswith("b.conf") and info.value.line == 2


def test_include_missing_file_and_missing_name(tmp_path: Path) -> None:
    (tmp_path / "a.conf").write_text('interval 5\ninclude "nope.conf"\n')
    with pytest.raises(ConfigError, match="cannot include") as info:
        load_relayd_config(str(tmp_path / "a.conf"))
    assert info.value.line == 2
    assert "include needs a file name" in error("include").message
    assert "include needs a file name" in error("include {").message


def test_load_unreadable_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_relayd_config(str(tmp_path / "missing.conf"))


# ------------------------------------------------------------------ global options


def test_globals_and_defaults() -> None:
    cfg = parse("")
    assert (cfg.interval, cfg.timeout, cfg.prefork, cfg.socket, cfg.agentx) == (
        10,
        200,
        3,
        None,
        None,
    )
    cfg = parse(
        "interval 5\ntimeout 1000\nprefork 8\nlog state changes\nlog host checks\n"
        'log connection errors\nsocket "/run/r.sock"\nagentx context "c" path "/var/ax"'
    )
    assert (cfg.interval, cfg.timeout, cfg.prefork, cfg.socket) == (5, 1000, 8, "/run/r.sock")
    assert cfg.log.state_changes and cfg.log.host_checks and cfg.log.connection_errors
    assert not cfg.log.connection
    assert cfg.agentx is not None and cfg.agentx.context == "c" and cfg.agentx.path == "/var/ax"
    assert any("agentx is accepted and ignored" in w for w in cfg.warnings)


@pytest.mark.parametrize(
    ("text", "attr"),
    [
        ("log connection", "connection"),
        ("log updates", "state_changes"),
        ("log all", "host_checks"),
    ],
)
def test_log_variants(text: str, attr: str) -> None:
    assert getattr(parse(text).log, attr)


@pytest.mark.parametrize(
    ("text", "fragment", "line"),
    [
        ("prefork 0", "invalid number of preforked relays: 0", 1),
        ("\nprefork 33", "invalid number of preforked relays: 33", 2),
        ("interval 0", "invalid interval", 1),
        ("timeout -1", "invalid timeout", 1),
        ("interval 1\ntimeout 1000", "global timeout 1000 ms exceeds", 2),
        ("timeout 20000\n\ninterval 20", "global timeout 20000 ms exceeds", 3),
        ("log nothing", "syntax error", 1),
        ("agentx context", "syntax error", 1),
        ("interval x", "syntax error: unexpected word 'x'", 1),
    ],
)
def test_global_errors(text: str, fragment: str, line: int) -> None:
    err = error(text)
    assert fragment in err.message
    assert err.line == line


# ------------------------------------------------------------------------- tables


def test_table_hosts_and_options() -> None:
    cfg = parse(
        "table <a> disable { 10.0.0.1 retry 2 ip ttl 4, 10.0.0.2 parent 1 priority 7,"
        " fe80::1%eth0 ,\n 2001:db8::1\n web-1.example.org }\n"
        "table <b> { 10.0.1.1 }\ntable <c> disable\n"
    )
    a = cfg.table("a")
    assert a.disabled
    assert [(h.name, h.id, h.kind) for h in a.hosts] == [
        ("10.0.0.1", 1, "ipv4"),
        ("10.0.0.2", 2, "ipv4"),
        ("fe80::1%eth0", 3, "ipv6"),
        ("2001:db8::1", 4, "ipv6"),
        ("web-1.example.org", 5, "hostname"),
    ]
    h1, h2 = a.hosts[:2]
    assert (h1.retry, h1.ip_ttl, h1.parent) == (2, 4, None)
    assert (h2.parent, h2.priority) == (1, 7)
    assert cfg.table("b").hosts[0].id == 6
    assert cfg.table("c").hosts == () and cfg.table("c").disabled
    assert {w.split(": ", 1)[1] for w in cfg.warnings} == {
        "unused table: a",
        "unused table: b",
        "unused table: c",
    }


@pytest.mark.parametrize(
    ("text", "fragment", "line"),
    [
        ("table <t> { 10.0.0.1 }\ntable <t> { 10.0.0.2 }", "table <t> defined twice", 2),
        ("table <t> { 10.0.0.1\n10.0.0.1 }", "host 10.0.0.1 appears twice", 2),
        ("table <t> { 10.0.0.1 parent 5 }", "parent id 5 is not another host", 1),
        ("table <t> { 10.0.0.1 parent 1 }", "parent id 1 is not another host", 1),
        (
            "table <t> { 10.0.0.1\n10.0.0.2 parent 1\n10.0.0.3 parent 2 }",
            "has a parent itself",
            3,
        ),
        ("table <t> { 10.0.0.1 priority 64 }", "invalid priority: 64", 1),
        ("table <t> { 10.0.0.1 ip ttl 0 }", "invalid ip ttl: 0", 1),
        ("table <t> { 10.0.0.1 retry -1 }", "invalid retry: -1", 1),
        ("table <t> { 10.0.0.1 retry 1 retry 2 }", "retry given twice", 1),
        ("table <t> { 999.1.1.1 }", "invalid host address '999.1.1.1'", 1),
        ("table <t> { bad_$x }", "invalid host address", 1),
        ("table <t> { 10.0.0.1", "unexpected end of file", 1),
        ("table <t> { }", "syntax error", 1),
        ("table <t>", "unexpected end of file", 1),
        ("table t { 10.0.0.1 }", "syntax error", 1),
    ],
)
def test_table_errors(text: str, fragment: str, line: int) -> None:
    err = error(text)
    assert fragment in err.message
    assert err.line == line


# ---------------------------------------------------------------- forward options


@pytest.mark.parametrize(
    ("spec", "check"),
    [
        ("check icmp", {"type": CheckType.ICMP}),
        ("check tcp", {"type": CheckType.TCP}),
        ("check tls", {"type": CheckType.TLS}),
        ('check http "/" code 200', {"type": CheckType.HTTP, "path": "/", "code": 200}),
        (
            'check https "/health" host www.example code 204',
            {"type": CheckType.HTTPS, "path": "/health", "host": "www.example", "code": 204},
        ),
        (
            'check http "/" digest "DA39A3EE5E6B4B0D3255BFEF95601890AFD80709"',
            {"type": CheckType.HTTP, "digest": "da39a3ee5e6b4b0d3255bfef95601890afd80709"},
        ),
        (
            'check http "/" digest d41d8cd98f00b204e9800998ecf8427e',
            {"type": CheckType.HTTP, "digest": "d41d8cd98f00b204e9800998ecf8427e"},
        ),
        (
            'check send "HELO\\ x" expect "250*" tls',
            {"type": CheckType.SEND_EXPECT, "send": "HELO x", "expect": "250*", "tls": True},
        ),
        (
            'check send nothing expect "SSH-2.0*"',
            {"type": CheckType.SEND_EXPECT, "send": "", "expect": "SSH-2.0*", "tls": False},
        ),
        (
            'check binary send "0A0b" expect "ff00"',
            {"type": CheckType.BINARY, "send": "0a0b", "expect": "ff00"},
        ),
        (
            'check script "/usr/local/bin/chk"',
            {"type": CheckType.SCRIPT, "path": "/usr/local/bin/chk"},
        ),
    ],
)
def test_checks(spec: str, check: dict[str, object]) -> None:
    cfg = parse(relay_conf(f"listen on 127.0.0.1 port 80\nforward to <t> port 8080 {spec}"))
    table = cfg.relay("r").tables[0]
    for key, value in check.items():
        assert getattr(table.check, key) == value
    assert body(parse(body(cfg))) == body(cfg)


def test_check_digest_type() -> None:
    cfg = parse(
        relay_conf('listen on 127.0.0.1 port 80\nforward to <t> check http "/" digest ' + "a" * 32)
    )
    assert cfg.relay("r").tables[0].check.digest_type == "md5"


@pytest.mark.parametrize(
    ("mode", "key"),
    [
        ("roundrobin", None),
        ("random", None),
        ("source-hash", None),
        ("hash", "0x" + "0123456789abcdef" * 2),
        ("loadbalance", "some key"),
    ],
)
def test_relay_modes(mode: str, key: str | None) -> None:
    key_text = f' "{key}"' if key else ""
    cfg = parse(relay_conf(f"listen on 127.0.0.1 port 80\nforward to <t> mode {mode}{key_text}"))
    ref = cfg.relay("r").tables[0]
    assert (ref.mode, ref.mode_key) == (Mode(mode), key)


def test_table_options_in_forward() -> None:
    cfg = parse(
        "interval 5\n"
        + relay_conf(
            "listen on 127.0.0.1 port 80\n"
            "forward to <t> port 8080 timeout 300 interval 15 demote carp check tcp"
        )
    )
    ref = cfg.relay("r").tables[0]
    assert (ref.timeout, ref.interval, ref.demote, ref.port) == (300, 15, "carp", 8080)


def test_table_port_defaults_to_listen_port_and_service_names() -> None:
    cfg = parse(relay_conf("listen on 127.0.0.1 port http\nforward to <t>"))
    assert cfg.relay("r").listen[0].port == 80
    assert cfg.relay("r").tables[0].port == 80
    cfg = parse(relay_conf("listen on 127.0.0.1 port https\nforward to <t> port 8443"))
    assert cfg.relay("r").listen[0].port == 443


@pytest.mark.parametrize(
    ("fwd", "fragment"),
    [
        ("forward to <nope>", "no such table: <nope>"),
        ("forward to <t> mode least-states", "mode least-states is only for redirections"),
        ("forward to <t> mode roundrobin abc", "mode roundrobin does not take a key"),
        ("forward to <t> mode hash 0x1234", "invalid hash key"),
        ('forward to <t> check http "/" code 999', "invalid http code: 999"),
        ('forward to <t> check http "" code 200', "needs a path"),
        ('forward to <t> check http "/" digest abc', "invalid digest"),
        ('forward to <t> check binary send "abc" expect "00"', "invalid hex data"),
        ("forward to <t> check tcp check icmp", "check given twice"),
        ("forward to <t> port 0", "invalid port: 0"),
        ("forward to <t> port 65536", "invalid port: 65536"),
        ("forward to <t> port nosuchservice", "invalid port: 'nosuchservice'"),
        ("forward to <t> interval 15", "must be a multiple of the global interval 10"),
        ("forward to <t> interval 5", "must be a multiple"),
        ("forward to <t> timeout 10000", "timeout 10000 ms exceeds its interval"),
        ("forward to <t> demote 9x", "invalid demote group"),
        ("forward to <t> retry 3", "syntax error: unexpected keyword 'retry'"),
        ("forward to <t> check", "syntax error: unexpected character '}'"),
    ],
)
def test_forward_errors(fwd: str, fragment: str) -> None:
    err = error(relay_conf("listen on 127.0.0.1 port 80\n" + fwd))
    assert fragment in err.message
    assert err.line == (5 if "'}'" in fragment else 4)


# ---------------------------------------------------------------------- protocols


def test_protocol_options() -> None:
    cfg = parse(
        proto_conf(
            "tcp { nodelay, sack, no splice, backlog 100, socket buffer 65536, ip ttl 9 }\n"
            "tcp ip minttl 3\n"
            'tls { ciphers "HIGH", no tlsv1.2, no tlsv1.0, session tickets, ecdhe "X25519" }\n'
            "tls { edh params legacy, no cipher-server-preference, client-renegotiation }\n"
            'tls ca file "/etc/ssl/ca.pem"\ntls client ca "/etc/ssl/cli.pem"\n'
            'tls ca cert "/c" \ntls ca key "/k" password "pw"\n'
            "http { headerlen 16384, websockets }\n"
            'return error style "body { color: red }"'
        )
    )
    p = cfg.protocol("p")
    assert (p.tcp.nodelay, p.tcp.sack, p.tcp.splice, p.tcp.backlog) == (True, True, False, 100)
    assert (p.tcp.socket_buffer, p.tcp.ip_ttl, p.tcp.ip_minttl) == (65536, 9, 3)
    assert p.tls.ciphers == "HIGH" and p.tls.protocols == ("tlsv1.3",)
    assert p.tls.session_tickets and p.tls.ecdhe == "X25519"
    assert (p.tls.edh, p.tls.edh_params) == (True, "legacy")
    assert not p.tls.cipher_server_preference and p.tls.client_renegotiation
    assert (p.tls.ca_file, p.tls.client_ca, p.tls.ca_cert) == (
        "/etc/ssl/ca.pem",
        "/etc/ssl/cli.pem",
        "/c",
    )
    assert (p.tls.ca_key, p.tls.ca_key_password) == ("/k", "pw")
    assert (p.http.headerlen, p.http.websockets) == (16384, True)
    assert p.return_error and p.return_error_style == "body { color: red }"
    assert cfg.warnings[-1].endswith("unused protocol: p")
    assert body(parse(body(cfg))) == body(cfg)


def test_protocol_defaults_and_types() -> None:
    cfg = parse(
        HEAD + 'protocol "a"\ntcp protocol "b" { tls no tlsv1 }\ndns protocol "c" {}\n'
        'http protocol "d" { return error }\nhttp protocol "e" { tls { edh, no edh } }'
    )
    a = cfg.protocol("a")
    assert a.type is ProtocolType.TCP and a.rules == () and a.tcp.splice and a.tcp.backlog == 10
    assert a.http.headerlen == 8192 and not a.tls.session_tickets
    assert cfg.protocol("b").tls.protocols == ()
    assert cfg.protocol("c").type is ProtocolType.DNS
    assert cfg.protocol("d").return_error and cfg.protocol("d").return_error_style is None
    assert not cfg.protocol("e").tls.edh
    assert cfg.protocol("default").name == "default"


def test_filter_rules() -> None:
    cfg = parse(
        "table <api> { 10.0.0.9 }\n"
        + proto_conf(
            'pass request quick inet from 10.0.0.0/8 to 192.0.2.1 method get header "Host" '
            'value "www.example" tag "web" label "lbl"\n'
            'block response header "Server"\n'
            'block quick url "evil.example/" no label\n'
            'match request url digest "abc" value "x*"\n'
            'match request cookie set "session" value "1" query hash "id"\n'
            'match request path "/api/*" path strip 1 forward to <api>\n'
            'match request header remove "Proxy"\n'
            'match request header log "User-Agent" tagged "web" no tag\n'
            'match request file "/etc/keys" value "k*"\n'
            "pass inet6 from 2001:db8::/32"
        )
        + 'relay "r" { listen on 127.0.0.1 port 80 protocol "p" forward to <t> forward to <api> }'
    )
    r = cfg.protocol("p").rules
    assert r[0].action is RuleAction.PASS and r[0].quick and r[0].family == "inet"
    assert (r[0].source, r[0].destination, r[0].method) == ("10.0.0.0/8", "192.0.2.1", "GET")
    assert (r[0].tag, r[0].label) == ("web", "lbl")
    assert r[1].action is RuleAction.BLOCK and r[1].direction is Direction.RESPONSE
    assert r[1].keys[0].value is None
    assert r[2].direction is Direction.REQUEST and r[2].unlabel and r[2].quick
    assert r[3].keys[0].digest and r[3].keys[0].field is KeyField.URL
    assert [(k.field, k.action, k.key) for k in r[4].keys] == [
        (KeyField.COOKIE, KeyAction.SET, "session"),
        (KeyField.QUERY, KeyAction.HASH, "id"),
    ]
    assert (r[5].path_strip, r[5].forward_to) == (1, "api")
    assert r[6].keys[0].action is KeyAction.REMOVE
    assert (r[7].keys[0].action, r[7].tagged, r[7].untag) == (KeyAction.LOG, "web", True)
    assert (r[8].keys[0].field, r[8].keys[0].key, r[8].keys[0].value) == (
        KeyField.FILE,
        "/etc/keys",
        "k*",
    )
    assert (r[9].family, r[9].source) == ("inet6", "2001:db8::/32")
    assert [t.display_name for t in cfg.relay("r").tables] == ["t:80", "api:80"]
    assert body(parse(body(cfg))) == body(cfg)


@pytest.mark.parametrize(
    ("rules", "fragment"),
    [
        ("pass method FETCH", "unknown HTTP method 'FETCH'"),
        ('match query append "a" value "b"', "query cannot be changed with append"),
        ('match url set "a" value "b"', "url cannot be changed with set"),
        ('match response cookie "a"', "cookie rules apply to requests only"),
        ('match header append "X"', "needs a name and a value"),
        ("match header remove", "remove needs a name"),
        ('match header "a" header "b"', "header given twice in one rule"),
        ("pass method GET method PUT", "method given twice"),
        ("pass forward to <nope>", "no such table: <nope>"),
        ("pass from 10.0.0.0/33", "invalid prefix length: 33"),
        ("pass from www.example", "expected an IP address"),
        ('match header value "x"', "value without a header name"),
        ("match header append", "needs a name and a value"),
        ("match path strip -1", "invalid path strip"),
        ("pass request request", "syntax error"),
    ],
)
def test_rule_errors(rules: str, fragment: str) -> None:
    err = error(proto_conf(rules))
    assert fragment in err.message
    assert err.line == 3


@pytest.mark.parametrize(
    ("text", "fragment", "line"),
    [
        (proto_conf("tcp nodelay", "dns"), "tcp options are only valid in tcp or http", 3),
        (proto_conf("tls ciphers x", "dns"), "tls options are only valid", 3),
        (proto_conf("http websockets", "tcp"), "http options need an http protocol", 3),
        (proto_conf('match header "Host"', "tcp"), "http rules need an http protocol", 3),
        (proto_conf("tls tlsv9"), "unknown tls option 'tlsv9'", 3),
        (proto_conf("tls edh params big"), "edh params must be none, auto or legacy", 3),
        (proto_conf("tcp backlog 513"), "invalid backlog: 513", 3),
        (proto_conf("http headerlen 200000"), "invalid headerlen", 3),
        (proto_conf('tls ciphers ""'), "empty cipher list", 3),
        (proto_conf('tls keypair "a/b"'), "invalid keypair name", 3),
        (proto_conf("tls keypair a\ntls keypair a"), "keypair a given twice", 4),
        (HEAD + 'protocol "default"', "reserved", 2),
        (HEAD + 'protocol "p"\nhttp protocol "p"', "protocol 'p' defined twice", 3),
        (HEAD + 'protocol "p" { nodelay }', "syntax error: unexpected keyword 'nodelay'", 2),
    ],
)
def test_protocol_errors(text: str, fragment: str, line: int) -> None:
    err = error(text)
    assert fragment in err.message
    assert err.line == line


# ------------------------------------------------------------------------- relays


def test_relay_options() -> None:
    cfg = parse(
        HEAD
        + 'table <b> { 10.0.0.2 }\ntcp protocol "p" {}\n'
        + 'relay "r" {\n listen on 127.0.0.1 port 8000\n listen on ::1 port 8001\n'
        ' protocol "p"\n transparent forward with tls to <t> port 443 mode source-hash\n'
        " forward to <b> port 443\n session timeout 30\n disable\n}\n"
        'relay "s" { listen on 127.0.0.1 port 9000 forward to 10.1.1.1 port 25 retry 2 inet }\n'
        'relay "u" { listen on 127.0.0.1 port 9001 forward to destination retry 1 '
        "inet6 64:ff9b:: proxy-protocol v2 }\n"
        'relay "v" { listen on localhost port 9002 forward to nat lookup }\n'
        'relay "w" { listen on 127.0.0.1 port 9003 forward to www.example }\n'
    )
    r = cfg.relay("r")
    assert [(lst.address, lst.port, lst.tls) for lst in r.listen] == [
        ("127.0.0.1", 8000, False),
        ("::1", 8001, False),
    ]
    assert r.protocol == "p" and r.transparent and r.forward_tls and r.disabled
    assert r.session_timeout == 30
    assert [t.display_name for t in r.tables] == ["t:443", "b:443"]
    assert r.tables[0].mode is Mode.SOURCE_HASH
    s = cfg.relay("s")
    assert s.protocol == "default" and s.inet
    assert (s.forwards[0].target, s.forwards[0].address, s.forwards[0].port) == (
        ForwardTarget.ADDRESS,
        "10.1.1.1",
        25,
    )
    assert s.forwards[0].retry == 2
    u = cfg.relay("u")
    assert (u.forwards[0].target, u.forwards[0].retry) == (ForwardTarget.DESTINATION, 1)
    assert (u.inet6_prefix, u.proxy_protocol) == ("64:ff9b::", "v2")
    assert cfg.relay("v").forwards[0].target is ForwardTarget.NAT_LOOKUP
    w = cfg.relay("w").forwards[0]
    assert (w.address, w.port) == ("www.example", None)
    assert body(parse(body(cfg))) == body(cfg)


@pytest.mark.parametrize(
    ("text", "fragment", "line"),
    [
        (relay_conf("forward to <t>"), "relay 'r' has no listener", 2),
        (relay_conf("listen on 127.0.0.1 port 80"), "relay 'r' has no target", 2),
        (
            relay_conf('listen on 127.0.0.1 port 80 protocol "x" forward to <t>'),
            "no such protocol: 'x'",
            3,
        ),
        (
            relay_conf("listen on 127.0.0.1 port 80 forward to <t>")
            + relay_conf("listen on 127.0.0.1 port 81 forward to <t>").replace(HEAD, ""),
            "relay 'r' defined twice (first at relayd.conf:2)",
            5,
        ),
        (
            relay_conf(
                "listen on 127.0.0.1 port 80\nforward to destination\nforward to nat lookup"
            ),
            "nat lookup and destination are mutually exclusive",
            2,
        ),
        (
            relay_conf("listen on 127.0.0.1 port 80\nforward to 10.0.0.1\nforward to 10.0.0.2"),
            "more than one non-table target",
            2,
        ),
        (relay_conf("listen on 127.0.0.1 port 0 forward to <t>"), "invalid port: 0", 3),
        (relay_conf("listen on 300.0.0.1 port 80 forward to <t>"), "invalid listen address", 3),
        (relay_conf("listen on 127.0.0.1 port 80 forward to <t> proxy-protocol v3"), "v1 or v2", 3),
        (relay_conf("listen on 127.0.0.1 port 80 forward to <t> inet6 10.0.0.1"), "IPv6 prefix", 3),
        (
            relay_conf("listen on 127.0.0.1 port 80 session timeout -1 forward to <t>"),
            "invalid session",
            3,
        ),
        (
            relay_conf(
                'listen on 127.0.0.1 port 80 protocol "default" protocol "default" forward to <t>'
            ),
            "protocol given twice",
            3,
        ),
        (
            relay_conf("listen on 127.0.0.1 port 80 forward to <t> sticky-address"),
            "syntax error",
            3,
        ),
        (
            relay_conf("listen on 127.0.0.1 forward to <t>"),
            "syntax error: unexpected keyword 'forward'",
            3,
        ),
    ],
)
def test_relay_errors(text: str, fragment: str, line: int) -> None:
    err = error(text)
    assert fragment in err.message
    assert err.line == line


def test_protocol_defined_after_relay_is_an_error() -> None:
    err = error(
        relay_conf('listen on 127.0.0.1 port 80 protocol "p" forward to <t>') + 'protocol "p"'
    )
    assert "no such protocol" in err.message and "before" in err.message


def test_table_defined_after_use_is_an_error() -> None:
    err = error('relay "r" { listen on 127.0.0.1 port 80 forward to <t> }\ntable <t> { 10.0.0.1 }')
    assert err.message.startswith("no such table: <t>")
    assert (err.line, err.column, err.token) == (1, 53, "<t>")


def test_rule_forward_table_must_be_used_by_relay() -> None:
    text = (
        "table <api> { 10.0.0.9 }\n"
        + proto_conf('match request path "/api" forward to <api>')
        + 'relay "r" { listen on 127.0.0.1 port 80 protocol "p" forward to <t> }'
    )
    err = error(text)
    assert "forwards to <api>, which the relay does not use" in err.message
    assert err.line == 6


# ---------------------------------------------------------------------- redirects


def test_redirect_options() -> None:
    cfg = parse(
        HEAD
        + "table <b> { 10.0.0.2 }\n"
        + 'redirect "d" {\n listen on 192.0.2.1 udp port 5000:5010 interface eth0 pflog\n'
        " listen on 192.0.2.2 port 53\n"
        " forward to <t> mode least-states check icmp\n"
        " forward to <b> mode least-states check tcp port 5000\n"
        ' sticky-address\n match pftag "RELAYD"\n session timeout 60\n disable\n}\n'
        'redirect "dsr" { listen on 192.0.2.3 port 80 route to <t> port 80 check tcp '
        "interface eth1 pftag x }"
    )
    d = cfg.redirect("d")
    lst = d.listen[0]
    assert (lst.address, lst.ip_proto, lst.port, lst.port_end, lst.interface, lst.pflog) == (
        "192.0.2.1",
        "udp",
        5000,
        5010,
        "eth0",
        True,
    )
    assert d.table.display_name == "t:5000" and d.table.mode is Mode.LEAST_STATES
    assert d.backup is not None and d.backup.display_name == "b:5000"
    assert d.sticky_address and d.tag == "RELAYD" and d.match_tag
    assert d.session_timeout == 60 and d.disabled and not d.route_to
    dsr = cfg.redirect("dsr")
    assert dsr.route_to and dsr.route_interface == "eth1" and dsr.tag == "x" and not dsr.match_tag
    assert body(parse(body(cfg))) == body(cfg)


@pytest.mark.parametrize(
    ("rdr", "fragment"),
    [
        ("listen on 192.0.2.1 port 80\nforward to <t>", "needs a check"),
        (
            "listen on 192.0.2.1 port 80\nforward to <t> check tcp mode loadbalance",
            "only for relays",
        ),
        ("listen on 192.0.2.1 port 80\nforward to <t> check tcp mode hash", "only for relays"),
        ("forward to <t> check tcp", "has no virtual address"),
        ("listen on 192.0.2.1 port 80", "has no table"),
        (
            "listen on 192.0.2.1 port 80\nforward to <t> check tcp\nforward to <t> check tcp"
            "\nforward to <t> check tcp",
            "too many tables",
        ),
        (
            "listen on 192.0.2.1 port 80\nforward to <t> check tcp\n"
            "forward to <t> port 81 check tcp",
            "backup table must use the same mode and port",
        ),
        (
            "listen on 192.0.2.1 port 80\nforward to <t> check tcp\n"
            "route to <t> check tcp interface e0",
            "cannot be mixed",
        ),
        ("listen on 192.0.2.1 sctp port 80\nforward to <t> check tcp", "unknown protocol 'sctp'"),
        ("listen on 192.0.2.1 port 90:80\nforward to <t> check tcp", "invalid port range"),
        ("listen on 192.0.2.1 port a:b\nforward to <t> check tcp", "invalid port range"),
        ("listen on 192.0.2.1 port 80\ntransparent forward to <t> check tcp", "syntax error"),
    ],
)
def test_redirect_errors(rdr: str, fragment: str) -> None:
    err = error(rdr_conf(rdr))
    assert fragment in err.message
    assert err.line >= 2


def test_duplicate_redirect() -> None:
    one = 'redirect "d" { listen on 192.0.2.1 port 80 forward to <t> check icmp }\n'
    err = error(HEAD + one + one)
    assert err.message.startswith("redirection 'd' defined twice") and err.line == 3


def test_router_is_not_supported() -> None:
    err = error(HEAD + 'router "gw" {\n route 0.0.0.0/0\n forward to <t> port 80 check icmp\n}')
    assert "routers are not supported by carpool" in err.message
    assert (err.line, err.token) == (2, "gw")


# ------------------------------------------------------------------ syntax errors


def test_syntax_error_points_at_the_word() -> None:
    text = 'table <t> { 10.0.0.1 }\n\nrelay "www" {\n\tlisten on 10.0.0.1 port 80\n\tlisen on x\n}'
    err = error(text)
    assert (err.line, err.column, err.token) == (5, 2, "lisen")
    assert str(err).startswith("relayd.conf:5:2: syntax error: unexpected word 'lisen'; expected ")
    assert "'listen'" in err.message


def test_missing_closing_brace() -> None:
    err = error('table <t> { 10.0.0.1 }\nrelay "www" {\n listen on 10.0.0.1 port 80\n')
    assert "unexpected end of file" in err.message and "'}'" in err.message
    assert err.line == 3


def test_stray_characters() -> None:
    assert error("interval 5 )").token == ")"
    err = error("interval 5\n= 3")
    assert err.line == 2 and "unexpected character '='" in err.message


# ------------------------------------------------------------------------ render


def test_render_round_trip_of_seed(ssl_dir: str) -> None:
    cfg = parse_relayd_config(SEED, "relayd.conf", base_dir=ssl_dir)
    text = render_relayd_config(cfg)
    assert text.startswith("# relayd.conf, as carpool reads it\ninterval 10\ntimeout 200\n")
    assert 'forward to <webhosts> port 8080 mode loadbalance check http "/" code 200' in text
    again = parse_relayd_config(text, "relayd.conf", base_dir=ssl_dir)
    assert again.relays == cfg.relays or body(again) == body(cfg)
    assert render_relayd_config(again) == text


def test_render_globals_round_trip() -> None:
    cfg = parse(
        'interval 5\ntimeout 900\nprefork 2\nlog connection\nlog host checks\nsocket "/s"\n'
        'agentx path "/p"\ntable <x> disable\ntable <y> { h.example retry 1 parent 2 }\n'
        "table <z> { 10.0.0.1 priority 3 ip ttl 5 }"
    )
    assert body(parse(body(cfg))) == body(cfg)


# -------------------------------------------------------------------- hypothesis

_WORDS = [
    *sorted(KEYWORDS),
    "{",
    "}",
    "<",
    ">",
    "=",
    ",",
    "/",
    '"x"',
    '"/"',
    "10.0.0.1",
    "::1",
    "80",
    "0",
    "-1",
    "99999",
    "<t>",
    "$m",
    "$u",
    '"v"',
    "tlsv1.2",
    "0x00",
    "www",
    "\n",
    "#",
    "\\\n",
]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.text(max_size=200))
def test_random_text_only_raises_config_error(text: str) -> None:
    with contextlib.suppress(ConfigError):
        parse(text)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.sampled_from(_WORDS), max_size=40))
def test_random_token_sequences_only_raise_config_error(words: list[str]) -> None:
    text = HEAD + 'm = "10.0.0.2"\n' + " ".join(words)
    with contextlib.suppress(ConfigError):
        parse(text, macros={"u": "80"})


_PREFIX = relay_conf("listen on 127.0.0.1 port 80\nforward to <t> port 8080")


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.sampled_from(_WORDS), max_size=25))
def test_random_tokens_inside_blocks_only_raise_config_error(words: list[str]) -> None:
    for wrapper in (
        _PREFIX[:-2] + " " + " ".join(words) + "\n}\n",
        HEAD + 'http protocol "p" { ' + " ".join(words) + " }",
    ):
        try:
            cfg = parse(wrapper)
        except ConfigError:
            continue
        assert body(parse(body(cfg))) == body(cfg)


# ------------------------------------------------------- structured round trips


def _strip(obj: object) -> object:
    """``obj`` with every ``path`` and ``line`` field blanked, recursively."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        changes = {}
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            if f.name in ("path", "line") and f.type in ("str", "int"):
                changes[f.name] = type(value)()
            else:
                changes[f.name] = _strip(value)
        return dataclasses.replace(obj, **changes)
    if isinstance(obj, tuple):
        return tuple(_strip(x) for x in obj)
    return obj


def _same(a: RelaydConfig, b: RelaydConfig) -> None:
    for name in ("interval", "timeout", "prefork", "log", "agentx", "socket"):
        assert getattr(a, name) == getattr(b, name)
    for name in ("tables", "protocols", "relays", "redirects"):
        assert _strip(getattr(a, name)) == _strip(getattr(b, name))


_rule_opts = st.lists(
    st.sampled_from(
        [
            'header "Host" value "www.example"',
            'header append "X-A" value "$REMOTE_ADDR"',
            'header set "Connection" value "close"',
            'header remove "Proxy"',
            'header log "User-Agent"',
            'cookie hash "sid"',
            'path "/static/*"',
            'query "q" value "x*"',
            'url digest "d41d8cd98f00b204e9800998ecf8427e"',
            "method POST",
            "path strip 2",
            "forward to <t>",
            'tag "a\\"b"',
            "tagged t1",
            'label "hello world"',
            "no tag",
            "no label",
            'file "/etc/k" value "v"',
        ]
    ),
    max_size=4,
    unique=True,
)
_rules = st.builds(
    lambda action, direction, quick, src, opts: " ".join([action, direction, quick, src, *opts]),
    st.sampled_from(["pass", "block", "match"]),
    st.sampled_from(["", "request"]),
    st.sampled_from(["", "quick"]),
    st.sampled_from(["", "from 10.0.0.0/8", "inet6 to 2001:db8::1", "inet from 192.0.2.1"]),
    _rule_opts,
)
_proto_opts = st.lists(
    st.sampled_from(
        [
            "tcp { nodelay, no sack, backlog 64 }",
            "tcp socket buffer 4096",
            "tcp no splice",
            'tls { ciphers "ECDHE", no tlsv1.3, session tickets }',
            "tls edh",
            "tls no cipher-server-preference",
            'tls ca file "/ca"',
            "http { headerlen 1024, websockets }",
            "return error",
            'return error style "b"',
        ]
    ),
    max_size=4,
    unique=True,
)
_specs = st.builds(
    lambda port, mode, check, extra: f"<t> {port} {mode} {check} {extra}",
    st.sampled_from(["", "port 8080", "port https"]),
    st.sampled_from(["", "mode roundrobin", "mode random", "mode source-hash", 'mode hash "k"']),
    st.sampled_from(
        [
            "check icmp",
            "check tcp",
            'check http "/" code 200',
            'check https "/h" host a.example digest "' + "ab" * 20 + '"',
            'check send "" expect "x" tls',
            'check binary send "00" expect "ff"',
            'check script "/bin/true"',
        ]
    ),
    st.sampled_from(["", "timeout 500", "interval 20", "demote carp"]),
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    rules=st.lists(_rules, max_size=5),
    popts=_proto_opts,
    spec=_specs,
    relay_extra=st.sampled_from(
        ["", "session timeout 5", "disable", "forward to 10.0.0.5 port 99 retry 1"]
    ),
    rdr_extra=st.sampled_from(["", "sticky-address", "match pftag x", "session timeout 9"]),
)
def test_parse_render_parse_is_identity(
    rules: list[str], popts: list[str], spec: str, relay_extra: str, rdr_extra: str
) -> None:
    rdr_spec = spec.replace('mode hash "k"', "")
    text = (
        "interval 10\ntable <t> { 10.0.0.1 retry 1, 10.0.0.2 parent 1, h.example }\n"
        'http protocol "p" {\n' + "\n".join(popts + rules) + "\n}\n"
        'relay "r" {\n listen on 127.0.0.1 port 80\n protocol "p"\n'
        f" forward to {spec}\n {relay_extra}\n}}\n"
        'redirect "d" {\n listen on 192.0.2.1 port 80\n'
        f" forward to {rdr_spec}\n {rdr_extra}\n}}\n"
    )
    try:
        cfg = parse(text)
    except ConfigError as exc:
        # The only combinations the generator may get wrong are ones relayd refuses too.
        assert any(
            s in exc.message
            for s in ("given twice", "requests only", "needs a name", "multiple", "exceeds")
        ), exc
        return
    again = parse(render_relayd_config(cfg))
    _same(cfg, again)
