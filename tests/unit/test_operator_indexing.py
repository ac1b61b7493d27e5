"""The pod index reconciles read instead of LISTing: synced per job, expectations for the
operator's own creates, ghosts dropped by a LIST (issue 13, item 1; pure, no cluster)."""

from __future__ import annotations

from typing import Any

from test_operator_world import pod

from torpor_operator.indexing import PodIndex


def at(body: dict[str, Any], version: int) -> dict[str, Any]:
    body["metadata"]["resourceVersion"] = str(version)
    return body


def names(pods: list[dict[str, Any]] | None) -> list[str] | None:
    return None if pods is None else [p["metadata"]["name"] for p in pods]


def test_a_job_is_answered_only_after_one_list() -> None:
    index = PodIndex()
    index.put("team", "demo", at(pod("demo", 1, 0), 5))
    assert index.pods("team", "demo") is None  # the watch's listing may not have reached rank 1 yet
    index.listing("team", "demo")
    index.seed("team", "demo", [at(pod("demo", 1, 0), 5), at(pod("demo", 1, 1), 6)], "6")
    assert names(index.pods("team", "demo")) == ["demo-1-0", "demo-1-1"]
    assert index.pods("team", "other") is None


def test_a_pod_the_operator_creates_is_waited_for() -> None:
    index = PodIndex()
    index.listing("team", "demo")
    index.seed("team", "demo", [], "3")
    assert index.pods("team", "demo") == []
    index.expect("team", "demo", ["demo-1-0", "demo-1-1"])
    assert index.pods("team", "demo") is None
    index.put("team", "demo", at(pod("demo", 1, 0), 4))
    assert index.pods("team", "demo") is None
    index.put("team", "demo", at(pod("demo", 1, 1), 5))
    assert names(index.pods("team", "demo")) == ["demo-1-0", "demo-1-1"]


def test_a_create_that_never_happened_is_cleared_by_the_next_list() -> None:
    index = PodIndex()
    index.listing("team", "demo")
    index.seed("team", "demo", [], "3")
    index.expect("team", "demo", ["demo-1-0"])  # refused by a quota
    index.listing("team", "demo")
    index.seed("team", "demo", [], "9")
    assert index.pods("team", "demo") == []


def test_a_list_drops_ghosts_but_not_pods_newer_than_itself() -> None:
    index = PodIndex()
    index.listing("team", "demo")
    index.seed("team", "demo", [at(pod("demo", 1, 0), 5), at(pod("demo", 1, 1), 6)], "6")
    index.put("team", "demo", at(pod("demo", 2, 0), 12))  # made after the next LIST's snapshot
    index.listing("team", "demo")
    index.seed("team", "demo", [at(pod("demo", 1, 0), 5)], "10")  # rank 1 deleted in a watch gap
    assert names(index.pods("team", "demo")) == ["demo-1-0", "demo-2-0"]
    assert len(index) == 2


def test_a_pod_deleted_while_listing_is_not_brought_back() -> None:
    index = PodIndex()
    index.put("team", "demo", at(pod("demo", 1, 0), 5))
    index.listing("team", "demo")
    index.delete("team", "demo-1-0")
    index.seed("team", "demo", [at(pod("demo", 1, 0), 5)], "5")
    assert index.pods("team", "demo") == []


def test_managed_fields_are_not_kept_and_a_forgotten_job_leaves_nothing() -> None:
    index = PodIndex()
    body = at(pod("demo", 1, 0), 5)
    body["metadata"]["managedFields"] = [{"manager": "kubelet"}]
    index.put("team", "demo", body)
    index.listing("team", "demo")
    index.seed("team", "demo", [body], "5")
    index.expect("team", "demo", ["demo-1-1"])
    assert "managedFields" not in index._pods[("team", "demo-1-0")][1]["metadata"]
    assert index.jobs() == 1
    index.forget("team", "demo")
    index.delete("team", "demo-1-0")
    assert index.jobs() == 0 and len(index) == 0
    index.listing("team", "gone")
    index.abandon("team", "gone")
    assert index.jobs() == 0


def test_a_lagging_watch_never_brings_back_a_pod_a_list_saw_gone() -> None:
    """e2e: test_operator_faults_api.py's quota test — a refused launch tears rank 0 down; the
    retry's LIST (fresh) sees no pod, then the old rank 0's delayed events arrive, then the new
    rank 0 of the same name is made: the index must never show the old one being deleted."""
    index = PodIndex()
    old = at(pod("demo", 1, 0), 5)
    old["metadata"]["uid"] = "old"
    index.listing("team", "demo")
    index.seed("team", "demo", [], "9")  # the old rank 0 was made at 5 and deleted at 8
    deleting = at(pod("demo", 1, 0, deleting=True), 7)
    deleting["metadata"]["uid"] = "old"
    index.put("team", "demo", deleting)  # its delayed events
    assert index.pods("team", "demo") == []
    index.expect("team", "demo", ["demo-1-0"])
    new = at(pod("demo", 1, 0), 12)
    new["metadata"]["uid"] = "new"
    index.put("team", "demo", new)
    assert names(index.pods("team", "demo")) == ["demo-1-0"]
    index.delete("team", "demo-1-0", deleting)  # the old one's deletion event, late: not the new one's
    assert names(index.pods("team", "demo")) == ["demo-1-0"]
    assert index.pods("team", "demo")[0]["metadata"]["uid"] == "new"


