"""The node agent plays kubelet for real: scheduling, processes, status, deletion, drain, GC.

Every test runs against the real control plane (kube-apiserver, scheduler,
controller-manager) and the session's node agent; the pods' commands really run as local
processes, and what is asserted is what a user would look at: `kubectl get` output, the
pod's log file, and processes in /proc.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest

import node_agent as node_agent_module
from bootstrap import binary
from controlplane import ControlPlane
from node_agent import NodeAgent
from nodeagent_kube import ApiError, KubeClient
from processes import poll

pytestmark = pytest.mark.cluster

T = TypeVar("T")
JsonDict = dict[str, Any]


# --- helpers --------------------------------------------------------------------------------


def eventually(check: Callable[[], T], timeout: float, what: str, interval: float = 0.2) -> T:
    """Poll `check` until it returns something truthy, and return that; fail after `timeout`."""
    return poll(check, timeout=timeout, what=what, interval=interval)


def get_json(cp: ControlPlane, *args: str) -> JsonDict | None:
    """`kubectl get ... -o json`, or None when the object does not exist."""
    proc = cp.kubectl("get", *args, "-o", "json", check=False)
    if proc.returncode != 0:
        assert "NotFound" in proc.stderr, proc.stderr
        return None
    return json.loads(proc.stdout)


def apply(cp: ControlPlane, ns: str, *manifests: JsonDict) -> None:
    cp.kubectl("apply", "-n", ns, "-f", "-", input=json.dumps({"apiVersion": "v1", "kind": "List", "items": manifests}))


def python_pod(name: str, script: str, **spec: Any) -> JsonDict:
    """A pod whose only container runs `python -c script` (the image is ignored)."""
    container = {"name": "main", "image": "python:3.11-slim", "command": ["python", "-c", textwrap.dedent(script)]}
    container.update(spec.pop("container", {}))
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, **spec.pop("metadata", {})},
        "spec": {"restartPolicy": "Never", "terminationGracePeriodSeconds": 5, "containers": [container], **spec},
    }


def phase(cp: ControlPlane, ns: str, name: str) -> str | None:
    pod = get_json(cp, "pod", name, "-n", ns)
    return pod["status"].get("phase") if pod else None


def wait_running(cp: ControlPlane, ns: str, name: str, timeout: float = 60) -> JsonDict:
    def running() -> JsonDict | None:
        pod = get_json(cp, "pod", name, "-n", ns)
        if pod and pod["status"].get("phase") == "Running":
            ready = {c["type"]: c["status"] for c in pod["status"].get("conditions", [])}.get("Ready")
            return pod if ready == "True" else None
        return None

    return eventually(running, timeout, f"pod {name} Running and Ready")


def wait_log(agent: NodeAgent, pod: JsonDict, text: str, timeout: float = 30) -> str:
    path = agent.logs_path(pod)
    return eventually(
        lambda: path.exists() and text in path.read_text() and path.read_text(), timeout, f"{text!r} in {path}"
    )


def container_pid(pod: JsonDict) -> int:
    return int(pod["status"]["containerStatuses"][0]["containerID"].removeprefix("torpor://"))


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"


def process_group(pgid: int) -> set[int]:
    """Live processes whose process group is `pgid`."""
    members = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
            except (FileNotFoundError, ProcessLookupError):
                continue
            if int(fields[2]) == pgid and fields[0] != "Z":
                members.add(int(entry))
    return members


# --- tests ----------------------------------------------------------------------------------


def test_nodes_are_registered_ready_with_allocatable_and_leases(control_plane: ControlPlane, node_agent: NodeAgent):
    for name in node_agent.node_names:
        node = get_json(control_plane, "node", name)
        assert node is not None
        assert node["status"]["allocatable"]["pods"] == "110"
        assert {"type": "InternalIP", "address": "127.0.0.1"} in node["status"]["addresses"]
        ready = [c for c in node["status"]["conditions"] if c["type"] == "Ready"]
        assert ready[0]["status"] == "True"
        assert not [t for t in node["spec"].get("taints") or [] if t["key"] == "node.kubernetes.io/not-ready"]
        lease = get_json(control_plane, "lease", name, "-n", "kube-node-lease")
        assert lease is not None and lease["spec"]["holderIdentity"] == name


def test_applied_pod_is_scheduled_runs_and_reports_exit_code_and_message(
    control_plane: ControlPlane, node_agent: NodeAgent, namespace: str
):
    manifest = textwrap.dedent(
        """\
        apiVersion: v1
        kind: Pod
        metadata:
          name: hello
        spec:
          restartPolicy: Never
          containers:
          - name: main
            image: python:3.11-slim
            command: ["python", "-c"]
            args:
            - |
              import os, socket
              print("hello from", os.environ["HOSTNAME"], socket.gethostname(), flush=True)
              with open("/dev/termination-log", "w") as f:
                  f.write("checkpoint saved at step 42")
              raise SystemExit(3)
        """
    )
    control_plane.kubectl("apply", "-n", namespace, "-f", "-", input=manifest)
    pod = eventually(
        lambda: (
            (p := get_json(control_plane, "pod", "hello", "-n", namespace))
            and p["status"].get("phase") == "Failed"
            and p
        ),
        60,
        "pod hello Failed",
    )
    assert pod["spec"]["nodeName"] in node_agent.node_names  # placed by the real scheduler
    scheduled = [c for c in pod["status"]["conditions"] if c["type"] == "PodScheduled"]
    assert scheduled[0]["status"] == "True"
    terminated = pod["status"]["containerStatuses"][0]["state"]["terminated"]
    assert terminated["exitCode"] == 3
    assert terminated["reason"] == "Error"
    assert terminated["message"] == "checkpoint saved at step 42"
    assert pod["status"]["podIP"].startswith("127.") and pod["status"]["hostIP"] == "127.0.0.1"
    assert "hello from hello hello" in node_agent.logs_path(pod).read_text()


def test_termination_message_falls_back_to_log_and_on_failure_restarts(
    control_plane: ControlPlane, node_agent: NodeAgent, namespace: str
):
    fallback = python_pod(
        "fallback",
        "import sys; print('Traceback: boom', flush=True); sys.exit(1)",
        container={"terminationMessagePolicy": "FallbackToLogsOnError"},
    )
    # Fails on its first run, succeeds on the second: the marker lives in an emptyDir.
    flaky = python_pod(
        "flaky",
        """\
        import os, sys
        marker = "/var/tmp/torpor-agent-test-scratch/ran-once"
        if not os.path.exists(marker):
            open(marker, "w").close()
            sys.exit(7)
        print("second run", flush=True)
        """,
        restartPolicy="OnFailure",
        volumes=[{"name": "scratch", "emptyDir": {}}],
        container={"volumeMounts": [{"name": "scratch", "mountPath": "/var/tmp/torpor-agent-test-scratch"}]},
    )
    apply(control_plane, namespace, fallback, flaky)
    pod = eventually(
        lambda: (
            (p := get_json(control_plane, "pod", "fallback", "-n", namespace))
            and p["status"].get("phase") == "Failed"
            and p
        ),
        60,
        "pod fallback Failed",
    )
    assert pod["status"]["containerStatuses"][0]["state"]["terminated"]["message"] == "Traceback: boom"
    pod = eventually(
        lambda: (
            (p := get_json(control_plane, "pod", "flaky", "-n", namespace))
            and p["status"].get("phase") == "Succeeded"
            and p
        ),
        60,
        "pod flaky Succeeded",
    )
    status = pod["status"]["containerStatuses"][0]
    assert status["restartCount"] == 1
    assert status["lastState"]["terminated"]["exitCode"] == 7
    assert status["state"]["terminated"]["reason"] == "Completed"


TRAPS_SIGTERM = """\
    import signal, sys, time
    def on_term(*_):
        print("got SIGTERM", flush=True)
        time.sleep(1.5)
        print("still alive 1.5s after SIGTERM", flush=True)
        sys.exit(0)
    signal.signal(signal.SIGTERM, on_term)
    print("ready", flush=True)
    while True:
        time.sleep(0.1)
