"""Retention: keep-last-N united with grandfather-father-son buckets."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from carpool.errors import CarpoolError
from carpool.replicate.retention import RetentionPolicy, plan_retention

NOW = datetime(2026, 4, 9, 15, 30, tzinfo=UTC)


def every(step: timedelta, count: int, end: datetime = NOW) -> list[tuple[str, datetime | None]]:
    times = [end - step * i for i in range(count)][::-1]
    return [(f"s{i:04d}", t) for i, t in enumerate(times)]


def test_keep_last_five_like_the_seed() -> None:
    snaps = every(timedelta(minutes=15), 12)
    decision = plan_retention(snaps, NOW, RetentionPolicy(keep_last=5))
    assert decision.keep == {name for name, _ in snaps[-5:]}
    assert decision.prune == {name for name, _ in snaps[:-5]}
    assert decision.reasons[snaps[-1][0]][0] == "newest"


def test_newest_kept_even_with_keep_last_zero() -> None:
    snaps = every(timedelta(hours=1), 3)
    decision = plan_retention(snaps, NOW, RetentionPolicy(keep_last=0))
    assert decision.keep == {snaps[-1][0]}


def test_hourly_keeps_first_of_each_hour() -> None:
    snaps = every(timedelta(minutes=15), 4 * 6)  # 6 hours, every 15 minutes, last at 15:30
    decision = plan_retention(snaps, NOW, RetentionPolicy(keep_last=1, hourly=3))
    kept_times = sorted(t for name, t in snaps if name in decision.keep and t is not None)
    assert kept_times == [
        datetime(2026, 4, 9, 13, 0, tzinfo=UTC),
        datetime(2026, 4, 9, 14, 0, tzinfo=UTC),
        datetime(2026, 4, 9, 15, 0, tzinfo=UTC),
        datetime(2026, 4, 9, 15, 30, tzinfo=UTC),  # newest
    ]


def test_daily_weekly_monthly_yearly() -> None:
    snaps = every(timedelta(days=1), 800, end=datetime(2026, 4, 9, 0, 0, tzinfo=UTC))
    policy = RetentionPolicy(keep_last=0, daily=7, weekly=4, monthly=12, yearly=3)
    decision = plan_retention(snaps, NOW, policy)
    kept = sorted(t for name, t in snaps if name in decision.keep and t is not None)
    assert datetime(2026, 4, 3, tzinfo=UTC) in kept  # daily (last 7 days: 3..9 April)
    assert datetime(2026, 4, 2, tzinfo=UTC) not in kept
    assert datetime(2026, 3, 16, tzinfo=UTC) in kept  # Monday: first of its ISO week
    assert datetime(2025, 5, 1, tzinfo=UTC) in kept  # first of month, within 12 months
    assert datetime(2025, 4, 1, tzinfo=UTC) not in kept  # 13 months back
    assert datetime(2024, 1, 31, tzinfo=UTC) in kept  # oldest snapshot of 2024: yearly
    assert len(kept) == len(set(kept))
    assert len(decision.keep) < 40


def test_protected_unknown_and_future_are_kept() -> None:
    snaps: list[tuple[str, datetime | None]] = [
        ("old", NOW - timedelta(days=30)),
        ("base", NOW - timedelta(days=20)),
        ("mystery", None),
        ("future", NOW + timedelta(days=1)),
        ("new", NOW),
    ]
    decision = plan_retention(snaps, NOW, RetentionPolicy(keep_last=1), protected={"base"})
    assert decision.prune == {"old"}
    assert decision.reasons["base"] == ("protected",)
    assert decision.reasons["mystery"] == ("time unknown",)
    assert decision.reasons["future"] == ("in the future",)


def test_naive_times_are_utc() -> None:
    snaps: list[tuple[str, datetime | None]] = [
        ("a", datetime(2026, 4, 9, 14, 0)),
        ("b", datetime(2026, 4, 9, 15, 0)),
    ]
    decision = plan_retention(snaps, datetime(2026, 4, 9, 15, 30), RetentionPolicy(0, hourly=2))
    assert decision.keep == {"a", "b"}


def test_empty_and_errors() -> None:
    assert plan_retention([], NOW, RetentionPolicy()).keep == frozenset()
    with pytest.raises(CarpoolError, match="same snapshot twice: a"):
        plan_retention([("a", NOW), ("a", NOW)], NOW, RetentionPolicy())
    with pytest.raises(CarpoolError, match="daily"):
        RetentionPolicy(daily=-1)


# --------------------------------------------------------------------------- properties

policies = st.builds(
    RetentionPolicy,
    keep_last=st.integers(0, 8),
    hourly=st.integers(0, 30),
    daily=st.integers(0, 10),
    weekly=st.integers(0, 6),
    monthly=st.integers(0, 14),
    yearly=st.integers(0, 3),
)


@st.composite
def histories(draw: st.DrawFn) -> tuple[list[tuple[str, datetime | None]], datetime]:
    gaps = draw(st.lists(st.integers(1, 60 * 24 * 20), max_size=40))
    start = datetime(2025, 1, 1, tzinfo=UTC)
    times: list[datetime | None] = []
    current = start
    for gap in gaps:
        current += timedelta(minutes=gap)
        times.append(current if draw(st.integers(0, 15)) else None)
    now = current + timedelta(minutes=draw(st.integers(0, 60 * 24 * 40)))
    return [(f"s{i:03d}", t) for i, t in enumerate(times)], now


@given(histories(), policies, st.data())
@settings(max_examples=300)
def test_retention_properties(
    history: tuple[list[tuple[str, datetime | None]], datetime],
    policy: RetentionPolicy,
    data: st.DataObject,
) -> None:
    snaps, now = history
    names = [n for n, _ in snaps]
    protected = set(data.draw(st.lists(st.sampled_from(names), max_size=4))) if names else set()
    decision = plan_retention(snaps, now, policy, protected)
    # keep and prune partition the input
    assert decision.keep | decision.prune == set(names)
    assert not decision.keep & decision.prune
    # the newest is always kept, protected names are never pruned
    if names:
        assert names[-1] in decision.keep
    assert not decision.prune & protected
    # at least keep_last of the newest are kept
    newest = names[max(0, len(names) - policy.keep_last) :] if policy.keep_last else []
    assert set(newest) <= decision.keep
    # idempotent: applying the prune and planning again prunes nothing more
    survivors = [(n, t) for n, t in snaps if n in decision.keep]
    again = plan_retention(survivors, now, policy, protected)
    assert again.prune == frozenset()
    # each bucket rule keeps at most `count` snapshots
    for period in ("hourly", "daily", "weekly", "monthly", "yearly"):
        count = sum(1 for why in decision.reasons.values() if period in why)
        assert count <= getattr(policy, period)


@given(histories(), policies)
def test_retention_is_monotone_in_counts(
    history: tuple[list[tuple[str, datetime | None]], datetime], policy: RetentionPolicy
) -> None:
    snaps, now = history
    bigger = RetentionPolicy(
        policy.keep_last + 1,
        policy.hourly + 1,
        policy.daily + 1,
        policy.weekly + 1,
        policy.monthly + 1,
        policy.yearly + 1,
    )
    assert plan_retention(snaps, now, policy).keep <= plan_retention(snaps, now, bigger).keep
