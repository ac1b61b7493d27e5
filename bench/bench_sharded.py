#!/usr/bin/env python3
"""Sharded save and load, FSDP2 on gloo ranks: torpor vs DCP to local disk and s3torchconnector to MinIO.

A model of ``--size-mib`` of float32 weights in ``Linear`` layers of ``--layer-mib``, each
``fully_shard``-ed (FSDP2 on CPU), with SGD momentum (as much again: the checkpoint is twice
the model), over ``--world`` ranks that are real processes talking gloo on loopback. One
training step makes the momentum, then each round saves the same state three ways, one after
the other in the same processes (ABC, ABC, ...: every side sees the same drift of the load):

* **torpor**: ``CheckpointMonitor(save_checkpoint_steps=1)`` in a ``Loop``, to MinIO: DCP's
  planners on every rank, each rank's shards streamed into its ``rank_{r}/*.distcp`` with
  sha256 and CRC32 parts, manifests last. Timed: ``loop.step_end`` (the save, the agreement
  that it is complete, and rank 0's retention after it).
* **DCP** ``dcp.save`` with ``FileSystemWriter`` (``--threads`` per rank, its default fsync)
  to a directory on the local disk: what DCP costs without any object store.
* **s3torchconnector**'s DCP ``S3StorageWriter`` to the same MinIO (its CRT client finds
  the endpoint in ``AWS_ENDPOINT_URL``; path-style addressing).

Then the loads, interleaved the same way, each into the same model after its weights and
momentum were zeroed (untimed), each checked against the saved values: torpor's
``load_checkpoint`` (every file checked against its manifest's sha256), and
``dcp.load`` + ``set_state_dict`` through ``FileSystemReader`` and ``S3StorageReader``.

Last, the resume: fresh processes on ``--world`` ranks and on ``--resize-to`` ranks load the
same checkpoints (the last round's) into a model built for their world size; DCP reshards,
torpor through DCP's planners too. The resume figure is the load alone (not process start,
rendezvous or the first step, which are the same for every side). Each side is checked
against the saved values: a checksum of every tensor gathered whole, weighted by position,
so a value in the wrong place fails it. Every figure is the slowest rank's time of one
collective operation, best of ``--repeat``; ratios are baseline time / torpor time (above 1:
torpor faster), and 2 -> 3 / 2 -> 2 for the resume.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _common import MIB, REPO, load_note, minio, parser

_SPEC = "TORPOR_BENCH_SHARDED"
"""The environment variable that hands a rank process its phase and paths (JSON)."""


def main() -> None:
    p = parser(__doc__.splitlines()[0], size_mib=1024, repeat=2)
    p.add_argument("--world", type=int, default=2, help="ranks that save (default 2)")
    p.add_argument("--resize-to", type=int, default=3,
                   help="ranks of the resumed run besides --world (default 3; 0: no resume part)")
    p.add_argument("--layer-mib", type=int, default=64, help="MiB per Linear layer (default 64)")
    p.add_argument("--threads", type=int, default=2, help="IO threads per rank of DCP's writers (default 2)")
    p.add_argument("--no-s3tc", action="store_true", help="leave s3torchconnector out")
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds a phase may take (default 1800)")
    opts = p.parse_args()
    spec = os.environ.get(_SPEC)
    if spec is not None:
        _rank_main(json.loads(spec))
        return
    for flag in ("world", "repeat", "size_mib", "layer_mib"):
        if getattr(opts, flag) < 1:
            raise SystemExit(f"--{flag.replace('_', '-')} must be at least 1, got {getattr(opts, flag)}")
    if opts.resize_to < 0:
        raise SystemExit(f"--resize-to must be 0 (no resume part) or a number of ranks, got {opts.resize_to}")
    _parent(opts)


# -- the parent: MinIO, the phases, the report ---------------------------------------------------

def _parent(opts: argparse.Namespace) -> None:
    s3tc = not opts.no_s3tc and _s3tc_importable()
    started_load = _loadavg()
    print(f"[sharded] FSDP2 model {opts.size_mib} MiB (+ momentum), {opts.world} ranks; {load_note()}; "
          f"/proc/loadavg {started_load}", flush=True)
    # MinIO holds at most two checkpoints of each S3 side at a time (model + momentum each).
    room = max(1.0, 4 * 2 * opts.size_mib / 1024 + 1)
    with minio(room_gib=room, on_disk=opts.minio_on_disk) as bucket, \
            tempfile.TemporaryDirectory(prefix="torpor-bench-sharded-") as work:
        base = {"size_mib": opts.size_mib, "layer_mib": opts.layer_mib, "repeat": opts.repeat,
                "threads": opts.threads, "s3tc": s3tc, "bucket": bucket, "torpor_uri": f"s3://{bucket}/torpor",
                "dcp_dir": str(Path(work) / "dcp"), "work": work}
        saved = _phase("save", opts.world, base, opts.timeout)
        resumed = {}
        sizes = [opts.world] + ([opts.resize_to] if opts.resize_to and opts.resize_to != opts.world else [])
        if opts.resize_to:
            for world in sizes:
                resumed[world] = _phase("resume", world, {**base, **saved["checkpoints"]}, opts.timeout)
    _report(opts, saved, resumed, started_load, _loadavg())


def _s3tc_importable() -> bool:
    try:
        import s3torchconnector.dcp  # type: ignore[import-not-found]  # noqa: F401
    except ImportError as exc:
        print(f"[sharded] s3torchconnector: not importable here ({exc}); skipped (make bench installs it through "
              "the 'bench' extra)", flush=True)
        return False
    return True


def _loadavg() -> str:
    return Path("/proc/loadavg").read_text().strip() if Path("/proc/loadavg").exists() else "?"


def _phase(phase: str, world: int, spec: dict[str, Any], timeout: float) -> dict[str, Any]:
    """Run ``world`` rank processes of this script for ``phase``; rank 0's result (JSON)."""
    from processes import die_with_starting_thread, free_port, poll

    result = Path(spec["work"]) / f"{phase}-{world}.json"
    env = {**os.environ, _SPEC: json.dumps({**spec, "phase": phase, "result": str(result)}),
           "WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()),
           "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1", "TORPOR_TERMINATION_LOG": os.devnull,
           "PYTHONPATH": os.pathsep.join([str(REPO / "runtime"), str(REPO / "hack"), os.environ.get("PYTHONPATH", "")])}
    print(f"[sharded] {phase} on {world} ranks ...", flush=True)
    started = time.perf_counter()
    procs = [subprocess.Popen([sys.executable, __file__], env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
                              stdin=subprocess.DEVNULL, preexec_fn=die_with_starting_thread) for r in range(world)]
    try:
        # A rank that fails leaves the others in a collective: stop waiting at the first failure.
        poll(lambda: all(p.poll() is not None for p in procs) or any(p.poll() for p in procs),
             timeout=timeout, what=f"the {phase} phase on {world} ranks", interval=0.2)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
    codes = [proc.returncode for proc in procs]
    if any(codes):
        raise SystemExit(f"[sharded] {phase} on {world} ranks failed: exit codes {codes}")
    print(f"[sharded] {phase} on {world} ranks: {time.perf_counter() - started:.1f} s in all", flush=True)
    return json.loads(result.read_text())