"""

IGNORES_SIGTERM = """\
    import signal, time
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    print("ready", flush=True)
    while True:
        time.sleep(0.1)
"""


def test_delete_sends_sigterm_then_sigkill_after_the_grace_period(
    control_plane: ControlPlane, node_agent: NodeAgent, namespace: str
):
    apply(
        control_plane,
        namespace,
        python_pod("traps", TRAPS_SIGTERM, terminationGracePeriodSeconds=10),
        python_pod("ignores", IGNORES_SIGTERM, terminationGracePeriodSeconds=3),
    )
    traps = wait_running(control_plane, namespace, "traps")
    ignores = wait_running(control_plane, namespace, "ignores")
    wait_log(node_agent, traps, "ready")
    wait_log(node_agent, ignores, "ready")

    start = time.monotonic()
    control_plane.kubectl("delete", "pod", "traps", "-n", namespace, "--timeout=60s")
    took = time.monotonic() - start
    log = node_agent.logs_path(traps).read_text()
    assert "got SIGTERM" in log and "still alive 1.5s after SIGTERM" in log  # it was given its grace
    assert 1.5 <= took < 10, took  # and it was not made to wait the whole grace period
    assert not alive(container_pid(traps))

    start = time.monotonic()
    control_plane.kubectl("delete", "pod", "ignores", "-n", namespace, "--timeout=60s")
    took = time.monotonic() - start
    assert 3 <= took < 15, took  # SIGKILL only after the 3 s grace period
    assert get_json(control_plane, "pod", "ignores", "-n", namespace) is None
    assert not alive(container_pid(ignores))


def test_force_delete_kills_the_process_at_once(control_plane: ControlPlane, node_agent: NodeAgent, namespace: str):
    apply(control_plane, namespace, python_pod("forced", IGNORES_SIGTERM, terminationGracePeriodSeconds=60))
    pod = wait_running(control_plane, namespace, "forced")
    wait_log(node_agent, pod, "ready")
    control_plane.kubectl("delete", "pod", "forced", "-n", namespace, "--force", "--grace-period=0")
    eventually(lambda: not alive(container_pid(pod)), 10, "the process is gone well before its 60 s grace period")


def test_finished_pod_is_removed_at_once_when_deleted(
    control_plane: ControlPlane, node_agent: NodeAgent, namespace: str
):
    apply(control_plane, namespace, python_pod("done", "print('done')", terminationGracePeriodSeconds=30))
    eventually(lambda: phase(control_plane, namespace, "done") == "Succeeded", 60, "pod done Succeeded")
    start = time.monotonic()
    control_plane.kubectl("delete", "pod", "done", "-n", namespace, "--timeout=60s")
    assert time.monotonic() - start < 10


class PodConditionWatch:
    """Records every condition type each pod of a namespace ever shows, from a real watch."""

    def __init__(self, kubeconfig: Path, namespace: str):
        self.kube = KubeClient(kubeconfig)
        self.path = f"/api/v1/namespaces/{namespace}/pods"
        self.seen: dict[str, dict[str, JsonDict]] = {}
        self._version = self.kube.get(self.path)["metadata"]["resourceVersion"]
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            for event in self.kube.watch(self.path, self._version, timeout_seconds=600):
                pod = event["object"]
                if event["type"] in ("ADDED", "MODIFIED", "DELETED"):
                    conditions = self.seen.setdefault(pod["metadata"]["name"], {})
                    for condition in pod.get("status", {}).get("conditions", []):
                        conditions.setdefault(condition["type"], condition)
        except Exception:
            pass  # cut off by close()

    def close(self) -> None:
        self.kube.close()
        self._thread.join(timeout=5)


def test_drain_evicts_through_the_eviction_api_and_respects_the_pdb(
    control_plane: ControlPlane, node_agent: NodeAgent, namespace: str
):
    node = node_agent.node_names[-1]
    pods = [
        python_pod(
            f"worker-{i}",
            TRAPS_SIGTERM,
            metadata={"labels": {"app": "trainer"}},
            nodeSelector={"kubernetes.io/hostname": node},
        )
        for i in range(2)
    ]
    pdb = {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": {"name": "trainer"},
        "spec": {"minAvailable": 2, "selector": {"matchLabels": {"app": "trainer"}}},
    }
    apply(control_plane, namespace, pdb, *pods)
    running = {pod["metadata"]["name"]: wait_running(control_plane, namespace, pod["metadata"]["name"]) for pod in pods}
    assert {pod["spec"]["nodeName"] for pod in running.values()} == {node}
    eventually(
        lambda: (
            (get_json(control_plane, "pdb", "trainer", "-n", namespace) or {}).get("status", {}).get("currentHealthy")
            == 2
        ),
        30,
        "PDB sees 2 healthy pods",
    )

    # The Eviction API itself refuses with 429 while the budget allows no disruption.
    kube = KubeClient(control_plane.kubeconfig)
    eviction = {"apiVersion": "policy/v1", "kind": "Eviction", "metadata": {"name": "worker-0", "namespace": namespace}}
    with pytest.raises(ApiError) as refused:
        kube.create(f"/api/v1/namespaces/{namespace}/pods/worker-0/eviction", eviction)
    assert refused.value.status == 429

    watch = PodConditionWatch(control_plane.kubeconfig, namespace)
    output: list[str] = []
    drain = subprocess.Popen(
        [
            str(binary("kubectl")),
            f"--kubeconfig={control_plane.kubeconfig}",
            "drain",
            node,
            "--ignore-daemonsets",
            "--delete-emptydir-data",
            "--force",
            "--timeout=120s",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    reader = threading.Thread(target=lambda: output.extend(drain.stdout or []), daemon=True)
    reader.start()
    try:
        eventually(lambda: "violate the pod's disruption budget" in "".join(output), 60, "drain held back by the PDB")
        assert get_json(control_plane, "node", node)["spec"].get("unschedulable") is True  # cordoned
        assert phase(control_plane, namespace, "worker-0") == "Running"

        control_plane.kubectl(
            "patch", "pdb", "trainer", "-n", namespace, "--type=merge", "-p", '{"spec": {"minAvailable": 0}}'
        )
        assert drain.wait(timeout=120) == 0, "".join(output)
        reader.join(timeout=10)
        assert f"node/{node} drained" in "".join(output)
        for name, pod in running.items():
            assert get_json(control_plane, "pod", name, "-n", namespace) is None
            disruption = eventually(
                lambda n=name: watch.seen.get(n, {}).get("DisruptionTarget"), 10, f"DisruptionTarget seen on {name}"
            )
            assert disruption["reason"] == "EvictionByEvictionAPI"
            assert "got SIGTERM" in node_agent.logs_path(pod).read_text()
    finally:
        if drain.poll() is None:
            drain.kill()
        drain.wait()
        reader.join(timeout=10)
        if drain.stdout is not None:
            drain.stdout.close()
        watch.close()
        control_plane.kubectl("uncordon", node)


def test_owner_deletion_garbage_collects_children(control_plane: ControlPlane, node_agent: NodeAgent, namespace: str):
    apply(control_plane, namespace, {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "owner"}})
    owner = get_json(control_plane, "configmap", "owner", "-n", namespace)
    assert owner is not None
    ref = {"apiVersion": "v1", "kind": "ConfigMap", "name": "owner", "uid": owner["metadata"]["uid"]}
    child_cm = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "child", "ownerReferences": [ref]}}
    child_pod = python_pod(
        "child", "import time; time.sleep(600)", metadata={"ownerReferences": [ref]}, terminationGracePeriodSeconds=2
    )
    apply(control_plane, namespace, child_cm, child_pod)
    pod = wait_running(control_plane, namespace, "child")

    control_plane.kubectl("delete", "configmap", "owner", "-n", namespace)
    eventually(
        lambda: get_json(control_plane, "configmap", "child", "-n", namespace) is None,
        60,
        "child ConfigMap garbage-collected",
    )
    eventually(
        lambda: get_json(control_plane, "pod", "child", "-n", namespace) is None, 60, "child Pod garbage-collected"
    )
    assert not alive(container_pid(pod))


def test_stopping_the_agent_leaves_no_pod_process(control_plane: ControlPlane, namespace: str, tmp_path: Path):
    prefix = f"torpor-stop-{uuid.uuid4().hex[:6]}"
    agent = NodeAgent(control_plane.kubeconfig, tmp_path, nodes=1, configmap_sync_seconds=3.0, node_prefix=prefix)
    agent.start()
    try:
        # A process that leaves a child of its own, in its process group.
        script = """\
            import subprocess, sys, time
            child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
            print("child", child.pid, flush=True)
            time.sleep(600)
        """
        apply(control_plane, namespace, python_pod("sleeper", script, nodeName=agent.node_names[0]))
        pod = wait_running(control_plane, namespace, "sleeper")
        wait_log(agent, pod, "child")
        (pgid,) = agent.pids()
        group = process_group(pgid)
        assert len(group) >= 2, group
    finally:
        agent.stop()
    eventually(lambda: not any(alive(pid) for pid in group), 10, f"processes {group} gone")
    assert get_json(control_plane, "node", agent.node_names[0]) is None


def test_init_containers_run_first_and_share_volumes(
    control_plane: ControlPlane, node_agent: NodeAgent, namespace: str
):
    pod = python_pod(
        "with-init",
        "print('main read', open('/var/tmp/torpor-agent-test-shared/from-init').read())",
        volumes=[{"name": "shared", "emptyDir": {}}],
        container={"volumeMounts": [{"name": "shared", "mountPath": "/var/tmp/torpor-agent-test-shared"}]},
    )
    pod["spec"]["initContainers"] = [
        {
            "name": "prepare",
            "image": "busybox",
            "command": ["python", "-c", "open('/var/tmp/torpor-agent-test-shared/from-init', 'w').write('prepared')"],
            "volumeMounts": [{"name": "shared", "mountPath": "/var/tmp/torpor-agent-test-shared"}],
        }
    ]
    apply(control_plane, namespace, pod)
    done = eventually(
        lambda: (
            (p := get_json(control_plane, "pod", "with-init", "-n", namespace))
            and p["status"].get("phase") == "Succeeded"
            and p
        ),
        60,
        "with-init Succeeded",
    )
    assert done["status"]["initContainerStatuses"][0]["state"]["terminated"]["reason"] == "Completed"
    assert "main read prepared" in node_agent.logs_path(done).read_text()


def test_failed_init_container_fails_the_pod_and_the_container_never_runs(
    control_plane: ControlPlane, node_agent: NodeAgent, namespace: str
):
    pod = python_pod("bad-init", "print('main ran')")
    pod["spec"]["initContainers"] = [{"name": "check", "image": "busybox", "command": ["python", "-c", "exit(4)"]}]
    apply(control_plane, namespace, pod)
    done = eventually(
        lambda: (
            (p := get_json(control_plane, "pod", "bad-init", "-n", namespace))
            and p["status"].get("phase") == "Failed"
            and p
        ),
        60,
        "bad-init Failed",
    )
    assert done["status"]["initContainerStatuses"][0]["state"]["terminated"]["exitCode"] == 4
    assert "waiting" in done["status"]["containerStatuses"][0]["state"]
    assert not node_agent.logs_path(done).exists()


SIDECAR = """\
    import pathlib, signal, sys, time
    def on_term(*_):
        print("sidecar got SIGTERM", flush=True)
        sys.exit(0)
    signal.signal(signal.SIGTERM, on_term)
    pathlib.Path("/var/tmp/torpor-agent-test-sidecar/up").write_text("up")
    print("sidecar ready", flush=True)
    while True:
        time.sleep(0.1)
