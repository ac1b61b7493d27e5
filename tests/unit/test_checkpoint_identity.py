"""Checkpoint identity: sizes decide completeness, names are never reused, 'latest' keeps to
resumable checkpoints of this run's prefixes (pure: listings and manifests built in memory)."""

from __future__ import annotations

from datetime import UTC, datetime

from torpor.checkpoints import (
    FileEntry,
    FileKind,
    Manifest,
    Reason,
    assemble,
    file_key,
    in_scope,
    newest_complete,
    parse_name,
    resumable_newest_first,
    unique_name,
)
from torpor.retention import RetentionPolicy, candidates, to_delete
from torpor.storage import ObjectInfo
from torpor_operator.observing import CheckpointInfo, checkpoint_infos
from torpor_operator.observing import newest_complete as operator_newest

SIZE = 10


def manifest(name: str, rank: int, step: int, reason: Reason = Reason.PERIODIC, world: int = 2) -> Manifest:
    shard = FileEntry(FileKind.SHARD, file_key(name, rank, FileKind.SHARD), SIZE, "ab" * 32)
    return Manifest(name=name, rank=rank, world_size=world, epoch=1, step=step, step_in_epoch=step, reason=reason,
                    save_id=f"run:{step}", created=1.5, files=(shard,))


def stored(name: str, step: int, t: float, reason: Reason = Reason.PERIODIC,
           sizes: dict[int, int] | None = None) -> tuple[list[ObjectInfo], dict[str, Manifest]]:
    """Both ranks' shard and manifest of ``name``; ``sizes`` overrides a rank's listed shard size."""
    objects, parsed = [], {}
    for rank in (0, 1):
        m = manifest(name, rank, step, reason)
        objects.append(ObjectInfo(m.shard.key, (sizes or {}).get(rank, SIZE), t))
        key = file_key(name, rank, FileKind.MANIFEST)
        objects.append(ObjectInfo(key, 300, t))
        parsed[key] = m
    return objects, parsed


def scanned(*items: tuple[list[ObjectInfo], dict[str, Manifest]]):
    objects = [o for obj, _ in items for o in obj]
    parsed = {k: v for _, p in items for k, v in p.items()}
    return assemble(objects, parsed)


def test_a_shard_whose_listed_size_differs_from_its_manifest_is_incomplete() -> None:
    # Old manifests beside new shard bytes (a save interrupted while rewriting): keys all there.
    (torn,) = scanned(stored("Net-1_8", 8, 1.0, sizes={1: SIZE + 3}))
    assert not torn.complete
    assert torn.problem == f"rank 1 lists rank_1/Net-1_8.ckpt of {SIZE} bytes but {SIZE + 3} are stored"
    (whole,) = scanned(stored("Net-1_8", 8, 1.0))
    assert whole.complete


def test_a_taken_name_gets_the_next_free_version() -> None:
    assert unique_name("Net-1_8", set()) == "Net-1_8"
    assert unique_name("Net-1_8", {"Net-1_8"}) == "Net-1_8-v1"
    assert unique_name("Net-1_8", {"Net-1_8", "Net-1_8-v1", "Net-1_8-v3"}) == "Net-1_8-v2"
    parts = parse_name("CKP-2_3_breakpoint-v1")
    assert parts is not None and (parts.prefix, parts.epoch, parts.step, parts.breakpoint, parts.version) == (
        "CKP", 2, 3, True, 1)
    assert parse_name("Net-1_8-v2").prefix == "Net"  # type: ignore[union-attr]


def test_breakpoints_are_never_latest_and_never_the_operators_choice() -> None:
    found = scanned(stored("CKP-1_4", 4, 1.0), stored("CKP-1_5_breakpoint", 5, 2.0, Reason.EXCEPTION))
    assert [c.resumable for c in found] == [True, False]
    assert newest_complete(found).name == "CKP-1_4"  # type: ignore[union-attr]
    infos = checkpoint_infos(found)
    assert [i.resumable for i in infos] == [True, False]
    assert operator_newest(infos).name == "CKP-1_4"  # type: ignore[union-attr]
    t = datetime(2026, 1, 1, tzinfo=UTC)
    assert operator_newest([CheckpointInfo("b", 5, t, True, resumable=False)]) is None
    # retention neither counts a breakpoint against keep_max nor lets it push out the resume point
    assert to_delete(candidates(found), RetentionPolicy(keep_max=1)) == []


def test_latest_considers_only_this_runs_prefixes() -> None:
    found = scanned(stored("CKP-1_4", 4, 1.0), stored("Net-1_6-v1", 6, 2.0), stored("other-9_9", 99, 3.0),
                    stored("CKP-1_5_breakpoint", 5, 4.0, Reason.EXCEPTION), stored("Net", 3, 0.5))
    assert [c.name for c in resumable_newest_first(found, None)] == ["other-9_9", "Net-1_6-v1", "CKP-1_4", "Net"]
    assert [c.name for c in resumable_newest_first(found, {"CKP", "Net"})] == ["Net-1_6-v1", "CKP-1_4", "Net"]
    older = next(c for c in found if c.name == "Net-1_6-v1")
    assert [c.name for c in resumable_newest_first(found, {"CKP", "Net"}, older_than=older)] == ["CKP-1_4", "Net"]
    assert in_scope("CKP-1_4", {"CKP"}) and not in_scope("CKPX-1_4", {"CKP"}) and in_scope("x", None)
