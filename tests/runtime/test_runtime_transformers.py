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
import signal
from pathlib import Path
from typing import Any

import pytest
import torch
from torpor_harness import REPO, launch_ranks, logs, read_jsonl, wait_all

from torpor.checkpoints import Reason, scan
from torpor.storage import LocalStorage

HF_RANK = REPO / "tests" / "runtime" / "procs" / "hf_rank.py"
STEPS = 10
STOP_AT = 4


def run(tmp: Path, tag: str, env: dict[str, str], *argv: str) -> tuple[list[int], Path]:
    """Two ranks of ``procs/hf_rank.py`` with the checkpoint root ``tmp/ckpt``; their codes and log dir."""
    logdir = tmp / tag
    logdir.mkdir()
    procs = launch_ranks(2, {"TORPOR_CHECKPOINT_URI": str(tmp / "ckpt"), **env},
                         ["--output-dir", str(logdir / "out"), "--losses", str(logdir / "losses.jsonl"),
                          "--max-steps", str(STEPS), *argv], logdir, script=HF_RANK)
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
    name = f"hf-1_{STOP_AT}"
    for rank, message in enumerate((first, second)):
        assert {k: message[k] for k in ("reason", "exit_code", "signal", "checkpoint", "step", "rank", "job")} == {
            "reason": "signal", "exit_code": 143, "signal": "SIGTERM", "checkpoint": name, "step": STOP_AT,
            "rank": rank, "job": "ns/hf"}
    assert (first["local"], second["local"]) == (False, True)  # rank 0 followed rank 1's signal
    [ckpt] = [c for c in scan(LocalStorage(tmp / "ckpt")) if c.name == name]
    assert ckpt.complete and ckpt.resumable, ckpt.problem
    assert {r: (m.step, m.reason) for r, m in ckpt.manifests.items()} == {0: (STOP_AT, Reason.EXIT),
                                                                            1: (STOP_AT, Reason.EXIT)}
    # the Trainer's own checkpoint, as each rank wrote it: never training_args.bin (a pickle)
    files = {r: m.extra["files"] for r, m in ckpt.manifests.items()}
    assert {"model.safetensors", "optimizer.pt", "scheduler.pt", "trainer_state.json", "rng_state_0.pth"} \
        <= set(files[0]) and "training_args.bin" not in files[0]
    assert files[1] == ["rng_state_1.pth"]
    assert [r["step"] for r in read_jsonl(logdir / "losses.jsonl")] == list(range(1, STOP_AT + 1))


def test_resume_from_torpor_resume_from_matches_an_uninterrupted_run(stopped: tuple[Path, list[int], Path]) -> None:
    tmp, codes, stopped_dir = stopped
    assert codes == [143, 143], logs(stopped_dir)
    name = f"hf-1_{STOP_AT}"
    resumed_codes, resumed = run(tmp, "resumed", {"TORPOR_JOB": "ns/hf", "TORPOR_RESUME_FROM": name},
                                 "--final", str(tmp / "resumed-final"))
    assert resumed_codes == [0, 0], logs(resumed)
    for message in messages(resumed):
        assert (message["reason"], message["step"], message["resumed_from"]) == ("completed", STEPS, name)
    # the uninterrupted run, in a root of its own, also stores HF's periodic saves (save_steps)
    plain_codes, plain = run(tmp / "resumed", "plain", {"TORPOR_CHECKPOINT_URI": str(tmp / "plain-ckpt")},
                             "--final", str(tmp / "plain-final"), "--save-steps", "5")
    assert plain_codes == [0, 0], logs(plain)
    periodic = {c.name: (c.complete, {m.reason for m in c.manifests.values()}) for c in
                scan(LocalStorage(tmp / "plain-ckpt"))}
    assert periodic == {"hf-1_5": (True, {Reason.PERIODIC}), "hf-1_10": (True, {Reason.PERIODIC})}

    expected = {r["step"]: r["loss"] for r in read_jsonl(plain / "losses.jsonl")}
    got = {r["step"]: r["loss"] for path in (stopped_dir, resumed) for r in read_jsonl(path / "losses.jsonl")}
    assert sorted(got) == sorted(expected) == list(range(1, STEPS + 1))
    for step in expected:
        assert got[step] == pytest.approx(expected[step], rel=1e-5), f"step {step}"
    for rank in range(2):
        want = torch.load(tmp / f"plain-final-{rank}.pt", weights_only=True)
        have = torch.load(tmp / f"resumed-final-{rank}.pt", weights_only=True)
        assert want.keys() == have.keys()
        for key in want:
            torch.testing.assert_close(have[key], want[key], rtol=1e-5, atol=1e-7, msg=key)


def test_graceful_exit_file_on_rank_0_stops_both_ranks_with_75(tmp_path: Path) -> None:
    exit_file = tmp_path / "exit.json"
    codes, logdir = run(tmp_path, "file", {"TORPOR_JOB": "ns/hf", "TORPOR_EXIT_FILE": str(exit_file)},
                        "--exit-file-at", "3", "--rank", "0")
    assert codes == [75, 75], logs(logdir)
    steps = {m["step"] for m in messages(logdir)}
    assert len(steps) == 1 and {m["reason"] for m in messages(logdir)} == {"file"}
    [step] = steps
    assert step >= 3  # the watcher polls every 10 ms: the step after the write at the latest, on both ranks
    [ckpt] = scan(LocalStorage(tmp_path / "ckpt"))
    assert ckpt.complete and ckpt.step == step and ckpt.name == f"hf-1_{step}"


@pytest.mark.parametrize(("kwargs", "field"), [
    ({"check_every_n_steps": 0}, "check_every_n_steps must be an int >= 1, got 0"),
    ({"save_periodic": "yes"}, "save_periodic must be a bool, got 'yes'"),
    ({"sig": signal.SIGKILL}, "sig=SIGKILL"),
    ({"file_name": "a/b"}, "file_name='a/b'"),
    ({"file_poll_seconds": -1}, "file_poll_seconds must be a number > 0, got -1"),
    ({"exit_process": "no"}, "exit_process must be a bool or None, got 'no'"),
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
