"""``/etc/carpool/replicate.toml``: replication jobs, parsed and validated.

Pure apart from :func:`load_config`, which only reads the file. The format::

    [defaults]                      # every key of a job may be given here
    backend = "zfs"                 # "zfs" | "btrfs"
    prefix = "autorep"
    schedule = "*/15 * * * *"       # cron (5 fields or @hourly...) or "continuous"
    interval = "10s"                # pause between cycles when continuous
    bandwidth_limit = "10M"         # bytes per second, binary suffixes K M G T
    compression = "zstd"            # none | lz4 | zstd | gzip | xz | lzo
    allow_rollback = false
    allow_destroy_target = false
    use_bookmarks = false           # ZFS only, not on zfs-fuse
    intermediates = true            # zfs send -I (btrfs: one send per snapshot)
    hold_tag = "carpool"            # "" for no holds
    readonly_target = true
    keep_divergent = true

    [defaults.ssh]
    port = 22
    identity = "/root/.ssh/id_ed25519"
    options = ["-o", "StrictHostKeyChecking=yes"]

    [defaults.retention]            # both sides; .source / .target override
    keep_last = 5
    [defaults.retention.target]
    daily = 30

    [job.data]
    source = "zroot/data"
    target = "root@backup-host:tank/replica/data"   # [user@]host:dataset

Later values win: defaults, then defaults.retention.SIDE, then the job,
then the job's retention.SIDE. Every error names the file and the line of
the offending key (or of its table).
"""

from __future__ import annotations

import calendar
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from typing import Any, Literal

from carpool.configfile import read_config_text
from carpool.errors import ConfigError
from carpool.replicate.plan import ReplicationPolicy
from carpool.replicate.retention import PERIODS, RetentionPolicy

__all__ = [
    "DEFAULT_PATH",
    "CronSchedule",
    "Endpoint",
    "Job",
    "ReplicateConfig",
    "Schedule",
    "SshOptions",
    "load_config",
    "parse_bandwidth",
    "parse_config",
    "parse_cron",
    "parse_endpoint",
    "parse_interval",
]

DEFAULT_PATH = "/etc/carpool/replicate.toml"
COMPRESSIONS = ("none", "lz4", "zstd", "gzip", "xz", "lzo")


# --------------------------------------------------------------------------- endpoints


@dataclass(frozen=True)
class Endpoint:
    """A dataset (ZFS) or path (btrfs), local or on ``[user@]host``."""

    path: str
    host: str | None = None
    user: str | None = None

    @property
    def local(self) -> bool:
        return self.host is None

    def __str__(self) -> str:
        if self.host is None:
            return self.path
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.user + '@' if self.user else ''}{host}:{self.path}"


def parse_endpoint(text: str) -> Endpoint:
    """``pool/fs``, ``host:pool/fs``, ``user@host:/mnt/x``, ``[fe80::1]:pool/fs``.

    Like scp: a colon makes the part before it a host only when that part has
    no slash (so a local ``pool/fs:x`` stays local). ValueError when unusable.
    """
    text = text.strip()
    if not text:
        raise ValueError("an empty endpoint: give a dataset or [user@]host:dataset")
    user: str | None = None
    host: str | None = None
    path = text
    bracket = re.fullmatch(r"(?:([^@/\[\]:]+)@)?\[([0-9A-Fa-f:.%\w]+)\]:(.*)", text)
    if bracket:
        user, host, path = bracket.group(1), bracket.group(2), bracket.group(3)
    elif ":" in text:
        head, _, rest = text.partition(":")
        if "/" not in head:
            path = rest
            if "@" in head:
                user, _, host = head.rpartition("@")
            else:
                host = head
    if host is not None:
        if not host or not re.fullmatch(r"[\w.:%-]+", host):
            raise ValueError(f"{text!r} has an unusable host name {host!r}")
        if user is not None and not re.fullmatch(r"[\w.-]+", user):
            raise ValueError(f"{text!r} has an unusable user name {user!r}")
    if not path:
        raise ValueError(f"{text!r} names a host but no dataset or path after the ':'")
    return Endpoint(path, host, user or None)


# --------------------------------------------------------------------------- cron


