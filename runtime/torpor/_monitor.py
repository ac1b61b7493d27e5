"""``CheckpointMonitor``: periodic checkpoints with a safe retention.

Names and layout follow the seed (``{prefix}-{epoch}_{step}.ckpt`` under ``rank_{rank}/``,
no ``_1``/``_2`` prefix suffixes after a restart), plus a per-rank manifest written after the
shard (see :mod:`torpor.checkpoints`); a name already stored (an earlier run reached the same
step) is never rewritten, the save takes ``{name}-v{n}``. Precedence of the mutually exclusive settings is in
:mod:`torpor._config`; retention is :mod:`torpor.retention`, applied by rank 0 only after
the new checkpoint is complete (every rank agreed its save went well, then a listing proves it), never to the
checkpoint the run resumed from, and to every checkpoint **of this monitor's prefix** in the
directory, whichever run wrote it: a second monitor (``prefix='best'``, keep 1) and another
experiment sharing the directory keep theirs.

A save that fails on one rank never leaves the others waiting (DESIGN §7): every rank learns
the outcome at the same point and acts alike.

==========================  ================================================================
save                        when it fails on any rank
==========================  ================================================================
periodic, synchronous       every rank raises ``CheckpointSaveError`` right after the save
periodic, ``async_save``    at the next agreed step boundary (or the next save, whichever
                            comes first) every rank records the ``AsyncSaveError``
                            (``async_errors="record"``: logged, in :attr:`save_errors`,
                            training goes on) or raises it (``"raise"``); found at the end of
                            training, the final save writes the step again on every rank
final (end of training)     every rank raises ``CheckpointSaveError``
==========================  ================================================================
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import time
import warnings
from typing import Any

from torpor import _distributed, _state
from torpor._agreement import Agreed, Fact
from torpor._background import BackgroundSaver, warm_in_background
from torpor._callbacks import Callback, RunContext
from torpor._config import CheckpointConfig
from torpor._saving import (
    SaveOptions,
    capture,
    check_layout,
    reserve_staging,
    save_checkpoint,
    taken_names,
    write_pending,
)
from torpor._sharded import layout_of
from torpor._sharing import Offer, SharedSettings
from torpor.checkpoints import (
    BREAKPOINT_SUFFIX,
    ManifestCache,
    Reason,
    checkpoint_name,
    delete_checkpoints,
    in_scope,
    scan,
    unique_name,
)
from torpor.crypto import Encryption
from torpor.env import DEFAULT_CHECKPOINT_URI, RuntimeEnv, given_checkpoint_uri, read_enc_key
from torpor.errors import AsyncSaveError, CheckpointSaveError, ResizeError, RetentionError, TorporWarning
from torpor.retention import candidates, to_delete
from torpor.storage import Storage, open_storage

DEFAULT_DIRECTORY = DEFAULT_CHECKPOINT_URI
_log = logging.getLogger("torpor")


class CheckpointMonitor(Callback):
    """Save a checkpoint every N steps or S seconds and prune old ones.

    Args:
        prefix: name prefix, ``{prefix}-{epoch}_{step}``; a str without ``/``.
        directory: checkpoint root, a path or ``s3://bucket/prefix``; default ``None``: the
            run's (an ``OnRequestExit``'s in the same run, else ``TORPOR_CHECKPOINT_URI``, else
            ``./checkpoints``). Every saver of a run writes to one directory.
        config: a :class:`CheckpointConfig`; when given, the settings below are ignored.
        save_checkpoint_steps: save every this many global steps (default 1); 0 together with
            ``save_checkpoint_seconds=0``: no periodic saves, only the final one at the end.
        save_checkpoint_seconds: save every this many seconds instead (see precedence).
        keep_checkpoint_max: keep the newest this many complete checkpoints (default 5).
        keep_checkpoint_per_n_minutes: keep the newest per window of this many minutes instead.
        integrated_save: replicated state written once by rank 0 (False: every rank its shard).
        save_network_params: also write ``.network.pt`` (weights only; the shard then leaves them out).
        save_trainable_params: also write ``.trainable.pt`` (trainable parameters only).
        async_save: snapshot at the step boundary, write in a background thread (one save in
            flight; the next due save waits for it; the end of training and an exit save wait
            for it too). See ``async_errors`` for failures.
        saved_network: also write this module's weights (an EMA, an unwrapped copy) as the
            weights-only ``.network.pt``; the resumable shard keeps the trained network's.
        append_info: ``"epoch_num"``, ``"step_num"`` and dicts of str → int/float/bool/str/Tensor.
        enc_key: bytes encrypting every file (see :mod:`torpor.crypto`); ``None``: plaintext,
            unless the run's ``OnRequestExit`` has a key (one key seals the whole run).
        enc_mode: ``AES-GCM``, ``AES-CBC`` or ``SM4-CBC``.
        exception_save: an exception escaping a training step writes
            ``{prefix}-{epoch}_{step}_breakpoint`` (reason ``exception``), then the exception
            reaches the caller unchanged. ``step`` counts completed steps only: an exception
            during step N records N-1 (the weights are as the exception left them). A
            breakpoint is never resumed by ``'latest'`` nor chosen by the operator; load it by
            name.
        global_batch_size: samples per global step, to record consumed samples; the job's
            global batch across world sizes: a resume on another number of ranks requires
            the loader's ``batch_size`` to be its share (``torpor.ResizeError`` otherwise).
        async_errors: ``"record"`` (log, append to :attr:`save_errors`, train on) or
            ``"raise"`` (:class:`torpor.errors.AsyncSaveError` at the next step boundary), on
            every rank alike whichever rank's save failed (see the module's table).

    Raises:
        ValueError: ``prefix`` not a str or containing ``/``; ``directory`` not a str; a
            negative count; both members of a mutually exclusive pair set.
        TypeError: ``config`` not a ``CheckpointConfig``; a setting of the wrong type; bad
            ``append_info`` entries.
        ValueError: also a key length ``enc_mode`` does not take (naming both).
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
        *,
        async_errors: str = "record",
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
                async_errors=async_errors,
            )
        self.prefix = prefix
        self.directory = os.fspath(directory) if directory is not None else DEFAULT_DIRECTORY
        self.config = config
        self.saved: list[str] = []
        """Names this monitor saved, in order."""
        self.deleted: list[str] = []
        """Names its retention deleted, in order."""
        self.prune_errors: list[RetentionError] = []
        """Prunes that failed (each after a complete save; training went on), in order."""
        self._prunes_reported = 0
        self._storage: Storage | None = None
        self._cache = ManifestCache()
        self._last_step: int | None = None
        self._last_time = time.monotonic()
        self._taken: set[str] = set()
        self._done_step: int | None = None
        self.encryption = Encryption(config.enc_key, config.enc_mode) if config.enc_key is not None else None
        """The cipher every file is written with (the run's, once a ``Loop`` shared it), or ``None``."""
        self._offered = SharedSettings(directory=self.directory if directory is not None else None,
                                       encryption=self.encryption, integrated_save=config.integrated_save)
        self.save_errors: list[AsyncSaveError] = []
        """Background saves that failed (``async_errors="record"``), in order."""
        self.stalls: list[float] = []
        """Seconds training waited at each save's step boundary (snapshot, or the whole
        synchronous save)."""
        self._staging = _state.Staging()
        self._saver = BackgroundSaver(f"torpor-save-{prefix}") if config.async_save else None

    @classmethod
    def from_env(cls, **overrides: Any) -> CheckpointMonitor:
        """Configured from ``TORPOR_CHECKPOINT_URI``, ``TORPOR_CHECKPOINT_PREFIX``,
        ``TORPOR_SAVE_STEPS``/``TORPOR_SAVE_SECONDS``, ``TORPOR_KEEP_MAX``/
        ``TORPOR_KEEP_PER_N_MINUTES``, ``TORPOR_ASYNC_SAVE``, ``TORPOR_ENC_MODE`` and the key
        from ``TORPOR_ENC_KEY_FILE`` (or ``TORPOR_ENC_KEY``); keyword arguments override them."""
        env = RuntimeEnv.from_environ()
        kwargs: dict[str, Any] = {
            "async_save": env.async_save,
            "enc_key": read_enc_key(),
            "enc_mode": env.enc_mode or "AES-GCM",
            "prefix": env.checkpoint_prefix,
            "directory": given_checkpoint_uri(),
            "save_checkpoint_steps": env.save_steps if env.save_steps is not None else (0 if env.save_seconds else 1),
            "save_checkpoint_seconds": env.save_seconds,
            "keep_checkpoint_max": env.keep_max if env.keep_max is not None else (0 if env.keep_per_n_minutes else 5),
            "keep_checkpoint_per_n_minutes": env.keep_per_n_minutes,
        }
        kwargs.update(overrides)
        return cls(**kwargs)

    def shared_offer(self) -> Offer:
        """What this monitor was given of the settings a run's savers share."""
        return Offer(f"CheckpointMonitor(prefix={self.prefix!r})", self._offered)

    def adopt_shared(self, settings: SharedSettings) -> None:
        """Write where, and as, the run's other savers do, unless given otherwise."""
        directory = self._offered.directory or settings.directory or self.directory
        if directory != self.directory:
            self.directory, self._storage = directory, None
        self.encryption = self._offered.encryption or settings.encryption

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
        """Refuse a layout the saves could not write correctly (on every rank, before training:
        see :mod:`torpor._sharded`); start the clocks (a resumed run counts from the step it
        resumed at); open the store.

        Raises:
            ShardedStateError: e.g. ``save_trainable_params`` with a sharded model.
        """
        args = run_context.original_args()
        check_layout(layout_of(_state.unwrap(args.network), args.optimizer, args.state), self._options())
        self._last_step = args.resumed_from.step if args.resumed_from is not None else None
        self._last_time = time.monotonic()
        self._done_step = args.cur_step_num
        warm_in_background(self.storage)
        self._taken = taken_names(self.storage)
        if self._saver is not None:
            reserve_staging(self._staging, args, self._options())

    def _late(self) -> bool:
        return time.monotonic() - self._last_time >= self.config.save_checkpoint_seconds

    def step_facts(self, run_context: RunContext) -> dict[Fact, int]:
        """For the loop's one collective: a seconds-save due on this rank's clock; this rank's
        background save failed (its rank + 1, so every rank can name it)."""
        facts = {}
        if self.config.by_seconds:
            facts[Fact.SAVE_DUE] = int(self._late())
        if self._saver is not None and self._saver.failed:
            facts[Fact.SAVE_FAILED] = _distributed.rank() + 1
        return facts

    def _due(self, step: int, agreed: Agreed | None) -> bool:
        cfg = self.config
        if cfg.by_seconds:
            # Clocks differ across ranks; any rank past due makes every rank save (MAX): in a
            # Loop step the loop's collective carried it, otherwise one of our own.
            if agreed is not None:
                return agreed.save_due
            return bool(_distributed.max_over_ranks(int(self._late())))
        return step % cfg.save_checkpoint_steps == 0

    @property
    def in_flight(self) -> bool:
        """Whether a background save is running now."""
        return self._saver is not None and self._saver.in_flight

    def wait(self) -> None:
        """Wait for the background save in flight and report its failure, if any."""
        if self._saver is not None:
            self._saver.wait()
            self._report()

    def _report(self, failed_rank: int | None = None) -> None:
        """Report this rank's background failure, or (``failed_rank``) the one every rank agreed on."""
        failure = self._saver.take_error() if self._saver is not None else None
        if failure is not None:
            label, exc = failure
            error = AsyncSaveError(f"background save of checkpoint {label!r} to {self.directory} failed: "
                                   f"{type(exc).__name__}: {exc}; it is incomplete and will not be resumed from")
            error.__cause__ = exc
        elif failed_rank is not None:
            label = self._saver.label if self._saver is not None else "?"
            error = AsyncSaveError(f"background save of checkpoint {label!r} to {self.directory} failed on rank "
                                   f"{failed_rank} (see its log); it is incomplete and will not be resumed from")
        else:
            return
        _log.error("%s", error, exc_info=error.__cause__)
        self.save_errors.append(error)
        if self.config.async_errors == "raise":
            raise error

    def _settle(self) -> None:
        """Wait for the background save in flight and make its outcome every rank's (one
        all-reduce; every rank calls this at the same step), then report it alike."""
        if self._saver is None:
            return
        self._saver.wait()
        failed = _distributed.failed_ranks(not self._saver.failed)
        if failed:
            self._report(failed_rank=failed[-1])

    def _report_prunes(self) -> None:
        """Warn, from the training thread, about each prune that failed since the last call."""
        for error in self.prune_errors[self._prunes_reported:]:
            self._prunes_reported += 1
            warnings.warn(str(error), TorporWarning, stacklevel=3)

    def on_train_step_end(self, run_context: RunContext) -> None:
        """Report a failed background save (as agreed by every rank) or prune, then save when
        due (unless an exit save ran)."""
        args = run_context.original_args()
        self._done_step = args.cur_step_num  # this step is done: a later exception does not undo it
        self._report_prunes()
        agreed = args.agreed
        if agreed is None:
            self._report()
        elif agreed.save_failed_rank is not None:
            self._report(failed_rank=agreed.save_failed_rank)
        if args.exit_saved_step == args.cur_step_num or not self.config.periodic:
            return
        if self._due(args.cur_step_num, agreed):
            self._save(run_context, Reason.PERIODIC)

    def on_train_end(self, run_context: RunContext) -> None:
        """Wait for the save in flight; save the last step if it was not saved (not after an
        exit save: that is the last).

        A background save that fails here does not count as the last step's save: the final
        save writes the step again, synchronously, under a new name (``...-v1`` if the
        failed one had the step's name), on every rank if any rank's failed. The failure is
        logged and in ``save_errors``, not raised, even with ``async_errors="raise"``: the
        final save supersedes it (and raises itself if it fails).
        """
        failed = False
        if self._saver is not None:
            before = len(self.save_errors)
            with contextlib.suppress(AsyncSaveError):
                self.wait()
            failed = len(self.save_errors) > before
        self._report_prunes()
        args = run_context.original_args()
        if args.exit_saved_step is not None or args.cur_step_num == 0:
            return
        if self._saver is not None and not _distributed.all_ok(not failed):
            self._last_step = None
        if self._last_step == args.cur_step_num:
            return
        self._save(run_context, Reason.FINAL, background=False)

    def on_train_exception(self, run_context: RunContext, exc: BaseException) -> None:
        """``exception_save``: write ``{prefix}-{epoch}_{step}_breakpoint`` with this rank's state.

        Each rank that raised writes its own full state (no barrier: the other ranks may be
        blocked in a collective); a failure to save is attached to the original exception as
        a note, never raised in its place. A step counts as done once this monitor's
        ``on_train_step_end`` has run for it, so an exception inside step N (``cur_step_num``
        already counts it, see :class:`RunArgs`) records step N-1 and one step less of the
        epoch.
        """
        if self._saver is not None:
            self._saver.wait()
            with contextlib.suppress(AsyncSaveError):
                self._report()
        if not self.config.exception_save or isinstance(exc, ResizeError):
            # a refused resize trained nothing: its state is the checkpoint it refused
            return
        args = run_context.original_args()
        unfinished = args.cur_step_num - self._done_step if self._done_step is not None else 0
        if unfinished > 0:
            args = dataclasses.replace(args, cur_step_num=args.cur_step_num - unfinished,
                                       step_in_epoch=max(0, args.step_in_epoch - unfinished))
        base = checkpoint_name(self.prefix, args.cur_epoch_num, args.step_in_epoch) + BREAKPOINT_SUFFIX
        name = unique_name(base, self._taken)
        self._taken.add(name)
        try:
            save_checkpoint(args, self.storage, name, Reason.EXCEPTION,
                            dataclasses.replace(self._options(integrated=False), collective=False),
                            RuntimeEnv.from_environ(), self.encryption)
        except Exception as save_exc:
            _log.error("breakpoint checkpoint %s not saved: %s: %s", name, type(save_exc).__name__, save_exc)
            exc.add_note(f"torpor: the breakpoint checkpoint {name!r} could not be saved: "
                         f"{type(save_exc).__name__}: {save_exc}")
            return
        self.saved.append(name)
        exc.add_note(f"torpor: breakpoint checkpoint {name!r} saved in {self.directory}")

    def _options(self, integrated: bool | None = None) -> SaveOptions:
        cfg = self.config
        return SaveOptions(
            integrated=cfg.integrated_save if integrated is None else integrated,
            network_params=cfg.save_network_params,
            trainable_params=cfg.save_trainable_params,
            saved_network=cfg.saved_network,
            append_info=cfg.append_info,
            global_batch_size=cfg.global_batch_size,
        )

    def _save(self, run_context: RunContext, reason: Reason, background: bool = True) -> None:
        args = run_context.original_args()
        name = unique_name(checkpoint_name(self.prefix, args.cur_epoch_num, args.step_in_epoch), self._taken)
        self._taken.add(name)
        env = RuntimeEnv.from_environ()
        resumed = args.resumed_from.name if args.resumed_from is not None else None
        started = time.perf_counter()
        if self._saver is not None and background:
            self._settle()
            pending = capture(args, name, reason, self._options(), env, staging=self._staging)
            storage, encryption, prune = self.storage, self.encryption, _distributed.rank() == 0

            def job() -> str:
                write_pending(pending, storage, encryption)
                if prune:
                    self._prune_reporting(name, resumed, require_complete=False)
                return name

            self._saver.submit(name, job)
            self.saved.append(name)
            self.stalls.append(time.perf_counter() - started)
            self._last_step = args.cur_step_num
            self._last_time = time.monotonic()
            return
        error: Exception | None = None
        try:
            save_checkpoint(args, self.storage, name, reason, self._options(), env, self.encryption)
        except Exception as exc:  # every rank must still reach the agreement below
            error = exc
        self._last_time = time.monotonic()
        # Every rank's manifest is written (the checkpoint is complete), or every rank knows whose is not.
        failed = _distributed.failed_ranks(error is None)
        if failed:
            raise CheckpointSaveError.of(name, self.directory, failed, error) from error
        self.saved.append(name)
        self._last_step = args.cur_step_num
        self.stalls.append(time.perf_counter() - started)
        if _distributed.rank() == 0:
            self._prune_reporting(name, resumed)
            self._report_prunes()

    def _prune_reporting(self, newest: str, resumed_from: str | None, require_complete: bool = True) -> None:
        """:meth:`_prune`, its failure recorded as a prune failure, never raised: ``newest`` is
        complete by now, so a store that refuses deletes must not fail the save or end training
        (in the background, an exception here would make the save itself look failed)."""
        try:
            self._prune(newest, resumed_from, require_complete)
        except Exception as exc:
            error = RetentionError(f"retention after checkpoint {newest!r} failed: {type(exc).__name__}: {exc}; "
                                   f"{newest!r} is complete and will be resumed from, older checkpoints may be "
                                   f"left over until the next prune")
            error.__cause__ = exc
            _log.error("%s", error)
            self.prune_errors.append(error)

    def _prune(self, newest: str, resumed_from: str | None, require_complete: bool = True) -> None:
        """Apply retention. In the background (``require_complete=False``) other ranks may
        still be uploading ``newest``; it is protected and not yet counted, so for a moment
        one checkpoint more than ``keep_checkpoint_max`` may exist."""
        checkpoints = [c for c in scan(self.storage, cache=self._cache) if in_scope(c.name, {self.prefix})]
        mine = next((c for c in checkpoints if c.name == newest), None)
        if require_complete and (mine is None or not mine.complete):
            warnings.warn(f"checkpoint {newest!r} is not complete after the save "
                          f"({mine.problem if mine else 'not listed'}); nothing pruned", TorporWarning, stacklevel=3)
            return
        protected = {newest} | ({resumed_from} if resumed_from else set())
        doomed = set(to_delete(candidates(checkpoints), self.config.retention, protected))
        if doomed:
            delete_checkpoints(self.storage, [c for c in checkpoints if c.name in doomed])
            self.deleted.extend(sorted(doomed))
