"""Trains two short epochs; the final save sends this process a real SIGTERM part-way.

The store's write of the final checkpoint's manifest (the last file of the save) signals the
process before writing it, so the signal arrives while the final save is in progress, after
the last step. Under the operator (``TORPOR_JOB`` set by the test) it must still end as a
completed run with a complete final checkpoint, not be killed by a default handler.

Usage: ``final_save_sigterm.py DIRECTORY``.
"""

from __future__ import annotations

import os
import signal
import sys

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import torpor
from torpor.storage import LocalStorage


class SignalDuringFinalSave(LocalStorage):
    """A local store that sends SIGTERM to its own process just before the final manifest lands."""

    final = "CKP-2_4"

    def put_bytes(self, key: str, data: bytes | memoryview) -> None:
        if key.startswith(f"rank_0/{self.final}.manifest"):
            print(f"SIGTERM sent during the final save ({key})", flush=True)
            os.kill(os.getpid(), signal.SIGTERM)
        super().put_bytes(key, data)


class Monitor(torpor.CheckpointMonitor):
    """A monitor whose store is the signalling one."""

    @property
    def storage(self) -> LocalStorage:  # type: ignore[override]
        if self._storage is None:
            self._storage = SignalDuringFinalSave(self.directory)
        return self._storage  # type: ignore[return-value]


def main() -> None:
    directory = sys.argv[1]
    torch.manual_seed(0)
    x = torch.randn(32, 6)
    loader = DataLoader(TensorDataset(x, (x[:, 0] > 0).long()), batch_size=8)
    net = nn.Linear(6, 2)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    callbacks = [torpor.OnRequestExit(directory=directory, save_export=False),
                 Monitor(directory=directory, save_checkpoint_steps=1000)]
    torpor.Model(net, loss_fn=nn.CrossEntropyLoss(), optimizer=opt).train(2, loader, callbacks=callbacks)
    print("training returned", flush=True)


if __name__ == "__main__":
    main()
