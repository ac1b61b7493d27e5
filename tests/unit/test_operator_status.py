"""``.status`` patches: what `kubectl get tj` can show depends on what is written."""

from __future__ import annotations

from test_operator_world import Cluster, job_body

from torpor_operator.status import JobStatus, merge_patch


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
