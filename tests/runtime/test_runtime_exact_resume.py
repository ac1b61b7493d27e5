"""Exact resume of what users train with (issue 10, items 15 and 16).

Every resume test compares a run stopped and resumed in this process with an uninterrupted
run built the same way: losses step by step (single process: bit-exact) and the final state
of everything ``state=`` carries.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torch.utils.data import DataLoader, Dataset, TensorDataset
from torpor_harness import Recorder, StopAt, child_env, launch_ranks, logs, read_jsonl, wait_all, wait_for

import torpor
from torpor import _state
from torpor.checkpoints import FileKind, scan
from torpor.storage import LocalStorage


class CountingDataset(Dataset):
    """A map-style dataset that counts every ``__getitem__`` (what a resume loads again)."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y = x, y
        self.calls = 0

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        self.calls += 1
        return self.x[i], self.y[i]


@dataclass
class Setup:
    """What one run trains: built afresh, identically, for every run."""

    net: nn.Module
    opt: torch.optim.Optimizer
    loader: DataLoader
    sched: Any = None
    state: dict[str, Any] = field(default_factory=dict)
    step: Callable[[Setup, Any], torch.Tensor] | None = None


def reseed() -> None:
    torch.manual_seed(123)
    random.seed(123)
    np.random.seed(123)


def data(samples: int = 48) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    x = torch.randn(samples, 6, generator=g)
    return x, (x[:, :3].sum(dim=1) > 0).long()


def small_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 12), nn.ReLU(), nn.Dropout(0.2), nn.Linear(12, 2))


def plain_step(s: Setup, batch: Any) -> torch.Tensor:
    x, y = batch
    s.opt.zero_grad()
    loss = nn.functional.cross_entropy(s.net(x), y)
    loss.backward()
    s.opt.step()
    if s.sched is not None:
        s.sched.step()
    return loss.detach()


def run(directory: Path, make: Callable[[], Setup], epochs: int, *, stop_at: int | None = None,
        resume: str | None = None) -> tuple[Recorder, Setup, torpor.Loop]:
    """Train ``epochs`` with the plain-loop form, saving every 5 steps (and at the end)."""
    reseed()
    s = make()
    recorder = Recorder()
    callbacks: list[torpor.Callback] = [torpor.CheckpointMonitor(directory=str(directory), save_checkpoint_steps=5,
                                                                 keep_checkpoint_max=3), recorder]
    if stop_at is not None:
        callbacks.append(StopAt(stop_at))
    loop = torpor.Loop(s.net, s.opt, lr_scheduler=s.sched, callbacks=callbacks, resume=resume,
                       **({"state": s.state} if s.state else {}))
    step = s.step or plain_step
    for _ in loop.epochs(epochs):
        for batch in loop.batches(s.loader):
            loop.step_end(step(s, batch))
    return recorder, s, loop


def assert_resumes_exactly(tmp_path: Path, make: Callable[[], Setup], epochs: int, stop_at: int) -> tuple[Setup, Setup]:
    """Stop at ``stop_at``, resume from 'latest': the losses are the uninterrupted run's, bit for bit."""
    reference, ref_setup, _ = run(tmp_path / "ref", make, epochs)
    first, _, _ = run(tmp_path / "run", make, epochs, stop_at=stop_at)
    assert first.steps[-1] == stop_at
    second, resumed, loop = run(tmp_path / "run", make, epochs, resume="latest")
    assert loop.loaded is not None and loop.loaded.step == stop_at
    assert second.steps == list(range(stop_at + 1, len(reference.steps) + 1))
    assert {**first.losses, **second.losses} == reference.losses
    return ref_setup, resumed


def assert_state_equal(a: Any, b: Any) -> None:
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            assert_state_equal(a[k], b[k])
    elif isinstance(a, list | tuple):
        assert len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            assert_state_equal(x, y)
    elif isinstance(a, torch.Tensor):
        assert torch.equal(a, b)
    else:
        assert a == b


# --- item 15: generators the loader draws from ------------------------------------------------

