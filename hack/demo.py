"""`make demo`: a real 2-rank PyTorch job survives a `kubectl drain` on the local cluster.

``hack/cluster.py --demo`` starts the control plane, the node agent and MinIO, then calls
:func:`run_demo`, which

1. applies the CRD and starts the operator (``python -m torpor_operator``, a subprocess);
2. makes a bucket and the credentials Secret, and applies ``examples/demo/trainingjob.yaml``
   (the image's paths replaced by this checkout: the node agent runs the command with the
   host's Python);
3. drains the node hosting rank 0 part-way through, waits for the save and the resume on
   the other node, and lets the job finish;
4. prints a timeline, ``kubectl get tj``, and writes a plot of loss against global step with
   the preemption marked.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from bootstrap import binary
from controlplane import ControlPlane
from processes import free_port
from s3server import MinioServer

ROOT = Path(__file__).resolve().parents[1]
CRD = ROOT / "crds" / "trainingjobs.yaml"
MANIFEST = ROOT / "examples" / "demo" / "trainingjob.yaml"
BUCKET = "torpor-demo"
SECRET = "s3-credentials"
NAMESPACE = "default"


def log(msg: str) -> None:
    print(f"[torpor] {msg}", flush=True)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The demo's options (``hack/cluster.py --demo ...``)."""
    group = parser.add_argument_group("demo")
    group.add_argument("--epochs", type=int, default=3, help="epochs of the job, 30 steps each (default 3)")
    group.add_argument("--step-delay", type=float, default=0.25, help="seconds each step sleeps (default 0.25)")
    group.add_argument("--drain-at-step", type=int, default=30, help="drain rank 0's node after this step (default 30)")
    group.add_argument("--plot", type=Path, default=Path.cwd() / "torpor-demo-loss.png",
                       help="where the loss plot goes (default ./torpor-demo-loss.png)")


def job_manifest(source: Path, *, endpoint: str, losses: Path, epochs: int, step_delay: float) -> dict[str, Any]:
    """``examples/demo/trainingjob.yaml`` for this machine: the checkout instead of the image, local MinIO."""
    job = yaml.safe_load(source.read_text())
    container = job["spec"]["template"]["spec"]["containers"][0]
    container["workingDir"] = str(ROOT)
    container["args"] = ["--epochs", str(epochs), "--step-delay", str(step_delay), "--losses", str(losses)]
    job["spec"]["checkpoint"]["endpoint"] = endpoint
    return job


def read_losses(path: Path) -> dict[int, float]:
    """Mean loss over ranks per global step; a step logged again later (a re-run) replaces the earlier one."""
    per_step: dict[int, dict[int, float]] = {}
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line being written
            per_step.setdefault(row["step"], {})[row["rank"]] = row["loss"]
    return {step: sum(r.values()) / len(r) for step, r in sorted(per_step.items())}


