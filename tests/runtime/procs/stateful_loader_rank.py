"""One gloo rank of a DDP job whose loader keeps its own position (``torpor_harness.PositionLoader``
over this rank's half of the data, its order drawn from its own per-rank generator), passed in
``state=`` with the default ``integrated_save``: rank 0's position is not rank 1's.

With ``--kill-at N`` on the rank named by ``--kill-rank``, the rank sends itself SIGTERM inside
step N. Writes one JSON line per step to ``--steps`` (rank, step, loss, the step's sample ids)
and, at the end, ``--report`` (steps trained, batches the loader produced, its position).
"""

from __future__ import annotations

import argparse
import json
import os
import signal

import torch
from torch import nn
from torpor_harness import PositionLoader, SizedPositionLoader

import torpor


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--steps", required=True)
    parser.add_argument("--report", required=True)
    parser.add_argument("--kill-rank", type=int, default=-1)
    parser.add_argument("--kill-at", type=int, default=0)
    parser.add_argument("--no-len", action="store_true")
    opts = parser.parse_args()

    torpor.init_distributed()
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    g = torch.Generator().manual_seed(7)
    x = torch.randn(48, 6, generator=g)
    y = (x[:, :3].sum(dim=1) > 0).long()
    mine = torch.arange(rank, len(x), world)  # this rank's part: the rank's own positions and samples
    loader = (PositionLoader if opts.no_len else SizedPositionLoader)(x[mine], y[mine], batch_size=4, seed=rank)
    ids = {row.numpy().tobytes(): int(i) for i, row in zip(mine, x[mine], strict=True)}
    torch.manual_seed(0)
    net = nn.parallel.DistributedDataParallel(nn.Sequential(nn.Linear(6, 12), nn.ReLU(), nn.Dropout(0.2),
                                                            nn.Linear(12, 2)))
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    torch.manual_seed(1000 + rank)  # dropout: each rank its own stream

    loop = torpor.Loop(net, opt, callbacks=torpor.callbacks_from_env(), resume="latest", state={"loader": loader})
    for _ in loop.epochs(opts.epochs):
        for xb, yb in loop.batches(loader):
            step = loop.args.cur_step_num
            if rank == opts.kill_rank and step == opts.kill_at:
                os.kill(os.getpid(), signal.SIGTERM)
            opt.zero_grad()
            loss = nn.functional.cross_entropy(net(xb), yb)
            loss.backward()
            opt.step()
            with open(opts.steps, "a", encoding="utf-8") as f:
                f.write(json.dumps({"rank": rank, "step": step, "loss": float(loss),
                                    "samples": [ids[row.numpy().tobytes()] for row in xb]}) + "\n")
            loop.step_end(loss.detach())
    with open(opts.report.format(rank=rank), "w", encoding="utf-8") as f:
        json.dump({"rank": rank, "steps": loop.args.cur_step_num, "produced": loader.produced,
                   "position": {k: v.tolist() if isinstance(v, torch.Tensor) else v
                                for k, v in loader.state_dict().items()}}, f)


if __name__ == "__main__":
    main()
