"""Capturing and restoring training state, and the shard's byte format.

A shard is ``torch.save`` of a dict holding only tensors, containers and primitives, so it
loads with ``torch.load(weights_only=True)``: nothing from a bucket is ever unpickled as an
arbitrary object. Loop and RNG metadata travel as one JSON string inside it (``meta``).
"""

from __future__ import annotations

import io
import json
import mmap
import random
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

SHARD_FORMAT = 1


def unwrap(module: Any) -> Any:
    """The user's module inside DDP/DataParallel/``torch.compile`` wrappers.

    Saved state must not carry the wrapper's ``module.`` prefix, or a checkpoint written
    under DDP would not load into the plain model (and vice versa).
    """
    while True:
        if isinstance(module, nn.parallel.DistributedDataParallel | nn.DataParallel):
            module = module.module
        elif hasattr(module, "_orig_mod") and isinstance(module._orig_mod, nn.Module):
            module = module._orig_mod
        else:
            return module


def local_state(state: Any) -> Any:
    """Replace DTensors by their local shard, recursively (each rank writes what it holds)."""
    if isinstance(state, dict):
        return {k: local_state(v) for k, v in state.items()}
    if isinstance(state, list | tuple):
        return type(state)(local_state(v) for v in state)
    to_local = getattr(state, "to_local", None)
    if isinstance(state, torch.Tensor) and callable(to_local):
        return to_local()
    return state