def plot(losses: dict[int, float], preempted_at: int, resumed_at: int, node: str, path: Path) -> Path:
    """Loss against global step, the preemption marked; returns the PNG's path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = sorted(losses)
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=100)
    before = [s for s in steps if s <= preempted_at]
    after = [s for s in steps if s > preempted_at]
    ax.plot(before, [losses[s] for s in before], color="tab:blue", label="incarnation 1")
    ax.plot(after, [losses[s] for s in after], color="tab:green", label="incarnation 2 (resumed)")
    ax.axvline(preempted_at + 0.5, color="tab:red", linestyle="--",
               label=f"drain of {node}: saved at step {preempted_at}, resumed at {resumed_at}")
    ax.set_xlabel("global step")
    ax.set_ylabel("training loss (mean over 2 ranks)")
    ax.set_title("torpor demo: a 2-rank PyTorch job through a kubectl drain")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


class Demo:
    """One run of the demo against a started control plane, node agent and MinIO."""

    def __init__(self, cp: ControlPlane, agent: Any, s3: MinioServer, workdir: Path, opts: argparse.Namespace) -> None:
        self.cp, self.agent, self.s3, self.workdir, self.opts = cp, agent, s3, workdir, opts
        self.losses = workdir / "losses.jsonl"
        self.t0 = time.monotonic()
        self.timeline: list[tuple[float, str]] = []
        self.operator: subprocess.Popen[bytes] | None = None

    # -- helpers ---------------------------------------------------------------------------
    def mark(self, what: str) -> None:
        self.timeline.append((time.monotonic() - self.t0, what))
        log(f"t+{time.monotonic() - self.t0:5.1f}s  {what}")

    def status(self) -> dict[str, Any]:
        got = self.cp.kubectl("get", "tj", "demo", "-n", NAMESPACE, "-o", "json", check=False)
        return json.loads(got.stdout).get("status", {}) if got.returncode == 0 else {}

    def step(self) -> int:
        losses = read_losses(self.losses)
        return max(losses) if losses else 0

    def wait(self, what: str, predicate: Any, timeout: float) -> Any:
        """Poll ``predicate``, printing progress every few seconds."""
        deadline = time.monotonic() + timeout
        shown = 0.0
        while time.monotonic() < deadline:
            value = predicate()
            if value:
                return value
            if time.monotonic() - shown >= 3:
                shown = time.monotonic()
                s = self.status()
                losses = read_losses(self.losses)
                loss = f"  loss {losses[max(losses)]:.3f}" if losses else ""
                print(f"          ... {what}: phase {s.get('phase', '-')}, incarnation {s.get('incarnation', '-')}, "
                      f"step {max(losses) if losses else 0}{loss}", flush=True)
            self.check_operator()
            time.sleep(0.5)
        raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}; operator log: "
                           f"{self.workdir / 'operator.log'}")

    def check_operator(self) -> None:
        if self.operator is not None and self.operator.poll() is not None:
            raise RuntimeError(f"the operator exited with {self.operator.returncode}: "
                               f"{(self.workdir / 'operator.log').read_text()[-2000:]}")

    # -- the steps -------------------------------------------------------------------------
    def start_operator(self) -> None:
        self.cp.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(CRD))
        self.cp.kubectl("wait", "--for=condition=Established", "crd/trainingjobs.torpor.dev", "--timeout=60s")
        env = {k: v for k, v in os.environ.items() if not k.startswith(("TORPOR_", "AWS_"))}
        env.update(self.s3.env())
        env.update(KUBECONFIG=str(self.cp.kubeconfig), TORPOR_NAMESPACES=NAMESPACE, TORPOR_LOG_FORMAT="plain",
                   TORPOR_HEALTH_PORT=str(free_port()), TORPOR_METRICS_PORT="0",
                   TORPOR_RETENTION_INTERVAL_SECONDS="3", TORPOR_BACKOFF_BASE_SECONDS="1",
                   TORPOR_MASTER_PORT=str(free_port()))
        with (self.workdir / "operator.log").open("ab") as out:
            self.operator = subprocess.Popen([sys.executable, "-m", "torpor_operator"], env=env, cwd=ROOT,
                                             stdout=out, stderr=subprocess.STDOUT)
        log(f"operator started (pid {self.operator.pid}, log {self.workdir / 'operator.log'})")

    def stop_operator(self) -> None:
        if self.operator is not None and self.operator.poll() is None:
            self.operator.terminate()
            try:
                self.operator.wait(30)
            except subprocess.TimeoutExpired:
                self.operator.kill()
                self.operator.wait(30)

    def submit(self) -> None:
        import boto3

        s3 = boto3.client("s3", **{k: v for k, v in {
            "endpoint_url": self.s3.endpoint, "aws_access_key_id": self.s3.access_key,
            "aws_secret_access_key": self.s3.secret_key, "region_name": "us-east-1"}.items()})
        s3.create_bucket(Bucket=BUCKET)
        self.cp.kubectl("create", "secret", "generic", SECRET, "-n", NAMESPACE,
                        f"--from-literal=AWS_ACCESS_KEY_ID={self.s3.access_key}",
                        f"--from-literal=AWS_SECRET_ACCESS_KEY={self.s3.secret_key}")
        job = job_manifest(MANIFEST, endpoint=self.s3.endpoint, losses=self.losses,
                           epochs=self.opts.epochs, step_delay=self.opts.step_delay)
        self.cp.kubectl("apply", "-n", NAMESPACE, "-f", "-", input=json.dumps(job))
        self.mark(f"applied {MANIFEST.relative_to(ROOT)}: 2 ranks, {self.opts.epochs} epochs, "
                  f"checkpoints to s3://{BUCKET}/runs/{NAMESPACE}/demo")

    def rank0_node(self) -> str:
        incarnation = self.status().get("incarnation", 1)
        pod = json.loads(self.cp.kubectl("get", "pod", f"demo-{incarnation}-0", "-n", NAMESPACE, "-o", "json").stdout)
        return pod["spec"]["nodeName"]

    def run(self) -> int:
        self.start_operator()
        self.submit()
        self.wait("both ranks running", lambda: self.status().get("phase") == "Running", timeout=120)
        self.mark("started: both ranks running (incarnation 1)")
        self.wait("first steps", lambda: self.step() >= 1, timeout=120)
        self.mark(f"training: step 1, loss {read_losses(self.losses)[1]:.3f}")
        self.wait(f"step {self.opts.drain_at_step}", lambda: self.step() >= self.opts.drain_at_step, timeout=180)
        node = self.rank0_node()
        self.mark(f"kubectl drain {node} (hosts rank 0) at step {self.step()}")
        drain = subprocess.Popen(
            [str(binary("kubectl")), f"--kubeconfig={self.cp.kubeconfig}", "drain", node, "--ignore-daemonsets",
             "--delete-emptydir-data", "--timeout=180s"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        stopping = self.wait("the operator to see the cordon", lambda: self.status().get("phase") == "Stopping"
                             or self.status().get("incarnation", 1) > 1, timeout=60)
        assert stopping
        self.mark(f"preempted: GracefulExit written ({self.status().get('stopMessage', 'node cordoned')})")
        self.wait("every rank to save and the job to come back",
                  lambda: self.status().get("incarnation", 1) >= 2, timeout=120)
        status = self.status()
        resumed_from = status.get("resumeFrom", "")
        last = status.get("lastCheckpoint") or {}
        # The exit save's name carries the step within its epoch ({file_name}-{epoch}_{step}):
        # take the global step from its manifest (status.lastCheckpoint) or the last logged step.
        saved_step = last["step"] if last.get("name") == resumed_from and "step" in last else self.step()
        self.mark(f"saved: checkpoint {resumed_from} at step {saved_step} complete on every rank")
        out, _ = drain.communicate(timeout=180)
        self.mark(f"drain finished (exit {drain.returncode}): {out.strip().splitlines()[-1] if out.strip() else ''}")
        self.wait("incarnation 2 running", lambda: self.status().get("phase") in ("Running", "Succeeded"), timeout=120)
        self.wait("the first resumed step", lambda: self.step() > saved_step, timeout=120)
        new_node = self.rank0_node()
        self.mark(f"resumed at step {saved_step + 1} on {new_node} (incarnation 2, from {resumed_from})")
        final = self.wait("the job to finish", lambda: self.status().get("phase") in ("Succeeded", "Failed"),
                          timeout=300)
        losses = read_losses(self.losses)
        phase = self.status()["phase"]
        self.mark(f"finished: {phase} at step {max(losses)}, loss {losses[max(losses)]:.3f}")
        assert final
        self.cp.kubectl("uncordon", node)

        print("\nTimeline:", flush=True)
        for at, what in self.timeline:
            print(f"  t+{at:6.1f}s  {what}")
        print("\nkubectl get tj -o wide:")
        print("  " + self.cp.kubectl("get", "tj", "-n", NAMESPACE, "-o", "wide").stdout.strip().replace("\n", "\n  "))
        print("\nEvents of the job:")
        events = self.cp.kubectl("get", "events", "-n", NAMESPACE,
                                 "--field-selector", "involvedObject.kind=TrainingJob",
                                 "--sort-by=.metadata.creationTimestamp", "-o",
                                 "custom-columns=REASON:.reason,MESSAGE:.message").stdout
        print("  " + events.strip().replace("\n", "\n  "))
        missing = [s for s in range(1, max(losses) + 1) if s not in losses]
        path = plot(losses, saved_step, saved_step + 1, node, self.opts.plot.resolve())
        print(f"\nLoss plot: {path}", flush=True)
        if missing:
            log(f"steps never logged: {missing[:10]}")
        return 0 if phase == "Succeeded" and not missing else 1


def run_demo(cp: ControlPlane, agent: Any, s3: MinioServer, workdir: Path, opts: argparse.Namespace) -> int:
    """The demo on a started cluster; returns the process exit code."""
    demo = Demo(cp, agent, s3, workdir, opts)
    try:
        return demo.run()
    finally:
        demo.stop_operator()
