"""The checkpoint layout, manifests and completeness: the contract runtime and operator share.

Torch-free on purpose: the operator lists the bucket, decides which checkpoint is the newest
complete one and what retention may delete, and it must agree with the runtime byte for byte.

Layout under a checkpoint root (a directory or ``s3://bucket/prefix``)::

    rank_{rank}/{name}.ckpt            the rank's shard (torch.save, loaded with weights_only=True)
    rank_{rank}/{name}.manifest.json   written last, once every file of the rank is durable
    rank_{rank}/{name}.pt2             optional torch.export program (exit saves), written after
                                       the manifests and not listed in them
    rank_{rank}/{name}.network.pt      optional network weights only (save_network_params); without
                                       a saved_network the only copy of them: the shard leaves them out
    rank_{rank}/{name}.trainable.pt    optional trainable weights only (save_trainable_params)
    rank_{rank}/{name}.distcp          sharded models (FSDP2/DTensor, FSDP1) only: the rank's shards
                                       of the model and optimizer state (torch.save, loaded with
                                       weights_only=True), as torch.distributed.checkpoint planned
                                       them; rank 0's .ckpt then holds the index of every rank's
                                       pieces and the replicated values (see torpor._dcp_storage)

``name`` is ``{prefix}-{epoch}_{step}`` for periodic saves (epoch from 1, step within that
epoch from 1, as MindSpore names them), ``{file_name}-{epoch}_{step}`` (``Net-2_7``) for the
save on exit and ``{prefix}-{epoch}_{step}_breakpoint`` for ``exception_save``. ``rank`` is
the *global* rank, so ranks on different nodes never collide on shared storage.

**Every save has a name of its own; nothing is ever rewritten under an existing name.** This
deviates from the seed, whose exit save always writes ``{file_name}.ckpt`` (``Net.ckpt``): a
second preemption then rewrites the very checkpoint the job resumed from, and a kill part-way
(grace period over, node gone) leaves old manifests beside new shard bytes, which a listing
takes for complete and a load refuses, so the job has nothing to resume from. When a save's
name is already taken in the store (an earlier run of the same directory reached the same
step, a crash loop writes the same breakpoint again), the save goes to the next free
``{name}-v{n}`` (:func:`unique_name`, as Lightning's ``ModelCheckpoint`` versions a taken
file name); rank 0 lists the names when training begins and every rank uses that list.

A checkpoint is **complete** when, for its world size ``W``, ranks ``0..W-1`` each have a
manifest, the manifests agree (same ``save_id``, step, epoch and world size) and every file
they list is stored **with the size the manifest records** (the listing has sizes, so this
costs nothing; the sha256 is checked on load). Nothing incomplete is resumed from or counted
for retention. A checkpoint is **resumable** when it is complete and not a breakpoint
(``reason: exception``: the state at a crash, possibly NaN weights or a half-applied step);
``resume='latest'`` and the operator choose among resumable checkpoints only, a breakpoint
is loaded only when asked for by name.

**Prefixes scope a run's checkpoints.** A name's prefix is everything before its
``-{epoch}_{step}``; retention of a ``CheckpointMonitor`` counts and deletes only its own
prefix's checkpoints, and ``'latest'`` of a run considers only its own prefixes (the monitors'
and the exit save's, :func:`in_scope`), so a shared directory may hold other experiments.
The ``.pt2`` is an inference artifact written once the checkpoint is complete: no manifest lists
it, so completeness never waits for it and a failed or killed export costs nothing; its key
carries the checkpoint's name, so :func:`assemble` groups it with that checkpoint and
retention deletes both together.
"""

from __future__ import annotations

import json
import re
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum

from torpor.storage import ObjectInfo, Storage

FORMAT_VERSION = 1
"""Manifest format of a plaintext checkpoint; a reader refuses a newer one rather than misreading it."""
AUTHENTICATED_FORMAT = 2
"""Manifest format of an encrypted checkpoint: format 1 plus ``auth``, a tag over everything
else made with a key derived from ``enc_key``. A reader without the key (the operator) reads
it as format 1; the runtime checks the tag before it trusts any size or hash in it."""
READABLE_FORMATS = (FORMAT_VERSION, AUTHENTICATED_FORMAT)


class FileKind(StrEnum):
    """The files one rank may write for one checkpoint."""

    SHARD = "shard"
    MANIFEST = "manifest"
    EXPORT = "export"
    NETWORK = "network"
    TRAINABLE = "trainable"
    DCP = "dcp"


