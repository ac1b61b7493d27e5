"""Resume: exact continuation, never from a partial checkpoint, never from corrupted bytes."""

from __future__ import annotations

import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torpor_harness import PLAIN_LOOP, REPO, Recorder, StopAt, child_env, launch_ranks, logs, tiny_setup, wait_all

import torpor
from torpor import _state
from torpor.checkpoints import Reason, scan
from torpor.storage import LocalStorage


def seeded_run(directory: Path, epochs: int, *, stop_at: int | None = None, resume: str | None = None,
               save_steps: int = 5) -> tuple[Recorder, torpor.CheckpointMonitor]:
    """One training run in this process, every generator seeded the same way."""
    net, loss, opt, loader = tiny_setup()
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=7, gamma=0.5)
    torch.manual_seed(123)
    random.seed(123)
    np.random.seed(123)
    recorder = Recorder()
    info = ["epoch_num", {"tag": "run", "t": torch.ones(2)}]
    monitor = torpor.CheckpointMonitor(directory=str(directory), save_checkpoint_steps=save_steps,
                                       keep_checkpoint_max=2, append_info=info)
    callbacks: list[torpor.Callback] = [monitor, recorder]
    if stop_at is not None:
        callbacks.append(StopAt(stop_at))
    torpor.Model(net, loss_fn=loss, optimizer=opt, lr_scheduler=sched).train(epochs, loader, callbacks=callbacks,
                                                                             resume=resume)
    return recorder, monitor


def test_resume_latest_continues_exactly_mid_epoch(tmp_path: Path) -> None:
    reference, _ = seeded_run(tmp_path / "ref", 3)
    first, _ = seeded_run(tmp_path / "run", 3, stop_at=11)  # 8 steps per epoch: stops in epoch 2
    assert first.steps[-1] == 11
    second, monitor = seeded_run(tmp_path / "run", 3, resume="latest")
    assert second.steps == list(range(12, 25))
    assert {**first.losses, **second.losses} == reference.losses  # bit for bit, step by step
    # retention kept 2 (the resume source is protected and was the final save of run one)
    names = [c.name for c in scan(LocalStorage(tmp_path / "run")) if c.complete]
    assert "CKP-3_8" in names and len(names) <= 3
    assert monitor.deleted


def test_load_checkpoint_returns_metadata_and_append_info(tmp_path: Path) -> None:
    seeded_run(tmp_path, 1, save_steps=4)
    loaded = torpor.load_checkpoint("latest", directory=str(tmp_path), restore_rng=False)
    assert loaded is not None and loaded.name == "CKP-1_8" and loaded.manifest.reason is Reason.PERIODIC
    assert loaded.append_info["epoch_num"] == 1 and loaded.append_info["tag"] == "run"
    torch.testing.assert_close(loaded.append_info["t"], torch.ones(2))
    assert torpor.load_checkpoint("latest", directory=str(tmp_path / "empty")) is None
    with pytest.raises(torpor.CheckpointNotFoundError, match="no complete checkpoint"):
        torpor.load_checkpoint("latest", directory=str(tmp_path / "empty"), required=True)
    with pytest.raises(torpor.CheckpointNotFoundError, match="'CKP-9_9' not found"):
        torpor.load_checkpoint("CKP-9_9", directory=str(tmp_path))
    by_path = torpor.load_checkpoint(str(tmp_path / "rank_0" / "CKP-1_4.ckpt"), restore_rng=False)
    assert by_path is not None and by_path.step == 4


HISTORY_RANK = Path(__file__).resolve().parent / "procs" / "history_rank.py"


def fake_rank(monkeypatch: pytest.MonkeyPatch, rank: int, world: int) -> None:
    """Make this process read as one rank of ``world`` for loading (no process group needed)."""
    monkeypatch.setenv("RANK", str(rank))
    monkeypatch.setenv("WORLD_SIZE", str(world))
    monkeypatch.setenv("TORPOR_TERMINATION_LOG", "/dev/null")


