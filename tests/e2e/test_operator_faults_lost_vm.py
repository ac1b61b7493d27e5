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
from test_operator_faults_nodes import NODE_LOST_BOUND_SECONDS, assert_back_off_the_lost_node

from controlplane import NODE_MONITOR_GRACE_SECONDS

if TYPE_CHECKING:  # the fixtures' types; conftest modules are not importable by name in one session
    from conftest import Env

pytestmark = pytest.mark.cluster

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
        assert_back_off_the_lost_node(e2e, node, lost_at, saved_before, "vanished (rank frozen)",
                                      wait=NODE_LOST_BOUND_SECONDS + 120)
        events = e2e.reasons()
        assert "Preempted" in events and "LostNodePodDeleted" in events and "RankFailed" not in events, events
    finally:
        e2e.agent.restore(node)
        e2e.agent.wait_ready(NODE_MONITOR_GRACE_SECONDS + 60)
