"""``helm install`` into the local control plane, and the chart's RBAC proven enough and no more.

The Deployment is installed with ``replicaCount=0``: its pod would run under the node agent
with the host's Python, but here the operator must run as a process the test controls and
watches, with nothing but the chart's ServiceAccount token — a TokenRequest from
``kubectl create token`` in a kubeconfig holding only that token and the cluster's CA.
A second operator from the Deployment would act on the same jobs at the same time.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from bootstrap import binary, ensure
from controlplane import ControlPlane, wait_for_condition
from operator_process import OperatorProcess
from processes import free_port
from s3server import MinioServer

pytestmark = pytest.mark.cluster

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "torpor"
CRD_NAME = "trainingjobs.torpor.dev"
PEERING_CRD_NAMES = ("clusterkopfpeerings.kopf.dev", "kopfpeerings.kopf.dev")
RELEASE = "torpor"


def helm(cp: ControlPlane, *args: str) -> subprocess.CompletedProcess[str]:
    ensure("helm")
    proc = subprocess.run([str(binary("helm")), f"--kubeconfig={cp.kubeconfig}", *args],
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, f"helm {' '.join(args)}:\n{proc.stdout}\n{proc.stderr}"
    return proc


def adopt_crd(cp: ControlPlane, namespace: str) -> None:
    """Hand already applied CRDs (other test tiers apply crds/ directly) to this release, as Helm documents."""
    for name in (CRD_NAME, *PEERING_CRD_NAMES):
        if cp.kubectl("get", "crd", name, check=False).returncode == 0:
            cp.kubectl("label", "crd", name, "--overwrite", "app.kubernetes.io/managed-by=Helm")
            cp.kubectl("annotate", "crd", name, "--overwrite", f"meta.helm.sh/release-name={RELEASE}",
                       f"meta.helm.sh/release-namespace={namespace}")


@pytest.fixture
def release(control_plane: ControlPlane, namespace: str, minio: MinioServer) -> Iterator[str]:
    """The chart installed in ``namespace``, watching only it; uninstalled afterwards."""
    control_plane.kubectl("create", "secret", "generic", "operator-s3", "-n", namespace,
                          f"--from-literal=AWS_ACCESS_KEY_ID={minio.access_key}",
                          f"--from-literal=AWS_SECRET_ACCESS_KEY={minio.secret_key}")
    adopt_crd(control_plane, namespace)
    helm(control_plane, "install", RELEASE, str(CHART), "--namespace", namespace, "--wait", "--timeout", "120s",
         "--set", "replicaCount=0", "--set", f"watchNamespaces={{{namespace}}}",
         "--set", f"s3.endpoint={minio.endpoint}", "--set", "s3.credentialsSecret=operator-s3")
    try:
        yield RELEASE
    finally:
        helm(control_plane, "uninstall", RELEASE, "--namespace", namespace, "--wait")


def token_kubeconfig(cp: ControlPlane, namespace: str, sa: str, path: Path) -> Path:
    """A kubeconfig with the ServiceAccount's TokenRequest token and the CA, nothing else."""
    token = cp.kubectl("create", "token", sa, "-n", namespace, "--duration=1h").stdout.strip()
    assert cp.pki is not None
    path.write_text(json.dumps({
        "apiVersion": "v1", "kind": "Config", "current-context": "sa",
        "clusters": [{"name": "local", "cluster": {"server": cp.server, "certificate-authority": str(cp.pki.ca_cert)}}],
        "users": [{"name": "sa", "user": {"token": token}}],
        "contexts": [{"name": "sa", "context": {"cluster": "local", "user": "sa", "namespace": namespace}}],
    }))
    return path


def kubectl_as(kubeconfig: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(binary("kubectl")), f"--kubeconfig={kubeconfig}", *args],
                          capture_output=True, text=True, timeout=60)


