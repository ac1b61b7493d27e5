"""Sidecars beside the trainer, under examples/trainingjob.yaml with real torch ranks.

A regular sidecar (a log shipper, a service-mesh proxy) keeps a pod Running after its training
container has exited; a native sidecar (an init container with ``restartPolicy: Always``) is
stopped by the kubelet once the trainer has ended. Either way the job follows the container
``spec.containerName`` names, and no sidecar outlives its trainer. The node agent runs each
container as a process (``hack/nodeagent_pods.py``: native sidecars, ``activeDeadlineSeconds``).
What is asserted is what docs/operator.md's "Faults" table promises.
"""

from __future__ import annotations

import json
import textwrap
from typing import TYPE_CHECKING, Any

import pytest

from torpor_operator.observing import parse_time

if TYPE_CHECKING:  # the fixtures' types; conftest modules are not importable by name in one session
    from conftest import Env

pytestmark = pytest.mark.cluster

#: A sidecar that never ends by itself and flushes on SIGTERM, as a log shipper does.
SIDECAR = textwrap.dedent("""\
    import signal, sys, time
    def flush(*_):
        print("flushed on SIGTERM", flush=True)
        sys.exit(0)
    signal.signal(signal.SIGTERM, flush)
    print("shipping", flush=True)
    while True:
        time.sleep(0.1)
""")


def sidecar(name: str, **fields: Any) -> dict[str, Any]:
    return {"name": name, "image": "fluent-bit", "command": ["python", "-c", SIDECAR], **fields}


def states(pod: dict[str, Any], key: str = "containerStatuses") -> dict[str, dict[str, Any]]:
    return {c["name"]: c["state"] for c in pod["status"].get(key) or []}


def reasons_of(e2e: Env, uid: str) -> list[str]:
    events = e2e.get("events", "--field-selector", f"involvedObject.uid={uid}")
    return [e["reason"] for e in sorted(events["items"], key=lambda e: int(e["metadata"]["resourceVersion"]))]


def test_a_regular_sidecar_is_stopped_once_its_trainer_exits_and_the_job_succeeds(e2e: Env) -> None:
    body = e2e.example("--epochs", "1", "--step-delay", "0", containerName="train")
    body["spec"]["template"]["spec"]["containers"].append(sidecar("log-shipper"))
    e2e.create(body)
    status = e2e.wait_phase("Succeeded", timeout=240)
    assert (status.get("restarts", 0), status.get("preemptions", 0), status["incarnation"]) == (0, 0, 1), status

    def stopped() -> list[dict[str, Any]] | None:
        pods = e2e.pods()
        done = len(pods) == 2 and all("terminated" in s for p in pods for s in states(p).values())
        return pods if done else None

    pods = e2e.wait("every sidecar stopped", stopped, timeout=60)
    for pod in pods:
        trainer, shipper = states(pod)["train"]["terminated"], states(pod)["log-shipper"]["terminated"]
        assert (trainer["exitCode"], trainer["reason"]) == (0, "Completed"), trainer  # the trainer's own end, kept
        assert json.loads(trainer["message"])["reason"] == "completed", trainer  # the runtime's message
        assert shipper["exitCode"] == 0, shipper
        outlived = (parse_time(shipper["finishedAt"]) - parse_time(trainer["finishedAt"])).total_seconds()
        print(f"{pod['metadata']['name']}: log-shipper stopped {outlived:.0f}s after the trainer exited")
        assert outlived < 30, outlived  # the operator's next reconcile, then SIGTERM; not the 60 s grace period
        assert "flushed on SIGTERM" in e2e.agent.logs_path(pod, "log-shipper").read_text()  # stopped gracefully
        assert "torpor.dev/sidecars-stopped-at" in pod["metadata"]["annotations"], pod["metadata"]
        # the pod is kept for its logs; its phase is the kubelet's word for the deadline that stopped it
        assert (pod["status"]["phase"], pod["status"].get("reason")) == ("Failed", "DeadlineExceeded"), pod["status"]
        assert not pod["metadata"].get("deletionTimestamp")
    reasons = reasons_of(e2e, e2e.get("tj", "mlp")["metadata"]["uid"])
    assert "SidecarsStopped" in reasons and "RankFailed" not in reasons and "Preempted" not in reasons, reasons


def test_a_native_sidecar_ends_with_its_pod_and_the_job_succeeds(e2e: Env) -> None:
    body = e2e.example("--epochs", "1", "--step-delay", "0")
    body["spec"]["template"]["spec"]["initContainers"] = [sidecar("mesh-proxy", restartPolicy="Always")]
    e2e.create(body)
    status = e2e.wait_phase("Succeeded", timeout=240)
    assert (status.get("restarts", 0), status.get("preemptions", 0), status["incarnation"]) == (0, 0, 1), status
    for pod in e2e.pods():
        assert pod["status"]["phase"] == "Succeeded", pod["status"]
        assert states(pod)["train"]["terminated"]["exitCode"] == 0
        proxy = states(pod, "initContainerStatuses")["mesh-proxy"]["terminated"]
        assert proxy["exitCode"] == 0 and "flushed on SIGTERM" in e2e.agent.logs_path(pod, "mesh-proxy").read_text()
        assert "torpor.dev/sidecars-stopped-at" not in pod["metadata"].get("annotations", {})  # the kubelet's job
    reasons = reasons_of(e2e, e2e.get("tj", "mlp")["metadata"]["uid"])
    assert "RankFailed" not in reasons and "Preempted" not in reasons, reasons
