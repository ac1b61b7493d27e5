"""One training run whose exit save's ``torch.export`` blocks until a file appears.

Usage: ``slow_export_run.py CHECKPOINT_DIR EXPORTING_MARKER RELEASE_FILE``. The process
sends itself SIGTERM inside step 3; ``OnRequestExit(save_export=True)`` then saves. The
network's forward, only while ``torch.export`` traces it, creates EXPORTING_MARKER and
waits (up to two minutes) for RELEASE_FILE, so a parent can SIGKILL the process exactly
while the export runs and look at what is stored.
"""

import os
import signal
import sys
import time
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import torpor

directory, marker, release = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])


class BlocksWhileExported(nn.Module):
    """A small MLP; its forward blocks on ``release`` only during ``torch.export``."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(6, 12), nn.ReLU(), nn.Linear(12, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_exporting():
            marker.touch()
            deadline = time.monotonic() + 120
            while not release.exists() and time.monotonic() < deadline:
                time.sleep(0.01)
        return self.body(x)


class SigtermInStep(torpor.Callback):
    """Sends SIGTERM to this process inside step 3."""

    def on_train_step_begin(self, run_context: torpor.RunContext) -> None:
        if run_context.original_args().cur_step_num == 3:
            os.kill(os.getpid(), signal.SIGTERM)


torch.manual_seed(0)
x = torch.randn(64, 6)
loader = DataLoader(TensorDataset(x, (x[:, 0] > 0).long()), batch_size=8)
net = BlocksWhileExported()
opt = torch.optim.SGD(net.parameters(), lr=0.1)
exit_cb = torpor.OnRequestExit(directory=directory, save_export=True)
torpor.Model(net, loss_fn=nn.CrossEntropyLoss(), optimizer=opt).train(
    2, loader, callbacks=[exit_cb, SigtermInStep()], exit_process=False)
print("exported and finished", flush=True)
