"""Re-entering an epoch where a checkpoint left it: the same data order, the same generators.

An uninterrupted epoch draws its order from the generators when its iterator starts; a
resumed one rewinds them to that moment (``epoch_rng``), lets the sampler draw the same
order, passes over what was consumed, then jumps to the generators' state at the save.

Passing over is done by index where the loader allows it: for a ``DataLoader`` over a
map-style dataset, the batch sampler's first ``skip`` batches of indices are drawn (cheap,
no sample is loaded) and the loader's own iterator — workers, collate, pinning unchanged —
starts from the rest. An ``IterableDataset`` (or any other iterable) has no indices: its
stream is the position, so the consumed batches are read again and dropped (O(epoch)).

Where the order would differ and what is done about it:

- ``DataLoader(generator=g)`` and samplers with their own ``generator``: ``g`` is not a
  global generator, so :func:`loader_generators` names them and they travel in the same
  :class:`~torpor._state.RngState` snapshots as the global ones.
- ``persistent_workers=True``: the uninterrupted run creates the workers' iterator in epoch 1
  (drawing the workers' base seed) and only resets it in later epochs (no draw); a run
  resumed in a later epoch creates it there, and that base-seed draw would shift the
  epoch's order. The sampler therefore gets the epoch-start state back right before its
  first draw. This assumes one loader object serves every epoch, as in a training script.

A loader that keeps its own position (``keeps_position``: it is in ``state=``, see
:mod:`torpor._user_state`) restored its position at load: nothing is passed over, and the
special cases above (the replay of a finished epoch, the persistent workers' rewind) are left
to the loader, whose own state covers its sampler. What stays is the generators' part: a
mid-epoch resume still creates the iterator from the epoch-start generators (the base seed
the uninterrupted epoch drew) and then jumps to the save's state.

Not restored: random draws made *inside* worker processes (augmentation in a worker's
``__getitem__``). Workers are seeded as in the uninterrupted epoch but do not see the
skipped samples again (and persistent workers are new processes after a restart), so their
own generators continue from their seed, not from where the consumed samples left them.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, IterableDataset

from torpor._state import RngState

_END = object()


def loader_generators(dataset: Any) -> dict[str, torch.Generator]:
    """The explicit generators a data loader draws from, by a stable name, each once.

    ``DataLoader(generator=g, shuffle=True)`` hands ``g`` to its ``RandomSampler`` too; the
    first name found wins, so a generator shared by both is saved and restored once.
    """
    found: dict[str, torch.Generator] = {}
    sampler = getattr(dataset, "sampler", None)
    batch_sampler = getattr(dataset, "batch_sampler", None)
    candidates = (("loader", dataset), ("sampler", sampler), ("batch_sampler", batch_sampler),
                  ("batch_sampler.sampler", getattr(batch_sampler, "sampler", None)))
    for name, owner in candidates:
        g = getattr(owner, "generator", None)
        if isinstance(g, torch.Generator) and all(g is not seen for seen in found.values()):
            found[name] = g
    return found


def start_epoch(dataset: Iterable[Any], epoch: int, resumed: tuple[RngState | None, RngState | None] | None = None,
                *, keeps_position: bool = False) -> tuple[Iterator[Any], RngState]:
    """``(iterator, epoch_rng)`` of an epoch that starts at its first batch.

    Args:
        epoch: the epoch number (from 1).
        resumed: ``(epoch_rng, rng)`` of the checkpoint when this is the first epoch after a
            resume from the end of epoch ``epoch - 1``, else ``None``. The global generators
            were restored at load; the loader's own ones are set here, where the loader is known.
        keeps_position: the loader restores its own position (see the module docstring).
    """
    generators = loader_generators(dataset)
    if resumed is not None:
        finished_epoch_rng, rng = resumed
        if rng is not None:
            rng.restore_generators(generators)
        # An IterableDataset has no indices to replay: its generators are the save's already.
        if (generators and finished_epoch_rng is not None and not keeps_position and isinstance(dataset, DataLoader)
                and not isinstance(dataset.dataset, IterableDataset)):
            _replay_the_end_of(dataset, epoch - 1, finished_epoch_rng, rng, generators)
    epoch_rng = RngState.capture(generators)
    if resumed is not None and epoch > 1 and not keeps_position and _creates_persistent_iterator(dataset):
        return _iterate(dataset, _Resumed(_index_sampler(dataset), 0, epoch_rng, None, generators)), epoch_rng
    return iter(dataset), epoch_rng


def _replay_the_end_of(loader: DataLoader, epoch: int, epoch_rng: RngState, rng: RngState | None,
                       generators: dict[str, torch.Generator]) -> None:
    """Leave the loader's generators where the uninterrupted run has them after ``epoch`` ran out.

    The loop reads an epoch's batches only as far as the epoch's length (``torpor._agreement``):
    it never asks a loader with a ``len`` for one batch more, so without workers its sampler never
    runs out and ``RandomSampler``'s extra permutation on running out is never drawn (with
    workers, their prefetch runs it out, extra draw included). A save at the epoch's
    last step and one after the end then see the same generators; both resume alike: the
    epoch's draws are replayed from its start (the base seed of a new iterator, then the indices
    of ``len(loader)`` batches — no sample is loaded), and the global generators go back to the
    save's state.
    """
    epoch_rng.restore(generators)
    if not (loader.persistent_workers and loader.num_workers > 0) or epoch <= 1:
        torch.empty((), dtype=torch.int64).random_(generator=loader.generator)  # a new iterator's base seed
    indices = iter(_index_sampler(loader))
    # Worker processes are fed indices ahead (prefetch), which runs the sampler out before the
    # epoch's last batch arrives; in the main process nothing asks past ``len(loader)``.
    for _ in indices if loader.num_workers > 0 else itertools.islice(indices, len(loader)):
        pass
    if rng is not None:
        rng.restore()  # global generators only: the loader's own ones stay where the epoch's end left them


def resume_mid_epoch(dataset: Iterable[Any], epoch: int, skip: int, epoch_rng: RngState | None,
                     rng: RngState | None, *, keeps_position: bool = False) -> tuple[Iterator[Any], RngState]:
    """``(iterator, epoch_rng)`` of a resumed epoch whose first ``skip`` batches were trained on.

    Args:
        epoch_rng: the generators when the saved epoch's iterator was created.
        rng: the generators at the save, in effect once the iterator is past ``skip``.
        keeps_position: the loader restored its own position at load: nothing is passed over.
    """
    generators = loader_generators(dataset)
    if epoch_rng is not None:
        epoch_rng.restore(generators)
    else:
        epoch_rng = RngState.capture(generators)
    if keeps_position or not skips_by_index(dataset):
        iterator = iter(dataset)
        for _ in range(0 if keeps_position else skip):
            if next(iterator, _END) is _END:
                break
        if rng is not None:
            rng.restore(generators)
        return iterator, epoch_rng
    rewind = epoch_rng if epoch > 1 and _creates_persistent_iterator(dataset) else None
    return _iterate(dataset, _Resumed(_index_sampler(dataset), skip, rewind, rng, generators)), epoch_rng


def resume_remainder(loader: DataLoader, batches: list[list[int]],
                     rng: RngState | None) -> tuple[Iterator[Any], RngState]:
    """``(iterator, epoch_rng)`` of a resumed epoch that trains ``batches`` of indices, then ends.

    What a resume on another world size trains of the saved epoch (``torpor._resharding``):
    the loader's iterator (workers, collate, pinning unchanged) over these index batches in
    place of its batch sampler's, for this pass only. The generators are set to the save's
    (``rng``: this rank's own, or derived for a new rank) once the iterator has drawn its base
    seed, where the resumed batches begin; they continue from there, as after any resume.
    """
    generators = loader_generators(loader)
    epoch_rng = RngState.capture(generators)
    return _iterate(loader, _Resumed(_index_sampler(loader), 0, None, rng, generators, instead=batches)), epoch_rng


def skips_by_index(dataset: Any) -> bool:
    """Whether a resume can pass over consumed batches by index: a plain ``DataLoader`` over a
    map-style dataset (a subclass that iterates its own way, or an ``IterableDataset``, cannot)."""
    return (isinstance(dataset, DataLoader) and type(dataset).__iter__ is DataLoader.__iter__
            and not isinstance(dataset.dataset, IterableDataset))


def _creates_persistent_iterator(dataset: Any) -> bool:
    """Whether ``iter(dataset)`` will create (not reset) a persistent-workers iterator."""
    return (isinstance(dataset, DataLoader) and dataset.persistent_workers and dataset.num_workers > 0
            and dataset._iterator is None)


def _index_sampler(loader: DataLoader) -> Any:
    """What the loader's iterator draws indices from (``loader._index_sampler``, spelled out)."""
    return loader.batch_sampler if loader.batch_sampler is not None else loader.sampler


def _iterate(loader: DataLoader, indices: _Resumed) -> Iterator[Any]:
    """``iter(loader)`` with ``indices`` in place of its (batch) sampler for this iterator.

    The loader refuses a new sampler after construction, so it is swapped in for the call
    only; a persistent iterator keeps ``indices``, which is why :class:`_Resumed` acts once.
    """
    attr = "batch_sampler" if loader.batch_sampler is not None else "sampler"
    original = getattr(loader, attr)
    object.__setattr__(loader, attr, indices)
    try:
        return iter(loader)
    finally:
        object.__setattr__(loader, attr, original)


class _Resumed:
    """A (batch) sampler that, on its first pass only, rewinds, skips and jumps the generators.

    Its ``__iter__`` is a generator function, so nothing happens until the loader's iterator
    asks for the first indices: after the loader drew its workers' base seed, exactly where
    the inner sampler would draw the epoch's order. With ``instead``, that first pass hands
    out those index batches rather than the inner sampler's (a resume on another world size).
    """

    def __init__(self, inner: Any, skip: int, rewind: RngState | None, jump: RngState | None,
                 generators: dict[str, torch.Generator], *, instead: list[list[int]] | None = None) -> None:
        self._inner = inner
        self._skip = skip
        self._rewind = rewind
        self._jump = jump
        self._generators = generators
        self._instead = instead
        self._used = False

    def __len__(self) -> int:
        return len(self._inner)

    def __iter__(self) -> Iterator[Any]:
        if self._used:
            yield from self._inner
            return
        self._used = True
        if self._rewind is not None:
            self._rewind.restore(self._generators)
        indices = iter(self._inner if self._instead is None else self._instead)
        for _ in range(self._skip):
            if next(indices, _END) is _END:
                break
        if self._jump is not None:
            self._jump.restore(self._generators)
        yield from indices
