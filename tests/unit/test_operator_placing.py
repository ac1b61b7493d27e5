"""Which nodes a rank is kept off, and a Pending rank made again once such a node is back
(issue 12, item 7; pure, no cluster)."""

from __future__ import annotations

from typing import Any

import pytest
from test_operator_world import Cluster, job_body, node

from torpor_operator.contract import ANNOTATION_AVOIDED_NODES
from torpor_operator.observing import NodeView
from torpor_operator.placing import node_change, nodes_back, nodes_to_avoid, tolerates
from torpor_operator.reconciling import ObjectRef
from torpor_operator.settings import DEFAULT_TERMINATION_TAINTS

TOLERATE_ALL = [{"operator": "Exists"}]
SPOT = "cloud.google.com/impending-node-termination"


def body(tolerations: list[dict[str, Any]] | None = None, **spec: Any) -> dict[str, Any]:
    pod_spec: dict[str, Any] = {"containers": [{"name": "train", "image": "python:3.11"}]}
    if tolerations is not None:
        pod_spec["tolerations"] = tolerations
    return job_body(template={"spec": pod_spec}, **spec)


def kept_off(p: dict[str, Any]) -> list[str]:
    """The node names the pod's required node affinity excludes."""
    affinity = (p["spec"].get("affinity") or {}).get("nodeAffinity") or {}
    terms = (affinity.get("requiredDuringSchedulingIgnoredDuringExecution") or {}).get("nodeSelectorTerms") or []
    return sorted({v for t in terms for f in t.get("matchFields") or [] if f["operator"] == "NotIn"
                   for v in f["values"]})


def launched(c: Cluster) -> list[dict[str, Any]]:
    d = c.step()
    return [o for o in d.create if o["kind"] == "Pod"]


# --- the list: only nodes going away now, and only where the scheduler would not keep off ----


def test_a_cordoned_node_the_scheduler_keeps_off_by_itself_is_not_listed() -> None:
    """A cordon keeps every pod that does not tolerate ``node.kubernetes.io/unschedulable`` off:
    naming the node too would only keep it off for good."""
    c = Cluster(body())
    c.nodes["node-b"] = node("node-b", unschedulable=True)
    pods = launched(c)
    assert [kept_off(p) for p in pods] == [[], []]
    assert all(ANNOTATION_AVOIDED_NODES not in p["metadata"]["annotations"] for p in pods)
    assert all("affinity" not in p["spec"] for p in pods)


def test_a_cordoned_node_is_avoided_when_the_template_tolerates_it() -> None:
    c = Cluster(body(TOLERATE_ALL))
    c.nodes["node-b"] = node("node-b", unschedulable=True)
    c.nodes["node-c"] = node("node-c")
    pods = launched(c)
    assert [kept_off(p) for p in pods] == [["node-b"], ["node-b"]]
    assert {p["metadata"]["annotations"][ANNOTATION_AVOIDED_NODES] for p in pods} == {"node-b"}


def test_a_soft_termination_taint_is_avoided_since_the_scheduler_allows_it() -> None:
    c = Cluster(body())
    c.nodes["node-b"] = node("node-b")
    c.nodes["node-b"]["spec"]["taints"] = [{"key": SPOT, "effect": "PreferNoSchedule"}]
    c.nodes["node-c"] = node("node-c", taints=(SPOT,))  # NoSchedule: the scheduler keeps off
    assert [kept_off(p) for p in launched(c)] == [["node-b"], ["node-b"]]


def test_a_lost_node_is_avoided_by_a_template_that_tolerates_its_taints() -> None:
    c = Cluster(body(TOLERATE_ALL))
    c.nodes["node-b"] = node("node-b", ready="Unknown", taints=("node.kubernetes.io/unreachable",))
    assert [kept_off(p) for p in launched(c)] == [["node-b"], ["node-b"]]


def test_healthy_nodes_are_never_listed() -> None:
    c = Cluster(body(TOLERATE_ALL))
    assert [kept_off(p) for p in launched(c)] == [[], []]


@pytest.mark.parametrize(
    ("toleration", "taint", "expected"),
    [
        ({"operator": "Exists"}, ("k", "v", "NoSchedule"), True),
        ({"key": "k", "operator": "Exists"}, ("k", "v", "NoExecute"), True),
        ({"key": "k", "operator": "Exists", "effect": "NoExecute"}, ("k", "v", "NoSchedule"), False),
        ({"key": "k", "value": "v"}, ("k", "v", "NoSchedule"), True),  # operator defaults to Equal
        ({"key": "k", "operator": "Equal", "value": "w"}, ("k", "v", "NoSchedule"), False),
        ({"key": "other", "operator": "Exists"}, ("k", "", "NoSchedule"), False),
        ({"key": "k", "operator": "Equal"}, ("k", "", "NoSchedule"), True),
    ],
)
def test_tolerations_match_taints_as_the_scheduler_does(toleration: dict[str, str], taint: tuple[str, str, str],
                                                        expected: bool) -> None:
    assert tolerates([toleration], *taint) is expected


def test_nodes_to_avoid_and_nodes_back_over_views() -> None:
    views = {n["metadata"]["name"]: NodeView.from_dict(n) for n in (
        node("a", unschedulable=True), node("b", taints=("ToBeDeletedByClusterAutoscaler",)), node("c"))}
    assert nodes_to_avoid(views.values(), TOLERATE_ALL, DEFAULT_TERMINATION_TAINTS) == ["a", "b"]
    assert nodes_to_avoid(views.values(), [], DEFAULT_TERMINATION_TAINTS) == []
    # c is healthy, a still cordoned, d unknown (deleted: nothing to come back to)
    assert nodes_back(["a", "c", "d"], views, DEFAULT_TERMINATION_TAINTS) == ["c"]


