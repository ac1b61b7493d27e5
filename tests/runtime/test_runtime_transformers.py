"""torpor.transformers with the real Hugging Face ``Trainer`` (issue 14, item 3).

Two gloo ranks on CPU train ``examples/hf_train.py``'s tiny GPT-2 (built from a config, no
download), started as torchrun or the operator would start them (``RANK``, ``WORLD_SIZE``,
``MASTER_ADDR``...). A real SIGTERM (``os.kill`` inside a step) or the GracefulExit file on
one rank must stop both after the same step with the Trainer's checkpoint stored as torpor
partitions, and a resume from ``TORPOR_RESUME_FROM`` must continue exactly as an uninterrupted
run: the same losses step by step and the same final weights.
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path
from typing import Any

import pytest
import torch
from torpor_harness import REPO, launch_ranks, logs, read_jsonl, wait_all

from torpor.checkpoints import Reason, scan
from torpor.storage import LocalStorage, open_storage

HF_RANK = REPO / "tests" / "runtime" / "procs" / "hf_rank.py"
STEPS = 10
STOP_AT = 4  # rank 1's SIGTERM, inside this step
SAVED_AT = STOP_AT + 1  # the stop: step 4's check is read at step 5 (agree_late), on both ranks


def run(tmp: Path, tag: str, env: dict[str, str], *argv: str,
        rank_env: dict[int, dict[str, str]] | None = None) -> tuple[list[int], Path]:
    """Two ranks of ``procs/hf_rank.py`` with the checkpoint root ``tmp/ckpt``; their codes and log dir."""
    logdir = tmp / tag
    logdir.mkdir()
    procs = launch_ranks(2, {"TORPOR_CHECKPOINT_URI": str(tmp / "ckpt"), **env},
                         ["--output-dir", str(logdir / "out"), "--losses", str(logdir / "losses.jsonl"),
                          "--max-steps", str(STEPS), *argv], logdir, script=HF_RANK, rank_env=rank_env)
    return wait_all(procs, logdir, timeout=120), logdir


def messages(logdir: Path) -> list[dict[str, Any]]:
    return [json.loads((logdir / f"termination-{rank}.json").read_text()) for rank in range(2)]


@pytest.fixture(scope="module")
def stopped(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[int], Path]:
    """One run under the operator whose rank 1 gets SIGTERM inside step ``STOP_AT``."""
    tmp = tmp_path_factory.mktemp("hf")
    codes, logdir = run(tmp, "stopped", {"TORPOR_JOB": "ns/hf"}, "--kill-at", str(STOP_AT), "--rank", "1")
    return tmp, codes, logdir


def test_sigterm_on_rank_1_stops_both_ranks_at_one_step_saved_and_exits_143(
        stopped: tuple[Path, list[int], Path]) -> None:
    tmp, codes, logdir = stopped
    assert codes == [128 + signal.SIGTERM] * 2, logs(logdir)
    first, second = messages(logdir)
    name = f"hf-1_{SAVED_AT}"
    for rank, message in enumerate((first, second)):
        assert {k: message[k] for k in ("reason", "exit_code", "signal", "checkpoint", "step", "rank", "job")} == {
            "reason": "signal", "exit_code": 143, "signal": "SIGTERM", "checkpoint": name, "step": SAVED_AT,
            "rank": rank, "job": "ns/hf"}
    assert (first["local"], second["local"]) == (False, True)  # rank 0 followed rank 1's signal
    [ckpt] = [c for c in scan(LocalStorage(tmp / "ckpt")) if c.name == name]
    assert ckpt.complete and ckpt.resumable, ckpt.problem
    assert {r: (m.step, m.reason) for r, m in ckpt.manifests.items()} == {0: (SAVED_AT, Reason.EXIT),
                                                                            1: (SAVED_AT, Reason.EXIT)}
    # the Trainer's own checkpoint, as each rank wrote it: never training_args.bin (a pickle)
    files = {r: m.extra["files"] for r, m in ckpt.manifests.items()}
    assert {"model.safetensors", "optimizer.pt", "scheduler.pt", "trainer_state.json", "rng_state_0.pth"} \
        <= set(files[0]) and "training_args.bin" not in files[0]
    assert files[1] == ["rng_state_1.pth"]
    assert [r["step"] for r in read_jsonl(logdir / "losses.jsonl")] == list(range(1, SAVED_AT + 1))


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The same training without a stop, in a root of its own, also storing HF's periodic saves
    (``save_steps`` 5): its log dir and its ``--final`` prefix."""
    tmp = tmp_path_factory.mktemp("hf-plain")
    codes, logdir = run(tmp, "plain", {}, "--final", str(tmp / "final"), "--save-steps", "5")
    assert codes == [0, 0], logs(logdir)
    periodic = {c.name: (c.complete, {m.reason for m in c.manifests.values()}) for c in
                scan(LocalStorage(tmp / "ckpt"))}
    assert periodic == {"hf-1_5": (True, {Reason.PERIODIC}), "hf-1_10": (True, {Reason.PERIODIC})}
    return logdir, tmp / "final"


