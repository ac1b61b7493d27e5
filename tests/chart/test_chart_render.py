"""The chart without a cluster: lint, render in both RBAC modes, generated copies, the Dockerfiles.

Everything here runs the real tools (Helm built from Go modules, hadolint from PyPI).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

import generate
from bootstrap import binary, ensure

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "torpor"
RULES = yaml.safe_load((ROOT / "operator" / "torpor_operator" / "rbac.yaml").read_text())
DOCKERFILES = [ROOT / "Dockerfile", ROOT / "examples" / "demo" / "Dockerfile"]


def helm(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    ensure("helm")
    proc = subprocess.run([str(binary("helm")), *args], capture_output=True, text=True, timeout=120)
    if check and proc.returncode != 0:
        raise AssertionError(f"helm {' '.join(args)} failed:\n{proc.stderr}")
    return proc


def render(*sets: str) -> list[dict[str, Any]]:
    args = [a for s in sets for a in ("--set", s)]
    out = helm("template", "tp", str(CHART), "--namespace", "torpor-system", *args).stdout
    return [doc for doc in yaml.safe_load_all(out) if doc]


def by_kind(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind]


def rule_set(rules: list[dict[str, Any]]) -> set[tuple[str, str, str]]:
    return {(group, res, verb) for r in rules for group in r["apiGroups"]
            for res in r["resources"] for verb in r["verbs"]}


@pytest.mark.parametrize("sets", [(), ("watchNamespaces={team-a,team-b}",), ("operator.peering=torpor",),
                                  ("metrics.service.enabled=true", "metrics.serviceMonitor.enabled=true")],
                         ids=["cluster-wide", "namespaced", "peering", "metrics"])
def test_helm_lint_is_clean(sets: tuple[str, ...]) -> None:
    args = [a for s in sets for a in ("--set", s)]
    out = helm("lint", "--strict", str(CHART), *args).stdout
    assert "0 chart(s) failed" in out
    assert "[WARNING]" not in out and "[ERROR]" not in out, out


def test_rendered_crd_equals_the_source_and_is_kept() -> None:
    source = yaml.safe_load((ROOT / "crds" / "trainingjobs.yaml").read_text())
    (crd,) = by_kind(render(), "CustomResourceDefinition")  # no peering: no kopf CRDs
    assert crd["metadata"]["annotations"] == {"helm.sh/resource-policy": "keep"}
    assert crd["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "Helm"
    crd["metadata"] = {"name": crd["metadata"]["name"]}
    assert crd == source
    (crd,) = by_kind(render("crds.keep=false"), "CustomResourceDefinition")
    assert "annotations" not in crd["metadata"]
    assert not by_kind(render("crds.enabled=false"), "CustomResourceDefinition")


PEERING_CRDS = [d for d in yaml.safe_load_all((ROOT / "crds" / "kopfpeerings.yaml").read_text()) if d]


@pytest.mark.parametrize("sets", [("operator.peering=torpor",), ("operator.peering=torpor", "watchNamespaces={a,b}")],
                         ids=["cluster-wide", "namespaced"])
def test_peering_installs_kopfs_crds_as_written_in_crds(sets: tuple[str, ...]) -> None:
    crds = {c["metadata"]["name"]: c for c in by_kind(render(*sets), "CustomResourceDefinition")}
    assert set(crds) == {"trainingjobs.torpor.dev", "clusterkopfpeerings.kopf.dev", "kopfpeerings.kopf.dev"}
    for source in PEERING_CRDS:
        crd = crds[source["metadata"]["name"]]
        assert crd["metadata"]["annotations"] == {"helm.sh/resource-policy": "keep"}
        crd["metadata"] = {"name": crd["metadata"]["name"]}
        assert crd == source
    assert {c["spec"]["scope"] for c in PEERING_CRDS} == {"Cluster", "Namespaced"}
    for crd in PEERING_CRDS:  # kopf writes one record per replica, keyed by its identity
        status = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["status"]
        assert status["x-kubernetes-preserve-unknown-fields"] is True
    # the peering object itself is the operator's to create (Helm cannot create an object of a
    # kind its own release defines); the chart renders none
    docs = render(*sets)
    assert not [d for d in docs if d["apiVersion"].startswith("kopf.dev/")]
    kept = {c["metadata"]["name"]: c["metadata"].get("annotations") for c in
            by_kind(render(*sets, "crds.keep=false"), "CustomResourceDefinition")}
    assert len(kept) == 3 and set(kept.values()) == {None}
    assert not by_kind(render(*sets, "crds.enabled=false"), "CustomResourceDefinition")


def test_peering_rolls_updates_and_names_replicas_by_pod() -> None:
    (deploy,) = by_kind(render("operator.peering=torpor", "replicaCount=2", "operator.peeringLifetimeSeconds=20"),
                        "Deployment")
    assert deploy["spec"]["replicas"] == 2
    assert deploy["spec"]["strategy"] == {"type": "RollingUpdate",
                                          "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}}
    env = {e["name"]: e for e in deploy["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["TORPOR_PEERING"]["value"] == "torpor"
    assert env["TORPOR_PEERING_LIFETIME_SECONDS"]["value"] == "20"
    assert env["POD_ID"]["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.name"}}
    assert "TORPOR_PEERING_PRIORITY" not in env  # drawn per replica: one shared value would pause them all
    (deploy,) = by_kind(render(), "Deployment")
    env = {e["name"] for e in deploy["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert deploy["spec"]["strategy"] == {"type": "Recreate"}
    assert not env & {"TORPOR_PEERING_LIFETIME_SECONDS", "POD_ID"}


def test_cluster_wide_mode_is_one_cluster_role_with_every_rule() -> None:
    docs = render()
    assert not by_kind(docs, "Role") and not by_kind(docs, "RoleBinding")
    (role,) = by_kind(docs, "ClusterRole")
    assert rule_set(role["rules"]) == rule_set(RULES["clusterRules"] + RULES["namespacedRules"])
    (binding,) = by_kind(docs, "ClusterRoleBinding")
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "tp-torpor", "namespace": "torpor-system"}]
    (deploy,) = by_kind(docs, "Deployment")
    env = {e["name"]: e.get("value") for e in deploy["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["TORPOR_NAMESPACES"] == "" and env["TORPOR_PEERING"] == ""


def test_the_outcome_bounds_reach_the_operator() -> None:
    """The admission-retry bound and the lost-connection grace (docs/operator.md, "How a rank ended")."""
    for sets, retries, grace in (((), "5", "60"),
                                 (("operator.admissionRetries=0", "operator.peerLossGraceSeconds=0"), "0", "0")):
        (deploy,) = by_kind(render(*sets), "Deployment")
        env = {e["name"]: e.get("value") for e in deploy["spec"]["template"]["spec"]["containers"][0]["env"]}
        assert (env["TORPOR_ADMISSION_RETRIES"], env["TORPOR_PEER_LOSS_GRACE_SECONDS"]) == (retries, grace)


def test_namespaced_mode_grants_roles_only_in_the_watched_namespaces() -> None:
    docs = render("watchNamespaces={team-a,team-b}")
    (cluster_role,) = by_kind(docs, "ClusterRole")
    assert rule_set(cluster_role["rules"]) == rule_set(RULES["clusterRules"])
    roles = by_kind(docs, "Role")
    assert sorted(r["metadata"]["namespace"] for r in roles) == ["team-a", "team-b"]
    for role in roles:
        assert rule_set(role["rules"]) == rule_set(RULES["namespacedRules"])
    assert sorted(b["metadata"]["namespace"] for b in by_kind(docs, "RoleBinding")) == ["team-a", "team-b"]
    (deploy,) = by_kind(docs, "Deployment")
    env = {e["name"]: e.get("value") for e in deploy["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["TORPOR_NAMESPACES"] == "team-a,team-b"


def test_peering_adds_the_peering_rules_only_when_set() -> None:
    peering = rule_set(RULES["peeringRules"])
    (role,) = by_kind(render("operator.peering=torpor"), "ClusterRole")
    assert peering <= rule_set(role["rules"])
    (role,) = by_kind(render(), "ClusterRole")
    assert not peering & rule_set(role["rules"])


@pytest.mark.parametrize("sets", [(), ("watchNamespaces={a}", "operator.peering=p")],
                         ids=["cluster-wide", "namespaced"])
def test_no_wildcards_in_any_rule(sets: tuple[str, ...]) -> None:
    docs = render(*sets)
    for doc in by_kind(docs, "ClusterRole") + by_kind(docs, "Role"):
        for group, resource, verb in rule_set(doc["rules"]):
            assert "*" not in (group, resource, verb), doc
        assert all("nonResourceURLs" not in r and "resourceNames" not in r for r in doc["rules"])


def test_deployment_is_locked_down_and_probed() -> None:
    (deploy,) = by_kind(render(), "Deployment")
    pod = deploy["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert container["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    assert container["command"] == ["python", "-m", "torpor_operator"]
    assert container["resources"]["requests"] and container["resources"]["limits"]
    probe = container["livenessProbe"]["httpGet"]
    assert probe["path"] == "/healthz"
    port = {p["name"]: p["containerPort"] for p in container["ports"]}[probe["port"]]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["TORPOR_HEALTH_PORT"] == str(port) == "8080"
    assert deploy["spec"]["strategy"]["type"] == "Recreate"


def test_metrics_service_and_service_monitor() -> None:
    docs = render("metrics.service.enabled=true", "metrics.serviceMonitor.enabled=true",
                  "metrics.serviceMonitor.labels.release=prom")
    (service,) = by_kind(docs, "Service")
    assert service["spec"]["ports"][0]["targetPort"] == "metrics"
    (monitor,) = by_kind(docs, "ServiceMonitor")
    assert monitor["metadata"]["labels"]["release"] == "prom"
    assert not by_kind(render(), "Service") and not by_kind(render(), "ServiceMonitor")


@pytest.mark.parametrize("bad, field", [("operator.logFormat=xml", "logFormat"),
                                        ("operator.metricsPort=70000", "metricsPort"),
                                        ("operator.healthPorts=1", "healthPorts"),
                                        ("watchNamespaces={Team_A}", "watchNamespaces"),
                                        ("operator.peeringLifetimeSeconds=4", "peeringLifetimeSeconds")])
def test_the_generated_schema_rejects_bad_values(bad: str, field: str) -> None:
    proc = helm("template", "tp", str(CHART), "--set", bad, check=False)
    assert proc.returncode != 0
    assert field in proc.stderr


def test_every_value_is_documented_in_the_schema() -> None:
    schema = json.loads((CHART / "values.schema.json").read_text())

    def leaves(node: dict[str, Any], path: str) -> list[tuple[str, dict[str, Any]]]:
        if "properties" in node:
            return [leaf for k, v in node["properties"].items() for leaf in leaves(v, f"{path}.{k}".lstrip("."))]
        return [(path, node)]

    found = leaves(schema, "")
    assert len(found) > 30
    assert [path for path, node in found if len(node.get("description", "")) < 10] == []


def test_generated_copies_are_up_to_date() -> None:
    proc = subprocess.run([sys.executable, str(ROOT / "hack" / "generate.py"), "--check"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr


def test_the_check_names_the_command_when_a_copy_is_stale(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    stale = tmp_path / "values.schema.json"
    stale.write_text("{}\n")
    real = generate.outputs()
    monkeypatch.setattr(generate, "outputs", lambda: {stale: real[generate.CHART / "values.schema.json"]})
    monkeypatch.setattr(generate, "ROOT", tmp_path)
    assert generate.main(["--check"]) == 1
    assert "run `make generate`" in capsys.readouterr().err
    assert stale.read_text() == "{}\n"


def test_a_value_without_a_description_is_refused() -> None:
    with pytest.raises(generate.GenerateError, match="undocumented has no description"):
        generate.values_schema("# The first.\nfirst: 1\nundocumented: 2\n")


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_hadolint_is_clean(dockerfile: Path) -> None:
    hadolint = Path(sys.executable).parent / "hadolint"
    proc = subprocess.run([str(hadolint), "--failure-threshold", "info", str(dockerfile)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_operator_image_has_no_torch_and_runs_as_non_root() -> None:
    text = (ROOT / "Dockerfile").read_text()
    assert '".[operator]"' in text and "[torch" not in text and "torch==" not in text
    assert "find_spec('torch') is None" in text, "the build itself proves torch is absent"
    assert "USER 10001" in text
    assert 'ENTRYPOINT ["python", "-m", "torpor_operator"]' in text
    assert text.count("FROM ") >= 2 and "slim" in text


def readme_commands(prefix: str) -> list[list[str]]:
    """Shell commands of the README's code blocks that start with ``prefix``, continuation lines joined."""
    import shlex

    text = (ROOT / "README.md").read_text().replace("\\\n", " ")
    return [shlex.split(line.split("#", 1)[0]) for line in text.splitlines() if line.startswith(prefix)]