"""


def test_a_native_sidecar_runs_beside_the_container_and_is_stopped_after_it(
    control_plane: ControlPlane, node_agent: NodeAgent, namespace: str
):
    shared = {"name": "shared", "mountPath": "/var/tmp/torpor-agent-test-sidecar"}
    pod = python_pod(
        "native-sidecar",
        """\
        import pathlib, time
        # As with kubelet, a sidecar without a startup probe counts as started once its
        # process runs, not once it is ready: wait for its file rather than race it.
        up = pathlib.Path("/var/tmp/torpor-agent-test-sidecar/up")
        deadline = time.monotonic() + 30
        while not up.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        print("main sees the sidecar:", up.exists(), flush=True)
        time.sleep(1)
        """,
        volumes=[{"name": "shared", "emptyDir": {}}],
        container={"volumeMounts": [shared]},
    )
    pod["spec"]["initContainers"] = [{"name": "proxy", "image": "envoy", "restartPolicy": "Always",
                                      "command": ["python", "-c", textwrap.dedent(SIDECAR)], "volumeMounts": [shared]}]
    apply(control_plane, namespace, pod)
    done = eventually(
        lambda: ((p := get_json(control_plane, "pod", "native-sidecar", "-n", namespace))
                 and p["status"].get("phase") == "Succeeded" and p),
        60, "native-sidecar Succeeded",
    )
    assert "main sees the sidecar: True" in node_agent.logs_path(done, "main").read_text()
    assert "sidecar got SIGTERM" in node_agent.logs_path(done, "proxy").read_text()
    [proxy] = done["status"]["initContainerStatuses"]
    assert proxy["state"]["terminated"]["exitCode"] == 0 and proxy["restartCount"] == 0, proxy
    assert done["status"]["containerStatuses"][0]["state"]["terminated"]["exitCode"] == 0


def test_a_regular_sidecar_keeps_the_pod_running_until_an_active_deadline_stops_it(
    control_plane: ControlPlane, node_agent: NodeAgent, namespace: str
):
    pod = python_pod("regular-sidecar", "print('main done', flush=True)",
                     volumes=[{"name": "shared", "emptyDir": {}}])
    pod["spec"]["containers"].append({"name": "shipper", "image": "fluent-bit",
                                      "command": ["python", "-c", textwrap.dedent(SIDECAR)],
                                      "volumeMounts": [{"name": "shared",
                                                        "mountPath": "/var/tmp/torpor-agent-test-sidecar"}]})
    apply(control_plane, namespace, pod)

    def main_ended() -> JsonDict | None:
        p = get_json(control_plane, "pod", "regular-sidecar", "-n", namespace)
        states = {c["name"]: c["state"] for c in (p or {}).get("status", {}).get("containerStatuses") or []}
        return p if "terminated" in states.get("main", {}) and "running" in states.get("shipper", {}) else None

    running = eventually(main_ended, 60, "main ended, shipper running")
    assert running["status"]["phase"] == "Running"  # as kubelet: a running container keeps the pod Running
    shipper_pid = int(running["status"]["containerStatuses"][1]["containerID"].removeprefix("torpor://"))

    control_plane.kubectl("patch", "pod", "regular-sidecar", "-n", namespace, "-p",
                          json.dumps({"spec": {"activeDeadlineSeconds": 1}}))
    failed = eventually(
        lambda: ((p := get_json(control_plane, "pod", "regular-sidecar", "-n", namespace))
                 and all("terminated" in c["state"] for c in p["status"]["containerStatuses"]) and p),
        30, "every container of regular-sidecar ended",
    )
    assert (failed["status"]["phase"], failed["status"]["reason"]) == ("Failed", "DeadlineExceeded"), failed["status"]
    main, shipper = (c["state"]["terminated"] for c in failed["status"]["containerStatuses"])
    assert main["exitCode"] == 0 and main["reason"] == "Completed"  # the ended container's status is kept
    assert shipper["exitCode"] == 0 and "sidecar got SIGTERM" in node_agent.logs_path(failed, "shipper").read_text()
    assert not alive(shipper_pid)
    assert get_json(control_plane, "pod", "regular-sidecar", "-n", namespace) is not None  # kept until deleted


def test_pod_watch_survives_dropped_connections(
    control_plane: ControlPlane, node_agent: NodeAgent, namespace: str, caplog: pytest.LogCaptureFixture
):
    caplog.set_level(logging.INFO, logger="torpor.node_agent")
    for attempt in range(2):
        node_agent.kube.cut_watches()  # as a network failure would
        name = f"after-drop-{attempt}"
        apply(control_plane, namespace, python_pod(name, "print('ran')"))
        eventually(lambda n=name: phase(control_plane, namespace, n) == "Succeeded", 60, f"{name} Succeeded")
    assert caplog.text.count("pod watch interrupted") >= 2


def test_command_line_agent_registers_nodes_and_stops_on_sigterm(control_plane: ControlPlane, tmp_path: Path):
    prefix = f"torpor-cli-{uuid.uuid4().hex[:6]}"
    agent = subprocess.Popen(
        [
            sys.executable,
            str(Path(node_agent_module.__file__)),
            "--kubeconfig",
            str(control_plane.kubeconfig),
            "--nodes",
            "1",
            "--workdir",
            str(tmp_path),
            "--node-prefix",
            prefix,
            "--configmap-sync-seconds",
            "2",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    output: list[str] = []
    reader = threading.Thread(target=lambda: output.extend(agent.stdout or []), daemon=True)
    reader.start()
    try:
        # Printed once the nodes are Ready.
        eventually(lambda: "node agent running" in "".join(output) or agent.poll() is not None, 90, "agent ready")
        assert agent.poll() is None, "".join(output)
        node = get_json(control_plane, "node", f"{prefix}-0")
        assert node is not None
        assert [c["status"] for c in node["status"]["conditions"] if c["type"] == "Ready"] == ["True"]
        agent.send_signal(signal.SIGTERM)
        assert agent.wait(timeout=30) == 0
    finally:
        if agent.poll() is None:
            agent.kill()
            agent.wait()
        reader.join(timeout=10)
        if agent.stdout is not None:
            agent.stdout.close()
    assert get_json(control_plane, "node", f"{prefix}-0") is None


def test_pod_processes_die_when_the_agent_is_killed_without_teardown(
        control_plane: ControlPlane, namespace: str, tmp_path: Path):
    """SIGKILL of the agent (a pytest killed by CI's timeout) must not leave training running."""
    prefix = f"torpor-kill-{uuid.uuid4().hex[:6]}"
    node = f"{prefix}-0"
    agent = subprocess.Popen(
        [sys.executable, str(Path(node_agent_module.__file__)), "--kubeconfig", str(control_plane.kubeconfig),
         "--nodes", "1", "--workdir", str(tmp_path), "--node-prefix", prefix],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        eventually(lambda: (get_json(control_plane, "node", node) or {}).get("status", {}).get("conditions"), 90,
                   f"node {node} registered")
        control_plane.kubectl("cordon", node)  # nothing else lands on a node about to lose its agent
        apply(control_plane, namespace, python_pod("orphan", "import time; time.sleep(600)", nodeName=node))
        pid = container_pid(wait_running(control_plane, namespace, "orphan"))
        assert alive(pid)
        agent.kill()
        agent.wait(timeout=30)
        eventually(lambda: not alive(pid), 10, f"pod process {pid} gone after the agent's SIGKILL")
    finally:
        if agent.poll() is None:
            agent.kill()
            agent.wait()
        control_plane.kubectl("delete", "pod", "orphan", "-n", namespace, "--grace-period=0", "--force",
                              "--ignore-not-found", check=False)
        control_plane.kubectl("delete", "node", node, "--ignore-not-found", check=False)
