"""Resuming on another world size: where the epoch stands, and what each new rank starts from.

Model and optimizer state need nothing here: replicated state is rank 0's whatever the world
size, and sharded FSDP2/DTensor state is resharded by DCP's planners at load
(:mod:`torpor._sharded`; FSDP1 is refused on another world size there). What a world size
changes is the **data position** and the **generators** of each rank.

**The data position is samples consumed in the epoch, globally.** A ``DistributedSampler``
draws one global order per epoch (its ``seed + epoch``, the same on any number of ranks) and
deals it out round robin: rank ``r`` gets positions ``r, r + W, r + 2W, ...``. So after ``k``
steps of ``b`` samples per rank on ``W`` ranks, exactly the first ``k * b * W`` positions of
that order were trained on, whichever rank trained them. Every save records that number
(:class:`EpochPosition`); a resume on ``M`` ranks draws the same order, drops what was
consumed, and deals the rest out round robin over its ``M`` ranks, in batches of the loader's
``batch_size`` (:func:`remainder_batches`). No sample is trained twice in the epoch; what is
left out is the tail that does not fill every rank alike (fewer than ``M`` samples) and the
loader's own ``drop_last`` batch: together less than one global batch. The same rule holds
after another resize within the epoch (the position keeps counting from where the epoch's
pass began, :attr:`EpochPosition.start_samples`).

How a resumed run continues its epoch, one table (:func:`continuation`)::

    ==========================  ==========  ======================  ==============================
    saved                       world size  the epoch's pass began  the resumed run
    ==========================  ==========  ======================  ==============================
    at an epoch's start or end  any         -                       starts the next epoch (NEW_EPOCH)
    mid-epoch                   the same    at the epoch's start    passes over the consumed
                                                                    batches, bit-exact (SKIP)
    mid-epoch                   the same    after a resize          the rest of the order (REMAINDER)
    mid-epoch                   another     -                       the rest of the order (REMAINDER)
    ==========================  ==========  ======================  ==============================

REMAINDER needs a loader whose order torpor can redraw: a ``DataLoader`` over a map-style
dataset with a ``DistributedSampler`` and its default ``BatchSampler``. Anything else is a
:class:`torpor.errors.ResizeError` naming it (:func:`check_reshardable`): another sampler
(its order may depend on the world size), an ``IterableDataset`` (its stream is its own
position), a ``DataLoader`` subclass that iterates its own way. A loader that keeps its own
position (in ``state=``) is not redrawn: each rank that existed gets its own saved
``state_dict`` back and continues from it, and whether that position means anything over
the new ranks is the loader's business (torpor does not reshard it); a rank that did not
exist has none, so growing is refused (:func:`check_positions`).

``global_batch_size`` (``CheckpointConfig``/``CheckpointMonitor``), when given, is the job's
global batch, kept across world sizes: on ``M`` ranks it must split into ``M`` equal
per-rank batches, and the loader's ``batch_size`` must be that share
(:func:`check_global_batch`), or the resized run would train another global batch size.
Without it the global batch is the loader's ``batch_size`` times the world size, whatever it is.

**Generators on a new world size** (:func:`derived_rng`): a rank that existed at the save gets
its own generators back, as on the same world size. A rank that did not exist gets the global
generators (python, numpy, torch CPU and CUDA) seeded from a digest of rank 0's saved torch
generator and its own rank number: deterministic (the same checkpoint resumed on the same
world size gives every rank the same streams again, whatever the clock or the host), distinct
per rank (a copy of rank 0's state would give the new ranks rank 0's dropout masks), and read
from the one shard every rank reads anyway. A loader's own generators (``DataLoader(generator=
g)``) are the data order's, seeded alike on every rank in a usual script: a new rank takes
rank 0's. A ``DistributedSampler`` does not draw from any of them (its order is
``seed + epoch``), so none of this moves a sample.
"""

from __future__ import annotations

import enum
import hashlib
import random
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import BatchSampler, DataLoader, DistributedSampler, IterableDataset

from torpor._state import RngState
from torpor.errors import ResizeError


@dataclass(frozen=True)
class EpochPosition:
    """Where a save stood in its epoch's global order (recorded in every shard's metadata)."""

    samples: int | None
    """Positions of the epoch's global order trained on, over every rank; ``None`` when the
    loader's order cannot be redrawn on another world size (see the module docstring)."""
    start_step: int = 0
    """``step_in_epoch`` at which this run's pass over the epoch began: 0, or, after a resume
    into the middle of the epoch on another world size, the saved run's."""
    start_samples: int = 0
    """Positions already consumed when this pass began (0 unless it continued a resized epoch)."""

    @property
    def from_epoch_start(self) -> bool:
        """Whether the pass began at the epoch's first batch (the same-world exact resume applies)."""
        return self.start_step == 0 and self.start_samples == 0

    def to_doc(self) -> dict[str, Any]:
        """The JSON form in a shard's ``meta``."""
        return {"samples": self.samples, "start_step": self.start_step, "start_samples": self.start_samples}

    @classmethod
    def from_doc(cls, doc: Any) -> EpochPosition | None:
        """Inverse of :meth:`to_doc`; ``None`` for a checkpoint written before positions were recorded."""
        if not isinstance(doc, Mapping):
            return None
        samples = doc.get("samples")
        return cls(None if samples is None else int(samples), int(doc.get("start_step") or 0),
                   int(doc.get("start_samples") or 0))


