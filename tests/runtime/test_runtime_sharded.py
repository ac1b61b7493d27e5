"""Sharded models (issue 11, item 1): every rank's shard saved through DCP, stored by torpor.

Real gloo ranks running ``examples/fsdp2.py`` (FSDP2 ``fully_shard``, FSDP1, or DDP with a
``ZeroRedundancyOptimizer``), a real SIGTERM to one rank mid-run, a real MinIO. Each case
checks what a user would: every rank stopped after the same step and wrote its part of one
complete checkpoint; that checkpoint holds every shard (it loads into an unsharded copy of the
model and optimizer, equal to the state the job gathered at that step); and a resume on the
same world size continues with the losses and the final state of a run never interrupted
(``rtol=1e-5``). The FSDP2 checkpoint also resumes on 3 ranks and on 1 (issue 11, item 2):
right after the load the gathered model and optimizer equal those at the save, training goes
on, and within the epoch of the stop no sample is trained twice and less than one global batch
is left out; an FSDP1 checkpoint is refused on another world size with a ``ResizeError``. Every
wait on the ranks has a deadline: a save that deadlocks fails the test.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import shutil
import subprocess
from pathlib import Path
from types import ModuleType
from typing import Any

import boto3
import pytest
import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict
from torpor_harness import REPO, launch_ranks, logs, read_jsonl, wait_all

import torpor
from torpor.checkpoints import Reason, scan
from torpor.crypto import is_encrypted
from torpor.storage import S3Settings, open_storage
from torpor.termination import StopReason, TerminationMessage
from torpor.transfer import part_checksum

SCRIPT = REPO / "examples" / "fsdp2.py"
PROCS = Path(__file__).resolve().parent / "procs"
END = 45
"""Global steps of every run: 20 steps per epoch on 2 ranks, so the run ends mid-epoch 3."""
STOP = 15
"""The step rank 1 gets its SIGTERM in: mid-epoch 1 (a stop at a boundary would not test the
data position), after the periodic save at step 10."""
SAMPLES, BATCH = 320, 8
"""``examples/fsdp2.py``'s data set and per-rank batch size."""
KEY = bytes(range(32))
PLAIN = {"TORPOR_SAVE_STEPS": "10", "TORPOR_KEEP_MAX": "3"}


def _example() -> ModuleType:
    spec = importlib.util.spec_from_file_location("fsdp2_example", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _launch(run: Path, wrap: str, env: dict[str, str], *, world: int = 2,
            sigterm_at: int = 0, integrated: bool = True) -> list[subprocess.Popen[bytes]]:
    run.mkdir(parents=True)
    argv = ["--wrap", wrap, "--epochs", "3", "--max-steps", str(END), "--losses", str(run / "losses.jsonl"),
            "--sample-ids", "--full-state", str(run), "--sigterm-at", str(sigterm_at),
            *(["--head-optimizer"] if _head(wrap) else []), *([] if integrated else ["--no-integrated-save"])]
    return launch_ranks(world, {"TORPOR_JOB": "ns/sharded", **PLAIN, **env}, argv, run, script=SCRIPT)


def _head(wrap: str) -> bool:
    """Whether the last layer has an optimizer of its own, in ``state=`` (not with FSDP1's flat parameters)."""
    return wrap != "fsdp1"


def _finish(run: Path, procs: list[subprocess.Popen[bytes]], codes: list[int]) -> None:
    try:
        assert wait_all(procs, run, timeout=300) == codes, logs(run)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()


def _losses(run: Path) -> dict[tuple[int, int], float]:
    return {(r["rank"], r["step"]): r["loss"] for r in read_jsonl(run / "losses.jsonl")}


def _full(run: Path, step: int) -> dict[str, Any]:
    return torch.load(run / f"full-{step}.pt", weights_only=True)


_REFERENCES: dict[str, Path] = {}


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """The uninterrupted run of a wrap (once per module): its losses and final full state."""
    def get(wrap: str) -> Path:
        if wrap not in _REFERENCES:
            run = tmp_path_factory.mktemp(f"reference-{wrap}") / "run"
            procs = _launch(run, wrap, {"TORPOR_CHECKPOINT_URI": str(run.parent / "ckpt"),
                                        "TORPOR_INCARNATION": "1"})
            _finish(run, procs, [0, 0])
            _REFERENCES[wrap] = run
        return _REFERENCES[wrap]
    return get


def _assert_close(actual: Any, expected: Any, where: str = "", exact: bool = False) -> None:
    """Equal within the issue's ``rtol=1e-5`` after training; bit for bit (``exact``) where only
    bytes were moved: a load, on any world size, copies the saved values."""
    if isinstance(expected, dict):
        assert set(actual) == set(expected), where
        for k in expected:
            _assert_close(actual[k], expected[k], f"{where}.{k}", exact)
    elif isinstance(expected, list | tuple):
        assert len(actual) == len(expected), where
        for i, (a, e) in enumerate(zip(actual, expected, strict=True)):
            _assert_close(a, e, f"{where}[{i}]", exact)
    elif isinstance(expected, torch.Tensor):
        rtol, atol = (0.0, 0.0) if exact else (1e-5, 1e-6)
        torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol, msg=lambda m: f"{where}: {m}")
    else:
        assert actual == expected, where


