"""Fixtures for the operator's end-to-end tests: real control plane, node agent, MinIO, torch.

One operator process (``python -m torpor_operator``, watching the whole cluster) serves every
test of a module; each test runs its jobs in a namespace of its own, with a bucket of its
own, so tests share the operator but nothing they observe.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from controlplane import ControlPlane, wait_for_condition
from operator_process import OperatorProcess
from processes import free_port
from s3server import MinioServer

ROOT = Path(__file__).resolve().parents[2]
CRD = ROOT / "crds" / "trainingjobs.yaml"
EXAMPLE = ROOT / "examples" / "trainingjob.yaml"
CREDENTIALS_SECRET = "s3-credentials"


@pytest.fixture(scope="session")
def trainingjob_crd(control_plane: ControlPlane) -> str:
    """crds/trainingjobs.yaml applied (server-side) and Established; returns the CRD name."""
    control_plane.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(CRD))
    name = "trainingjobs.torpor.dev"
    control_plane.kubectl("wait", "--for=condition=Established", f"crd/{name}", "--timeout=60s")
    return name


@pytest.fixture(scope="module")
def operator_extra_env(request: pytest.FixtureRequest) -> dict[str, str]:
    """Settings a module adds to its operator's environment: its ``OPERATOR_ENV`` dictionary. A module
    whose settings need a fixture (a fault proxy's port) overrides this fixture instead."""
    return dict(getattr(request.module, "OPERATOR_ENV", {}))


@pytest.fixture(scope="module")
def operator(control_plane: ControlPlane, trainingjob_crd: str, node_agent: Any, minio: MinioServer,
             tmp_path_factory: pytest.TempPathFactory,
             operator_extra_env: dict[str, str]) -> Iterator[OperatorProcess]:
    """One operator for the module's tests: 1 s restart backoff, retention every 2 s; the
    ``operator_extra_env`` fixture (by default the module's ``OPERATOR_ENV``) overrides these."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TORPOR_")}
    env.update(minio.env())
    env.update(KUBECONFIG=str(control_plane.kubeconfig), TORPOR_HEALTH_PORT="0", TORPOR_METRICS_PORT="0",
               TORPOR_LOG_FORMAT="plain", TORPOR_RETENTION_INTERVAL_SECONDS="2", TORPOR_BACKOFF_BASE_SECONDS="1",
               TORPOR_WATCH_TIMEOUT_SECONDS="60",
               # rank 0 listens on all addresses: a port of its own keeps it clear of other work here
               TORPOR_MASTER_PORT=str(free_port()))
    env.update(operator_extra_env)
    op = OperatorProcess(env, tmp_path_factory.mktemp("operator") / "operator.log")
    op.start()
    try:
        yield op
    finally:
        op.stop()


class Env:
    """One test's namespace, bucket and helpers to run the example TrainingJob in them."""

    def __init__(self, cp: ControlPlane, namespace: str, bucket: str, minio: MinioServer, agent: Any,
                 op: OperatorProcess, tmp: Path) -> None:
        self.cp, self.ns, self.bucket, self.minio = cp, namespace, bucket, minio
        self.agent, self.op, self.tmp = agent, op, tmp
        self.cordoned: list[str] = []

    # --- objects ---------------------------------------------------------------------------
    def kubectl(self, *args: str, **kwargs: Any) -> subprocess.CompletedProcess[str]:
        return self.cp.kubectl("-n", self.ns, *args, **kwargs)

    def get(self, *what: str) -> Any:
        return json.loads(self.kubectl("get", *what, "-o", "json").stdout)

    def status(self, name: str = "mlp") -> dict[str, Any]:
        return self.get("tj", name).get("status", {})

    def pods(self, name: str = "mlp") -> list[dict[str, Any]]:
        return self.get("pods", "-l", f"torpor.dev/job={name}")["items"]

    def pod(self, name: str) -> dict[str, Any]:
        return self.get("pod", name)

    def patch(self, spec: dict[str, Any], name: str = "mlp") -> None:
        self.kubectl("patch", "tj", name, "--type=merge", "-p", json.dumps({"spec": spec}))

    def events(self, name: str = "mlp") -> list[dict[str, Any]]:
        """The job's Events, in the order written: timestamps have whole seconds, resource
        versions of one etcd increase."""
        events = self.get("events", "--field-selector", f"involvedObject.kind=TrainingJob,involvedObject.name={name}")
        return sorted(events["items"], key=lambda e: int(e["metadata"]["resourceVersion"]))

    def reasons(self, name: str = "mlp") -> list[str]:
        return [e["reason"] for e in self.events(name)]

    def wait(self, what: str, predicate: Callable[[], Any], timeout: float = 90) -> Any:
        return wait_for_condition(predicate, timeout=timeout, what=what)

    def wait_phase(self, phase: str, name: str = "mlp", timeout: float = 90, **fields: Any) -> dict[str, Any]:
        def reached() -> dict[str, Any] | None:
            st = self.status(name)
            ok = st.get("phase") == phase and all(st.get(k) == v for k, v in fields.items())
            return st if ok else None
        return self.wait(f"{name} {phase} {fields or ''}", reached, timeout)

    # --- the example job -------------------------------------------------------------------
    def example(self, *args: str, name: str = "mlp", **spec: Any) -> dict[str, Any]:
        """examples/trainingjob.yaml with this machine's image, working directory and MinIO.

        ``args`` are appended to the container's (argparse: the last occurrence wins);
        ``spec`` entries are merged into ``spec`` one level deep.
        """
        body = yaml.safe_load(EXAMPLE.read_text())
        body = copy.deepcopy(body)
        body["metadata"]["name"] = name
        container = body["spec"]["template"]["spec"]["containers"][0]
        container["image"] = "local"  # the node agent runs the host's Python
        container["workingDir"] = str(ROOT)
        container["args"] = [*container.get("args", []), *args]
        ckpt = body["spec"]["checkpoint"]
        ckpt["uri"] = f"s3://{self.bucket}/runs"
        ckpt["endpoint"] = self.minio.endpoint
        for key, value in spec.items():
            if isinstance(value, dict) and isinstance(body["spec"].get(key), dict):
                body["spec"][key].update(value)
            else:
                body["spec"][key] = value
        return body

    def create(self, body: dict[str, Any]) -> None:
        self.kubectl("create", "-f", "-", input=json.dumps(body))

    def losses(self, name: str = "mlp") -> Path:
        return self.tmp / f"{name}-losses.jsonl"

    def steps(self, name: str = "mlp") -> list[dict[str, Any]]:
        path = self.losses(name)
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    def break_losses(self, name: str = "mlp") -> Path:
        """Turn the ranks' ``--losses`` file into a directory: their next write raises
        IsADirectoryError inside a training step, a real crash of the training process.
        Returns where the lines written so far went; remove the directory to heal."""
        path = self.losses(name)
        kept = path.with_name(f"{path.name}.{time.monotonic_ns()}")
        path.rename(kept)
        while True:  # a rank may append (and so re-create the file) between rename and mkdir
            try:
                path.mkdir()
                return kept
            except FileExistsError:
                late = path.with_name(f"{path.name}.late")
                path.rename(late)
                with kept.open("a", encoding="utf-8") as f:
                    f.write(late.read_text(encoding="utf-8"))
                late.unlink()

    def node_of(self, pod: str) -> str:
        return self.pod(pod)["spec"]["nodeName"]

    def cordon(self, node: str) -> None:
        self.cordoned.append(node)
        self.cp.kubectl("cordon", node)

    def drain(self, node: str) -> str:
        """``kubectl drain`` the node (uncordoned after the test); its output. Fails the test if
        the drain does not finish within 150 s."""
        from bootstrap import binary

        self.cordoned.append(node)  # uncordoned after the test, whatever happens
        drain = subprocess.run(
            [str(binary("kubectl")), f"--kubeconfig={self.cp.kubeconfig}", "drain", node, "--ignore-daemonsets",
             "--delete-emptydir-data", "--timeout=150s"],
            capture_output=True, text=True, timeout=200,
        )
        assert drain.returncode == 0, drain.stdout + drain.stderr
        return drain.stdout + drain.stderr

    def uncordon_all(self) -> None:
        for node in self.cordoned:
            self.cp.kubectl("uncordon", node, check=False)
        self.cordoned.clear()

    # --- the bucket ------------------------------------------------------------------------
    def object_keys(self, name: str = "mlp") -> list[str]:
        import boto3

        prefix = f"runs/{self.ns}/{name}/"
        pages = boto3.client("s3").get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix)
        return sorted(o["Key"][len(prefix):] for page in pages for o in page.get("Contents", []))

    def checkpoints(self, name: str = "mlp") -> list[Any]:
        """Every checkpoint under the job's prefix, as the runtime's own scan judges them."""
        from torpor.checkpoints import scan
        from torpor.storage import open_storage

        return scan(open_storage(f"s3://{self.bucket}/runs/{self.ns}/{name}"))

    def pruned_by_the_operator(self, keep: int, resume_from: str, timeout: float = 90) -> list[Any]:
        """Wait until the operator's retention has left the job's ``keep`` newest checkpoints and
        the one its incarnation resumed from (kept while the job points at it), each whole, and no
        other object under the prefix; the checkpoints left."""
        def pruned() -> list[Any] | None:
            found = self.checkpoints()
            newest = sorted(found, key=lambda c: (c.step, c.name))[-keep:]
            names = {c.name for c in found}
            ok = names == {c.name for c in newest} | {resume_from} and all(c.complete for c in found) and \
                {k.rsplit("/", 1)[1].split(".")[0] for k in self.object_keys()} == names
            return found if ok else None
        return self.wait("the operator's retention", pruned, timeout)

    def terminated(self, pod: dict[str, Any]) -> dict[str, Any] | None:
        for cs in pod.get("status", {}).get("containerStatuses") or []:
            state = cs.get("state", {}).get("terminated")
            if state:
                return state
        return None


