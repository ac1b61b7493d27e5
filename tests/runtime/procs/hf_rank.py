"""One rank of ``examples/hf_train.py``'s Trainer with what the tests observe and do inside steps.

``--losses``: one JSON line per logged step (step, loss: the Trainer's own, averaged over the
ranks, and the learning rate the scheduler gave that step); ``--final``: the model's weights
when training returns (``{final}-{rank}.pt``) and what else a resume must bring back
(``{final}-{rank}.json``: the Trainer's global step, the scheduler's last LR, the optimizer's
own step count, a digest of the CPU generator). ``--kill-at STEP`` with ``--rank R``: rank R
sends itself SIGTERM inside step STEP (a real signal, mid-step); ``--exit-file-at STEP``: rank R
writes ``{"GracefulExit": 1}`` to ``$TORPOR_EXIT_FILE`` instead.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import signal
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "examples"))

from transformers import TrainerCallback

from hf_train import build
from torpor.transformers import TorporCallback


class InStep(TrainerCallback):
    """On one rank, inside one step (after its forward/backward began): signal or write the file."""

    def __init__(self, step: int, rank: int, action: str) -> None:
        self.step, self.rank, self.action = step, rank, action

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.global_step + 1 != self.step or int(os.environ["RANK"]) != self.rank:
            return
        if self.action == "kill":
            os.kill(os.getpid(), signal.SIGTERM)
        else:
            Path(os.environ["TORPOR_EXIT_FILE"]).write_text(json.dumps({"GracefulExit": 1}))


class Losses(TrainerCallback):
    def __init__(self, path: str) -> None:
        self.path = path

    def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kwargs: Any) -> None:
        if logs and "loss" in logs and args.process_index == 0:
            with open(self.path, "a") as f:
                f.write(json.dumps({"step": state.global_step, "loss": logs["loss"],
                                    "learning_rate": logs.get("learning_rate")}) + "\n")


def restored(trainer: Any) -> dict[str, Any]:
    """What a resume must bring back besides the weights: trainer state, scheduler, optimizer, RNG."""
    steps = {int(s["step"]) for s in trainer.optimizer.state_dict()["state"].values()}
    return {"global_step": trainer.state.global_step, "last_lr": trainer.lr_scheduler.get_last_lr(),
            "optimizer_steps": sorted(steps),
            "cpu_rng": hashlib.sha256(torch.random.get_rng_state().numpy().tobytes()).hexdigest()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--output-dir", required=True)
    parser.add_argument("--max-steps", type=int, default=12)
    parser.add_argument("--save-steps", type=int, default=0)
    parser.add_argument("--losses", required=True)
    parser.add_argument("--final", default="")
    parser.add_argument("--kill-at", type=int, default=0)
    parser.add_argument("--exit-file-at", type=int, default=0)
    parser.add_argument("--rank", type=int, default=1, help="the rank that kills itself / writes the file")
    opts = parser.parse_args()

    torpor_cb = TorporCallback.from_env(file_poll_seconds=0.01)
    callbacks: list[TrainerCallback] = [torpor_cb, Losses(opts.losses)]
    if opts.kill_at:
        callbacks.append(InStep(opts.kill_at, opts.rank, "kill"))
    if opts.exit_file_at:
        callbacks.append(InStep(opts.exit_file_at, opts.rank, "file"))
    trainer = build(opts.output_dir, opts.max_steps, opts.save_steps, callbacks)
    trainer.train(resume_from_checkpoint=torpor_cb.checkpoint_to_resume(opts.output_dir))
    if opts.final:
        state = {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}
        torch.save(state, f"{opts.final}-{os.environ['RANK']}.pt")
        Path(f"{opts.final}-{os.environ['RANK']}.json").write_text(json.dumps(restored(trainer)))
    print(f"trained to step {trainer.state.global_step}, saved {torpor_cb.saved}, "
          f"stop {torpor_cb.stop_message.to_json() if torpor_cb.stop_message else None}")


if __name__ == "__main__":
    main()
