"""Faults of nodes and rank processes, injected under examples/trainingjob.yaml with real torch
ranks: a node lost without a drain (a reclaimed spot VM), a rank that aborts (SIGABRT), and
rank 0 SIGKILLed without notice while its peers crash on the broken connection.

The node agent's fault hooks (`hack/node_agent.py`) make the faults: `reclaim(node)` stops the
node's heartbeats and SIGKILLs its pods' processes with no status update; signals go to the
rank's own process (the container's pid, `containerID` ``torpor://PID``). What is asserted is
what docs/operator.md's "Faults" table promises.
"""

from __future__ import annotations

import os
import signal
import time
from typing import TYPE_CHECKING

import pytest

from controlplane import NODE_MONITOR_GRACE_SECONDS

if TYPE_CHECKING:  # the fixtures' types; conftest modules are not importable by name in one session
    from conftest import Env

pytestmark = pytest.mark.cluster

#: docs/operator.md: a job whose node stops reporting is back within two minutes by default
#: (Kubernetes' 50 s node-monitor grace period + TORPOR_LOST_NODE_FORCE_DELETE_SECONDS 30 s +
#: the restart). The control plane here notices in 40 s (`NODE_MONITOR_GRACE_SECONDS`).
NODE_LOST_BOUND_SECONDS = 120.0


def rank_pid(e2e: Env, pod: str) -> int:
    """The rank's process: the container's pid (the node agent execs the command in place)."""
    status = e2e.pod(pod)["status"]["containerStatuses"][0]
    return int(status["containerID"].removeprefix("torpor://"))


def assert_back_off_the_lost_node(e2e: Env, node: str, lost_at: float, saved_before: int, how: str, *,
                                  wait: float) -> None:
    """What a user checks after losing a node: incarnation 2 Running within the documented bound
    of the loss, one preemption and no restart, resumed from a complete checkpoint at least as
    new as the last one before the loss, and no new rank on the lost node."""
    status = e2e.wait_phase("Running", incarnation=2, timeout=wait)
    back_after = time.monotonic() - lost_at
    print(f"node {node} {how} -> incarnation 2 Running after {back_after:.1f}s "
          f"(node-monitor grace {NODE_MONITOR_GRACE_SECONDS}s)")
    assert back_after < NODE_LOST_BOUND_SECONDS, back_after
    assert (status["preemptions"], status.get("restarts", 0)) == (1, 0), status
    resumed = next(c for c in e2e.checkpoints() if c.name == status["resumeFrom"])
    assert resumed.complete and resumed.step >= saved_before, (resumed, saved_before)
    new = [p for p in e2e.pods() if p["metadata"]["labels"]["torpor.dev/incarnation"] == "2"]
    assert node not in {p["spec"]["nodeName"] for p in new}, new
    assert all(p["metadata"]["annotations"]["torpor.dev/resume-from"] == resumed.name for p in new)


def test_node_lost_without_a_drain_resumes_from_the_newest_checkpoint_within_the_bound(e2e: Env) -> None:
    e2e.create(e2e.example("--losses", str(e2e.losses()), "--step-delay", "0.05"))
    e2e.wait_phase("Running", timeout=120)
    e2e.wait("a periodic checkpoint", lambda: e2e.status().get("lastCheckpoint"), timeout=120)
    node = e2e.node_of("mlp-1-0")
    saved_before = e2e.status()["lastCheckpoint"]["step"]

    lost_at = time.monotonic()
    killed = e2e.agent.reclaim(node)
    try:
        assert killed, f"no process killed on {node}"
        assert_back_off_the_lost_node(e2e, node, lost_at, saved_before, "lost", wait=NODE_LOST_BOUND_SECONDS + 60)
        assert not [p for p in e2e.pods() if p["metadata"]["labels"]["torpor.dev/incarnation"] == "1"
                    and p["spec"]["nodeName"] == node], "the lost node's rank was force-deleted"
        events = e2e.reasons()
        assert "Preempted" in events and "RankFailed" not in events, events
    finally:
        e2e.agent.restore(node)
        e2e.agent.wait_ready(NODE_MONITOR_GRACE_SECONDS + 60)


def test_rank_sigabrt_restarts_with_backoff_then_fails_past_max_restarts(e2e: Env) -> None:
    e2e.create(e2e.example("--losses", str(e2e.losses()), "--step-delay", "0.05", maxRestarts=1))
    e2e.wait_phase("Running", timeout=120)
    e2e.wait("a periodic checkpoint", lambda: e2e.status().get("lastCheckpoint"), timeout=120)

    os.kill(rank_pid(e2e, "mlp-1-1"), signal.SIGABRT)
    status = e2e.wait_phase("Running", incarnation=2, timeout=120)
    assert (status["restarts"], status.get("preemptions", 0)) == (1, 0), status
    events = e2e.reasons()
    assert [r for r in events if r in ("RankFailed", "Preempted")] == ["RankFailed"], events

    os.kill(rank_pid(e2e, "mlp-2-0"), signal.SIGABRT)
    failed = e2e.wait_phase("Failed", timeout=120)
    assert (failed["restarts"], failed.get("preemptions", 0), failed["incarnation"]) == (1, 0, 2), failed
    condition = next(c for c in failed["conditions"] if c["type"] == "Failed")
    assert condition["reason"] == "MaxRestartsExceeded", condition
    assert "SIGABRT" in condition["message"], condition


def test_rank_0_sigkilled_without_notice_and_its_crashing_peers_are_one_failure(e2e: Env) -> None:
    e2e.create(e2e.example("--losses", str(e2e.losses()), "--step-delay", "0.05"))
    e2e.wait_phase("Running", timeout=120)
    e2e.wait("a periodic checkpoint", lambda: e2e.status().get("lastCheckpoint"), timeout=120)

    os.kill(rank_pid(e2e, "mlp-1-0"), signal.SIGKILL)
    status = e2e.wait_phase("Running", incarnation=2, timeout=120)
    assert (status["restarts"], status.get("preemptions", 0)) == (1, 0), status
    events = e2e.reasons()
    assert [r for r in events if r in ("RankFailed", "Preempted")] == ["RankFailed"], events
    assert e2e.status()["restarts"] == 1  # counted once, not again by a later reconcile


def test_a_rank_that_never_schedules_times_out_with_its_reason_and_is_retried(e2e: Env) -> None:
    body = e2e.example("--losses", str(e2e.losses()), "--step-delay", "0.05", startupTimeoutSeconds=10)
    body["spec"]["template"]["spec"]["nodeSelector"] = {"torpor.dev/no-such-pool": "true"}
    e2e.create(body)
    stopped = e2e.wait("the startup timeout", lambda: (st := e2e.status()).get("restarts") == 1 and st, timeout=90)
    assert stopped["stopReason"] == "StartupTimeout", stopped
    assert "did not start within 10s: Unschedulable" in stopped["stopMessage"], stopped
    # The pod's own reason is kept in the status (Ready shows it too while Stopping, but under
    # load the job may already be Restarting when this is read, so the stop message is asserted).
    assert "node affinity/selector" in stopped["stopMessage"], stopped
    assert "StartupTimeout" in e2e.reasons()

    # the cause fixed, the retry (a new incarnation, after the backoff) runs
    e2e.patch({"template": {"spec": {"nodeSelector": None}}})
    status = e2e.wait_phase("Running", timeout=120)
    assert status["incarnation"] >= 2 and status.get("preemptions", 0) == 0, status
