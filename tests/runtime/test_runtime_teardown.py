"""The end of a run loses nothing: final and background saves land before handlers go, a
``break`` still finishes them, ``exit_process`` means one thing, and a failed prune or a failed
last background save never costs the last checkpoint."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
from torpor_harness import (
    KillInStep,
    Recorder,
    child_env,
    launch_ranks,
    logs,
    read_jsonl,
    tiny_setup,
    wait_all,
    wait_for,
)

import torpor
from faultproxy import FaultProxy
from s3server import MinioServer
from torpor.checkpoints import scan
from torpor.errors import StorageError
from torpor.storage import LocalStorage, open_storage

PROCS = Path(__file__).parent / "procs"
STEPS_PER_EPOCH = 8  # tiny_setup: 64 samples, batches of 8




@pytest.fixture
def local_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Not under the operator; the termination log (if anything writes one) in tmp_path."""
    log = tmp_path / "termination-log"
    monkeypatch.delenv("TORPOR_JOB", raising=False)
    monkeypatch.setenv("TORPOR_TERMINATION_LOG", str(log))
    return log


def _user_handler_is_back() -> bool:
    handler = signal.getsignal(signal.SIGTERM)
    return callable(handler) and getattr(handler, "__name__", "") == "<lambda>"


class StoreMonitor(torpor.CheckpointMonitor):
    """A monitor writing through a given store object (a wrapper that observes or fails)."""

    def __init__(self, store: LocalStorage, **kwargs: Any) -> None:
        super().__init__(directory=str(store.root), **kwargs)
        self._storage = store


# -- the handler stays until the final save is durable --------------------------------------

def test_a_sigterm_during_the_final_save_does_not_kill_the_run(tmp_path: Path) -> None:
    log = tmp_path / "termination.json"
    env = child_env({"TORPOR_JOB": "ns/j", "TORPOR_TERMINATION_LOG": str(log)})
    proc = subprocess.run([sys.executable, str(PROCS / "final_save_sigterm.py"), str(tmp_path / "ck")], env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=180, check=False)
    out = proc.stdout.decode(errors="replace")
    assert "SIGTERM sent during the final save" in out, out
    assert proc.returncode == 0, f"killed by the SIGTERM that came during the final save ({proc.returncode}):\n{out}"
    assert "training returned" in out
    assert json.loads(log.read_text())["reason"] == "completed"
    (final,) = [c for c in scan(LocalStorage(tmp_path / "ck")) if c.name == "CKP-2_4"]
    assert final.complete and final.step == 8


def _signal_delivered(proc: subprocess.Popen[bytes], signum: int) -> bool:
    """Whether ``signum`` sent to ``proc`` is no longer pending: handled, or the process ended.

    A process a signal killed may still show it pending as a zombie, so ``poll`` (which reaps
    it) comes first."""
    if proc.poll() is not None:
        return True
    try:
        status = Path(f"/proc/{proc.pid}/status").read_text()
    except FileNotFoundError:
        return True
    pending = 0
    for line in status.splitlines():
        field, _, value = line.partition(":")
        if field in ("SigPnd", "ShdPnd"):
            pending |= int(value.strip(), 16)
    return not pending & (1 << (signum - 1))


