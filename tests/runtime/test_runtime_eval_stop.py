"""A stop that arrives during ``Model.eval``: training's state is saved, never evaluation's.

Real signals: the process sends itself SIGTERM from inside an evaluation step, as a kubelet
would at any moment; the evaluation runs inside training (a callback that evaluates after
every epoch, the usual "validate each epoch" set-up) or on its own.
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset
from torpor_harness import KillInStep, Recorder, launch_ranks, logs, read_jsonl, tiny_setup, wait_all

import torpor
from torpor.checkpoints import Reason, scan
from torpor.storage import LocalStorage

EPOCHS, STEPS_PER_EPOCH = 4, 8  # tiny_setup: 64 samples, batches of 8


def valid_loader() -> DataLoader:
    """Four evaluation batches: an evaluation's own step counter runs 1..4."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(32, 6, generator=g)
    return DataLoader(TensorDataset(x, (x[:, 0] > 0).long()), batch_size=8)


class EvalEachEpoch(torpor.Callback):
    """Validates after every training epoch with the run's own callbacks (as users do)."""

    order = 10

    def __init__(self, model: torpor.Model, callbacks: list[torpor.Callback]) -> None:
        self.model, self.callbacks, self.data = model, callbacks, valid_loader()
        self.results: list[dict[str, float]] = []

    def on_train_epoch_end(self, run_context: torpor.RunContext) -> None:
        self.results.append(self.model.eval(self.data, callbacks=self.callbacks))


class KillInEval(torpor.Callback):
    """Sends this process a real signal inside evaluation step ``step`` of evaluation ``call``."""

    def __init__(self, call: int, step: int, sig: int = signal.SIGTERM) -> None:
        self.call, self.step, self.sig, self.calls = call, step, sig, 0

    def on_eval_begin(self, run_context: torpor.RunContext) -> None:
        self.calls += 1

    def on_eval_step_begin(self, run_context: torpor.RunContext) -> None:
        if self.calls == self.call and run_context.original_args().cur_step_num == self.step:
            os.kill(os.getpid(), self.sig)




def _train(directory: Path, extra: list[torpor.Callback], resume: str | None = None,
           **kwargs: Any) -> tuple[torpor.RunContext, Recorder, torpor.OnRequestExit, EvalEachEpoch]:
    net, loss, opt, loader = tiny_setup()
    model = torpor.Model(net, loss_fn=loss, optimizer=opt)
    exit_cb = torpor.OnRequestExit(directory=str(directory), save_export=False)
    recorder = Recorder()
    evaluator = EvalEachEpoch(model, [exit_cb, *extra])
    ctx = model.train(EPOCHS, loader, callbacks=[exit_cb, recorder, evaluator, *extra], resume=resume, **kwargs)
    return ctx, recorder, exit_cb, evaluator


