#!/usr/bin/env python3
"""Per-step cost of ``torpor.lightning.OnRequestExit`` in a real Lightning DDP run (2 gloo ranks).

The same ``Trainer.fit`` (``strategy="ddp"``, a ~10 ms step: a matmul beside a tiny model whose
gradients DDP all-reduces) run four ways in each of 2 rank processes, interleaved round by
round so that load from other processes hits every side alike:

* ``lightning``        — plain Lightning: its per-step broadcast of rank 0's SIGTERM flag runs;
* ``torpor``           — with the callback (default: Lightning's broadcast off, torpor's
                         all-reduce of the stop code every step, ``check_every_n_steps=1``);
* ``torpor_k10``       — the same with ``check_every_n_steps=10`` (``TORPOR_EXIT_CHECK_STEPS``);
* ``torpor_keep``      — the callback with Lightning's broadcast kept (``lightning_broadcast=True``);
* ``torpor_monitor``   — the callback with a ``CheckpointMonitor`` beside it, as ``from_env`` builds
                         under the operator, with no save due (``saveSteps`` unset: its facts ride
                         in the same all-reduce; the final save at the end is not a step's cost);
* ``raw_allreduce``    — plain Lightning plus a callback that all-reduces six ints (MAX) at every
                         batch end: the floor any agreed per-step collective costs here.

Timed directly, since the step varies by more than the 1 % being measured: the time inside
the callback's ``on_train_batch_end`` and inside Lightning's ``_broadcast_sigterm_tensor``, per
step (means per fit, medians over rounds; the median step of each fit too, which leaves the
scheduler's tail out); the whole step (median interval between batch ends) is printed too.

A collective's time on one rank includes waiting for the other, so on a loaded machine it is
mostly the ranks' skew, which DDP's gradient all-reduce would otherwise absorb a moment later.
``--align`` puts a ``barrier()`` at every batch end, before the callback, on every side alike:
the ranks meet first, and what is timed after it is the collectives' own latency.
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

SIDES = ("lightning", "torpor", "torpor_k10", "torpor_keep", "torpor_monitor", "raw_allreduce")


def main() -> None:
    import argparse

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=200, help="steps per fit (default 200)")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    p.add_argument("--step-ms", type=float, default=10.0, help="target step time in ms (default 10)")
    p.add_argument("--matmul-ms", type=float, default=5.0,
                   help="the matmul's share of it (default 5: Lightning's own per-step work is the rest here)")
    p.add_argument("--align", action="store_true",
                   help="a barrier before the timed hooks on every side: time the collectives without the ranks' skew")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    opts = p.parse_args()
    if as_worker(opts.worker, lambda: measure(opts)):
        return
    print(f"[lightning] {load_note()}", flush=True)
    result = run_ranks(opts)
    report(result)


def run_ranks(opts: Any) -> dict[str, Any]:
    """Two gloo rank processes on loopback, as torchrun starts them; rank 0's result."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "hack"))
    from processes import free_port

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "rank0.json"
        env = {k: v for k, v in os.environ.items() if not k.startswith("TORPOR_")}
        env.update({"WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
                    "MASTER_PORT": str(free_port()), "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1"})
        argv = [sys.executable, __file__, "--steps", str(opts.steps), "--rounds", str(opts.rounds),
                "--step-ms", str(opts.step_ms), "--matmul-ms", str(opts.matmul_ms), "--worker", str(out),
                *(["--align"] if opts.align else [])]
        procs = [subprocess.Popen(argv, cwd=tmp, env={**env, "RANK": str(r), "LOCAL_RANK": str(r)}) for r in (0, 1)]
        codes = [proc.wait(timeout=1800) for proc in procs]
        if codes != [0, 0]:
            raise SystemExit(f"a rank failed: exit codes {codes}")
        return json.loads(out.read_text())


