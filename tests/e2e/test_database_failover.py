"""Scenario A of the guide, end to end: PostgreSQL on HAST behind CARP, the primary
crashes, the backup takes over, the crashed node returns, a planned failback.
No transaction the client saw committed may be missing at any point."""

from __future__ import annotations

import json

import pytest

from carpool.lab import Lab
from carpool.lab.services import BIN
from carpool.scenarios.database import DatabaseScenario, tools_missing

pytestmark = pytest.mark.skipif(bool(tools_missing()),
                                reason=f"needs {', '.join(tools_missing())}: run `make setup`")


def test_crash_failover_resync_and_failback_lose_no_committed_transaction() -> None:
    with Lab() as lab:
        scenario = DatabaseScenario(lab)
        try:
            scenario.bring_up()
            db1 = scenario.db["db1"]
            view = json.loads(db1.run([str(BIN / "carpool"), "status", "-j", "--run-dir",
                                       str(db1.dir)]).stdout)  # fmt: skip
            assert set(view) == {"carpd", "hastd", "devd"}
            assert view["hastd"][0]["role"] == "primary"
            vhids = view["carpd"]["interfaces"]["em0"]["vhids"]
            assert vhids[0]["state"] == "MASTER"
            scenario.start_client()
            scenario.wait_for_commits(40)
            scenario.crash("db1")
            scenario.wait_for_commits(40)
            after_crash = scenario.verify()
            assert after_crash.committed >= 80 and after_crash.ok, after_crash.missing[:10]
            scenario.recover("db1")
            scenario.failback("db1")
            scenario.wait_for_commits(40)
            summary = scenario.stop_client()
            after_failback = scenario.verify()
            assert after_failback.ok, after_failback.missing[:10]
            assert after_failback.committed == summary["committed"] > after_crash.committed
            assert scenario.hast(scenario.db["db1"])["role"] == "primary"
            assert scenario.hast(scenario.db["db2"])["role"] == "secondary"
        finally:
            scenario.stop_client()
