#!/usr/bin/env python3
"""How fast the operator tells ranks to save: cordon or eviction -> ``GracefulExit: 1`` written.

On the local control plane, node agent and MinIO (``hack/``), with ``python -m torpor_operator``
as a subprocess. Each trial starts a one-rank TrainingJob whose container just sleeps, waits
for Running, then either cordons the rank's node or evicts the rank's pod (the eviction API,
as ``kubectl drain`` does), and times from just before that API call until this process's
watch sees the job's exit ConfigMap say ``{"GracefulExit": 1}``. Every trigger is one API call
from this process (``kubernetes`` client), timed from just before it.

Baseline, in the same run: kopf's own event latency, from an annotation patch of a
ConfigMap to the call of a no-op ``@kopf.on.event`` handler in another kopf process (the time
the handler is entered, by the same clock). Both operators run with kopf's default batching
(``settings.batching.batch_window`` 0.1 s: events of one object arriving within it are merged,
so an eviction, which changes the pod twice, can wait for it). Beyond that, the difference is
what torpor's reconcile (read the job, its pods and children; decide; patch the ConfigMap)
costs before the flag is written.

    python bench/bench_operator_latency.py [--trials 20]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "hack")]

from controlplane import ControlPlane  # noqa: E402
from processes import free_port  # noqa: E402
from s3server import MinioServer  # noqa: E402

SLEEP = ["python", "-c", "import time; time.sleep(3600)"]
NOOP_LABEL = "bench.torpor.dev/noop"


# --- the environment ----------------------------------------------------------------------


def prepare_operators(cp: ControlPlane, minio: MinioServer, namespace: str) -> dict[str, str]:
    """Install the CRD, make ``namespace`` and the ``bench`` bucket; the environment both
    operators run with (no ``TORPOR_*`` of the caller's, the cluster's and MinIO's settings)."""
    import boto3

    cp.kubectl("apply", "--server-side", "-f", str(ROOT / "crds" / "trainingjobs.yaml"))
    cp.kubectl("wait", "--for=condition=Established", "crd/trainingjobs.torpor.dev", "--timeout=60s")
    cp.kubectl("create", "namespace", namespace)
    boto3.client("s3", **_boto_args(minio)).create_bucket(Bucket="bench")
    env = {k: v for k, v in os.environ.items() if not k.startswith("TORPOR_")}
    env.update(minio.env(), KUBECONFIG=str(cp.kubeconfig), TORPOR_NAMESPACES=namespace,
               TORPOR_HEALTH_PORT="0", TORPOR_METRICS_PORT="0", TORPOR_LOG_FORMAT="plain",
               TORPOR_MASTER_PORT=str(free_port()))
    return env


def show_logs(workdir: Path, names: Iterable[str], tail: int) -> None:
    """Print the last ``tail`` characters of each process's ``<name>.out`` (a run that failed)."""
    for name in names:
        out = workdir / f"{name}.out"
        print(f"--- {name}:\n" + (out.read_text(errors="replace")[-tail:] if out.exists() else ""))


def stop_all(procs: Iterable[subprocess.Popen[bytes]], grace: float) -> None:
    """SIGTERM every process, then wait ``grace`` seconds for each before SIGKILL."""
    procs = list(procs)
    for proc in procs:
        proc.terminate()
    for proc in procs:
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()


class Bench:
    """Control plane, two-node agent, MinIO, the torpor operator and a no-op kopf operator."""

    def __init__(self, workdir: Path, namespace: str = "bench") -> None:
        self.workdir, self.ns = workdir, namespace
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    @contextlib.contextmanager
    def running(self, noop_resources: str = "configmaps") -> Iterator[Bench]:
        from node_agent import NodeAgent

        with ControlPlane(self.workdir / "cp") as cp, MinioServer(self.workdir / "minio") as minio:
            self.cp, self.minio = cp, minio
            agent = NodeAgent(cp.kubeconfig, self.workdir / "agent", nodes=2, configmap_sync_seconds=3.0)
            agent.start()
            try:
                yield from self._operators(cp, minio, noop_resources)
            except BaseException:
                show_logs(self.workdir, ("torpor", "noop"), 3000)
                raise
            finally:
                stop_all(self.procs.values(), 30)
                agent.stop()

    def _operators(self, cp: ControlPlane, minio: MinioServer, noop_resources: str) -> Iterator[Bench]:
        env = prepare_operators(cp, minio, self.ns)
        self.start("torpor", [sys.executable, "-m", "torpor_operator"], env)
        self.noop_log = self.workdir / "noop.log"
        self.start("noop", [sys.executable, __file__, "--noop-operator", str(self.noop_log),
                            "--namespace", self.ns, "--resources", noop_resources], env)
        yield self

    def start(self, name: str, argv: list[str], env: dict[str, str]) -> None:
        with (self.workdir / f"{name}.out").open("ab") as out:
            self.procs[name] = subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT)

    def kubectl(self, *args: str, input: str | None = None) -> str:
        return self.cp.kubectl("-n", self.ns, *args, input=input).stdout

    def job(self, name: str, replicas: int = 1) -> dict[str, Any]:
        return {
            "apiVersion": "torpor.dev/v1alpha1", "kind": "TrainingJob", "metadata": {"name": name},
            "spec": {"replicas": replicas,
                     "template": {"spec": {"containers": [{"name": "train", "image": "local", "command": SLEEP}]}},
                     "checkpoint": {"uri": "s3://bench/runs", "endpoint": self.minio.endpoint},
                     "gracefulExit": {"terminationGracePeriodSeconds": 5, "exitDeadlineSeconds": 5}},
        }


