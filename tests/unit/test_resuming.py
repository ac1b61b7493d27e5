"""The resumed first pass of a loader (``torpor._resuming._Resumed``), without processes."""

from __future__ import annotations

from torch.utils.data import BatchSampler, SequentialSampler

from torpor._resuming import _Resumed


def test_the_resumed_pass_has_the_length_of_what_it_hands_out() -> None:
    # A loader's len() during the resumed pass is that pass's, not a whole epoch's; the next is whole.
    inner = BatchSampler(SequentialSampler(range(10)), batch_size=2, drop_last=False)  # 5 batches
    skipped = _Resumed(inner, 3, None, None, {})
    assert len(skipped) == 2 and len(list(skipped)) == 2 and len(skipped) == 5
    instead = _Resumed(inner, 0, None, None, {}, instead=[[7], [9]])
    assert len(instead) == 2 and list(instead) == [[7], [9]] and len(instead) == 5
