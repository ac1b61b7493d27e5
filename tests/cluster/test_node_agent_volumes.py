"""What a pod process sees through the node agent: env, volumes at their mount paths, names.

Real control plane, real node agent, real processes: each assertion is about what the pod's
own process read or did (it reports in its log), never about the agent's internals.
"""

from __future__ import annotations

import json
import textwrap
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from test_node_agent import apply, eventually, get_json, python_pod, wait_log, wait_running

from controlplane import ControlPlane
from node_agent import NodeAgent

pytestmark = pytest.mark.cluster

JsonDict = dict[str, Any]
WATCH_FILES = str(Path(__file__).with_name("procs") / "watch_files.py")
BASE = "/etc/torpor-agent-test"


def changes(agent: NodeAgent, pod: JsonDict, path: str) -> list[str | None]:
    """Every content the pod's watch_files process saw at `path`, in order."""
    lines = agent.logs_path(pod).read_text().splitlines()
    events = [json.loads(line) for line in lines if line.startswith("{")]
    return [e["content"] for e in events if e["path"] == path]


def stays(check: Callable[[], bool], seconds: float, what: str) -> None:
    """Assert that `check` holds the whole time for `seconds`."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert check(), what
        time.sleep(0.2)


def test_configmap_update_reaches_the_mounted_file_periodically_and_at_once_on_pod_change(
    control_plane: ControlPlane, node_agent: NodeAgent, namespace: str
):
    value, sub, annotations = f"{BASE}/config/value", f"{BASE}-subpath/value", f"{BASE}/podinfo/annotations"
    configmap = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "settings"}, "data": {"value": "v1"}}
    pod = python_pod("watcher", "", terminationGracePeriodSeconds=2)
    pod["spec"]["containers"][0].update(
        command=["python", WATCH_FILES, value, sub, annotations],
        volumeMounts=[
            {"name": "config", "mountPath": f"{BASE}/config"},
            {"name": "config", "mountPath": sub, "subPath": "value"},
            {"name": "podinfo", "mountPath": f"{BASE}/podinfo"},
        ],
    )
    pod["spec"]["volumes"] = [
        {"name": "config", "configMap": {"name": "settings"}},
        {
            "name": "podinfo",
            "downwardAPI": {"items": [{"path": "annotations", "fieldRef": {"fieldPath": "metadata.annotations"}}]},
        },
    ]
    apply(control_plane, namespace, configmap, pod)
    pod = wait_running(control_plane, namespace, "watcher")
    eventually(
        lambda: changes(node_agent, pod, value) == ["v1"] and changes(node_agent, pod, sub) == ["v1"],
        30,
        "the process sees v1 at both mount paths",
    )

    # The periodic sync (3 s in this session) brings a change without anything else happening.
    assert node_agent.configmap_sync_seconds == 3.0
    start = time.monotonic()
    control_plane.kubectl("patch", "configmap", "settings", "-n", namespace, "-p", '{"data": {"value": "v2"}}')
    eventually(lambda: "v2" in changes(node_agent, pod, value), 3.0 + 5, "v2 within the sync period")
    assert time.monotonic() - start <= 3.0 + 5

    # With a 30 s period, a change waits for the next sync, unless the pod object changes.
    node_agent.configmap_sync_seconds = 30.0
    try:
        control_plane.kubectl("patch", "configmap", "settings", "-n", namespace, "-p", '{"data": {"value": "v3"}}')
        stays(lambda: "v3" not in changes(node_agent, pod, value), 4.0, "v3 arrived before the pod changed")
        start = time.monotonic()
        control_plane.kubectl("annotate", "pod", "watcher", "-n", namespace, "torpor.dev/graceful-exit=true")
        eventually(lambda: "v3" in changes(node_agent, pod, value), 10, "v3 after the annotation")
        assert time.monotonic() - start < 5  # well under the 30 s period
        seen = changes(node_agent, pod, annotations)
        assert seen and 'torpor.dev/graceful-exit="true"' in (seen[-1] or "")
    finally:
        node_agent.configmap_sync_seconds = 3.0
    # Every version arrived whole (atomic swap), and the subPath mount never changed.
    assert changes(node_agent, pod, value) == ["v1", "v2", "v3"]
    assert changes(node_agent, pod, sub) == ["v1"]


SERVER = """\
    import os, socket
    server = socket.create_server((os.environ["POD_IP"], 29500))
    print("listening", flush=True)
    while True:
        conn, _ = server.accept()
        conn.sendall(socket.gethostname().encode())
        conn.close()