def two_rank_history(tmp_path: Path, integrated: bool = True) -> list[torch.Tensor]:
    """Two real gloo ranks train 8 steps, saving at 4 and 8: two complete 2-rank checkpoints.

    Real processes in one process group, so the saves' collectives and rank 0's retention run
    as in a job (every rank's manifest exists before rank 0 prunes). Returns each rank's final
    first-layer weights.
    """
    logdir = tmp_path / "logs"
    logdir.mkdir()
    layout = "integrated" if integrated else "sharded"
    path = os.pathsep.join([str(REPO / "runtime"), str(REPO / "hack"), str(HISTORY_RANK.parents[1]),
                            os.environ.get("PYTHONPATH", "")])
    procs = launch_ranks(2, {"PYTHONPATH": path}, [str(tmp_path), layout, str(logdir)], logdir, script=HISTORY_RANK)
    assert wait_all(procs, logdir, timeout=180) == [0, 0], logs(logdir)
    return [torch.load(logdir / f"weights-{rank}.pt", weights_only=True) for rank in (0, 1)]


def test_a_partial_checkpoint_is_never_resumed_from(tmp_path: Path) -> None:
    two_rank_history(tmp_path)
    assert [c.name for c in scan(LocalStorage(tmp_path)) if c.complete] == ["CKP-1_4", "CKP-1_8"]
    (tmp_path / "rank_1" / "CKP-1_8.manifest.json").unlink()  # rank 1 died before finishing its save

    loaded = torpor.load_checkpoint("latest", directory=str(tmp_path), restore_rng=False)
    assert loaded is not None and loaded.name == "CKP-1_4"
    with pytest.raises(torpor.IncompleteCheckpointError, match=r"'CKP-1_8' .* incomplete .* ranks \[1\]"):
        torpor.load_checkpoint("CKP-1_8", directory=str(tmp_path))


def test_a_corrupted_shard_is_refused(tmp_path: Path) -> None:
    two_rank_history(tmp_path)
    assert [c.name for c in scan(LocalStorage(tmp_path)) if c.complete] == ["CKP-1_4", "CKP-1_8"]
    shard = tmp_path / "rank_0" / "CKP-1_8.ckpt"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x01  # one flipped bit
    shard.write_bytes(bytes(data))
    net, *_ = tiny_setup()
    before = net[0].weight.detach().clone()
    with pytest.raises(torpor.IntegrityError, match=r"rank_0/CKP-1_8.ckpt: sha256 .* refusing to load"):
        torpor.load_checkpoint("CKP-1_8", net, directory=str(tmp_path))  # named in code: that one or an error
    torch.testing.assert_close(net[0].weight, before)  # nothing was loaded
    with pytest.warns(torpor.TorporWarning, match=r"'CKP-1_8' .* could not be loaded .* 'CKP-1_4'"):
        loaded = torpor.load_checkpoint("latest", net, directory=str(tmp_path), restore_rng=False)
    assert loaded is not None and loaded.name == "CKP-1_4"  # 'latest' falls back to the next older one


def test_replicated_state_is_written_once(tmp_path: Path) -> None:
    two_rank_history(tmp_path, integrated=True)
    rank0 = _state.decode((tmp_path / "rank_0" / "CKP-1_8.ckpt").read_bytes())
    rank1 = _state.decode((tmp_path / "rank_1" / "CKP-1_8.ckpt").read_bytes())
    assert {"model", "optimizer"} <= set(rank0) and not {"model", "optimizer"} & set(rank1)
    assert "rng" in rank1  # each rank's own generators and loop position are still saved


def test_sharded_state_is_written_and_restored_per_rank(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    weights = two_rank_history(tmp_path, integrated=False)
    for rank in (0, 1):
        fake_rank(monkeypatch, rank, 2)
        net, *_ = tiny_setup(seed=42)
        loaded = torpor.load_checkpoint("CKP-1_8", net, directory=str(tmp_path), restore_rng=False)
        assert loaded is not None and loaded.manifest.replicated_rank is None and loaded.manifest.rank == rank
        torch.testing.assert_close(net[0].weight, weights[rank])


def test_plain_loop_example_saves_and_resumes(tmp_path: Path) -> None:
    env = child_env({"TORPOR_CHECKPOINT_URI": str(tmp_path / "ck"), "TORPOR_SAVE_STEPS": "20"})
    first = subprocess.run([sys.executable, str(PLAIN_LOOP)], env=env, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr
    assert "done at step 80, started from scratch" in first.stdout
    second = subprocess.run([sys.executable, str(PLAIN_LOOP)], env=env, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stderr
    assert "started from CKP-5_16" in second.stdout
    added = [line for line in PLAIN_LOOP.read_text().splitlines() if line.rstrip().endswith("# torpor")]
    assert len(added) <= 5