_SIDES = {"torpor": "torpor (S3, MinIO)", "dcp": "DCP FileSystem (local disk)",
          "s3tc": "s3torchconnector DCP (MinIO)"}
_SHORT = {"torpor": "torpor", "dcp": "DCP-FileSystem(local disk)", "s3tc": "s3torchconnector"}


def _report(opts: argparse.Namespace, saved: dict[str, Any], resumed: dict[int, dict[str, Any]],
            started_load: str, ended_load: str) -> None:
    nbytes = saved["bytes"]
    print(f"[sharded] checkpoint {nbytes / MIB:.0f} MiB (weights + momentum) over {opts.world} ranks; "
          f"/proc/loadavg at the start {started_load}, at the end {ended_load}", flush=True)
    print(f"[sharded] {'':6s} {'side':32s} {'wall':>8s} {'MiB/s':>6s} {'ranks CPU-s':>11s} {'MinIO CPU-s':>11s} "
          f"{'rank peak +MiB':>14s}", flush=True)
    rows = [(what, saved[what]) for what in ("save", "load")]
    rows += [(f"{opts.world}->{world}", result["load"]) for world, result in resumed.items()]
    for what, sides in rows:
        for side, run in sides.items():
            print(f"[sharded] {what:6s} {_SIDES[side]:32s} {run['wall']:6.2f} s {nbytes / MIB / run['wall']:6.0f} "
                  f"{run['cpu']:11.1f} {run['server']:11.1f} {run['peak'] / MIB:14.0f}", flush=True)
    print(f"[sharded] save torpor: CheckpointMonitor.stalls {saved['torpor_stall']:.2f} s (step_end less "
          "rank 0's retention)", flush=True)
    parts = []
    for what in ("save", "load"):
        ours = saved[what]["torpor"]["wall"]
        parts.append(f"{what} speed " + ", ".join(f"torpor/{_SHORT[side]} = {run['wall'] / ours:.2f}x"
                                                  for side, run in saved[what].items() if side != "torpor"))
    if len(resumed) == 2:
        same, other = (resumed[w]["load"] for w in resumed)
        wider = next(w for w in resumed if w != opts.world)
        parts.append(f"resume time {opts.world}->{wider} / {opts.world}->{opts.world} " +
                     ", ".join(f"{_SHORT[side]} = {other[side]['wall'] / same[side]['wall']:.2f}x" for side in same))
    print("RATIO sharded " + "; ".join(parts))