"""

CLIENT = """\
    import json, os, socket, sys
    ns = os.environ["POD_NAMESPACE"]
    env = {k: v for k, v in os.environ.items() if k.startswith(("POD_", "NODE_", "HOST_", "CFG_", "X_", "MY_"))}
    base = "/etc/torpor-agent-test"
    greet = base + "/settings/greet/text"
    try:
        open(greet, "w")
        writable = True
    except OSError:
        writable = False
    with open("/var/tmp/torpor-agent-test-scratch/note", "w") as f:
        f.write("scratch")
    names = {name: socket.gethostbyname(name) for name in (
        f"rank-0.workers.{ns}.svc.cluster.local", f"rank-0.workers.{ns}.svc", f"rank-0.workers", socket.gethostname())}
    # Our own pod IP, the same port as rank-0's: each pod has an address of its own.
    mine = socket.create_server((os.environ["POD_IP"], 29500))
    with socket.create_connection(("rank-0.workers", 29500), timeout=10) as conn:
        answer = conn.recv(100).decode()
    mine.close()
    print(json.dumps({
        "env": env,
        "cwd": os.getcwd(),
        "hostname": socket.gethostname(),
        "greet": open(greet).read(),
        "greet_mode": oct(os.stat(greet).st_mode & 0o777),
        "greet_writable": writable,
        "token": open(base + "/creds/token").read(),
        "labels": open(base + "/podinfo/labels").read(),
        "names": names,
        "answer": answer,
    }), flush=True)
