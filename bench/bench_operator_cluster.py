#!/usr/bin/env python3
"""The operator at cluster scale (issue 13, item 5): many jobs, a slow bucket, one huge job.

On the local control plane and MinIO (``hack/``), with ``python -m torpor_operator`` and a kopf
operator whose handlers do nothing (``bench_operator_latency.noop_operator``, watching the same
TrainingJobs and pods) as subprocesses, side by side in one run. The node agents run in their own
processes (``hack/node_agent.py``), so their work is not the operator's and does not slow it.
Every rank's container is ``sleep`` (coreutils: a few hundred KiB per rank), so the count of
ranks is limited by how fast the node agents start processes and by memory, not by training.

Scenarios, in one run (each prints its figures and the ratio to the no-op operator):

1. ``--jobs`` one-rank TrainingJobs (default 500) created in one request → all Running: peak RSS
   and CPU seconds of each operator to get there; then ``--idle`` seconds (default 60) idle: CPU %
   of one core.
2. ``--victims`` (default 10) more jobs, each on a node of its own; each node cordoned in turn:
   cordon → the job's exit ConfigMap says ``GracefulExit: 1`` (p50/p99), against kopf's own
   event latency (a ConfigMap annotation patch → the no-op handler's call).
3. The same while ``--stopping`` (default 50) other jobs are Stopping against a bucket that
   never answers (their ``checkpoint.endpoint`` is a blackholed proxy; their exit deadline is
   long, so they stay Stopping).
4. One job of ``--ranks`` sleeping ranks (default 1024; a comma list runs one job of each size
   in turn, to show how the stop's time grows with N; the bulk jobs are deleted first):
   create → all Running; then a cordon of one of its nodes → GracefulExit → every rank's pod
   carries ``torpor.dev/exit-requested-at`` (the per-pod annotation of a stop).

    python bench/bench_operator_cluster.py [--jobs 500] [--ranks 64,256,1024] [--skip-big] [--keep DIR]

``--py-spy PATH`` samples torpor with that py-spy binary over the idle window of scenario 1 and
prints the frames the busy samples were in: where the idle CPU goes. ``--tracemalloc`` runs
torpor under :mod:`tracemalloc` (``bench/traced_operator.py``) and ends after scenario 1 with the
largest allocation sites still alive: where the RSS goes.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

from bench_operator_latency import (
    NOOP_LABEL,
    FlagWatch,
    percentiles,
    prepare_operators,
    rss_cpu,
    show_logs,
    stop_all,
    wait,
    workdir,
)

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "hack")]

from controlplane import ControlPlane  # noqa: E402
from faultproxy import FaultProxy  # noqa: E402
from s3server import MinioServer  # noqa: E402

SLEEP = ["sleep", "3600"]
EXIT_REQUESTED = "torpor.dev/exit-requested-at"
PODS_PER_NODE = 100  # the agent's Nodes allow 110
# A kubelet's own sync period. Every pod's agent thread re-reads its ConfigMap volumes this
# often; at 3 s (the tests' value, so that ranks see GracefulExit soon) 500 pods kept the bulk
# agent at 1.4 cores in GETs and the job count was the agent's. No rank here reads the file:
# every figure is taken from the API.
CONFIG_SYNC_SECONDS = 60


class ClusterBench:
    """Control plane, MinIO, node agents in their own processes, torpor and the no-op operator."""

    def __init__(self, workdir: Path, namespace: str = "bench", traced: bool = False,
                 torpor_env: dict[str, str] | None = None) -> None:
        self.workdir, self.ns, self.traced = workdir, namespace, traced
        self.torpor_env = torpor_env or {}
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    @contextlib.contextmanager
    def running(self, pools: dict[str, int]) -> Iterator[ClusterBench]:
        """``pools``: node-name prefix → node count; one agent process per pool."""
        with ControlPlane(self.workdir / "cp") as cp, MinioServer(self.workdir / "minio") as minio:
            self.cp, self.minio = cp, minio
            try:
                for prefix, nodes in pools.items():
                    self.start(f"agent-{prefix}", [sys.executable, str(ROOT / "hack" / "node_agent.py"),
                                                   "--kubeconfig", str(cp.kubeconfig), "--nodes", str(nodes),
                                                   "--workdir", str(self.workdir / f"agent-{prefix}"),
                                                   "--node-prefix", prefix,
                                                   "--configmap-sync-seconds", str(CONFIG_SYNC_SECONDS)],
                               dict(os.environ))
                total = sum(pools.values())
                wait(lambda: len(self.nodes()) >= total, 120, f"{total} nodes registered", interval=0.5)
                self._operators()
                yield self
            except BaseException:
                show_logs(self.workdir, self.procs, 2000)
                raise
            finally:
                stop_all(self.procs.values(), 60)

    def _operators(self) -> None:
        cp, minio = self.cp, self.minio
        env = prepare_operators(cp, minio, self.ns)
        if self.traced:  # where its memory goes (bench/traced_operator.py); its CPU figures are then not its own
            env = {**env, "TORPOR_TRACEMALLOC_OUT": str(self.workdir / "tracemalloc.txt")}
            self.start("torpor", [sys.executable, str(ROOT / "bench" / "traced_operator.py")], env)
        else:
            self.start("torpor", [sys.executable, "-m", "torpor_operator"], {**env, **self.torpor_env})
        self.noop_log = self.workdir / "noop.log"
        self.start("noop", [sys.executable, str(ROOT / "bench" / "bench_operator_latency.py"), "--noop-operator",
                            str(self.noop_log), "--namespace", self.ns,
                            "--resources", "torpor.dev/trainingjobs,pods,configmaps"], env)

    def start(self, name: str, argv: list[str], env: dict[str, str]) -> None:
        with (self.workdir / f"{name}.out").open("ab") as out:
            self.procs[name] = subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT)

    def kubectl(self, *args: str, input: str | None = None) -> str:
        return self.cp.kubectl("-n", self.ns, *args, input=input).stdout

    def nodes(self) -> list[str]:
        return self.cp.kubectl("get", "nodes", "-o", "name").stdout.split()

    def jobs(self) -> list[dict[str, Any]]:
        return json.loads(self.kubectl("get", "tj", "-o", "json"))["items"]

    def job(self, name: str, replicas: int = 1, node: str | None = None, pool: str | None = None,
            endpoint: str | None = None, exit_deadline: int = 5) -> dict[str, Any]:
        pod: dict[str, Any] = {"containers": [{"name": "train", "image": "local", "command": SLEEP}]}
        if node is not None:
            pod["nodeSelector"] = {"kubernetes.io/hostname": node}
        elif pool is not None:
            pod["affinity"] = {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
                "nodeSelectorTerms": [{"matchExpressions": [
                    {"key": "kubernetes.io/hostname", "operator": "In",
                     "values": [n.removeprefix("node/") for n in self.nodes() if n.startswith(f"node/{pool}-")]}]}]}}}
        return {
            "apiVersion": "torpor.dev/v1alpha1", "kind": "TrainingJob", "metadata": {"name": name},
            "spec": {"replicas": replicas, "template": {"spec": pod},
                     "checkpoint": {"uri": "s3://bench/runs", "endpoint": endpoint or self.minio.endpoint},
                     "gracefulExit": {"terminationGracePeriodSeconds": 5, "exitDeadlineSeconds": exit_deadline}},
        }

    def create(self, jobs: list[dict[str, Any]]) -> None:
        for i in range(0, len(jobs), 100):  # one request per 100 (a List of 500 is a large body)
            self.kubectl("create", "-f", "-", input=json.dumps({"apiVersion": "v1", "kind": "List",
                                                                  "items": jobs[i:i + 100]}))

    def count(self, phase: str, prefix: str) -> int:
        """Jobs named ``prefix…`` (a name ending in ``$``: that one job) in ``phase``."""
        match = (lambda n: n == prefix[:-1]) if prefix.endswith("$") else (lambda n: n.startswith(prefix))
        return sum((j.get("status") or {}).get("phase") == phase for j in self.jobs() if match(j["metadata"]["name"]))

    def usage(self) -> dict[str, tuple[float, float, float]]:
        return {"torpor": rss_cpu(self.procs["torpor"].pid), "kopf no-op": rss_cpu(self.procs["noop"].pid)}


# --- scenarios ---------------------------------------------------------------------------------


def bulk(b: ClusterBench, jobs: int, idle: float, py_spy: str | None = None) -> None:
    before = b.usage()
    t0 = time.monotonic()
    b.create([b.job(f"bulk-{i:04d}", pool="bulk") for i in range(jobs)])
    progress = {"at": time.monotonic(), "n": 0}

    def all_running() -> bool:
        n = b.count("Running", "bulk-")
        if time.monotonic() - progress["at"] > 30:
            print(f"  {n}/{jobs} Running after {time.monotonic() - t0:.0f}s", flush=True)
            progress["at"] = time.monotonic()
        return n == jobs

    wait(all_running, 3600, f"{jobs} jobs Running", interval=2.0)
    elapsed = time.monotonic() - t0
    after = b.usage()
    if py_spy:  # what the idle CPU goes into; py-spy samples from outside, the operator runs as ever
        profile = b.workdir / "idle.pyspy.txt"
        subprocess.run([py_spy, "record", "--pid", str(b.procs["torpor"].pid), "--duration", str(int(idle)),
                        "--rate", "50", "--format", "raw", "--output", str(profile), "--nonblocking"],
                       check=True, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    else:
        time.sleep(idle)  # the measurement itself: CPU while nothing changes
    idled = b.usage()
    if py_spy:
        print_profile(profile)
    print(f"\n[1] {jobs} one-rank TrainingJobs created at once -> all Running in {elapsed:.0f}s "
          f"({jobs / elapsed * 60:.0f} jobs/min), then {idle:.0f}s idle")
    print(f"{'':12} {'peak RSS':>9} {'RSS now':>8} {'CPU s to Running':>17} {f'idle CPU % ({idle:.0f}s)':>18}")
    for name in after:
        print(f"{name:12} {idled[name][1]:7.0f}MB {idled[name][0]:6.0f}MB {after[name][2] - before[name][2]:17.1f} "
              f"{(idled[name][2] - after[name][2]) / idle * 100:18.2f}")
    t, n = ((after[k][2] - before[k][2]) for k in ("torpor", "kopf no-op"))
    print(f"ratio torpor / kopf no-op: peak RSS {idled['torpor'][1] / idled['kopf no-op'][1]:.2f}x, "
          f"CPU to Running {t / max(n, 0.01):.2f}x", flush=True)


def print_profile(path: Path, top: int = 25) -> None:
    """py-spy's collapsed stacks of the idle window, as the torpor/kopf frames that held the most
    samples (a frame counts once per sample it is on, at any depth)."""
    totals: dict[str, int] = {}
    samples = 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack:
            continue
        n = int(count)
        samples += n
        for frame in dict.fromkeys(f for f in stack.split(";") if "torpor" in f or "kopf" in f):
            totals[frame] = totals.get(frame, 0) + n
    print(f"\nidle profile ({path.name}): {samples} busy samples at 50 Hz; torpor/kopf frames by samples on them:")
    for frame, n in sorted(totals.items(), key=lambda kv: -kv[1])[:top]:
        print(f"  {n:6d}  {frame}")


def print_memory(b: ClusterBench) -> None:
    """The traced operator's largest live allocation sites (``bench/traced_operator.py``)."""
    out = b.workdir / "tracemalloc.txt"
    out.unlink(missing_ok=True)
    b.procs["torpor"].send_signal(signal.SIGUSR2)
    wait(out.exists, 600, "the tracemalloc snapshot", interval=1.0)
    print(out.read_text(), flush=True)


