"""Resize and elastic world size (issue 11, item 3), pure: the rows of
:mod:`torpor_operator.sizing`'s tables one by one, then whole histories through ``decide``.

What every history here checks beside its own point: the ranks of one incarnation all carry
one ``WORLD_SIZE`` (``status.worldSize``), a size change is always a new incarnation, and no
resize counts as a preemption or a failure.
"""

from __future__ import annotations

import copy
from datetime import datetime, timedelta
from typing import Any

import pytest
from test_operator_world import NOW, Cluster, ckpt, job_body, node, pod

from torpor.termination import StopReason, TerminationMessage
from torpor_operator.contract import ANNOTATION_POD_SHAPE, ENV, LABEL_INCARNATION, LABEL_RANK
from torpor_operator.observing import PodView, format_time
from torpor_operator.shaping import format_digests, shape_digests
from torpor_operator.sizing import UNTRAINED_RANK_GRACE_SECONDS, launch_size, resize
from torpor_operator.spec import parse_spec
from torpor_operator.status import LastCheckpoint

ELASTIC = {"minReplicas": 2, "waitSeconds": 30, "growIntervalSeconds": 300}
UNSCHEDULABLE = "0/2 nodes are available: 2 Insufficient cpu."


# --- helpers ---------------------------------------------------------------------------------


def env_of(p: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e.get("value", "") for e in p["spec"]["containers"][0]["env"]}


def world_sizes(c: Cluster, incarnation: int | None = None) -> list[str]:
    """WORLD_SIZE of every pod of an incarnation (the current one by default), by rank."""
    inc = str(incarnation if incarnation is not None else c.status["incarnation"])
    pods = sorted((p for p in c.pods.values() if p["metadata"]["labels"][LABEL_INCARNATION] == inc),
                  key=lambda p: int(p["metadata"]["labels"][LABEL_RANK]))
    return [env_of(p)[ENV.WORLD_SIZE] for p in pods]


def unschedulable(c: Cluster, rank: int, created: datetime = NOW) -> None:
    """The scheduler found no node for the rank's pod (of the current incarnation)."""
    p = c.pods[f"demo-{c.status['incarnation']}-{rank}"]
    p["metadata"]["creationTimestamp"] = format_time(created)
    p["spec"].pop("nodeName", None)
    p["status"] = {"phase": "Pending", "conditions": [
        {"type": "PodScheduled", "status": "False", "reason": "Unschedulable", "message": UNSCHEDULABLE}]}


def launch_short(replicas: int = 3, fit: int = 2, **spec: Any) -> Cluster:
    """A new elastic job of which only ``fit`` ranks are placed (they wait in the rendezvous)."""
    c = Cluster(job_body(replicas=replicas, elastic=dict(ELASTIC), **spec))
    c.step()
    c.run(node_for={r: "node-a" for r in range(replicas)})
    for rank in range(fit, replicas):
        unschedulable(c, rank)
    for rank in range(fit):
        c.pods[f"demo-1-{rank}"]["metadata"]["creationTimestamp"] = format_time(NOW)
    return c


def shrunk() -> Cluster:
    """launch_short() after waitSeconds: incarnation 2 Running on 2 of 3 ranks."""
    c = launch_short()
    c.later(30)
    c.step()
    c.step()
    c.vanish_deleted()
    c.step()  # Restarting
    c.step()  # incarnation 2
    c.run()
    c.step()
    assert (c.status["phase"], c.status["incarnation"], c.status["worldSize"]) == ("Running", 2, 2)
    return c


def running(replicas: int = 2, **spec: Any) -> Cluster:
    c = Cluster(job_body(replicas=replicas, **spec))
    c.step()
    c.run(node_for={r: ("node-a" if r == 0 else "node-b") for r in range(replicas)})
    c.step()
    assert c.status["phase"] == "Running"
    return c


def view(body: dict[str, Any]) -> PodView:
    v = PodView.from_dict(body, "train")
    assert v is not None
    return v


