"""Resume on another world size (issue 11, item 2): a DDP job stopped on 3 ranks goes on on 2
(and, stopped again within the same epoch, back on 3), and what cannot continue exactly on
another world size is refused.

Real gloo ranks (``procs/resize_rank.py``), a real SIGTERM to one of them. What a user would
check: right after the load every rank holds the model and optimizer state of the save;
training goes on; within the epoch of the stop no sample is trained twice, and what is left
out is less than one global batch of the resumed run. (FSDP2 2 → 3 and 2 → 1 ranks are in
``test_runtime_sharded.py``, on the checkpoint its SIGTERM test writes.)

The refusals are checked in this process as one rank of a larger or smaller world (``RANK``
and ``WORLD_SIZE`` without a process group): they are decided from the checkpoint, the
loader and the world size alone, so alike on every rank. Those about the checkpoint (per-rank
copies, FSDP1, a per-rank loader position) are raised by the load, before anything is applied
and never passed over for an older checkpoint; those about the loader (its sampler, the
global batch) when the first epoch starts, after the state was applied and ``on_train_begin``
ran, before the epoch's first batch.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from torpor_harness import (
    REPO,
    RESIZE_SAMPLES,
    StopAt,
    launch_ranks,
    logs,
    read_jsonl,
    resize_data,
    resize_net,
    wait_all,
)

import torpor
from torpor import _state
from torpor._loading import load_shard
from torpor.checkpoints import scan
from torpor.storage import open_storage

RANK_SCRIPT = Path(__file__).parent / "procs" / "resize_rank.py"
PER_RANK_BATCH = 4


def _launch(world: int, run: Path, env: dict[str, str], argv: list[str]) -> list[subprocess.Popen[bytes]]:
    run.mkdir(parents=True, exist_ok=True)
    path = os.pathsep.join([str(REPO / "runtime"), str(REPO / "hack"), str(RANK_SCRIPT.parents[1]),
                            os.environ.get("PYTHONPATH", "")])
    return launch_ranks(world, {"PYTHONPATH": path, **env}, argv, run, script=RANK_SCRIPT)


def _finish(run: Path, procs: list[subprocess.Popen[bytes]], codes: list[int]) -> None:
    try:
        assert wait_all(procs, run, timeout=240) == codes, logs(run)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()


def _assert_equal(actual: Any, expected: Any, where: str) -> None:
    if isinstance(expected, dict):
        assert set(actual) == set(expected), where
        for k in expected:
            _assert_equal(actual[k], expected[k], f"{where}.{k}")
    elif isinstance(expected, list | tuple):
        assert len(actual) == len(expected), where
        for i, (a, e) in enumerate(zip(actual, expected, strict=True)):
            _assert_equal(a, e, f"{where}[{i}]")
    elif isinstance(expected, torch.Tensor):
        torch.testing.assert_close(actual, expected, rtol=0, atol=0, msg=lambda m: f"{where}: {m}")
    else:
        assert actual == expected, where


def _stopped(run: Path, procs: list[subprocess.Popen[bytes]]) -> dict[str, Any]:
    """Every rank stopped by the SIGTERM one of them got, with the same checkpoint and step."""
    _finish(run, procs, [143] * len(procs))
    messages = [json.loads((run / f"termination-{r}.json").read_text()) for r in range(len(procs))]
    assert len({(m["checkpoint"], m["step"], m["epoch"]) for m in messages}) == 1, messages
    return messages[0]


def test_a_ddp_job_stopped_on_three_ranks_continues_its_epoch_on_two_and_back_on_three(tmp_path: Path) -> None:
    env = {"TORPOR_JOB": "ns/resize", "TORPOR_CHECKPOINT_URI": str(tmp_path / "ckpt"), "TORPOR_SAVE_STEPS": "4"}
    runs = [tmp_path / f"run{i}" for i in (1, 2, 3)]

    def launch(i: int, world: int, kill: tuple[int, int] | None) -> list[subprocess.Popen[bytes]]:
        argv = ["--steps", str(runs[i] / "steps.jsonl"), "--state", str(runs[i])]
        if kill is not None:  # that rank sends itself SIGTERM inside that global step
            argv += ["--kill-rank", str(kill[0]), "--kill-at", str(kill[1])]
        return _launch(world, runs[i], {**env, "TORPOR_INCARNATION": str(i + 1)}, argv)

    # 1. Three ranks (10 steps of 3 x 4 samples per epoch), SIGTERM to rank 1 in step 5: every rank saves.
    first = _stopped(runs[0], launch(0, 3, (1, 5)))
    assert (first["epoch"], first["step"]) == (1, 5), first
    # 2. Two ranks resume from it (the epoch's other 60 samples: 8 steps) and are stopped in step 8.
    second = _stopped(runs[1], launch(1, 2, (0, 8)))
    assert (second["epoch"], second["step"], second["resumed_from"]) == (1, 8, first["checkpoint"]), second
    # 3. Three ranks continue the twice-resized epoch (36 samples left) and train to the end of epoch 3.
    _finish(runs[2], launch(2, 3, None), [0, 0, 0])
    assert {json.loads((runs[2] / f"termination-{r}.json").read_text())["resumed_from"]
            for r in range(3)} == {second["checkpoint"]}

    # Replicated state is written once: rank 0's shard holds the model and optimizer, every
    # other rank's only its own position (and no DCP file: nothing of DDP goes through DCP).
    storage = open_storage(tmp_path / "ckpt")
    stopped = {c.name: c for c in scan(storage)}[first["checkpoint"]]
    payloads = [load_shard(storage, stopped.manifests[r].shard, None, None, manifest=stopped.manifests[r])
                for r in range(3)]
    assert {"model", "optimizer"} <= set(payloads[0]), sorted(payloads[0])
    for rank in (1, 2):
        assert not {"model", "optimizer", "lr_scheduler", "dcp", "_dcp_shards"} & set(payloads[rank]), \
            (rank, sorted(payloads[rank]))
    assert not any(o.key.endswith(".distcp") for o in storage.list("")), "a DDP save wrote DCP shards"

    steps = [read_jsonl(run / "steps.jsonl") for run in runs]
    for i, (run, stop, world) in enumerate([(runs[0], first, 3), (runs[1], second, 2)]):
        # Right after the load every rank holds the model and optimizer of the save (replicated:
        # every rank of the stopped run had rank 0's).
        saved = torch.load(run / "end-0.pt", weights_only=True)
        assert saved["step"] == stop["step"]
        for rank in range(1, world):
            _assert_equal(torch.load(run / f"end-{rank}.pt", weights_only=True), saved, f"run{i + 1} rank {rank}")
        resumed, resumed_world = runs[i + 1], (2, 3)[i]
        for rank in range(resumed_world):
            _assert_equal(torch.load(resumed / f"resumed-{rank}.pt", weights_only=True), saved,
                          f"run{i + 2} rank {rank}")
        # Training goes on, on every rank, from the step after the stop.
        assert {r["rank"] for r in steps[i + 1]} == set(range(resumed_world))
        assert min(r["step"] for r in steps[i + 1]) == stop["step"] + 1
    assert {r["epoch"] for r in steps[2]} == {1, 2, 3}

    # The epoch of the stops: no sample twice, less than one global batch left out.
    trained = [i for r in steps[0] if r["step"] <= first["step"] for i in r["ids"]]
    trained += [i for r in steps[1] if r["step"] <= second["step"] for i in r["ids"]]
    trained += [i for r in steps[2] if r["epoch"] == 1 for i in r["ids"]]
    assert len(trained) == len(set(trained)), sorted(trained)
    assert len(set(range(RESIZE_SAMPLES)) - set(trained)) < 3 * PER_RANK_BATCH
    # The next epoch is a whole one of the 3-rank DistributedSampler: every sample once.
    assert sorted(i for r in steps[2] if r["epoch"] == 2 for i in r["ids"]) == list(range(RESIZE_SAMPLES))


# --- what is refused ------------------------------------------------------------------------

CASES = ["random", "iterable", "stateful", "copies", "global-batch", "distributed"]


@pytest.fixture(scope="module")
def saved_on_two(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One checkpoint per case, each saved by 2 real ranks mid-epoch 1, after step 3."""
    directory = tmp_path_factory.mktemp("resize-cases")
    _finish(directory, _launch(2, directory, {}, ["--cases", ",".join(CASES), "--directory", str(directory)]),
            [0, 0])
    for case in CASES:
        (ckpt,) = scan(open_storage(directory / case))
        assert ckpt.complete and ckpt.world_size == 2 and ckpt.name == "CKP-1_3", (case, ckpt)
    return directory