def noop_latency(b: ClusterBench, flags: FlagWatch, seq: int) -> float:
    t0 = time.time()
    flags.api.patch_namespaced_config_map("noop-target", b.ns,
                                          {"metadata": {"annotations": {"bench.torpor.dev/seq": str(seq)}}})

    def handled() -> float | None:
        for line in b.noop_log.read_text().splitlines():
            got, at = line.split()
            if got == str(seq):
                return float(at)
        return None
    return wait(handled, 60, f"no-op handler call {seq}", interval=0.005) - t0


def cordons(b: ClusterBench, flags: FlagWatch, victims: int, tag: str, seq: list[int]) -> dict[str, list[float]]:
    """Each victim job on its own node; cordon the node; time until its GracefulExit."""
    results: dict[str, list[float]] = {"cordon": [], "kopf no-op": []}
    for i in range(victims):
        name, node = f"{tag}-{i}", f"victim-{i}"
        b.kubectl("create", "-f", "-", input=json.dumps(b.job(name, node=node)))
        wait(lambda: b.count("Running", f"{name}$") == 1, 120, f"{name} Running", interval=0.2)  # noqa: B023
        time.sleep(1.0)  # the Running status patch and its watch events settle
        t0 = time.time()
        flags.api.patch_node(node, {"spec": {"unschedulable": True}})
        seen = wait(lambda: flags.seen.get(f"{name}-1-exit"), 60, f"GracefulExit of {name}",  # noqa: B023
                    interval=0.005)
        results["cordon"].append(seen - t0)
        b.cp.kubectl("uncordon", node)
        b.kubectl("delete", "tj", name, "--wait=false")
        seq[0] += 1
        results["kopf no-op"].append(noop_latency(b, flags, seq[0]))
    return results


