"""async_save against a real MinIO: the snapshot is exact, SIGTERM waits for the upload, an
outage is reported and survived, and nothing incomplete is ever resumed from."""

from __future__ import annotations

import copy
import logging
import os
import signal
from pathlib import Path

import boto3
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from torpor_harness import wait_for

import torpor
from s3server import MinioServer
from torpor.checkpoints import Manifest, Reason, newest_complete, scan
from torpor.errors import AsyncSaveError
from torpor.storage import open_storage

pytestmark = pytest.mark.s3


def wide_setup(width: int = 256, samples: int = 96) -> tuple[nn.Module, nn.Module, torch.optim.Optimizer, DataLoader]:
    """A model big enough (``width``² floats, plus momentum) that an upload takes a while."""
    torch.manual_seed(0)
    x = torch.randn(samples, width)
    y = (x[:, :4].sum(dim=1) > 0).long()
    loader = DataLoader(TensorDataset(x, y), batch_size=8, shuffle=True)
    net = nn.Sequential(nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 2))
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    return net, nn.CrossEntropyLoss(), opt, loader


class Snapshots(torpor.Callback):
    """Deep copies of the model and optimizer state at given steps (the truth to compare with)."""

    order = -50  # after OnRequestExit, before CheckpointMonitor: the same step boundary

    def __init__(self, steps: set[int]) -> None:
        self.steps = steps
        self.states: dict[int, tuple[dict, dict]] = {}

    def on_train_step_end(self, run_context: torpor.RunContext) -> None:
        args = run_context.original_args()
        if args.cur_step_num in self.steps:
            self.states[args.cur_step_num] = (copy.deepcopy(args.network.state_dict()),
                                              copy.deepcopy(args.optimizer.state_dict()))


class Hook(torpor.Callback):
    """Runs ``action(step)`` after every step, after the monitor."""

    order = 100

    def __init__(self, action) -> None:
        self.action = action

    def on_train_step_end(self, run_context: torpor.RunContext) -> None:
        self.action(run_context.original_args().cur_step_num)


def assert_state_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        if isinstance(a[key], torch.Tensor):
            assert torch.equal(a[key], b[key]), key
        elif isinstance(a[key], dict):
            assert_state_equal(a[key], b[key])
        else:
            assert a[key] == b[key], key


def test_async_save_writes_exactly_the_snapshot_step_although_training_went_on(s3_bucket: str) -> None:
    uri = f"s3://{s3_bucket}/async"
    net, loss, opt, loader = wide_setup(samples=120)  # 15 steps: the last one is saved as "final"
    monitor = torpor.CheckpointMonitor(directory=uri, save_checkpoint_steps=4, keep_checkpoint_max=0,
                                       async_save=True)
    truth = Snapshots({4, 8, 12})
    overlapped = []
    hook = Hook(lambda step: overlapped.append(step) if monitor.in_flight else None)
    torpor.Model(net, loss_fn=loss, optimizer=opt).train(1, loader, callbacks=[monitor, truth, hook])

    assert monitor.saved == ["CKP-1_4", "CKP-1_8", "CKP-1_12", "CKP-1_15"] and monitor.save_errors == []
    assert overlapped, "no step ran while a background save was in flight"
    for step, (model_state, opt_state) in truth.states.items():
        fresh, _, fresh_opt, _ = wide_setup()
        loaded = torpor.load_checkpoint(f"CKP-1_{step}", fresh, fresh_opt, directory=uri, restore_rng=False)
        assert loaded is not None and loaded.step == step
        assert_state_equal(fresh.state_dict(), model_state)
        assert_state_equal(fresh_opt.state_dict()["state"], opt_state["state"])
    # ... and training really moved on after the last snapshot.
    assert not torch.equal(net[0].weight, truth.states[12][0]["0.weight"])
    assert len(monitor.stalls) == 4 and all(s < 5 for s in monitor.stalls)


