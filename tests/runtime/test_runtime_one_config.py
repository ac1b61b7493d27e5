"""One configuration for both callbacks: one directory, one cipher, exit-save-only jobs, the
export after the checkpoint, ``saved_network`` beside (never instead of) the trained weights."""

from __future__ import annotations

import copy
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torpor_harness import (
    KillInStep,
    Recorder,
    StopAt,
    child_env,
    launch_ranks,
    logs,
    read_jsonl,
    tiny_setup,
    wait_all,
    wait_for,
)

import torpor
from torpor.checkpoints import Checkpoint, Reason, delete_checkpoints, scan
from torpor.crypto import is_encrypted
from torpor.storage import LocalStorage

PROCS = Path(__file__).resolve().parent / "procs"
KEY = bytes(range(16))


def complete(directory: Path) -> list[Checkpoint]:
    return [c for c in scan(LocalStorage(directory)) if c.complete]


def exit_checkpoint(directory: Path) -> Checkpoint:
    (found,) = [c for c in complete(directory) if c.manifests[0].reason is Reason.EXIT]
    return found


def stop(procs: list[subprocess.Popen[bytes]]) -> None:
    """Kill and reap ranks still running (a failed test leaves no process behind)."""
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.wait(timeout=30)


def train(callbacks: list[torpor.Callback], *, resume: str | None = None, epochs: int = 3) -> torch.nn.Module:
    net, loss, opt, loader = tiny_setup()
    torpor.Model(net, loss_fn=loss, optimizer=opt).train(epochs, loader, callbacks=callbacks, resume=resume,
                                                         exit_process=False)
    return net


# -- item 10: one directory -------------------------------------------------------------
def test_both_callbacks_default_to_one_directory_and_resume_takes_the_newer_exit_save(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    train([torpor.OnRequestExit(save_export=False), torpor.CheckpointMonitor(save_checkpoint_steps=4),
           KillInStep(6)])
    assert not (tmp_path / "rank_0").exists()  # nothing written into the working directory itself
    assert exit_checkpoint(tmp_path / "checkpoints").step == 6

    recorder = Recorder()
    train([torpor.OnRequestExit(save_export=False), torpor.CheckpointMonitor(save_checkpoint_steps=4), recorder,
           StopAt(8)], resume="latest")
    assert recorder.steps == [7, 8]  # from the exit save at step 6, not the periodic one at 4


def test_on_request_exit_alone_saves_and_resumes_under_the_checkpoint_root(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    train([torpor.OnRequestExit(save_export=False), KillInStep(3)])
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoints"]
    loop = torpor.Loop(torch.nn.Linear(6, 2), callbacks=torpor.OnRequestExit(), resume="latest")
    assert loop.shared.directory == "./checkpoints"


# -- item 9: a key on either callback seals every checkpoint ------------------------------
@pytest.mark.parametrize("keyed", ["monitor", "exit"])
def test_a_key_on_either_callback_seals_the_exit_and_the_periodic_saves(tmp_path: Path, keyed: str) -> None:
    ck = tmp_path / "ck"

    def callbacks() -> list[torpor.Callback]:
        key = {"enc_key": KEY, "enc_mode": "AES-CBC"}
        return [torpor.OnRequestExit(directory=str(ck), save_export=False, **(key if keyed == "exit" else {})),
                torpor.CheckpointMonitor(directory=str(ck), save_checkpoint_steps=4,
                                         **(key if keyed == "monitor" else {}))]

    train([*callbacks(), KillInStep(6)])
    checkpoints = complete(ck)
    assert {c.name for c in checkpoints} >= {"CKP-1_4"} and exit_checkpoint(ck).step == 6
    for c in checkpoints:
        manifest = c.manifests[0]
        assert manifest.extra.get("encryption") == "AES-CBC", c.name
        for entry in manifest.files:
            assert is_encrypted((ck / entry.key).read_bytes()), entry.key

    recorder = Recorder()
    train([*callbacks(), recorder, StopAt(7)], resume="latest")
    assert recorder.steps == [7]


# -- item 5: a job that saves only when asked to stop ------------------------------------
def test_exit_save_only_job_stops_on_sigterm_saves_once_and_resumes(tmp_path: Path) -> None:
    ck = tmp_path / "ck"
    common = {"TORPOR_JOB": "ns/exit-only", "TORPOR_CHECKPOINT_URI": str(ck),
              "TORPOR_SAVE_STEPS": "0", "TORPOR_SAVE_SECONDS": "0", "TORPOR_KEEP_MAX": "5"}
    run1 = tmp_path / "run1"
    run1.mkdir()
    losses1 = run1 / "losses.jsonl"
    procs = launch_ranks(2, {**common, "TORPOR_INCARNATION": "1"},
                         ["--epochs", "3", "--samples", "160", "--losses", str(losses1), "--step-delay", "0.01"],
                         run1)
    try:
        wait_for(lambda: any(r["rank"] == 1 and r["step"] >= 5 for r in read_jsonl(losses1))
                 or any(p.poll() is not None for p in procs), timeout=180, what="rank 1 to reach step 5")
        assert all(p.poll() is None for p in procs), logs(run1)
        os.kill(procs[1].pid, signal.SIGTERM)
        codes = wait_all(procs, run1)
    finally:
        stop(procs)
    assert codes == [143, 143], logs(run1)
    stop_step = json.loads((run1 / "termination-0.json").read_text())["step"]
    (only,) = complete(ck)  # no periodic save: the exit save is the one checkpoint
    assert only.manifests[0].reason is Reason.EXIT and only.step == stop_step < 30

    run2 = tmp_path / "run2"
    run2.mkdir()
    losses2 = run2 / "losses.jsonl"
    procs = launch_ranks(2, {**common, "TORPOR_INCARNATION": "2"},
                         ["--epochs", "3", "--samples", "160", "--losses", str(losses2)], run2)
    try:
        codes = wait_all(procs, run2)
    finally:
        stop(procs)
    assert codes == [0, 0], logs(run2)
    steps = sorted({r["step"] for r in read_jsonl(losses2)})
    assert steps == list(range(stop_step + 1, 31))  # 160 samples, 2 ranks, batch 8: 10 steps per epoch
    # The natural end writes one final checkpoint (the trained result), still nothing periodic.
    assert sorted((c.manifests[0].reason, c.step) for c in complete(ck)) == [(Reason.EXIT, stop_step),
                                                                             (Reason.FINAL, 30)]


# -- item 11: the export comes after the checkpoint ---------------------------------------
def test_a_sigkill_during_the_export_leaves_a_complete_loadable_checkpoint(tmp_path: Path) -> None:
    ck, marker, release = tmp_path / "ck", tmp_path / "exporting", tmp_path / "release"
    log = tmp_path / "run.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, str(PROCS / "slow_export_run.py"), str(ck), str(marker),
                                 str(release)], env=child_env({}), stdout=out, stderr=subprocess.STDOUT, cwd=tmp_path)
    try:
        wait_for(lambda: marker.exists() or proc.poll() is not None, timeout=120, what="the export to start")
        assert proc.poll() is None, log.read_text(errors="replace")
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    found = exit_checkpoint(ck)
    assert found.step == 3
    assert not list((ck / "rank_0").glob("*.pt2"))  # the export never finished ...
    net = torch.nn.Sequential(torch.nn.Linear(6, 12), torch.nn.ReLU(), torch.nn.Linear(12, 2))
    loaded = torpor.load_checkpoint(found.name, None, directory=str(ck), restore_rng=False)
    assert loaded is not None and loaded.step == 3  # ... and the checkpoint loads all the same
    state = torch.load(ck / found.manifests[0].shard.key, weights_only=True)["model"]
    net.load_state_dict({k.removeprefix("body."): v for k, v in state.items()})


