"""A rank's outcome is its training container's (``spec.containerName``), whatever else the pod runs.

A regular sidecar (a log shipper, a service-mesh proxy) keeps the pod Running after the trainer
has exited; a native sidecar (an init container with ``restartPolicy: Always``) is ended by the
kubelet with the pod. Pure: no cluster.
"""

from __future__ import annotations

from typing import Any

from test_operator_decide import running
from test_operator_world import Cluster, job_body, message, node, pod

from torpor_operator.contract import ANNOTATION_SIDECARS_STOPPED
from torpor_operator.observing import NodeView, PodView
from torpor_operator.outcomes import Outcome, classify

TWO_CONTAINERS = {"spec": {"containers": [
    {"name": "log-shipper", "image": "fluent-bit", "command": ["python"]},
    {"name": "train", "image": "python:3.11", "command": ["python"]},
]}}


def with_sidecar(p: dict[str, Any], trainer: dict[str, Any] | None, sidecar: str = "running") -> dict[str, Any]:
    """``p`` with a log shipper listed first; ``trainer`` is the training container's ``state``
    (``None``: running), the pod Running while either runs."""
    states = {"running": {"running": {"startedAt": "2026-01-01T11:00:00Z"}},
              "terminated": {"terminated": {"exitCode": 143, "reason": "Error"}}}
    p["status"]["containerStatuses"] = [
        {"name": "log-shipper", "state": states[sidecar]},
        {"name": "train", "state": trainer or states["running"]},
    ]
    if sidecar == "running":
        p["status"]["phase"] = "Running"
    return p


def ended(code: int, text: str = "", reason: str = "") -> dict[str, Any]:
    reason = reason or ("Completed" if not code else "Error")
    return {"terminated": {"exitCode": code, "message": text, "reason": reason, "finishedAt": "2026-01-01T11:59:50Z"}}


def view(p: dict[str, Any]) -> PodView:
    v = PodView.from_dict(p, "train")
    assert v is not None
    return v


def sidecar_cluster() -> Cluster:
    """A job Running with a log shipper beside each rank's trainer."""
    return running(containerName="train", template=TWO_CONTAINERS)


def test_the_training_container_decides_though_a_sidecar_still_runs() -> None:
    p = with_sidecar(pod("demo", 1, 0), ended(0, message("completed", 0, "CKP-1_30", 30)))
    v = view(p)
    assert v.phase == "Running" and v.terminated
    assert v.sidecars == ("log-shipper",)
    assert classify(v).outcome is Outcome.FINISHED


def test_a_running_trainer_is_active_whatever_the_sidecar_did() -> None:
    p = with_sidecar(pod("demo", 1, 0), None, sidecar="terminated")
    assert not view(p).terminated
    assert classify(view(p)).outcome is Outcome.ACTIVE


def test_a_job_whose_trainers_exited_succeeds_and_stops_their_sidecars() -> None:
    c = sidecar_cluster()
    for rank in (0, 1):
        with_sidecar(c.pods[f"demo-1-{rank}"], ended(0, message("completed", 0, "CKP-1_30", 30)))
    d = c.step()
    assert c.status["phase"] == "Succeeded", c.status
    assert d.stop_sidecars == ("demo-1-0", "demo-1-1")
    assert not [r for r in d.delete if r.kind == "Pod"]  # the pods stay for their logs
    stopped = next(e for e in d.events if e.reason == "SidecarsStopped")
    assert "log-shipper" in stopped.message and "ranks 0, 1" in stopped.message, stopped.message


def test_sidecars_are_stopped_once() -> None:
    c = sidecar_cluster()
    with_sidecar(c.pods["demo-1-1"], ended(0, message("completed", 0, "CKP-1_30", 30)))
    d = c.decide()
    assert d.stop_sidecars == ("demo-1-1",)
    c.pods["demo-1-1"]["metadata"]["annotations"][ANNOTATION_SIDECARS_STOPPED] = "2026-01-01T12:00:00Z"
    assert c.decide().stop_sidecars == ()


def test_a_crashed_trainer_is_a_failure_though_its_sidecar_runs() -> None:
    c = sidecar_cluster()
    with_sidecar(c.pods["demo-1-1"], ended(1, message("error", 1)))
    d = c.step()
    assert c.status["phase"] == "Stopping" and c.status["restarts"] == 1, c.status
    assert [r.name for r in d.delete] == ["demo-1-0"]  # the live rank; rank 1's sidecar is stopped instead
    assert d.stop_sidecars == ("demo-1-1",)


def test_pods_the_decision_deletes_get_no_sidecar_stop() -> None:
    c = sidecar_cluster()
    with_sidecar(c.pods["demo-1-1"], ended(0, message("completed", 0, "CKP-1_30", 30)))
    c.pods["demo-1-1"]["metadata"]["deletionTimestamp"] = "2026-01-01T11:59:59Z"
    assert c.decide().stop_sidecars == ()


def test_the_deadline_that_stopped_the_sidecars_is_not_the_ranks_end() -> None:
    # the kubelet ends the pod Failed/DeadlineExceeded; the trainer had been SIGKILLed on a cordoned node first
    p = with_sidecar(pod("demo", 1, 0, node="node-a", status_reason="DeadlineExceeded"), ended(137), "terminated")
    p["status"]["phase"] = "Failed"
    cordoned = view(p)
    p["metadata"]["annotations"][ANNOTATION_SIDECARS_STOPPED] = "2026-01-01T12:00:00Z"
    n = NodeView.from_dict(node("node-a", unschedulable=True))
    assert classify(view(p), n).outcome is Outcome.KILLED
    # without the operator's mark a DeadlineExceeded is the user's activeDeadlineSeconds: a failure
    assert classify(cordoned, n).outcome is Outcome.CRASHED


def test_a_native_sidecar_needs_nothing_stopped() -> None:
    template = {"spec": {"initContainers": [{"name": "mesh", "image": "envoy", "restartPolicy": "Always"}],
                         "containers": [{"name": "train", "image": "python:3.11", "command": ["python"]}]}}
    c = Cluster(job_body(template=template))
    created = c.step()
    p = next(o for o in created.create if o["kind"] == "Pod")
    assert p["spec"]["initContainers"] == template["spec"]["initContainers"]
    c.run()
    c.step()
    for rank in (0, 1):  # the kubelet ends the sidecar with the pod, which is Succeeded
        c.exit(rank, 0, message("completed", 0, "CKP-1_30", 30))
        c.pods[f"demo-1-{rank}"]["status"]["initContainerStatuses"] = [
            {"name": "mesh", "state": {"terminated": {"exitCode": 143, "reason": "Error"}}}]
    d = c.step()
    assert c.status["phase"] == "Succeeded" and d.stop_sidecars == ()
