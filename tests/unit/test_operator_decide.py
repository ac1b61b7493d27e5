"""``decide`` phase by phase and signal by signal (pure, no cluster)."""

from __future__ import annotations

from typing import Any

import pytest
from test_operator_world import NOW, Cluster, ckpt, job_body, message, node, pod

from torpor_operator.contract import ANNOTATION_EXIT_REQUESTED, ANNOTATION_RESUME_FROM, ENV
from torpor_operator.reconciling import Decision, ObjectRef
from torpor_operator.settings import OperatorSettings

STAMP = "2026-01-01T12:00:00Z"
SPOT = "cloud.google.com/impending-node-termination"


def running(replicas: int = 2, incarnation: int = 1, **spec: Any) -> Cluster:
    """A job whose incarnation is Running on node-a (rank 0) and node-b (rank 1…)."""
    c = Cluster(job_body(replicas=replicas, **spec))
    c.step()
    c.run(node_for={r: ("node-a" if r == 0 else "node-b") for r in range(replicas)})
    c.step()
    assert c.status["phase"] == "Running"
    return c


def delete(c: Cluster, rank: int, incarnation: int = 1) -> None:
    """Someone (a drain, a user) deleted the rank's pod."""
    c.pods[f"demo-{incarnation}-{rank}"]["metadata"]["deletionTimestamp"] = "2026-01-01T11:59:30Z"


def env_of(p: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e.get("value", "") for e in p["spec"]["containers"][0]["env"]}


# --- a new job ------------------------------------------------------------------------------


def test_new_job_creates_the_first_incarnation() -> None:
    c = Cluster(job_body())
    d = c.decide()
    assert [f"{o['kind']}/{o['metadata']['name']}" for o in d.create] == [
        "ConfigMap/demo-1-exit", "Service/demo-1", "Pod/demo-1-0", "Pod/demo-1-1"]
    assert d.status is not None
    assert d.status["phase"] == "Pending"
    assert d.status["incarnation"] == 1
    assert d.status["startTime"] == STAMP
    assert d.status["ready"] == "0/2"
    assert d.status["observedGeneration"] == 1
    assert [(e.type, e.reason) for e in d.events] == [("Normal", "Started")]
    assert not d.delete and d.graceful_exit is None


def test_new_job_resumes_from_the_newest_complete_checkpoint_left_by_an_earlier_job() -> None:
    c = Cluster(job_body(), checkpoints=[ckpt("CKP-1_10", 10, 1), ckpt("CKP-1_20", 20, 2, complete=False)])
    d = c.decide()
    pods = [o for o in d.create if o["kind"] == "Pod"]
    assert {env_of(p)[ENV.RESUME_FROM] for p in pods} == {"CKP-1_10"}
    assert d.status is not None and d.status["resumeFrom"] == "CKP-1_10"
    assert d.status["lastCheckpoint"] == {"name": "CKP-1_10", "step": 10, "time": "2026-01-01T11:01:00Z"}


def test_new_suspended_job_creates_nothing() -> None:
    c = Cluster(job_body(suspend=True))
    d = c.decide()
    assert not d.create
    assert d.status is not None and d.status["phase"] == "Suspended"
    assert d.status.get("incarnation", 0) == 0
    assert [e.reason for e in d.events] == ["Suspended"]


def test_drain_protection_adds_a_pdb_for_all_ranks() -> None:
    c = Cluster(job_body(replicas=3, gracefulExit={"drainProtection": True}))
    d = c.decide()
    pdbs = [o for o in d.create if o["kind"] == "PodDisruptionBudget"]
    assert len(pdbs) == 1
    assert pdbs[0]["spec"]["minAvailable"] == 3


# --- Pending and Running --------------------------------------------------------------------


def test_pending_becomes_running_when_every_rank_is_ready() -> None:
    c = Cluster(job_body())
    c.step()
    c.run()
    d = c.step()
    assert c.status["phase"] == "Running"
    assert c.status["ready"] == "2/2"
    assert [e.reason for e in d.events] == ["Running"]
    ready = next(x for x in c.status["conditions"] if x["type"] == "Ready")
    assert ready["status"] == "True"


def test_pending_stays_pending_while_a_rank_is_not_ready() -> None:
    c = Cluster(job_body())
    c.step()
    c.run()
    c.pods["demo-1-1"]["status"] = {"phase": "Pending"}
    d = c.step()
    assert c.status["phase"] == "Pending"
    assert c.status["readyReplicas"] == 1
    assert not d.events and not d.create


def test_pending_recreates_a_pod_missing_after_a_half_applied_launch() -> None:
    c = Cluster(job_body())
    c.step()
    del c.pods["demo-1-1"]
    d = c.decide()
    assert [o["metadata"]["name"] for o in d.create] == ["demo-1-1"]
    assert not d.events


def test_running_recreates_a_deleted_config_map_but_no_pod() -> None:
    c = running()
    del c.children[("ConfigMap", "demo-1-exit")]
    d = c.decide()
    assert [o["metadata"]["name"] for o in d.create] == ["demo-1-exit"]


def test_running_without_signals_does_nothing() -> None:
    c = running()
    d = c.decide()
    assert d.empty


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (lambda c: c.nodes.__setitem__("node-b", node("node-b", unschedulable=True)),
         "node node-b hosting rank 1 is cordoned"),
        (lambda c: c.nodes.__setitem__("node-b", node("node-b", taints=("ToBeDeletedByClusterAutoscaler",))),
         "node node-b hosting rank 1 is tainted ToBeDeletedByClusterAutoscaler"),
        (lambda c: c.nodes.__setitem__("node-a", node("node-a", taints=(SPOT,))),
         "node node-a hosting rank 0 is tainted cloud.google.com/impending-node-termination"),
        (lambda c: c.pods["demo-1-1"]["status"]["conditions"].append(
            {"type": "DisruptionTarget", "status": "True", "reason": "EvictionByEvictionAPI"}),
         "rank 1 (pod demo-1-1) has DisruptionTarget EvictionByEvictionAPI"),
        (lambda c: c.pods["demo-1-0"]["metadata"].__setitem__("deletionTimestamp", "2026-01-01T11:59:00Z"),
         "rank 0 (pod demo-1-0) is being deleted"),
        (lambda c: c.pods.pop("demo-1-1"), "rank 1 (pod demo-1-1) is gone"),
        (lambda c: (delete(c, 1), c.exit(1, 143, message("signal", 143, "Net", 7))),
         "rank 1 stopped on request (signal), saved Net at step 7, exit 143 (pod deleted)"),
        (lambda c: c.exit(0, 75), "rank 0 stopped on the GracefulExit file"),
        (lambda c: (delete(c, 1), c.exit(1, 137)),
         "rank 1 was ended by signal 9 (SIGKILL) without a save (pod deleted)"),
        (lambda c: c.pods["demo-1-1"]["status"].update(phase="Failed", reason="Evicted"),
         "rank 1 was ended without a container exit (pod Evicted)"),
        (lambda c: c.nodes.__setitem__("node-b", node("node-b", ready="Unknown")),
         "node node-b hosting rank 1 is NotReady (Ready=Unknown)"),
    ],
    ids=["cordon", "autoscaler-taint", "spot-taint", "disruption-target", "deletion", "vanished",
         "saved-on-signal", "saved-on-file", "killed", "evicted", "node-lost"],
)
def test_preemption_signals_start_a_graceful_stop(change: Any, expected: str) -> None:
    c = running()
    change(c)
    d = c.decide()
    assert d.status is not None
    assert d.status["phase"] == "Stopping"
    assert d.status["stopReason"] == "Preemption"
    assert d.status["stopMessage"].startswith(expected), d.status["stopMessage"]
    assert d.status["preemptions"] == 1
    assert "restarts" not in d.status
    assert d.status["stopRequestedAt"] == STAMP
    assert d.graceful_exit == ("demo-1-exit", 1)
    live = {p["metadata"]["name"] for p in c.pods.values()
            if p["status"]["phase"] == "Running" and "deletionTimestamp" not in p["metadata"]}
    assert {name for name, _ in d.annotate} == live
    assert all(a == {ANNOTATION_EXIT_REQUESTED: STAMP} for _, a in d.annotate)
    assert [(e.type, e.reason) for e in d.events] == [("Warning", "Preempted")]
    assert not d.delete and not d.create
    assert d.requeue_after == 30.0
    stopping = next(x for x in d.status["conditions"] if x["type"] == "Stopping")
    assert (stopping["status"], stopping["reason"]) == ("True", "Preemption")


