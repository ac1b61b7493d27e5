"""One gloo rank of a DDP job with what users train with: its own loader generator, a
``DistributedSampler``, a ``GradScaler``, an EMA and a second optimizer, all through ``state=``.

Writes one JSON line per step to ``--losses`` (rank, step, loss, scale) and, at the end,
``--report`` (how many samples this rank's dataset loaded, a digest of the EMA weights).
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torch.utils.data import DataLoader, Dataset, DistributedSampler

import torpor


class Counting(Dataset):
    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y, self.calls = x, y, 0

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        self.calls += 1
        return self.x[i], self.y[i]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--max-steps", type=int, default=0)
    parser.add_argument("--losses", required=True)
    parser.add_argument("--report", required=True)
    parser.add_argument("--step-delay", type=float, default=0.0)
    opts = parser.parse_args()

    torpor.init_distributed()
    rank = torch.distributed.get_rank()
    torch.manual_seed(0)
    x = torch.randn(96, 8)
    data = Counting(x, (x[:, :4].sum(dim=1) > 0).long())
    sampler = DistributedSampler(data, shuffle=True, seed=0)
    g = torch.Generator().manual_seed(100 + rank)
    loader = DataLoader(data, batch_size=4, sampler=sampler, generator=g)
    body, head = nn.Linear(8, 16), nn.Linear(16, 2)
    net = nn.parallel.DistributedDataParallel(nn.Sequential(body, nn.ReLU(), nn.Dropout(0.1), head))
    opt = torch.optim.SGD(body.parameters(), lr=0.05, momentum=0.9)
    opt2 = torch.optim.AdamW(head.parameters(), lr=0.01)
    sched2 = torch.optim.lr_scheduler.StepLR(opt2, step_size=5, gamma=0.8)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 126, growth_interval=3)
    ema = AveragedModel(net.module, multi_avg_fn=get_ema_multi_avg_fn(0.9))
    torch.manual_seed(1000 + rank)  # dropout: each rank its own stream


    class Stop(torpor.Callback):
        def on_train_step_end(self, run_context: torpor.RunContext) -> None:
            if opts.max_steps and run_context.original_args().cur_step_num >= opts.max_steps:
                run_context.request_stop()

    loop = torpor.Loop(net, opt, callbacks=[*torpor.callbacks_from_env(), Stop()], resume="latest",
                       state={"opt2": opt2, "sched2": sched2, "scaler": scaler, "ema": ema})

    for _ in loop.epochs(opts.epochs):
        for xb, yb in loop.batches(loader):
            opt.zero_grad()
            opt2.zero_grad()
            loss = nn.functional.cross_entropy(net(xb), yb)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.step(opt2)
            scaler.update()
            sched2.step()
            ema.update_parameters(net.module)
            with open(opts.losses, "a", encoding="utf-8") as f:
                f.write(json.dumps({"rank": rank, "step": loop.args.cur_step_num, "loss": float(loss),
                                    "scale": scaler.get_scale()}) + "\n")
            loop.step_end(loss.detach())
            time.sleep(opts.step_delay)
    digest = float(sum(p.double().sum() for p in ema.parameters()))
    with open(opts.report.format(rank=rank), "w", encoding="utf-8") as f:
        json.dump({"rank": rank, "calls": data.calls, "step": loop.args.cur_step_num, "ema": digest}, f)


if __name__ == "__main__":
    main()
