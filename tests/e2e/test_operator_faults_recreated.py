"""A TrainingJob created again under the name of one deleted with ``kubectl delete --cascade=orphan``.

The old job's pods, ConfigMap and Service stay, without an owner, under the same labels and
the names the new job would give its first incarnation. The new job must run an incarnation of
its own from scratch, never finished by the old Succeeded pods nor stopped by the old
``GracefulExit: 1``, and leave the orphans as they are (docs/operator.md, "Faults"). Real
control plane, node agent, MinIO and torch ranks.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

import pytest
from kubernetes import client

if TYPE_CHECKING:  # the fixtures' types; conftest modules are not importable by name in one session
    from conftest import Env

pytestmark = pytest.mark.cluster


def uid_of(e2e: Env, kind: str, name: str) -> str:
    return e2e.get(kind, name)["metadata"]["uid"]


def reasons_of(e2e: Env, uid: str) -> list[str]:
    events = e2e.get("events", "--field-selector", f"involvedObject.uid={uid}")
    return [e["reason"] for e in sorted(events["items"], key=lambda e: int(e["metadata"]["resourceVersion"]))]


def orphan(e2e: Env) -> None:
    """``kubectl delete tj mlp --cascade=orphan``; returns once the job is gone (the garbage
    collector has removed the owner references of its children by then)."""
    e2e.kubectl("delete", "tj", "mlp", "--cascade=orphan", "--timeout=60s")
    assert all(not p["metadata"].get("ownerReferences") for p in e2e.pods()), "the old pods are orphans"


def snapshot(objects: list[dict[str, Any]]) -> dict[str, tuple[str, str]]:
    """name -> (uid, resourceVersion): any change by anyone, or a deletion, shows."""
    return {o["metadata"]["name"]: (o["metadata"]["uid"], o["metadata"]["resourceVersion"]) for o in objects}


def incarnation_pods(e2e: Env, incarnation: int) -> list[dict[str, Any]]:
    return [p for p in e2e.pods() if p["metadata"]["labels"]["torpor.dev/incarnation"] == str(incarnation)]


def assert_ran_from_scratch(e2e: Env, status: dict[str, Any], uid: str) -> None:
    """The new job ran incarnation 2 (1's names are the orphans'), its own ranks trained every step."""
    assert (status["incarnation"], status.get("restarts", 0), status.get("preemptions", 0)) == (2, 0, 0), status
    new = incarnation_pods(e2e, 2)
    assert len(new) == 2 and all(p["metadata"]["ownerReferences"][0]["uid"] == uid for p in new), new
    steps = {(s["rank"], s["step"]) for s in e2e.steps()}
    assert steps == {(r, n) for r in (0, 1) for n in range(1, 31)}, sorted(steps)[:5]  # one epoch, from step 1
    reasons = reasons_of(e2e, uid)
    assert "StaleChildren" in reasons and "Preempted" not in reasons and "RankFailed" not in reasons, reasons


def test_a_job_recreated_after_cascade_orphan_is_not_finished_by_the_old_succeeded_pods(e2e: Env) -> None:
    e2e.create(e2e.example("--epochs", "1", "--step-delay", "0"))
    e2e.wait_phase("Succeeded", timeout=240)
    old_pods = snapshot(e2e.pods())
    orphan(e2e)
    assert sorted(old_pods) == ["mlp-1-0", "mlp-1-1"]
    old_pods = snapshot(e2e.pods())  # as orphans

    again = e2e.example("--losses", str(e2e.losses()), "--epochs", "1", "--step-delay", "0.05",
                        checkpoint={"uri": f"s3://{e2e.bucket}/again"})  # a prefix of its own: from scratch
    e2e.create(again)
    uid = uid_of(e2e, "tj", "mlp")
    status = e2e.wait_phase("Succeeded", timeout=240)
    assert_ran_from_scratch(e2e, status, uid)
    assert snapshot(incarnation_pods(e2e, 1)) == old_pods  # the orphans: not deleted, not changed


def test_a_job_recreated_while_the_old_ranks_stop_is_not_stopped_by_their_graceful_exit(
        e2e: Env, kube: client.ApiClient) -> None:
    # a step takes 3 s: the old job is orphaned after its GracefulExit is written and before
    # its ranks have reached a step boundary, saved and exited (which would release the ConfigMap)
    e2e.create(e2e.example("--step-delay", "3"))
    e2e.wait_phase("Running", timeout=120)
    core = client.CoreV1Api(kube)

    def flag() -> int | None:
        data = core.read_namespaced_config_map("mlp-1-exit", e2e.ns).data or {}
        return json.loads(data.get("graceful-exit.json", "{}")).get("GracefulExit")

    e2e.patch({"suspend": True})
    e2e.wait("GracefulExit 1 in mlp-1-exit", lambda: flag() == 1, timeout=60)
    orphan(e2e)
    assert flag() == 1, "the old job was orphaned before the operator released its ConfigMap"
    left = {"pods": snapshot(e2e.pods()),
            "configmap": snapshot([e2e.get("configmap", "mlp-1-exit")]),
            "service": snapshot([e2e.get("service", "mlp-1")])}

    again = e2e.example("--losses", str(e2e.losses()), "--epochs", "1", "--step-delay", "0.05",
                        checkpoint={"uri": f"s3://{e2e.bucket}/again"})
    e2e.create(again)
    uid = uid_of(e2e, "tj", "mlp")
    status = e2e.wait_phase("Succeeded", timeout=240)
    assert_ran_from_scratch(e2e, status, uid)
    # the old ranks saw their own flag and stopped (exit 75); nobody touched what the old job left
    old = incarnation_pods(e2e, 1)
    assert sorted(p["metadata"]["name"] for p in old) == ["mlp-1-0", "mlp-1-1"]
    assert {p["metadata"]["name"]: p["metadata"]["uid"] for p in old} == {k: v[0] for k, v in left["pods"].items()}
    assert all(not p["metadata"].get("deletionTimestamp") for p in old), old
    assert snapshot([e2e.get("configmap", "mlp-1-exit")]) == left["configmap"] and flag() == 1
    assert snapshot([e2e.get("service", "mlp-1")]) == left["service"]
