"""Parsers of zfs/btrfs snapshot listings and carpool's snapshot names."""

from __future__ import annotations

import contextlib
from datetime import UTC, datetime, timedelta, timezone

import pytest
from hypothesis import given
from hypothesis import strategies as st

from carpool.errors import CarpoolError
from carpool.replicate.snapshots import (
    BtrfsSnapshot,
    SnapshotParseError,
    ZfsSnapshot,
    parse_btrfs_subvolume_list,
    parse_btrfs_subvolume_show,
    parse_snapshot_name,
    parse_zfs_get,
    parse_zfs_list,
    snapshot_name,
    unique_snapshot_name,
    zfs_snapshots_from_get,
)

# --------------------------------------------------------------------------- names


def test_snapshot_name_matches_the_seed_script() -> None:
    assert snapshot_name("autorep", datetime(2026, 4, 9, 15, 30, 0)) == "autorep-20260409-153000"


def test_snapshot_name_converts_aware_times_to_utc() -> None:
    when = datetime(2026, 4, 9, 17, 30, tzinfo=timezone(timedelta(hours=2)))
    assert snapshot_name("autorep", when) == "autorep-20260409-153000"


def test_parse_snapshot_name_reads_the_time_back() -> None:
    assert parse_snapshot_name("autorep", "autorep-20260409-153000") == datetime(
        2026, 4, 9, 15, 30, tzinfo=UTC
    )
    assert parse_snapshot_name("autorep", "autorep-20260409-153000-2") == datetime(
        2026, 4, 9, 15, 30, tzinfo=UTC
    )


@pytest.mark.parametrize(
    "name",
    [
        "manual",
        "autorep",
        "autorep-",
        "autorep-20261301-000000",  # month 13
        "autorep-20260409-153000-0",
        "autorep-20260409-153000x",
        "other-20260409-153000",
        "autorepx-20260409-153000",
        "syncoid_host_2026-04-09:15:30:00",
    ],
)
def test_parse_snapshot_name_rejects_foreign_names(name: str) -> None:
    assert parse_snapshot_name("autorep", name) is None


def test_bad_prefix_is_refused() -> None:
    with pytest.raises(CarpoolError, match="prefix"):
        snapshot_name("auto rep", datetime(2026, 1, 1))
    with pytest.raises(CarpoolError, match="prefix"):
        parse_snapshot_name("", "x")


def test_unique_snapshot_name_avoids_same_second_clash() -> None:
    when = datetime(2026, 4, 9, 15, 30)
    base = "autorep-20260409-153000"
    assert unique_snapshot_name("autorep", when, set()) == base
    assert unique_snapshot_name("autorep", when, {base}) == f"{base}-1"
    assert unique_snapshot_name("autorep", when, {base, f"{base}-1"}) == f"{base}-2"


@given(
    st.datetimes(min_value=datetime(1970, 1, 1), max_value=datetime(9999, 12, 31)),
    st.from_regex(r"[A-Za-z0-9_.:-]{1,12}", fullmatch=True),
)
def test_name_round_trip(when: datetime, prefix: str) -> None:
    name = snapshot_name(prefix, when)
    assert parse_snapshot_name(prefix, name) == when.replace(microsecond=0, tzinfo=UTC)


@given(st.lists(st.integers(0, 5), max_size=6))
def test_unique_names_never_clash(extra: list[int]) -> None:
    when = datetime(2026, 1, 1)
    existing: set[str] = set()
    for _ in range(len(extra) + 1):
        name = unique_snapshot_name("autorep", when, existing)
        assert name not in existing
        assert parse_snapshot_name("autorep", name) == when.replace(tzinfo=UTC)
        existing.add(name)


# --------------------------------------------------------------------------- zfs list


OPENZFS_LIST = (
    "tank/data@autorep-20260409-150000\t13583563417092306197\t120\t1775746800\n"
    "tank/data@autorep-20260409-151500\t660345123456789012\t131\t1775747700\n"
    "tank/data#autorep-20260409-150000\t13583563417092306197\t120\t1775746800\n"
)


