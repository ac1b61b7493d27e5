"""PyTorch Lightning: torpor's stop, save, resume and exit inside ``Trainer.fit``.

One callback, nothing else to change in a Lightning script::

    import lightning as L
    import torpor.lightning

    trainer = L.Trainer(strategy="ddp", **torpor.lightning.distributed_kwargs(),
                        callbacks=[torpor.lightning.OnRequestExit.from_env()])
    trainer.fit(model, loader)          # resumes from torpor's checkpoint by itself

What it does, each time with torpor's own machinery (:class:`torpor.OnRequestExit` drives it):

* **Any rank's request stops every rank after the same step.** In ``on_train_start`` (Lightning
  installs its own SIGTERM handler right before it, in ``Trainer._run``) torpor's handler
  *replaces* Lightning's and chains to the handler that was there before Lightning's, and the
  GracefulExit file is watched from a thread. Every ``check_every_n_steps`` optimizer steps
  (``TORPOR_EXIT_CHECK_STEPS``) the ranks all-reduce their requests (MAX), in
  ``on_train_batch_end``: one rank's SIGTERM is enough. It is the step's one collective of
  :mod:`torpor._agreement`, as in :class:`torpor.Loop`: a periodic monitor's facts (a
  ``saveSeconds`` save due on some rank's clock, a failed background save) ride in it too.
  Lightning's own answer is a broadcast of rank 0's ``received_sigterm`` at *every* step
  (``_TrainingEpochLoop._broadcast_sigterm_tensor``), in which only rank 0's signal counts; with
  torpor's handler in place it would only ever carry a 0, so it is switched off for the run
  (``lightning_broadcast=False``, the default) and torpor's all-reduce every n steps is the
  only collective the stop check costs. It is started at one check and read at the next
  (``agree_late=True``, the default), so it runs beside the next step's compute rather than
  holding every step up, and the ranks stop one check after the request, still all at one
  step. ``bench/`` measures all of it.
* **The checkpoint is Lightning's own, in torpor's layout.** At the agreed step every rank writes
  ``rank_{r}/{file_name}-{epoch}_{step}.ckpt`` and its manifest (local or ``s3://``, encrypted
  with the run's key, pruned by the operator): rank 0's holds the model and everything
  ``trainer.save_checkpoint`` would (``dump_checkpoint()``: optimizer and scheduler states, loop
  progress, callbacks' states, hyper-parameters), every rank's its own generators and position.
  What cannot load with ``torch.load(weights_only=True)`` is refused at ``on_train_start``,
  naming its place (``state['lightning']['hyper_parameters']['fn']``), not at a resume.
* **Periodic saves** (optional): ``from_env`` adds a :class:`torpor.CheckpointMonitor` when
  the operator's ``TORPOR_SAVE_STEPS``/``TORPOR_SAVE_SECONDS`` are set, writing the same
  checkpoint as the exit save under its own prefix (``CKP-{epoch}_{step}``), with its
  retention, and a final save when ``fit`` ends without a stop.
* **Resume is automatic**, as Lightning's own SLURM requeue resumes from its ``hpc`` checkpoint:
  in ``setup`` (the process group exists, the optimizers not yet), every rank loads the
  checkpoint torpor picks (``TORPOR_RESUME_FROM`` under the operator, else the newest complete
  one of this ``file_name`` or the monitor's ``prefix``; a damaged one falls back to the next
  older, all ranks alike) and hands it to Lightning's checkpoint connector, which restores
  model, optimizers, schedulers, loops and callbacks from it as from ``fit(ckpt_path=...)``. A
  ``ckpt_path`` passed to ``fit`` still wins. A stop in the middle of an epoch resumes exactly:
  the generators are restored and the batches that epoch had already trained on are passed
  over by index, without loading them (a ``DataLoader`` with a batch sampler; a loader with
  ``state_dict``/``load_state_dict`` is left to Lightning, which restores it itself).
* **The exit is torpor's**: once ``fit`` has torn down (``teardown`` hook), under the operator
  (``TORPOR_JOB`` set, or ``exit_process=True``) the termination message is written and the
  process ends with 143 after a saved SIGTERM (75 for the file); a run that ends without a stop
  writes ``completed``; an exception writes ``error``. The ``SystemExit`` passes through
  Lightning's interrupt handling, as Lightning's own ``SIGTERMException`` does: loggers are
  finalized with status ``failed``.

Limits: DDP and single-device strategies only (FSDP/DeepSpeed checkpoints are sharded, and
Lightning's dump of them is a collective of its own); no ``torch.export`` program
(``save_export`` is refused: a Lightning batch has no fixed shape torpor could trace); with
``min_epochs``/``min_steps`` not yet reached Lightning refuses to stop, so keep them 0 under
preemption.
"""

