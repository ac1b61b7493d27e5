"""Which endpoint and keys the operator uses for a job's store (issue 12, item 15)."""

from __future__ import annotations

import base64
from typing import Any

import pytest

from torpor_operator.credentials import CredentialsError, job_access, unreadable
from torpor_operator.spec import CheckpointSpec


def secret(version: str = "7", **data: str) -> dict[str, Any]:
    return {"metadata": {"name": "s3", "namespace": "team", "resourceVersion": version},
            "data": {k: base64.b64encode(v.encode()).decode() for k, v in data.items()}}


KEYS = {"AWS_ACCESS_KEY_ID": "tenant-a", "AWS_SECRET_ACCESS_KEY": "sekret"}


def test_the_jobs_endpoint_and_secret_win_over_the_operators_own() -> None:
    spec = CheckpointSpec(uri="s3://bucket/runs", endpoint="http://store-b:9000", credentials_secret="s3")
    access = job_access(spec, "team", secret(**KEYS), default_endpoint="http://operator-store:9000")
    assert access.endpoint == "http://store-b:9000"
    assert access.credentials == ("tenant-a", "sekret")
    assert access.secret == ("team", "s3", "7")
    assert "sekret" not in repr(access) and "sekret" not in repr(access.cache_key)


def test_a_rotated_secret_is_another_client() -> None:
    spec = CheckpointSpec(uri="s3://bucket/runs", credentials_secret="s3")
    before = job_access(spec, "team", secret("7", **KEYS), None)
    after = job_access(spec, "team", secret("8", **{**KEYS, "AWS_SECRET_ACCESS_KEY": "new"}), None)
    assert before.cache_key != after.cache_key


def test_a_job_naming_no_secret_uses_the_operators_credentials_and_its_own_endpoint_if_any() -> None:
    own = job_access(CheckpointSpec(uri="s3://bucket/runs"), "team", None, "http://operator-store:9000")
    assert (own.endpoint, own.secret, own.credentials) == ("http://operator-store:9000", None, None)
    theirs = job_access(CheckpointSpec(uri="s3://bucket/runs", endpoint="http://b:9000"), "team", None, None)
    assert (theirs.endpoint, theirs.credentials) == ("http://b:9000", None)


def test_a_missing_secret_is_refused_never_replaced_by_the_operators_keys() -> None:
    spec = CheckpointSpec(uri="s3://bucket/runs", credentials_secret="absent-s3")
    with pytest.raises(CredentialsError) as caught:
        job_access(spec, "team", None, "http://operator-store:9000")
    assert caught.value.reason == "CredentialsSecretMissing"
    assert '"absent-s3"' in caught.value.message and "namespace team" in caught.value.message


@pytest.mark.parametrize("data", [{"AWS_ACCESS_KEY_ID": "a"}, {"AWS_SECRET_ACCESS_KEY": "b"},
                                  {"AWS_ACCESS_KEY_ID": "", "AWS_SECRET_ACCESS_KEY": "b"}])
def test_a_secret_without_both_keys_is_refused_naming_the_key(data: dict[str, str]) -> None:
    spec = CheckpointSpec(uri="s3://bucket/runs", credentials_secret="s3")
    with pytest.raises(CredentialsError) as caught:
        job_access(spec, "team", secret(**data), None)
    assert caught.value.reason == "CredentialsSecretInvalid"
    missing = next(k for k in KEYS if not data.get(k))
    assert missing in caught.value.message and '"s3"' in caught.value.message


def test_a_secret_with_bad_base64_is_refused() -> None:
    spec = CheckpointSpec(uri="s3://bucket/runs", credentials_secret="s3")
    body = {"metadata": {}, "data": {"AWS_ACCESS_KEY_ID": "!!!", "AWS_SECRET_ACCESS_KEY": "c2Vj"}}
    with pytest.raises(CredentialsError, match="AWS_ACCESS_KEY_ID"):
        job_access(spec, "team", body, None)


def test_an_unreadable_secret_says_why() -> None:
    spec = CheckpointSpec(uri="s3://bucket/runs", credentials_secret="s3")
    error = unreadable(spec, "team", 'secrets "s3" is forbidden')
    assert error.reason == "CredentialsSecretUnreadable" and "is forbidden" in error.message


def test_the_bucket_keeps_one_client_per_secret_version_and_reads_the_secret_every_pass(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from torpor_operator.bucket import Bucket
    from torpor_operator.naming import JobRef
    from torpor_operator.spec import parse_spec

    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    versions = iter(["7", "7", "8"])
    reads: list[tuple[str, str]] = []

    def read(namespace: str, name: str) -> dict[str, Any]:
        reads.append((namespace, name))
        return secret(next(versions), **KEYS)

    bucket = Bucket(1.0, secrets=read)
    spec = parse_spec({"replicas": 1, "template": {"spec": {"containers": [{"name": "t", "image": "i"}]}},
                       "checkpoint": {"uri": "s3://bucket/runs", "endpoint": "http://b:9000",
                                      "credentialsSecret": "s3"}})
    job = JobRef("mlp", "team", "uid")
    first = bucket._client(bucket.access(spec, job))
    assert bucket._client(bucket.access(spec, job)) is first  # the same version: the same client
    rotated = bucket._client(bucket.access(spec, job))
    assert rotated is not first and len(bucket._clients) == 1  # the old version's client is gone
    assert reads == [("team", "s3")] * 3
    assert rotated.meta.endpoint_url == "http://b:9000"
    assert rotated._request_signer._credentials.access_key == "tenant-a"