def test_the_export_is_written_after_the_manifest_and_deleted_with_its_checkpoint(tmp_path: Path) -> None:
    ck = tmp_path / "ck"
    train([torpor.OnRequestExit(directory=str(ck)), KillInStep(3)])
    found = exit_checkpoint(ck)
    (pt2,) = (ck / "rank_0").glob("*.pt2")
    assert pt2.name == f"{found.name}.pt2" and f"rank_0/{pt2.name}" in found.keys  # grouped with its checkpoint
    assert all(not e.key.endswith(".pt2") for e in found.manifests[0].files)  # completeness never waits for it
    assert pt2.stat().st_mtime_ns >= (ck / "rank_0" / f"{found.name}.manifest.json").stat().st_mtime_ns
    torch.export.load(str(pt2))
    delete_checkpoints(LocalStorage(ck), [found])  # what retention (runtime or operator) does with it
    assert not pt2.exists() and not list((ck / "rank_0").iterdir())


# -- item 12: saved_network is an extra file; save_ckpt=False leaves the monitor alone -----
def test_saved_network_is_an_extra_file_and_resume_gets_the_trained_weights(tmp_path: Path) -> None:
    net, loss, opt, loader = tiny_setup()
    ema = copy.deepcopy(net)
    with torch.no_grad():
        for p in ema.parameters():
            p.fill_(0.5)
    monitor = torpor.CheckpointMonitor(directory=str(tmp_path), save_checkpoint_steps=4, saved_network=ema)
    torpor.Model(net, loss_fn=loss, optimizer=opt).train(1, loader, callbacks=[monitor, StopAt(4)])
    assert monitor.saved == ["CKP-1_4"]

    fresh = tiny_setup(seed=1)[0]
    torpor.load_checkpoint("latest", fresh, directory=str(tmp_path), restore_rng=False)
    for name, value in fresh.state_dict().items():
        torch.testing.assert_close(value, net.state_dict()[name])  # the trained weights, not the EMA
    extra = torch.load(tmp_path / "rank_0" / "CKP-1_4.network.pt", weights_only=True)["model"]
    for name, value in extra.items():
        torch.testing.assert_close(value, ema.state_dict()[name])


def test_exit_without_its_own_save_leaves_the_monitor_its_final_save(tmp_path: Path) -> None:
    monitor = torpor.CheckpointMonitor(directory=str(tmp_path), save_checkpoint_steps=100)
    train([torpor.OnRequestExit(save_ckpt=False, save_export=False), monitor, KillInStep(5)])
    assert monitor.saved == ["CKP-1_5"]
    (only,) = complete(tmp_path)
    assert (only.manifests[0].reason, only.step) == (Reason.FINAL, 5)