def test_an_unlisted_taint_is_not_a_preemption() -> None:
    c = running()
    c.nodes["node-b"] = node("node-b", taints=("example.com/maintenance",))
    assert c.decide().empty


def test_termination_taints_come_from_the_settings() -> None:
    c = running()
    c.settings = OperatorSettings(termination_taints=("example.com/maintenance",))
    c.nodes["node-b"] = node("node-b", taints=("example.com/maintenance",))
    d = c.decide()
    assert d.status is not None and d.status["phase"] == "Stopping"


def test_a_node_without_ranks_does_not_preempt() -> None:
    c = running()
    c.nodes["node-c"] = node("node-c", unschedulable=True)
    assert c.decide().empty


def test_suspend_stops_without_counting_a_preemption() -> None:
    c = running()
    c.body["spec"]["suspend"] = True
    d = c.decide()
    assert d.status is not None
    assert (d.status["phase"], d.status["stopReason"]) == ("Stopping", "Suspend")
    assert "preemptions" not in d.status
    assert d.graceful_exit == ("demo-1-exit", 1)
    assert [(e.type, e.reason) for e in d.events] == [("Normal", "Suspending")]


def test_a_crash_deletes_the_other_ranks_and_counts_a_restart_with_backoff() -> None:
    c = running(replicas=3)
    c.exit(1, 1, message("error", 1) .replace('"reason"', '"error":"RuntimeError: boom","reason"'))
    d = c.decide()
    assert d.status is not None
    assert d.status["phase"] == "Stopping"
    assert d.status["stopReason"] == "Failure"
    assert d.status["restarts"] == 1
    assert d.status["nextRestartTime"] == "2026-01-01T12:00:10Z"
    assert "RuntimeError: boom" in d.status["stopMessage"]
    assert set(d.delete) == {ObjectRef("v1", "Pod", "demo-1-0"), ObjectRef("v1", "Pod", "demo-1-2")}
    assert d.graceful_exit is None
    assert [(e.type, e.reason) for e in d.events] == [("Warning", "RankFailed")]
    assert "restart 1/3 in 10s" in d.events[0].message


@pytest.mark.parametrize(
    ("code", "text", "reason"),
    [(1, "Traceback ...\nValueError: x", "Error"), (2, "", "Error"), (137, "", "OOMKilled")],
    ids=["exception-without-message", "exit-2", "oom"],
)
def test_crashes_without_a_runtime_message(code: int, text: str, reason: str) -> None:
    c = running()
    c.exit(0, code, text, term_reason=reason)
    d = c.decide()
    assert d.status is not None and d.status["stopReason"] == "Failure"


@pytest.mark.parametrize(("restarts", "delay"), [(0, 10), (1, 20), (2, 40), (7, 600)])
def test_backoff_doubles_and_is_capped(restarts: int, delay: int) -> None:
    c = running(maxRestarts=100)
    c.status["restarts"] = restarts
    c.exit(1, 1)
    d = c.decide()
    assert d.status is not None and d.status["restarts"] == restarts + 1
    assert f"in {delay}s" in d.events[0].message


def test_a_crash_past_max_restarts_fails_the_job() -> None:
    c = running(maxRestarts=2)
    c.status["restarts"] = 2
    c.exit(0, 1)
    d = c.step()
    assert d.status is not None
    assert (d.status["stopReason"], c.status["restarts"]) == ("MaxRestartsExceeded", 2)
    assert "maxRestarts 2 exhausted" in d.status["stopMessage"]
    c.exit(1, 137)
    d = c.step()
    assert c.status["phase"] == "Failed"
    assert c.status["completionTime"] == STAMP
    failed = next(x for x in c.status["conditions"] if x["type"] == "Failed")
    assert (failed["status"], failed["reason"]) == ("True", "MaxRestartsExceeded")
    assert "exhausted" in failed["message"]
    assert [(e.type, e.reason) for e in d.events] == [("Warning", "MaxRestartsExceeded")]
    assert ObjectRef("v1", "Service", "demo-1") in d.delete
    assert all(r.kind != "Pod" for r in d.delete)  # pods stay for their logs


def test_max_restarts_zero_fails_at_the_first_crash() -> None:
    c = running(maxRestarts=0)
    c.exit(0, 1)
    d = c.decide()
    assert d.status is not None and d.status["stopReason"] == "MaxRestartsExceeded"


def test_all_ranks_completing_succeeds() -> None:
    c = running()
    c.exit(0, 0, message("completed", 0, "CKP-3_1", 300))
    d = c.step()
    assert c.status["phase"] == "Running"  # rank 1 still running
    assert d.status == {"readyReplicas": 1, "ready": "1/2"}
    c.exit(1, 0, message("completed", 0, "CKP-3_1", 300))
    d = c.step()
    assert c.status["phase"] == "Succeeded"
    assert c.status["completionTime"] == STAMP
    assert [e.reason for e in d.events] == ["Succeeded"]
    assert {(r.kind, r.name) for r in d.delete} == {("Service", "demo-1"), ("ConfigMap", "demo-1-exit")}
    assert c.decide().empty


