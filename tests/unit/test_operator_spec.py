"""The spec model: defaults like the API server's, and errors that name the field and the value."""

from __future__ import annotations

from typing import Any

import pytest

from torpor_operator.reconciling import Job
from torpor_operator.spec import DEFAULT_KEEP_MAX, SpecError, check_job_name, parse_spec

CONTAINER = {"name": "train", "image": "python:3.11"}


def spec(**overrides: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "template": {"spec": {"containers": [dict(CONTAINER)]}},
        "checkpoint": {"uri": "s3://bucket/prefix"},
    }
    base.update(overrides)
    return base


def test_defaults_are_the_crd_defaults() -> None:
    s = parse_spec(spec())
    assert s.replicas == 1
    assert s.max_restarts == 3
    assert s.suspend is False
    assert s.container_name is None and s.training_container == "train"
    g = s.graceful_exit
    assert (g.signal, g.termination_grace_period_seconds, g.drain_protection, g.exit_deadline_seconds) == (
        "SIGTERM", 120, False, 60)
    c = s.checkpoint
    assert (c.save_steps, c.save_seconds, c.keep_max, c.keep_per_n_minutes) == (None, None, None, None)
    assert (c.async_save, c.delete_on_job_deletion, c.encryption) == (False, False, None)
    assert c.effective_keep_max == DEFAULT_KEEP_MAX


def test_a_full_spec_parses() -> None:
    s = parse_spec(spec(
        replicas=4, containerName="train", maxRestarts=0, suspend=True,
        template={"spec": {"containers": [dict(CONTAINER), {"name": "sidecar", "image": "busybox"}]}},
        checkpoint={"uri": "s3://bkt/p/", "endpoint": "http://minio:9000", "credentialsSecret": "creds",
                    "saveSeconds": 600, "keepPerNMinutes": 60, "asyncSave": True, "deleteOnJobDeletion": True,
                    "encryption": {"mode": "SM4-CBC", "keySecret": "k"}},
        gracefulExit={"signal": "SIGUSR1", "terminationGracePeriodSeconds": 30, "drainProtection": True,
                      "exitDeadlineSeconds": 5},
    ))
    assert s.replicas == 4 and s.training_container == "train"
    assert s.checkpoint.encryption is not None and s.checkpoint.encryption.key_secret_key == "key"
    assert s.checkpoint.effective_keep_max == 0
    assert s.checkpoint.job_uri("ns", "job") == "s3://bkt/p/ns/job"
    assert s.graceful_exit.drain_protection


def test_elastic_is_off_by_default_and_takes_the_crd_defaults() -> None:
    assert parse_spec(spec()).elastic is None
    e = parse_spec(spec(replicas=3, elastic={"minReplicas": 2})).elastic
    assert e is not None and (e.min_replicas, e.wait_seconds, e.grow_interval_seconds) == (2, 60, 600)
    # waitSeconds only has to stay below the job's own startup timeout
    assert parse_spec(spec(startupTimeoutSeconds=20, elastic={"minReplicas": 1, "waitSeconds": 19})).elastic


