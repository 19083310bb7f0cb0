"""Where labs are recorded on this machine, who owns them, and how leftovers are removed.

Every lab writes ``/run/carpool-lab/<prefix>/lab.json`` before it creates anything,
and removes it last. The file names the owning process (pid and start time), so
``carpool lab clean`` can tell a lab whose owner died (a SIGKILLed test run) from
one still in use by a parallel run, which it never touches.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import string
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from carpool.errors import CarpoolError

LAB_ROOT = Path(os.environ.get("CARPOOL_LAB_ROOT", "/run/carpool-lab"))
PREFIX_PATTERN = re.compile(r"^[a-z][a-z0-9]{2,9}$")
AUTO_PREFIX_LETTERS = string.ascii_lowercase + string.digits


def new_prefix() -> str:
    """A fresh per-run prefix: ``cpl`` and five random characters."""
    return "cpl" + "".join(secrets.choice(AUTO_PREFIX_LETTERS) for _ in range(5))


def check_prefix(prefix: str) -> str:
    if not PREFIX_PATTERN.match(prefix):
        raise CarpoolError(
            f"lab prefix {prefix!r} is not usable: use 3 to 10 lowercase letters and digits, "
            "starting with a letter"
        )
    return prefix


def process_start_time(pid: int) -> int | None:
    """The kernel's start time of ``pid`` (clock ticks since boot), or None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as stat:
            text = stat.read()
    except OSError:
        return None
    # The command name (field 2) may contain spaces and parentheses: split after its last ')'.
    fields = text[text.rfind(")") + 2 :].split()
    return int(fields[19])


@dataclass
class LabRecord:
    """What ``lab.json`` holds: enough to show, enter and remove a lab."""

    prefix: str
    owner_pid: int | None
    owner_start: int | None
    created: float = field(default_factory=time.time)
    namespaces: list[str] = field(default_factory=list)
    nodes: dict[str, dict[str, Any]] = field(default_factory=dict)
    networks: dict[str, dict[str, Any]] = field(default_factory=dict)
    pids: list[int] = field(default_factory=list)
    loop_devices: list[tuple[str, str]] = field(default_factory=list)
    mounts: list[str] = field(default_factory=list)

    @property
    def directory(self) -> Path:
        return LAB_ROOT / self.prefix

    @property
    def persistent(self) -> bool:
        return self.owner_pid is None

    def owner_alive(self) -> bool:
        if self.owner_pid is None:
            return True
        return process_start_time(self.owner_pid) == self.owner_start

    def save(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        target = self.directory / "lab.json"
        temporary = target.with_suffix(".tmp")
        temporary.write_text(json.dumps(self.__dict__, indent=1, sort_keys=True))
        os.replace(temporary, target)

    @classmethod
    def load(cls, prefix: str) -> LabRecord:
        path = LAB_ROOT / prefix / "lab.json"
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise CarpoolError(f"no lab with prefix {prefix!r} (nothing at {path})") from None
        except (OSError, ValueError) as error:
            raise CarpoolError(f"lab record {path} is unreadable: {error}") from None
        return cls(**data)


def list_labs() -> list[LabRecord]:
    records: list[LabRecord] = []
    if not LAB_ROOT.is_dir():
        return records
    for entry in sorted(LAB_ROOT.iterdir()):
        if (entry / "lab.json").is_file():
            try:
                records.append(LabRecord.load(entry.name))
            except CarpoolError:
                continue
    return records


def list_namespaces() -> list[str]:
    result = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=False)
    return [line.split()[0] for line in result.stdout.splitlines() if line.strip()]


def namespace_pids(namespace: str) -> list[int]:
    result = subprocess.run(
        ["ip", "netns", "pids", namespace], capture_output=True, text=True, check=False
    )
    return [int(word) for word in result.stdout.split() if word.isdigit()]


