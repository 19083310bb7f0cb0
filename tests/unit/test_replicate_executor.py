"""The ZFS executor against a recorded ``zfs``: step order, the per-side bookkeeping chains."""

from __future__ import annotations

import subprocess
import threading
from collections.abc import Sequence

import pytest

from carpool.replicate.executor import ExecutionError, execute
from carpool.replicate.plan import (
    Action,
    Destroy,
    Hold,
    Plan,
    Release,
    SetProperty,
    Snapshot,
    Step,
)
from carpool.replicate.transport import DEFAULT_TIMEOUT, Result
from carpool.replicate.zfs import ZfsCli


class RecordedZfs:
    """An endpoint whose ``zfs`` records each command (and fails those containing ``fail``)."""

    def __init__(self, name: str, log: list[tuple[str, str]], fail: str | None = None) -> None:
        self.name = name
        self.log = log
        self.fail = fail
        self.lock = threading.Lock()

    def describe(self) -> str:
        return self.name

    def wrap(self, argv: Sequence[str]) -> list[str]:
        return list(argv)

    def run(
        self,
        argv: Sequence[str],
        input: str | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        *,
        check: bool = True,
    ) -> Result:
        command = " ".join(argv[1:])
        with self.lock:
            self.log.append((self.name, command))
        if self.fail is not None and self.fail in command:
            if check:
                from carpool.replicate.transport import CommandError

                raise CommandError(argv, 1, "cannot hold: no such pool", self.name)
            return Result(1, "", "cannot hold: no such pool")
        return Result(0, "", "")

    def start(
        self, argv: Sequence[str], *, stdin: int | None = None, stdout: int | None = None
    ) -> subprocess.Popen[bytes]:
        raise AssertionError("no stream in these plans")


def bookkeeping_plan() -> Plan:
    steps: tuple[Step, ...] = (
        Snapshot("source", "s3"),
        SetProperty("target", "readonly", "on"),
        Hold("source", "s3", "carpool"),
        Hold("target", "s3", "carpool"),
        Release("source", "s2", "carpool"),
        Release("target", "s2", "carpool"),
        Destroy("source", "s1"),
        Destroy("target", "s1"),
    )
    return Plan(Action.INCREMENTAL, "test", "zfs", steps)


def test_bookkeeping_runs_every_step_in_order_per_side() -> None:
    log: list[tuple[str, str]] = []
    source = ZfsCli(RecordedZfs("src", log))
    target = ZfsCli(RecordedZfs("dst", log))
    report = execute(bookkeeping_plan(), source, target, "p/a", "q/a")
    assert report.steps_done == 8
    assert [c for side, c in log if side == "src"] == [
        "snapshot p/a@s3",
        "hold carpool p/a@s3",
        "release carpool p/a@s2",
        "destroy p/a@s1",
    ]
    assert [c for side, c in log if side == "dst"] == [
        "set readonly=on q/a",
        "hold carpool q/a@s3",
        "release carpool q/a@s2",
        "destroy q/a@s1",
    ]
    assert log[0] == ("src", "snapshot p/a@s3")  # the snapshot comes before any bookkeeping


def test_a_failing_side_stops_its_own_chain_and_names_the_step() -> None:
    log: list[tuple[str, str]] = []
    source = ZfsCli(RecordedZfs("src", log))
    target = ZfsCli(RecordedZfs("dst", log, fail="hold"))
    with pytest.raises(ExecutionError, match=r"step 4 of 8 \(Hold\(side='target'") as caught:
        execute(bookkeeping_plan(), source, target, "p/a", "q/a")
    assert caught.value.index == 3
    target_commands = [c for side, c in log if side == "dst"]
    assert target_commands == ["set readonly=on q/a", "hold carpool q/a@s3"]
    assert "destroy p/a@s1" in [c for side, c in log if side == "src"]
