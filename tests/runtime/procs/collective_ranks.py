"""One rank of the collective tests: uneven data, a save that fails on one rank, a stop.

Every rank writes ``--result`` (a JSON file per rank, ``{rank}`` in the path is replaced)
when it ends, however it ends: the steps it trained with their losses, the epoch, and the
error that ended it, so the test can assert that every rank ended the same way at the same
step. A DDP-wrapped network, so DDP's gradient all-reduce runs in every step.

Data (``--split``):

* ``iterable``: an ``IterableDataset`` where rank ``r`` takes samples ``r, r + world, ...``;
  when ``world`` does not divide ``--samples`` the first ranks get more (no ``len``).
* ``sampler``: a ``DistributedSampler(drop_last=False)`` over a data set whose length differs
  by rank (``--samples - 8 * rank``: a listing taken at different moments); lengths known.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import traceback
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, IterableDataset, TensorDataset

import torpor


class Split(IterableDataset):
    """Rank ``r`` of ``world`` yields every ``world``-th sample starting at ``r``."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, rank: int, world: int) -> None:
        self.x, self.y, self.rank, self.world = x, y, rank, world

    def __iter__(self) -> Any:
        for i in range(self.rank, len(self.x), self.world):
            yield self.x[i], self.y[i]


COLLECTIVES = [0]


def count_collectives() -> None:
    """Count the all-reduces called from Python (torpor's; DDP's gradient buckets go through C++)."""
    real = torch.distributed.all_reduce

    def counted(*args: Any, **kwargs: Any) -> Any:
        COLLECTIVES[0] += 1
        return real(*args, **kwargs)

    torch.distributed.all_reduce = counted


class Record(torpor.Callback):
    """Remembers each step's loss and the collectives since the last step; sends itself a real
    SIGTERM inside a chosen step."""

    order = -1000  # records a step before a hook that raises at its boundary

    def __init__(self, sigterm_step: int) -> None:
        self.steps: list[int] = []
        self.losses: list[float] = []
        self.epochs: list[int] = []
        self.collectives: list[int] = []
        self.sigterm_step = sigterm_step
        self._seen = 0

    def on_train_step_begin(self, run_context: torpor.RunContext) -> None:
        if run_context.original_args().cur_step_num == self.sigterm_step:
            os.kill(os.getpid(), signal.SIGTERM)

    def on_train_step_end(self, run_context: torpor.RunContext) -> None:
        args = run_context.original_args()
        self.steps.append(args.cur_step_num)
        self.epochs.append(args.cur_epoch_num)
        self.losses.append(float(args.net_outputs))
        self.collectives.append(COLLECTIVES[0] - self._seen)
        self._seen = COLLECTIVES[0]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--split", choices=("iterable", "sampler"), default="iterable")
    p.add_argument("--form", choices=("model", "loop"), default="model")
    p.add_argument("--samples", type=int, default=25)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--directory", required=True)
    p.add_argument("--result", required=True, help="JSON result path, '{rank}' replaced")
    p.add_argument("--save-steps", type=int, default=10**9)
    p.add_argument("--save-seconds", type=int, default=0, help="save by seconds instead of steps")
    p.add_argument("--async-save", action="store_true")
    p.add_argument("--async-errors", default="record")
    p.add_argument("--check-every", type=int, default=1)
    p.add_argument("--sigterm-rank", type=int, default=-1)
    p.add_argument("--sigterm-step", type=int, default=0)
    p.add_argument("--block-rank", type=int, default=-1, help="this rank's saves fail (see --block-name)")
    p.add_argument("--block-name", default="", help="only this checkpoint fails (a directory where its shard goes); "
                                                    "empty: every save (a file where the rank's directory goes)")
    opts = p.parse_args()

    torpor.init_distributed(timeout_seconds=30)  # a hang fails fast
    count_collectives()
    rank, world = torpor._distributed.rank(), torpor._distributed.world_size()
    root = Path(opts.directory)
    if rank == opts.block_rank:
        root.mkdir(parents=True, exist_ok=True)
        if opts.block_name:
            (root / f"rank_{rank}" / f"{opts.block_name}.ckpt").mkdir(parents=True)
        else:
            (root / f"rank_{rank}").write_text("not a directory")

    torch.manual_seed(0)
    x = torch.randn(opts.samples, 6)
    y = (x[:, :3].sum(dim=1) > 0).long()
    if opts.split == "iterable":
        loader = DataLoader(Split(x, y, rank, world), batch_size=opts.batch_size)
    else:
        n = opts.samples - 8 * rank
        sampler = DistributedSampler(TensorDataset(x[:n], y[:n]), shuffle=True, seed=0, drop_last=False)
        loader = DataLoader(sampler.dataset, batch_size=opts.batch_size, sampler=sampler)
    net: nn.Module = nn.parallel.DistributedDataParallel(nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 2)))
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    loss_fn = nn.CrossEntropyLoss()
    record = Record(opts.sigterm_step if rank == opts.sigterm_rank else 0)
    steps = 0 if opts.save_seconds else opts.save_steps
    monitor = torpor.CheckpointMonitor(directory=str(root), save_checkpoint_steps=steps,
                                       save_checkpoint_seconds=opts.save_seconds,
                                       async_save=opts.async_save, async_errors=opts.async_errors)
    callbacks = [torpor.OnRequestExit(directory=str(root), save_export=False, check_every_n_steps=opts.check_every),
                 monitor, record]
    result: dict[str, Any] = {"rank": rank, "error": None, "exit": None}
    try:
        if opts.form == "model":
            torpor.Model(net, loss_fn=loss_fn, optimizer=opt).train(opts.epochs, loader, callbacks=callbacks,
                                                                     exit_process=True)
        else:
            with torpor.Loop(net, opt, loss_fn=loss_fn, callbacks=callbacks, exit_process=True) as loop:
                for _ in loop.epochs(opts.epochs):
                    for xb, yb in loop.batches(loader):
                        opt.zero_grad()
                        loss = loss_fn(net(xb), yb)
                        loss.backward()
                        opt.step()
                        loop.step_end(loss.detach(), inputs=(xb,))
    except SystemExit as exc:
        result["exit"] = exc.code
        raise
    except BaseException as exc:
        result["error"] = f"{type(exc).__name__}: {exc}"
        traceback.print_exc()
        raise
    finally:
        result.update(steps=record.steps, epochs=record.epochs, losses=record.losses, collectives=record.collectives,
                      save_errors=[str(e) for e in monitor.save_errors], saved=monitor.saved)
        Path(opts.result.replace("{rank}", str(rank))).write_text(json.dumps(result))


if __name__ == "__main__":
    main()
