"""``python -m torpor.run``: several ranks in one pod, stopped together and reported as one.

torchrun's launcher under a preemption: SIGTERM reaches the agent, which SIGTERMs the workers and
SIGKILLs them 30 s later whatever they are doing (a checkpoint upload of a big model takes
longer), then exits 1 — the operator cannot tell the saved stop from a crash — and every worker
writes the same termination-log path. This launcher instead:

- starts ``--nproc-per-node`` workers (default ``LOCAL_WORLD_SIZE``, which the operator sets
  from ``spec.procsPerPod``) with ``RANK = NODE_RANK * nproc + LOCAL_RANK``, ``LOCAL_RANK``,
  ``LOCAL_WORLD_SIZE``, ``GROUP_RANK`` and the job-wide ``WORLD_SIZE`` (``NNODES * nproc`` when
  ``NNODES`` is set), each in a session of its own so that a signal to the pod's process group
  reaches it once, through the launcher;
- forwards SIGTERM, SIGINT and ``TORPOR_EXIT_SIGNAL`` to every worker and waits for their saves
  with no timer of its own: the pod's ``terminationGracePeriodSeconds`` is the bound, as for a
  single rank;
- when a worker fails while others run, stops the others (SIGTERM, then SIGKILL after
  ``TORPOR_RUN_KILL_AFTER_SECONDS``, default 30): they could otherwise wait for it in a
  collective until its timeout;
- gives each worker a termination-log path of its own and writes one message to the pod's, with
  the exit code folded from the workers' (:mod:`torpor.folding`): 143 after a saved SIGTERM, a
  crash's own code otherwise.

Usage: ``python -m torpor.run [--nproc-per-node N] [-m] [--no-python] target [args…]``, where
``target`` is a script (run with this interpreter), a module with ``-m``, or any program with
``--no-python``. Torch-free.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import FrameType

from torpor import env as runtime_env
from torpor.folding import WorkerExit, exit_code_of, fold_exits, is_stop
from torpor.termination import TerminationMessage, write_termination_message

__all__ = ["main", "worker_env"]

KILL_AFTER_ENV = "TORPOR_RUN_KILL_AFTER_SECONDS"
DEFAULT_KILL_AFTER = 30.0
_PR_SET_PDEATHSIG = 1


def _int_env(environ: Mapping[str, str], name: str, default: int) -> int:
    """``torpor.env``'s parser; a bad value ends the launcher with the variable and the value."""
    try:
        return runtime_env._int(environ, name, default)
    except ValueError as exc:
        raise SystemExit(f"torpor.run: {exc}") from None


def worker_env(environ: Mapping[str, str], nproc: int, local_rank: int, log_dir: Path) -> dict[str, str]:
    """The environment of local rank ``local_rank`` of ``nproc`` (the module's list)."""
    node_rank = _int_env(environ, "NODE_RANK", 0)
    nnodes = _int_env(environ, "NNODES", 0)
    world = nnodes * nproc if nnodes else _int_env(environ, "WORLD_SIZE", nproc)
    rank = node_rank * nproc + local_rank
    if rank >= world:
        raise SystemExit(f"torpor.run: RANK {rank} (NODE_RANK={node_rank} * {nproc} + {local_rank}) is not "
                         f"below WORLD_SIZE={world}")
    out = dict(environ)
    out.update({
        "RANK": str(rank), "LOCAL_RANK": str(local_rank), "LOCAL_WORLD_SIZE": str(nproc),
        "GROUP_RANK": str(node_rank), "WORLD_SIZE": str(world),
        runtime_env.TERMINATION_LOG: str(log_dir / f"termination-log.{local_rank}"),
    })
    return out


def _die_with_parent() -> None:
    """In the child before exec: a SIGKILLed launcher takes its workers with it."""
    with contextlib.suppress(Exception):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def _command(args: argparse.Namespace) -> list[str]:
    if args.no_python:
        return [args.target, *args.args]
    if args.module:
        return [sys.executable, "-m", args.target, *args.args]
    return [sys.executable, args.target, *args.args]