def shaped(spec: dict[str, Any], rank: int, **kw: Any) -> dict[str, Any]:
    """A rank's pod carrying the shape digests of ``spec``."""
    p = pod("demo", 1, rank, **kw)
    p["metadata"]["annotations"][ANNOTATION_POD_SHAPE] = format_digests(shape_digests(parse_spec(spec)))
    return p


def waiting(rank: int, created: datetime = NOW) -> dict[str, Any]:
    p = pod("demo", 1, rank, phase="Pending", ready=False)
    p["spec"].pop("nodeName")
    p["metadata"]["creationTimestamp"] = format_time(created)
    p["status"]["conditions"].append({"type": "PodScheduled", "status": "False", "reason": "Unschedulable",
                                      "message": UNSCHEDULABLE})
    return p


def events(c: Cluster, reason: str) -> list[str]:
    return [r for _, r in c.events if r == reason]


# --- the rows, one by one --------------------------------------------------------------------


def spec_of(replicas: int = 3, **fields: Any) -> Any:
    return parse_spec(job_body(replicas=replicas, **fields)["spec"])


def test_row_1_a_changed_replicas_is_a_graceful_resize_to_it() -> None:
    before = job_body(replicas=2)["spec"]
    s = spec_of(3)
    pods = [view(shaped(before, r)) for r in range(2)]
    got = resize(s, "Running", 1, 2, pods, NOW, last_resize=None, new_checkpoint=None).resize
    assert got is not None and (got.row, got.to, got.graceful) == (1, 3, True)
    assert got.message == "spec.replicas changed to 3 while incarnation 1 runs with WORLD_SIZE 2"
    # the same on an elastic job: a user's change is acted on at once, not at the grow interval
    e = spec_of(3, elastic=dict(ELASTIC))
    got = resize(e, "Running", 1, 2, pods, NOW, last_resize=NOW, new_checkpoint=None).resize
    assert got is not None and (got.row, got.to) == (1, 3)


def test_row_1_an_elastic_job_running_more_ranks_than_replicas_resizes_down() -> None:
    s = spec_of(2, elastic={"minReplicas": 1})
    pods = [view(shaped(job_body(replicas=2)["spec"], r)) for r in range(3)]  # made without a digest change
    got = resize(s, "Running", 1, 3, pods, NOW, last_resize=None, new_checkpoint=None).resize
    assert got is not None and (got.row, got.to, got.graceful) == (1, 2, True)


def test_row_1_not_when_the_ranks_already_run_the_new_size() -> None:
    """An elastic job short at 2 of 3 whose user sets replicas to 2: nothing to restart."""
    s = spec_of(2, elastic=dict(ELASTIC))
    pods = [view(shaped(job_body(replicas=3)["spec"], r)) for r in range(2)]
    assert resize(s, "Running", 2, 2, pods, NOW, last_resize=NOW, new_checkpoint=None).resize is None


def test_row_2_ranks_unschedulable_for_wait_seconds_shrink_to_the_ranks_placed() -> None:
    s = spec_of(3, elastic=dict(ELASTIC))
    spec = job_body(replicas=3)["spec"]
    pods = [view(shaped(spec, 0, node="node-a")), view(shaped(spec, 1, node="node-a")), view(waiting(2))]
    early = resize(s, "Pending", 1, 3, pods, NOW + timedelta(seconds=10), last_resize=None, new_checkpoint=None)
    assert early.resize is None and early.recheck_after == pytest.approx(20)
    got = resize(s, "Pending", 1, 3, pods, NOW + timedelta(seconds=30), last_resize=None, new_checkpoint=None).resize
    assert got is not None and (got.row, got.to, got.graceful) == (2, 2, False)
    assert got.message == (f"rank 2 (pod demo-1-2) could not be placed within elastic.waitSeconds 30s "
                           f"(Unschedulable: {UNSCHEDULABLE}); 2 of 3 ranks were: restarting with WORLD_SIZE 2 "
                           "(elastic.minReplicas 2)")