START = EpochPosition(0)
"""A pass that begins at the epoch's start."""


class Continuation(enum.Enum):
    """How a resumed run continues the saved epoch (the module docstring's table)."""

    NEW_EPOCH = "new-epoch"
    SKIP = "skip"
    REMAINDER = "remainder"


def continuation(step_in_epoch: int, batch_num: int | None, position: EpochPosition | None,
                 saved_world: int, world: int) -> Continuation:
    """The table: how a run on ``world`` ranks continues a checkpoint saved on ``saved_world``."""
    if step_in_epoch == 0 or (batch_num is not None and step_in_epoch >= batch_num):
        return Continuation.NEW_EPOCH
    if saved_world == world and (position is None or position.from_epoch_start):
        return Continuation.SKIP
    return Continuation.REMAINDER


def _distributed_sampler(loader: Any) -> DistributedSampler | None:
    """The loader's ``DistributedSampler`` when torpor can redraw its order, else ``None``."""
    if not (isinstance(loader, DataLoader) and type(loader).__iter__ is DataLoader.__iter__
            and not isinstance(loader.dataset, IterableDataset)):
        return None
    batches = loader.batch_sampler
    if batches is None or type(batches).__iter__ is not BatchSampler.__iter__:
        return None
    sampler = getattr(batches, "sampler", None)
    if isinstance(sampler, DistributedSampler) and type(sampler).__iter__ is DistributedSampler.__iter__:
        return sampler
    return None


def _what(loader: Any) -> str:
    """Why ``loader``'s order cannot be redrawn on another world size, naming what it is."""
    if not isinstance(loader, DataLoader):
        return f"the loader is a {type(loader).__name__}, not a torch DataLoader"
    if type(loader).__iter__ is not DataLoader.__iter__:
        return f"the loader is a {type(loader).__name__}, a DataLoader that iterates its own way"
    if isinstance(loader.dataset, IterableDataset):
        return (f"the loader's dataset is an IterableDataset ({type(loader.dataset).__name__}) without a position "
                "of its own: its stream is dealt to the ranks by the dataset itself")
    batches = loader.batch_sampler
    if batches is None or type(batches).__iter__ is not BatchSampler.__iter__:
        return f"the loader's batch_sampler is a {type(batches).__name__}, not torch's BatchSampler"
    sampler = getattr(batches, "sampler", None)
    return f"the loader's sampler is a {type(sampler).__name__}, not a DistributedSampler"


def position_at(loader: Any, step_in_epoch: int, start: EpochPosition) -> EpochPosition:
    """Where a save at ``step_in_epoch`` of ``loader``'s epoch stands (see the module docstring)."""
    sampler = _distributed_sampler(loader)
    if sampler is None:
        return EpochPosition(None, start.start_step, start.start_samples)
    per_step = int(loader.batch_size) * int(sampler.num_replicas)  # type: ignore[arg-type]
    consumed = start.start_samples + max(0, step_in_epoch - start.start_step) * per_step
    return EpochPosition(min(consumed, len(sampler.dataset)), start.start_step,  # type: ignore[arg-type]
                         start.start_samples)


def check_reshardable(loader: Any, position: EpochPosition | None, checkpoint: str, saved_world: int,
                      world: int) -> None:
    """Refuse a REMAINDER resume that cannot be exact (the same answer on every rank).

    Raises:
        ResizeError: the loader's order cannot be redrawn (named), or the checkpoint does not
            know its position (an older checkpoint, or a loader of that kind when it was saved).
    """
    where = (f"checkpoint {checkpoint!r} was saved mid-epoch on {saved_world} rank(s) and is resumed on {world}"
             if saved_world != world else f"checkpoint {checkpoint!r} was saved mid-epoch after a resize")
    if _distributed_sampler(loader) is None:
        raise ResizeError(f"{where}, but {_what(loader)}; torpor can continue an epoch on another world size only "
                          "over a DataLoader of a map-style dataset with a DistributedSampler (its order is the same "
                          f"on any world size). Resume on {saved_world} rank(s), from a checkpoint at an epoch's end, "
                          "or pass a loader that keeps its own position in state=")
    if position is None or position.samples is None:
        raise ResizeError(f"{where}, but it does not record how many samples of the epoch were consumed (it was "
                          "saved by an older torpor, or over a loader whose order cannot be redrawn); resume on "
                          f"{saved_world} rank(s), or from a checkpoint at an epoch's end")


