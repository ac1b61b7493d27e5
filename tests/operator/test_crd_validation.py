"""The CRD against the real API server: valid TrainingJobs accepted with the model's defaults,
invalid ones rejected with a message that names the field (asserted)."""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest
import yaml

from controlplane import ControlPlane
from torpor_operator.spec import parse_spec

pytestmark = pytest.mark.cluster


def job(name: str = "demo", **spec: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "apiVersion": "torpor.dev/v1alpha1",
        "kind": "TrainingJob",
        "metadata": {"name": name},
        "spec": {
            "template": {"spec": {"containers": [{"name": "train", "image": "python:3.11"}]}},
            "checkpoint": {"uri": "s3://bucket/runs"},
        },
    }
    body["spec"].update(spec)
    return body


def with_checkpoint(**fields: Any) -> dict[str, Any]:
    return job(checkpoint={"uri": "s3://bucket/runs", **fields})


def create(cp: ControlPlane, ns: str, body: dict[str, Any], *, dry_run: bool = False, check: bool = True):
    args = ["create", "-n", ns, "-f", "-", "-o", "json"]
    if dry_run:
        args.append("--dry-run=server")
    return cp.kubectl(*args, input=json.dumps(body), check=check)


def test_a_minimal_job_gets_the_models_defaults(control_plane: ControlPlane, trainingjob_crd: str,
                                                namespace: str) -> None:
    created = json.loads(create(control_plane, namespace, job()).stdout)
    spec = created["spec"]
    assert spec["replicas"] == 1
    assert spec["maxRestarts"] == 3 and spec["suspend"] is False
    assert spec["gracefulExit"] == {"signal": "SIGTERM", "terminationGracePeriodSeconds": 120,
                                    "drainProtection": False, "exitDeadlineSeconds": 60}
    assert spec["checkpoint"] == {"uri": "s3://bucket/runs", "asyncSave": False, "deleteOnJobDeletion": False}
    # the server's defaults and the model's defaults are the same
    assert parse_spec(spec) == parse_spec(job()["spec"])


def test_a_full_job_is_accepted_and_round_trips(control_plane: ControlPlane, trainingjob_crd: str,
                                                namespace: str) -> None:
    body = job(
        "full", replicas=4, containerName="train", maxRestarts=0, suspend=True,
        template={"metadata": {"labels": {"team": "ml"}},
                  "spec": {"restartPolicy": "Never", "nodeSelector": {"pool": "spot"},
                           "containers": [{"name": "train", "image": "python:3.11", "resources": {}},
                                          {"name": "sidecar", "image": "busybox"}]}},
        checkpoint={"uri": "s3://bucket/runs/", "endpoint": "http://minio:9000", "credentialsSecret": "creds",
                    "saveSeconds": 600, "keepPerNMinutes": 60, "asyncSave": True, "deleteOnJobDeletion": True,
                    "encryption": {"mode": "SM4-CBC", "keySecret": "k"}},
        gracefulExit={"signal": "SIGUSR1", "terminationGracePeriodSeconds": 30, "drainProtection": True,
                      "exitDeadlineSeconds": 5},
    )
    created = json.loads(create(control_plane, namespace, body).stdout)
    assert created["spec"]["template"]["spec"]["nodeSelector"] == {"pool": "spot"}  # not pruned
    assert created["spec"]["checkpoint"]["encryption"] == {"mode": "SM4-CBC", "keySecret": "k", "keySecretKey": "key"}
    assert parse_spec(created["spec"]) == parse_spec(body["spec"])


def test_an_elastic_job_gets_the_models_defaults(control_plane: ControlPlane, trainingjob_crd: str,
                                                 namespace: str) -> None:
    body = job("stretchy", replicas=3, elastic={"minReplicas": 2})
    created = json.loads(create(control_plane, namespace, body).stdout)
    assert created["spec"]["elastic"] == {"minReplicas": 2, "waitSeconds": 60, "growIntervalSeconds": 600}
    assert parse_spec(created["spec"]) == parse_spec(body["spec"])
    # the bounds themselves are allowed: minReplicas == replicas, waitSeconds just below the startup timeout
    edge = job("edge", replicas=2, startupTimeoutSeconds=30,
               elastic={"minReplicas": 2, "waitSeconds": 29, "growIntervalSeconds": 10})
    create(control_plane, namespace, edge, dry_run=True)