SUFFIXES: Mapping[FileKind, str] = {
    FileKind.MANIFEST: ".manifest.json",
    FileKind.NETWORK: ".network.pt",
    FileKind.TRAINABLE: ".trainable.pt",
    FileKind.SHARD: ".ckpt",
    FileKind.EXPORT: ".pt2",
    FileKind.DCP: ".distcp",
}
"""File suffix per kind. Matched longest first, so ``.network.pt`` never reads as a name."""


class Reason(StrEnum):
    """Why a checkpoint was written; recorded in every manifest."""

    PERIODIC = "periodic"
    """``CheckpointMonitor``: every N steps or S seconds."""
    FINAL = "final"
    """``CheckpointMonitor``: the last step of a training run that ended normally."""
    EXIT = "exit"
    """``OnRequestExit``: a signal or the GracefulExit file asked the job to stop."""
    EXCEPTION = "exception"
    """``exception_save``: an exception escaped a training step (breakpoint checkpoint)."""


_RANK_DIR = re.compile(r"^rank_(0|[1-9][0-9]*)$")
_NAME = re.compile(r"^(?P<prefix>.+)-(?P<epoch>[0-9]+)_(?P<step>[0-9]+)(?P<breakpoint>_breakpoint)?"
                   r"(?:-v(?P<version>[1-9][0-9]*))?$")
BREAKPOINT_SUFFIX = "_breakpoint"
"""Appended to the periodic name of a breakpoint (``exception_save``) checkpoint."""


def rank_dir(rank: int) -> str:
    """``rank_{rank}``: the per-rank directory of the seeds, keyed by the global rank."""
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 0:
        raise ValueError(f"rank must be a non-negative int, got {rank!r}")
    return f"rank_{rank}"


def file_key(name: str, rank: int, kind: FileKind) -> str:
    """The key of one file, relative to the checkpoint root."""
    check_name(name)
    return f"{rank_dir(rank)}/{name}{SUFFIXES[kind]}"


def checkpoint_name(prefix: str, epoch: int, step: int) -> str:
    """``{prefix}-{epoch}_{step}``, the periodic checkpoint name of the seeds."""
    return check_name(f"{prefix}-{epoch}_{step}")


def unique_name(name: str, taken: Iterable[str]) -> str:
    """``name``, or ``{name}-v{n}`` with the smallest ``n >= 1`` not in ``taken`` (pure).

    How a save never rewrites a checkpoint already stored under its name (see the module
    docstring): ``taken`` is every name in the store when training began plus the names the
    run saved since.
    """
    used = set(taken)
    if name not in used:
        return check_name(name)
    version = 1
    while f"{name}-v{version}" in used:
        version += 1
    return check_name(f"{name}-v{version}")


def check_name(name: str) -> str:
    """Validate a checkpoint name and return it.

    Raises:
        ValueError: empty, contains ``/``, starts with ``.`` (reserved for temporary files),
            or ends with a file suffix (it would be misparsed).
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"checkpoint name must be a non-empty str, got {name!r}")
    if "/" in name:
        raise ValueError(f"checkpoint name must not contain '/', got {name!r}")
    if name.startswith("."):
        raise ValueError(f"checkpoint name must not start with '.', got {name!r}")
    for suffix in SUFFIXES.values():
        if name.endswith(suffix):
            raise ValueError(f"checkpoint name must not end with {suffix!r}, got {name!r}")
    return name


@dataclass(frozen=True)
class NameParts:
    """A periodic, exit or breakpoint name taken apart."""

    prefix: str
    epoch: int
    step: int
    """Step within the epoch, as in the seeds' names."""
    breakpoint: bool = False
    """The name ends in ``_breakpoint`` (``exception_save``)."""
    version: int = 0
    """``n`` of a ``-v{n}`` suffix (a taken name, see :func:`unique_name`); 0 without one."""


def parse_name(name: str) -> NameParts | None:
    """``CKP-3_17`` → ``NameParts('CKP', 3, 17)``; ``CKP-3_17_breakpoint-v1`` → ``breakpoint``
    and ``version=1`` too; ``None`` for names without that form (the seed's fixed ``Net``)."""
    m = _NAME.match(name)
    if not m:
        return None
    return NameParts(m["prefix"], int(m["epoch"]), int(m["step"]), bool(m["breakpoint"]), int(m["version"] or 0))


