"""relayctl output formats and command words, against the reference's examples."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from carpool.relayd.relayctl_format import (
    Action,
    Command,
    CommandParseError,
    HostStatus,
    RedirectStatus,
    RelaydStatus,
    RelayStatus,
    SessionStats,
    SessionStatus,
    TableStatus,
    format_availability,
    format_duration,
    parse_command,
    render,
    render_hosts,
    render_redirects,
    render_relays,
    render_sessions,
    render_summary,
)


def example_state() -> RelaydStatus:
    t1 = TableStatus(1, "webhosts:80", (
        HostStatus(1, "10.0.0.1", "up", check_cnt=1204, up_cnt=1204),
        HostStatus(2, "10.0.0.2", "up", check_cnt=1204, up_cnt=1202, retry_cnt=2),
    ))
    t2 = TableStatus(2, "webhosts:80", (
        HostStatus(3, "10.0.0.1", "up", check_cnt=1204, up_cnt=1204),
        HostStatus(4, "10.0.0.2", "down", check_cnt=1204, up_cnt=0,
                   error="tcp connect failed"),
    ))
    rdr = RedirectStatus(1, "www", t1, stats=SessionStats(5321, 60, 12, 640, 15012, 10, 600,
                                                          14400))
    rl = RelayStatus(1, "wwwtls", (t2,), stats=SessionStats(123456, 60, 210, 11832, 201134,
                                                             198, 11900, 250033))
    return RelaydStatus((rdr,), (rl,))


SUMMARY = """\
Id      Type            Name                            Avlblty Status
1       redirect        www                                     active
1       table           webhosts:80                             active (2 hosts)
1       host            10.0.0.1                        100.00% up
2       host            10.0.0.2                        99.83%  up
1       relay           wwwtls                                  active
2       table           webhosts:80                             active (1 hosts)
3       host            10.0.0.1                        100.00% up
4       host            10.0.0.2                        0.00%   down
"""

HOSTS = """\
Id      Type            Name                            Avlblty Status
1       table           webhosts:80                             active (2 hosts)
1       host            10.0.0.1                        100.00% up
                        total: 1204/1204 checks
2       host            10.0.0.2                        99.83%  up
                        total: 1202/1204 checks, 2 retries
2       table           webhosts:80                             active (1 hosts)
3       host            10.0.0.1                        100.00% up
                        total: 1204/1204 checks
4       host            10.0.0.2                        0.00%   down
                        total: 0/1204 checks, error: tcp connect failed
"""

REDIRECTS = """\
Id      Type            Name                            Avlblty Status
1       redirect        www                                     active
                        total: 5321 sessions
                        last: 12/60s 640/h 15012/d sessions
                        average: 10/60s 600/h 14400/d sessions
"""

RELAYS = """\
Id      Type            Name                            Avlblty Status
1       relay           wwwtls                                  active
                        total: 123456 sessions
                        last: 210/60s 11832/h 201134/d sessions
                        average: 198/60s 11900/h 250033/d sessions
