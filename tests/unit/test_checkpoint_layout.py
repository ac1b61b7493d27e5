"""The shared checkpoint contract: names, keys, manifests, completeness, termination messages."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import pytest

from torpor._watching import ExitFileWatcher, read_request
from torpor.checkpoints import (
    AUTHENTICATED_FORMAT,
    Checkpoint,
    FileEntry,
    FileKind,
    KeyParts,
    Manifest,
    NameParts,
    Reason,
    assemble,
    checkpoint_name,
    delete_checkpoints,
    file_key,
    newest_complete,
    parse_key,
    parse_name,
    scan,
)
from torpor.errors import IntegrityError
from torpor.storage import LocalStorage, ObjectInfo, read_verified, sha256_hex
from torpor.termination import (
    EXIT_FILE_REQUEST,
    StopReason,
    TerminationMessage,
    signal_exit_code,
    signal_from_exit_code,
)


def test_names_and_keys_round_trip() -> None:
    assert checkpoint_name("CKP", 3, 17) == "CKP-3_17"
    assert parse_name("CKP-3_17") == NameParts("CKP", 3, 17)
    assert parse_name("my-run-2_5") == NameParts("my-run", 2, 5)
    assert parse_name("Net") is None and parse_name("CKP-3") is None
    assert file_key("CKP-1_5", 2, FileKind.MANIFEST) == "rank_2/CKP-1_5.manifest.json"
    for kind in FileKind:
        assert parse_key(file_key("CKP-1_5", 12, kind)) == KeyParts(12, "CKP-1_5", kind)
    assert parse_key("rank_0/Net.network.pt") == KeyParts(0, "Net", FileKind.NETWORK)
    assert parse_key("rank_1/Net-1_14.distcp") == KeyParts(1, "Net-1_14", FileKind.DCP)


@pytest.mark.parametrize("key", ["rank_x/a.ckpt", "rank_01/a.ckpt", "a.ckpt", "rank_0/.a.ckpt.tmp-1",
                                 "rank_0/sub/a.ckpt", "rank_0/a.txt", "rank_0/.ckpt"])
def test_foreign_keys_are_ignored(key: str) -> None:
    assert parse_key(key) is None


@pytest.mark.parametrize(("name", "fragment"), [("", "non-empty"), ("a/b", "'/'"), (".x", "'.'"),
                                                ("x.ckpt", "'.ckpt'"), ("x.manifest.json", "'.manifest.json'")])
def test_bad_checkpoint_names(name: str, fragment: str) -> None:
    with pytest.raises(ValueError, match=fragment) as info:
        file_key(name, 0, FileKind.SHARD)
    assert repr(name) in str(info.value)


def manifest(name: str = "CKP-1_5", rank: int = 0, world: int = 2, step: int = 5, save_id: str = "run:5",
             **kw: object) -> Manifest:
    shard = FileEntry(FileKind.SHARD, file_key(name, rank, FileKind.SHARD), 10, "ab" * 32)
    args = dict(name=name, rank=rank, world_size=world, epoch=1, step=step, step_in_epoch=step,
                reason=Reason.PERIODIC, save_id=save_id, created=1.5, files=(shard,))
    args.update(kw)
    return Manifest(**args)  # type: ignore[arg-type]


def test_manifest_json_round_trip_and_documented_fields() -> None:
    m = manifest(extra={"global_batch_size": 32}, job="ns/j", incarnation="2", resumed_from="Net")
    doc = json.loads(m.to_json())
    for field in ("size", "sha256", "step", "epoch", "world_size", "reason", "save_id", "files"):
        assert field in doc
    assert doc["reason"] == "periodic" and doc["size"] == 10
    assert Manifest.from_json(m.to_json()) == m


@pytest.mark.parametrize(
    ("mutate", "fragment"),
    [
        (lambda d: d.pop("world_size"), "'world_size' is missing"),
        (lambda d: d.update(step="5"), "'step' has the wrong type: '5'"),
        (lambda d: d.update(step=True), "'step' has the wrong type: True"),
        (lambda d: d.update(format=99), "'format' is 99"),
        (lambda d: d.update(rank=4), "'rank' is 4"),
        (lambda d: d.update(files=[]), "lists no shard"),
        (lambda d: d.update(files=["x"]), "'files' has an entry"),
        (lambda d: d.update(replicated_rank="0"), "'replicated_rank'"),
    ],
)
def test_manifest_rejects_malformed_json(mutate, fragment: str) -> None:
    doc = json.loads(manifest().to_json())
    mutate(doc)
    with pytest.raises(ValueError, match=fragment):
        Manifest.from_json(json.dumps(doc))
    with pytest.raises(ValueError, match="not valid JSON"):
        Manifest.from_json("{")


def test_an_authenticated_manifest_is_format_2_and_readable_without_the_key() -> None:
    # What the operator does with an encrypted checkpoint: list it, judge it, never hold the key.
    plain = manifest()
    assert json.loads(plain.to_json())["format"] == 1 and "auth" not in json.loads(plain.to_json())
    sealed = dataclasses.replace(plain, auth="hmac-sha256:" + "0" * 64)
    doc = json.loads(sealed.to_json())
    assert doc["format"] == AUTHENTICATED_FORMAT == 2 and doc["auth"] == sealed.auth
    assert Manifest.from_json(sealed.to_json()) == sealed
    # The signed text is the manifest without its tag, and stable through a round trip.
    assert sealed.signed_text() == Manifest.from_json(sealed.to_json()).signed_text()
    assert "auth" not in json.loads(sealed.signed_text()) and json.loads(sealed.signed_text())["format"] == 2
    assert plain.signed_text() == sealed.signed_text()
    assert dataclasses.replace(plain, step=6).signed_text() != plain.signed_text()
    for mutate, fragment in [(lambda d: d.pop("auth"), "'auth' is missing"),
                             (lambda d: d.update(format=3), "'format' is 3; this torpor reads 1 and 2")]:
        broken = json.loads(sealed.to_json())
        mutate(broken)
        with pytest.raises(ValueError, match=fragment):
            Manifest.from_json(json.dumps(broken))


def test_local_verified_read_into_a_buffer(tmp_path: Path) -> None:
    store = LocalStorage(tmp_path)
    data = os.urandom(3 * 1024 * 1024 + 5)
    store.put_bytes("rank_0/a.ckpt", data)
    buf = bytearray(len(data))
    assert store.get_verified("rank_0/a.ckpt", size=len(data), sha256=sha256_hex(data), into=buf) is buf
    assert buf == data
    assert store.get_verified("rank_0/a.ckpt", size=len(data), sha256=sha256_hex(data)) == data
    with pytest.raises(IntegrityError, match=r"rank_0/a.ckpt: sha256 .* does not match"):
        store.get_verified("rank_0/a.ckpt", size=len(data), sha256=sha256_hex(b"other"))
    with pytest.raises(IntegrityError, match=f"size {len(data)} does not match the manifest's size {len(data) + 1}"):
        store.get_verified("rank_0/a.ckpt", size=len(data) + 1, sha256=sha256_hex(data))
    with pytest.raises(FileNotFoundError):
        store.get_verified("rank_0/missing.ckpt", size=1, sha256=sha256_hex(b"x"))


def listing(*keys: str, t: float = 1.0) -> list[ObjectInfo]:
    """Keys as a listing shows them; shards have the size ``manifest()`` records."""
    return [ObjectInfo(k, 10 if k.endswith(".ckpt") else 1, t) for k in keys]


def test_complete_only_when_every_rank_agrees() -> None:
    m0, m1 = manifest(rank=0), manifest(rank=1)
    keys = [m0.shard.key, m1.shard.key, "rank_0/CKP-1_5.manifest.json", "rank_1/CKP-1_5.manifest.json"]
    both = {"rank_0/CKP-1_5.manifest.json": m0, "rank_1/CKP-1_5.manifest.json": m1}
    (ckpt,) = assemble(listing(*keys), both)
    assert ckpt.complete and ckpt.world_size == 2 and ckpt.step == 5

    (partial,) = assemble(listing(*keys[:3]), {"rank_0/CKP-1_5.manifest.json": m0})
    assert not partial.complete and "ranks [1]" in (partial.problem or "")

    mixed = dict(both, **{"rank_1/CKP-1_5.manifest.json": manifest(rank=1, save_id="other:5")})
    (ckpt,) = assemble(listing(*keys), mixed)
    assert "save_id" in (ckpt.problem or "")

    (ckpt,) = assemble(listing(*keys[1:]), both)  # rank 0's shard gone, its manifest kept
    assert "rank_0/CKP-1_5.ckpt" in (ckpt.problem or "")


def test_a_sharded_checkpoint_needs_every_ranks_shards_and_is_deleted_with_them() -> None:
    # The operator's retention deletes a checkpoint's keys: the .distcp files must be among them,
    # and a rank's missing .distcp makes the checkpoint incomplete, like a missing .ckpt.
    ms = [manifest(rank=r, files=(FileEntry(FileKind.SHARD, file_key("CKP-1_5", r, FileKind.SHARD), 10, "ab" * 32),
                                  FileEntry(FileKind.DCP, file_key("CKP-1_5", r, FileKind.DCP), 1, "cd" * 32)))
          for r in (0, 1)]
    parsed = {file_key(m.name, m.rank, FileKind.MANIFEST): m for m in ms}
    keys = [e.key for m in ms for e in m.files] + list(parsed)
    (ckpt,) = assemble(listing(*keys), parsed)
    assert ckpt.complete and set(ckpt.keys) == set(keys)
    (torn,) = assemble(listing(*[k for k in keys if k != "rank_1/CKP-1_5.distcp"]), parsed)
    assert torn.problem == "rank 1 lists rank_1/CKP-1_5.distcp but it is not stored"


def test_newest_complete_ignores_newer_incomplete() -> None:
    old = [manifest("A-1_1", r, step=1, save_id="r:1") for r in (0, 1)]
    new = manifest("A-1_2", 0, step=2, save_id="r:2")
    objs = [ObjectInfo(m.shard.key, 10, 10.0) for m in old] + [ObjectInfo(file_key(m.name, m.rank, FileKind.MANIFEST),
                                                                         1, 10.0) for m in old]
    objs += [ObjectInfo(new.shard.key, 10, 20.0), ObjectInfo("rank_0/A-1_2.manifest.json", 1, 20.0)]
    parsed = {file_key(m.name, m.rank, FileKind.MANIFEST): m for m in [*old, new]}
    found = assemble(objs, parsed)
    assert [c.name for c in found] == ["A-1_1", "A-1_2"]
    best = newest_complete(found)
    assert isinstance(best, Checkpoint) and best.name == "A-1_1"


def test_local_storage_is_atomic_and_scan_reads_manifests(tmp_path: Path) -> None:
    store = LocalStorage(tmp_path / "root")
    assert store.list() == []
    m = manifest(world=1)
    store.put_bytes(m.shard.key, b"0123456789")
    store.put_bytes("rank_0/CKP-1_5.manifest.json", m.to_json().encode())
    (tmp_path / "root" / "rank_0" / ".CKP-1_6.ckpt.tmp-abc").write_bytes(b"half")
    assert [o.key for o in store.list()] == ["rank_0/CKP-1_5.ckpt", "rank_0/CKP-1_5.manifest.json"]
    (ckpt,) = scan(store)
    assert ckpt.complete
    assert delete_checkpoints(store, [ckpt]) == 2
    assert store.list() == []


def test_scan_warns_about_an_unreadable_manifest(tmp_path: Path) -> None:
    store = LocalStorage(tmp_path)
    store.put_bytes("rank_0/X.ckpt", b"x")
    store.put_bytes("rank_0/X.manifest.json", b"{not json")
    with pytest.warns(UserWarning, match="unreadable manifest"):
        (ckpt,) = scan(store)
    assert not ckpt.complete


def test_read_verified_refuses_changed_bytes(tmp_path: Path) -> None:
    store = LocalStorage(tmp_path)
    store.put_bytes("rank_0/a.ckpt", b"payload")
    assert read_verified(store, "rank_0/a.ckpt", size=7, sha256=sha256_hex(b"payload")) == b"payload"
    with pytest.raises(IntegrityError, match=r"sha256 .* does not match"):
        read_verified(store, "rank_0/a.ckpt", size=7, sha256=sha256_hex(b"PAYLOAD"))
    with pytest.raises(IntegrityError, match="size 7 does not match the manifest's size 8"):
        read_verified(store, "rank_0/a.ckpt", size=8, sha256=sha256_hex(b"payload"))
    with pytest.raises(FileNotFoundError):
        store.get_bytes("rank_0/missing.ckpt")


def test_termination_codes_and_message_round_trip() -> None:
    assert signal_exit_code(15) == 143 and signal_from_exit_code(143) == 15
    assert signal_from_exit_code(EXIT_FILE_REQUEST) is None and signal_from_exit_code(0) is None
    msg = TerminationMessage(StopReason.SIGNAL, 143, checkpoint="Net", step=7, signal="SIGTERM", local=False)
    assert TerminationMessage.from_json(msg.to_json()) == msg
    long = TerminationMessage(StopReason.ERROR, 1, error="x" * 10_000)
    assert len(long.to_json().encode()) <= 4096
    with pytest.raises(ValueError, match="lacks 'reason'"):
        TerminationMessage.from_json("{}")


@pytest.mark.parametrize(
    ("content", "requested", "problem"),
    [
        ('{"GracefulExit": 1}', True, None),
        ('{"GracefulExit": true}', True, None),
        ('{"GracefulExit": 0}', False, None),
        ('{"GracefulExit": "1"}', False, None),
        ("{}", False, None),
        ("{oops", False, "not valid JSON"),
        ("[1]", False, "JSON object"),
        (None, False, "does not exist"),
    ],
)
def test_exit_file_semantics(tmp_path: Path, content: str | None, requested: bool, problem: str | None) -> None:
    path = tmp_path / "exit.json"
    if content is not None:
        path.write_text(content)
    got, why = read_request(str(path))
    assert got is requested
    assert (why is None) if problem is None else (problem in (why or ""))


def test_watcher_sees_changes_off_the_step_path(tmp_path: Path) -> None:
    import time

    path = tmp_path / "exit.json"
    path.write_text('{"GracefulExit": 0}')
    watcher = ExitFileWatcher(str(path), poll_seconds=0.01)
    watcher.start()
    try:
        assert not watcher.requested
        tmp = tmp_path / "new.json"
        tmp.write_text('{"GracefulExit": 1}')
        os.replace(tmp, path)  # as kubelet swaps its ..data symlink: a new inode
        deadline = time.monotonic() + 5
        while not watcher.requested and time.monotonic() < deadline:
            time.sleep(0.01)
        assert watcher.requested
        path.write_text("garbage")
        while not watcher.take_problems() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert not watcher.requested
    finally:
        watcher.stop()