def test_a_create_is_expected_even_while_an_old_pod_of_its_name_is_held() -> None:
    index = PodIndex()
    old = at(pod("demo", 1, 0, deleting=True), 5)
    old["metadata"]["uid"] = "old"
    index.listing("team", "demo")
    index.seed("team", "demo", [old], "5")
    index.expect("team", "demo", ["demo-1-0"])
    assert index.pods("team", "demo") is None  # the old one is no answer for the new one
    index.delete("team", "demo-1-0", old)
    assert index.pods("team", "demo") is None
    new = at(pod("demo", 1, 0), 8)
    new["metadata"]["uid"] = "new"
    index.put("team", "demo", new)
    assert names(index.pods("team", "demo")) == ["demo-1-0"]


def test_a_job_not_listed_for_the_resync_period_is_listed_again() -> None:
    """A pod whose deletion a reconnecting watch never reported would live in the index for
    as long as nothing LISTs its job: a job's pods are LISTed again once ``resync_seconds``
    have passed since its last LIST (a busy job; a quiet one is not reconciled at all)."""
    index = PodIndex(resync_seconds=300.0)
    index.listing("team", "demo")
    index.seed("team", "demo", [at(pod("demo", 1, 0), 5)], "5", now=1000.0)
    assert names(index.pods("team", "demo", now=1299.0)) == ["demo-1-0"]
    assert index.pods("team", "demo", now=1300.0) is None
    index.listing("team", "demo")
    index.seed("team", "demo", [], "9", now=1300.0)  # the ghost is gone
    assert index.pods("team", "demo", now=1300.0) == []


def test_a_deleted_job_takes_its_pods_out_of_the_index() -> None:
    """Even those whose own deletion events never came: forget names them for the shell's other caches."""
    index = PodIndex()
    index.listing("team", "demo")
    index.seed("team", "demo", [at(pod("demo", 1, 0), 5), at(pod("demo", 1, 1), 6)], "6")
    index.put("team", "other", at(pod("other", 1, 0), 7))
    assert index.forget("team", "demo") == ["demo-1-0", "demo-1-1"]
    assert len(index) == 1 and index.jobs() == 0
    assert index.forget("team", "demo") == []


def test_a_pod_the_operator_deleted_reads_as_deleting_until_the_watch_shows_it() -> None:
    index = PodIndex()
    index.listing("team", "demo")
    first, second = at(pod("demo", 1, 0), 5), at(pod("demo", 1, 1), 6)
    for body, uid in ((first, "u0"), (second, "u1")):
        body["metadata"]["uid"] = uid
    index.seed("team", "demo", [first, second], "6")
    index.deleted("team", "demo-1-0", "2026-12-03T08:00:00Z", 3)
    index.deleted("team", "demo-1-9", "2026-12-03T08:00:00Z", None)  # gone already: not brought in
    meta = {p["metadata"]["name"]: p["metadata"] for p in index.pods("team", "demo") or []}
    assert sorted(meta) == ["demo-1-0", "demo-1-1"]
    assert (meta["demo-1-0"]["deletionTimestamp"], meta["demo-1-0"]["deletionGracePeriodSeconds"]) == (
        "2026-12-03T08:00:00Z", 3)
    assert "deletionTimestamp" not in meta["demo-1-1"]
    # an event the watch sent before the deletion arrives late: a deletion is never undone
    late = at(pod("demo", 1, 0, annotations={"late": "1"}), 7)
    late["metadata"]["uid"] = "u0"
    index.put("team", "demo", late)
    held = next(p for p in index.pods("team", "demo") or [] if p["metadata"]["name"] == "demo-1-0")
    assert held["metadata"]["deletionTimestamp"] == "2026-12-03T08:00:00Z"
    assert held["metadata"]["annotations"] == {"late": "1"}
    # a new pod of the name (another uid) is not deleting
    again = at(pod("demo", 1, 0), 9)
    again["metadata"]["uid"] = "u2"
    index.put("team", "demo", again)
    held = next(p for p in index.pods("team", "demo") or [] if p["metadata"]["name"] == "demo-1-0")
    assert "deletionTimestamp" not in held["metadata"]
