"""replicate.toml: jobs, defaults, cron schedules, errors with line numbers."""

from __future__ import annotations

from datetime import datetime, timedelta
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from carpool.errors import ConfigError
from carpool.replicate.config import (
    Endpoint,
    load_config,
    parse_bandwidth,
    parse_config,
    parse_cron,
    parse_endpoint,
    parse_interval,
)
from carpool.replicate.retention import RetentionPolicy

FULL = """\
# replication jobs
[defaults]
prefix = "autorep"
schedule = "*/15 * * * *"
bandwidth_limit = "10M"
compression = "zstd"

[defaults.ssh]
port = 2222
identity = "/root/.ssh/id_ed25519"

[defaults.retention]
keep_last = 5

[defaults.retention.target]
daily = 30

[job.data]
source = "zroot/data"
target = "root@backup-host:tank/replica/data"
allow_rollback = true

[job.data.retention]
hourly = 24
target = { keep_last = 10 }

[job.fast]
source = "/srv/app"
target = "/backup/app"
backend = "btrfs"
schedule = "continuous"
interval = "10s"
snapshot_dir = "/srv/.snapshots"

[job.fast.ssh]
port = 22
options = ["-o", "StrictHostKeyChecking=yes"]
"""


def test_full_config() -> None:
    config = parse_config(FULL, "/etc/carpool/replicate.toml")
    data = config.job("data")
    assert data.source == Endpoint("zroot/data")
    assert data.target == Endpoint("tank/replica/data", "backup-host", "root")
    assert data.backend == "zfs" and data.prefix == "autorep"
    assert data.schedule.cron is not None and not data.schedule.continuous
    assert data.bandwidth_limit == 10 * 1024 * 1024
    assert data.compression == "zstd"
    assert data.ssh.port == 2222 and data.ssh.identity == "/root/.ssh/id_ed25519"
    assert data.allow_rollback and not data.allow_destroy_target
    assert data.source_retention == RetentionPolicy(keep_last=5, hourly=24)
    assert data.target_retention == RetentionPolicy(keep_last=10, hourly=24, daily=30)
    assert data.line == 18
    policy = data.policy(frozenset({"x"}))
    assert policy.allow_rollback and policy.prefix == "autorep"
    assert policy.protected == {"x"} and policy.hold_tag == "carpool"

    fast = config.job("fast")
    assert fast.backend == "btrfs" and fast.schedule.continuous
    assert fast.schedule.interval == timedelta(seconds=10)
    assert fast.ssh.port == 22 and fast.ssh.options == ("-o", "StrictHostKeyChecking=yes")
    assert fast.ssh.identity == "/root/.ssh/id_ed25519"
    assert fast.snapshot_dir == "/srv/.snapshots"
    assert fast.policy().hold_tag is None  # btrfs has no holds
    start = datetime(2026, 4, 9, 15, 30, 5)
    assert fast.schedule.next_fire(start) == start + timedelta(seconds=10)
    with pytest.raises(ConfigError, match="no job named 'nope' \\(jobs: data, fast\\)"):
        config.job("nope")


def test_minimal_job_gets_the_seed_defaults() -> None:
    job = parse_config('[job.a]\nsource = "zroot/data"\ntarget = "h:tank/r"\n').jobs[0]
    assert job.prefix == "autorep"
    assert job.source_retention == RetentionPolicy(keep_last=5)
    assert job.schedule.cron is not None and job.schedule.cron.expression == "*/15 * * * *"
    assert job.hold_tag == "carpool" and job.intermediates and job.readonly_target
    assert job.bandwidth_limit is None and job.compression == "none"


def test_empty_hold_tag_means_no_holds() -> None:
    text = '[job.a]\nsource = "p/a"\ntarget = "p/b"\nhold_tag = ""\n'
    assert parse_config(text).jobs[0].policy().hold_tag is None


def test_load_config_reads_the_file(tmp_path: Path) -> None:
    path = tmp_path / "replicate.toml"
    path.write_text('[job.a]\nsource = "p/a"\ntarget = "p/b"\n')
    assert load_config(str(path)).path == str(path)
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(str(tmp_path / "missing.toml"))


# --------------------------------------------------------------------------- errors


def error_of(text: str) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        parse_config(text, "r.toml")
    return info.value


def test_syntax_error_carries_line_and_column() -> None:
    err = error_of('[job.a]\nsource = "p/a"\ntarget = \n')
    assert (err.path, err.line, err.column) == ("r.toml", 3, 10)
    assert str(err).startswith("r.toml:3:10: TOML syntax error: ")
    assert "(at line" not in err.message