@dataclass(frozen=True)
class RngState:
    """Every generator a training step may draw from.

    Besides the global generators, the explicit ``torch.Generator`` objects a data loader
    draws from (``DataLoader(generator=g)``, a sampler's ``generator``), by the names
    :func:`torpor._resuming.loader_generators` gives them: ``capture``/``restore`` take the
    live objects by name, the captured states travel in ``generators``.
    """

    python: tuple[Any, ...]
    numpy: tuple[Any, ...]
    torch_cpu: torch.Tensor
    torch_cuda: tuple[torch.Tensor, ...] = ()
    generators: Mapping[str, torch.Tensor] = field(default_factory=dict)

    @classmethod
    def capture(cls, generators: Mapping[str, torch.Generator] | None = None) -> RngState:
        """Snapshot the global generators, and ``generators`` (name → generator), now."""
        cuda_live = torch.cuda.is_available() and torch.cuda.is_initialized()
        cuda = tuple(torch.cuda.get_rng_state_all()) if cuda_live else ()
        named = {name: g.get_state() for name, g in (generators or {}).items()}
        return cls(random.getstate(), np.random.get_state(legacy=True), torch.get_rng_state().clone(), cuda, named)

    def restore(self, generators: Mapping[str, torch.Generator] | None = None) -> None:
        """Put the generators back exactly as captured (of ``generators``, those captured by name)."""
        random.setstate(self.python)
        np.random.set_state(self.numpy)
        torch.set_rng_state(self.torch_cpu)
        if self.torch_cuda and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(list(self.torch_cuda))
        self.restore_generators(generators)

    def restore_generators(self, generators: Mapping[str, torch.Generator] | None) -> None:
        """Only the named generators (a resume restores the global ones at load, these later)."""
        for name, g in (generators or {}).items():
            state = self.generators.get(name)
            if state is not None:
                g.set_state(state)

    def to_parts(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        """``(json_part, tensor_part)`` for the shard."""
        version, internal, gauss = self.python
        name, keys, pos, has_gauss, cached = self.numpy
        doc = {
            "python": [version, list(internal), gauss],
            "numpy": [name, [int(k) for k in keys], int(pos), int(has_gauss), float(cached)],
        }
        tensors = {"torch_cpu": self.torch_cpu}
        for i, t in enumerate(self.torch_cuda):
            tensors[f"{_CUDA}{i}"] = t
        for gen_name, t in self.generators.items():
            tensors[f"{_GENERATOR}{gen_name}"] = t
        return doc, tensors

    @classmethod
    def from_parts(cls, doc: dict[str, Any], tensors: dict[str, torch.Tensor]) -> RngState:
        """Inverse of :meth:`to_parts`."""
        version, internal, gauss = doc["python"]
        name, keys, pos, has_gauss, cached = doc["numpy"]
        return cls(
            (version, tuple(internal), gauss),
            (name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached),
            tensors["torch_cpu"],
            cuda_states_in_device_order(tensors),
            {k[len(_GENERATOR):]: t for k, t in tensors.items() if k.startswith(_GENERATOR)},
        )


@dataclass(frozen=True)
class BeforeLookahead:
    """What a checkpoint records of the moment before the loop read the next batch ahead.

    Reading a batch ahead may draw random numbers (augmentation) and moves a loader that keeps
    its own position; the resumed run reads that batch again, so it must start from here.
    """

    rng: RngState
    positions: Mapping[str, Any] = field(default_factory=dict)
    """A copy of the ``state_dict()`` of the loader that keeps its own position, by its
    ``state=`` key (empty when the loop's loader is not in ``state``)."""


_CUDA = "torch_cuda_"
_GENERATOR = "generator_"


def cuda_states_in_device_order(tensors: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """The ``torch_cuda_{i}`` states ordered by device index ``i``.

    ``set_rng_state_all`` assigns the i-th state to device i; sorting the key strings would
    give device 2 the state of device 10 on a machine with more than ten GPUs.
    """
    indexed = {int(k[len(_CUDA):]): t for k, t in tensors.items() if k.startswith(_CUDA)}
    if sorted(indexed) != list(range(len(indexed))):
        raise ValueError(f"CUDA generator states must be numbered 0..n-1, got devices {sorted(indexed)}")
    return tuple(indexed[i] for i in range(len(indexed)))


def encode(payload: dict[str, Any]) -> bytes:
    """Serialise a shard payload."""
    buf = io.BytesIO()
    torch.save(payload, buf)
    return buf.getvalue()


class ViewReader(io.RawIOBase):
    """A seekable reader over a buffer without copying it (``io.BytesIO`` copies a bytearray,
    a GiB of extra memory and time on every resume)."""

    def __init__(self, data: bytes | bytearray | memoryview) -> None:
        """Read ``data`` from its start."""
        super().__init__()
        self._view = memoryview(data).cast("B")
        self._pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: len(self._view)}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def readinto(self, buffer: Any) -> int:
        n = max(0, min(len(buffer), len(self._view) - self._pos))
        buffer[:n] = self._view[self._pos:self._pos + n]
        self._pos += n
        return n

    def read(self, size: int | None = -1) -> bytes:
        end = len(self._view) if size is None or size < 0 else min(len(self._view), self._pos + size)
        out = self._view[self._pos:end].tobytes() if end > self._pos else b""
        self._pos += len(out)
        return out


def decode(data: bytes | bytearray | memoryview, map_location: Any = "cpu") -> dict[str, Any]:
    """Deserialise a shard payload safely (``weights_only=True``).

    Raises:
        ValueError: the bytes are not a torpor shard of a known format.
    """
    payload = torch.load(ViewReader(data), map_location=map_location, weights_only=True)
    if not isinstance(payload, dict) or payload.get("torpor_format") != SHARD_FORMAT:
        raise ValueError(f"not a torpor shard of format {SHARD_FORMAT} (got {type(payload).__name__})")
    return payload


class Staging:
    """CPU copies of the state for a background save, in buffers reused from save to save.

    An async save must not hold references to tensors the optimizer changes in place, so
    every tensor is copied at the step boundary. Reusing the previous save's buffers (same
    path, shape and dtype) turns that into a plain memcpy: no allocation, no page faults.
    Only one snapshot may use the buffers at a time (the background saver keeps one save in
    flight and the next snapshot waits for it).

    A tensor that appears twice in one snapshot (the trainable parameters beside the model's
    state dict with ``save_trainable_params``, tied weights) is staged once and both places
    get the same copy, as a synchronous save writes the same tensor: staging holds at most
    one copy of what is saved.
    """

    def __init__(self) -> None:
        """Start with no buffers."""
        self._buffers: dict[tuple[Any, ...], torch.Tensor] = {}
        self._used: set[tuple[Any, ...]] = set()
        self._staged: dict[tuple[Any, ...], torch.Tensor] = {}

    def snapshot(self, state: Any) -> Any:
        """A deep copy of ``state`` whose tensors live in this staging area."""
        self._used = set()
        copied = self._copy_once(state)
        for key in set(self._buffers) - self._used:  # the model changed shape: free the old ones
            del self._buffers[key]
        return copied

    def _copy_once(self, state: Any) -> Any:
        self._staged = {}
        try:
            return self._copy(state, ())
        finally:
            self._staged = {}

    def reserve(self, state: Any) -> None:
        """Allocate and touch the buffers ``state``'s tensors will need, before any save.

        The first snapshot would otherwise pay the page faults of every buffer inside a
        step boundary (2.5-3 s for 1 GiB on a loaded 2-core machine); at train begin they
        cost the same once, outside any step. Buffers of tensors that appear only later
        (optimizer moments) are still made by the first snapshot.
        """
        self._copy_once(state)  # the copy is what touches the pages; snapshot() overwrites it

    @property
    def nbytes(self) -> int:
        """Bytes held in staging buffers."""
        return sum(t.numel() * t.element_size() for t in self._buffers.values())

    def _copy(self, value: Any, path: tuple[Any, ...]) -> Any:
        if isinstance(value, torch.Tensor):
            source = value.detach()
            same = _identity(source)
            if same in self._staged:  # the very same memory seen earlier in this snapshot
                return self._staged[same]
            key = (*path, tuple(source.shape), source.dtype)
            buf = self._buffers.get(key)
            if buf is None:
                buf = torch.empty(source.shape, dtype=source.dtype, device="cpu")
                self._buffers[key] = buf
            self._used.add(key)
            buf.copy_(source)
            self._staged[same] = buf
            return buf
        if isinstance(value, dict):
            return {k: self._copy(v, (*path, k)) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return type(value)(self._copy(v, (*path, i)) for i, v in enumerate(value))
        return value


def _identity(t: torch.Tensor) -> tuple[Any, ...]:
    """What makes two tensors the same view of the same memory (``detach()`` keeps all of it)."""
    return (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)


_PAGE = mmap.PAGESIZE
_CONSUME_SLICE = 8 * 1024 * 1024
"""Bytes copied out of the scratch buffer before their pages are given back: the most the
load holds twice at any moment."""
_FREE_AT_LEAST = 1024 * 1024
"""Reads shorter than this (zip headers, the pickle) keep their pages: they are tiny and may
share a page with the next record's header."""


class ConsumingReader(ViewReader):
    """A reader over a private scratch mapping that gives each page back once it is read.

    ``torch.load`` reads every tensor's record exactly once, into the tensor's own new
    memory; freeing the scratch pages behind the copy (``MADV_DONTNEED``) means the shard is
    held about once while it is decoded, not twice, and the tensors are ordinary memory (a
    ``mmap=True`` load would leave the optimizer's moments on the scratch pages for the
    whole run). A freed page reads back as zeros, so reading one again is an error here,
    never silent: should a torch version ever read a record twice, loading fails loudly.
    """

    def __init__(self, mapped: mmap.mmap, length: int) -> None:
        """Read ``mapped[:length]`` (a private anonymous mapping this reader may free)."""
        super().__init__(memoryview(mapped)[:length])
        self._map = mapped
        self._freed = bytearray(-(-length // _PAGE))  # 1 per page given back

    def _check_unfreed(self, start: int, end: int) -> None:
        if end > start and self._freed.find(1, start // _PAGE, -(-end // _PAGE)) != -1:
            raise RuntimeError(f"shard bytes {start}..{end} read twice while loading; torpor frees each record "
                               "after reading it, so this torch version's loader needs another reader")

    def readinto(self, buffer: Any) -> int:
        start = self._pos
        n = max(0, min(len(buffer), len(self._view) - start))
        self._check_unfreed(start, start + n)
        with memoryview(buffer).cast("B") as out:
            done = 0
            while done < n:
                step = min(_CONSUME_SLICE, n - done)
                out[done:done + step] = self._view[start + done:start + done + step]
                done += step
                if n >= _FREE_AT_LEAST:  # small reads (headers, pickle) are left alone
                    self._free(start, start + done)
        self._pos += n
        return n

    def read(self, size: int | None = -1) -> bytes:
        end = len(self._view) if size is None or size < 0 else min(len(self._view), self._pos + size)
        self._check_unfreed(self._pos, end)
        return super().read(size)

    def _free(self, start: int, end: int) -> None:
        """Give back the whole pages inside ``[start, end)`` (never a page shared with other bytes)."""
        first, last = -(-start // _PAGE), end // _PAGE
        if last > first:
            self._map.madvise(mmap.MADV_DONTNEED, first * _PAGE, (last - first) * _PAGE)
            self._freed[first:last] = b"\1" * (last - first)

    def close(self) -> None:
        """Release the view, so the caller can close the mapping."""
        self._view.release()
        super().close()


def can_consume() -> bool:
    """Whether this platform frees pages of an anonymous mapping on request (Linux does)."""
    return hasattr(mmap, "MADV_DONTNEED") and hasattr(mmap, "MAP_PRIVATE") and hasattr(mmap.mmap, "madvise")


def decode_consuming(mapped: mmap.mmap, length: int, map_location: Any = "cpu") -> dict[str, Any]:
    """:func:`decode` of ``mapped[:length]``, giving its pages back as the tensors are read.

    ``mapped`` is a private anonymous mapping the caller discards afterwards (its contents
    are zeros where they were read).
    """
    reader = ConsumingReader(mapped, length)
    try:
        payload = torch.load(reader, map_location=map_location, weights_only=True)
    finally:
        reader.close()
    if not isinstance(payload, dict) or payload.get("torpor_format") != SHARD_FORMAT:
        raise ValueError(f"not a torpor shard of format {SHARD_FORMAT} (got {type(payload).__name__})")
    return payload


def meta_of(payload: dict[str, Any]) -> dict[str, Any]:
    """The JSON metadata stored in a shard."""
    return json.loads(payload["meta"])
