#!/usr/bin/env python3
"""A stop of N ranks: GracefulExit -> every pod annotated, by the operator's own patch code.

On the local control plane (``hack/controlplane.py``), N pods that never schedule (a
nodeSelector no node has: a pod's annotation patch is the same whether it runs or not, and no
node agent limits N). Each trial marks all N pods with a new value through
``KubeClient._annotate`` (the bounded parallel patches a stop makes, ``TORPOR_API_WORKERS``
at once) and times it, wall clock and this process's CPU.

Baseline, side by side in the same process and the same thread pool: the same patches through
the client's default call, which parses every answer into its model objects (what the
operator did before its answers were left unparsed). The ratio is torpor / baseline; the
growth from 64 to 1024 pods says whether the stop's cost grows sub-linearly (issue 13, item 2).

    python bench/bench_annotate.py [--pods 64,256,1024] [--trials 5]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "hack"), str(ROOT / "operator"), str(ROOT / "runtime")]

from controlplane import ControlPlane  # noqa: E402

NAMESPACE = "bench"


def make_pods(core: object, count: int, pool: ThreadPoolExecutor) -> list[str]:
    names = [f"annotate-{i}" for i in range(count)]

    def create(name: str) -> None:
        core.create_namespaced_pod(NAMESPACE, {  # type: ignore[attr-defined]
            "metadata": {"name": name, "labels": {"torpor.dev/job": "annotate"}},
            "spec": {"nodeSelector": {"bench.torpor.dev/never": "true"},
                     "containers": [{"name": "train", "image": "python:3.11"}]}})

    list(pool.map(create, names))
    return names


def timed(run: Callable[[], None]) -> tuple[float, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    run()
    return time.perf_counter() - wall, time.process_time() - cpu


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pods", default="64,256,1024", help="comma-separated stop sizes")
    parser.add_argument("--trials", type=int, default=5)
    args = parser.parse_args()
    sizes = sorted(int(n) for n in args.pods.split(","))

    from kubernetes import client, config

    from torpor_operator.applying import KubeClient
    from torpor_operator.contract import ANNOTATION_EXIT_REQUESTED

    with tempfile.TemporaryDirectory(prefix="torpor-bench-annotate-") as tmp, ControlPlane(Path(tmp) / "cp") as cp:
        cp.kubectl("create", "namespace", NAMESPACE)
        api = config.new_client_from_config(str(cp.kubeconfig))
        kube = KubeClient(api)
        core = client.CoreV1Api(api)
        pool = ThreadPoolExecutor(kube.workers)
        all_pods = make_pods(core, sizes[-1], pool)
        print(f"control plane up, {len(all_pods)} pods; {kube.workers} patches at once")

        def torpor_stop(names: list[str], value: str) -> Callable[[], None]:
            return lambda: kube._annotate(NAMESPACE, "annotate",
                                          tuple((n, {ANNOTATION_EXIT_REQUESTED: value}) for n in names))

        def parsed_stop(names: list[str], value: str) -> Callable[[], None]:
            def run() -> None:
                list(pool.map(lambda n: core.patch_namespaced_pod(
                    n, NAMESPACE, {"metadata": {"annotations": {ANNOTATION_EXIT_REQUESTED: value}}}), names))
            return run

        results: dict[tuple[int, str], list[tuple[float, float]]] = {}
        trial = 0
        for size in sizes:
            names = all_pods[:size]
            for _ in range(args.trials):
                for label, make in (("torpor", torpor_stop), ("parsed", parsed_stop)):
                    trial += 1
                    results.setdefault((size, label), []).append(timed(make(names, f"t{trial}")))

        print(f"\n{'pods':>5} {'torpor wall ms':>15} {'parsed wall ms':>15} {'ratio':>6} "
              f"{'torpor CPU ms':>14} {'parsed CPU ms':>14} {'ratio':>6}")
        first: dict[str, float] = {}
        for size in sizes:
            row = {label: (statistics.median(w for w, _ in results[(size, label)]) * 1000,
                           statistics.median(c for _, c in results[(size, label)]) * 1000)
                   for label in ("torpor", "parsed")}
            first.setdefault("torpor", row["torpor"][0])
            first.setdefault("parsed", row["parsed"][0])
            print(f"{size:>5} {row['torpor'][0]:>15.0f} {row['parsed'][0]:>15.0f} "
                  f"{row['torpor'][0] / row['parsed'][0]:>6.2f} {row['torpor'][1]:>14.0f} "
                  f"{row['parsed'][1]:>14.0f} {row['torpor'][1] / row['parsed'][1]:>6.2f}")
        growth = sizes[-1] / sizes[0]
        last = {label: statistics.median(w for w, _ in results[(sizes[-1], label)]) * 1000
                for label in ("torpor", "parsed")}
        print(f"\n{sizes[0]} -> {sizes[-1]} pods ({growth:g}x): torpor's stop grew "
              f"{last['torpor'] / first['torpor']:.1f}x, the parsed one {last['parsed'] / first['parsed']:.1f}x "
              f"(medians of {args.trials} trials each)")
        pool.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