def test_the_template_is_read_only() -> None:
    s = parse_spec(spec())
    with pytest.raises(TypeError):
        s.template["spec"] = {}  # type: ignore[index]


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ({"replicas": 0}, "spec.replicas must be >= 1, got 0"),
        ({"replicas": 1025}, "spec.replicas must be <= 1024, got 1025"),
        ({"replicas": "2"}, "spec.replicas must be an integer, got '2'"),
        ({"replicas": True}, "spec.replicas must be an integer, got True"),
        ({"maxRestarts": -1}, "spec.maxRestarts must be >= 0, got -1"),
        ({"procsPerPod": 0}, "spec.procsPerPod must be >= 1, got 0"),
        ({"procsPerPod": 65}, "spec.procsPerPod must be <= 64, got 65"),
        ({"suspend": "yes"}, "spec.suspend must be true or false, got 'yes'"),
        ({"containerName": ""}, "spec.containerName must be at least 1 characters long, got ''"),
        ({"containerName": "other"}, "spec.containerName must name one of spec.template.spec.containers ['train'], "
                                     "got 'other'"),
        ({"template": {"spec": {"containers": [dict(CONTAINER), {"name": "b"}]}}},
         "spec.containerName must name one of spec.template.spec.containers when the template has more than one"),
        ({"template": {"spec": {"containers": []}}}, "spec.template.spec.containers must be a non-empty list"),
        ({"template": {}}, "spec.template.spec must be an object, got None"),
        ({"template": {"spec": {"containers": [CONTAINER], "restartPolicy": "OnFailure"}}},
         "spec.template.spec.restartPolicy must be Never or left out"),
        ({"template": "pod"}, "spec.template must be an object, got 'pod'"),
        ({"checkpoint": {}}, "spec.checkpoint.uri is required"),
        ({"checkpoint": {"uri": "gs://b/p"}}, "spec.checkpoint.uri must be s3://<bucket>[/<prefix>]"),
        ({"checkpoint": {"uri": "s3://B/p"}}, "got 's3://B/p'"),
        ({"checkpoint": {"uri": "s3://bkt/p", "endpoint": "minio:9000"}},
         "spec.checkpoint.endpoint must be an http:// or https:// URL, got 'minio:9000'"),
        ({"checkpoint": {"uri": "s3://bkt/p", "saveSteps": 1, "saveSeconds": 1}},
         "spec.checkpoint.saveSteps and spec.checkpoint.saveSeconds are exclusive"),
        ({"checkpoint": {"uri": "s3://bkt/p", "keepMax": 1, "keepPerNMinutes": 1}},
         "spec.checkpoint.keepMax and spec.checkpoint.keepPerNMinutes are exclusive"),
        ({"checkpoint": {"uri": "s3://bkt/p", "saveSteps": 0}}, "spec.checkpoint.saveSteps must be >= 1, got 0"),
        ({"checkpoint": {"uri": "s3://bkt/p", "keepMax": 10001}},
         "spec.checkpoint.keepMax must be <= 10000, got 10001"),
        ({"checkpoint": {"uri": "s3://bkt/p", "encryption": {"mode": "AES-GCM"}}},
         "spec.checkpoint.encryption.keySecret is required"),
        ({"checkpoint": {"uri": "s3://bkt/p", "encryption": {"keySecret": "k", "mode": "DES"}}},
         "spec.checkpoint.encryption.mode must be one of ['AES-GCM', 'AES-CBC', 'SM4-CBC'], got 'DES'"),
        ({"gracefulExit": {"signal": "SIGKILL"}}, "spec.gracefulExit.signal must be one of"),
        ({"gracefulExit": {"terminationGracePeriodSeconds": 0}},
         "spec.gracefulExit.terminationGracePeriodSeconds must be >= 1, got 0"),
        ({"gracefulExit": {"exitDeadlineSeconds": 86401}}, "spec.gracefulExit.exitDeadlineSeconds must be <= 86400"),
        ({"gracefulExit": {"drainProtection": 1}}, "spec.gracefulExit.drainProtection must be true or false, got 1"),
        ({"elastic": {}}, "spec.elastic.minReplicas is required"),
        ({"elastic": {"minReplicas": 0}}, "spec.elastic.minReplicas must be >= 1, got 0"),
        ({"replicas": 2, "elastic": {"minReplicas": 3}},
         "spec.elastic.minReplicas must be at most spec.replicas; got minReplicas 3 and replicas 2"),
        ({"elastic": {"minReplicas": 1, "waitSeconds": 600}},
         "spec.elastic.waitSeconds must be less than spec.startupTimeoutSeconds (past it a rank that cannot start "
         "is a failure); got waitSeconds 600 and startupTimeoutSeconds 600"),
        ({"elastic": {"minReplicas": 1, "growIntervalSeconds": 5}},
         "spec.elastic.growIntervalSeconds must be >= 10, got 5"),
        ({"elastic": {"minReplicas": 1, "min": 1}}, "spec.elastic has unknown fields ['min']"),
        ({"replica": 2}, "spec has unknown fields ['replica']"),
        ({"checkpoint": {"uri": "s3://bkt/p", "keep": 2}}, "spec.checkpoint has unknown fields ['keep']"),
    ],
)
def test_errors_name_the_field_and_the_value(overrides: dict[str, Any], expected: str) -> None:
    with pytest.raises(SpecError) as info:
        parse_spec(spec(**overrides))
    assert expected in str(info.value)


def test_a_missing_template_is_named() -> None:
    with pytest.raises(SpecError, match=r"spec\.template is required"):
        parse_spec({"checkpoint": {"uri": "s3://bkt/p"}})


def test_nulls_read_as_unset() -> None:
    s = parse_spec(spec(containerName=None, checkpoint={"uri": "s3://bkt/p", "saveSteps": None}))
    assert s.container_name is None and s.checkpoint.save_steps is None


@pytest.mark.parametrize("name", ["a", "demo", "job-1", "a" * 40])
def test_job_names_that_fit_in_hostnames(name: str) -> None:
    check_job_name(name)


@pytest.mark.parametrize("name", ["", "1job", "Job", "job-", "a" * 41, "job.x"])
def test_job_names_that_do_not(name: str) -> None:
    with pytest.raises(SpecError, match=r"metadata\.name must be a DNS-1035 label .* got"):
        check_job_name(name)


def test_job_from_dict_checks_the_name_and_the_spec() -> None:
    body = {"metadata": {"name": "Bad", "namespace": "n", "uid": "u"}, "spec": spec()}
    with pytest.raises(SpecError, match=r"metadata\.name"):
        Job.from_dict(body)
    body["metadata"]["name"] = "good"
    job = Job.from_dict(body)
    assert (job.ref.key, job.generation, job.status.phase) == ("n/good", 0, None)
