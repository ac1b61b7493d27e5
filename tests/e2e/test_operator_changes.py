"""Changes under a live job, on the real control plane with real torch ranks (issue 12, items 7
and 9): its template edited while it runs (applied through a graceful restart; a change of
`spec.replicas` is a resize, tests/e2e/test_operator_elastic.py), and a node uncordoned while a
rank waits Pending because the operator kept it off that node.

What is asserted is what docs/operator.md's "Faults" table promises.
"""

from __future__ import annotations

import json
import time
from typing import TYPE_CHECKING, Any

import pytest

from torpor.checkpoints import Reason
from torpor_operator.contract import ANNOTATION_AVOIDED_NODES

if TYPE_CHECKING:  # the fixtures' types; conftest modules are not importable by name in one session
    from conftest import Env

pytestmark = pytest.mark.cluster

ARGS = ("--step-delay", "0.05")


def incarnation_pods(e2e: Env, incarnation: int) -> list[dict[str, Any]]:
    return sorted((p for p in e2e.pods() if p["metadata"]["labels"]["torpor.dev/incarnation"] == str(incarnation)),
                  key=lambda p: p["metadata"]["name"])


def train(pod: dict[str, Any]) -> dict[str, Any]:
    return next(c for c in pod["spec"]["containers"] if c["name"] == "train")


def kept_off(pod: dict[str, Any]) -> list[str]:
    """The node names the pod's required node affinity excludes."""
    affinity = (pod["spec"].get("affinity") or {}).get("nodeAffinity") or {}
    terms = (affinity.get("requiredDuringSchedulingIgnoredDuringExecution") or {}).get("nodeSelectorTerms") or []
    return sorted({v for t in terms for f in t.get("matchFields") or [] if f["operator"] == "NotIn"
                   for v in f["values"]})


def env_of(pod: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e.get("value", "") for e in train(pod).get("env") or []}


def test_template_changed_while_running_saves_and_restarts_into_incarnation_2_with_it(e2e: Env) -> None:
    e2e.create(e2e.example("--losses", str(e2e.losses()), *ARGS))
    e2e.wait_phase("Running", timeout=120)
    e2e.wait("a periodic checkpoint", lambda: e2e.status().get("lastCheckpoint"), timeout=120)
    old_args = train(e2e.pod("mlp-1-0"))["args"]

    # new args (the last --step-delay wins) and a new variable, as `kubectl edit` would make them
    change = [
        {"op": "add", "path": "/spec/template/spec/containers/0/args/-", "value": "--step-delay"},
        {"op": "add", "path": "/spec/template/spec/containers/0/args/-", "value": "0.04"},
        {"op": "add", "path": "/spec/template/spec/containers/0/env", "value": [{"name": "RUN_NOTE", "value": "v2"}]},
    ]
    changed_at = time.monotonic()
    e2e.kubectl("patch", "tj", "mlp", "--type=json", "-p", json.dumps(change))

    stopping = e2e.wait("the graceful stop", lambda: (st := e2e.status()).get("stopReason") == "SpecChanged" and st,
                        timeout=60)
    assert "spec.template changed" in stopping["stopMessage"], stopping
    status = e2e.wait_phase("Running", incarnation=2, timeout=180)
    print(f"template patched -> incarnation 2 Running after {time.monotonic() - changed_at:.1f}s")
    assert (status.get("preemptions", 0), status.get("restarts", 0)) == (0, 0), status

    # incarnation 2 is made from the new template
    new = incarnation_pods(e2e, 2)
    assert [p["metadata"]["name"] for p in new] == ["mlp-2-0", "mlp-2-1"]
    for pod in new:
        assert train(pod)["args"] == [*old_args, "--step-delay", "0.04"], train(pod)["args"]
        assert env_of(pod)["RUN_NOTE"] == "v2"

    # ... and resumed from the checkpoint incarnation 1 saved on its way out: one step, every rank
    name = status["resumeFrom"]
    checkpoint = next(c for c in e2e.checkpoints() if c.name == name)
    assert checkpoint.complete and sorted(checkpoint.manifests) == [0, 1], e2e.object_keys()
    manifests = checkpoint.manifests.values()
    assert {m.reason for m in manifests} == {Reason.EXIT} and {m.incarnation for m in manifests} == {"1"}
    step = checkpoint.step
    assert all(p["metadata"]["annotations"]["torpor.dev/resume-from"] == name for p in new)
    e2e.wait("steps of the new incarnation", lambda: sum(s["step"] > step + 5 for s in e2e.steps()) >= 2)
    for rank in (0, 1):
        seen = [s["step"] for s in e2e.steps() if s["rank"] == rank]
        assert seen[: seen.index(step) + 2] == list(range(1, step + 2)), (rank, step, seen)

    events = e2e.reasons()
    assert "SpecChanged" in events and "Restarted" in events, events
    assert "Preempted" not in events and "RankFailed" not in events, events


