"""``torpor.Model``: the seeds' high-level ``Model.train``/``Model.eval`` for PyTorch.

The seed's example runs almost verbatim::

    net = LeNet5()
    loss = nn.CrossEntropyLoss()                       # SoftmaxCrossEntropyWithLogits(sparse=True)
    optim = torch.optim.SGD(net.parameters(), 0.01, 0.9)  # nn.Momentum(net.trainable_params(), 0.01, 0.9)
    model = torpor.Model(net, loss_fn=loss, optimizer=optim)
    on_request_exit = torpor.OnRequestExit(file_name='LeNet5')
    model.train(10, dataset, callbacks=on_request_exit)

A batch is ``(input_1, ..., input_n, target)``: the network gets the inputs and
``loss_fn(outputs, target)`` is the loss. Without ``loss_fn`` the network gets the whole
batch and must return the loss itself (MindSpore's ``WithLossCell`` style).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch

from torpor import _user_state
from torpor._callbacks import Callback, RunArgs, RunContext, as_callback_list, call_hooks
from torpor._loop import Loop, exit_if_requested, exit_process_of
from torpor.env import RuntimeEnv


def _split(batch: Any, has_loss_fn: bool) -> tuple[tuple[Any, ...], Any]:
    if not has_loss_fn:
        return (tuple(batch) if isinstance(batch, tuple | list) else (batch,)), None
    if not isinstance(batch, tuple | list) or len(batch) < 2:
        raise TypeError(
            f"with a loss_fn each batch must be (inputs..., target), got {type(batch).__name__}"
            + (f" of length {len(batch)}" if isinstance(batch, tuple | list) else "")
        )
    return tuple(batch[:-1]), batch[-1]


class Model:
    """Trains and evaluates a network with the seeds' callbacks."""

    def __init__(
        self,
        network: torch.nn.Module,
        loss_fn: Callable[..., torch.Tensor] | None = None,
        optimizer: torch.optim.Optimizer | None = None,
        metrics: Mapping[str, Callable[[Any, Any], float]] | None = None,
        eval_network: torch.nn.Module | None = None,
        *,
        lr_scheduler: Any = None,
        scheduler_interval: str = "step",
        state: Mapping[str, Any] | None = None,
    ) -> None:
        """Wrap the pieces of a training step.

        Args:
            network: the module (DDP-wrapped is fine).
            loss_fn: ``loss_fn(outputs, target)``; ``None`` if the network returns its loss.
            optimizer: required for ``train``.
            metrics: name → ``fn(outputs, target) -> float``, averaged by ``eval``.
            eval_network: evaluated instead of ``network`` if given.
            lr_scheduler: stepped every step or epoch (``scheduler_interval``), saved and restored.
            scheduler_interval: ``"step"`` or ``"epoch"``.
            state: more objects saved and restored by name (a ``GradScaler``, an EMA updated
                by a callback, the ``train_dataset`` loader when it keeps its own position,
                ...), as in :class:`torpor.Loop`; ``train(state=...)`` overrides it.

        Raises:
            TypeError: ``network`` is not a module; ``state`` is not a dict of objects with
                ``state_dict``/``load_state_dict`` (the message names the key).
            ValueError: ``scheduler_interval`` is neither ``"step"`` nor ``"epoch"``.
        """
        if not isinstance(network, torch.nn.Module):
            raise TypeError(f"network must be a torch.nn.Module, got {network!r} ({type(network).__name__})")
        if scheduler_interval not in ("step", "epoch"):
            raise ValueError(f"scheduler_interval must be 'step' or 'epoch', got {scheduler_interval!r}")
        self.network = network
        self.loss_fn = loss_fn
        self.optimizer = optimizer
        self.metrics = dict(metrics or {})
        self.eval_network = eval_network
        self.lr_scheduler = lr_scheduler
        self.scheduler_interval = scheduler_interval
        self.state = _user_state.validate(state)

    def _step(self, batch: Any) -> tuple[torch.Tensor, Any, tuple[Any, ...]]:
        assert self.optimizer is not None
        inputs, target = _split(batch, self.loss_fn is not None)
        self.optimizer.zero_grad(set_to_none=True)
        outputs = self.network(*inputs)
        loss = self.loss_fn(outputs, target) if self.loss_fn is not None else outputs
        loss.backward()
        self.optimizer.step()
        if self.lr_scheduler is not None and self.scheduler_interval == "step":
            self.lr_scheduler.step()
        return loss.detach(), outputs, inputs

    def train(
        self,
        epoch: int,
        train_dataset: Iterable[Any],
        callbacks: Callback | list[Callback] | None = None,
        resume: str | None = None,
        *,
        exit_process: bool | None = None,
        state: Mapping[str, Any] | None = None,
    ) -> RunContext:
        """Train for ``epoch`` epochs over ``train_dataset`` (re-iterable, e.g. a DataLoader).

        Args:
            epoch: total epochs (a resumed run continues up to it).
            train_dataset: yields batches; iterated once per epoch.
            callbacks: a callback or a list.
            resume: ``None``, ``'latest'``, a checkpoint name or a path (see :class:`torpor.Loop`).
            exit_process: end the process after a requested stop, and write the ``completed``
                or ``error`` termination message otherwise (see :func:`torpor._loop.exit_process_of`).
            state: objects saved and restored by name (see :class:`torpor.Loop`); default:
                the ``state`` given to the constructor.

        Returns:
            The run context (``original_args()`` has the final counters and loss).

        Raises:
            ValueError: ``epoch`` is not a positive int; TypeError: no optimizer.
        """
        if not isinstance(epoch, int) or isinstance(epoch, bool) or epoch < 1:
            raise ValueError(f"epoch must be a positive int, got {epoch!r}")
        if self.optimizer is None:
            raise TypeError("Model.train needs an optimizer; got optimizer=None")
        loop = Loop(self.network, self.optimizer, loss_fn=self.loss_fn, lr_scheduler=self.lr_scheduler,
                    callbacks=callbacks, resume=resume, exit_process=exit_process,
                    state=self.state if state is None else state)
        self.network.train()
        with loop:  # an exception: exception_save, the error message, then the exception unchanged
            loop.begin(epoch, train_dataset)
            for _ in loop.epochs(epoch):
                for batch in loop.batches(train_dataset):
                    loss, outputs, inputs = self._step(batch)
                    loop.step_end(loss, inputs=inputs, outputs=outputs)
                if self.lr_scheduler is not None and self.scheduler_interval == "epoch":
                    self.lr_scheduler.step()
        return loop.run_context

    def eval(
        self,
        valid_dataset: Iterable[Any],
        callbacks: Callback | list[Callback] | None = None,
        *,
        exit_process: bool | None = None,
    ) -> dict[str, float]:
        """Evaluate: mean loss (with a ``loss_fn``) and each metric over ``valid_dataset``.

        Stops early if a callback requests it (``OnRequestExit`` during evaluation). Called
        inside a training run (from a callback, or between the epochs of a ``Loop``), a stop
        saves training's state and training stops at its next boundary; this call then just
        returns the partial means. Without a training run it ends the process when
        ``exit_process`` says so (the same rule as ``Model.train`` and ``Loop``).

        ``cur_step_num`` of the evaluation's run context counts evaluation steps.
        """
        network = self.eval_network or self.network
        cbs = as_callback_list(callbacks)
        args = RunArgs(train_network=network, network=network, loss_fn=self.loss_fn, valid_dataset=valid_dataset,
                       mode="eval", optimizer=self.optimizer, lr_scheduler=self.lr_scheduler)
        ctx = RunContext(args)
        totals: dict[str, float] = {}
        count = 0
        was_training = network.training
        network.eval()
        call_hooks(cbs, "on_eval_begin", ctx)
        try:
            with torch.no_grad():
                for batch in valid_dataset:
                    args.cur_step_num += 1
                    args.last_batch = batch
                    call_hooks(cbs, "on_eval_step_begin", ctx)
                    inputs, target = _split(batch, self.loss_fn is not None)
                    outputs = network(*inputs)
                    if self.loss_fn is not None:
                        totals["loss"] = totals.get("loss", 0.0) + float(self.loss_fn(outputs, target))
                    for name, fn in self.metrics.items():
                        totals[name] = totals.get(name, 0.0) + float(fn(outputs, target))
                    count += 1
                    args.net_outputs, args.outputs, args.last_inputs = totals.get("loss"), outputs, inputs
                    call_hooks(cbs, "on_eval_step_end", ctx)
                    if ctx.get_stop_requested():
                        break
        finally:
            network.train(was_training)
        call_hooks(cbs, "on_eval_end", ctx)
        env = RuntimeEnv.from_environ()
        if exit_process_of(exit_process, cbs, env):
            exit_if_requested(ctx, env)
        return {k: v / max(count, 1) for k, v in totals.items()}
