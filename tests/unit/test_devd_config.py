"""devd.conf: the seed's carp-hast.conf, the grammar, devd's matching and expansion, errors."""

from __future__ import annotations

import contextlib
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from carpool.devd.devdconf import (
    DevdConfig,
    expand_action,
    load_devd_config,
    parse_devd_config,
)
from carpool.errors import ConfigError

# The seed's /etc/devd/carp-hast.conf, exactly as the guide prints it: all on one line.
SEED = (
    'notify 100 { match "system" "IFNET"; match "subsystem" "carp0"; match "type" "LINK_UP"; '
    'action "/usr/local/sbin/carp-hast-switch master"; }; notify 100 { match "system" "IFNET"; '
    'match "subsystem" "carp0"; match "type" "LINK_DOWN"; '
    'action "/usr/local/sbin/carp-hast-switch slave"; };'
)

MODERN = """\
# FreeBSD >= 10: CARP events are system CARP, subsystem vhid@iface.
options {
    set carp-sub "[0-9]+@[0-9a-z.]+";
    directory "/nonexistent/devd";
};

/* the reference's typical rule */
notify 0 {
    match "system"    "CARP";
    match "subsystem" "$carp-sub";
    match "type"      "(MASTER|BACKUP)";
    action "carpcontrol.sh $subsystem $type";
};

// a more specific rule for vhid 1 wins over the generic one
notify 10 {
    match "system" "CARP";
    match "subsystem" "1@em0";
    match "type" "MASTER";
    action "/usr/local/sbin/carp-hast-switch master";
    action "logger promoted ${subsystem}";
};

notify 5 {
    match "system" "CARP";
    match "type" "!MASTER";
    action "logger not master: $type";
};
"""


def event(system: str, subsystem: str, type_: str, **extra: str) -> dict[str, str]:
    return {"system": system, "subsystem": subsystem, "type": type_, **extra}


def test_seed_parses_as_two_notify_rules() -> None:
    cfg = parse_devd_config(SEED, "carp-hast.conf")
    assert [(r.kind, r.priority, r.line, r.path) for r in cfg.rules] == [
        ("notify", 100, 1, "carp-hast.conf"),
        ("notify", 100, 1, "carp-hast.conf"),
    ]
    assert cfg.rules[0].actions == ("/usr/local/sbin/carp-hast-switch master",)
    assert [m.key for m in cfg.rules[1].matches] == ["system", "subsystem", "type"]


def test_seed_matches_legacy_carp_events() -> None:
    cfg = parse_devd_config(SEED)
    up = cfg.matching_rules(event("IFNET", "carp0", "LINK_UP"))
    down = cfg.matching_rules(event("IFNET", "carp0", "LINK_DOWN"))
    assert [r.actions for r in up] == [("/usr/local/sbin/carp-hast-switch master",)]
    assert [r.actions for r in down] == [("/usr/local/sbin/carp-hast-switch slave",)]
    # anchored: carp01 or a modern CARP event do not match the legacy rule
    assert cfg.matching_rules(event("IFNET", "carp01", "LINK_UP")) == []
    assert cfg.matching_rules(event("CARP", "1@em0", "MASTER")) == []
    assert cfg.matching_rules(event("IFNET", "em0", "LINK_UP")) == []
    # attach rules are a different kind
    assert cfg.matching_rules(event("IFNET", "carp0", "LINK_UP"), kind="attach") == []


def test_modern_carp_events_and_priorities() -> None:
    cfg = parse_devd_config(MODERN, "carp.conf")
    assert cfg.variables == {"carp-sub": "[0-9]+@[0-9a-z.]+"}
    assert cfg.directories == ("/nonexistent/devd",)
    master = event("CARP", "1@em0", "MASTER")
    # only the highest-priority match runs, as in devd
    (rule,) = cfg.matching_rules(master)
    assert rule.priority == 10
    assert rule.line == 16
    assert [r.priority for r in cfg.matching_rules(master, first_only=False)] == [10, 0]
    (other,) = cfg.matching_rules(event("CARP", "2@em1", "MASTER"))
    assert other.priority == 0
    assert cfg.expand(other.actions[0], event("CARP", "2@em1", "MASTER")) == (
        "carpcontrol.sh 2@em1 MASTER"
    )
    # negation: BACKUP is "!MASTER", priority 5 beats 0
    (neg,) = cfg.matching_rules(event("CARP", "1@em0", "BACKUP"))
    assert neg.priority == 5
    assert cfg.matching_rules(event("CARP", "1@em0", "INIT"))[0].priority == 5
    assert [r.priority for r in cfg.matching_rules(event("CARP", "x@em0", "INIT"))] == [5]


def test_regex_is_anchored_case_insensitive_posix() -> None:
    cfg = parse_devd_config(
        'notify 1 { match "type" "MASTER|BACKUP"; action "a"; };\n'
        'notify 2 { match "subsystem" "[[:digit:]]+@em[0-9]"; action "b"; };\n'
        'notify 3 { match "missing" ""; match "type" "z.*"; action "c"; };\n'
    )
    assert cfg.matching_rules({"type": "MASTERX"})[0].actions == ("a",)  # ^MASTER | BACKUP$
    assert cfg.matching_rules({"type": "master"})[0].actions == ("a",)
    assert cfg.matching_rules({"type": "XBACKUP"})[0].actions == ("a",)
    assert cfg.matching_rules({"type": "XMASTER"}) == []
    assert cfg.matching_rules({"subsystem": "12@em3"})[0].actions == ("b",)
    assert cfg.matching_rules({"subsystem": "12@em3\n"}) == []
    # an absent variable matches as the empty string
    assert cfg.matching_rules({"type": "zyx"})[0].actions == ("c",)


