"""One gloo rank of a DDP job that is resumed on another world size (issue 11, item 2).

Trains :func:`torpor_harness.resize_net` over ``resize_data("distributed", ...)`` with the
operator's callbacks (``callbacks_from_env``): a real SIGTERM to any rank (``--kill-rank R
--kill-at N``: rank R sends it to itself inside global step N) stops every rank with a
checkpoint, and the next launch resumes from it on however many ranks it has. Writes
one JSON line per step to ``--steps`` (rank, epoch, step, loss, the indices of the rank's
samples) and, with ``--state DIR``, the model and optimizer state of this rank right after a
resume (``DIR/resumed-{rank}.pt``) and at the end (``DIR/end-{rank}.pt``).

With ``--cases`` instead, runs one short job per case, one after the other, each stopped
mid-epoch after step 3 with the monitor's final save into ``--directory/<case>``: the
checkpoints the refusal test resumes on another world size. Cases are a loader kind of
``resize_data`` (``random``, ``iterable``, ``stateful``), ``copies`` (``integrated_save=False``:
each rank its own copy of the model) or ``global-batch`` (``global_batch_size=8``).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torpor_harness import KillInStep, StopAt, resize_data, resize_net

import torpor


class StepLog(torpor.Callback):
    """One JSON line per step (the sample indices are the batch's third member), flushed."""

    def __init__(self, path: str, rank: int, delay: float) -> None:
        self.path, self.rank, self.delay = path, rank, delay

    def on_train_step_end(self, run_context: torpor.RunContext) -> None:
        args = run_context.original_args()
        line = {"rank": self.rank, "epoch": args.cur_epoch_num, "step": args.cur_step_num,
                "loss": float(args.net_outputs), "ids": [int(i) for i in args.last_batch[2]]}
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(line) + "\n")
        time.sleep(self.delay)


class StateDump(torpor.Callback):
    """This rank's model and optimizer state right after a resume and at the end."""

    def __init__(self, directory: str | None, rank: int) -> None:
        self.directory, self.rank = directory, rank

    def on_train_begin(self, run_context: torpor.RunContext) -> None:
        if run_context.original_args().resumed_from is not None:
            self._dump(run_context, "resumed")

    def on_train_end(self, run_context: torpor.RunContext) -> None:
        self._dump(run_context, "end")

    def _dump(self, run_context: torpor.RunContext, what: str) -> None:
        if self.directory:
            args = run_context.original_args()
            torch.save({"step": args.cur_step_num, "model": args.network.state_dict(),
                        "optimizer": args.optimizer.state_dict()}, Path(self.directory) / f"{what}-{self.rank}.pt")


def train(loop: torpor.Loop, net: nn.Module, opt: torch.optim.Optimizer, loader: Any, epochs: int) -> None:
    for _ in loop.epochs(epochs):
        for xb, yb, _ids in loop.batches(loader):
            opt.zero_grad()
            loss = nn.functional.cross_entropy(net(xb), yb)
            loss.backward()
            opt.step()
            loop.step_end(loss.detach())


def save_cases(cases: list[str], directory: Path, rank: int, world: int) -> None:
    for case in cases:
        kind = case if case in ("random", "iterable", "stateful") else "distributed"
        loader, state = resize_data(kind, rank, world)
        net, opt = resize_net()
        ddp = nn.parallel.DistributedDataParallel(net)
        monitor = torpor.CheckpointMonitor(directory=str(directory / case), save_checkpoint_steps=0,
                                           integrated_save=case != "copies",
                                           global_batch_size=8 if case == "global-batch" else None)
        loop = torpor.Loop(ddp, opt, callbacks=[monitor, StopAt(3)], state=state, exit_process=False)
        if kind == "stateful":
            for _ in loop.epochs(2):
                for xb, yb in loop.batches(loader):
                    opt.zero_grad()
                    nn.functional.cross_entropy(ddp(xb), yb).backward()
                    opt.step()
                    loop.step_end()
        else:
            train(loop, ddp, opt, loader, 2)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--steps", default=None)
    parser.add_argument("--state", default=None)
    parser.add_argument("--step-delay", type=float, default=0.0)
    parser.add_argument("--kill-rank", type=int, default=-1)
    parser.add_argument("--kill-at", type=int, default=0)
    parser.add_argument("--cases", default="")
    parser.add_argument("--directory", default="")
    opts = parser.parse_args()

    torpor.init_distributed()
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    if opts.cases:
        save_cases(opts.cases.split(","), Path(opts.directory), rank, world)
        return
    loader, _ = resize_data("distributed", rank, world)
    net, opt = resize_net()
    ddp = nn.parallel.DistributedDataParallel(net)
    torch.manual_seed(1000 + rank)  # dropout: each rank its own stream
    callbacks = [*torpor.callbacks_from_env(), StepLog(opts.steps, rank, opts.step_delay), StateDump(opts.state, rank),
                 *([KillInStep(opts.kill_at)] if rank == opts.kill_rank else [])]
    with torpor.Loop(ddp, opt, callbacks=callbacks, resume="latest") as loop:
        train(loop, ddp, opt, loader, opts.epochs)


if __name__ == "__main__":
    main()