def test_unknown_key_names_it_and_the_valid_ones() -> None:
    err = error_of('[job.a]\nsource = "p/a"\ntarget = "p/b"\n\nretension = 5\n')
    assert err.line == 5 and err.token == "retension"
    assert "unknown key 'retension' in [job.a]" in err.message
    assert "retention" in err.message and "source" in err.message


@pytest.mark.parametrize(
    ("text", "line", "fragment"),
    [
        ('[job.a]\nsource = "p/a"\n', 1, "has no 'target'"),
        ('[job.a]\nsource = "p/a"\ntarget = "p/b"\nbackend = "ext4"\n', 4, "backend 'ext4'"),
        ('[job.a]\nsource = "p/a"\ntarget = "p/b"\nschedule = "*/61 * * * *"\n', 4, "0-59"),
        ('[job.a]\nsource = "p/a"\ntarget = "p/b"\nschedule = "0 0 30 2 *"\n', 4, "never"),
        ('[job.a]\nsource = "p/a"\ntarget = "p/b"\nschedule = "* * *"\n', 4, "3 field"),
        ('[job.a]\nsource = "p/a"\ntarget = "p/b"\nbandwidth_limit = "fast"\n', 4, "rate"),
        ('[job.a]\nsource = "p/a"\ntarget = "p/b"\ncompression = "rar"\n', 4, "'rar'"),
        ('[job.a]\nsource = "p/a"\ntarget = "p/b"\nallow_rollback = "yes"\n', 4, "true or"),
        ('[job.a]\nsource = "p/a"\ntarget = "p/b"\ninterval = "5s"\n', 4, "continuous"),
        (
            '[job.a]\nsource = "p/a"\ntarget = "p/b"\nschedule = "continuous"\ninterval = "0s"\n',
            5,
            "longer than zero",
        ),
        ('[job.a]\nsource = "p/a"\ntarget = "p/a"\n', 3, "same dataset"),
        ('[job.a]\nsource = "/mnt/x"\ntarget = "p/b"\n', 2, "not a ZFS dataset"),
        ('[job.a]\nsource = "p/a"\ntarget = "@:x"\n', 3, "host"),
        ('[job.a]\nsource = "p/a"\ntarget = "host:"\n', 3, "no dataset"),
        ('[job.a]\nbackend = "btrfs"\nsource = "rel/x"\ntarget = "/b"\n', 3, "absolute"),
        (
            '[job.a]\nbackend = "btrfs"\nsource = "/a"\ntarget = "/b"\nuse_bookmarks = true\n',
            5,
            "ZFS feature",
        ),
        ('[job.a]\nsource = "p/a"\ntarget = "p/b"\nsnapshot_dir = "/x"\n', 4, "btrfs"),
        ('[job.a]\nsource = "p/a"\ntarget = "p/b"\nprefix = "a b"\n', 4, "prefix"),
        ('[job.a]\nsource = "p/a"\ntarget = "p/b"\n[job.a.ssh]\nport = 0\n', 5, "1-65535"),
        ('[job.a]\nsource = "p/a"\ntarget = "p/b"\n[job.a.ssh]\nuser = "x"\n', 5, "'user'"),
        ('[job.a]\nsource = "p/a"\ntarget = "p/b"\n[job.a.ssh]\noptions = [1]\n', 5, "strings"),
        ('[job.a]\nsource = "p/a"\ntarget = "p/b"\n[job.a.retention]\nkeep = 3\n', 5, "'keep'"),
        (
            '[job.a]\nsource = "p/a"\ntarget = "p/b"\n[job.a.retention]\ndaily = -1\n',
            5,
            "whole number",
        ),
        (
            '[job.a]\nsource = "p/a"\ntarget = "p/b"\n[job.a.retention.source]\nhours = 1\n',
            5,
            "'hours'",
        ),
        ('[job.a]\nsource = "p/a"\ntarget = "p/b"\nretention = 5\n', 4, "a table"),
        ('[defaults]\nsource = "p/a"\n[job.a]\nsource = "p/a"\ntarget = "p/b"\n', 2, "[job.NAME]"),
        ('[jobs.a]\nsource = "p/a"\n', 1, "top-level key 'jobs'"),
        ("job = 3\n", 1, "must hold tables"),
        ("[job]\na = 3\n", 2, "must be a table"),
        ('[job."a b"]\nsource = "p/a"\n', 1, "job name"),
    ],
)
def test_semantic_errors_point_at_the_key(text: str, line: int, fragment: str) -> None:
    err = error_of(text)
    assert err.line == line, str(err)
    assert fragment in err.message, str(err)
    assert str(err).startswith(f"r.toml:{line}:")


