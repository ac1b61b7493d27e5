"""``torpor.lightning`` under real Lightning: DDP strategy, two gloo processes on the CPU, real signals.

A stop requested on rank 1 alone (a SIGTERM from ``os.kill`` inside a step, or the GracefulExit
file) stops both ranks after the same step, each writes its own ``rank_{r}/`` part of one
checkpoint of Lightning's state, and both exit as torpor's own loop does under the operator
(143 or 75, with the termination message). The resumed run, started as the operator starts it
(``TORPOR_RESUME_FROM``), trains exactly the steps an uninterrupted run trains, with the same
losses and the same final weights. With ``TORPOR_SAVE_STEPS`` set (as the operator sets it) the
callback also saves periodically, at the same steps on both ranks, and a run resumed from such a
periodic checkpoint matches the uninterrupted one too.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
from pathlib import Path
from typing import Any

import pytest
import torch
from torpor_harness import launch_ranks, logs, read_jsonl, wait_all

from torpor.checkpoints import Reason, scan
from torpor.storage import open_storage
from torpor.termination import TerminationMessage

RANK = Path(__file__).parent / "procs" / "lightning_rank.py"
SAMPLES, BATCH, EPOCHS = 160, 8, 3  # 10 steps per epoch on each of 2 ranks: 30 steps
STEPS = SAMPLES // (2 * BATCH) * EPOCHS
STOP_AT = 14  # the signal: in epoch 2's 4th step
SAVED_AT = STOP_AT + 1  # the stop: the check of step 14 is read at step 15 (agree_late), mid-epoch 2
EXIT_SAVE = "Net-2_5"


def _run(logdir: Path, ckpt: Path | str, argv: list[str], env: dict[str, str] | None = None,
         rank_env: dict[int, dict[str, str]] | None = None) -> list[int]:
    logdir.mkdir(parents=True, exist_ok=True)
    # As torchrun starts two processes on one node (the harness sets RANK = LOCAL_RANK).
    common = {"LOCAL_WORLD_SIZE": "2", "TORPOR_JOB": "lt", "TORPOR_CHECKPOINT_URI": str(ckpt),
              "TORPOR_INCARNATION": "1", "TORPOR_SAVE_STEPS": "5", **(env or {})}
    procs = launch_ranks(2, common, ["--samples", str(SAMPLES), "--batch-size", str(BATCH), "--epochs",
                                     str(EPOCHS), "--losses", str(logdir / "losses.jsonl"),
                                     "--weights", str(logdir / "weights-{rank}.pt"), *argv],
                         logdir, script=RANK, rank_env=rank_env)
    return wait_all(procs, logdir, timeout=150)


def _message(logdir: Path, rank: int) -> TerminationMessage:
    return TerminationMessage.from_json((logdir / f"termination-{rank}.json").read_text())


def _losses(logdir: Path) -> dict[tuple[int, int], float]:
    return {(line["rank"], line["step"]): line["loss"] for line in read_jsonl(logdir / "losses.jsonl")}


@pytest.fixture(scope="module")
def stopped(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A run stopped by SIGTERM to rank 1 inside step ``STOP_AT``, and an uninterrupted run."""
    root = tmp_path_factory.mktemp("lightning")
    first = root / "first"
    codes = _run(first, root / "ckpt", ["--signal-at", str(STOP_AT), "--signal-rank", "1"])
    # as it was after the stop (the resumes below add checkpoints, and retention prunes old ones)
    shutil.copytree(root / "ckpt", root / "ckpt-after-stop")
    return {"root": root, "first": first, "codes": codes}


@pytest.fixture(scope="module")
def straight(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same training, uninterrupted: its losses and final weights."""
    root = tmp_path_factory.mktemp("lightning-straight")
    assert _run(root / "run", root / "ckpt", []) == [0, 0], logs(root / "run")
    return root / "run"


def _assert_matches(straight: Path, before: Path, after: Path, resumed_at: int) -> None:
    """The steps up to ``resumed_at`` from ``before``, the rest from ``after``: the uninterrupted run's."""
    expected = _losses(straight)
    assert len(expected) == 2 * STEPS
    resumed = {**{k: v for k, v in _losses(before).items() if k[1] <= resumed_at}, **_losses(after)}
    assert min(step for _, step in _losses(after)) == resumed_at + 1  # no step trained twice
    assert sorted(resumed) == sorted(expected)
    for key, loss in expected.items():
        assert resumed[key] == pytest.approx(loss, rel=1e-5), key
    for rank in (0, 1):
        got, want = torch.load(after / f"weights-{rank}.pt"), torch.load(straight / f"weights-{rank}.pt")
        assert got.keys() == want.keys()
        for name in want:
            torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-7, msg=name)


