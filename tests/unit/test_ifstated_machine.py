"""The ifstated machine: the split-brain guard, edge triggering, externals, loops, CARP."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from carpool.devd.ifstated_machine import (
    CancelExternal,
    IfstatedMachine,
    LoopDetected,
    RunCommand,
    ScheduleExternal,
    StateEntered,
)
from carpool.devd.ifstatedconf import parse_ifstated_config

DEMOTE = "carpctl -g carp carpdemote 240"
UNDEMOTE = "carpctl -g carp -carpdemote 240"

GUARD = f"""\
sync = "em1"
init-state primary
state primary {{
    init run "logger primary"
    if $sync.link.down {{
        run "{DEMOTE}"
        set-state demoted
    }}
}}
state demoted {{
    init run "logger demoted"
    if $sync.link.up {{
        run "{UNDEMOTE}"
        set-state primary
    }}
}}
"""


def machine(text: str, **kwargs: object) -> IfstatedMachine:
    return IfstatedMachine(parse_ifstated_config(text), **kwargs)  # type: ignore[arg-type]


def test_guard_demotes_and_undoes() -> None:
    m = machine(GUARD)
    assert m.start() == [StateEntered("primary"), RunCommand("logger primary")]
    assert m.start() == []
    assert m.link_changed("em1", "up") == []
    assert m.link_changed("em0", "down") == []
    assert m.link_changed("em1", "down") == [
        RunCommand(DEMOTE),
        StateEntered("demoted"),
        RunCommand("logger demoted"),
    ]
    assert m.current == "demoted"
    assert m.link_changed("em1", "down") == []
    assert m.link_changed("em1", "up") == [
        RunCommand(UNDEMOTE),
        StateEntered("primary"),
        RunCommand("logger primary"),
    ]
    assert m.current == "primary"


def test_guard_when_the_link_is_already_down_at_start() -> None:
    m = machine(GUARD)
    assert m.link_changed("em1", "down") == []  # before start: state only recorded
    assert m.start() == [
        StateEntered("primary"),
        RunCommand("logger primary"),
        RunCommand(DEMOTE),
        StateEntered("demoted"),
        RunCommand("logger demoted"),
    ]
    assert m.link_state("em1") == "down"
    assert m.link_state("em9") == "unknown"


def test_edge_triggered_not_level() -> None:
    m = machine('state s { if em0.link.up || em1.link.up run "hello" }')
    m.start()
    assert m.link_changed("em0", "up") == [RunCommand("hello")]
    assert m.link_changed("em1", "up") == []  # still true: no edge
    assert m.link_changed("em0", "down") == []
    assert m.link_changed("em1", "down") == []
    assert m.link_changed("em1", "up") == [RunCommand("hello")]


def test_unknown_before_events_and_nested_ifs() -> None:
    m = machine(
        'if em0.link.unknown run "unknown"\n'
        'if em0.link.up { run "up" if em1.link.up run "both" if ! em1.link.up run "only" }\n'
    )
    assert m.start() == [RunCommand("unknown")]
    assert m.link_changed("em1", "up") == []
    assert m.link_changed("em0", "up") == [RunCommand("up"), RunCommand("both")]
    assert m.link_changed("em0", "unknown") == [RunCommand("unknown")]


def test_carp_conditions_and_aliases() -> None:
    m = machine(
        "init-state watch\n"
        "state watch {\n"
        '  if 1@em0.carp.master run "promote"\n'
        '  if vhid1@em0.carp.backup run "demote"\n'
        '  if carp0.link.up run "legacy up"\n'
        '  if 1@em0.link.down run "pseudo down"\n'
        "}\n",
        carp_aliases={"carp0": "1@em0"},
    )
    assert m.start() == [StateEntered("watch")]
    assert m.link_state("carp0") == "unknown"
    assert m.carp_changed("em0", 2, "MASTER") == []
    assert m.carp_changed("em0", 1, "MASTER") == [RunCommand("promote"), RunCommand("legacy up")]
    assert m.carp_changed("em0", 1, "BACKUP") == [RunCommand("demote"), RunCommand("pseudo down")]
    assert m.link_state("1@em0") == "down"


def test_external_tests_scheduled_per_state_and_wait_for_first_result() -> None:
    ping = "ping -c1 10.0.0.1"
    m = machine(
        f"net = '\"{ping}\" every 10'\n"
        "init-state up\n"
        f'state up {{ if ! $net {{ run "lost" set-state down }} }}\n'
        'state down { init run "entered down" if $net set-state up '
        'if "check" every 5 run "checked" }\n'
    )
    assert m.start() == [StateEntered("up"), ScheduleExternal(ping, 10)]
    assert m.active_externals == {(ping, 10)}
    # "! $net" is not true before the ping ran once
    assert m.link_changed("em0", "up") == []
    assert m.external_result(ping, True) == []
    assert m.external_result(ping, False) == [
        RunCommand("lost"),
        CancelExternal(ping, 10),
        StateEntered("down"),
        ScheduleExternal(ping, 10),
        ScheduleExternal("check", 5),
        RunCommand("entered down"),
    ]
    assert m.active_externals == {(ping, 10), ("check", 5)}
    # the down state waits for both of its tests
    assert m.external_result(ping, False) == []
    assert m.external_result("check", True) == [RunCommand("checked")]
    assert m.external_result(ping, True) == [
        CancelExternal(ping, 10),
        CancelExternal("check", 5),
        StateEntered("up"),
        ScheduleExternal(ping, 10),
    ]


def test_global_externals_scheduled_at_start() -> None:
    m = machine('if "true" every 3 run "ok"\nrun "boot"\nstate a { }')
    assert m.start() == [ScheduleExternal("true", 3), RunCommand("boot"), StateEntered("a")]
    assert m.external_result("true", True) == [RunCommand("ok")]
    assert m.external_result("true", True) == []


def test_set_state_loop_is_stopped() -> None:
    m = machine(
        "init-state a\nstate a { init set-state b }\nstate b { if ! em0.link.up set-state a }",
        max_transitions=5,
    )
    out = m.start()
    assert isinstance(out[-1], LoopDetected)
    assert "set-state loop" in out[-1].message
    assert len([a for a in out if isinstance(a, StateEntered)]) == 5
    # the machine still answers events afterwards
    assert isinstance(m.link_changed("em0", "up"), list)


EVENTS = st.lists(
    st.one_of(
        st.tuples(
            st.just("link"),
            st.sampled_from(["em0", "em1"]),
            st.sampled_from(["up", "down", "unknown"]),
        ),
        st.tuples(
            st.just("carp"), st.sampled_from(["em0"]), st.sampled_from(["MASTER", "BACKUP", "INIT"])
        ),
    ),
    max_size=30,
)


@settings(max_examples=200, deadline=None)
@given(EVENTS)
def test_guard_state_follows_the_sync_link(events: list[tuple[str, str, str]]) -> None:
    m = machine(GUARD)
    m.start()
    demotes = 0
    for kind, name, state in events:
        out = m.link_changed(name, state) if kind == "link" else m.carp_changed(name, 1, state)
        demotes += out.count(RunCommand(DEMOTE)) - out.count(RunCommand(UNDEMOTE))
        assert demotes in (0, 1)  # never demoted twice, never undone twice
        assert not any(isinstance(a, LoopDetected) for a in out)
    assert (m.current == "demoted") == (demotes == 1)
    if m.link_state("em1") == "down":
        assert m.current == "demoted"
    if m.link_state("em1") == "up":
        assert m.current == "primary"