"""


def test_env_volumes_and_headless_service_names_are_what_the_process_sees(
    control_plane: ControlPlane, node_agent: NodeAgent, namespace: str, tmp_path: Path
):
    labels = {"app": "trainer"}
    objects = [
        {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "creds"}, "stringData": {"token": "s3cr3t"}},
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {"name": "settings"},
            "data": {"mode": "fast", "greeting": "hello"},
        },
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": "workers"},
            "spec": {"clusterIP": "None", "selector": labels, "ports": [{"name": "c10d", "port": 29500}]},
        },
    ]
    field = {  # env name -> fieldPath
        "POD_NAME": "metadata.name",
        "POD_NAMESPACE": "metadata.namespace",
        "POD_UID": "metadata.uid",
        "NODE_NAME": "spec.nodeName",
        "POD_IP": "status.podIP",
        "HOST_IP": "status.hostIP",
        "POD_SA": "spec.serviceAccountName",
        "POD_APP": "metadata.labels['app']",
        "POD_NOTE": "metadata.annotations['torpor.dev/note']",
    }
    env = [{"name": k, "valueFrom": {"fieldRef": {"fieldPath": v}}} for k, v in field.items()] + [
        {"name": "X_TOKEN", "valueFrom": {"secretKeyRef": {"name": "creds", "key": "token"}}},
        {"name": "X_MODE", "valueFrom": {"configMapKeyRef": {"name": "settings", "key": "mode"}}},
        {"name": "X_CPU", "valueFrom": {"resourceFieldRef": {"resource": "limits.cpu"}}},
        {"name": "MY_MODE", "value": "$(X_MODE)-mode"},
    ]
    server = python_pod(
        "rank-0",
        SERVER,
        metadata={"labels": labels},
        hostname="rank-0",
        subdomain="workers",
        container={"env": env[:5]},
        terminationGracePeriodSeconds=1,
    )
    client = python_pod(
        "rank-1",
        CLIENT,
        metadata={"labels": labels, "annotations": {"torpor.dev/note": "n1"}},
        hostname="rank-1",
        subdomain="workers",
        volumes=[
            {
                "name": "settings",
                "configMap": {"name": "settings", "items": [{"key": "greeting", "path": "greet/text", "mode": 0o400}]},
            },
            {"name": "creds", "secret": {"secretName": "creds"}},
            {"name": "scratch", "emptyDir": {}},
            {
                "name": "podinfo",
                "downwardAPI": {"items": [{"path": "labels", "fieldRef": {"fieldPath": "metadata.labels"}}]},
            },
        ],
        container={
            "env": env,
            "envFrom": [{"prefix": "CFG_", "configMapRef": {"name": "settings"}}],
            "workingDir": str(tmp_path),
            "volumeMounts": [
                {"name": "settings", "mountPath": f"{BASE}/settings"},
                {"name": "creds", "mountPath": f"{BASE}/creds"},
                {"name": "scratch", "mountPath": "/var/tmp/torpor-agent-test-scratch"},
                {"name": "podinfo", "mountPath": f"{BASE}/podinfo"},
            ],
        },
    )
    apply(control_plane, namespace, *objects, server)
    rank0 = wait_running(control_plane, namespace, "rank-0")
    wait_log(node_agent, rank0, "listening")
    apply(control_plane, namespace, client)
    pod = eventually(
        lambda: (
            (p := get_json(control_plane, "pod", "rank-1", "-n", namespace))
            and p["status"].get("phase") in ("Succeeded", "Failed")
            and p
        ),
        60,
        "rank-1 finished",
    )
    log = node_agent.logs_path(pod).read_text()
    assert pod["status"]["phase"] == "Succeeded", log
    seen = json.loads(log.splitlines()[-1])

    assert seen["env"] == {
        "POD_NAME": "rank-1",
        "POD_NAMESPACE": namespace,
        "POD_UID": pod["metadata"]["uid"],
        "NODE_NAME": pod["spec"]["nodeName"],
        "POD_IP": pod["status"]["podIP"],
        "HOST_IP": "127.0.0.1",
        "POD_SA": "default",
        "POD_APP": "trainer",
        "POD_NOTE": "n1",
        "X_TOKEN": "s3cr3t",
        "X_MODE": "fast",
        "X_CPU": "8",
        "MY_MODE": "fast-mode",
        "CFG_mode": "fast",
        "CFG_greeting": "hello",
    }
    assert seen["cwd"] == str(tmp_path)
    assert seen["greet"] == "hello" and seen["greet_mode"] == "0o400" and seen["greet_writable"] is False
    assert seen["token"] == "s3cr3t"
    assert seen["labels"] == 'app="trainer"'
    assert (node_agent.pod_dir(pod) / "volumes" / "scratch" / "note").read_text() == "scratch"

    # The headless Service's names resolve to rank-0's own pod IP, and its own name to its own.
    rank0_ip = rank0["status"]["podIP"]
    assert rank0_ip != pod["status"]["podIP"]
    ns = namespace
    assert seen["names"] == {
        f"rank-0.workers.{ns}.svc.cluster.local": rank0_ip,
        f"rank-0.workers.{ns}.svc": rank0_ip,
        "rank-0.workers": rank0_ip,
        "rank-1": pod["status"]["podIP"],
    }
    assert seen["hostname"] == "rank-1"
    assert seen["answer"] == "rank-0"


def test_pod_waits_for_a_missing_configmap_and_secret_then_starts(
    control_plane: ControlPlane, node_agent: NodeAgent, namespace: str
):
    script = "import os; print(open('/etc/torpor-agent-test/late/key').read(), os.environ['LATE_TOKEN'])"
    pod = python_pod(
        "late",
        script,
        volumes=[{"name": "late", "configMap": {"name": "late"}}],
        container={
            "volumeMounts": [{"name": "late", "mountPath": f"{BASE}/late"}],
            "env": [{"name": "LATE_TOKEN", "valueFrom": {"secretKeyRef": {"name": "late", "key": "token"}}}],
        },
    )
    apply(control_plane, namespace, pod)

    def waiting() -> tuple[str, str] | None:
        pod = get_json(control_plane, "pod", "late", "-n", namespace)
        statuses = (pod or {}).get("status", {}).get("containerStatuses") or [{}]
        state = statuses[0].get("state", {}).get("waiting", {})
        return (state["reason"], state.get("message", "")) if state else None

    # Volumes first (kubelet's ContainerCreating), then the environment (CreateContainerConfigError).
    eventually(lambda: (w := waiting()) and 'configmap "late" not found' in w[1], 30, "waits for the ConfigMap")
    assert waiting()[0] == "ContainerCreating"
    assert get_json(control_plane, "pod", "late", "-n", namespace)["status"]["phase"] == "Pending"
    apply(
        control_plane,
        namespace,
        {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "late"}, "data": {"key": "arrived"}},
    )
    eventually(
        lambda: (w := waiting()) and w[0] == "CreateContainerConfigError" and 'secret "late" not found' in w[1],
        30,
        "waits for the Secret",
    )
    apply(
        control_plane,
        namespace,
        {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "late"}, "stringData": {"token": "t0k"}},
    )
    done = eventually(
        lambda: (
            (p := get_json(control_plane, "pod", "late", "-n", namespace))
            and p["status"].get("phase") == "Succeeded"
            and p
        ),
        30,
        "late Succeeded",
    )
    assert "arrived t0k" in node_agent.logs_path(done).read_text()


def test_service_account_token_is_projected_and_works_in_cluster(
    control_plane: ControlPlane, node_agent: NodeAgent, namespace: str
):
    # The ServiceAccount admission plugin adds the kube-api-access projected volume; with it
    # and KUBERNETES_SERVICE_HOST/PORT, in-cluster config reaches the API server.
    script = """\
        import json, os, ssl, urllib.request
        sa = "/var/run/secrets/kubernetes.io/serviceaccount"
        token = open(sa + "/token").read()
        ctx = ssl.create_default_context(cafile=sa + "/ca.crt")
        url = "https://{}:{}/api".format(os.environ["KUBERNETES_SERVICE_HOST"], os.environ["KUBERNETES_SERVICE_PORT"])
        req = urllib.request.Request(url, headers={"Authorization": "Bearer " + token})
        print(json.dumps({"namespace": open(sa + "/namespace").read(),
                          "kind": json.load(urllib.request.urlopen(req, context=ctx))["kind"]}), flush=True)
    """
    apply(control_plane, namespace, python_pod("incluster", textwrap.dedent(script)))
    pod = eventually(
        lambda: (
            (p := get_json(control_plane, "pod", "incluster", "-n", namespace))
            and p["status"].get("phase") in ("Succeeded", "Failed")
            and p
        ),
        60,
        "incluster finished",
    )
    log = node_agent.logs_path(pod).read_text()
    assert pod["status"]["phase"] == "Succeeded", log
    assert json.loads(log.splitlines()[-1]) == {"namespace": namespace, "kind": "APIVersions"}
