"""A newest checkpoint that cannot be loaded, on 2 real gloo ranks (issue 10, item 3).

Every rank falls back to the same older checkpoint, says so naming both, and reports the one
it really loaded: in the termination message of a later stop (under the operator) and in the
manifests of its next save. The checkpoints are damaged the two ways a store damages them: a
shard whose bytes changed (local directory), and a shard deleted after rank 0 listed the
checkpoint as complete but before a rank read it (MinIO, the read held by a fault proxy).
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import boto3
import pytest
from torpor_harness import flip_a_byte, launch_ranks, logs, read_jsonl, wait_all, wait_for

from faultproxy import FaultProxy
from s3server import MinioServer
from torpor.checkpoints import scan
from torpor.storage import LocalStorage, Storage, open_storage

SAVES = {"TORPOR_SAVE_STEPS": "4"}
"""Run 1 (8 steps) leaves CKP-1_4 and CKP-1_8; examples/train.py has 30 steps per epoch on 2 ranks."""


def complete_names(store: Storage) -> list[str]:
    return [c.name for c in scan(store) if c.complete]


def first_run(tmp_path: Path, env: dict[str, str], store: Storage) -> None:
    """Two gloo ranks, 8 steps: CKP-1_4 and CKP-1_8, both complete."""
    run = tmp_path / "run1"
    run.mkdir()
    procs = launch_ranks(2, env, ["--max-steps", "8"], run)
    assert wait_all(procs, run) == [0, 0], logs(run)
    assert complete_names(store) == ["CKP-1_4", "CKP-1_8"]


def assert_both_ranks_fell_back(run: Path) -> None:
    """Each rank trained from step 5 (CKP-1_4 loaded) and its log names the skipped one and the loaded one."""
    steps = read_jsonl(run / "losses.jsonl")
    for rank in (0, 1):
        assert min(r["step"] for r in steps if r["rank"] == rank) == 5, logs(run)
        log = (run / f"rank-{rank}.log").read_text()
        assert "checkpoint 'CKP-1_8'" in log and "could not be loaded" in log, log
        assert "resumed from the older complete checkpoint 'CKP-1_4' instead of 'CKP-1_8'" in log, log


@pytest.mark.parametrize(("resume_from", "bad_rank"), [("CKP-1_8", 1), (None, 0)],
                         ids=["TORPOR_RESUME_FROM-rank1-bad", "latest-rank0-bad"])
def test_the_termination_message_after_a_fallback_names_the_checkpoint_every_rank_loaded(
        tmp_path: Path, resume_from: str | None, bad_rank: int) -> None:
    ck = tmp_path / "ck"
    env = {"TORPOR_CHECKPOINT_URI": str(ck), "TORPOR_JOB": "ns/fallback", **SAVES}
    first_run(tmp_path, env, LocalStorage(ck))
    flip_a_byte(ck / f"rank_{bad_rank}" / "CKP-1_8.ckpt")  # still lists as complete: sizes agree

    run = tmp_path / "run2"
    run.mkdir()
    chosen = {"TORPOR_RESUME_FROM": resume_from} if resume_from else {}  # else resume="latest" decides
    procs = launch_ranks(2, {**env, **chosen, "TORPOR_INCARNATION": "2"},
                         ["--epochs", "200", "--step-delay", "0.03", "--losses", str(run / "losses.jsonl")], run)

    def past_the_resume() -> bool:
        if any(p.poll() is not None for p in procs):
            raise AssertionError(f"a rank ended before it was stopped:\n{logs(run)}")
        steps = read_jsonl(run / "losses.jsonl")
        return all(any(r["rank"] == rank and r["step"] >= 6 for r in steps) for rank in (0, 1))

    wait_for(past_the_resume, timeout=180, what="both ranks two steps past their resume")
    os.kill(procs[0].pid, signal.SIGTERM)
    assert wait_all(procs, run) == [143, 143], logs(run)
    assert_both_ranks_fell_back(run)

    messages = [json.loads((run / f"termination-{rank}.json").read_text()) for rank in (0, 1)]
    assert [m["resumed_from"] for m in messages] == ["CKP-1_4", "CKP-1_4"], messages
    assert [(m["reason"], m["rank"]) for m in messages] == [("signal", 0), ("signal", 1)]
    (stopped,) = {m["checkpoint"] for m in messages}
    (exit_ckpt,) = [c for c in scan(LocalStorage(ck)) if c.name == stopped]
    assert exit_ckpt.complete and {m.resumed_from for m in exit_ckpt.manifests.values()} == {"CKP-1_4"}


@pytest.mark.s3
def test_two_gloo_ranks_fall_back_together_when_the_newest_shard_is_gone_before_it_is_read(
        s3_bucket: str, minio: MinioServer, tmp_path: Path) -> None:
    uri = f"s3://{s3_bucket}/jobs/gone"
    env = {"TORPOR_CHECKPOINT_URI": uri, **SAVES, **{k: v for k, v in os.environ.items() if k.startswith("AWS_")}}
    store = open_storage(uri)
    first_run(tmp_path, env, store)

    run = tmp_path / "run2"
    run.mkdir()
    with FaultProxy("127.0.0.1", minio.port) as proxy:
        # Rank 1's read of its newest shard waits in the network: by then rank 0 has listed
        # CKP-1_8 as complete and told every rank to load it.
        proxy.hold(b"/rank_1/CKP-1_8.ckpt")
        procs = launch_ranks(2, env, ["--max-steps", "10", "--losses", str(run / "losses.jsonl")], run,
                             rank_env={rank: {"AWS_ENDPOINT_URL": proxy.url} for rank in (0, 1)})
        wait_for(proxy.held.is_set, timeout=180, what="rank 1 to read its shard of CKP-1_8")
        assert "CKP-1_8" in complete_names(store)  # what rank 0 saw when it listed
        boto3.client("s3").delete_object(Bucket=s3_bucket, Key="jobs/gone/rank_1/CKP-1_8.ckpt")  # a prune elsewhere
        proxy.release()
        assert wait_all(procs, run) == [0, 0], logs(run)
    assert_both_ranks_fell_back(run)
    assert "rank 1: FileNotFoundError" in (run / "rank-1.log").read_text(), logs(run)
    assert "another rank could not read its part" in (run / "rank-0.log").read_text(), logs(run)
    steps = read_jsonl(run / "losses.jsonl")
    assert [r["step"] for r in steps if r["rank"] == 0] == [r["step"] for r in steps if r["rank"] == 1] == list(
        range(5, 11))