CASES = {
    "fsdp2-local": ("fsdp2", "local", False),
    "fsdp2-s3-encrypted": ("fsdp2", "s3", True),
    # integrated_save=False once wrote bare local tensors without placement: nothing loaded
    "fsdp2-local-unintegrated": ("fsdp2", "local", False),
    "fsdp1-local": ("fsdp1", "local", False),
    "zero-local": ("zero", "local", False),
}


@pytest.mark.parametrize("case", list(CASES))
def test_sigterm_to_one_rank_saves_every_shard_and_resumes_exactly(case: str, tmp_path: Path, reference: Any,
                                                                   request: pytest.FixtureRequest) -> None:
    wrap, where, encrypted = CASES[case]
    if where == "s3":
        bucket = request.getfixturevalue("s3_bucket")
        uri = f"s3://{bucket}/jobs/sharded"
        env = {k: v for k, v in os.environ.items() if k.startswith("AWS_")}
    else:
        uri, env = str(tmp_path / "ckpt"), {}
    env["TORPOR_CHECKPOINT_URI"] = uri
    if encrypted:
        env["TORPOR_ENC_KEY"] = "hex:" + KEY.hex()

    # 1. SIGTERM to rank 1 inside step 15: both ranks stop after it, each saves its part.
    run1 = tmp_path / "run1"
    integrated = not case.endswith("-unintegrated")
    _finish(run1, _launch(run1, wrap, {**env, "TORPOR_INCARNATION": "1"}, sigterm_at=STOP, integrated=integrated),
            [143, 143])
    messages = [json.loads((run1 / f"termination-{r}.json").read_text()) for r in (0, 1)]
    assert len({(m["checkpoint"], m["step"]) for m in messages}) == 1, messages
    name, stop = messages[0]["checkpoint"], messages[0]["step"]
    assert stop == STOP and stop % 20 != 0, stop  # mid-epoch: the resumes below continue a partial epoch

    store = open_storage(uri)
    saved = {c.name: c for c in scan(store)}[name]
    assert saved.complete, saved.problem
    assert saved.world_size == 2 and {m.step for m in saved.manifests.values()} == {stop}
    assert {m.reason for m in saved.manifests.values()} == {Reason.EXIT}
    if wrap != "zero":  # a sharded model: each rank's manifest lists its own shards
        for rank, manifest in saved.manifests.items():
            shards = [e for e in manifest.files if e.key == f"rank_{rank}/{name}.distcp"]
            assert shards and shards[0].size > 0, manifest.files
            if encrypted:
                assert is_encrypted(store.get_bytes(shards[0].key)[:16])

    # 2. The checkpoint holds every shard: it loads into an unsharded model and optimizer, in
    #    this process alone, equal to the state the job gathered at the stop.
    example = _example()
    net, opt, state = example.build("none", _head(wrap))
    sched = example.scheduler(opt)
    if encrypted:
        with pytest.raises(ValueError, match="encrypted"):
            torpor.load_checkpoint(name, net, opt, sched, directory=uri, restore_rng=False, state=state)
    loaded = torpor.load_checkpoint(name, net, opt, sched, directory=uri, restore_rng=False, state=state,
                                    enc_key=KEY if encrypted else None)
    assert loaded is not None and loaded.step == stop
    gathered = _full(run1, stop)
    assert gathered["step"] == stop
    _assert_close(net.state_dict(), gathered["model"], "model", exact=True)
    _assert_close(sched.state_dict(), gathered["scheduler"], "scheduler", exact=True)
    full = StateDictOptions(full_state_dict=True)
    for what, optimizer in {"optimizer": opt, **state}.items():
        if wrap == "zero" and what == "optimizer":  # its consolidated state is keyed by parameter number
            continue  # (the resume below checks it)
        _assert_close(get_optimizer_state_dict(net, optimizer, options=full), gathered[what], what, exact=True)

    if case == "fsdp2-local":  # on another world size, each from its own copy of the store
        for world in (3, 1):
            _resumes_on(world, tmp_path, run1, messages[0])
    if case == "zero-local":  # ZeRO's consolidated state, repartitioned by the optimizer on 3 ranks
        _resumes_on(3, tmp_path, run1, messages[0], wrap)
    if case == "fsdp1-local":  # FSDP1 resumes on the world size that saved it only, and says so, on every rank
        before = sorted(c.name for c in scan(store))  # the periodic save at step 10 and the exit save
        for world in (1, 3):
            refused = tmp_path / f"run-on-{world}"
            _finish(refused, _launch(refused, wrap, {**env, "TORPOR_INCARNATION": "2"}, world=world), [1] * world)
            for rank in range(world):
                log = (refused / f"rank-{rank}.log").read_text()
                assert f"ResizeError: checkpoint {name!r} of FullyShardedDataParallel (FSDP1) state was saved on 2 " \
                       f"rank(s) and is resumed on {world}" in log, log
                # what the operator reads to call it a refused resize (outcomes.RankExit.refused_resize)
                message = TerminationMessage.from_json((refused / f"termination-{rank}.json").read_text())
                assert (message.reason, message.exit_code) == (StopReason.ERROR, 1), message
                assert message.error is not None and message.error.startswith("ResizeError: checkpoint"), message
        assert name in before and sorted(c.name for c in scan(store)) == before  # the refusals wrote nothing

    # 3. Resumed on two ranks: the uninterrupted run's losses and final state.
    run2 = tmp_path / "run2"
    _finish(run2, _launch(run2, wrap, {**env, "TORPOR_INCARNATION": "2"}, integrated=integrated), [0, 0])
    assert {json.loads((run2 / f"termination-{r}.json").read_text())["resumed_from"] for r in (0, 1)} == {name}
    ref = reference(wrap)
    expected = _losses(ref)
    assert sorted(expected) == [(r, s) for r in (0, 1) for s in range(1, END + 1)]
    history = {**_losses(run1), **_losses(run2)}
    assert min(s for _, s in _losses(run2)) == stop + 1
    keys = sorted(expected)
    torch.testing.assert_close(torch.tensor([history[k] for k in keys], dtype=torch.float64),
                               torch.tensor([expected[k] for k in keys], dtype=torch.float64), rtol=1e-5, atol=1e-6)
    _assert_close(_full(run2, END), _full(ref, END), "final")


