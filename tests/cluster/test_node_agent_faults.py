"""The node agent's fault hooks against the real control plane: a reclaimed node, a node that
stops reporting, a pod held in Terminating; and the agent outliving a kube-apiserver restart.

What is asserted is what the operator would see through the API (the node's Ready condition,
the pod's phase and deletion) and what really happened to the processes (/proc). Each test
restores the node it silenced, so the session's other tests keep two Ready nodes.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from test_node_agent import alive, apply, container_pid, eventually, get_json, phase, python_pod, wait_log, wait_running

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


def lost_node_taints(cp: ControlPlane, node: str) -> list[str]:
    """The taints the node lifecycle controller puts on a node it cannot hear from."""
    taints = (get_json(cp, "node", node) or {}).get("spec", {}).get("taints") or []
    return [f"{t['key']}:{t['effect']}" for t in taints
            if t["key"] in ("node.kubernetes.io/unreachable", "node.kubernetes.io/not-ready")]


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
    eventually(lambda: "node.kubernetes.io/unreachable:NoExecute" in lost_node_taints(control_plane, node), 30,
               f"node {node} tainted unreachable")
    node_agent.restore(node)
    node_agent.wait_ready(NOT_READY_WITHIN)
    # what the next pod on the node meets at once: Ready, and none of the lost node's taints left
    # (pods tolerate `unreachable:NoExecute` for 300 s, so they would be scheduled there regardless)
    assert node_ready(control_plane, node) == "True"
    assert not lost_node_taints(control_plane, node), "wait_ready returned with the lost node's taints"
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


#: Leaves on SIGTERM only once the test says so (the file appears): its exit, final status and
#: deletion then fall into the API server's absence, like a rank's exit save in a preemption.
LEAVES_WHEN_TOLD = """\
    import os, signal, sys, time
    def on_term(*_):
        print("got SIGTERM", flush=True)
        while not os.path.exists(sys.argv[1]):
            time.sleep(0.05)
        print("left", flush=True)
        sys.exit(0)
    signal.signal(signal.SIGTERM, on_term)
    print("ready", flush=True)
    while True:
        time.sleep(0.1)
"""


def lease_renewed(cp: ControlPlane, node: str) -> datetime | None:
    lease = get_json(cp, "lease", node, "-n", "kube-node-lease") or {}
    renewed = lease.get("spec", {}).get("renewTime")
    return datetime.fromisoformat(renewed.replace("Z", "+00:00")) if renewed else None


def test_agent_keeps_reporting_across_a_kube_apiserver_restart(
    control_plane: ControlPlane, node_agent: NodeAgent, namespace: str, tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
):
    """An upgrade of the control plane: the API server is away for a while, then back on its port.
    Like kubelet, the agent keeps its pods running, reports what happened meanwhile, finishes a
    deletion it started, heartbeats again and runs new pods (issue 12: the e2e restart test saw
    pods stuck Terminating and, later, healthy nodes unreachable)."""
    caplog.set_level(logging.INFO, logger="torpor.node_agent")
    release = tmp_path / "leave-now"
    leaving_pod = python_pod("leaving", LEAVES_WHEN_TOLD, terminationGracePeriodSeconds=120)
    leaving_pod["spec"]["containers"][0]["args"] = [str(release)]
    apply(control_plane, namespace, python_pod("staying", SLEEPER), leaving_pod)
    staying, leaving = (wait_running(control_plane, namespace, n) for n in ("staying", "leaving"))
    wait_log(node_agent, staying, "ready")
    wait_log(node_agent, leaving, "ready")
    control_plane.kubectl("delete", "pod", "leaving", "-n", namespace, "--wait=false")
    wait_log(node_agent, leaving, "got SIGTERM")
    beats = node_agent.node_names[0]

    def away() -> None:
        failed_before = caplog.text.count(f"heartbeat for {beats} failed")
        release.touch()
        eventually(lambda: not alive(container_pid(leaving)), 30, "the leaving pod's exit, while the API is away")
        # away for at least a whole heartbeat period (5 s), longer than a volume sync (3 s): every
        # periodic task of the agent meets the refused connection at least once
        eventually(lambda: caplog.text.count(f"heartbeat for {beats} failed") >= failed_before + 2, 30,
                   "two failed heartbeats of the agent")

    control_plane.restart_apiserver(down=away)
    back = datetime.now(UTC)

    for name in node_agent.node_names:
        eventually(lambda n=name: (lease_renewed(control_plane, n) or back) > back, 30,
                   f"node {name}'s Lease renewed after the restart")
        eventually(lambda n=name: node_ready(control_plane, n) == "True", 30, f"node {name} Ready")
    eventually(lambda: get_json(control_plane, "pod", "leaving", "-n", namespace) is None, 30,
               "the pod that ended during the outage removed, not left Terminating")
    assert "left" in node_agent.logs_path(leaving).read_text()
    assert alive(container_pid(staying)), "a running pod outlives the API server's absence"
    assert phase(control_plane, namespace, "staying") == "Running"

    apply(control_plane, namespace, python_pod("after", "print('ran')"))
    eventually(lambda: phase(control_plane, namespace, "after") == "Succeeded", 60, "a new pod runs and reports")
    control_plane.kubectl("delete", "pod", "staying", "-n", namespace, "--timeout=60s")
    assert not alive(container_pid(staying))
