"""examples/trainingjob.yaml under the operator: periodic checkpoints, and `kubectl drain` of a
rank's node, with and without drainProtection, on the real control plane, node agent and MinIO.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest

from torpor.checkpoints import Reason

if TYPE_CHECKING:  # the fixtures' types; conftest modules are not importable by name in one session
    from conftest import Env

pytestmark = pytest.mark.cluster


def test_the_example_job_runs_checkpoints_and_succeeds(e2e: Env) -> None:
    e2e.create(e2e.example("--max-steps", "60", "--step-delay", "0.05", "--losses", str(e2e.losses())))
    running = e2e.wait_phase("Running", timeout=120)
    assert (running["ready"], running["incarnation"]) == ("2/2", 1)
    e2e.wait("a checkpoint in the status", lambda: e2e.status().get("lastCheckpoint"))

    table = e2e.kubectl("get", "tj").stdout.splitlines()
    assert table[0].split() == ["NAME", "PHASE", "READY", "WORLD-SIZE", "RESTARTS", "PREEMPTIONS", "STEP",
                                "CHECKPOINT", "AGE"]
    row = table[1].split()
    assert row[:6] == ["mlp", "Running", "2/2", "2", "0", "0"] and int(row[6]) % 20 == 0, table
    wide = e2e.kubectl("get", "tj", "-o", "wide").stdout.splitlines()
    assert wide[0].split()[-3:] == ["INCARNATION", "RESUME-FROM", "AGE"]

    done = e2e.wait_phase("Succeeded", timeout=120)
    # every 20 steps on both ranks, the newest 3 kept (keepMax)
    complete = sorted(c.step for c in e2e.checkpoints() if c.complete)
    assert complete == [20, 40, 60], e2e.object_keys()
    assert done["lastCheckpoint"]["step"] == 60
    assert {s["step"] for s in e2e.steps() if s["rank"] == 0} == set(range(1, 61))
    assert e2e.reasons()[-1] == "Succeeded"


def _drain_and_check(e2e: Env, protect: bool) -> str:
    e2e.create(e2e.example("--losses", str(e2e.losses()), "--step-delay", "0.05",
                           gracefulExit={"drainProtection": protect}))
    e2e.wait_phase("Running", timeout=120)
    e2e.wait("a checkpoint in the status", lambda: e2e.status().get("lastCheckpoint"), timeout=120)
    if protect:
        assert [p["metadata"]["name"] for p in e2e.get("pdb")["items"]] == ["mlp-1"]
    node = e2e.node_of("mlp-1-0")
    out = e2e.drain(node)

    status = e2e.wait_phase("Running", timeout=150, incarnation=2)
    # the checkpoint every rank wrote on the way out: one save, one step, a manifest per rank
    name = status["resumeFrom"]
    checkpoint = next(c for c in e2e.checkpoints() if c.name == name)
    assert checkpoint.complete and sorted(checkpoint.manifests) == [0, 1], e2e.object_keys()
    manifests = checkpoint.manifests.values()
    assert len({m.step for m in manifests}) == 1 and len({m.save_id for m in manifests}) == 1
    assert {m.reason for m in manifests} == {Reason.EXIT} and {m.incarnation for m in manifests} == {"1"}
    step = checkpoint.step

    # the new incarnation runs away from the drained node, told to resume from that checkpoint
    for pod in e2e.pods():
        if pod["metadata"]["labels"]["torpor.dev/incarnation"] == "2":
            assert pod["spec"]["nodeName"] != node
            assert pod["metadata"]["annotations"]["torpor.dev/resume-from"] == name
    assert status["resumeFrom"] == name
    assert (status.get("preemptions"), status.get("restarts", 0)) == (1, 0)

    # no step lost or repeated: rank r's steps go 1..step, then step+1.. in the new incarnation
    e2e.wait("steps of the new incarnation", lambda: sum(s["step"] > step + 5 for s in e2e.steps()) >= 2)
    for rank in (0, 1):
        seen = [s["step"] for s in e2e.steps() if s["rank"] == rank]
        assert seen[: seen.index(step) + 2] == list(range(1, step + 2)), (rank, step, seen)
    assert "Preempted" in e2e.reasons() and "Restarted" in e2e.reasons()
    return out


def test_drain_of_rank_0s_node_saves_every_rank_at_one_step_and_resumes_elsewhere(e2e: Env) -> None:
    _drain_and_check(e2e, protect=False)


def test_drain_protection_holds_the_drain_until_the_ranks_have_saved(e2e: Env) -> None:
    out = _drain_and_check(e2e, protect=True)
    # kubectl drain retried the eviction the PodDisruptionBudget refused, until the ranks had saved
    assert "disruption budget" in out, out