INVALID: list[tuple[str, dict[str, Any], list[str]]] = [
    ("replicas-zero", job(replicas=0), ["spec.replicas", "greater than or equal to 1"]),
    ("replicas-too-many", job(replicas=5000), ["spec.replicas", "less than or equal to 1024"]),
    ("replicas-string", job(replicas="two"), ["spec.replicas", "integer"]),
    ("max-restarts-negative", job(maxRestarts=-1), ["spec.maxRestarts"]),
    ("no-checkpoint", {**job(), "spec": {"template": job()["spec"]["template"]}}, ["spec.checkpoint", "Required"]),
    ("no-template", {**job(), "spec": {"checkpoint": {"uri": "s3://bucket/x"}}}, ["spec.template", "Required"]),
    ("uri-not-s3", with_checkpoint(uri="gs://bucket/x"), ["spec.checkpoint.uri", "must be s3://"]),
    ("uri-bad-bucket", with_checkpoint(uri="s3://B/x"), ["spec.checkpoint.uri", "valid bucket name"]),
    ("endpoint-not-url", with_checkpoint(endpoint="minio:9000"), ["spec.checkpoint.endpoint", "http://"]),
    ("steps-and-seconds", with_checkpoint(saveSteps=10, saveSeconds=60),
     ["spec.checkpoint.saveSeconds", "saveSteps and spec.checkpoint.saveSeconds are exclusive"]),
    ("keep-max-and-window", with_checkpoint(keepMax=3, keepPerNMinutes=60),
     ["spec.checkpoint.keepPerNMinutes", "keepMax and spec.checkpoint.keepPerNMinutes are exclusive"]),
    ("save-steps-zero", with_checkpoint(saveSteps=0), ["spec.checkpoint.saveSteps"]),
    ("cipher-unknown", with_checkpoint(encryption={"mode": "DES", "keySecret": "k"}),
     ["spec.checkpoint.encryption.mode", "Unsupported value"]),
    ("cipher-without-key", with_checkpoint(encryption={"mode": "AES-GCM"}),
     ["spec.checkpoint.encryption.keySecret", "Required"]),
    ("signal-kill", job(gracefulExit={"signal": "SIGKILL"}), ["spec.gracefulExit.signal", "Unsupported value"]),
    ("grace-zero", job(gracefulExit={"terminationGracePeriodSeconds": 0}),
     ["spec.gracefulExit.terminationGracePeriodSeconds"]),
    ("two-containers-no-name",
     job(template={"spec": {"containers": [{"name": "a", "image": "x"}, {"name": "b", "image": "x"}]}}),
     ["spec.containerName", "must name one of spec.template.spec.containers"]),
    ("container-name-unknown", job(containerName="other"),
     ["spec.containerName", "must name one of spec.template.spec.containers"]),
    ("no-containers", job(template={"spec": {"containers": []}}), ["spec.template.spec.containers"]),
    ("container-without-name", job(template={"spec": {"containers": [{"image": "x"}]}}),
     ["spec.template.spec.containers[0].name", "Required"]),
    ("restart-policy", job(template={"spec": {"restartPolicy": "OnFailure", "containers": [{"name": "t"}]}}),
     ["spec.template.spec.restartPolicy", "must be Never"]),
    ("name-with-dot", job("a.b"), ["metadata.name must be a DNS-1035 label"]),
    ("name-too-long", job("a" * 41), ["metadata.name must be a DNS-1035 label", "at most 40"]),
    ("unknown-field-rejected-by-strict-validation", job(replica=2), ["spec.replica", "unknown field"]),
    ("elastic-without-min-replicas", job(replicas=3, elastic={"waitSeconds": 30}),
     ["spec.elastic.minReplicas", "Required"]),
    ("elastic-min-replicas-zero", job(replicas=3, elastic={"minReplicas": 0}),
     ["spec.elastic.minReplicas", "greater than or equal to 1"]),
    ("elastic-min-replicas-above-replicas", job(replicas=2, elastic={"minReplicas": 3}),
     ["spec.elastic.minReplicas", "must be at most spec.replicas; got minReplicas 3 and replicas 2"]),
    ("elastic-min-replicas-above-default-replicas", job(elastic={"minReplicas": 2}),
     ["spec.elastic.minReplicas", "got minReplicas 2 and replicas 1"]),
    ("elastic-wait-not-below-startup-timeout", job(replicas=2, elastic={"minReplicas": 1, "waitSeconds": 600}),
     ["spec.elastic.waitSeconds", "must be less than spec.startupTimeoutSeconds",
      "got waitSeconds 600 and startupTimeoutSeconds 600"]),
    ("ttl-negative", job(ttlSecondsAfterFinished=-1),
     ["spec.ttlSecondsAfterFinished", "greater than or equal to 0"]),
    ("elastic-grow-interval-too-short", job(replicas=2, elastic={"minReplicas": 1, "growIntervalSeconds": 5}),
     ["spec.elastic.growIntervalSeconds", "greater than or equal to 10"]),
]


@pytest.mark.parametrize(("case", "body", "fragments"), INVALID, ids=[c[0] for c in INVALID])
def test_invalid_jobs_are_rejected_naming_the_field(control_plane: ControlPlane, trainingjob_crd: str,
                                                    namespace: str, case: str, body: dict[str, Any],
                                                    fragments: list[str]) -> None:
    result = create(control_plane, namespace, copy.deepcopy(body), dry_run=True, check=False)
    assert result.returncode != 0, f"{case} was accepted"
    for fragment in fragments:
        assert fragment in result.stderr, f"{case}: {fragment!r} not in {result.stderr!r}"


