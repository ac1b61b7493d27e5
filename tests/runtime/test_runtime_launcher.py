"""``python -m torpor.run`` with real processes and real signals (issue 14, item 1): a SIGTERM to
the pod's process group reaches every worker once, the pod exits 143 with one message; a crash
stays a crash and stops the other ranks."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from torpor.termination import TerminationMessage

WORKER = Path(__file__).parent / "procs" / "run_worker.py"


def launch(tmp_path: Path, **env: str) -> subprocess.Popen[bytes]:
    environ = {**os.environ, "NODE_RANK": "1", "NNODES": "2", "LOCAL_WORLD_SIZE": "2",
               "TORPOR_TERMINATION_LOG": str(tmp_path / "pod-termination-log"), **env}
    return subprocess.Popen([sys.executable, "-m", "torpor.run", str(WORKER), str(tmp_path)], env=environ,
                            start_new_session=True)  # its own group, as a container's main process


def await_files(tmp_path: Path, names: list[str], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not all((tmp_path / n).exists() for n in names):
        assert time.monotonic() < deadline, f"never written: {[n for n in names if not (tmp_path / n).exists()]}"
        time.sleep(0.05)


def test_a_sigterm_to_the_pod_reaches_every_worker_once_and_the_pod_reports_the_saved_stop(tmp_path: Path) -> None:
    pod = launch(tmp_path)
    try:
        await_files(tmp_path, ["env.2", "env.3"])
        os.killpg(pod.pid, signal.SIGTERM)  # what the node agent and kubelet's runtime do
        assert pod.wait(timeout=60) == 143
    finally:
        pod.kill()
    envs = {r: json.loads((tmp_path / f"env.{r}").read_text()) for r in (2, 3)}
    assert [(e["RANK"], e["LOCAL_RANK"], e["WORLD_SIZE"], e["GROUP_RANK"]) for e in envs.values()] == [
        ("2", "0", "4", "1"), ("3", "1", "4", "1")]
    assert envs[2]["TORPOR_TERMINATION_LOG"] != envs[3]["TORPOR_TERMINATION_LOG"], "one log path per worker"
    assert [(tmp_path / f"signals.{r}").read_text() for r in (2, 3)] == ["1", "1"], "forwarded once, not twice"
    message = TerminationMessage.from_json((tmp_path / "pod-termination-log").read_text())
    assert (message.exit_code, message.rank, message.checkpoint) == (143, 2, "Net-1_7")


def test_a_worker_crash_is_the_pods_exit_and_the_other_rank_is_stopped(tmp_path: Path) -> None:
    pod = launch(tmp_path, CRASH_RANK="3")
    try:
        assert pod.wait(timeout=60) == 134, "SIGABRT stays a crash (torchrun would report 1)"
    finally:
        pod.kill()
    assert (tmp_path / "signals.2").read_text() == "1", "the surviving rank was asked to stop"
    assert not (tmp_path / "pod-termination-log").exists(), "no message: the operator sees a crash"


def test_a_bad_local_world_size_names_the_variable(tmp_path: Path) -> None:
    pod = subprocess.run([sys.executable, "-m", "torpor.run", str(WORKER), str(tmp_path)],
                         env={**os.environ, "LOCAL_WORLD_SIZE": "two"}, capture_output=True, text=True, timeout=60)
    assert pod.returncode != 0 and "LOCAL_WORLD_SIZE must be an integer, got 'two'" in pod.stderr


def test_a_bad_exit_signal_or_kill_after_names_the_variable(tmp_path: Path) -> None:
    for name, value, said in (("TORPOR_EXIT_SIGNAL", "SIGNOPE", "TORPOR_EXIT_SIGNAL names no signal"),
                              ("TORPOR_RUN_KILL_AFTER_SECONDS", "soon", "TORPOR_RUN_KILL_AFTER_SECONDS")):
        pod = subprocess.run([sys.executable, "-m", "torpor.run", str(WORKER), str(tmp_path)],
                             env={**os.environ, name: value}, capture_output=True, text=True, timeout=60)
        assert pod.returncode != 0 and said in pod.stderr and repr(value) in pod.stderr
