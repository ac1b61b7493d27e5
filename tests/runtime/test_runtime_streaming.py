"""The streaming writers and the parallel verified reader, against MinIO and a local directory."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import boto3
import pytest
from torpor_harness import five_mib_parts

from torpor.errors import IntegrityError
from torpor.storage import LocalStorage, S3Storage, open_writer

pytestmark = pytest.mark.s3
MIB = 1024 * 1024


def small_parts(bucket: str) -> S3Storage:
    return five_mib_parts(bucket, "stream")


def test_streamed_multipart_upload_and_parallel_verified_read(s3_bucket: str) -> None:
    store = small_parts(s3_bucket)
    data = os.urandom(23 * MIB + 123)
    writer = open_writer(store, "rank_0/big.ckpt")
    pos = 0
    for size in (1, 7 * MIB, 3, 11 * MIB, len(data)):  # pieces that straddle part boundaries
        writer.write(memoryview(data)[pos:pos + size])
        pos += len(data[pos:pos + size])
    writer.close()
    assert (writer.size, writer.sha256) == (len(data), hashlib.sha256(data).hexdigest())
    head = boto3.session.Session().client("s3").head_object(Bucket=s3_bucket, Key="stream/rank_0/big.ckpt")
    assert head["ETag"].strip('"').endswith("-5")  # five 5 MiB parts, the last one short
    assert bytes(store.get_verified("rank_0/big.ckpt", size=len(data), sha256=writer.sha256)) == data
    with pytest.raises(IntegrityError, match="sha256"):
        store.get_verified("rank_0/big.ckpt", size=len(data), sha256="0" * 64)
    with pytest.raises(IntegrityError, match="size"):
        store.get_verified("rank_0/big.ckpt", size=len(data) + 10 * MIB, sha256=writer.sha256)
    with pytest.raises(IntegrityError, match=f"size {len(data)} does not match"):
        store.get_verified("rank_0/big.ckpt", size=len(data) - 1, sha256=writer.sha256)
    with pytest.raises(FileNotFoundError):
        store.get_verified("rank_0/none.ckpt", size=20 * MIB, sha256=writer.sha256)


def test_small_objects_are_one_put_and_an_aborted_writer_leaves_nothing(s3_bucket: str) -> None:
    store = small_parts(s3_bucket)
    for payload in (b"", b"tiny"):
        w = open_writer(store, f"rank_0/small-{len(payload)}.ckpt")
        w.write(payload)
        w.close()
        assert store.get_bytes(f"rank_0/small-{len(payload)}.ckpt") == payload
    w = open_writer(store, "rank_0/aborted.ckpt")
    w.write(os.urandom(12 * MIB))  # two parts already sent
    w.abort()
    assert not store.exists("rank_0/aborted.ckpt")
    uploads = boto3.session.Session().client("s3").list_multipart_uploads(
        Bucket=s3_bucket, Prefix="stream/rank_0/aborted.ckpt")
    assert not uploads.get("Uploads")


def test_local_writer_is_atomic(tmp_path: Path) -> None:
    store = LocalStorage(tmp_path)
    w = open_writer(store, "rank_0/x.ckpt")
    w.write(b"half")
    assert store.list() == []  # nothing visible until close
    w.close()
    assert store.get_bytes("rank_0/x.ckpt") == b"half"
    w = open_writer(store, "rank_0/y.ckpt")
    w.write(b"never")
    w.abort()
    assert sorted(p.name for p in (tmp_path / "rank_0").iterdir()) == ["x.ckpt"]


def test_tensor_memory_is_uploaded_in_place_and_reads_back_exactly(s3_bucket: str) -> None:
    import torch

    from torpor import _state
    from torpor._saving import write_file

    store = small_parts(s3_bucket)
    state = {"w": torch.randn(3 * MIB), "b": torch.randn(7), "nested": {"v": torch.arange(2 * MIB)}}  # 12 + 16 MiB
    entry = write_file(store, "rank_0/t.ckpt", state, None)
    head = boto3.session.Session().client("s3").head_object(Bucket=s3_bucket, Key="stream/rank_0/t.ckpt")
    assert int(head["ETag"].strip('"').rsplit("-", 1)[1]) >= 5
    loaded = _state.ViewReader(store.get_verified("rank_0/t.ckpt", size=entry.size, sha256=entry.sha256))
    back = torch.load(loaded, weights_only=True)
    assert torch.equal(back["w"], state["w"]) and torch.equal(back["nested"]["v"], state["nested"]["v"])


def test_large_shards_load_through_a_mapped_file_and_leave_nothing_behind(s3_bucket: str) -> None:
    import torch

    from torpor._loading import load_shard
    from torpor._saving import write_file
    from torpor.crypto import Encryption

    store = S3Storage(s3_bucket, "mapped")
    state = {"w": torch.randn(20 * MIB), "torpor_format": 1}  # 80 MiB: above the mapped-load threshold
    gcm = Encryption(os.urandom(32), "AES-GCM")
    plain = write_file(store, "rank_0/p.ckpt", state, None)
    sealed = write_file(store, "rank_0/s.ckpt", state, gcm)
    before = set(os.listdir("/dev/shm"))
    assert torch.equal(load_shard(store, plain, None, None)["w"], state["w"])
    assert torch.equal(load_shard(store, sealed, gcm.key, None)["w"], state["w"])
    with pytest.raises(IntegrityError, match="wrong encryption key"):
        load_shard(store, sealed, os.urandom(32), None)
    with pytest.raises(IntegrityError, match="not encrypted"):
        load_shard(store, plain, gcm.key, None)
    with pytest.raises(IntegrityError, match="sha256"):
        load_shard(store, type(plain)(plain.kind, plain.key, plain.size, "0" * 64), None, None)
    assert set(os.listdir("/dev/shm")) == before