def test_error_in_defaults_points_into_defaults() -> None:
    text = '[defaults]\ncompression = "rar"\n\n[job.a]\nsource = "p/a"\ntarget = "p/b"\n'
    err = error_of(text)
    assert err.line == 2


def test_inline_table_key_is_found_on_its_line() -> None:
    text = (
        '[job.a]\nsource = "p/a"\ntarget = "p/b"\n'
        "retention = { keep_last = 3, target = { weekly = 2, bogus = 1 } }\n"
    )
    err = error_of(text)
    assert err.line == 4 and err.column == text.splitlines()[3].index("bogus") + 1


def test_dotted_keys_are_located() -> None:
    text = '[job.a]\nsource = "p/a"\ntarget = "p/b"\n\nretention.daily = "x"\n'
    assert error_of(text).line == 5


def test_no_jobs() -> None:
    err = error_of("[defaults]\nprefix = 'x'\n")
    assert "no [job.NAME]" in err.message


# --------------------------------------------------------------------------- endpoints


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("zroot/data", Endpoint("zroot/data")),
        ("backup-host:tank/replica/data", Endpoint("tank/replica/data", "backup-host")),
        ("root@10.0.0.2:tank/r", Endpoint("tank/r", "10.0.0.2", "root")),
        ("user@host:/mnt/backup", Endpoint("/mnt/backup", "host", "user")),
        ("[fe80::1%eth0]:tank/r", Endpoint("tank/r", "fe80::1%eth0")),
        ("bob@[2001:db8::2]:tank/r", Endpoint("tank/r", "2001:db8::2", "bob")),
        ("pool/fs:weird", Endpoint("pool/fs:weird")),
        ("/mnt/a:b", Endpoint("/mnt/a:b")),
    ],
)
def test_parse_endpoint(text: str, expected: Endpoint) -> None:
    assert parse_endpoint(text) == expected


def test_endpoint_str_round_trips() -> None:
    for text in ("zroot/data", "h:tank/r", "root@h:tank/r", "u@[2001:db8::2]:tank/r"):
        assert parse_endpoint(str(parse_endpoint(text))) == parse_endpoint(text)
    assert parse_endpoint("zroot/d").local and not parse_endpoint("h:x").local


@pytest.mark.parametrize("text", ["", "  ", "host:", "a b:pool/x", "us er@h:p"])
def test_bad_endpoints(text: str) -> None:
    with pytest.raises(ValueError):
        parse_endpoint(text)


# --------------------------------------------------------------------------- sizes, durations


def test_bandwidth_and_interval() -> None:
    assert parse_bandwidth("10M") == 10 * 1024**2
    assert parse_bandwidth("512K") == 512 * 1024
    assert parse_bandwidth("1.5MiB/s") == 1536 * 1024
    assert parse_bandwidth("1g") == 1024**3
    assert parse_bandwidth("100") == 100
    for bad in ("", "M", "10X", "0", "-1M"):
        with pytest.raises(ValueError):
            parse_bandwidth(bad)
    assert parse_interval("10s") == timedelta(seconds=10)
    assert parse_interval("500ms") == timedelta(milliseconds=500)
    assert parse_interval("5m") == timedelta(minutes=5)
    assert parse_interval("2h") == timedelta(hours=2)
    assert parse_interval("1d") == timedelta(days=1)
    assert parse_interval("30") == timedelta(seconds=30)
    for bad in ("", "soon", "0", "-5s", "5w"):
        with pytest.raises(ValueError):
            parse_interval(bad)


# --------------------------------------------------------------------------- cron


def fire(expr: str, after: datetime) -> datetime:
    return parse_cron(expr).next_fire(after)