def test_sigterm_during_a_nested_eval_saves_training_state_and_resume_runs_the_rest(
        tmp_path: Path, previous_handler: list[int], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TORPOR_JOB", raising=False)
    ck = tmp_path / "ck"
    _, recorder, exit_cb, evaluator = _train(ck, [KillInEval(call=2, step=2)])

    # Training stopped after the epoch whose evaluation was interrupted, and said so.
    assert recorder.steps == list(range(1, 2 * STEPS_PER_EPOCH + 1))
    assert len(evaluator.results) == 2 and previous_handler == [signal.SIGTERM]
    assert exit_cb.stop_message is not None
    assert (exit_cb.stop_message.step, exit_cb.stop_message.epoch) == (2 * STEPS_PER_EPOCH, 2)
    (ckpt,) = scan(LocalStorage(ck))
    assert ckpt.complete and ckpt.manifests[0].reason == Reason.EXIT
    # Training's counters, not the evaluation's (eval step 2, epoch 0).
    assert (ckpt.epoch, ckpt.step) == (2, 2 * STEPS_PER_EPOCH)
    assert ckpt.manifests[0].step_in_epoch == STEPS_PER_EPOCH

    _, resumed, _, _ = _train(ck, [], resume="latest")
    assert resumed.steps == list(range(2 * STEPS_PER_EPOCH + 1, EPOCHS * STEPS_PER_EPOCH + 1))


def test_a_nested_eval_leaves_the_training_signal_handler_installed(
        tmp_path: Path, previous_handler: list[int], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TORPOR_JOB", raising=False)
    ck = tmp_path / "ck"
    stop_step = 2 * STEPS_PER_EPOCH + 4  # in epoch 3, after two evaluations have come and gone
    _, recorder, _, evaluator = _train(ck, [KillInStep(stop_step)])
    assert recorder.steps[-1] == stop_step, "the SIGTERM after an evaluation did not stop training"
    assert len(evaluator.results) == 3  # epoch 3 still ends (its hooks run after the stop)
    (ckpt,) = scan(LocalStorage(ck))
    assert ckpt.complete and ckpt.step == stop_step
    handler = signal.getsignal(signal.SIGTERM)
    assert callable(handler) and handler.__name__ == "<lambda>"  # the user's handler is back afterwards


def test_sigterm_during_a_standalone_eval_stops_it_without_a_checkpoint(
        tmp_path: Path, previous_handler: list[int], monkeypatch: pytest.MonkeyPatch) -> None:
    log = tmp_path / "termination-log"
    monkeypatch.setenv("TORPOR_JOB", "ns/eval-job")
    monkeypatch.setenv("TORPOR_TERMINATION_LOG", str(log))
    net, loss, opt, _ = tiny_setup()
    model = torpor.Model(net, loss_fn=loss, optimizer=opt)
    exit_cb = torpor.OnRequestExit(directory=str(tmp_path / "ck"))
    steps: list[int] = []

    class Steps(torpor.Callback):
        def on_eval_step_end(self, run_context: torpor.RunContext) -> None:
            steps.append(run_context.original_args().cur_step_num)

    with pytest.raises(SystemExit) as info:
        model.eval(valid_loader(), callbacks=[exit_cb, KillInEval(call=1, step=2), Steps()])
    assert info.value.code == 143
    assert steps == [1, 2]  # the evaluation step in flight finished, no further one began
    # No training ran, so there is nothing to save: no checkpoint with evaluation counters
    # that a later resume='latest' would take for training progress.
    assert not (tmp_path / "ck").exists()
    message = json.loads(log.read_text())
    assert (message["reason"], message["exit_code"], message["signal"]) == ("signal", 143, "SIGTERM")
    assert "checkpoint" not in message and "step" not in message
    assert message["extra"] == {"mode": "eval", "eval_step": 2}
    handler = signal.getsignal(signal.SIGTERM)
    assert callable(handler) and handler.__name__ == "<lambda>"


def test_two_ranks_a_sigterm_to_one_rank_mid_eval_saves_training_state(tmp_path: Path) -> None:
    """Real gloo ranks: rank 1 alone gets SIGTERM inside an evaluation step after epoch 2."""
    script = Path(__file__).parent / "procs" / "eval_each_epoch.py"
    steps_per_epoch, epochs = 4, 3  # 64 samples over 2 ranks in batches of 8
    ck = tmp_path / "ck"
    env = {"TORPOR_JOB": "ns/j", "TORPOR_CHECKPOINT_URI": str(ck), "TORPOR_SAVE_STEPS": "1000"}
    first, second = tmp_path / "first", tmp_path / "second"
    first.mkdir()
    second.mkdir()
    procs = launch_ranks(2, {**env, "TORPOR_INCARNATION": "1", "LOSSES": str(first / "steps.jsonl"),
                             "KILL_RANK": "1", "KILL_EVAL": "2", "KILL_STEP": "2"}, [str(epochs)], first, script=script)
    assert wait_all(procs, first) == [143, 143], logs(first)
    messages = [json.loads((first / f"termination-{r}.json").read_text()) for r in range(2)]
    assert [(m["reason"], m["step"], m["epoch"], m["local"]) for m in messages] == [
        ("signal", 2 * steps_per_epoch, 2, False), ("signal", 2 * steps_per_epoch, 2, True)]
    (saved,) = [c for c in scan(LocalStorage(ck)) if c.name == messages[0]["checkpoint"]]
    assert saved.complete and (saved.epoch, saved.step) == (2, 2 * steps_per_epoch)

    procs = launch_ranks(2, {**env, "TORPOR_INCARNATION": "2", "LOSSES": str(second / "steps.jsonl")},
                         [str(epochs)], second, script=script)
    assert wait_all(procs, second) == [0, 0], logs(second)
    for rank in range(2):
        steps = [line["step"] for line in read_jsonl(second / "steps.jsonl") if line["rank"] == rank]
        assert steps == list(range(2 * steps_per_epoch + 1, epochs * steps_per_epoch + 1)), f"rank {rank}"
