"""One rank of ``examples/lightning_train.py`` under real Lightning DDP, with a test's hooks.

``argv``: ``--signal-at STEP --signal-rank R`` makes rank R send itself SIGTERM (``os.kill``)
inside optimizer step STEP (from ``on_train_batch_start``); ``--raise-at STEP`` makes every rank
raise ``RuntimeError`` there (a crash, not a stop); ``--exit-file-at STEP`` makes rank 1
write ``{"GracefulExit": 1}`` into ``TORPOR_EXIT_FILE`` at that step; ``--weights FILE`` saves the
final weights when ``fit`` returns; ``--collectives FILE`` counts the Python-level collectives
(``torch.distributed.broadcast``/``all_reduce``/``barrier``/...) made while the steps run, from the
first batch to the end of training, into FILE (``{rank}`` is this rank). Everything else goes to
the example.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch

import torpor.lightning

sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "examples"))
import lightning_train


class AtStep(pl.Callback):
    """At the start of optimizer step ``step`` on rank ``rank``: a real SIGTERM, or the exit file."""

    def __init__(self, step: int, rank: int, action: str) -> None:
        self.step, self.rank, self.action = step, rank, action

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        if trainer.global_rank != self.rank or trainer.global_step + 1 != self.step:
            return
        if self.action == "signal":
            os.kill(os.getpid(), signal.SIGTERM)
        elif self.action == "raise":
            raise RuntimeError(f"a bug in step {self.step} of rank {self.rank}")
        else:
            Path(os.environ["TORPOR_EXIT_FILE"]).write_text(json.dumps({"GracefulExit": 1}))
            # Hold this rank in its step until torpor's watcher thread has seen the file (a condition,
            # not a sleep): the run is too short to outlast the watcher's poll period otherwise.
            [torpor_cb] = [cb for cb in trainer.callbacks if isinstance(cb, torpor.lightning.OnRequestExit)]
            deadline = time.monotonic() + 30
            while not torpor_cb.exit._watcher.requested:
                if time.monotonic() > deadline:
                    raise TimeoutError("the exit file watcher did not see the file within 30 s")
                time.sleep(0.01)  # polling the watcher's flag, as the harness's wait_for does


class CountCollectives(pl.Callback):
    """How many collectives Python code (torpor, Lightning) makes during the steps: DDP's own
    gradient all-reduce runs in its C++ reducer and is not counted."""

    NAMES = ("broadcast", "all_reduce", "barrier", "all_gather", "all_gather_object", "broadcast_object_list",
             "reduce", "gather", "scatter")

    def __init__(self, path: str) -> None:
        self.path, self.counts, self.saved, self.first = path, dict.fromkeys(self.NAMES, 0), {}, None

    def on_train_batch_start(self, trainer: pl.Trainer, *_: Any) -> None:
        if self.first is not None:
            return
        self.first = trainer.global_step
        for name in self.NAMES:
            original = self.saved[name] = getattr(torch.distributed, name)

            def counted(*args: Any, _name: str = name, _original: Any = original, **kwargs: Any) -> Any:
                self.counts[_name] += 1
                return _original(*args, **kwargs)

            setattr(torch.distributed, name, counted)

    def on_train_end(self, trainer: pl.Trainer, *_: Any) -> None:
        for name, original in self.saved.items():
            setattr(torch.distributed, name, original)
        steps = trainer.global_step - (self.first or 0)
        Path(self.path.format(rank=trainer.global_rank)).write_text(json.dumps({"steps": steps, **self.counts}))


parser = argparse.ArgumentParser()
parser.add_argument("--signal-at", type=int, default=0)
parser.add_argument("--signal-rank", type=int, default=1)
parser.add_argument("--exit-file-at", type=int, default=0)
parser.add_argument("--weights", default=None)
parser.add_argument("--collectives", default=None)
parser.add_argument("--raise-at", type=int, default=0, help="every rank raises RuntimeError in this step")
opts, rest = parser.parse_known_args()
hooks = ([AtStep(opts.signal_at, opts.signal_rank, "signal")] if opts.signal_at else []) + \
        ([AtStep(opts.exit_file_at, 1, "file")] if opts.exit_file_at else []) + \
        ([CountCollectives(opts.collectives)] if opts.collectives else []) + \
        ([AtStep(opts.raise_at, r, "raise") for r in (0, 1)] if opts.raise_at else [])
trainer = lightning_train.main(rest, extra_callbacks=hooks)
if opts.weights:
    torch.save({k: v.detach().clone() for k, v in trainer.lightning_module.state_dict().items()},
               opts.weights.format(rank=trainer.global_rank))