@pytest.mark.parametrize(
    ("expr", "after", "expected"),
    [
        ("*/15 * * * *", datetime(2026, 4, 9, 15, 30), datetime(2026, 4, 9, 15, 45)),
        ("*/15 * * * *", datetime(2026, 4, 9, 15, 31, 59), datetime(2026, 4, 9, 15, 45)),
        ("*/15 * * * *", datetime(2026, 4, 9, 23, 59), datetime(2026, 4, 10, 0, 0)),
        ("0 * * * *", datetime(2026, 4, 9, 15, 0), datetime(2026, 4, 9, 16, 0)),
        ("30 2 * * *", datetime(2026, 4, 9, 3, 0), datetime(2026, 4, 10, 2, 30)),
        ("0 0 1 * *", datetime(2026, 12, 15), datetime(2027, 1, 1)),
        ("0 0 29 2 *", datetime(2026, 3, 1), datetime(2028, 2, 29)),
        ("0 12 * * mon-fri", datetime(2026, 4, 10, 13, 0), datetime(2026, 4, 13, 12, 0)),
        ("0 0 * * 7", datetime(2026, 4, 9), datetime(2026, 4, 12)),  # 7 = Sunday
        ("0 0 * * sun", datetime(2026, 4, 9), datetime(2026, 4, 12)),
        ("0 0 * jan,jul *", datetime(2026, 4, 9), datetime(2026, 7, 1)),
        ("5-10/5 1 * * *", datetime(2026, 4, 9, 1, 5), datetime(2026, 4, 9, 1, 10)),
        ("7/20 * * * *", datetime(2026, 4, 9, 1, 28), datetime(2026, 4, 9, 1, 47)),
        # Vixie: day-of-month OR day-of-week when both are restricted
        ("0 0 13 * fri", datetime(2026, 4, 9), datetime(2026, 4, 10)),
        ("0 0 13 * fri", datetime(2026, 4, 10, 1), datetime(2026, 4, 13)),
        ("@hourly", datetime(2026, 4, 9, 15, 10), datetime(2026, 4, 9, 16, 0)),
        ("@daily", datetime(2026, 4, 9, 15, 10), datetime(2026, 4, 10, 0, 0)),
        ("@weekly", datetime(2026, 4, 9), datetime(2026, 4, 12)),
        ("@monthly", datetime(2026, 4, 9), datetime(2026, 5, 1)),
        ("@yearly", datetime(2026, 4, 9), datetime(2027, 1, 1)),
    ],
)
def test_cron_next_fire(expr: str, after: datetime, expected: datetime) -> None:
    assert fire(expr, after) == expected


def test_cron_keeps_the_zone() -> None:
    from datetime import UTC

    after = datetime(2026, 4, 9, 15, 31, tzinfo=UTC)
    assert fire("*/15 * * * *", after) == datetime(2026, 4, 9, 15, 45, tzinfo=UTC)


@pytest.mark.parametrize(
    ("expr", "fragment"),
    [
        ("* * * *", "4 field"),
        ("60 * * * *", "outside 0-59"),
        ("* 24 * * *", "outside 0-23"),
        ("* * 0 * *", "outside 1-31"),
        ("* * * 13 *", "outside 1-12"),
        ("* * * * 8", "outside 0-7"),
        ("*/0 * * * *", "step"),
        ("10-5 * * * *", "backwards"),
        ("x * * * *", "not a number"),
        ("0 0 31 4 *", "never fires"),
    ],
)
def test_cron_errors(expr: str, fragment: str) -> None:
    with pytest.raises(ValueError, match=fragment):
        parse_cron(expr)


cron_fields = st.tuples(
    st.sets(st.integers(0, 59), min_size=1, max_size=4),
    st.sets(st.integers(0, 23), min_size=1, max_size=3),
    st.one_of(st.just("*"), st.sets(st.integers(1, 28), min_size=1, max_size=3)),
    st.one_of(st.just("*"), st.sets(st.integers(1, 12), min_size=1, max_size=3)),
    st.one_of(st.just("*"), st.sets(st.integers(0, 6), min_size=1, max_size=3)),
)
CronFields = tuple[set[int], set[int], str | set[int], str | set[int], str | set[int]]


def _join(field: str | set[int]) -> str:
    return field if isinstance(field, str) else ",".join(str(v) for v in sorted(field))


@given(
    cron_fields,
    st.datetimes(min_value=datetime(2000, 1, 1), max_value=datetime(2090, 1, 1)),
)
def test_cron_next_fire_properties(fields: CronFields, after: datetime) -> None:
    expr = " ".join(_join(f) for f in fields)
    schedule = parse_cron(expr)
    nxt = schedule.next_fire(after)
    assert nxt > after and nxt.second == 0 and nxt.microsecond == 0
    assert nxt.minute in schedule.minutes and nxt.hour in schedule.hours
    assert schedule.matches_day(nxt.date())
    # no firing time is skipped: brute force the minutes in between when close
    if nxt - after < timedelta(hours=3):
        probe = after.replace(second=0, microsecond=0) + timedelta(minutes=1)
        while probe < nxt:
            assert not (
                probe.minute in schedule.minutes
                and probe.hour in schedule.hours
                and schedule.matches_day(probe.date())
            )
            probe += timedelta(minutes=1)
    # firing at nxt, the next one is strictly later
    assert schedule.next_fire(nxt) > nxt