def report_latency(title: str, results: dict[str, list[float]]) -> None:
    print(f"\n{title}")
    print(f"{'':12} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8}")
    stats = {}
    for name, values in results.items():
        stats[name] = percentiles(values)
        print(f"{name:12} {stats[name][0] * 1000:8.1f} {stats[name][1] * 1000:8.1f} {max(values) * 1000:8.1f}")
    base, got = stats["kopf no-op"], stats["cordon"]
    print(f"ratio cordon / kopf no-op: p50 {got[0] / base[0]:.2f}x, p99 {got[1] / base[1]:.2f}x", flush=True)


def slow_bucket(b: ClusterBench, flags: FlagWatch, stopping: int, victims: int, seq: list[int]) -> None:
    proxy = FaultProxy("127.0.0.1", int(b.minio.endpoint.rsplit(":", 1)[1]))
    proxy.blackhole()
    b.create([b.job(f"slow-{i:03d}", node="slow-0", endpoint=proxy.url, exit_deadline=3600)
              for i in range(stopping)])
    wait(lambda: b.count("Running", "slow-") == stopping, 600, f"{stopping} slow-bucket jobs Running", interval=1.0)
    b.cp.kubectl("cordon", "slow-0")
    wait(lambda: b.count("Stopping", "slow-") == stopping, 600, f"{stopping} jobs Stopping", interval=1.0)
    results = cordons(b, flags, victims, "during", seq)
    still = b.count("Stopping", "slow-")
    report_latency(f"[3] cordon -> GracefulExit while {still} jobs are Stopping against a bucket that never "
                   f"answers ({victims} trials)", results)
    b.kubectl("delete", "tj", "--all", "--wait=false")
    proxy.close()


