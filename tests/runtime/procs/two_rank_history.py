"""One real gloo rank of a 2-rank history: 8 steps of its own weights (seed = rank), saving at
steps 4 and 8 (``--sharded``: every rank writes its own model state); its final first-layer
weights go to ``weights-{rank}.pt`` in the working directory."""

import sys

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import torpor

directory, sharded = sys.argv[1], "--sharded" in sys.argv
torpor.init_distributed()
rank = torch.distributed.get_rank()
torch.manual_seed(rank)  # different weights per rank: what sharded state is
x = torch.randn(64, 6)
loader = DataLoader(TensorDataset(x, (x[:, :3].sum(dim=1) > 0).long()), batch_size=8, shuffle=True)
net = nn.Sequential(nn.Linear(6, 12), nn.ReLU(), nn.Dropout(0.2), nn.Linear(12, 2))
opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
monitor = torpor.CheckpointMonitor(directory=directory, save_checkpoint_steps=4, integrated_save=not sharded,
                                   save_network_params=False)
torpor.Model(net, loss_fn=nn.CrossEntropyLoss(), optimizer=opt).train(1, loader, callbacks=monitor)
torch.save(net[0].weight.detach().clone(), f"weights-{rank}.pt")
torch.distributed.destroy_process_group()
