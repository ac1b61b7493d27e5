"""One rank of an FSDP2 run whose shards are larger than one S3 part: one step, saved.

The model is one 4096×2048 linear layer sharded over the ranks with AdamW, so each rank's
``.distcp`` (its weight shard and both moments, 48 MiB on 2 ranks) is larger than
:class:`torpor.storage.S3Settings`' default 32 MiB part and goes up as a multipart upload.
After the save, rank 0 writes the gathered model and optimizer state to ``--full``.
"""

from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import fully_shard
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

import torpor

EXAMPLE = Path(__file__).resolve().parents[3] / "examples" / "fsdp2.py"


def _example():  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location("fsdp2_example", EXAMPLE)
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


def build() -> tuple[nn.Module, torch.optim.Optimizer]:
    """The same initial weights on every rank; sharded when a process group exists."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4096, 2048, bias=False))
    if dist.is_initialized():
        fully_shard(net[0])
        fully_shard(net)
    return net, torch.optim.AdamW(net.parameters(), lr=0.01)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--directory", required=True)
    parser.add_argument("--full", required=True, help="rank 0 writes the gathered state here after the save")
    opts = parser.parse_args()

    torpor.init_distributed()
    net, opt = build()
    torch.manual_seed(1)
    data = TensorDataset(torch.randn(8, 4096), torch.randn(8, 2048))
    loader = DataLoader(data, batch_size=2, sampler=DistributedSampler(data, seed=0))
    monitor = torpor.CheckpointMonitor(directory=opts.directory, save_checkpoint_steps=1)
    with torpor.Loop(net, opt, callbacks=[monitor]) as loop:
        for _ in loop.epochs(1):
            for xb, yb in loop.batches(loader):
                opt.zero_grad()
                nn.functional.mse_loss(net(xb), yb).backward()
                opt.step()
                loop.step_end()
                loop.run_context.request_stop()
    full = _example().full_state(net, {"optimizer": opt})
    if dist.get_rank() == 0:
        torch.save({"saved": monitor.saved, **full}, opts.full)


if __name__ == "__main__":
    main()
