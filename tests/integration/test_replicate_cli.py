"""``zfs-replicate`` on real zfs-fuse pools: run, status, promote → write → reverse → failback.

Uses the zfs-fuse fixture of :mod:`tests.integration.test_replicate_zfs` (one
daemon per machine, started and stopped by PID only if the test started it;
per-run pool names).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from carpool.replicate.cli import main
from carpool.replicate.state import StateStore
from carpool.replicate.zfs import ZfsCli
from tests.integration.test_replicate_zfs import (
    Pools,
    digests,
    fresh_view,
    mountpoint,
    write_files,
    zfs_pools,
)
from tests.integration.test_replicate_zfs import pytestmark as zfs_marks

pytestmark = zfs_marks
PYTHON = sys.executable


@pytest.fixture(scope="module")
def pools(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pools]:
    with zfs_pools(tmp_path_factory.mktemp("zfs")) as made:
        yield made


def toml_value(value: object) -> str:
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {toml_value(v)}" for k, v in value.items()) + " }"
    return json.dumps(value)


def write_config(path: Path, jobs: dict[str, dict[str, object]], **defaults: object) -> Path:
    lines = ["[defaults]"]
    for key, value in defaults.items():
        lines.append(f"{key} = {toml_value(value)}")
    for name, table in jobs.items():
        lines.append(f"[job.{name}]")
        for key, value in table.items():
            lines.append(f"{key} = {toml_value(value)}")
    path.write_text("\n".join(lines) + "\n")
    return path


def cli(config: Path, state: Path, *args: str) -> int:
    return main(["-c", str(config), "--state-dir", str(state), *args])


def status(
    config: Path, state: Path, capsys: pytest.CaptureFixture[str]
) -> list[dict[str, object]]:
    capsys.readouterr()
    assert cli(config, state, "status", "-j") == 0
    records: list[dict[str, object]] = json.loads(capsys.readouterr().out)
    return records


def names(zfs: ZfsCli, dataset: str) -> list[str]:
    return [s.name for s in zfs.snapshots(dataset)]


def test_run_status_and_errors(
    pools: Pools, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    zfs = pools.zfs
    src, dst = f"{pools.source}/clirun", f"{pools.target}/clirun"
    zfs.create(src)
    root = mountpoint(zfs, src)
    write_files(root, {f"f{i}": os.urandom(256 * 1024) for i in range(3)})
    config = write_config(
        tmp_path / "replicate.toml",
        {"app": {"source": src, "target": dst}},
        prefix="autorep",
        retention={"keep_last": 2},
    )
    state = tmp_path / "state"
    assert cli(config, state, "run", "app") == 0
    assert "full send" in capsys.readouterr().out
    for round_ in range(3):
        write_files(root, {f"r{round_}": os.urandom(64 * 1024)})
        assert cli(config, state, "run") == 0
        assert "incremental" in capsys.readouterr().out
    assert fresh_view(zfs, dst) == digests(root)
    # keep last 2 on both sides, base held, names unique on both sides
    assert len(names(zfs, src)) == 2 and names(zfs, src) == names(zfs, dst)
    assert zfs.snapshots(dst)[-1].held
    assert zfs.get(dst, "atime") == "off"
    [record] = status(config, state, capsys)
    assert record["job"] == "app" and record["successes"] == 4 and record["failures"] == 0
    assert isinstance(record["lag"], float) and record["lag"] >= 0
    assert isinstance(record["last_bytes"], int) and record["last_bytes"] > 0
    assert record["last_snapshot"] == names(zfs, src)[-1]
    loaded = StateStore(state).load("app")
    assert loaded.total_bytes > 768 * 1024

    # errors: one line, exit 1, recorded in the state
    bad = write_config(
        tmp_path / "missing.toml",
        {"gone": {"source": f"{pools.source}/does-not-exist", "target": f"{pools.target}/x"}},
    )
    done = subprocess.run(
        [PYTHON, "-m", "carpool.replicate.cli", "-c", str(bad), "--state-dir", str(state), "run"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 1
    assert done.stderr.count("\n") == 1, done.stderr
    assert "does not exist" in done.stderr and "Traceback" not in done.stderr
    assert StateStore(state).load("gone").consecutive_failures == 1

    broken = tmp_path / "broken.toml"
    broken.write_text('[job.a]\nsource = "p/a"\ntarget = "p/b"\nschedule = "99 * * * *"\n')
    done = subprocess.run(
        [PYTHON, "-m", "carpool.replicate.cli", "-c", str(broken), "run"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 1
    assert f"{broken}:4:" in done.stderr and done.stderr.count("\n") == 1


def test_promote_write_reverse_failback(
    pools: Pools, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    zfs = pools.zfs
    src, dst = f"{pools.source}/fo", f"{pools.target}/fo"
    zfs.create(src)
    primary = mountpoint(zfs, src)
    write_files(primary, {"blob": os.urandom(1024 * 1024), "state": b"one"})
    config = write_config(tmp_path / "r.toml", {"db": {"source": src, "target": dst}})
    state = tmp_path / "state"
    assert cli(config, state, "run", "db") == 0
    write_files(primary, {"state": b"two"})
    assert cli(config, state, "run", "db") == 0
    replicated = digests(primary)
    assert fresh_view(zfs, dst) == replicated

    # --- the primary "fails": promote the replica and write to it
    assert cli(config, state, "promote", "db") == 0
    assert "promote" in capsys.readouterr().out
    replica = mountpoint(zfs, dst)
    assert digests(replica) == replicated
    write_files(replica, {"state": b"three-on-replica", "new": os.urandom(200_000)})
    on_replica = digests(replica)
    # a normal run is refused while promoted, nothing is sent
    assert cli(config, state, "run", "db") == 1
    assert "promoted" in capsys.readouterr().err

    # --- the old primary comes back with divergent writes and a local snapshot
    write_files(primary, {"state": b"divergent"})
    zfs.snapshot(f"{src}@local-x")
    write_files(primary, {"late": b"unsnapshotted divergent write"})
    divergent = digests(primary)

    # --- reverse: the old primary becomes the replica, its divergent data kept aside
    assert cli(config, state, "reverse", "db") == 0
    out = capsys.readouterr().out
    assert "kept aside" in out
    assert fresh_view(zfs, src) == on_replica
    siblings = zfs.run("list", "-H", "-o", "name", "-r", "-d", "1", pools.source).stdout.split()
    [aside] = [s for s in siblings if s.startswith(f"{pools.source}/fo-diverged-")]
    assert fresh_view(zfs, aside) == divergent
    assert "local-x" in names(zfs, aside)
    assert StateStore(state).load("db").role == "reversed"

    # --- while reversed, run replicates from the promoted target to the old primary
    write_files(replica, {"state": b"four-on-replica"})
    assert cli(config, state, "run", "db") == 0
    assert fresh_view(zfs, src) == digests(replica)

    # --- failback: final incremental, old primary writable again, target read-only
    write_files(replica, {"state": b"five-final"})
    final = digests(replica)
    assert cli(config, state, "failback", "db") == 0
    assert "role now normal" in capsys.readouterr().out
    assert fresh_view(zfs, src) == final
    write_files(mountpoint(zfs, src), {"state": b"six-after-failback"})  # writable again
    with pytest.raises(OSError):
        write_files(mountpoint(zfs, dst), {"x": b"replica must be read-only"})
    assert cli(config, state, "run", "db") == 0
    assert fresh_view(zfs, dst) == digests(mountpoint(zfs, src))
    assert StateStore(state).load("db").role == "normal"
    assert [s.guid for s in zfs.snapshots(src)] == [s.guid for s in zfs.snapshots(dst)]


def test_daemon_continuous_mode_events_and_metrics(pools: Pools, tmp_path: Path) -> None:
    import socket
    import time
    import urllib.request

    from carpool.control import ControlClient, socket_path

    zfs = pools.zfs
    src, dst = f"{pools.source}/daemon", f"{pools.target}/daemon"
    zfs.create(src)
    root = mountpoint(zfs, src)
    write_files(root, {"a": os.urandom(128 * 1024)})
    config = write_config(
        tmp_path / "d.toml",
        {
            "fast": {"source": src, "target": dst, "schedule": "continuous", "interval": "1s"},
            "cron": {"source": f"{pools.source}/none", "target": f"{pools.target}/none"},
        },
        retention={"keep_last": 3},
    )
    run_dir = tmp_path / "run"
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    log = open(tmp_path / "daemon.log", "wb")  # noqa: SIM115
    daemon = subprocess.Popen(
        [PYTHON, "-m", "carpool.replicate.cli", "-c", str(config), "--state-dir",
         str(tmp_path / "state"), "daemon", "--run-dir", str(run_dir),
         "--metrics", f"127.0.0.1:{port}"],
        stdout=log,
        stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        sock = socket_path(run_dir, "zfs-replicate")
        deadline = time.monotonic() + 60
        while not sock.exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert sock.exists(), (tmp_path / "daemon.log").read_text()
        client = ControlClient(sock, timeout=30)
        events = client.events(["replication_done"])
        seen = [next(events), next(events)]
        assert all(e.attributes["job"] == "fast" for e in seen)
        answer = client.request("status")
        jobs = {j["job"]: j for j in answer["jobs"]}
        assert jobs["fast"]["successes"] >= 2 and jobs["fast"]["schedule"] == "continuous"
        assert jobs["cron"]["successes"] == 0 and jobs["cron"]["schedule"] == "*/15 * * * *"
        # "run" over the control socket starts the cron job now; it fails (no dataset)
        failed = client.events(["replication_failed"])
        client.request("run", job="cron")
        event = next(failed)
        assert event.attributes["job"] == "cron" and "does not exist" in str(
            event.attributes["error"]
        )
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30).read()
        metrics = text.decode()
        assert 'carpool_replicate_cycles_total{job="fast",outcome="ok"}' in metrics
        assert 'carpool_replicate_lag_seconds{job="fast"}' in metrics
        assert 'carpool_events_total{event="replication_done",source="replicate"}' in metrics
        client.close()
    finally:
        daemon.terminate()
        try:
            daemon.wait(60)
        except subprocess.TimeoutExpired:
            daemon.kill()
            daemon.wait()
        log.close()
    assert daemon.returncode == 0, (tmp_path / "daemon.log").read_text()
    assert not sock.exists()
    assert len(zfs.snapshots(dst)) <= 4
    assert fresh_view(zfs, dst) == digests(root)


def test_bad_input_missing_parent_full_target_interrupted_stream(
    pools: Pools, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    zfs = pools.zfs
    src = f"{pools.source}/bad"
    zfs.create(src)
    write_files(mountpoint(zfs, src), {"big": os.urandom(3 * 1024 * 1024)})
    state = tmp_path / "state"

    # the target's parent dataset does not exist: one line, nothing created on the source
    before = [s.name for s in zfs.snapshots(src)]
    config = write_config(
        tmp_path / "p.toml", {"noparent": {"source": src, "target": f"{pools.target}/no/such"}}
    )
    assert cli(config, state, "run") == 1
    err = capsys.readouterr().err
    assert "parent dataset" in err and "zfs create" in err and err.count("\n") == 1
    assert [s.name for s in zfs.snapshots(src)] == before

    # a full target: the receive fails, the error says so, nothing is left half-received
    zfs.create(f"{pools.target}/small", properties=[("quota", "1M")])
    config = write_config(
        tmp_path / "f.toml", {"full": {"source": src, "target": f"{pools.target}/small/x"}}
    )
    assert cli(config, state, "run", "full") == 1
    err = capsys.readouterr().err
    assert "target is full" in err, err
    assert not zfs.exists(f"{pools.target}/small/x")
    assert StateStore(state).load("full").last_error is not None

    # an interrupted stream (the sender dies after 300 kB, once) is retried cleanly
    marker = tmp_path / "cut-once"
    wrapper = tmp_path / "zfs-cut"
    wrapper.write_text(
        "#!/bin/sh\n"
        f'if [ "$1" = send ] && [ "$2" != -nvP ] && [ ! -e {marker} ]; then\n'
        f"  touch {marker}\n"
        '  zfs "$@" | head -c 300000\n'
        "  exit 1\n"
        "fi\n"
        'exec zfs "$@"\n'
    )
    wrapper.chmod(0o755)
    dst = f"{pools.target}/retried"
    config = write_config(tmp_path / "i.toml", {"flaky": {"source": src, "target": dst}})
    args = ["-c", str(config), "--state-dir", str(state), "--zfs-command", str(wrapper), "run"]
    assert main(args) == 0, capsys.readouterr().err
    assert marker.exists() and "2 attempts" in capsys.readouterr().out
    assert fresh_view(zfs, dst) == digests(mountpoint(zfs, src))
    # a modified replica: the cycle refuses, destroys nothing, and says what to do
    zfs.set(dst, "readonly", "off")
    zfs.mount(dst)
    write_files(mountpoint(zfs, dst), {"local": b"written on the replica"})
    kept = [s.guid for s in zfs.snapshots(dst)]
    assert cli(config, state, "run") == 1
    err = capsys.readouterr().err
    assert "nothing was destroyed" in err and "allow_rollback" in err
    assert [s.guid for s in zfs.snapshots(dst)] == kept
