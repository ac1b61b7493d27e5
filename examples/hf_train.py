"""A Hugging Face ``Trainer`` made preemption-safe with torpor: the lines marked ``# torpor``.

A tiny GPT-2 built from a config (nothing is downloaded) learns a synthetic token sequence.
Launch it as one process per rank (``torchrun``, ``python -m torpor.run`` or the operator,
which set ``RANK``/``WORLD_SIZE``/``MASTER_ADDR``...). SIGTERM (or ``{"GracefulExit": 1}`` in
``$TORPOR_EXIT_FILE``) on any rank stops every rank after the same step with the Trainer's
checkpoint stored under ``$TORPOR_CHECKPOINT_URI``; run it again (or let the operator restart
it with ``TORPOR_RESUME_FROM``) and it continues from there.

    python examples/hf_train.py --max-steps 40 --output-dir /tmp/hf-run
"""

from __future__ import annotations

import argparse
import os
import time
from typing import Any

import torch
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainerCallback, TrainingArguments

from torpor.env import RuntimeEnv
from torpor.transformers import TorporCallback  # torpor


class TokenData(torch.utils.data.Dataset):
    """Fixed random token windows (seeded: every rank and every run sees the same data)."""

    def __init__(self, samples: int = 256, length: int = 16, vocab: int = 64) -> None:
        g = torch.Generator().manual_seed(1234)
        self.ids = torch.randint(0, vocab, (samples, length), generator=g)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def tiny_model(seed: int = 0) -> GPT2LMHeadModel:
    """Two layers, 32 wide, with dropout (so the ranks' generators matter for an exact resume)."""
    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=2, n_head=2,
                                      bos_token_id=0, eos_token_id=0))


def training_args(output_dir: str, max_steps: int, save_steps: int, seed: int = 0) -> TrainingArguments:
    """CPU, gloo under torch.distributed, a loss logged every step (HF's own logging)."""
    return TrainingArguments(
        output_dir=output_dir, max_steps=max_steps, per_device_train_batch_size=4, learning_rate=1e-3,
        warmup_steps=2, lr_scheduler_type="linear", logging_steps=1, save_strategy="steps" if save_steps else "no",
        save_steps=save_steps or 500, save_total_limit=2, report_to=[], use_cpu=True,
        ddp_backend="gloo" if int(os.environ.get("WORLD_SIZE", "1")) > 1 else None,  # gloo needs several ranks
        ddp_find_unused_parameters=False,
        dataloader_num_workers=0, seed=seed, disable_tqdm=True,
    )


class StepTime(TrainerCallback):
    """Stands in for real work per step (a preemption test needs steps long enough to land in)."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        time.sleep(self.seconds)


def build(output_dir: str, max_steps: int, save_steps: int, callbacks: list[TrainerCallback]) -> Trainer:
    """The Trainer of this example (tests add their own callbacks)."""
    args = training_args(output_dir, max_steps, save_steps)
    return Trainer(model=tiny_model(), args=args, train_dataset=TokenData(), callbacks=callbacks)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output-dir", default="hf-output")
    parser.add_argument("--max-steps", type=int, default=40)
    parser.add_argument("--save-steps", type=int, default=RuntimeEnv.from_environ().save_steps or 0,
                        help="periodic saves, stored by torpor too (default: TORPOR_SAVE_STEPS, the operator's "
                             "spec.checkpoint.saveSteps; 0: only the stop's)")
    parser.add_argument("--step-seconds", type=float, default=0.0, help="simulated extra work per step")
    opts = parser.parse_args()

    torpor_cb = TorporCallback.from_env()  # torpor
    extra = [StepTime(opts.step_seconds)] if opts.step_seconds else []
    trainer = build(opts.output_dir, opts.max_steps, opts.save_steps, [torpor_cb, *extra])
    resume = torpor_cb.checkpoint_to_resume(opts.output_dir)  # torpor
    trainer.train(resume_from_checkpoint=resume)  # torpor: resume_from_checkpoint
    print(f"done at step {trainer.state.global_step}, started from {torpor_cb.resumed_from or 'scratch'}")


if __name__ == "__main__":
    main()