class AnnotationWatch:
    """When each pod first carries ``torpor.dev/exit-requested-at`` (a pod watch, in a thread)."""

    def __init__(self, flags: FlagWatch, namespace: str) -> None:
        from kubernetes import watch

        self.api, self.ns, self.seen = flags.api, namespace, {}
        self.running: set[str] = set()
        self._watch = watch.Watch()
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        # The watch ends (a 410, the server closing it under load): watch again from a fresh
        # LIST, or the 1024-rank job's count stops short (it did, at 868 of 1024). A pod first
        # seen annotated after a restart gets a later time: the figure errs high, never low.
        while True:
            with contextlib.suppress(Exception):
                for event in self._watch.stream(self.api.list_namespaced_pod, self.ns, timeout_seconds=3600):
                    pod, now = event["object"], time.time()
                    if pod.status.phase == "Running":
                        self.running.add(pod.metadata.name)
                    if EXIT_REQUESTED in (pod.metadata.annotations or {}):
                        self.seen.setdefault(pod.metadata.name, now)
            time.sleep(0.5)


def big_job(b: ClusterBench, flags: FlagWatch, ranks: int) -> tuple[float, float, float]:
    """One job of ``ranks`` sleeping ranks: create -> all Running (and the CPU that took), then a
    cordon of rank 0's node -> GracefulExit -> every pod annotated; the job deleted after.
    Returns (seconds to Running, torpor CPU-s to Running, ms from GracefulExit to every pod annotated)."""
    name = f"big{ranks}"
    pods = AnnotationWatch(flags, b.ns)
    before = b.usage()
    t0 = time.monotonic()
    b.create([b.job(name, replicas=ranks, pool="big", exit_deadline=600)])
    progress = {"at": time.monotonic()}

    def all_running() -> bool:
        n = len([p for p in pods.running.copy() if p.startswith(f"{name}-")])  # the watch thread adds
        if time.monotonic() - progress["at"] > 30:
            print(f"  {n}/{ranks} ranks Running after {time.monotonic() - t0:.0f}s", flush=True)
            progress["at"] = time.monotonic()
        return n == ranks and b.count("Running", f"{name}$") == 1

    wait(all_running, 7200, f"{ranks} ranks Running", interval=2.0)
    running = time.monotonic() - t0
    after = b.usage()
    node = json.loads(b.kubectl("get", "pod", f"{name}-1-0", "-o", "json"))["spec"]["nodeName"]
    b.cp.kubectl("cordon", node)
    exit_at = wait(lambda: flags.seen.get(f"{name}-1-exit"), 120, f"GracefulExit of {name}", interval=0.005)
    done = wait(lambda: len([p for p in pods.seen if p.startswith(f"{name}-")]) == ranks and
                max(v for p, v in pods.seen.items() if p.startswith(f"{name}-")), 300, f"{ranks} pods annotated",
                interval=0.05)
    cpu = after["torpor"][2] - before["torpor"][2]
    print(f"\n[4] one {ranks}-rank job: create -> all Running in {running:.0f}s "
          f"(torpor CPU {cpu:.1f}s, kopf no-op {after['kopf no-op'][2] - before['kopf no-op'][2]:.1f}s); "
          f"GracefulExit -> every pod annotated in {(done - exit_at) * 1000:.0f} ms", flush=True)
    b.kubectl("delete", "tj", name, "--wait=false")
    wait(lambda: not json.loads(b.kubectl("get", "pods", "-o", "json"))["items"], 600, f"{name}'s pods gone",
         interval=2.0)
    b.cp.kubectl("uncordon", node)
    return running, cpu, (done - exit_at) * 1000