def test_exit_zero_without_a_message_counts_as_finished() -> None:
    c = running()
    c.exit(0, 0)
    c.exit(1, 0)
    d = c.decide()
    assert d.status is not None and d.status["phase"] == "Succeeded"


# --- Stopping ------------------------------------------------------------------------------


def preempted(**spec: Any) -> Cluster:
    c = running(**spec)
    c.nodes["node-b"] = node("node-b", unschedulable=True)
    c.step()
    assert c.status["phase"] == "Stopping"
    return c


def test_stopping_waits_for_the_ranks_before_the_deadline() -> None:
    c = preempted()
    c.later(50)
    d = c.decide()
    assert not d.delete and not d.create and d.graceful_exit is None and not d.annotate
    assert d.status is None
    assert d.requeue_after == pytest.approx(10)


def test_stopping_rewrites_a_lost_flag_and_annotates_new_live_pods() -> None:
    c = preempted()
    c.children[("ConfigMap", "demo-1-exit")]["data"] = {"graceful-exit.json": '{"GracefulExit": 0}'}
    c.pods["demo-1-1"]["metadata"]["annotations"].pop(ANNOTATION_EXIT_REQUESTED)
    d = c.decide()
    assert d.graceful_exit == ("demo-1-exit", 1)
    assert d.annotate == (("demo-1-1", {ANNOTATION_EXIT_REQUESTED: STAMP}),)


def test_stopping_deletes_stragglers_at_the_deadline_once() -> None:
    c = preempted()
    c.exit(0, 143, message("signal", 143, "Net", 40))
    c.later(60)
    d = c.step()
    assert d.delete == (ObjectRef("v1", "Pod", "demo-1-1"),)
    assert [(e.type, e.reason) for e in d.events] == [("Warning", "ExitDeadlineExceeded")]
    d = c.decide()
    assert not d.delete and not d.events


def test_stopping_ends_in_restarting_when_every_rank_has_exited() -> None:
    c = preempted()
    c.checkpoints = [ckpt("CKP-1_30", 30, 5), ckpt("Net", 40, 9)]
    c.exit_all_saved("Net", 40)
    d = c.step()
    assert c.status["phase"] == "Restarting"
    assert d.requeue_after == 0.0
    assert [e.reason for e in d.events] == ["Restarting"]
    assert "ranks saved Net" in d.events[0].message
    assert c.status["lastCheckpoint"]["name"] == "Net"
    assert c.status["preemptions"] == 1 and c.status.get("restarts", 0) == 0


def test_a_crash_while_stopping_for_a_preemption_is_not_a_failure() -> None:
    c = preempted()
    c.exit(0, 143, message("signal", 143, "Net", 40))
    c.exit(1, 1, message("error", 1))
    d = c.step()
    assert c.status["phase"] == "Restarting"
    assert c.status.get("restarts", 0) == 0
    assert not any(e.reason == "RankFailed" for e in d.events)


def test_more_signals_while_stopping_count_no_second_preemption() -> None:
    c = preempted()
    c.pods["demo-1-0"]["metadata"]["deletionTimestamp"] = "2026-01-01T12:00:01Z"
    c.nodes["node-a"] = node("node-a", unschedulable=True)
    d = c.decide()
    assert d.status == {"readyReplicas": 1, "ready": "1/2"}
    assert not d.events and d.graceful_exit is None


def test_stopping_for_suspend_ends_suspended() -> None:
    c = running()
    c.body["spec"]["suspend"] = True
    c.step()
    c.exit_all_saved()
    d = c.step()
    assert c.status["phase"] == "Suspended"
    assert [e.reason for e in d.events] == ["Suspended"]
    assert {r.kind for r in d.delete} == {"Service", "ConfigMap"}
    suspended = next(x for x in c.status["conditions"] if x["type"] == "Suspended")
    assert suspended["status"] == "True"


def test_stopping_ends_succeeded_when_every_rank_completed_meanwhile() -> None:
    c = preempted()
    c.exit(0, 0, message("completed", 0))
    c.exit(1, 0, message("completed", 0))
    c.step()
    assert c.status["phase"] == "Succeeded"


# --- Restarting ----------------------------------------------------------------------------


def crashed() -> Cluster:
    c = running()
    c.exit(1, 1)
    c.step()
    c.exit(0, 137)
    c.step()
    assert c.status["phase"] == "Restarting"
    return c


def test_restarting_waits_for_the_backoff() -> None:
    c = crashed()
    c.later(4)
    d = c.decide()
    assert not d.create and d.status is None
    assert d.requeue_after == pytest.approx(6)


def test_restarting_after_the_backoff_launches_the_next_incarnation() -> None:
    c = crashed()
    c.checkpoints = [ckpt("CKP-1_10", 10, 1), ckpt("CKP-1_20", 20, 2), ckpt("CKP-1_30", 30, 3, complete=False)]
    c.nodes["node-b"] = node("node-b", unschedulable=True)
    c.later(10)
    d = c.step()
    assert c.status["phase"] == "Pending"
    assert c.status["incarnation"] == 2
    assert c.status["resumeFrom"] == "CKP-1_20"
    assert "nextRestartTime" not in c.status and "stopRequestedAt" not in c.status
    new = [o for o in d.create if o["kind"] == "Pod"]
    assert [p["metadata"]["name"] for p in new] == ["demo-2-0", "demo-2-1"]
    assert {env_of(p)[ENV.RESUME_FROM] for p in new} == {"CKP-1_20"}
    assert {p["metadata"]["annotations"][ANNOTATION_RESUME_FROM] for p in new} == {"CKP-1_20"}
    # the cordoned node-b: the scheduler keeps these pods off it by itself (test_operator_placing.py)
    assert "affinity" not in new[0]["spec"]
    # demo-1-0 is already being deleted; demo-1-1 ended by itself
    assert {(r.kind, r.name) for r in d.delete} == {
        ("Pod", "demo-1-1"), ("Service", "demo-1"), ("ConfigMap", "demo-1-exit")}
    assert [e.reason for e in d.events] == ["Restarted"]
    assert "resuming from CKP-1_20" in d.events[0].message


def test_a_half_applied_launch_keeps_the_checkpoint_its_pods_carry() -> None:
    c = crashed()
    c.checkpoints = [ckpt("CKP-1_10", 10, 1)]
    c.later(10)
    d = c.decide()
    c.apply(d, status=False)  # the operator died before patching the status
    c.checkpoints = [ckpt("CKP-1_10", 10, 1), ckpt("CKP-1_20", 20, 2)]
    d2 = c.step()
    assert not d2.create
    assert c.status["resumeFrom"] == "CKP-1_10"
    assert c.status["incarnation"] == 2


def test_restarting_without_a_bucket_listing_lets_the_ranks_pick_the_newest() -> None:
    c = crashed()
    c.checkpoints = None
    c.later(10)
    d = c.decide()
    pods = [o for o in d.create if o["kind"] == "Pod"]
    assert {env_of(p)[ENV.RESUME_FROM] for p in pods} == {""}


