"""``OnRequestExit``: stop every rank at the same step on a signal or the GracefulExit file.

Differences from MindSpore's callback, each fixing a flaw of the seed:

* The signal handler only records the signal, **chains** to the handler installed before it
  (user handlers run; ``SIG_DFL``/``SIG_IGN`` and Python's ``KeyboardInterrupt`` handler are
  not called, since the point is to not die mid-step) and is **restored** when training ends.
* The file is watched by a background thread; the step reads a bool.
* Ranks **OR** their requests (an all-reduce MAX at the step boundary, every step or every
  ``check_every_n_steps``): one rank's SIGTERM stops all ranks after the same step. The seed
  ANDs them, so a signal reaching only the preempted node's pods never stops anything. Under
  ``Loop`` the request rides in the loop's one collective of the step (:meth:`step_facts`,
  :mod:`torpor._agreement`); evaluation and hooks driven without ``Loop`` reduce it here.
* It saves **once**, with full metadata, under the **global** rank, write-then-rename, under a
  name of its own, ``{file_name}-{epoch}_{step}`` (``Net-2_7``) where the seed always writes
  ``{file_name}.ckpt``: a second stop then never rewrites the checkpoint the run resumed
  from, and a kill part-way through it leaves that one intact (see :mod:`torpor.checkpoints`;
  a name already stored gets ``-v{n}``). Then
  (under the operator) exits with a documented code after writing a termination message
  (see :mod:`torpor.termination`: 128 + signum, 143 for SIGTERM; 75 for the file).
* It does not load ``{file_name}.ckpt`` at start as the seed does: resuming is explicit
  (``resume=`` / ``TORPOR_RESUME_FROM``), so every rank loads the same checkpoint.
* ``directory`` defaults to the run's checkpoint root (``TORPOR_CHECKPOINT_URI``, else
  ``./checkpoints``), not the seed's ``'./'``: the exit save lands where the periodic saves
  and the resume are (see :mod:`torpor._sharing`), and ``'latest'`` never walks the whole
  working directory. Its cipher and ``integrated_save`` are the run's too.
* The ``torch.export`` program is written after the checkpoint is complete, never before a
  shard: what a resume needs goes out first in a grace period, and a failed or killed export
  never costs the checkpoint.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import warnings
from types import FrameType
from typing import Any

from torpor import _distributed, _state
from torpor._agreement import Fact
from torpor._background import drain_all, warm_in_background
from torpor._callbacks import Callback, RunContext, training_run
from torpor._saving import SaveOptions, check_layout, export_only, save_checkpoint, taken_names
from torpor._sharded import layout_of
from torpor._sharing import Offer, SharedSettings
from torpor._watching import ExitFileWatcher
from torpor.checkpoints import Reason, check_name, checkpoint_name, unique_name
from torpor.crypto import Encryption, check_key
from torpor.env import DEFAULT_CHECKPOINT_URI, RuntimeEnv, given_checkpoint_uri, read_enc_key
from torpor.errors import CheckpointSaveError, TorporWarning
from torpor.storage import Storage, open_storage
from torpor.termination import (
    EXIT_FILE_REQUEST,
    SIGNAL_EXIT_BASE,
    StopReason,
    TerminationMessage,
    signal_exit_code,
    signal_from_exit_code,
    signal_name,
)

_log = logging.getLogger("torpor")
UNCATCHABLE = frozenset(int(s) for s in (signal.SIGKILL, signal.SIGSTOP))


def _check_signal(sig: object) -> int:
    if not isinstance(sig, int) or isinstance(sig, bool):
        raise ValueError(f"sig must be an int signal number, got {sig!r} ({type(sig).__name__})")
    if int(sig) in UNCATCHABLE:
        raise ValueError(f"sig={signal_name(int(sig))} cannot be caught or ignored; choose a catchable signal "
                         "such as signal.SIGTERM")
    if int(sig) not in {int(s) for s in signal.valid_signals()}:
        raise ValueError(f"sig={sig!r} is not a signal number of this platform")
    return int(sig)


def _check_path(name: str, value: object, optional: bool = False) -> str | None:
    if value is None and optional:
        return None
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    if not isinstance(value, str):
        raise ValueError(f"{name} must be a str, got {value!r} ({type(value).__name__})")
    return value


def exit_options_from_env() -> dict[str, Any]:
    """What the operator's variables say of a stop: ``TORPOR_CHECKPOINT_URI`` (when given),
    ``TORPOR_EXIT_SIGNAL``, ``TORPOR_EXIT_FILE``, ``TORPOR_EXIT_CHECK_STEPS`` and the key
    variables, as keyword arguments of :class:`OnRequestExit` — and of the framework callbacks
    that take the same ones (``torpor.transformers.TorporCallback``)."""
    env = RuntimeEnv.from_environ()
    return {
        "directory": given_checkpoint_uri(),
        "sig": env.exit_signal,
        "config_file": env.exit_file,
        "check_every_n_steps": env.exit_check_steps,
        "enc_key": read_enc_key(),
        "enc_mode": env.enc_mode or "AES-GCM",
    }


class OnRequestExit(Callback):
    """Save and stop after the current step when asked by a signal or a JSON file.

    Args:
        save_ckpt: save ``directory/rank_{rank}/{file_name}-{epoch}_{step}.ckpt`` (and its
            manifest) on exit; ``step`` is the step within ``epoch``, as periodic names.
            ``False`` leaves the stop's checkpoint to a ``CheckpointMonitor`` (its final save).
        save_export: save a ``torch.export`` program beside it (``.pt2``) from the last batch's
            inputs (rank 0), after the checkpoint is complete; it is not listed in the
            manifest (the checkpoint is complete without it) and is deleted with the
            checkpoint. A failed export is a warning, the checkpoint still counts.
        file_name: name prefix of the exit save (the seed's fixed name, now with the step).
        directory: checkpoint root, a path or ``s3://bucket/prefix``; default ``None``: the
            run's (a ``CheckpointMonitor``'s in the same run, else ``TORPOR_CHECKPOINT_URI``,
            else ``./checkpoints``). A different one than the monitor's is a ``ValueError``.
        sig: the signal that requests a stop; it must be catchable (not SIGKILL/SIGSTOP).
        config_file: JSON file whose ``{"GracefulExit": 1}`` requests a stop; missing or
            malformed is a warning only.
        check_every_n_steps: reduce the flag across ranks every this many steps (1 = every
            step; larger saves collectives, at the cost of up to n-1 extra steps). Under
            ``Loop``/``Model.train`` it sets the cadence of the loop's one per-step collective
            (the smallest of the callbacks'), which also carries "data exhausted": an epoch
            where some rank's loader has no ``len`` is checked every step anyway (see
            :mod:`torpor._agreement`).
        file_poll_seconds: how often the background thread looks at ``config_file``.
        exit_process: end the process with the documented code after the save; default
            ``None`` means only under the operator (``TORPOR_JOB`` set). The loop's own
            ``exit_process`` (``Model.train``/``Model.eval``/``Loop``), when given, wins.
        integrated_save: replicated state written by rank 0 only (see ``CheckpointMonitor``);
            default ``None``: as the run's monitor, else ``True``.
        enc_key: encrypt with this key (as ``CheckpointMonitor``); ``from_env`` reads it from
            ``TORPOR_ENC_KEY_FILE``/``TORPOR_ENC_KEY``. A key given to either callback seals
            every checkpoint of the run; two different keys are a ``ValueError``.
        enc_mode: ``AES-GCM``, ``AES-CBC`` or ``SM4-CBC``.

    Before its own save it waits for every background (``async_save``) save in flight, so
    a checkpoint being uploaded when the signal came still completes; a failure of one is
    logged, and the exit save goes ahead. If the exit save fails on any rank, every rank
    raises :class:`torpor.errors.CheckpointSaveError` (naming the failed ranks) at the same
    point instead of exiting with the stop's code: the process ends with 1 and, under the
    operator, an ``error`` termination message, so nothing reports an incomplete checkpoint
    as saved, and no rank waits for another.

    The handler stays installed until ``on_train_teardown``, after every final and
    background save is durable: a signal arriving after the last step is recorded (the run
    still completes normally) instead of killing the process half-way through the final save.

    During ``Model.eval`` it stops after the current evaluation step. Inside a training run
    (an evaluation from a callback or between epochs) the exit save holds *training's* state,
    epoch and step, and training stops at its next boundary, so a resumed run runs exactly the
    remaining steps. A stop during an evaluation without training writes no checkpoint
    (nothing was trained; a checkpoint with evaluation counters would be taken for training
    progress by ``resume='latest'``); it ends like any stop, with the documented code and a
    termination message without ``checkpoint`` (``extra: {"mode": "eval", "eval_step": n}``).

    Raises:
        ValueError: ``save_ckpt``/``save_export`` not bool, ``file_name``/``directory`` not
            str (or not a valid name), ``sig`` not an int or uncatchable, ``config_file`` not
            a str, ``check_every_n_steps`` < 1 or ``file_poll_seconds`` <= 0.
    """

    order = -100

    def __init__(
        self,
        save_ckpt: bool = True,
        save_export: bool = True,
        file_name: str = "Net",
        directory: str | None = None,
        sig: int = signal.SIGTERM,
        config_file: str | None = None,
        *,
        check_every_n_steps: int = 1,
        file_poll_seconds: float = 1.0,
        exit_process: bool | None = None,
        integrated_save: bool | None = None,
        enc_key: bytes | None = None,
        enc_mode: str = "AES-GCM",
    ) -> None:
        for name, value in (("save_ckpt", save_ckpt), ("save_export", save_export)):
            if not isinstance(value, bool):
                raise ValueError(f"{name} must be a bool, got {value!r} ({type(value).__name__})")
        if not isinstance(file_name, str):
            raise ValueError(f"file_name must be a str, got {file_name!r} ({type(file_name).__name__})")
        try:
            check_name(file_name)
        except ValueError as exc:
            raise ValueError(f"file_name={file_name!r} is not a valid checkpoint name: {exc}") from None
        given_directory = _check_path("directory", directory, optional=True)
        self.config_file = _check_path("config_file", config_file, optional=True)
        self.sig = _check_signal(sig)
        if not isinstance(check_every_n_steps, int) or isinstance(check_every_n_steps, bool) or check_every_n_steps < 1:
            raise ValueError(f"check_every_n_steps must be an int >= 1, got {check_every_n_steps!r}")
        poll = file_poll_seconds
        if not isinstance(poll, int | float) or isinstance(poll, bool) or not poll > 0:
            raise ValueError(f"file_poll_seconds must be a number > 0, got {file_poll_seconds!r}")
        if exit_process is not None and not isinstance(exit_process, bool):
            raise ValueError(f"exit_process must be a bool or None, got {exit_process!r}")
        if integrated_save is not None and not isinstance(integrated_save, bool):
            raise ValueError(f"integrated_save must be a bool or None, got {integrated_save!r}")
        self.encryption = Encryption(*check_key(enc_key, enc_mode)) if enc_key is not None else None
        """The cipher of the exit checkpoint (the run's, once a ``Loop`` shared it), or ``None``."""
        self._offered = SharedSettings(directory=given_directory, encryption=self.encryption,
                                       integrated_save=integrated_save)
        self.directory = given_directory or DEFAULT_CHECKPOINT_URI
        """Where the exit checkpoint goes (the run's, once a ``Loop`` shared it)."""
        self.save_ckpt = save_ckpt
        self.save_export = save_export
        self.file_name = file_name
        self.check_every_n_steps = check_every_n_steps
        self.file_poll_seconds = float(file_poll_seconds)
        self.exit_process = exit_process
        self.integrated_save = True if integrated_save is None else integrated_save
        self.stop_message: TerminationMessage | None = None
        """What happened at the stop (also written as the termination message)."""
        self._signum: int | None = None
        self._previous: Any = None
        self._installed = False
        self._installed_for_eval = False
        self._watcher: ExitFileWatcher | None = None
        self._storage: Storage | None = None
        self._taken: set[str] | None = None
        self._local = 0

    @classmethod
    def from_env(cls, **overrides: Any) -> OnRequestExit:
        """Configured from ``TORPOR_CHECKPOINT_URI``, ``TORPOR_EXIT_FILE``, ``TORPOR_EXIT_SIGNAL``
        and ``TORPOR_EXIT_CHECK_STEPS``; keyword arguments override them."""
        return cls(**{**exit_options_from_env(), **overrides})

    @property
    def exit_directory(self) -> str:
        """Where the exit checkpoint goes (``Loop`` resumes from here without a monitor)."""
        return self.directory

    # -- one configuration per run (torpor._sharing) -----------------------------------
    def shared_offer(self) -> Offer:
        """What this callback was given of the settings a run's savers share."""
        return Offer("OnRequestExit", self._offered)

    def adopt_shared(self, settings: SharedSettings) -> None:
        """Write where, and as, the run's other savers do, unless given otherwise."""
        directory = self._offered.directory or settings.directory or self.directory
        if directory != self.directory:
            self.directory, self._storage = directory, None
        self.encryption = self._offered.encryption or settings.encryption
        if self._offered.integrated_save is None and settings.integrated_save is not None:
            self.integrated_save = settings.integrated_save

    # -- signal and file ---------------------------------------------------------------
    def _handler(self, signum: int, frame: FrameType | None) -> None:
        self._signum = signum  # only a flag: the step boundary does the work
        previous = self._previous
        if callable(previous) and previous is not signal.default_int_handler:
            previous(signum, frame)

    def _install(self) -> None:
        if self._installed:
            return
        if threading.current_thread() is not threading.main_thread():
            warnings.warn(f"OnRequestExit: signal {signal_name(self.sig)} not handled, training does not run in "
                          "the main thread; the exit file still works", TorporWarning, stacklevel=3)
        else:
            self._previous = signal.signal(self.sig, self._handler)
            self._installed = True
        if self.config_file and self._watcher is None:
            self._watcher = ExitFileWatcher(self.config_file, self.file_poll_seconds)
            self._watcher.start()

    def _uninstall(self) -> None:
        if self._installed:
            signal.signal(self.sig, self._previous if self._previous is not None else signal.SIG_DFL)
            self._installed = False
        if self._watcher is not None:
            self._watcher.stop()
            self._watcher = None

    def _local_code(self) -> int:
        if self._watcher is not None:
            for problem in self._watcher.take_problems():
                warnings.warn(f"OnRequestExit: {problem}", TorporWarning, stacklevel=4)
        if self._signum is not None:
            return signal_exit_code(self._signum)
        if self._watcher is not None and self._watcher.requested:
            return EXIT_FILE_REQUEST
        return 0

    # -- the step boundary -------------------------------------------------------------
    def step_facts(self, run_context: RunContext) -> dict[Fact, int]:
        """This rank's requested exit code, for the loop's one collective of the step."""
        self._local = self._local_code()
        return {Fact.STOP: self._local}

    def _check(self, run_context: RunContext) -> None:
        args = run_context.original_args()
        if args.agreed is not None:  # a Loop step: its collective carried our code (step_facts)
            if args.agreed.stop:
                self._stop(run_context, args.agreed.stop, self._local)
            return
        local = self._local_code()
        if _distributed.is_initialized() and _distributed.world_size() > 1:
            if args.cur_step_num % self.check_every_n_steps:
                return
            code = _distributed.max_over_ranks(local)
        else:
            code = local
        if code:
            self._stop(run_context, code, local)

    def _stop(self, run_context: RunContext, code: int, local: int) -> None:
        if run_context.original_args().mode == "eval":
            self._stop_eval(run_context, code, local)
            return
        args = run_context.original_args()
        env = RuntimeEnv.from_environ()
        saved = None
        if self._storage is None:
            self._storage = open_storage(self.exit_directory)
        for label, exc in drain_all():  # a save in flight completes before the exit save starts
            _log.error("background save of %r failed before the exit save: %s: %s", label, type(exc).__name__, exc)
        if self._taken is None:  # a stop without on_train_begin (evaluation alone)
            self._taken = taken_names(self._storage)
        name = unique_name(checkpoint_name(self.file_name, args.cur_epoch_num, args.step_in_epoch), self._taken)
        self._taken.add(name)
        error: Exception | None = None
        if self.save_ckpt:
            try:
                save_checkpoint(args, self._storage, name, Reason.EXIT,
                                SaveOptions(integrated=self.integrated_save), env, self.encryption)
            except Exception as exc:  # every rank must still reach the agreement below
                error = exc
            saved = name
            args.exit_saved_step = args.cur_step_num  # without our save, the monitor's final save is the stop's
        # Every rank's manifest exists before any rank reports or exits, or every rank knows whose does not.
        failed = _distributed.failed_ranks(error is None)
        if failed:
            self._signum = None
            raise CheckpointSaveError.of(saved or name, self._storage.uri, failed, error) from error
        if self.save_export:  # only now: the checkpoint is complete whatever becomes of the export
            export_only(args, self._storage, name, self.encryption)
        signum = signal_from_exit_code(code) if code > SIGNAL_EXIT_BASE else None
        self.stop_message = TerminationMessage(
            reason=StopReason.SIGNAL if signum is not None else StopReason.FILE,
            exit_code=code,
            checkpoint=saved,
            step=args.cur_step_num,
            epoch=args.cur_epoch_num,
            signal=signal_name(signum) if signum is not None else None,
            local=local == code,
            rank=_distributed.rank(),
            world_size=_distributed.world_size(),
            directory=self._storage.uri,
            job=env.job,
            incarnation=env.incarnation or None,
            resumed_from=args.resumed_from.name if args.resumed_from is not None else None,
        )
        run_context.request_exit(code, self.stop_message)  # the loop's exit_process decides if the process ends
        self._signum = None

    def _stop_eval(self, eval_context: RunContext, code: int, local: int) -> None:
        """A stop at an evaluation step: save *training's* state if a training run is in
        progress (and stop it at its next boundary), else only end the evaluation."""
        eval_context.request_stop()
        training = training_run()
        if training is not None:
            self._stop(training, code, local)
            return
        env = RuntimeEnv.from_environ()
        signum = signal_from_exit_code(code) if code > SIGNAL_EXIT_BASE else None
        self.stop_message = TerminationMessage(
            reason=StopReason.SIGNAL if signum is not None else StopReason.FILE,
            exit_code=code,
            signal=signal_name(signum) if signum is not None else None,
            local=local == code,
            rank=_distributed.rank(),
            world_size=_distributed.world_size(),
            job=env.job,
            incarnation=env.incarnation or None,
            extra={"mode": "eval", "eval_step": eval_context.original_args().cur_step_num},
        )
        eval_context.request_exit(code, self.stop_message)
        self._signum = None

    # -- hooks -------------------------------------------------------------------------
    def on_train_begin(self, run_context: RunContext) -> None:
        """Install the signal handler (chained), start watching the file, open the store and
        learn the names already taken in it (rank 0 lists), so the exit save spends no time
        on either. A layout the exit save could not write correctly is refused first, on every
        rank (:class:`torpor.errors.ShardedStateError`, see :mod:`torpor._sharded`)."""
        args = run_context.original_args()
        if self.save_ckpt:
            check_layout(layout_of(_state.unwrap(args.network), args.optimizer, args.state),
                         SaveOptions(integrated=self.integrated_save))
        self._install()
        if self._storage is None:
            self._storage = open_storage(self.exit_directory)
        warm_in_background(self._storage)
        self._taken = taken_names(self._storage)

    def on_train_step_end(self, run_context: RunContext) -> None:
        """At the step boundary: OR the ranks' requests; if any, save once and stop."""
        if run_context.exit_code is None:
            self._check(run_context)

    def on_train_teardown(self, run_context: RunContext) -> None:
        """Every save is durable: restore the previous handler and stop watching the file.

        A request that came after the last step boundary (during the final save) is only
        logged: the run has finished and its last checkpoint is written.
        """
        self._uninstall()
        if self._signum is not None and run_context.exit_code is None:
            _log.info("%s arrived after the last step; the run finished and saved its last step",
                      signal_name(self._signum))
        self._signum = None

    def on_eval_begin(self, run_context: RunContext) -> None:
        """Install the handler for evaluation as for training (a nested evaluation keeps
        training's handler: it is already installed)."""
        if not self._installed and self._watcher is None:
            self._install()
            self._installed_for_eval = True

    def on_eval_step_end(self, run_context: RunContext) -> None:
        """As in training: a request stops evaluation after this step, with a save."""
        if run_context.exit_code is None:
            self._check(run_context)

    def on_eval_end(self, run_context: RunContext) -> None:
        """Restore the previous handler if this evaluation installed it (never training's)."""
        if self._installed_for_eval:
            self._installed_for_eval = False
            self._uninstall()
