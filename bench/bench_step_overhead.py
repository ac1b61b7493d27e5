#!/usr/bin/env python3
"""Per-step cost of ``OnRequestExit`` + ``CheckpointMonitor`` (no save due) on a ~10 ms step.

The same plain-loop run three ways, interleaved round by round so that load from other
processes hits all of them alike: a bare ``for`` loop, ``torpor.Loop`` without callbacks,
and ``torpor.Loop`` with both callbacks (a watched GracefulExit file, a signal handler, a
save interval that never falls due). The step is a real matmul sized to ~10 ms.

Measured twice in one run: in one process, and as 2 gloo ranks on loopback (``--ranks``),
where every step boundary has the loop's one all-reduce (stop code, data exhausted, save
due, save failed; see ``torpor._agreement``) and the figure includes it: the "loop" side
then pays it without callbacks too, and both are compared with the bare loop. There each
step ends in an all-reduce of 1 MiB standing in for DDP's gradients, so the ranks reach
torpor's boundary in step with each other, as in a DDP job; without it the figure would be
the ranks' skew under load, which a DDP job pays in its own all-reduce anyway.
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
    p.add_argument("--steps", type=int, default=300, help="steps per run (default 300)")
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds (default 5)")
    p.add_argument("--step-ms", type=float, default=10.0, help="target step time in ms (default 10)")
    p.add_argument("--ranks", type=int, default=2, help="gloo ranks of the second measurement (default 2; 0: skip)")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # a rank of the multi-rank run: its JSON out
    opts = p.parse_args()
    if as_worker(opts.worker, lambda: measure(opts)):
        return
    print(f"[step] {load_note()}", flush=True)
    single = measure(opts)
    report("1 process", single)
    if opts.ranks > 1:
        ranked = run_ranks(opts)
        report(f"{opts.ranks} gloo ranks", ranked)
        print(f"RATIO per-step overhead of Loop+OnRequestExit+CheckpointMonitor vs a bare loop: "
              f"{overhead(single):+.3f}% of the step in 1 process, {overhead(ranked):+.3f}% with {opts.ranks} gloo "
              f"ranks (their per-step all-reduce included; target <= 1%); with {opts.ranks} ranks "
              f"{ranked['inside']['callbacks'] / ranked['inside']['allreduce']:.2f}x a raw all-reduce of six ints")
    else:
        print(f"RATIO per-step overhead of Loop+OnRequestExit+CheckpointMonitor vs a bare loop: "
              f"{overhead(single):+.3f}% of the step in 1 process (target <= 1%)")


def run_ranks(opts: Any) -> dict[str, Any]:
    """Run :func:`measure` as ``opts.ranks`` gloo ranks on loopback; rank 0's result."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "hack"))
    from processes import free_port

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "rank0.json"
        env = {**os.environ, "WORLD_SIZE": str(opts.ranks), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()),
               "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1"}
        argv = [sys.executable, __file__, "--steps", str(opts.steps), "--rounds", str(opts.rounds),
                "--step-ms", str(opts.step_ms), "--worker", str(out)]
        procs = [subprocess.Popen(argv, env={**env, "RANK": str(r), "LOCAL_RANK": str(r)}) for r in range(opts.ranks)]
        codes = [proc.wait(timeout=1800) for proc in procs]
        if codes != [0] * opts.ranks:
            raise SystemExit(f"a rank failed: exit codes {codes}")
        return json.loads(out.read_text())


def overhead(result: dict[str, Any]) -> float:
    """Time inside torpor with both callbacks, per step, as a percentage of the bare step."""
    return result["inside"]["callbacks"] / result["bare"] * 100


def report(label: str, result: dict[str, Any]) -> None:
    print(f"[step] {label}: matmul {result['n']}x{result['n']}", flush=True)
    for k, rounds in result["samples"].items():
        v = median(rounds)
        where = "in the all-reduce" if k == "allreduce" else "inside torpor"
        extra = f", {where} {result['inside'][k] * 1e6:.1f} us" if k in result["inside"] else ""
        listed = ", ".join(f"{x * 1000:.2f}" for x in rounds)
        print(f"[step]   {k:10s} {v * 1000:8.3f} ms/step{extra} (rounds: {listed})")
    cost = result["inside"]
    hooks = (cost["callbacks"] - cost["loop"]) / result["bare"] * 100
    print(f"[step]   {label}: torpor {cost['callbacks'] * 1e6:.1f} us/step with both callbacks = "
          f"{overhead(result):+.3f}% of a {result['bare'] * 1000:.1f} ms step; the callbacks' own share "
          f"{hooks:+.3f}% ({(cost['callbacks'] - cost['loop']) * 1e6:.1f} us)", flush=True)
    if "allreduce" in cost:
        print(f"[step]   {label}: a raw all-reduce of the same six ints costs {cost['allreduce'] * 1e6:.1f} us/step "
              f"({cost['allreduce'] / result['bare'] * 100:+.3f}%); torpor with both callbacks "
              f"{cost['callbacks'] / cost['allreduce']:.2f}x that", flush=True)


