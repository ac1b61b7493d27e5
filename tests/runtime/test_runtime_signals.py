"""Real signals and the GracefulExit file stop training after the current step, with a save."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torpor_harness import TRAIN, KillInStep, Recorder, child_env, read_jsonl, tiny_setup, wait_for

import torpor
from torpor.checkpoints import Manifest, Reason, scan
from torpor.storage import LocalStorage
from torpor.termination import EXIT_FILE_REQUEST


@pytest.fixture
def operator_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Run as under the operator: stops end the process; the termination log in tmp_path."""
    log = tmp_path / "termination-log"
    monkeypatch.setenv("TORPOR_JOB", "test-ns/test-job")
    monkeypatch.setenv("TORPOR_INCARNATION", "1")
    monkeypatch.setenv("TORPOR_TERMINATION_LOG", str(log))
    return log


def test_sigterm_inside_a_step_saves_ckpt_and_pt2_then_exits_143(tmp_path: Path, operator_env: Path) -> None:
    calls: list[int] = []
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: calls.append(signum))
    try:
        net, loss, opt, loader = tiny_setup()
        recorder = Recorder()
        exit_cb = torpor.OnRequestExit(file_name="Tiny", directory=str(tmp_path / "ck"))
        with pytest.raises(SystemExit) as info:
            model = torpor.Model(net, loss_fn=loss, optimizer=opt)
            model.train(5, loader, callbacks=[KillInStep(3), exit_cb, recorder])
        assert info.value.code == 143
        assert recorder.steps == [1, 2, 3]  # the step in flight finished, no further one began
        assert calls == [signal.SIGTERM]  # the earlier handler was chained ...
        handler = signal.getsignal(signal.SIGTERM)
        assert callable(handler) and handler.__name__ == "<lambda>"  # ... and is back in place
    finally:
        signal.signal(signal.SIGTERM, previous)

    rank_dir = tmp_path / "ck" / "rank_0"
    # every save its own name: {file_name}-{epoch}_{step}, never the seed's fixed Tiny.ckpt
    assert {p.name for p in rank_dir.iterdir()} == {"Tiny-1_3.ckpt", "Tiny-1_3.pt2", "Tiny-1_3.manifest.json"}
    manifest = Manifest.from_json((rank_dir / "Tiny-1_3.manifest.json").read_text())
    assert (manifest.reason, manifest.step, manifest.epoch, manifest.world_size) == (Reason.EXIT, 3, 1, 1)
    assert manifest.job == "test-ns/test-job" and manifest.incarnation == "1"
    message = json.loads(operator_env.read_text())
    assert message == {"reason": "signal", "exit_code": 143, "signal": "SIGTERM", "checkpoint": "Tiny-1_3", "step": 3,
                       "epoch": 1, "local": True, "rank": 0, "world_size": 1, "directory": str(tmp_path / "ck"),
                       "job": "test-ns/test-job", "incarnation": "1"}

    program = torch.export.load(str(rank_dir / "Tiny-1_3.pt2"))
    x = torch.randn(4, 6)
    net.eval()
    torch.testing.assert_close(program.module()(x), net(x))
    restored = torch.nn.Sequential(torch.nn.Linear(6, 12), torch.nn.ReLU(), torch.nn.Dropout(0.2),
                                   torch.nn.Linear(12, 2))
    loaded = torpor.load_checkpoint("Tiny-1_3", restored, directory=str(tmp_path / "ck"), restore_rng=False)
    assert loaded is not None and (loaded.name, loaded.step, loaded.step_in_epoch) == ("Tiny-1_3", 3, 3)
    restored.eval()
    torch.testing.assert_close(restored(x), net(x))


