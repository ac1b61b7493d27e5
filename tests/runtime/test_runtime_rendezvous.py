"""Joining the process group exposes nothing beyond the rendezvous address."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from torpor_harness import child_env

from processes import free_port

PROBE = Path(__file__).parent / "procs" / "rendezvous_probe.py"
HACK = Path(__file__).resolve().parents[2] / "hack"


def test_ranks_listen_only_on_the_master_address_not_on_every_interface() -> None:
    # torch's env:// store would listen on "::"; torpor binds MASTER_ADDR only.
    port = free_port()
    procs = [
        subprocess.Popen(
            [sys.executable, str(PROBE)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env=child_env({"RANK": str(rank), "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
                           "MASTER_PORT": str(port), "PYTHONPATH": str(HACK)}),
        )
        for rank in range(2)
    ]
    reports = []
    for proc in procs:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err[-3000:]
        reports.append(json.loads(out))
    assert [r["sum"] for r in reports] == [2.0, 2.0]
    master = next(r for r in reports if r["rank"] == 0)
    assert ["127.0.0.1", port] in master["listening"]
    hosts = {host for r in reports for host, _ in r["listening"]}
    assert hosts == {"127.0.0.1"}, reports