def check_global_batch(global_batch_size: int | None, loader: Any, world: int,
                       error: type[Exception] = ResizeError) -> None:
    """The configured global batch must split into the loader's per-rank batches.

    Checked at every run's first epoch: on a resized run the refusal is a :class:`ResizeError`
    (the operator shows it as a refused resize); on a run at its saved (or first) world size
    ``error`` is ``ValueError``, a configuration that is wrong from the start and would otherwise
    surface only at the first elastic shrink.

    Raises:
        ResizeError: (or ``error``) ``global_batch_size`` is not divisible by ``world``, or the
            loader's ``batch_size`` is not ``global_batch_size / world``.
    """
    if not global_batch_size:
        return
    if global_batch_size % world:
        raise error(f"global_batch_size={global_batch_size} cannot be split over {world} rank(s) "
                          f"({global_batch_size} is not divisible by {world}); resume on a world size that divides "
                          "it, or change global_batch_size")
    batch_size = getattr(loader, "batch_size", None)
    if isinstance(batch_size, int) and batch_size * world != global_batch_size:
        raise error(f"global_batch_size={global_batch_size} on {world} rank(s) means a per-rank batch of "
                          f"{global_batch_size // world}, but the loader's batch_size is {batch_size} (a global "
                          f"batch of {batch_size * world}); build the loader with batch_size=global_batch_size // "
                          "world_size")


def check_positions(keys: list[str], checkpoint: str, saved_world: int, world: int) -> None:
    """Refuse to grow a run whose loader keeps its own position (every rank raises alike).

    Raises:
        ResizeError: ``keys`` (loaders in ``state=`` with a per-rank position) and ``world``
            has ranks the saving run did not have.
    """
    if keys and world > saved_world:
        raise ResizeError(
            f"state[{keys[0]!r}] keeps its own position per rank, saved by {saved_world} rank(s) in checkpoint "
            f"{checkpoint!r}; ranks {saved_world}..{world - 1} of this run have none, and torpor does not reshard a "
            "loader's own position (that is the loader's business). Resume on at most "
            f"{saved_world} rank(s), or use a DataLoader with a DistributedSampler outside state=")


def global_order(sampler: DistributedSampler) -> list[int]:
    """The sampler's global order of its current epoch, before it is dealt to the ranks.

    A ``DistributedSampler`` of one replica over the same dataset, seed, shuffle and epoch
    draws it: the order depends on ``seed + epoch`` only, not on the number of replicas.
    """
    whole = DistributedSampler(sampler.dataset, num_replicas=1, rank=0, shuffle=sampler.shuffle, seed=sampler.seed,
                               drop_last=False)
    whole.set_epoch(sampler.epoch)
    return list(whole)


def remainder_batches(loader: DataLoader, consumed: int) -> list[list[int]]:
    """This rank's batches of the rest of the epoch's order, after ``consumed`` positions.

    The rest is cut to a multiple of the world size (every rank the same number of samples,
    so the agreement on the shortest rank drops nothing more) and dealt out round robin, as
    the sampler deals a whole epoch, so the consumed part stays a prefix of the order.
    """
    sampler = _distributed_sampler(loader)
    assert sampler is not None
    rest = global_order(sampler)[consumed:]
    world, rank = int(sampler.num_replicas), int(sampler.rank)
    rest = rest[:len(rest) - len(rest) % world]
    mine = rest[rank::world]
    size = int(loader.batch_size)  # type: ignore[arg-type]
    batches = [mine[i:i + size] for i in range(0, len(mine), size)]
    if batches and loader.drop_last and len(batches[-1]) < size:
        batches.pop()
    return batches


def derived_rng(rank0: RngState, rank: int) -> RngState:
    """The generators of a rank that did not exist at the save (see the module docstring)."""
    digest = hashlib.sha256(rank0.torch_cpu.numpy().tobytes() + b"torpor-rank:" + str(rank).encode()).digest()
    seed = int.from_bytes(digest[:8], "little")
    cuda: tuple[torch.Tensor, ...] = ()
    if rank0.torch_cuda and torch.cuda.is_available():
        cuda = tuple(torch.Generator(device=f"cuda:{i}").manual_seed(seed).get_state()
                     for i in range(min(len(rank0.torch_cuda), torch.cuda.device_count())))
    return RngState(random.Random(seed).getstate(),
                    np.random.RandomState(seed % 2**32).get_state(legacy=True),  # type: ignore[arg-type]
                    torch.Generator().manual_seed(seed).get_state(), cuda, dict(rank0.generators))