def test_restarting_deletes_a_live_straggler_first() -> None:
    c = crashed()
    c.pods["demo-1-0"]["status"] = {"phase": "Running"}
    c.pods["demo-1-0"]["metadata"].pop("deletionTimestamp", None)
    c.later(10)
    d = c.decide()
    assert d.delete == (ObjectRef("v1", "Pod", "demo-1-0"),)
    assert not d.create


def test_restarting_with_suspend_goes_to_suspended() -> None:
    c = crashed()
    c.body["spec"]["suspend"] = True
    d = c.step()
    assert c.status["phase"] == "Suspended"
    assert [e.reason for e in d.events] == ["Suspended"]


# --- Suspended and terminal phases ---------------------------------------------------------


def test_unsuspending_resumes_from_the_newest_checkpoint() -> None:
    c = running()
    c.body["spec"]["suspend"] = True
    c.step()
    c.exit_all_saved("Net", 40)
    c.step()
    assert c.decide().empty or c.decide().status is None
    c.checkpoints = [ckpt("Net", 40, 9)]
    c.body["spec"]["suspend"] = False
    d = c.step()
    assert c.status["phase"] == "Pending"
    assert c.status["incarnation"] == 2
    assert c.status["resumeFrom"] == "Net"
    assert [e.reason for e in d.events] == ["Resumed"]
    assert c.status.get("restarts", 0) == 0 and c.status.get("preemptions", 0) == 0


def test_a_job_created_suspended_starts_on_unsuspend() -> None:
    c = Cluster(job_body(suspend=True))
    c.step()
    c.body["spec"]["suspend"] = False
    d = c.step()
    assert c.status["incarnation"] == 1
    assert c.status["startTime"] == STAMP
    assert [o["metadata"]["name"] for o in d.create if o["kind"] == "Pod"] == ["demo-1-0", "demo-1-1"]


@pytest.mark.parametrize("phase", ["Succeeded", "Failed"])
def test_terminal_phases_only_finish_releasing_children(phase: str) -> None:
    c = running()
    c.status["phase"] = phase  # as if the operator died before deleting the Service and ConfigMap
    c.nodes["node-a"] = node("node-a", unschedulable=True)
    c.exit(0, 1)
    d = c.step()
    assert not (d.create or d.events or d.annotate or d.graceful_exit)
    assert {(r.kind, r.name) for r in d.delete} == {("Service", "demo-1"), ("ConfigMap", "demo-1-exit")}
    assert c.status["phase"] == phase
    d = c.decide()
    assert d.empty


# --- status details ------------------------------------------------------------------------


def test_last_checkpoint_follows_the_bucket_and_survives_an_unreadable_listing() -> None:
    c = running()
    c.checkpoints = [ckpt("CKP-1_10", 10, 1), ckpt("CKP-1_20", 20, 2), ckpt("CKP-1_30", 30, 3, complete=False)]
    d = c.step()
    assert d.status == {"lastCheckpoint": {"name": "CKP-1_20", "step": 20, "time": "2026-01-01T11:02:00Z"}}
    c.checkpoints = None
    assert c.decide().empty


def test_observed_generation_follows_the_spec() -> None:
    c = running()
    c.body["metadata"]["generation"] = 2
    d = c.decide()
    assert d.status == {"observedGeneration": 2}


def test_condition_transition_times_move_only_on_flips() -> None:
    c = running()
    ready_before = next(x for x in c.status["conditions"] if x["type"] == "Ready")
    c.later(100)
    c.nodes["node-b"] = node("node-b", unschedulable=True)
    c.step()
    conditions = {x["type"]: x for x in c.status["conditions"]}
    assert conditions["Ready"]["status"] == "False"
    assert conditions["Ready"]["lastTransitionTime"] == "2026-01-01T12:01:40Z"
    assert conditions["Suspended"]["lastTransitionTime"] == ready_before["lastTransitionTime"]


def test_old_incarnation_pods_left_running_are_deleted() -> None:
    c = running()
    c.pods["demo-0-0"] = pod("demo", 0, 0)
    d = c.decide()
    assert d.delete == (ObjectRef("v1", "Pod", "demo-0-0"),)
    assert d.status is None


def test_start_time_is_kept_across_restarts() -> None:
    c = crashed()
    c.later(10)
    c.step()
    assert c.status["startTime"] == STAMP
    assert NOW.isoformat().startswith("2026-01-01T12:00:00")


# --- why a rank ended: evidence, collateral, infrastructure --------------------------------

RESET = message("error", 1).replace('"reason"', '"error":"RuntimeError: Connection reset by peer","reason"')


@pytest.mark.parametrize(
    ("code", "text"),
    [(134, ""), (139, ""), (137, ""), (143, ""), (143, message("signal", 143, "Net", 7))],
    ids=["sigabrt", "sigsegv", "sigkill", "sigterm", "liveness-kill-saved-by-the-runtime"],
)
def test_a_signal_without_evidence_is_a_failure_with_backoff(code: int, text: str) -> None:
    c = running()
    c.exit(1, code, text)
    d = c.decide()
    assert d.status is not None
    assert (d.status["phase"], d.status["stopReason"], d.status["restarts"]) == ("Stopping", "Failure", 1)
    assert d.status["nextRestartTime"] == "2026-01-01T12:00:10Z"
    assert "preemptions" not in d.status
    assert d.delete == (ObjectRef("v1", "Pod", "demo-1-0"),)


def test_repeated_sigabrt_ends_failed_past_max_restarts() -> None:
    c = running(maxRestarts=1)
    c.exit(1, 134)
    c.step()
    c.exit(0, 137)
    c.step()
    c.later(10)
    c.step()
    c.run(node_for={0: "node-a", 1: "node-b"})
    c.step()
    c.exit(0, 134)
    c.step()
    c.exit(1, 137)
    c.step()
    assert c.status["phase"] == "Failed"
    assert (c.status["restarts"], c.status["preemptions"]) == (1, 0)
    failed = next(x for x in c.status["conditions"] if x["type"] == "Failed")
    assert "signal 6 (SIGABRT)" in failed["message"]


def disrupt(c: Cluster, rank: int, reason: str = "EvictionByEvictionAPI") -> None:
    c.pods[f"demo-1-{rank}"]["status"].setdefault("conditions", []).append(
        {"type": "DisruptionTarget", "status": "True", "reason": reason})