def test_row_2_a_pod_about_to_be_made_again_is_not_counted_as_unplaced() -> None:
    s = spec_of(3, elastic=dict(ELASTIC))
    pods = [view(shaped(job_body(replicas=3)["spec"], r, node="node-a")) for r in range(2)] + [view(waiting(2))]
    later = NOW + timedelta(seconds=60)
    assert resize(s, "Pending", 1, 3, pods, later, last_resize=None, new_checkpoint=None,
                  recreating={"demo-1-2"}).resize is None


def test_row_3_fewer_than_min_replicas_placed_waits_for_the_startup_timeout() -> None:
    s = spec_of(3, elastic=dict(ELASTIC))
    pods = [view(shaped(job_body(replicas=3)["spec"], 0, node="node-a")), view(waiting(1)), view(waiting(2))]
    got = resize(s, "Pending", 1, 3, pods, NOW + timedelta(seconds=60), last_resize=None, new_checkpoint=None)
    assert got.resize is None and got.recheck_after is None


def test_no_elastic_no_shrink() -> None:
    s = spec_of(3)
    pods = [view(shaped(job_body(replicas=3)["spec"], r, node="node-a")) for r in range(2)] + [view(waiting(2))]
    assert resize(s, "Pending", 1, 3, pods, NOW + timedelta(days=1), last_resize=None, new_checkpoint=None) == \
        resize(s, "Pending", 1, 3, pods, NOW, last_resize=None, new_checkpoint=None)
    assert resize(s, "Pending", 1, 3, pods, NOW + timedelta(days=1), last_resize=None,
                  new_checkpoint=None).resize is None


CHECKPOINT = LastCheckpoint("CKP-2_60", 60, "2026-01-01T12:10:00Z")


@pytest.mark.parametrize(
    ("seconds", "new", "saves", "row", "recheck"),
    [
        (299, CHECKPOINT, True, None, None),         # within the interval: not yet, whatever is saved
        (300, None, True, None, None),               # the interval passed: wait for the next checkpoint
        (300, CHECKPOINT, True, 4, None),            # ... right after it: grow
        (299, None, False, None, pytest.approx(1)),  # no periodic checkpoints: at the interval
        (300, None, False, 4, None),
    ],
    ids=["within-interval", "no-new-checkpoint", "right-after-a-checkpoint", "no-saves-early", "no-saves-due"],
)
def test_row_4_a_short_job_grows_back_after_the_interval_right_after_a_checkpoint(
        seconds: int, new: LastCheckpoint | None, saves: bool, row: int | None, recheck: Any) -> None:
    checkpoint = {"uri": "s3://bucket/runs", "saveSteps": 10} if saves else {"uri": "s3://bucket/runs"}
    s = spec_of(3, elastic=dict(ELASTIC), checkpoint=checkpoint)
    pods = [view(shaped(job_body(replicas=3, checkpoint=checkpoint)["spec"], r)) for r in range(2)]
    got = resize(s, "Running", 2, 2, pods, NOW + timedelta(seconds=seconds), last_resize=NOW, new_checkpoint=new)
    assert (got.resize.row if got.resize else None) == row
    assert got.recheck_after == recheck
    if got.resize is not None:
        assert (got.resize.to, got.resize.graceful) == (3, True)
        assert got.resize.message.startswith("running with 2 of 3 ranks since 2026-01-01T12:00:00Z; "
                                             "elastic.growIntervalSeconds 300s has passed and ")
        assert got.resize.message.endswith("trying all 3 ranks again")


def test_row_4_not_while_pending_nor_at_full_size() -> None:
    s = spec_of(3, elastic=dict(ELASTIC))
    pods = [view(shaped(job_body(replicas=3)["spec"], r)) for r in range(3)]
    later = NOW + timedelta(days=1)
    assert resize(s, "Running", 2, 3, pods, later, last_resize=NOW, new_checkpoint=CHECKPOINT).resize is None
    assert resize(s, "Pending", 2, 2, pods[:2], later, last_resize=NOW, new_checkpoint=CHECKPOINT).resize is None