def in_scope(name: str, prefixes: Iterable[str] | None) -> bool:
    """Whether checkpoint ``name`` belongs to one of ``prefixes`` (``None``: every name does).

    A name without the ``-{epoch}_{step}`` form belongs to a prefix equal to it, so the fixed
    ``Net`` of runs before every save had its own name is still this run's exit checkpoint.
    """
    if prefixes is None:
        return True
    wanted = set(prefixes)
    parts = parse_name(name)
    return (parts.prefix if parts is not None else name) in wanted


@dataclass(frozen=True)
class KeyParts:
    """A stored key taken apart."""

    rank: int
    name: str
    kind: FileKind


def parse_key(key: str) -> KeyParts | None:
    """``rank_2/CKP-1_5.manifest.json`` → ``KeyParts(2, 'CKP-1_5', MANIFEST)``; ``None`` if foreign."""
    head, sep, tail = key.partition("/")
    m = _RANK_DIR.match(head)
    if not sep or not m or "/" in tail or tail.startswith("."):
        return None
    for kind, suffix in SUFFIXES.items():
        if tail.endswith(suffix) and len(tail) > len(suffix):
            return KeyParts(int(m.group(1)), tail[: -len(suffix)], kind)
    return None


@dataclass(frozen=True)
class FileEntry:
    """One file of a rank's checkpoint, as its manifest records it."""

    kind: FileKind
    key: str
    """Key relative to the checkpoint root."""
    size: int
    """Bytes, checked on read before anything is deserialised."""
    sha256: str
    """Hex digest, checked on read: a flipped bit is refused, not loaded."""


def _field(data: Mapping[str, object], name: str, kind: type | tuple[type, ...]) -> object:
    """A required manifest field of the given type (``bool`` never passes for ``int``)."""
    if name not in data:
        raise ValueError(f"manifest field {name!r} is missing")
    value = data[name]
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
        raise ValueError(f"manifest field {name!r} has the wrong type: {value!r}")
    return value