def _as_rank(monkeypatch: pytest.MonkeyPatch, rank: int, world: int) -> None:
    monkeypatch.setenv("RANK", str(rank))
    monkeypatch.setenv("WORLD_SIZE", str(world))


def _resume(directory: Path, case: str, world: int, batch_size: int = PER_RANK_BATCH) -> torpor.Loop:
    """Resume ``case``'s checkpoint as rank 0 of ``world`` and start its first epoch."""
    kind = case if case in ("random", "iterable", "stateful") else "distributed"
    loader, state = resize_data(kind, 0, world, batch_size)
    net, opt = resize_net()
    monitor = torpor.CheckpointMonitor(directory=str(directory / case), save_checkpoint_steps=0,
                                       global_batch_size=8 if case == "global-batch" else None)
    loop = torpor.Loop(net, opt, callbacks=[monitor], resume="latest", state=state, exit_process=False)
    for _ in loop.epochs(2):
        for _batch in loop.batches(loader):
            break
        break
    return loop


REFUSED = [
    ("random", 3, r"saved mid-epoch on 2 rank\(s\) and is resumed on 3, but the loader's sampler is a RandomSampler, "
                  r"not a DistributedSampler"),
    ("iterable", 1, r"the loader's dataset is an IterableDataset \(IndexStream\) without a position of its own"),
    ("stateful", 3, r"state\['loader'\] keeps its own position per rank, saved by 2 rank\(s\) in checkpoint "
                    r"'CKP-1_3'; ranks 2..2 of this run have none"),
    ("copies", 3, r"holds each rank's own copy of the model and optimizer \(integrated_save=False\) for world_size 2; "
                  r"ranks 2..2 of this run have none"),
    ("global-batch", 3, r"global_batch_size=8 cannot be split over 3 rank\(s\)"),
    ("global-batch", 4, r"global_batch_size=8 on 4 rank\(s\) means a per-rank batch of 2, but the loader's batch_size "
                        r"is 4"),
]


