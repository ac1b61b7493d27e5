"""torpor's ``StorageWriter``/``StorageReader`` for ``torch.distributed.checkpoint`` (DCP).

DCP's planners decide what each rank writes (its shards of every DTensor / ShardedTensor, and
the replicated values once, on rank 0) and, at load, which stored pieces every rank needs for
its own shards, whatever the world size was at the save. torpor stores those pieces itself,
so a sharded checkpoint keeps every promise of a replicated one (``rank_{r}/`` layout,
per-rank manifests written last, completeness, S3 streaming, encryption, async save):

* :class:`CapturingWriter` does not touch the store. ``write_data`` hands every planned item
  to torpor's save: shards go into the rank's ``{name}.distcp``, replicated values and
  non-tensor values (bytes) into its ``{name}.ckpt`` (see :mod:`torpor.checkpoints`);
  ``finish`` turns DCP's ``Metadata`` into torpor's **index**, a JSON document rank 0's
  ``.ckpt`` carries. Both files are then written by :func:`torpor._saving.write_pending`,
  synchronously or in the background, manifest last. So the planning collectives run at the
  step boundary on every rank, and nothing in the background needs the other ranks.
* :class:`TorporReader` builds DCP's ``Metadata`` from the index (JSON: DCP's own metadata
  file is a pickle, and nothing is ever unpickled from a bucket) and reads each file it
  needs through :func:`torpor._loading.load_shard`: size and sha256 checked against the
  manifest, decrypted, ``torch.load(weights_only=True)``. Non-tensor values are decoded with
  ``weights_only=True`` too (:class:`SafeLoadPlanner`; DCP's default planner unpickles them).

The index is checked before it is used: every tensor's chunks must lie inside it and cover
all of it, so a checkpoint holding only some ranks' shards is refused, never half loaded.
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch.distributed.checkpoint import (
    BytesStorageMetadata,
    DefaultLoadPlanner,
    Metadata,
    StorageReader,
    StorageWriter,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex, TensorProperties
from torch.distributed.checkpoint.planner import (
    LoadItemType,
    LoadPlan,
    LoadPlanner,
    ReadItem,
    SavePlan,
    SavePlanner,
    WriteItemType,
)
from torch.distributed.checkpoint.storage import WriteResult
from torch.futures import Future

from torpor._sharded import IN_DCP, IN_SHARD
from torpor._user_state import check_loadable
from torpor.errors import IntegrityError

INDEX_FORMAT = 1
"""Format of the index document; a reader refuses another one rather than misreading it."""
_FILES = (IN_SHARD, IN_DCP)


@dataclass(frozen=True)
class Location:
    """Where one stored piece is: the rank that wrote it, which of its files, under which key."""

    rank: int
    file: str
    key: str


def piece_key(index: MetadataIndex) -> str:
    """The key of a piece inside its file: the flattened name, and the chunk's offsets."""
    return index.fqn if index.offset is None else f"{index.fqn}@{','.join(map(str, index.offset))}"


# -- saving ------------------------------------------------------------------------------------

