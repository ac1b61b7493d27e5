#!/usr/bin/env python3
"""SIGTERM to durable: one signal to rank 0 → every rank's exit manifest in the bucket.

``--world`` ranks (processes, gloo on loopback) each hold ``size/world`` MiB of their own
state (``integrated_save=False``: every rank writes its shard) and train ~10 ms steps. The
parent sends SIGTERM to rank 0 only; the ranks agree at the next step boundary (one rank is
enough), wait for nothing else, write their shards and manifests. The clock stops when the
parent sees every rank's ``Net.manifest.json`` in MinIO.

Floor: the bytes written divided by the raw PUT bandwidth of the same server, measured just
before with ``put_object`` of in-memory 32 MiB bodies from ``4 * world`` threads (no
serialisation, no hashing beyond SigV4's, no manifests).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

from _common import MIB, REPO, load_note, minio, parser

CHILD = r"""
import os, sys, time, torch
sys.path.insert(0, {runtime!r})
import torpor
torpor.init_distributed()
rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
n = {per_rank_mib} * 1024 * 1024 // 4 // 16
net = torch.nn.ParameterList([torch.nn.Parameter(torch.randn(n)) for _ in range(16)])
exit_cb = torpor.OnRequestExit(directory=os.environ["TORPOR_CHECKPOINT_URI"], save_export=False,
                               integrated_save=False, exit_process=True)
loop = torpor.Loop(net, None, callbacks=[exit_cb], exit_process=True)
for _ in loop.epochs(1):
    for step in loop.batches(range(10**9)):
        time.sleep(0.01)
        if step == 5:
            print("ready", flush=True)
        loop.step_end(torch.tensor(0.0))
"""


def main() -> None:
    p = parser(__doc__.splitlines()[0], size_mib=1024, repeat=1)
    p.add_argument("--world", type=int, default=2, help="ranks (default 2)")
    opts = p.parse_args()

    import boto3

    per_rank = opts.size_mib // opts.world
    print(f"[sigterm] {opts.world} ranks x {per_rank} MiB; {load_note()}", flush=True)
    with minio(on_disk=opts.minio_on_disk) as bucket:
        client = boto3.session.Session().client("s3")
        body = os.urandom(32 * MIB)
        parts = per_rank * opts.world // 32
        started = time.perf_counter()
        with ThreadPoolExecutor(4 * opts.world) as pool:
            list(pool.map(lambda i: client.put_object(Bucket=bucket, Key=f"raw/{i}", Body=body), range(parts)))
        raw_bw = parts * 32 * MIB / (time.perf_counter() - started)
        print(f"[sigterm] raw PUT bandwidth {raw_bw / MIB:.0f} MiB/s", flush=True)

        results = []
        for attempt in range(opts.repeat):
            uri = f"s3://{bucket}/job{attempt}"
            env = {**os.environ, "WORLD_SIZE": str(opts.world), "MASTER_ADDR": "127.0.0.1",
                   "MASTER_PORT": str(29600 + attempt), "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1",
                   "TORPOR_CHECKPOINT_URI": uri, "TORPOR_TERMINATION_LOG": os.devnull}
            code = CHILD.format(runtime=str(REPO / "runtime"), per_rank_mib=per_rank)
            procs = [subprocess.Popen([sys.executable, "-c", code], env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
                                      stdout=subprocess.PIPE, text=True) for r in range(opts.world)]
            for proc in procs:
                assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
            keys = [f"job{attempt}/rank_{r}/Net.manifest.json" for r in range(opts.world)]
            t0 = time.perf_counter()
            os.kill(procs[0].pid, signal.SIGTERM)
            pending = set(keys)
            while pending:
                listed = client.list_objects_v2(Bucket=bucket, Prefix=f"job{attempt}/")
                pending -= {o["Key"] for o in listed.get("Contents", [])}
                if pending:
                    time.sleep(0.02)
            elapsed = time.perf_counter() - t0
            codes = [proc.wait(timeout=120) for proc in procs]
            sizes = sum(o["Size"] for o in client.list_objects_v2(Bucket=bucket, Prefix=f"job{attempt}/")["Contents"])
            floor = sizes / raw_bw
            print(f"[sigterm] run {attempt}: {elapsed:.2f} s to every manifest, {sizes / MIB:.0f} MiB written, "
                  f"floor {floor:.2f} s, exit codes {codes}", flush=True)
            results.append((elapsed, floor))
    elapsed, floor = min(results)
    print(f"RATIO sigterm-to-durable / floor = {elapsed / floor:.2f}x (target <= 1.5x; {elapsed:.2f} s vs "
          f"{floor:.2f} s)")


if __name__ == "__main__":
    main()
