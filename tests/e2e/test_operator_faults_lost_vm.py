"""A node that vanishes as a VM does: its rank is frozen, not killed (docs/operator.md, "A node
that stops reporting").

`reclaim(node)` (tests/e2e/test_operator_faults_nodes.py) SIGKILLs the node's processes here on
this machine, so its peer sees "connection reset" at once and crashes. A VM that is powered
off or cut from the network resets nothing: its TCP connections stay open and nobody answers,
so the rank on the healthy node stays blocked in the collective with it (gloo's timeout is
30 min) and can neither save nor notice SIGTERM. `vanish(node)` makes that fault: heartbeats
stop and the node's processes are SIGSTOPped. The job runs examples/trainingjob.yaml's own
`exitDeadlineSeconds` (45) and `terminationGracePeriodSeconds` (60), which a stop must not wait
out for a rank that can no longer save.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import pytest

from controlplane import NODE_MONITOR_GRACE_SECONDS

if TYPE_CHECKING:  # the fixtures' types; conftest modules are not importable by name in one session
    from conftest import Env

pytestmark = pytest.mark.cluster

#: docs/operator.md: a job whose node stops reporting is back within two minutes of it by
#: default (the node-monitor grace period, 50 s by default and 40 s here, +
#: TORPOR_LOST_NODE_FORCE_DELETE_SECONDS 30 s + the restart).
NODE_LOST_BOUND_SECONDS = 120.0


def test_a_vanished_vm_whose_rank_hangs_its_peer_resumes_from_the_newest_checkpoint_within_the_bound(
        e2e: Env) -> None:
    e2e.create(e2e.example("--losses", str(e2e.losses()), "--step-delay", "0.05"))
    e2e.wait_phase("Running", timeout=120)
    e2e.wait("a periodic checkpoint", lambda: e2e.status().get("lastCheckpoint"), timeout=120)
    node = e2e.node_of("mlp-1-1")
    assert e2e.node_of("mlp-1-0") != node, "both ranks on one node: no healthy peer to hang"
    saved_before = e2e.status()["lastCheckpoint"]["step"]

    lost_at = time.monotonic()
    frozen = e2e.agent.vanish(node)
    try:
        assert frozen, f"no process stopped on {node}"
        status = e2e.wait_phase("Running", incarnation=2, timeout=NODE_LOST_BOUND_SECONDS + 120)
        back_after = time.monotonic() - lost_at
        print(f"node {node} vanished (rank frozen) -> incarnation 2 Running after {back_after:.1f}s "
              f"(node-monitor grace {NODE_MONITOR_GRACE_SECONDS}s)")
        assert back_after < NODE_LOST_BOUND_SECONDS, back_after
        assert (status["preemptions"], status.get("restarts", 0)) == (1, 0), status
        resumed = next(c for c in e2e.checkpoints() if c.name == status["resumeFrom"])
        assert resumed.complete and resumed.step >= saved_before, (resumed, saved_before)
        new = [p for p in e2e.pods() if p["metadata"]["labels"]["torpor.dev/incarnation"] == "2"]
        assert node not in {p["spec"]["nodeName"] for p in new}, new
        assert all(p["metadata"]["annotations"]["torpor.dev/resume-from"] == resumed.name for p in new)
        events = e2e.reasons()
        assert "Preempted" in events and "LostNodePodDeleted" in events and "RankFailed" not in events, events
    finally:
        e2e.agent.restore(node)
        e2e.agent.wait_ready(NODE_MONITOR_GRACE_SECONDS + 60)