def report(result: dict[str, Any]) -> None:
    step = median(result["step"]["lightning"])
    print(f"[lightning] 2 gloo ranks, DDP, matmul {result['n']}x{result['n']}, {result['steps']} steps x "
          f"{len(result['step']['lightning'])} rounds{', aligned by a barrier' if result.get('align') else ''}",
          flush=True)
    for side in SIDES:
        hook = median(result["hook"][side]) if result["hook"][side] else 0.0
        bcast = median(result["broadcast"][side]) if result["broadcast"][side] else 0.0
        hook_med = median(result["hook_median"][side]) if result["hook_median"][side] else 0.0
        bcast_med = median(result["broadcast_median"][side]) if result["broadcast_median"][side] else 0.0
        print(f"[lightning]   {side:14s} step {median(result['step'][side]) * 1000:7.3f} ms   hook mean "
              f"{hook * 1e6:7.1f} us (median step {hook_med * 1e6:7.1f})   Lightning broadcast mean "
              f"{bcast * 1e6:7.1f} us (median step {bcast_med * 1e6:7.1f})", flush=True)
    lightning_bcast = median(result["broadcast"]["lightning"])
    for side in ("torpor", "torpor_k10", "torpor_monitor"):
        hook = median(result["hook"][side])
        print(f"RATIO {side}: torpor's per-step cost {hook * 1e6:.1f} us = {hook / step * 100:+.3f}% of the "
              f"{step * 1000:.1f} ms step (target <= 1%); {hook / lightning_bcast:.2f}x Lightning's own per-step "
              f"SIGTERM broadcast ({lightning_bcast * 1e6:.1f} us, {lightning_bcast / step * 100:+.3f}%), which "
              f"it replaces: net {(hook - lightning_bcast) / step * 100:+.3f}% of the step", flush=True)
    raw = median(result["hook"]["raw_allreduce"])
    for side in ("torpor", "torpor_monitor"):
        print(f"RATIO {side} / a raw all-reduce of six ints in a callback ({raw * 1e6:.1f} us): "
              f"{median(result['hook'][side]) / raw:.2f}x", flush=True)
    torpor_med = median(result["hook_median"]["torpor"])
    print(f"RATIO medians of a step's time (the scheduler's tail left out): torpor's hook {torpor_med * 1e6:.1f} us = "
          f"{torpor_med / median(result['hook_median']['raw_allreduce']):.2f}x the raw all-reduce, "
          f"{torpor_med / median(result['broadcast_median']['lightning']):.2f}x Lightning's broadcast", flush=True)
    between = median(result["hook_between"]["torpor_k10"])
    print(f"RATIO the callback at a step without the agreement (k=10, 9 steps in 10): {between * 1e6:.1f} us = "
          f"{between / step * 100:+.3f}% of the step (target <= 1%)", flush=True)
    keep = median(result["hook"]["torpor_keep"]) + median(result["broadcast"]["torpor_keep"])
    print(f"RATIO torpor_keep (Lightning's broadcast kept): {keep * 1e6:.1f} us = {keep / step * 100:+.3f}% of the "
          f"step, {keep / lightning_bcast:.2f}x Lightning's broadcast alone", flush=True)


