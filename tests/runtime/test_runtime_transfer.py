"""The tuned S3 request paths (torpor.transfer) against a real MinIO: checksummed parts, direct reads."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import boto3
import botocore.exceptions
import pytest
from torpor_harness import five_mib_parts as harness_parts

import torpor.storage
from s3server import MinioServer
from torpor.errors import IntegrityError, StorageError
from torpor.storage import S3Storage, open_writer
from torpor.transfer import PartBody, RangeReader, direct_reads_possible, part_checksum, presigned_get

pytestmark = pytest.mark.s3
MIB = 1024 * 1024


def five_mib_parts(bucket: str) -> S3Storage:
    return harness_parts(bucket, "xfer")


def test_every_uploaded_part_carries_a_crc32_the_server_keeps(s3_bucket: str) -> None:
    store = five_mib_parts(s3_bucket)
    data = os.urandom(12 * MIB + 7)
    writer = open_writer(store, "rank_0/big.ckpt")
    writer.write(memoryview(data), borrow=True)  # whole parts lent as they are, the tail staged
    writer.close()
    client = boto3.session.Session().client("s3")
    attrs = client.get_object_attributes(Bucket=s3_bucket, Key="xfer/rank_0/big.ckpt",
                                         ObjectAttributes=["ObjectParts", "Checksum"])
    parts = attrs["ObjectParts"]["Parts"]
    expected = [part_checksum(data[i:i + 5 * MIB]) for i in range(0, len(data), 5 * MIB)]
    assert [p["ChecksumCRC32"] for p in parts] == expected
    assert bytes(store.get_verified("rank_0/big.ckpt", size=len(data), sha256=hashlib.sha256(data).hexdigest())) \
        == data


def test_a_part_whose_bytes_do_not_match_its_crc32_is_refused_and_nothing_appears(
        s3_bucket: str, monkeypatch: pytest.MonkeyPatch) -> None:
    store = five_mib_parts(s3_bucket)
    monkeypatch.setattr(PartBody, "checksum", lambda body: part_checksum(b"not these bytes"))
    writer = open_writer(store, "rank_0/bad.ckpt")
    with pytest.raises(StorageError, match=r"put s3://.*/xfer/rank_0/bad\.ckpt failed"):
        writer.write(os.urandom(11 * MIB))
        writer.close()
    assert not store.exists("rank_0/bad.ckpt")


def test_direct_ranged_reads_fill_the_buffer_and_map_errors(s3_bucket: str) -> None:
    client = S3Storage(s3_bucket)._client()  # torpor's own client: it presigns with SigV4
    data = os.urandom(3 * MIB + 5)
    client.put_object(Bucket=s3_bucket, Key="obj", Body=data)
    reader = RangeReader(presigned_get(client, s3_bucket, "obj"), name=f"s3://{s3_bucket}/obj",
                         max_attempts=2, timeout=10)
    out = bytearray(len(data))
    view = memoryview(out)
    first = reader.read_into(view[:MIB], 0)
    rest = reader.read_into(view[MIB:], MIB)
    assert (first.received, first.total, rest.received, rest.total) == (MIB, len(data), len(data) - MIB, len(data))
    assert out == data
    with pytest.raises(IntegrityError, match=rf"s3://{s3_bucket}/obj: shorter than asked"):
        reader.read_into(memoryview(bytearray(10)), len(data) + 100)
    missing = RangeReader(presigned_get(client, s3_bucket, "none"), name=f"s3://{s3_bucket}/none",
                          max_attempts=2, timeout=10)
    with pytest.raises(FileNotFoundError, match=f"s3://{s3_bucket}/none"):
        missing.read_into(memoryview(bytearray(10)), 0)
    url = presigned_get(client, s3_bucket, "obj")
    assert "X-Amz-Algorithm=AWS4-HMAC-SHA256" in url
    forged = RangeReader(url.replace("X-Amz-Signature=", "X-Amz-Signature=00"), name="forged", max_attempts=2,
                         timeout=10)
    with pytest.raises(StorageError, match="HTTP 403 SignatureDoesNotMatch"):
        forged.read_into(memoryview(bytearray(10)), 0)
    for r in (reader, missing, forged):
        r.close()


def test_a_direct_read_retries_across_a_server_restart(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with MinioServer(tmp_path / "minio") as server:
        for key, value in server.env().items():
            monkeypatch.setenv(key, value)
        client = S3Storage("restart")._client()
        client.create_bucket(Bucket="restart")
        data = os.urandom(2 * MIB)
        client.put_object(Bucket="restart", Key="obj", Body=data)
        reader = RangeReader(presigned_get(client, "restart", "obj"), name="s3://restart/obj",
                             max_attempts=8, timeout=10)
        out = memoryview(bytearray(len(data)))
        reader.read_into(out[:MIB], 0)  # opens the keep-alive connection the restart breaks
        server.stop()
        server.start()  # same port, same data directory
        assert reader.read_into(out[MIB:], MIB).received == MIB
        assert out.tobytes() == data
        reader.close()


def test_reads_go_through_botocore_when_a_proxy_would_carry_them(
        s3_bucket: str, monkeypatch: pytest.MonkeyPatch) -> None:
    url = "http://127.0.0.1:9000/bucket/key"
    monkeypatch.setenv("http_proxy", "http://proxy.invalid:3128")
    monkeypatch.delenv("no_proxy", raising=False)
    monkeypatch.delenv("NO_PROXY", raising=False)
    assert not direct_reads_possible(url)
    monkeypatch.setenv("no_proxy", "127.0.0.1")
    assert direct_reads_possible(url)
    monkeypatch.delenv("http_proxy")
    assert direct_reads_possible(url) and direct_reads_possible("https://s3.amazonaws.com/b/k")

    # The fallback itself still reads exactly (and is what runs behind a proxy).
    monkeypatch.setattr(torpor.storage, "direct_reads_possible", lambda url: False)
    store = five_mib_parts(s3_bucket)
    data = os.urandom(11 * MIB)
    writer = open_writer(store, "rank_0/fallback.ckpt")
    writer.write(data)
    writer.close()
    assert bytes(store.get_verified("rank_0/fallback.ckpt", size=len(data), sha256=writer.sha256)) == data


def test_a_part_retried_after_a_server_error_is_sent_again_whole(s3_bucket: str) -> None:
    from botocore.awsrequest import AWSResponse

    store = five_mib_parts(s3_bucket)
    failed: set[int] = set()

    def fail_each_part_once(request: object, **_: object) -> AWSResponse | None:
        number = int(str(getattr(request, "url", "")).split("partNumber=")[1].split("&")[0])
        if number in failed:
            return None
        failed.add(number)

        class Raw:  # what botocore reads an error response's body from
            def stream(self, **_: object) -> list[bytes]:
                return [b"<Error><Code>InternalError</Code></Error>"]

        return AWSResponse(getattr(request, "url", ""), 500, {}, Raw())

    store._raw_client().meta.events.register("before-send.s3.UploadPart", fail_each_part_once)
    header, tensor = os.urandom(300), os.urandom(11 * MIB)
    writer = open_writer(store, "rank_0/retried.ckpt")
    writer.write(header)  # staged
    writer.write(memoryview(tensor), borrow=True)  # lent: each part is header/tensor pieces
    writer.close()
    assert failed == {1, 2, 3}
    data = header + tensor
    assert bytes(store.get_verified("rank_0/retried.ckpt", size=len(data), sha256=hashlib.sha256(data).hexdigest())) \
        == data


def test_a_failed_upload_during_torch_save_surfaces_as_the_storage_error(
        s3_bucket: str, monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    from torpor._saving import write_file

    store = five_mib_parts(s3_bucket)
    monkeypatch.setattr(PartBody, "checksum", lambda body: part_checksum(b"not these bytes"))
    state = {f"w{i}": torch.randn(2 * MIB // 4) for i in range(12)}  # 24 MiB: parts fail while torch writes
    with pytest.raises(StorageError, match=r"put s3://.*/xfer/rank_0/CKP-1_1\.ckpt failed"):
        write_file(store, "rank_0/CKP-1_1.ckpt", state, None)
    assert not store.exists("rank_0/CKP-1_1.ckpt")


def test_stores_opened_with_one_client_share_it(s3_bucket: str) -> None:
    from torpor.storage import open_storage, s3_client

    client = s3_client()
    a = open_storage(f"s3://{s3_bucket}/job-a", client=client)
    b = open_storage(f"s3://{s3_bucket}/job-b", client=client)
    a.put_bytes("rank_0/x", b"a")
    b.put_bytes("rank_0/x", b"b")
    assert (a.get_bytes("rank_0/x"), b.get_bytes("rank_0/x")) == (b"a", b"b")
    assert a._client() is b._client() is client  # type: ignore[attr-defined]


def test_clients_for_other_credentials_share_botocores_model_and_keep_their_own_keys(
        s3_bucket: str, minio: MinioServer) -> None:
    """The operator keeps a client per endpoint and Secret version: each one decoded botocore's
    S3 model anew (~13 MiB). They now share one loader; each still signs with its own keys."""
    from torpor.storage import s3_client

    env = minio.env()
    right = s3_client(endpoint_url=env["AWS_ENDPOINT_URL"],
                      credentials=(env["AWS_ACCESS_KEY_ID"], env["AWS_SECRET_ACCESS_KEY"]))
    wrong = s3_client(endpoint_url=env["AWS_ENDPOINT_URL"], credentials=(env["AWS_ACCESS_KEY_ID"], "not-the-key"))
    assert right.meta.service_model._service_description is wrong.meta.service_model._service_description
    paths = torpor.storage._LOADER.search_paths
    assert len(paths) == len(set(paths))  # boto3 appends its data directory per session: not per client here
    right.put_object(Bucket=s3_bucket, Key="k", Body=b"x")
    with pytest.raises(botocore.exceptions.ClientError, match="SignatureDoesNotMatch"):
        wrong.get_object(Bucket=s3_bucket, Key="k")
    assert right.get_object(Bucket=s3_bucket, Key="k")["Body"].read() == b"x"