@pytest.mark.parametrize(
    ("before", "after", "expected"),
    [
        (None, node("n"), None),  # the first sight of a healthy node
        (None, node("n", unschedulable=True), "away"),
        (node("n"), node("n", unschedulable=True), "away"),
        (node("n", unschedulable=True), node("n", unschedulable=True), None),  # a heartbeat
        (node("n", unschedulable=True), node("n", ready="Unknown"), "away"),  # another reason
        (node("n", unschedulable=True), node("n"), "back"),  # uncordoned
        (node("n", taints=(SPOT,)), node("n"), "back"),
        (node("n", ready="False"), node("n"), "back"),
        (node("n"), node("n", taints=("example.com/unlisted",)), None),
    ],
    ids=["first-healthy", "first-cordoned", "cordoned", "still-cordoned", "then-lost", "uncordoned", "untainted",
         "ready-again", "unlisted-taint"],
)
def test_node_events_that_reach_jobs(before: dict[str, Any] | None, after: dict[str, Any],
                                     expected: str | None) -> None:
    """``away`` reaches the jobs with ranks on the node, ``back`` those with Pending ranks kept off it."""
    view = NodeView.from_dict(before) if before else None
    assert node_change(view, NodeView.from_dict(after), DEFAULT_TERMINATION_TAINTS) == expected


# --- a Pending rank kept off a node that came back ----------------------------------------------


def kept_pending() -> Cluster:
    """Incarnation 1 of a job tolerating everything, made while node-b was cordoned: rank 0 runs
    on node-a, rank 1 is Pending, unscheduled (say, one rank per node)."""
    c = Cluster(body(TOLERATE_ALL))
    c.nodes["node-b"] = node("node-b", unschedulable=True)
    c.step()
    c.run(node_for={0: "node-a"})
    c.pods["demo-1-1"]["status"] = {"phase": "Pending"}
    c.pods["demo-1-1"]["spec"].pop("nodeName", None)
    c.step()
    assert c.status["phase"] == "Pending" and kept_off(c.pods["demo-1-1"]) == ["node-b"]
    return c


def test_a_pending_rank_kept_off_a_node_that_came_back_is_made_again_without_it() -> None:
    c = kept_pending()
    assert c.decide().empty  # node-b still cordoned: nothing to do
    c.nodes["node-b"] = node("node-b")  # uncordoned
    d = c.step()
    assert d.delete == (ObjectRef("v1", "Pod", "demo-1-1", grace_period_seconds=0),)
    assert [(e.type, e.reason) for e in d.events] == [("Normal", "RankRecreated")]
    assert "node-b" in d.events[0].message and "rank 1" in d.events[0].message
    assert not d.create and c.status["phase"] == "Pending"
    c.vanish_deleted()
    d = c.step()
    (again,) = [o for o in d.create if o["kind"] == "Pod"]
    assert again["metadata"]["name"] == "demo-1-1" and kept_off(again) == []
    assert ANNOTATION_AVOIDED_NODES not in again["metadata"]["annotations"]
    c.run(node_for={1: "node-b"})
    c.step()
    assert c.status["phase"] == "Running" and c.status["incarnation"] == 1
    assert (c.status.get("restarts", 0), c.status.get("preemptions", 0), c.status.get("admissionRejections", 0)) == (
        0, 0, 0)


def test_a_decision_while_the_kept_off_rank_is_on_its_way_out_is_no_preemption() -> None:
    """The API server shows the deleted Pending pod with a ``deletionTimestamp`` before it is
    gone, and a decision can read it then (a watch event, an index): an unscheduled rank being
    deleted holds no state, so it is waited for, never a reason to stop the running ranks."""
    c = kept_pending()
    c.nodes["node-b"] = node("node-b")
    c.step()
    assert "deletionTimestamp" in c.pods["demo-1-1"]["metadata"]
    d = c.step()
    assert not d.graceful_exit and not d.create and not d.delete, d
    assert c.status["phase"] == "Pending" and c.status.get("preemptions", 0) == 0
    c.vanish_deleted()
    (again,) = [o for o in c.step().create if o["kind"] == "Pod"]
    assert again["metadata"]["name"] == "demo-1-1"


def test_a_user_deleting_a_pending_unscheduled_rank_gets_it_made_again() -> None:
    """The same for a ``kubectl delete`` of a rank that never ran: made again once gone, in the
    same incarnation — no preemption, no failure."""
    c = kept_pending()
    c.pods["demo-1-1"]["metadata"]["deletionTimestamp"] = "2026-01-01T12:00:00Z"
    d = c.step()
    assert not d.graceful_exit and c.status.get("preemptions", 0) == 0
    c.vanish_deleted()
    (again,) = [o for o in c.step().create if o["kind"] == "Pod"]
    assert again["metadata"]["name"] == "demo-1-1" and c.status["incarnation"] == 1


def test_the_new_list_still_names_the_nodes_going_away_now() -> None:
    c = kept_pending()
    c.nodes["node-b"] = node("node-b")
    c.nodes["node-c"] = node("node-c", unschedulable=True)
    c.step()
    c.vanish_deleted()
    (again,) = [o for o in c.step().create if o["kind"] == "Pod"]
    assert kept_off(again) == ["node-c"]


def test_a_scheduled_rank_is_never_made_again() -> None:
    c = kept_pending()
    c.pods["demo-1-1"]["spec"]["nodeName"] = "node-a"  # bound meanwhile, container starting
    c.nodes["node-b"] = node("node-b")
    assert not c.decide().delete


def test_an_avoided_node_that_was_deleted_is_no_reason_to_make_the_rank_again() -> None:
    c = kept_pending()
    del c.nodes["node-b"]
    assert c.decide().empty
