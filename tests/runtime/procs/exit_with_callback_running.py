"""One rank whose script ends while a collective's completion callback still runs.

The callback (as a Python DDP communication hook's ``then`` would) runs on gloo's worker
thread and needs the interpreter after the main thread has left the script. ``--marker``
(``{rank}`` replaced) is written when the callback has finished its work. With
``--own-group`` the script makes the process group itself and runs a two-step
``torpor.Loop`` first (torpor did not start the group, the loop must still see it torn down).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import torch.distributed as dist

import torpor


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--marker", required=True)
    parser.add_argument("--callback-seconds", type=float, default=0.5)
    parser.add_argument("--own-group", action="store_true")
    opts = parser.parse_args()
    if opts.own_group:
        dist.init_process_group("gloo")
        net = torch.nn.Linear(2, 1)
        with torpor.Loop(net, torch.optim.SGD(net.parameters(), lr=0.1)) as loop:
            for _ in loop.epochs(1):
                for _batch in loop.batches([torch.ones(2)] * 2):
                    loop.step_end()
    else:
        torpor.init_distributed()
    marker = Path(opts.marker.format(rank=dist.get_rank()))

    def finish(fut: torch.futures.Future[list[torch.Tensor]]) -> list[torch.Tensor]:
        time.sleep(opts.callback_seconds)
        marker.write_text(str(fut.value()[0].tolist()))
        return fut.value()

    dist.all_reduce(torch.ones(4), async_op=True).get_future().then(finish)


if __name__ == "__main__":
    main()
