from __future__ import annotations

import pytest

from carpool.errors import CarpoolError
from carpool.lab import faults
from carpool.lab.registry import check_prefix, new_prefix


def test_partition_rules_cover_both_directions() -> None:
    rules = faults.partition_rules(["a1", "a2"], ["b1"])
    assert 'iifname "a1" oifname "b1" drop' in rules
    assert 'iifname "b1" oifname "a2" drop' in rules
    assert len(rules) == 4


def test_drop_rules_share() -> None:
    assert faults.drop_rules(["p"], 100) == ['iifname "p" drop', 'oifname "p" drop']
    assert "numgen random mod 100 < 30" in faults.drop_rules(["p"], 30)[0]
    with pytest.raises(ValueError):
        faults.drop_rules(["p"], 0)


def test_prefixes() -> None:
    prefix = new_prefix()
    assert check_prefix(prefix) == prefix
    assert len(prefix) == 8
    for bad in ("", "ab", "Upper", "1abc", "toolongprefix1", "a-b"):
        with pytest.raises(CarpoolError):
            check_prefix(bad)
