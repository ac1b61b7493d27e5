"""The plain-loop form: the seeds' callbacks driven from a user's own ``for`` loops.

``Model.train`` is built on it too, so both forms stop, save and resume identically::

    loop = torpor.Loop(net, opt, callbacks=torpor.callbacks_from_env(), resume="latest")  # +1
    for epoch in loop.epochs(10):                       # was: for epoch in range(10)
        for x, y in loop.batches(loader):               # was: for x, y in loader
            opt.zero_grad(); loss = loss_fn(net(x), y); loss.backward(); opt.step()
            loop.step_end(loss, inputs=(x,))           # +1

Written as ``with torpor.Loop(...) as loop:``, an exception escaping the body first reaches
the callbacks' ``on_train_exception`` (``CheckpointMonitor(exception_save=True)`` writes its
breakpoint checkpoint there), then, with ``exit_process``, the ``error`` termination message is
written, then the caller gets the exception unchanged (``Model.train`` is this form).

How a run ends: when ``epochs()`` runs out (or a stop was requested) it calls :meth:`Loop.end`:
``on_train_end`` (the monitor's final save), then ``on_train_teardown`` (every background save
waited for, signal handlers restored), then :meth:`Loop.finish`. A ``break`` out of ``epochs()``
closes the generator: the saves in flight still finish and the handlers are restored, but
nothing that needs the other ranks runs there (no final save); ``loop.end()`` after the loop
ends the run in full, and the ``with`` form calls :meth:`Loop.finish` on leaving the block.

On resume, ``epochs`` starts at the saved epoch and ``batches`` skips the batches that epoch
had already consumed (by index, without loading them, for a ``DataLoader`` over a map-style
dataset: see :mod:`torpor._resuming`), with the generators rewound so the data order and every
random draw match an uninterrupted run. A loader passed in ``state=`` keeps its own position
instead: it continues where it was saved, and nothing is skipped (:mod:`torpor._user_state`).
On another world size (or in an epoch already resized) the epoch continues with the rest of its
``DistributedSampler`` order, dealt over this run's ranks (:mod:`torpor._resharding`).
"""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from torpor import _distributed, _resharding, _resuming, _state, _user_state
from torpor._agreement import EpochFeed, Fact, merge
from torpor._background import drain_all
from torpor._callbacks import (
    Callback,
    RunArgs,
    RunContext,
    as_callback_list,
    call_hooks,
    enter_training,
    leave_training,
)
from torpor._loading import LoadedCheckpoint, load_checkpoint
from torpor._sharing import SharedSettings, share_settings
from torpor.env import RuntimeEnv
from torpor.termination import (
    EXIT_COMPLETED,
    StopReason,
    TerminationMessage,
    write_termination_message,
)

_log = logging.getLogger("torpor")


def exit_process_of(explicit: bool | None, callbacks: list[Callback], env: RuntimeEnv) -> bool:
    """Whether a requested stop ends the process: one rule for ``Model.train``, ``Model.eval``
    and ``Loop``.

    The loop's own ``exit_process`` when given; else the ``exit_process`` a callback was given
    (``OnRequestExit(exit_process=...)``); else only under the operator (``TORPOR_JOB`` set).
    When it is on, a stop ends the process with its code and termination message, and a run
    that ends without a stop writes ``completed``; when it is off, nothing is written and the
    call returns (``run_context.exit_code`` tells why it stopped).

    Raises:
        ValueError: ``explicit`` is neither a bool nor ``None``.
    """
    if explicit is not None and not isinstance(explicit, bool):
        raise ValueError(f"exit_process must be a bool or None, got {explicit!r}")
    if explicit is not None:
        return explicit
    for cb in callbacks:
        value = getattr(cb, "exit_process", None)
        if isinstance(value, bool):
            return value
    return env.under_operator


