#!/usr/bin/env python3
"""Per-step cost of ``torpor.transformers.TorporCallback`` in a Hugging Face ``Trainer`` (~10 ms step).

The same ``Trainer`` training run two ways, interleaved round by round so that load from
other processes hits both alike: without torpor, and with ``TorporCallback`` (a signal
handler, a watched GracefulExit file, no save due). The step is a real matmul inside the
model's forward, sized to ~10 ms, plus a small linear layer trained by AdamW.

What is compared: the time the ``Trainer``'s ``CallbackHandler`` spends per step in every
event (``on_step_begin`` ... ``on_step_end``, ``on_log``), with and without the callback:
the difference is what the integration costs a step (HF's dispatch of every event to one
more callback, and torpor's ``on_step_end``: the request check and, with ranks, the one
all-reduce MAX). It is timed on its own because on a loaded machine the step itself varies
far more than the 1 % being measured; the whole steps are printed beside it.

Measured in one process and as 2 gloo ranks on loopback (``--ranks``). With ranks, two more
sides: the plain ``Trainer`` plus a bare callback doing one all-reduce MAX of one int at
``on_step_end`` (the floor of *any* per-step agreement on this machine: after DDP's gradient
all-reduce each rank still runs its optimizer step alone, so the next collective also waits for
the slower rank to be scheduled), and torpor with ``check_every_n_steps=10``.

    PYTHONPATH=runtime python bench/bench_hf_overhead.py
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _common import as_worker, load_note, median


def main() -> None:
    import argparse

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=150, help="steps per run (default 150)")
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds (default 5)")
    p.add_argument("--step-ms", type=float, default=10.0, help="target matmul time per step in ms (default 10)")
    p.add_argument("--ranks", type=int, default=2, help="gloo ranks of the second measurement (default 2; 0: skip)")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # a rank of the multi-rank run: its JSON out
    p.add_argument("--n", type=int, default=0, help=argparse.SUPPRESS)  # the matmul size every rank uses
    opts = p.parse_args()
    if as_worker(opts.worker, lambda: measure(opts)):
        return
    print(f"[hf] {load_note()}", flush=True)
    single = measure(opts)
    report("1 process", single)
    line = (f"RATIO per-step overhead of TorporCallback in a HF Trainer: {overhead(single):+.3f}% of the step "
            "in 1 process")
    if opts.ranks > 1:
        ranked = run_ranks(opts, single["n"])
        report(f"{opts.ranks} gloo ranks", ranked)
        line += (f", {overhead(ranked):+.3f}% with {opts.ranks} gloo ranks (its all-reduce included; "
                 f"{overhead(ranked, 'torpor-every-10'):+.3f}% with check_every_n_steps=10, a bare all-reduce "
                 f"{overhead(ranked, 'raw-allreduce'):+.3f}%)")
    print(line + " (target <= 1%)", flush=True)


def run_ranks(opts: Any, n: int) -> dict[str, Any]:
    """Run :func:`measure` as ``opts.ranks`` gloo ranks on loopback; rank 0's result.

    Every rank gets the matmul size ``n`` the one-process run chose: sized per rank, the ranks
    could differ, and DDP's broadcast of the model's buffers (the matrix is one) would mismatch.
    """
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "hack"))
    from processes import free_port

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "rank0.json"
        env = {**os.environ, "WORLD_SIZE": str(opts.ranks), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()),
               "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1"}
        argv = [sys.executable, __file__, "--steps", str(opts.steps), "--rounds", str(opts.rounds),
                "--step-ms", str(opts.step_ms), "--worker", str(out), "--n", str(n)]
        procs = [subprocess.Popen(argv, env={**env, "RANK": str(r), "LOCAL_RANK": str(r)}) for r in range(opts.ranks)]
        codes = [proc.wait(timeout=1800) for proc in procs]
        if codes != [0] * opts.ranks:
            raise SystemExit(f"a rank failed: exit codes {codes}")
        return json.loads(out.read_text())


def overhead(result: dict[str, Any], side: str = "torpor") -> float:
    """Extra time in the callback handler per step on ``side``, as a percentage of the step without torpor."""
    return (result["handler"][side] - result["handler"]["plain"]) / result["step"]["plain"] * 100


def report(label: str, result: dict[str, Any]) -> None:
    print(f"[hf] {label}: matmul {result['n']}x{result['n']} in the forward", flush=True)
    for side in result["samples"]:
        steps = ", ".join(f"{x * 1000:.2f}" for x in result["samples"][side])
        print(f"[hf]   {side:16s} {result['step'][side] * 1000:8.3f} ms/step, in the callback handler "
              f"{result['handler'][side] * 1e6:7.1f} us/step (rounds: {steps})", flush=True)
    for side in result["samples"]:
        if side != "plain":
            extra = (result["handler"][side] - result["handler"]["plain"]) * 1e6
            print(f"[hf]   {label}: {side} adds {extra:.1f} us/step = {overhead(result, side):+.3f}% of a "
                  f"{result['step']['plain'] * 1000:.1f} ms step", flush=True)
    if "raw-allreduce" in result["handler"]:
        floor = result["handler"]["raw-allreduce"] - result["handler"]["plain"]
        ratio = (result["handler"]["torpor"] - result["handler"]["plain"]) / floor if floor > 0 else float("nan")
        print(f"[hf]   {label}: torpor / a bare all-reduce of one int = {ratio:.2f}x", flush=True)


def measure(opts: Any) -> dict[str, Any]:
    """Both sides, interleaved; each run a fresh ``Trainer`` over the same model."""
    import torch
    from torch import nn
    from transformers import PretrainedConfig, PreTrainedModel, Trainer, TrainerCallback, TrainingArguments
    from transformers.trainer_callback import CallbackHandler

    from torpor import _distributed
    from torpor.transformers import TorporCallback

    torch.set_num_threads(1)
    n = 64
    a = torch.randn(n, n)
    for _ in range(20):
        a @ a  # the first calls initialise the BLAS: not part of any step
    while n < 4096 and not opts.n:  # size the matmul to the target step time
        a = torch.randn(n, n)
        a @ a
        started = time.perf_counter()
        for _ in range(10):
            a @ a
        if (time.perf_counter() - started) / 10 * 1000 >= opts.step_ms:
            break
        n = int(n * 1.15) + 1
    n = opts.n or n
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1

    class Busy(PreTrainedModel):
        config_class = PretrainedConfig

        def __init__(self, config: PretrainedConfig) -> None:
            super().__init__(config)
            self.linear = nn.Linear(8, 1)
            self.register_buffer("a", torch.randn(n, n), persistent=False)
            self.post_init()

        def forward(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
            self.a @ self.a  # the step's work
            return {"loss": nn.functional.mse_loss(self.linear(x).squeeze(-1), y)}

    class Data(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return 10**6

        def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
            return {"x": torch.ones(8), "y": torch.tensor(1.0)}

    class RawAllReduce(TrainerCallback):
        """The floor of any per-step agreement: one all-reduce MAX of one int, nothing else."""

        def on_step_end(self, *args: Any, **kwargs: Any) -> None:
            _distributed.max_over_ranks(0)

    class Marks(TrainerCallback):
        def __init__(self) -> None:
            self.ends: list[float] = []

        def on_step_end(self, *args: Any, **kwargs: Any) -> None:
            self.ends.append(time.perf_counter())

    handler_time = [0.0]
    original = CallbackHandler.call_event

    def timed(self: Any, event: str, *args: Any, **kwargs: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return original(self, event, *args, **kwargs)
        finally:
            handler_time[0] += time.perf_counter() - t0

    CallbackHandler.call_event = timed
    model = Busy(PretrainedConfig())
    with tempfile.TemporaryDirectory() as tmp:
        exit_file = Path(tmp) / "graceful-exit.json"
        exit_file.write_text(json.dumps({"GracefulExit": 0}))
        args = TrainingArguments(output_dir=tmp, max_steps=opts.steps + 1, per_device_train_batch_size=4,
                                 logging_steps=10**6, save_strategy="no", report_to=[], use_cpu=True,
                                 ddp_backend="gloo" if distributed else None, disable_tqdm=True,
                                 dataloader_num_workers=0,
                                 ddp_find_unused_parameters=False)

        def run(side: str) -> tuple[float, float]:
            marks = Marks()
            callbacks: list[TrainerCallback] = [marks]
            if side.startswith("torpor"):  # the ranks share the root (nothing is saved: no stop, no save due)
                root = str(Path(opts.worker).parent / "ckpt") if opts.worker else str(Path(tmp) / "ckpt")
                callbacks.append(TorporCallback(root, config_file=str(exit_file), exit_process=False,
                                                check_every_n_steps=10 if side == "torpor-every-10" else 1))
            elif side == "raw-allreduce":
                callbacks.append(RawAllReduce())
            trainer = Trainer(model=model, args=args, train_dataset=Data(), callbacks=callbacks)
            handler_time[0] = 0.0
            in_handler: list[float] = []

            class Split(TrainerCallback):
                """The handler's running total at every step's end (the last callback: torpor's hook is
                inside each interval); start-up and on_train_end are no per-step cost and stay outside."""

                def on_step_end(self, *a: Any, **k: Any) -> None:
                    in_handler.append(handler_time[0])

            trainer.add_callback(Split())
            trainer.train()
            steps = len(marks.ends) - 1
            return (marks.ends[-1] - marks.ends[0]) / steps, (in_handler[-1] - in_handler[0]) / steps

        sides = ("plain", "torpor", "torpor-every-10", "raw-allreduce") if distributed else ("plain", "torpor")
        samples: dict[str, list[float]] = {side: [] for side in sides}
        inside: dict[str, list[float]] = {side: [] for side in sides}
        for _ in range(opts.rounds):
            for side in sides:
                per_step, handler = run(side)
                samples[side].append(per_step)
                inside[side].append(handler)
    rank = _distributed.rank() if distributed else 0
    if distributed:
        _distributed.shutdown()
    return {"rank": rank, "n": n, "samples": samples, "step": {k: median(v) for k, v in samples.items()},
            "handler": {k: median(v) for k, v in inside.items()}}


if __name__ == "__main__":
    main()