def _resumes_on(world: int, tmp_path: Path, run1: Path, stopped: dict[str, Any], wrap: str = "fsdp2") -> None:
    """The stopped 2-rank run of ``wrap`` resumed on ``world`` ranks (see the module docstring)."""
    name, stop, epoch = stopped["checkpoint"], stopped["step"], stopped["epoch"]
    uri = tmp_path / f"ckpt-on-{world}"
    shutil.copytree(tmp_path / "ckpt", uri)
    run = tmp_path / f"run-on-{world}"
    _finish(run, _launch(run, wrap, {"TORPOR_CHECKPOINT_URI": str(uri), "TORPOR_INCARNATION": "2"},
                         world=world), [0] * world)
    assert {json.loads((run / f"termination-{r}.json").read_text())["resumed_from"] for r in range(world)} == {name}
    _assert_close(torch.load(run / f"resumed-{stop}.pt", weights_only=True), _full(run1, stop), f"on {world}",
                  exact=True)  # model, optimizer and LR scheduler, bit for bit
    after = read_jsonl(run / "losses.jsonl")
    assert {r["rank"] for r in after} == set(range(world))
    assert (min(r["step"] for r in after), max(r["step"] for r in after)) == (stop + 1, END), world
    assert all(math.isfinite(r["loss"]) for r in after), (world, after)
    trained = [i for r in read_jsonl(run1 / "losses.jsonl") if r["step"] <= stop and r["epoch"] == epoch
               for i in r["ids"]]
    trained += [i for r in after if r["epoch"] == epoch for i in r["ids"]]
    assert len(trained) == len(set(trained)), (world, sorted(trained))
    assert len(set(range(SAMPLES)) - set(trained)) < world * BATCH, world  # less than one global batch


