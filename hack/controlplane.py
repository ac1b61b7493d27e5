"""A real Kubernetes control plane on loopback: etcd, kube-apiserver, controller-manager, scheduler.

Built from Go modules by ``hack/bootstrap.py`` (no container engine here, so no kind).
Everything binds to 127.0.0.1 on free ports, so two runs never collide, and every process
dies with the one that started it. Pods need a node agent (``hack/node_agent.py``) to run.

Usable as a context manager (pytest session fixtures) and from the command line through
``hack/cluster.py``.
"""

from __future__ import annotations

import json
import ssl
import subprocess
import urllib.request
from collections.abc import Callable
from pathlib import Path

from bootstrap import binary, ensure
from pki import Pki, make_pki
from processes import free_port, poll, start_server, stop_server, wait_until

SERVICE_CIDR = "10.0.0.0/24"
#: How long the node lifecycle controller waits for a node's Lease/heartbeat before marking it
#: NotReady (`--node-monitor-grace-period`; Kubernetes' default is 50 s since 1.32). Shortened so
#: that a fault test's lost node is noticed in ~40 s; the node agent heartbeats every 5 s
#: (`node_agent.HEARTBEAT_SECONDS`), so a node goes NotReady only after seven missed beats.
#: 20 s was too short for the whole suite: after the API-server restart test's outage (and once
#: mid-test on a loaded machine) healthy nodes went `unreachable`, which the operator rightly
#: takes as lost nodes, and two fault tests then saw a preemption they did not cause.
NODE_MONITOR_GRACE_SECONDS = 40


class KubectlError(subprocess.CalledProcessError):
    """A kubectl call that failed; its message carries kubectl's stderr (what the server said),
    which ``CalledProcessError`` keeps only as an attribute pytest does not print."""

    def __str__(self) -> str:
        return f"{super().__str__()}\n{(self.stderr or '').strip()}"