_MONTH_NAMES = {name.lower(): i for i, name in enumerate(calendar.month_abbr) if name}
_DAY_NAMES = {name.lower(): (i + 1) % 7 for i, name in enumerate(calendar.day_abbr)}
_MACROS = {
    "@yearly": "0 0 1 1 *",
    "@annually": "0 0 1 1 *",
    "@monthly": "0 0 1 * *",
    "@weekly": "0 0 * * 0",
    "@daily": "0 0 * * *",
    "@midnight": "0 0 * * *",
    "@hourly": "0 * * * *",
}
# A schedule that fires at all fires within this many days (Feb 29 needs 8 years).
_SEARCH_DAYS = 366 * 9


@dataclass(frozen=True)
class CronSchedule:
    """A parsed 5-field cron expression (Vixie semantics: when both the
    day-of-month and day-of-week fields are restricted, either may match)."""

    expression: str
    minutes: tuple[int, ...]
    hours: tuple[int, ...]
    days: frozenset[int]
    months: frozenset[int]
    weekdays: frozenset[int]  # 0 = Sunday
    days_restricted: bool
    weekdays_restricted: bool

    def matches_day(self, day: date) -> bool:
        if day.month not in self.months:
            return False
        dom = day.day in self.days
        dow = (day.isoweekday() % 7) in self.weekdays
        if self.days_restricted and self.weekdays_restricted:
            return dom or dow
        return dom and dow

    def next_fire(self, after: datetime) -> datetime:
        """The first firing time strictly after ``after`` (wall clock in its zone)."""
        start = after.replace(second=0, microsecond=0) + timedelta(minutes=1)
        day = start.date()
        for _ in range(_SEARCH_DAYS):
            if self.matches_day(day):
                same_day = day == start.date()
                for hour in self.hours:
                    if same_day and hour < start.hour:
                        continue
                    for minute in self.minutes:
                        if same_day and hour == start.hour and minute < start.minute:
                            continue
                        return start.replace(
                            year=day.year, month=day.month, day=day.day, hour=hour, minute=minute
                        )
            day += timedelta(days=1)
        raise ValueError(f"cron schedule {self.expression!r} never fires")


def parse_cron(expression: str) -> CronSchedule:
    """Parse ``m h dom mon dow`` (lists, ranges, ``*/n``, ``a-b/n``, names, ``@daily``...).

    ValueError with what is wrong, also for a schedule that can never fire.
    """
    text = " ".join(expression.split())
    expanded = _MACROS.get(text.lower(), text)
    fields = expanded.split(" ")
    if len(fields) != 5:
        raise ValueError(
            f"cron schedule {expression!r} has {len(fields)} field(s); give 5 "
            "(minute hour day-of-month month day-of-week) or @hourly/@daily/@weekly/@monthly"
        )
    minutes = _cron_field(fields[0], 0, 59, {}, "minute")
    hours = _cron_field(fields[1], 0, 23, {}, "hour")
    days = _cron_field(fields[2], 1, 31, {}, "day-of-month")
    months = _cron_field(fields[3], 1, 12, _MONTH_NAMES, "month")
    weekdays = {d % 7 for d in _cron_field(fields[4], 0, 7, _DAY_NAMES, "day-of-week")}
    schedule = CronSchedule(
        expression=expression,
        minutes=tuple(sorted(minutes)),
        hours=tuple(sorted(hours)),
        days=frozenset(days),
        months=frozenset(months),
        weekdays=frozenset(weekdays),
        days_restricted=not fields[2].startswith("*"),
        weekdays_restricted=not fields[4].startswith("*"),
    )
    schedule.next_fire(datetime(2000, 1, 1))  # raises if it never fires
    return schedule


def _cron_field(text: str, low: int, high: int, names: Mapping[str, int], what: str) -> set[int]:
    values: set[int] = set()
    for part in text.split(","):
        body, slash, step_text = part.partition("/")
        step = 1
        if slash:
            if not step_text.isdigit() or int(step_text) == 0:
                raise ValueError(f"cron {what} field {text!r}: step {step_text!r} must be >= 1")
            step = int(step_text)
            if step > high - low:
                raise ValueError(
                    f"cron {what} field {text!r}: step {step} does not fit in {low}-{high}"
                )
        if body == "*":
            first, last = low, high
        elif "-" in body:
            left, _, right = body.partition("-")
            first = _cron_value(left, low, high, names, what, text)
            last = _cron_value(right, low, high, names, what, text)
            if first > last:
                raise ValueError(f"cron {what} field {text!r}: range {body!r} goes backwards")
        else:
            first = _cron_value(body, low, high, names, what, text)
            last = high if slash else first
        values.update(range(first, last + 1, step))
    return values