from __future__ import annotations

import logging
import math
import os
import signal
import warnings
from collections.abc import Iterator, Mapping
from typing import Any

try:
    import lightning.pytorch as pl
    from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy
except ModuleNotFoundError as missing:  # the optional extra is not installed
    raise ModuleNotFoundError(f"torpor.lightning needs Lightning ({missing}): pip install 'torpor[lightning]'",
                              name=missing.name) from missing
from torch.utils.data import DataLoader

from torpor import _distributed, _exit, _monitor, _resuming
from torpor._agreement import UNCHECKED, Agreed, decode, encode, merge
from torpor._background import drain_all
from torpor._callbacks import RunArgs, RunContext
from torpor._loading import LoadedCheckpoint, load_checkpoint
from torpor._loop import _prefixes_of, exit_if_requested, exit_process_of
from torpor._sharing import route_options, share_settings
from torpor._user_state import check_loadable
from torpor.env import RuntimeEnv
from torpor.errors import TorporWarning
from torpor.termination import (
    EXIT_COMPLETED,
    EXIT_ERROR,
    StopReason,
    TerminationMessage,
    write_termination_message,
)

__all__ = ["OnRequestExit", "distributed_kwargs"]

_log = logging.getLogger("torpor")
STATE_KEY = "lightning"
"""The ``state=`` key under which Lightning's checkpoint (without its ``state_dict``) is saved."""


