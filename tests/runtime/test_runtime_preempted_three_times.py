"""A 2-rank job preempted three times in a row still ends with the uninterrupted losses.

Real gloo ranks, real SIGTERMs (to rank 0, then rank 1, then rank 0), a real MinIO. The third
stop's save is killed part-way: rank 0 reaches MinIO through a fault proxy that holds back
its exit shard, rank 1 finishes its part, then both ranks are SIGKILLed (the grace period
ran out). Every incarnation must resume from a complete checkpoint, never overwrite an
earlier one, never resume from the torn one, and the whole history must match a run that was
never interrupted (``rtol=1e-5``: see the README on the last bit after a 3-rank restart).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path
from typing import Any

import pytest
import torch
from torpor_harness import launch_ranks, logs, read_jsonl, wait_all, wait_for

import torpor
from faultproxy import FaultProxy
from s3server import MinioServer
from torpor.checkpoints import Checkpoint, Reason, newest_complete, scan
from torpor.storage import open_storage

pytestmark = pytest.mark.s3

END = 70
"""Global steps of the whole job."""
ARGV = ["--epochs", "200", "--max-steps", str(END)]
DELAY = ["--step-delay", "0.03"]  # long enough for the test to signal mid-run; losses do not depend on it


def _run(tmp_path: Path, n: int, env: dict[str, str], *, rank_env: dict[int, dict[str, str]] | None = None,
         delay: bool = True) -> tuple[Path, list[subprocess.Popen[bytes]]]:
    run = tmp_path / f"run{n}"
    run.mkdir()
    argv = [*ARGV, *(DELAY if delay else []), "--losses", str(run / "losses.jsonl")]
    return run, launch_ranks(2, {**env, "TORPOR_INCARNATION": str(n)}, argv, run, rank_env=rank_env)


def _steps(run: Path) -> list[dict[str, Any]]:
    return read_jsonl(run / "losses.jsonl")


def _reach(run: Path, procs: list[subprocess.Popen[bytes]], step: int) -> None:
    """Wait until both ranks have finished ``step`` (or a rank has ended early: fail with logs)."""
    def reached() -> bool:
        if any(p.poll() is not None for p in procs):
            raise AssertionError(f"a rank ended before step {step}:\n{logs(run)}")
        return all(any(r["rank"] == rank and r["step"] >= step for r in _steps(run)) for rank in (0, 1))
    wait_for(reached, timeout=180, what=f"both ranks past step {step}")


def _stop(run: Path, procs: list[subprocess.Popen[bytes]], rank: int) -> tuple[str, int]:
    """SIGTERM one rank; both must save and exit 143. Returns the exit checkpoint and its step."""
    os.kill(procs[rank].pid, signal.SIGTERM)
    assert wait_all(procs, run) == [143, 143], logs(run)
    messages = [json.loads((run / f"termination-{r}.json").read_text()) for r in (0, 1)]
    assert len({(m["checkpoint"], m["step"]) for m in messages}) == 1, messages
    assert [m["local"] for m in messages] == [r == rank for r in (0, 1)]
    return messages[0]["checkpoint"], messages[0]["step"]


def _fingerprint(c: Checkpoint) -> dict[int, tuple[str, str, int]]:
    """What must never change about a complete checkpoint: each rank's save id and shard bytes."""
    return {r: (m.save_id, m.shard.sha256, m.shard.size) for r, m in c.manifests.items()}


def _by_name(store: Any) -> dict[str, Checkpoint]:
    return {c.name: c for c in scan(store)}


