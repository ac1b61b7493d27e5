"""One pod on a node-agent node: its directory, volumes, processes and status.

A `PodWorker` thread owns one pod from the moment it is bound to one of the agent's nodes
until it is deleted from the API server. It does, in order, what kubelet does:

1. materialise the pod's volumes under `<workdir>/pods/<ns>_<name>_<uid>/volumes/`
   (waiting, as `ContainerCreating`, while a ConfigMap or Secret is missing);
2. run the init containers one after another, then all containers, each as a process
   (see `nodeagent_launch`) in its own session and process group. A native sidecar (an init
   container with `restartPolicy: Always`) is started in its turn and left running, restarted
   whenever it exits, and stopped (SIGTERM, the grace period, SIGKILL) once every container has
   ended for good; it never decides the pod's phase;
3. report status (`Pending` → `Running` → `Succeeded`/`Failed`) with containerStatuses,
   exit codes and termination messages; restart containers per `restartPolicy` with a
   short exponential back-off (1 s doubling up to 10 s);
   `spec.activeDeadlineSeconds` (also when set later, as a pod update may) counts from the
   worker's start: past it the pod is `Failed` with reason `DeadlineExceeded` and every
   container is stopped like on deletion, the pod staying until it is deleted;
4. refresh ConfigMap, Secret, downwardAPI and projected volumes every
   `configmap_sync_seconds` and at once when the pod's metadata or spec changes;
5. on `deletionTimestamp`: SIGTERM to every process group, wait the grace period, SIGKILL,
   report the final status, delete the pod with grace period 0 and a UID precondition.

While the API server is away (`nodeagent_kube.is_transient`) the processes go on: a status
that could not be sent is sent again (0.5 s…5 s back-off) until it lands, the final status
and the deletion are retried until they land, volumes keep their last contents, and a
container that needs an object it cannot fetch now waits as it would for a missing one.

Each container's stdout and stderr go to `<pod dir>/<container>.log` (appended across
restarts). Its termination message file is `<pod dir>/<container>.termination-log`,
mounted at `terminationMessagePath`. How one container process is run and reaped:
`nodeagent_containers`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import nodeagent_volumes as volumes
from nodeagent_containers import Container, now_iso
from nodeagent_kube import ApiError, Backoff, is_transient

if TYPE_CHECKING:
    from node_agent import NodeAgent

JsonDict = dict[str, Any]
log = logging.getLogger("torpor.node_agent")

BACKOFF_START, BACKOFF_MAX = 1.0, 10.0
TICK = 0.1  # seconds between looks at the processes
# The agent stopping: how long pod processes get between SIGTERM and SIGKILL.
SHUTDOWN_GRACE = 2.0


def pod_dir_name(pod: JsonDict) -> str:
    meta = pod["metadata"]
    return f"{meta['namespace']}_{meta['name']}_{meta['uid']}"


class PodWorker(threading.Thread):
    """Runs one pod; see the module docstring. Fed by the agent's watcher."""

    def __init__(self, agent: NodeAgent, pod: JsonDict, pod_ip: str):
        meta = pod["metadata"]
        super().__init__(name=f"pod-{meta['namespace']}/{meta['name']}", daemon=True)
        self.agent = agent
        self.uid: str = meta["uid"]
        self.key = f"{meta['namespace']}/{meta['name']}"
        self.ip = pod_ip
        self.dir = agent.workdir / "pods" / pod_dir_name(pod)
        self.hosts_path = self.dir / "hosts"
        self._pod = pod
        self._lock = threading.Lock()
        self._hosts_lock = threading.Lock()
        self._wake = threading.Event()
        self._changed = False
        self._gone = False
        self._stopping = False
        self._start_time: str | None = None
        self._active_since = time.monotonic()
        self._mains_done = False  # every container ended for good: native sidecars are stopped now
        self._deadline_exceeded = False  # activeDeadlineSeconds passed: stop everything, phase Failed
        self._last_sync = 0.0
        self._last_report: JsonDict | None = None
        # A status the API does not show yet (the server away, or the node silenced by a
        # fault): `_wait` sends it again from `_retry_at` on.
        self._unreported = False
        self._retry_at = 0.0
        self._backoff = Backoff()
        self._transitions: dict[str, tuple[str, str]] = {}
        self._tokens: dict[tuple[str, int], tuple[bytes, float]] = {}
        spec = pod["spec"]
        self.containers = [self._container(c, init=True) for c in spec.get("initContainers") or []] + [
            self._container(c, init=False) for c in spec["containers"]
        ]

    def _container(self, spec: JsonDict, init: bool) -> Container:
        return Container(
            spec=spec,
            init=init,
            log_path=self.dir / f"{spec['name']}.log",
            message_path=self.dir / f"{spec['name']}.termination-log",
        )

    # --- fed by the agent (other threads) -----------------------------------------------

    def update(self, pod: JsonDict) -> None:
        """A newer version of the pod arrived from the watch."""
        with self._lock:
            if _fingerprint(pod) != _fingerprint(self._pod):
                self._changed = True
            self._pod = pod
        self._wake.set()

    def gone(self, pod: JsonDict) -> None:
        """The pod was removed from the API server (force-deleted or deleted by us)."""
        with self._lock:
            self._pod = pod
        self._gone = True
        self._wake.set()

    def shutdown(self) -> None:
        """The agent is stopping: kill the processes, touch nothing in the API."""
        self._stopping = True
        self._wake.set()

    def kill(self, sig: signal.Signals) -> None:
        """Signal every container's process group now (a fault: the node vanished)."""
        self._kill_all(sig)

    def write_hosts(self, table: Any = None) -> None:
        """Rewrite the pod's hosts file in place: a bind mount keeps the inode, not the name.

        ``table``: the agent's DNS table to write (default: built now). Written under a lock,
        and only when the contents differ.
        """
        with self._hosts_lock:
            text = self.agent.hosts_for(self, table)
            if not self.hosts_path.exists() or self.hosts_path.read_text() != text:
                with open(self.hosts_path, "a+") as f:
                    f.seek(0)
                    f.truncate()
                    f.write(text)

    def pids(self) -> list[int]:
        return [c.proc.pid for c in self.containers if c.proc is not None]

    @property
    def pod(self) -> JsonDict:
        with self._lock:
            return self._pod

    # --- the thread ---------------------------------------------------------------------

    def run(self) -> None:
        try:
            self._run()
        except Exception as exc:
            log.exception("pod %s: worker failed", self.key)
            self._crashed(exc)
        finally:
            self._kill_all(signal.SIGKILL)
            for container in self.containers:  # reap them: a killed child never waited for stays a zombie
                if container.proc is not None:
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        container.proc.wait(timeout=10)
            self.agent.worker_done(self)

    def _run(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        self.write_hosts()
        self._start_time, self._active_since = now_iso(), time.monotonic()
        log.info("pod %s: assigned to %s, pod IP %s", self.key, self.pod["spec"]["nodeName"], self.ip)
        self._report()
        while not self._prepare_volumes():
            if self._wait(2.0):
                return self._finish()
        inits = [c for c in self.containers if c.init]
        mains = [c for c in self.containers if not c.init]
        for container in inits:
            if not (self._start_sidecar(container) if container.restartable else self._run_init(container)):
                return self._finish()
        sidecars = [c for c in inits if c.restartable]
        for container in mains:
            self._start(container)
        self._report()
        while not self._wait(TICK):
            if self._tend(mains + sidecars):
                self._report()
            if all(c.terminated is not None and not self._will_restart(c) for c in mains):
                self._end_sidecars()
                break
        self._finish()

    def _tend(self, containers: list[Container]) -> bool:
        """Reap the containers that exited and (re)start those due; True if anything changed."""
        changed = False
        for container in containers:
            changed |= self._reap(container)
            if not container.running and container.terminated is None and time.monotonic() >= container.next_start:
                self._start(container)
                changed = True
        return changed

    def _start_sidecar(self, container: Container) -> bool:
        """Start a native sidecar and go on once it runs (no startup probes here); False if the
        pod must end first. The sidecars started before it are tended meanwhile."""
        sidecars = [c for c in self.containers if c.restartable and c.started_at is not None and c is not container]
        while not container.running:
            if self._tend([*sidecars, container]):
                self._report()
            if not container.running and self._wait(TICK):
                return False
        self._report()
        return True

    def _end_sidecars(self) -> None:
        """Every container has ended: stop the native sidecars, as kubelet does, before the
        pod's final phase (Running until then)."""
        self._mains_done = True
        if any(c.running for c in self.containers):
            self._report()
            self._terminate(float(self.pod["spec"].get("terminationGracePeriodSeconds", 30)))

    def _crashed(self, exc: Exception) -> None:
        """Show the agent's failure in the pod's status, then still honour its deletion."""
        for container in self.containers:
            if not container.running and container.terminated is None:
                container.waiting = ("RunContainerError", f"node agent: {exc!r}")
        try:
            self._report()
            self._finish()
        except Exception:
            log.exception("pod %s: cannot clean up after the failure", self.key)

    def _run_init(self, container: Container) -> bool:
        """Run one init container to success; False if it failed for good or the pod is going away.
        The native sidecars started before it are tended meanwhile."""
        sidecars = [c for c in self.containers if c.restartable and c.started_at is not None]
        while True:
            if not container.running and container.terminated is None and time.monotonic() >= container.next_start:
                self._start(container)
                self._report()
            if container.terminated is not None:  # ended, and no restart is coming
                return container.terminated["exitCode"] == 0
            if self._wait(TICK):
                return False
            if self._tend(sidecars) | self._reap(container):
                self._report()

    def _wait(self, timeout: float) -> bool:
        """Sleep up to `timeout`, refreshing volumes when due; True if the pod must end now."""
        self._wake.wait(timeout)
        self._wake.clear()
        if self._stopping or self._gone or self._deleting() or self._past_deadline():
            return True
        if self._unreported and time.monotonic() >= self._retry_at:
            self._report()
        with self._lock:
            changed, self._changed = self._changed, False
        if changed or time.monotonic() - self._last_sync >= self.agent.configmap_sync_seconds:
            self._refresh_volumes()
        return False

    def _deleting(self) -> bool:
        return bool(self.pod["metadata"].get("deletionTimestamp"))

    def _past_deadline(self) -> bool:
        """`spec.activeDeadlineSeconds` has passed (sticky: the pod is Failed from then on)."""
        deadline = self.pod["spec"].get("activeDeadlineSeconds")
        if not self._deadline_exceeded and deadline is not None and time.monotonic() - self._active_since >= deadline:
            log.info("pod %s: active for longer than its deadline of %ss", self.key, deadline)
            self._deadline_exceeded = True
        return self._deadline_exceeded

    # --- processes ----------------------------------------------------------------------

    def _start(self, container: Container) -> None:
        pod = self.pod
        spec = container.spec
        try:
            env = volumes.container_env(pod, spec, self._fetcher())
        except volumes.ConfigError as exc:
            container.waiting = ("CreateContainerConfigError", str(exc))
            container.next_start = time.monotonic() + 2.0
            return
        argv = [volumes.expand(a, env) for a in (spec.get("command") or []) + (spec.get("args") or [])]
        if not argv:
            container.waiting = ("CreateContainerConfigError", "the node agent ignores images: give a command")
            container.next_start = time.monotonic() + 2.0
            return
        if argv[0] in ("python", "python3"):
            argv[0] = sys.executable
        hostname = pod["spec"].get("hostname") or pod["metadata"]["name"]
        full_env = {**self.agent.base_env, "HOSTNAME": hostname, **env}
        if self.agent.bind_shim is not None:
            full_env["TORPOR_POD_IP"] = self.ip
            full_env["LD_PRELOAD"] = ":".join(filter(None, [str(self.agent.bind_shim), env.get("LD_PRELOAD")]))
        launch = {
            "hostname": hostname[:63],
            "cwd": spec.get("workingDir") or str(self.dir),
            "argv": argv,
            "env": full_env,
            "mounts": self._mounts(container, env),
        }
        container.launch(launch, self.dir / f"{container.name}.launch.json")
        log.info("pod %s: started container %s (pid %d)", self.key, container.name, container.proc.pid)

    def _mounts(self, container: Container, env: dict[str, str]) -> list[JsonDict]:
        vols = {v["name"]: v for v in self.pod["spec"].get("volumes") or []}
        mounts = [{"source": str(self.hosts_path), "target": "/etc/hosts", "readOnly": False}]
        message_target = container.spec.get("terminationMessagePath") or "/dev/termination-log"
        mounts.append({"source": str(container.message_path), "target": message_target, "readOnly": False})
        for index, vm in enumerate(container.spec.get("volumeMounts") or []):
            volume = vols[vm["name"]]
            source = Path(volume["hostPath"]["path"]) if "hostPath" in volume else self.dir / "volumes" / vm["name"]
            sub = vm.get("subPath") or volumes.expand(vm.get("subPathExpr", ""), env)
            refreshed = volumes.is_refreshed(volume)
            if sub and refreshed:
                # Materialised once, never refreshed: kubelet binds the file as it was.
                copy = self.dir / "subpaths" / container.name / str(index)
                if not copy.exists():
                    copy.parent.mkdir(parents=True, exist_ok=True)
                    resolved = (source / sub).resolve()
                    if resolved.is_dir():
                        shutil.copytree(resolved, copy)
                    else:
                        shutil.copy2(resolved, copy)
                source = copy
            elif sub:
                source = source / sub
                if not source.exists():
                    source.mkdir(parents=True)
            mounts.append(
                {"source": str(source), "target": vm["mountPath"], "readOnly": bool(vm.get("readOnly")) or refreshed}
            )
        return mounts

    def _reap(self, container: Container) -> bool:
        """Record the container's end if its process exited; True if it did."""
        if not container.poll():
            return False
        assert container.terminated is not None
        log.info("pod %s: container %s exited with %d", self.key, container.name, container.terminated["exitCode"])
        if self._will_restart(container):
            delay = min(BACKOFF_MAX, BACKOFF_START * 2 ** min(container.restart_count, 10))
            container.next_start = time.monotonic() + delay
            container.last_state = {"terminated": container.terminated}
            container.terminated = None
            container.restart_count += 1
            container.waiting = ("CrashLoopBackOff", f"back-off {delay:g}s restarting failed container")
        return True

    def _will_restart(self, container: Container) -> bool:
        if self._stopping or self._gone or self._deleting() or self._deadline_exceeded:
            return False
        if container.restartable:
            return not self._mains_done
        policy = self.pod["spec"].get("restartPolicy", "Always")
        if container.init:
            return policy != "Never" and (container.terminated or {}).get("exitCode", 1) != 0
        if policy == "Always":
            return True
        return policy == "OnFailure" and (container.terminated or {}).get("exitCode", 0) != 0

    def _kill_all(self, sig: signal.Signals) -> None:
        for container in self.containers:
            container.signal(sig)

    def _terminate(self, grace: float) -> None:
        """SIGTERM every container, wait up to `grace` seconds, then SIGKILL."""
        if not any(c.running for c in self.containers):
            return
        log.info("pod %s: stopping containers, grace period %gs", self.key, grace)
        self._kill_all(signal.SIGTERM)
        deadline = time.monotonic() + grace
        while any(c.running for c in self.containers) and time.monotonic() < deadline:
            self._wake.wait(TICK)
            self._wake.clear()
            for container in self.containers:
                self._reap(container)
            new_grace = self.pod["metadata"].get("deletionGracePeriodSeconds")
            if new_grace is not None and not self._stopping:
                deadline = min(deadline, time.monotonic() + new_grace)
        self._kill_all(signal.SIGKILL)
        for container in self.containers:
            if container.proc is not None:
                container.proc.wait()
                self._reap(container)

    # --- the end ------------------------------------------------------------------------

    def _finish(self) -> None:
        if self._stopping:
            self._terminate(SHUTDOWN_GRACE)
            return
        if self._deadline_exceeded and not (self._gone or self._deleting()):
            self._report()  # Failed at once, as kubelet says it, then the containers are stopped
            self._terminate(float(self.pod["spec"].get("terminationGracePeriodSeconds", 30)))
        if not (self._gone or self._deleting()):
            self._report()
            log.info("pod %s: %s", self.key, self._phase())
            while not (self._stopping or self._gone or self._deleting()):
                self._wake.wait(1.0)
                self._wake.clear()
                if time.monotonic() >= self._retry_at:
                    self._report()  # a no-op unless the API server was away or the node silenced
            if self._stopping:
                return
        meta = self.pod["metadata"]
        grace = meta.get("deletionGracePeriodSeconds")
        if grace is None:
            grace = self.pod["spec"].get("terminationGracePeriodSeconds", 30)
        self._terminate(SHUTDOWN_GRACE if self._stopping else float(grace))
        # The final status, then the deletion; each retried until it lands (the API server may
        # be away just now), unless the pod is force-deleted or the agent stops meanwhile.
        while not (self._gone or self._stopping):
            if self._report() and self._delete():
                return
            self._wake.wait(max(0.0, self._retry_at - time.monotonic()))
            self._wake.clear()

    def _delete(self) -> bool:
        """Delete the pod (grace 0, UID precondition); False if the API server could not be reached."""
        meta = self.pod["metadata"]
        try:
            self.agent.kube.delete(
                f"/api/v1/namespaces/{meta['namespace']}/pods/{meta['name']}",
                {"gracePeriodSeconds": 0, "preconditions": {"uid": self.uid}},
            )
        except Exception as exc:
            if isinstance(exc, ApiError) and exc.status in (404, 409):
                return True  # gone already (force-deleted), or another pod of that name now
            if not is_transient(exc):
                raise
            return self._retry_later("deletion", exc)
        log.info("pod %s: deleted", self.key)
        return True

    def _retry_later(self, what: str, exc: Exception | None) -> bool:
        """Schedule the next attempt after a back-off; False, for the caller to return."""
        delay = self._backoff.next() if exc is not None else 1.0
        self._retry_at = time.monotonic() + delay
        if exc is not None:
            log.warning("pod %s: %s not sent (%s), again in %gs", self.key, what, exc, delay)
        return False

    # --- volumes ------------------------------------------------------------------------

    def _fetcher(self) -> volumes.Fetch:
        cache: dict[tuple[str, str, str], JsonDict | None] = {}
        plural = {"ConfigMap": "configmaps", "Secret": "secrets"}

        def fetch(kind: str, ns: str, name: str) -> JsonDict | None:
            key = (kind, ns, name)
            if key not in cache:
                try:
                    cache[key] = self.agent.kube.get(f"/api/v1/namespaces/{ns}/{plural[kind]}/{name}")
                except Exception as exc:
                    if is_transient(exc):  # wait for the API server as for a missing object
                        raise volumes.ConfigError(f"cannot get {kind} {ns}/{name}: {exc}") from exc
                    if not (isinstance(exc, ApiError) and exc.status == 404):
                        raise
                    cache[key] = None
            return cache[key]

        return fetch

    def _token(self, source: JsonDict) -> bytes:
        audience = source.get("audience") or ""
        ttl = int(source.get("expirationSeconds", 3607))
        cached = self._tokens.get((audience, ttl))
        if cached and time.monotonic() < cached[1]:
            return cached[0]
        pod = self.pod
        meta = pod["metadata"]
        sa = pod["spec"].get("serviceAccountName") or "default"
        body = {
            "apiVersion": "authentication.k8s.io/v1",
            "kind": "TokenRequest",
            "spec": {
                "audiences": [audience] if audience else None,
                "expirationSeconds": ttl,
                "boundObjectRef": {"apiVersion": "v1", "kind": "Pod", "name": meta["name"], "uid": self.uid},
            },
        }
        try:
            answer = self.agent.kube.create(f"/api/v1/namespaces/{meta['namespace']}/serviceaccounts/{sa}/token", body)
        except Exception as exc:
            if not (isinstance(exc, ApiError) or is_transient(exc)):
                raise
            raise volumes.ConfigError(f"cannot get a token for service account {sa}: {exc}") from exc
        token = answer["status"]["token"].encode()
        self._tokens[(audience, ttl)] = (token, time.monotonic() + 0.8 * ttl)
        return token

    def _write_volumes(self) -> None:
        fetch = self._fetcher()
        pod = self.pod
        for volume in pod["spec"].get("volumes") or []:
            path = self.dir / "volumes" / volume["name"]
            if volumes.is_refreshed(volume):
                if volumes.write_atomic(path, volumes.volume_payload(pod, volume, fetch, self._token)):
                    log.debug("pod %s: volume %s updated", self.key, volume["name"])
            elif "emptyDir" in volume:
                path.mkdir(parents=True, exist_ok=True)
            elif "hostPath" in volume:
                host = Path(volume["hostPath"]["path"])
                if volume["hostPath"].get("type") == "DirectoryOrCreate":
                    host.mkdir(parents=True, exist_ok=True)
            else:
                kinds = sorted(set(volume) - {"name"})
                raise volumes.ConfigError(f"volume {volume['name']}: type {kinds} is not supported by the node agent")

    def _prepare_volumes(self) -> bool:
        try:
            self._write_volumes()
        except volumes.ConfigError as exc:
            for container in self.containers:
                container.waiting = ("ContainerCreating", str(exc))
            self._report()
            return False
        self._last_sync = time.monotonic()
        return True

    def _refresh_volumes(self) -> None:
        self._last_sync = time.monotonic()
        try:
            self._write_volumes()
        except (volumes.ConfigError, ApiError) as exc:
            log.warning("pod %s: volume refresh failed: %s", self.key, exc)

    # --- status -------------------------------------------------------------------------

    def _phase(self) -> str:
        if self._deadline_exceeded:
            return "Failed"
        inits = [c for c in self.containers if c.init and not c.restartable]
        sidecars = [c for c in self.containers if c.restartable]
        mains = [c for c in self.containers if not c.init]
        init_failed = any(c.terminated and c.terminated["exitCode"] != 0 and not self._will_restart(c) for c in inits)
        if init_failed:
            return "Failed"
        if any(c.running for c in mains):
            return "Running"
        if mains and all(c.terminated is not None for c in mains):
            if any(self._will_restart(c) for c in mains) or any(c.running for c in sidecars):
                return "Running"
            return "Succeeded" if all(c.terminated["exitCode"] == 0 for c in mains) else "Failed"
        if any(c.restart_count or c.started_at for c in mains):
            return "Running"  # restarting after a back-off
        return "Pending"

    def _condition(self, kind: str, ok: bool) -> JsonDict:
        status = "True" if ok else "False"
        previous = self._transitions.get(kind)
        if previous is None or previous[0] != status:
            self._transitions[kind] = previous = (status, now_iso())
        return {"type": kind, "status": status, "lastProbeTime": None, "lastTransitionTime": previous[1]}

    def _report(self) -> bool:
        """Patch the pod's status with what the containers are doing now.

        Returns:
            True when the API shows this status (sent now or before, or the pod is gone);
            False when it could not be sent — the node is silenced (a fault) or the API server
            is away — and `_wait` sends it again later.
        """
        inits = [c for c in self.containers if c.init]
        mains = [c for c in self.containers if not c.init]
        initialized = all(c.started_at is not None if c.restartable
                          else c.terminated is not None and c.terminated["exitCode"] == 0 for c in inits)
        ready = bool(mains) and all(c.running for c in mains + [c for c in inits if c.restartable])
        status: JsonDict = {
            "phase": self._phase(),
            "hostIP": "127.0.0.1",
            "hostIPs": [{"ip": "127.0.0.1"}],
            "podIP": self.ip,
            "podIPs": [{"ip": self.ip}],
            "startTime": self._start_time,
            "conditions": [
                self._condition("PodReadyToStartContainers", True),
                self._condition("Initialized", initialized),
                self._condition("ContainersReady", ready),
                self._condition("Ready", ready),
            ],
            "containerStatuses": [c.status() for c in mains],
        }
        if inits:
            status["initContainerStatuses"] = [c.status() for c in inits]
        if self._deadline_exceeded:
            status.update(reason="DeadlineExceeded",
                          message="Pod was active on the node longer than the specified deadline")
        if self.agent.silent(self.pod["spec"].get("nodeName")):
            self._unreported = True  # the node's kubelet is cut off (a fault): the API shows the old status
            return self._retry_later("status", None)
        if status == self._last_report:
            self._unreported = False
            return True
        meta = self.pod["metadata"]
        try:
            self.agent.kube.patch(
                f"/api/v1/namespaces/{meta['namespace']}/pods/{meta['name']}/status",
                {"metadata": {"uid": self.uid}, "status": status},
            )
        except Exception as exc:
            if isinstance(exc, ApiError) and exc.status in (404, 409):
                log.debug("pod %s: status not reported: %s", self.key, exc)
                self._unreported = False
                return True
            if not is_transient(exc):
                raise
            self._unreported = True
            return self._retry_later("status", exc)
        self._last_report = status
        self._unreported = False
        self._backoff.reset()
        return True


def _fingerprint(pod: JsonDict) -> str:
    """What kubelet reacts to: metadata (less bookkeeping) and spec, not status."""
    meta = {k: v for k, v in pod["metadata"].items() if k not in ("resourceVersion", "managedFields", "generation")}
    return json.dumps([meta, pod.get("spec")], sort_keys=True)