def test_install_creates_crd_rbac_and_deployment_and_keeps_the_crd(control_plane: ControlPlane, namespace: str,
                                                                    release: str) -> None:
    cp = control_plane
    crd = json.loads(cp.kubectl("get", "crd", CRD_NAME, "-o", "json").stdout)
    assert crd["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    assert {c["type"]: c["status"] for c in crd["status"]["conditions"]}["Established"] == "True"
    deploy = json.loads(cp.kubectl("get", "deployment", release, "-n", namespace, "-o", "json").stdout)
    assert deploy["spec"]["template"]["spec"]["serviceAccountName"] == release
    assert cp.kubectl("get", "serviceaccount", release, "-n", namespace, check=False).returncode == 0
    assert cp.kubectl("get", "role,rolebinding", release, "-n", namespace, check=False).returncode == 0
    assert cp.kubectl("get", "clusterrole,clusterrolebinding", release, check=False).returncode == 0
    notes = helm(cp, "get", "notes", release, "-n", namespace).stdout
    assert f"the namespaces {namespace}" in notes
    helm(cp, "uninstall", release, "--namespace", namespace, "--wait")
    assert cp.kubectl("get", "crd", CRD_NAME, check=False).returncode == 0, "crds.keep leaves the CRD"
    assert cp.kubectl("get", "clusterrole", release, check=False).returncode != 0
    helm(cp, "install", release, str(CHART), "--namespace", namespace, "--set", "replicaCount=0",
         "--set", f"watchNamespaces={{{namespace}}}")  # the fixture uninstalls it again


def can_i_list(cp: ControlPlane, namespace: str, sa: str, where: str) -> set[tuple[str, str]]:
    """(resource, verb) pairs the ServiceAccount may use in ``where``: a SelfSubjectRulesReview as that account
    (what ``kubectl auth can-i --list`` shows)."""
    review = {"apiVersion": "authorization.k8s.io/v1", "kind": "SelfSubjectRulesReview", "spec": {"namespace": where}}
    out = cp.kubectl("create", "--validate=false", f"--as=system:serviceaccount:{namespace}:{sa}", "-f", "-",
                     "-o", "json", input=json.dumps(review), check=False)
    assert out.returncode == 0, out.stderr
    rules = json.loads(out.stdout)["status"]["resourceRules"]
    return {(f"{res}.{g}" if g else res, verb) for r in rules for g in r.get("apiGroups", [""])
            for res in r.get("resources", []) for verb in r["verbs"]}


def test_rbac_is_no_more_than_the_rules_file(control_plane: ControlPlane, namespace: str, release: str) -> None:
    cp = control_plane
    rules = yaml.safe_load((ROOT / "operator" / "torpor_operator" / "rbac.yaml").read_text())

    def qualified(rule_list: list[dict[str, Any]]) -> set[tuple[str, str]]:
        return {(res if not g else f"{res}.{g}", verb) for r in rule_list for g in r["apiGroups"]
                for res in r["resources"] for verb in r["verbs"]}

    granted = can_i_list(cp, namespace, release, namespace)
    assert not any("*" in res or verb == "*" for res, verb in granted), granted
    # What every authenticated user gets (discovery, self reviews) is not the chart's doing.
    baseline = can_i_list(cp, namespace, "default", namespace)
    wanted = qualified(rules["clusterRules"]) | qualified(rules["namespacedRules"])
    assert granted - baseline == wanted - baseline
    # Outside the watched namespace only the cluster-scoped reads remain.
    other = can_i_list(cp, namespace, release, "default")
    assert other - baseline == qualified(rules["clusterRules"]) - baseline
    # secrets: get only, by name (a job's credentialsSecret): never list, watch or write them
    for verb, *what in [("create", "clusterroles"), ("list", "secrets"), ("watch", "secrets"),
                        ("update", "secrets"), ("create", "trainingjobs.torpor.dev"),
                        ("update", "nodes"), ("create", "pods", "--subresource=exec")]:
        allowed = cp.kubectl("auth", "can-i", verb, *what, "-n", namespace,
                             f"--as=system:serviceaccount:{namespace}:{release}", check=False)
        assert allowed.stdout.strip() == "no", (verb, what)


def training_job(bucket: str, endpoint: str, losses: Path) -> dict[str, Any]:
    import demo

    job = demo.job_manifest(demo.MANIFEST, endpoint=endpoint, losses=losses, epochs=2, step_delay=0.15)
    job["metadata"]["name"] = "rbac"
    job["spec"]["checkpoint"]["uri"] = f"s3://{bucket}/runs"
    job["spec"]["checkpoint"]["credentialsSecret"] = "job-s3"
    job["spec"]["gracefulExit"]["drainProtection"] = False
    return job


def test_the_operator_with_only_the_service_account_token_carries_a_job_through_a_preemption(
        control_plane: ControlPlane, node_agent: Any, namespace: str, release: str, minio: MinioServer,
        s3_bucket: str, tmp_path: Path) -> None:
    cp = control_plane
    kubeconfig = token_kubeconfig(cp, namespace, release, tmp_path / "sa-kubeconfig")
    assert "client-key" not in kubeconfig.read_text()
    denied = kubectl_as(kubeconfig, "get", "secrets", "-n", namespace)
    assert denied.returncode != 0 and "forbidden" in denied.stderr.lower()

    env = {k: v for k, v in os.environ.items() if not k.startswith(("TORPOR_", "AWS_", "KUBECONFIG"))}
    env.update(minio.env())
    env.update(KUBECONFIG=str(kubeconfig), TORPOR_NAMESPACES=namespace, TORPOR_HEALTH_PORT="0",
               TORPOR_METRICS_PORT="0", TORPOR_LOG_FORMAT="plain", TORPOR_RETENTION_INTERVAL_SECONDS="2",
               TORPOR_BACKOFF_BASE_SECONDS="1", TORPOR_MASTER_PORT=str(free_port()))
    log_path = tmp_path / "operator.log"
    cp.kubectl("create", "secret", "generic", "job-s3", "-n", namespace,
               f"--from-literal=AWS_ACCESS_KEY_ID={minio.access_key}",
               f"--from-literal=AWS_SECRET_ACCESS_KEY={minio.secret_key}")
    losses = tmp_path / "losses.jsonl"
    with log_path.open("ab") as log:
        operator = subprocess.Popen([sys.executable, "-m", "torpor_operator"], env=env, stdout=log,
                                    stderr=subprocess.STDOUT)
    cordoned = ""
    try:
        job = training_job(s3_bucket, minio.endpoint, losses)
        cp.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(job))

        def status() -> dict[str, Any]:
            assert operator.poll() is None, log_path.read_text()[-3000:]
            return json.loads(cp.kubectl("get", "tj", "rbac", "-n", namespace, "-o", "json").stdout).get("status", {})

        def steps() -> int:
            return max((json.loads(line)["step"] for line in losses.read_text().splitlines() if line.strip()),
                       default=0) if losses.exists() else 0

        wait_for_condition(lambda: status().get("phase") == "Running" and steps() >= 5, timeout=180,
                           what="incarnation 1 training")
        pod = json.loads(cp.kubectl("get", "pod", "rbac-1-0", "-n", namespace, "-o", "json").stdout)
        cordoned = pod["spec"]["nodeName"]
        cp.kubectl("cordon", cordoned)
        wait_for_condition(lambda: status().get("incarnation", 1) >= 2, timeout=120, what="a new incarnation")
        final = wait_for_condition(lambda: status() if status().get("phase") in ("Succeeded", "Failed") else None,
                                   timeout=300, what="the job to finish")
        assert final["phase"] == "Succeeded", final
        assert final["preemptions"] == 1 and final.get("restarts", 0) == 0
        assert final["resumeFrom"], "incarnation 2 resumed from the save of incarnation 1"
        new_pod = json.loads(cp.kubectl("get", "pod", "rbac-2-0", "-n", namespace, "-o", "json").stdout)
        assert new_pod["spec"]["nodeName"] != cordoned
        # Every request the operator made was allowed (kopf's cluster-wide namespace list included).
        refused = [line for line in log_path.read_text().splitlines() if "403" in line or "forbidden" in line.lower()]
        assert refused == [], refused[:5]
    finally:
        operator.terminate()
        operator.wait(30)
        if cordoned:
            cp.kubectl("uncordon", cordoned)


