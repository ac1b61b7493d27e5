"""Several training processes in each pod (``spec.procsPerPod``, issue 14 item 1): 2 pods × 2
processes started by torpor's launcher (``python -m torpor.run``), through a ``kubectl drain``
of rank 0's node, on the real control plane, node agent and MinIO.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

import pytest

from torpor.checkpoints import Reason

if TYPE_CHECKING:  # the fixtures' types; conftest modules are not importable by name in one session
    from conftest import Env

pytestmark = pytest.mark.cluster


def test_a_drain_stops_all_four_processes_of_two_pods_at_one_step_and_the_job_resumes(e2e: Env) -> None:
    body = e2e.example("--losses", str(e2e.losses()), "--step-delay", "0.05", procsPerPod=2)
    container = body["spec"]["template"]["spec"]["containers"][0]
    container["command"] = [sys.executable, "-m", "torpor.run", "examples/train.py"]
    e2e.create(body)
    running = e2e.wait_phase("Running", timeout=120)
    assert (running["ready"], running["worldSize"]) == ("2/2", 2)  # pods
    e2e.wait("a periodic checkpoint", lambda: e2e.status().get("lastCheckpoint"), timeout=120)
    assert {s["rank"] for s in e2e.steps()} == {0, 1, 2, 3}  # every process trains, with its own RANK

    node = e2e.node_of("mlp-1-0")
    e2e.drain(node)

    status = e2e.wait_phase("Running", timeout=150, incarnation=2)
    # a saved stop, folded by each pod's launcher into one exit the operator reads: a crash
    # (torchrun's exit 1) would count as a restart
    assert (status.get("preemptions"), status.get("restarts", 0)) == (1, 0), status
    # one checkpoint of all four processes, at one step, written on the way out
    checkpoint = next(c for c in e2e.checkpoints() if c.name == status["resumeFrom"])
    assert checkpoint.complete and sorted(checkpoint.manifests) == [0, 1, 2, 3], e2e.object_keys()
    manifests = checkpoint.manifests.values()
    assert len({m.step for m in manifests}) == 1 and {m.reason for m in manifests} == {Reason.EXIT}
    step = checkpoint.step
    # no step lost or repeated on any process
    e2e.wait("steps of the new incarnation", lambda: sum(s["step"] > step + 5 for s in e2e.steps()) >= 4)
    for rank in range(4):
        seen = [s["step"] for s in e2e.steps() if s["rank"] == rank]
        assert seen[: seen.index(step) + 2] == list(range(1, step + 2)), (rank, step, seen)
    assert "Preempted" in e2e.reasons() and "Restarted" in e2e.reasons()
