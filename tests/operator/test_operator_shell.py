"""The kopf shell against the real API server: decisions are applied, Events posted, and an
operator killed with SIGKILL carries on without duplicating anything.

No training here (that is the e2e tier): the pods carry a nodeSelector no node matches, so
they stay Pending and the operator's own actions are all there is to observe.
"""

from __future__ import annotations

import json
import socket
import urllib.request
from typing import Any

import pytest

from controlplane import ControlPlane, wait_for_condition
from operator_process import OperatorProcess

pytestmark = pytest.mark.cluster

UNSCHEDULABLE = {"torpor.dev/test": "never-scheduled"}


def job(bucket: str, name: str = "shell", **spec: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "apiVersion": "torpor.dev/v1alpha1",
        "kind": "TrainingJob",
        "metadata": {"name": name},
        "spec": {
            "replicas": 2,
            "template": {"spec": {"nodeSelector": UNSCHEDULABLE,
                                  "containers": [{"name": "train", "image": "python:3.11"}]}},
            "checkpoint": {"uri": f"s3://{bucket}/runs", "saveSteps": 10},
            "gracefulExit": {"exitDeadlineSeconds": 1, "drainProtection": True},
        },
    }
    body["spec"].update(spec)
    return body


class Kube:
    def __init__(self, cp: ControlPlane, namespace: str) -> None:
        self.cp, self.ns = cp, namespace

    def get(self, *what: str) -> Any:
        return json.loads(self.cp.kubectl("get", "-n", self.ns, *what, "-o", "json").stdout)

    def status(self, name: str = "shell") -> dict[str, Any]:
        return self.get("tj", name).get("status", {})

    def names(self, kind: str) -> list[str]:
        names = (o["metadata"]["name"] for o in self.get(kind)["items"])
        return sorted(n for n in names if n != "kube-root-ca.crt")

    def reasons(self) -> list[str]:
        events = self.get("events", "--field-selector", "involvedObject.kind=TrainingJob")["items"]
        # in the order written: timestamps have whole seconds, resource versions of one etcd increase
        return [e["reason"] for e in sorted(events, key=lambda e: int(e["metadata"]["resourceVersion"]))]

    def patch(self, spec: dict[str, Any], name: str = "shell") -> None:
        self.cp.kubectl("patch", "-n", self.ns, "tj", name, "--type=merge", "-p", json.dumps({"spec": spec}))

    def wait(self, what: str, predicate: Any, timeout: float = 60) -> Any:
        return wait_for_condition(predicate, timeout=timeout, what=what)


def test_children_suspend_resume_and_events(control_plane: ControlPlane, namespace: str, s3_bucket: str,
                                            operator_process: OperatorProcess) -> None:
    k = Kube(control_plane, namespace)
    control_plane.kubectl("create", "-n", namespace, "-f", "-", input=json.dumps(job(s3_bucket)))
    k.wait("incarnation 1", lambda: k.status().get("phase") == "Pending" and len(k.names("pods")) == 2)
    assert k.names("pods") == ["shell-1-0", "shell-1-1"]
    assert k.names("services") == ["shell-1"]
    assert k.names("configmaps") == ["shell-1-exit"]
    assert k.names("pdb") == ["shell-1"]
    pod = k.get("pod", "shell-1-1")
    env = {e["name"]: e.get("value") for e in pod["spec"]["containers"][0]["env"]}
    assert (env["RANK"], env["WORLD_SIZE"], env["MASTER_ADDR"]) == ("1", "2", "shell-1-0.shell-1")
    assert env["TORPOR_CHECKPOINT_URI"] == f"s3://{s3_bucket}/runs/{namespace}/shell"
    assert pod["metadata"]["ownerReferences"][0]["kind"] == "TrainingJob"
    assert k.status()["ready"] == "0/2"

    k.patch({"suspend": True})
    k.wait("Suspended", lambda: k.status().get("phase") == "Suspended")
    # the Service, the ConfigMap and the PDB are released; pods past the exit deadline are deleted
    assert k.names("services") == [] and k.names("configmaps") == [] and k.names("pdb") == []
    k.wait("annotated pods deleted", lambda: k.names("pods") == [])

    k.patch({"suspend": False})
    k.wait("incarnation 2", lambda: k.status().get("incarnation") == 2 and len(k.names("pods")) == 2)
    assert k.names("pods") == ["shell-2-0", "shell-2-1"]
    assert k.status()["phase"] == "Pending"
    k.wait("events", lambda: k.reasons()[-1:] == ["Resumed"])
    assert k.reasons() == ["Started", "Suspending", "ExitDeadlineExceeded", "Suspended", "Resumed"]
    assert k.status().get("preemptions", 0) == 0 and k.status().get("restarts", 0) == 0