@pytest.mark.s3
def test_a_sigterm_while_the_last_async_save_drains_at_the_end_does_not_kill_the_run(
        s3_bucket: str, minio: MinioServer, tmp_path: Path) -> None:
    """Two gloo ranks end training (step 20) while the async save of that step is still
    uploading: its manifests wait in a fault proxy. The operator's SIGTERM reaches both ranks
    then. They must wait for the save, end as ``completed`` with exit 0, and leave that
    checkpoint complete and loadable, not die with 143 and no message under a restored SIG_DFL."""
    uri = f"s3://{s3_bucket}/jobs/drain"
    env = {"TORPOR_JOB": "ns/drain", "TORPOR_CHECKPOINT_URI": uri, "TORPOR_SAVE_STEPS": "10",
           "TORPOR_ASYNC_SAVE": "1", **{k: v for k, v in os.environ.items() if k.startswith("AWS_")}}
    last = "CKP-1_20"  # examples/train.py on 2 ranks: 30 steps per epoch
    run = tmp_path / "run"
    run.mkdir()
    with FaultProxy("127.0.0.1", minio.port) as proxy:
        proxy.hold(f"/{last}.manifest".encode())  # the last file of the last save, on both ranks
        procs = launch_ranks(2, env, ["--max-steps", "20", "--losses", str(run / "losses.jsonl")], run,
                             rank_env={rank: {"AWS_ENDPOINT_URL": proxy.url} for rank in (0, 1)})

        def draining() -> bool:
            if any(p.poll() is not None for p in procs):
                raise AssertionError(f"a rank ended while its last save was held:\n{logs(run)}")
            steps = read_jsonl(run / "losses.jsonl")
            return proxy.held.is_set() and all(any(r["rank"] == rank and r["step"] == 20 for r in steps)
                                               for rank in (0, 1))

        wait_for(draining, timeout=180, what="both ranks past their last step, the last manifest held")
        for p in procs:
            os.kill(p.pid, signal.SIGTERM)
        for p in procs:
            wait_for(lambda p=p: _signal_delivered(p, signal.SIGTERM), timeout=30, what="the SIGTERM delivered")
        proxy.release()
        assert wait_all(procs, run) == [0, 0], f"killed while its last save drained:\n{logs(run)}"
    messages = [json.loads((run / f"termination-{rank}.json").read_text()) for rank in (0, 1)]
    assert [(m["reason"], m["exit_code"], m["step"]) for m in messages] == [("completed", 0, 20)] * 2, messages
    (final,) = [c for c in scan(open_storage(uri)) if c.name == last]
    assert final.complete and final.step == 20, final.problem
    loaded = torpor.load_checkpoint(last, directory=uri, restore_rng=False)
    assert loaded is not None and (loaded.name, loaded.step) == (last, 20)


# -- break out of loop.epochs() ------------------------------------------------------------

