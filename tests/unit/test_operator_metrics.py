"""Metrics follow the decisions the operator applies."""

from __future__ import annotations

from prometheus_client import CollectorRegistry

from torpor_operator.metrics import Metrics
from torpor_operator.reconciling import Decision


def value(registry: CollectorRegistry, name: str, **labels: str) -> float | None:
    return registry.get_sample_value(name, labels or None)


def test_counts_and_phases() -> None:
    registry = CollectorRegistry()
    m = Metrics(registry)
    m.observe("ns/a", Decision(status={"phase": "Pending"}), None)
    m.observe("ns/b", Decision(status={"phase": "Stopping", "preemptions": 1}), "Running")
    m.observe("ns/c", Decision(status={"phase": "Stopping", "restarts": 2}), "Running")
    m.observe("ns/a", Decision(), "Running")
    assert value(registry, "torpor_preemptions_total") == 1
    assert value(registry, "torpor_restarts_total") == 1
    assert value(registry, "torpor_trainingjobs", phase="Stopping") == 2
    assert value(registry, "torpor_trainingjobs", phase="Running") == 1
    assert value(registry, "torpor_trainingjobs", phase="Pending") == 0
    m.set_phase("ns/b", None)
    assert value(registry, "torpor_trainingjobs", phase="Stopping") == 1
