"""Memory and integrity of the load and staging paths (issue 10, items 17 and 18).

Encrypted files are bound to their place (checkpoint name, rank, file kind, save id) and the
manifests of an encrypted checkpoint are authenticated: a real two-rank checkpoint (gloo
ranks of ``examples/train.py``) is tampered with the way someone who can write the store
but has no key can, in a local directory and on MinIO, and every tampering is refused on
load with an ``IntegrityError`` naming the file. The verified load paths are checked to
still refuse flipped bytes, truncation, a wrong key and plaintext where a key was given,
and async staging of model + trainable parameters to hold one copy.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import os
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from torpor_harness import launch_ranks, logs, wait_all

import torpor
from torpor._loading import load_shard
from torpor._saving import write_file
from torpor.checkpoints import FileKind, Manifest, Reason, file_key
from torpor.crypto import Encryption, manifest_tag
from torpor.storage import Storage, open_storage

MIB = 1024 * 1024
KEY = bytes(range(32))


def example_net() -> nn.Module:
    """The network of ``examples/train.py``."""
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Dropout(0.1), nn.Linear(32, 4))


def two_rank_encrypted_checkpoints(uri: str, logdir: Path) -> None:
    """Real gloo ranks write CKP-1_4 and CKP-1_8, both encrypted, under ``uri``."""
    logdir.mkdir(parents=True, exist_ok=True)
    env = {"TORPOR_CHECKPOINT_URI": uri, "TORPOR_SAVE_STEPS": "4", "TORPOR_KEEP_MAX": "10",
           "TORPOR_ENC_KEY": "hex:" + KEY.hex()}
    procs = launch_ranks(2, env, ["--max-steps", "8", "--epochs", "1"], logdir)
    assert wait_all(procs, logdir) == [0, 0], logs(logdir)


def copy_prefix(source: Storage, target: Storage) -> None:
    for obj in source.list():
        target.put_bytes(obj.key, source.get_bytes(obj.key))


def manifest_of(store: Storage, name: str, rank: int) -> Manifest:
    return Manifest.from_json(store.get_bytes(file_key(name, rank, FileKind.MANIFEST)))


def put_manifest(store: Storage, m: Manifest) -> None:
    store.put_bytes(file_key(m.name, m.rank, FileKind.MANIFEST), m.to_json().encode())


def point_at(m: Manifest, kind: FileKind, data: bytes) -> Manifest:
    """``m`` with the entry of ``kind`` describing ``data``: what an attacker writes (the tag stays)."""
    files = tuple(dataclasses.replace(f, size=len(data), sha256=hashlib.sha256(data).hexdigest())
                  if f.kind is kind else f for f in m.files)
    return dataclasses.replace(m, files=files)


def resign(m: Manifest) -> Manifest:
    """A manifest tag made with the key: only to show that the files' own binding refuses too."""
    unsigned = dataclasses.replace(m, auth="")
    return dataclasses.replace(m, auth=manifest_tag(KEY, unsigned.signed_text().encode()))


def swap_rank_shards(store: Storage, sign: bool = False) -> None:
    a, b = (store.get_bytes(file_key("CKP-1_8", r, FileKind.SHARD)) for r in (0, 1))
    store.put_bytes(file_key("CKP-1_8", 0, FileKind.SHARD), b)
    store.put_bytes(file_key("CKP-1_8", 1, FileKind.SHARD), a)
    for rank, data in ((0, b), (1, a)):
        m = point_at(manifest_of(store, "CKP-1_8", rank), FileKind.SHARD, data)
        put_manifest(store, resign(m) if sign else m)


def shard_from_another_checkpoint(store: Storage) -> None:
    older = store.get_bytes(file_key("CKP-1_4", 0, FileKind.SHARD))
    store.put_bytes(file_key("CKP-1_8", 0, FileKind.SHARD), older)
    put_manifest(store, point_at(manifest_of(store, "CKP-1_8", 0), FileKind.SHARD, older))


def roll_rank_1_back(store: Storage) -> None:
    """Rank 1's part of CKP-1_8 replaced by its part of the older save, renamed to fit."""
    new, old = manifest_of(store, "CKP-1_8", 1), manifest_of(store, "CKP-1_4", 1)
    shard = store.get_bytes(file_key("CKP-1_4", 1, FileKind.SHARD))
    store.put_bytes(file_key("CKP-1_8", 1, FileKind.SHARD), shard)
    files = tuple(dataclasses.replace(f, key=file_key("CKP-1_8", 1, f.kind)) for f in old.files)
    put_manifest(store, dataclasses.replace(old, name=new.name, step=new.step, epoch=new.epoch,
                                            step_in_epoch=new.step_in_epoch, save_id=new.save_id, files=files))


