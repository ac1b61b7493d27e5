#!/usr/bin/env python3
"""Peak memory of a resume and of async staging: torpor vs ``torch.load`` of the same bytes from a local file.

One shard (a model of ``--size-mib``/2 float32 weights plus its SGD momentum, so the shard is
``--size-mib``) is saved by torpor's own ``CheckpointMonitor`` to a local directory and to
MinIO, plaintext and AES-GCM. Each configuration then loads it in a **fresh process** that
first builds the model and the optimizer (their memory is the baseline it starts from) and
reports how far its resident memory rose above that while ``load_checkpoint`` restored
model and optimizer:

* a 2 ms sampler of ``RssAnon + RssFile`` of the process plus the growth of the machine's
  ``Shmem`` (``/proc/meminfo``) since the start: an earlier torpor staged S3 shards in
  ``/dev/shm`` files, whose pages are memory whether mapped (``RssShmem``) or not, and stay
  allocated while an optimizer's moments still point into the mapping; counting them once
  through ``Shmem`` neither misses nor double-counts them (other users' tmpfs writes during
  the few seconds of a load would add to it, never hide anything), and
* ``VmHWM`` (the kernel's peak RSS, reset to the current RSS just before the load through
  ``/proc/self/clear_refs``), printed beside it,

the higher of the two is the figure. tracemalloc would not see torch's allocations. Baseline: the same
process shape, ``torch.load(path, weights_only=True)`` of the plaintext shard file, then the
same ``load_state_dict`` calls. "held after" is what is still resident above the start once
the load returned (the optimizer's moments, which a resume must keep, are part of it).

Async staging: a ``CheckpointMonitor(async_save=True)`` takes one snapshot of the same model;
the bytes in its staging buffers are printed beside the bytes it saves (model + moments),
with and without ``save_trainable_params``.
"""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from _common import MIB, load_note, minio, parser

KEY = bytes(range(32))
NAME = "CKP-1_1"
TENSOR_MIB = 32


