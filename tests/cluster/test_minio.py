"""MinIO as the tests' S3: a boto3 round trip, and a server that only listens on loopback."""

from __future__ import annotations

import ipaddress
import os

import boto3
import pytest
from botocore.exceptions import ClientError

from processes import descendants, listening_addresses
from s3server import MinioServer


def test_boto3_put_get_list_delete_round_trip(s3_bucket: str) -> None:
    s3 = boto3.client("s3")  # reaches MinIO through AWS_ENDPOINT_URL, as a user's script would
    assert os.environ["AWS_ENDPOINT_URL"].startswith("http://127.0.0.1:")
    body = os.urandom(3 * 1024 * 1024 + 17)
    s3.put_object(Bucket=s3_bucket, Key="run/rank_0/CKP-1_10.ckpt", Body=body)
    s3.put_object(Bucket=s3_bucket, Key="run/rank_1/CKP-1_10.ckpt", Body=b"x")

    assert s3.get_object(Bucket=s3_bucket, Key="run/rank_0/CKP-1_10.ckpt")["Body"].read() == body
    listed = s3.list_objects_v2(Bucket=s3_bucket, Prefix="run/")
    assert sorted(o["Key"] for o in listed["Contents"]) == ["run/rank_0/CKP-1_10.ckpt", "run/rank_1/CKP-1_10.ckpt"]

    deleted = s3.delete_objects(Bucket=s3_bucket, Delete={"Objects": [{"Key": "run/rank_0/CKP-1_10.ckpt"}]})
    assert [d["Key"] for d in deleted["Deleted"]] == ["run/rank_0/CKP-1_10.ckpt"]
    with pytest.raises(ClientError) as err:
        s3.head_object(Bucket=s3_bucket, Key="run/rank_0/CKP-1_10.ckpt")
    assert err.value.response["Error"]["Code"] == "404"
    assert s3.list_objects_v2(Bucket=s3_bucket, Prefix="run/")["KeyCount"] == 1


def test_each_bucket_is_fresh(s3_bucket: str) -> None:
    assert boto3.client("s3").list_objects_v2(Bucket=s3_bucket)["KeyCount"] == 0


def test_minio_listens_only_on_loopback(minio: MinioServer) -> None:
    assert minio.pid is not None
    addresses = listening_addresses(descendants(minio.pid))
    assert ("127.0.0.1", minio.port) in addresses
    # MinIO also opens its port on ::1 whatever --address says; that is loopback too.
    assert all(ipaddress.ip_address(host).is_loopback for host, _ in addresses), addresses