def test_parse_zfs_list_parsable() -> None:
    snaps = parse_zfs_list(OPENZFS_LIST)
    assert snaps[0] == ZfsSnapshot(
        "tank/data",
        "autorep-20260409-150000",
        13583563417092306197,
        120,
        datetime(2026, 4, 9, 15, 0, tzinfo=UTC),
    )
    assert snaps[1].createtxg == 131
    assert snaps[2].bookmark and snaps[2].full_name == "tank/data#autorep-20260409-150000"
    assert snaps[0].full_name == "tank/data@autorep-20260409-150000"
    assert not snaps[0].held


def test_parse_zfs_list_zfs_fuse_form_without_p() -> None:
    # zfs-fuse has no `zfs list -p`: guid is humanized, creation is a local date.
    text = "rzsrc/app@repl-1\t660P\t1.2K\tThu Apr  9 15:30 2026\nrzsrc/app@repl-2\t-\t-\t-\n"
    snaps = parse_zfs_list(text, parsable=False)
    assert snaps[0].guid is None and snaps[0].createtxg is None
    assert snaps[0].creation == datetime(2026, 4, 9, 15, 30, tzinfo=UTC)
    assert snaps[1].creation is None
    zone = timezone(timedelta(hours=2))
    local = parse_zfs_list(text, parsable=False, tz=zone)
    assert local[0].creation == datetime(2026, 4, 9, 13, 30, tzinfo=UTC)


def test_parse_zfs_list_other_columns() -> None:
    text = "p/fs@a\t2\np/fs@b\t0\n"
    snaps = parse_zfs_list(text, columns=("name", "userrefs"))
    assert [s.userrefs for s in snaps] == [2, 0]
    assert snaps[0].held and snaps[0].guid is None


def test_parse_zfs_list_empty_output() -> None:
    assert parse_zfs_list("") == []
    assert parse_zfs_list("\n\n") == []


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("p/fs@a\t1\t2\n", "3 tab-separated fields, expected 4"),
        ("p/fs@a 1 2 3\n", "1 tab-separated fields"),
        ("p/fs\t1\t2\t3\n", "not a snapshot"),
        ("p/fs@\t1\t2\t3\n", "not a snapshot"),
        ("p/fs@a\tabc\t2\t3\n", "guid 'abc' is not a number"),
        ("p/fs@a\t1\t2\tyesterday\n", "creation 'yesterday'"),
    ],
)
def test_parse_zfs_list_errors_say_what_is_wrong(text: str, match: str) -> None:
    with pytest.raises(SnapshotParseError, match=match):
        parse_zfs_list(text)


def test_parse_zfs_list_refuses_unknown_columns() -> None:
    with pytest.raises(SnapshotParseError, match="include 'name'"):
        parse_zfs_list("", columns=("guid",))
    with pytest.raises(SnapshotParseError, match="used"):
        parse_zfs_list("", columns=("name", "used"))


def test_parse_zfs_list_error_names_the_line() -> None:
    with pytest.raises(SnapshotParseError, match="line 2"):
        parse_zfs_list("p/fs@a\t1\t2\t3\np/fs@b\t1\n")


# --------------------------------------------------------------------------- zfs get


ZFS_GET = (
    "rzsrc/app\tguid\t1111\n"
    "rzsrc/app@repl-1\tguid\t13583563417092306197\n"
    "rzsrc/app@repl-1\tcreatetxg\t17\n"
    "rzsrc/app@repl-1\tcreation\t1775748600\n"
    "rzsrc/app@repl-1\tuserrefs\t1\n"
    "rzsrc/app@repl-2\tguid\t42\tlocal\n"
    "rzsrc/app@repl-2\tcreatetxg\t23\t-\n"
)


def test_parse_zfs_get() -> None:
    table = parse_zfs_get(ZFS_GET)
    assert table["rzsrc/app@repl-1"]["createtxg"] == "17"
    assert table["rzsrc/app@repl-2"] == {"guid": "42", "createtxg": "23"}
    assert list(table) == ["rzsrc/app", "rzsrc/app@repl-1", "rzsrc/app@repl-2"]