def _prefixes_of(callbacks: list[Callback]) -> set[str] | None:
    """The name prefixes this run saves under (monitors' ``prefix``, the exit ``file_name``).

    ``'latest'`` considers only these, so another experiment's checkpoints in a shared
    directory are never resumed; ``None`` (no saver among the callbacks): every name.
    """
    found = {str(value) for cb in callbacks for attr in ("prefix", "file_name")
             if isinstance(value := getattr(cb, attr, None), str) and value}
    return found or None


def _global_batch_size_of(callbacks: list[Callback]) -> int | None:
    """The ``global_batch_size`` a monitor was configured with (the job's global batch), if any."""
    return next((int(size) for cb in callbacks
                 if isinstance(size := getattr(getattr(cb, "config", None), "global_batch_size", None), int)
                 and size), None)


def exit_if_requested(ctx: RunContext, env: RuntimeEnv) -> None:
    """After every end hook: write the termination message and raise ``SystemExit(code)``.

    ``SystemExit`` rather than ``os._exit``, so ``finally`` blocks and ``atexit`` handlers of
    the user's script still run; the process group is torn down first so that no rank is left
    in a half-destroyed group.
    """
    if ctx.exit_code is None:
        return
    if ctx.termination_message is not None:
        write_termination_message(ctx.termination_message, env.termination_log)
    _distributed.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    raise SystemExit(ctx.exit_code)


