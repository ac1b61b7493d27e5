"""A sharded model that survives preemption: FSDP2 ``fully_shard`` (or FSDP1, or ZeRO) with torpor.

Every rank holds only its shard of the weights and of the optimizer state; on a stop (SIGTERM
to any rank, or ``{"GracefulExit": 1}``) every rank writes its own shard of one checkpoint,
through ``torch.distributed.checkpoint``'s planners into torpor's store, and the next run
resumes from it (see the README, "Sharded models"). Runs on a CPU with gloo::

    torchrun --nproc-per-node 2 examples/fsdp2.py                 # FSDP2 (fully_shard)
    torchrun --nproc-per-node 2 examples/fsdp2.py --wrap fsdp1    # FullyShardedDataParallel
    torchrun --nproc-per-node 2 examples/fsdp2.py --wrap zero     # DDP + ZeroRedundancyOptimizer

The torpor lines are the same as for a replicated model (marked ``# torpor``); what differs
is only how the model is wrapped. The same checkpoint resumes on another number of ranks too
(``torchrun --nproc-per-node 3`` after a 2-rank run): DCP reshards the model and optimizer,
and the epoch continues with the samples the stopped run had not trained on.

Options let tests observe it: ``--losses FILE`` appends one JSON line per step (with
``--sample-ids``, the indices of the rank's batch too), ``--full-state DIR`` makes rank 0
write the gathered (unsharded) model and optimizer state to ``DIR/full-{step}.pt`` whenever
training ends, a stop included, and to ``DIR/resumed-{step}.pt`` right after a resume, and
``--head-optimizer`` gives the last layer an optimizer of its own, passed in ``state=``, and
``--sigterm-at N`` makes the last rank send itself a real SIGTERM inside global step N (a
preemption at a known step, so a test knows where in the epoch the stop lands).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

import torpor  # torpor


def build(wrap: str, head: bool = False) -> tuple[nn.Module, torch.optim.Optimizer, dict[str, Any]]:
    """The model and its optimizers: the same initial weights on every rank and in every run,
    sharded as asked (``none``: not). With ``head``, the last layer has its own optimizer,
    returned in the ``state=`` dict (how a second optimizer is checkpointed; not with FSDP1,
    whose flat parameters cannot be split between optimizers)."""
    torch.manual_seed(0)
    # Widths that do not divide by the world size: uneven shards (FSDP2 pads the last ones).
    net: nn.Module = nn.Sequential(nn.Linear(16, 33), nn.ReLU(), nn.Dropout(0.1), nn.Linear(33, 17), nn.ReLU(),
                                   nn.Linear(17, 4))
    if wrap == "fsdp2":
        from torch.distributed.fsdp import fully_shard

        for layer in net:
            if isinstance(layer, nn.Linear):
                fully_shard(layer)
        fully_shard(net)
    elif wrap == "fsdp1":
        from torch.distributed.fsdp import FullyShardedDataParallel

        if head:
            raise ValueError("--head-optimizer does not work with --wrap fsdp1 (flat parameters)")
        net = FullyShardedDataParallel(net, device_id=torch.device("cpu"))
    elif wrap == "zero":
        net = nn.parallel.DistributedDataParallel(net)
    elif wrap != "none":
        raise ValueError(f"wrap must be fsdp2, fsdp1, zero or none, got {wrap!r}")
    layers = net.module if wrap == "zero" else net
    body = [p for name, p in layers.named_parameters() if not (head and name.startswith("5."))]
    state: dict[str, Any] = {"head": torch.optim.AdamW(layers[5].parameters(), lr=0.02)} if head else {}
    if wrap == "zero":
        from torch.distributed.optim import ZeroRedundancyOptimizer

        return net, ZeroRedundancyOptimizer(body, optimizer_class=torch.optim.AdamW, lr=0.01), state
    return net, torch.optim.AdamW(body, lr=0.01), state


def scheduler(opt: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LRScheduler:
    """The learning-rate schedule (it adds ``initial_lr`` to the optimizer's groups)."""
    return torch.optim.lr_scheduler.StepLR(opt, step_size=15, gamma=0.8)


class FullState(torpor.Callback):
    """Rank 0 writes the gathered model and optimizer state at the end of training (a stop too)
    and, after a resume, at its beginning.

    Every rank takes part in the gather, so this runs in ``on_train_end`` and
    ``on_train_begin``, which every rank reaches at the same step.
    """

    def __init__(self, directory: str | None, net: nn.Module, optimizers: dict[str, torch.optim.Optimizer],
                 scheduler: torch.optim.lr_scheduler.LRScheduler | None = None) -> None:
        self.directory, self.net, self.optimizers, self.scheduler = directory, net, optimizers, scheduler

    def on_train_begin(self, run_context: torpor.RunContext) -> None:
        if run_context.original_args().resumed_from is not None:
            self._write(run_context, "resumed")

    def on_train_end(self, run_context: torpor.RunContext) -> None:
        self._write(run_context, "full")

    def _write(self, run_context: torpor.RunContext, what: str) -> None:
        if not self.directory:
            return
        step = run_context.original_args().cur_step_num
        state = full_state(self.net, self.optimizers)
        if self.scheduler is not None:  # replicated: every rank holds the same
            state["scheduler"] = self.scheduler.state_dict()
        if dist.get_rank() == 0:
            torch.save({"step": step, **state}, Path(self.directory) / f"{what}-{step}.pt")


def full_state(net: nn.Module, optimizers: dict[str, torch.optim.Optimizer]) -> dict[str, dict]:
    """The unsharded model (``"model"``) and optimizers (by name) on rank 0; a collective."""
    from torch.distributed.optim import ZeroRedundancyOptimizer

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    zero = any(isinstance(o, ZeroRedundancyOptimizer) for o in optimizers.values())
    out = {"model": ({k: v.clone() for k, v in net.module.state_dict().items()} if zero
                     else get_model_state_dict(net, options=options))}
    for name, opt in optimizers.items():
        if isinstance(opt, ZeroRedundancyOptimizer):
            opt.consolidate_state_dict(to=0)
            out[name] = opt.state_dict() if dist.get_rank() == 0 else {}
        else:
            out[name] = get_optimizer_state_dict(net, opt, options=options)
    return out


class LossLog(torpor.Callback):
    """One JSON line per step, flushed, so a parent process can follow the run; with ``features``,
    the indices of the step's samples in them too (``"ids"``: which samples this rank trained)."""

    def __init__(self, path: str | None, delay: float, features: torch.Tensor | None = None) -> None:
        self.path, self.delay = path, delay
        self.ids = {row.numpy().tobytes(): i for i, row in enumerate(features)} if features is not None else None

    def on_train_step_end(self, run_context: torpor.RunContext) -> None:
        args = run_context.original_args()
        if self.path:
            line = {"rank": dist.get_rank(), "step": args.cur_step_num, "epoch": args.cur_epoch_num,
                    "loss": float(args.net_outputs)}
            if self.ids is not None:
                line["ids"] = [self.ids[row.numpy().tobytes()] for row in args.last_batch[0]]
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(line) + "\n")
        time.sleep(self.delay)