# -- a rank --------------------------------------------------------------------------------------

_STARTED = time.perf_counter()


def _say(message: str) -> None:
    """Progress, from rank 0, with the time since the process started."""
    if os.environ.get("RANK") == "0":
        print(f"[sharded]   rank 0 +{time.perf_counter() - _STARTED:5.1f}s: {message}", flush=True)


def _rank_main(spec: dict[str, Any]) -> None:
    import torch.distributed as dist

    import torpor

    torpor.init_distributed(timeout_seconds=600)
    _say(f"process group of {dist.get_world_size()} up")
    result = _save_phase(spec) if spec["phase"] == "save" else _resume_phase(spec)
    if dist.get_rank() == 0:
        Path(spec["result"]).write_text(json.dumps(result))


def _model(size_mib: int, layer_mib: int) -> Any:
    """The sharded model: its layers built on the meta device, sharded, then only each rank's
    shards allocated (no rank ever holds the whole model). Values: random per rank."""
    import torch
    from torch import nn
    from torch.distributed.fsdp import fully_shard

    layers = max(1, round(size_mib / layer_mib))
    width = math.isqrt(size_mib * MIB // 4 // layers)
    with torch.device("meta"):
        net = nn.Sequential(*(nn.Linear(width, width, bias=False) for _ in range(layers)))
    for layer in net:
        fully_shard(layer)
    fully_shard(net)
    net.to_empty(device="cpu")
    gen = torch.Generator().manual_seed(int(os.environ["RANK"]))
    with torch.no_grad():
        for param in net.parameters():
            param.to_local().normal_(0.0, 1.0 / math.sqrt(width), generator=gen)
    return net


def _optimizer(net: Any) -> Any:
    import torch

    return torch.optim.SGD(net.parameters(), lr=1e-3, momentum=0.9)


def _tensors(net: Any, opt: Any) -> list[Any]:
    """This rank's local shards of every weight and momentum buffer."""
    out = []
    for param in net.parameters():
        out.append(param.to_local())
        buf = opt.state.get(param, {}).get("momentum_buffer")
        if buf is not None:
            out.append(buf.to_local())
    return out


def _fingerprint(net: Any, opt: Any) -> float:
    """A checksum of the weights and momentum that depends on where each value sits.

    Each tensor is gathered whole (one at a time, untimed) and its elements weighted by their
    position in it and by the tensor's index, so a load that put the right values in the
    wrong shard or order does not sum to the same number; the same on any world size.
    """
    import torch

    total = 0.0
    for index, local in enumerate(_full_tensors(net, opt)):
        flat = local.detach().double().flatten()
        weights = torch.arange(flat.numel(), dtype=torch.float64).remainder_(1009).add_(1)
        total += (index + 1) * float(flat.dot(weights))
    return total


def _full_tensors(net: Any, opt: Any) -> Any:
    """Every weight and momentum buffer gathered whole, one at a time (a collective)."""
    for param in net.parameters():
        yield param.full_tensor()
        buf = opt.state.get(param, {}).get("momentum_buffer")
        if buf is not None:
            yield buf.full_tensor()


def _zero(net: Any, opt: Any) -> None:
    import torch

    with torch.no_grad():
        for tensor in _tensors(net, opt):
            tensor.zero_()


def _server_cpu() -> float:
    """CPU seconds MinIO has used so far: the bench's parent started it, so it is this rank's
    sibling named ``minio`` (0.0 when it is not found: the figure is then left out)."""
    tick = os.sysconf("SC_CLK_TCK")
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        name, rest = text[text.index("(") + 1:text.rindex(")")], text[text.rindex(")") + 2:].split()
        if name == "minio" and int(rest[1]) == os.getppid():
            return (int(rest[11]) + int(rest[12])) / tick
    return 0.0


def _status(field: str) -> int:
    """A ``/proc/self/status`` figure in bytes (``VmRSS``, ``VmHWM``)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def _reset_peak() -> int:
    """``VmHWM := VmRSS`` (so the next peak is the operation's own); the RSS now."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _status("VmRSS")


def _timed(fn: Any) -> dict[str, float]:
    """``fn`` on every rank from a common start to the last rank's end: its wall time, the CPU
    seconds of every rank together (every thread of each), MinIO's CPU seconds, and the
    highest rank's peak resident memory above what it held before.

    The machine is shared: under others' load the wall time stretches, CPU seconds much less.
    """
    import torch
    import torch.distributed as dist

    dist.barrier()
    rss = _reset_peak()
    server, cpu, started = _server_cpu(), time.process_time(), time.perf_counter()
    fn()
    dist.barrier()
    wall = time.perf_counter() - started
    used = torch.tensor([time.process_time() - cpu], dtype=torch.float64)
    dist.all_reduce(used)
    peak = torch.tensor([_status("VmHWM") - rss], dtype=torch.float64)
    dist.all_reduce(peak, op=dist.ReduceOp.MAX)
    return {"wall": wall, "cpu": float(used), "server": _server_cpu() - server, "peak": float(peak)}


def _best(runs: list[dict[str, float]]) -> dict[str, float]:
    """The fastest run (least disturbed by other load), with its CPU figures."""
    return min(runs, key=lambda run: run["wall"])


def _slowest(seconds: float) -> float:
    import torch
    import torch.distributed as dist

    value = torch.tensor([seconds], dtype=torch.float64)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return float(value)


def _dcp_state(net: Any, opt: Any) -> dict[str, Any]:
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    return {"model": get_model_state_dict(net), "optimizer": get_optimizer_state_dict(net, opt)}


def _dcp_load(net: Any, opt: Any, reader: Any) -> None:
    """DCP's documented load: the state dicts, ``dcp.load`` into them, then set them."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    state = _dcp_state(net, opt)
    dcp.load(state, storage_reader=reader)
    set_model_state_dict(net, state["model"])
    set_optimizer_state_dict(net, opt, state["optimizer"])


def _s3tc_config() -> Any:
    from s3torchconnector import S3ClientConfig  # type: ignore[import-not-found]

    return S3ClientConfig(force_path_style=True)  # MinIO on an address, not a virtual host


def _s3tc_writer(path: str, threads: int) -> Any:
    from s3torchconnector.dcp import S3StorageWriter  # type: ignore[import-not-found]

    return S3StorageWriter(region=os.environ.get("AWS_DEFAULT_REGION", "us-east-1"), path=path,
                           s3client_config=_s3tc_config(), thread_count=threads)


def _s3tc_reader(path: str) -> Any:
    from s3torchconnector.dcp import S3StorageReader  # type: ignore[import-not-found]

    return S3StorageReader(region=os.environ.get("AWS_DEFAULT_REGION", "us-east-1"), path=path,
                           s3client_config=_s3tc_config())


def _delete_prefix(bucket: str, prefix: str) -> None:
    """Rank 0 deletes a baseline's earlier checkpoint (untimed), so tmpfs holds at most two."""
    import boto3

    client = boto3.session.Session().client("s3")
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        keys = [{"Key": o["Key"]} for o in page.get("Contents", [])]
        if keys:
            client.delete_objects(Bucket=bucket, Delete={"Objects": keys, "Quiet": True})


def _save_phase(spec: dict[str, Any]) -> dict[str, Any]:
    import torch
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp

    import torpor

    rank = dist.get_rank()
    net, repeat = _model(spec["size_mib"], spec["layer_mib"]), spec["repeat"]
    opt = _optimizer(net)
    width = net[0].in_features
    _say(f"model of {len(net)} x Linear({width}, {width}) sharded")
    monitor = torpor.CheckpointMonitor(directory=spec["torpor_uri"], save_checkpoint_steps=1, keep_checkpoint_max=1)
    saves: dict[str, list[dict[str, float]]] = {"torpor": [], "dcp": []} | ({"s3tc": []} if spec["s3tc"] else {})
    stalls: list[float] = []
    paths: dict[str, str] = {}
    gen = torch.Generator().manual_seed(1)
    with torpor.Loop(net, opt, callbacks=[monitor]) as loop:
        for _ in loop.epochs(1):
            for step in loop.batches(range(repeat)):
                opt.zero_grad(set_to_none=True)
                loss = net(torch.randn(8, width, generator=gen)).square().mean()
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)  # the gradients are not saved: free them before the saves

                dcp_dir = f"{spec['dcp_dir']}/{step}"
                saves["dcp"].append(_timed(lambda d=dcp_dir: dcp.save(
                    _dcp_state(net, opt), storage_writer=dcp.FileSystemWriter(d, thread_count=spec["threads"]))))
                if rank == 0 and step:
                    shutil.rmtree(f"{spec['dcp_dir']}/{step - 1}")
                paths["dcp_path"] = dcp_dir
                if spec["s3tc"]:
                    if rank == 0 and step:  # before the next save: MinIO's tmpfs holds one at a time
                        _delete_prefix(spec["bucket"], f"s3tc/{step - 1}/")
                    s3tc_path = f"s3://{spec['bucket']}/s3tc/{step}"
                    saves["s3tc"].append(_timed(lambda p=s3tc_path: dcp.save(
                        _dcp_state(net, opt), storage_writer=_s3tc_writer(p, spec["threads"]))))
                    paths["s3tc_path"] = s3tc_path
                done = loss.detach()
                saves["torpor"].append(_timed(lambda done=done: loop.step_end(done)))
                stalls.append(_slowest(monitor.stalls[-1]))
                _say(f"round {step}: saves " + ", ".join(f"{k} {v[-1]['wall']:.2f} s" for k, v in saves.items()))
    paths["torpor_name"] = monitor.saved[-1]
    fingerprint = _fingerprint(net, opt)
    nbytes = torch.tensor([sum(t.nbytes for t in _tensors(net, opt))], dtype=torch.int64)
    dist.all_reduce(nbytes)

    loads = _loads(spec | paths, net, opt, fingerprint)
    return {"save": {side: _best(runs) for side, runs in saves.items()}, "load": loads,
            "torpor_stall": min(stalls), "bytes": int(nbytes), "checkpoints": paths | {"fingerprint": fingerprint}}


def _loads(spec: dict[str, Any], net: Any, opt: Any, fingerprint: float) -> dict[str, dict[str, float]]:
    """Each side's load of the saved checkpoint into ``net``/``opt``, interleaved, best of
    ``repeat``; the state is zeroed before each and checked after it."""
    import torch.distributed.checkpoint as dcp

    import torpor

    sides = {"torpor": lambda: torpor.load_checkpoint(spec["torpor_name"], net, opt, directory=spec["torpor_uri"]),
             "dcp": lambda: _dcp_load(net, opt, dcp.FileSystemReader(spec["dcp_path"]))}
    if spec["s3tc"]:
        sides["s3tc"] = lambda: _dcp_load(net, opt, _s3tc_reader(spec["s3tc_path"]))
    runs: dict[str, list[dict[str, float]]] = {side: [] for side in sides}
    for _ in range(spec["repeat"]):
        for side, fn in sides.items():
            _zero(net, opt)
            runs[side].append(_timed(fn))
            _say(f"load {side} {runs[side][-1]['wall']:.2f} s")
            got = _fingerprint(net, opt)
            if not math.isclose(got, fingerprint, rel_tol=1e-9, abs_tol=1e-6):
                raise AssertionError(f"{side}: loaded state sums to {got!r}, the saved one to {fingerprint!r}")
    return {side: _best(side_runs) for side, side_runs in runs.items()}


def _resume_phase(spec: dict[str, Any]) -> dict[str, Any]:
    """A fresh run on this world size loads what the saving run wrote (each side its own)."""
    net = _model(spec["size_mib"], spec["layer_mib"])
    opt = _optimizer(net)
    _say("model sharded")
    return {"load": _loads(spec, net, opt, spec["fingerprint"])}


if __name__ == "__main__":
    main()