def strip_the_tag(store: Storage) -> None:
    m = manifest_of(store, "CKP-1_8", 0)
    put_manifest(store, dataclasses.replace(m, auth=""))  # written as an old, unauthenticated format 1


def load_as(rank: int, uri: str, monkeypatch: pytest.MonkeyPatch, net: nn.Module | None = None) -> Any:
    monkeypatch.setenv("RANK", str(rank))
    monkeypatch.setenv("WORLD_SIZE", "2")
    return torpor.load_checkpoint("CKP-1_8", net if net is not None else example_net(), directory=uri,
                                  enc_key=KEY, restore_rng=False)


@pytest.fixture(params=["local", "s3"])
def root(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "local":
        return str(tmp_path / "store")
    bucket = request.getfixturevalue("s3_bucket")  # real MinIO
    return f"s3://{bucket}/integrity"


def test_swapped_and_rolled_back_encrypted_files_are_refused(root: str, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    pristine = f"{root}/pristine"
    two_rank_encrypted_checkpoints(pristine, tmp_path / "logs")
    source = open_storage(pristine)
    m0 = manifest_of(source, "CKP-1_8", 0)
    assert m0.auth.startswith("hmac-sha256:") and m0.extra["encryption"] == "AES-GCM"
    for rank in (0, 1):
        assert load_as(rank, pristine, monkeypatch).step == 8  # untouched, both ranks load

    cases = [
        ("swap-ranks", swap_rank_shards, 0, "rank_0/CKP-1_8.manifest.json", "manifest authentication failed"),
        ("swap-ranks-resigned", lambda s: swap_rank_shards(s, sign=True), 0, "rank_0/CKP-1_8.ckpt",
         "another place"),
        ("other-checkpoint", shard_from_another_checkpoint, 0, "rank_0/CKP-1_8.manifest.json",
         "manifest authentication failed"),
        ("rollback", roll_rank_1_back, 1, "rank_1/CKP-1_8.manifest.json", "manifest authentication failed"),
        ("unauthenticated", strip_the_tag, 0, "rank_0/CKP-1_8.manifest.json", "not authenticated"),
    ]
    for case, tamper, rank, named, why in cases:
        uri = f"{root}/{case}"
        store = open_storage(uri)
        copy_prefix(source, store)
        tamper(store)
        net = example_net()
        before = copy.deepcopy(net.state_dict())
        with pytest.raises(torpor.IntegrityError, match=why) as info:
            load_as(rank, uri, monkeypatch, net)
        assert f"{uri}/{named}" in str(info.value), (case, str(info.value))
        for key, value in net.state_dict().items():
            assert torch.equal(value, before[key]), (case, key)  # nothing was loaded


def shard_state() -> dict[str, Any]:
    gen = torch.Generator().manual_seed(3)
    return {"torpor_format": 1, "model": {"w": torch.randn(5 * MIB, generator=gen), "b": torch.randn(7)},
            "optimizer": {"m": torch.arange(MIB, dtype=torch.float64)}, "meta": "{}"}


@pytest.mark.parametrize("mode", [None, "AES-GCM", "AES-CBC"])
def test_the_verified_load_paths_load_exactly_and_refuse_damage(root: str, mode: str | None) -> None:
    store = open_storage(root)
    state = shard_state()
    enc = Encryption(KEY, mode) if mode else None
    entry = write_file(store, "rank_0/CKP-1_1.ckpt", state, enc, save_id="s:1")
    manifest = Manifest(name="CKP-1_1", rank=0, world_size=1, epoch=1, step=1, step_in_epoch=1,
                        reason=Reason.PERIODIC, save_id="s:1", created=0.0, files=(entry,))
    if enc is not None:
        manifest = dataclasses.replace(manifest, auth=manifest_tag(KEY, manifest.signed_text().encode()))
    key = KEY if enc else None
    loaded = load_shard(store, entry, key, None, manifest=manifest)
    assert torch.equal(loaded["model"]["w"], state["model"]["w"]) and torch.equal(loaded["model"]["b"],
                                                                                 state["model"]["b"])
    assert torch.equal(loaded["optimizer"]["m"], state["optimizer"]["m"])
    loaded["model"]["w"].add_(1)  # ordinary, writable memory of its own
    assert torch.equal(load_shard(store, entry, key, None, manifest=manifest)["model"]["w"], state["model"]["w"])

    blob = store.get_bytes(entry.key)
    flipped = bytearray(blob)
    flipped[len(blob) // 3] ^= 0x10
    store.put_bytes(entry.key, bytes(flipped))
    with pytest.raises(torpor.IntegrityError, match=f"{entry.key}: sha256"):
        load_shard(store, entry, key, None, manifest=manifest)
    store.put_bytes(entry.key, blob[: len(blob) - 100])
    with pytest.raises(torpor.IntegrityError, match=f"{entry.key}: size"):
        load_shard(store, entry, key, None, manifest=manifest)
    store.put_bytes(entry.key, blob)
    if enc is not None:
        wrong = Encryption(os.urandom(32 if mode != "SM4-CBC" else 16), mode)
        wrong_manifest = dataclasses.replace(manifest, auth=manifest_tag(wrong.key, manifest.signed_text().encode()))
        with pytest.raises(torpor.IntegrityError, match="wrong encryption key"):
            load_shard(store, entry, wrong.key, None, manifest=wrong_manifest)
        with pytest.raises(ValueError, match="no enc_key"):
            load_shard(store, entry, None, None, manifest=manifest)
        # An attacker's damaged ciphertext under a manifest that matches it: the cipher says no.
        flipped_entry = dataclasses.replace(entry, sha256=hashlib.sha256(flipped).hexdigest())
        store.put_bytes(entry.key, bytes(flipped))
        with pytest.raises(torpor.IntegrityError, match=f"{entry.key}: .*failed authentication"):
            load_shard(store, flipped_entry, key, None, manifest=manifest)
    else:
        with pytest.raises(torpor.IntegrityError, match="not encrypted but an enc_key was given"):
            load_shard(store, entry, KEY, None)


def test_a_region_of_the_scratch_buffer_read_twice_is_an_error_not_zeros() -> None:
    import mmap

    from torpor import _state

    size = 8 * MIB
    scratch = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE)
    scratch[:] = os.urandom(size)
    expected = scratch[MIB:5 * MIB]
    reader = _state.ConsumingReader(scratch, size)
    first = bytearray(4 * MIB)
    reader.seek(MIB)
    assert reader.readinto(first) == 4 * MIB and first == expected
    assert scratch[MIB:5 * MIB] == bytes(4 * MIB)  # the pages read were given back (they read as zeros)
    assert scratch[5 * MIB:] != bytes(3 * MIB)  # the rest is untouched
    reader.seek(2 * MIB)
    with pytest.raises(RuntimeError, match="read twice"):
        reader.readinto(bytearray(MIB))
    reader.close()
    scratch.close()


def wide_loader(width: int, samples: int = 16) -> tuple[nn.Module, Any, DataLoader]:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 2))
    data = TensorDataset(torch.randn(samples, width), torch.randint(0, 2, (samples,)))
    return net, torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9), DataLoader(data, batch_size=4)


