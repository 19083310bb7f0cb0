# ruff: noqa: UP031  -- relayctl.c printf formats, kept as written
"""relayctl's words and its output, as OpenBSD relayctl prints them.  Pure.

:func:`parse_command` turns argv words into a :class:`Command` the way
relayctl/parser.c does: every keyword may be cut to a unique prefix (``sh su``),
an id argument that is not a number is a name, and errors carry relayctl's
exact stderr text (``ambiguous argument: s`` ... followed by
``valid commands/args:`` and the choices).

The ``render_*`` functions print the ``show`` commands from plain snapshots of
the runtime state (:class:`RelaydStatus` with :class:`RedirectStatus`,
:class:`RelayStatus`, :class:`TableStatus`, :class:`HostStatus`;
:class:`SessionStatus` for ``show sessions``), with relayctl.c's printf formats,
in the order pfe.c ``show()`` sends the objects: each redirect, its stats, its
table and hosts, its backup table and hosts; then each relay, its stats, each
of its tables and their hosts.  Hosts of a disabled table are not listed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import StrEnum

__all__ = [
    "Action",
    "Command",
    "CommandParseError",
    "HostStatus",
    "RedirectStatus",
    "RelayStatus",
    "RelaydStatus",
    "SessionStats",
    "SessionStatus",
    "TableStatus",
    "format_availability",
    "format_duration",
    "parse_command",
    "render",
    "render_hosts",
    "render_redirects",
    "render_relays",
    "render_sessions",
    "render_summary",
]

HEADER = "%-4s\t%-8s\t%-24s\t%-7s\tStatus\n" % ("Id", "Type", "Name", "Avlblty")
ROW = "%-4u\t%-8s\t%-24s\t%-7s\t%s\n"


# -- state snapshots --------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class HostStatus:
    id: int
    name: str
    state: str = "unknown"  #: "up", "down" or "unknown"
    disabled: bool = False
    parent: int | None = None
    check_cnt: int = 0
    up_cnt: int = 0
    retry_cnt: int = 0
    error: str = "none"  #: util.c host_error() string of the last check


@dataclass(frozen=True, slots=True)
class TableStatus:
    id: int
    name: str  #: "name:port" as relayd names a table use
    hosts: tuple[HostStatus, ...] = ()
    disabled: bool = False

    @property
    def up(self) -> int:
        return sum(1 for h in self.hosts if h.state == "up" and not h.disabled)


@dataclass(frozen=True, slots=True)
class SessionStats:
    """relayd's ``struct ctl_stats`` (summed over the relay processes)."""

    cnt: int = 0
    interval: int = 60
    last: int = 0
    last_hour: int = 0
    last_day: int = 0
    avg: int = 0
    avg_hour: int = 0
    avg_day: int = 0


@dataclass(frozen=True, slots=True)
class RedirectStatus:
    id: int
    name: str
    table: TableStatus
    backup: TableStatus | None = None
    disabled: bool = False
    stats: SessionStats = field(default_factory=SessionStats)

    @property
    def status(self) -> str:
        """print_rdr_status: down when no host of the table (nor the backup) is up."""
        if self.disabled:
            return "disabled"
        if self.table.up > 0 and not self.table.disabled:
            return "active"
        if self.backup is not None and not self.backup.disabled and self.backup.up > 0:
            return "active (using backup table)"
        return "down"


@dataclass(frozen=True, slots=True)
class RelayStatus:
    id: int
    name: str
    tables: tuple[TableStatus, ...] = ()
    disabled: bool = False
    stats: SessionStats = field(default_factory=SessionStats)


@dataclass(frozen=True, slots=True)
class RelaydStatus:
    redirects: tuple[RedirectStatus, ...] = ()
    relays: tuple[RelayStatus, ...] = ()


@dataclass(frozen=True, slots=True)
class SessionStatus:
    proc: int  #: relay process number (peerid)
    id: int
    client_addr: str
    client_port: int
    backend_addr: str
    backend_port: int
    age: float  #: seconds since the session started
    idle: float  #: seconds since its last activity
    relay: int
    pid: int
    done: bool = False
    tag: int = 0


# -- formatting pieces ---------------------------------------------------------------------


def format_availability(check_cnt: int, up_cnt: int) -> str:
    """print_availability: ``"%.2f%%"`` of up/checks, empty before the first check."""
    if check_cnt == 0:
        return ""
    return "%.2f%%" % (up_cnt / check_cnt * 100)