@pytest.mark.parametrize(("case", "world", "message"), REFUSED, ids=[f"{c}-on-{w}" for c, w, _ in REFUSED])
def test_what_cannot_continue_exactly_on_another_world_size_is_refused(
        saved_on_two: Path, monkeypatch: pytest.MonkeyPatch, case: str, world: int, message: str) -> None:
    _as_rank(monkeypatch, 0, world)
    with pytest.raises(torpor.ResizeError, match=message):
        _resume(saved_on_two, case, world)


def test_a_refused_resize_is_raised_not_passed_over_for_an_older_checkpoint(
        saved_on_two: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The 2-rank checkpoint, then a newer one of one rank's own copy of the model (which 2
    # ranks cannot continue): a resume on 2 must say so, on every rank, not quietly go back to
    # the older checkpoint and lose the steps in between.
    store = tmp_path / "store"
    shutil.copytree(saved_on_two / "distributed", store)
    loader, _ = resize_data("distributed", 0, 1)
    net, opt = resize_net()
    monitor = torpor.CheckpointMonitor(directory=str(store), save_checkpoint_steps=0, integrated_save=False)
    loop = torpor.Loop(net, opt, callbacks=[monitor, StopAt(5)], exit_process=False)
    for _ in loop.epochs(2):
        for _batch in loop.batches(loader):
            loop.step_end()
    assert [(c.name, c.world_size) for c in scan(open_storage(store)) if c.complete] == [("CKP-1_3", 2),
                                                                                         ("CKP-1_5", 1)]
    for rank in range(2):
        _as_rank(monkeypatch, rank, 2)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with pytest.raises(torpor.ResizeError, match=r"checkpoint 'CKP-1_5' holds each rank's own copy"):
                torpor.load_checkpoint("latest", *resize_net(), directory=str(store))
        assert not [str(w.message) for w in caught if issubclass(w.category, torpor.TorporWarning)], rank


def test_what_can_continue_is_not_refused(saved_on_two: Path, monkeypatch: pytest.MonkeyPatch,
                                         caplog: pytest.LogCaptureFixture) -> None:
    # The same world size resumes as always, whatever the loader; a shrink keeps a rank's own
    # loader position (torpor does not reshard it, and says so); a global batch that splits is accepted.
    for case, world, batch_size in [("random", 2, 4), ("iterable", 2, 4), ("stateful", 1, 4), ("copies", 1, 4),
                                    ("global-batch", 1, 8), ("global-batch", 2, 4), ("distributed", 3, 4)]:
        _as_rank(monkeypatch, 0, world)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="torpor"):
            loop = _resume(saved_on_two, case, world, batch_size)
        assert loop.loaded is not None and loop.loaded.name == "CKP-1_3" and loop.args.cur_step_num == 4, case
        warned = [r.getMessage() for r in caplog.records if "does not reshard it" in r.getMessage()]
        assert warned == (["resumed checkpoint 'CKP-1_3' of 2 rank(s) on 1: state['loader'] keeps its own "
                           "position, and torpor does not reshard it; each rank continues from its own saved "
                           "state_dict"] if case == "stateful" else []), (case, warned)
    # The stateful loader on one rank went on from rank 0's own saved position, not rank 1's.
    saved = [_state.decode((saved_on_two / "stateful" / f"rank_{r}" / "CKP-1_3.ckpt").read_bytes())
             ["rank_state"]["loader"] for r in (0, 1)]
    assert not torch.equal(saved[0]["order"], saved[1]["order"])
    _as_rank(monkeypatch, 0, 1)
    loader = _resume(saved_on_two, "stateful", 1).args.state["loader"]
    assert (loader.epoch, loader.order.tolist()) == (saved[0]["epoch"], saved[0]["order"].tolist())
    assert loader.index > saved[0]["index"]  # and went on from there (one batch in)


