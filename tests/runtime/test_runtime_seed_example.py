"""The seed's own example, carried over to PyTorch, runs and stops on a real SIGTERM."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import torch
from torpor_harness import child_env

import torpor

LENET = Path(__file__).resolve().parents[2] / "examples" / "lenet.py"


def test_lenet_seed_example_saves_ckpt_and_pt2_on_sigterm(tmp_path: Path) -> None:
    proc = subprocess.Popen([sys.executable, str(LENET), "--epochs", "50"], cwd=tmp_path, env=child_env({}),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert proc.stdout is not None
    seen = []
    for line in proc.stdout:  # wait for training to be under way, then preempt it
        seen.append(line)
        if line.startswith("epoch 1 step 3 "):
            proc.send_signal(signal.SIGTERM)
            break
    rest, _ = proc.communicate(timeout=120)
    lines = [ln for ln in seen + rest.splitlines(keepends=True) if ln.startswith("epoch ")]
    assert proc.returncode == 0, "".join(seen) + rest  # outside the operator, train() returns
    last_step = int(lines[-1].split()[3])
    assert 3 <= last_step < 50 * 64  # stopped soon after the signal, long before the end

    rank_dir = tmp_path / "checkpoints" / "rank_0"  # the run's checkpoint root, not the seed's "./"
    ckpt = rank_dir / "LeNet5.ckpt"
    assert ckpt.exists() and (rank_dir / "LeNet5.pt2").exists()
    loaded = torpor.load_checkpoint(str(ckpt), network=_lenet())
    assert loaded.step == last_step
    program = torch.export.load(str(rank_dir / "LeNet5.pt2"))
    assert program.module()(torch.zeros(2, 1, 32, 32)).shape == (2, 10)


def _lenet() -> torch.nn.Module:
    sys.path.insert(0, str(LENET.parent))
    try:
        from lenet import LeNet5
    finally:
        sys.path.remove(str(LENET.parent))
    return LeNet5()