def format_duration(seconds: float) -> str:
    """print_time: ``HH:MM:SS`` with hours unbounded."""
    s = max(int(seconds), 0)
    return "%.2u:%.2u:%.2u" % (s // 3600, s // 60 % 60, s % 60)


def _table_status(t: TableStatus) -> str:
    if t.disabled:
        return "disabled"
    if t.up == 0:
        return "empty"
    return f"active ({t.up} hosts)"


def _host_status(h: HostStatus) -> str:
    if h.disabled:
        return "disabled"
    return h.state if h.state in ("up", "down") else "unknown"


def _table_rows(t: TableStatus, out: list[str], details: bool) -> None:
    out.append(ROW % (t.id, "table", t.name, "", _table_status(t)))
    if t.disabled:
        return
    for h in t.hosts:
        name = h.name if h.parent is None else f"{h.name} parent {h.parent}"
        out.append(ROW % (h.id, "host", name, format_availability(h.check_cnt, h.up_cnt),
                          _host_status(h)))
        if details and h.check_cnt:
            line = "\t%8s\ttotal: %u/%u checks" % ("", h.up_cnt, h.check_cnt)
            if h.retry_cnt:
                line += ", %d retries" % h.retry_cnt
            if h.error != "none" and h.state == "down":
                line += f", error: {h.error}"
            out.append(line + "\n")


def _stats_rows(s: SessionStats, out: list[str]) -> None:
    if s.cnt == 0:
        return
    out.append("\t%8s\ttotal: %u sessions\n" % ("", s.cnt))
    out.append("\t%8s\tlast: %u/%us %u/h %u/d sessions\n"
               % ("", s.last, s.interval, s.last_hour, s.last_day))
    out.append("\t%8s\taverage: %u/%us %u/h %u/d sessions\n"
               % ("", s.avg, s.interval, s.avg_hour, s.avg_day))


def _show(state: RelaydStatus, what: str) -> str:
    out = [HEADER]
    tables = what in ("summary", "hosts")
    for rdr in state.redirects:
        if what in ("summary", "redirects"):
            out.append(ROW % (rdr.id, "redirect", rdr.name, "", rdr.status))
        if what == "redirects":
            _stats_rows(rdr.stats, out)
        if tables:
            _table_rows(rdr.table, out, what == "hosts")
            if rdr.backup is not None:
                _table_rows(rdr.backup, out, what == "hosts")
    for rl in state.relays:
        if what in ("summary", "relays"):
            out.append(ROW % (rl.id, "relay", rl.name, "",
                              "disabled" if rl.disabled else "active"))
        if what == "relays":
            _stats_rows(rl.stats, out)
        if tables:
            for t in rl.tables:
                _table_rows(t, out, what == "hosts")
    return "".join(out)


def render_summary(state: RelaydStatus) -> str:
    return _show(state, "summary")


def render_hosts(state: RelaydStatus) -> str:
    return _show(state, "hosts")


def render_redirects(state: RelaydStatus) -> str:
    return _show(state, "redirects")


def render_relays(state: RelaydStatus) -> str:
    return _show(state, "relays")


def render_sessions(sessions: Sequence[SessionStatus]) -> str:
    out: list[str] = []
    for s in sessions:
        out.append("session %u:%u %s:%u -> %s:%u\t%s\n" % (
            s.proc, s.id, s.client_addr, s.client_port, s.backend_addr, s.backend_port,
            "DONE" if s.done else "RUNNING"))
        line = "\tage %s, idle %s, relay %u, pid %u" % (
            format_duration(s.age), format_duration(s.idle), s.relay, s.pid)
        if s.tag:
            line += ", tag (id) %u" % s.tag
        out.append(line + "\n")
    return "".join(out)


# -- command words -------------------------------------------------------------------------


class Action(StrEnum):
    SHOW_SUMMARY = "show summary"
    SHOW_HOSTS = "show hosts"
    SHOW_REDIRECTS = "show redirects"
    SHOW_RELAYS = "show relays"
    SHOW_ROUTERS = "show routers"
    SHOW_SESSIONS = "show sessions"
    MONITOR = "monitor"
    LOAD = "load"
    POLL = "poll"
    RELOAD = "reload"
    STOP = "stop"
    REDIRECT_ENABLE = "redirect enable"
    REDIRECT_DISABLE = "redirect disable"
    TABLE_ENABLE = "table enable"
    TABLE_DISABLE = "table disable"
    HOST_ENABLE = "host enable"
    HOST_DISABLE = "host disable"
    LOG_VERBOSE = "log verbose"
    LOG_BRIEF = "log brief"


@dataclass(frozen=True, slots=True)
class Command:
    """A parsed relayctl command: ``id`` when the argument was a number, else ``name``."""

    action: Action
    id: int | None = None
    name: str | None = None
    path: str | None = None


class CommandParseError(ValueError):
    """What relayctl prints on stderr (``message``) before exiting with status 1."""

    def __init__(self, message: str) -> None:
        self.message = message
        super().__init__(message.rstrip("\n"))


# Token tables as in relayctl/parser.c: (keyword, action or None, next table or arg kind).
_Tok = tuple[str, "Action | None", "str | None"]

_TABLES: dict[str, list[_Tok]] = {
    "main": [
        ("monitor", Action.MONITOR, None),
        ("show", None, "show"),
        ("load", Action.LOAD, "<path>"),
        ("poll", Action.POLL, None),
        ("reload", Action.RELOAD, None),
        ("stop", Action.STOP, None),
        ("redirect", None, "redirect"),
        ("table", None, "table"),
        ("host", None, "host"),
        ("log", None, "log"),
    ],
    "show": [
        ("summary", Action.SHOW_SUMMARY, None),
        ("hosts", Action.SHOW_HOSTS, None),
        ("redirects", Action.SHOW_REDIRECTS, None),
        ("relays", Action.SHOW_RELAYS, None),
        ("routers", Action.SHOW_ROUTERS, None),
        ("sessions", Action.SHOW_SESSIONS, None),
    ],
    "redirect": [
        ("disable", Action.REDIRECT_DISABLE, "<redirectid>"),
        ("enable", Action.REDIRECT_ENABLE, "<redirectid>"),
    ],
    "table": [
        ("disable", Action.TABLE_DISABLE, "<tableid>"),
        ("enable", Action.TABLE_ENABLE, "<tableid>"),
    ],
    "host": [
        ("disable", Action.HOST_DISABLE, "<hostid>"),
        ("enable", Action.HOST_ENABLE, "<hostid>"),
    ],
    "log": [
        ("verbose", Action.LOG_VERBOSE, None),
        ("brief", Action.LOG_BRIEF, None),
    ],
}


def _valid(choices: Sequence[str]) -> str:
    return "valid commands/args:\n" + "".join(f"  {c}\n" for c in choices)


def parse_command(words: Sequence[str]) -> Command:
    """relayctl's argv (without the program and options) → :class:`Command`."""
    table = _TABLES["main"]
    i = 0
    action: Action | None = None
    arg_kind: str | None = None
    while True:
        word = words[i] if i < len(words) else None
        if word is None:
            msg = "missing argument:\n"
            raise CommandParseError(msg + _valid([t[0] for t in table]))
        hits = [t for t in table if t[0].startswith(word)]
        exact = [t for t in hits if t[0] == word]
        if exact:
            hits = exact
        if len(hits) != 1:
            what = "ambiguous" if hits else "unknown"
            raise CommandParseError(
                f"{what} argument: {word}\n" + _valid([t[0] for t in table])
            )
        _kw, action, nxt = hits[0]
        i += 1
        if action is not None:
            arg_kind = nxt
            break
        assert nxt is not None
        table = _TABLES[nxt]
    cmd = Command(action)
    if arg_kind is not None:
        if i >= len(words) or words[i] == "":
            raise CommandParseError("missing argument:\n" + _valid([arg_kind]))
        arg = words[i]
        i += 1
        if arg_kind == "<path>":
            cmd = Command(action, path=arg)
        elif arg.isdigit() and int(arg) <= 0xFFFFFFFF:
            cmd = Command(action, id=int(arg))
        else:
            cmd = Command(action, name=arg)
    if i < len(words):
        raise CommandParseError(f"superfluous argument: {words[i]}\n")
    return cmd


def render(cmd: Command, state: RelaydStatus, sessions: Sequence[SessionStatus] = ()) -> str:
    """The output of a ``show`` command."""
    if cmd.action is Action.SHOW_SUMMARY:
        return render_summary(state)
    if cmd.action is Action.SHOW_HOSTS:
        return render_hosts(state)
    if cmd.action is Action.SHOW_REDIRECTS:
        return render_redirects(state)
    if cmd.action is Action.SHOW_RELAYS:
        return render_relays(state)
    if cmd.action is Action.SHOW_ROUTERS:
        return HEADER
    if cmd.action is Action.SHOW_SESSIONS:
        return render_sessions(sessions)
    raise ValueError(f"{cmd.action} prints no table")
