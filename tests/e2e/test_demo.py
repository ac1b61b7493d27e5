"""`make demo`'s program runs start to finish on this machine and says what happened."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_demo_runs_a_pod_through_scheduler_and_node_agent_and_cleans_up(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "hack" / "cluster.py"), "--demo"],
        capture_output=True, text=True, timeout=300, cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    assert "control plane ready" in out
    assert "phase Succeeded, exit code 0" in out
    assert "hello from torpor-node-" in out
    state_dir = next(line.split("state in ", 1)[1] for line in out.splitlines() if "state in " in line)
    assert not Path(state_dir).exists(), "the demo leaves no state behind"