class GatedStore(LocalStorage):
    """Holds every manifest write until ``gate`` is set: a background save stays in flight."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.gate = threading.Event()
        self.held = threading.Event()

    def put_bytes(self, key: str, data: bytes | memoryview) -> None:
        if ".manifest" in key:
            self.held.set()
            assert self.gate.wait(60), "the test never opened the gate"
        super().put_bytes(key, data)


def test_break_out_of_epochs_finishes_the_save_in_flight_and_restores_handlers(
        tmp_path: Path, previous_handler: list[int], local_run: Path) -> None:
    net, loss_fn, opt, loader = tiny_setup()
    store = GatedStore(tmp_path / "ck")
    monitor = StoreMonitor(store, save_checkpoint_steps=4, async_save=True)
    loop = torpor.Loop(net, opt, callbacks=[torpor.OnRequestExit(directory=str(tmp_path / "ck"), save_export=False),
                                            monitor])
    for _ in loop.epochs(3):
        for x, y in loop.batches(loader):
            opt.zero_grad()
            loss = loss_fn(net(x), y)
            loss.backward()
            opt.step()
            loop.step_end(loss)
            if loop.args.cur_step_num == 4:
                break
        assert store.held.wait(60) and monitor.in_flight  # the step-4 save is in the background
        store.gate.set()
        break  # the user leaves training early
    assert not monitor.in_flight
    (ckpt,) = scan(LocalStorage(tmp_path / "ck"))
    assert ckpt.complete and ckpt.step == 4, ckpt.problem
    assert _user_handler_is_back()


def test_batches_without_epochs_or_begin_is_a_clear_error(local_run: Path) -> None:
    net, _, opt, loader = tiny_setup()
    loop = torpor.Loop(net, opt, callbacks=[torpor.OnRequestExit(save_export=False)])
    with pytest.raises(RuntimeError, match=r"Loop\.batches\(\) before Loop\.epochs\(\) or Loop\.begin\(\)"):
        next(iter(loop.batches(loader)))


# -- exit_process means one thing ----------------------------------------------------------

def _plain_loop(callbacks: list[torpor.Callback], **kwargs: Any) -> torpor.RunContext:
    net, loss_fn, opt, loader = tiny_setup()
    loop = torpor.Loop(net, opt, callbacks=callbacks, **kwargs)
    for _ in loop.epochs(2):
        for x, y in loop.batches(loader):
            opt.zero_grad()
            loss = loss_fn(net(x), y)
            loss.backward()
            opt.step()
            loop.step_end(loss.detach())
    return loop.run_context


def _with_loop(callbacks: list[torpor.Callback], **kwargs: Any) -> torpor.RunContext:
    net, loss_fn, opt, loader = tiny_setup()
    with torpor.Loop(net, opt, callbacks=callbacks, **kwargs) as loop:
        for _ in loop.epochs(2):
            for x, y in loop.batches(loader):
                opt.zero_grad()
                loss = loss_fn(net(x), y)
                loss.backward()
                opt.step()
                loop.step_end(loss.detach())
    return loop.run_context


def _model_train(callbacks: list[torpor.Callback], **kwargs: Any) -> torpor.RunContext:
    net, loss_fn, opt, loader = tiny_setup()
    return torpor.Model(net, loss_fn=loss_fn, optimizer=opt).train(2, loader, callbacks=callbacks, **kwargs)


@pytest.mark.parametrize("form", [_plain_loop, _model_train], ids=["Loop", "Model.train"])
def test_exit_process_true_ends_the_process_after_a_stop(tmp_path: Path, local_run: Path, form: Any) -> None:
    with pytest.raises(SystemExit) as info:
        form([torpor.OnRequestExit(directory=str(tmp_path), save_export=False), KillInStep(3)], exit_process=True)
    assert info.value.code == 143
    message = json.loads(local_run.read_text())
    assert (message["reason"], message["step"], message["checkpoint"]) == ("signal", 3, "Net-1_3")


def test_exit_process_true_ends_a_standalone_eval_after_a_stop(tmp_path: Path, local_run: Path) -> None:
    net, loss_fn, opt, loader = tiny_setup()

    class KillInEval(torpor.Callback):
        def on_eval_step_begin(self, run_context: torpor.RunContext) -> None:
            if run_context.original_args().cur_step_num == 2:
                os.kill(os.getpid(), signal.SIGTERM)

    with pytest.raises(SystemExit) as info:
        torpor.Model(net, loss_fn=loss_fn, optimizer=opt).eval(
            loader, callbacks=[torpor.OnRequestExit(directory=str(tmp_path)), KillInEval()], exit_process=True)
    assert info.value.code == 143 and json.loads(local_run.read_text())["reason"] == "signal"


@pytest.mark.parametrize("form", [_plain_loop, _with_loop, _model_train], ids=["Loop", "with Loop", "Model.train"])
def test_exit_process_false_returns_after_a_real_sigterm_under_the_operator(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, previous_handler: list[int], form: Any) -> None:
    """``exit_process=False`` on the loop itself: the stop saves, then the call returns (no
    ``SystemExit``), nothing is written to the termination log (the caller owns the process),
    and ``run_context.exit_code`` and ``termination_message`` say why it stopped; the same in
    every form. Under the operator, where the default would end the process."""
    log = tmp_path / "termination-log"
    monkeypatch.setenv("TORPOR_JOB", "ns/j")
    monkeypatch.setenv("TORPOR_TERMINATION_LOG", str(log))
    exit_cb = torpor.OnRequestExit(directory=str(tmp_path / "ck"), save_export=False)
    recorder = Recorder()
    ctx = form([exit_cb, KillInStep(3), recorder], exit_process=False)  # SystemExit here fails the test
    assert recorder.steps == [1, 2, 3]
    assert ctx.exit_code == 143 and ctx.termination_message is exit_cb.stop_message
    message = exit_cb.stop_message
    assert message is not None
    assert (message.reason, message.exit_code, message.signal, message.checkpoint, message.step, message.job) == (
        "signal", 143, "SIGTERM", "Net-1_3", 3, "ns/j")
    assert not log.exists(), f"exit_process=False wrote a termination message: {log.read_text()}"
    (ckpt,) = scan(LocalStorage(tmp_path / "ck"))
    assert ckpt.name == "Net-1_3" and ckpt.complete, ckpt.problem
    assert previous_handler == [signal.SIGTERM]  # chained to the user's handler ...
    assert _user_handler_is_back()  # ... and it is back once the call returned


@pytest.mark.parametrize("form", [_plain_loop, _model_train], ids=["Loop", "Model.train"])
def test_a_stop_never_writes_a_completed_message(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, form: Any) -> None:
    log = tmp_path / "termination-log"
    monkeypatch.setenv("TORPOR_JOB", "ns/j")
    monkeypatch.setenv("TORPOR_TERMINATION_LOG", str(log))
    recorder = Recorder()
    # Under the operator, but this callback is told not to end the process: training returns.
    form([torpor.OnRequestExit(directory=str(tmp_path), save_export=False, exit_process=False), KillInStep(3),
          recorder])
    assert recorder.steps == [1, 2, 3]
    assert not log.exists() or json.loads(log.read_text())["reason"] != "completed"


def test_the_with_form_writes_an_error_message(tmp_path: Path, local_run: Path) -> None:
    net, loss_fn, opt, loader = tiny_setup()
    with pytest.raises(ValueError, match="boom"), \
            torpor.Loop(net, opt, callbacks=[torpor.OnRequestExit(save_export=False)], exit_process=True) as loop:
        for _ in loop.epochs(2):
            for x, y in loop.batches(loader):
                loss = loss_fn(net(x), y)
                if loop.args.cur_step_num == 3:
                    raise ValueError("boom")
                loop.step_end(loss)
    message = json.loads(local_run.read_text())
    assert (message["reason"], message["exit_code"], message["step"]) == ("error", 1, 3)
    assert message["error"] == "ValueError: boom"
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


# -- a failed prune, a failed last background save ------------------------------------------

class PruneFails(LocalStorage):
    """Every delete fails: retention cannot remove anything."""

    def delete_many(self, keys: Any) -> None:
        raise StorageError(f"deleting {len(list(keys))} keys failed: permission denied")


@pytest.mark.parametrize("async_save", [True, False], ids=["async", "sync"])
def test_a_failed_prune_is_reported_and_training_goes_on(tmp_path: Path, local_run: Path, async_save: bool) -> None:
    net, loss_fn, opt, loader = tiny_setup()
    recorder = Recorder()
    monitor = StoreMonitor(PruneFails(tmp_path / "ck"), save_checkpoint_steps=2, keep_checkpoint_max=1,
                           async_save=async_save, async_errors="raise")
    with pytest.warns(torpor.TorporWarning, match=r"retention after checkpoint 'CKP-\S+' failed"):
        torpor.Model(net, loss_fn=loss_fn, optimizer=opt).train(2, loader, callbacks=[monitor, recorder])
    assert recorder.steps == list(range(1, 2 * STEPS_PER_EPOCH + 1))
    assert monitor.save_errors == [] and monitor.prune_errors
    assert "'CKP-1_4'" in str(monitor.prune_errors[0])  # the first save that had something to prune
    checkpoints = scan(LocalStorage(tmp_path / "ck"))
    assert len(checkpoints) == STEPS_PER_EPOCH and all(c.complete for c in checkpoints)  # each one complete, kept


class LastSaveFails(LocalStorage):
    """The first write of the last step's checkpoint manifest fails (a full disk, a lost bucket)."""

    doomed = "rank_0/CKP-2_8.manifest.json"

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.failed = False

    def put_bytes(self, key: str, data: bytes | memoryview) -> None:
        if key == self.doomed and not self.failed:
            self.failed = True
            raise StorageError(f"writing {key} failed: no space left on device")
        super().put_bytes(key, data)


@pytest.mark.parametrize("async_errors", ["record", "raise"])
def test_a_failed_last_background_save_does_not_suppress_the_final_save(
        tmp_path: Path, local_run: Path, async_errors: str) -> None:
    net, loss_fn, opt, loader = tiny_setup()
    store = LastSaveFails(tmp_path / "ck")
    monitor = StoreMonitor(store, save_checkpoint_steps=STEPS_PER_EPOCH, async_save=True, async_errors=async_errors)
    torpor.Model(net, loss_fn=loss_fn, optimizer=opt).train(2, loader, callbacks=[monitor])
    assert store.failed and len(monitor.save_errors) == 1
    last = [c for c in scan(LocalStorage(tmp_path / "ck")) if c.complete and c.step == 2 * STEPS_PER_EPOCH]
    assert len(last) == 1, "the last step has no complete checkpoint"
    loaded = torpor.load_checkpoint("latest", tiny_setup()[0], directory=str(tmp_path / "ck"), restore_rng=False)
    assert loaded is not None and loaded.step == 2 * STEPS_PER_EPOCH