def test_sigterm_on_rank_1_saves_every_rank_at_one_step_and_exits_143(stopped: dict[str, Any]) -> None:
    first = stopped["first"]
    assert stopped["codes"] == [143, 143], logs(first)
    messages = [_message(first, rank) for rank in (0, 1)]
    for rank, message in enumerate(messages):
        assert message.reason == "signal" and message.signal == "SIGTERM", message
        assert message.exit_code == 143 and message.step == SAVED_AT and message.rank == rank, message
        assert message.world_size == 2 and message.job == "lt", message
    assert messages[0].checkpoint == messages[1].checkpoint == EXIT_SAVE
    assert (messages[0].local, messages[1].local) == (False, True)  # only rank 1 got the signal
    found = {c.name: c for c in scan(open_storage(str(stopped["root"] / "ckpt")))}
    # the periodic saves (TORPOR_SAVE_STEPS=5) of both ranks, then the exit save, nothing after it
    assert sorted((c.step, c.name) for c in found.values() if c.complete) == [
        (5, "CKP-1_5"), (10, "CKP-1_10"), (SAVED_AT, EXIT_SAVE)], found
    ckpt = found[EXIT_SAVE]
    parts = sorted((m.rank, m.step, m.reason.value) for m in ckpt.manifests.values())
    assert parts == [(0, SAVED_AT, "exit"), (1, SAVED_AT, "exit")]
    # both ranks trained exactly the steps up to the stop, none after it
    assert max(step for _, step in _losses(first)) == SAVED_AT, logs(first)
    assert not (first / "weights-0.pt").exists()  # the process ended at the stop, fit never returned


def test_the_run_resumed_from_torpor_resume_from_matches_an_uninterrupted_one(stopped: dict[str, Any],
                                                                               straight: Path) -> None:
    root, first = stopped["root"], stopped["first"]
    assert stopped["codes"] == [143, 143], logs(first)
    second = root / "second"
    codes = _run(second, root / "ckpt", [], {"TORPOR_RESUME_FROM": EXIT_SAVE, "TORPOR_INCARNATION": "2"})
    assert codes == [0, 0], logs(second)
    assert [_message(second, r).reason for r in (0, 1)] == ["completed", "completed"]
    assert _message(second, 0).resumed_from == EXIT_SAVE
    _assert_matches(straight, first, second, SAVED_AT)


def test_a_run_resumed_from_a_periodic_checkpoint_matches_an_uninterrupted_one(stopped: dict[str, Any],
                                                                              straight: Path) -> None:
    root, first = stopped["root"], stopped["first"]
    assert stopped["codes"] == [143, 143], logs(first)
    third = root / "from-periodic"
    # CKP-1_5: step 5, in the middle of epoch 1, written by the monitor (TORPOR_SAVE_STEPS=5)
    codes = _run(third, root / "ckpt-after-stop", [], {"TORPOR_RESUME_FROM": "CKP-1_5", "TORPOR_INCARNATION": "2"})
    assert codes == [0, 0], logs(third)
    assert _message(third, 0).resumed_from == "CKP-1_5"
    _assert_matches(straight, first, third, 5)
    # its last step saved once, by the periodic save at step 30 (no final save of the same step beside it)
    last = [c for c in scan(open_storage(str(root / "ckpt-after-stop"))) if c.step == STEPS]
    assert [(c.name, c.complete, sorted(c.manifests)) for c in last] == [("CKP-3_10", True, [0, 1])], last


