"""``examples/hf_train.py`` (a Hugging Face ``Trainer`` with ``torpor.transformers``) as a
TrainingJob, through a ``kubectl drain`` of a rank's node, on the real control plane, node
agent and MinIO (issue 14, item 4).
"""

from __future__ import annotations

import json
import sys
from typing import TYPE_CHECKING

import pytest

from torpor.checkpoints import Reason

if TYPE_CHECKING:  # the fixtures' types; conftest modules are not importable by name in one session
    from conftest import Env

pytestmark = pytest.mark.cluster
STEPS = 50


def test_a_drain_stops_both_trainer_ranks_at_one_step_and_the_job_resumes_and_completes(e2e: Env) -> None:
    body = e2e.example(checkpoint={"saveSteps": 10})
    container = body["spec"]["template"]["spec"]["containers"][0]
    container["command"] = [sys.executable, "examples/hf_train.py"]
    # HF's own checkpoint-{step} folders go to a local directory; torpor stores them in the bucket
    container["args"] = ["--max-steps", str(STEPS), "--step-seconds", "0.2", "--output-dir", str(e2e.tmp / "out")]
    e2e.create(body)
    running = e2e.wait_phase("Running", timeout=120)
    assert running["worldSize"] == 2
    # a periodic save of the Trainer (saveSteps -> TORPOR_SAVE_STEPS -> save_steps), stored by torpor
    e2e.wait("a periodic checkpoint", lambda: e2e.status().get("lastCheckpoint"), timeout=120)

    e2e.drain(e2e.node_of("mlp-1-0"))

    status = e2e.wait_phase("Running", timeout=150, incarnation=2)
    assert (status.get("preemptions"), status.get("restarts", 0)) == (1, 0), status  # a saved stop, no crash
    checkpoint = next(c for c in e2e.checkpoints() if c.name == status["resumeFrom"])
    assert checkpoint.complete and sorted(checkpoint.manifests) == [0, 1], e2e.object_keys()
    manifests = list(checkpoint.manifests.values())
    assert len({m.step for m in manifests}) == 1 and {m.reason for m in manifests} == {Reason.EXIT}
    assert 0 < checkpoint.step < STEPS and checkpoint.name == f"hf-1_{checkpoint.step}"
    assert manifests[0].extra["framework"] == "transformers"

    done = e2e.wait_phase("Succeeded", timeout=150)
    assert done.get("preemptions") == 1, done
    # both ranks of incarnation 2 continued from that checkpoint (a fresh start would also "succeed")
    e2e.wait("ranks ended", lambda: len(e2e.pods()) == 2 and all(e2e.terminated(p) for p in e2e.pods()))
    finished = [json.loads(e2e.terminated(p)["message"]) for p in e2e.pods()]
    assert {(m["reason"], m["step"], m.get("resumed_from")) for m in finished} == \
        {("completed", STEPS, checkpoint.name)}, finished
    assert "Preempted" in e2e.reasons() and "Restarted" in e2e.reasons()
    # the Trainer's checkpoints are pruned by the operator's retention (keepMax: 3 in
    # examples/trainingjob.yaml) as any torpor job's: 5 periodic saves and the exit save -> the newest
    # 3, and the exit save the job resumed from
    kept = e2e.pruned_by_the_operator(3, checkpoint.name)
    assert max(c.step for c in kept) == STEPS and len(kept) <= 4, [c.name for c in kept]