@pytest.mark.parametrize(
    "disruption",
    [
        lambda c: (delete(c, 0), c.exit(0, 143, message("signal", 143, "Net", 7))),
        lambda c: (delete(c, 0), c.exit(0, 137)),
        lambda c: c.pods["demo-1-0"]["status"].update(phase="Failed", reason="Evicted"),
        lambda c: disrupt(c, 0, "PreemptionByScheduler"),
        lambda c: c.nodes.__setitem__("node-a", node("node-a", ready="Unknown")),
        lambda c: (c.exit(0, 137), c.nodes.__setitem__("node-a", node("node-a", ready="Unknown"))),
        lambda c: c.nodes.__setitem__("node-a", node("node-a", taints=(SPOT,))),
    ],
    ids=["drained-and-saved", "drained-and-killed", "evicted-by-kubelet", "disruption-target-on-a-live-rank",
         "node-lost-rank-still-shown-running", "node-lost-rank-ended", "spot-notice"],
)
def test_peers_crashing_on_a_disrupted_rank_are_one_preemption(disruption: Any) -> None:
    """Rank 0 is disrupted, ranks 1 and 2 then fail on the broken connection, all seen in one
    decision: that is the preemption's collateral, not a failure."""
    c = running(replicas=3)
    disruption(c)
    c.exit(1, 1, RESET)
    c.exit(2, 1, RESET)
    d = c.step()
    assert (c.status["phase"], c.status["stopReason"]) == ("Stopping", "Preemption")
    assert (c.status["preemptions"], c.status.get("restarts", 0)) == (1, 0)
    assert "2 crashed ranks are its collateral" in c.status["stopMessage"]
    assert [e.reason for e in d.events] == ["Preempted"]


def test_collateral_crashes_never_exhaust_max_restarts() -> None:
    """Today's bug: after maxRestarts spot reclaims with collateral crashes, the job was Failed."""
    c = running(maxRestarts=0)
    c.nodes["node-a"] = node("node-a", ready="Unknown")
    c.exit(1, 1, RESET)
    c.step()
    assert c.status["stopReason"] == "Preemption"
    assert c.status.get("restarts", 0) == 0


def test_a_rank_killed_without_notice_and_its_crashing_peers_are_one_failure() -> None:
    c = running(replicas=3)
    c.exit(0, 137)
    c.exit(1, 1, RESET)
    c.exit(2, 1, RESET)
    d = c.step()
    assert (c.status["stopReason"], c.status["restarts"], c.status["preemptions"]) == ("Failure", 1, 0)
    assert "(and 2 more)" in c.status["stopMessage"]
    assert [e.reason for e in d.events] == ["RankFailed"]


def test_a_crash_beside_a_bare_deletion_of_a_running_rank_is_a_failure() -> None:
    """A deletion alone may be the operator's own, applied before it died and before the status
    patch that counted the failure: it never turns a crash into collateral."""
    c = running()
    c.exit(1, 1, RESET)
    delete(c, 0)
    d = c.decide()
    assert d.status is not None and (d.status["stopReason"], d.status["restarts"]) == ("Failure", 1)


# --- kubelet admission rejections ------------------------------------------------------------


def reject(c: Cluster, name: str, reason: str = "OutOfcpu") -> None:
    c.pods[name]["status"] = {"phase": "Failed", "reason": reason,
                              "message": "Pod was rejected: Node didn't have enough resource: cpu"}


def pending() -> Cluster:
    c = Cluster(job_body(replicas=2))
    c.step()
    c.run()
    c.pods["demo-1-1"]["status"] = {"phase": "Pending"}
    return c


def test_a_rejected_rank_is_recreated_without_counting_a_failure() -> None:
    c = pending()
    reject(c, "demo-1-1")
    d = c.step()
    assert d.delete == (ObjectRef("v1", "Pod", "demo-1-1"),)
    assert not d.create
    assert c.status["phase"] == "Pending"
    assert (c.status.get("restarts", 0), c.status.get("preemptions", 0), c.status["admissionRejections"]) == (0, 0, 1)
    assert [(e.type, e.reason) for e in d.events] == [("Warning", "RankRejected")]
    assert "OutOfcpu" in d.events[0].message and "1/5" in d.events[0].message
    assert c.decide().status is None  # deciding again on the deleting pod counts nothing
    c.vanish_deleted()
    d = c.step()
    assert [o["metadata"]["name"] for o in d.create] == ["demo-1-1"]
    c.run()
    c.step()
    assert c.status["phase"] == "Running"


def test_rejections_past_the_bound_are_a_failure() -> None:
    c = pending()
    c.settings = OperatorSettings(admission_retries=2)
    for _ in range(2):
        reject(c, "demo-1-1", "UnexpectedAdmissionError")
        c.step()
        c.vanish_deleted()
        c.step()
    assert c.status["admissionRejections"] == 2
    reject(c, "demo-1-1", "UnexpectedAdmissionError")
    d = c.step()
    assert (c.status["stopReason"], c.status["restarts"]) == ("Failure", 1)
    assert "2 admission retries" in c.status["stopMessage"]
    assert [e.reason for e in d.events] == ["RankFailed"]


def test_a_new_incarnation_starts_with_no_rejections() -> None:
    c = pending()
    reject(c, "demo-1-1")
    c.step()
    c.exit(0, 1)
    c.step()
    c.step()
    assert c.status["phase"] == "Restarting"
    c.vanish_deleted()
    c.later(10)
    c.step()
    assert (c.status["incarnation"], c.status["admissionRejections"]) == (2, 0)


# --- preemptions that make no progress --------------------------------------------------------


def preempt_and_exit(c: Cluster) -> Decision:
    c.nodes["node-b"] = node("node-b", unschedulable=True)
    c.step()
    c.exit_all_saved("Net", 7)
    return c.step()


def test_a_preemption_without_a_new_checkpoint_restarts_after_a_backoff() -> None:
    c = running()
    d = preempt_and_exit(c)  # the exit saves never became a complete checkpoint
    assert c.status["phase"] == "Restarting"
    assert c.status["preemptionsWithoutProgress"] == 1
    assert c.status["nextRestartTime"] == "2026-01-01T12:00:10Z"
    assert d.requeue_after == pytest.approx(10)
    assert "no checkpoint newer than the one it resumed from" in d.events[0].message
    assert c.status.get("restarts", 0) == 0
    c.later(5)
    assert not c.decide().create
    c.later(5)
    assert [o["metadata"]["name"] for o in c.decide().create if o["kind"] == "Pod"] == ["demo-2-0", "demo-2-1"]


def test_the_backoff_grows_with_each_preemption_in_a_row_without_progress() -> None:
    c = running()
    c.status["preemptionsWithoutProgress"] = 2
    preempt_and_exit(c)
    assert (c.status["preemptionsWithoutProgress"], c.status["nextRestartTime"]) == (3, "2026-01-01T12:00:40Z")


def test_a_preemption_after_a_new_checkpoint_restarts_at_once_and_resets_the_count() -> None:
    c = running()
    c.status["preemptionsWithoutProgress"] = 2
    c.checkpoints = [ckpt("Net", 7, 30)]
    d = preempt_and_exit(c)
    assert c.status["phase"] == "Restarting"
    assert c.status["preemptionsWithoutProgress"] == 0
    assert "nextRestartTime" not in c.status
    assert d.requeue_after == 0.0


