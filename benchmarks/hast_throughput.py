#!/usr/bin/env python3
"""HAST data path: fio through nbdfuse + loop, nbdkit's file plugin beside hastd.

A lab with a primary node ``p`` (its own mount namespace) and a secondary ``s``
on the sync link. Each system serves a fresh image on the backing disk
(/var/tmp), the primary attaches it as the README shows (nbdfuse + a loop device
with direct I/O) and fio runs on the loop device:

  seq_write     1 MiB sequential writes, then fsync (end_fsync)
  fsync_write   4 KiB random writes, fsync after each
  randread      4 KiB random reads, queue depth 1

Systems:
  nbdkit            nbdkit's file plugin (the unreplicated anchor)
  carpool           hastd, primary, ``remote none`` (no peer)
  carpool_fullsync  hastd pair, replication fullsync
  carpool_memsync   hastd pair, replication memsync
  carpool_async     hastd pair, replication async

Then the resync check: with the secondary away, writes dirty some extents; when
it returns, the bytes the primary sends are compared with the dirty bytes.

usage: hast_throughput.py [--quick] [--trials N]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from carpool.lab import Lab, LabProcess, Node
from carpool.lab.services import daemon_status, wait_until, write_file

MIB = 1 << 20
IMAGE_SIZE = 1024 * MIB
RESOURCE = "bench"
SYSTEMS = ("nbdkit", "carpool", "carpool_fullsync", "carpool_memsync", "carpool_async")
SMALL_IO_SYSTEMS = ("nbdkit", "carpool")

HAST_CONF = """resource {resource} {{
	replication {replication}
	on p {{
		local {p_image}
		remote {remote}
	}}
	on s {{
		local {s_image}
		remote 192.168.255.1
	}}
}}
"""


def median(values: list[float]) -> float:
    return round(statistics.median(values), 1)


class Bench:
    def __init__(self, lab: Lab, scratch: Path, quick: bool) -> None:
        self.lab = lab
        self.scratch = scratch
        self.quick = quick
        lab.network("sync")
        self.p = lab.node("p", mount_namespace=True)
        self.s = lab.node("s")
        for node in (self.p, self.s):
            lab.attach(node, "sync", ifname="em1")
        self.seq_size = "256M" if quick else "512M"
        self.runtime = 4 if quick else 8

    # -- servers --------------------------------------------------------------------------

    def image(self, name: str) -> Path:
        path = self.scratch / name
        path.unlink(missing_ok=True)
        with open(path, "wb") as handle:
            handle.truncate(IMAGE_SIZE)
        return path

    @contextmanager
    def nbdkit(self) -> Iterator[Path]:
        image = self.image("nbdkit.img")
        sock = self.p.dir / "nbdkit.sock"
        sock.unlink(missing_ok=True)
        server = self.p.spawn(["nbdkit", "-f", "-U", str(sock), "file", f"file={image}"],
                              name="nbdkit")  # fmt: skip
        try:
            wait_until(sock.exists, 20, "nbdkit to listen")
            yield sock
        finally:
            server.terminate()
            image.unlink(missing_ok=True)

    def hastctl(self, node: Node, *words: str) -> Any:
        argv = [sys.executable, "-m", "carpool.hast.ctl", "-c", str(node.dir / "hast.conf"),
                "--run-dir", str(node.dir), "-j", *words]  # fmt: skip
        out = node.run(argv).stdout
        return json.loads(out) if out.strip() else None

    def start_hastd(self, node: Node) -> LabProcess:
        argv = [sys.executable, "-m", "carpool.hast.daemon", "-c", str(node.dir / "hast.conf"),
                "--run-dir", str(node.dir)]  # fmt: skip
        process = node.spawn(argv, name="hastd")
        wait_until(lambda: daemon_status(node, "hastd") is not None, 20, "hastd to answer")
        return process

    def status(self) -> dict[str, Any]:
        return dict(self.hastctl(self.p, "status", RESOURCE)[0])

    @contextmanager
    def hast(self, replication: str | None) -> Iterator[Path]:
        """hastd primary on p; with a replication mode, a secondary on s too."""
        p_image, s_image = self.image("p.img"), self.image("s.img")
        text = HAST_CONF.format(
            resource=RESOURCE, replication=replication or "memsync", p_image=p_image,
            s_image=s_image, remote="192.168.255.2" if replication else "none",
        )  # fmt: skip
        daemons: list[LabProcess] = []
        try:
            for node in (self.p, self.s):
                write_file(node, "hast.conf", text)
            self.hastctl(self.p, "create", RESOURCE)
            daemons.append(self.start_hastd(self.p))
            if replication:
                self.hastctl(self.s, "create", RESOURCE)
                daemons.append(self.start_hastd(self.s))
                self.hastctl(self.s, "role", "secondary", RESOURCE)
            self.hastctl(self.p, "role", "primary", RESOURCE)
            if replication:
                wait_until(lambda: self.status().get("status") == "complete", 60, "complete")
            yield self.p.dir / "hast" / f"{RESOURCE}.sock"
        finally:
            for daemon in daemons:
                daemon.terminate()
            p_image.unlink(missing_ok=True)
            s_image.unlink(missing_ok=True)

    @contextmanager
    def attached(self, sock: Path) -> Iterator[str]:
        """The export as a loop device with direct I/O: nbdfuse + losetup."""
        fuse = self.p.dir / "fuse"
        fuse.mkdir(exist_ok=True)
        nbdfuse = self.p.spawn(["nbdfuse", str(fuse), "--unix", str(sock)], name="nbdfuse")
        loop = None
        try:
            def attached() -> bool:
                if not nbdfuse.running:
                    raise RuntimeError(f"nbdfuse ended: {nbdfuse.output()[-500:]}")
                return self.p.run(["test", "-e", str(fuse / "nbd")], check=False).returncode == 0

            wait_until(attached, 20, "nbdfuse")
            loop = self.p.run(["losetup", "--direct-io=on", "--show", "-f",
                               str(fuse / "nbd")]).stdout.strip()  # fmt: skip
            self.lab.remember_loop_device(loop, str(fuse / "nbd"))
            yield loop
        finally:
            if loop is not None:
                self.p.run(["losetup", "-d", loop], check=False)
            self.p.run(["umount", str(fuse)], check=False)
            nbdfuse.kill()

    # -- workloads --------------------------------------------------------------------------

    def fio(self, device: str, *arguments: str) -> dict[str, Any]:
        argv = ["fio", "--name=bench", f"--filename={device}", "--direct=1",
                "--ioengine=psync", "--numjobs=1", "--output-format=json", *arguments]  # fmt: skip
        out = self.p.run(argv, timeout=600).stdout
        return dict(json.loads(out[out.index("{"):])["jobs"][0])

    def seq_write_mbps(self, device: str) -> float:
        job = self.fio(device, "--rw=write", "--bs=1M", f"--size={self.seq_size}",
                       "--end_fsync=1")  # fmt: skip
        # bandwidth over the whole job, the final fsync included
        return float(job["write"]["io_bytes"]) / (float(job["job_runtime"]) / 1000) / 1e6

    def fsync_write_iops(self, device: str) -> float:
        job = self.fio(device, "--rw=randwrite", "--bs=4k", f"--size={self.seq_size}",
                       "--fsync=1", "--time_based", f"--runtime={self.runtime}")  # fmt: skip
        return float(job["write"]["iops"])

    def randread_iops(self, device: str) -> float:
        job = self.fio(device, "--rw=randread", "--bs=4k", f"--size={self.seq_size}",
                       "--time_based", f"--runtime={self.runtime}")  # fmt: skip
        return float(job["read"]["iops"])

    @contextmanager
    def system(self, name: str) -> Iterator[Path]:
        if name == "nbdkit":
            with self.nbdkit() as sock:
                yield sock
        elif name == "carpool":
            with self.hast(None) as sock:
                yield sock
        else:
            with self.hast(name.removeprefix("carpool_")) as sock:
                yield sock

    def trial(self, name: str, results: dict[str, dict[str, list[float]]]) -> None:
        with self.system(name) as sock, self.attached(sock) as device:
            seq = self.seq_write_mbps(device)
            results["seq_write_mbps"].setdefault(name, []).append(seq)
            line = f"{name:<17} seq write {seq:7.1f} MB/s"
            if name in SMALL_IO_SYSTEMS:
                fsync = self.fsync_write_iops(device)
                read = self.randread_iops(device)
                results["fsync_write_iops"].setdefault(name, []).append(fsync)
                results["randread_iops"].setdefault(name, []).append(read)
                line += f"   4k write+fsync {fsync:7.0f} IOPS   4k randread {read:7.0f} IOPS"
            print(line, flush=True)

    def resync_ratio(self) -> float:
        """Bytes sent by a resync ÷ bytes of the extents dirtied while the peer was away."""
        with self.hast("memsync") as sock:
            secondary = [p for p in self.s.processes if p.running and "hastd" in str(p.log)]
            for process in secondary:
                process.kill()
            wait_until(lambda: self.status().get("status") == "degraded", 60, "degraded")
            script = "; ".join(
                f"h.pwrite(b'd' * 65536, {offset})" for offset in
                (0, 5 * MIB, 5 * MIB + 4096, 37 * MIB, 300 * MIB, 301 * MIB, 900 * MIB)
            ) + "; h.flush()"  # fmt: skip
            uri = f"nbd+unix:///{RESOURCE}?socket={sock}"
            self.p.run(["/usr/bin/python3", "-m", "nbd", "-u", uri, "-c", script])
            dirty = int(self.status()["dirty"])
            sent_before = int(self.status()["sync_bytes_sent"])
            self.start_hastd(self.s)
            self.hastctl(self.s, "role", "secondary", RESOURCE)
            wait_until(lambda: self.status().get("status") == "complete", 60, "complete")
            wait_until(lambda: self.status()["sync_bytes_sent"] - sent_before >= dirty
                       or False, 30, "the resync")  # fmt: skip
            time.sleep(1.0)
            sent = int(self.status()["sync_bytes_sent"]) - sent_before
            print(f"resync: {sent} bytes sent for {dirty} bytes of dirty extents")
            return sent / dirty


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="one trial, shorter workloads")
    parser.add_argument("--trials", type=int, help="trials per system (default 3)")
    parser.add_argument("--systems", default=",".join(SYSTEMS))
    arguments = parser.parse_args()
    if os.geteuid() != 0:
        print("hast_throughput: run as root (namespaces, loop devices)", file=sys.stderr)
        return 1
    for tool in ("fio", "nbdkit", "nbdfuse", "losetup"):
        if shutil.which(tool) is None:
            print(f"hast_throughput: {tool} is missing: run `make setup`", file=sys.stderr)
            return 1
    trials = arguments.trials or (1 if arguments.quick else 3)
    systems = [s for s in arguments.systems.split(",") if s]
    results: dict[str, dict[str, list[float]]] = {
        "seq_write_mbps": {}, "fsync_write_iops": {}, "randread_iops": {},
    }  # fmt: skip
    scratch = Path(tempfile.mkdtemp(prefix="carpool-hast-bench-", dir="/var/tmp"))
    try:
        with Lab() as lab:
            bench = Bench(lab, scratch, arguments.quick)
            for number in range(trials):
                print(f"-- trial {number + 1}", flush=True)
                for name in systems:
                    bench.trial(name, results)
            ratio = bench.resync_ratio() if "carpool" in systems else None
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    units = {"seq_write_mbps": ("MB/s", "higher"), "fsync_write_iops": ("IOPS", "higher"),
             "randread_iops": ("IOPS", "higher")}  # fmt: skip
    metrics: list[dict[str, Any]] = []
    print("\nmedians")
    for metric, by_system in results.items():
        if not by_system:
            continue
        values = {name: median(v) for name, v in by_system.items()}
        anchor = values.get("nbdkit")
        shown = "  ".join(
            f"{name} {value:g}" + (f" ({value / anchor:.2f}x)" if anchor and name != "nbdkit"
                                   else "")
            for name, value in values.items()
        )  # fmt: skip
        print(f"  {metric:<17} {shown}")
        unit, better = units[metric]
        metrics.append({"name": metric, "unit": unit, "better": better, "values": values,
                        "trials": trials})  # fmt: skip
    if ratio is not None:
        print(f"  resync_bytes_over_dirty carpool {ratio:.3f}")
        metrics.append({"name": "resync_bytes_over_dirty", "unit": "ratio", "better": "lower",
                        "values": {"carpool": round(ratio, 3)}, "trials": 1})  # fmt: skip
    print(json.dumps({"benchmark": "hast_throughput", "metrics": metrics}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