def test_a_node_uncordoned_while_a_rank_is_pending_because_of_it_gets_the_rank(e2e: Env) -> None:
    """A template that tolerates every taint (common on GPU pools) would be scheduled onto a
    cordoned node; only the operator's required affinity keeps it off. One rank per node
    (pod anti-affinity) on two nodes, one of them cordoned: a rank waits Pending until the node
    is uncordoned, then is made again without the exclusion and runs there."""
    cordoned, other = e2e.agent.node_names[:2]
    e2e.cordon(cordoned)
    body = e2e.example("--losses", str(e2e.losses()), *ARGS)
    pod_spec = body["spec"]["template"]["spec"]
    pod_spec["tolerations"] = [{"operator": "Exists"}]
    pod_spec["affinity"] = {"podAntiAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": [
        {"labelSelector": {"matchLabels": {"torpor.dev/job": "mlp"}}, "topologyKey": "kubernetes.io/hostname"}]}}
    e2e.create(body)

    def one_pending() -> dict[str, Any] | None:
        pods = e2e.pods()
        waiting = [p for p in pods if not p["spec"].get("nodeName") and any(
            c["type"] == "PodScheduled" and c.get("reason") == "Unschedulable"
            for c in p.get("status", {}).get("conditions") or [])]
        placed = [p for p in pods if p["spec"].get("nodeName") == other]
        return waiting[0] if len(waiting) == 1 and len(placed) == 1 else None

    waiting = e2e.wait("one rank running, one Pending", one_pending, timeout=90)
    assert kept_off(waiting) == [cordoned], waiting["spec"].get("affinity")
    assert e2e.status()["phase"] == "Pending"

    uncordoned_at = time.monotonic()
    e2e.uncordon_all()
    e2e.wait("the rank made again", lambda: e2e.pod(waiting["metadata"]["name"])["metadata"]["uid"]
             != waiting["metadata"]["uid"], timeout=60)
    print(f"uncordoned -> rank made again after {time.monotonic() - uncordoned_at:.1f}s")
    status = e2e.wait_phase("Running", timeout=120)
    print(f"uncordoned -> Running after {time.monotonic() - uncordoned_at:.1f}s")
    assert (status["incarnation"], status.get("restarts", 0), status.get("preemptions", 0)) == (1, 0, 0), status
    rank = waiting["metadata"]["name"]
    again = e2e.pod(rank)
    assert again["spec"]["nodeName"] == cordoned, again["spec"]
    assert again["metadata"]["uid"] != waiting["metadata"]["uid"]  # made again, without the exclusion
    assert kept_off(again) == [] and ANNOTATION_AVOIDED_NODES not in again["metadata"]["annotations"]
    assert "RankRecreated" in e2e.reasons()
    seen = max((s["step"] for s in e2e.steps()), default=0)
    e2e.wait("both ranks train", lambda: {s["rank"] for s in e2e.steps() if s["step"] > seen} == {0, 1}, timeout=90)
