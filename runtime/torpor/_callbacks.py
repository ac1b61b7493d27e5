"""The callback protocol of the seeds: hooks, the run context and the step state.

Torch-free: hooks see whatever objects the loop hands them.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from torpor._agreement import Fact


@dataclass
class RunArgs:
    """The step state ``run_context.original_args()`` returns (MindSpore's ``cb_params``).

    Mutable on purpose: the loop updates it in place every step, and callbacks may read any
    field at any hook.
    """

    train_network: Any = None
    """The module being trained, as given (possibly wrapped in DDP)."""
    network: Any = None
    """The same module without DDP/compile wrappers: what checkpoints save."""
    optimizer: Any = None
    loss_fn: Any = None
    lr_scheduler: Any = None
    epoch_num: int = 0
    """Epochs the run was asked for."""
    batch_num: int | None = None
    """Batches per epoch, when the dataset has a length."""
    cur_epoch_num: int = 0
    """Current epoch, from 1."""
    cur_step_num: int = 0
    """Global step, from 1; during a step it counts that step, after it the steps completed."""
    step_in_epoch: int = 0
    """Steps of the current epoch, from 1, same convention."""
    net_outputs: Any = None
    """The last step's loss (what the seeds call ``net_outputs``)."""
    outputs: Any = None
    """The network's outputs of the last step, when the loop knows them."""
    last_batch: Any = None
    """The batch of the current or last step."""
    last_inputs: Any = None
    """The network inputs of the last step (a tuple): ``OnRequestExit`` exports with them."""
    train_dataset: Any = None
    valid_dataset: Any = None
    mode: str = "train"
    """``"train"`` or ``"eval"``."""
    resumed_from: Any = None
    """The ``LoadedCheckpoint`` this run started from, or ``None``."""
    epoch_rng: Any = None
    """Generators' state when the current epoch's iterator was created (exact resume)."""
    epoch_start: Any = None
    """Where this run's pass over the current epoch began (a ``torpor._resharding.EpochPosition``):
    at the epoch's start, or, after a resume into its middle on another world size, at the
    saved run's step and samples; ``None`` before the first epoch. Saves count from it."""
    run_token: str = ""
    """Identity of this run shared by all ranks (part of every ``save_id``)."""
    before_lookahead: Any = None
    """The generators, and the position of a loader that keeps its own (a
    ``torpor._state.BeforeLookahead``), as they were before the loop read the next, not yet
    trained, batch ahead; ``None`` when no such batch is held. Saves record this instead of
    the current state, so a resume that reads that batch again draws the same and reads it."""
    exit_saved_step: int | None = None
    """Global step at which ``OnRequestExit`` saved, so other savers skip that step."""
    state: dict[str, Any] = field(default_factory=dict)
    """``state=`` of the run: name → object saved and restored beside the model."""
    agreed: Any = None
    """What every rank agreed at this step's boundary (a ``torpor._agreement.Agreed``), set by
    ``Loop`` before ``on_train_step_end``; ``None`` outside a ``Loop``-driven training step."""


class RunContext:
    """What a hook receives: the step state and a way to stop."""

    def __init__(self, original_args: RunArgs) -> None:
        """Wrap the loop's state."""
        self._args = original_args
        self._stop_requested = False
        self.exit_code: int | None = None
        self.termination_message: Any = None

    def original_args(self) -> RunArgs:
        """The step state: network, optimizer, loss function, counters, last loss and batch."""
        return self._args

    def request_stop(self) -> None:
        """Ask the loop to stop after the current step (and epoch), running the end hooks."""
        self._stop_requested = True

    def get_stop_requested(self) -> bool:
        """Whether a stop was requested (the seed's name)."""
        return self._stop_requested

    def request_exit(self, code: int, message: Any) -> None:
        """Stop with a documented exit ``code`` and termination ``message``.

        The loop ends the process with them after every ``on_*_end`` hook has run when its
        ``exit_process`` is on (see :func:`torpor._loop.exit_process_of`); otherwise it just
        returns, and ``exit_code`` tells the caller why training stopped.
        """
        self._stop_requested = True
        self.exit_code = code
        self.termination_message = message


class Callback:
    """Base class of callbacks: override the hooks you need, each gets the run context."""

    order: int = 0
    """Hooks run in ascending ``order`` (stable): ``OnRequestExit`` uses -100 so that it
    decides about stopping before a periodic saver writes a checkpoint of the same step."""

    def on_train_begin(self, run_context: RunContext) -> None:
        """Before the first epoch (after a resume has restored the state)."""

    def on_train_epoch_begin(self, run_context: RunContext) -> None:
        """Before each epoch."""

    def on_train_step_begin(self, run_context: RunContext) -> None:
        """Before each step; the batch is in ``last_batch``."""

    def on_train_step_end(self, run_context: RunContext) -> None:
        """After each step: loss in ``net_outputs``, the step boundary where stops happen."""

    def on_train_epoch_end(self, run_context: RunContext) -> None:
        """After each epoch."""

    def step_facts(self, run_context: RunContext) -> Mapping[Fact, int]:
        """This rank's facts for the step boundary's one collective (torpor's addition).

        Called by ``Loop`` before ``on_train_step_end`` at the boundaries that have the
        collective; what every rank then agreed is ``original_args().agreed`` in that hook.
        Act on the agreed facts only, so every rank acts alike (see ``torpor._agreement``).
        """
        return {}

    def on_train_end(self, run_context: RunContext) -> None:
        """After training, also after a requested stop."""

    def on_train_teardown(self, run_context: RunContext) -> None:
        """Last of all: after ``on_train_end`` or ``on_train_exception``, or when the user left
        ``loop.epochs()`` with a ``break`` (torpor's addition to the seeds' hooks).

        Every final and background save is durable by then, so this is where what
        ``on_train_begin`` acquired is released: ``OnRequestExit`` restores the signal handler
        here, not in ``on_train_end``, so a signal that arrives during the final save cannot
        kill the process half-way through it.
        """

    def on_train_exception(self, run_context: RunContext, exc: BaseException) -> None:
        """An exception escaped a training step (torpor's addition to the seeds' hooks).

        Called before the exception propagates on to the caller, which always gets it
        unchanged; ``on_train_end`` is not called after it, ``on_train_teardown`` is.
        ``CheckpointMonitor`` writes its breakpoint checkpoint here (the signal handler is
        still installed; it is restored in ``on_train_teardown``).
        """

    def on_eval_begin(self, run_context: RunContext) -> None:
        """Before evaluation."""

    def on_eval_step_begin(self, run_context: RunContext) -> None:
        """Before each evaluation step."""

    def on_eval_step_end(self, run_context: RunContext) -> None:
        """After each evaluation step."""

    def on_eval_end(self, run_context: RunContext) -> None:
        """After evaluation."""


HOOKS = tuple(name for name in vars(Callback) if name.startswith("on_"))

_TRAINING: list[weakref.ref[RunContext]] = []
"""Training runs in progress in this process, innermost last (``Loop`` pushes and pops).
Weak: a run abandoned without teardown (a loop dropped half-way) is forgotten with its loop."""


def training_run() -> RunContext | None:
    """The training run in progress, if any: what a stop during a nested evaluation saves."""
    while _TRAINING:
        run = _TRAINING[-1]()
        if run is not None:
            return run
        _TRAINING.pop()
    return None


def enter_training(run_context: RunContext) -> None:
    """Mark ``run_context`` as the training run in progress (``Loop.begin``)."""
    _TRAINING.append(weakref.ref(run_context))


def leave_training(run_context: RunContext) -> None:
    """The run has been torn down (``Loop`` teardown); a no-op if it was never entered."""
    _TRAINING[:] = [r for r in _TRAINING if r() is not None and r() is not run_context]


def as_callback_list(callbacks: Callback | Iterable[Callback] | None) -> list[Callback]:
    """A single callback, a list or ``None`` → a list sorted by ``order``.

    Raises:
        TypeError: an element is not a :class:`Callback`.
    """
    if callbacks is None:
        items: list[Any] = []
    elif isinstance(callbacks, Callback):
        items = [callbacks]
    elif isinstance(callbacks, Iterable):
        items = list(callbacks)
    else:
        raise TypeError(f"callbacks must be a Callback, a list of them or None, got {callbacks!r}")
    for cb in items:
        if not isinstance(cb, Callback):
            raise TypeError(f"callbacks must be torpor.Callback instances, got {cb!r} ({type(cb).__name__})")
    return sorted(items, key=lambda cb: cb.order)


def call_hooks(callbacks: list[Callback], hook: str, run_context: RunContext) -> None:
    """Call ``hook`` on every callback in order."""
    for cb in callbacks:
        getattr(cb, hook)(run_context)
