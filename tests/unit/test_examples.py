"""The files shipped in examples/ stay valid for the daemons that read them."""

from __future__ import annotations

from pathlib import Path

from carpool.carp.config import load_config
from carpool.devd.devdconf import load_devd_config
from carpool.devd.ifstatedconf import load_ifstated_config

EXAMPLES = Path(__file__).parents[2] / "examples"


def test_carp_examples() -> None:
    node1 = load_config(str(EXAMPLES / "node1.rc.conf"))
    node2 = load_config(str(EXAMPLES / "node2.rc.conf"))
    assert [(v.vhid, v.advskew) for v in node1.vhids] == [(1, 0)]
    assert [(v.vhid, v.advskew) for v in node2.vhids] == [(1, 100)]
    assert node1.preempt and node2.preempt


def test_devd_example_matches_carp_in_both_forms() -> None:
    config = load_devd_config([str(EXAMPLES / "carp-hast.conf")])
    legacy = {"system": "IFNET", "subsystem": "carp0", "type": "LINK_UP"}
    (rule,) = config.matching_rules(legacy)
    assert rule.actions == ("/usr/local/sbin/carp-hast-switch master",)


def test_ifstated_example() -> None:
    config = load_ifstated_config(str(EXAMPLES / "ifstated-splitbrain.conf"))
    assert config.init_state == "synced"
    assert set(config.states) == {"synced", "isolated"}