def assert_resumed_like_uninterrupted(stopped_dir: Path, resumed_dir: Path, resumed_final: Path,
                                      uninterrupted: tuple[Path, Path]) -> None:
    """Losses and learning rates step by step, then weights, trainer state, scheduler, optimizer, RNG."""
    plain_dir, plain_final = uninterrupted
    expected = read_jsonl(plain_dir / "losses.jsonl")
    before, after = read_jsonl(stopped_dir / "losses.jsonl"), read_jsonl(resumed_dir / "losses.jsonl")
    # the resumed Trainer continued at the stored global step (trainer_state.json), it did not start over
    assert [r["step"] for r in before] == list(range(1, SAVED_AT + 1))
    assert [r["step"] for r in after] == list(range(SAVED_AT + 1, STEPS + 1))
    assert [r["step"] for r in expected] == list(range(1, STEPS + 1))
    for want, have in zip(expected, before + after, strict=True):
        # the loss needs the model, the optimizer's moments and the dropout generators back; the LR the scheduler
        assert have["loss"] == pytest.approx(want["loss"], rel=1e-5), f"loss at step {want['step']}"
        assert have["learning_rate"] == pytest.approx(want["learning_rate"], rel=1e-5), f"lr at step {want['step']}"
    for rank in range(2):
        want_w = torch.load(f"{plain_final}-{rank}.pt", weights_only=True)
        have_w = torch.load(f"{resumed_final}-{rank}.pt", weights_only=True)
        assert want_w.keys() == have_w.keys()
        for key in want_w:
            torch.testing.assert_close(have_w[key], want_w[key], rtol=1e-5, atol=1e-7, msg=key)
        want, have = (json.loads(Path(f"{final}-{rank}.json").read_text()) for final in (plain_final, resumed_final))
        # global_step from trainer_state, the LR from scheduler.pt, Adam's step count from optimizer.pt (a fresh
        # optimizer would count only the resumed steps), this rank's generator from its rng_state_{rank}.pth
        assert want["global_step"] == have["global_step"] == STEPS and want["optimizer_steps"] == [STEPS]
        assert have["last_lr"] == pytest.approx(want["last_lr"], rel=1e-6)
        assert (have["optimizer_steps"], have["cpu_rng"]) == (want["optimizer_steps"], want["cpu_rng"]), rank


def test_resume_from_torpor_resume_from_matches_an_uninterrupted_run(
        stopped: tuple[Path, list[int], Path], uninterrupted: tuple[Path, Path]) -> None:
    tmp, codes, stopped_dir = stopped
    assert codes == [143, 143], logs(stopped_dir)
    name = f"hf-1_{SAVED_AT}"
    resumed_codes, resumed = run(tmp, "resumed", {"TORPOR_JOB": "ns/hf", "TORPOR_RESUME_FROM": name},
                                 "--final", str(tmp / "resumed-final"))
    assert resumed_codes == [0, 0], logs(resumed)
    for message in messages(resumed):
        assert (message["reason"], message["step"], message["resumed_from"]) == ("completed", STEPS, name)
    assert_resumed_like_uninterrupted(stopped_dir, resumed, tmp / "resumed-final", uninterrupted)