class CapturingWriter(StorageWriter):
    """Collects this rank's planned pieces for torpor's save (see the module docstring).

    After ``dcp.save`` returns, :attr:`shards` (for the ``.distcp``) and :attr:`replicated`
    and :attr:`blobs` (for the ``.ckpt``) hold this rank's pieces, as references to the live
    tensors (an async save stages copies of them), and on rank 0 :attr:`index` the index.
    """

    def __init__(self, rank: int) -> None:
        """Collect for global rank ``rank``."""
        super().__init__()
        self.rank = rank
        self.shards: dict[str, torch.Tensor] = {}
        self.replicated: dict[str, torch.Tensor] = {}
        self.blobs: dict[str, torch.Tensor] = {}
        self.index: str | None = None

    def reset(self, checkpoint_id: Any = None) -> None:
        """Nothing to reset: one writer per save."""

    def set_up_storage_writer(self, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
        """Nothing to set up: the store is torpor's."""

    def prepare_local_plan(self, plan: SavePlan) -> SavePlan:
        return plan

    def prepare_global_plan(self, plans: list[SavePlan]) -> list[SavePlan]:
        return plans

    def write_data(self, plan: SavePlan, planner: SavePlanner) -> Future[list[WriteResult]]:
        """Take every item of this rank's final plan; nothing is written yet.

        Raises:
            TypeError: a non-tensor value a ``weights_only`` load would refuse (named).
        """
        results = []
        lookup: Callable[[MetadataIndex], Any] | None = getattr(planner, "lookup_object", None)
        for item in plan.items:
            key = piece_key(item.index)
            if item.type is WriteItemType.BYTE_IO:
                if lookup is not None:
                    check_loadable(lookup(item.index), item.index.fqn)
                raw = planner.resolve_data(item).getvalue()  # type: ignore[union-attr]
                self.blobs[key] = torch.frombuffer(bytearray(raw), dtype=torch.uint8) if raw else torch.empty(
                    0, dtype=torch.uint8)
                where, size = IN_SHARD, len(raw)
            else:
                tensor = _compact(planner.resolve_data(item).detach())  # type: ignore[union-attr]
                target = self.shards if item.type is WriteItemType.SHARD else self.replicated
                target[key] = tensor
                where, size = (IN_DCP if item.type is WriteItemType.SHARD else IN_SHARD), tensor.nbytes
            results.append(WriteResult(index=item.index, size_in_bytes=size,
                                       storage_data=Location(self.rank, where, key)))
        future: Future[list[WriteResult]] = Future()
        future.set_result(results)
        return future

    def finish(self, metadata: Metadata, results: list[list[WriteResult]]) -> None:
        """On rank 0 (DCP's coordinator): the index of every rank's pieces."""
        self.index = encode_index(metadata, results)

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: Any) -> bool:
        return False