def measure(opts: Any) -> dict[str, Any]:
    """Every side, ``rounds`` times, interleaved, in this rank process."""
    import logging
    import warnings
    from datetime import timedelta

    import lightning.pytorch as pl
    import torch
    from lightning.pytorch.strategies import DDPStrategy
    from torch.utils.data import DataLoader, TensorDataset

    import torpor
    import torpor.lightning

    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    n = 64
    a = torch.randn(n, n)
    for _ in range(20):
        a @ a
    while n < 4096:  # size the matmul to the target step time
        a = torch.randn(n, n)
        started = time.perf_counter()
        for _ in range(10):
            a @ a
        if (time.perf_counter() - started) / 10 * 1000 >= opts.matmul_ms:
            break
        n = int(n * 1.15) + 1
    n = 2 * (n // 2)  # both ranks may have chosen differently; DDP syncs them anyway
    burn = torch.randn(n, n)

    class Model(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = torch.nn.Linear(16, 4)

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            burn @ burn
            x, y = batch
            return torch.nn.functional.cross_entropy(self.net(x), y)

        def configure_optimizers(self) -> Any:
            return torch.optim.SGD(self.parameters(), lr=0.01)

    class RawAllReduce(pl.Callback):
        def on_train_batch_end(self, *args: Any) -> None:
            t = torch.tensor([0] * 6, dtype=torch.int64)
            torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
            t.tolist()

    class Align(pl.Callback):
        def on_train_batch_end(self, *args: Any) -> None:
            torch.distributed.barrier()

    class Clock(pl.Callback):
        def __init__(self) -> None:
            self.marks: list[float] = []

        def on_train_batch_end(self, *args: Any) -> None:
            self.marks.append(time.perf_counter())

    def timed(obj: Any, name: str, sink: list[float]) -> None:
        inner = getattr(obj, name)

        def wrapper(*args: Any, **kwargs: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return inner(*args, **kwargs)
            finally:
                sink.append(time.perf_counter() - t0)
        setattr(obj, name, wrapper)

    data = TensorDataset(torch.randn(16 * (opts.steps + 1), 16), torch.randint(0, 4, (16 * (opts.steps + 1),)))
    root = Path(tempfile.mkdtemp(prefix="bench-lightning-"))
    samples: dict[str, dict[str, list[float]]] = {k: {s: [] for s in SIDES}
                                                  for k in ("step", "hook", "broadcast", "hook_between",
                                                            "hook_median", "broadcast_median")}

    def run(side: str, round_: int) -> None:
        clock = Clock()
        callbacks: list[pl.Callback] = [clock]
        hook: list[float] = []
        if side == "raw_allreduce":
            raw = RawAllReduce()
            timed(raw, "on_train_batch_end", hook)
            callbacks.insert(0, raw)
        elif side != "lightning":
            monitor = (torpor.CheckpointMonitor(save_checkpoint_steps=0, save_checkpoint_seconds=0)
                       if side == "torpor_monitor" else None)
            cb = torpor.lightning.OnRequestExit(
                directory=str(root / f"{side}-{round_}"), resume=None, exit_process=False, monitor=monitor,
                check_every_n_steps=10 if side == "torpor_k10" else 1, lightning_broadcast=side == "torpor_keep")
            timed(cb, "on_train_batch_end", hook)
            callbacks.insert(0, cb)
        if opts.align:
            callbacks.insert(0, Align())  # Lightning calls callbacks in list order: before torpor's
        trainer = pl.Trainer(accelerator="cpu", strategy=DDPStrategy(process_group_backend="gloo",
                                                                     timeout=timedelta(seconds=300)),
                             devices=2, num_nodes=1, max_steps=opts.steps + 1, callbacks=callbacks, logger=False,
                             enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                             default_root_dir=str(root))
        broadcast: list[float] = []
        loop = trainer.fit_loop.epoch_loop
        timed_class = type(loop)._broadcast_sigterm_tensor

        def timed_broadcast(self: Any) -> None:
            t0 = time.perf_counter()
            try:
                timed_class(self)
            finally:
                broadcast.append(time.perf_counter() - t0)
        type(loop)._broadcast_sigterm_tensor = timed_broadcast  # the callback's instance patch still wins
        try:
            trainer.fit(Model(), DataLoader(data, batch_size=8))
        finally:
            type(loop)._broadcast_sigterm_tensor = timed_class
        marks = clock.marks[1:]  # from the end of the first step: start-up is not a per-step cost
        samples["step"][side].append((marks[-1] - marks[0]) / (len(marks) - 1))
        if hook:
            samples["hook"][side].append(sum(hook[1:]) / len(hook[1:]))
            samples["hook_median"][side].append(median(hook[1:]))
            # steps without the agreement (k=10: 9 in 10): what the callback costs besides its collective
            between = [t for i, t in enumerate(hook, start=1) if i % 10 and i > 1]
            samples["hook_between"][side].append(median(between))
        if broadcast:
            samples["broadcast"][side].append(sum(broadcast[1:]) / len(broadcast[1:]))
            samples["broadcast_median"][side].append(median(broadcast[1:]))
        else:
            samples["broadcast"][side].append(0.0)

    for round_ in range(opts.rounds):
        order = SIDES if round_ % 2 == 0 else tuple(reversed(SIDES))
        for side in order:
            run(side, round_)
    rank = torch.distributed.get_rank()
    torch.distributed.destroy_process_group()
    return {"rank": rank, "n": n, "steps": opts.steps, "align": opts.align, **samples}


if __name__ == "__main__":
    main()
