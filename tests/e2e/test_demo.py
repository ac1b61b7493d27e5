"""`make demo`'s program runs start to finish on this machine: a real 2-rank PyTorch job is
drained part-way, saves, resumes at the next step on the other node and finishes; the
timeline, `kubectl get tj` and the loss plot come out, and nothing is left behind.

A shorter variant than `make demo` (2 epochs, drain at step 12), the same code path.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.cluster


def test_demo_drains_saves_resumes_finishes_plots_and_cleans_up(tmp_path: Path) -> None:
    plot = tmp_path / "loss.png"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "hack" / "cluster.py"), "--demo", "--epochs", "2", "--step-delay", "0.15",
         "--drain-at-step", "12", "--plot", str(plot)],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )
    out = proc.stdout
    assert proc.returncode == 0, out[-4000:] + proc.stderr[-3000:]
    assert "control plane ready" in out
    assert "... " in out, "progress is shown while it runs"
    drained = int(re.search(r"kubectl drain \S+ \(hosts rank 0\) at step (\d+)", out).group(1))
    saved = int(re.search(r"saved: checkpoint \S+ at step (\d+) complete on every rank", out).group(1))
    resumed = int(re.search(r"resumed at step (\d+) on ", out).group(1))
    assert 12 <= drained <= saved < 60 and resumed == saved + 1
    assert "finished: Succeeded at step 60" in out
    timeline = out.split("Timeline:", 1)[1]
    for what in ("started", "preempted", "saved", "resumed", "finished"):
        assert f"  {what}" in timeline
    table = out.split("kubectl get tj -o wide:", 1)[1].splitlines()
    assert table[1].split()[:2] == ["NAME", "PHASE"]
    # ready 0/2, world size 2, restarts 0 (blank), 1 preemption
    assert re.match(r"\s*demo\s+Succeeded\s+0/2\s+2\s+(0\s+)?1\s", table[2]), table
    assert f"Loss plot: {plot}" in out
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and plot.stat().st_size > 10_000
    state_dir = next(line.split("state in ", 1)[1] for line in out.splitlines() if "state in " in line)
    assert not Path(state_dir).exists(), "the demo leaves no state behind"
