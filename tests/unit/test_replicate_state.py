"""Job state files (crash-safe writes), dataset locks, and the pieces of the job runner and
the ``zfs-replicate`` command line that need no pool."""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from carpool.errors import CarpoolError
from carpool.replicate import cli
from carpool.replicate.config import parse_config
from carpool.replicate.executor import ExecutionError
from carpool.replicate.job import _explain, _is_transient, endpoint_for
from carpool.replicate.plan import Destroy
from carpool.replicate.state import (
    DatasetLock,
    DatasetLocked,
    JobState,
    StateStore,
    write_atomically,
)
from carpool.replicate.transport import Local, PipeError, Ssh

# --------------------------------------------------------------------------- state


def test_a_fresh_job_has_no_history(tmp_path: Path) -> None:
    state = StateStore(tmp_path).load("data")
    assert state == JobState("data")
    assert state.lag(1000.0) is None


def test_success_and_failure_are_recorded_and_survive_a_reload(tmp_path: Path) -> None:
    store = StateStore(tmp_path)
    state = JobState("data").succeeded(
        at=110.0, snapshot="autorep-1", snapshot_time=100.0, sent=5000, seconds=10.0, action="full"
    )
    state = state.failed(at=200.0, error="boom", seconds=1.0)
    store.save(state)
    loaded = store.load("data")
    assert loaded == state
    assert loaded.successes == 1 and loaded.failures == 1 and loaded.consecutive_failures == 1
    assert loaded.last_success == 110.0 and loaded.lag(160.0) == 60.0
    assert loaded.total_bytes == 5000 and loaded.last_error == "boom"
    after = loaded.succeeded(
        at=300.0, snapshot="autorep-2", snapshot_time=290.0, sent=7, seconds=1.0, action="incr"
    )
    assert after.consecutive_failures == 0 and after.last_error is None
    assert after.total_bytes == 5007


def test_a_damaged_state_file_says_how_to_recover(tmp_path: Path) -> None:
    store = StateStore(tmp_path)
    store.path("data").parent.mkdir(parents=True)
    store.path("data").write_text("{half a json")
    with pytest.raises(CarpoolError, match="remove it"):
        store.load("data")


def test_write_atomically_leaves_no_temporary_file(tmp_path: Path) -> None:
    target = tmp_path / "deep" / "state.json"
    write_atomically(target, b"one")
    write_atomically(target, b"two")
    assert target.read_bytes() == b"two"
    assert sorted(p.name for p in target.parent.iterdir()) == ["state.json"]


@given(st.text(min_size=1, max_size=40), st.text(min_size=1, max_size=40))
def test_any_job_name_maps_to_its_own_file_inside_the_directory(one: str, two: str) -> None:
    store = StateStore("/state")
    path = store.path(one)
    assert path.parent == Path("/state/jobs")
    assert "/" not in path.name and not path.name.startswith(".")
    if one != two:
        assert store.path(one) != store.path(two) or (
            # only a 32-bit checksum collision of two unsafe names could meet
            store.path(one).name.rsplit("-", 1)[0] != one
        )


def test_unsafe_names_do_not_collide_with_their_safe_spelling() -> None:
    store = StateStore("/state")
    assert store.path("pool/a") != store.path("pool_a")
    assert store.path(".hidden") != store.path("hidden")


def _hold_lock(
    directory: str,
    ready: multiprocessing.synchronize.Event,
    done: multiprocessing.synchronize.Event,
) -> None:
    with DatasetLock(directory, "pool/a"):
        ready.set()
        done.wait(30)


def test_one_lock_per_dataset_across_processes(tmp_path: Path) -> None:
    context = multiprocessing.get_context("fork")
    ready, done = context.Event(), context.Event()
    holder = context.Process(target=_hold_lock, args=(str(tmp_path), ready, done))
    holder.start()
    try:
        assert ready.wait(30)
        with pytest.raises(DatasetLocked, match=rf"pool/a is being replicated.*pid {holder.pid}"):
            DatasetLock(tmp_path, "pool/b", "pool/a").acquire()
        with DatasetLock(tmp_path, "pool/b"):
            pass  # another dataset is free
    finally:
        done.set()
        holder.join(30)
    with DatasetLock(tmp_path, "pool/a", "pool/b"):
        pass  # released when the holder ended


# --------------------------------------------------------------------------- job helpers


def test_ssh_options_from_the_config_become_one_option_each() -> None:
    config = parse_config(
        '[defaults.ssh]\nport = 2222\nidentity = "/k"\n'
        'options = ["-o", "StrictHostKeyChecking=yes", "ConnectTimeout=5"]\n'
        '[job.a]\nsource = "p/a"\ntarget = "backup@b.example:q/a"\n'
    )
    job = config.jobs[0]
    assert endpoint_for(job, job.source) == Local()
    remote = endpoint_for(job, job.target)
    assert remote == Ssh(
        "b.example",
        user="backup",
        port=2222,
        identity="/k",
        options=("StrictHostKeyChecking=yes", "ConnectTimeout=5"),
    )
    argv = remote.wrap(["zfs", "recv", "-u", "q/a"])
    assert argv[:3] == ["ssh", "-o", "BatchMode=yes"]
    assert argv[-1] == "zfs recv -u q/a"


def _failure(message: str) -> ExecutionError:
    error = ExecutionError("step failed", step=Destroy("target", "x"), index=0, steps_done=0)
    error.__cause__ = PipeError(message, side="receive", stderr=message, bytes_copied=1)
    return error