def _cron_value(
    token: str, low: int, high: int, names: Mapping[str, int], what: str, text: str
) -> int:
    key = token.lower()
    if key in names:
        return names[key]
    if not token.isdigit():
        raise ValueError(f"cron {what} field {text!r}: {token!r} is not a number or name")
    value = int(token)
    if not low <= value <= high:
        raise ValueError(f"cron {what} field {text!r}: {value} is outside {low}-{high}")
    return value


@dataclass(frozen=True)
class Schedule:
    """When a job runs: on a cron schedule, or continuously with ``interval`` between cycles."""

    cron: CronSchedule | None = None
    interval: timedelta | None = None

    @property
    def continuous(self) -> bool:
        return self.cron is None

    def next_fire(self, after: datetime) -> datetime:
        """The next cycle's start after ``after`` (the end of the last cycle when continuous)."""
        if self.cron is not None:
            return self.cron.next_fire(after)
        assert self.interval is not None
        return after + self.interval


def parse_interval(text: str) -> timedelta:
    """A duration: ``"10s"``, ``"500ms"``, ``"5m"``, ``"1h"``, ``"1d"`` or plain seconds (> 0)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*", text)
    if match is None:
        raise ValueError(f"interval {text!r} is not a duration like '10s', '500ms', '5m' or '1h'")
    scale = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}[match.group(2) or "s"]
    value = timedelta(seconds=float(match.group(1)) * scale)
    if value <= timedelta(0):
        raise ValueError(f"interval {text!r} must be longer than zero")
    return value


def parse_bandwidth(text: str) -> int:
    """Bytes per second from ``"10M"``, ``"512K"``, ``"1.5MiB/s"`` (binary units); ValueError."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kKmMgGtT]?)(?:i?B)?(?:/s)?\s*", text)
    if match is None:
        raise ValueError(f"bandwidth {text!r} is not a rate like '10M', '512K' or '1G'")
    power = " KMGT".index(match.group(2).upper() or " ")
    value = int(float(match.group(1)) * 1024**power)
    if value <= 0:
        raise ValueError(f"bandwidth {text!r} must be more than zero")
    return value


# --------------------------------------------------------------------------- jobs


@dataclass(frozen=True)
class SshOptions:
    port: int | None = None
    identity: str | None = None
    options: tuple[str, ...] = ()


@dataclass(frozen=True)
class Job:
    """One replication job, defaults filled in."""

    name: str
    source: Endpoint
    target: Endpoint
    backend: Literal["zfs", "btrfs"] = "zfs"
    prefix: str = "autorep"
    schedule: Schedule = field(default_factory=lambda: Schedule(parse_cron("*/15 * * * *")))
    source_retention: RetentionPolicy = field(default_factory=RetentionPolicy)
    target_retention: RetentionPolicy = field(default_factory=RetentionPolicy)
    bandwidth_limit: int | None = None
    compression: str = "none"
    ssh: SshOptions = field(default_factory=SshOptions)
    allow_rollback: bool = False
    allow_destroy_target: bool = False
    use_bookmarks: bool = False
    intermediates: bool = True
    hold_tag: str | None = "carpool"
    readonly_target: bool = True
    keep_divergent: bool = True
    snapshot_dir: str | None = None
    line: int = 0

    def policy(self, protected: frozenset[str] = frozenset()) -> ReplicationPolicy:
        """The planner policy this job's settings amount to."""
        return ReplicationPolicy(
            prefix=self.prefix,
            intermediates=self.intermediates,
            allow_rollback=self.allow_rollback,
            allow_destroy_target=self.allow_destroy_target,
            use_bookmarks=self.use_bookmarks,
            hold_tag=self.hold_tag if self.backend == "zfs" else None,
            readonly_target=self.readonly_target,
            keep_divergent=self.keep_divergent,
            source_retention=self.source_retention,
            target_retention=self.target_retention,
            protected=protected,
        )


@dataclass(frozen=True)
class ReplicateConfig:
    path: str
    jobs: tuple[Job, ...]

    def job(self, name: str) -> Job:
        for job in self.jobs:
            if job.name == name:
                return job
        known = ", ".join(j.name for j in self.jobs) or "none"
        raise ConfigError(f"no job named {name!r} (jobs: {known})", path=self.path)


# --------------------------------------------------------------------------- loading


def load_config(path: str = DEFAULT_PATH) -> ReplicateConfig:
    """Read and parse the file at ``path``."""
    return parse_config(read_config_text(path), path)


