"""Collectives never hang: uneven data and a save failing on one rank, with real gloo ranks.

Each rank runs ``procs/collective_ranks.py`` with a 30 s process-group timeout, so a rank
left alone in a collective fails within the test's deadline instead of hanging for 30 min.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from torpor_harness import launch_ranks, logs, wait_all

from torpor.checkpoints import Reason, newest_complete, scan
from torpor.storage import open_storage

SCRIPT = Path(__file__).parent / "procs" / "collective_ranks.py"


def run_ranks(tmp_path: Path, world: int, *argv: str) -> tuple[list[int], list[dict[str, Any]]]:
    """Exit codes and results of ``world`` ranks of the collective script (deadline 150 s)."""
    procs = launch_ranks(world, {}, ["--directory", str(tmp_path / "ckpt"), "--result",
                                     str(tmp_path / "result-{rank}.json"), *argv], tmp_path, script=SCRIPT)
    codes = wait_all(procs, tmp_path, timeout=150)
    results = []
    for rank in range(world):
        path = tmp_path / f"result-{rank}.json"
        assert path.exists(), f"rank {rank} wrote no result (exit {codes[rank]}):\n{logs(tmp_path)}"
        results.append(json.loads(path.read_text()))
    return codes, results


def assert_final_checkpoint(tmp_path: Path, world: int, step: int) -> None:
    newest = newest_complete(scan(open_storage(str(tmp_path / "ckpt"))))
    assert newest is not None and newest.step == step, newest
    assert sorted(newest.manifests) == list(range(world))
    assert {m.reason for m in newest.manifests.values()} == {Reason.FINAL}


# -- item 7: uneven data -----------------------------------------------------------------

@pytest.mark.parametrize(("world", "samples", "shortest"), [(2, 25, 3), (3, 37, 3)])
def test_uneven_iterable_dataset_every_rank_ends_each_epoch_at_the_shortest_ranks_step(
        tmp_path: Path, world: int, samples: int, shortest: int) -> None:
    # Rank 0 gets one sample more: 4 batches of 4 where the others get 3.
    codes, results = run_ranks(tmp_path, world, "--split", "iterable", "--samples", str(samples), "--epochs", "2")
    assert codes == [0] * world, logs(tmp_path)
    for r in results:
        assert r["steps"] == list(range(1, 2 * shortest + 1)), r
        assert r["epochs"] == [1] * shortest + [2] * shortest, r
    assert_final_checkpoint(tmp_path, world, 2 * shortest)


@pytest.mark.parametrize(("world", "shortest", "check_every"), [(2, 4, 1), (3, 2, 1), (2, 4, 3)])
def test_distributed_sampler_without_drop_last_over_uneven_data_ends_every_rank_at_one_step(
        tmp_path: Path, world: int, shortest: int, check_every: int) -> None:
    # Rank r's data set has 40 - 8r samples: DistributedSampler pads within a rank's view, not across.
    codes, results = run_ranks(tmp_path, world, "--split", "sampler", "--samples", "40", "--form", "loop",
                               "--check-every", str(check_every))
    assert codes == [0] * world, logs(tmp_path)
    for r in results:
        assert r["steps"] == list(range(1, 2 * shortest + 1)), r
    assert_final_checkpoint(tmp_path, world, 2 * shortest)


def test_a_rank_with_no_batch_at_all_ends_every_epoch_before_its_first_step(tmp_path: Path) -> None:
    codes, results = run_ranks(tmp_path, 3, "--split", "iterable", "--samples", "2", "--batch-size", "1")
    assert codes == [0, 0, 0], logs(tmp_path)
    assert [r["steps"] for r in results] == [[], [], []]


def test_one_collective_per_step_carries_the_stop_the_exhaustion_and_a_seconds_save(tmp_path: Path) -> None:
    # OnRequestExit, a monitor saving by seconds (never due here), a loader without len (3 batches a rank).
    codes, results = run_ranks(tmp_path, 2, "--samples", "24", "--save-seconds", "3600")
    assert codes == [0, 0], logs(tmp_path)
    for r in results:
        assert r["steps"] == [1, 2, 3, 4, 5, 6], r
        # Step 1 also saw the epoch start's; from then on one per step (the epoch start of
        # epoch 2 falls before step 4).
        assert r["collectives"] == [2, 1, 1, 2, 1, 1], r


# -- item 8: a save failing on one rank --------------------------------------------------

def test_a_periodic_save_failing_on_one_rank_raises_on_every_rank_at_that_step(tmp_path: Path) -> None:
    # A file where rank 1's directory should be: every save of rank 1 fails for real.
    codes, results = run_ranks(tmp_path, 2, "--samples", "64", "--save-steps", "2", "--block-rank", "1")
    assert codes == [1, 1], logs(tmp_path)
    for r in results:
        assert r["steps"] == [1, 2], r
        assert r["error"].startswith("CheckpointSaveError: checkpoint 'CKP-1_2' was not saved on rank(s) [1]"), r


def test_an_async_save_failing_on_one_rank_raises_on_every_rank_at_the_same_step(tmp_path: Path) -> None:
    # A directory where rank 1's shard of CKP-1_2 goes: that save fails in the background.
    codes, results = run_ranks(tmp_path, 2, "--samples", "64", "--save-steps", "2", "--async-save",
                               "--async-errors", "raise", "--block-rank", "1", "--block-name", "CKP-1_2")
    assert codes == [1, 1], logs(tmp_path)
    assert results[0]["steps"] == results[1]["steps"], results
    assert 2 <= results[0]["steps"][-1] <= 4  # found at the next boundary, or by the next save's wait
    for r in results:
        assert r["error"].startswith("AsyncSaveError:") and "'CKP-1_2'" in r["error"], r


def test_an_async_save_failing_on_one_rank_is_recorded_on_every_rank_and_training_goes_on(tmp_path: Path) -> None:
    codes, results = run_ranks(tmp_path, 2, "--samples", "64", "--save-steps", "2", "--async-save",
                               "--block-rank", "1", "--block-name", "CKP-1_2")
    assert codes == [0, 0], logs(tmp_path)
    for r in results:
        assert r["steps"] == list(range(1, 17)), r
        assert len(r["save_errors"]) == 1 and "'CKP-1_2'" in r["save_errors"][0], r
    newest = newest_complete(scan(open_storage(str(tmp_path / "ckpt"))))
    assert newest is not None and newest.step == 16


def test_an_exit_save_failing_on_one_rank_ends_every_rank_with_the_error(tmp_path: Path) -> None:
    # SIGTERM reaches rank 0 inside step 3; rank 1 cannot write anything.
    codes, results = run_ranks(tmp_path, 2, "--samples", "64", "--sigterm-rank", "0", "--sigterm-step", "3",
                               "--block-rank", "1")
    assert codes == [1, 1], logs(tmp_path)
    for rank, r in enumerate(results):
        assert r["steps"] == [1, 2, 3], r
        assert r["error"].startswith("CheckpointSaveError:") and "rank(s) [1]" in r["error"], r
        message = json.loads((tmp_path / f"termination-{rank}.json").read_text())
        assert message["reason"] == "error" and "CheckpointSaveError" in message["error"], message