def test_two_ranks_preempted_three_times_resume_every_time_and_match_an_uninterrupted_run(
        s3_bucket: str, minio: MinioServer, tmp_path: Path) -> None:
    aws = {k: v for k, v in os.environ.items() if k.startswith("AWS_")}
    uri = f"s3://{s3_bucket}/jobs/thrice"
    env = {"TORPOR_JOB": "ns/thrice", "TORPOR_CHECKPOINT_URI": uri, "TORPOR_SAVE_STEPS": "5",
           "TORPOR_KEEP_MAX": "3", **aws}
    store = open_storage(uri)

    # 1. SIGTERM to rank 0.
    run1, procs = _run(tmp_path, 1, env)
    _reach(run1, procs, 12)
    first, s1 = _stop(run1, procs, rank=0)
    saved = _by_name(store)
    assert saved[first].complete and saved[first].step == s1
    assert {m.reason for m in saved[first].manifests.values()} == {Reason.EXIT}
    kept = _fingerprint(saved[first])

    # 2. Resumed from it; SIGTERM to rank 1. The first exit checkpoint is not touched.
    run2, procs = _run(tmp_path, 2, env)
    _reach(run2, procs, s1 + 8)
    assert min(r["step"] for r in _steps(run2)) == s1 + 1
    second, s2 = _stop(run2, procs, rank=1)
    saved = _by_name(store)
    assert second != first and saved[second].complete and saved[second].step == s2
    assert first in saved and saved[first].complete and _fingerprint(saved[first]) == kept
    loaded = torpor.load_checkpoint(first, directory=uri, restore_rng=False)  # its bytes still verify
    assert loaded is not None and loaded.step == s1
    kept = _fingerprint(saved[second])

    # 3. Resumed from the second; SIGTERM to rank 0, whose exit shard then hangs in the network;
    #    rank 1 completes its part; both are SIGKILLed mid-save.
    with FaultProxy("127.0.0.1", minio.port) as proxy:
        run3, procs = _run(tmp_path, 3, env, rank_env={0: {"AWS_ENDPOINT_URL": proxy.url}})
        _reach(run3, procs, s2 + 8)  # past its resume: rank 0 has read what it needs through the proxy
        assert min(r["step"] for r in _steps(run3)) == s2 + 1
        exit_prefix = first.split("-")[0]
        proxy.hold(f"/rank_0/{exit_prefix}".encode())
        os.kill(procs[0].pid, signal.SIGTERM)
        wait_for(proxy.held.is_set, timeout=60, what="rank 0's exit save to reach the store")

        def torn() -> Checkpoint | None:
            for c in scan(store):
                rank1 = c.manifests.get(1)
                if rank1 is not None and rank1.reason is Reason.EXIT and rank1.step > s2:
                    return c
            return None

        third = wait_for(torn, timeout=60, what="rank 1's part of the third exit save")
        for p in procs:
            p.send_signal(signal.SIGKILL)
        assert wait_all(procs, run3) == [-signal.SIGKILL, -signal.SIGKILL], logs(run3)
    saved = _by_name(store)
    assert not saved[third.name].complete  # torn: rank 0's part never landed
    assert second in saved and saved[second].complete and _fingerprint(saved[second]) == kept
    resume_point = newest_complete(saved.values())
    assert resume_point is not None and resume_point.name != third.name
    assert {m.reason for m in resume_point.manifests.values()} <= {Reason.PERIODIC, Reason.EXIT}
    assert resume_point.step >= s2

    # 4. Resumed from the newest complete checkpoint; runs to the end.
    run4, procs = _run(tmp_path, 4, env, delay=False)
    assert wait_all(procs, run4) == [0, 0], logs(run4)
    assert min(r["step"] for r in _steps(run4)) == resume_point.step + 1
    final = newest_complete(scan(store))
    assert final is not None and final.step == END
    assert {m.resumed_from for m in final.manifests.values()} == {resume_point.name}

    # The same job, never interrupted, in another prefix.
    reference, procs = _run(tmp_path, 5, {**env, "TORPOR_CHECKPOINT_URI": f"s3://{s3_bucket}/jobs/reference",
                                          "TORPOR_SAVE_STEPS": "1000"}, delay=False)
    assert wait_all(procs, reference) == [0, 0], logs(reference)

    history: dict[tuple[int, int], float] = {}
    for run in (run1, run2, run3, run4):  # a later incarnation's step replaces a lost one's
        history.update({(r["rank"], r["step"]): r["loss"] for r in _steps(run)})
    expected = {(r["rank"], r["step"]): r["loss"] for r in _steps(reference)}
    assert sorted(history) == sorted(expected) == [(r, s) for r in (0, 1) for s in range(1, END + 1)]
    keys = sorted(expected)
    torch.testing.assert_close(torch.tensor([history[k] for k in keys], dtype=torch.float64),
                               torch.tensor([expected[k] for k in keys], dtype=torch.float64), rtol=1e-5, atol=1e-6)