@dataclass(frozen=True)
class Manifest:
    """One rank's record of one checkpoint, written after its files are durable.

    The per-rank manifest is the completion marker (as torchtitan counts a step only with its
    metadata): the set of manifests decides completeness, and their sizes and hashes let a
    reader refuse a damaged shard before unpickling anything.
    """

    name: str
    """Checkpoint name (``CKP-1_5``, ``Net-2_7``)."""
    rank: int
    """Global rank that wrote it."""
    world_size: int
    """Number of ranks of the saving job: how many manifests make the checkpoint complete."""
    epoch: int
    """Epoch in progress when saved, from 1."""
    step: int
    """Global step count when saved (steps completed since the start of training, from 1)."""
    step_in_epoch: int
    """Steps completed in ``epoch``; a resume skips this many batches of that epoch."""
    reason: Reason
    """Why it was written."""
    save_id: str
    """Identifies one save across ranks; every rank's manifest of a complete checkpoint has it."""
    created: float
    """Seconds since the epoch by the writer's clock (informational; ordering uses the store)."""
    files: tuple[FileEntry, ...]
    """The rank's files, shard first."""
    replicated_rank: int | None = 0
    """Rank whose shard holds the replicated (DDP) model and optimizer state; ``None`` when
    every rank holds its own (``integrated_save=False``, sharded state)."""
    job: str = ""
    """``TORPOR_JOB`` of the saving run (``namespace/name`` under the operator), else empty."""
    incarnation: str = ""
    """``TORPOR_INCARNATION`` of the saving run, else empty."""
    resumed_from: str = ""
    """Name of the checkpoint this run resumed from, empty for a fresh run."""
    extra: Mapping[str, object] = field(default_factory=dict)
    """JSON-safe extras (``append_info`` scalars, ``global_batch_size``, consumed samples)."""
    auth: str = ""
    """Encrypted checkpoints: ``hmac-sha256:<hex>`` over :meth:`signed_text`, so nobody without
    the key can change a size, hash, step or save id (format 2). Empty for plaintext ones."""

    @property
    def shard(self) -> FileEntry:
        """The ``.ckpt`` entry."""
        for entry in self.files:
            if entry.kind is FileKind.SHARD:
                return entry
        raise ValueError(f"manifest of {self.name!r} rank {self.rank} lists no shard")

    def file(self, kind: FileKind) -> FileEntry | None:
        """The entry of ``kind``, if this rank wrote one."""
        return next((e for e in self.files if e.kind is kind), None)

    def to_json(self) -> str:
        """Serialise; ``size``/``sha256`` of the shard are repeated at the top for humans and tools."""
        doc = self._doc(AUTHENTICATED_FORMAT if self.auth else FORMAT_VERSION)
        if self.auth:
            doc["auth"] = self.auth
        return json.dumps(doc, sort_keys=True, indent=1)

    def signed_text(self) -> str:
        """What ``auth`` authenticates: every field but ``auth`` itself, as format 2, in one
        canonical form (so the same manifest gives the same text however it was indented)."""
        return json.dumps(self._doc(AUTHENTICATED_FORMAT), sort_keys=True, separators=(",", ":"))

    def _doc(self, fmt: int) -> dict[str, object]:
        shard = self.shard
        return {
            "format": fmt,
            "name": self.name,
            "rank": self.rank,
            "world_size": self.world_size,
            "epoch": self.epoch,
            "step": self.step,
            "step_in_epoch": self.step_in_epoch,
            "reason": self.reason.value,
            "save_id": self.save_id,
            "created": self.created,
            "size": shard.size,
            "sha256": shard.sha256,
            "files": [{"kind": e.kind.value, "key": e.key, "size": e.size, "sha256": e.sha256}
                      for e in self.files],
            "replicated_rank": self.replicated_rank,
            "job": self.job,
            "incarnation": self.incarnation,
            "resumed_from": self.resumed_from,
            "extra": dict(self.extra),
        }

    @classmethod
    def from_json(cls, text: str | bytes) -> Manifest:
        """Parse and validate a manifest.

        Raises:
            ValueError: not JSON, a newer format, or a field missing or of the wrong type
                (the message names the field).
        """
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"manifest is not valid JSON: {exc}") from exc
        if not isinstance(data, dict):
            raise ValueError(f"manifest must be a JSON object, got {type(data).__name__}")
        fmt = _field(data, "format", int)
        if fmt not in READABLE_FORMATS:
            raise ValueError(f"manifest field 'format' is {fmt!r}; this torpor reads {FORMAT_VERSION} and "
                             f"{AUTHENTICATED_FORMAT}")
        auth = str(_field(data, "auth", str)) if fmt == AUTHENTICATED_FORMAT else ""
        files = []
        for raw in _field(data, "files", list):  # type: ignore[union-attr]
            if not isinstance(raw, dict):
                raise ValueError(f"manifest field 'files' has an entry that is not an object: {raw!r}")
            files.append(FileEntry(FileKind(_field(raw, "kind", str)), str(_field(raw, "key", str)),
                                   int(_field(raw, "size", int)), str(_field(raw, "sha256", str))))  # type: ignore[arg-type]
        replicated = data.get("replicated_rank")
        if replicated is not None and (not isinstance(replicated, int) or isinstance(replicated, bool)):
            raise ValueError(f"manifest field 'replicated_rank' has the wrong type: {replicated!r}")
        extra = data.get("extra", {})
        if not isinstance(extra, dict):
            raise ValueError(f"manifest field 'extra' has the wrong type: {extra!r}")
        manifest = cls(
            name=check_name(str(_field(data, "name", str))),
            rank=int(_field(data, "rank", int)),  # type: ignore[arg-type]
            world_size=int(_field(data, "world_size", int)),  # type: ignore[arg-type]
            epoch=int(_field(data, "epoch", int)),  # type: ignore[arg-type]
            step=int(_field(data, "step", int)),  # type: ignore[arg-type]
            step_in_epoch=int(_field(data, "step_in_epoch", int)),  # type: ignore[arg-type]
            reason=Reason(_field(data, "reason", str)),
            save_id=str(_field(data, "save_id", str)),
            created=float(_field(data, "created", (int, float))),  # type: ignore[arg-type]
            files=tuple(files),
            replicated_rank=replicated,
            job=str(data.get("job", "")),
            incarnation=str(data.get("incarnation", "")),
            resumed_from=str(data.get("resumed_from", "")),
            extra=extra,
            auth=auth,
        )
        if manifest.world_size < 1 or not 0 <= manifest.rank < manifest.world_size:
            raise ValueError(
                f"manifest field 'rank' is {manifest.rank!r}, outside world_size {manifest.world_size!r}"
            )
        manifest.shard  # noqa: B018 - raises if no shard is listed
        return manifest


