"""``CheckpointMonitor``: periodic checkpoints with a safe retention.

Names and layout follow the seed (``{prefix}-{epoch}_{step}.ckpt`` under ``rank_{rank}/``,
no ``_1``/``_2`` prefix suffixes after a restart), plus a per-rank manifest written after the
shard (see :mod:`torpor.checkpoints`). Precedence of the mutually exclusive settings is in
:mod:`torpor._config`; retention is :mod:`torpor.retention`, applied by rank 0 only after
the new checkpoint is complete (a barrier, then a listing proves it), never to the
checkpoint the run resumed from, and to every checkpoint in the directory, whichever run
wrote it.
"""

from __future__ import annotations

import os
import time
import warnings
from typing import Any

from torpor import _distributed
from torpor._callbacks import Callback, RunContext
from torpor._config import CheckpointConfig
from torpor._saving import SaveOptions, save_checkpoint
from torpor.checkpoints import ManifestCache, Reason, checkpoint_name, delete_checkpoints, scan
from torpor.env import RuntimeEnv
from torpor.errors import TorporWarning
from torpor.retention import candidates, to_delete
from torpor.storage import Storage, open_storage

DEFAULT_DIRECTORY = "./checkpoints"


class CheckpointMonitor(Callback):
    """Save a checkpoint every N steps or S seconds and prune old ones.

    Args:
        prefix: name prefix, ``{prefix}-{epoch}_{step}``; a str without ``/``.
        directory: checkpoint root, a path or ``s3://bucket/prefix``; default
            ``./checkpoints``.
        config: a :class:`CheckpointConfig`; when given, the settings below are ignored.
        save_checkpoint_steps: save every this many global steps (default 1).
        save_checkpoint_seconds: save every this many seconds instead (see precedence).
        keep_checkpoint_max: keep the newest this many complete checkpoints (default 5).
        keep_checkpoint_per_n_minutes: keep the newest per window of this many minutes instead.
        integrated_save: replicated state written once by rank 0 (False: every rank its shard).
        save_network_params: also write ``.network.pt`` (weights only).
        save_trainable_params: also write ``.trainable.pt`` (trainable parameters only).
        async_save: not in this release (``NotImplementedError``).
        saved_network: save this module instead of the trained network.
        append_info: ``"epoch_num"``, ``"step_num"`` and dicts of str → int/float/bool/str/Tensor.
        enc_key: not in this release (``NotImplementedError`` when not ``None``).
        enc_mode: ``AES-GCM``, ``AES-CBC`` or ``SM4-CBC``.
        exception_save: not in this release (``NotImplementedError`` when True).
        global_batch_size: samples per global step, to record consumed samples.

    Raises:
        ValueError: ``prefix`` not a str or containing ``/``; ``directory`` not a str; a
            negative count; both members of a mutually exclusive pair set.
        TypeError: ``config`` not a ``CheckpointConfig``; a setting of the wrong type; bad
            ``append_info`` entries.
        NotImplementedError: ``async_save``, ``enc_key`` or ``exception_save`` requested.
    """

    def __init__(
        self,
        prefix: str = "CKP",
        directory: str | None = None,
        config: CheckpointConfig | None = None,
        save_checkpoint_steps: int = 1,
        save_checkpoint_seconds: int = 0,
        keep_checkpoint_max: int = 5,
        keep_checkpoint_per_n_minutes: int = 0,
        integrated_save: bool = True,
        save_network_params: bool = True,
        save_trainable_params: bool = False,
        async_save: bool = False,
        saved_network: Any = None,
        append_info: list[Any] | None = None,
        enc_key: bytes | None = None,
        enc_mode: str = "AES-GCM",
        exception_save: bool = False,
        global_batch_size: int | None = None,
    ) -> None:
        if not isinstance(prefix, str) or "/" in prefix:
            raise ValueError(f"prefix must be a str without '/', got {prefix!r}")
        if not prefix or prefix.startswith("."):
            raise ValueError(f"prefix must be non-empty and not start with '.', got {prefix!r}")
        if directory is not None and not isinstance(directory, str | os.PathLike):
            raise ValueError(f"directory must be a str or None, got {directory!r} ({type(directory).__name__})")
        if config is not None and not isinstance(config, CheckpointConfig):
            raise TypeError(f"config must be a CheckpointConfig or None, got {config!r} ({type(config).__name__})")
        if config is None:
            config = CheckpointConfig(
                save_checkpoint_steps=save_checkpoint_steps,
                save_checkpoint_seconds=save_checkpoint_seconds,
                keep_checkpoint_max=keep_checkpoint_max,
                keep_checkpoint_per_n_minutes=keep_checkpoint_per_n_minutes,
                integrated_save=integrated_save,
                save_network_params=save_network_params,
                save_trainable_params=save_trainable_params,
                async_save=async_save,
                saved_network=saved_network,
                append_info=append_info,
                enc_key=enc_key,
                enc_mode=enc_mode,
                exception_save=exception_save,
                global_batch_size=global_batch_size or None,
            )
        self.prefix = prefix
        self.directory = os.fspath(directory) if directory is not None else DEFAULT_DIRECTORY
        self.config = config
        self.saved: list[str] = []
        """Names this monitor saved, in order."""
        self.deleted: list[str] = []
        """Names its retention deleted, in order."""
        self._storage: Storage | None = None
        self._cache = ManifestCache()
        self._last_step: int | None = None
        self._last_time = time.monotonic()

    @classmethod
    def from_env(cls, **overrides: Any) -> CheckpointMonitor:
        """Configured from ``TORPOR_CHECKPOINT_URI``, ``TORPOR_CHECKPOINT_PREFIX``,
        ``TORPOR_SAVE_STEPS``/``TORPOR_SAVE_SECONDS`` and ``TORPOR_KEEP_MAX``/
        ``TORPOR_KEEP_PER_N_MINUTES``; keyword arguments override them."""
        env = RuntimeEnv.from_environ()
        kwargs: dict[str, Any] = {
            "prefix": env.checkpoint_prefix,
            "directory": env.checkpoint_uri,
            "save_checkpoint_steps": env.save_steps if env.save_steps is not None else (0 if env.save_seconds else 1),
            "save_checkpoint_seconds": env.save_seconds,
            "keep_checkpoint_max": env.keep_max if env.keep_max is not None else (0 if env.keep_per_n_minutes else 5),
            "keep_checkpoint_per_n_minutes": env.keep_per_n_minutes,
        }
        kwargs.update(overrides)
        return cls(**kwargs)

    @property
    def checkpoint_directory(self) -> str:
        """The root ``resume='latest'`` searches."""
        return self.directory

    @property
    def storage(self) -> Storage:
        """The opened checkpoint root."""
        if self._storage is None:
            self._storage = open_storage(self.directory)
        return self._storage

    def on_train_begin(self, run_context: RunContext) -> None:
        """Start the clocks; a resumed run counts from the step it resumed at."""
        args = run_context.original_args()
        self._last_step = args.resumed_from.step if args.resumed_from is not None else None
        self._last_time = time.monotonic()

    def _due(self, step: int) -> bool:
        cfg = self.config
        if cfg.by_seconds:
            # Clocks differ across ranks; any rank past due makes every rank save (MAX).
            late = int(time.monotonic() - self._last_time >= cfg.save_checkpoint_seconds)
            return bool(_distributed.max_over_ranks(late))
        return step % cfg.save_checkpoint_steps == 0

    def on_train_step_end(self, run_context: RunContext) -> None:
        """Save when due, unless ``OnRequestExit`` already saved this step."""
        args = run_context.original_args()
        if args.exit_saved_step == args.cur_step_num:
            return
        if self._due(args.cur_step_num):
            self._save(run_context, Reason.PERIODIC)

    def on_train_end(self, run_context: RunContext) -> None:
        """Save the last step if it was not saved (not after an exit save: that is the last)."""
        args = run_context.original_args()
        if args.exit_saved_step is not None or args.cur_step_num == 0 or self._last_step == args.cur_step_num:
            return
        self._save(run_context, Reason.FINAL)

    def _save(self, run_context: RunContext, reason: Reason) -> None:
        args = run_context.original_args()
        cfg = self.config
        name = checkpoint_name(self.prefix, args.cur_epoch_num, args.step_in_epoch)
        options = SaveOptions(
            integrated=cfg.integrated_save,
            network_params=cfg.save_network_params,
            trainable_params=cfg.save_trainable_params,
            saved_network=cfg.saved_network,
            append_info=cfg.append_info,
            global_batch_size=cfg.global_batch_size,
        )
        save_checkpoint(args, self.storage, name, reason, options, RuntimeEnv.from_environ())
        self.saved.append(name)
        self._last_step = args.cur_step_num
        self._last_time = time.monotonic()
        _distributed.barrier()  # every rank's manifest is written: the checkpoint is complete
        if _distributed.rank() == 0:
            self._prune(name, args.resumed_from.name if args.resumed_from is not None else None)

    def _prune(self, newest: str, resumed_from: str | None) -> None:
        checkpoints = scan(self.storage, cache=self._cache)
        mine = next((c for c in checkpoints if c.name == newest), None)
        if mine is None or not mine.complete:
            warnings.warn(f"checkpoint {newest!r} is not complete after the save "
                          f"({mine.problem if mine else 'not listed'}); nothing pruned", TorporWarning, stacklevel=3)
            return
        protected = {newest} | ({resumed_from} if resumed_from else set())
        doomed = set(to_delete(candidates(checkpoints), self.config.retention, protected))
        if doomed:
            delete_checkpoints(self.storage, [c for c in checkpoints if c.name in doomed])
            self.deleted.extend(sorted(doomed))