def _read_message(path: Path) -> TerminationMessage | None:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError:
        return None
    try:
        return TerminationMessage.from_json(text) if text.strip() else None
    except ValueError:
        return None


def _forwarded_signals(environ: Mapping[str, str]) -> set[int]:
    """SIGTERM, SIGINT and the job's stop signal (``torpor.env``'s parser: a bad name is an error)."""
    raw = environ.get(runtime_env.EXIT_SIGNAL, "").strip()
    try:
        extra = {runtime_env.parse_signal(raw)} if raw else set()
    except ValueError as exc:
        raise SystemExit(f"torpor.run: {exc}") from None
    return {int(signal.SIGTERM), int(signal.SIGINT), *extra}


def run(command: Sequence[str], nproc: int, environ: Mapping[str, str]) -> int:
    """Start, watch and fold ``nproc`` workers of ``command``; returns the pod's exit code."""
    try:
        kill_after = runtime_env._float(environ, KILL_AFTER_ENV, DEFAULT_KILL_AFTER)
    except ValueError as exc:
        raise SystemExit(f"torpor.run: {exc}") from None
    pod_log = environ.get(runtime_env.TERMINATION_LOG, "").strip() or runtime_env.DEFAULT_TERMINATION_LOG
    with tempfile.TemporaryDirectory(prefix="torpor-run-") as tmp:
        log_dir = Path(tmp)
        envs = [worker_env(environ, nproc, i, log_dir) for i in range(nproc)]
        procs: list[subprocess.Popen[bytes]] = []

        def forward(signum: int, _frame: FrameType | None) -> None:
            for proc in procs:
                if proc.poll() is None:
                    with contextlib.suppress(ProcessLookupError):
                        proc.send_signal(signum)

        for sig in _forwarded_signals(environ):
            signal.signal(sig, forward)
        for worker in envs:
            procs.append(subprocess.Popen(list(command), env=worker, start_new_session=True,
                                          preexec_fn=_die_with_parent))
        ended: dict[int, WorkerExit] = {}
        codes: dict[int, int] = {}
        stop_deadline: float | None = None
        while len(codes) < nproc:
            for i, proc in enumerate(procs):
                if i not in codes and proc.poll() is not None:
                    codes[i] = exit_code_of(proc.returncode)
                    ended[i] = WorkerExit(i, codes[i], _read_message(log_dir / f"termination-log.{i}"))
                    failed = codes[i] != 0 and not is_stop(ended[i]) and stop_deadline is None
                    if failed and len(codes) < nproc:
                        _stop_others(procs, codes, i)
                        stop_deadline = time.monotonic() + kill_after
            if stop_deadline is not None and time.monotonic() >= stop_deadline:
                for j, proc in enumerate(procs):
                    if j not in codes:
                        with contextlib.suppress(ProcessLookupError):
                            proc.kill()
                stop_deadline = float("inf")
            time.sleep(0.05)
    code, message = fold_exits(list(ended.values()))  # in the order they ended: a crash before its collateral
    if message is not None:
        write_termination_message(message, pod_log)
    return code


def _stop_others(procs: Sequence[subprocess.Popen[bytes]], codes: Mapping[int, int], failed: int) -> None:
    print(f"torpor.run: local rank {failed} exited with {codes[failed]}; stopping the other ranks",
          file=sys.stderr, flush=True)
    for j, proc in enumerate(procs):
        if j not in codes and proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m torpor.run", description=__doc__.split("\n\n")[0])
    parser.add_argument("--nproc-per-node", type=int, default=None,
                        help="ranks in this pod (default: LOCAL_WORLD_SIZE, else 1)")
    parser.add_argument("-m", "--module", action="store_true", help="target is a module (python -m target)")
    parser.add_argument("--no-python", action="store_true", help="run target as a program, not with python")
    parser.add_argument("target")
    parser.add_argument("args", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    nproc = args.nproc_per_node if args.nproc_per_node is not None else _int_env(os.environ, "LOCAL_WORLD_SIZE", 1)
    if nproc < 1:
        parser.error(f"--nproc-per-node must be >= 1, got {nproc}")
    return run(_command(args), nproc, os.environ)


if __name__ == "__main__":
    sys.exit(main())