@pytest.mark.s3
def test_encrypted_in_s3_a_stop_on_rank_1_resumes_like_an_uninterrupted_one(s3_bucket: str, tmp_path: Path,
                                                                            straight: Path) -> None:
    uri = f"s3://{s3_bucket}/jobs/lt"
    key_file = tmp_path / "key"
    key_file.write_bytes(os.urandom(32))  # a mounted Secret holds the raw key bytes
    env = {"TORPOR_ENC_KEY_FILE": str(key_file), "TORPOR_ENC_MODE": "AES-GCM"}
    first, second = tmp_path / "first", tmp_path / "second"
    codes = _run(first, uri, ["--signal-at", str(STOP_AT), "--signal-rank", "1"], env)
    assert codes == [143, 143], logs(first)
    assert {_message(first, rank).checkpoint for rank in (0, 1)} == {EXIT_SAVE}
    store = open_storage(uri)
    found = {c.name: c for c in scan(store)}
    assert {"CKP-1_5", "CKP-1_10", EXIT_SAVE} <= set(found), found  # the periodic saves are sealed too
    for ckpt in found.values():
        assert ckpt.complete and ckpt.resumable and sorted(ckpt.manifests) == [0, 1], ckpt.problem
        for manifest in ckpt.manifests.values():
            assert manifest.extra["encryption"] == "AES-GCM" and manifest.auth, manifest
            sealed = store.get_bytes(manifest.shard.key)
            # Lightning's own keys never appear in the clear
            assert sealed.startswith(b"TORPENC") and b"optimizer_states" not in sealed and b"loops" not in sealed
    assert key_file.read_bytes().hex() not in logs(first)

    codes = _run(second, uri, [], {**env, "TORPOR_RESUME_FROM": EXIT_SAVE, "TORPOR_INCARNATION": "2"})
    assert codes == [0, 0], logs(second)
    assert {_message(second, rank).resumed_from for rank in (0, 1)} == {EXIT_SAVE}
    _assert_matches(straight, first, second, SAVED_AT)


def test_the_exit_file_of_rank_1_alone_stops_every_rank_at_one_step_with_75(tmp_path: Path) -> None:
    # each rank watches a file of its own (a ConfigMap reaches one node first): only rank 1's is written
    files = {rank: tmp_path / f"graceful-exit-{rank}.json" for rank in (0, 1)}
    for path in files.values():
        path.write_text(json.dumps({"GracefulExit": 0}))
    codes = _run(tmp_path / "run", tmp_path / "ckpt", ["--exit-file-at", "6"],
                 rank_env={rank: {"TORPOR_EXIT_FILE": str(path)} for rank, path in files.items()})
    assert codes == [75, 75], logs(tmp_path / "run")
    assert json.loads(files[0].read_text()) == {"GracefulExit": 0}
    messages = [_message(tmp_path / "run", rank) for rank in (0, 1)]
    assert [m.reason for m in messages] == ["file", "file"]
    assert (messages[0].local, messages[1].local) == (False, True)  # rank 0 stopped on rank 1's request
    assert messages[0].step == messages[1].step == 7  # written in step 6, read one check later
    ckpt = next(c for c in scan(open_storage(str(tmp_path / "ckpt"))) if c.name == messages[0].checkpoint)
    assert ckpt.complete
    assert {m.step for m in ckpt.manifests.values()} == {messages[0].step}


def test_seconds_saves_are_agreed_so_both_ranks_save_at_the_same_steps(tmp_path: Path) -> None:
    # Each rank's clock decides alone when an interval is over; the agreement makes it every rank's.
    codes = _run(tmp_path / "run", tmp_path / "ckpt", ["--step-delay", "0.1", "--epochs", "2"],
                 {"TORPOR_SAVE_STEPS": "", "TORPOR_SAVE_SECONDS": "1"})
    assert codes == [0, 0], logs(tmp_path / "run")
    found = scan(open_storage(str(tmp_path / "ckpt")))
    periodic = [c for c in found if {m.reason for m in c.manifests.values()} == {Reason.PERIODIC}]
    assert periodic, found  # 19 delays of 0.1 s before step 20: an interval of 1 s passed
    for ckpt in found:
        assert ckpt.complete and sorted(ckpt.manifests) == [0, 1], ckpt
        assert len({m.step for m in ckpt.manifests.values()}) == 1, ckpt


def test_an_exception_in_a_step_ends_every_rank_with_exit_1_and_an_error_message(tmp_path: Path) -> None:
    # a crash is not a stop: no exit save, the `error` message the operator counts as a failure
    codes = _run(tmp_path / "run", tmp_path / "ckpt", ["--raise-at", "7"], {"TORPOR_SAVE_STEPS": ""})
    assert codes == [1, 1], logs(tmp_path / "run")
    for rank in (0, 1):
        message = _message(tmp_path / "run", rank)
        assert (message.reason, message.exit_code, message.rank) == ("error", 1, rank), message
        assert message.error == "RuntimeError: a bug in step 7 of rank " + str(rank), message
    assert not [c for c in scan(open_storage(str(tmp_path / "ckpt"))) if c.complete]


