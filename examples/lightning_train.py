"""A tiny PyTorch Lightning job that survives preemption with ``torpor.lightning``.

The same small classification task as ``examples/train.py`` (synthetic data made in-script,
fixed seeds, no download), as a ``LightningModule`` trained by ``Trainer(strategy="ddp")`` on
the CPU (gloo). The only torpor lines are the callback and the ``devices``/``num_nodes`` read
from the launcher's variables. The same file runs:

* alone:                 ``python examples/lightning_train.py``
* under torchrun:        ``torchrun --nproc-per-node 2 examples/lightning_train.py``
* under the operator:    SIGTERM or ``{"GracefulExit": 1}`` on any rank stops every rank after the
  same step with a checkpoint of every rank in torpor's layout; the process exits 143 (75 for
  the file) with a termination message, and the next incarnation resumes from the checkpoint
  named in ``TORPOR_RESUME_FROM`` (``examples/trainingjob.yaml`` with this script as command);
  ``spec.checkpoint.saveSteps`` (``TORPOR_SAVE_STEPS``) adds periodic checkpoints of every rank.

Options let tests observe it: ``--losses FILE`` appends one JSON line per optimizer step
(``{"rank", "step", "epoch", "loss"}``), ``--max-steps N`` ends training after step N.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Sequence
from datetime import timedelta
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.strategies import DDPStrategy
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import torpor.lightning


class Classifier(pl.LightningModule):
    """A small MLP with dropout, SGD with momentum and a step schedule."""

    def __init__(self, lr: float = 0.05) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Dropout(0.1), nn.Linear(32, 4))
        self.loss_fn = nn.CrossEntropyLoss()

    def training_step(self, batch: Sequence[torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        return self.loss_fn(self.net(x), y)

    def configure_optimizers(self) -> Any:
        optimizer = torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=0.9)
        # stepped every optimizer step, so its state changes within a run (a resume must restore it)
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, 8, gamma=0.7)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


class LossLog(pl.Callback):
    """Appends each optimizer step's loss as a JSON line, flushed, so a parent can follow progress."""

    def __init__(self, path: str | None, step_delay: float = 0.0) -> None:
        self.path = path
        self.step_delay = step_delay

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if self.path:
            line = {"rank": trainer.global_rank, "step": trainer.global_step, "epoch": trainer.current_epoch + 1,
                    "loss": float(outputs["loss"])}
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(line) + "\n")
        if self.step_delay:
            time.sleep(self.step_delay)  # demos only: stretch a run so a drain can catch it


def main(argv: Sequence[str] | None = None, extra_callbacks: Sequence[pl.Callback] = ()) -> pl.Trainer:
    """Train; ``extra_callbacks`` let a test add its own (a signal at a given step)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=int(os.environ.get("TRAIN_EPOCHS", "3")))
    parser.add_argument("--samples", type=int, default=480, help="synthetic samples in the data set")
    parser.add_argument("--batch-size", type=int, default=8, help="per-rank batch size")
    parser.add_argument("--max-steps", type=int, default=-1, help="end after this optimizer step (-1: no limit)")
    parser.add_argument("--losses", default=None, help="append one JSON line per step to this file")
    parser.add_argument("--step-delay", type=float, default=float(os.environ.get("TRAIN_STEP_DELAY", "0")),
                        help="seconds to sleep after each step (demos)")
    opts = parser.parse_args(argv)

    # The data and the initial weights are the same on every rank and in every incarnation;
    # Lightning shards the shuffled data with a DistributedSampler (seed 0, set_epoch per epoch).
    torch.manual_seed(0)
    features = torch.randn(opts.samples, 16)
    labels = (features @ torch.randn(16, 4)).argmax(dim=1)
    loader = DataLoader(TensorDataset(features, labels), batch_size=opts.batch_size, shuffle=True)
    model = Classifier()
    # Each rank's own random stream (dropout); torpor saves and restores it with the checkpoint.
    pl.seed_everything(1000 + int(os.environ.get("RANK", "0")), verbose=False)

    topology = torpor.lightning.distributed_kwargs()
    distributed = topology["devices"] * topology["num_nodes"] > 1
    trainer = pl.Trainer(
        accelerator="cpu",
        strategy=DDPStrategy(process_group_backend="gloo", timeout=timedelta(seconds=120)) if distributed else "auto",
        **topology,
        max_epochs=opts.epochs,
        max_steps=opts.max_steps,
        callbacks=[torpor.lightning.OnRequestExit.from_env(), LossLog(opts.losses, opts.step_delay),
                   *extra_callbacks],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model, loader)
    print(f"rank {trainer.global_rank}: finished at epoch {trainer.current_epoch} step {trainer.global_step}")
    return trainer


if __name__ == "__main__":
    main()