def test_progress_is_measured_against_the_checkpoint_the_incarnation_resumed_from() -> None:
    c = Cluster(job_body(), checkpoints=[ckpt("CKP-1_10", 10, 1)])
    c.step()
    c.run(node_for={0: "node-a", 1: "node-b"})
    c.step()
    assert c.status["resumeFrom"] == "CKP-1_10"
    preempt_and_exit(c)
    assert c.status["preemptionsWithoutProgress"] == 1


def test_an_exit_save_under_the_name_it_resumed_from_is_progress() -> None:
    """Until every save has a name of its own, an exit save may rewrite ``Net``: a newest
    checkpoint written after the stop was requested is progress whatever its name."""
    c = Cluster(job_body(), checkpoints=[ckpt("Net", 7, 1)])
    c.step()
    c.run(node_for={0: "node-a", 1: "node-b"})
    c.step()
    assert c.status["resumeFrom"] == "Net"
    c.checkpoints = [ckpt("Net", 50, 61)]  # 12:01, after the stop requested at 12:00
    preempt_and_exit(c)
    assert c.status["preemptionsWithoutProgress"] == 0
    assert "nextRestartTime" not in c.status


# --- peers that lost their connection to a rank that says nothing yet --------------------------


def peers_lost_rank_0(c: Cluster) -> None:
    """Ranks 1 and 2 fail on the broken connection at 12:00; rank 0's pod still reads Running
    (its node stopped reporting: nothing updates the pod, the node is not NotReady yet)."""
    c.exit(1, 1, RESET, finished_at=STAMP)
    c.exit(2, 1, RESET, finished_at=STAMP)


def test_peers_failing_on_a_lost_connection_wait_for_the_silent_rank() -> None:
    c = running(replicas=3)
    peers_lost_rank_0(c)
    d = c.decide()
    assert d.status == {"readyReplicas": 1, "ready": "1/3"}  # nothing counted, no phase change
    assert not d.delete and not d.events and d.graceful_exit is None
    assert d.requeue_after == 30.0  # re-decided within the bound, capped like every wait
    c.later(45)
    c.nodes["node-a"] = node("node-a", ready="Unknown")  # the node controller notices
    d = c.step()
    assert (c.status["stopReason"], c.status["preemptions"], c.status.get("restarts", 0)) == ("Preemption", 1, 0)
    assert "node node-a hosting rank 0 is NotReady" in c.status["stopMessage"]


def test_without_evidence_within_the_bound_the_lost_connection_is_a_failure() -> None:
    c = running(replicas=3)
    peers_lost_rank_0(c)
    c.later(59)
    d = c.decide()
    assert d.status == {"readyReplicas": 1, "ready": "1/3"} and d.requeue_after == pytest.approx(1)
    c.later(1)
    d = c.step()
    assert (c.status["stopReason"], c.status["restarts"]) == ("Failure", 1)
    assert d.delete == (ObjectRef("v1", "Pod", "demo-1-0"),)


def test_the_bound_is_a_setting_and_zero_waits_not_at_all() -> None:
    c = running(replicas=3)
    c.settings = OperatorSettings(peer_loss_grace_seconds=0)
    peers_lost_rank_0(c)
    d = c.decide()
    assert d.status is not None and d.status["stopReason"] == "Failure"


@pytest.mark.parametrize("error", ["RuntimeError: boom", "IsADirectoryError: [Errno 21] Is a directory: 'x'"])
def test_a_crash_that_is_not_a_lost_connection_does_not_wait(error: str) -> None:
    c = running(replicas=3)
    c.exit(1, 1, message("error", 1).replace('"reason"', f'"error":"{error}","reason"'), finished_at=STAMP)
    d = c.decide()
    assert d.status is not None and d.status["stopReason"] == "Failure"


def test_when_the_silent_rank_ends_without_evidence_it_is_one_failure_at_once() -> None:
    c = running(replicas=3)
    peers_lost_rank_0(c)
    c.later(5)
    c.exit(0, 137, finished_at="2026-01-01T12:00:04Z")
    d = c.decide()
    assert d.status is not None and (d.status["stopReason"], d.status["restarts"]) == ("Failure", 1)


def test_the_failure_names_the_crash_that_was_not_a_lost_connection() -> None:
    """Rank 1's own error is the cause; rank 0 only lost its connection to it."""
    c = running()
    c.exit(0, 1, RESET, finished_at="2026-01-01T12:00:01Z")
    c.exit(1, 1, message("error", 1).replace('"reason"', '"error":"IsADirectoryError: x","reason"'))
    d = c.decide()
    assert d.status is not None
    assert d.status["stopMessage"].startswith("rank 1 failed with exit 1: IsADirectoryError: x (and 1 more)")


# --- a node that stopped reporting: its pods never finish a deletion ---------------------------

FORCE = ObjectRef("v1", "Pod", "demo-1-0", grace_period_seconds=0)


def node_a_lost(c: Cluster, since: str = STAMP, **kw: Any) -> None:
    """node-a (rank 0) stopped reporting; the node controller marked it NotReady at ``since``.
    Rank 0's pod still reads Running: no kubelet is left to say otherwise."""
    c.nodes["node-a"] = node("node-a", ready="Unknown", since=since, **kw)


def test_a_rank_on_a_lost_node_is_force_deleted_once_the_node_is_gone_past_the_bound() -> None:
    """Today's bug: the rank on the lost node is deleted with its grace period, no kubelet ever
    finishes the deletion, and the job stays Stopping for ever."""
    c = running()
    node_a_lost(c)
    c.step()
    assert (c.status["phase"], c.status["stopReason"]) == ("Stopping", "Preemption")
    assert c.flag() == 1  # the rank on the healthy node is asked to save
    c.exit(1, 143, message("signal", 143, "CKP-1_40", 40))
    c.checkpoints = [ckpt("CKP-1_40", 40, 59)]
    c.later(29)
    d = c.step()
    assert FORCE not in d.delete and c.status["phase"] == "Stopping"
    assert d.requeue_after == pytest.approx(1)  # woken when the bound passes
    c.later(1)
    d = c.step()
    assert FORCE in d.delete
    assert ObjectRef("v1", "Pod", "demo-1-0") not in d.delete
    assert c.status["phase"] == "Restarting"
    del c.pods["demo-1-0"]  # grace 0: the API server removes it at once
    c.step()
    assert (c.status["phase"], c.status["incarnation"], c.status["resumeFrom"]) == ("Pending", 2, "CKP-1_40")
    assert (c.status["preemptions"], c.status.get("restarts", 0)) == (1, 0)


def test_the_force_deletion_bound_is_a_setting() -> None:
    c = running()
    c.settings = OperatorSettings(lost_node_force_delete_seconds=5)
    node_a_lost(c)
    c.step()
    c.exit(1, 143, message("signal", 143, "CKP-1_40", 40))
    c.later(5)
    assert FORCE in c.decide().delete


