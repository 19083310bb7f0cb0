"""Which snapshots to keep: keep-last-N plus grandfather-father-son.

Pure: a function of (snapshot names and times, ``now``, policy). The rules
are the seed script's "keep last 5" (``keep_last``) and sanoid/btrbk-style
time buckets (``hourly``, ``daily``, ``weekly``, ``monthly``, ``yearly``):
for each of the last N periods counting back from ``now``'s own period, the
*first* snapshot of that period is kept (like btrbk, so a kept snapshot stays
kept as newer ones arrive). What each rule keeps is united; everything else
is pruned, except that

* the newest snapshot is always kept,
* protected names (the incremental base, held snapshots, ...) are kept,
* a snapshot whose time is unknown, or later than ``now``, is kept.

Applying the result and planning again with the same ``now`` prunes nothing
more.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from carpool.errors import CarpoolError

__all__ = ["PERIODS", "RetentionDecision", "RetentionPolicy", "plan_retention"]

PERIODS = ("hourly", "daily", "weekly", "monthly", "yearly")


@dataclass(frozen=True)
class RetentionPolicy:
    """How many snapshots to keep. 0 for a period turns that rule off."""

    keep_last: int = 5
    hourly: int = 0
    daily: int = 0
    weekly: int = 0
    monthly: int = 0
    yearly: int = 0

    def __post_init__(self) -> None:
        for field in ("keep_last", *PERIODS):
            value = getattr(self, field)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise CarpoolError(
                    f"retention {field} = {value!r} is not usable: give a whole number >= 0"
                )


@dataclass(frozen=True)
class RetentionDecision:
    """The outcome: ``keep`` and ``prune`` partition the names given, ``reasons`` says why kept."""

    keep: frozenset[str]
    prune: frozenset[str]
    reasons: Mapping[str, tuple[str, ...]]


def plan_retention(
    snapshots: Sequence[tuple[str, datetime | None]],
    now: datetime,
    policy: RetentionPolicy,
    protected: Collection[str] = (),
) -> RetentionDecision:
    """Split ``snapshots`` (name, time), oldest first, into keep and prune sets.

    Ordering is the list's (snapshots of one dataset in creation order);
    times only place snapshots in periods. Naive times are taken as UTC.
    """
    names = [name for name, _ in snapshots]
    if len(set(names)) != len(names):
        dupes = sorted({n for n in names if names.count(n) > 1})
        raise CarpoolError(f"retention got the same snapshot twice: {', '.join(dupes)}")
    now = _aware(now)
    reasons: dict[str, list[str]] = {name: [] for name in names}

    if names:
        reasons[names[-1]].append("newest")
    for name in names[max(0, len(names) - policy.keep_last) :] if policy.keep_last else []:
        reasons[name].append(f"last {policy.keep_last}")
    protected_set = set(protected)
    for name, when in snapshots:
        if name in protected_set:
            reasons[name].append("protected")
        if when is None:
            reasons[name].append("time unknown")
        elif _aware(when) > now:
            reasons[name].append("in the future")

    for period in PERIODS:
        count: int = getattr(policy, period)
        if not count:
            continue
        current = _bucket(period, now)
        first_in_bucket: dict[int, str] = {}
        for name, when in snapshots:
            if when is None:
                continue
            bucket = _bucket(period, _aware(when))
            if current - count < bucket <= current and bucket not in first_in_bucket:
                first_in_bucket[bucket] = name
        for name in first_in_bucket.values():
            reasons[name].append(period)

    keep = frozenset(name for name, why in reasons.items() if why)
    return RetentionDecision(
        keep=keep,
        prune=frozenset(names) - keep,
        reasons={name: tuple(why) for name, why in reasons.items() if why},
    )


def _aware(when: datetime) -> datetime:
    return when if when.tzinfo is not None else when.replace(tzinfo=UTC)


_EPOCH_MONDAY = datetime(1970, 1, 5, tzinfo=UTC)


def _bucket(period: str, when: datetime) -> int:
    """A period number that grows by one per hour/day/ISO week/month/year (UTC)."""
    when = when.astimezone(UTC)
    if period == "hourly":
        return (when - _EPOCH_MONDAY) // timedelta(hours=1)
    if period == "daily":
        return (when - _EPOCH_MONDAY) // timedelta(days=1)
    if period == "weekly":
        return (when - _EPOCH_MONDAY) // timedelta(weeks=1)
    if period == "monthly":
        return when.year * 12 + when.month - 1
    return when.year
