"""Property tests of the retention policy: what it must never delete, whatever the history."""

from __future__ import annotations

import math

from hypothesis import given, settings
from hypothesis import strategies as st

from torpor.retention import Candidate, RetentionPolicy, to_delete

histories = st.lists(
    st.tuples(st.integers(0, 10_000), st.booleans()), min_size=0, max_size=30
).map(lambda items: [Candidate(f"CKP-1_{i}", float(t), complete, step=i) for i, (t, complete) in enumerate(items)])
policies = st.one_of(
    st.builds(RetentionPolicy, keep_max=st.integers(0, 8)),
    st.builds(RetentionPolicy, keep_max=st.just(0), keep_per_n_minutes=st.sampled_from([0.5, 1, 7, 60])),
)


def newest(items: list[Candidate]) -> Candidate | None:
    complete = [c for c in items if c.complete]
    return max(complete, key=lambda c: (c.time, c.step, c.name)) if complete else None


@settings(max_examples=300, deadline=None)
@given(histories, policies, st.data())
def test_never_deletes_what_must_stay(items: list[Candidate], policy: RetentionPolicy, data: st.DataObject) -> None:
    protected = data.draw(st.sets(st.sampled_from([c.name for c in items]))) if items else set()
    doomed = to_delete(items, policy, protected)
    assert len(doomed) == len(set(doomed)) and set(doomed) <= {c.name for c in items}
    assert not set(doomed) & protected
    best = newest(items)
    if best is None:
        assert doomed == []  # nothing proves a leftover stale
        return
    assert best.name not in doomed
    for c in items:
        if not c.complete and (c.time, c.step, c.name) > (best.time, best.step, best.name):
            assert c.name not in doomed  # may still be being written


@settings(max_examples=300, deadline=None)
@given(histories, st.integers(1, 8))
def test_keep_max_keeps_exactly_the_newest(items: list[Candidate], keep: int) -> None:
    doomed = set(to_delete(items, RetentionPolicy(keep_max=keep)))
    complete = sorted((c for c in items if c.complete), key=lambda c: (c.time, c.step, c.name))
    kept = [c.name for c in complete if c.name not in doomed]
    assert kept == [c.name for c in complete[-keep:]]
    best = newest(items)
    for c in items:
        if not c.complete and best is not None:
            older = (c.time, c.step, c.name) < (best.time, best.step, best.name) and c.step < best.step
            # Leftovers of interrupted saves go once superseded in time and in step; a higher
            # step may be a save other ranks are still writing.
            assert (c.name in doomed) == older


@settings(max_examples=300, deadline=None)
@given(histories, st.sampled_from([0.5, 1, 7, 60]))
def test_windows_keep_the_newest_of_each(items: list[Candidate], minutes: float) -> None:
    doomed = set(to_delete(items, RetentionPolicy(keep_max=0, keep_per_n_minutes=minutes)))
    windows: dict[int, list[Candidate]] = {}
    for c in items:
        if c.complete:
            windows.setdefault(math.floor(c.time / (minutes * 60)), []).append(c)
    for members in windows.values():
        members.sort(key=lambda c: (c.time, c.step, c.name))
        assert members[-1].name not in doomed  # the newest, not the oldest as in the seed
        assert all(c.name in doomed for c in members[:-1])


@settings(max_examples=200, deadline=None)
@given(histories, policies)
def test_applying_twice_deletes_nothing_more(items: list[Candidate], policy: RetentionPolicy) -> None:
    doomed = set(to_delete(items, policy))
    survivors = [c for c in items if c.name not in doomed]
    assert to_delete(survivors, policy) == []


def test_counts_checkpoints_of_earlier_runs() -> None:
    earlier = [Candidate(f"OLD-1_{i}", float(i), True, i) for i in range(4)]
    current = [Candidate(f"CKP-1_{i}", 100.0 + i, True, i) for i in range(3)]
    assert to_delete(earlier + current, RetentionPolicy(keep_max=3)) == [c.name for c in earlier]


def test_a_fast_ranks_shard_of_a_later_step_is_not_a_leftover() -> None:
    # Rank 1 finished step 18 (t=10.5) before rank 0 completed step 16 (t=10.6): by time
    # alone step 18 looks older than the newest complete checkpoint, but it is in flight.
    items = [
        Candidate("CKP-1_12", 9.0, True, 12),
        Candidate("CKP-1_16", 10.6, True, 16),
        Candidate("CKP-1_18", 10.5, False, 18),
        Candidate("CKP-1_8", 8.0, False, 8),  # a true leftover: older and at a lower step
    ]
    assert to_delete(items, RetentionPolicy(keep_max=2)) == ["CKP-1_8"]
