"""The plain-loop form: the seeds' callbacks driven from a user's own ``for`` loops.

``Model.train`` is built on it too, so both forms stop, save and resume identically::

    loop = torpor.Loop(net, opt, callbacks=torpor.callbacks_from_env(), resume="latest")  # +1
    for epoch in loop.epochs(10):                       # was: for epoch in range(10)
        for x, y in loop.batches(loader):               # was: for x, y in loader
            opt.zero_grad(); loss = loss_fn(net(x), y); loss.backward(); opt.step()
            loop.step_end(loss, inputs=(x,))           # +1

Written as ``with torpor.Loop(...) as loop:``, an exception escaping the body first reaches
the callbacks' ``on_train_exception`` (``CheckpointMonitor(exception_save=True)`` writes its
breakpoint checkpoint there), then the caller, unchanged.

On resume, ``epochs`` starts at the saved epoch and ``batches`` skips the batches that epoch
had already consumed, with the generators rewound so the data order and every random draw
match an uninterrupted run.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterable, Iterator
from typing import Any

from torpor import _distributed, _state
from torpor._agreement import EpochFeed, Fact, merge
from torpor._callbacks import Callback, RunArgs, RunContext, as_callback_list, call_hooks
from torpor._loading import LoadedCheckpoint, load_checkpoint
from torpor.env import RuntimeEnv
from torpor.termination import (
    EXIT_COMPLETED,
    StopReason,
    TerminationMessage,
    write_termination_message,
)


def _encryption_of(callbacks: list[Callback]) -> Any:
    """The cipher of the first callback that writes encrypted checkpoints, if any."""
    for cb in callbacks:
        enc = getattr(cb, "encryption", None)
        if enc is not None:
            return enc
    return None


def _directory_of(callbacks: list[Callback], env: RuntimeEnv) -> str:
    """Where ``resume='latest'`` looks: the periodic saver's directory, else the exit saver's."""
    for attr in ("checkpoint_directory", "exit_directory"):
        for cb in callbacks:
            value = getattr(cb, attr, None)
            if value:
                return str(value)
    return env.checkpoint_uri


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
    ) -> None:
        """Set up the run.

        Args:
            network: the module being trained (DDP-wrapped or not).
            optimizer: its optimizer (saved and restored).
            loss_fn: recorded for callbacks.
            lr_scheduler: saved and restored if given.
            callbacks: a callback, a list, or ``None``.
            resume: ``None`` (fresh start), ``'latest'`` (newest complete checkpoint, or a
                fresh start if there is none; ``TORPOR_RESUME_FROM`` overrides it), a
                checkpoint name or a path/URI.
            exit_process: end the process with the documented exit code after a requested
                stop; default: only under the operator (``TORPOR_JOB`` set).
        """
        self.env = RuntimeEnv.from_environ()
        self.callbacks = as_callback_list(callbacks)
        self.args = RunArgs(train_network=network, network=_state.unwrap(network), optimizer=optimizer,
                            loss_fn=loss_fn, lr_scheduler=lr_scheduler)
        self.run_context = RunContext(self.args)
        self.resume = resume
        self.exit_process = self.env.under_operator if exit_process is None else exit_process
        self.loaded: LoadedCheckpoint | None = None
        self._skip = 0
        self._started = False
        self._epoch_open = False
        self._feed: EpochFeed | None = None

    def __enter__(self) -> Loop:
        return self

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> bool:
        if isinstance(exc, Exception):
            self.handle_exception(exc)
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
        enc = _encryption_of(self.callbacks)
        loaded = load_checkpoint(self.resume, self.args.network, self.args.optimizer, self.args.lr_scheduler,
                                 directory=_directory_of(self.callbacks, self.env),
                                 enc_key=enc.key if enc is not None else None,
                                 enc_mode=enc.mode if enc is not None else None)
        if loaded is None:
            return
        self.loaded = loaded
        self.args.resumed_from = loaded
        self.args.cur_step_num = loaded.step
        finished_epoch = loaded.batch_num is not None and loaded.step_in_epoch >= loaded.batch_num
        if finished_epoch or loaded.step_in_epoch == 0:
            self.args.cur_epoch_num = loaded.epoch if finished_epoch else loaded.epoch - 1
            self._skip = 0
        else:
            self.args.cur_epoch_num = loaded.epoch - 1
            self._skip = loaded.step_in_epoch

    def begin(self, epoch_num: int, train_dataset: Any = None) -> None:
        """Resume if asked, then ``on_train_begin`` (``epochs`` calls it for you)."""
        if self._started:
            return
        self._started = True
        self.args.epoch_num = epoch_num
        self.args.mode = "train"
        if train_dataset is not None:
            self.args.train_dataset = train_dataset
        self._restore()
        self.args.run_token = _distributed.agreed_token(
            f"{self.env.job}#{self.env.incarnation}" if self.env.job else "")
        call_hooks(self.callbacks, "on_train_begin", self.run_context)

    def epochs(self, epoch_num: int) -> Iterator[int]:
        """Yield epoch numbers from 1 (or from the resumed epoch) to ``epoch_num``.

        Runs ``on_train_begin``, the epoch hooks and ``on_train_end``, and ends the process
        after a requested stop when ``exit_process`` is on.
        """
        self.begin(epoch_num)
        first = self.args.cur_epoch_num + 1
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
        self.end()

    def batches(self, dataset: Iterable[Any]) -> Iterator[Any]:
        """Yield the epoch's batches, skipping those a resumed epoch already consumed.

        Calls ``set_epoch`` on a ``DistributedSampler``-like sampler, ``on_train_step_begin``
        before each batch, and stops yielding once a stop is requested. Reads one batch ahead
        and yields a batch only when every rank has one (see :mod:`torpor._agreement`): with
        uneven data every rank ends the epoch after the shortest rank's last batch.
        """
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
        loaded = self.loaded
        if skip and loaded is not None:
            # Rewind to the epoch's start so the sampler draws the same order, consume the
            # batches already trained on, then jump to the generators' state at the save.
            if loaded.epoch_rng is not None:
                loaded.epoch_rng.restore()
            args.epoch_rng = loaded.epoch_rng or _state.RngState.capture()
            iterator = iter(dataset)
            for _ in range(skip):
                next(iterator, None)
            if loaded.rng is not None:
                loaded.rng.restore()
            args.step_in_epoch = skip
        else:
            args.epoch_rng = _state.RngState.capture()
            iterator = iter(dataset)
            args.step_in_epoch = 0
        feed = self._feed = EpochFeed(iterator, length=args.batch_num, every=self._check_every(),
                                      distributed=_distributed.is_initialized() and _distributed.world_size() > 1,
                                      reduce=_distributed.max_each, facts=self._step_facts)
        try:
            feed.begin(args.step_in_epoch)
            args.batch_num = feed.length  # the shortest rank's: what every rank trains this epoch
            while not self.should_stop:
                more, batch = feed.take()
                if not more:
                    break
                args.cur_step_num += 1
                args.step_in_epoch += 1
                args.last_batch = batch
                call_hooks(self.callbacks, "on_train_step_begin", self.run_context)
                yield batch
                args.agreed = feed.boundary(args.cur_step_num, args.step_in_epoch)  # taken by step_end already
        finally:
            self._feed = None
            args.agreed = None

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
            self.args.agreed = self._feed.boundary(self.args.cur_step_num, self.args.step_in_epoch)
        call_hooks(self.callbacks, "on_train_step_end", self.run_context)
        return self.should_stop

    def end(self) -> None:
        """``on_train_end``, then the exit or the "completed" termination message."""
        if self._epoch_open:
            self._epoch_open = False
            call_hooks(self.callbacks, "on_train_epoch_end", self.run_context)
        call_hooks(self.callbacks, "on_train_end", self.run_context)
        self.finish()

    def finish(self) -> None:
        """End the process after a requested exit (``exit_process``), or report completion."""
        ctx = self.run_context
        if not self.exit_process:
            return
        exit_if_requested(ctx, self.env)
        write_termination_message(self.completed_message(), self.env.termination_log)

    def completed_message(self) -> TerminationMessage:
        """The message of a run that ended without an exit request."""
        a = self.args
        return TerminationMessage(
            reason=StopReason.COMPLETED, exit_code=EXIT_COMPLETED, step=a.cur_step_num, epoch=a.cur_epoch_num,
            rank=_distributed.rank(), world_size=_distributed.world_size(), job=self.env.job,
            incarnation=self.env.incarnation or None)

    def error_message(self, exc: BaseException) -> TerminationMessage:
        """The message of a run that an exception ended."""
        a = self.args
        return TerminationMessage(
            reason=StopReason.ERROR, exit_code=1, step=a.cur_step_num, epoch=a.cur_epoch_num,
            rank=_distributed.rank(), world_size=_distributed.world_size(), job=self.env.job,
            incarnation=self.env.incarnation or None, error=f"{type(exc).__name__}: {exc}")