def _compact(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor``, or a compact copy when it is a small view of a much larger storage.

    ``torch.save`` writes a tensor's whole storage; a shard that is a view into a flat buffer
    would otherwise carry the buffer with it.
    """
    if tensor.device.type != "cpu":
        return tensor.cpu()
    if tensor.untyped_storage().nbytes() > 2 * tensor.nbytes + 4096:
        return tensor.clone()
    return tensor


def encode_index(metadata: Metadata, results: list[list[WriteResult]]) -> str:
    """DCP's global ``Metadata`` and every rank's write results as torpor's index (JSON)."""
    where: dict[MetadataIndex, Location] = {r.index: r.storage_data for rank in results for r in rank}
    tensors: dict[str, Any] = {}
    blobs: dict[str, Any] = {}
    for fqn, md in metadata.state_dict_metadata.items():
        if isinstance(md, TensorStorageMetadata):
            chunks = []
            for chunk in md.chunks:
                loc = where[MetadataIndex(fqn, chunk.offsets)]
                chunks.append({"offsets": list(chunk.offsets), "sizes": list(chunk.sizes), "rank": loc.rank,
                               "file": loc.file, "key": loc.key})
            tensors[fqn] = {"dtype": _dtype_name(md.properties.dtype), "size": list(md.size), "chunks": chunks}
        else:
            loc = where[MetadataIndex(fqn)]
            blobs[fqn] = {"rank": loc.rank, "file": loc.file, "key": loc.key}
    return json.dumps({"format": INDEX_FORMAT, "tensors": tensors, "bytes": blobs}, sort_keys=True)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _dtype(name: object, fqn: str) -> torch.dtype:
    value = getattr(torch, name, None) if isinstance(name, str) else None
    if not isinstance(value, torch.dtype):
        raise ValueError(f"index entry {fqn!r} has an unknown dtype {name!r}")
    return value


# -- loading -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Index:
    """A decoded, checked index: DCP's ``Metadata`` and where each piece is."""

    metadata: Metadata
    locations: Mapping[MetadataIndex, Location]

    @property
    def ranks(self) -> set[int]:
        """Ranks whose files hold at least one piece."""
        return {loc.rank for loc in self.locations.values()}


def decode_index(text: str, world_size: int) -> Index:
    """Parse and check an index written by :func:`encode_index` for ``world_size`` ranks.

    Raises:
        ValueError: not an index of a known format, or a malformed entry (named).
        IntegrityError: a tensor's chunks do not cover it exactly once (a shard is missing),
            or a piece is placed on a rank the checkpoint does not have.
    """
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"the sharded-state index is not valid JSON: {exc}") from exc
    if not isinstance(doc, dict) or doc.get("format") != INDEX_FORMAT:
        raise ValueError(f"not a sharded-state index of format {INDEX_FORMAT}")
    state: dict[str, Any] = {}
    locations: dict[MetadataIndex, Location] = {}
    for fqn, entry in _mapping(doc.get("tensors"), "tensors").items():
        entry = _mapping(entry, fqn)
        size = _ints(entry.get("size"), f"{fqn}.size")
        chunks = []
        for raw in entry.get("chunks") or []:
            raw = _mapping(raw, fqn)
            offsets, sizes = _ints(raw.get("offsets"), f"{fqn}.offsets"), _ints(raw.get("sizes"), f"{fqn}.sizes")
            if len(offsets) != len(size) or len(sizes) != len(size):
                raise ValueError(f"index entry {fqn!r} has a chunk of another rank than its size {size}")
            if any(o + s > whole for o, s, whole in zip(offsets, sizes, size, strict=True)):
                raise IntegrityError(f"index entry {fqn!r} has a chunk at {offsets} of {sizes} outside its size "
                                     f"{size}")
            chunks.append(ChunkStorageMetadata(torch.Size(offsets), torch.Size(sizes)))
            locations[MetadataIndex(fqn, offsets)] = _location(raw, fqn, world_size)
        _check_coverage(fqn, size, chunks)
        state[fqn] = TensorStorageMetadata(TensorProperties(dtype=_dtype(entry.get("dtype"), fqn)),
                                           torch.Size(size), chunks)
    for fqn, entry in _mapping(doc.get("bytes"), "bytes").items():
        state[fqn] = BytesStorageMetadata()
        locations[MetadataIndex(fqn)] = _location(_mapping(entry, fqn), fqn, world_size)
    return Index(Metadata(state_dict_metadata=state, storage_data=dict(locations)), locations)


def _mapping(value: object, what: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ValueError(f"index entry {what!r} is not an object")
    return value


def _ints(value: object, what: str) -> list[int]:
    if not isinstance(value, list) or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0
                                              for v in value):
        raise ValueError(f"index field {what!r} must be a list of non-negative ints, got {value!r}")
    return value


def _location(raw: dict[str, Any], fqn: str, world_size: int) -> Location:
    rank, file, key = raw.get("rank"), raw.get("file"), raw.get("key")
    if not isinstance(rank, int) or isinstance(rank, bool) or not isinstance(key, str) or file not in _FILES:
        raise ValueError(f"index entry {fqn!r} has a malformed location {raw!r}")
    if not 0 <= rank < world_size:
        raise IntegrityError(f"index entry {fqn!r} is stored by rank {rank}, but the checkpoint has world_size "
                             f"{world_size}")
    return Location(rank, file, key)


