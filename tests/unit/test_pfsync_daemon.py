"""pfsyncd's shell without the kernel: status, metrics, demotion bookkeeping."""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path

from prometheus_client import CollectorRegistry, generate_latest

from carpool.pfsync.config import parse_config
from carpool.pfsync.daemon import PfsyncDaemon, _StatusCollector
from carpool.pfsync.machine import SyncMachine, SyncSettings

RC_CONF = """\
pfsync_enable="YES"
pfsync_syncdev="em1"
pfsync_syncpeer="192.168.255.2"
pfsync_key="sixteen bytes or more"
"""


def daemon(run_dir: Path) -> PfsyncDaemon:
    shell = PfsyncDaemon.__new__(PfsyncDaemon)
    shell.config = parse_config(RC_CONF, "rc.conf")
    shell.config_path = "rc.conf"
    shell.run_dir = run_dir
    shell.stats = Counter({"badauth": 2, "opackets": 5})
    shell.started = time.time() - 10
    shell.machine = SyncMachine(SyncSettings(), 0x1234, time.monotonic())
    return shell


def test_status_merges_machine_and_socket_counters(tmp_path: Path) -> None:
    status = daemon(tmp_path).status()
    assert status["syncdev"] == "em1" and status["syncpeer"] == "192.168.255.2"
    assert status["port"] == 8240 and status["states"] == 0 and not status["syncok"]
    assert status["counters"]["badauth"] == 2 and status["counters"]["opackets"] == 5


def test_metrics_expose_states_syncok_and_counters(tmp_path: Path) -> None:
    registry = CollectorRegistry()
    registry.register(_StatusCollector(daemon(tmp_path)))
    text = generate_latest(registry).decode()
    assert "carpool_pfsync_states 0.0" in text
    assert "carpool_pfsync_syncok 0.0" in text
    assert 'carpool_pfsync_total{counter="badauth"} 2.0' in text


def test_demotion_record_follows_carpds_pid(tmp_path: Path) -> None:
    shell = daemon(tmp_path)
    assert shell.applied_demotion(100) == 0
    shell.record_demotion(240, 100)
    assert shell.applied_demotion(100) == 240
    assert shell.applied_demotion(101) == 0  # carpd restarted: its demotion is gone
    shell.record_demotion(0, 100)
    assert not shell.demotion_file.exists()