def test_a_pod_stuck_terminating_on_a_lost_node_is_force_deleted_after_a_failure() -> None:
    """A failure deletes the live ranks; one on a node that then stops reporting stays
    Terminating for ever without the force deletion."""
    c = running(replicas=3)
    c.exit(1, 1, message("error", 1))
    c.step()
    assert c.status["stopReason"] == "Failure"
    c.exit(2, 143)
    node_a_lost(c)
    c.later(30)
    d = c.step()
    assert FORCE in d.delete
    assert c.status["phase"] == "Restarting"


def test_an_out_of_service_node_releases_its_pods_at_once() -> None:
    """``node.kubernetes.io/out-of-service`` is the administrator saying the node is down for good
    (Kubernetes' non-graceful node shutdown): there is nothing to wait for."""
    c = running()
    c.nodes["node-a"] = node("node-a", taints=("node.kubernetes.io/out-of-service",))
    c.step()
    c.exit(1, 143, message("signal", 143, "CKP-1_40", 40))
    assert FORCE in c.decide().delete


def test_a_lost_node_without_a_transition_time_is_not_force_deleted() -> None:
    """Without a time the bound cannot be measured: wait for the node controller (or the
    taint manager's eviction) rather than force-delete a pod that may still run."""
    c = running()
    node_a_lost(c, since="")
    c.step()
    c.exit(1, 143, message("signal", 143, "CKP-1_40", 40))
    c.later(600)
    assert FORCE not in c.decide().delete


def test_restarting_force_deletes_a_straggler_on_a_lost_node() -> None:
    c = running()
    node_a_lost(c)
    c.status.update(phase="Restarting", stopReason="Preemption")
    c.later(30)
    d = c.decide()
    assert FORCE in d.delete


# A VM that vanishes resets none of its connections: the ranks on healthy nodes stay blocked in a
# collective with its rank and can never finish the agreed exit save.

EXAMPLE_GRACE = {"terminationGracePeriodSeconds": 60, "exitDeadlineSeconds": 45}  # examples/trainingjob.yaml
PEER_PROMPTLY = ObjectRef("v1", "Pod", "demo-1-1", grace_period_seconds=5)


def test_the_peers_of_a_rank_on_a_node_gone_for_good_are_deleted_promptly_not_after_the_deadline() -> None:
    """Without this the stop waits exitDeadlineSeconds (45 s from the node's verdict) and then
    the peer's grace period (60 s: SIGTERM does not reach a rank inside a collective)."""
    c = running(gracefulExit=EXAMPLE_GRACE)
    node_a_lost(c)
    c.step()
    assert (c.status["phase"], c.status["stopReason"]) == ("Stopping", "Preemption")
    c.checkpoints = [ckpt("CKP-1_40", 40, 59)]
    c.later(29)
    d = c.step()
    assert not d.delete, "a node that only blinked may still come back: its peer waits"
    c.later(1)
    d = c.step()
    assert d.delete == (PEER_PROMPTLY, FORCE)  # the peers first: a half-applied pass redoes them
    assert ("Warning", "PeersOfLostRankDeleted") in [(e.type, e.reason) for e in d.events]
    del c.pods["demo-1-0"]
    c.later(10)
    d = c.step()
    assert not d.delete and c.status["phase"] == "Stopping"  # deleting, with its short grace
    c.later(5)
    c.exit(1, 137)  # SIGKILLed by its kubelet after the 5 s
    c.vanish_deleted()
    c.step()
    c.step()
    assert (c.status["phase"], c.status["incarnation"], c.status["resumeFrom"]) == ("Pending", 2, "CKP-1_40")
    assert (c.status["preemptions"], c.status.get("restarts", 0)) == (1, 0)
    assert "ExitDeadlineExceeded" not in [r for _, r in c.events]


def test_a_half_applied_pass_deletes_the_lost_rank_without_deleting_its_peers_again() -> None:
    c = running(gracefulExit=EXAMPLE_GRACE)
    node_a_lost(c)
    c.step()
    c.later(30)
    c.apply(c.decide(), deletes=False)  # the operator died before any deletion
    d = c.decide()
    assert d.delete == (PEER_PROMPTLY, FORCE)
    c.pods["demo-1-1"]["metadata"].update(deletionTimestamp="2026-01-01T12:00:30Z", deletionGracePeriodSeconds=5)
    d = c.decide()  # only the peers' deletion was applied
    assert d.delete == (FORCE,)


def test_a_peer_deleted_past_the_deadline_with_its_grace_is_deleted_again_with_the_short_one() -> None:
    """A force-deletion bound longer than exitDeadlineSeconds: the peer was deleted at the deadline
    with its 60 s grace; the lost rank's release shortens it (a later deletion may)."""
    c = running(gracefulExit=EXAMPLE_GRACE)
    c.settings = OperatorSettings(lost_node_force_delete_seconds=50)
    node_a_lost(c)
    c.step()
    c.later(45)
    d = c.step()
    assert ObjectRef("v1", "Pod", "demo-1-1") in d.delete  # the deadline: its own grace period
    assert c.pods["demo-1-1"]["metadata"]["deletionGracePeriodSeconds"] == 60
    c.later(5)
    d = c.step()
    assert d.delete == (PEER_PROMPTLY, FORCE)
    assert PEER_PROMPTLY not in c.decide().delete  # shortened once


def test_a_peer_that_already_saved_and_exited_is_not_touched() -> None:
    c = running(replicas=3, gracefulExit=EXAMPLE_GRACE)
    node_a_lost(c)
    c.step()
    c.exit(1, 143, message("signal", 143, "CKP-1_40", 40))
    c.later(30)
    d = c.decide()
    assert d.delete == (ObjectRef("v1", "Pod", "demo-1-2", grace_period_seconds=5), FORCE)


# --- a rank that cannot start ------------------------------------------------------------------


def not_starting(c: Cluster, name: str, *, created: str = STAMP, unschedulable: bool = False,
                 waiting: tuple[str, str] | None = None) -> None:
    """The pod ``name`` was created at ``created`` and is still Pending: never scheduled, or its
    container waiting with ``waiting`` (reason, message)."""
    p = c.pods[name]
    p["metadata"]["creationTimestamp"] = created
    status: dict[str, Any] = {"phase": "Pending", "conditions": []}
    if unschedulable:
        p["spec"].pop("nodeName", None)
        status["conditions"].append({"type": "PodScheduled", "status": "False", "reason": "Unschedulable",
                                     "message": "0/2 nodes are available: 2 node(s) didn't match Pod's node "
                                                "affinity/selector."})
    if waiting:
        status["containerStatuses"] = [{"name": "train", "state": {"waiting": {"reason": waiting[0],
                                                                               "message": waiting[1]}}}]
    p["status"] = status


