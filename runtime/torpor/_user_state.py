"""``state=``: everything else a resume must restore, by name, through one argument.

A training script holds more state than a network, one optimizer and one scheduler: a
``torch.amp.GradScaler``, a second optimizer and its scheduler, an EMA of the weights, a
stateful data loader, a generator of its own. ``Loop``/``Model``/``load_checkpoint`` take them
as one dict::

    loop = torpor.Loop(net, opt, lr_scheduler=sched, resume="latest",
                       state={"scaler": scaler, "opt2": opt2, "sched2": sched2, "ema": ema})

Each value has ``state_dict()``/``load_state_dict()`` (or is a ``torch.Generator``, saved
with ``get_state``/``set_state``). They are saved with the model: in rank 0's shard under
``integrated_save`` (replicated state, as a DDP run's scaler, EMA and optimizers are), in
every rank's own shard otherwise. A checkpoint is loaded with ``torch.load(weights_only=True)``,
so a state dict may hold only tensors, numbers, strings, ``None`` and dicts/lists/tuples of
them; anything else is refused when it is saved, not when a resume can no longer load it.

**A loader that keeps its own position** (torchdata's ``StatefulDataLoader``, or any iterable
whose ``load_state_dict`` makes the next ``iter()`` continue where its ``state_dict`` was
taken) is passed in ``state=`` too, and is then the very object ``loop.batches(...)`` (or
``Model.train``) iterates::

    loader = StatefulDataLoader(dataset, batch_size=32, shuffle=True)
    loop = torpor.Loop(net, opt, resume="latest", state={"loader": loader})
    for epoch in loop.epochs(10):
        for batch in loop.batches(loader): ...

The loop recognises it by identity (:func:`key_of`) and then:

- passes over nothing on a mid-epoch resume (the loader restored its position at load);
  the generators are still rewound to the epoch start around ``iter(loader)`` and set to the
  save's state after it, as for any loader (``torpor._resuming``);
- saves its position from *before* the batch read ahead (``torpor._agreement``): its
  ``state_dict()`` is taken in the same snapshot as the generators, before every fetch, so the
  resumed run reads that batch again instead of skipping it;
- reads it to its end when an epoch ends (as ``for batch in loader`` does), so the saved
  position of a finished epoch says "finished" and the next ``iter()`` starts a new epoch;
  a rank with batches beyond the shortest rank's reads (and drops) them there;
- saves its position in every rank's own shard, whatever ``integrated_save`` says: each rank
  has its own position (over its own ``DistributedSampler`` part), like its own generators.
  On another world size each rank that existed gets its own position back, and torpor does
  not reshard it (that is the loader's business); a rank with no shard in the checkpoint (a
  resume on more ranks) has no position to load: ``ResizeError`` on every rank
  (:mod:`torpor._resharding`).

The loader's ``state_dict()`` is called (and deep-copied) once per step, so it should be cheap.

What the loader itself does on a resume is its own. Measured with torchdata 0.11's
``StatefulDataLoader`` over a map-style dataset (``shuffle=True``, 0 or 2 workers, persistent
or not): a mid-epoch resume matches the uninterrupted run (samples and losses). A resume from
an epoch's end does not always: loading a finished iterator's state, it builds that iterator
and then a fresh one, so it draws its base seed once more than the uninterrupted run; without
``generator=`` that shifts the global generator (later dropout differs), with one and no
workers it shifts the next epoch's order. torchdata does the same without torpor
(``load_state_dict`` then ``iter``).
A loader given in ``state=`` but not the one the loop iterates is saved like any other object,
and the loop skips its own loader's consumed batches as usual.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Mapping
from typing import Any

import torch

from torpor.errors import TorporWarning

_SCALARS = (str, int, float, bool, type(None), torch.Tensor, torch.Size, torch.dtype, torch.device)


def validate(state: Mapping[str, Any] | None) -> dict[str, Any]:
    """``state`` as a plain dict, checked once when the run is set up.

    Raises:
        TypeError: ``state`` is not a dict, a key is not a non-empty str, or a value has
            neither ``state_dict``/``load_state_dict`` nor is a ``torch.Generator``.
    """
    if state is None:
        return {}
    if not isinstance(state, Mapping):
        raise TypeError(f"state must be a dict of name -> object with state_dict()/load_state_dict(), "
                        f"got {type(state).__name__}")
    for key, value in state.items():
        if not isinstance(key, str) or not key:
            raise TypeError(f"state keys must be non-empty str, got {key!r}")
        if isinstance(value, torch.Generator):
            continue
        missing = [m for m in ("state_dict", "load_state_dict") if not callable(getattr(value, m, None))]
        if missing:
            raise TypeError(f"state[{key!r}] must have state_dict() and load_state_dict() (or be a "
                            f"torch.Generator); {type(value).__name__} lacks {' and '.join(missing)}")
    return dict(state)


def key_of(state: Mapping[str, Any], loader: Any) -> str | None:
    """The key under which ``loader`` itself (by identity) is in ``state``: a loader that keeps
    its own position (see the module docstring), or ``None``."""
    if loader is None:
        return None
    return next((key for key, obj in state.items() if obj is loader), None)


def position(loader: Any) -> Any:
    """A copy of ``loader.state_dict()`` now: reading the next batch must not change it.

    Containers are rebuilt and tensors cloned; everything else a checkpoint may hold is
    immutable (anything else is refused at the save anyway), so this is all a deep copy would
    do, at a fraction of ``copy.deepcopy``'s cost: it runs before every batch.
    """
    return _copied(loader.state_dict())


def _copied(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: _copied(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(_copied(v) for v in value) if type(value) in (list, tuple) else copy.deepcopy(value)
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    return value


def capture(state: Mapping[str, Any], taken: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Every object's state now, by key (references: the caller copies for a background save).

    Args:
        taken: states captured earlier, by key, saved instead of the objects' current ones
            (a loader's position from before the batch read ahead).

    Raises:
        TypeError: a state dict holds something a ``weights_only`` load would refuse; the
            message names the path, e.g. ``state['ema']['fn']``.
    """
    out = {}
    for key, obj in state.items():
        if taken is not None and key in taken:
            value = taken[key]
        else:
            value = obj.get_state() if isinstance(obj, torch.Generator) else obj.state_dict()
        check_loadable(value, f"state[{key!r}]")
        out[key] = value
    return out


