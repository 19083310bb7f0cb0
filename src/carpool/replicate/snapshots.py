"""Snapshot records and the parsers that read them from `zfs` and `btrfs` output.

Pure: every function here takes the text a command printed and returns typed,
frozen records. Nothing runs a command. The backends (written elsewhere) run

* ``zfs list -H -p -o name,guid,createtxg,creation -t snapshot`` on OpenZFS, or
* ``zfs list -H -o name,... -t snapshot`` on zfs-fuse, which has no ``list -p``:
  it prints ``guid`` humanized ("660P") and ``creation`` as a local date with
  minute resolution, so the exact numbers come from
  ``zfs get -H -p -o name,property,value guid,createtxg,creation,userrefs``,
* ``btrfs subvolume list -u -q -R -c`` (with ``-o``/``-s`` as needed) and
  ``btrfs subvolume show PATH``,

and hand their stdout to the functions below.

Snapshot names made by carpool look like the seed script's
``autorep-20260409-153000``; :func:`snapshot_name` makes them and
:func:`parse_snapshot_name` reads the time back, so retention still works when
the creation time cannot be read.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime, tzinfo

from carpool.errors import CarpoolError

__all__ = [
    "BtrfsSnapshot",
    "SnapshotParseError",
    "ZfsSnapshot",
    "parse_btrfs_subvolume_list",
    "parse_btrfs_subvolume_show",
    "parse_snapshot_name",
    "parse_zfs_get",
    "parse_zfs_list",
    "snapshot_name",
    "unique_snapshot_name",
    "zfs_snapshots_from_get",
]

_NAME_TIME_FORMAT = "%Y%m%d-%H%M%S"


class SnapshotParseError(CarpoolError):
    """Output of a zfs/btrfs command that does not have the expected shape."""


# --------------------------------------------------------------------------- records


@dataclass(frozen=True)
class ZfsSnapshot:
    """One ZFS snapshot (or bookmark, when ``bookmark`` is true).

    ``guid`` identifies the snapshot across pools (a received snapshot keeps
    the sender's guid); ``createtxg`` orders snapshots of one dataset. Either
    may be None when the command that listed it could not print it exactly.
    """

    dataset: str
    name: str
    guid: int | None = None
    createtxg: int | None = None
    creation: datetime | None = None
    userrefs: int = 0
    bookmark: bool = False

    @property
    def full_name(self) -> str:
        """``pool/fs@name`` for a snapshot, ``pool/fs#name`` for a bookmark."""
        return f"{self.dataset}{'#' if self.bookmark else '@'}{self.name}"

    @property
    def held(self) -> bool:
        """True when some ``zfs hold`` is on the snapshot (it cannot be destroyed)."""
        return self.userrefs > 0


@dataclass(frozen=True)
class BtrfsSnapshot:
    """One btrfs subvolume as ``btrfs subvolume list/show`` describes it.

    A snapshot received with ``btrfs receive`` carries the sender's uuid in
    ``received_uuid``; ``generation`` is the last transaction that changed it,
    ``cgen`` the transaction that created it (orders snapshots of one
    filesystem).
    """

    path: str
    uuid: str | None = None
    received_uuid: str | None = None
    parent_uuid: str | None = None
    generation: int | None = None
    cgen: int | None = None
    subvol_id: int | None = None
    otime: datetime | None = None
    readonly: bool | None = None

    @property
    def name(self) -> str:
        """The last component of ``path`` (the snapshot's own name)."""
        return self.path.rstrip("/").rsplit("/", 1)[-1]

    @property
    def directory(self) -> str:
        """The directory holding the snapshot ("" when ``path`` has no slash)."""
        stripped = self.path.rstrip("/")
        return stripped.rsplit("/", 1)[0] if "/" in stripped else ""


# --------------------------------------------------------------------------- names


def snapshot_name(prefix: str, when: datetime) -> str:
    """The name carpool gives a snapshot taken at ``when``: ``PREFIX-YYYYmmdd-HHMMSS``.

    An aware ``when`` is converted to UTC first, so names sort by time whatever
    the host's zone; a naive one is used as it is.
    """
    _check_prefix(prefix)
    if when.tzinfo is not None:
        when = when.astimezone(UTC)
    return f"{prefix}-{when.strftime(_NAME_TIME_FORMAT)}"


def unique_snapshot_name(prefix: str, when: datetime, existing: Collection[str]) -> str:
    """:func:`snapshot_name`, with ``-1``, ``-2``... appended if the second is taken.

    Two runs within one second would otherwise collide (syncoid's "dataset
    already exists"). The counter goes past the highest one in ``existing``
    for that second, not into a gap: a name pruned a moment ago is never
    given to a newer snapshot, so names of one second stay in creation order.
    """
    base = snapshot_name(prefix, when)
    highest = -1
    for name in existing:
        if name == base:
            highest = max(highest, 0)
        elif name.startswith(f"{base}-") and name[len(base) + 1 :].isdigit():
            highest = max(highest, int(name[len(base) + 1 :]))
    return base if highest < 0 else f"{base}-{highest + 1}"


def parse_snapshot_name(prefix: str, name: str) -> datetime | None:
    """The UTC time encoded in a name made by :func:`snapshot_name`, or None.

    None means the name is not one of ours for this prefix (another tool's
    snapshot, a manual one): retention leaves those alone.
    """
    _check_prefix(prefix)
    head = f"{prefix}-"
    if not name.startswith(head):
        return None
    rest = name[len(head) :]
    match = re.fullmatch(r"(\d{8}-\d{6})(?:-([1-9]\d*))?", rest)
    if match is None:
        return None
    try:
        stamp = datetime.strptime(match.group(1), _NAME_TIME_FORMAT)
    except ValueError:
        return None
    return stamp.replace(tzinfo=UTC)


def _check_prefix(prefix: str) -> None:
    if not prefix or not re.fullmatch(r"[A-Za-z0-9_.:-]+", prefix):
        raise SnapshotParseError(
            f"snapshot prefix {prefix!r} is not usable: use letters, digits, '_', '-', '.' or ':'"
        )


# --------------------------------------------------------------------------- zfs


_ZFS_COLUMNS = frozenset({"name", "guid", "createtxg", "creation", "userrefs"})


def parse_zfs_list(
    text: str,
    *,
    columns: Sequence[str] = ("name", "guid", "createtxg", "creation"),
    parsable: bool = True,
    tz: tzinfo = UTC,
) -> list[ZfsSnapshot]:
    """Snapshots (and bookmarks) from ``zfs list -H [-p] -o COLUMNS -t snapshot``.

    ``columns`` are the ``-o`` columns in order and must include ``name``;
    other columns known here are guid, createtxg, creation and userrefs.
    With ``parsable`` (``-p``) numbers are exact and creation is epoch
    seconds. Without it (zfs-fuse), a humanized number such as ``660P`` is
    not exact and becomes None, and creation is read as ZFS prints it
    (``Thu Apr  9 15:30 2026``) in the zone ``tz``. The order of the output
    is kept.
    """
    cols = list(columns)
    unknown = [c for c in cols if c not in _ZFS_COLUMNS]
    if "name" not in cols or unknown:
        raise SnapshotParseError(
            f"zfs list columns {cols} are not supported: include 'name' and use only "
            f"{sorted(_ZFS_COLUMNS)}"
        )
    result: list[ZfsSnapshot] = []
    for number, line in _lines(text):
        fields = line.split("\t")
        if len(fields) != len(cols):
            raise SnapshotParseError(
                f"zfs list output line {number} has {len(fields)} tab-separated fields, "
                f"expected {len(cols)} ({','.join(cols)}): {line!r}; run zfs list with -H"
            )
        values = dict(zip(cols, fields, strict=True))
        dataset, name, bookmark = _split_zfs_name(values["name"], number)
        creation: datetime | None = None
        if "creation" in values:
            creation = _zfs_time(values["creation"], parsable=parsable, tz=tz, number=number)
        result.append(
            ZfsSnapshot(
                dataset=dataset,
                name=name,
                guid=_zfs_int(values.get("guid"), "guid", number),
                createtxg=_zfs_int(values.get("createtxg"), "createtxg", number),
                creation=creation,
                userrefs=_zfs_int(values.get("userrefs"), "userrefs", number) or 0,
                bookmark=bookmark,
            )
        )
    return result


def parse_zfs_get(text: str) -> dict[str, dict[str, str]]:
    """``{name: {property: value}}`` from ``zfs get -H -p -o name,property,value[,source]``.

    This form works on every zfs including zfs-fuse, and prints the hidden
    ``guid`` and ``createtxg`` exactly. Names keep their output order.
    """
    table: dict[str, dict[str, str]] = {}
    for number, line in _lines(text):
        fields = line.split("\t")
        if len(fields) not in (3, 4):
            raise SnapshotParseError(
                f"zfs get output line {number} has {len(fields)} tab-separated fields, expected "
                f"3 (name,property,value) or 4 (with source): {line!r}; run zfs get with -H -o"
            )
        table.setdefault(fields[0], {})[fields[1]] = fields[2]
    return table


def zfs_snapshots_from_get(
    properties: Mapping[str, Mapping[str, str]],
    *,
    base: Iterable[ZfsSnapshot] = (),
) -> list[ZfsSnapshot]:
    """Snapshot records built from :func:`parse_zfs_get` output.

    With ``base`` (records from a non ``-p`` ``zfs list``), each record is
    completed with the exact guid, createtxg, creation and userrefs and the
    list keeps ``base``'s order; without it, every snapshot or bookmark name
    in ``properties`` becomes a record, in output order. Names that are
    neither (the filesystem itself in a ``-r``/``-d 1`` listing) are skipped.
    """
    originals = list(base)
    if originals:
        completed = []
        for snap in originals:
            props = properties.get(snap.full_name)
            completed.append(snap if props is None else _apply_zfs_props(snap, props))
        return completed
    records = []
    for number, (full, props) in enumerate(properties.items(), start=1):
        if "@" not in full and "#" not in full:
            continue
        dataset, name, bookmark = _split_zfs_name(full, number)
        records.append(_apply_zfs_props(ZfsSnapshot(dataset, name, bookmark=bookmark), props))
    return records


def _apply_zfs_props(snap: ZfsSnapshot, props: Mapping[str, str]) -> ZfsSnapshot:
    guid = _zfs_int(props["guid"], "guid", 0) if "guid" in props else snap.guid
    txg = _zfs_int(props["createtxg"], "createtxg", 0) if "createtxg" in props else snap.createtxg
    refs = _zfs_int(props["userrefs"], "userrefs", 0) or 0 if "userrefs" in props else snap.userrefs
    creation = snap.creation
    if "creation" in props:
        creation = _zfs_time(props["creation"], parsable=True, tz=UTC, number=0)
    return replace(snap, guid=guid, createtxg=txg, userrefs=refs, creation=creation)


def _split_zfs_name(full: str, number: int) -> tuple[str, str, bool]:
    for sep in ("@", "#"):
        if sep in full:
            dataset, _, name = full.partition(sep)
            if dataset and name and "@" not in name and "#" not in name:
                return dataset, name, sep == "#"
    raise SnapshotParseError(
        f"line {number}: {full!r} is not a snapshot (pool/fs@name) or bookmark (pool/fs#name); "
        "list with -t snapshot (or -t bookmark)"
    )


def _zfs_int(value: str | None, what: str, number: int) -> int | None:
    if value is None or value in ("-", ""):
        return None
    if value.isdigit():
        return int(value)
    if re.fullmatch(r"\d+(?:\.\d+)?[KMGTPEZ]", value):
        return None  # humanized (no -p): not exact, treat as unknown
    where = f"line {number}: " if number else ""
    raise SnapshotParseError(f"{where}{what} {value!r} is not a number")


_ZFS_DATE = re.compile(r"[A-Z][a-z]{2} +([A-Z][a-z]{2}) +(\d{1,2}) +(\d{1,2}):(\d{2}) +(\d{4})")
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")


def _zfs_time(value: str, *, parsable: bool, tz: tzinfo, number: int) -> datetime | None:
    value = value.strip()
    if value in ("-", ""):
        return None
    if value.isdigit():
        return datetime.fromtimestamp(int(value), tz=UTC)
    if not parsable:
        match = _ZFS_DATE.fullmatch(value)
        if match and match.group(1) in _MONTHS:
            month = _MONTHS.index(match.group(1)) + 1
            try:
                return datetime(
                    int(match.group(5)),
                    month,
                    int(match.group(2)),
                    int(match.group(3)),
                    int(match.group(4)),
                    tzinfo=tz,
                )
            except ValueError:
                pass
    where = f"line {number}: " if number else ""
    raise SnapshotParseError(
        f"{where}creation {value!r} is neither epoch seconds (-p) nor a zfs date "
        "like 'Thu Apr  9 15:30 2026'"
    )


# --------------------------------------------------------------------------- btrfs

# Column names `btrfs subvolume list` prints before each value, longest first
# so "top level" wins over a one-word prefix.
_BTRFS_KEYS = (
    "top level",
    "parent_uuid",
    "received_uuid",
    "uuid",
    "ID",
    "gen",
    "cgen",
    "ogen",
    "parent",
    "otime",
)


def parse_btrfs_subvolume_list(text: str) -> list[BtrfsSnapshot]:
    """Subvolumes from ``btrfs subvolume list`` (any of -u -q -R -c -g -o -s).

    Each line is ``ID n gen n [cgen n] top level n [otime DATE TIME]
    [parent_uuid U] [received_uuid U] [uuid U] path P``; ``-`` means unset.
    ``otime`` is read as UTC (btrfs prints local time without a zone; pass
    the host in UTC or use :func:`parse_btrfs_subvolume_show`). The path is
    the rest of the line, so it may contain spaces.
    """
    result = []
    for number, line in _lines(text):
        head, sep, path = line.partition(" path ")
        if not sep:
            if line.startswith("path "):
                head, path = "", line[5:]
            else:
                raise SnapshotParseError(
                    f"btrfs subvolume list line {number} has no 'path' column: {line!r}"
                )
        values = _btrfs_list_fields(head, number, line)
        result.append(
            BtrfsSnapshot(
                path=path,
                uuid=_btrfs_uuid(values.get("uuid")),
                received_uuid=_btrfs_uuid(values.get("received_uuid")),
                parent_uuid=_btrfs_uuid(values.get("parent_uuid")),
                generation=_btrfs_int(values.get("gen"), "gen", number),
                cgen=_btrfs_int(values.get("cgen") or values.get("ogen"), "cgen", number),
                subvol_id=_btrfs_int(values.get("ID"), "ID", number),
                otime=_btrfs_time(values.get("otime"), number),
            )
        )
    return result


def _btrfs_list_fields(head: str, number: int, line: str) -> dict[str, str]:
    values: dict[str, str] = {}
    rest = head.strip()
    while rest:
        for key in _BTRFS_KEYS:
            if rest.startswith(key + " "):
                rest = rest[len(key) + 1 :].lstrip()
                count = 2 if key == "otime" else 1
                parts = rest.split(" ", count)
                if len(parts) < count:
                    break
                values[key] = " ".join(parts[:count])
                rest = parts[count] if len(parts) > count else ""
                rest = rest.lstrip()
                break
        else:
            raise SnapshotParseError(
                f"btrfs subvolume list line {number}: cannot read {rest!r} in {line!r}"
            )
    return values


_SHOW_KEYS = {
    "Name": "name",
    "UUID": "uuid",
    "Parent UUID": "parent_uuid",
    "Received UUID": "received_uuid",
    "Creation time": "otime",
    "Subvolume ID": "subvol_id",
    "Generation": "generation",
    "Gen at creation": "cgen",
    "Flags": "flags",
}


def parse_btrfs_subvolume_show(text: str) -> BtrfsSnapshot:
    """The subvolume described by ``btrfs subvolume show PATH``.

    The first line is the path; then ``Key: value`` lines (UUID, Parent UUID,
    Received UUID, Creation time with its zone, Generation, Gen at creation,
    Flags). The ``Snapshot(s):`` list and later sections are ignored.
    """
    lines = [(n, line) for n, line in _lines(text)]
    if not lines:
        raise SnapshotParseError("btrfs subvolume show printed nothing; check the path")
    path = lines[0][1].strip()
    values: dict[str, str] = {}
    for _number, line in lines[1:]:
        key, sep, value = line.strip().partition(":")
        if not sep:
            continue
        if key.strip() == "Snapshot(s)":
            break
        field = _SHOW_KEYS.get(key.strip())
        if field is not None:
            values[field] = value.strip()
    if "uuid" not in values:
        raise SnapshotParseError(
            f"btrfs subvolume show output for {path!r} has no 'UUID:' line; "
            "is the path a subvolume?"
        )
    flags = values.get("flags")
    return BtrfsSnapshot(
        path=path,
        uuid=_btrfs_uuid(values.get("uuid")),
        received_uuid=_btrfs_uuid(values.get("received_uuid")),
        parent_uuid=_btrfs_uuid(values.get("parent_uuid")),
        generation=_btrfs_int(values.get("generation"), "Generation", 0),
        cgen=_btrfs_int(values.get("cgen"), "Gen at creation", 0),
        subvol_id=_btrfs_int(values.get("subvol_id"), "Subvolume ID", 0),
        otime=_btrfs_time(values.get("otime"), 0),
        readonly=None if flags is None else "readonly" in flags.split(),
    )


def _btrfs_uuid(value: str | None) -> str | None:
    if value is None or value == "-":
        return None
    if value.strip("0-") == "":
        return None  # an all-zero uuid is how btrfs stores "unset"
    return value.lower()


def _btrfs_int(value: str | None, what: str, number: int) -> int | None:
    if value is None or value == "-":
        return None
    if not value.isdigit():
        where = f"line {number}: " if number else ""
        raise SnapshotParseError(f"{where}btrfs {what} {value!r} is not a number")
    return int(value)


def _btrfs_time(value: str | None, number: int) -> datetime | None:
    if value is None or value in ("-", ""):
        return None
    for fmt in ("%Y-%m-%d %H:%M:%S %z", "%Y-%m-%d %H:%M:%S"):
        try:
            stamp = datetime.strptime(value, fmt)
        except ValueError:
            continue
        return stamp if stamp.tzinfo is not None else stamp.replace(tzinfo=UTC)
    where = f"line {number}: " if number else ""
    raise SnapshotParseError(f"{where}btrfs time {value!r} is not 'YYYY-mm-dd HH:MM:SS [+zone]'")


def _lines(text: str) -> Iterable[tuple[int, str]]:
    for number, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            yield number, line.rstrip("\r\n")
