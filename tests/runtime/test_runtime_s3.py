"""Checkpoints in a real S3 server (MinIO): the storage seam, and three ranks stopped by one SIGTERM."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import boto3
import pytest
import torch
from torpor_harness import launch_ranks, logs, read_jsonl, wait_all, wait_for

from torpor.checkpoints import FileKind, Reason, file_key, newest_complete, scan
from torpor.errors import IntegrityError
from torpor.storage import S3Settings, S3Storage, open_storage, read_verified, sha256_hex

pytestmark = pytest.mark.s3


def test_s3_storage_round_trip_multipart_and_integrity(s3_bucket: str) -> None:
    store = open_storage(f"s3://{s3_bucket}/jobs/a")
    assert isinstance(store, S3Storage) and store.uri == f"s3://{s3_bucket}/jobs/a"
    assert store.list() == [] and not store.exists("rank_0/x.ckpt")
    store.put_bytes("rank_0/x.ckpt", b"small")
    big = os.urandom(11 * 1024 * 1024)  # above the threshold below: a 3-part multipart upload
    chunked = S3Storage(s3_bucket, "jobs/a", S3Settings(multipart_threshold=5 * 1024 * 1024,
                                                       multipart_chunksize=5 * 1024 * 1024, max_concurrency=3))
    chunked.put_bytes("rank_1/big.ckpt", big)
    assert read_verified(store, "rank_1/big.ckpt", size=len(big), sha256=sha256_hex(big)) == big
    head = boto3.client("s3").head_object(Bucket=s3_bucket, Key="jobs/a/rank_1/big.ckpt")
    assert head["ETag"].strip('"').endswith("-3")  # really uploaded in parts
    assert {(o.key, o.size) for o in store.list()} == {("rank_0/x.ckpt", 5), ("rank_1/big.ckpt", len(big))}
    assert [o.key for o in store.list("rank_1/")] == ["rank_1/big.ckpt"]
    with pytest.raises(IntegrityError, match="sha256"):
        read_verified(store, "rank_0/x.ckpt", size=5, sha256=sha256_hex(b"other"))
    with pytest.raises(FileNotFoundError):
        store.get_bytes("rank_0/none.ckpt")
    client = boto3.client("s3")
    client.create_multipart_upload(Bucket=s3_bucket, Key="jobs/a/rank_0/killed.ckpt")
    assert chunked.abort_stale_uploads(older_than=time.time() + 60, keys=["rank_0/killed.ckpt"]) == 1
    assert chunked.abort_stale_uploads(older_than=time.time() + 60, keys=["rank_0/killed.ckpt"]) == 0
    store.delete_many(["rank_0/x.ckpt", "rank_1/big.ckpt", "rank_9/never-existed.ckpt"])
    assert store.list() == []


def test_three_ranks_one_sigterm_all_stop_and_resume_exactly(s3_bucket: str, tmp_path: Path) -> None:
    uri = f"s3://{s3_bucket}/jobs/demo"
    common = {"TORPOR_JOB": "ns/demo", "TORPOR_CHECKPOINT_URI": uri, "TORPOR_SAVE_STEPS": "10", "TORPOR_KEEP_MAX": "3",
              **{k: v for k, v in os.environ.items() if k.startswith("AWS_")}}

    # 1. Interrupted run: SIGTERM to rank 1 only, once it has trained a few steps.
    run1 = tmp_path / "run1"
    run1.mkdir()
    losses1 = run1 / "losses.jsonl"
    procs = launch_ranks(3, {**common, "TORPOR_INCARNATION": "1"},
                         ["--epochs", "200", "--losses", str(losses1), "--step-delay", "0.01"], run1)
    try:
        wait_for(lambda: any(r["rank"] == 1 and r["step"] >= 15 for r in read_jsonl(losses1))
                 or any(p.poll() is not None for p in procs), timeout=180, what="rank 1 to reach step 15")
        os.kill(procs[1].pid, signal.SIGTERM)
        codes = wait_all(procs, run1)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert codes == [143, 143, 143], logs(run1)
    messages = [json.loads((run1 / f"termination-{r}.json").read_text()) for r in range(3)]
    stop_step = messages[0]["step"]
    assert stop_step >= 15
    exit_name = f"Net-{messages[0]['epoch']}_{stop_step - 20 * (messages[0]['epoch'] - 1)}"  # 20 steps per epoch
    for rank, msg in enumerate(messages):
        assert (msg["reason"], msg["signal"], msg["checkpoint"], msg["step"]) == ("signal", "SIGTERM", exit_name,
                                                                                  stop_step)
        assert msg["local"] is (rank == 1)  # only rank 1 got the signal; the others followed it
    for rank in range(3):
        assert max(r["step"] for r in read_jsonl(losses1) if r["rank"] == rank) == stop_step

    store = open_storage(uri)
    keys = {o.key for o in store.list()}
    for rank in range(3):
        assert {file_key(exit_name, rank, FileKind.SHARD), file_key(exit_name, rank, FileKind.MANIFEST)} <= keys
    assert file_key(exit_name, 0, FileKind.EXPORT) in keys
    checkpoints = scan(store)
    net = newest_complete(checkpoints)
    assert net is not None and net.name == exit_name and net.world_size == 3 and net.step == stop_step
    assert {m.reason for m in net.manifests.values()} == {Reason.EXIT}
    assert len([c for c in checkpoints if c.complete]) <= 3 + 1  # keep_max 3, plus the exit save

    # 2. Resumed run: new processes, resume='latest' → the exit save; 20 more steps.
    end = stop_step + 20
    run2 = tmp_path / "run2"
    run2.mkdir()
    losses2 = run2 / "losses.jsonl"
    procs = launch_ranks(3, {**common, "TORPOR_INCARNATION": "2"},
                         ["--epochs", "200", "--losses", str(losses2), "--max-steps", str(end)], run2)
    assert wait_all(procs, run2) == [0, 0, 0], logs(run2)
    assert json.loads((run2 / "termination-0.json").read_text())["reason"] == "completed"

    # 3. Reference: the same job uninterrupted, in another prefix.
    run3 = tmp_path / "run3"
    run3.mkdir()
    losses3 = run3 / "losses.jsonl"
    ref_env = {**common, "TORPOR_CHECKPOINT_URI": f"s3://{s3_bucket}/jobs/reference", "TORPOR_SAVE_STEPS": "1000"}
    procs = launch_ranks(3, ref_env, ["--epochs", "200", "--losses", str(losses3), "--max-steps", str(end)], run3)
    assert wait_all(procs, run3) == [0, 0, 0], logs(run3)

    def by_rank_step(path: Path) -> dict[tuple[int, int], float]:
        return {(r["rank"], r["step"]): r["loss"] for r in read_jsonl(path)}

    interrupted = {**by_rank_step(losses1), **by_rank_step(losses2)}
    reference = by_rank_step(losses3)
    assert sorted(interrupted) == sorted(reference) == [(r, s) for r in range(3) for s in range(1, end + 1)]
    assert min(s for _, s in by_rank_step(losses2)) == stop_step + 1  # no step lost, none repeated
    before = {k: v for k, v in interrupted.items() if k[1] <= stop_step}
    assert before == {k: reference[k] for k in before}  # bit for bit up to the stop
    # After the restart a few steps differ in the last bit of the loss (sporadically, not
    # drifting). Not DDP's bucket rebuild: one parameter per bucket (bucket_cap_mb=1e-6)
    # changed nothing. The single-process resume test checks bit-for-bit equality.
    keys = sorted(reference)
    torch.testing.assert_close(torch.tensor([interrupted[k] for k in keys], dtype=torch.float64),
                               torch.tensor([reference[k] for k in keys], dtype=torch.float64),
                               rtol=1e-5, atol=1e-6)
