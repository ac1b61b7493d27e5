#!/usr/bin/env python3
"""100 TrainingJobs reconciled to Running: how long, and the operator's peak RSS and CPU.

On the local control plane, node agent and MinIO (``hack/``), with ``python -m torpor_operator``
as a subprocess. Each job has one rank whose container is a sleeping Python one-liner (the
operator's work does not depend on what the rank runs). All jobs are created in one request;
the clock stops when every job's ``status.phase`` is Running. RSS and CPU come from
``/proc/<pid>`` of the operator process.

Baseline, in the same run: a kopf operator with no-op event handlers on the same resources
(TrainingJobs and pods in the namespace), i.e. what kopf itself costs to follow those events.

    python bench/bench_operator_scale.py [--jobs 100]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from bench_operator_latency import Bench, rss_cpu, wait, workdir


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=100)
    parser.add_argument("--keep", type=Path, help="keep logs and state in this directory")
    args, _ = parser.parse_known_args()
    with workdir(args.keep) as tmp, Bench(tmp).running(noop_resources="torpor.dev/trainingjobs,pods") as b:
        torpor, noop = b.procs["torpor"].pid, b.procs["noop"].pid
        wait(lambda: b.noop_log.exists(), 60, "the no-op operator")
        time.sleep(5)  # both operators past start-up and their initial listings
        before = {"torpor": rss_cpu(torpor), "kopf no-op": rss_cpu(noop)}

        jobs = {"apiVersion": "v1", "kind": "List",
                "items": [b.job(f"j{i:03d}") for i in range(args.jobs)]}
        t0 = time.monotonic()
        b.kubectl("create", "-f", "-", input=json.dumps(jobs))

        def all_running() -> int | None:
            items = json.loads(b.kubectl("get", "tj", "-o", "json"))["items"]
            n = sum((j.get("status") or {}).get("phase") == "Running" for j in items)
            return n if n == args.jobs else None

        wait(all_running, 600, f"{args.jobs} jobs Running", interval=1.0)
        elapsed = time.monotonic() - t0
        after = {"torpor": rss_cpu(torpor), "kopf no-op": rss_cpu(noop)}
        time.sleep(15)
        idle = {"torpor": rss_cpu(torpor), "kopf no-op": rss_cpu(noop)}

        print(f"{args.jobs} one-rank TrainingJobs created at once -> all Running in {elapsed:.1f}s "
              f"({os.cpu_count()} CPUs, 2-node local cluster)")
        print(f"{'':12} {'RSS before':>10} {'peak RSS':>9} {'CPU s to Running':>17} {'CPU % next 15s':>15}")
        for name in ("torpor", "kopf no-op"):
            cpu = after[name][2] - before[name][2]
            steady = (idle[name][2] - after[name][2]) / 15 * 100
            print(f"{name:12} {before[name][0]:8.0f}MB {after[name][1]:7.0f}MB {cpu:17.1f} {steady:15.1f}")
        t_cpu, n_cpu = (after[n][2] - before[n][2] for n in ("torpor", "kopf no-op"))
        print(f"ratio torpor / kopf no-op: peak RSS {after['torpor'][1] / after['kopf no-op'][1]:.2f}x, "
              f"CPU to Running {t_cpu / max(n_cpu, 0.01):.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