def test_peering_with_only_the_service_account_token(control_plane: ControlPlane, namespace: str,
                                                     minio: MinioServer, tmp_path: Path) -> None:
    """operator.peering: the chart installs kopf's CRDs, and an operator with nothing but the chart's
    token creates its KopfPeering, keeps its record there and acts (no request refused)."""
    cp = control_plane
    adopt_crd(cp, namespace)
    helm(cp, "install", RELEASE, str(CHART), "--namespace", namespace, "--wait", "--timeout", "120s",
         "--set", "replicaCount=0", "--set", f"watchNamespaces={{{namespace}}}", "--set", "operator.peering=torpor")
    operator = None
    try:
        for name in PEERING_CRD_NAMES:
            crd = json.loads(cp.kubectl("get", "crd", name, "-o", "json").stdout)
            assert crd["metadata"]["annotations"]["meta.helm.sh/release-name"] == RELEASE
            assert {c["type"]: c["status"] for c in crd["status"]["conditions"]}["Established"] == "True"
        notes = helm(cp, "get", "notes", RELEASE, "-n", namespace).stdout
        assert f"kubectl get kopfpeering -n {namespace} torpor -o yaml" in notes
        env = {k: v for k, v in os.environ.items() if not k.startswith(("TORPOR_", "AWS_", "KUBECONFIG"))}
        env.update(KUBECONFIG=str(token_kubeconfig(cp, namespace, RELEASE, tmp_path / "sa-kubeconfig")),
                   TORPOR_NAMESPACES=namespace, TORPOR_HEALTH_PORT="0", TORPOR_METRICS_PORT="0",
                   TORPOR_LOG_FORMAT="plain", TORPOR_PEERING="torpor", TORPOR_PEERING_LIFETIME_SECONDS="10",
                   POD_ID="torpor-0")
        operator = OperatorProcess(env, tmp_path / "operator.log")
        operator.start()

        def resumed() -> bool:
            assert operator is not None and operator.proc is not None and operator.proc.poll() is None, operator.log()
            return "Resuming operations after the pause" in operator.log()

        wait_for_condition(resumed, timeout=60, what="the operator to act")
        peering = json.loads(cp.kubectl("get", "kopfpeering", "torpor", "-n", namespace, "-o", "json").stdout)
        assert set(peering["status"]) == {"torpor-0"}
        assert peering["status"]["torpor-0"]["lifetime"] == 10
        refused = [line for line in operator.log().splitlines() if "403" in line or "forbidden" in line.lower()]
        assert refused == [], refused[:5]
    finally:
        if operator is not None:
            operator.stop()
            print(operator.log()[-4000:])
        helm(cp, "uninstall", RELEASE, "--namespace", namespace, "--wait")
    for name in PEERING_CRD_NAMES:
        assert cp.kubectl("get", "crd", name, check=False).returncode == 0, "crds.keep leaves the peering CRDs"


def test_the_readme_manifests_are_accepted_by_the_api_server(control_plane: ControlPlane, namespace: str,
                                                              release: str) -> None:
    """examples/minio.yaml and the sample job, as the kind quickstart applies them (server-side dry run:
    no images run here)."""
    for manifest in ("examples/minio.yaml", "examples/demo/trainingjob.yaml"):
        docs = [d for d in yaml.safe_load_all((ROOT / manifest).read_text()) if d]
        for doc in docs:
            doc["metadata"]["namespace"] = namespace
        out = control_plane.kubectl("apply", "--dry-run=server", "-f", "-", input=json.dumps(
            {"apiVersion": "v1", "kind": "List", "items": docs}), check=False)
        assert out.returncode == 0, f"{manifest}: {out.stderr}"
        assert out.stdout.count("(server dry run)") == len(docs)