def _kill_and_reap(pids: list[int]) -> None:
    alive = []
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
            alive.append(pid)
        except (ProcessLookupError, PermissionError):
            continue
    deadline = time.monotonic() + 5.0
    for pid in alive:
        while time.monotonic() < deadline and process_start_time(pid) is not None:
            try:
                # Reap our own children; others are reaped by their parents or init.
                if os.waitpid(pid, os.WNOHANG)[0] == pid:
                    break
            except ChildProcessError:
                pass
            if _is_zombie(pid):
                break
            time.sleep(0.01)


def _is_zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as stat:
            text = stat.read()
    except OSError:
        return True
    return text[text.rfind(")") + 2 :].startswith("Z")


def remove_lab(prefix: str) -> list[str]:
    """Remove everything a lab created: processes, mounts, loop devices, namespaces, its record.

    Only names that carry the prefix are touched. Returns what was removed, for the user.
    """
    check_prefix(prefix)
    removed: list[str] = []
    record: LabRecord | None
    try:
        record = LabRecord.load(prefix)
    except CarpoolError:
        record = None
    namespaces = [ns for ns in list_namespaces() if ns.startswith(prefix + "-")]
    pids: list[int] = []
    for namespace in namespaces:
        pids.extend(namespace_pids(namespace))
    if record is not None:
        for pid in record.pids:
            # A recorded pid is ours only while it still lives in one of our namespaces
            # or its start time matches; namespace_pids above already covers the first.
            if pid not in pids and _recorded_process_matches(record, pid):
                pids.append(pid)
    if pids:
        _kill_and_reap(sorted(set(pids)))
        removed.append(f"{len(set(pids))} processes")
    if record is not None:
        for mount in reversed(record.mounts):
            if (
                subprocess.run(["umount", "-l", mount], capture_output=True, check=False).returncode
                == 0
            ):
                removed.append(f"mount {mount}")
        for device, backing in record.loop_devices:
            if loop_backing_file(device) == backing:
                subprocess.run(["losetup", "-d", device], capture_output=True, check=False)
                removed.append(f"loop device {device}")
    for namespace in namespaces:
        subprocess.run(["ip", "netns", "del", namespace], capture_output=True, check=False)
        removed.append(f"namespace {namespace}")
    directory = LAB_ROOT / prefix
    if directory.exists():
        shutil.rmtree(directory, ignore_errors=True)
        removed.append(f"directory {directory}")
    return removed


def _recorded_process_matches(record: LabRecord, pid: int) -> bool:
    marker = record.directory / "pids" / str(pid)
    try:
        start = int(marker.read_text())
    except (OSError, ValueError):
        return False
    return process_start_time(pid) == start


def loop_backing_file(device: str) -> str | None:
    """The file behind loop ``device``, so that we never detach a device someone else reused."""
    name = os.path.basename(device)
    try:
        return Path(f"/sys/block/{name}/loop/backing_file").read_text().strip()
    except OSError:
        return None


def clean(prefix: str | None = None, *, include_live: bool = False) -> list[str]:
    """Remove leftover labs.

    With ``prefix``, that lab whatever its state. Without, every lab whose owning
    process is gone; ``include_live`` also removes persistent labs (``carpool lab up``)
    but never a lab whose owning process still runs.
    """
    if prefix is not None:
        return remove_lab(prefix)
    removed: list[str] = []
    for record in list_labs():
        if (record.persistent and include_live) or (
            not record.persistent and not record.owner_alive()
        ):
            removed += remove_lab(record.prefix)
    # Records are written before anything is created, so a namespace of the automatic
    # pattern that no record claims is a leftover of a lab whose directory was lost.
    known = {record.prefix for record in list_labs()}
    for namespace in list_namespaces():
        match = re.match(r"^(cpl[a-z0-9]{5})-", namespace)
        if match and match.group(1) not in known:
            removed += remove_lab(match.group(1))
            known.add(match.group(1))
    return removed