@pytest.mark.parametrize(
    ("replicas", "next_world_size", "existing", "size"),
    [
        (3, 2, [2, 2], 2),    # row 5: a half-applied launch keeps its pods' WORLD_SIZE ...
        (1, 2, [2], 2),       # ... whatever spec.replicas says by now (row 1 then resizes it)
        (3, 2, [], 2),        # row 6: after a shrink
        (2, 3, [], 2),        # ... never above spec.replicas
        (3, None, [], 3),     # row 7: every new incarnation asks for every rank
    ],
)
def test_rows_5_to_7_the_size_of_a_new_incarnation(replicas: int, next_world_size: int | None,
                                                   existing: list[int], size: int) -> None:
    assert launch_size(spec_of(replicas), next_world_size, existing) == size


# --- histories through decide: a changed spec.replicas -----------------------------------------


@pytest.mark.parametrize("to", [3, 1])
def test_replicas_changed_on_a_running_job_saves_and_restarts_with_the_new_world_size(to: int) -> None:
    c = running()
    assert c.status["worldSize"] == 2 and world_sizes(c) == ["2", "2"]
    c.body["spec"]["replicas"] = to
    c.body["metadata"]["generation"] = 2
    d = c.step()
    assert (c.status["phase"], c.status["stopReason"]) == ("Stopping", "Resize")
    assert c.status["stopMessage"] == f"spec.replicas changed to {to} while incarnation 1 runs with WORLD_SIZE 2"
    assert d.graceful_exit == ("demo-1-exit", 1) and {n for n, _ in d.annotate} == {"demo-1-0", "demo-1-1"}
    assert not d.delete and not d.create  # every rank saves first; nothing made beside them
    assert [(e.type, e.reason) for e in d.events] == [("Normal", "Resizing")]
    assert d.events[0].message.endswith(f"asking every rank to save and exit, then restarting with WORLD_SIZE {to}")
    assert c.status["ready"] == f"2/{to}" and c.status["worldSize"] == 2

    c.checkpoints = [ckpt("Net", 40, 9)]
    c.exit_all_saved("Net", 40)
    c.step()
    assert c.status["phase"] == "Restarting"
    d = c.step()
    assert (c.status["phase"], c.status["incarnation"], c.status["resumeFrom"]) == ("Pending", 2, "Net")
    assert c.status["worldSize"] == to and world_sizes(c) == [str(to)] * to
    assert {env_of(p)[ENV.RESUME_FROM] for p in c.live_pods()} == {"Net"}
    assert c.status["lastResizeTime"] == format_time(c.now)
    resized = next(e for e in d.events if e.reason == "Resized")
    assert resized.message == (f"WORLD_SIZE 2 -> {to} in incarnation 2: spec.replicas changed to {to} while "
                               "incarnation 1 runs with WORLD_SIZE 2")
    c.run()
    c.step()
    assert c.status["phase"] == "Running" and c.status["ready"] == f"{to}/{to}"
    assert (c.status.get("preemptions", 0), c.status.get("restarts", 0)) == (0, 0)
    assert not events(c, "SpecChanged") and not events(c, "Preempted") and not events(c, "RankFailed")
    assert c.decide().empty  # the new pods carry the new size: no second resize


def test_replicas_changed_while_pending_never_mixes_two_world_sizes() -> None:
    """Today's bug: a rank made after the change got the new WORLD_SIZE beside the old ones."""
    c = Cluster(job_body(replicas=2))
    c.step()
    del c.pods["demo-1-1"]  # a half-applied launch, or a rank being made again
    c.body["spec"]["replicas"] = 3
    d = c.step()
    assert not [o for o in d.create if o["kind"] == "Pod"]
    assert (c.status["phase"], c.status["stopReason"]) == ("Stopping", "Resize")
    c.exit_all_saved()
    c.vanish_deleted()
    c.step()
    c.step()
    assert c.status["incarnation"] == 2 and world_sizes(c) == ["3", "3", "3"]