def test_the_checkpoint_uri_cannot_change(control_plane: ControlPlane, trainingjob_crd: str, namespace: str) -> None:
    create(control_plane, namespace, job("moving"))
    result = control_plane.kubectl("patch", "-n", namespace, "tj", "moving", "--type=merge", "-p",
                                   json.dumps({"spec": {"checkpoint": {"uri": "s3://other/runs"}}}), check=False)
    assert result.returncode != 0
    assert "spec.checkpoint.uri is immutable" in result.stderr
    # other fields still change
    control_plane.kubectl("patch", "-n", namespace, "tj", "moving", "--type=merge", "-p",
                          json.dumps({"spec": {"suspend": True, "maxRestarts": 5}}))


def test_replicas_changes_on_a_live_job_within_elastic_min_replicas(control_plane: ControlPlane,
                                                                    trainingjob_crd: str, namespace: str) -> None:
    """A change of ``spec.replicas`` is a resize (the operator saves and restarts with it), so the
    API server takes it, with ``kubectl patch`` and ``kubectl apply``; only below
    ``elastic.minReplicas`` is it refused, the message naming both values."""
    create(control_plane, namespace, job("sized", replicas=2))
    control_plane.kubectl("patch", "-n", namespace, "tj", "sized", "--type=merge", "-p",
                          json.dumps({"spec": {"replicas": 3}}))
    control_plane.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(job("sized", replicas=4)))
    got = json.loads(control_plane.kubectl("get", "-n", namespace, "tj", "sized", "-o", "json").stdout)
    assert got["spec"]["replicas"] == 4

    create(control_plane, namespace, job("stretchy", replicas=3, elastic={"minReplicas": 2}))
    control_plane.kubectl("patch", "-n", namespace, "tj", "stretchy", "--type=merge", "-p",
                          json.dumps({"spec": {"replicas": 2}}))
    result = control_plane.kubectl("patch", "-n", namespace, "tj", "stretchy", "--type=merge", "-p",
                                   json.dumps({"spec": {"replicas": 1}}), check=False)
    assert result.returncode != 0, "replicas below elastic.minReplicas was accepted"
    assert "spec.elastic.minReplicas must be at most spec.replicas; got minReplicas 2 and replicas 1" in \
        result.stderr, result.stderr
    # both together go through
    control_plane.kubectl("patch", "-n", namespace, "tj", "stretchy", "--type=merge", "-p",
                          json.dumps({"spec": {"replicas": 1, "elastic": {"minReplicas": 1}}}))


def test_status_is_a_subresource_and_printer_columns_show(control_plane: ControlPlane, trainingjob_crd: str,
                                                         namespace: str) -> None:
    create(control_plane, namespace, job("shown", replicas=2))
    status = {"status": {"phase": "Running", "ready": "2/2", "restarts": 1, "preemptions": 2, "readyReplicas": 2,
                         "incarnation": 3, "resumeFrom": "CKP-1_40", "worldSize": 2, "nextWorldSize": 1,
                         "lastResizeTime": "2026-01-01T00:00:00Z",
                         "lastCheckpoint": {"name": "CKP-1_40", "step": 40, "time": "2026-01-01T00:00:00Z"}}}
    # a patch of the main resource does not touch status ...
    control_plane.kubectl("patch", "-n", namespace, "tj", "shown", "--type=merge", "-p", json.dumps(status))
    got = json.loads(control_plane.kubectl("get", "-n", namespace, "tj", "shown", "-o", "json").stdout)
    assert "phase" not in got.get("status", {})
    # ... the status subresource does, and an unknown status field is pruned
    status["status"]["kopf"] = {"progress": {}}
    control_plane.kubectl("patch", "-n", namespace, "tj", "shown", "--subresource=status", "--type=merge",
                          "-p", json.dumps(status))
    got = json.loads(control_plane.kubectl("get", "-n", namespace, "tj", "shown", "-o", "json").stdout)
    assert got["status"]["phase"] == "Running" and "kopf" not in got["status"]
    table = control_plane.kubectl("get", "-n", namespace, "tj", "-o", "wide").stdout.splitlines()
    header = table[0].split()
    assert header[:8] == ["NAME", "PHASE", "READY", "WORLD-SIZE", "RESTARTS", "PREEMPTIONS", "STEP", "CHECKPOINT"]
    assert "INCARNATION" in header and "RESUME-FROM" in header and header[-1] == "AGE"
    row = dict(zip(header, table[1].split(), strict=False))
    assert (row["PHASE"], row["READY"], row["WORLD-SIZE"], row["RESTARTS"], row["PREEMPTIONS"], row["STEP"]) == (
        "Running", "2/2", "2", "1", "2", "40")
    assert got["status"]["nextWorldSize"] == 1 and got["status"]["lastResizeTime"] == "2026-01-01T00:00:00Z"
    assert row["RESUME-FROM"] == "CKP-1_40"


def test_the_short_name_and_category_work(control_plane: ControlPlane, trainingjob_crd: str) -> None:
    resources = control_plane.kubectl("api-resources", "--api-group=torpor.dev", "-o", "wide").stdout
    assert "tj" in resources and "torpor" in resources
    assert yaml.safe_load(control_plane.kubectl("get", "crd", trainingjob_crd, "-o", "yaml").stdout)[
        "spec"]["names"]["shortNames"] == ["tj"]