def test_without_the_operator_a_stop_just_returns(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TORPOR_JOB", raising=False)
    net, loss, opt, loader = tiny_setup()
    exit_cb = torpor.OnRequestExit(directory=str(tmp_path), save_export=False, sig=signal.SIGUSR1)
    ctx = torpor.Model(net, loss_fn=loss, optimizer=opt).train(3, loader, callbacks=[KillInStep(10, signal.SIGUSR1),
                                                                                    exit_cb])
    assert ctx.original_args().cur_step_num == 10
    assert exit_cb.stop_message is not None and exit_cb.stop_message.exit_code == 128 + signal.SIGUSR1
    assert ctx.exit_code == 128 + signal.SIGUSR1  # why it stopped; exit_process is off, so train() returned
    assert (tmp_path / "rank_0" / "Net-2_2.ckpt").exists() and not (tmp_path / "rank_0" / "Net-2_2.pt2").exists()
    assert signal.getsignal(signal.SIGUSR1) is signal.SIG_DFL


class WriteExitFile(torpor.Callback):
    """Writes the GracefulExit file during a step and waits until the watcher has seen it."""

    def __init__(self, path: Path, step: int, exit_cb: torpor.OnRequestExit) -> None:
        self.path, self.step, self.exit_cb = path, step, exit_cb

    def on_train_step_begin(self, run_context: torpor.RunContext) -> None:
        if run_context.original_args().cur_step_num == self.step:
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text(json.dumps({"GracefulExit": 1}))
            os.replace(tmp, self.path)
            watcher = self.exit_cb._watcher
            assert watcher is not None
            wait_for(lambda: watcher.requested, timeout=10, what="the exit file watcher to see GracefulExit: 1")


def test_exit_file_trigger_saves_and_exits_75(tmp_path: Path, operator_env: Path) -> None:
    exit_file = tmp_path / "graceful-exit.json"
    exit_file.write_text(json.dumps({"GracefulExit": 0}))
    net, loss, opt, loader = tiny_setup()
    recorder = Recorder()
    exit_cb = torpor.OnRequestExit(directory=str(tmp_path / "ck"), config_file=str(exit_file), file_poll_seconds=0.01)
    with pytest.raises(SystemExit) as info:
        torpor.Model(net, loss_fn=loss, optimizer=opt).train(
            5, loader, callbacks=[exit_cb, WriteExitFile(exit_file, 6, exit_cb), recorder])
    assert info.value.code == EXIT_FILE_REQUEST == 75
    assert recorder.steps[-1] == 6
    message = json.loads(operator_env.read_text())
    assert (message["reason"], message["exit_code"], message["checkpoint"]) == ("file", 75, "Net-1_6")
    assert message["step"] == 6
    (ckpt,) = scan(LocalStorage(tmp_path / "ck"))
    assert ckpt.complete and ckpt.name == "Net-1_6" and ckpt.step == 6
    assert (tmp_path / "ck" / "rank_0" / "Net-1_6.pt2").exists()


def test_a_request_already_in_the_file_stops_after_the_first_step(tmp_path: Path, operator_env: Path) -> None:
    exit_file = tmp_path / "exit.json"
    exit_file.write_text('{"GracefulExit": true}')
    net, loss, opt, loader = tiny_setup()
    exit_cb = torpor.OnRequestExit(directory=str(tmp_path), config_file=str(exit_file), save_export=False)
    with pytest.raises(SystemExit) as info:
        torpor.Model(net, loss_fn=loss, optimizer=opt).train(2, loader, callbacks=exit_cb)
    assert info.value.code == 75 and json.loads(operator_env.read_text())["step"] == 1


@pytest.mark.parametrize("content", ["{oops", '["GracefulExit", 1]', None])
def test_malformed_or_missing_exit_file_only_warns(tmp_path: Path, operator_env: Path, content: str | None) -> None:
    exit_file = tmp_path / "exit.json"
    if content is not None:
        exit_file.write_text(content)
    net, loss, opt, loader = tiny_setup()
    recorder = Recorder()
    exit_cb = torpor.OnRequestExit(directory=str(tmp_path / "ck"), config_file=str(exit_file), file_poll_seconds=0.01)
    with pytest.warns(torpor.TorporWarning, match="exit file"):
        torpor.Model(net, loss_fn=loss, optimizer=opt).train(2, loader, callbacks=[exit_cb, recorder],
                                                             exit_process=False)
    assert recorder.steps == list(range(1, 17))  # trained to the end
    assert exit_cb.stop_message is None and not (tmp_path / "ck").exists()


def test_a_failed_export_is_a_warning_and_the_checkpoint_counts(tmp_path: Path, operator_env: Path) -> None:
    class Unexportable(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = torch.nn.Linear(6, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if x.sum() > 0:  # data-dependent control flow: torch.export refuses it
                return self.lin(x)
            return -self.lin(x)

    _, loss, _, loader = tiny_setup()
    net = Unexportable()
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    with pytest.warns(torpor.TorporWarning, match=r"Net-1_2\.pt2 not exported, the checkpoint still counts"), \
            pytest.raises(SystemExit) as info:
        torpor.Model(net, loss_fn=loss, optimizer=opt).train(
            1, loader, callbacks=[KillInStep(2), torpor.OnRequestExit(directory=str(tmp_path))])
    assert info.value.code == 143
    (ckpt,) = scan(LocalStorage(tmp_path))
    assert ckpt.complete and not (tmp_path / "rank_0" / "Net-1_2.pt2").exists()


def test_sigterm_from_a_parent_process(tmp_path: Path) -> None:
    losses = tmp_path / "losses.jsonl"
    log = tmp_path / "termination.json"
    env = child_env({"TORPOR_JOB": "ns/j", "TORPOR_TERMINATION_LOG": str(log),
                     "TORPOR_CHECKPOINT_URI": str(tmp_path / "ck"), "TORPOR_SAVE_STEPS": "1000"})
    proc = subprocess.Popen([sys.executable, str(TRAIN), "--epochs", "100", "--losses", str(losses),
                             "--step-delay", "0.005"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: len(read_jsonl(losses)) >= 10 or proc.poll() is not None, timeout=120,
                 what="ten training steps")
        os.kill(proc.pid, signal.SIGTERM)
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 143, out.decode(errors="replace")
    message = json.loads(log.read_text())
    steps = [line["step"] for line in read_jsonl(losses)]
    name = f"Net-{message['epoch']}_{message['step'] - 60 * (message['epoch'] - 1)}"  # 60 steps per epoch
    assert message["reason"] == "signal" and message["checkpoint"] == name
    assert message["step"] == steps[-1] >= 10  # the step in flight completed, then it stopped
    (ckpt,) = [c for c in scan(LocalStorage(tmp_path / "ck")) if c.name == name]
    assert ckpt.complete and ckpt.step == message["step"]
    assert (tmp_path / "ck" / "rank_0" / f"{name}.pt2").exists()
