"""Your own training loop, made preemption-safe with torpor: the lines marked ``# torpor``.

Three lines are added and two changed (``range`` → ``loop.epochs``, ``loader`` →
``loop.batches``). Run it twice: the second run resumes where the first stopped; send it
SIGTERM (or write ``{"GracefulExit": 1}`` to ``$TORPOR_EXIT_FILE``) and it saves and stops
after the current step. Everything else is configured by the ``TORPOR_*`` variables
(``torpor.env``), so the operator can run it unchanged.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import torpor  # torpor


def main() -> None:
    torch.manual_seed(0)
    x = torch.randn(256, 8)
    y = x.sum(dim=1, keepdim=True)
    loader = DataLoader(TensorDataset(x, y), batch_size=16, shuffle=True)
    net = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1))
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    loss_fn = nn.MSELoss()

    # torpor: "with" lets exception_save (TORPOR_* / CheckpointMonitor) see a crash in the body.
    with torpor.Loop(net, opt, callbacks=torpor.callbacks_from_env(), resume="latest") as loop:  # torpor
        for epoch in loop.epochs(5):  # torpor: was range(1, 6)
            for xb, yb in loop.batches(loader):  # torpor: was loader
                opt.zero_grad()
                loss = loss_fn(net(xb), yb)
                loss.backward()
                opt.step()
                loop.step_end(loss, inputs=(xb,))  # torpor
            print(f"epoch {epoch} loss {loss.item():.4f}")
    start = loop.loaded.name if loop.loaded else "scratch"
    print(f"done at step {loop.args.cur_step_num}, started from {start}")


if __name__ == "__main__":
    main()
