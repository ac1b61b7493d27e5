"""Two ranks configured only by TORPOR_* variables: async saves, encryption from a key file,
one SIGTERM, and a resume that continues exactly where the exit save left off."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
from torpor_harness import launch_ranks, logs, read_jsonl, wait_all, wait_for

from torpor.checkpoints import Reason, newest_complete, scan
from torpor.storage import open_storage

pytestmark = pytest.mark.s3


def test_two_ranks_async_encrypted_from_env_stop_and_resume(s3_bucket: str, tmp_path: Path) -> None:
    uri = f"s3://{s3_bucket}/jobs/enc"
    key_file = tmp_path / "key"
    key_file.write_bytes(os.urandom(16))  # a mounted Secret holds the raw key bytes
    common = {"TORPOR_JOB": "ns/enc", "TORPOR_CHECKPOINT_URI": uri, "TORPOR_SAVE_STEPS": "4",
              "TORPOR_KEEP_MAX": "2", "TORPOR_ASYNC_SAVE": "1", "TORPOR_ENC_MODE": "SM4-CBC",
              "TORPOR_ENC_KEY_FILE": str(key_file), **{k: v for k, v in os.environ.items() if k.startswith("AWS_")}}

    run1 = tmp_path / "run1"
    run1.mkdir()
    losses1 = run1 / "losses.jsonl"
    procs = launch_ranks(2, {**common, "TORPOR_INCARNATION": "1"},
                         ["--epochs", "200", "--losses", str(losses1), "--step-delay", "0.01"], run1)
    try:
        wait_for(lambda: any(r["rank"] == 0 and r["step"] >= 10 for r in read_jsonl(losses1))
                 or any(p.poll() is not None for p in procs), timeout=180, what="rank 0 to reach step 10")
        os.kill(procs[0].pid, signal.SIGTERM)
        codes = wait_all(procs, run1)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert codes == [143, 143], logs(run1)
    stop_step = json.loads((run1 / "termination-1.json").read_text())["step"]

    store = open_storage(uri)
    checkpoints = scan(store)
    newest = newest_complete(checkpoints)
    assert newest is not None and newest.name.startswith("Net-") and newest.step == stop_step
    periodic = [c for c in checkpoints if c.complete and not c.name.startswith("Net-")]
    assert 1 <= len(periodic) <= 3  # keep_max 2, plus at most one whose pruning was still pending
    for c in [newest, *periodic]:
        assert {m.extra.get("encryption") for m in c.manifests.values()} == {"SM4-CBC"}
        for m in c.manifests.values():
            assert store.get_bytes(m.shard.key).startswith(b"TORPENC")
    assert key_file.read_bytes().hex() not in (run1 / "rank-0.log").read_text()

    run2 = tmp_path / "run2"
    run2.mkdir()
    losses2 = run2 / "losses.jsonl"
    procs = launch_ranks(2, {**common, "TORPOR_INCARNATION": "2"},
                         ["--epochs", "200", "--losses", str(losses2), "--max-steps", str(stop_step + 6)], run2)
    assert wait_all(procs, run2) == [0, 0], logs(run2)
    assert min(r["step"] for r in read_jsonl(losses2)) == stop_step + 1  # resumed from the exit save
    final = newest_complete(scan(store))
    assert final is not None and final.step == stop_step + 6
    assert {m.reason for m in final.manifests.values()} <= {Reason.FINAL, Reason.PERIODIC}
