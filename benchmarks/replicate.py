#!/usr/bin/env python3
"""zfs-replicate beside the raw pipes, syncoid (Debian sanoid) and btrbk, in one run.

Data: a 500 MiB dataset (50 files of 10 MiB from /dev/urandom, compression
off), then a 50 MiB change (5 files overwritten in place). ZFS on two
file-backed zfs-fuse pools; btrfs on two loop-backed filesystems. Every
system gets its own copy of the same data (a ZFS clone / a btrfs writable
snapshot of one base), and the systems take turns within each trial.

Measured per trial (wall time of the whole command):
  zfs full:        raw ``zfs send base | zfs recv``; ``syncoid --no-stream`` (its own sync
                   snapshot, full send); ``zfs-replicate run`` (snapshot + full send + holds)
  zfs incremental: raw ``zfs send -i base inc | zfs recv``; a second ``syncoid`` run
                   (snapshot + incremental); a second ``zfs-replicate run`` (snapshot,
                   incremental, holds, pruning)
  btrfs incremental: raw ``btrfs send -p | btrfs receive`` + ``sync -f`` of the target;
                   ``btrbk run`` + ``sync -f``; ``zfs-replicate run`` (it flushes the target
                   itself before it reports success)
  zfs full, stream only: zfs-replicate's own send|recv time inside its full cycle (from
                   its recorded state), beside the raw pipe: what the copy through carpool costs

zfs-replicate runs as installed, with compiled bytecode (cached in the work
directory even when PYTHONDONTWRITEBYTECODE is set). The zfs-fuse daemon is
started here when none runs (and then stopped, by its PID). Pools, loop
devices and mounts carry a per-run name and are removed at the end, also
after a failure (the loop devices and mounts are recorded in a carpool lab,
so ``carpool lab clean`` removes them after a crash).

usage: replicate.py [--quick] [--trials N] [--profile]
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import pstats
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from carpool.lab import Lab
from carpool.replicate.state import StateStore

ZFS_FUSE = "/usr/sbin/zfs-fuse"
VENV_BIN = Path(sys.executable).parent
ZFS_REPLICATE = str(VENV_BIN / "zfs-replicate")
FILES = 50
FILE_MIB = 10
CHANGED_FILES = 5
MIB = 1024 * 1024


def sh(
    command: str,
    *,
    check: bool = True,
    timeout: float = 600,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        ["bash", "-o", "pipefail", "-c", command],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        env=env,
    )
    if check and done.returncode != 0:
        raise RuntimeError(f"{command!r} exited {done.returncode}: {done.stderr.strip()}")
    return done


def timed(command: str, env: dict[str, str] | None = None) -> float:
    started = time.perf_counter()
    sh(command, env=env)
    return time.perf_counter() - started


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


# --------------------------------------------------------------------------- zfs-fuse


def _alive(pid: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    return "\nState:\tZ" not in status


class ZfsDaemon:
    """The running zfs-fuse daemon, or one started here (``owned``) and stopped by its PID."""

    def __init__(self, work: Path) -> None:
        self.pidfile = work / "zfs-fuse.pid"
        self.pid = 0

    @property
    def owned(self) -> bool:
        return self.pid != 0

    def start(self) -> None:
        self.pidfile.unlink(missing_ok=True)  # a stale pidfile makes zfs-fuse exit silently
        sh(f"ulimit -v unlimited; ulimit -s unlimited; exec {ZFS_FUSE} --pidfile {self.pidfile}")
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            text = self.pidfile.read_text().strip() if self.pidfile.exists() else ""
            if text and sh("zpool list", check=False).returncode == 0:
                self.pid = int(text)
                return
            time.sleep(0.2)
        raise RuntimeError("zfs-fuse did not answer within 30 s")

    def stop(self) -> None:
        pid, self.pid = self.pid, 0
        if pid and _alive(pid):
            os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + 15
            while _alive(pid) and time.monotonic() < deadline:
                time.sleep(0.1)
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
        self.pidfile.unlink(missing_ok=True)


@contextmanager
def zfs_daemon(work: Path) -> Iterator[ZfsDaemon]:
    daemon = ZfsDaemon(work)
    if sh("zpool list", check=False).returncode != 0:
        daemon.start()
    try:
        yield daemon
    finally:
        daemon.stop()


def zdestroy(name: str) -> bool:
    """``zfs destroy -r``, retrying zfs-fuse's EBUSY after a receive for up to a minute.

    Some datasets stay busy for minutes (reference §1.4); those are left for
    the ``zpool destroy`` at the end (False), the benchmark goes on.
    """
    deadline = time.monotonic() + 60
    while True:
        done = sh(f"zfs destroy -r {name}", check=False)
        if done.returncode == 0 or "does not exist" in done.stderr:
            return True
        if "busy" not in done.stderr:
            raise RuntimeError(f"zfs destroy -r {name}: {done.stderr.strip()}")
        if time.monotonic() > deadline:
            print(f"  {name} still busy after 60 s: left for the pool's destruction", flush=True)
            return False
        time.sleep(0.5)


def release_holds(dataset: str) -> None:
    """Release zfs-replicate's holds (tag ``carpool``) so that the dataset can be destroyed."""
    listing = sh(f"zfs list -H -o name -t snapshot -r {dataset}", check=False).stdout.split()
    for snapshot in listing:
        sh(f"zfs release carpool {snapshot}", check=False)