@pytest.mark.parametrize("trainable", [False, True])
def test_async_staging_holds_one_copy_of_what_it_saves(tmp_path: Path, trainable: bool) -> None:
    net, opt, loader = wide_loader(256)
    net[0].bias.requires_grad_(False)  # not every parameter is trainable
    monitor = torpor.CheckpointMonitor(directory=str(tmp_path / "ck"), save_checkpoint_steps=2, async_save=True,
                                       save_network_params=True, save_trainable_params=trainable)
    torpor.Model(net, loss_fn=nn.CrossEntropyLoss(), optimizer=opt).train(1, loader, callbacks=[monitor])
    monitor.wait()
    assert monitor.save_errors == []
    model = sum(t.numel() * t.element_size() for t in net.state_dict().values())
    moments = sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values()
                  if isinstance(t, torch.Tensor))
    rng = torch.get_rng_state().numel()
    assert model <= monitor._staging.nbytes <= model + moments + 2 * rng  # one copy of the model, not two
    assert monitor._staging.nbytes - model - moments <= 2 * rng
    if trainable:
        saved = torch.load(tmp_path / "ck" / "rank_0" / "CKP-1_4.trainable.pt", weights_only=True)["model"]
        assert set(saved) == {k for k, p in net.named_parameters() if p.requires_grad}
        assert all(torch.equal(saved[k], v) for k, v in net.state_dict().items() if k in saved)