_JOB_KEYS: dict[str, tuple[type, ...]] = {
    "source": (str,),
    "target": (str,),
    "backend": (str,),
    "prefix": (str,),
    "schedule": (str,),
    "interval": (str, int, float),
    "bandwidth_limit": (str, int),
    "compression": (str,),
    "allow_rollback": (bool,),
    "allow_destroy_target": (bool,),
    "use_bookmarks": (bool,),
    "intermediates": (bool,),
    "hold_tag": (str,),
    "readonly_target": (bool,),
    "keep_divergent": (bool,),
    "snapshot_dir": (str,),
    "ssh": (dict,),
    "retention": (dict,),
}
_SSH_KEYS: dict[str, tuple[type, ...]] = {"port": (int,), "identity": (str,), "options": (list,)}
_RETENTION_KEYS = ("keep_last", *PERIODS)
_SIDES = ("source", "target")


def parse_config(text: str, path: str = "<config>") -> ReplicateConfig:
    """Parse the text of a replicate.toml; ConfigError with ``path:line:column``."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise _syntax_error(exc, path) from None
    where = _Locator(text, path)
    for key in data:
        if key not in ("defaults", "job"):
            raise where.error(
                (key,), f"unknown top-level key {key!r}; valid: [defaults] and [job.NAME] tables"
            )
    defaults = data.get("defaults", {})
    if not isinstance(defaults, dict):
        raise where.error(("defaults",), "'defaults' must be a table: write [defaults]")
    _check_keys(defaults, ("defaults",), where, job=False)
    jobs_table = data.get("job", {})
    if not isinstance(jobs_table, dict):
        raise where.error(("job",), "'job' must hold tables: write [job.NAME]")
    jobs = []
    for name, table in jobs_table.items():
        if not isinstance(table, dict):
            raise where.error(("job", name), f"job {name!r} must be a table: write [job.{name}]")
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
            raise where.error(
                ("job", name), f"job name {name!r} may only use letters, digits, '_', '-' and '.'"
            )
        _check_keys(table, ("job", name), where, job=True)
        jobs.append(_build_job(name, defaults, table, where))
    if not jobs:
        raise ConfigError("no [job.NAME] table: define at least one replication job", path=path)
    return ReplicateConfig(path, tuple(jobs))


def _syntax_error(exc: tomllib.TOMLDecodeError, path: str) -> ConfigError:
    message = str(exc)
    line = getattr(exc, "lineno", 0) or 0
    column = getattr(exc, "colno", 0) or 0
    match = re.search(r"\s*\(at line (\d+), column (\d+)\)$", message)
    if match:
        line, column = int(match.group(1)), int(match.group(2))
        message = message[: match.start()]
    message = re.sub(r"\s*\(at end of document\)$", " at the end of the file", message)
    return ConfigError(f"TOML syntax error: {message}", path=path, line=line, column=column)


def _check_keys(
    table: Mapping[str, Any], at: tuple[str, ...], where: _Locator, *, job: bool
) -> None:
    label = ".".join(at)
    for key, value in table.items():
        if key not in _JOB_KEYS:
            raise where.error(
                (*at, key),
                f"unknown key {key!r} in [{label}]; valid keys: {', '.join(sorted(_JOB_KEYS))}",
                token=key,
            )
        if not job and key in ("source", "target"):
            raise where.error(
                (*at, key), f"{key!r} belongs in a [job.NAME] table, not in [defaults]", token=key
            )
        _check_type(value, _JOB_KEYS[key], (*at, key), where)
    if "ssh" in table:
        for key, value in table["ssh"].items():
            if key not in _SSH_KEYS:
                raise where.error(
                    (*at, "ssh", key),
                    f"unknown key {key!r} in [{label}.ssh]; valid keys: "
                    f"{', '.join(sorted(_SSH_KEYS))}",
                    token=key,
                )
            _check_type(value, _SSH_KEYS[key], (*at, "ssh", key), where)
    if "retention" in table:
        for key, value in table["retention"].items():
            if key in _SIDES:
                _check_type(value, (dict,), (*at, "retention", key), where)
                for sub, number in value.items():
                    if sub not in _RETENTION_KEYS:
                        raise where.error(
                            (*at, "retention", key, sub),
                            f"unknown key {sub!r} in [{label}.retention.{key}]; valid keys: "
                            f"{', '.join(_RETENTION_KEYS)}",
                            token=sub,
                        )
                    _check_count(number, (*at, "retention", key, sub), where)
            elif key in _RETENTION_KEYS:
                _check_count(value, (*at, "retention", key), where)
            else:
                raise where.error(
                    (*at, "retention", key),
                    f"unknown key {key!r} in [{label}.retention]; valid keys: "
                    f"{', '.join(_RETENTION_KEYS)}, and the tables source and target",
                    token=key,
                )


_TYPE_NAMES = {
    str: "a string",
    int: "an integer",
    float: "a number",
    bool: "true or false",
    dict: "a table",
    list: "an array",
}


def _check_type(value: Any, types: tuple[type, ...], at: tuple[str, ...], where: _Locator) -> None:
    ok = isinstance(value, types) and not (isinstance(value, bool) and bool not in types)
    if not ok:
        wanted = " or ".join(_TYPE_NAMES[t] for t in types)
        raise where.error(at, f"{at[-1]!r} must be {wanted}, not {value!r}", token=at[-1])


def _check_count(value: Any, at: tuple[str, ...], where: _Locator) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise where.error(at, f"{at[-1]!r} must be a whole number >= 0, not {value!r}", at[-1])


def _build_job(
    name: str, defaults: Mapping[str, Any], table: Mapping[str, Any], where: _Locator
) -> Job:
    at = ("job", name)

    def origin(key: str) -> tuple[str, ...]:
        return (*at, key) if key in table else ("defaults", key)

    merged: dict[str, Any] = {**defaults, **table}
    for key in ("source", "target"):
        if key not in table:
            raise where.error(at, f'job {name!r} has no {key!r}: add {key} = "pool/dataset"')

    def fail(key: str, message: str) -> ConfigError:
        return where.error(origin(key), message, token=key)

    backend = merged.get("backend", "zfs")
    if backend not in ("zfs", "btrfs"):
        raise fail("backend", f'backend {backend!r} is not known; use "zfs" or "btrfs"')
    endpoints: dict[str, Endpoint] = {}
    for key in ("source", "target"):
        try:
            endpoint = parse_endpoint(table[key])
        except ValueError as exc:
            raise fail(key, str(exc)) from None
        if backend == "btrfs" and not endpoint.path.startswith("/"):
            raise fail(key, f"btrfs {key} {endpoint.path!r} must be an absolute path")
        if backend == "zfs" and not re.fullmatch(
            r"[A-Za-z0-9_.:-]+(/[A-Za-z0-9_.:-]+)*", endpoint.path
        ):
            raise fail(key, f"{endpoint.path!r} is not a ZFS dataset name like pool/fs")
        endpoints[key] = endpoint
    if endpoints["source"] == endpoints["target"]:
        raise fail("target", "source and target are the same dataset")

    prefix = merged.get("prefix", "autorep")
    if not re.fullmatch(r"[A-Za-z0-9_.:-]+", prefix):
        raise fail("prefix", f"prefix {prefix!r} may only use letters, digits, '_', '-', '.', ':'")

    schedule_text = merged.get("schedule", "*/15 * * * *")
    schedule: Schedule
    if schedule_text.strip() == "continuous":
        interval_value = merged.get("interval", "10s")
        try:
            interval = parse_interval(str(interval_value))
        except ValueError as exc:
            raise fail("interval", str(exc)) from None
        schedule = Schedule(interval=interval)
    else:
        if "interval" in merged and "interval" in table:
            raise fail("interval", "'interval' only applies with schedule = \"continuous\"")
        try:
            schedule = Schedule(cron=parse_cron(schedule_text))
        except ValueError as exc:
            raise fail("schedule", f'{exc}; or use "continuous"') from None

    bandwidth: int | None = None
    if "bandwidth_limit" in merged:
        raw = merged["bandwidth_limit"]
        try:
            bandwidth = parse_bandwidth(str(raw))
        except ValueError as exc:
            raise fail("bandwidth_limit", str(exc)) from None

    compression = merged.get("compression", "none")
    if compression not in COMPRESSIONS:
        raise fail(
            "compression",
            f"compression {compression!r} is not known; use one of {', '.join(COMPRESSIONS)}",
        )
    if backend == "btrfs":
        for key in ("use_bookmarks",):
            if merged.get(key):
                raise fail(key, f"{key} is a ZFS feature; remove it from this btrfs job")
    elif "snapshot_dir" in merged:
        raise fail("snapshot_dir", "snapshot_dir only applies to btrfs jobs")

    ssh_table = {**defaults.get("ssh", {}), **table.get("ssh", {})}
    port = ssh_table.get("port")
    if port is not None and not 1 <= port <= 65535:
        raise where.error(
            (*at, "ssh", "port") if "port" in table.get("ssh", {}) else ("defaults", "ssh", "port"),
            f"ssh port {port} is outside 1-65535",
            token="port",
        )
    options = ssh_table.get("options", [])
    if not all(isinstance(o, str) for o in options):
        raise where.error((*at, "ssh", "options"), "ssh options must be an array of strings")
    ssh = SshOptions(port, ssh_table.get("identity"), tuple(options))

    hold_tag = merged.get("hold_tag", "carpool") or None
    return Job(
        name=name,
        source=endpoints["source"],
        target=endpoints["target"],
        backend=backend,
        prefix=prefix,
        schedule=schedule,
        source_retention=_retention("source", defaults, table),
        target_retention=_retention("target", defaults, table),
        bandwidth_limit=bandwidth,
        compression=compression,
        ssh=ssh,
        allow_rollback=merged.get("allow_rollback", False),
        allow_destroy_target=merged.get("allow_destroy_target", False),
        use_bookmarks=merged.get("use_bookmarks", False),
        intermediates=merged.get("intermediates", True),
        hold_tag=hold_tag,
        readonly_target=merged.get("readonly_target", True),
        keep_divergent=merged.get("keep_divergent", True),
        snapshot_dir=merged.get("snapshot_dir"),
        line=where.line_of(at),
    )


def _retention(side: str, defaults: Mapping[str, Any], table: Mapping[str, Any]) -> RetentionPolicy:
    values: dict[str, int] = {}
    for layer in (defaults.get("retention", {}), table.get("retention", {})):
        values.update({k: v for k, v in layer.items() if k in _RETENTION_KEYS})
        values.update(layer.get(side, {}))
    return RetentionPolicy(**values)


# --------------------------------------------------------------------------- locating keys


class _Locator:
    """Finds the line (and column) where a key path is written in TOML text.

    tomllib gives values without positions, so this scans the text: table
    headers set the current path, ``key = value`` lines (dotted keys too)
    record ``path + key``. A key inside an inline table is found on its
    parent's line. Unknown paths fall back to the nearest known ancestor.
    """

    _HEADER = re.compile(r"^\s*\[\[?\s*([^\[\]]+?)\s*\]\]?\s*(?:#.*)?$")
    _KEY = re.compile(
        r"^\s*((?:[A-Za-z0-9_-]+|\"[^\"]*\"|'[^']*')"
        r"(?:\s*\.\s*(?:[A-Za-z0-9_-]+|\"[^\"]*\"|'[^']*'))*)\s*="
    )

    def __init__(self, text: str, path: str) -> None:
        self.path = path
        self.lines = text.splitlines()
        self.positions: dict[tuple[str, ...], tuple[int, int]] = {}
        current: tuple[str, ...] = ()
        for number, line in enumerate(self.lines, start=1):
            header = self._HEADER.match(line)
            if header:
                current = self._split(header.group(1))
                column = line.index("[") + 1
                for depth in range(1, len(current) + 1):
                    self.positions.setdefault(current[:depth], (number, column))
                continue
            key = self._KEY.match(line)
            if key:
                parts = self._split(key.group(1))
                column = len(line) - len(line.lstrip()) + 1
                for depth in range(1, len(parts) + 1):
                    self.positions.setdefault((*current, *parts[:depth]), (number, column))

    @staticmethod
    def _split(dotted: str) -> tuple[str, ...]:
        parts = re.findall(r"\"([^\"]*)\"|'([^']*)'|([A-Za-z0-9_-]+)", dotted)
        return tuple(a or b or c for a, b, c in parts)

    def position(self, at: tuple[str, ...]) -> tuple[int, int]:
        if at in self.positions:
            return self.positions[at]
        for depth in range(len(at) - 1, 0, -1):
            parent = at[:depth]
            if parent in self.positions:
                number, column = self.positions[parent]
                text = self.lines[number - 1]
                found = re.search(rf"(?<![\w-]){re.escape(at[-1])}\s*=", text)
                if found:
                    return number, found.start() + 1
                return number, column
        return 0, 0

    def line_of(self, at: tuple[str, ...]) -> int:
        return self.position(at)[0]

    def error(self, at: tuple[str, ...], message: str, token: str | None = None) -> ConfigError:
        line, column = self.position(at)
        return ConfigError(message, path=self.path, line=line, column=column, token=token)