@dataclass(frozen=True)
class Checkpoint:
    """Everything stored under one name, across ranks, with its completeness."""

    name: str
    keys: tuple[str, ...]
    """Every stored key of this name (all ranks, all kinds): what deleting it removes."""
    modified: float
    """Newest modification time among its keys, by the store's clock: orders checkpoints."""
    manifests: Mapping[int, Manifest]
    """Readable manifests by rank."""
    problem: str | None
    """Why it is not complete, or ``None`` when it is."""

    @property
    def complete(self) -> bool:
        """Every rank's manifest present, agreeing, and every listed file present."""
        return self.problem is None

    @property
    def resumable(self) -> bool:
        """Complete and not a breakpoint (``reason: exception``): what ``'latest'`` may pick."""
        return self.complete and all(m.reason is not Reason.EXCEPTION for m in self.manifests.values())

    @property
    def step(self) -> int:
        """Global step, from the manifests (or the name when no manifest is readable)."""
        if self.manifests:
            return max(m.step for m in self.manifests.values())
        parts = parse_name(self.name)
        return parts.step if parts else 0

    @property
    def epoch(self) -> int:
        """Epoch, from the manifests (or the name)."""
        if self.manifests:
            return max(m.epoch for m in self.manifests.values())
        parts = parse_name(self.name)
        return parts.epoch if parts else 0

    @property
    def world_size(self) -> int | None:
        """World size the manifests agree on, if any manifest is readable."""
        sizes = {m.world_size for m in self.manifests.values()}
        return sizes.pop() if len(sizes) == 1 else None

    def manifest_keys(self) -> tuple[str, ...]:
        """Keys of its manifests: deleted first, so a half-deleted checkpoint reads incomplete."""
        return tuple(k for k in self.keys if (p := parse_key(k)) and p.kind is FileKind.MANIFEST)


def completeness_problem(name: str, present: Mapping[str, int], manifests: Mapping[int, Manifest]) -> str | None:
    """Why the checkpoint ``name`` is not complete, or ``None`` when it is (pure).

    Args:
        name: the checkpoint name.
        present: size in bytes of every key in the listing: each file a manifest lists must
            be stored with the size it records, so old manifests beside new bytes (a save
            interrupted while rewriting a name) never read as complete.
        manifests: readable manifests of ``name`` by rank.
    """
    if not manifests:
        return "no rank has written its manifest"
    sizes = {m.world_size for m in manifests.values()}
    if len(sizes) != 1:
        return f"manifests disagree on world_size: {sorted(sizes)}"
    world = sizes.pop()
    missing = [r for r in range(world) if r not in manifests]
    if missing:
        return f"manifests missing for ranks {missing} of world_size {world}"
    extra = sorted(r for r in manifests if r >= world)
    if extra:
        return f"manifests from ranks {extra} beyond world_size {world}"
    for what in ("save_id", "step", "epoch"):
        values = {getattr(m, what) for m in manifests.values()}
        if len(values) != 1:
            return f"manifests disagree on {what}: {sorted(map(str, values))} (a save still in progress?)"
    for m in manifests.values():
        for entry in m.files:
            if entry.key not in present:
                return f"rank {m.rank} lists {entry.key} but it is not stored"
            if present[entry.key] != entry.size:
                return f"rank {m.rank} lists {entry.key} of {entry.size} bytes but {present[entry.key]} are stored"
    return None


def assemble(objects: Iterable[ObjectInfo], manifests: Mapping[str, Manifest]) -> list[Checkpoint]:
    """Group a listing into checkpoints and judge each one (pure).

    Args:
        objects: a listing of the checkpoint root; foreign keys are ignored.
        manifests: parsed manifests by key; a manifest key absent here counts as unreadable.

    Returns:
        Checkpoints, oldest first by ``(modified, step, name)``.
    """
    keys: dict[str, list[str]] = {}
    modified: dict[str, float] = {}
    present: dict[str, int] = {}
    by_rank: dict[str, dict[int, Manifest]] = {}
    for obj in objects:
        parts = parse_key(obj.key)
        if parts is None:
            continue
        present[obj.key] = obj.size
        keys.setdefault(parts.name, []).append(obj.key)
        modified[parts.name] = max(modified.get(parts.name, obj.modified), obj.modified)
        if parts.kind is FileKind.MANIFEST and obj.key in manifests:
            m = manifests[obj.key]
            if m.name == parts.name and m.rank == parts.rank:
                by_rank.setdefault(parts.name, {})[parts.rank] = m
    result = [
        Checkpoint(
            name=name,
            keys=tuple(sorted(ks)),
            modified=modified[name],
            manifests=by_rank.get(name, {}),
            problem=completeness_problem(name, present, by_rank.get(name, {})),
        )
        for name, ks in keys.items()
    ]
    result.sort(key=lambda c: (c.modified, c.step, c.name))
    return result


