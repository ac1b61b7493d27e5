"""One real gloo rank of a 2-rank run: 8 steps, a checkpoint at steps 4 and 8.

``argv``: checkpoint directory, ``integrated`` or ``sharded``, and a directory where this rank
writes its final first-layer weights (``weights-{rank}.pt``). Each rank seeds its network with its rank, so with
``sharded`` (``integrated_save=False``) every rank's shard holds different weights.
"""

import sys

import torch
from torpor_harness import tiny_setup

import torpor
from torpor import _distributed

directory, layout, out_dir = sys.argv[1], sys.argv[2], sys.argv[3]
torpor.init_distributed(timeout_seconds=60)
rank = _distributed.rank()
net, loss, opt, loader = tiny_setup(seed=rank)
monitor = torpor.CheckpointMonitor(directory=directory, save_checkpoint_steps=4, save_network_params=False,
                                   integrated_save=layout == "integrated")
torpor.Model(net, loss_fn=loss, optimizer=opt).train(1, loader, callbacks=monitor)
torch.save(net[0].weight.detach().clone(), f"{out_dir}/weights-{rank}.pt")
_distributed.shutdown()