def report_sizes(results: dict[int, tuple[float, float, float]]) -> None:
    """GracefulExit -> every pod annotated against the job's size (issue 13, item 2: sub-linear)."""
    print("\n[4] by size     to Running   torpor CPU-s   GracefulExit -> all annotated   per rank")
    for ranks, (running, cpu, ms) in sorted(results.items()):
        print(f"    {ranks:5d} ranks {running:9.0f}s {cpu:14.1f} {ms:28.0f} ms {ms / ranks:8.2f} ms")
    sizes = sorted(results)
    if len(sizes) > 1:
        small, large = sizes[0], sizes[-1]
        print(f"    {large // small}x the ranks -> {results[large][2] / max(results[small][2], 1e-9):.2f}x "
              "the time to annotate every pod", flush=True)


def _pairs(items: list[str]) -> dict[str, str]:
    """``KEY=VALUE`` arguments as a mapping; a malformed one is refused by name."""
    pairs = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"--torpor-env wants KEY=VALUE, got {item!r}")
        pairs[key] = value
    return pairs


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=500)
    parser.add_argument("--idle", type=float, default=60.0)
    parser.add_argument("--victims", type=int, default=10)
    parser.add_argument("--stopping", type=int, default=50)
    parser.add_argument("--ranks", default="1024",
                        help="ranks of the scenario 4 job; a comma list (64,256,1024) runs one job of each size")
    parser.add_argument("--skip-big", action="store_true", help="leave out scenario 4")
    parser.add_argument("--keep", type=Path, help="keep logs and state in this directory")
    parser.add_argument("--py-spy", metavar="PATH",
                        help="profile torpor's idle window with this py-spy binary and print where it went")
    parser.add_argument("--torpor-env", action="append", default=[], metavar="KEY=VALUE",
                        help="an environment variable for torpor's process only (e.g. MALLOC_ARENA_MAX=2); repeatable")
    parser.add_argument("--tracemalloc", action="store_true",
                        help="run torpor under tracemalloc and print where its memory is after scenario 1, then stop")
    args, _ = parser.parse_known_args()
    pools = {"bulk": math.ceil(args.jobs / PODS_PER_NODE), "victim": args.victims, "slow": 1}
    sizes = sorted(int(r) for r in str(args.ranks).split(","))
    if not args.skip_big:
        # one agent process per node of the big job: 1024 pods' threads in one process starved
        # its own heartbeats, the node lifecycle controller tainted a node unreachable and the
        # job was stopped for real (the run of 2026-12-03 12:35); the node names are big-{i}-0
        pools.update({f"big-{i}": 1 for i in range(math.ceil(sizes[-1] / PODS_PER_NODE))})
    print(f"{os.cpu_count()} CPUs; node agents: {pools} (one process per pool)", flush=True)
    bench = partial(ClusterBench, traced=args.tracemalloc, torpor_env=_pairs(args.torpor_env))
    with workdir(args.keep) as tmp, bench(tmp).running(pools) as b:
        flags = FlagWatch(b.cp.kubeconfig, b.ns)
        b.kubectl("create", "configmap", "noop-target")
        b.kubectl("label", "configmap", "noop-target", f"{NOOP_LABEL}=yes")
        wait(lambda: b.noop_log.exists(), 60, "the no-op operator")
        time.sleep(5)  # both operators past start-up and their initial listings
        seq = [0]
        bulk(b, args.jobs, args.idle, args.py_spy)
        if args.tracemalloc:
            print_memory(b)
            return 0
        report_latency(f"[2] cordon -> GracefulExit with {args.jobs} jobs Running ({args.victims} trials)",
                       cordons(b, flags, args.victims, "victim", seq))
        slow_bucket(b, flags, args.stopping, args.victims, seq)
        if not args.skip_big:
            wait(lambda: not b.jobs(), 600, "every job deleted", interval=2.0)
            report_sizes({ranks: big_job(b, flags, ranks) for ranks in sizes})
    return 0


if __name__ == "__main__":
    sys.exit(main())
