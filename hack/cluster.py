#!/usr/bin/env python3
"""Start a local torpor playground: control plane, node agent, MinIO; Ctrl-C stops it.

``make cluster`` runs this and prints the ``KUBECONFIG`` and S3 variables to use from
another shell. ``make demo`` runs it with ``--demo``: start everything, run the operator and
a 2-rank PyTorch TrainingJob through a ``kubectl drain`` (``hack/demo.py``), show what
happened, and stop.
"""

from __future__ import annotations

import argparse
import shutil
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

import bootstrap
import demo
from controlplane import ControlPlane
from s3server import MinioServer


def log(msg: str) -> None:
    print(f"[torpor] {msg}", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, help="state directory (default: a new temporary one)")
    parser.add_argument("--nodes", type=int, default=2, help="nodes the node agent registers (default 2)")
    parser.add_argument("--configmap-sync-seconds", type=float, default=10.0,
                        help="how often mounted ConfigMaps are refreshed, like kubelet's sync period (default 10)")
    parser.add_argument("--demo", action="store_true", help="run the demo, then stop")
    demo.add_arguments(parser)
    args = parser.parse_args(argv)
    if args.nodes < 1:
        parser.error(f"--nodes must be at least 1, got {args.nodes}")

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="torpor-cluster-"))
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        return run(args, workdir)
    finally:
        if args.workdir is None and args.demo:
            shutil.rmtree(workdir, ignore_errors=True)


def run(args: argparse.Namespace, workdir: Path) -> int:
    """Start everything in ``workdir``; demo or wait for Ctrl-C; stop everything."""
    from node_agent import NodeAgent  # imported late: needs the kubernetes package

    started = time.monotonic()
    log(f"state in {workdir}")
    log("starting etcd, kube-apiserver, kube-controller-manager, kube-scheduler ...")
    with ControlPlane(workdir / "control-plane") as cp:
        log(f"control plane ready in {time.monotonic() - started:.1f}s at {cp.server}")
        log(f"starting node agent with {args.nodes} node(s) ...")
        agent = NodeAgent(cp.kubeconfig, workdir / "nodes", nodes=args.nodes,
                          configmap_sync_seconds=args.configmap_sync_seconds)
        agent.start()
        try:
            log("starting MinIO ...")
            with MinioServer(workdir / "minio") as s3:
                env = {"KUBECONFIG": str(cp.kubeconfig), **s3.env()}
                (workdir / "env.sh").write_text("".join(f"export {k}={v}\n" for k, v in env.items()))
                log(f"everything up in {time.monotonic() - started:.1f}s")
                if args.demo:
                    return demo.run_demo(cp, agent, s3, workdir, args)
                print("\nUse it from another shell:\n")
                print(f"  export KUBECONFIG={cp.kubeconfig}")
                print(f"  source {workdir / 'env.sh'}   # KUBECONFIG and the AWS_* variables for MinIO")
                print(f"  export PATH={bootstrap.bin_dir('kubernetes')}:$PATH")
                print("  kubectl get nodes\n")
                print("Ctrl-C stops everything.", flush=True)
                wait_for_interrupt()
        finally:
            agent.stop()
    log("stopped")
    return 0


def wait_for_interrupt() -> None:
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()


if __name__ == "__main__":
    sys.exit(main())
