"""One rank of an FSDP2 run whose shards are larger than one S3 part: one step, saved.

The model is one 4096×2048 linear layer sharded over the ranks with AdamW, so each rank's
``.distcp`` (its weight shard and both moments, 48 MiB on 2 ranks) is larger than
:class:`torpor.storage.S3Settings`' default 32 MiB part and goes up as a multipart upload.
After the save, rank 0 writes the gathered model and optimizer state to ``--full``.
"""

from __future__ import annotations

import argparse

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict
from torch.distributed.fsdp import fully_shard
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

import torpor


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
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)  # gathered on rank 0: collectives
    model, optimizer = get_model_state_dict(net, options=options), get_optimizer_state_dict(net, opt, options=options)
    if dist.get_rank() == 0:
        torch.save({"saved": monitor.saved, "model": model, "optimizer": optimizer}, opts.full)


if __name__ == "__main__":
    main()
