"""The data position on another world size (``torpor._resharding``), without processes.

The property the runtime tests check on real ranks, over many shapes: a ``DistributedSampler``
epoch trained for ``k`` steps on ``N`` ranks, then continued on ``M`` ranks from the recorded
position (and again on ``M2``), trains no sample twice and leaves out less than one global batch.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from torpor._resharding import (
    START,
    Continuation,
    EpochPosition,
    continuation,
    position_at,
    remainder_batches,
)


def _loader(samples: int, rank: int, world: int, batch: int, *, drop_last: bool = False,
            sampler_drop_last: bool = False) -> DataLoader:
    data = TensorDataset(torch.arange(samples))
    sampler = DistributedSampler(data, num_replicas=world, rank=rank, shuffle=True, seed=3,
                                 drop_last=sampler_drop_last)
    sampler.set_epoch(2)
    return DataLoader(data, batch_size=batch, sampler=sampler, drop_last=drop_last)


def _batches(loader: DataLoader, consumed: int) -> list[list[int]]:
    """The batches a pass trains: the loader's own from the epoch's start, else the remainder."""
    if consumed == 0:
        return [list(b) for b in loader.batch_sampler]  # type: ignore[union-attr]
    return remainder_batches(loader, consumed)


@settings(max_examples=120, deadline=None)
@given(samples=st.integers(10, 90), batch=st.integers(1, 6), worlds=st.lists(st.integers(1, 5), min_size=2, max_size=4),
       stops=st.lists(st.integers(1, 8), min_size=3, max_size=3), drop_last=st.booleans(),
       sampler_drop_last=st.booleans())
def test_an_epoch_resized_any_number_of_times_trains_no_sample_twice(samples: int, batch: int, worlds: list[int],
                                                                     stops: list[int], drop_last: bool,
                                                                     sampler_drop_last: bool) -> None:
    # Each pass but the last is stopped mid-epoch after some steps, and saves; the next pass, on
    # another world size, continues from the saved position; the last runs the epoch out.
    trained: list[int] = []
    start = START
    step_in_epoch = 0
    for i, world in enumerate(worlds):
        loaders = [_loader(samples, r, world, batch, drop_last=drop_last, sampler_drop_last=sampler_drop_last)
                   for r in range(world)]
        per_rank = [_batches(loader, start.start_samples) for loader in loaders]
        assert len({len(b) for b in per_rank}) == 1, "every rank trains the same number of steps"
        length = len(per_rank[0])
        last = i == len(worlds) - 1
        if not last and length < 2:
            return  # no stop in the middle of this pass: nothing to resize
        steps = length if last else min(stops[i], length - 1)
        trained += [s for batches in per_rank for b in batches[:steps] for s in b]
        step_in_epoch += steps
        if not last:
            saved = position_at(loaders[0], step_in_epoch, start)
            assert saved.samples == start.start_samples + steps * batch * world
            start = EpochPosition(saved.samples, step_in_epoch, saved.samples)
    assert len(trained) == len(set(trained)), sorted(trained)
    assert samples - len(set(trained)) < batch * worlds[-1]  # less than one global batch left out


def test_the_consumed_samples_are_a_prefix_of_the_epochs_order_whatever_the_world_size() -> None:
    # 3 ranks x 4 samples x 2 steps: the first 24 of the order, dealt round robin.
    loaders = [_loader(100, r, 3, 4) for r in range(3)]
    ordered = _loader(100, 0, 1, 1)
    ordered.sampler.set_epoch(2)  # type: ignore[attr-defined]
    order = [i for b in ordered.batch_sampler for i in b]  # type: ignore[union-attr]
    first_two = sorted(i for loader in loaders for b in list(loader.batch_sampler)[:2] for i in b)  # type: ignore[arg-type]
    assert first_two == sorted(order[:24])
    assert position_at(loaders[1], 2, START) == EpochPosition(24)
    # Continued on 2 ranks: rank r gets order[24 + r], order[26 + r], ...
    rest = [remainder_batches(_loader(100, r, 2, 4), 24) for r in range(2)]
    assert rest[0][0] == order[24:32:2] and rest[1][0] == order[25:33:2]
    assert position_at(_loader(100, 0, 2, 4), 5, EpochPosition(24, 2, 24)) == EpochPosition(48, 2, 24)


@pytest.mark.parametrize(("step", "batches", "position", "saved", "world", "expected"), [
    (0, 10, START, 2, 3, Continuation.NEW_EPOCH),            # at an epoch's start
    (10, 10, EpochPosition(80), 2, 3, Continuation.NEW_EPOCH),  # at its end
    (4, 10, EpochPosition(32), 2, 2, Continuation.SKIP),      # the same world size: bit-exact as before
    (4, 10, None, 2, 2, Continuation.SKIP),                   # a checkpoint of an older torpor
    (4, 10, EpochPosition(32), 2, 3, Continuation.REMAINDER),
    (4, 10, None, 2, 3, Continuation.REMAINDER),              # refused later, naming the loader
    (6, 12, EpochPosition(44, 4, 32), 2, 2, Continuation.REMAINDER),  # an epoch already resized
])
def test_the_continuation_table(step: int, batches: int, position: EpochPosition | None, saved: int, world: int,
                                expected: Continuation) -> None:
    assert continuation(step, batches, position, saved, world) is expected


def test_a_position_survives_its_json_form_and_an_old_checkpoint_has_none() -> None:
    position = EpochPosition(44, 4, 32)
    assert EpochPosition.from_doc(position.to_doc()) == position
    assert EpochPosition.from_doc(None) is None
    assert position_at(DataLoader(TensorDataset(torch.arange(8)), batch_size=2, shuffle=True), 2, START).samples is None
