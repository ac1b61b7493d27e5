"""One gloo rank of a job that validates after every epoch; a real SIGTERM can hit mid-evaluation.

``TORPOR_*`` configure the callbacks as under the operator. ``KILL_RANK``/``KILL_EVAL``/``KILL_STEP``
(optional): that rank sends itself SIGTERM inside evaluation step ``KILL_STEP`` of evaluation
number ``KILL_EVAL``. Every training step appends ``{"rank", "step", "epoch"}`` to ``LOSSES``.

Usage: ``eval_each_epoch.py EPOCHS``.
"""

from __future__ import annotations

import json
import os
import signal
import sys

import torch
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

import torpor


class EvalEachEpoch(torpor.Callback):
    """Validates after every epoch with the run's own ``OnRequestExit``, as users do."""

    order = 10

    def __init__(self, model: torpor.Model, data: DataLoader, callbacks: list[torpor.Callback]) -> None:
        self.model, self.data, self.callbacks = model, data, callbacks

    def on_train_epoch_end(self, run_context: torpor.RunContext) -> None:
        self.model.eval(self.data, callbacks=self.callbacks)


class KillInEval(torpor.Callback):
    """This rank sends itself SIGTERM inside one evaluation step (a real signal, mid-evaluation)."""

    def __init__(self, call: int, step: int) -> None:
        self.call, self.step, self.calls = call, step, 0

    def on_eval_begin(self, run_context: torpor.RunContext) -> None:
        self.calls += 1

    def on_eval_step_begin(self, run_context: torpor.RunContext) -> None:
        if self.calls == self.call and run_context.original_args().cur_step_num == self.step:
            os.kill(os.getpid(), signal.SIGTERM)


class StepLog(torpor.Callback):
    """One JSON line per training step."""

    def __init__(self, path: str, rank: int) -> None:
        self.path, self.rank = path, rank

    def on_train_step_end(self, run_context: torpor.RunContext) -> None:
        args = run_context.original_args()
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps({"rank": self.rank, "step": args.cur_step_num, "epoch": args.cur_epoch_num}) + "\n")


def main() -> None:
    epochs = int(sys.argv[1])
    torpor.init_distributed()
    rank = torch.distributed.get_rank()
    torch.manual_seed(0)
    x = torch.randn(64, 6)
    data = TensorDataset(x, (x[:, 0] > 0).long())
    loader = DataLoader(data, batch_size=8, sampler=DistributedSampler(data, shuffle=True, seed=0))
    valid = TensorDataset(x[:32], (x[:32, 1] > 0).long())
    valid_loader = DataLoader(valid, batch_size=4, sampler=DistributedSampler(valid, shuffle=False))
    net = nn.parallel.DistributedDataParallel(nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 2)))
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    model = torpor.Model(net, loss_fn=nn.CrossEntropyLoss(), optimizer=opt)
    exit_cb = torpor.OnRequestExit.from_env(save_export=False)
    eval_callbacks: list[torpor.Callback] = [exit_cb]
    if os.environ.get("KILL_RANK") == str(rank):
        eval_callbacks.append(KillInEval(int(os.environ["KILL_EVAL"]), int(os.environ["KILL_STEP"])))
    callbacks = [exit_cb, torpor.CheckpointMonitor.from_env(), StepLog(os.environ["LOSSES"], rank),
                 EvalEachEpoch(model, valid_loader, eval_callbacks)]
    model.train(epochs, loader, callbacks=callbacks, resume="latest")


if __name__ == "__main__":
    main()