def test_a_rank_the_saving_run_did_not_have_gets_generators_derived_from_rank_0s(
        saved_on_two: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    directory = str(saved_on_two / "distributed")

    def rng(rank: int, world: int) -> _state.RngState:
        _as_rank(monkeypatch, rank, world)
        loaded = torpor.load_checkpoint("latest", directory=directory, restore_rng=False)
        assert loaded is not None and loaded.world_size == 2 and loaded.rng is not None
        return loaded.rng

    def same(a: _state.RngState, b: _state.RngState) -> bool:
        return a.python == b.python and bool(torch.equal(a.torch_cpu, b.torch_cpu)) and \
            bool((a.numpy[1] == b.numpy[1]).all())

    saved = [_state.RngState.from_parts(_state.meta_of(p)["rng"], p["rng"])
             for p in (_state.decode((saved_on_two / "distributed" / f"rank_{r}" / "CKP-1_3.ckpt").read_bytes())
                       for r in (0, 1))]
    assert same(rng(0, 3), saved[0]) and same(rng(1, 3), saved[1])  # ranks that existed: their own
    new = rng(2, 3)
    assert same(rng(2, 3), new) and same(rng(2, 4), new)  # deterministic: from the checkpoint and the rank alone
    assert not any(same(new, other) for other in (*saved, rng(3, 4)))  # a stream of its own


def test_a_global_batch_size_the_loader_does_not_make_is_refused_at_a_fresh_start(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Not only at the first resize (in production: the first elastic shrink, hours in): a
    # global batch the loader's per-rank batches do not make is a configuration error at start.
    _as_rank(monkeypatch, 0, 1)
    loader, state = resize_data("distributed", 0, 1, PER_RANK_BATCH)
    net, opt = resize_net()
    monitor = torpor.CheckpointMonitor(directory=str(tmp_path), save_checkpoint_steps=0, global_batch_size=8)
    loop = torpor.Loop(net, opt, callbacks=[monitor], state=state, exit_process=False)
    with pytest.raises(ValueError, match=r"global_batch_size=8 on 1 rank\(s\) means a per-rank batch of 8, but the "
                                         r"loader's batch_size is 4"):
        for _ in loop.epochs(1):
            for _batch in loop.batches(loader):
                loop.step_end()



def test_a_refused_resize_writes_no_breakpoint_checkpoint(saved_on_two: Path, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    # A refused resize trained nothing: with exception_save=True it must not add a breakpoint of
    # the state it refused on each retry (the operator retries the same size until Failed).
    store = tmp_path / "store"
    shutil.copytree(saved_on_two / "global-batch", store)
    _as_rank(monkeypatch, 0, 3)
    loader, state = resize_data("distributed", 0, 3, PER_RANK_BATCH)
    net, opt = resize_net()
    monitor = torpor.CheckpointMonitor(directory=str(store), save_checkpoint_steps=0, global_batch_size=8,
                                       exception_save=True)
    loop = torpor.Loop(net, opt, callbacks=[monitor], resume="latest", state=state, exit_process=False)
    with pytest.raises(torpor.ResizeError, match=r"global_batch_size=8 cannot be split over 3 rank\(s\)"), loop:
        for _ in loop.epochs(2):
            for _batch in loop.batches(loader):
                loop.step_end()
    assert [c.name for c in scan(open_storage(store))] == ["CKP-1_3"]