class ControlPlane:
    """etcd + kube-apiserver + kube-controller-manager + kube-scheduler.

    Args:
        workdir: where PKI, etcd data, logs and the admin kubeconfig live.
        startup_timeout: seconds each component gets to become ready.

    Example:
        >>> with ControlPlane(Path("/tmp/cp")) as cp:
        ...     cp.kubectl("get", "ns")
    """

    def __init__(self, workdir: Path, startup_timeout: float = 120.0) -> None:
        self.workdir = Path(workdir)
        self.startup_timeout = startup_timeout
        self.logs = self.workdir / "logs"
        self.kubeconfig = self.workdir / "kubeconfig"
        self.pki: Pki | None = None
        self.apiserver_port = 0
        self._etcd_url = ""
        self._procs: dict[str, subprocess.Popen[bytes]] = {}

    @property
    def server(self) -> str:
        return f"https://127.0.0.1:{self.apiserver_port}"

    # -- lifecycle -------------------------------------------------------------------
    def __enter__(self) -> ControlPlane:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        ensure("etcd")
        ensure("kubernetes")
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.pki = make_pki(self.workdir / "pki")
        try:
            etcd_url = self._start_etcd()
            self._start_apiserver(etcd_url)
            self._write_kubeconfig()
            self._start_controller_manager()
            self._start_scheduler()
            self._wait_for_cluster()
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        # Reverse order: clients first, etcd last, so nothing logs a storm of errors.
        for name in reversed(list(self._procs)):
            stop_server(self._procs.pop(name))

    def pids(self) -> dict[str, int]:
        return {name: proc.pid for name, proc in self._procs.items()}

    def alive(self) -> dict[str, bool]:
        return {name: proc.poll() is None for name, proc in self._procs.items()}

    # -- components ------------------------------------------------------------------
    def _start(self, name: str, argv: list[str]) -> subprocess.Popen[bytes]:
        proc = start_server(argv, self.logs / f"{name}.log")
        self._procs[name] = proc
        return proc

    def _start_etcd(self) -> str:
        client, peer = free_port(), free_port()
        url = f"http://127.0.0.1:{client}"
        proc = self._start("etcd", [
            str(binary("etcd")), "--name=torpor", f"--data-dir={self.workdir / 'etcd'}",
            f"--listen-client-urls={url}", f"--advertise-client-urls={url}",
            f"--listen-peer-urls=http://127.0.0.1:{peer}",
            f"--initial-advertise-peer-urls=http://127.0.0.1:{peer}",
            f"--initial-cluster=torpor=http://127.0.0.1:{peer}",
            "--unsafe-no-fsync", "--log-level=warn",
        ])
        wait_until(lambda: _http_ok(f"{url}/health"), timeout=self.startup_timeout, what="etcd",
                   proc=proc, log_path=self.logs / "etcd.log")
        return url

    def restart_apiserver(self, down: Callable[[], None] | None = None) -> None:
        """Stop the kube-apiserver (SIGTERM), run ``down`` while it is away, start it again on the
        same port and wait until it is ready: every client's connections break and its watches
        end, as in an upgrade of the control plane. Fault tests use it."""
        stop_server(self._procs.pop("kube-apiserver"))
        if down is not None:
            down()
        self._start_apiserver(self._etcd_url, port=self.apiserver_port)

    def _start_apiserver(self, etcd_url: str, port: int | None = None) -> None:
        assert self.pki
        self._etcd_url = etcd_url
        self.apiserver_port = port or free_port()
        proc = self._start("kube-apiserver", [
            str(binary("kube-apiserver")),
            f"--etcd-servers={etcd_url}",
            "--bind-address=127.0.0.1", "--advertise-address=127.0.0.1",
            f"--secure-port={self.apiserver_port}",
            f"--tls-cert-file={self.pki.serving_cert}", f"--tls-private-key-file={self.pki.serving_key}",
            f"--client-ca-file={self.pki.ca_cert}",
            "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
            f"--service-account-key-file={self.pki.sa_pub}",
            f"--service-account-signing-key-file={self.pki.sa_key}",
            f"--service-cluster-ip-range={SERVICE_CIDR}",
            "--authorization-mode=RBAC", "--allow-privileged=true",
            # Loopback endpoints for the `kubernetes` Service would only log warnings.
            "--endpoint-reconciler-type=none",
            "--profiling=false", "--v=1",
        ])
        wait_until(lambda: self._api_get("/readyz") == "ok", timeout=self.startup_timeout,
                   what="kube-apiserver", proc=proc, log_path=self.logs / "kube-apiserver.log", interval=0.3)

    def _start_controller_manager(self) -> None:
        assert self.pki
        port = free_port()
        proc = self._start("kube-controller-manager", [
            str(binary("kube-controller-manager")),
            f"--kubeconfig={self.kubeconfig}",
            f"--authentication-kubeconfig={self.kubeconfig}", f"--authorization-kubeconfig={self.kubeconfig}",
            "--bind-address=127.0.0.1", f"--secure-port={port}", "--leader-elect=false",
            f"--root-ca-file={self.pki.ca_cert}",
            f"--service-account-private-key-file={self.pki.sa_key}",
            f"--cluster-signing-cert-file={self.pki.ca_cert}", f"--cluster-signing-key-file={self.pki.ca_key}",
            "--use-service-account-credentials=true",
            f"--service-cluster-ip-range={SERVICE_CIDR}",
            "--controllers=*,-cloud-node-lifecycle,-service-lb-controller,-node-route-controller",
            f"--node-monitor-grace-period={NODE_MONITOR_GRACE_SECONDS}s", "--node-monitor-period=2s",
            "--v=1",
        ])
        wait_until(lambda: _https_ok(f"https://127.0.0.1:{port}/healthz"), timeout=self.startup_timeout,
                   what="kube-controller-manager", proc=proc, log_path=self.logs / "kube-controller-manager.log",
                   interval=0.3)

    def _start_scheduler(self) -> None:
        port = free_port()
        proc = self._start("kube-scheduler", [
            str(binary("kube-scheduler")),
            f"--kubeconfig={self.kubeconfig}",
            f"--authentication-kubeconfig={self.kubeconfig}", f"--authorization-kubeconfig={self.kubeconfig}",
            "--bind-address=127.0.0.1", f"--secure-port={port}", "--leader-elect=false", "--v=1",
        ])
        wait_until(lambda: _https_ok(f"https://127.0.0.1:{port}/healthz"), timeout=self.startup_timeout,
                   what="kube-scheduler", proc=proc, log_path=self.logs / "kube-scheduler.log", interval=0.3)

    def _wait_for_cluster(self) -> None:
        # The service-account controller creating `default` proves the controller-manager
        # talks to the API server; pods cannot be admitted before it exists.
        def default_sa() -> bool:
            return self.kubectl("get", "serviceaccount", "default", "-n", "default", check=False).returncode == 0

        wait_until(default_sa, timeout=self.startup_timeout, what="default ServiceAccount",
                   log_path=self.logs / "kube-controller-manager.log", interval=0.3)

    # -- clients ---------------------------------------------------------------------
    def _ssl_context(self) -> ssl.SSLContext:
        assert self.pki
        ctx = ssl.create_default_context(cafile=str(self.pki.ca_cert))
        ctx.load_cert_chain(str(self.pki.admin_cert), str(self.pki.admin_key))
        return ctx

    def _api_get(self, path: str) -> str:
        with urllib.request.urlopen(f"{self.server}{path}", context=self._ssl_context(), timeout=5) as resp:
            return resp.read().decode()

    def _write_kubeconfig(self) -> None:
        assert self.pki
        config = {
            "apiVersion": "v1", "kind": "Config", "current-context": "torpor-local",
            "clusters": [{"name": "torpor-local", "cluster": {
                "server": self.server, "certificate-authority": str(self.pki.ca_cert)}}],
            "users": [{"name": "torpor-admin", "user": {
                "client-certificate": str(self.pki.admin_cert), "client-key": str(self.pki.admin_key)}}],
            "contexts": [{"name": "torpor-local", "context": {"cluster": "torpor-local", "user": "torpor-admin"}}],
        }
        # JSON is valid YAML, and every kubeconfig reader accepts it.
        self.kubeconfig.write_text(json.dumps(config, indent=2))

    def kubectl(self, *args: str, check: bool = True, input: str | None = None,
                timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
        """Run kubectl against this cluster; with ``check`` a failure raises with its stderr."""
        proc = subprocess.run(
            [str(binary("kubectl")), f"--kubeconfig={self.kubeconfig}", *args],
            input=input, text=True, capture_output=True, timeout=timeout,
        )
        if check and proc.returncode != 0:
            raise KubectlError(proc.returncode, proc.args, proc.stdout, proc.stderr)
        return proc


def _http_ok(url: str) -> bool:
    with urllib.request.urlopen(url, timeout=2) as resp:
        return resp.status == 200


def _https_ok(url: str) -> bool:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    with urllib.request.urlopen(url, context=ctx, timeout=2) as resp:
        return resp.status == 200


def wait_for_condition(predicate, *, timeout: float, what: str, interval: float = 0.2):
    """Poll ``predicate`` (returning a truthy value) until it succeeds; return that value.

    Exceptions count as "not yet" (the API server may still be starting); ``TimeoutError``
    at the deadline.
    """
    return poll(predicate, timeout=timeout, what=what, interval=interval, retry_errors=True, error=TimeoutError)
