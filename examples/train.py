"""A tiny, real training job that survives preemption: the script the operator's tests run.

A small MLP learns a synthetic classification task made in-script (fixed seeds, no
download), a step takes a few milliseconds on a CPU. The same file runs:

* alone:                 ``python examples/train.py``
* under torchrun:        ``torchrun --nproc-per-node 3 examples/train.py`` (gloo on CPU)
* under the operator:    ``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT`` and the
  ``TORPOR_*`` variables come from the pod (see ``torpor.env``); SIGTERM or
  ``{"GracefulExit": 1}`` stops every rank after the same step with a checkpoint, and the
  next incarnation resumes from the one named in ``TORPOR_RESUME_FROM``, on as many ranks
  as it has (the rest of the stopped epoch is dealt over them, see the README).

Options let tests observe it: ``--losses FILE`` appends one JSON line per step
(``{"rank", "step", "epoch", "loss"}``) and ``--max-steps N`` stops after step N.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import time

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

import torpor


class LossLog(torpor.Callback):
    """Appends each step's loss as a JSON line, flushed, so a parent can follow progress."""

    def __init__(self, path: str | None, step_delay: float = 0.0) -> None:
        self.path = path
        self.step_delay = step_delay

    def on_train_step_end(self, run_context: torpor.RunContext) -> None:
        args = run_context.original_args()
        if self.path:
            line = {"rank": int(os.environ.get("RANK", "0")), "step": args.cur_step_num,
                    "epoch": args.cur_epoch_num, "loss": float(args.net_outputs)}
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(line) + "\n")
        if self.step_delay:
            time.sleep(self.step_delay)  # demos only: stretch a run so a drain can catch it


class MaxSteps(torpor.Callback):
    """Stops after a given global step (every rank reaches it at the same step)."""

    def __init__(self, max_steps: int) -> None:
        self.max_steps = max_steps

    def on_train_step_end(self, run_context: torpor.RunContext) -> None:
        if self.max_steps and run_context.original_args().cur_step_num >= self.max_steps:
            run_context.request_stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=int(os.environ.get("TRAIN_EPOCHS", "3")))
    parser.add_argument("--samples", type=int, default=480, help="synthetic samples in the data set")
    parser.add_argument("--batch-size", type=int, default=8, help="per-rank batch size")
    parser.add_argument("--max-steps", type=int, default=0, help="stop after this global step (0: no limit)")
    parser.add_argument("--losses", default=None, help="append one JSON line per step to this file")
    parser.add_argument("--step-delay", type=float, default=float(os.environ.get("TRAIN_STEP_DELAY", "0")),
                        help="seconds to sleep after each step (demos)")
    opts = parser.parse_args()

    distributed = torpor.init_distributed()  # gloo on CPU when WORLD_SIZE > 1
    rank = torch.distributed.get_rank() if distributed else 0
    world = torch.distributed.get_world_size() if distributed else 1

    # The data and the initial weights are the same on every rank and in every incarnation.
    torch.manual_seed(0)
    features = torch.randn(opts.samples, 16)
    labels = (features @ torch.randn(16, 4)).argmax(dim=1)
    data = TensorDataset(features, labels)
    # A DistributedSampler on one process too: its order is the same on any number of ranks, so
    # a checkpoint resumes mid-epoch on another world size (1 included) without a sample twice.
    sampler = DistributedSampler(data, num_replicas=world, rank=rank, shuffle=True, seed=0)
    loader = DataLoader(data, batch_size=opts.batch_size, sampler=sampler)
    net: nn.Module = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Dropout(0.1), nn.Linear(32, 4))
    if distributed:
        net = nn.parallel.DistributedDataParallel(net)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=50, gamma=0.9)
    # Each rank's own random stream (dropout), restored exactly on resume.
    torch.manual_seed(1000 + rank)
    random.seed(1000 + rank)
    np.random.seed(1000 + rank)

    model = torpor.Model(net, loss_fn=nn.CrossEntropyLoss(), optimizer=optimizer, lr_scheduler=scheduler)
    callbacks = [*torpor.callbacks_from_env(), LossLog(opts.losses, opts.step_delay), MaxSteps(opts.max_steps)]
    ctx = model.train(opts.epochs, loader, callbacks=callbacks, resume="latest")
    args = ctx.original_args()
    loss = float(args.net_outputs)
    print(f"rank {rank}: finished at epoch {args.cur_epoch_num} step {args.cur_step_num} loss {loss:.4f}")


if __name__ == "__main__":
    main()
