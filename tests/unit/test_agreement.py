"""The per-step agreement as data: layout, decisions and one epoch's feed, without torch.

A second rank is stood in for by the vector it would send: ``reduce`` returns the
element-wise MAX of ours and its, as the all-reduce would. The real collective is tested
with gloo ranks in tests/runtime/test_runtime_collectives.py.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Sequence

import pytest

from torpor._agreement import UNCHECKED, EpochFeed, Fact, Lookahead, collective_due, decode, encode, merge


def max_with(other: Sequence[int]):
    calls: list[list[int]] = []

    def reduce(vector: Sequence[int]) -> list[int]:
        calls.append(list(vector))
        return [max(a, b) for a, b in zip(vector, other, strict=True)]

    return reduce, calls


def test_the_vector_has_one_slot_per_fact_and_unknown_facts_are_zero() -> None:
    assert encode({}) == [0] * len(Fact)
    assert encode({Fact.STOP: 143, Fact.SAVE_FAILED: 2}) == [143, 0, 0, 2, 0, 0]


def test_max_over_ranks_reads_as_the_jobs_decisions() -> None:
    ours = encode({Fact.STOP: 75, Fact.SHORTEST: -7})
    theirs = encode({Fact.STOP: 143, Fact.EXHAUSTED: 1, Fact.SAVE_DUE: 1, Fact.SAVE_FAILED: 2, Fact.SHORTEST: -4})
    agreed = decode([max(a, b) for a, b in zip(ours, theirs, strict=True)])
    assert agreed.checked and agreed.stop == 143 and agreed.exhausted and agreed.save_due
    assert agreed.save_failed_rank == 1  # rank + 1 was sent
    assert agreed.length == 4  # the shortest rank's


def test_one_unknown_length_makes_the_epochs_length_unknown() -> None:
    assert decode(encode({Fact.SHORTEST: -3, Fact.LENGTH_UNKNOWN: 1})).length is None
    assert decode(encode({})).length == 0  # only meaningful at an epoch start, where SHORTEST is sent


def test_merge_keeps_the_largest_value_of_each_fact() -> None:
    assert merge({Fact.STOP: 75}, {Fact.STOP: 143, Fact.SAVE_DUE: 1}, {}) == {Fact.STOP: 143, Fact.SAVE_DUE: 1}


@pytest.mark.parametrize(("step", "every", "length_agreed", "due"), [
    (1, 1, True, True), (1, 3, True, False), (3, 3, True, True), (1, 3, False, True), (2, 3, False, True)])
def test_unknown_lengths_need_the_collective_every_step(step: int, every: int, length_agreed: bool, due: bool) -> None:
    assert collective_due(step, every, length_agreed) is due


def run_epoch(feed: EpochFeed, first_step: int = 1) -> list[int]:
    """What ``Loop.batches`` + ``step_end`` do with the feed: the batches trained."""
    trained, step, in_epoch = [], first_step - 1, 0
    feed.begin(0)
    while True:
        more, batch = feed.take()
        if not more:
            return trained
        step += 1
        in_epoch += 1
        trained.append(batch)
        feed.boundary(step, in_epoch)


def test_a_longer_rank_stops_after_the_shortest_ranks_last_batch_when_lengths_are_unknown() -> None:
    # The other rank has 2 batches: it sends EXHAUSTED at the boundary after its 2nd step.
    seen: list[int] = []
    vectors = iter([encode({Fact.LENGTH_UNKNOWN: 1}), encode({}), encode({Fact.EXHAUSTED: 1})])

    def reduce(vector: Sequence[int]) -> list[int]:
        seen.append(vector[Fact.EXHAUSTED])
        return [max(a, b) for a, b in zip(vector, next(vectors), strict=True)]

    feed = EpochFeed(iter(range(5)), length=None, every=4, distributed=True, reduce=reduce, facts=dict)
    assert run_epoch(feed) == [0, 1]
    assert seen == [0, 0, 0]  # ours had a next batch each time: the decision was the other rank's


def test_known_lengths_agree_on_the_shortest_and_skip_the_collective_between_checks() -> None:
    reduce, calls = max_with(encode({Fact.SHORTEST: -5}))
    feed = EpochFeed(iter(range(8)), length=8, every=3, distributed=True, reduce=reduce, facts=dict)
    assert run_epoch(feed) == [0, 1, 2, 3, 4]
    assert feed.length == 5
    assert len(calls) == 2  # the epoch start and step 3's boundary, not 5


def test_a_rank_without_any_batch_ends_the_epoch_before_the_first_step_everywhere() -> None:
    reduce, _ = max_with(encode({Fact.EXHAUSTED: 1, Fact.LENGTH_UNKNOWN: 1}))
    feed = EpochFeed(iter(range(3)), length=None, every=1, distributed=True, reduce=reduce, facts=dict)
    assert run_epoch(feed) == []


def test_a_loader_shorter_than_its_len_between_checks_is_an_error_naming_both_counts() -> None:
    reduce, _ = max_with(encode({Fact.SHORTEST: -4}))
    feed = EpochFeed(iter(range(2)), length=4, every=10, distributed=True, reduce=reduce, facts=dict)
    with pytest.raises(RuntimeError, match="ended after 2 batches, before the 4"):
        run_epoch(feed)


def test_between_checks_nothing_is_agreed_and_callbacks_are_not_asked() -> None:
    asked: list[int] = []
    reduce, _ = max_with(encode({Fact.SHORTEST: -9}))
    feed = EpochFeed(iter(range(9)), length=9, every=4, distributed=True, reduce=reduce,
                     facts=lambda: asked.append(1) or {Fact.STOP: 143})
    feed.begin(0)
    feed.take()
    assert feed.boundary(1, 1) is UNCHECKED and asked == []
    feed.take()
    assert feed.boundary(2, 2) is UNCHECKED
    assert feed.boundary(2, 2) is UNCHECKED  # once per step: step_end, then the iterator
    for step in (3, 4):
        feed.take()
        agreed = feed.boundary(step, step)
    assert agreed.checked and agreed.stop == 143 and asked == [1]


def test_one_process_agrees_with_itself_every_step_without_a_collective() -> None:
    def no_collective(vector: Sequence[int]) -> list[int]:
        raise AssertionError("no collective in one process")

    feed = EpochFeed(iter("abc"), length=None, every=5, distributed=False, reduce=no_collective,
                     facts=lambda: {Fact.SAVE_DUE: 1})
    feed.begin(0)
    feed.take()
    assert feed.boundary(1, 1).save_due
    assert run_epoch(EpochFeed(iter("abc"), length=None, every=5, distributed=False, reduce=no_collective,
                               facts=dict)) == ["a", "b", "c"]


def test_the_agreement_module_is_torch_free() -> None:
    code = "import sys, torpor._agreement\nassert 'torch' not in sys.modules\n"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


def test_a_lookahead_that_already_holds_the_first_batch_is_used_as_it_is() -> None:
    # How a resume fetches batch k+1 before restoring the generators saved after that fetch.
    ahead = Lookahead(iter(range(3)))
    ahead.fetch()
    feed = EpochFeed(ahead, length=None, every=1, distributed=False, reduce=list, facts=dict)
    assert run_epoch(feed) == [0, 1, 2]


class Positioned:
    """An iterator that counts what it produced and records whether it ran out (a loader's position)."""

    def __init__(self, n: int) -> None:
        self.n, self.produced, self.finished = n, 0, False

    def __iter__(self) -> Positioned:
        return self

    def __next__(self) -> int:
        if self.produced == self.n:
            self.finished = True
            raise StopIteration
        self.produced += 1
        return self.produced - 1


@pytest.mark.parametrize(("length", "shorter"), [(4, None), (None, None), (4, 3), (None, 3)],
                         ids=["its-len", "its-end", "shorter-rank-len", "shorter-rank-end"])
def test_run_out_reads_the_iterator_to_its_end_once_the_epoch_ends_before_the_hooks_save(
        length: int | None, shorter: int | None) -> None:
    # A loader that keeps its own position must record a finished epoch at the boundary that
    # ends it, however it ended: its own len, its own end, or a shorter rank's.
    it = Positioned(4)
    if shorter is None:
        feed = EpochFeed(it, length=length, every=1, distributed=False, reduce=list, facts=dict, run_out=True)
    else:  # the other rank: 3 batches, its len known (SHORTEST) or its end sent at its last boundary
        theirs = iter([encode({Fact.SHORTEST: -shorter} if length else {Fact.LENGTH_UNKNOWN: 1}),
                       *[encode({Fact.EXHAUSTED: int(not length and s == shorter)}) for s in range(1, shorter + 1)]])

        def reduce(vector: Sequence[int]) -> list[int]:
            return [max(a, b) for a, b in zip(vector, next(theirs), strict=True)]

        feed = EpochFeed(it, length=length, every=1, distributed=True, reduce=reduce, facts=dict, run_out=True)
    feed.begin(0)
    steps = shorter or 4
    for step in range(1, steps + 1):
        assert feed.take()[0]
        feed.boundary(step, step)
        assert it.finished is (step == steps) and feed.ended is (step == steps)
    assert feed.take() == (False, None)
    assert it.produced == 4 and feed.before_held is None  # a shorter rank's surplus was read, not trained


def test_without_run_out_an_epoch_of_known_length_never_asks_past_it() -> None:
    it = Positioned(4)
    assert run_epoch(EpochFeed(it, length=4, every=1, distributed=False, reduce=list, facts=dict)) == [0, 1, 2, 3]
    assert not it.finished


def test_the_snapshot_is_taken_before_each_read_ahead_and_held_with_the_batch() -> None:
    # What a save at a boundary records: the position before the batch read ahead, not after.
    it = Positioned(3)
    feed = EpochFeed(it, length=3, every=1, distributed=False, reduce=list, facts=dict,
                     snapshot=lambda: it.produced)
    feed.begin(0)
    assert feed.before_held == 0
    feed.take()
    feed.boundary(1, 1)
    assert it.produced == 2 and feed.before_held == 1
    feed.take()
    feed.boundary(2, 2)
    assert feed.before_held == 2
    feed.take()
    feed.boundary(3, 3)  # the last step: nothing read ahead, nothing held
    assert feed.before_held is None
