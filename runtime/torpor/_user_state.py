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
every rank's own shard otherwise (so per-rank state, such as a stateful loader over a
``DistributedSampler``, needs ``integrated_save=False``). A loader that restores its own
position (torchdata's ``StatefulDataLoader``) is not supported through ``state=`` yet:
``loop.batches`` passes over the consumed batches itself, and reads one batch ahead, so such
a loader would be skipped twice and saved one batch ahead. A checkpoint is loaded with
``torch.load(weights_only=True)``, so a state dict may hold only tensors, numbers, strings,
``None`` and dicts/lists/tuples of them; anything else is refused when it is saved, not when
a resume can no longer load it.
"""

from __future__ import annotations

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


def capture(state: Mapping[str, Any]) -> dict[str, Any]:
    """Every object's state now, by key (references: the caller copies for a background save).

    Raises:
        TypeError: a state dict holds something a ``weights_only`` load would refuse; the
            message names the path, e.g. ``state['ema']['fn']``.
    """
    out = {}
    for key, obj in state.items():
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
