"""``.status`` patches: what `kubectl get tj` can show depends on what is written."""

from __future__ import annotations

from datetime import UTC, datetime

from test_operator_world import Cluster, job_body

from torpor_operator.status import JobStatus, invalid_spec, merge_patch


def test_the_first_status_patch_writes_zero_counters() -> None:
    # printer columns show blanks for absent fields: 0 restarts must be written as 0
    d = Cluster(job_body()).decide()
    assert d.status is not None
    assert (d.status["restarts"], d.status["preemptions"], d.status["readyReplicas"]) == (0, 0, 0)


def test_the_first_status_patch_of_a_job_born_suspended_writes_zero_counters() -> None:
    d = Cluster(job_body(suspend=True)).decide()
    assert d.status is not None and d.status["phase"] == "Suspended"
    assert (d.status["restarts"], d.status["preemptions"]) == (0, 0)


def test_later_patches_carry_only_what_changed() -> None:
    old = JobStatus(phase="Pending", incarnation=1, ready="0/2")
    new = JobStatus(phase="Running", incarnation=1, ready="2/2", ready_replicas=2)
    assert merge_patch(old, new) == {"phase": "Running", "ready": "2/2", "readyReplicas": 2}
    assert merge_patch(new, new) is None


def test_an_invalid_spec_is_recorded_once_per_problem_and_generation() -> None:
    now = datetime(2026, 11, 24, 5, 0, tzinfo=UTC)
    first = invalid_spec(JobStatus(), "spec.replicas: must be >= 1, got 0", 3, now)
    assert first is not None
    ready = first.condition("Ready")
    assert ready is not None
    assert (ready.status, ready.reason, ready.message, first.observed_generation) == (
        "False", "InvalidSpec", "spec.replicas: must be >= 1, got 0", 3)
    assert invalid_spec(first, "spec.replicas: must be >= 1, got 0", 3, now) is None  # no second Event
    assert invalid_spec(first, "spec.replicas: must be >= 1, got 0", 4, now) is not None  # edited again
    other = invalid_spec(first, "spec.checkpoint.keepMax: must be >= 1, got 0", 3, now)
    assert other is not None and other.condition("Ready").message.startswith("spec.checkpoint.keepMax")
    assert merge_patch(JobStatus(), first) == {"conditions": [ready.to_dict()], "observedGeneration": 3}
