"""Faults of the Kubernetes API under a running operator (issue 12, items 1 and 2): the API server
restarted in the middle of a transition, and pod creation refused by a ResourceQuota.

Real control plane, node agent, MinIO and ``examples/train.py`` ranks; the operator is the
module's ``python -m torpor_operator``.
"""

from __future__ import annotations

import json
import threading
import urllib.request
from collections import Counter
from typing import TYPE_CHECKING, Any

import pytest
from kubernetes import client, watch

from processes import free_port
from torpor.checkpoints import Reason

if TYPE_CHECKING:  # the fixtures' types; conftest modules are not importable by name in one session
    from conftest import Env

pytestmark = pytest.mark.cluster

HEALTH_PORT = free_port()
#: Retries of a refused create start at 1 s and stay within 4 s, so raising the quota is seen soon.
OPERATOR_ENV = {"TORPOR_HEALTH_PORT": str(HEALTH_PORT), "TORPOR_API_RETRY_BASE_SECONDS": "1",
                "TORPOR_API_RETRY_MAX_SECONDS": "4"}


def pods_per_rank(e2e: Env) -> Counter[tuple[str, str]]:
    labels = (p["metadata"]["labels"] for p in e2e.pods())
    return Counter((lb["torpor.dev/incarnation"], lb["torpor.dev/rank"]) for lb in labels)


def healthy() -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{HEALTH_PORT}/healthz", timeout=5) as response:
            return response.status == 200
    except OSError:
        return False


class PhaseSeen:
    """Watches one TrainingJob and sets :attr:`seen` the moment its status says ``phase``."""

    def __init__(self, e2e: Env, kube: client.ApiClient, phase: str, name: str = "mlp") -> None:
        self.e2e, self.phase, self.name = e2e, phase, name
        self.api = client.CustomObjectsApi(kube)
        self.seen = threading.Event()
        self.status: dict[str, Any] = {}
        self._watch = watch.Watch()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        stream = self._watch.stream(self.api.list_namespaced_custom_object, "torpor.dev", "v1alpha1", self.e2e.ns,
                                    "trainingjobs", field_selector=f"metadata.name={self.name}", timeout_seconds=300)
        for event in stream:
            status = event["object"].get("status") or {}
            if status.get("phase") == self.phase:
                self.status = status
                self.seen.set()
                self._watch.stop()
                return

    def wait(self, timeout: float = 150) -> dict[str, Any]:
        assert self.seen.wait(timeout), f"the job never reached {self.phase}"
        return self.status


def test_kube_apiserver_restarted_during_a_preemption_finishes_it_once(e2e: Env, kube: client.ApiClient) -> None:
    e2e.create(e2e.example("--losses", str(e2e.losses()), "--step-delay", "0.2"))
    e2e.wait_phase("Running", timeout=120)
    e2e.wait("a periodic checkpoint", lambda: e2e.status().get("lastCheckpoint"), timeout=120)
    stopping = PhaseSeen(e2e, kube, "Stopping")
    e2e.cordon(e2e.node_of("mlp-1-0"))
    stopping.wait()

    def saved_on_exit() -> bool:
        return any(c.complete and {m.reason for m in c.manifests.values()} == {Reason.EXIT}
                   for c in e2e.checkpoints())

    # the API server goes away within milliseconds of "Stopping" and stays away until the ranks have
    # saved and exited: every reconcile of the transition (pods ended, Restarting, incarnation 2)
    # and every retention pass meets a refused connection
    e2e.cp.restart_apiserver(down=lambda: e2e.wait("the exit save, while the API server is away", saved_on_exit,
                                                   timeout=120))

    status = e2e.wait_phase("Running", incarnation=2, timeout=180)
    assert (status["preemptions"], status["restarts"]) == (1, 0)
    # one pod per rank of incarnation 2; those of incarnation 1 are deleted as it starts
    one_set = {("2", "0"): 1, ("2", "1"): 1}
    e2e.wait("one pod per rank", lambda: pods_per_rank(e2e) == one_set, timeout=60)
    # "Preempted" is posted right after the status patch that the API server's stop may follow
    # within milliseconds: it may be lost (Events are best effort), never doubled
    assert e2e.reasons().count("Restarted") == 1 and e2e.reasons().count("Preempted") <= 1
    resumed = status["lastCheckpoint"]["step"]
    # the retention/resync task outlived the outage: lastCheckpoint moves on with new periodic saves
    # (only that task refreshes it while Running)
    e2e.wait("lastCheckpoint refreshed after the outage",
             lambda: e2e.status().get("lastCheckpoint", {}).get("step", 0) > resumed, timeout=120)
    assert healthy()
    assert e2e.status()["incarnation"] == 2 and pods_per_rank(e2e) == one_set


def test_resource_quota_refusing_a_rank_tears_the_incarnation_down_until_raised(e2e: Env) -> None:
    quota = {"apiVersion": "v1", "kind": "ResourceQuota", "metadata": {"name": "one-pod"},
             "spec": {"hard": {"pods": "1"}}}
    e2e.kubectl("create", "-f", "-", input=json.dumps(quota))
    e2e.wait("the quota counted", lambda: e2e.get("resourcequota", "one-pod").get("status", {}).get("hard"))
    e2e.create(e2e.example("--losses", str(e2e.losses()), "--step-delay", "0.2"))

    def refused() -> dict[str, Any] | None:
        ready = next((c for c in e2e.status().get("conditions", []) if c["type"] == "Ready"), None)
        return ready if ready and ready["reason"] == "CreateFailed" else None

    ready = e2e.wait("Ready=False CreateFailed", refused, timeout=90)
    assert ready["status"] == "False"
    assert "exceeded quota: one-pod" in ready["message"], ready

    # the refused incarnation is torn down: rank 0 does not wait in the rendezvous holding the
    # quota. Each retry below makes a new rank 0 (and tears it down the same way) at growing
    # intervals; the quota's `used` is recounted by the controller-manager only some time after a
    # deletion, so "no pod and used 0" at one instant raced the retries on a loaded machine:
    # awaited apart.
    e2e.wait("no rank of the refused incarnation left", lambda: not e2e.pods(), timeout=60)
    e2e.wait("the quota released", lambda: e2e.get("resourcequota", "one-pod").get("status", {}).get(
        "used", {}).get("pods") == "0", timeout=60)
    # retried with backoff, and one Warning per distinct error (not one per retry)
    e2e.wait("a few retries", lambda: e2e.op.log().count(f"{e2e.ns}/mlp: pods \"mlp-1-") >= 3,
             timeout=60)
    assert e2e.reasons().count("CreateFailed") == 1, e2e.reasons()

    raised = {"spec": {"hard": {"pods": "2"}}}
    e2e.kubectl("patch", "resourcequota", "one-pod", "--type=merge", "-p", json.dumps(raised))
    status = e2e.wait_phase("Running", timeout=120)
    assert (status["incarnation"], status["restarts"], status["preemptions"]) == (1, 0, 0)
    assert pods_per_rank(e2e) == {("1", "0"): 1, ("1", "1"): 1}
    ready = next(c for c in status["conditions"] if c["type"] == "Ready")
    assert (ready["status"], ready["reason"]) == ("True", "Running")
    e2e.wait("both ranks train", lambda: {s["rank"] for s in e2e.steps()} == {0, 1}, timeout=60)