"""


def tabs(s: str) -> str:
    return "".join(line.expandtabs(8) + "\n" for line in s.splitlines())


def test_show_outputs_match_relayctl() -> None:
    st_ = example_state()
    assert tabs(render_summary(st_)) == SUMMARY
    assert tabs(render_hosts(st_)) == HOSTS
    assert tabs(render_redirects(st_)) == REDIRECTS
    assert tabs(render_relays(st_)) == RELAYS
    # and the raw bytes carry the tabs of the printf formats
    assert render_summary(st_).splitlines()[1] == (
        "1   \tredirect\twww                     \t       \tactive"
    )


def test_statuses() -> None:
    down = HostStatus(1, "a", "down")
    t = TableStatus(1, "t:80", (down,))
    assert "empty" in render_summary(RelaydStatus((RedirectStatus(1, "r", t),)))
    assert "\tdown\n" in render_summary(RelaydStatus((RedirectStatus(1, "r", t),)))
    backup = TableStatus(2, "b:80", (HostStatus(2, "b", "up"),))
    out = render_summary(RelaydStatus((RedirectStatus(1, "r", t, backup),)))
    assert "active (using backup table)" in out and "active (1 hosts)" in out
    off = render_summary(RelaydStatus((RedirectStatus(1, "r", t, disabled=True),),
                                      (RelayStatus(2, "x", disabled=True),)))
    assert off.count("\tdisabled\n") == 2
    dis = TableStatus(1, "t:80", (HostStatus(1, "a", "up"),), disabled=True)
    out = render_hosts(RelaydStatus((), (RelayStatus(1, "x", (dis,)),)))
    assert "\tdisabled\n" in out and "host" not in out
    h = HostStatus(5, "10.0.0.5", "unknown", parent=2)
    out = render_summary(RelaydStatus((), (RelayStatus(1, "x", (TableStatus(1, "t:1", (h,)),)),)))
    assert "10.0.0.5 parent 2" in out and out.endswith("\tunknown\n")
    assert "\t       \tunknown" in out  # never checked: empty availability
    hd = HostStatus(6, "h", "up", disabled=True)
    assert render_summary(RelaydStatus((), (RelayStatus(1, "x", (TableStatus(1, "t:1",
                                                                             (hd,)),)),))
                          ).endswith("\tdisabled\n")
    # no stats lines while nothing was counted
    assert render_relays(RelaydStatus((), (RelayStatus(1, "x"),))).count("\n") == 2


def test_sessions() -> None:
    s = SessionStatus(0, 17, "192.0.2.10", 51344, "10.0.0.1", 80, age=4.2, idle=1.0,
                      relay=1, pid=81234)
    assert render_sessions([s]) == (
        "session 0:17 192.0.2.10:51344 -> 10.0.0.1:80\tRUNNING\n"
        "\tage 00:00:04, idle 00:00:01, relay 1, pid 81234\n"
    )
    s2 = SessionStatus(1, 2, "::1", 1, "::2", 2, 90061, 3600, 1, 5, done=True, tag=3)
    assert render_sessions([s2]).endswith("\tDONE\n\tage 25:01:01, idle 01:00:00, relay 1, "
                                          "pid 5, tag (id) 3\n")


def test_availability_and_duration() -> None:
    assert format_availability(0, 0) == ""
    assert format_availability(1204, 1202) == "99.83%"
    assert format_availability(3, 3) == "100.00%"
    assert format_duration(-1) == "00:00:00"


@pytest.mark.parametrize(
    ("words", "cmd"),
    [
        (["sh", "su"], Command(Action.SHOW_SUMMARY)),
        (["show", "hosts"], Command(Action.SHOW_HOSTS)),
        (["sh", "rel"], Command(Action.SHOW_RELAYS)),
        (["sh", "red"], Command(Action.SHOW_REDIRECTS)),
        (["sh", "se"], Command(Action.SHOW_SESSIONS)),
        (["h", "dis", "10.0.0.2"], Command(Action.HOST_DISABLE, name="10.0.0.2")),
        (["host", "enable", "4"], Command(Action.HOST_ENABLE, id=4)),
        (["t", "e", "webhosts:80"], Command(Action.TABLE_ENABLE, name="webhosts:80")),
        (["red", "d", "1"], Command(Action.REDIRECT_DISABLE, id=1)),
        (["p"], Command(Action.POLL)),
        (["rel"], Command(Action.RELOAD)),
        (["m"], Command(Action.MONITOR)),
        (["st"], Command(Action.STOP)),
        (["log", "v"], Command(Action.LOG_VERBOSE)),
        (["log", "b"], Command(Action.LOG_BRIEF)),
        (["loa", "/etc/relayd.conf"], Command(Action.LOAD, path="/etc/relayd.conf")),
    ],
)
def test_parse_command(words: list[str], cmd: Command) -> None:
    assert parse_command(words) == cmd


@pytest.mark.parametrize(
    ("words", "first_line"),
    [
        ([], "missing argument:"),
        (["s"], "ambiguous argument: s"),
        (["re"], "ambiguous argument: re"),
        (["lo"], "ambiguous argument: lo"),
        (["sh", "r"], "ambiguous argument: r"),
        (["frobnicate"], "unknown argument: frobnicate"),
        (["show"], "missing argument:"),
        (["host", "disable"], "missing argument:"),
        (["poll", "now"], "superfluous argument: now"),
    ],
)
def test_parse_errors(words: list[str], first_line: str) -> None:
    with pytest.raises(CommandParseError) as e:
        parse_command(words)
    assert e.value.message.splitlines()[0] == first_line


def test_parse_error_lists_choices() -> None:
    with pytest.raises(CommandParseError) as e:
        parse_command(["host", "disable"])
    assert e.value.message == "missing argument:\nvalid commands/args:\n  <hostid>\n"
    with pytest.raises(CommandParseError) as e:
        parse_command(["log", "x"])
    assert e.value.message == "unknown argument: x\nvalid commands/args:\n  verbose\n  brief\n"


@given(st.lists(st.text(max_size=12), max_size=4))
def test_parse_never_crashes(words: list[str]) -> None:
    try:
        cmd = parse_command(words)
    except CommandParseError:
        return
    assert isinstance(cmd.action, Action)


def test_render_dispatch() -> None:
    state = example_state()
    assert render(Command(Action.SHOW_SUMMARY), state) == render_summary(state)
    assert render(Command(Action.SHOW_HOSTS), state) == render_hosts(state)
    assert render(Command(Action.SHOW_REDIRECTS), state) == render_redirects(state)
    assert render(Command(Action.SHOW_RELAYS), state) == render_relays(state)
    assert render(Command(Action.SHOW_ROUTERS), state).startswith("Id")
    assert render(Command(Action.SHOW_SESSIONS), state) == ""
    with pytest.raises(ValueError):
        render(Command(Action.POLL), state)