def test_only_interrupted_streams_are_retried() -> None:
    assert _is_transient(_failure("receiving side failed: cannot receive: invalid backup stream"))
    assert _is_transient(_failure("ssh: connect to host b port 22: Connection timed out"))
    assert not _is_transient(_failure("cannot receive new filesystem stream: out of space"))
    assert not _is_transient(_failure("destination has been modified since most recent snapshot"))
    plain = ExecutionError("x", step=Destroy("target", "x"), index=0, steps_done=0)
    assert not _is_transient(plain)


def test_a_full_target_error_says_what_to_do() -> None:
    text = _explain(CarpoolError("cannot receive:\n  out of space"))
    assert "\n" not in text and "the target is full" in text


# --------------------------------------------------------------------------- command line


def test_status_without_history_and_json(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "r.toml"
    config.write_text(
        '[job.a]\nsource = "p/a"\ntarget = "q/a"\n[job.b]\nsource = "p/b"\ntarget = "q/b"\n'
    )
    state = tmp_path / "state"
    StateStore(state).save(
        JobState("b").succeeded(
            at=1.0e9, snapshot="autorep-x", snapshot_time=1.0e9, sent=2048, seconds=1, action="full"
        )
    )
    assert cli.main(["-c", str(config), "--state-dir", str(state), "status"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:3] == ["JOB", "ROLE", "LAST"]
    assert lines[1].split()[:3] == ["a", "normal", "never"]
    assert lines[2].startswith("b ") and "2.0 KiB" in lines[2]
    assert cli.main(["-c", str(config), "--state-dir", str(state), "status", "-j", "b"]) == 0
    [record] = json.loads(capsys.readouterr().out)
    assert record["job"] == "b" and record["last_bytes"] == 2048 and record["lag"] > 0


def test_config_errors_are_one_line_with_the_line_number(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "r.toml"
    config.write_text('[job.a]\nsource = "p/a"\ntarget = "q/a"\nretention = { keep_lats = 3 }\n')
    assert cli.main(["-c", str(config), "run"]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"zfs-replicate: {config}:4:") and "keep_lats" in err
    assert err.count("\n") == 1
    assert cli.main(["-c", str(tmp_path / "missing.toml"), "status"]) == 1
    assert capsys.readouterr().err.count("\n") == 1
    assert cli.main(["-c", str(config).replace("r.toml", "x"), "promote", "a"]) == 1


def test_an_unknown_job_names_the_known_ones(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "r.toml"
    config.write_text('[job.a]\nsource = "p/a"\ntarget = "q/a"\n')
    assert cli.main(["-c", str(config), "--state-dir", str(tmp_path), "run", "nope"]) == 1
    assert "no job named 'nope' (jobs: a)" in capsys.readouterr().err


def test_failover_commands_check_the_role_before_touching_anything(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "r.toml"
    config.write_text('[job.a]\nsource = "p/a"\ntarget = "q/a"\n')
    args = ["-c", str(config), "--state-dir", str(tmp_path), "--zfs-command", "/bin/false"]
    assert cli.main([*args, "reverse", "a"]) == 1
    assert "'reverse' follows 'promote'" in capsys.readouterr().err
    assert cli.main([*args, "failback", "a"]) == 1
    assert "'failback' follows 'reverse'" in capsys.readouterr().err
    assert os.path.exists(tmp_path / "locks")


def test_compression_wraps_each_end_and_keeps_the_sender_status() -> None:
    from carpool.replicate.transport import compressed

    send = compressed(["zfs", "send", "p/a@s 1"], "zstd", sending=True)
    assert send[:3] == ["bash", "-o", "pipefail"]
    assert send[-1] == "zfs send 'p/a@s 1' | zstd -q -c -T0"
    receive = compressed(["zfs", "recv", "-u", "q/a"], "lz4", sending=False)
    assert receive[-1] == "lz4 -dc | zfs recv -u q/a"
    assert compressed(["zfs", "recv"], "none", sending=False) == ["zfs", "recv"]
    with pytest.raises(CarpoolError, match="not known"):
        compressed(["x"], "brotli", sending=True)


def test_a_compressed_local_stream_arrives_whole_and_a_failing_sender_is_seen(
    tmp_path: Path,
) -> None:
    import subprocess

    from carpool.replicate.transport import compressed, pipe

    if shutil.which("zstd") is None:
        pytest.skip("needs zstd")
    payload = os.urandom(300_000)
    (tmp_path / "in").write_bytes(payload)
    out = tmp_path / "out"
    local = Local()
    recv = local.start(
        compressed(["dd", f"of={out}", "status=none"], "zstd", sending=False),
        stdin=subprocess.PIPE,
    )
    send = local.start(
        compressed(["cat", str(tmp_path / "in")], "zstd", sending=True), stdout=subprocess.PIPE
    )
    result = pipe(send, recv)
    assert out.read_bytes() == payload and result.bytes_copied > 0
    recv = local.start(
        compressed(["dd", f"of={out}", "status=none"], "zstd", sending=False),
        stdin=subprocess.PIPE,
    )
    send = local.start(
        compressed(["sh", "-c", "echo partial; exit 3"], "zstd", sending=True),
        stdout=subprocess.PIPE,
    )
    with pytest.raises(PipeError, match="exit 3"):
        pipe(send, recv)
