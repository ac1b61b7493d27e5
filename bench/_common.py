"""Shared pieces of the benchmarks: a MinIO of their own, a state of a given size, timing.

Not a benchmark itself (``bench/run.py`` runs ``bench_*.py`` only).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
for extra in (REPO / "hack", REPO / "runtime"):
    if str(extra) not in sys.path:
        sys.path.insert(0, str(extra))

MIB = 1024 * 1024


def parser(description: str, size_mib: int = 1024, repeat: int = 2) -> argparse.ArgumentParser:
    """Flags every benchmark takes: the state size and how many times each side runs."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--size-mib", type=int, default=size_mib, help=f"state size in MiB (default {size_mib})")
    p.add_argument("--repeat", type=int, default=repeat, help=f"runs per side, best kept (default {repeat})")
    p.add_argument("--minio-on-disk", action="store_true",
                   help="keep MinIO's data on the temp directory's disk even when /dev/shm has room")
    return p


@contextlib.contextmanager
def minio(room_gib: float = 8.0, on_disk: bool = False) -> Iterator[str]:
    """A fresh MinIO on loopback with a bucket; yields the bucket and sets the AWS_* variables.

    Its data lives in ``/dev/shm`` when that has ``room_gib`` free, else under the temp
    directory. On this test bed MinIO shares the two cores with the code being measured
    (real S3 does not), and a buffered write to the shared ext4 disk cost it ~1.5 CPU-s per
    GiB with swings of 2x from other people's I/O; tmpfs keeps the server's share smaller
    and steadier, so the ratios say more about the client sides being compared. Printed
    with the results.
    """
    import boto3

    from s3server import MinioServer

    shm = Path("/dev/shm")
    use_shm = not on_disk and shm.is_dir() and os.access(shm, os.W_OK) and _free_gib(shm) >= room_gib
    where = str(shm) if use_shm else None
    with tempfile.TemporaryDirectory(prefix="torpor-bench-", dir=where) as tmp, MinioServer(Path(tmp)) as server:
        print(f"[bench] MinIO data in {tmp} ({'tmpfs' if use_shm else 'temp directory'})", flush=True)
        os.environ.update(server.env())
        boto3.session.Session().client("s3").create_bucket(Bucket="bench")
        yield "bench"


def _free_gib(path: Path) -> float:
    stat = os.statvfs(path)
    return stat.f_bavail * stat.f_frsize / 2**30


def empty_bucket(bucket: str) -> None:
    """Delete every object (between timed runs, so tmpfs never fills)."""
    import boto3

    client = boto3.session.Session().client("s3")
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        keys = [{"Key": o["Key"]} for o in page.get("Contents", [])]
        if keys:
            client.delete_objects(Bucket=bucket, Delete={"Objects": keys, "Quiet": True})


def make_state(size_mib: int, tensor_mib: int = 64) -> dict:
    """A model-like state dict: float32 tensors of ``tensor_mib`` each (random, incompressible)."""
    import torch

    gen = torch.Generator().manual_seed(0)
    state = {}
    left = size_mib * MIB // 4
    i = 0
    while left > 0:
        n = min(left, tensor_mib * MIB // 4)
        state[f"layer{i}.weight"] = torch.randn(n, generator=gen)
        left -= n
        i += 1
    return state


def state_bytes(state: dict) -> int:
    """Tensor bytes in ``state``."""
    return sum(t.numel() * t.element_size() for t in state.values())


def best_of(repeat: int, fn: Callable[[], object]) -> float:
    """Fastest wall time of ``repeat`` runs of ``fn`` (least disturbed by other load)."""
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return min(times)


def interleaved(repeat: int, sides: dict[str, Callable[[], object]],
                after: Callable[[], object] | None = None) -> dict[str, float]:
    """Fastest time of each side over ``repeat`` rounds that run the sides in turn (ABAB…).

    On a machine shared with other work the load drifts during a run; alternating the sides
    exposes both to the same drift, where running one side after the other would not.
    ``after`` runs untimed after each side's run (e.g. :func:`empty_bucket`).
    """
    best = {name: float("inf") for name in sides}
    for _ in range(repeat):
        for name, fn in sides.items():
            started = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - started)
            if after is not None:
                after()
    return best


def median(values: list[float]) -> float:
    """Median, for per-step and per-checkpoint samples."""
    return statistics.median(values)


def load_note() -> str:
    """The machine's load when the benchmark ran, printed with the results."""
    one, five, _ = os.getloadavg()
    return f"cpus={os.cpu_count()} loadavg(1m,5m)={one:.2f},{five:.2f}"


def as_worker(worker: str | None, measure: Callable[[], dict]) -> bool:
    """A rank process of a multi-rank bench (``--worker FILE``): measure; rank 0 writes the result
    to FILE for the parent. Whether this process was a worker (then the caller returns)."""
    if not worker:
        return False
    result = measure()
    if result["rank"] == 0:
        Path(worker).write_text(json.dumps(result))
    return True
