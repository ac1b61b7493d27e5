"""What the operator prunes from the bucket: the shared policy, mapped from the CRD."""

from __future__ import annotations

from typing import Any

from torpor.checkpoints import Checkpoint, FileEntry, FileKind, Manifest, Reason
from torpor.retention import RetentionPolicy
from torpor.storage import Upload
from torpor_operator.pruning import held_by_uploads, retention_policy, stale_upload_keys, to_prune
from torpor_operator.spec import parse_spec


def checkpoint_spec(**fields: Any) -> Any:
    return parse_spec({"template": {"spec": {"containers": [{"name": "t"}]}},
                       "checkpoint": {"uri": "s3://bucket/x", **fields}}).checkpoint


def manifest(name: str, rank: int, world: int, step: int) -> Manifest:
    shard = FileEntry(FileKind.SHARD, f"rank_{rank}/{name}.ckpt", 1, "0" * 64)
    return Manifest(name=name, rank=rank, world_size=world, epoch=1, step=step, step_in_epoch=step,
                    reason=Reason.PERIODIC, save_id=f"{name}-id", created=0.0, files=(shard,))


def ckpt(name: str, step: int, minute: float, *, complete: bool = True, world: int = 2) -> Checkpoint:
    ranks = range(world) if complete else range(world - 1)
    manifests = {r: manifest(name, r, world, step) for r in ranks}
    keys = tuple(sorted([f"rank_{r}/{name}.ckpt" for r in ranks] + [f"rank_{r}/{name}.manifest.json" for r in ranks]))
    return Checkpoint(name=name, keys=keys, modified=minute * 60.0, manifests=manifests,
                      problem=None if complete else f"manifests missing for ranks [{world - 1}]")


def test_policy_mapping() -> None:
    assert retention_policy(checkpoint_spec()) == RetentionPolicy(keep_max=5)
    assert retention_policy(checkpoint_spec(keepMax=2)) == RetentionPolicy(keep_max=2)
    assert retention_policy(checkpoint_spec(keepPerNMinutes=30)) == RetentionPolicy(keep_max=0, keep_per_n_minutes=30)


def test_keep_max_keeps_the_newest_and_the_resume_source() -> None:
    cps = [ckpt(f"CKP-1_{i}", i, i) for i in range(1, 7)]
    doomed = to_prune(checkpoint_spec(keepMax=2), cps, protected=["CKP-1_1", ""])
    assert [c.name for c in doomed] == ["CKP-1_2", "CKP-1_3", "CKP-1_4"]


def test_incomplete_leftovers_older_than_the_newest_complete_go_newer_ones_stay() -> None:
    cps = [ckpt("CKP-1_1", 1, 1, complete=False), ckpt("CKP-1_2", 2, 2), ckpt("CKP-1_3", 3, 3, complete=False)]
    doomed = to_prune(checkpoint_spec(), cps)
    assert [c.name for c in doomed] == ["CKP-1_1"]
    assert stale_upload_keys(doomed) == ["rank_1/CKP-1_1.ckpt"]


def test_nothing_is_pruned_without_a_complete_checkpoint() -> None:
    assert to_prune(checkpoint_spec(keepMax=1), [ckpt("a-1_1", 1, 1, complete=False)]) == []


def test_stale_upload_keys_guess_ranks_without_manifests() -> None:
    bare = Checkpoint(name="CKP-1_9", keys=("rank_0/CKP-1_9.ckpt",), modified=0.0, manifests={},
                      problem="no rank has written its manifest")
    assert stale_upload_keys([bare]) == []
    assert stale_upload_keys([ckpt("CKP-1_2", 2, 2)]) == []


def test_an_old_upload_is_aborted_and_a_young_one_holds_its_checkpoint_back() -> None:
    """A young upload's checkpoint stays until a later pass: deleted now, nothing would name the
    upload's key again (MinIO lists uploads only per exact key) and its parts would stay for good."""
    doomed = [ckpt("CKP-1_1", 1, 1, complete=False), ckpt("CKP-1_2", 2, 2, complete=False)]
    old = Upload("rank_1/CKP-1_1.ckpt", "u-old", initiated=100.0)
    young = Upload("rank_1/CKP-1_2.ckpt", "u-young", initiated=1000.0)
    foreign = Upload("rank_0/other-1_1.ckpt", "u-foreign", initiated=0.0)
    abort, kept = held_by_uploads(doomed, [old, young, foreign], older_than=500.0)
    assert abort == [old]  # never an upload of a key no doomed checkpoint lacks
    assert kept == {"CKP-1_2"}
    assert held_by_uploads(doomed, [], older_than=500.0) == ([], set())