def test_a_template_changed_with_replicas_is_one_spec_change_restarting_at_the_new_size() -> None:
    c = running()
    c.body["spec"]["replicas"] = 3
    c.body["spec"]["template"]["spec"]["containers"][0]["image"] = "python:3.12"
    c.step()
    assert c.status["stopReason"] == "SpecChanged"
    assert c.status["stopMessage"].startswith("spec.replicas and spec.template changed since incarnation 1")
    c.exit_all_saved()
    c.step()
    d = c.step()
    assert world_sizes(c) == ["3", "3", "3"]
    assert {p["spec"]["containers"][0]["image"] for p in d.create if p["kind"] == "Pod"} == {"python:3.12"}
    assert [e.reason for e in d.events] == ["Resized", "Restarted"]


def test_replicas_changed_while_stopping_goes_into_the_next_incarnation() -> None:
    c = running()
    c.nodes["node-b"] = node("node-b", unschedulable=True)
    c.step()
    assert c.status["stopReason"] == "Preemption"
    c.body["spec"]["replicas"] = 3
    d = c.step()
    assert c.status["stopReason"] == "Preemption" and not d.events
    c.checkpoints = [ckpt("Net", 40, 9)]
    c.exit_all_saved("Net", 40)
    c.step()
    c.step()
    assert world_sizes(c) == ["3", "3", "3"] and c.status["preemptions"] == 1


def test_drain_protection_guards_the_incarnations_own_size() -> None:
    c = launch_short(gracefulExit={"drainProtection": True})
    assert c.children[("PodDisruptionBudget", "demo-1")]["spec"]["minAvailable"] == 3
    c.later(30)
    c.step()
    c.step()
    c.vanish_deleted()
    c.step()
    c.step()
    assert c.children[("PodDisruptionBudget", "demo-2")]["spec"]["minAvailable"] == 2


# --- histories through decide: elastic --------------------------------------------------------


def test_an_elastic_job_that_cannot_place_every_rank_restarts_on_those_that_fit() -> None:
    c = launch_short()
    c.checkpoints = [ckpt("CKP-1_40", 40, 9)]
    c.later(29)
    d = c.step()
    assert c.status["phase"] == "Pending" and not d.delete
    assert d.requeue_after == pytest.approx(1)
    c.later(1)
    d = c.step()
    assert (c.status["phase"], c.status["stopReason"], c.status["nextWorldSize"]) == ("Stopping", "Resize", 2)
    assert "could not be placed within elastic.waitSeconds 30s" in c.status["stopMessage"]
    assert [(e.type, e.reason) for e in d.events] == [("Warning", "Resizing")]
    # the stop is recorded before any rank is deleted (an operator dying in between counts no preemption)
    assert not d.delete and d.requeue_after == 0.0
    d = c.step()
    # no rank has trained (the rendezvous needs all three): deleted at once, not asked to save
    assert {(r.name, r.grace_period_seconds) for r in d.delete} == {
        ("demo-1-0", UNTRAINED_RANK_GRACE_SECONDS), ("demo-1-1", UNTRAINED_RANK_GRACE_SECONDS), ("demo-1-2", 0)}
    assert d.graceful_exit is None and not d.events

    c.vanish_deleted()
    c.step()
    assert c.status["phase"] == "Restarting"
    d = c.step()
    assert (c.status["incarnation"], c.status["worldSize"], c.status["resumeFrom"]) == (2, 2, "CKP-1_40")
    assert "nextWorldSize" not in c.status and c.status["lastResizeTime"] == format_time(c.now)
    assert world_sizes(c) == ["2", "2"]
    resized = next(e for e in d.events if e.reason == "Resized")
    assert resized.message.startswith("WORLD_SIZE 3 -> 2 (2 of spec.replicas 3) in incarnation 2: rank 2 (pod "
                                      "demo-1-2) could not be placed")
    c.run()
    c.step()
    assert (c.status["phase"], c.status["ready"]) == ("Running", "2/3")
    assert (c.status.get("preemptions", 0), c.status.get("restarts", 0)) == (0, 0)


def test_an_elastic_job_with_fewer_than_min_replicas_placed_waits_for_the_startup_timeout() -> None:
    c = launch_short(fit=1)
    c.later(300)
    d = c.step()
    assert c.status["phase"] == "Pending" and not d.delete
    c.later(300)
    c.step()
    assert (c.status["stopReason"], c.status["restarts"]) == ("StartupTimeout", 1)