def measure(opts: Any) -> dict[str, Any]:
    """The three sides, interleaved; in a ``--worker`` the ranks join a process group first."""
    import torch

    import torpor

    distributed = torpor.init_distributed(backend="gloo") if opts.worker else False
    torch.set_num_threads(1)
    n = 64
    a = torch.randn(n, n)
    for _ in range(20):
        a @ a  # the first calls initialise the BLAS: not part of any step
    while n < 4096:  # size the matmul to the target step time
        a = torch.randn(n, n)
        a @ a
        started = time.perf_counter()
        for _ in range(10):
            a @ a
        if (time.perf_counter() - started) / 10 * 1000 >= opts.step_ms:
            break
        n = int(n * 1.15) + 1
    if distributed:  # every rank steps the same matmul, as DDP ranks step the same model
        n = torpor._distributed.broadcast_object(n)
        a = torch.randn(n, n)
    net = torch.nn.Linear(4, 4)

    grad = torch.zeros(256 * 1024)  # 1 MiB: stands in for DDP's gradient all-reduce in the ranks

    def step() -> None:
        a @ a
        if distributed:  # the ranks end each step in step with each other, as DDP's backward does
            torch.distributed.all_reduce(grad)

    def bare() -> float:
        step()
        started = time.perf_counter()
        for _ in range(opts.steps):
            step()
        return (time.perf_counter() - started) / opts.steps

    facts = torch.zeros(6, dtype=torch.int64)

    def collective() -> tuple[float, float]:
        """The bare loop plus a raw all-reduce of the loop's six ints per step: the floor of
        what one agreed collective per step can cost (ranks only)."""
        step()
        inside = 0.0
        started = time.perf_counter()
        for _ in range(opts.steps):
            step()
            t0 = time.perf_counter()
            torch.distributed.all_reduce(facts, op=torch.distributed.ReduceOp.MAX)
            inside += time.perf_counter() - t0
        return (time.perf_counter() - started) / opts.steps, inside / opts.steps

    def looped(callbacks: list) -> tuple[float, float]:
        """``(seconds per step, seconds per step spent inside torpor)``.

        Timed from the end of the first step to the end of the last: start-up (signal
        handler, file watcher) and the final save at on_train_end are not per-step costs.
        The time inside torpor (fetching the next batch through ``loop.batches``, which runs
        ``on_train_step_begin``, and ``loop.step_end``) is timed on its own, because on a
        loaded machine the step itself varies far more than the 1 % being measured.
        """
        loop = torpor.Loop(net, None, callbacks=callbacks, exit_process=False)
        inside = 0.0
        marks = []
        for _ in loop.epochs(1):
            batches = loop.batches(range(opts.steps + 1))
            while True:
                t0 = time.perf_counter()
                item = next(batches, None)
                t1 = time.perf_counter()
                if item is None:
                    break
                step()
                t2 = time.perf_counter()
                loop.step_end(None)
                t3 = time.perf_counter()
                if marks:
                    inside += (t1 - t0) + (t3 - t2)
                if not marks or loop.args.cur_step_num == opts.steps + 1:
                    marks.append(t3)
        return (marks[-1] - marks[0]) / opts.steps, inside / opts.steps

    with tempfile.TemporaryDirectory() as tmp:
        exit_file = Path(tmp) / "graceful-exit.json"
        exit_file.write_text(json.dumps({"GracefulExit": 0}))

        def with_callbacks() -> float:
            # the ranks of one run share the checkpoint directory (each rank's exit file is its own):
            # the final save at train end is then complete, as in a real job
            ckpt = str(Path(opts.worker).parent / "checkpoints") if opts.worker else tmp
            return looped([torpor.OnRequestExit(directory=ckpt, config_file=str(exit_file)),
                           torpor.CheckpointMonitor(directory=ckpt, save_checkpoint_steps=10**9)])

        samples: dict[str, list[float]] = {"bare": [], "loop": [], "callbacks": []}
        inside: dict[str, list[float]] = {"loop": [], "callbacks": []}
        if distributed:
            samples["allreduce"], inside["allreduce"] = [], []
        for _ in range(opts.rounds):
            samples["bare"].append(bare())
            if distributed:
                per_step, torpor_time = collective()
                samples["allreduce"].append(per_step)
                inside["allreduce"].append(torpor_time)
            per_step, torpor_time = looped([])
            samples["loop"].append(per_step)
            inside["loop"].append(torpor_time)
            per_step, torpor_time = with_callbacks()
            samples["callbacks"].append(per_step)
            inside["callbacks"].append(torpor_time)
    rank = torch.distributed.get_rank() if distributed else 0
    if distributed:
        torpor._distributed.shutdown()
    return {"rank": rank, "n": n, "samples": samples, "bare": median(samples["bare"]),
            "inside": {k: median(v) for k, v in inside.items()}}


if __name__ == "__main__":
    main()