def _boto_args(minio: MinioServer) -> dict[str, str]:
    env = minio.env()
    return {"endpoint_url": env["AWS_ENDPOINT_URL"], "aws_access_key_id": env["AWS_ACCESS_KEY_ID"],
            "aws_secret_access_key": env["AWS_SECRET_ACCESS_KEY"], "region_name": "us-east-1"}


@contextlib.contextmanager
def workdir(keep: Path | None) -> Iterator[Path]:
    """``keep`` (created), or a temporary directory removed afterwards."""
    if keep is not None:
        keep.mkdir(parents=True, exist_ok=True)
        yield keep
        return
    with tempfile.TemporaryDirectory(prefix="torpor-bench-") as tmp:
        yield Path(tmp)


def wait(predicate: Any, timeout: float, what: str, interval: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError(f"{what} after {timeout}s")


def rss_cpu(pid: int) -> tuple[float, float, float]:
    """(current RSS MiB, peak RSS MiB, user+system CPU seconds) of a process, from /proc."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024,
            (int(stat[11]) + int(stat[12])) / ticks)


def percentiles(values: list[float]) -> tuple[float, float]:
    q = statistics.quantiles(values, n=100, method="inclusive")
    return statistics.median(values), q[98]


# --- watching the flag ---------------------------------------------------------------------


class FlagWatch:
    """Times when each exit ConfigMap first says ``GracefulExit: 1`` (a watch, in a thread)."""

    def __init__(self, kubeconfig: Path, namespace: str) -> None:
        from kubernetes import client, config, watch

        self.api = client.CoreV1Api(config.new_client_from_config(config_file=str(kubeconfig)))
        self.ns = namespace
        self.seen: dict[str, float] = {}
        self._watch = watch.Watch()
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        with contextlib.suppress(Exception):  # the API server stops at the end of the run
            while True:
                for event in self._watch.stream(self.api.list_namespaced_config_map, self.ns, timeout_seconds=600):
                    cm = event["object"]
                    now = time.time()
                    doc = (cm.data or {}).get("graceful-exit.json")
                    if doc and json.loads(doc).get("GracefulExit") == 1:
                        self.seen.setdefault(cm.metadata.name, now)


# --- the trials ------------------------------------------------------------------------------


def running_pod(b: Bench, job: str) -> dict[str, Any]:
    def ready() -> dict[str, Any] | None:
        st = json.loads(b.kubectl("get", "tj", job, "-o", "json")).get("status", {})
        if st.get("phase") != "Running":
            return None
        return json.loads(b.kubectl("get", "pod", f"{job}-1-0", "-o", "json"))
    return wait(ready, 60, f"{job} Running", interval=0.2)


#: How long each trigger's API call itself took (the API server's share of the latency).
calls: dict[str, list[float]] = {"cordon": [], "eviction": [], "kopf no-op": []}


def trial(b: Bench, flags: FlagWatch, job: str, how: str) -> float:
    b.kubectl("create", "-f", "-", input=json.dumps(b.job(job)))
    pod = running_pod(b, job)
    node = pod["spec"]["nodeName"]
    time.sleep(0.5)  # let the Running status patch and its watch events settle
    t0 = time.time()
    if how == "cordon":
        flags.api.patch_node(node, {"spec": {"unschedulable": True}})
    else:
        eviction = {"apiVersion": "policy/v1", "kind": "Eviction",
                    "metadata": {"name": f"{job}-1-0", "namespace": b.ns}}
        flags.api.create_namespaced_pod_eviction(f"{job}-1-0", b.ns, eviction)
    calls[how].append(time.time() - t0)
    seen = wait(lambda: flags.seen.get(f"{job}-1-exit"), 30, f"GracefulExit of {job}", interval=0.005)
    if how == "cordon":
        b.cp.kubectl("uncordon", node)
    b.kubectl("delete", "tj", job, "--wait=false")
    return seen - t0


def noop_trial(b: Bench, flags: FlagWatch, i: int) -> float:
    t0 = time.time()
    flags.api.patch_namespaced_config_map("noop-target", b.ns,
                                          {"metadata": {"annotations": {"bench.torpor.dev/seq": str(i)}}})
    calls["kopf no-op"].append(time.time() - t0)

    def handled() -> float | None:
        for line in b.noop_log.read_text().splitlines() if b.noop_log.exists() else []:
            seq, at = line.split()
            if seq == str(i):
                return float(at)
        return None
    return wait(handled, 30, f"no-op handler call {i}", interval=0.005) - t0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--keep", type=Path, help="keep logs and state in this directory")
    args, _ = parser.parse_known_args()
    with workdir(args.keep) as tmp, Bench(tmp).running() as b:
        flags = FlagWatch(b.cp.kubeconfig, b.ns)
        b.kubectl("create", "configmap", "noop-target")
        b.kubectl("label", "configmap", "noop-target", f"{NOOP_LABEL}=yes")
        wait(lambda: b.noop_log.exists(), 60, "the no-op operator")
        results: dict[str, list[float]] = {"cordon": [], "eviction": [], "kopf no-op": []}
        for i in range(args.trials):
            results["cordon"].append(trial(b, flags, f"c{i}", "cordon"))
            results["eviction"].append(trial(b, flags, f"e{i}", "eviction"))
            results["kopf no-op"].append(noop_trial(b, flags, i))
            time.sleep(0.5)
        print(f"{args.trials} trials each; kopf default batching (batch window 0.1 s), 2-node local cluster, "
              f"{os.cpu_count()} CPUs")
        print(f"{'':12} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8} {'trigger call p50 ms':>20}")
        stats = {}
        for name, values in results.items():
            stats[name] = percentiles(values)
            print(f"{name:12} {stats[name][0] * 1000:8.1f} {stats[name][1] * 1000:8.1f} {max(values) * 1000:8.1f} "
                  f"{statistics.median(calls[name]) * 1000:20.1f}")
        base = stats["kopf no-op"]
        for name in ("cordon", "eviction"):
            p50, p99 = stats[name][0] / base[0], stats[name][1] / base[1]
            print(f"ratio {name} / kopf no-op: p50 {p50:.2f}x, p99 {p99:.2f}x")
    return 0


def noop_operator(out: str, namespace: str, resources: list[str]) -> None:
    """A kopf operator whose handlers do nothing but note when they were called."""
    import asyncio
    import logging

    import kopf

    Path(out).touch()

    def record(body: Any, **_: Any) -> None:
        seq = (body.get("metadata", {}).get("annotations") or {}).get("bench.torpor.dev/seq")
        if seq is not None:
            with open(out, "a") as f:
                f.write(f"{seq} {time.time()}\n")

    registry = kopf.OperatorRegistry()
    for resource in resources:
        group, _, plural = resource.rpartition("/")
        version = "v1alpha1" if group else "v1"
        labels = {NOOP_LABEL: kopf.PRESENT} if plural == "configmaps" else None
        kopf.on.event(group, version, plural, labels=labels, registry=registry)(record)

    kopf.on.login(registry=registry)(kopf.login_via_client)

    @kopf.on.startup(registry=registry)
    def quiet(settings: kopf.OperatorSettings, **_: Any) -> None:
        settings.posting.level = logging.WARNING

    kopf.configure(log_format=kopf.LogFormat.PLAIN)
    asyncio.run(kopf.operator(registry=registry, standalone=True, namespaces=[namespace]))


if __name__ == "__main__":
    if "--noop-operator" in sys.argv:
        p = argparse.ArgumentParser()
        p.add_argument("--noop-operator")
        p.add_argument("--namespace")
        p.add_argument("--resources", default="configmaps")
        a = p.parse_args()
        noop_operator(a.noop_operator, a.namespace, a.resources.split(","))
        sys.exit(0)
    sys.exit(main())
