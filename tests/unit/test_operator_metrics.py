"""Metrics follow the decisions the operator applies."""

from __future__ import annotations

from prometheus_client import CollectorRegistry
from test_operator_world import Cluster, job_body, node

from torpor_operator.metrics import Metrics
from torpor_operator.reconciling import Decision
from torpor_operator.status import JobStatus


def value(registry: CollectorRegistry, name: str, **labels: str) -> float | None:
    return registry.get_sample_value(name, labels or None)


def test_counts_and_phases() -> None:
    registry = CollectorRegistry()
    m = Metrics(registry)
    running = JobStatus(phase="Running", restarts=1)
    m.observe("ns/a", Decision(status={"phase": "Pending"}), JobStatus())
    m.observe("ns/b", Decision(status={"phase": "Stopping", "preemptions": 1}), running)
    m.observe("ns/c", Decision(status={"phase": "Stopping", "restarts": 2}), running)
    m.observe("ns/a", Decision(), JobStatus(phase="Running"))
    assert value(registry, "torpor_preemptions_total") == 1
    assert value(registry, "torpor_restarts_total") == 1
    assert value(registry, "torpor_trainingjobs", phase="Stopping") == 2
    assert value(registry, "torpor_trainingjobs", phase="Running") == 1
    assert value(registry, "torpor_trainingjobs", phase="Pending") == 0
    m.set_phase("ns/b", None)
    assert value(registry, "torpor_trainingjobs", phase="Stopping") == 1


def test_a_new_job_counts_no_preemption_and_no_restart() -> None:
    """The first status patch carries ``restarts: 0`` and ``preemptions: 0`` (so ``kubectl get tj``
    shows zeros): a key in the patch is not a transition."""
    registry = CollectorRegistry()
    m = Metrics(registry)
    c = Cluster(job_body())
    before = c.job.status
    d = c.step()
    assert d.status is not None and d.status["preemptions"] == 0 and d.status["restarts"] == 0
    m.observe("team/demo", d, before)
    assert value(registry, "torpor_preemptions_total") == 0
    assert value(registry, "torpor_restarts_total") == 0


def test_counters_follow_the_status_counters_of_a_real_history() -> None:
    registry = CollectorRegistry()
    m = Metrics(registry)
    c = Cluster(job_body())

    def step() -> None:
        before = c.job.status
        m.observe("team/demo", c.step(), before)

    step()
    c.run(node_for={0: "node-a", 1: "node-b"})
    step()
    c.nodes["node-b"] = node("node-b", unschedulable=True)
    step()
    assert c.status["preemptions"] == 1
    step()  # deciding again on the same state counts nothing
    assert value(registry, "torpor_preemptions_total") == 1
    assert value(registry, "torpor_restarts_total") == 0