REFUSED = {
    "trainable": ("ShardedStateError", "save_trainable_params=True cannot be saved for a sharded model (0.weight"),
    "saved-network": ("ShardedStateError", "saved_network holds sharded weights (0.weight (DTensor"),
    "zero-unintegrated": ("ShardedStateError", "ZeroRedundancyOptimizer) needs integrated_save=True"),
}


def test_what_cannot_be_saved_correctly_is_refused_on_every_rank_without_hanging(tmp_path: Path) -> None:
    # Refused when training begins, on every rank, with nothing written; a breakpoint (the same
    # exception on every rank) is not saved, the exception says why and reaches the caller.
    cases = [*REFUSED, "breakpoint", "zero-breakpoint"]
    procs = launch_ranks(2, {}, ["--cases", ",".join(cases), "--directory", str(tmp_path / "ckpt"),
                                 "--result", str(tmp_path / "result-{rank}.json")], tmp_path,
                         script=PROCS / "sharded_refusal.py")
    _finish(tmp_path, procs, [0, 0])
    for rank in (0, 1):
        outcomes = json.loads((tmp_path / f"result-{rank}.json").read_text())
        for case, (error, message) in REFUSED.items():
            assert outcomes[case]["error"] == error and message in outcomes[case]["message"], (rank, outcomes[case])
            assert outcomes[case]["saved"] == []
            assert scan(open_storage(tmp_path / "ckpt" / case)) == []
        breakpoint_ = outcomes["breakpoint"]
        assert breakpoint_["error"] == "ValueError" and breakpoint_["message"] == "loss is NaN"
        assert any("breakpoint (exception_save) of this run cannot be saved: 0.weight (DTensor" in note
                   for note in breakpoint_["notes"]), breakpoint_["notes"]
        assert breakpoint_["saved"] == ["CKP-1_2"]  # the periodic save before step 3, not a breakpoint
        zero = outcomes["zero-breakpoint"]
        assert zero["error"] == "ValueError" and zero["saved"] == ["CKP-1_2"], zero
        assert any("breakpoint (exception_save) of this run cannot be saved: " in note and "needs every rank" in note
                   for note in zero["notes"]), zero["notes"]
    for case in ("breakpoint", "zero-breakpoint"):
        assert [c.name for c in scan(open_storage(tmp_path / "ckpt" / case))] == ["CKP-1_2"], case