def test_parse_zfs_get_bad_line() -> None:
    with pytest.raises(SnapshotParseError, match="zfs get output line 1"):
        parse_zfs_get("a\tb\n")


def test_snapshots_from_get_alone() -> None:
    snaps = zfs_snapshots_from_get(parse_zfs_get(ZFS_GET))
    assert [s.name for s in snaps] == ["repl-1", "repl-2"]
    assert snaps[0].guid == 13583563417092306197 and snaps[0].createtxg == 17
    assert snaps[0].userrefs == 1
    assert snaps[0].creation == datetime.fromtimestamp(1775748600, tz=UTC)
    assert snaps[1].creation is None


def test_snapshots_from_get_completes_a_non_p_listing() -> None:
    listed = parse_zfs_list(
        "rzsrc/app@repl-1\t13P\t-\tThu Apr  9 15:30 2026\nrzsrc/app@repl-3\t1P\t-\t-\n",
        parsable=False,
    )
    snaps = zfs_snapshots_from_get(parse_zfs_get(ZFS_GET), base=listed)
    assert snaps[0].guid == 13583563417092306197
    assert snaps[0].creation == datetime.fromtimestamp(1775748600, tz=UTC)
    assert snaps[1] == listed[1]  # nothing known: left as listed


@given(
    st.lists(
        st.tuples(
            st.from_regex(r"[a-z][a-z0-9_.:-]{0,10}", fullmatch=True),
            st.integers(0, 2**64 - 1),
            st.integers(1, 2**40),
            st.integers(0, 2**33),
            st.booleans(),
        ),
        max_size=8,
        unique_by=lambda t: (t[0], t[4]),
    )
)
def test_zfs_list_round_trip(rows: list[tuple[str, int, int, int, bool]]) -> None:
    text = "".join(
        f"pool/ds{'#' if bm else '@'}{name}\t{guid}\t{txg}\t{when}\n"
        for name, guid, txg, when, bm in rows
    )
    snaps = parse_zfs_list(text)
    assert [(s.name, s.guid, s.createtxg, s.bookmark) for s in snaps] == [
        (name, guid, txg, bm) for name, guid, txg, _, bm in rows
    ]
    assert all(s.creation is not None for s in snaps)


@given(st.text(max_size=200))
def test_zfs_parsers_never_crash_unexpectedly(text: str) -> None:
    for parse in (parse_zfs_list, parse_zfs_get):
        with contextlib.suppress(SnapshotParseError):
            parse(text)


# --------------------------------------------------------------------------- btrfs


BTRFS_LIST = (
    "ID 258 gen 12 cgen 11 top level 5 otime 2026-04-09 15:30:00 parent_uuid "
    "c1d2e3f4-0000-4000-8000-000000000001 received_uuid - uuid "
    "3f0c9a1e-1111-4111-8111-111111111111 path fo/s1\n"
    "ID 259 gen 15 cgen 14 top level 5 otime 2026-04-09 15:45:00 parent_uuid - "
    "received_uuid 3f0c9a1e-1111-4111-8111-111111111111 uuid "
    "9abcdef0-2222-4222-8222-222222222222 path backups/with space/s2\n"
    "ID 256 gen 9 top level 5 path live\n"
)


def test_parse_btrfs_subvolume_list() -> None:
    subs = parse_btrfs_subvolume_list(BTRFS_LIST)
    assert subs[0] == BtrfsSnapshot(
        path="fo/s1",
        uuid="3f0c9a1e-1111-4111-8111-111111111111",
        received_uuid=None,
        parent_uuid="c1d2e3f4-0000-4000-8000-000000000001",
        generation=12,
        cgen=11,
        subvol_id=258,
        otime=datetime(2026, 4, 9, 15, 30, tzinfo=UTC),
    )
    assert subs[0].name == "s1" and subs[0].directory == "fo"
    assert subs[1].path == "backups/with space/s2"
    assert subs[1].received_uuid == "3f0c9a1e-1111-4111-8111-111111111111"
    assert subs[1].parent_uuid is None
    assert subs[2] == BtrfsSnapshot(path="live", generation=9, subvol_id=256)
    assert subs[2].directory == ""