def distributed_kwargs(environ: Mapping[str, str] | None = None) -> dict[str, int]:
    """``devices`` and ``num_nodes`` for ``Trainer`` from the launcher's variables.

    One process per pod (the operator's default) is ``devices=1, num_nodes=WORLD_SIZE``; with
    ``procsPerPod``/``torpor.run``/``torchrun`` ``LOCAL_WORLD_SIZE`` processes share a node.
    Lightning's ``LightningEnvironment`` then numbers the ranks ``NODE_RANK * devices + LOCAL_RANK``,
    as the operator does. Alone: ``devices=1, num_nodes=1``.

    Raises:
        ValueError: ``WORLD_SIZE`` is not a multiple of ``LOCAL_WORLD_SIZE`` (or either is not a
            positive int); the message names the variable and its value.
    """
    env = os.environ if environ is None else environ
    values = {}
    for name in ("WORLD_SIZE", "LOCAL_WORLD_SIZE"):
        raw = env.get(name, "1")
        try:
            values[name] = int(raw)
        except ValueError:
            values[name] = 0
        if values[name] < 1:
            raise ValueError(f"{name} must be a positive int, got {raw!r}")
    world, local = values["WORLD_SIZE"], values["LOCAL_WORLD_SIZE"]
    if world % local:
        raise ValueError(f"WORLD_SIZE={world} is not a multiple of LOCAL_WORLD_SIZE={local}")
    return {"devices": local, "num_nodes": world // local}


class _LightningState:
    """Lightning's checkpoint as a ``state=`` object of torpor's save (``state['lightning']``).

    ``state_dict()`` is ``dump_checkpoint()`` without ``state_dict``: torpor saves the weights as
    its model, once, and puts them back in the dict at resume.
    """

    def __init__(self, trainer: pl.Trainer) -> None:
        self.trainer = trainer
        self.loaded: dict[str, Any] | None = None

    def state_dict(self) -> dict[str, Any]:
        checkpoint = self.trainer._checkpoint_connector.dump_checkpoint(weights_only=False)
        checkpoint.pop("state_dict", None)
        return checkpoint

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.loaded = dict(state)


class _SkipFirst:
    """A batch sampler whose first pass starts after ``skip`` batches (by index: none is loaded).

    Its length stays the full epoch's: Lightning counts the skipped batches as fetched already.
    """

    def __init__(self, inner: Any, skip: int) -> None:
        self.inner, self.skip = inner, skip

    def __len__(self) -> int:
        return len(self.inner)

    def __iter__(self) -> Iterator[Any]:
        skip, self.skip = self.skip, 0
        iterator = iter(self.inner)
        for _ in range(skip):
            next(iterator, None)
        yield from iterator

    def __getattr__(self, name: str) -> Any:  # sampler, batch_size, drop_last, set_epoch of the inner one
        return getattr(self.inner, name)


class OnRequestExit(pl.Callback):
    """Stop every rank at one step on SIGTERM or the GracefulExit file, save, resume, exit.

    Args:
        resume: what ``setup`` resumes from: ``'latest'`` (default: ``TORPOR_RESUME_FROM`` if set,
            else the newest complete checkpoint of ``file_name``, else a fresh start), a
            checkpoint name or path (loaded or raises), or ``None`` (never).
        lightning_broadcast: keep Lightning's per-step broadcast of rank 0's SIGTERM flag
            (default ``False``: with torpor's handler in place it can only carry 0).
        agree_late: read each check's all-reduce at the next check (default ``True``): it runs
            beside a step's compute instead of holding every step up, and every rank still acts
            at one step — one check after the request (``torpor._distributed.LateMax``).
            ``False``: a blocking all-reduce, acted on at the step it is made.
        exit: a :class:`torpor.OnRequestExit` to drive (``from_env`` makes one); else one is made
            from ``options``.
        monitor: a :class:`torpor.CheckpointMonitor` for periodic saves (and a final one when
            ``fit`` ends without a stop), or ``None``; it writes where, and as, the exit save does
            (one directory, one cipher: :mod:`torpor._sharing`) and its facts ride in the exit's
            agreement, so it adds no collective of its own at a step that does not save.
        **options: :class:`torpor.OnRequestExit`'s (``file_name``, ``directory``, ``sig``,
            ``config_file``, ``check_every_n_steps``, ``file_poll_seconds``, ``exit_process``,
            ``integrated_save``, ``enc_key``, ``enc_mode``, ``save_ckpt``), checked by it.

    Raises:
        ValueError: a bad option (the message names it and its value), ``save_export=True``,
            ``resume`` not a str or ``None``, ``lightning_broadcast`` not a bool, ``monitor`` not a
            ``CheckpointMonitor``; the exit and the monitor given different directories or keys;
            at ``setup``, a strategy other than DDP or a single device.
        TypeError: an unknown option; at ``on_train_start``, a part of Lightning's checkpoint that
            ``weights_only`` loading would refuse (the message names where it is).
    """

    def __init__(self, *, resume: str | None = "latest", lightning_broadcast: bool = False,
                 exit: _exit.OnRequestExit | None = None, monitor: _monitor.CheckpointMonitor | None = None,
                 agree_late: bool = True, **options: Any) -> None:
        if exit is not None and not isinstance(exit, _exit.OnRequestExit):
            raise ValueError(f"exit must be a torpor.OnRequestExit or None, got {exit!r}")
        if options.get("save_export") or (exit is not None and exit.save_export):
            raise ValueError("save_export=True is not supported by torpor.lightning (a Lightning batch has no "
                             "fixed inputs to trace a torch.export program with); export from the checkpoint")
        if exit is not None and options:
            raise ValueError(f"pass either exit= or OnRequestExit options, not both (got {sorted(options)})")
        if resume is not None and (not isinstance(resume, str) or not resume):
            raise ValueError(f"resume must be 'latest', a checkpoint name or path, or None, got {resume!r}")
        if not isinstance(lightning_broadcast, bool):
            raise ValueError(f"lightning_broadcast must be a bool, got {lightning_broadcast!r}")
        if not isinstance(agree_late, bool):
            raise ValueError(f"agree_late must be a bool, got {agree_late!r}")
        if monitor is not None and not isinstance(monitor, _monitor.CheckpointMonitor):
            raise ValueError(f"monitor must be a torpor.CheckpointMonitor or None, got {monitor!r}")
        self.exit = exit if exit is not None else _exit.OnRequestExit(**{**options, "save_export": False})
        """The torpor callback that handles the signal and file, agrees, saves and reports."""
        self.monitor = monitor
        """The periodic and final saves (``saveSteps``/``saveSeconds``), or ``None``."""
        self._savers: list[Any] = [self.exit, *([monitor] if monitor is not None else [])]
        share_settings(self._savers, RuntimeEnv.from_environ().checkpoint_uri)  # one directory, one cipher
        self.resume = resume
        self.lightning_broadcast = lightning_broadcast
        self.agree_late = agree_late
        self._late = _distributed.LateMax()
        self.loaded: LoadedCheckpoint | None = None
        """What ``setup`` resumed from, or ``None``."""
        self._ctx: RunContext | None = None
        self._last_step = -1
        self._patched_loop: Any = None
        self._torn_down = False

    @classmethod
    def from_env(cls, *, resume: str | None = "latest", lightning_broadcast: bool = False,
                 agree_late: bool = True, **overrides: Any) -> OnRequestExit:
        """Configured by the operator's ``TORPOR_*`` variables, as :func:`torpor.callbacks_from_env`.

        The :class:`torpor.OnRequestExit` always; a :class:`torpor.CheckpointMonitor` (periodic saves
        every ``TORPOR_SAVE_STEPS`` steps or ``TORPOR_SAVE_SECONDS`` seconds, retention of its own
        prefix, a final save at the end of ``fit``) when either variable is set (the operator always
        sets both, from ``spec.checkpoint.saveSteps``/``saveSeconds``, 0 when not given) or an option
        only the monitor takes is passed (``save_checkpoint_steps=50``, ``prefix=``...). Unlike
        ``callbacks_from_env``, whose monitor saves every step when neither variable is set, a
        Lightning script run by hand gets no periodic saves it did not ask for: Lightning's own
        ``ModelCheckpoint`` is the usual tool there. Keyword arguments are routed to whichever
        callback takes them (``directory``, ``enc_key``, ``enc_mode``, ``integrated_save`` to both).

        Raises:
            TypeError: a keyword neither callback takes (the message names it).
            ValueError: ``save_export=True``; a bad value (the message names the option).
        """
        if overrides.get("save_export"):
            raise ValueError("save_export=True is not supported by torpor.lightning")
        exit_options, monitor_options = route_options({**overrides, "save_export": False}, _exit.OnRequestExit,
                                                      _monitor.CheckpointMonitor, caller="OnRequestExit.from_env")
        env = RuntimeEnv.from_environ()
        monitor_only = set(monitor_options) - set(exit_options)
        periodic = env.save_steps is not None or env.save_seconds > 0 or bool(monitor_only)
        return cls(resume=resume, lightning_broadcast=lightning_broadcast, agree_late=agree_late,
                   exit=_exit.OnRequestExit.from_env(**exit_options),
                   monitor=_monitor.CheckpointMonitor.from_env(**monitor_options) if periodic else None)

    @property
    def stop_message(self) -> TerminationMessage | None:
        """What happened at the stop (also the termination message), or ``None``."""
        return self.exit.stop_message

    @property
    def exit_code(self) -> int | None:
        """The stop's exit code (143 after a SIGTERM), or ``None`` if no stop happened."""
        return self._ctx.exit_code if self._ctx is not None else None

    # -- resume ------------------------------------------------------------------------
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Load torpor's checkpoint on every rank and hand it to Lightning's restore."""
        if stage != "fit":
            return
        if not isinstance(trainer.strategy, DDPStrategy | SingleDeviceStrategy):
            raise ValueError(f"strategy={type(trainer.strategy).__name__} is not supported by torpor.lightning: use "
                             "'ddp' (or one device); sharded strategies write checkpoints torpor cannot lay out")
        holder = _LightningState(trainer)
        self._ctx = RunContext(RunArgs(network=pl_module, state={STATE_KEY: holder}))
        self._last_step, self._torn_down = -1, False
        if self.resume is None:
            return
        enc = self.exit.encryption
        loaded = load_checkpoint(self.resume, pl_module, directory=self.exit.directory,
                                 enc_key=enc.key if enc is not None else None,
                                 enc_mode=enc.mode if enc is not None else None,
                                 state={STATE_KEY: holder}, prefixes=_prefixes_of(self._savers), restore_rng=False)
        if loaded is None or holder.loaded is None:
            return
        checkpoint = holder.loaded
        checkpoint["state_dict"] = pl_module.state_dict()
        # Lightning's resume_start(None) leaves this alone; restore_model/callbacks/training_state read it.
        trainer._checkpoint_connector._loaded_checkpoint = checkpoint
        self.loaded = loaded
        self._ctx.original_args().resumed_from = loaded
        _log.info("resuming Lightning from torpor checkpoint %r (step %d)", loaded.name, loaded.step)

    # -- training ----------------------------------------------------------------------
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Take SIGTERM over from Lightning, check the checkpoint can be saved, continue the data."""
        ctx = self._context(pl_module)
        args = ctx.original_args()
        args.train_network = trainer.strategy.model
        args.train_dataset = trainer.train_dataloader
        check_loadable(args.state[STATE_KEY].state_dict(), f"state[{STATE_KEY!r}]")
        lightning_handler = signal.getsignal(self.exit.sig)
        self.exit.on_train_begin(ctx)  # installs the handler (chained), the file watcher, opens the store
        if self.monitor is not None:
            self.monitor.on_train_begin(ctx)
        if self.exit._installed:
            # Chain to what was there before Lightning's handler, never to Lightning's: it broadcasts
            # from inside the signal handler and kills the launcher's children.
            original = trainer._signal_connector._original_handlers.get(self.exit.sig, lightning_handler)
            self.exit._previous = original
            if not self.lightning_broadcast:
                loop = trainer.fit_loop.epoch_loop
                loop._broadcast_sigterm_tensor = _no_broadcast
                self._patched_loop = loop
            if self.exit.sig == signal.SIGTERM and getattr(trainer, "received_sigterm", False):
                # a SIGTERM between Lightning's handler and ours (sanity check, loaders' setup):
                # Lightning only flagged it; it becomes torpor's request, agreed at the first check
                self.exit._signum = signal.SIGTERM
                trainer.received_sigterm = False  # Lightning would raise on this rank alone
        self._last_step = trainer.global_step  # the first boundary is the first optimizer step from here
        if self.loaded is not None:
            self._continue_epoch(trainer, self.loaded)
            if self.loaded.rng is not None:
                self.loaded.rng.restore(_resuming.loader_generators(trainer.train_dataloader))

    def _continue_epoch(self, trainer: pl.Trainer, loaded: LoadedCheckpoint) -> None:
        """Pass over the batches the resumed epoch had trained on, by index (the data is not loaded)."""
        skip = loaded.step_in_epoch
        if not 0 < skip < (loaded.batch_num or math.inf):
            return
        combined = trainer.fit_loop._combined_loader
        loaders = list(combined.flattened) if combined is not None else []
        if loaders and all(callable(getattr(dl, "load_state_dict", None)) for dl in loaders):
            return  # resumable loaders: Lightning restored their position itself
        for dl in loaders:
            if not isinstance(dl, DataLoader) or dl.batch_sampler is None:
                warnings.warn(f"torpor.lightning: resumed in the middle of epoch {loaded.epoch} and the train loader "
                              f"{type(dl).__name__} has no batch sampler to skip {skip} batches by; it starts the "
                              "epoch over (give it state_dict/load_state_dict)", TorporWarning, stacklevel=2)
                return
            object.__setattr__(dl, "batch_sampler", _SkipFirst(dl.batch_sampler, skip))  # DataLoader forbids setattr
        iter(trainer.fit_loop._data_fetcher)  # the iterator made in setup_data did not skip

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        """At an optimizer step's boundary: every n steps the ranks agree; on a request, save and stop."""
        ctx = self._context(pl_module)
        step = trainer.global_step
        if step == self._last_step:  # accumulating gradients: no optimizer step, no boundary
            return
        self._last_step = step
        args = ctx.original_args()
        args.cur_step_num = step
        args.cur_epoch_num = trainer.current_epoch + 1
        args.step_in_epoch = batch_idx + 1
        batches = trainer.num_training_batches
        args.batch_num = int(batches) if batches != math.inf else None
        args.net_outputs = outputs.get("loss") if isinstance(outputs, Mapping) else outputs
        if ctx.exit_code is None:
            args.agreed = self._agree(ctx, step)
            try:
                self.exit.on_train_step_end(ctx)  # on an agreed stop: the exit save and the stop message
                if self.monitor is not None:
                    self.monitor.on_train_step_end(ctx)  # a periodic save when due (none at an exit save's step)
            finally:
                args.agreed = None
            if self._late_check(step) and ctx.exit_code is None:
                # this check's facts, taken after the savers acted on the last one's (a seconds-save
                # made now is not due again), go out now and are read at the next check
                self._late.start(encode(merge(*(saver.step_facts(ctx) for saver in self._savers))))
        if ctx.exit_code is not None:
            trainer.should_stop = True

    def _agree(self, ctx: RunContext, step: int) -> Agreed:
        """The step's one collective, as :class:`torpor.Loop` makes it (:mod:`torpor._agreement`).

        Every ``check_every_n_steps`` steps the savers' local facts (this rank's stop request; the
        monitor's seconds-save due on this rank's clock, its background save failed) go into one
        all-reduce MAX; in between nothing is decided (``UNCHECKED``). One process agrees with
        itself at every step. Lightning ends the epoch itself, so ``EXHAUSTED`` is never sent.
        """
        distributed = _distributed.is_initialized() and _distributed.world_size() > 1
        if distributed and step % self.exit.check_every_n_steps:
            return UNCHECKED
        if distributed and self.agree_late:
            agreed = self._late.take()  # the last check's facts (started there: :meth:`_late_check`)
            return decode(agreed) if agreed is not None else UNCHECKED
        vector = encode(merge(*(saver.step_facts(ctx) for saver in self._savers)))
        return decode(_distributed.max_each(vector) if distributed else vector)

    def _late_check(self, step: int) -> bool:
        """Whether this step starts a late agreement (a check step of a distributed run)."""
        return (self.agree_late and _distributed.is_initialized() and _distributed.world_size() > 1
                and not step % self.exit.check_every_n_steps)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """The monitor's final save; then every save is durable and the handler is restored,
        before Lightning restores its own originals (in its teardown)."""
        self._late.take()  # a check still in flight: every rank started it, every rank waits for it
        if self.monitor is not None and self._ctx is not None:
            self.monitor.on_train_end(self._ctx)
        self._restore_lightning()

    def _restore_lightning(self) -> None:
        if self._patched_loop is not None:
            vars(self._patched_loop).pop("_broadcast_sigterm_tensor", None)
            self._patched_loop = None
        if self._ctx is not None and not self._torn_down:
            self._torn_down = True
            for label, exc in drain_all():
                _log.error("background save of %r failed at the end of training: %s: %s",
                           label, type(exc).__name__, exc)
            for saver in reversed(self._savers):
                saver.on_train_teardown(self._ctx)

    # -- the end -----------------------------------------------------------------------
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """After ``fit`` has torn down: the stop's exit (code and message), or ``completed``."""
        if stage != "fit" or self._ctx is None:
            return
        self._restore_lightning()
        ctx, env = self._ctx, RuntimeEnv.from_environ()
        if not exit_process_of(None, [self.exit], env) or trainer.state.status.value == "interrupted":
            return
        if ctx.exit_code is not None:
            exit_if_requested(ctx, env)  # message, process group down, SystemExit(code)
        write_termination_message(self._message(trainer, StopReason.COMPLETED, EXIT_COMPLETED), env.termination_log)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        """An exception ended ``fit``: restore the handler and, under the operator, say ``error``."""
        if self.monitor is not None and self._ctx is not None and not isinstance(exception, SystemExit):
            self.monitor.on_train_exception(self._ctx, exception)  # waits for a background save; exception_save
        self._restore_lightning()
        if isinstance(exception, SystemExit) or self._ctx is None:
            return  # our own exit (or Lightning's), already reported
        env = RuntimeEnv.from_environ()
        if exit_process_of(None, [self.exit], env):
            message = self._message(trainer, StopReason.ERROR, EXIT_ERROR,
                                    error=f"{type(exception).__name__}: {exception}")
            write_termination_message(message, env.termination_log)

    def _message(self, trainer: pl.Trainer, reason: StopReason, code: int, **extra: Any) -> TerminationMessage:
        env = RuntimeEnv.from_environ()
        args = self._ctx.original_args() if self._ctx is not None else RunArgs()
        return TerminationMessage(
            reason=reason, exit_code=code, step=trainer.global_step, epoch=args.cur_epoch_num,
            rank=_distributed.rank(), world_size=_distributed.world_size(), job=env.job,
            incarnation=env.incarnation or None, resumed_from=self.loaded.name if self.loaded is not None else None,
            **extra)

    def _context(self, pl_module: pl.LightningModule) -> RunContext:
        if self._ctx is None:
            raise RuntimeError("torpor.lightning.OnRequestExit: a training hook ran before setup(stage='fit')")
        return self._ctx

    def state_dict(self) -> dict[str, Any]:
        """Nothing of its own: the stop is not state a resumed run should carry."""
        return {}


def _no_broadcast() -> None:
    """Lightning's per-step SIGTERM broadcast, switched off while torpor handles the signal."""