def _order(c: Checkpoint) -> tuple[float, int, str]:
    return (c.modified, c.step, c.name)


def newest_complete(checkpoints: Iterable[Checkpoint]) -> Checkpoint | None:
    """The newest resumable checkpoint (complete, not a breakpoint): what ``resume='latest'``
    and the operator both pick."""
    complete = [c for c in checkpoints if c.resumable]
    return max(complete, key=_order) if complete else None


def resumable_newest_first(checkpoints: Iterable[Checkpoint], prefixes: Iterable[str] | None,
                           older_than: Checkpoint | None = None) -> list[Checkpoint]:
    """Resumable checkpoints of ``prefixes`` (``None``: any), newest first (pure).

    The order a resume tries them in: when the newest cannot be loaded, the next one. With
    ``older_than``, only those ordered before it (the fallbacks of a named checkpoint).
    """
    scope = None if prefixes is None else set(prefixes)
    found = [c for c in checkpoints if c.resumable and in_scope(c.name, scope)
             and (older_than is None or _order(c) < _order(older_than))]
    return sorted(found, key=_order, reverse=True)


class ManifestCache:
    """Parsed manifests keyed by (key, size, modified), so a periodic scan re-reads only new ones."""

    def __init__(self) -> None:
        """Start empty."""
        self._items: dict[tuple[str, int, float], Manifest | None] = {}

    def get(self, obj: ObjectInfo) -> tuple[bool, Manifest | None]:
        """``(hit, manifest)``: a hit may hold ``None`` for a manifest known to be unreadable."""
        ident = (obj.key, obj.size, obj.modified)
        return (ident in self._items, self._items.get(ident))

    def put(self, obj: ObjectInfo, manifest: Manifest | None) -> None:
        """Remember a parse result."""
        self._items[(obj.key, obj.size, obj.modified)] = manifest


def scan(storage: Storage, *, cache: ManifestCache | None = None, names: set[str] | None = None) -> list[Checkpoint]:
    """List the store, read the manifests and judge every checkpoint (the imperative shell).

    Args:
        storage: the checkpoint root.
        cache: reuse parsed manifests between scans (the operator's retention timer).
        names: only read manifests of these names (other checkpoints still appear, unjudged
            manifests count as unreadable).

    An unreadable or invalid manifest is a warning and counts as missing: that checkpoint is
    then incomplete, which is the safe reading.
    """
    objects = storage.list()
    parsed: dict[str, Manifest] = {}
    for obj in objects:
        parts = parse_key(obj.key)
        if parts is None or parts.kind is not FileKind.MANIFEST:
            continue
        if names is not None and parts.name not in names:
            continue
        hit, manifest = cache.get(obj) if cache else (False, None)
        if not hit:
            try:
                manifest = Manifest.from_json(storage.get_bytes(obj.key))
            except FileNotFoundError:  # pruned between list and get
                manifest = None
            except ValueError as exc:
                warnings.warn(f"{storage.uri}/{obj.key}: unreadable manifest ignored: {exc}", stacklevel=2)
                manifest = None
            if cache:
                cache.put(obj, manifest)
        if manifest is not None:
            parsed[obj.key] = manifest
    return assemble(objects, parsed)


def delete_checkpoints(storage: Storage, checkpoints: Iterable[Checkpoint]) -> int:
    """Delete checkpoints, manifests first, so an interrupted delete leaves them incomplete.

    Returns the number of keys deleted.
    """
    chosen = list(checkpoints)
    manifest_keys = [k for c in chosen for k in c.manifest_keys()]
    other_keys = [k for c in chosen for k in c.keys if k not in set(c.manifest_keys())]
    if manifest_keys:
        storage.delete_many(manifest_keys)
    if other_keys:
        storage.delete_many(other_keys)
    return len(manifest_keys) + len(other_keys)
