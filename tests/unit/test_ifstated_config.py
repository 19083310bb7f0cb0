"""ifstated.conf: macros, states, conditions (link, CARP, external), precedence, errors."""

from __future__ import annotations

import contextlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from carpool.devd.ifstatedconf import (
    And,
    CarpTest,
    ExternalTest,
    If,
    LinkTest,
    Not,
    Or,
    Run,
    SetState,
    parse_ifstated_config,
)
from carpool.errors import ConfigError

# The split-brain guard from the seed's FAQ: demote CARP when the sync link (em1) goes down.
GUARD = """\
# /etc/ifstated.conf — split-brain guard
sync = "em1"
demote = '"carpctl -g carp carpdemote 240"'

init-state primary

state primary {
    init {
        run "logger ifstated: primary"
    }
    if $sync.link.down {
        run "$demote"
        run $demote
        set-state demoted
    }
}

state demoted {
    init run "logger ifstated: demoted"
    if em1.link.up {
        run "carpctl -g carp -carpdemote 240"
        set-state primary
    }
}
"""


def test_guard_parses() -> None:
    cfg = parse_ifstated_config(GUARD, "/etc/ifstated.conf")
    assert cfg.init_state == "primary"
    assert list(cfg.states) == ["primary", "demoted"]
    assert cfg.macros == {"sync": "em1", "demote": '"carpctl -g carp carpdemote 240"'}
    primary = cfg.states["primary"]
    assert primary.init == (Run("logger ifstated: primary", 9),)
    (cond,) = primary.body
    assert isinstance(cond, If)
    assert cond.condition == LinkTest("em1", "down")
    # macros expand outside strings only, as in ifstated
    assert cond.body == (
        Run("$demote", 12),
        Run("carpctl -g carp carpdemote 240", 13),
        SetState("demoted", 14),
    )
    demoted = cfg.states["demoted"]
    assert demoted.init == (Run("logger ifstated: demoted", 19),)
    assert demoted.body[0] == If(
        LinkTest("em1", "up"),
        (Run("carpctl -g carp -carpdemote 240", 21), SetState("primary", 22)),
        20,
    )


def test_expressions_precedence_and_tests() -> None:
    cfg = parse_ifstated_config(
        "net = '( \"ping -c1 10.0.0.1\" every 10 && em0.link.up )'\n"
        'if ! $net || 1@em0.carp.master && vhid2@em0.carp.backup run "a"\n'
        'if !(em0.link.unknown || carp0.link.up) { if em2.link.down run "b" }\n'
    )
    first, second = cfg.global_body
    assert isinstance(first, If) and isinstance(second, If)
    ping = ExternalTest("ping -c1 10.0.0.1", 10)
    assert first.condition == Or(
        Not(And(ping, LinkTest("em0", "up"))),
        And(CarpTest("em0", 1, "master"), CarpTest("em0", 2, "backup")),
    )
    assert second.condition == Not(Or(LinkTest("em0", "unknown"), LinkTest("carp0", "up")))
    assert second.body == (If(LinkTest("em2", "down"), (Run("b", 3),), 3),)
    assert cfg.init_state is None and cfg.states == {}


def test_init_state_defaults_to_first_state() -> None:
    cfg = parse_ifstated_config("state one { }\nstate two { init set-state one }")
    assert cfg.init_state == "one"


@pytest.mark.parametrize(
    ("text", "line", "column", "fragment"),
    [
        ("init-state nowhere\nstate a { }", 1, 12, "not defined"),
        ("state a {\n if em0.link.up set-state b\n}", 2, 27, "not defined"),
        ('if em0.link.down set-state a\nstate a { run "x" }', 1, 1, "global block"),
        ('state a {\n if em0.link.sideways run "x"\n}', 2, 5, ".link.up"),
        ('state a {\n if 1@em0.carp.primary run "x"\n}', 2, 5, ".carp.master"),
        ('if 300@em0.carp.master run "x"', 1, 4, "vhid"),
        ('if "ping" every run "x"', 1, 17, "seconds"),
        ('if "ping" run "x"', 1, 11, "every"),
        ('if $nope run "x"', 1, 4, "not defined"),
        ("state a {\n run {\n}", 2, 6, "command"),
        ('state a {\n if (em0.link.up run "x"\n}', 2, 18, "')'"),
        ('state a {\n init { run "x"\n', 3, 1, "not closed"),
        ("state a { }\nstate a { }", 2, 1, "twice"),
        ('run "x\nmore"', 1, 5, "unterminated"),
        ('if em0.link.up run "x" ; ', 1, 24, "unexpected character"),
        ("hello", 1, 1, "expected a macro"),
    ],
)
def test_errors_point_at_the_fault(text: str, line: int, column: int, fragment: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_ifstated_config(text, "/etc/ifstated.conf")
    err = info.value
    assert (err.line, err.column) == (line, column), err
    assert fragment in err.message
    assert str(err).startswith(f"/etc/ifstated.conf:{line}:{column}: ")


WORDS = [
    *"{}()!=\"'$#\n ",
    "&&",
    "||",
    "em0.link.up",
    "1@em0.carp.master",
    "run",
    "if",
    "state",
    "init",
    "init-state",
    "set-state",
    "every",
    "5",
    "a",
    "x =",
]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(WORDS), max_size=40).map("".join))
def test_fuzz_only_config_errors(text: str) -> None:
    with contextlib.suppress(ConfigError):
        parse_ifstated_config(text)


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=80))
def test_fuzz_any_text(text: str) -> None:
    with contextlib.suppress(ConfigError):
        parse_ifstated_config(text)
