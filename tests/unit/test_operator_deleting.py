"""deleteOnJobDeletion stops the ranks before the prefix goes (issue 12, item 12)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from torpor_operator.decisions import ObjectRef
from torpor_operator.deleting import stop_ranks

NOW = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)


def pod(name: str, uid: str = "job-uid", node: str = "node-a", deleting: bool = False) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name, "ownerReferences": [{"kind": "TrainingJob", "uid": uid}]}
    if deleting:
        meta["deletionTimestamp"] = "2026-01-01T11:59:50Z"
    return {"metadata": meta, "spec": {"nodeName": node}}


def node(name: str, lost_for: float | None = None) -> dict[str, Any]:
    ready = {"type": "Ready", "status": "True"}
    if lost_for is not None:
        ready = {"type": "Ready", "status": "Unknown",
                 "lastTransitionTime": (NOW - timedelta(seconds=lost_for)).strftime("%Y-%m-%dT%H:%M:%SZ")}
    return {"metadata": {"name": name}, "spec": {}, "status": {"conditions": [ready]}}


def test_running_ranks_are_deleted_with_their_grace_period_and_waited_for() -> None:
    step = stop_ranks("job-uid", [pod("mlp-1-0"), pod("mlp-1-1")], {"node-a": node("node-a")}, NOW, 30)
    assert step.delete == (ObjectRef("v1", "Pod", "mlp-1-0"), ObjectRef("v1", "Pod", "mlp-1-1"))
    assert step.remaining == ("mlp-1-0", "mlp-1-1")


def test_a_deleting_rank_is_waited_for_not_deleted_again() -> None:
    step = stop_ranks("job-uid", [pod("mlp-1-0", deleting=True)], {}, NOW, 30)
    assert step.delete == () and step.remaining == ("mlp-1-0",)


def test_nothing_left_means_the_checkpoints_may_go() -> None:
    assert stop_ranks("job-uid", [], {}, NOW, 30).remaining == ()


def test_pods_of_another_job_of_the_same_name_are_not_touched_nor_waited_for() -> None:
    step = stop_ranks("job-uid", [pod("mlp-1-0", uid="earlier-job")], {}, NOW, 30)
    assert step.delete == () and step.remaining == ()


def test_a_rank_on_a_node_gone_for_good_is_force_deleted() -> None:
    nodes = {"lost": node("lost", lost_for=45), "blinked": node("blinked", lost_for=5)}
    step = stop_ranks("job-uid", [pod("mlp-1-0", node="lost", deleting=True),
                                  pod("mlp-1-1", node="blinked", deleting=True)], nodes, NOW, 30)
    assert step.delete == (ObjectRef("v1", "Pod", "mlp-1-0", grace_period_seconds=0),)
    assert step.remaining == ("mlp-1-0", "mlp-1-1")
