"""The operator SIGKILLed in the middle of a transition, then started again: the job finishes
the transition, with one pod per rank and incarnation and every count made once."""

from __future__ import annotations

import threading
from collections import Counter
from typing import TYPE_CHECKING, Any

import pytest
from kubernetes import client, watch

if TYPE_CHECKING:  # the fixtures' types; conftest modules are not importable by name in one session
    from conftest import Env


pytestmark = pytest.mark.cluster

#: A restart waits 5 s after a crash, so the operator can be killed in Restarting.
OPERATOR_ENV = {"TORPOR_BACKOFF_BASE_SECONDS": "5"}


class KillOnPhase:
    """Watches one TrainingJob and SIGKILLs the operator the moment it writes ``phase``.

    A watch reacts within milliseconds; the ranks need a step boundary and a save to exit,
    so the operator dies with the transition under way (asserted by the tests).
    """

    def __init__(self, e2e: Env, kube: client.ApiClient, phase: str, name: str = "mlp") -> None:
        self.e2e, self.phase, self.name = e2e, phase, name
        self.api = client.CustomObjectsApi(kube)
        self.killed: dict[str, Any] | None = None
        self._watch = watch.Watch()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        stream = self._watch.stream(self.api.list_namespaced_custom_object, "torpor.dev", "v1alpha1", self.e2e.ns,
                                    "trainingjobs", field_selector=f"metadata.name={self.name}", timeout_seconds=300)
        for event in stream:
            status = event["object"].get("status") or {}
            if status.get("phase") == self.phase:
                self.e2e.op.kill()
                self.killed = status
                self._watch.stop()
                return

    def wait(self, timeout: float = 150) -> dict[str, Any]:
        self._thread.join(timeout)
        assert self.killed is not None, f"the job never reached {self.phase}"
        return self.killed


def pods_per_rank(e2e: Env) -> Counter[tuple[str, str]]:
    labels = (p["metadata"]["labels"] for p in e2e.pods())
    return Counter((lb["torpor.dev/incarnation"], lb["torpor.dev/rank"]) for lb in labels)


def test_operator_killed_while_stopping_finishes_the_preemption_once(e2e: Env, kube: client.ApiClient) -> None:
    # a step takes 2 s: the ranks need a step boundary, a save and an exit before the
    # operator could move on, and the watch kills it within milliseconds of "Stopping"
    e2e.create(e2e.example("--losses", str(e2e.losses()), "--step-delay", "2"))
    e2e.wait_phase("Running", timeout=120)
    killer = KillOnPhase(e2e, kube, "Stopping")
    e2e.cordon(e2e.node_of("mlp-1-0"))
    killed = killer.wait()
    assert (killed["stopReason"], killed["preemptions"], killed["incarnation"]) == ("Preemption", 1, 1)
    assert e2e.status()["phase"] == "Stopping"  # nobody moved it on
    # the ranks save and exit while the operator is away
    e2e.wait("ranks ended", lambda: len(e2e.pods()) == 2 and all(e2e.terminated(p) for p in e2e.pods()),
             timeout=60)
    saved = {s["rank"]: s["step"] for s in e2e.steps()}
    assert saved[0] == saved[1]
    before = len(e2e.steps())

    e2e.op.start()
    status = e2e.wait_phase("Running", incarnation=2, timeout=120)
    assert (status["preemptions"], status["restarts"]) == (1, 0)
    assert pods_per_rank(e2e) == {("2", "0"): 1, ("2", "1"): 1}
    # the exit save of incarnation 1, under its own name ({file_name}-{epoch}_{step})
    resumed = next(c for c in e2e.checkpoints() if c.name == status["resumeFrom"])
    assert resumed.name.startswith("Net-") and resumed.step == saved[0]
    e2e.wait("incarnation 2 trains", lambda: len(e2e.steps()) >= before + 2, timeout=60)
    assert {s["rank"]: s["step"] for s in e2e.steps()[before:][::-1]} == {0: saved[0] + 1, 1: saved[0] + 1}
    assert e2e.reasons().count("Restarted") == 1


def test_operator_killed_while_restarting_starts_one_incarnation(e2e: Env, kube: client.ApiClient) -> None:
    e2e.create(e2e.example("--losses", str(e2e.losses()), "--step-delay", "0.05", maxRestarts=3))
    e2e.wait_phase("Running", timeout=120)
    e2e.wait("a periodic checkpoint", lambda: e2e.status().get("lastCheckpoint"), timeout=120)
    killer = KillOnPhase(e2e, kube, "Restarting")
    e2e.break_losses()
    killed = killer.wait()
    assert (killed["restarts"], killed["incarnation"]) == (1, 1)
    assert e2e.status()["phase"] == "Restarting"
    e2e.losses().rmdir()

    e2e.op.start()
    status = e2e.wait_phase("Running", incarnation=2, timeout=120)
    assert (status["restarts"], status.get("preemptions", 0)) == (1, 0)
    assert pods_per_rank(e2e) == {("2", "0"): 1, ("2", "1"): 1}
    e2e.wait("incarnation 2 trains", lambda: len(e2e.steps()) >= 2)
    assert e2e.reasons().count("Restarted") == 1