def restore(state: Mapping[str, Any], saved: Mapping[str, Any] | None, checkpoint: str, strict: bool) -> None:
    """Load each object's saved state; keys only the checkpoint has are ignored.

    Raises:
        KeyError: with ``strict``, a key of ``state`` is not in the checkpoint (without
            ``strict`` that is a warning and the object is left as it is: a run that adds an
            EMA can still resume from checkpoints written before it).
    """
    saved = saved or {}
    for key, obj in state.items():
        if key not in saved:
            held = ", ".join(repr(k) for k in sorted(saved)) or "none"
            message = f"state[{key!r}] is not in checkpoint {checkpoint!r} (its state keys: {held})"
            if strict:
                raise KeyError(f"{message}; pass strict=False to start it from its current value")
            warnings.warn(f"{message}; left as it is", TorporWarning, stacklevel=3)
            continue
        if isinstance(obj, torch.Generator):
            obj.set_state(saved[key])
        else:
            obj.load_state_dict(saved[key])


def check_loadable(value: Any, path: str) -> None:
    """Raise ``TypeError`` naming ``path`` unless ``value`` loads with ``weights_only=True``."""
    if isinstance(value, Mapping):
        for k, v in value.items():
            if not isinstance(k, str | int):
                raise TypeError(f"{path} has a key {k!r} of type {type(k).__name__}: {_ALLOWED}")
            check_loadable(v, f"{path}[{k!r}]")
    elif isinstance(value, list | tuple):
        for i, v in enumerate(value):
            check_loadable(v, f"{path}[{i}]")
    elif not isinstance(value, _SCALARS):
        raise TypeError(f"{path} is a {type(value).__name__}: {_ALLOWED}")


_ALLOWED = ("a checkpoint holds only tensors, numbers, strings, None and dicts/lists/tuples of them "
            "(it is loaded with torch.load(weights_only=True))")
