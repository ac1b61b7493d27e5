"""The node agent's fault hooks against the real control plane: a reclaimed node, a node that
stops reporting, a pod held in Terminating.

What is asserted is what the operator would see through the API (the node's Ready condition,
the pod's phase and deletion) and what really happened to the processes (/proc). Each test
restores the node it silenced, so the session's other tests keep two Ready nodes.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from test_node_agent import alive, apply, container_pid, eventually, get_json, python_pod, wait_log, wait_running

from controlplane import NODE_MONITOR_GRACE_SECONDS, ControlPlane
from node_agent import NodeAgent

pytestmark = pytest.mark.cluster

SLEEPER = "import time; print('ready', flush=True); time.sleep(3600)"
#: The node lifecycle controller notices within its grace period plus its monitor period (2 s);
#: the rest is slack for a loaded machine.
NOT_READY_WITHIN = NODE_MONITOR_GRACE_SECONDS + 25


def node_ready(cp: ControlPlane, node: str) -> str:
    conditions = (get_json(cp, "node", node) or {}).get("status", {}).get("conditions", [])
    return next((c["status"] for c in conditions if c["type"] == "Ready"), "missing")


@pytest.fixture
def node(control_plane: ControlPlane, node_agent: NodeAgent) -> Iterator[str]:
    """The node a test silences; reporting again, and Ready, afterwards."""
    name = node_agent.node_names[0]
    yield name
    node_agent.restore(name)
    node_agent.wait_ready(NOT_READY_WITHIN)


def test_reclaimed_node_kills_its_pods_silently_and_goes_not_ready(
    control_plane: ControlPlane, node_agent: NodeAgent, namespace: str, node: str
):
    apply(control_plane, namespace, python_pod("spot", SLEEPER, nodeName=node))
    pod = wait_running(control_plane, namespace, "spot")
    wait_log(node_agent, pod, "ready")
    pid = container_pid(pod)

    killed = node_agent.reclaim(node)

    assert pid in killed
    eventually(lambda: not alive(pid), 10, "the reclaimed node's process is SIGKILLed at once")
    assert get_json(control_plane, "pod", "spot", "-n", namespace)["status"]["phase"] == "Running", \
        "no status update: the API still shows the pod Running"
    eventually(lambda: node_ready(control_plane, node) == "Unknown", NOT_READY_WITHIN,
               f"node {node} NotReady (Ready=Unknown) within the node-monitor grace period")
    after = get_json(control_plane, "pod", "spot", "-n", namespace)
    assert after["status"]["phase"] == "Running", "still Running: only the node controller speaks for a lost node"
    control_plane.kubectl("delete", "pod", "spot", "-n", namespace, "--force", "--grace-period=0")


def test_not_ready_node_keeps_its_processes_running(
    control_plane: ControlPlane, node_agent: NodeAgent, namespace: str, node: str
):
    apply(control_plane, namespace, python_pod("partitioned", SLEEPER, nodeName=node))
    pod = wait_running(control_plane, namespace, "partitioned")
    pid = container_pid(pod)

    node_agent.make_not_ready(node)

    eventually(lambda: node_ready(control_plane, node) == "Unknown", NOT_READY_WITHIN, f"node {node} NotReady")
    assert alive(pid), "a node cut off from the API keeps running its containers"
    node_agent.restore(node)
    eventually(lambda: node_ready(control_plane, node) == "True", NOT_READY_WITHIN, f"node {node} Ready again")
    assert alive(pid)
    control_plane.kubectl("delete", "pod", "partitioned", "-n", namespace, "--force", "--grace-period=0")
    eventually(lambda: not alive(pid), 10, "the force deletion seen after the node came back")


def test_pod_held_in_terminating_stays_until_force_deleted(
    control_plane: ControlPlane, node_agent: NodeAgent, namespace: str
):
    apply(control_plane, namespace, python_pod("stuck", SLEEPER, terminationGracePeriodSeconds=1))
    pod = wait_running(control_plane, namespace, "stuck")
    pid = container_pid(pod)
    node_agent.hold_terminating(namespace, "stuck")
    try:
        control_plane.kubectl("delete", "pod", "stuck", "-n", namespace, "--wait=false")
        held = get_json(control_plane, "pod", "stuck", "-n", namespace)
        assert held["metadata"].get("deletionTimestamp"), held["metadata"]
        # Past the 1 s grace period the agent would have SIGKILLed it and removed the pod.
        with pytest.raises(AssertionError, match="timed out"):
            eventually(lambda: not alive(pid) or get_json(control_plane, "pod", "stuck", "-n", namespace) is None,
                       5, "the held pod ending")
        control_plane.kubectl("delete", "pod", "stuck", "-n", namespace, "--force", "--grace-period=0")
        eventually(lambda: not alive(pid), 10, "a force deletion still kills a held pod")
    finally:
        node_agent.release_terminating(namespace, "stuck")
