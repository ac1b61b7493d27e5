"""One rank that joins the process group through torpor and reports where it listens."""

import json
import os
import sys

import torch
import torch.distributed as dist

import torpor
from processes import listening_addresses

torpor.init_distributed()
total = torch.ones(1)
dist.all_reduce(total)
# Listening sockets stay open until the group is destroyed: read them while it is alive.
report = {"rank": dist.get_rank(), "sum": total.item(), "listening": sorted(listening_addresses({os.getpid()}))}
dist.barrier()
dist.destroy_process_group()
json.dump(report, sys.stdout)
