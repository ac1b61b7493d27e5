"""exception_save: a breakpoint checkpoint is written and the original exception reaches the caller."""

from __future__ import annotations

import signal
import traceback
from pathlib import Path

import pytest
import torch
from torpor_harness import tiny_setup

import torpor
from torpor.checkpoints import Manifest, Reason


class Boom(RuntimeError):
    """The user's own error type."""


def explode_in_user_code(step: int) -> None:
    raise Boom(f"loss went NaN at step {step}")


class ExplodeAt(torpor.Callback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_step_begin(self, run_context: torpor.RunContext) -> None:
        if run_context.original_args().cur_step_num == self.step:
            explode_in_user_code(self.step)


def assert_breakpoint(directory: Path, name: str, step: int) -> None:
    rank_dir = directory / "rank_0"
    assert (rank_dir / f"{name}.ckpt").is_file()
    manifest = Manifest.from_json((rank_dir / f"{name}.manifest.json").read_text())
    assert (manifest.reason, manifest.step, manifest.name) == (Reason.EXCEPTION, step, name)
    restored, _, _, _ = tiny_setup(seed=1)
    loaded = torpor.load_checkpoint(name, restored, directory=str(directory), restore_rng=False)
    assert loaded is not None and loaded.step == step


def test_model_train_writes_the_breakpoint_and_reraises_the_original(tmp_path: Path) -> None:
    net, loss, opt, loader = tiny_setup()
    monitor = torpor.CheckpointMonitor(directory=str(tmp_path), save_checkpoint_steps=100, exception_save=True)
    exit_cb = torpor.OnRequestExit()  # writes where the monitor does
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(Boom, match="loss went NaN at step 11") as info:
        torpor.Model(net, loss_fn=loss, optimizer=opt).train(3, loader, callbacks=[monitor, exit_cb, ExplodeAt(11)])
    assert type(info.value) is Boom
    frames = [f.name for f in traceback.extract_tb(info.value.__traceback__)]
    assert frames[-2:] == ["on_train_step_begin", "explode_in_user_code"]  # where it was raised, intact
    assert any("CKP-2_2_breakpoint" in note for note in info.value.__notes__)
    # 8 steps per epoch: step 11 (epoch 2, its 3rd) failed, so 10 steps are done, 2 of epoch 2
    assert_breakpoint(tmp_path, "CKP-2_2_breakpoint", 10)
    assert signal.getsignal(signal.SIGTERM) == before  # OnRequestExit put the handler back


def test_plain_loop_form_writes_the_breakpoint_and_reraises(tmp_path: Path) -> None:
    net, loss_fn, opt, loader = tiny_setup()
    monitor = torpor.CheckpointMonitor(directory=str(tmp_path), save_checkpoint_steps=100, exception_save=True)
    with pytest.raises(ZeroDivisionError) as info, torpor.Loop(net, opt, callbacks=[monitor]) as loop:
        for _ in loop.epochs(2):
            for x, y in loop.batches(loader):
                opt.zero_grad()
                loss = loss_fn(net(x), y)
                loss.backward()
                opt.step()
                if loop.args.cur_step_num == 5:
                    _ = 1 / 0
                loop.step_end(loss)
    assert str(info.value) == "division by zero"
    assert traceback.extract_tb(info.value.__traceback__)[-1].line == "_ = 1 / 0"
    assert_breakpoint(tmp_path, "CKP-1_4_breakpoint", 4)  # step 5 never reached step_end: 4 are done


def test_a_failing_breakpoint_save_never_replaces_the_original_exception(tmp_path: Path) -> None:
    blocked = tmp_path / "not-a-dir"
    blocked.write_text("x")
    net, loss, opt, loader = tiny_setup()
    monitor = torpor.CheckpointMonitor(directory=str(blocked), save_checkpoint_steps=100, exception_save=True)
    with pytest.raises(Boom) as info:
        torpor.Model(net, loss_fn=loss, optimizer=opt).train(1, loader, callbacks=[monitor, ExplodeAt(2)])
    assert any("could not be saved" in note for note in info.value.__notes__)


def test_without_exception_save_nothing_is_written(tmp_path: Path) -> None:
    net, loss, opt, loader = tiny_setup()
    monitor = torpor.CheckpointMonitor(directory=str(tmp_path), save_checkpoint_steps=100)
    with pytest.raises(Boom):
        torpor.Model(net, loss_fn=loss, optimizer=opt).train(1, loader, callbacks=[monitor, ExplodeAt(2)])
    assert not (tmp_path / "rank_0").exists()
    assert torch.is_tensor(net[0].weight)
