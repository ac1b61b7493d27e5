"""A loader that keeps its own position, resumed through ``state=`` (issue 10, item 15).

torchdata's ``StatefulDataLoader`` and the like restore their position themselves: passed in
``state=`` and iterated by ``loop.batches``, the loop must not pass over the consumed batches
too, must save the position from *before* the batch it read ahead, and must leave the loader
at the end of its epoch when the epoch ends (as ``for batch in loader`` would).

Every test stops a run with a real SIGTERM inside a step (``OnRequestExit`` saves at that
step's boundary, the next batch already read ahead), resumes from 'latest', and compares the
losses and the samples of every step with an uninterrupted run.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torpor_harness import (
    REPO,
    KillInStep,
    PositionLoader,
    Recorder,
    SizedPositionLoader,
    TrainedOn,
    launch_ranks,
    logs,
    read_jsonl,
    wait_all,
)

import torpor

EPOCHS = 3  # 8 batches each


@dataclass
class Run:
    losses: dict[int, float]
    samples: dict[int, list[int]]
    loader: PositionLoader
    loaded: Any


def data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    x = torch.randn(48, 6, generator=g)
    return x, (x[:, :3].sum(dim=1) > 0).long()


def train(directory: Path, api: str, sized: bool, *, kill_at: int | None = None, resume: str | None = None) -> Run:
    """Train ``EPOCHS`` over a position-keeping loader passed in ``state=`` (the Loop or Model.train form)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 12), nn.ReLU(), nn.Dropout(0.2), nn.Linear(12, 2))  # dropout: the global RNG
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    x, y = data()
    loader = (SizedPositionLoader if sized else PositionLoader)(x, y, batch_size=6)
    recorder, trained_on = Recorder(), TrainedOn(x)
    callbacks: list[torpor.Callback] = [torpor.OnRequestExit(directory=str(directory), save_export=False),
                                        recorder, trained_on]
    if kill_at is not None:
        callbacks.append(KillInStep(kill_at))
    state = {"loader": loader}
    if api == "loop":
        loop = torpor.Loop(net, opt, callbacks=callbacks, resume=resume, state=state)
        for _ in loop.epochs(EPOCHS):
            for xb, yb in loop.batches(loader):
                opt.zero_grad()
                loss = nn.functional.cross_entropy(net(xb), yb)
                loss.backward()
                opt.step()
                loop.step_end(loss.detach())
        loaded = loop.loaded
    else:
        model = torpor.Model(net, loss_fn=nn.CrossEntropyLoss(), optimizer=opt, state=state)
        loaded = model.train(EPOCHS, loader, callbacks=callbacks, resume=resume).original_args().resumed_from
    return Run(recorder.losses, trained_on.steps, loader, loaded)


@pytest.mark.parametrize("kill_at", [11, 8, 3], ids=["mid-epoch-2", "epoch-end", "mid-epoch-1"])
@pytest.mark.parametrize("sized", [True, False], ids=["len", "no-len"])
@pytest.mark.parametrize("api", ["loop", "model"])
def test_a_loader_that_keeps_its_own_position_resumes_as_the_uninterrupted_run(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, api: str, sized: bool, kill_at: int) -> None:
    monkeypatch.delenv("TORPOR_JOB", raising=False)  # the stop returns instead of ending the test's process
    reference = train(tmp_path / "ref", api, sized)
    assert sorted(reference.losses) == list(range(1, EPOCHS * 8 + 1))
    first = train(tmp_path / "run", api, sized, kill_at=kill_at)
    assert max(first.losses) == kill_at
    second = train(tmp_path / "run", api, sized, resume="latest")
    assert second.loaded is not None and second.loaded.step == kill_at
    assert {**first.samples, **second.samples} == reference.samples  # the same samples, step by step
    assert sorted(second.losses) == list(range(kill_at + 1, EPOCHS * 8 + 1))
    resumed = {**first.losses, **second.losses}
    for step, loss in reference.losses.items():
        assert resumed[step] == pytest.approx(loss, rel=1e-5), step
    # The loader continued where it was: the resumed run produced each remaining batch once.
    assert second.loader.produced == EPOCHS * 8 - kill_at
    assert same_position(second.loader, reference.loader)


def same_position(a: PositionLoader, b: PositionLoader) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(
        torch.equal(v, sb[k]) if isinstance(v, torch.Tensor) else v == sb[k] for k, v in sa.items())


# --- 2 gloo ranks, each with its own loader over its own part of the data ----------------------

RANK_SCRIPT = Path(__file__).parent / "procs" / "stateful_loader_rank.py"


@pytest.mark.parametrize(("loader", "kill_at"), [("len", 11), ("no-len", 12)],
                         ids=["len-mid-epoch", "no-len-epoch-end"])
def test_two_gloo_ranks_with_their_own_position_keeping_loaders_resume_after_a_sigterm(
        tmp_path: Path, loader: str, kill_at: int) -> None:
    path = os.pathsep.join([str(REPO / "runtime"), str(REPO / "hack"), str(RANK_SCRIPT.parents[1]),
                            os.environ.get("PYTHONPATH", "")])
    # The default integrated_save: rank 0 writes the model, every rank its own loader position.
    common = {"TORPOR_JOB": "ns/positions", "TORPOR_SAVE_STEPS": "5", "PYTHONPATH": path}
    options = ["--no-len"] if loader == "no-len" else []

    def launch(name: str, incarnation: str, argv: list[str], directory: str) -> tuple[Path, list[Any]]:
        logdir = tmp_path / name
        logdir.mkdir()
        env = {**common, "TORPOR_INCARNATION": incarnation, "TORPOR_CHECKPOINT_URI": directory}
        argv = [*options, *argv, "--steps", str(logdir / "steps.jsonl"), "--report", str(logdir / "report-{rank}.json")]
        procs = launch_ranks(2, env, argv, logdir, script=RANK_SCRIPT)
        try:
            return logdir, wait_all(procs, logdir)
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()

    # Rank 1 gets a real SIGTERM inside step ``kill_at`` (6 steps per epoch); both ranks save and exit.
    first, codes = launch("first", "1", ["--kill-rank", "1", "--kill-at", str(kill_at)], str(tmp_path / "ck"))
    assert codes == [143, 143], logs(first)
    assert max(r["step"] for r in read_jsonl(first / "steps.jsonl")) == kill_at
    second, codes = launch("second", "2", [], str(tmp_path / "ck"))
    assert codes == [0, 0], logs(second)
    reference, codes = launch("reference", "1", [], str(tmp_path / "ref"))
    assert codes == [0, 0], logs(reference)

    def by_step(path: Path) -> dict[tuple[int, int], tuple[float, list[int]]]:
        return {(r["rank"], r["step"]): (r["loss"], r["samples"]) for r in read_jsonl(path / "steps.jsonl")}

    resumed = by_step(first) | by_step(second)
    expected = by_step(reference)
    assert resumed.keys() == expected.keys()
    for key, (loss, samples) in expected.items():
        assert resumed[key][1] == samples, key  # each rank's own samples, step by step
        assert resumed[key][0] == pytest.approx(loss, rel=1e-5), key
    for rank in range(2):
        report = json.loads((second / f"report-{rank}.json").read_text())
        ref = json.loads((reference / f"report-{rank}.json").read_text())
        assert report["steps"] == ref["steps"] == 18
        assert report["produced"] == 18 - kill_at  # the position was the rank's own: nothing produced again
        assert report["position"] == ref["position"]