def test_the_only_collective_of_a_step_is_torpors_one_check(tmp_path: Path) -> None:
    # Lightning's own per-step broadcast of rank 0's SIGTERM flag is switched off, and torpor adds
    # one all-reduce per check (started at one check, read at the next): one per step at k=1.
    counts = tmp_path / "collectives-{rank}.json"
    codes = _run(tmp_path / "run", tmp_path / "ckpt", ["--collectives", str(counts)], {"TORPOR_SAVE_STEPS": ""})
    assert codes == [0, 0], logs(tmp_path / "run")
    for rank in (0, 1):
        seen = json.loads(Path(str(counts).format(rank=rank)).read_text())
        steps = seen.pop("steps")
        assert steps == STEPS, seen
        assert seen == {**dict.fromkeys(seen, 0), "all_reduce": steps}, (rank, seen)


@pytest.mark.parametrize(("kwargs", "field"), [
    ({"check_every_n_steps": 0}, "check_every_n_steps must be an int >= 1, got 0"),
    ({"sig": signal.SIGKILL}, "sig=SIGKILL cannot be caught"),
    ({"save_export": True}, "save_export=True is not supported"),
    ({"resume": 3}, "resume must be 'latest', a checkpoint name or path, or None, got 3"),
    ({"lightning_broadcast": "no"}, "lightning_broadcast must be a bool, got 'no'"),
    ({"file_name": "a/b"}, "file_name='a/b' is not a valid checkpoint name"),
    ({"resume": ""}, "resume must be 'latest', a checkpoint name or path, or None, got ''"),
    ({"exit": 5}, "exit must be a torpor.OnRequestExit or None, got 5"),
    ({"agree_late": "yes"}, "agree_late must be a bool, got 'yes'"),
    ({"directory": 7}, "directory"),
    ({"file_poll_seconds": -1}, "file_poll_seconds"),
    ({"exit_process": "no"}, "exit_process"),
])
def test_bad_options_name_the_field_and_value(kwargs: dict[str, Any], field: str) -> None:
    import torpor.lightning

    with pytest.raises(ValueError, match=field.replace("(", r"\(").replace(")", r"\)")):
        torpor.lightning.OnRequestExit(**kwargs)


def test_from_env_adds_the_monitor_only_when_periodic_saves_are_asked_for(monkeypatch: pytest.MonkeyPatch,
                                                                         tmp_path: Path) -> None:
    import torpor.lightning

    monkeypatch.setenv("TORPOR_CHECKPOINT_URI", str(tmp_path))
    for name in ("TORPOR_SAVE_STEPS", "TORPOR_SAVE_SECONDS"):
        monkeypatch.delenv(name, raising=False)
    assert torpor.lightning.OnRequestExit.from_env().monitor is None  # by hand: no save every step by surprise
    given = torpor.lightning.OnRequestExit.from_env(save_checkpoint_steps=7, prefix="run")
    assert (given.monitor.prefix, given.monitor.config.save_checkpoint_steps) == ("run", 7)
    monkeypatch.setenv("TORPOR_SAVE_STEPS", "0")  # as the operator sets it without spec.checkpoint.saveSteps
    monitor = torpor.lightning.OnRequestExit.from_env().monitor
    assert monitor is not None and not monitor.config.periodic  # the final save only
    monkeypatch.setenv("TORPOR_SAVE_STEPS", "20")
    callback = torpor.lightning.OnRequestExit.from_env()
    assert callback.monitor.config.save_checkpoint_steps == 20
    assert callback.monitor.directory == callback.exit.directory == str(tmp_path)
    with pytest.raises(TypeError, match="'save_every'"):
        torpor.lightning.OnRequestExit.from_env(save_every=3)
    with pytest.raises(ValueError, match=r"monitor must be a torpor\.CheckpointMonitor or None, got 5"):
        torpor.lightning.OnRequestExit(monitor=5)


@pytest.mark.parametrize(("environ", "message"), [
    ({"WORLD_SIZE": "3", "LOCAL_WORLD_SIZE": "2"}, "WORLD_SIZE=3 is not a multiple of LOCAL_WORLD_SIZE=2"),
    ({"WORLD_SIZE": "two"}, "WORLD_SIZE must be a positive int, got 'two'"),
])
def test_bad_launcher_variables_name_the_variable_and_value(environ: dict[str, str], message: str) -> None:
    import torpor.lightning

    with pytest.raises(ValueError, match=message):
        torpor.lightning.distributed_kwargs(environ)
    assert torpor.lightning.distributed_kwargs({"WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "2"}) == {"devices": 2,
                                                                                                 "num_nodes": 2}