def generator_loader() -> Setup:
    net = small_net()
    g = torch.Generator().manual_seed(99)  # the loader's own generator, not the global one
    loader = DataLoader(TensorDataset(*data()), batch_size=6, shuffle=True, generator=g)
    return Setup(net, torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9), loader)


@pytest.mark.parametrize("stop_at", [11, 8], ids=["mid-epoch", "epoch-end"])
def test_a_dataloader_generator_is_restored(tmp_path: Path, stop_at: int) -> None:
    assert_resumes_exactly(tmp_path, generator_loader, epochs=3, stop_at=stop_at)


def test_a_run_extended_after_it_finished_continues_the_loader_generator(tmp_path: Path) -> None:
    # The final save comes after the last epoch's sampler ran out (which draws from its
    # generator once more); a save at an epoch's last step comes before. Both resume alike.
    reference, _, _ = run(tmp_path / "ref", generator_loader, 3)
    first, _, _ = run(tmp_path / "run", generator_loader, 2)
    second, _, loop = run(tmp_path / "run", generator_loader, 3, resume="latest")
    assert loop.loaded is not None and loop.loaded.name == "CKP-2_8"
    assert {**first.losses, **second.losses} == reference.losses


def persistent_loader() -> Setup:
    net = small_net()
    g = torch.Generator().manual_seed(5)
    loader = DataLoader(TensorDataset(*data()), batch_size=6, shuffle=True, generator=g, num_workers=2,
                        persistent_workers=True, multiprocessing_context="fork")
    return Setup(net, torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9), loader)


@pytest.mark.parametrize("stop_at", [11, 8, 3], ids=["mid-epoch-2", "epoch-end", "mid-epoch-1"])
def test_persistent_workers_resume_in_the_uninterrupted_order(tmp_path: Path, stop_at: int) -> None:
    # The uninterrupted run creates the workers' iterator once and only resets it in later
    # epochs (no base-seed draw); a resumed run creates it anew in a later epoch.
    assert_resumes_exactly(tmp_path, persistent_loader, epochs=3, stop_at=stop_at)