class SigtermAt(torpor.Callback):
    """The last rank sends itself SIGTERM inside global step ``step`` (0: never), as a preemption would."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_step_begin(self, run_context: torpor.RunContext) -> None:
        if self.step and run_context.original_args().cur_step_num == self.step \
                and dist.get_rank() == dist.get_world_size() - 1:
            os.kill(os.getpid(), signal.SIGTERM)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--wrap", default="fsdp2", choices=("fsdp2", "fsdp1", "zero"))
    parser.add_argument("--head-optimizer", action="store_true", help="a second optimizer for the last layer")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--max-steps", type=int, default=0, help="stop after this global step (0: no limit)")
    parser.add_argument("--losses", default=None, help="append one JSON line per step to this file")
    parser.add_argument("--sample-ids", action="store_true", help="the lines name the step's samples too")
    parser.add_argument("--full-state", default=None, help="rank 0 writes the gathered state here at the end")
    parser.add_argument("--step-delay", type=float, default=0.0, help="seconds to sleep after each step")
    parser.add_argument("--sigterm-at", type=int, default=0, help="the last rank gets SIGTERM in this step")
    parser.add_argument("--no-integrated-save", action="store_true",
                        help="CheckpointMonitor/OnRequestExit with integrated_save=False (each rank its own part)")
    opts = parser.parse_args()

    if not torpor.init_distributed():  # torpor: gloo on CPU when WORLD_SIZE > 1
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)  # one process: 1 rank
    torch.manual_seed(0)
    features = torch.randn(320, 16)
    data = TensorDataset(features, (features @ torch.randn(16, 4)).argmax(dim=1))
    loader = DataLoader(data, batch_size=8, sampler=DistributedSampler(data, shuffle=True, seed=0))
    net, opt, state = build(opts.wrap, opts.head_optimizer)
    sched = scheduler(opt)
    torch.manual_seed(1000 + dist.get_rank())  # dropout: each rank its own stream, restored on resume

    log = LossLog(opts.losses, opts.step_delay, features if opts.sample_ids else None)
    options = {"integrated_save": False} if opts.no_integrated_save else {}
    callbacks = [*torpor.callbacks_from_env(**options), log,  # torpor
                 FullState(opts.full_state, net, {"optimizer": opt, **state}, sched), SigtermAt(opts.sigterm_at)]
    with torpor.Loop(net, opt, lr_scheduler=sched, callbacks=callbacks, resume="latest",  # torpor
                     state=state) as loop:  # torpor
        for _ in loop.epochs(opts.epochs):  # torpor
            for xb, yb in loop.batches(loader):  # torpor
                for o in (opt, *state.values()):
                    o.zero_grad()
                loss = nn.functional.cross_entropy(net(xb), yb)
                loss.backward()
                for o in (opt, *state.values()):
                    o.step()
                sched.step()
                if loop.step_end(loss.detach()) or loop.args.cur_step_num == opts.max_steps:  # torpor
                    loop.run_context.request_stop()
    print(f"rank {dist.get_rank()}: done at step {loop.args.cur_step_num}")


if __name__ == "__main__":
    main()