def test_a_short_job_grows_back_right_after_a_checkpoint_once_the_interval_passed() -> None:
    c = shrunk()
    resized_at = c.status["lastResizeTime"]
    c.checkpoints = [ckpt("CKP-2_50", 50, 61)]
    c.later(299)
    d = c.step()
    assert c.status["phase"] == "Running" and c.status["lastCheckpoint"]["name"] == "CKP-2_50"
    c.later(1)
    assert c.decide().empty  # the interval passed, but the checkpoint is old news: wait for the next
    c.checkpoints.append(ckpt("CKP-2_60", 60, 66))
    d = c.step()
    assert (c.status["phase"], c.status["stopReason"]) == ("Stopping", "Resize")
    assert c.status["stopMessage"] == (f"running with 2 of 3 ranks since {resized_at}; elastic.growIntervalSeconds "
                                       "300s has passed and checkpoint CKP-2_60 (step 60) is complete: trying all 3 "
                                       "ranks again")
    assert d.graceful_exit == ("demo-2-exit", 1) and not d.delete  # a graceful stop: every rank saves
    c.checkpoints.append(ckpt("Net", 62, 67))
    c.exit_all_saved("Net", 62)
    c.step()
    d = c.step()
    assert (c.status["incarnation"], c.status["worldSize"], c.status["resumeFrom"]) == (3, 3, "Net")
    assert world_sizes(c) == ["3", "3", "3"]
    assert next(e for e in d.events if e.reason == "Resized").message.startswith(
        "WORLD_SIZE 2 -> 3 in incarnation 3: running with 2 of 3 ranks")
    c.run()
    c.step()
    assert c.status["phase"] == "Running" and c.decide().empty
    assert (c.status.get("preemptions", 0), c.status.get("restarts", 0)) == (0, 0)


def test_a_grow_that_still_cannot_place_every_rank_shrinks_again_to_what_fits() -> None:
    c = shrunk()
    c.later(300)
    c.checkpoints = [ckpt("CKP-2_60", 60, 66)]
    c.step()
    c.exit_all_saved("Net", 62)
    c.step()
    c.step()
    assert c.status["incarnation"] == 3 and world_sizes(c) == ["3", "3", "3"]
    c.run()
    unschedulable(c, 2, created=c.now)
    c.later(30)
    c.step()
    c.step()
    c.vanish_deleted()
    c.step()
    c.step()
    assert (c.status["incarnation"], c.status["worldSize"]) == (4, 2)
    assert c.status["lastResizeTime"] == format_time(c.now)  # the next try waits a whole interval again


def test_a_restart_of_a_short_job_asks_for_every_rank() -> None:
    c = shrunk()
    c.nodes["node-a"] = node("node-a", unschedulable=True)
    c.step()
    assert c.status["stopReason"] == "Preemption"
    c.checkpoints = [ckpt("Net", 40, 9)]
    c.exit_all_saved("Net", 40)
    c.step()
    d = c.step()
    assert (c.status["incarnation"], c.status["worldSize"]) == (3, 3) and world_sizes(c) == ["3", "3", "3"]
    assert next(e for e in d.events if e.reason == "Resized").message == (
        "WORLD_SIZE 2 -> 3 in incarnation 3: after Preemption, a new incarnation asks for all 3 ranks")


def test_a_job_suspended_during_a_shrink_asks_for_every_rank_when_resumed() -> None:
    c = launch_short()
    c.later(30)
    c.step()
    assert c.status["nextWorldSize"] == 2
    c.body["spec"]["suspend"] = True
    c.step()
    c.vanish_deleted()
    c.step()
    assert c.status["phase"] == "Suspended" and "nextWorldSize" not in c.status
    c.body["spec"]["suspend"] = False
    c.step()
    assert (c.status["incarnation"], c.status["worldSize"]) == (2, 3) and world_sizes(c) == ["3", "3", "3"]