def test_the_readme_quickstart_helm_install_renders_with_the_built_images() -> None:
    (install,) = readme_commands("helm install torpor charts/torpor")
    args = [a for a in install[4:] if a != "--wait"]
    docs = [d for d in yaml.safe_load_all(helm("template", "torpor", str(CHART), *args).stdout) if d]
    (deploy,) = by_kind(docs, "Deployment")
    image = deploy["spec"]["template"]["spec"]["containers"][0]["image"]
    builds = {cmd[cmd.index("-t") + 1] for cmd in readme_commands("docker build")}
    assert image in builds
    (load,) = readme_commands("kind load docker-image")
    assert set(load[3:-2]) == builds
    job = yaml.safe_load((ROOT / "examples" / "demo" / "trainingjob.yaml").read_text())
    assert job["spec"]["template"]["spec"]["containers"][0]["image"] in builds
    env = {e["name"]: e.get("value") for e in deploy["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["AWS_ENDPOINT_URL"] == job["spec"]["checkpoint"]["endpoint"]


#: Settings the chart deliberately does not expose, with why.
NOT_IN_CHART = {
    # One priority shared by every replica pauses them all (kopf pauses on equal priorities);
    # each replica draws its own at start-up (values.yaml, operator.peering).
    "TORPOR_PEERING_PRIORITY",
}


def test_every_operator_setting_reaches_the_operator_with_its_default() -> None:
    """A setting added to OperatorSettings is settable through the chart, and the chart's default
    is the operator's own, so `helm install` with no values runs what docs/operator.md describes."""
    import dataclasses

    from torpor_operator.settings import OperatorSettings

    # Two variables are rendered only when their value is set (an empty list keeps the operator's
    # taints; the peering lifetime means something only with peering): set both.
    (deploy,) = by_kind(render("operator.peering=torpor", "operator.terminationTaints={example.com/going}"),
                        "Deployment")
    env = {e["name"]: e.get("value") for e in deploy["spec"]["template"]["spec"]["containers"][0]["env"]}
    missing, differing = [], []
    for f in dataclasses.fields(OperatorSettings):
        var = f.metadata["env"]
        if var in NOT_IN_CHART:
            continue
        if var not in env:
            missing.append(var)
            continue
        numeric = isinstance(f.default, int | float) and not isinstance(f.default, bool)
        if numeric and float(env[var]) != float(f.default):
            differing.append(f"{var}: chart {env[var]!r}, operator {f.default!r}")
    assert not missing, f"settings the chart cannot set: {missing}"
    assert not differing, f"chart defaults that differ from the operator's: {differing}"
