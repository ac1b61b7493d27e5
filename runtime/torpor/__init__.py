"""torpor: PyTorch training that survives preemption.

What a training script uses::

    import torpor
    torpor.init_distributed()                      # no-op unless WORLD_SIZE > 1
    model = torpor.Model(net, loss_fn=loss, optimizer=opt)
    model.train(10, loader, callbacks=torpor.callbacks_from_env(), resume="latest")

Importing ``torpor`` does not import torch: the torch-dependent names below are loaded on
first use, so the operator can import the torch-free modules (:mod:`torpor.checkpoints`,
:mod:`torpor.retention`, :mod:`torpor.storage`, :mod:`torpor.env`,
:mod:`torpor.termination`, :mod:`torpor.errors`, :mod:`torpor.crypto`) without torch installed.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from torpor._callbacks import Callback, RunArgs, RunContext
from torpor._config import CheckpointConfig
from torpor.errors import (
    AsyncSaveError,
    CheckpointNotFoundError,
    CheckpointSaveError,
    IncompleteCheckpointError,
    IntegrityError,
    ResizeError,
    RetentionError,
    ShardedStateError,
    StorageError,
    TorporError,
    TorporWarning,
)

if TYPE_CHECKING:
    from torpor._distributed import init_distributed
    from torpor._exit import OnRequestExit
    from torpor._loading import LoadedCheckpoint, load_checkpoint
    from torpor._loop import Loop
    from torpor._model import Model
    from torpor._monitor import CheckpointMonitor

__version__ = "0.1.0"

_LAZY = {
    "Model": "torpor._model",
    "Loop": "torpor._loop",
    "OnRequestExit": "torpor._exit",
    "CheckpointMonitor": "torpor._monitor",
    "load_checkpoint": "torpor._loading",
    "LoadedCheckpoint": "torpor._loading",
    "init_distributed": "torpor._distributed",
}

__all__ = [
    "AsyncSaveError",
    "Callback",
    "CheckpointConfig",
    "CheckpointMonitor",
    "CheckpointNotFoundError",
    "CheckpointSaveError",
    "IncompleteCheckpointError",
    "IntegrityError",
    "LoadedCheckpoint",
    "Loop",
    "Model",
    "OnRequestExit",
    "ResizeError",
    "RetentionError",
    "RunArgs",
    "RunContext",
    "ShardedStateError",
    "StorageError",
    "TorporError",
    "TorporWarning",
    "callbacks_from_env",
    "init_distributed",
    "load_checkpoint",
]


def __getattr__(name: str) -> Any:
    """Import torch-dependent names on first use (PEP 562)."""
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'torpor' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


def callbacks_from_env(**overrides: Any) -> list[Callback]:
    """``[OnRequestExit.from_env(...), CheckpointMonitor.from_env(...)]``, overrides routed.

    The two callbacks a script needs to be preemption-safe, configured by the ``TORPOR_*``
    variables (see :mod:`torpor.env`) and sensible local defaults when none is set. Each
    keyword goes to every callback that takes it: ``directory``, ``integrated_save``,
    ``enc_key`` and ``enc_mode`` to both (a run has one directory, one cipher, one layout),
    ``save_export`` or ``file_name`` to ``OnRequestExit``, ``prefix`` or ``async_save`` to
    ``CheckpointMonitor``.

    Raises:
        TypeError: a keyword neither callback takes (the message names it).
    """
    from torpor._exit import OnRequestExit
    from torpor._monitor import CheckpointMonitor
    from torpor._sharing import route_options

    exit_options, monitor_options = route_options(overrides, OnRequestExit, CheckpointMonitor,
                                                  caller="callbacks_from_env")
    return [OnRequestExit.from_env(**exit_options), CheckpointMonitor.from_env(**monitor_options)]