def test_a_rank_recreated_in_a_short_incarnation_gets_its_world_size() -> None:
    c = shrunk()
    c.status["phase"] = "Pending"  # say rank 1's pod is being made again
    del c.pods["demo-2-1"]
    d = c.step()
    (made,) = [o for o in d.create if o["kind"] == "Pod"]
    assert made["metadata"]["name"] == "demo-2-1" and env_of(made)[ENV.WORLD_SIZE] == "2"


def test_lowering_replicas_to_the_size_a_short_job_runs_restarts_nothing() -> None:
    c = shrunk()
    c.body["spec"]["replicas"] = 2
    c.body["spec"]["elastic"]["minReplicas"] = 1
    d = c.decide()
    assert not (d.create or d.delete or d.graceful_exit or d.events) and d.status == {"ready": "2/2"}


def test_a_half_applied_shrink_launch_keeps_its_pods_world_size() -> None:
    c = launch_short()
    c.later(30)
    c.step()
    c.step()
    c.vanish_deleted()
    c.step()
    c.step(status=False)  # incarnation 2's pods made, the status patch lost
    c.body["spec"]["replicas"] = 2
    c.body["spec"]["elastic"]["minReplicas"] = 1
    c.step()
    assert world_sizes(c, 2) == ["2", "2"] and c.status["worldSize"] == 2


def test_a_job_launched_by_an_earlier_operator_gets_its_world_size_from_its_pods() -> None:
    c = running()
    old = copy.deepcopy(c.status)
    old.pop("worldSize")
    c.body["status"] = old
    d = c.decide()
    assert d.status == {"worldSize": 2}


def resize_refused(world: int) -> str:
    """The termination message of a rank whose script raised ``torpor.ResizeError`` at the load."""
    return TerminationMessage(StopReason.ERROR, 1, error=(
        f"ResizeError: global_batch_size=4 cannot be split over {world} rank(s) (4 is not divisible by {world}); "
        "resume on a world size that divides it, or change global_batch_size")).to_json()


def test_a_resize_the_script_refuses_is_a_failure_retried_at_the_same_size_until_failed() -> None:
    """What docs/operator.md says of a refused resize: the ranks raise ``torpor.ResizeError`` at
    the load, which is a failure (maxRestarts, backoff) whose Event and conditions name the world
    size refused; each restart asks for ``spec.replicas`` again (row 7), refused the same way, so
    the job ends Failed unless ``spec.replicas`` is set back to a size the script accepts."""
    c = running(maxRestarts=1)
    c.body["spec"]["replicas"] = 3
    c.body["metadata"]["generation"] = 2
    c.step()
    c.checkpoints = [ckpt("Net", 40, 9)]
    c.exit_all_saved("Net", 40)
    c.step()
    c.step()
    assert (c.status["incarnation"], c.status["worldSize"]) == (2, 3)
    for attempt in (1, 2):
        c.run()
        for rank in range(3):
            c.exit(rank, 1, resize_refused(3))
        d = c.step()
        failed = next(e for e in d.events if e.reason == "RankFailed")
        assert failed.message.startswith("rank 0 cannot resume checkpoint Net on WORLD_SIZE 3: ResizeError: "
                                         "global_batch_size=4 cannot be split over 3 rank(s)"), failed.message
        if attempt == 1:
            assert failed.message.endswith("(and 2 more); restart 1/1 in 10s from the newest checkpoint")
            c.step()
            ready = next(x for x in c.status["conditions"] if x["type"] == "Ready")
            assert (c.status["phase"], ready["message"].split(";")[0]) == (
                "Restarting", "Failure: rank 0 cannot resume checkpoint Net on WORLD_SIZE 3: ResizeError: "
                "global_batch_size=4 cannot be split over 3 rank(s) (4 is not divisible by 3)")
            c.later(10)
            c.step()
            assert (c.status["incarnation"], c.status["worldSize"]) == (3, 3)  # the same size again
    c.step()
    assert c.status["phase"] == "Failed"
    failed_condition = next(x for x in c.status["conditions"] if x["type"] == "Failed")
    assert "cannot resume checkpoint Net on WORLD_SIZE 3" in failed_condition["message"]