class NoisyDataset(Dataset):
    """Random augmentation in ``__getitem__`` (noise from the global generator), read in the main
    process: fetching a batch draws random numbers, as many real pipelines do."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x[i] + 0.1 * torch.randn(self.x.shape[1]), self.y[i]


def noisy_loader() -> Setup:
    net = small_net()
    loader = DataLoader(NoisyDataset(*data()), batch_size=6, shuffle=True)
    return Setup(net, torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9), loader)


@pytest.mark.parametrize("stop_at", [11, 10], ids=["stop-then-final-save", "periodic-save"])
def test_a_loader_that_draws_random_numbers_while_fetching_resumes_exactly(tmp_path: Path, stop_at: int) -> None:
    # The loop reads one batch ahead (every rank must know it has a next batch before the
    # step): the checkpoint must hold the generators as they were before that read, or the
    # resumed run draws the next batch's noise from a state one batch too far.
    assert_resumes_exactly(tmp_path, noisy_loader, epochs=2, stop_at=stop_at)


# --- item 15: the skip of a mid-epoch resume ---------------------------------------------------

def counting_loader() -> Setup:
    net = small_net()
    loader = DataLoader(CountingDataset(*data()), batch_size=6, shuffle=True)
    return Setup(net, torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9), loader)


def test_a_mid_epoch_resume_skips_consumed_samples_by_index_without_loading_them(tmp_path: Path) -> None:
    _, resumed = assert_resumes_exactly(tmp_path, counting_loader, epochs=2, stop_at=5)  # 8 batches per epoch
    # Steps 6..16 were trained on after the resume: 11 batches of 6 samples, nothing more.
    assert resumed.loader.dataset.calls == 11 * 6


def test_the_skip_by_index_also_holds_with_workers(tmp_path: Path) -> None:
    def make() -> Setup:
        s = counting_loader()
        s.loader = DataLoader(s.loader.dataset, batch_size=6, shuffle=True, num_workers=2,
                              multiprocessing_context="fork")
        return s

    assert_resumes_exactly(tmp_path, make, epochs=2, stop_at=5)


def test_an_iterable_dataset_falls_back_to_consuming_the_batches(tmp_path: Path) -> None:
    class Stream(torch.utils.data.IterableDataset):
        def __iter__(self):
            x, y = data()
            yield from zip(x, y, strict=True)

    def make() -> Setup:
        net = small_net()
        return Setup(net, torch.optim.SGD(net.parameters(), lr=0.1), DataLoader(Stream(), batch_size=6))

    assert_resumes_exactly(tmp_path, make, epochs=2, stop_at=5)


# --- item 15: state= (GradScaler, several optimizers and schedulers, an EMA) -------------------

class TwoHeads(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(6, 12)
        self.head = nn.Linear(12, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.body(x)))


def everything() -> Setup:
    torch.manual_seed(0)
    net = TwoHeads()
    opt = torch.optim.SGD(net.body.parameters(), lr=0.1, momentum=0.9)
    opt2 = torch.optim.AdamW(net.head.parameters(), lr=0.01)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.7)
    sched2 = torch.optim.lr_scheduler.CosineAnnealingLR(opt2, T_max=7)
    # A huge initial scale overflows: the first steps are skipped and the scale backs off, then
    # grows again every 2 steps. A fresh scaler after a resume would skip different steps.
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 126, growth_interval=2)
    ema = AveragedModel(net, multi_avg_fn=get_ema_multi_avg_fn(0.9))
    noise = torch.Generator().manual_seed(3)  # the script's own generator (input noise)
    loader = DataLoader(TensorDataset(*data()), batch_size=6, shuffle=True)

    def step(s: Setup, batch: Any) -> torch.Tensor:
        x, y = batch
        x = x + 0.1 * torch.randn(x.shape, generator=noise)
        opt.zero_grad()
        opt2.zero_grad()
        loss = nn.functional.cross_entropy(net(x), y)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.step(opt2)
        scaler.update()
        sched.step()
        sched2.step()
        ema.update_parameters(net)
        return loss.detach()

    return Setup(net, opt, loader, sched, {"scaler": scaler, "opt2": opt2, "sched2": sched2, "ema": ema,
                                           "noise": noise}, step)


def test_grad_scaler_optimizers_schedulers_and_an_ema_resume_through_state(tmp_path: Path) -> None:
    reference, resumed = assert_resumes_exactly(tmp_path, everything, epochs=2, stop_at=11)
    for key in ("scaler", "opt2", "sched2", "ema"):
        assert_state_equal(reference.state[key].state_dict(), resumed.state[key].state_dict())
    assert torch.equal(reference.state["noise"].get_state(), resumed.state["noise"].get_state())
    assert reference.state["scaler"].get_scale() != 2.0 ** 126  # the scale did move


def test_state_is_validated_and_a_missing_key_is_an_error(tmp_path: Path) -> None:
    net = small_net()
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    with pytest.raises(TypeError, match=r"state\['bad'\].*state_dict"):
        torpor.Loop(net, opt, state={"bad": object()})
    with pytest.raises(TypeError, match="state must be a dict"):
        torpor.Loop(net, opt, state=[opt])  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="state keys must be non-empty str"):
        torpor.Loop(net, opt, state={3: opt})  # type: ignore[dict-item]

    run(tmp_path, counting_loader, 1)
    extra = torch.optim.SGD(net.parameters(), lr=0.5)
    with pytest.raises(KeyError, match=r"'extra'.*not in checkpoint 'CKP-1_8'"):
        torpor.load_checkpoint("latest", net, directory=str(tmp_path), state={"extra": extra})
    with pytest.warns(torpor.TorporWarning, match=r"state\['extra'\] is not in checkpoint"):
        torpor.load_checkpoint("latest", net, directory=str(tmp_path), state={"extra": extra}, strict=False)
    assert extra.param_groups[0]["lr"] == 0.5  # left as it was


def test_state_that_would_not_load_is_refused_at_the_save(tmp_path: Path) -> None:
    class Odd:
        def state_dict(self) -> dict[str, Any]:
            return {"fn": print}

        def load_state_dict(self, sd: dict[str, Any]) -> None:
            pass

    def make() -> Setup:
        s = counting_loader()
        s.state = {"odd": Odd()}
        return s

    # A failed save is raised on every rank as CheckpointSaveError (no rank left waiting); on the
    # rank that failed, the TypeError naming the path is its cause and is in its message.
    with pytest.raises(torpor.CheckpointSaveError, match=r"state\['odd'\]\['fn'\].*builtin_function_or_method") as err:
        run(tmp_path, make, 1)
    assert isinstance(err.value.__cause__, TypeError)


# --- item 16 -----------------------------------------------------------------------------------

def test_cuda_generator_states_are_restored_in_device_order() -> None:
    states = tuple(torch.full((4,), i, dtype=torch.uint8) for i in range(12))
    rng = _state.RngState(random.getstate(), np.random.get_state(legacy=True), torch.get_rng_state(), states)
    doc, tensors = rng.to_parts()
    back = _state.RngState.from_parts(doc, dict(reversed(list(tensors.items()))))
    assert [int(t[0]) for t in back.torch_cuda] == list(range(12))  # not 0, 1, 10, 11, 2, ...


KILLED_WRITER = """
import sys, time
from torpor.storage import LocalStorage
w = LocalStorage(sys.argv[1]).writer("rank_0/CKP-1_4.ckpt")
w.write(b"x" * 4096)
w.flush()
print("writing", flush=True)
time.sleep(600)
"""


def test_temp_files_of_a_killed_save_are_removed_by_the_next_save(tmp_path: Path) -> None:
    proc = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, str(tmp_path)], env=child_env({}),
                            stdout=subprocess.PIPE)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == b"writing"
        rank_dir = tmp_path / "rank_0"
        temps = wait_for(lambda: list(rank_dir.glob(".*.tmp-*")), timeout=30, what="the writer's temp file")
        store = LocalStorage(tmp_path)
        store.put_bytes("rank_0/other.manifest.json", b"{}")  # a live writer's temp file is left alone
        assert all(t.exists() for t in temps)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        proc.stdout.close()  # type: ignore[union-attr]
    alive = store.writer("rank_0/CKP-1_8.ckpt")  # this process's own open save is not stale
    store.put_bytes("rank_0/CKP-1_8.manifest.json", b"{}")
    assert not any(t.exists() for t in temps)
    assert alive._tmp.exists()  # type: ignore[attr-defined]
    alive.abort()
    # A temp file of an unknown writer (another host) goes only once it is older than the bound.
    foreign = rank_dir / ".CKP-1_2.ckpt.tmp-0123abcd"
    foreign.write_bytes(b"x")
    store.put_bytes("rank_0/a.manifest.json", b"{}")
    assert foreign.exists()
    old = time.time() - 2 * 3600
    os.utime(foreign, (old, old))
    store.put_bytes("rank_0/b.manifest.json", b"{}")
    assert not foreign.exists()


def test_network_params_are_written_once_and_resume_still_works(tmp_path: Path) -> None:
    def written(directory: Path, network_params: bool) -> dict[FileKind, int]:
        reseed()
        net = nn.Sequential(nn.Linear(256, 256), nn.Linear(256, 256))
        opt = torch.optim.SGD(net.parameters(), lr=0.01)
        loader = DataLoader(TensorDataset(torch.randn(8, 256), torch.randn(8, 256)), batch_size=4)
        monitor = torpor.CheckpointMonitor(directory=str(directory), save_checkpoint_steps=2,
                                           save_network_params=network_params)
        loop = torpor.Loop(net, opt, callbacks=[monitor])
        for _ in loop.epochs(1):
            for x, y in loop.batches(loader):
                opt.zero_grad()
                nn.functional.mse_loss(net(x), y).backward()
                opt.step()
                loop.step_end()
        (ckpt,) = [c for c in scan(LocalStorage(directory)) if c.complete]
        return {e.kind: e.size for e in ckpt.manifests[0].files}

    without = written(tmp_path / "without", False)
    with_network = written(tmp_path / "with", True)
    model_bytes = 2 * (256 * 256 + 256) * 4
    assert with_network[FileKind.NETWORK] >= model_bytes
    # The network file is the only copy of the weights: the shard shrinks by what it holds.
    assert with_network[FileKind.SHARD] + with_network[FileKind.NETWORK] < without[FileKind.SHARD] + model_bytes // 10
    net = nn.Sequential(nn.Linear(256, 256), nn.Linear(256, 256))
    opt = torch.optim.SGD(net.parameters(), lr=0.01)
    loaded = torpor.load_checkpoint("latest", net, opt, directory=str(tmp_path / "with"))
    reference = nn.Sequential(nn.Linear(256, 256), nn.Linear(256, 256))
    torpor.load_checkpoint("latest", reference, directory=str(tmp_path / "without"))
    assert loaded is not None
    for a, b in zip(net.state_dict().values(), reference.state_dict().values(), strict=True):
        assert torch.equal(a, b)


# --- item 15 with real gloo ranks ---------------------------------------------------------------

RANK_SCRIPT = Path(__file__).parent / "procs" / "exact_resume_rank.py"


def test_two_gloo_ranks_resume_scaler_ema_optimizers_and_loader_generators_after_a_sigterm(tmp_path: Path) -> None:
    common = {"TORPOR_JOB": "ns/exact", "TORPOR_SAVE_STEPS": "7"}

    def launch(name: str, incarnation: str, argv: list[str], directory: str) -> tuple[Path, list[Any]]:
        logdir = tmp_path / name
        logdir.mkdir()
        env = {**common, "TORPOR_INCARNATION": incarnation, "TORPOR_CHECKPOINT_URI": directory}
        argv = [*argv, "--losses", str(logdir / "losses.jsonl"), "--report", str(logdir / "report-{rank}.json")]
        return logdir, launch_ranks(2, env, argv, logdir, script=RANK_SCRIPT)

    first, procs = launch("first", "1", ["--step-delay", "0.05"], str(tmp_path / "ck"))
    try:
        wait_for(lambda: any(r["step"] >= 16 for r in read_jsonl(first / "losses.jsonl"))
                 or any(p.poll() is not None for p in procs), timeout=180, what="step 16")
        os.kill(procs[1].pid, signal.SIGTERM)
        assert wait_all(procs, first) == [143, 143], logs(first)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    stop = max(r["step"] for r in read_jsonl(first / "losses.jsonl"))
    end = 40  # 12 steps per epoch: the stop is in epoch 2, the run ends in epoch 4
    second, procs = launch("second", "2", ["--max-steps", str(end)], str(tmp_path / "ck"))
    assert wait_all(procs, second) == [0, 0], logs(second)
    reference, procs = launch("reference", "1", ["--max-steps", str(end)], str(tmp_path / "ref"))
    assert wait_all(procs, reference) == [0, 0], logs(reference)

    def by_step(path: Path) -> dict[tuple[int, int], tuple[float, float]]:
        return {(r["rank"], r["step"]): (r["loss"], r["scale"]) for r in read_jsonl(path / "losses.jsonl")}

    resumed = {k: v for k, v in by_step(first).items() if k[1] <= stop} | by_step(second)
    expected = by_step(reference)
    assert resumed.keys() == expected.keys()
    for key, (loss, scale) in expected.items():
        assert resumed[key][1] == scale, key  # the GradScaler's scale, step by step
        assert resumed[key][0] == pytest.approx(loss, rel=1e-5), key
    for rank in range(2):
        report = json.loads((second / f"report-{rank}.json").read_text())
        ref = json.loads((reference / f"report-{rank}.json").read_text())
        # Consumed samples were not loaded again; the one batch more is the one the loop read
        # ahead at the last step (to know every rank had it) and did not train on.
        assert report["calls"] == (end - stop + 1) * 4
        assert report["ema"] == pytest.approx(ref["ema"], rel=1e-6)