def test_sigterm_during_an_async_upload_waits_for_it_then_saves_the_exit_checkpoint(
        s3_bucket: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TORPOR_JOB", "ns/job")
    monkeypatch.setenv("TORPOR_TERMINATION_LOG", str(tmp_path / "termination-log"))
    uri = f"s3://{s3_bucket}/sigterm"
    net, loss, opt, loader = wide_setup(width=1024)  # ~8 MiB with momentum: the upload takes a moment
    monitor = torpor.CheckpointMonitor(directory=uri, save_checkpoint_steps=3, keep_checkpoint_max=0,
                                       async_save=True, save_network_params=False)
    exit_cb = torpor.OnRequestExit(file_name="Net", directory=uri, save_export=False)
    seen_in_flight = []

    def kill(step: int) -> None:
        if step == 3:
            seen_in_flight.append(monitor.in_flight)
            os.kill(os.getpid(), signal.SIGTERM)  # delivered now, acted on at the end of step 4

    with pytest.raises(SystemExit) as info:
        torpor.Model(net, loss_fn=loss, optimizer=opt).train(3, loader, callbacks=[monitor, exit_cb, Hook(kill)])
    assert info.value.code == 143
    assert seen_in_flight == [True]
    checkpoints = {c.name: c for c in scan(open_storage(uri))}
    assert checkpoints["CKP-1_3"].complete and checkpoints["Net-1_4"].complete
    periodic, final = checkpoints["CKP-1_3"].manifests[0], checkpoints["Net-1_4"].manifests[0]
    assert (periodic.reason, periodic.step, final.reason, final.step) == (Reason.PERIODIC, 3, Reason.EXIT, 4)
    assert periodic.created < final.created  # the exit save began after the upload finished
    assert not monitor.in_flight and monitor.save_errors == []


@pytest.fixture
def private_minio(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A MinIO of this test's own, to stop and restart (on the same port) mid-run."""
    server = MinioServer(tmp_path / "minio")
    server.start()
    try:
        for key, value in server.env().items():
            monkeypatch.setenv(key, value)
        monkeypatch.setenv("AWS_MAX_ATTEMPTS", "2")  # fail fast while it is down
        boto3.session.Session().client("s3").create_bucket(Bucket="outage")  # not the cached default session
        yield server
    finally:
        server.stop()


def test_minio_stopped_during_a_background_save(private_minio: MinioServer, tmp_path: Path,
                                                caplog: pytest.LogCaptureFixture) -> None:
    uri = "s3://outage/job"
    net, loss, opt, loader = wide_setup(width=1536, samples=160)  # ~27 MiB of state per save
    monitor = torpor.CheckpointMonitor(directory=uri, save_checkpoint_steps=5, keep_checkpoint_max=0,
                                       async_save=True, save_network_params=False)
    events: list[str] = []
    port = private_minio.port

    def outage(step: int) -> None:
        if step == 5:
            events.append(f"in flight at stop: {monitor.in_flight}")
            private_minio.stop()  # while the step-5 save uploads
        if step == 6:
            wait_for(lambda: not monitor.in_flight, timeout=120, what="the failing save to give up")
            events.append(f"errors at 6: {len(monitor.save_errors)}")
        if step == 7:  # the monitor reported it at this step boundary, before this hook
            events.append(f"errors at 7: {len(monitor.save_errors)}")
            restarted = MinioServer(private_minio.workdir, port=port)
            restarted.access_key, restarted.secret_key = private_minio.access_key, private_minio.secret_key
            restarted.start()
            private_minio._proc = restarted._proc  # the fixture stops whichever is running

    with caplog.at_level(logging.ERROR, logger="torpor"):
        torpor.Model(net, loss_fn=loss, optimizer=opt).train(1, loader, callbacks=[monitor, Hook(outage)])

    # The failed save is reported at the first step boundary after it gave up: step 6's if the
    # retries ran out before step 6 began (connection refused fails fast), else step 7's.
    assert events[0] == "in flight at stop: True" and events[2] == "errors at 7: 1", events
    assert events[1] in ("errors at 6: 0", "errors at 6: 1"), events
    assert len(monitor.save_errors) == 1
    error = monitor.save_errors[0]
    assert isinstance(error, AsyncSaveError) and "CKP-1_5" in str(error) and error.__cause__ is not None
    assert any("CKP-1_5" in r.getMessage() for r in caplog.records)
    assert monitor.saved == ["CKP-1_5", "CKP-1_10", "CKP-1_15", "CKP-1_20"]
    checkpoints = {c.name: c for c in scan(open_storage(uri))}
    assert "CKP-1_5" not in checkpoints or not checkpoints["CKP-1_5"].complete
    assert all(checkpoints[n].complete for n in ("CKP-1_10", "CKP-1_15", "CKP-1_20"))
    newest = newest_complete(checkpoints.values())
    assert newest is not None and newest.name == "CKP-1_20"
    with pytest.raises(torpor.IncompleteCheckpointError if "CKP-1_5" in checkpoints
                       else torpor.CheckpointNotFoundError):
        torpor.load_checkpoint("CKP-1_5", wide_setup(width=1536)[0], directory=uri)


def test_async_errors_raise_mode_raises_at_the_next_step(tmp_path: Path) -> None:
    target = tmp_path / "ck"
    target.write_text("a file where the checkpoint directory should be")  # every save fails
    net, loss, opt, loader = wide_setup(width=16)
    monitor = torpor.CheckpointMonitor(directory=str(target), save_checkpoint_steps=2, async_save=True,
                                       async_errors="raise")
    with pytest.raises(AsyncSaveError, match="CKP-1_2") as info:
        torpor.Model(net, loss_fn=loss, optimizer=opt).train(1, loader, callbacks=[monitor])
    assert isinstance(info.value.__cause__, OSError)
    monitor.wait()


@pytest.mark.parametrize("mode", ["AES-GCM", "AES-CBC", "SM4-CBC"])
def test_encrypted_async_checkpoints_resume_and_refuse_a_wrong_key(s3_bucket: str, mode: str) -> None:
    uri = f"s3://{s3_bucket}/enc-{mode.lower()}"
    key = os.urandom(16)
    net, loss, opt, loader = wide_setup(width=64)
    monitor = torpor.CheckpointMonitor(directory=uri, save_checkpoint_steps=6, async_save=True,
                                       enc_key=key, enc_mode=mode)
    truth = Snapshots({12})
    torpor.Model(net, loss_fn=loss, optimizer=opt).train(1, loader, callbacks=[monitor, truth])
    store = open_storage(uri)
    manifest = Manifest.from_json(store.get_bytes("rank_0/CKP-1_12.manifest.json"))
    assert manifest.extra["encryption"] == mode and key.hex() not in store.get_bytes(
        "rank_0/CKP-1_12.manifest.json").decode()
    raw = store.get_bytes("rank_0/CKP-1_12.ckpt")
    assert raw.startswith(b"TORPENC")

    fresh, _, fresh_opt, _ = wide_setup(width=64)
    loaded = torpor.load_checkpoint("latest", fresh, fresh_opt, directory=uri, enc_key=key, restore_rng=False)
    assert loaded is not None and loaded.name == "CKP-1_12"
    assert_state_equal(fresh.state_dict(), truth.states[12][0])

    untouched, _, _, _ = wide_setup(width=64)
    before = copy.deepcopy(untouched.state_dict())
    # 'latest' tries every complete checkpoint (a warning each), then raises the newest's error
    with pytest.raises(torpor.IntegrityError, match="wrong encryption key"), \
            pytest.warns(torpor.TorporWarning, match="'CKP-1_12' .* wrong encryption key.* 'CKP-1_6'"):
        torpor.load_checkpoint("latest", untouched, directory=uri, enc_key=os.urandom(16))
    with pytest.raises(ValueError, match="encrypted"), pytest.warns(torpor.TorporWarning, match="no enc_key"):
        torpor.load_checkpoint("latest", untouched, directory=uri)
    assert_state_equal(untouched.state_dict(), before)  # nothing was loaded


def test_a_modified_encrypted_shard_is_refused_even_with_a_matching_manifest(s3_bucket: str) -> None:
    uri = f"s3://{s3_bucket}/tamper"
    key = os.urandom(32)
    net, loss, opt, loader = wide_setup(width=32)
    monitor = torpor.CheckpointMonitor(directory=uri, save_checkpoint_steps=12, enc_key=key)
    torpor.Model(net, loss_fn=loss, optimizer=opt).train(1, loader, callbacks=[monitor])
    store = open_storage(uri)
    blob = bytearray(store.get_bytes("rank_0/CKP-1_12.ckpt"))
    blob[len(blob) // 2] ^= 0x01
    store.put_bytes("rank_0/CKP-1_12.ckpt", bytes(blob))
    # An attacker who can write the bucket can fix the manifest's sha256 too: its tag says no (and the
    # cipher would: see test_runtime_integrity).
    doc = Manifest.from_json(store.get_bytes("rank_0/CKP-1_12.manifest.json"))
    import dataclasses
    import hashlib
    files = tuple(dataclasses.replace(f, sha256=hashlib.sha256(blob).hexdigest()) if f.kind.value == "shard" else f
                  for f in doc.files)
    store.put_bytes("rank_0/CKP-1_12.manifest.json", dataclasses.replace(doc, files=files).to_json().encode())
    with pytest.raises(torpor.IntegrityError, match=r"CKP-1_12\.manifest\.json: manifest authentication failed"):
        torpor.load_checkpoint("CKP-1_12", wide_setup(width=32)[0], directory=uri, enc_key=key)


def test_async_staging_is_reserved_at_train_begin_and_reused_by_the_first_snapshot(s3_bucket: str) -> None:
    net, loss, opt, loader = wide_setup(width=512, samples=32)
    monitor = torpor.CheckpointMonitor(directory=f"s3://{s3_bucket}/reserve", save_checkpoint_steps=2,
                                       async_save=True, save_network_params=False)
    model_bytes = sum(t.numel() * t.element_size() for t in net.state_dict().values())
    seen: dict[str, object] = {}

    class Probe(torpor.Callback):
        order = -100  # before the monitor's first save at step 2

        def on_train_step_end(self, run_context: torpor.RunContext) -> None:
            if run_context.original_args().cur_step_num == 1:
                seen["reserved"] = monitor._staging.nbytes
                seen["pointers"] = {b.data_ptr() for b in monitor._staging._buffers.values()}

    torpor.Model(net, loss_fn=loss, optimizer=opt).train(1, loader, callbacks=[monitor, Probe()])
    monitor.wait()
    assert seen["reserved"] == model_bytes  # before any checkpoint was due
    after = {b.data_ptr() for b in monitor._staging._buffers.values()}
    assert seen["pointers"] <= after  # the snapshots copied into the reserved buffers
    assert monitor.save_errors == [] and len(monitor.saved) >= 2
