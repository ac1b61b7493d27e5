"""How a rank ended, from its exit code and termination message; what the views read from pods and nodes."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from test_operator_world import message, node, pod

from torpor.checkpoints import Checkpoint
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
from torpor_operator.outcomes import Outcome, classify


def view(p: dict) -> PodView:
    v = PodView.from_dict(p, "train")
    assert v is not None
    return v


@pytest.mark.parametrize(
    ("code", "text", "k8s_reason", "outcome", "checkpoint"),
    [
        (143, message("signal", 143, "Net", 40), "Error", Outcome.STOPPED, "Net"),
        (130, message("signal", 130, "Net", 40), "Error", Outcome.STOPPED, "Net"),
        (75, message("file", 75, "Net", 40), "Error", Outcome.STOPPED, "Net"),
        (143, message("signal", 143), "Error", Outcome.STOPPED, None),
        (0, message("completed", 0, "CKP-9_9", 99), "Completed", Outcome.FINISHED, "CKP-9_9"),
        (1, message("error", 1), "Error", Outcome.CRASHED, None),
        (0, message("error", 0), "Completed", Outcome.CRASHED, None),
        (0, "", "Completed", Outcome.FINISHED, None),
        (75, "", "Error", Outcome.STOPPED, None),
        (137, "", "OOMKilled", Outcome.CRASHED, None),
        (137, "", "Error", Outcome.KILLED, None),
        (143, "", "Error", Outcome.KILLED, None),
        (1, "Traceback (most recent call last):\nRuntimeError: boom", "Error", Outcome.CRASHED, None),
        (2, "{not json", "Error", Outcome.CRASHED, None),
        (1, '{"reason": "signal"}', "Error", Outcome.CRASHED, None),
    ],
    ids=["sigterm-saved", "sigint-saved", "file-saved", "stopped-nothing-saved", "completed", "error",
         "error-exit-0", "exit-0-no-message", "exit-75-no-message", "oom", "sigkill", "sigterm-unsaved",
         "traceback-tail", "broken-json", "json-without-exit-code"],
)
def test_classification(code: int, text: str, k8s_reason: str, outcome: Outcome, checkpoint: str | None) -> None:
    result = classify(view(pod("demo", 1, 3, exit_code=code, term_message=text, term_reason=k8s_reason)))
    assert result.outcome is outcome
    assert result.checkpoint == checkpoint
    assert result.rank == 3
    assert result.detail.startswith("rank 3 ")


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