def test_a_killed_operator_recreates_nothing_twice(control_plane: ControlPlane, namespace: str, s3_bucket: str,
                                                   operator_process: OperatorProcess) -> None:
    k = Kube(control_plane, namespace)
    control_plane.kubectl("create", "-n", namespace, "-f", "-", input=json.dumps(job(s3_bucket, "again")))
    k.wait("pods", lambda: len(k.names("pods")) == 2 and k.status("again").get("phase") == "Pending")
    operator_process.kill()
    uids = {p["metadata"]["name"]: p["metadata"]["uid"] for p in k.get("pods")["items"]}
    control_plane.kubectl("delete", "-n", namespace, "pod", "again-1-1", "--wait=true")
    control_plane.kubectl("delete", "-n", namespace, "configmap", "again-1-exit")
    operator_process.start()
    k.wait("rank 1 recreated", lambda: "again-1-1" in k.names("pods") and "again-1-exit" in k.names("configmaps"))
    pods = {p["metadata"]["name"]: p["metadata"]["uid"] for p in k.get("pods")["items"]}
    assert sorted(pods) == ["again-1-0", "again-1-1"]
    assert pods["again-1-0"] == uids["again-1-0"]  # the surviving rank was not replaced
    status = k.status("again")
    assert (status["phase"], status["incarnation"]) == ("Pending", 1)
    assert [r for r in k.reasons() if r == "Started"] == ["Started"]


def test_deleting_the_job_deletes_its_children(control_plane: ControlPlane, namespace: str, s3_bucket: str,
                                               operator_process: OperatorProcess) -> None:
    k = Kube(control_plane, namespace)
    control_plane.kubectl("create", "-n", namespace, "-f", "-", input=json.dumps(job(s3_bucket, "gone")))
    k.wait("children", lambda: len(k.names("pods")) == 2 and k.names("services") == ["gone-1"])
    control_plane.kubectl("delete", "-n", namespace, "tj", "gone", "--wait=true", timeout=60)
    k.wait("garbage collection", lambda: k.names("pods") == [] and k.names("services") == []
           and k.names("configmaps") == [] and k.names("pdb") == [], timeout=90)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_liveness_and_metrics_endpoints(control_plane: ControlPlane, namespace: str, s3_bucket: str,
                                        operator_process: OperatorProcess) -> None:
    operator_process.stop()
    health, metrics = _free_port(), _free_port()
    operator_process.env.update(TORPOR_HEALTH_PORT=str(health), TORPOR_METRICS_PORT=str(metrics))
    operator_process.start()
    k = Kube(control_plane, namespace)
    control_plane.kubectl("create", "-n", namespace, "-f", "-", input=json.dumps(job(s3_bucket, "probed")))
    k.wait("Pending", lambda: k.status("probed").get("phase") == "Pending")

    def get(port: int, path: str) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as resp:
            assert resp.status == 200
            return resp.read().decode()

    wait_for_condition(lambda: get(health, "/healthz"), timeout=30, what="/healthz")
    def pending_counted() -> str | None:
        text = get(metrics, "/metrics")
        return text if 'torpor_trainingjobs{phase="Pending"} 1.0' in text else None

    text = wait_for_condition(pending_counted, timeout=30, what="the Pending job in /metrics")
    assert "torpor_reconcile_seconds_count" in text