@pytest.mark.s3
def test_encrypted_in_s3_a_stop_on_rank_1_resumes_like_an_uninterrupted_run(
        s3_bucket: str, tmp_path: Path, uninterrupted: tuple[Path, Path]) -> None:
    uri = f"s3://{s3_bucket}/jobs/hf"
    key_file = tmp_path / "key"
    key_file.write_bytes(os.urandom(32))  # a mounted Secret holds the raw key bytes
    env = {"TORPOR_JOB": "ns/hf", "TORPOR_CHECKPOINT_URI": uri, "TORPOR_ENC_KEY_FILE": str(key_file),
           "TORPOR_ENC_MODE": "AES-GCM"}
    codes, stopped_dir = run(tmp_path, "stopped", env, "--kill-at", str(STOP_AT), "--rank", "1")
    assert codes == [143, 143], logs(stopped_dir)
    name = f"hf-1_{SAVED_AT}"
    assert {m["checkpoint"] for m in messages(stopped_dir)} == {name}
    store = open_storage(uri)
    [ckpt] = scan(store)
    assert ckpt.name == name and ckpt.complete and ckpt.resumable, ckpt.problem
    for manifest in ckpt.manifests.values():
        assert manifest.extra["encryption"] == "AES-GCM" and manifest.auth
        sealed = store.get_bytes(manifest.shard.key)
        assert sealed.startswith(b"TORPENC") and b"trainer_state" not in sealed and b"global_step" not in sealed
    assert key_file.read_bytes().hex() not in logs(stopped_dir)

    resumed_codes, resumed = run(tmp_path, "resumed", {**env, "TORPOR_RESUME_FROM": name},
                                 "--final", str(tmp_path / "resumed-final"))
    assert resumed_codes == [0, 0], logs(resumed)
    assert {m["resumed_from"] for m in messages(resumed)} == {name}
    assert_resumed_like_uninterrupted(stopped_dir, resumed, tmp_path / "resumed-final", uninterrupted)


def test_graceful_exit_file_of_rank_1_alone_stops_both_ranks_at_one_step_with_75(tmp_path: Path) -> None:
    # each rank watches a file of its own (as each pod has its own), and only rank 1's says GracefulExit
    files = {rank: tmp_path / f"exit-{rank}.json" for rank in range(2)}
    codes, logdir = run(tmp_path, "file", {"TORPOR_JOB": "ns/hf"}, "--exit-file-at", "3", "--rank", "1",
                        rank_env={rank: {"TORPOR_EXIT_FILE": str(path)} for rank, path in files.items()})
    assert codes == [75, 75], logs(logdir)
    assert not files[0].exists() and json.loads(files[1].read_text()) == {"GracefulExit": 1}
    first, second = messages(logdir)
    assert {m["reason"] for m in (first, second)} == {"file"} and first["step"] == second["step"]
    assert (first["local"], second["local"]) == (False, True)  # rank 0 followed rank 1's file
    step = first["step"]
    assert 4 <= step <= 5  # written in step 3, seen by the watcher (10 ms polls) by the next check, read one later
    [ckpt] = scan(LocalStorage(tmp_path / "ckpt"))
    assert ckpt.complete and ckpt.step == step and ckpt.name == f"hf-1_{step}" == first["checkpoint"]
    assert {r: (m.step, m.reason) for r, m in ckpt.manifests.items()} == {0: (step, Reason.EXIT),
                                                                            1: (step, Reason.EXIT)}


@pytest.mark.parametrize(("kwargs", "field"), [
    ({"check_every_n_steps": 0}, "check_every_n_steps must be an int >= 1, got 0"),
    ({"save_periodic": "yes"}, "save_periodic must be a bool, got 'yes'"),
    ({"sig": signal.SIGKILL}, "sig=SIGKILL"),
    ({"file_name": "a/b"}, "file_name='a/b'"),
    ({"file_poll_seconds": -1}, "file_poll_seconds must be a number > 0, got -1"),
    ({"exit_process": "no"}, "exit_process must be a bool or None, got 'no'"),
    ({"agree_late": 1}, "agree_late must be a bool, got 1"),
])
def test_bad_arguments_name_the_field_and_value(kwargs: dict[str, Any], field: str) -> None:
    from torpor.transformers import TorporCallback

    with pytest.raises(ValueError, match=field):
        TorporCallback(**kwargs)


def test_bad_exit_check_steps_in_the_environment_names_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    from torpor.transformers import TorporCallback

    monkeypatch.setenv("TORPOR_EXIT_CHECK_STEPS", "zero")
    with pytest.raises(ValueError, match=r"TORPOR_EXIT_CHECK_STEPS.*zero"):
        TorporCallback.from_env()