def zpool_destroy(pool: str) -> bool:
    deadline = time.monotonic() + 20
    while True:
        done = sh(f"zpool destroy -f {pool}", check=False)
        if done.returncode == 0 or "no such pool" in done.stderr:
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.5)


# --------------------------------------------------------------------------- data


def make_data(work: Path) -> tuple[Path, Path]:
    data = work / "data"
    data.mkdir()
    for number in range(FILES):
        sh(f"head -c {FILE_MIB * MIB} /dev/urandom > {data}/f{number:02d}")
    change = work / "change.bin"
    sh(f"head -c {CHANGED_FILES * FILE_MIB * MIB} /dev/urandom > {change}")
    return data, change


def apply_change(directory: str, change: Path, salt: int) -> None:
    """Overwrite 5 files in place with 50 MiB of new data (different per call)."""
    for index in range(CHANGED_FILES):
        target = f"{directory}/f{(index * 7 + salt) % FILES:02d}"
        sh(
            f"dd if={change} of={target} bs=1M skip={index * FILE_MIB} count={FILE_MIB} "
            "conv=notrunc status=none"
        )
    sh(f"sync -f {directory}")


# --------------------------------------------------------------------------- benchmark


class Bench:
    def __init__(self, work: Path, lab: Lab, trials: int, profile: bool) -> None:
        self.work = work
        self.lab = lab
        self.trials = trials
        self.profile = profile
        self.tag = "rb" + secrets.token_hex(3)
        self.src = f"{self.tag}s"
        self.dst = f"{self.tag}d"
        self.bsrc = work / "bsrc"
        self.bdst = work / "bdst"
        self.state = work / "state"
        self.results: dict[str, dict[str, list[float]]] = {
            "zfs_full_s": {"raw": [], "syncoid": [], "carpool": []},
            "zfs_incremental_s": {"raw": [], "syncoid": [], "carpool": []},
            "btrfs_incremental_s": {"raw": [], "btrbk": [], "carpool": []},
        }
        self.stream_bytes: dict[str, int] = {}
        self.last_stream = 0.0
        self.full_stream_s: list[float] = []
        # as installed: with compiled bytecode (kept in the work dir, not in the source tree)
        self.carpool_env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
        self.carpool_env["PYTHONPYCACHEPREFIX"] = str(work / "pycache")
        sh(f"{ZFS_REPLICATE} --help", env=self.carpool_env)

    # -- setup -------------------------------------------------------------------------

    def setup_zfs(self, data: Path) -> None:
        for pool, gib in ((self.src, 4), (self.dst, 16)):
            image = self.work / f"{pool}.img"
            with open(image, "wb") as handle:
                handle.truncate(gib * 1024 * MIB)  # sparse
            sh(f"zpool create -m {self.work}/mnt/{pool} {pool} {image}")
        sh(f"zfs create -o compression=off {self.src}/bench")
        sh(f"cp {data}/* {self.work}/mnt/{self.src}/bench/ && sync")
        sh(f"zfs snapshot {self.src}/bench@base")

    def setup_btrfs(self, data: Path) -> None:
        for mount in (self.bsrc, self.bdst):
            image = self.work / f"{mount.name}.img"
            with open(image, "wb") as handle:
                handle.truncate(4 * 1024 * MIB)
            sh(f"mkfs.btrfs -q -f {image}")
            loop = sh(f"losetup --show -f {image}").stdout.strip()
            self.lab.remember_loop_device(loop, str(image))
            mount.mkdir()
            sh(f"mount {loop} {mount}")
            self.lab.remember_mount(str(mount))
        sh(f"btrfs subvolume create {self.bsrc}/bench")
        sh(f"cp {data}/* {self.bsrc}/bench/ && sync -f {self.bsrc}")
        sh(f"btrfs subvolume snapshot -r {self.bsrc}/bench {self.bsrc}/bench@base")
        (self.bsrc / "_btrbk_snap").mkdir()

    def carpool(self, config: Path, job: str) -> float:
        command = f"{ZFS_REPLICATE} -c {config} --state-dir {self.state} run -q {job}"
        if not self.profile:
            elapsed = timed(command, self.carpool_env)
            self.last_stream = StateStore(self.state).load(job).last_stream_seconds or 0.0
            return elapsed
        from carpool.replicate.cli import main

        profiler = cProfile.Profile()
        started = time.perf_counter()
        profiler.enable()
        code = main(["-c", str(config), "--state-dir", str(self.state), "run", "-q", job])
        profiler.disable()
        elapsed = time.perf_counter() - started
        if code != 0:
            raise RuntimeError(f"zfs-replicate run {job} failed")
        self.last_stream = StateStore(self.state).load(job).last_stream_seconds or 0.0
        stats = pstats.Stats(profiler, stream=sys.stdout)
        print(f"--- profile of zfs-replicate run {job} ({elapsed:.2f} s)")
        stats.sort_stats("cumulative").print_stats(15)
        return elapsed

    # -- trials ------------------------------------------------------------------------

    def zfs_trial(self, number: int, change: Path) -> None:
        src, dst = self.src, self.dst
        syn, cp = f"{src}/syn{number}", f"{src}/cp{number}"
        sh(f"zfs clone -o compression=off {src}/bench@base {syn}")
        sh(f"zfs clone -o compression=off {src}/bench@base {cp}")
        config = self.work / f"zfs{number}.toml"
        config.write_text(
            f'[job.cp{number}]\nsource = "{cp}"\ntarget = "{dst}/cp{number}"\n'
            "retention = { keep_last = 5 }\n"
        )
        full = self.results["zfs_full_s"]
        order: list[tuple[str, Callable[[], float]]] = [
            ("raw", lambda: timed(f"zfs send {src}/bench@base | zfs recv -u {dst}/raw{number}")),
            (
                "syncoid",
                lambda: timed(f"syncoid --quiet --no-stream {syn} {dst}/syn{number}"),
            ),
            ("carpool", lambda: self.carpool(config, f"cp{number}")),
        ]
        for name, run in order[number % 3 :] + order[: number % 3]:
            full[name].append(run())
            if name == "carpool":
                self.full_stream_s.append(self.last_stream)
        apply_change(f"{self.work}/mnt/{src}/bench", change, number)
        sh(f"zfs snapshot {src}/bench@inc{number}")
        apply_change(f"{self.work}/mnt/{src}/syn{number}", change, number)
        apply_change(f"{self.work}/mnt/{src}/cp{number}", change, number)
        incremental = self.results["zfs_incremental_s"]
        order = [
            (
                "raw",
                lambda: timed(
                    f"zfs send -i @base {src}/bench@inc{number} | zfs recv -u {dst}/raw{number}"
                ),
            ),
            ("syncoid", lambda: timed(f"syncoid --quiet {syn} {dst}/syn{number}")),
            ("carpool", lambda: self.carpool(config, f"cp{number}")),
        ]
        for name, run in order[number % 3 :] + order[: number % 3]:
            incremental[name].append(run())
        if number == 0:
            size = sh(f"zfs send -i @base {src}/bench@inc{number} | wc -c").stdout.strip()
            self.stream_bytes["zfs_incremental"] = int(size)
        for name in (f"{dst}/raw{number}", f"{dst}/syn{number}", f"{dst}/cp{number}", syn, cp):
            release_holds(name)
            zdestroy(name)
        zdestroy(f"{src}/bench@inc{number}")

    def btrfs_trial(self, number: int, change: Path) -> None:
        bsrc, bdst = self.bsrc, self.bdst
        for name in (f"bk{number}", f"cp{number}"):
            sh(f"btrfs subvolume snapshot {bsrc}/bench@base {bsrc}/{name}")
        raw_dir = bdst / f"raw{number}"
        btrbk_dir = bdst / f"_btrbk{number}"
        cp_dir = bdst / f"cp{number}"
        for directory in (raw_dir, btrbk_dir, cp_dir):
            directory.mkdir()
        conf = self.work / f"btrbk{number}.conf"
        conf.write_text(
            "timestamp_format        long-iso\n"
            "snapshot_preserve_min   latest\n"
            "snapshot_preserve       no\n"
            "target_preserve_min     latest\n"
            "target_preserve         no\n"
            f"volume {bsrc}\n"
            "  snapshot_dir _btrbk_snap\n"
            f"  subvolume bk{number}\n"
            f"    target send-receive {btrbk_dir}\n"
        )
        config = self.work / f"btrfs{number}.toml"
        config.write_text(
            f'[job.bcp{number}]\nbackend = "btrfs"\nsource = "{bsrc}/cp{number}"\n'
            f'target = "{cp_dir}"\nsnapshot_dir = "{bsrc}/.snap-cp{number}"\n'
            "retention = { keep_last = 1 }\n"
        )
        # full sends (not measured: the btrfs metric is the incremental cycle)
        sh(f"btrfs send -q {bsrc}/bench@base | btrfs receive {raw_dir}/ >/dev/null")
        sh(f"btrbk -q -c {conf} run")
        self.carpool(config, f"bcp{number}")
        time.sleep(1.1)  # btrbk names its snapshots with 1 s resolution
        apply_change(f"{bsrc}/bench", change, number)
        sh(f"btrfs subvolume snapshot -r {bsrc}/bench {bsrc}/bench@inc{number}")
        apply_change(f"{bsrc}/bk{number}", change, number)
        apply_change(f"{bsrc}/cp{number}", change, number)
        incremental = self.results["btrfs_incremental_s"]
        order: list[tuple[str, Callable[[], float]]] = [
            (
                "raw",
                lambda: timed(
                    f"btrfs send -q -p {bsrc}/bench@base {bsrc}/bench@inc{number} | "
                    f"btrfs receive {raw_dir}/ >/dev/null && sync -f {raw_dir}"
                ),
            ),
            ("btrbk", lambda: timed(f"btrbk -q -c {conf} run && sync -f {btrbk_dir}")),
            ("carpool", lambda: self.carpool(config, f"bcp{number}")),
        ]
        for name, run in order[number % 3 :] + order[: number % 3]:
            incremental[name].append(run())
        # remove this trial's subvolumes
        doomed = [p for d in (raw_dir, btrbk_dir, cp_dir) for p in sorted(d.iterdir())]
        doomed += sorted((bsrc / "_btrbk_snap").iterdir())
        doomed += sorted((bsrc / f".snap-cp{number}").iterdir())
        doomed += [bsrc / f"bk{number}", bsrc / f"cp{number}", bsrc / f"bench@inc{number}"]
        for path in doomed:
            sh(f"btrfs subvolume delete {path} >/dev/null")
        sh(f"btrfs subvolume sync {bdst} >/dev/null; btrfs subvolume sync {bsrc} >/dev/null")

    # -- teardown ----------------------------------------------------------------------

    def teardown(self, daemon: ZfsDaemon) -> list[str]:
        for mount in (self.bdst, self.bsrc):
            if mount.exists():
                sh(f"umount {mount}", check=False)
        sh("zfs umount -a", check=False)
        pools = [
            p for p in (self.src, self.dst) if sh(f"zpool list {p}", check=False).returncode == 0
        ]
        problems = [p for p in pools if not zpool_destroy(p)]
        if problems and daemon.owned:
            daemon.stop()  # zfs-fuse says "pool is busy" until it restarts
            daemon.start()
            problems = [p for p in problems if not zpool_destroy(p)]
        return problems


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="one trial (about two minutes)")
    parser.add_argument("--trials", type=int, help="trials per system (default 5)")
    parser.add_argument("--profile", action="store_true", help="profile zfs-replicate in-process")
    arguments = parser.parse_args()
    if os.geteuid() != 0:
        print("replicate: run as root (zfs-fuse, loop devices, mounts)", file=sys.stderr)
        return 1
    missing = [t for t in (ZFS_FUSE, "syncoid", "btrbk", "mkfs.btrfs") if not shutil.which(t)]
    if missing:
        print(f"replicate: needs {', '.join(missing)} (run `make setup`)", file=sys.stderr)
        return 1
    trials = arguments.trials or (1 if arguments.quick else 5)
    work = Path(tempfile.mkdtemp(prefix="carpool-replicate-bench-", dir="/var/tmp"))
    problems: list[str] = []
    try:
        with Lab() as lab, zfs_daemon(work) as daemon:
            bench = Bench(work, lab, trials, arguments.profile)
            try:
                data, change = make_data(work)
                bench.setup_zfs(data)
                bench.setup_btrfs(data)
                shutil.rmtree(data)
                for number in range(trials):
                    bench.zfs_trial(number, change)
                    bench.btrfs_trial(number, change)
                    summary = ", ".join(
                        f"{metric} " + " ".join(f"{s}={v[-1]:.2f}" for s, v in values.items())
                        for metric, values in bench.results.items()
                    )
                    print(f"trial {number + 1}: {summary}", flush=True)
            finally:
                problems = bench.teardown(daemon)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if problems:
        print(f"replicate: could not destroy pool(s) {problems}", file=sys.stderr)
    logical_mb = FILES * FILE_MIB * MIB / 1e6
    full = {s: median(v) for s, v in bench.results["zfs_full_s"].items()}
    inc = {s: median(v) for s, v in bench.results["zfs_incremental_s"].items()}
    binc = {s: median(v) for s, v in bench.results["btrfs_incremental_s"].items()}
    mbps = {s: round(logical_mb / v, 1) for s, v in full.items()}
    stream_mbps = {
        "raw": mbps["raw"],
        "carpool": round(logical_mb / median(bench.full_stream_s), 1),
    }
    print("\nmedians")
    print("  zfs full (MB/s):        " + "  ".join(f"{s} {v}" for s, v in mbps.items()))
    print(
        "  zfs full, stream only (MB/s, carpool's send|recv inside its cycle): "
        + "  ".join(f"{s} {v}" for s, v in stream_mbps.items())
    )
    print("  zfs incremental (s):    " + "  ".join(f"{s} {v:.2f}" for s, v in inc.items()))
    print("  btrfs incremental (s):  " + "  ".join(f"{s} {v:.2f}" for s, v in binc.items()))
    print(
        f"  ratios: zfs full carpool/raw {mbps['carpool'] / mbps['raw']:.2f} (goal >= 0.95); "
        f"zfs incremental carpool/syncoid {inc['carpool'] / inc['syncoid']:.2f} (goal <= 0.5); "
        f"btrfs incremental carpool/btrbk {binc['carpool'] / binc['btrbk']:.2f} (goal <= 1)"
    )
    metrics = [
        {"name": "zfs_full_mbps", "unit": "MB/s", "better": "higher", "values": mbps,
         "trials": trials},
        {"name": "zfs_full_stream_mbps", "unit": "MB/s", "better": "higher",
         "values": stream_mbps, "trials": trials},
        {"name": "zfs_incremental_s", "unit": "s", "better": "lower",
         "values": {s: round(v, 3) for s, v in inc.items()}, "trials": trials},
        {"name": "btrfs_incremental_s", "unit": "s", "better": "lower",
         "values": {s: round(v, 3) for s, v in binc.items()}, "trials": trials},
    ]  # fmt: skip
    print(json.dumps({"benchmark": "replicate", "metrics": metrics}))
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