@pytest.fixture
def e2e(control_plane: ControlPlane, namespace: str, s3_bucket: str, minio: MinioServer, node_agent: Any,
        operator: OperatorProcess, tmp_path: Path) -> Iterator[Env]:
    """A namespace with the example's S3 Secret, served by the module's operator."""
    secret = {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": CREDENTIALS_SECRET},
              "stringData": {"AWS_ACCESS_KEY_ID": minio.access_key, "AWS_SECRET_ACCESS_KEY": minio.secret_key}}
    control_plane.kubectl("create", "-n", namespace, "-f", "-", input=json.dumps(secret))
    env = Env(control_plane, namespace, s3_bucket, minio, node_agent, operator, tmp_path)
    offset = operator.log_path.stat().st_size if operator.log_path.exists() else 0
    started = time.monotonic()
    try:
        yield env
    finally:
        env.uncordon_all()
        if operator.proc is None or operator.proc.poll() is not None:  # a test killed it and failed
            operator.start()
        print(f"--- after {time.monotonic() - started:.0f}s; pods:")
        print(control_plane.kubectl("get", "-n", namespace, "pods", "-o", "wide", check=False).stdout)
        print(control_plane.kubectl("get", "-n", namespace, "tj", "-o", "wide", check=False).stdout)
        with operator.log_path.open("rb") as log:  # shown by pytest only when the test failed
            log.seek(offset)
            print(log.read().decode(errors="replace")[-10000:])
        # the node agent is shared: no job of this test may keep running into the next one
        for tj in json.loads(control_plane.kubectl("get", "-n", namespace, "tj", "-o", "json").stdout)["items"]:
            control_plane.kubectl("delete", "-n", namespace, "tj", tj["metadata"]["name"], "--wait=false",
                                  check=False)
        control_plane.kubectl("delete", "-n", namespace, "pods", "--all", "--grace-period=0", "--force",
                              check=False)