def test_parse_btrfs_list_errors() -> None:
    with pytest.raises(SnapshotParseError, match="no 'path' column"):
        parse_btrfs_subvolume_list("ID 256 gen 9 top level 5\n")
    with pytest.raises(SnapshotParseError, match="cannot read"):
        parse_btrfs_subvolume_list("ID 256 bogus 9 path x\n")
    with pytest.raises(SnapshotParseError, match="not a number"):
        parse_btrfs_subvolume_list("ID x gen 9 top level 5 path x\n")


BTRFS_SHOW = """\
mnt/bdst/fo/s2
\tName: \t\t\ts2
\tUUID: \t\t\t9abcdef0-2222-4222-8222-222222222222
\tParent UUID: \t\t-
\tReceived UUID: \t\t3F0C9A1E-1111-4111-8111-111111111111
\tCreation time: \t\t2026-04-09 17:45:00 +0200
\tSubvolume ID: \t\t259
\tGeneration: \t\t15
\tGen at creation: \t14
\tParent ID: \t\t5
\tTop level ID: \t\t5
\tFlags: \t\t\treadonly
\tSend transid: \t\t0
\tSnapshot(s):
\t\t\t\tfo/s3
\tQuota group:\t\tn/a
"""


def test_parse_btrfs_subvolume_show() -> None:
    sub = parse_btrfs_subvolume_show(BTRFS_SHOW)
    assert sub.path == "mnt/bdst/fo/s2"
    assert sub.uuid == "9abcdef0-2222-4222-8222-222222222222"
    assert sub.received_uuid == "3f0c9a1e-1111-4111-8111-111111111111"  # lower-cased
    assert sub.parent_uuid is None
    assert sub.otime == datetime(2026, 4, 9, 15, 45, tzinfo=UTC)
    assert (sub.generation, sub.cgen, sub.subvol_id, sub.readonly) == (15, 14, 259, True)


def test_parse_btrfs_show_writable_and_zero_uuid() -> None:
    text = "live\n\tUUID: 1234\n\tReceived UUID: 00000000-0000-0000-0000-000000000000\n\tFlags: -\n"
    sub = parse_btrfs_subvolume_show(text)
    assert sub.readonly is False and sub.received_uuid is None


def test_parse_btrfs_show_errors() -> None:
    with pytest.raises(SnapshotParseError, match="printed nothing"):
        parse_btrfs_subvolume_show("")
    with pytest.raises(SnapshotParseError, match="no 'UUID:'"):
        parse_btrfs_subvolume_show("/mnt/x\n\tName: x\n")
    with pytest.raises(SnapshotParseError, match="btrfs time"):
        parse_btrfs_subvolume_show("/x\n\tUUID: 1\n\tCreation time: soon\n")


@given(st.text(max_size=200))
def test_btrfs_parsers_never_crash_unexpectedly(text: str) -> None:
    with contextlib.suppress(SnapshotParseError):
        parse_btrfs_subvolume_list(text)
    with contextlib.suppress(SnapshotParseError):
        parse_btrfs_subvolume_show(text)


@given(st.lists(st.booleans(), min_size=1, max_size=30), st.integers(1, 5))
def test_names_of_one_second_never_reuse_a_pruned_name(prunes: list[bool], keep: int) -> None:
    """Snapshots taken within one second, pruned down to ``keep`` as they go: every new
    name is unseen and sorts after every name still there (by its counter)."""
    when = datetime(2026, 1, 1)
    alive: list[str] = []
    seen: set[str] = set()

    def counter(name: str) -> int:
        tail = name.rsplit("-", 1)[-1]
        return int(tail) if name.count("-") == 3 else 0

    for prune in prunes:
        name = unique_snapshot_name("autorep", when, set(alive))
        assert name not in seen
        assert all(counter(name) > counter(other) for other in alive)
        seen.add(name)
        alive.append(name)
        if prune:
            del alive[: max(0, len(alive) - keep)]