def test_a_damaged_shard_of_one_rank_makes_every_rank_resume_from_the_previous_checkpoint(
        tmp_path: Path, reference: Any) -> None:
    # Only rank 1 finds its part damaged (its own .distcp); DCP's collective read must not leave
    # rank 0 waiting: both ranks agree to skip it and resume from the periodic checkpoint before,
    # which was saved in the background (async_save: shards staged at the step, written later).
    uri = str(tmp_path / "ckpt")
    run1 = tmp_path / "run1"
    _finish(run1, _launch(run1, "fsdp2", {"TORPOR_CHECKPOINT_URI": uri, "TORPOR_INCARNATION": "1",
                                          "TORPOR_ASYNC_SAVE": "true"}, sigterm_at=STOP), [143, 143])
    name = json.loads((run1 / "termination-0.json").read_text())["checkpoint"]
    shard = tmp_path / "ckpt" / "rank_1" / f"{name}.distcp"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))

    run2 = tmp_path / "run2"
    _finish(run2, _launch(run2, "fsdp2", {"TORPOR_CHECKPOINT_URI": uri, "TORPOR_INCARNATION": "2"}), [0, 0])
    assert {json.loads((run2 / f"termination-{r}.json").read_text())["resumed_from"] for r in (0, 1)} == {"CKP-1_10"}
    for rank in (0, 1):
        log = (run2 / f"rank-{rank}.log").read_text()
        assert f"checkpoint {name!r}" in log and "could not be loaded" in log, log
    assert "sha256" in (run2 / "rank-1.log").read_text()
    expected = _losses(reference("fsdp2"))
    resumed = _losses(run2)
    assert sorted(resumed) == [(r, s) for r in (0, 1) for s in range(11, END + 1)]
    keys = sorted(resumed)
    torch.testing.assert_close(torch.tensor([resumed[k] for k in keys], dtype=torch.float64),
                               torch.tensor([expected[k] for k in keys], dtype=torch.float64), rtol=1e-5, atol=1e-6)


@pytest.mark.s3
def test_shards_larger_than_a_part_go_up_in_parts_each_with_its_crc32_and_load_back_whole(
        s3_bucket: str, tmp_path: Path) -> None:
    # Each rank's .distcp (48 MiB) is larger than the default 32 MiB part: a multipart upload
    # whose every part carries the CRC32 of its bytes, kept by the server; the parts load back
    # into an unsharded model and optimizer equal to the state the job gathered.
    uri = f"s3://{s3_bucket}/jobs/large"
    env = {k: v for k, v in os.environ.items() if k.startswith("AWS_")}
    script = PROCS / "sharded_large.py"
    procs = launch_ranks(2, {**env, "TORPOR_JOB": "ns/large"},
                         ["--directory", uri, "--full", str(tmp_path / "full.pt")], tmp_path, script=script)
    _finish(tmp_path, procs, [0, 0])
    gathered = torch.load(tmp_path / "full.pt", weights_only=True)
    [name] = gathered["saved"]
    saved = {c.name: c for c in scan(open_storage(uri))}[name]
    assert saved.complete and saved.world_size == 2, saved.problem

    client, part = boto3.session.Session().client("s3"), S3Settings().multipart_chunksize
    for rank, manifest in saved.manifests.items():
        [entry] = [e for e in manifest.files if e.key == f"rank_{rank}/{name}.distcp"]
        key = f"jobs/large/{entry.key}"
        body = client.get_object(Bucket=s3_bucket, Key=key)["Body"].read()
        assert len(body) == entry.size > part, (rank, entry.size)
        parts = client.get_object_attributes(Bucket=s3_bucket, Key=key,
                                             ObjectAttributes=["ObjectParts"])["ObjectParts"]["Parts"]
        expected = [part_checksum(body[i:i + part]) for i in range(0, len(body), part)]
        assert len(expected) >= 2 and [p.get("ChecksumCRC32") for p in parts] == expected, (rank, parts)

    spec = importlib.util.spec_from_file_location("sharded_large", script)
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    net, opt = module.build()  # no process group here: the same model, unsharded
    loaded = torpor.load_checkpoint(name, net, opt, directory=uri, restore_rng=False)
    assert loaded is not None and loaded.step == 1
    _assert_close(net.state_dict(), gathered["model"], "model", exact=True)
    _assert_close(get_optimizer_state_dict(net, opt, options=StateDictOptions(full_state_dict=True)),
                  gathered["optimizer"], "optimizer", exact=True)
