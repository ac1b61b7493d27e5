"""How a rank ended, from its exit code and termination message; what the views read from pods and nodes."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest
from test_operator_world import message, node, pod

from torpor.checkpoints import Checkpoint
from torpor.termination import StopReason, TerminationMessage
from torpor_operator.contract import ANNOTATION_RESUME_FROM
from torpor_operator.observing import (
    CheckpointInfo,
    NodeView,
    PodView,
    checkpoint_infos,
    format_time,
    newest_complete,
    parse_time,
    preemption_signals,
)
from torpor_operator.outcomes import RULES, Outcome, classify, facts, rules_table


def view(p: dict) -> PodView:
    v = PodView.from_dict(p, "train")
    assert v is not None
    return v


@pytest.mark.parametrize(
    ("code", "text", "k8s_reason", "outcome", "checkpoint"),
    [
        (143, message("signal", 143, "Net", 40), "Error", Outcome.CRASHED, "Net"),
        (75, message("file", 75, "Net", 40), "Error", Outcome.STOPPED, "Net"),
        (0, message("completed", 0, "CKP-9_9", 99), "Completed", Outcome.FINISHED, "CKP-9_9"),
        (1, message("error", 1), "Error", Outcome.CRASHED, None),
        (0, message("error", 0), "Completed", Outcome.CRASHED, None),
        (0, "", "Completed", Outcome.FINISHED, None),
        (75, "", "Error", Outcome.STOPPED, None),
        (137, "", "OOMKilled", Outcome.CRASHED, None),
        (137, "", "Error", Outcome.CRASHED, None),
        (143, "", "Error", Outcome.CRASHED, None),
        (134, "", "Error", Outcome.CRASHED, None),
        (139, "", "Error", Outcome.CRASHED, None),
        (1, "Traceback (most recent call last):\nRuntimeError: boom", "Error", Outcome.CRASHED, None),
        (2, "{not json", "Error", Outcome.CRASHED, None),
        (1, '{"reason": "signal"}', "Error", Outcome.CRASHED, None),
    ],
    ids=["signal-saved-without-evidence", "file-saved", "completed", "error", "error-exit-0", "exit-0-no-message",
         "exit-75-no-message", "oom", "sigkill", "sigterm-unsaved", "sigabrt", "sigsegv", "traceback-tail",
         "broken-json", "json-without-exit-code"],
)
def test_classification_without_evidence(code: int, text: str, k8s_reason: str, outcome: Outcome,
                                         checkpoint: str | None) -> None:
    """Nothing says the rank was disrupted: every end but a completion or an explicit request is a failure."""
    result = classify(view(pod("demo", 1, 3, exit_code=code, term_message=text, term_reason=k8s_reason)))
    assert result.outcome is outcome
    assert result.checkpoint == checkpoint
    assert result.rank == 3
    assert result.detail.startswith("rank 3 ")


@pytest.mark.parametrize(
    ("code", "text", "outcome"),
    [
        (143, message("signal", 143, "Net", 40), Outcome.STOPPED),
        (130, message("signal", 130, "Net", 40), Outcome.STOPPED),
        (143, message("signal", 143), Outcome.STOPPED),
        (137, "", Outcome.KILLED),
        (143, "", Outcome.KILLED),
        (134, "", Outcome.KILLED),
        (1, message("error", 1), Outcome.CRASHED),
        (1, "", Outcome.CRASHED),
    ],
    ids=["sigterm-saved", "sigint-saved", "signal-nothing-saved", "sigkill", "sigterm-unsaved", "sigabrt",
         "error-message", "exit-1"],
)
@pytest.mark.parametrize(
    "evidence",
    [{"deleting": True}, {"disruption": "EvictionByEvictionAPI"}, {"disruption": "DeletionByTaintManager"},
     {"status_reason": "Evicted"}, {"status_reason": "Shutdown"}],
    ids=["deleted", "evicted", "taint-manager", "evicted-by-kubelet", "node-shutdown"],
)
def test_a_signal_is_a_preemption_only_with_evidence(code: int, text: str, outcome: Outcome,
                                                     evidence: dict) -> None:
    result = classify(view(pod("demo", 1, 3, exit_code=code, term_message=text, **evidence)))
    assert result.outcome is outcome, result.detail


@pytest.mark.parametrize(
    ("the_node", "outcome"),
    [(node("a"), Outcome.CRASHED), (node("a", unschedulable=True), Outcome.KILLED),
     (node("a", taints=("ToBeDeletedByClusterAutoscaler",)), Outcome.KILLED),
     (node("a", taints=("node.kubernetes.io/unreachable",)), Outcome.KILLED),
     (node("a", ready="Unknown"), Outcome.KILLED), (node("a", ready="False"), Outcome.KILLED)],
    ids=["healthy", "cordoned", "termination-taint", "unreachable", "not-reporting", "not-ready"],
)
def test_the_node_going_away_or_lost_is_evidence(the_node: dict, outcome: Outcome) -> None:
    p = view(pod("demo", 1, 0, node="a", exit_code=137))
    result = classify(p, NodeView.from_dict(the_node), ("ToBeDeletedByClusterAutoscaler",))
    assert result.outcome is outcome, result.detail


def test_sigabrt_says_which_signal_and_that_nothing_disrupted_it() -> None:
    result = classify(view(pod("demo", 1, 2, exit_code=134)))
    assert result.detail == "rank 2 was ended by signal 6 (SIGABRT) (exit 134) with no disruption in sight"


@pytest.mark.parametrize("reason", ["UnexpectedAdmissionError", "OutOfcpu", "OutOfmemory", "OutOfpods",
                                    "OutOfnvidia.com/gpu", "NodeAffinity"])
def test_a_pod_the_kubelet_refused_is_rejected_not_failed(reason: str) -> None:
    p = pod("demo", 1, 1, phase="Failed", status_reason=reason)
    p["status"]["message"] = "Pod was rejected: Node didn't have enough resource"
    result = classify(view(p))
    assert result.outcome is Outcome.REJECTED
    assert result.detail == (f"rank 1 was rejected by the kubelet of its node ({reason}: "
                             "Pod was rejected: Node didn't have enough resource)")


def test_a_failed_init_container_is_a_failure() -> None:
    p = pod("demo", 1, 0, phase="Failed")
    p["spec"]["initContainers"] = [{"name": "fetch"}]
    p["status"]["initContainerStatuses"] = [
        {"name": "fetch", "state": {"terminated": {"exitCode": 2, "reason": "Error"}}}]
    p["status"]["containerStatuses"] = [{"name": "train", "state": {"waiting": {"reason": "PodInitializing"}}}]
    result = classify(view(p))
    assert result.outcome is Outcome.CRASHED
    assert result.detail == "rank 0 could not start: init container fetch exited 2 (Error)"


def test_a_native_sidecar_ended_with_its_pod_is_no_init_failure() -> None:
    p = pod("demo", 1, 0, exit_code=0)
    p["spec"]["initContainers"] = [{"name": "logs", "restartPolicy": "Always"}]
    p["status"]["initContainerStatuses"] = [
        {"name": "logs", "state": {"terminated": {"exitCode": 143, "reason": "Error"}}}]
    assert view(p).init_failure is None
    assert classify(view(p)).outcome is Outcome.FINISHED


def test_an_init_container_killed_by_a_drain_is_a_preemption() -> None:
    p = pod("demo", 1, 0, phase="Failed", deleting=True)
    p["status"]["initContainerStatuses"] = [
        {"name": "fetch", "state": {"terminated": {"exitCode": 143, "reason": "Error"}}}]
    assert classify(view(p)).outcome is Outcome.KILLED


def test_active_deadline_seconds_is_a_failure() -> None:
    p = pod("demo", 1, 0, exit_code=137, status_reason="DeadlineExceeded")
    result = classify(view(p))
    assert result.outcome is Outcome.CRASHED
    assert "activeDeadlineSeconds" in result.detail


def test_a_failed_pod_without_an_exit_or_evidence_is_a_failure() -> None:
    result = classify(view(pod("demo", 1, 0, phase="Failed")))
    assert result.outcome is Outcome.CRASHED
    assert result.detail == "rank 0 ended without an exit code (no exit status)"


def resize_refused(text: str = "ResizeError: global_batch_size=4 cannot be split over 3 rank(s)") -> str:
    return TerminationMessage(StopReason.ERROR, 1, error=text).to_json()


def test_a_resize_error_is_a_failure_naming_the_world_size_and_checkpoint_refused() -> None:
    """A script that cannot resume its checkpoint on this ``WORLD_SIZE`` says so with
    ``torpor.ResizeError``; the detail (Events, conditions) names the size and the checkpoint."""
    p = pod("demo", 2, 1, exit_code=1, term_message=resize_refused(), annotations={ANNOTATION_RESUME_FROM: "Net"})
    p["spec"]["containers"] = [{"name": "train", "env": [{"name": "WORLD_SIZE", "value": "3"}]}]
    result = classify(view(p))
    assert result.outcome is Outcome.CRASHED
    assert result.detail == ("rank 1 cannot resume checkpoint Net on WORLD_SIZE 3: ResizeError: "
                             "global_batch_size=4 cannot be split over 3 rank(s)")
    other = classify(view(pod("demo", 2, 1, exit_code=1, term_message=resize_refused("ValueError: ResizeError"))))
    assert other.detail == "rank 1 failed with exit 1: ValueError: ResizeError"


def test_every_rule_of_the_table_is_reached() -> None:
    """Each row decides at least one case above: no dead row in the documented table."""
    cases = [
        pod("demo", 1, 0, exit_code=143, term_message=message("signal", 143), deleting=True),
        pod("demo", 1, 0, exit_code=75, term_message=message("file", 75)),
        pod("demo", 1, 0, exit_code=143, term_message=message("signal", 143)),
        pod("demo", 1, 0, exit_code=0, term_message=message("completed", 0)),
        pod("demo", 1, 0, exit_code=1, term_message=resize_refused()),
        pod("demo", 1, 0, exit_code=1, term_message=message("error", 1)),
        pod("demo", 1, 0, exit_code=0),
        pod("demo", 1, 0, exit_code=75),
        pod("demo", 1, 0, phase="Failed", status_reason="OutOfcpu"),
        pod("demo", 1, 0, exit_code=137, status_reason="DeadlineExceeded"),
        pod("demo", 1, 0, exit_code=137, term_reason="OOMKilled"),
        pod("demo", 1, 0, exit_code=137, deleting=True),
        {**pod("demo", 1, 0, phase="Failed"), "status": {"phase": "Failed", "initContainerStatuses": [
            {"name": "i", "state": {"terminated": {"exitCode": 1}}}]}},
        pod("demo", 1, 0, exit_code=139),
        pod("demo", 1, 0, phase="Failed"),
        pod("demo", 1, 0, exit_code=3),
    ]
    reached = [next(n for n, rule in enumerate(RULES) if rule.applies(facts(view(p)))) for p in cases]
    assert reached == list(range(len(RULES)))


def test_the_documented_table_is_the_table() -> None:
    """docs/operator.md shows ``rules_table()`` between its markers; a change of RULES changes the docs."""
    doc = (Path(__file__).resolve().parents[2] / "docs" / "operator.md").read_text()
    begin, end = "<!-- BEGIN outcome rules: tests/unit/test_operator_outcomes.py keeps this equal to " \
                 "torpor_operator.outcomes.rules_table() -->", "<!-- END outcome rules -->"
    assert begin in doc and end in doc, "docs/operator.md lacks the outcome-rules markers"
    shown = doc.split(begin, 1)[1].split(end, 1)[0].strip()
    assert shown == rules_table(), "docs/operator.md: paste torpor_operator.outcomes.rules_table() between the markers"


def test_a_crash_detail_carries_the_last_log_line() -> None:
    text = "Traceback (most recent call last):\nRuntimeError: boom"
    result = classify(view(pod("demo", 1, 0, exit_code=1, term_message=text)))
    assert result.detail.endswith("RuntimeError: boom")


def test_running_and_pending_ranks_are_active() -> None:
    assert classify(view(pod("demo", 1, 0))).outcome is Outcome.ACTIVE
    assert classify(view(pod("demo", 1, 0, phase="Pending"))).outcome is Outcome.ACTIVE


def test_a_failed_pod_without_a_container_exit_was_killed() -> None:
    result = classify(view(pod("demo", 1, 0, phase="Failed", status_reason="Evicted")))
    assert result.outcome is Outcome.KILLED
    assert "Evicted" in result.detail


def test_node_view_reads_readiness() -> None:
    assert NodeView.from_dict(node("n")).lost() is None
    assert NodeView.from_dict(node("n", ready="Unknown")).lost() == "NotReady (Ready=Unknown)"
    assert NodeView.from_dict(node("n", taints=("node.kubernetes.io/unreachable",))).lost() == (
        "tainted node.kubernetes.io/unreachable")


def test_pod_view_reads_the_fields_decisions_need() -> None:
    p = pod("demo", 2, 1, node="n1", deleting=True, disruption="PreemptionByScheduler",
            annotations={"torpor.dev/resume-from": "Net", "torpor.dev/exit-requested-at": "t"})
    v = view(p)
    assert (v.name, v.incarnation, v.rank, v.node, v.ready, v.deleting) == ("demo-2-1", 2, 1, "n1", True, True)
    assert v.disruption == "PreemptionByScheduler"
    assert (v.resume_from, v.exit_requested_at) == ("Net", "t")
    assert not v.terminated


def test_pods_without_torpor_labels_are_ignored() -> None:
    p = pod("demo", 1, 0)
    del p["metadata"]["labels"]["torpor.dev/rank"]
    assert PodView.from_dict(p, "train") is None
    p["metadata"]["labels"]["torpor.dev/rank"] = "x"
    assert PodView.from_dict(p, "train") is None


def test_a_false_disruption_target_is_no_signal() -> None:
    p = pod("demo", 1, 0)
    p["status"]["conditions"].append({"type": "DisruptionTarget", "status": "False"})
    assert view(p).disruption is None


def test_node_view_and_going_away() -> None:
    taints = ("ToBeDeletedByClusterAutoscaler",)
    assert NodeView.from_dict(node("n")).going_away(taints) is None
    assert NodeView.from_dict(node("n", unschedulable=True)).going_away(taints) == "cordoned"
    tainted = NodeView.from_dict(node("n", taints=("x", "ToBeDeletedByClusterAutoscaler")))
    assert tainted.going_away(taints) == "tainted ToBeDeletedByClusterAutoscaler"
    assert tainted.going_away(()) is None


def test_preemption_signals_skip_ended_ranks_and_order_by_rank() -> None:
    pods = [view(pod("demo", 1, 1, node="a", deleting=True)), view(pod("demo", 1, 0, node="a")),
            view(pod("demo", 1, 2, node="a", exit_code=143))]
    nodes = {"a": NodeView.from_dict(node("a", unschedulable=True))}
    assert preemption_signals(pods, nodes, ()) == [
        "node a hosting rank 0 is cordoned",
        "rank 1 (pod demo-1-1) is being deleted",
        "node a hosting rank 1 is cordoned",
    ]


def test_times_round_trip() -> None:
    t = datetime(2026, 1, 1, 12, 0, 5, tzinfo=UTC)
    assert format_time(t) == "2026-01-01T12:00:05Z"
    assert parse_time("2026-01-01T12:00:05Z") == t
    assert parse_time(None) is None and parse_time("") is None


def test_newest_complete_orders_like_the_runtime() -> None:
    t = datetime(2026, 1, 1, tzinfo=UTC)
    infos = [CheckpointInfo("a", 10, t, True), CheckpointInfo("b", 5, t.replace(hour=1), True),
             CheckpointInfo("c", 20, t.replace(hour=2), False)]
    newest = newest_complete(infos)
    assert newest is not None and newest.name == "b"  # newest by time, as torpor.checkpoints.newest_complete
    assert newest_complete([]) is None
    assert newest_complete([infos[2]]) is None


def test_checkpoint_infos_adapt_the_runtime_scan() -> None:
    scanned = [Checkpoint(name="CKP-1_5", keys=("rank_0/CKP-1_5.ckpt",), modified=1_767_225_600.0, manifests={},
                          problem="no rank has written its manifest")]
    (info,) = checkpoint_infos(scanned)
    assert info == CheckpointInfo("CKP-1_5", 5, datetime(2026, 1, 1, tzinfo=UTC), False)
