"""Scenario B of the guide, end to end: two relayd load balancers with CARP and
pfsyncd, three web servers; the master dies under a client's long-lived connections
and request loop."""

from __future__ import annotations

import shutil

import pytest

from carpool.lab import Lab
from carpool.scenarios.loadbalancer import LoadBalancerScenario

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs openssl")

#: CARP's own bound (3 x advbase + advskew/256 = 3.4 s) plus room for a busy machine.
OUTAGE_BOUND_S = 15.0


def test_long_lived_connections_survive_and_no_request_is_answered_wrongly() -> None:
    with Lab() as lab:
        scenario = LoadBalancerScenario(lab)
        try:
            scenario.bring_up()
            scenario.start_client(long_lived=20)
            before = scenario.wait_for_traffic(keep_each=5, loop=20)
            scenario.crash("lb1")
            scenario.wait_for_traffic(keep_each=10, loop=20)
            final = scenario.stop_client()
        finally:
            scenario.stop_client()
        assert final["keep_errors"] == [] and final["wrong_answers"] == []
        # every long-lived connection carried on through lb2, with its own answers
        assert all(after >= first + 10 for after, first
                   in zip(final["keep_answers"], before["keep_answers"], strict=True))  # fmt: skip
        assert final["loop_longest_gap_s"] < OUTAGE_BOUND_S
        assert final["loop_answers"] >= before["loop_answers"] + 20