class Loop:
    """Drives callbacks from a user's loop; see the module docstring for the five lines.

    Used as a context manager (``with torpor.Loop(...) as loop:``), an exception escaping the
    loop body reaches the callbacks' ``on_train_exception`` first (``exception_save``), then
    the caller, unchanged.
    """

    def __init__(
        self,
        network: Any,
        optimizer: Any = None,
        *,
        loss_fn: Any = None,
        lr_scheduler: Any = None,
        callbacks: Callback | Iterable[Callback] | None = None,
        resume: str | None = None,
        exit_process: bool | None = None,
        state: Mapping[str, Any] | None = None,
    ) -> None:
        """Set up the run.

        Args:
            network: the module being trained (DDP-wrapped or not).
            optimizer: its optimizer (saved and restored).
            loss_fn: recorded for callbacks.
            lr_scheduler: saved and restored if given.
            callbacks: a callback, a list, or ``None``. Their savers share one directory,
                cipher and ``integrated_save`` (see :mod:`torpor._sharing`).
            resume: ``None`` (fresh start), ``'latest'`` (newest complete checkpoint, or a
                fresh start if there is none; ``TORPOR_RESUME_FROM`` overrides it), a
                checkpoint name or a path/URI.
            exit_process: end the process with the documented exit code after a requested
                stop (and write ``completed`` after a run without one); default: as an
                ``OnRequestExit(exit_process=...)`` among the callbacks says, else only under
                the operator (``TORPOR_JOB`` set). See :func:`exit_process_of`.
            state: everything else to save and restore, by name: objects with
                ``state_dict``/``load_state_dict`` (a ``GradScaler``, more optimizers and
                schedulers, an EMA) or ``torch.Generator``; see :mod:`torpor._user_state`.
                The loader that ``batches()`` iterates may be one of them (torchdata's
                ``StatefulDataLoader``): it then keeps its own position, and nothing is
                skipped for it on resume. A key missing from the resumed checkpoint raises
                ``KeyError``.

        Raises:
            ValueError: two callbacks were given different directories, keys or
                ``integrated_save`` (the message names both).
            TypeError: ``state`` is not a dict of such objects (the message names the key).
        """
        self.env = RuntimeEnv.from_environ()
        self.callbacks = as_callback_list(callbacks)
        self.shared: SharedSettings = share_settings(self.callbacks, self.env.checkpoint_uri)
        """Where every checkpoint of this run goes and is resumed from, and its cipher."""
        self.args = RunArgs(train_network=network, network=_state.unwrap(network), optimizer=optimizer,
                            loss_fn=loss_fn, lr_scheduler=lr_scheduler, state=_user_state.validate(state))
        self.run_context = RunContext(self.args)
        self.resume = resume
        self.exit_process = exit_process_of(exit_process, self.callbacks, self.env)
        self.loaded: LoadedCheckpoint | None = None
        self._skip = 0
        self._remainder = False
        self._resized = False
        self._batch_checked = False
        """Whether ``global_batch_size`` was checked against the loader (once, at the first epoch)."""
        self._started = False
        self._epoch_open = False
        self._feed: EpochFeed | None = None
        self._managed = False
        self._ended = False
        self._torn_down = False
        self._finished = False

    def __enter__(self) -> Loop:
        self._managed = True
        return self

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> bool:
        try:
            if isinstance(exc, Exception):
                self.handle_exception(exc)
                if self.exit_process:
                    write_termination_message(self.error_message(exc), self.env.termination_log)
        finally:
            self._teardown()  # after on_train_exception: the breakpoint save still had the handler
        if exc is None and self._started:
            self.finish()  # also after a break out of epochs(): the stop's exit, or "completed"
        return False  # never swallow: the caller gets the original exception and traceback

    def handle_exception(self, exc: BaseException) -> None:
        """Run every callback's ``on_train_exception`` once for ``exc`` (it is not raised here).

        A callback that fails while handling it adds a note to ``exc`` instead of replacing it.
        """
        if getattr(exc, "_torpor_handled", False):
            return
        with contextlib.suppress(AttributeError, TypeError):
            exc._torpor_handled = True  # type: ignore[attr-defined]
        for cb in self.callbacks:
            try:
                cb.on_train_exception(self.run_context, exc)
            except Exception as hook_exc:
                exc.add_note(f"torpor: {type(cb).__name__}.on_train_exception failed: "
                             f"{type(hook_exc).__name__}: {hook_exc}")

    @property
    def should_stop(self) -> bool:
        """Whether a callback requested a stop."""
        return self.run_context.get_stop_requested()

    def _restore(self) -> None:
        if self.resume is None:
            return
        enc = self.shared.encryption
        loaded = load_checkpoint(self.resume, self.args.network, self.args.optimizer, self.args.lr_scheduler,
                                 directory=self.shared.directory,
                                 enc_key=enc.key if enc is not None else None,
                                 enc_mode=enc.mode if enc is not None else None, state=self.args.state,
                                 prefixes=_prefixes_of(self.callbacks))
        if loaded is None:
            return
        self.loaded = loaded
        self.args.resumed_from = loaded
        self.args.cur_step_num = loaded.step
        world = _distributed.world_size()
        self._resized = loaded.world_size != world
        how = _resharding.continuation(loaded.step_in_epoch, loaded.batch_num, loaded.position, loaded.world_size,
                                       world)
        finished_epoch = loaded.batch_num is not None and loaded.step_in_epoch >= loaded.batch_num
        if how is _resharding.Continuation.NEW_EPOCH:
            self.args.cur_epoch_num = loaded.epoch if finished_epoch else loaded.epoch - 1
            self._skip = 0
        else:
            self.args.cur_epoch_num = loaded.epoch - 1
            self._skip = loaded.step_in_epoch
            self._remainder = how is _resharding.Continuation.REMAINDER

    def begin(self, epoch_num: int, train_dataset: Any = None) -> None:
        """Resume if asked, then ``on_train_begin`` (``epochs`` calls it for you)."""
        if self._started:
            return
        self._started = True
        if _distributed.is_initialized():
            _distributed.tear_down_at_exit()  # also for a group the script made itself
        self.args.epoch_num = epoch_num
        self.args.mode = "train"
        if train_dataset is not None:
            self.args.train_dataset = train_dataset
        self._restore()
        self.args.run_token = _distributed.agreed_token(
            f"{self.env.job}#{self.env.incarnation}" if self.env.job else "")
        enter_training(self.run_context)  # a nested Model.eval's stop saves this run's state
        call_hooks(self.callbacks, "on_train_begin", self.run_context)

    def epochs(self, epoch_num: int) -> Iterator[int]:
        """Yield epoch numbers from 1 (or from the resumed epoch) to ``epoch_num``.

        Runs ``on_train_begin``, the epoch hooks and :meth:`end`, and ends the process after a
        requested stop when ``exit_process`` is on. Left with ``break`` (or by an exception in
        the loop body) it finishes the saves in flight and restores the signal handlers, and
        runs nothing that needs the other ranks (see the module docstring).
        """
        self.begin(epoch_num)
        first = self.args.cur_epoch_num + 1
        try:
            for epoch in range(first, epoch_num + 1):
                if self.should_stop:
                    break
                self.args.cur_epoch_num = epoch
                if self._skip == 0:
                    self.args.step_in_epoch = 0
                self._epoch_open = True
                call_hooks(self.callbacks, "on_train_epoch_begin", self.run_context)
                yield epoch
                self._epoch_open = False
                call_hooks(self.callbacks, "on_train_epoch_end", self.run_context)
        except BaseException:  # closed by a break (GeneratorExit), or an epoch hook raised
            self._left_early()
            raise
        self.end()

    def _left_early(self) -> None:
        """``epochs()`` was closed from outside (a ``break``, an exception in the loop body) or
        an epoch hook raised.

        Which of the two is unknowable here, and other ranks may be anywhere, so only local
        work: the ``with`` form tears down in ``__exit__`` (after ``on_train_exception``);
        otherwise tear down now. This may run from a garbage-collected generator, where an
        exception would be dropped, so a stop that cannot end the process here is logged.
        """
        if self._managed:
            return
        self._teardown()
        if self.exit_process and self.run_context.exit_code is not None and not self._finished:
            _log.warning("left loop.epochs() after a stop (exit code %s): call loop.finish() to end the process "
                         "with it, or use `with torpor.Loop(...) as loop:`", self.run_context.exit_code)

    def batches(self, dataset: Iterable[Any]) -> Iterator[Any]:
        """Yield the epoch's batches, skipping those a resumed epoch already consumed.

        Calls ``set_epoch`` on a ``DistributedSampler``-like sampler, ``on_train_step_begin``
        before each batch, and stops yielding once a stop is requested. Reads one batch ahead
        and yields a batch only when every rank has one (see :mod:`torpor._agreement`): with
        uneven data every rank ends the epoch after the shortest rank's last batch.
        """
        if not self._started:
            raise RuntimeError("Loop.batches() before Loop.epochs() or Loop.begin(): nothing would be resumed, no "
                               "signal handler installed, no on_train_begin run; write "
                               "`for epoch in loop.epochs(n): for batch in loop.batches(data): ...`")
        args = self.args
        args.train_dataset = dataset
        try:
            args.batch_num = len(dataset)  # type: ignore[arg-type]
        except TypeError:
            args.batch_num = None
        sampler = getattr(dataset, "sampler", None)
        if callable(getattr(sampler, "set_epoch", None)):
            sampler.set_epoch(args.cur_epoch_num)  # type: ignore[union-attr]
        skip, self._skip = self._skip, 0
        remainder, self._remainder = self._remainder, False
        loaded = self.loaded
        # A loader in ``state=`` keeps its own position: restored at load, saved before each read ahead.
        positioned = _user_state.key_of(args.state, dataset)
        keeps_position = positioned is not None
        if self._resized and loaded is not None:
            self._resized = False
            self._batch_checked = True
            self._check_resize(dataset, loaded, positioned)
        elif not self._batch_checked:
            self._batch_checked = True
            _resharding.check_global_batch(_global_batch_size_of(self.callbacks), dataset, _distributed.world_size(),
                                           error=ValueError)
        args.epoch_start = _resharding.START
        if skip and loaded is not None and remainder and not keeps_position:
            # Saved on another world size (or in an epoch already resized): the rest of the epoch's
            # global order, dealt out over this run's ranks (torpor._resharding).
            _resharding.check_reshardable(dataset, loaded.position, loaded.name, loaded.world_size,
                                          _distributed.world_size())
            assert loaded.position is not None and loaded.position.samples is not None
            consumed = loaded.position.samples
            rest = _resharding.remainder_batches(dataset, consumed)  # type: ignore[arg-type]
            iterator, args.epoch_rng = _resuming.resume_remainder(dataset, rest, loaded.rng)  # type: ignore[arg-type]
            args.step_in_epoch = skip
            args.batch_num = skip + len(rest)
            args.epoch_start = _resharding.EpochPosition(consumed, skip, consumed)
        elif skip and loaded is not None:
            # Rewind to the epoch's start so the sampler draws the same order, pass over the
            # batches already trained on (by index where possible), then jump to the save's state.
            iterator, args.epoch_rng = _resuming.resume_mid_epoch(dataset, args.cur_epoch_num, skip,
                                                                  loaded.epoch_rng, loaded.rng,
                                                                  keeps_position=keeps_position)
            args.step_in_epoch = skip
        else:
            resumed = (loaded.epoch_rng, loaded.rng) if loaded is not None and args.epoch_rng is None else None
            iterator, args.epoch_rng = _resuming.start_epoch(dataset, args.cur_epoch_num, resumed,
                                                             keeps_position=keeps_position)
            args.step_in_epoch = 0

        def snapshot() -> _state.BeforeLookahead:
            rng = _state.RngState.capture(_resuming.loader_generators(dataset))
            positions = {positioned: _user_state.position(dataset)} if positioned is not None else {}
            return _state.BeforeLookahead(rng, positions)

        feed = self._feed = EpochFeed(iterator, length=args.batch_num, every=self._check_every(),
                                      distributed=_distributed.is_initialized() and _distributed.world_size() > 1,
                                      reduce=_distributed.max_each, facts=self._step_facts, snapshot=snapshot,
                                      run_out=keeps_position)
        try:
            feed.begin(args.step_in_epoch)
            args.batch_num = feed.length  # the shortest rank's: what every rank trains this epoch
            args.before_lookahead = feed.before_held
            while not self.should_stop:
                more, batch = feed.take()
                args.before_lookahead = None
                if not more:
                    break
                args.cur_step_num += 1
                args.step_in_epoch += 1
                args.last_batch = batch
                call_hooks(self.callbacks, "on_train_step_begin", self.run_context)
                yield batch
                self._boundary()  # taken by step_end already, unless the loop body did not call it
        finally:
            self._feed = None
            args.agreed = None

    def _check_resize(self, dataset: Any, loaded: LoadedCheckpoint, positioned: str | None) -> None:
        """What a resume on another world size must hold, checked at its first epoch (alike on every rank).

        Raises:
            ResizeError: see :func:`torpor._resharding.check_global_batch`.
        """
        world = _distributed.world_size()
        _resharding.check_global_batch(_global_batch_size_of(self.callbacks), dataset, world)
        if positioned is not None:
            _log.warning("resumed checkpoint %r of %d rank(s) on %d: state[%r] keeps its own position, and torpor "
                         "does not reshard it; each rank continues from its own saved state_dict", loaded.name,
                         loaded.world_size, world, positioned)
        _log.info("resumed checkpoint %r of %d rank(s) on %d rank(s)", loaded.name, loaded.world_size, world)

    def _boundary(self) -> None:
        """The step's boundary (:meth:`EpochFeed.boundary`, once per step) and what it tells the saves."""
        args, feed = self.args, self._feed
        assert feed is not None
        args.agreed = feed.boundary(args.cur_step_num, args.step_in_epoch)
        args.before_lookahead = feed.before_held
        if feed.ended and args.batch_num is None:
            # An epoch of unknown length that ran out has one now: a save here records a finished
            # epoch, and a resume starts the next one instead of passing over this one again.
            args.batch_num = args.step_in_epoch

    def _check_every(self) -> int:
        """Steps between the boundary collectives: the smallest ``check_every_n_steps`` of the callbacks."""
        return min((int(getattr(cb, "check_every_n_steps", 1)) for cb in self.callbacks), default=1)

    def _step_facts(self) -> dict[Fact, int]:
        return merge(*(cb.step_facts(self.run_context) for cb in self.callbacks))

    def step_end(self, loss: Any = None, *, inputs: Any = None, outputs: Any = None) -> bool:
        """Close the step: record the loss and inputs, run ``on_train_step_end``.

        Args:
            loss: the step's loss (``net_outputs``).
            inputs: the network inputs (a tuple), used by ``OnRequestExit`` to export.
            outputs: the network outputs, for callbacks.

        Returns:
            Whether a stop was requested (the loop's iterators stop by themselves too).
        """
        self.args.net_outputs = loss
        if inputs is not None:
            self.args.last_inputs = inputs if isinstance(inputs, tuple) else (inputs,)
        self.args.outputs = outputs
        if self._feed is not None:  # the step's one collective, before the hooks act on it
            self._boundary()
        call_hooks(self.callbacks, "on_train_step_end", self.run_context)
        return self.should_stop

    def end(self) -> None:
        """``on_train_end``, ``on_train_teardown``, then the exit or the "completed" message.

        Every rank must call it at the same point (the final save is a collective); once.
        """
        if not self._ended:
            self._ended = True
            try:
                if self._epoch_open:
                    self._epoch_open = False
                    call_hooks(self.callbacks, "on_train_epoch_end", self.run_context)
                call_hooks(self.callbacks, "on_train_end", self.run_context)
            finally:
                self._teardown()
        self.finish()

    def _teardown(self) -> None:
        """Wait for every background save, then ``on_train_teardown`` (handlers restored); once."""
        if self._torn_down or not self._started:
            return
        self._torn_down = True
        try:
            for label, exc in drain_all():
                _log.error("background save of %r failed at the end of training: %s: %s",
                           label, type(exc).__name__, exc)
            call_hooks(self.callbacks, "on_train_teardown", self.run_context)
        finally:
            leave_training(self.run_context)

    def finish(self) -> None:
        """With ``exit_process``: end the process after a requested stop (its code and
        message), or write the "completed" message. A no-op without it, and after the first call."""
        ctx = self.run_context
        if not self.exit_process or self._finished:
            return
        self._finished = True
        exit_if_requested(ctx, self.env)
        write_termination_message(self.completed_message(), self.env.termination_log)

    def completed_message(self) -> TerminationMessage:
        """The message of a run that ended without an exit request."""
        a = self.args
        return TerminationMessage(
            reason=StopReason.COMPLETED, exit_code=EXIT_COMPLETED, step=a.cur_step_num, epoch=a.cur_epoch_num,
            rank=_distributed.rank(), world_size=_distributed.world_size(), job=self.env.job,
            incarnation=self.env.incarnation or None, resumed_from=self._resumed_name())

    def _resumed_name(self) -> str | None:
        """The checkpoint actually loaded at the start (after any fallback), for the messages."""
        return self.loaded.name if self.loaded is not None else None

    def error_message(self, exc: BaseException) -> TerminationMessage:
        """The message of a run that an exception ended."""
        a = self.args
        return TerminationMessage(
            reason=StopReason.ERROR, exit_code=1, step=a.cur_step_num, epoch=a.cur_epoch_num,
            rank=_distributed.rank(), world_size=_distributed.world_size(), job=self.env.job,
            incarnation=self.env.incarnation or None, error=f"{type(exc).__name__}: {exc}",
            resumed_from=self._resumed_name())