def pending_with_rank_1_not_starting(**kw: Any) -> Cluster:
    c = Cluster(job_body())
    c.step()
    c.run()
    for p in c.pods.values():
        p["metadata"]["creationTimestamp"] = STAMP
    not_starting(c, "demo-1-1", **kw)
    c.step()
    assert c.status["phase"] == "Pending"
    return c


@pytest.mark.parametrize(
    ("kw", "reason"),
    [
        ({"unschedulable": True}, "Unschedulable: 0/2 nodes are available"),
        ({"waiting": ("ImagePullBackOff", "Back-off pulling image \"nope:1\"")}, "ImagePullBackOff: Back-off pulling"),
        ({"waiting": ("CreateContainerConfigError", "secret \"s3-creds\" not found")},
         "CreateContainerConfigError: secret \"s3-creds\" not found"),
    ],
    ids=["unschedulable", "image-pull-back-off", "missing-credentials-secret"],
)
def test_a_rank_that_cannot_start_tears_the_incarnation_down_after_the_startup_timeout(
        kw: dict[str, Any], reason: str) -> None:
    """Today's bug: the other ranks block in the rendezvous for its whole timeout, then crash."""
    c = pending_with_rank_1_not_starting(**kw)
    c.later(599)
    d = c.step()
    assert c.status["phase"] == "Pending" and not d.delete
    assert d.requeue_after == pytest.approx(1)
    c.later(1)
    d = c.step()
    assert (c.status["phase"], c.status["stopReason"], c.status["restarts"]) == ("Stopping", "StartupTimeout", 1)
    assert f"rank 1 (pod demo-1-1) did not start within 600s: {reason}" in c.status["stopMessage"]
    assert set(d.delete) == {ObjectRef("v1", "Pod", "demo-1-0"), ObjectRef("v1", "Pod", "demo-1-1")}
    ready = next(x for x in c.status["conditions"] if x["type"] == "Ready")
    assert reason in ready["message"]
    assert [e.reason for e in d.events] == ["StartupTimeout"]
    c.vanish_deleted()
    c.step()
    assert c.status["phase"] == "Restarting" and c.status["nextRestartTime"]  # with backoff


@pytest.mark.parametrize(
    ("kw", "reason"),
    [
        ({"unschedulable": True}, "Unschedulable: 0/2 nodes are available"),
        ({"waiting": ("CreateContainerConfigError", "secret \"s3-creds\" not found")},
         "CreateContainerConfigError: secret \"s3-creds\" not found"),
    ],
    ids=["unschedulable", "missing-credentials-secret"],
)
def test_the_pods_reason_stays_in_ready_during_the_backoff_after_a_startup_timeout(
        kw: dict[str, Any], reason: str) -> None:
    """``kubectl get tj`` shows Ready's message: during the backoff it still says why the rank
    could not start, not only that the job restarts."""
    c = pending_with_rank_1_not_starting(**kw)
    c.later(600)
    c.step()
    c.vanish_deleted()
    c.step()
    assert c.status["phase"] == "Restarting"
    ready = next(x for x in c.status["conditions"] if x["type"] == "Ready")
    assert (ready["status"], ready["reason"]) == ("False", "Restarting")
    assert f"StartupTimeout: rank 1 (pod demo-1-1) did not start within 600s: {reason}" in ready["message"]
    assert "restart 1/" in ready["message"]


def test_a_crashed_ranks_detail_stays_in_ready_during_the_backoff() -> None:
    c = crashed()
    ready = next(x for x in c.status["conditions"] if x["type"] == "Ready")
    assert c.status["phase"] == "Restarting" and ready["reason"] == "Restarting"
    assert c.status["stopMessage"] in ready["message"]


def test_the_startup_timeout_is_a_spec_field() -> None:
    c = Cluster(job_body(startupTimeoutSeconds=30))
    c.step()
    c.run()
    not_starting(c, "demo-1-0", unschedulable=True)
    c.later(30)
    c.step()
    assert c.status["stopReason"] == "StartupTimeout"


def test_a_rank_that_never_starts_fails_the_job_past_max_restarts() -> None:
    c = pending_with_rank_1_not_starting(unschedulable=True)
    c.body["spec"]["maxRestarts"] = 0
    c.later(600)
    c.step()
    c.vanish_deleted()
    c.step()
    assert c.status["phase"] == "Failed"
    failed = next(x for x in c.status["conditions"] if x["type"] == "Failed")
    assert "did not start within 600s: Unschedulable" in failed["message"]


def test_running_ranks_never_time_out() -> None:
    c = running()
    for p in c.pods.values():
        p["metadata"]["creationTimestamp"] = STAMP
    c.later(3600)
    assert c.decide().empty


# --- success policy: rank 0 decides ------------------------------------------------------------

DONE = message("completed", 0, "CKP-3_1", 300)


def test_ranks_still_running_after_rank_0_finished_are_stopped_at_the_exit_deadline_and_the_job_succeeds() -> None:
    """Rank 0's completion is the job's (the rule of PyTorchJob's master); a peer still running
    then — typically blocked in a collective rank 0 will never join — is given
    exitDeadlineSeconds, not its collective timeout."""
    c = running(replicas=3)
    c.exit(0, 0, DONE, finished_at=STAMP)
    c.exit(1, 0, DONE, finished_at=STAMP)
    d = c.step()
    assert c.status["phase"] == "Running" and not d.delete
    assert d.requeue_after == 30.0  # the 60 s deadline, re-decided within the cap
    c.later(60)
    d = c.step()
    assert (c.status["phase"], c.status["stopReason"]) == ("Stopping", "Completion")
    assert d.delete == (ObjectRef("v1", "Pod", "demo-1-2"),)
    c.exit(2, 143)
    d = c.step()
    assert c.status["phase"] == "Succeeded"
    assert (c.status.get("restarts", 0), c.status.get("preemptions", 0)) == (0, 0)
    assert "Succeeded" in [e.reason for e in d.events]


def test_peers_losing_rank_0_as_it_finishes_do_not_fail_the_job() -> None:
    c = running()
    c.exit(0, 0, DONE, finished_at=STAMP)
    c.exit(1, 1, RESET, finished_at=STAMP)
    c.step()
    assert c.status["phase"] == "Succeeded"
    assert c.status.get("restarts", 0) == 0


def test_a_real_crash_after_rank_0_finished_is_still_a_failure() -> None:
    c = running()
    c.exit(0, 0, DONE, finished_at=STAMP)
    c.exit(1, 1, message("error", 1), finished_at=STAMP)
    c.step()
    assert (c.status["stopReason"], c.status["restarts"]) == ("Failure", 1)


def test_another_rank_finishing_first_waits_for_rank_0() -> None:
    c = running()
    c.exit(1, 0, DONE, finished_at=STAMP)
    c.later(3600)
    d = c.step()
    assert c.status["phase"] == "Running" and not d.delete