def test_shorthands_and_numbers() -> None:
    cfg = parse_devd_config(
        "attach 0x10 {\n"
        '    device-name "em[0-9]+";\n'
        "    class 2;\n"
        '    media-type "ethernet";\n'
        '    action "ifconfig $device-name up";\n'
        "};\n"
        "detach -1 { };\n"
        'nomatch 0 { subdevice "0x1"; action "x"; };\n'
    )
    attach, detach, nomatch = cfg.rules
    assert (attach.kind, attach.priority) == ("attach", 16)
    assert (detach.kind, detach.priority, detach.matches, detach.actions) == ("detach", -1, (), ())
    assert nomatch.kind == "nomatch"
    ev = {"device-name": "em1", "class": "2", "media-type": "Ethernet"}
    assert cfg.matching_rules(ev, kind="attach") == [attach]
    assert cfg.matching_rules({**ev, "media-type": "802.11"}, kind="attach") == []
    assert cfg.expand(attach.actions[0], ev) == "ifconfig em1 up"


def test_expand_action() -> None:
    v = {"subsystem": "1@em0", "type": "MASTER", "device-name": "em0", "*": "!system=CARP"}
    assert expand_action("x $subsystem ${type} $type-y", v) == "x 1@em0 MASTER "
    assert expand_action("$device-name/$*", v) == "em0/!system=CARP"
    assert expand_action("cost $$5 $(date +%s) $ 1 $9 end$", v) == "cost $5 $(date +%s) $ 1 $9 end$"
    assert expand_action("$(echo $(id))", v) == "$(echo $(id))"
    assert expand_action("${unclosed", v) == "${unclosed"
    assert expand_action("[$nothing]", v) == "[]"
    assert expand_action("a $type b", {"type": "it's"}) == "a it's b"
    assert expand_action("a $type b", {"type": "it's"}, quote=True) == "a $'it\\'s' b"


def test_strings_comments_and_continuations() -> None:
    text = (
        "/* multi\n line */ notify 0 { # comment\n"
        '  action "one \\\n'
        '      two \\"q\\" \\d";  // trailing\n'
        "};\n"
    )
    (rule,) = parse_devd_config(text).rules
    assert rule.actions == ('one two "q" \\d',)
    assert rule.line == 2


@pytest.mark.parametrize(
    ("text", "line", "column", "fragment"),
    [
        ('notify 0 {\n  match "a" "b"\n};', 3, 1, "expected ';'"),
        ("notify x { };", 1, 8, "priority"),
        ('notify 0 { action "a"; }', 1, 25, "'};'"),
        ('\n\nnotify 0 { match "k" "(["; };', 3, 22, "bad regular expression"),
        ('options { pidfile "x"; };', 1, 11, "expected an option"),
        ('notify 0 { exec "x"; };', 1, 12, "expected match, action"),
        ('notify 0 { action "x', 1, 19, "unterminated string"),
        ("/* open", 1, 1, "unterminated"),
        ("hello;", 1, 1, "expected a statement"),
        ("notify 0 { action x; };", 1, 19, "quoted"),
        ("notify 0 % ", 1, 10, "unexpected character"),
    ],
)
def test_errors_point_at_the_fault(text: str, line: int, column: int, fragment: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_devd_config(text, "/etc/devd/bad.conf")
    err = info.value
    assert (err.path, err.line, err.column) == ("/etc/devd/bad.conf", line, column)
    assert fragment in err.message
    assert str(err).startswith(f"/etc/devd/bad.conf:{line}:{column}: ")


def test_load_directory_sorted_and_follows_options(tmp_path: Path) -> None:
    extra = tmp_path / "extra"
    extra.mkdir()
    (extra / "z.conf").write_text('notify 1 { action "extra"; };')
    (extra / "ignored.txt").write_text("garbage {")
    main = tmp_path / "devd.conf"
    main.write_text(f'options {{ directory "{extra}"; directory "{tmp_path}/none"; }};')
    etc = tmp_path / "etc-devd"
    etc.mkdir()
    (etc / "b.conf").write_text('notify 2 { action "b"; };')
    (etc / "a.conf").write_text(SEED)
    cfg = load_devd_config([str(main), str(etc)])
    assert isinstance(cfg, DevdConfig)
    assert [r.actions[0].split()[-1] for r in cfg.rules] == ["master", "slave", "b", "extra"]
    assert cfg.rules[0].path == str(etc / "a.conf")
    with pytest.raises(ConfigError) as info:
        load_devd_config([str(tmp_path / "missing.conf")])
    assert "cannot read" in info.value.message


@settings(max_examples=300, deadline=None)
@given(
    st.text(
        alphabet=st.sampled_from(list('notify match action options set {};"\\#/*!$0123 \nab.')),
        max_size=120,
    )
)
def test_fuzz_only_config_errors(text: str) -> None:
    try:
        cfg = parse_devd_config(text)
    except ConfigError:
        return
    for rule in cfg.rules:
        for action in rule.actions:
            expand_action(action, {"system": "CARP"})
    cfg.matching_rules({"system": "CARP", "subsystem": "1@em0", "type": "MASTER"})


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=80))
def test_fuzz_any_text(text: str) -> None:
    with contextlib.suppress(ConfigError):
        parse_devd_config(text)
