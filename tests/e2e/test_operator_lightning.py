"""``examples/lightning_train.py`` (real Lightning, DDP over gloo) as a TrainingJob through a
``kubectl drain`` of a rank's node, on the real control plane, node agent and MinIO.

The same two ranks also run uninterrupted, as plain local processes, beside the job: the
job's losses, across the preemption, must be theirs. The job's ``spec.checkpoint.saveSteps`` (20)
reaches the callback as ``TORPOR_SAVE_STEPS``: its last step is a periodic checkpoint of both ranks;
the ranks keep every checkpoint, and the operator's retention (``keepMax: 3``) prunes them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from processes import free_port
from torpor.checkpoints import Reason

if TYPE_CHECKING:  # the fixtures' types; conftest modules are not importable by name in one session
    from conftest import Env

pytestmark = pytest.mark.cluster

ROOT = Path(__file__).resolve().parents[2]
ARGS = ["--epochs", "3", "--samples", "320", "--batch-size", "8"]  # 20 steps per epoch on 2 ranks: 60 steps


def _uninterrupted(tmp: Path, losses: Path) -> list[subprocess.Popen[bytes]]:
    """The same job on two local processes, without the operator and without a stop."""
    port = str(free_port())
    keep = {k: v for k, v in os.environ.items() if not k.startswith(("TORPOR_", "AWS_"))}
    procs = []
    for rank in (0, 1):
        env = {**keep, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1",
               "TORPOR_CHECKPOINT_URI": str(tmp / "straight-ckpt")}
        with (tmp / f"straight-{rank}.log").open("wb") as log:  # the child keeps its own descriptor
            procs.append(subprocess.Popen([sys.executable, "examples/lightning_train.py", *ARGS, "--losses",
                                           str(losses)], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT))
    return procs


def test_a_drain_stops_the_lightning_job_at_one_step_and_it_resumes_to_the_uninterrupted_losses(e2e: Env) -> None:
    body = e2e.example(*ARGS, "--losses", str(e2e.losses()), "--step-delay", "0.15")
    # the ranks keep every checkpoint (TORPOR_KEEP_MAX=0 over the operator's value): only the operator prunes
    body["spec"]["template"]["spec"]["containers"][0]["command"] = [
        "env", "TORPOR_KEEP_MAX=0", sys.executable, "examples/lightning_train.py"]
    e2e.create(body)
    straight_losses = e2e.tmp / "straight-losses.jsonl"
    straight = _uninterrupted(e2e.tmp, straight_losses)
    try:
        e2e.wait_phase("Running", timeout=120)
        e2e.wait("steps of both ranks", lambda: {s["rank"] for s in e2e.steps() if s["step"] >= 3} == {0, 1},
                 timeout=120)
        e2e.drain(e2e.node_of("mlp-1-1"))

        status = e2e.wait_phase("Running", timeout=150, incarnation=2)
        assert (status.get("preemptions"), status.get("restarts", 0)) == (1, 0), status
        # one checkpoint of both ranks at one step, written on the way out, resumed from
        checkpoint = next(c for c in e2e.checkpoints() if c.name == status["resumeFrom"])
        assert checkpoint.complete and sorted(checkpoint.manifests) == [0, 1], e2e.object_keys()
        manifests = checkpoint.manifests.values()
        assert len({m.step for m in manifests}) == 1 and {m.reason for m in manifests} == {Reason.EXIT}
        step = checkpoint.step
        assert 0 < step < 60

        e2e.wait_phase("Succeeded", timeout=150)
        # saveSteps: 20 reached the callback (TORPOR_SAVE_STEPS): the last step is a periodic save of both ranks
        [last] = [c for c in e2e.checkpoints() if c.step == 60]
        assert last.complete and sorted(last.manifests) == [0, 1], e2e.object_keys()
        assert {m.reason for m in last.manifests.values()} == {Reason.PERIODIC}, last
        # the operator's retention (keepMax: 3, examples/trainingjob.yaml) prunes Lightning's checkpoints
        # as any torpor job's: the newest 3 and the exit save the job resumed from
        kept = e2e.pruned_by_the_operator(3, checkpoint.name)
        assert 60 in {c.step for c in kept} and len(kept) <= 4, [c.name for c in kept]
        assert [p.wait(timeout=120) for p in straight] == [0, 0], [
            (e2e.tmp / f"straight-{r}.log").read_text()[-2000:] for r in (0, 1)]
    finally:
        for p in straight:
            p.kill()
            p.wait()
    expected = {(s["rank"], s["step"]): s["loss"] for s in map(json.loads, straight_losses.read_text().splitlines())}
    seen = e2e.steps()
    # no step lost or repeated: the resumed incarnation starts right after the checkpoint's step
    for rank in (0, 1):
        steps = [s["step"] for s in seen if s["rank"] == rank]
        assert steps == list(range(1, 61)), (rank, step, steps)
    got = {(s["rank"], s["step"]): s["loss"] for s in seen}
    assert got.keys() == expected.keys()
    for key, loss in expected.items():
        assert got[key] == pytest.approx(loss, rel=1e-5), key
