"""Checkpoints are never overwritten, a bad newest one is never the end (issue 10, items 1-4, 6).

Real signals, real processes, 2 real gloo ranks for the "every rank loads the same one" case.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torpor_harness import (
    REPO,
    KillInStep,
    Recorder,
    child_env,
    flip_a_byte,
    launch_ranks,
    logs,
    read_jsonl,
    tiny_setup,
    wait_all,
)

import torpor
from torpor.checkpoints import Manifest, Reason, scan
from torpor.storage import LocalStorage

EXIT_TWICE = REPO / "tests" / "runtime" / "procs" / "exit_twice.py"



class ExplodeAt(torpor.Callback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_step_begin(self, run_context: torpor.RunContext) -> None:
        if run_context.original_args().cur_step_num == self.step:
            raise RuntimeError(f"loss went NaN at step {self.step}")


def complete_names(directory: Path) -> list[str]:
    return [c.name for c in scan(LocalStorage(directory)) if c.complete]


def test_a_resumed_runs_second_stop_leaves_the_first_exit_checkpoint_intact(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TORPOR_JOB", raising=False)
    for stop in (3, 6):  # 8 steps per epoch: both stops in epoch 1
        net, loss, opt, loader = tiny_setup()
        exit_cb = torpor.OnRequestExit(directory=str(tmp_path), save_export=False)
        torpor.Model(net, loss_fn=loss, optimizer=opt).train(2, loader, callbacks=[exit_cb, KillInStep(stop)],
                                                             resume="latest")
        message = exit_cb.stop_message
        assert message is not None and (message.checkpoint, message.step) == (f"Net-1_{stop}", stop)
    assert message.resumed_from == "Net-1_3"  # what the second run actually loaded
    assert complete_names(tmp_path) == ["Net-1_3", "Net-1_6"]
    restored, *_ = tiny_setup(seed=7)
    first = torpor.load_checkpoint("Net-1_3", restored, directory=str(tmp_path), restore_rng=False)
    assert first is not None and (first.step, first.manifest.reason) == (3, Reason.EXIT)


def test_a_kill_part_way_through_the_second_exit_save_leaves_the_first_one_to_resume(tmp_path: Path) -> None:
    env = child_env({"PYTHONPATH": os.pathsep.join([str(REPO / "runtime"), str(REPO / "hack")])})
    first = subprocess.run([sys.executable, str(EXIT_TWICE), str(tmp_path), "--stop-at", "3"], env=env,
                           capture_output=True, text=True, timeout=120)
    assert first.returncode == 0 and "saved Net-1_3" in first.stdout, first.stderr
    second = subprocess.run([sys.executable, str(EXIT_TWICE), str(tmp_path), "--stop-at", "6", "--kill-after-shard"],
                            env=env, capture_output=True, text=True, timeout=120)
    assert second.returncode == -signal.SIGKILL, second.stderr
    by_name = {c.name: c for c in scan(LocalStorage(tmp_path))}
    assert by_name["Net-1_3"].complete and not by_name["Net-1_6"].complete  # never a complete-looking mix
    loaded = torpor.load_checkpoint("latest", directory=str(tmp_path), restore_rng=False)
    assert loaded is not None and (loaded.name, loaded.step) == ("Net-1_3", 3)


def two_checkpoints(directory: Path) -> None:
    """CKP-1_4 and CKP-1_8 of one single-process run."""
    net, loss, opt, loader = tiny_setup()
    monitor = torpor.CheckpointMonitor(directory=str(directory), save_checkpoint_steps=4, save_network_params=False)
    torpor.Model(net, loss_fn=loss, optimizer=opt).train(1, loader, callbacks=monitor)
    assert complete_names(directory) == ["CKP-1_4", "CKP-1_8"]


def test_resume_from_env_falls_back_to_the_next_older_complete_one(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    two_checkpoints(tmp_path)
    flip_a_byte(tmp_path / "rank_0" / "CKP-1_8.ckpt")
    monkeypatch.setenv("TORPOR_RESUME_FROM", "CKP-1_8")  # the operator's choice, unloadable
    net, *_ = tiny_setup(seed=3)
    with pytest.warns(torpor.TorporWarning, match=r"'CKP-1_8' .* could not be loaded .*IntegrityError.* 'CKP-1_4'"):
        loaded = torpor.load_checkpoint("latest", net, directory=str(tmp_path), restore_rng=False)
    assert loaded is not None and (loaded.name, loaded.step, loaded.skipped) == ("CKP-1_4", 4, ("CKP-1_8",))
    monkeypatch.delenv("TORPOR_RESUME_FROM")
    with pytest.warns(torpor.TorporWarning, match="trying the next older complete checkpoint 'CKP-1_4'"):
        latest = torpor.load_checkpoint("latest", directory=str(tmp_path), restore_rng=False)
    assert latest is not None and latest.name == "CKP-1_4"
    # A name the user wrote in code means that one: it raises rather than load another.
    with pytest.raises(torpor.IntegrityError, match=r"rank_0/CKP-1_8.ckpt: sha256"):
        torpor.load_checkpoint("CKP-1_8", directory=str(tmp_path), restore_rng=False)


def test_two_gloo_ranks_fall_back_together_when_one_ranks_newest_shard_is_bad(tmp_path: Path) -> None:
    ck = tmp_path / "ck"
    env = {"TORPOR_CHECKPOINT_URI": str(ck), "TORPOR_SAVE_STEPS": "4"}
    run1, run2 = tmp_path / "run1", tmp_path / "run2"
    run1.mkdir()
    run2.mkdir()
    procs = launch_ranks(2, env, ["--max-steps", "8", "--losses", str(run1 / "losses.jsonl")], run1)
    assert wait_all(procs, run1) == [0, 0], logs(run1)
    assert complete_names(ck) == ["CKP-1_4", "CKP-1_8"]
    flip_a_byte(ck / "rank_1" / "CKP-1_8.ckpt")  # only rank 1 cannot read its part

    procs = launch_ranks(2, env, ["--max-steps", "10", "--losses", str(run2 / "losses.jsonl")], run2)
    assert wait_all(procs, run2) == [0, 0], logs(run2)
    resumed = read_jsonl(run2 / "losses.jsonl")
    for rank in (0, 1):
        steps = [r["step"] for r in resumed if r["rank"] == rank]
        assert steps == list(range(5, 11)), logs(run2)  # both ranks loaded CKP-1_4
        log = (run2 / f"rank-{rank}.log").read_text()
        assert "'CKP-1_8'" in log and "'CKP-1_4' instead" in log, log
    before = {(r["rank"], r["step"]): r["loss"] for r in read_jsonl(run1 / "losses.jsonl")}
    after = {(r["rank"], r["step"]): r["loss"] for r in resumed}
    for key in [(rank, step) for rank in (0, 1) for step in range(5, 9)]:
        assert after[key] == pytest.approx(before[key], rel=1e-5)  # the same state on both ranks


def test_a_breakpoint_counts_only_completed_steps_and_is_not_latest(tmp_path: Path) -> None:
    net, loss, opt, loader = tiny_setup()
    monitor = torpor.CheckpointMonitor(directory=str(tmp_path), save_checkpoint_steps=4, exception_save=True,
                                       save_network_params=False)
    with pytest.raises(RuntimeError, match="step 6"):
        torpor.Model(net, loss_fn=loss, optimizer=opt).train(2, loader, callbacks=[monitor, ExplodeAt(6)])
    manifest = Manifest.from_json((tmp_path / "rank_0" / "CKP-1_5_breakpoint.manifest.json").read_text())
    assert (manifest.reason, manifest.step, manifest.step_in_epoch) == (Reason.EXCEPTION, 5, 5)
    latest = torpor.load_checkpoint("latest", directory=str(tmp_path), restore_rng=False)
    assert latest is not None and latest.name == "CKP-1_4"
    named = torpor.load_checkpoint("CKP-1_5_breakpoint", directory=str(tmp_path), restore_rng=False)
    assert named is not None and named.step == 5


def test_a_second_monitors_retention_and_another_experiments_checkpoints_are_kept_apart(tmp_path: Path) -> None:
    net, loss, opt, loader = tiny_setup()
    main = torpor.CheckpointMonitor(directory=str(tmp_path), save_checkpoint_steps=2, keep_checkpoint_max=5,
                                    save_network_params=False)
    best = torpor.CheckpointMonitor(prefix="best", directory=str(tmp_path), save_checkpoint_steps=3,
                                    keep_checkpoint_max=1, save_network_params=False)
    torpor.Model(net, loss_fn=loss, optimizer=opt).train(1, loader, callbacks=[main, best])
    names = complete_names(tmp_path)
    assert [n for n in names if n.startswith("CKP")] == ["CKP-1_2", "CKP-1_4", "CKP-1_6", "CKP-1_8"]
    assert [n for n in names if n.startswith("best")] == ["best-1_8"]

    other, *_ = tiny_setup(seed=5)  # another experiment, same directory, newer checkpoints
    mon = torpor.CheckpointMonitor(prefix="other", directory=str(tmp_path), save_checkpoint_steps=8,
                                   save_network_params=False)
    other_opt = torch.optim.SGD(other.parameters(), lr=0.1)
    torpor.Model(other, loss_fn=loss, optimizer=other_opt).train(2, loader, callbacks=mon)
    net, loss, opt, loader = tiny_setup()
    recorder = Recorder()
    mine = torpor.CheckpointMonitor(directory=str(tmp_path), save_checkpoint_steps=100, save_network_params=False)
    ctx = torpor.Model(net, loss_fn=loss, optimizer=opt).train(2, loader, callbacks=[mine, recorder], resume="latest")
    assert ctx.original_args().resumed_from.name == "CKP-1_8" and recorder.steps[0] == 9
    assert "other-2_8" in complete_names(tmp_path)  # and nobody pruned the other experiment


def test_a_newest_checkpoint_that_does_not_decrypt_falls_back_to_an_older_one(tmp_path: Path) -> None:
    old_key, new_key = os.urandom(16), os.urandom(16)
    for key, epochs in ((old_key, 1), (new_key, 1)):  # a second, fresh run sealed with a rotated key
        net, loss, opt, loader = tiny_setup()
        monitor = torpor.CheckpointMonitor(directory=str(tmp_path), save_checkpoint_steps=4, keep_checkpoint_max=0,
                                           enc_key=key)
        torpor.Model(net, loss_fn=loss, optimizer=opt).train(epochs, loader, callbacks=monitor)
    newest_first = sorted((c for c in scan(LocalStorage(tmp_path)) if c.complete), key=lambda c: -c.modified)
    sealed_with_new = [c.name for c in newest_first[:2]]
    net, *_ = tiny_setup(seed=3)
    with pytest.warns(torpor.TorporWarning, match=r"could not be loaded .*IntegrityError"):
        loaded = torpor.load_checkpoint("latest", net, directory=str(tmp_path), restore_rng=False, enc_key=old_key)
    assert loaded is not None and loaded.name == "CKP-1_8" and set(loaded.skipped) == set(sealed_with_new)
