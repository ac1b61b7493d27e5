"""A kubelet stand-in for tests: Nodes that run their pods as local processes.

No kubelet or container runtime can run on our machines, so this agent plays kubelet for N
Nodes (`<prefix>-0` … `<prefix>-N-1`) against a real API server:

* **Nodes.** Registers each Node with capacity/allocatable (cpu 8, memory 16Gi, pods 110),
  addresses (InternalIP 127.0.0.1, Hostname), nodeInfo and a Ready condition, then renews
  its Lease in `kube-node-lease` and the Ready heartbeat every 5 s. The node lifecycle
  controller removes the `node.kubernetes.io/not-ready` taint once it sees it Ready.
  `stop()` deletes the Nodes (and the pod GC then removes their pods).
* **Pods.** Watches all pods (list + watch, reconnecting after a 410 or a dropped
  connection; each watch ends after 1–2 min and a silent one times out) and hands each
  pod bound to one of its Nodes to a `PodWorker` thread (`nodeagent_pods`), which runs
  its containers, reports status and handles deletion.
  The image is ignored: `command` + `args` run on the host; `python`/`python3` as
  argv[0] mean this agent's own interpreter. The environment is the container's `env`
  and `envFrom` (fieldRef, secretKeyRef, configMapKeyRef, resourceFieldRef), on top of a
  few host variables (`PATH`, `HOME`, `LANG`, `LC_ALL`, `PYTHONPATH`, `VIRTUAL_ENV`),
  `HOSTNAME` and `KUBERNETES_SERVICE_HOST`/`_PORT` (the API server; with the projected
  service-account token, in-cluster config works). Default working directory: the pod
  directory (an image would give "/").
* **Volumes at their real paths.** Each container starts in its own mount and UTS
  namespaces (`unshare --mount --uts --propagation private`, see `nodeagent_launch`),
  where every volume directory under `<workdir>/pods/<ns>_<name>_<uid>/volumes/` is
  bind-mounted at its `mountPath` (ConfigMap, Secret, downwardAPI and projected ones
  read-only). Missing mount points are created, empty, on the host. ConfigMap, Secret,
  downwardAPI and projected (incl. serviceAccountToken) volumes use kubelet's atomic
  `..data` symlink swap and are refreshed every `configmap_sync_seconds` and at once when
  the pod's metadata or spec changes; `subPath` mounts of them are copied once and never
  refreshed. emptyDir and hostPath are supported; other volume types keep the pod Pending.
* **Networking.** Every pod gets its own loopback address from 127.0.0.0/8 (127.x.y.z with
  x ≥ 1), reported as `status.podIP` (hostIP 127.0.0.1), so two pods can listen on the same
  port if they bind their pod IP. Name resolution is a per-pod hosts file bind-mounted at
  `/etc/hosts`: localhost, the pod's own hostname, and for every live pod in the cluster
  with `spec.hostname` and `spec.subdomain` the names `<h>.<sub>.<ns>.svc.cluster.local`,
  `<h>.<sub>.<ns>.svc`, `<h>.<sub>.<ns>` and `<h>.<sub>`. It is rewritten in place (same
  inode, which is what a bind mount follows) when such pods come or go, at most every 0.2 s (a
  new pod's own file is written at its start from the names known then). The pod's
  hostname (`spec.hostname` or its name) is set in its UTS namespace. Wildcard binds
  (`0.0.0.0`, `::`) are turned into binds of the pod IP by an LD_PRELOAD shim
  (`nodeagent_bind`), so servers such as PyTorch's TCPStore stay private to their pod.
* **Logs.** A container's stdout+stderr go to
  `<workdir>/pods/<ns>_<name>_<uid>/<container>.log` (see `NodeAgent.logs_path`);
  `kubectl logs` does not work, as there is no kubelet API.
* **Faults** (for fault-injection tests; each a method, undone by `restore(node)`):
  - `reclaim(node)`: the node is gone like a reclaimed spot VM. Its heartbeats and Lease
    renewals stop and its pods' processes are SIGKILLed, with no status update: the API
    keeps showing them Running until the node lifecycle controller marks the node NotReady
    (after `--node-monitor-grace-period`, see `hack/controlplane.py`). Nothing about the
    node's pods reaches the API any more (no status, no deletion is finished), and no new
    pod bound to it starts — there is no kubelet.
  - `vanish(node)`: the node is gone like a VM that vanished mid-flight (reclaimed, powered
    off, cut from the network): heartbeats and pod updates stop as for `reclaim`, but its
    pods' processes are SIGSTOPped, not killed. Their TCP connections stay open and nothing
    answers on them, so a peer blocked in a collective with them stays blocked (a SIGKILL
    would reset the connections and the peer would fail at once). `restore(node)` and `stop()`
    SIGKILL them: a VM that comes back has rebooted.
  - `make_not_ready(node)`: a kubelet cut off from the API (a network partition): the
    heartbeats, the Lease and every pod update stop as above, but the processes keep
    running; what the API asks of its pods meanwhile (a deletion) is seen on `restore`.
  - `hold_terminating(namespace, name)`: the agent ignores the pod's deletion (its
    processes keep running, the pod stays Terminating) until a force deletion removes it
    from the API or `release_terminating` hands the deletion back.
  `restore(node)` resumes heartbeats and replays the newest state of the node's pods, as a
  kubelet that comes back would (the processes of a reclaimed node stay dead: its pods then
  report their exit).
* **The API server away** (restarted, upgraded, overloaded): as kubelet, the agent keeps its
  pods' processes running and retries, with a 0.5 s…5 s back-off, whatever it could not send
  (a pod's status, the deletion that ends a pod, the heartbeat and Lease every 5 s) until
  it lands; the pod watch reconnects and re-lists. No loop of the agent ends on an error:
  each logs it and tries again (`nodeagent_kube.is_transient` tells a server away from an
  answer about the request).
* **Stopping** kills every pod process group (SIGTERM, 2 s, SIGKILL). Mounts live only in
  the pods' namespaces, so nothing is left mounted on the host.

Containers run as root on the host file system (no chroot, no cgroups): only what is
listed above is isolated. Init containers run one after another before the containers; a
native sidecar (`restartPolicy: Always` on an init container) starts in its turn, runs beside
the containers and is stopped once they have all ended; `restartPolicy` Always/OnFailure
restarts with a 1 s…10 s back-off. `activeDeadlineSeconds` (also set on a running pod) fails
the pod with `DeadlineExceeded` and stops its containers. Deletion: SIGTERM to each process
group, the grace period, SIGKILL, final status, delete with grace 0.

Not done: probes (Ready = running), lifecycle hooks, resource limits, ClusterIP Services (no
kube-proxy; headless names only), `kubectl logs/exec/port-forward`, image pulls, volume types
other than those above. Mount points created on the host (e.g. `/etc/torpor`,
`/dev/termination-log`) stay there, empty.

Command line (runs until SIGINT/SIGTERM)::

    python hack/node_agent.py --kubeconfig K --nodes 2 --workdir DIR \\
        [--configmap-sync-seconds S] [--node-prefix torpor-node]
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import random
import signal
import threading
import time
import uuid
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import urlparse

import urllib3

from nodeagent_bind import build_bind_shim
from nodeagent_containers import now_iso
from nodeagent_kube import MERGE, ApiError, Backoff, KubeClient, is_transient
from nodeagent_pods import PodWorker, pod_dir_name
from nodeagent_volumes import NODE_ALLOCATABLE

JsonDict = dict[str, Any]
log = logging.getLogger("torpor.node_agent")

HEARTBEAT_SECONDS = 5.0  # kubelet's is 10 s; hack/controlplane.py's shortened grace period needs more
#: Each heartbeat request gives up after this long, so that one hanging request (a server that
#: accepted the connection and then went away) costs one beat, not the node-monitor grace period.
HEARTBEAT_TIMEOUT_SECONDS = 5.0
#: A pod watch asks the server to end it after a random time in this range (seconds); it then
#: resumes from the last resourceVersion. Bounded so that no stream lives on a dead connection.
WATCH_SECONDS = (60, 120)
LEASE_SECONDS = 40
#: The node lifecycle controller's taints of a node it has not heard from (NoSchedule and, for
#: taint-based eviction, NoExecute). A node is ready for the next pod only once they are gone:
#: pods tolerate `unreachable:NoExecute` for 300 s, so they are scheduled onto a node that still
#: carries it, and an operator then rightly takes that node for lost.
LOST_NODE_TAINTS = ("node.kubernetes.io/not-ready", "node.kubernetes.io/unreachable")
HOSTS_INTERVAL = 0.2  # seconds between two rewrites of the hosts files: events in between make one
HOST_ENV = ("PATH", "HOME", "LANG", "LC_ALL", "PYTHONPATH", "VIRTUAL_ENV")
KUBELET_VERSION = "v1.36.3"


class NodeAgent:
    """Registers Nodes and runs the pods bound to them; see the module docstring.

    Args:
        kubeconfig: admin kubeconfig of the API server.
        workdir: where pod directories, volumes and logs go (`<workdir>/pods/...`).
        nodes: how many Nodes to register.
        configmap_sync_seconds: period of the ConfigMap/Secret/downwardAPI volume refresh
            (kubelet's is about a minute); settable while running.
        node_prefix: Node names are `<node_prefix>-0` … `<node_prefix>-<nodes-1>`.

    Example:
        >>> with NodeAgent(Path("admin.kubeconfig"), Path("/tmp/agent")) as agent:
        ...     agent.logs_path(pod)
    """

    def __init__(
        self,
        kubeconfig: Path,
        workdir: Path,
        nodes: int = 2,
        configmap_sync_seconds: float = 60.0,
        node_prefix: str = "torpor-node",
    ):
        if nodes < 1:
            raise ValueError(f"nodes must be at least 1, got {nodes}")
        if configmap_sync_seconds <= 0:
            raise ValueError(f"configmap_sync_seconds must be positive, got {configmap_sync_seconds}")
        self.kubeconfig = Path(kubeconfig)
        self.workdir = Path(workdir)
        self.node_names = [f"{node_prefix}-{i}" for i in range(nodes)]
        self.configmap_sync_seconds = configmap_sync_seconds
        self.kube: KubeClient
        self.base_env: dict[str, str] = {}
        self.bind_shim: Path | None = None
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._hosts_due = threading.Event()
        self._workers: dict[str, PodWorker] = {}  # by pod UID
        self._pods: dict[str, JsonDict] = {}  # every pod in the cluster, by UID
        # Pods whose worker is over: late events about them must not start them again.
        self._done: set[str] = set()
        self._threads: list[threading.Thread] = []
        self._started = False
        self._started_at = ""
        # Where the pod watch resumes; None means list first. Only the watch thread sets it.
        self._watch_version: str | None = None
        # Fault hooks: nodes whose kubelet is silent (no heartbeat, no pod updates), the last
        # event of each of their pods held back until `restore`, and pods whose deletion is ignored.
        self._silent: set[str] = set()
        self._held: dict[str, tuple[str, JsonDict]] = {}
        self._undeletable: set[tuple[str, str]] = set()
        # vanish: the process groups SIGSTOPped per node, SIGKILLed by `restore` / `stop`.
        self._frozen: dict[str, list[int]] = {}
        # One boot per agent: re-registering a Node (after a 404) must not look like a reboot.
        self._boot_ids = {name: str(uuid.uuid4()) for name in self.node_names}

    # --- public -------------------------------------------------------------------------

    def start(self, ready_timeout: float = 90.0) -> NodeAgent:
        """Register the Nodes, start watching pods, and wait until the Nodes are Ready."""
        (self.workdir / "pods").mkdir(parents=True, exist_ok=True)
        self.kube = KubeClient(self.kubeconfig)
        api = urlparse(self.kube.host)
        self.base_env = {k: os.environ[k] for k in HOST_ENV if k in os.environ}
        self.base_env.update(
            KUBERNETES_SERVICE_HOST=api.hostname or "127.0.0.1", KUBERNETES_SERVICE_PORT=str(api.port or 443)
        )
        self.bind_shim = build_bind_shim(self.workdir / "lib")
        self._started = True
        self._started_at = now_iso()
        for name in self.node_names:
            self._register(name)
        for target, name in ((self._heartbeat_loop, "heartbeat"), (self._watch_loop, "pod-watch"),
                             (self._hosts_loop, "hosts")):
            thread = threading.Thread(target=target, name=f"node-agent-{name}", daemon=True)
            thread.start()
            self._threads.append(thread)
        self.wait_ready(ready_timeout)
        log.info("node agent: nodes %s ready", ", ".join(self.node_names))
        return self

    def stop(self) -> None:
        """Kill every pod process, stop watching, and delete the Nodes."""
        if not self._started:
            return
        self._started = False
        self._stop.set()
        self.kube.close()
        for node in list(self._frozen):
            self._kill_frozen(node)
        with self._lock:
            workers = list(self._workers.values())
        for worker in workers:
            worker.shutdown()
        for worker in workers:
            worker.join()
        for thread in self._threads:
            thread.join(timeout=10)
        for name in self.node_names:
            try:
                self.kube.delete(f"/api/v1/nodes/{name}")
            except (ApiError, urllib3.exceptions.HTTPError) as exc:
                log.warning("node agent: could not delete node %s: %s", name, exc)
        log.info("node agent: stopped")

    def __enter__(self) -> NodeAgent:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def wait_ready(self, timeout: float) -> None:
        """Wait until every Node is Ready and the node lifecycle controller's taints of a lost
        node (`LOST_NODE_TAINTS`, after `reclaim`/`make_not_ready` or an outage) are gone.

        Raises:
            TimeoutError: a Node is still not ready after `timeout` seconds.
        """
        deadline = time.monotonic() + timeout
        while True:
            pending = [n for n in self.node_names if not self._node_ready(n)]
            if not pending:
                return
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"nodes {pending} not Ready (or still tainted {' or '.join(LOST_NODE_TAINTS)}) "
                    f"after {timeout:g}s: is kube-controller-manager running?"
                )
            time.sleep(0.5)

    def pod_dir(self, pod: Any) -> Path:
        """The directory of a pod (a `V1Pod` or a dictionary): volumes, logs, hosts file."""
        if not isinstance(pod, dict):
            pod = {
                "metadata": {"namespace": pod.metadata.namespace, "name": pod.metadata.name, "uid": pod.metadata.uid}
            }
        return self.workdir / "pods" / pod_dir_name(pod)

    def logs_path(self, pod: Any, container: str | None = None) -> Path:
        """The log file of a container (default: the pod's first container)."""
        if container is None:
            spec = pod["spec"] if isinstance(pod, dict) else None
            container = spec["containers"][0]["name"] if spec else pod.spec.containers[0].name
        return self.pod_dir(pod) / f"{container}.log"

    def pids(self) -> list[int]:
        """PIDs (= process group IDs) of the containers running now."""
        with self._lock:
            return [pid for worker in self._workers.values() for pid in worker.pids()]

    # --- faults -------------------------------------------------------------------------

    def reclaim(self, node: str) -> list[int]:
        """The node vanishes like a reclaimed spot VM: heartbeats stop, its pods' processes are
        SIGKILLed and nothing is reported (the API keeps showing them Running). Returns the
        killed process group IDs."""
        self._silence(node)
        with self._lock:
            workers = [w for w in self._workers.values() if w.pod["spec"].get("nodeName") == node]
        killed = [pid for w in workers for pid in w.pids()]
        for worker in workers:
            worker.kill(signal.SIGKILL)
        log.info("node agent: node %s reclaimed (killed %s)", node, killed)
        return killed

    def vanish(self, node: str) -> list[int]:
        """The node vanishes without a trace: heartbeats stop, its pods' processes are SIGSTOPped
        (connections open, nothing answers) and nothing is reported. Returns the stopped
        process group IDs; `restore` or `stop` SIGKILLs them."""
        self._silence(node)
        with self._lock:
            workers = [w for w in self._workers.values() if w.pod["spec"].get("nodeName") == node]
        frozen = [pid for w in workers for pid in w.pids()]
        self._frozen.setdefault(node, []).extend(frozen)
        for worker in workers:
            worker.kill(signal.SIGSTOP)
        log.info("node agent: node %s vanished (stopped %s)", node, frozen)
        return frozen

    def _kill_frozen(self, node: str) -> None:
        """SIGKILL (then SIGCONT, so the kill is delivered at once) what `vanish` stopped on `node`."""
        for pgid in self._frozen.pop(node, []):
            for sig in (signal.SIGKILL, signal.SIGCONT):
                try:
                    os.killpg(pgid, sig)
                except ProcessLookupError:
                    break

    def make_not_ready(self, node: str) -> None:
        """The node's kubelet loses the API: heartbeats and pod updates stop, processes keep running."""
        self._silence(node)
        log.info("node agent: node %s stopped reporting", node)

    def restore(self, node: str) -> None:
        """Undo `reclaim` / `vanish` / `make_not_ready`: heartbeats resume and the held pod events
        are replayed (a vanished node's processes are SIGKILLed first: it has rebooted)."""
        self._kill_frozen(node)
        with self._lock:
            self._silent.discard(node)
            held = [self._held.pop(uid) for uid in list(self._held)
                    if self._held[uid][1]["spec"].get("nodeName") == node]
        self._heartbeat(node)
        for kind, pod in held:
            self._dispatch(kind, pod)
        log.info("node agent: node %s reporting again", node)

    def hold_terminating(self, namespace: str, name: str) -> None:
        """Ignore the deletion of pod `namespace/name`: it stays Terminating, its processes run."""
        with self._lock:
            self._undeletable.add((namespace, name))

    def release_terminating(self, namespace: str, name: str) -> None:
        """Undo `hold_terminating`: a pending deletion of the pod now proceeds."""
        with self._lock:
            self._undeletable.discard((namespace, name))
            pod = next((p for p in self._pods.values()
                        if (p["metadata"]["namespace"], p["metadata"]["name"]) == (namespace, name)), None)
        if pod is not None:
            self._dispatch("MODIFIED", pod)

    def silent(self, node: str | None) -> bool:
        """Whether `node` is one of ours whose kubelet must not talk to the API now."""
        with self._lock:
            return node in self._silent

    def _silence(self, node: str) -> None:
        if node not in self.node_names:
            raise ValueError(f"node {node!r} is not one of this agent's nodes {self.node_names}")
        with self._lock:
            self._silent.add(node)

    # --- nodes --------------------------------------------------------------------------

    def _node_status(self) -> JsonDict:
        now = now_iso()
        conditions = [
            ("MemoryPressure", "False", "KubeletHasSufficientMemory"),
            ("DiskPressure", "False", "KubeletHasNoDiskPressure"),
            ("PIDPressure", "False", "KubeletHasSufficientPID"),
            ("Ready", "True", "KubeletReady"),
        ]
        return {
            "conditions": [
                {
                    "type": t,
                    "status": s,
                    "reason": r,
                    "message": "torpor node agent",
                    "lastHeartbeatTime": now,
                    "lastTransitionTime": self._started_at,
                }
                for t, s, r in conditions
            ]
        }

    def _register(self, name: str) -> None:
        node = {
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {
                "name": name,
                "labels": {
                    "kubernetes.io/hostname": name,
                    "kubernetes.io/os": "linux",
                    "kubernetes.io/arch": "amd64",
                    "torpor.dev/node-agent": "true",
                },
            },
        }
        try:
            created = self.kube.create("/api/v1/nodes", node)
        except ApiError as exc:
            if exc.status != 409:
                raise
            created = self.kube.get(f"/api/v1/nodes/{name}")
        status = {
            "capacity": NODE_ALLOCATABLE,
            "allocatable": NODE_ALLOCATABLE,
            "addresses": [{"type": "InternalIP", "address": "127.0.0.1"}, {"type": "Hostname", "address": name}],
            "daemonEndpoints": {"kubeletEndpoint": {"Port": 0}},
            "nodeInfo": {
                "machineID": uuid.uuid5(uuid.NAMESPACE_DNS, name).hex,
                "systemUUID": str(uuid.uuid5(uuid.NAMESPACE_DNS, name)),
                "bootID": self._boot_ids[name],
                "kernelVersion": platform.release(),
                "osImage": "torpor node agent",
                "containerRuntimeVersion": "torpor://0.1.0",
                "kubeletVersion": KUBELET_VERSION,
                "kubeProxyVersion": KUBELET_VERSION,
                "operatingSystem": "linux",
                "architecture": "amd64",
            },
            **self._node_status(),
        }
        self.kube.patch(f"/api/v1/nodes/{name}/status", {"status": status})
        lease = {
            "apiVersion": "coordination.k8s.io/v1",
            "kind": "Lease",
            "metadata": {
                "name": name,
                "namespace": "kube-node-lease",
                "ownerReferences": [
                    {"apiVersion": "v1", "kind": "Node", "name": name, "uid": created["metadata"]["uid"]}
                ],
            },
            "spec": {"holderIdentity": name, "leaseDurationSeconds": LEASE_SECONDS, "renewTime": _micro_time()},
        }
        try:
            self.kube.create("/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases", lease)
        except ApiError as exc:
            if exc.status != 409:
                raise
            self._renew_lease(name)
        log.info("node agent: registered node %s", name)

    def _renew_lease(self, name: str, timeout: float = 30.0) -> None:
        self.kube.patch(
            f"/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases/{name}",
            {"spec": {"holderIdentity": name, "renewTime": _micro_time()}},
            MERGE,
            timeout=timeout,
        )

    def _heartbeat_loop(self) -> None:
        while not self._stop.wait(HEARTBEAT_SECONDS):
            for name in self.node_names:
                if not self.silent(name):
                    self._heartbeat(name)

    def _heartbeat(self, name: str) -> None:
        """Renew the node's Lease and its Ready condition. Never raises: a beat that fails is
        logged, and the next one, `HEARTBEAT_SECONDS` later, tries again — a heartbeat thread
        that died on one error would leave a healthy node to be declared unreachable."""
        try:
            try:
                self._renew_lease(name, timeout=HEARTBEAT_TIMEOUT_SECONDS)
                self.kube.patch(f"/api/v1/nodes/{name}/status", {"status": self._node_status()},
                                timeout=HEARTBEAT_TIMEOUT_SECONDS)
            except ApiError as exc:
                if exc.status != 404:
                    raise
                # The Node or its Lease was deleted (or, for a moment while an API server starts,
                # the Lease's API group is not served yet): register again, like kubelet.
                self._register(name)
        except Exception as exc:
            log.warning("node agent: heartbeat for %s failed: %s", name, exc, exc_info=not is_transient(exc))

    def _node_ready(self, name: str) -> bool:
        try:
            node = self.kube.get(f"/api/v1/nodes/{name}")
        except Exception as exc:
            if is_transient(exc):
                return False  # the API server is away: not known to be ready
            raise
        ready = any(
            c["type"] == "Ready" and c["status"] == "True" for c in node.get("status", {}).get("conditions", [])
        )
        tainted = any(t["key"] in LOST_NODE_TAINTS for t in node.get("spec", {}).get("taints") or [])
        return ready and not tainted

    # --- pods ---------------------------------------------------------------------------

    def _watch_loop(self) -> None:
        """List, then watch from the list's resourceVersion; relist after a 410 Gone.

        Never ends before `stop()`: whatever breaks a watch (the server gone, a dropped or
        silent connection, an error event, a bug) is logged, and the watch is opened again
        after a back-off (0.5 s…5 s); a watch the server ended in time resumes at once.
        """
        backoff = Backoff()
        while not self._stop.is_set():
            try:
                if self._watch_version is None:
                    self._watch_version = self._relist()
                timeout = random.randint(*WATCH_SECONDS)
                failed = False
                for event in self.kube.watch("/api/v1/pods", self._watch_version, timeout_seconds=timeout):
                    obj = event["object"]
                    if event["type"] == "ERROR":
                        log.info("node agent: pod watch ended: %s", obj.get("message"))
                        if obj.get("code") == 410:
                            self._watch_version = None
                        else:
                            failed = True  # e.g. a server shutting down: not at once again
                        break
                    backoff.reset()
                    self._watch_version = obj["metadata"]["resourceVersion"]
                    if event["type"] != "BOOKMARK":
                        self._dispatch(event["type"], obj)
                if not failed:
                    continue
            except ApiError as exc:
                if exc.status == 410:
                    log.info("node agent: pod watch expired, listing again")
                    self._watch_version = None
                    continue
                log.warning("node agent: pod watch failed: %s", exc)
            except Exception as exc:
                if self._stop.is_set():
                    break
                log.warning("node agent: pod watch interrupted (%s), reconnecting", type(exc).__name__,
                            exc_info=not (is_transient(exc) or isinstance(exc, ValueError)))
            self._stop.wait(backoff.next())

    def _dispatch(self, kind: str, pod: JsonDict) -> None:
        """`_on_pod`, but one bad pod must not stop the watch for all the others."""
        try:
            self._on_pod(kind, pod)
        except Exception:
            log.exception("node agent: cannot handle %s of pod %s", kind, pod["metadata"].get("name"))

    def _relist(self) -> str:
        answer = self.kube.get("/api/v1/pods")
        seen = {pod["metadata"]["uid"]: pod for pod in answer["items"]}
        with self._lock:
            vanished = [pod for uid, pod in self._pods.items() if uid not in seen]
        for pod in vanished:
            self._dispatch("DELETED", pod)
        for pod in seen.values():
            self._dispatch("MODIFIED", pod)
        return answer["metadata"]["resourceVersion"]

    def _on_pod(self, kind: str, pod: JsonDict) -> None:
        uid = pod["metadata"]["uid"]
        ours = pod["spec"].get("nodeName") in self.node_names
        meta = pod["metadata"]
        with self._lock:
            if pod["spec"].get("nodeName") in self._silent:
                self._held[uid] = (kind, pod)  # a silent kubelet sees nothing; `restore` replays it
                if kind == "DELETED":
                    self._pods.pop(uid, None)
                else:
                    self._pods[uid] = pod
                return
            if kind == "DELETED":
                self._pods.pop(uid, None)
                done = uid in self._done
                self._done.discard(uid)
            else:
                self._pods[uid] = pod
                done = uid in self._done
            worker = self._workers.get(uid)
            held = (meta["namespace"], meta["name"]) in self._undeletable
        if worker is not None and kind != "DELETED" and held and meta.get("deletionTimestamp"):
            # hold_terminating: the worker never learns of the deletion
            seen = {k: v for k, v in meta.items() if k not in ("deletionTimestamp", "deletionGracePeriodSeconds")}
            worker.update({**pod, "metadata": seen})
        elif worker is not None:
            worker.gone(pod) if kind == "DELETED" else worker.update(pod)
        elif ours and kind != "DELETED" and not done and not self._stop.is_set():
            if (pod.get("status") or {}).get("phase") in ("Succeeded", "Failed"):
                if pod["metadata"].get("deletionTimestamp"):
                    self._delete_now(pod)  # finished before we saw it: nothing to stop
            else:
                with self._lock:
                    worker = PodWorker(self, pod, self._allocate_ip(pod))
                    self._workers[uid] = worker
                worker.start()
        if pod["spec"].get("subdomain") or worker is not None:
            self._refresh_hosts()

    def _delete_now(self, pod: JsonDict) -> None:
        """Remove a pod that is over (grace 0, UID precondition). While the API server is away a
        thread of its own keeps trying: the watch may never mention the pod again."""
        if not self._delete_over(pod):
            meta = pod["metadata"]
            threading.Thread(target=self._keep_deleting, args=(pod,), daemon=True,
                             name=f"node-agent-delete-{meta['namespace']}/{meta['name']}").start()

    def _keep_deleting(self, pod: JsonDict) -> None:
        backoff = Backoff()
        while not self._stop.wait(backoff.next()):
            if self._delete_over(pod):
                return

    def _delete_over(self, pod: JsonDict) -> bool:
        """One attempt at `_delete_now`; False if the API server could not be reached."""
        meta = pod["metadata"]
        try:
            self.kube.delete(
                f"/api/v1/namespaces/{meta['namespace']}/pods/{meta['name']}",
                {"gracePeriodSeconds": 0, "preconditions": {"uid": meta["uid"]}},
            )
        except Exception as exc:
            if isinstance(exc, ApiError) and exc.status in (404, 409):
                return True  # gone already, or another pod of that name now
            if not is_transient(exc):
                raise
            log.warning("node agent: deleting pod %s/%s failed (%s), retrying", meta["namespace"], meta["name"], exc)
            return False
        return True

    def worker_done(self, worker: PodWorker) -> None:
        """Called by a worker thread when its pod is over."""
        with self._lock:
            self._workers.pop(worker.uid, None)
            if worker.uid in self._pods:
                self._done.add(worker.uid)
        self._refresh_hosts()

    def _allocate_ip(self, pod: JsonDict) -> str:
        """A free 127.x.y.z (x ≥ 1) address, the pod's old one if it had one, the host's with
        `hostNetwork`. Needs `_lock`."""
        in_use = {w.ip for w in self._workers.values()}
        in_use |= {
            (p.get("status") or {}).get("podIP")
            for p in self._pods.values()
            if p["metadata"]["uid"] != pod["metadata"]["uid"]
        }
        if pod["spec"].get("hostNetwork"):
            return "127.0.0.1"
        old = (pod.get("status") or {}).get("podIP", "")
        if old.startswith("127.") and not old.startswith("127.0.") and old not in in_use:
            return old
        while True:
            ip = f"127.{random.randint(1, 254)}.{random.randint(0, 255)}.{random.randint(1, 254)}"
            if ip not in in_use:
                return ip

    def _dns_table(self) -> tuple[tuple[str, str, str], ...]:
        """``(uid, ip, names)`` of every live pod with a hostname and a subdomain, by uid: the
        part of the hosts files that is the same in every pod (built once per change, not once
        per pod: with N pods, rebuilding every file on every pod event cost N² per event)."""
        with self._lock:
            ips = {uid: w.ip for uid, w in self._workers.items()}
            pods = list(self._pods.values())
        table = []
        for pod in pods:
            meta, status = pod["metadata"], pod.get("status") or {}
            ip = ips.get(meta["uid"]) or status.get("podIP")
            names = _dns_names(pod)
            if not names or not ip or meta.get("deletionTimestamp") or status.get("phase") in ("Succeeded", "Failed"):
                continue
            table.append((meta["uid"], ip, " ".join(names)))
        return tuple(sorted(table))

    def hosts_for(self, worker: PodWorker, table: tuple[tuple[str, str, str], ...] | None = None) -> str:
        """The /etc/hosts of one pod: localhost, itself, and every pod with a subdomain
        (``table``: :meth:`_dns_table`, built now when not given)."""
        lines = [
            "# Kubernetes-managed hosts file (torpor node agent).",
            "127.0.0.1\tlocalhost",
            "::1\tlocalhost ip6-localhost ip6-loopback",
        ]
        own = worker.pod
        own_names = _dns_names(own)
        own_host = own["spec"].get("hostname") or own["metadata"]["name"]
        lines.append(f"{worker.ip}\t{' '.join([*own_names, own_host])}")
        lines.extend(f"{ip}\t{names}" for uid, ip, names in (self._dns_table() if table is None else table)
                     if uid != worker.uid)
        return "\n".join(lines) + "\n"

    def _refresh_hosts(self) -> None:
        """A pod came, went or changed: the hosts files are rewritten by :meth:`_hosts_loop`
        when the names they hold changed (many events in a row make one rewrite)."""
        self._hosts_due.set()

    def _hosts_loop(self) -> None:
        """Rewrite every pod's hosts file when the DNS table changed, at most every
        ``HOSTS_INTERVAL`` seconds. A new pod writes its own file at its start, from the table
        as it is then, so it never waits for this loop to see the pods already there."""
        written: tuple[tuple[str, str, str], ...] | None = None
        workers_seen: frozenset[str] = frozenset()
        while not self._stop.is_set():
            if not self._hosts_due.wait(1.0):
                continue
            self._hosts_due.clear()
            table = self._dns_table()
            with self._lock:
                workers = list(self._workers.values())
            uids = frozenset(w.uid for w in workers)
            if table != written or uids != workers_seen:
                for worker in workers:
                    if worker.hosts_path.parent.exists():
                        worker.write_hosts(table)
                written, workers_seen = table, uids
            self._stop.wait(HOSTS_INTERVAL)


def _dns_names(pod: JsonDict) -> list[str]:
    spec, ns = pod["spec"], pod["metadata"]["namespace"]
    host, sub = spec.get("hostname"), spec.get("subdomain")
    if not (host and sub):
        return []
    return [f"{host}.{sub}.{ns}.svc.cluster.local", f"{host}.{sub}.{ns}.svc", f"{host}.{sub}.{ns}", f"{host}.{sub}"]


def _micro_time() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime()) + f".{time.time_ns() // 1000 % 10**6:06d}Z"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--kubeconfig", type=Path, required=True)
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--nodes", type=int, default=2)
    parser.add_argument("--configmap-sync-seconds", type=float, default=60.0)
    parser.add_argument("--node-prefix", default="torpor-node")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    agent = NodeAgent(args.kubeconfig, args.workdir, args.nodes, args.configmap_sync_seconds, args.node_prefix)
    with agent:
        print(
            f"node agent running: nodes {', '.join(agent.node_names)}; pod logs under {args.workdir}/pods", flush=True
        )
        stop.wait()


if __name__ == "__main__":
    main()
