"""One training run that stops itself with a real SIGTERM at a given step (exit save), resuming
from 'latest'; with ``--kill-after-shard`` it SIGKILLs itself once the exit save's shard is
written and before its manifest is (a node gone part-way through the save)."""

import argparse
import os
import signal

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import torpor
from torpor import _saving
from torpor.checkpoints import FileKind, parse_key

parser = argparse.ArgumentParser()
parser.add_argument("directory")
parser.add_argument("--stop-at", type=int, required=True)
parser.add_argument("--kill-after-shard", action="store_true")
opts = parser.parse_args()


class SigtermAt(torpor.Callback):
    def on_train_step_begin(self, run_context: torpor.RunContext) -> None:
        if run_context.original_args().cur_step_num == opts.stop_at:
            os.kill(os.getpid(), signal.SIGTERM)


if opts.kill_after_shard:
    write_file = _saving.write_file

    def write_then_die(storage, key, content, encryption, **kwargs):
        entry = write_file(storage, key, content, encryption, **kwargs)
        if parse_key(key).kind is FileKind.SHARD:  # type: ignore[union-attr]
            os.kill(os.getpid(), signal.SIGKILL)
        return entry

    _saving.write_file = write_then_die

torch.manual_seed(0)
x = torch.randn(64, 6)
loader = DataLoader(TensorDataset(x, (x.sum(dim=1) > 0).long()), batch_size=8, shuffle=True)
net = nn.Sequential(nn.Linear(6, 12), nn.ReLU(), nn.Linear(12, 2))
opt = torch.optim.SGD(net.parameters(), lr=0.1)
exit_cb = torpor.OnRequestExit(directory=opts.directory, save_export=False)
torpor.Model(net, loss_fn=nn.CrossEntropyLoss(), optimizer=opt).train(
    5, loader, callbacks=[exit_cb, SigtermAt()], resume="latest", exit_process=False)
print("saved", exit_cb.stop_message.checkpoint if exit_cb.stop_message else None)