def _check_coverage(fqn: str, size: list[int], chunks: list[ChunkStorageMetadata]) -> None:
    """Every element of the tensor is in exactly one chunk (chunks lie inside it: checked before).

    The volumes must add up to the tensor's and no two chunks may start at the same place;
    DCP's save planner refuses overlapping chunks, so together these find a missing shard.
    """
    whole = math.prod(size)
    held = sum(math.prod(c.sizes) for c in chunks)
    starts = {tuple(c.offsets) for c in chunks if math.prod(c.sizes)}
    if held != whole or len(starts) != sum(1 for c in chunks if math.prod(c.sizes)):
        raise IntegrityError(f"the checkpoint holds {held} of the {whole} elements of {fqn!r} (size {size}): a "
                             "rank's shard is missing or duplicated; refusing to load part of a tensor")


class SafeLoadPlanner(DefaultLoadPlanner):
    """DCP's default load planner, but non-tensor values are decoded with ``weights_only=True``.

    ``DefaultLoadPlanner.load_bytes`` unpickles them (``weights_only=False``); torpor never
    unpickles anything from a bucket. The rest of the method is the default's.
    """

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        decoded = torch.load(value, weights_only=True)
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], decoded)
        else:
            self.state_dict[read_item.dest_index.fqn] = decoded


class TorporReader(StorageReader):
    """Reads the pieces a rank's load plan needs from torpor's files (module docstring).

    Args:
        index: the checkpoint's decoded index.
        fetch: ``(rank, file)`` → that rank's payload (verified, decrypted, decoded with
            ``weights_only=True``); called at most once per file and load.
    """

    def __init__(self, index: Index, fetch: Callable[[int, str], Mapping[str, Any]]) -> None:
        super().__init__()
        self._index = index
        self._fetch = fetch

    def reset(self, checkpoint_id: Any = None) -> None:
        """Nothing to reset: one reader per load."""

    def read_metadata(self) -> Metadata:
        return self._index.metadata

    def set_up_storage_reader(self, metadata: Metadata, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
        """Nothing to set up."""

    def prepare_local_plan(self, plan: LoadPlan) -> LoadPlan:
        return plan

    def prepare_global_plan(self, plans: list[LoadPlan]) -> list[LoadPlan]:
        return plans

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> Future[None]:
        """Copy every planned piece into place, one stored file at a time (each read once).

        Raises:
            IntegrityError: a file lacks a piece its index places there, or a piece has
                another shape than the index says.
        """
        by_file: dict[tuple[int, str], list[ReadItem]] = {}
        for item in plan.items:
            loc = self._index.locations[item.storage_index]
            by_file.setdefault((loc.rank, loc.file), []).append(item)
        for (rank, file), items in sorted(by_file.items()):
            pieces = self._fetch(rank, file)
            for item in items:
                loc = self._index.locations[item.storage_index]
                if loc.key not in pieces:
                    raise IntegrityError(f"rank {rank}'s {file} file lacks {loc.key!r}, which the index places there")
                stored = pieces[loc.key]
                if item.type is LoadItemType.BYTE_IO:
                    planner.load_bytes(item, io.BytesIO(stored.numpy().tobytes()))
                    continue
                source = _narrow(stored, item.storage_offsets, item.lengths, loc.key)
                target = planner.resolve_tensor(item).detach()
                if target.shape != source.shape:
                    raise IntegrityError(f"piece {loc.key!r} of rank {rank} has shape {tuple(source.shape)} where "
                                         f"{tuple(target.shape)} is expected")
                target.copy_(source)
                planner.commit_tensor(item, target)
            del pieces
        future: Future[None] = Future()
        future.set_result(None)
        return future

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: Any) -> bool:
        return False


def _narrow(tensor: torch.Tensor, offsets: torch.Size, lengths: torch.Size, key: str) -> torch.Tensor:
    if len(offsets) != tensor.dim():
        raise IntegrityError(f"piece {key!r} has {tensor.dim()} dimensions, the index says {len(offsets)}")
    for dim, (start, length) in enumerate(zip(offsets, lengths, strict=True)):
        if start + length > tensor.shape[dim]:
            raise IntegrityError(f"piece {key!r} is shorter than the index says (dimension {dim})")
        tensor = tensor.narrow(dim, start, length)
    return tensor

