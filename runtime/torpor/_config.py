"""``CheckpointConfig``: what the periodic saver does, validated once, torch-free.

Precedence of the seeds' mutually exclusive pairs (both have a non-zero default, so "set"
can only mean "moved away from its default"):

* ``save_checkpoint_seconds > 0`` selects time-based saving and ``save_checkpoint_steps``
  is ignored, provided it is left at its default ``1`` (or ``0``); any other value is a
  ``ValueError`` naming both, because the caller asked for two schedules.
* ``keep_checkpoint_per_n_minutes > 0`` selects window retention and ``keep_checkpoint_max``
  is ignored, provided it is left at its default ``5`` (or ``0``); otherwise ``ValueError``.
* ``save_checkpoint_steps == 0`` and ``save_checkpoint_seconds == 0``: no periodic saves
  (what the operator sets for a TrainingJob with neither ``saveSteps`` nor ``saveSeconds``).
  The monitor still writes the final checkpoint when training ends by itself, as MindSpore's
  ``ModelCheckpoint`` does at its end, so a finished run keeps its result; the exit save is
  ``OnRequestExit``'s and the breakpoint ``exception_save``'s, as with any schedule. Both keep
  settings 0: every checkpoint is kept.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field
from typing import Any

from torpor.retention import RetentionPolicy

ENC_MODES = ("AES-GCM", "AES-CBC", "SM4-CBC")
APPEND_INFO_NAMES = ("epoch_num", "step_num")
ASYNC_ERRORS = ("record", "raise")


def is_tensor(value: object) -> bool:
    """Whether ``value`` is a torch tensor, without importing torch (no torch, no tensors)."""
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(value, torch.Tensor)


def check_bool(name: str, value: object, exc: type[Exception] = TypeError) -> None:
    """Raise ``exc`` naming ``name`` and ``value`` unless ``value`` is a bool."""
    if not isinstance(value, bool):
        raise exc(f"{name} must be a bool, got {value!r} ({type(value).__name__})")


def check_count(name: str, value: object) -> int:
    """A non-negative int (bools refused: ``True`` is not a step count)."""
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{name} must be an int, got {value!r} ({type(value).__name__})")
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {value!r}")
    return value


def check_number(name: str, value: object) -> float:
    """A finite, non-negative int or float."""
    if not isinstance(value, int | float) or isinstance(value, bool):
        raise TypeError(f"{name} must be a number, got {value!r} ({type(value).__name__})")
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return float(value)


def check_append_info(append_info: object) -> None:
    """The seed's rule: a list of ``"epoch_num"``, ``"step_num"`` and dicts of str → scalar/tensor.

    Raises:
        TypeError: not a list, a dict key not a str, a value of another type.
        ValueError: an unknown string entry.
    """
    if append_info is None:
        return
    if not isinstance(append_info, list):
        raise TypeError(f"append_info must be a list or None, got {append_info!r} ({type(append_info).__name__})")
    for entry in append_info:
        if isinstance(entry, str):
            if entry not in APPEND_INFO_NAMES:
                raise ValueError(f"append_info entries that are str must be one of {APPEND_INFO_NAMES}, got {entry!r}")
        elif isinstance(entry, dict):
            for key, value in entry.items():
                if not isinstance(key, str):
                    raise TypeError(f"append_info dict keys must be str, got {key!r} ({type(key).__name__})")
                if not (isinstance(value, int | float | bool | str) or is_tensor(value)):
                    raise TypeError(
                        f"append_info[{key!r}] must be an int, float, bool, str or Tensor, "
                        f"got {value!r} ({type(value).__name__})"
                    )
        else:
            raise TypeError(
                f"append_info entries must be 'epoch_num', 'step_num' or a dict, got {entry!r} ({type(entry).__name__})"
            )


@dataclass(frozen=True)
class CheckpointConfig:
    """How often to save and how many checkpoints to keep (see the module docstring).

    Every field mirrors the ``CheckpointMonitor`` argument of the same name; a monitor given
    ``config=`` takes every setting from it and ignores its own keyword arguments.
    """

    save_checkpoint_steps: int = 1
    """Save every this many global steps. Default 1, as the seed; 0 with seconds 0: no periodic
    saves, only the final one (see the module docstring)."""
    save_checkpoint_seconds: int | float = 0
    """Save every this many seconds instead of by steps; 0 (default) is off."""
    keep_checkpoint_max: int = 5
    """Keep the newest this many complete checkpoints; 0 keeps all. Default 5."""
    keep_checkpoint_per_n_minutes: int | float = 0
    """Keep the newest complete checkpoint per window of this many minutes; 0 (default) off."""
    integrated_save: bool = True
    """True: model and optimizer state are replicated (DDP, one process) and rank 0 writes them
    once. False: each rank's state differs (FSDP, DTensor shards) and each rank writes its own."""
    save_network_params: bool = True
    """Also write the network weights alone (``.network.pt``), for inference. Default True.
    The shard then leaves the weights out (a resume reads them from this file), so they are
    written once, not twice."""
    save_trainable_params: bool = False
    """Also write only the parameters that require grad (``.trainable.pt``), for fine-tuning."""
    async_save: bool = False
    """Snapshot the state to CPU memory at the step boundary, then serialise, encrypt and upload
    in a background thread while training goes on. At most one save is in flight: a save that
    falls due while the previous one still runs waits for it (memory stays at one snapshot,
    and checkpoints complete in order). The exit save and the end of training wait for it."""
    saved_network: Any = None
    """A module (e.g. the EMA, the unwrapped model) whose weights are written as the
    weights-only ``.network.pt``; the resumable shard always keeps the trained network, whose
    optimizer state it holds, so a resume never puts EMA weights beside trained moments."""
    append_info: list[Any] | None = None
    """Extra records: ``"epoch_num"``, ``"step_num"`` and dicts of str → int/float/bool/str/Tensor."""
    enc_key: bytes | None = field(default=None, repr=False)
    """Encryption key (16/24/32 bytes for AES, 16 for SM4); ``None`` writes plaintext. Never
    written to a manifest or a log (hidden from ``repr``)."""
    enc_mode: str = "AES-GCM"
    """Encryption mode: ``AES-GCM`` (default), ``AES-CBC`` or ``SM4-CBC`` (CBC + HMAC-SHA256)."""
    exception_save: bool = False
    """When an exception escapes a training step, write ``{prefix}-{epoch}_{step}_breakpoint``
    (reason ``exception``) and re-raise the original exception unchanged."""
    global_batch_size: int | None = None
    """Samples per global step; recorded so consumed samples are known after a resume. It is
    also the job's global batch across world sizes: a run resumed on M ranks (another number
    than saved) must have ``global_batch_size % M == 0`` and a loader whose ``batch_size`` is
    ``global_batch_size // M``, else ``torpor.ResizeError`` names both (``torpor._resharding``).
    ``None`` (default): the global batch is whatever the loader's ``batch_size`` times the world
    size makes it."""
    async_errors: str = "record"
    """What a failed background save does at the next step boundary: ``"record"`` (default)
    logs it and appends it to ``CheckpointMonitor.save_errors``, and training goes on (a
    storage outage should not end a long run; the next save tries again); ``"raise"`` raises
    :class:`torpor.errors.AsyncSaveError` from it. Never silent either way."""

    def __post_init__(self) -> None:
        steps = check_count("save_checkpoint_steps", self.save_checkpoint_steps)
        seconds = check_number("save_checkpoint_seconds", self.save_checkpoint_seconds)
        keep_max = check_count("keep_checkpoint_max", self.keep_checkpoint_max)
        per_n = check_number("keep_checkpoint_per_n_minutes", self.keep_checkpoint_per_n_minutes)
        if seconds > 0 and steps not in (0, 1):
            raise ValueError(
                f"save_checkpoint_steps={steps!r} and save_checkpoint_seconds={self.save_checkpoint_seconds!r} "
                "cannot be used together; set one of them (seconds > 0 overrides only the default steps=1)"
            )
        if per_n > 0 and keep_max not in (0, 5):
            raise ValueError(
                f"keep_checkpoint_max={keep_max!r} and keep_checkpoint_per_n_minutes="
                f"{self.keep_checkpoint_per_n_minutes!r} cannot be used together; set one of them "
                "(per_n_minutes > 0 overrides only the default keep_checkpoint_max=5)"
            )
        for name in ("integrated_save", "save_network_params", "save_trainable_params", "async_save",
                     "exception_save"):
            check_bool(name, getattr(self, name))
        if self.saved_network is not None and not callable(getattr(self.saved_network, "state_dict", None)):
            raise TypeError(
                f"saved_network must be a torch.nn.Module or None, got {self.saved_network!r} "
                f"({type(self.saved_network).__name__})"
            )
        check_append_info(self.append_info)
        if self.enc_key is not None and not isinstance(self.enc_key, bytes):
            raise TypeError(f"enc_key must be bytes or None, got {type(self.enc_key).__name__}")
        if self.enc_mode not in ENC_MODES:
            raise ValueError(f"enc_mode must be one of {ENC_MODES}, got {self.enc_mode!r}")
        if self.enc_key is not None:
            from torpor.crypto import check_key

            check_key(self.enc_key, self.enc_mode)
        if self.global_batch_size is not None:
            check_count("global_batch_size", self.global_batch_size)
        if self.async_errors not in ASYNC_ERRORS:
            raise ValueError(f"async_errors must be one of {ASYNC_ERRORS}, got {self.async_errors!r}")

    @property
    def by_seconds(self) -> bool:
        """Whether saves are timed (seconds) rather than counted (steps)."""
        return self.save_checkpoint_seconds > 0

    @property
    def periodic(self) -> bool:
        """Whether anything is saved before the end: ``False`` when steps and seconds are both 0."""
        return self.save_checkpoint_steps > 0 or self.save_checkpoint_seconds > 0

    @property
    def retention(self) -> RetentionPolicy:
        """The retention policy these settings describe (per-window wins, as documented)."""
        if self.keep_checkpoint_per_n_minutes > 0:
            return RetentionPolicy(keep_max=0, keep_per_n_minutes=self.keep_checkpoint_per_n_minutes)
        return RetentionPolicy(keep_max=self.keep_checkpoint_max)
