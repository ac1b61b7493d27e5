"""peering.blockers: kopf's rule for when a replica pauses, applied to the records kopf writes."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from torpor_operator.peering import blockers

NOW = datetime(2026, 1, 1, 12, 0, 0, tzinfo=UTC)


def record(priority: int | None = None, lifetime: int | None = 60, seen_ago: float | None = 0.0) -> dict[str, Any]:
    """A record as kopf's touch() writes it; None leaves the field out."""
    out: dict[str, Any] = {}
    if priority is not None:
        out["priority"] = priority
    if lifetime is not None:
        out["lifetime"] = lifetime
    if seen_ago is not None:
        out["lastseen"] = (NOW - timedelta(seconds=seen_ago)).isoformat()
    return out


def test_alone_or_highest_acts() -> None:
    assert blockers({}, "me", 5, NOW) == []
    assert blockers({"me": record(5)}, "me", 5, NOW) == []  # its own record never blocks
    assert blockers({"me": record(5), "low": record(4)}, "me", 5, NOW) == []


def test_a_higher_or_equal_live_priority_blocks() -> None:
    records = {"me": record(5), "high": record(6), "same": record(5), "low": record(-3)}
    assert blockers(records, "me", 5, NOW) == ["high", "same"]  # kopf pauses both sides of a tie


def test_a_record_past_its_lifetime_is_dead() -> None:
    assert blockers({"high": record(6, lifetime=6, seen_ago=6.0)}, "me", 5, NOW) == []
    assert blockers({"high": record(6, lifetime=6, seen_ago=5.9)}, "me", 5, NOW) == ["high"]


def test_missing_fields_read_as_kopf_reads_them() -> None:
    # no priority: 0; no lifetime: 60 s; no lastseen: now
    assert blockers({"old": record(None)}, "me", 0, NOW) == ["old"]
    assert blockers({"old": record(None)}, "me", 1, NOW) == []
    assert blockers({"old": record(9, lifetime=None, seen_ago=59)}, "me", 1, NOW) == ["old"]
    assert blockers({"old": record(9, lifetime=None, seen_ago=60)}, "me", 1, NOW) == []
    assert blockers({"new": record(9, seen_ago=None)}, "me", 1, NOW) == ["new"]


@pytest.mark.parametrize("bad", [{"priority": "high"}, {"lastseen": "yesterday"}, {"lifetime": "long"},
                                 {"priority": 9, "lastseen": "2026-01-01T12:00:00"}])  # naive time
def test_an_unreadable_record_blocks_rather_than_two_replicas_act(bad: dict[str, Any]) -> None:
    assert blockers({"odd": bad}, "me", 1, NOW) == ["odd"]


def test_a_record_that_is_no_mapping_is_ignored() -> None:
    # nothing kopf writes (it removes a record with a null merge patch), but no reason to pause
    assert blockers({"gone": None, "x": "y"}, "me", 1, NOW) == []