def build(size_mib: int) -> tuple[Any, Any]:
    """A model of ``size_mib / 2`` MiB of weights in 32 MiB tensors, touched, and its SGD."""
    import torch
    from torch import nn

    class Blob(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            left = size_mib // 2 * MIB // 4
            sizes = []
            while left > 0:
                sizes.append(min(left, TENSOR_MIB * MIB // 4))
                left -= sizes[-1]
            self.weights = nn.ParameterList([nn.Parameter(torch.full((n,), 0.5)) for n in sizes])

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            # Every weight gets a (dense) gradient, so every weight gets a momentum buffer.
            return sum(w[:1].sum() for w in self.weights) * x.sum()

    net = Blob()
    return net, torch.optim.SGD(net.parameters(), lr=1e-3, momentum=0.9)


def save(uri: str, size_mib: int, enc_key: bytes | None) -> int:
    """One training step and one checkpoint under ``uri``; returns rank 0's shard size."""
    import torch

    import torpor
    from torpor.checkpoints import FileKind, Manifest, file_key
    from torpor.storage import open_storage

    net, opt = build(size_mib)
    data = [(torch.ones(1), torch.zeros(1))]
    monitor = torpor.CheckpointMonitor(directory=uri, save_checkpoint_steps=1, save_network_params=False,
                                       enc_key=enc_key)
    torpor.Model(net, loss_fn=lambda out, y: (out - y).pow(2).mean(), optimizer=opt).train(
        1, data, callbacks=[monitor])
    manifest = Manifest.from_json(open_storage(uri).get_bytes(file_key(NAME, 0, FileKind.MANIFEST)))
    return manifest.shard.size


def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(field)


def _shmem() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("Shmem:"):
                return int(line.split()[1]) * 1024
    return 0


class Usage:
    """This process's anonymous and file-backed RSS plus the machine's tmpfs growth since ``start``."""

    def __init__(self) -> None:
        self.shmem0 = _shmem()

    def now(self) -> int:
        return _status("RssAnon") + _status("RssFile") + max(0, _shmem() - self.shmem0)


class Sampler(threading.Thread):
    """Highest :class:`Usage` seen, every 2 ms."""

    def __init__(self, usage: Usage) -> None:
        super().__init__(daemon=True)
        self.usage = usage
        self.peak = usage.now()
        self._done = threading.Event()

    def run(self) -> None:
        while not self._done.wait(0.002):
            self.peak = max(self.peak, self.usage.now())

    def stop(self) -> int:
        self._done.set()
        self.join()
        return self.peak


def child_load(config: str, uri: str, size_mib: int, baseline_file: str) -> dict[str, object]:
    import torch

    import torpor

    net, opt = build(size_mib)
    # Libraries the load imports on first use (tens of MiB for boto3) are not the shard's memory.
    import torpor._loading
    if uri.startswith("s3://"):
        from torpor.storage import s3_client

        s3_client()
    gc.collect()
    usage = Usage()
    start, start_rss = usage.now(), _status("VmRSS")
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # VmHWM := VmRSS, so the peak below is the load's own
        reset = True
    except OSError:
        reset = False
    sampler = Sampler(usage)
    sampler.start()
    began = time.perf_counter()
    if config == "baseline":
        payload = torch.load(baseline_file, weights_only=True)
        net.load_state_dict(payload["model"])
        opt.load_state_dict(payload["optimizer"])
        del payload
    else:
        torpor.load_checkpoint(NAME, net, opt, directory=uri, enc_key=KEY if "AES" in config else None,
                               restore_rng=False)
    seconds = time.perf_counter() - began
    gc.collect()
    held = usage.now() - start
    hwm = _status("VmHWM") - start_rss if reset else 0
    peak = max(hwm, sampler.stop() - start)
    return {"config": config, "peak": peak, "hwm": hwm, "held": held, "seconds": seconds}


def child_staging(trainable: bool, size_mib: int) -> dict[str, object]:
    import torch

    import torpor

    net, opt = build(size_mib)
    data = [(torch.ones(1), torch.zeros(1))] * 2
    with tempfile.TemporaryDirectory(prefix="torpor-bench-staging-") as tmp:
        monitor = torpor.CheckpointMonitor(directory=tmp, save_checkpoint_steps=2, async_save=True,
                                           save_network_params=False, save_trainable_params=trainable)
        torpor.Model(net, loss_fn=lambda out, y: (out - y).pow(2).mean(), optimizer=opt).train(
            1, data, callbacks=[monitor])
        monitor.wait()
    model = sum(t.numel() * t.element_size() for t in net.state_dict().values())
    moments = sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values()
                  if isinstance(t, torch.Tensor))
    return {"trainable": trainable, "staged": monitor._staging.nbytes, "saved": model + moments}


def run_child(*argv: str) -> dict[str, object]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, __file__, "--child", *argv], env=env, capture_output=True, text=True,
                         timeout=1800)
    if out.returncode:
        raise SystemExit(f"[memory] child {argv[:2]} failed ({out.returncode}):\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = parser(__doc__.splitlines()[0], size_mib=384, repeat=1)
    p.add_argument("--child", nargs="+", help=argparse_hidden())
    opts = p.parse_args()
    if opts.child:
        kind, *rest = opts.child
        if kind == "staging":
            print(json.dumps(child_staging(rest[0] == "trainable", opts.size_mib)))
        else:
            config, uri, baseline_file = rest
            print(json.dumps(child_load(config, uri, opts.size_mib, baseline_file)))
        return

    print(f"[memory] shard {opts.size_mib} MiB (weights {opts.size_mib // 2} MiB + SGD momentum); {load_note()}",
          flush=True)
    rows = []
    with tempfile.TemporaryDirectory(prefix="torpor-bench-memory-") as tmp, minio(on_disk=opts.minio_on_disk) as bucket:
        uris = {"local": f"{tmp}/plain", "local AES-GCM": f"{tmp}/sealed",
                "S3": f"s3://{bucket}/plain", "S3 AES-GCM": f"s3://{bucket}/sealed"}
        sizes = {config: save(uri, opts.size_mib, KEY if "AES" in config else None) for config, uri in uris.items()}
        baseline_file = str(Path(uris["local"]) / "rank_0" / f"{NAME}.ckpt")
        shard = sizes["local"]
        for _ in range(opts.repeat):
            rows.append(run_child("load", "baseline", uris["local"], baseline_file, "--size-mib", str(opts.size_mib)))
            for config, uri in uris.items():
                rows.append(run_child("load", config, uri, baseline_file, "--size-mib", str(opts.size_mib)))
        staging = [run_child("staging", flag, "--size-mib", str(opts.size_mib)) for flag in ("plain", "trainable")]
    best: dict[str, dict[str, object]] = {}
    for row in rows:  # the lowest peak of the repeats: the least disturbed by other load
        name = str(row["config"])
        if name not in best or row["peak"] < best[name]["peak"]:  # type: ignore[operator]
            best[name] = row
    base = best["baseline"]
    print(f"[memory] {'configuration':34s} {'peak above start':>18s} {'x shard':>8s} {'VmHWM':>9s} "
          f"{'held after':>11s} {'load s':>7s}", flush=True)
    for name, row in best.items():
        label = "baseline torch.load(local file)" if name == "baseline" else f"torpor load_checkpoint {name}"
        print(f"[memory] {label:34s} {row['peak'] / MIB:14.0f} MiB {row['peak'] / shard:7.2f}x "  # type: ignore[operator]
              f"{row['hwm'] / MIB:5.0f} MiB {row['held'] / MIB:7.0f} MiB {row['seconds']:7.2f}",  # type: ignore[operator]
              flush=True)
    for row in staging:
        what = "model + trainable params" if row["trainable"] else "model"
        print(f"[memory] async staging of {what:24s} {row['staged'] / MIB:8.0f} MiB staged for "  # type: ignore[operator]
              f"{row['saved'] / MIB:.0f} MiB saved ({row['staged'] / row['saved']:.2f}x)", flush=True)  # type: ignore[operator]
    worst = max((n for n in best if n != "baseline"), key=lambda n: best[n]["peak"])  # type: ignore[arg-type,return-value]
    print(f"RATIO load peak / shard: worst torpor ({worst}) = {best[worst]['peak'] / shard:.2f}x (target <= 1.25x), "  # type: ignore[operator]
          f"baseline torch.load = {base['peak'] / shard:.2f}x; "  # type: ignore[operator]
          f"staging with trainable params = {staging[1]['staged'] / staging[1]['saved']:.2f}x of what it saves "  # type: ignore[operator]
          "(target <= 1x)")


def argparse_hidden() -> str:
    import argparse

    return argparse.SUPPRESS


if __name__ == "__main__":
    main()
