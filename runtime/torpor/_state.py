"""Capturing and restoring training state, and the shard's byte format.

A shard is ``torch.save`` of a dict holding only tensors, containers and primitives, so it
loads with ``torch.load(weights_only=True)``: nothing from a bucket is ever unpickled as an
arbitrary object. Loop and RNG metadata travel as one JSON string inside it (``meta``).
"""

from __future__ import annotations

import io
import json
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
    """

    def __init__(self) -> None:
        """Start with no buffers."""
        self._buffers: dict[tuple[Any, ...], torch.Tensor] = {}
        self._used: set[tuple[Any, ...]] = set()

    def snapshot(self, state: Any) -> Any:
        """A deep copy of ``state`` whose tensors live in this staging area."""
        self._used = set()
        copied = self._copy(state, ())
        for key in set(self._buffers) - self._used:  # the model changed shape: free the old ones
            del self._buffers[key]
        return copied

    def reserve(self, state: Any) -> None:
        """Allocate and touch the buffers ``state``'s tensors will need, before any save.

        The first snapshot would otherwise pay the page faults of every buffer inside a
        step boundary (2.5-3 s for 1 GiB on a loaded 2-core machine); at train begin they
        cost the same once, outside any step. Buffers of tensors that appear only later
        (optimizer moments) are still made by the first snapshot.
        """
        self._copy(state, ())  # the copy is what touches the pages; snapshot() overwrites it

    @property
    def nbytes(self) -> int:
        """Bytes held in staging buffers."""
        return sum(t.numel() * t.element_size() for t in self._buffers.values())

    def _copy(self, value: Any, path: tuple[Any, ...]) -> Any:
        if isinstance(value, torch.Tensor):
            source = value.detach()
            key = (*path, tuple(source.shape), source.dtype)
            buf = self._buffers.get(key)
            if buf is None:
                buf = torch.empty(source.shape, dtype=source.dtype, device="cpu")
                self._buffers[key] = buf
            self._used.add(key)
            buf.copy_(source)
            return buf
        if isinstance(value, dict):
            return {k: self._copy(v, (*path, k)) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return type(value)(self._copy(v, (*path, i)) for i, v in enumerate(value))
        return value


def decode_file(path: str, map_location: Any = "cpu") -> dict[str, Any]:
    """:func:`decode` of a file, memory-mapped: tensors use the file's pages in place.

    The caller may unlink the file once this returns (the mapping keeps the pages).
    """
    payload = torch.load(path, map_location=map_location, weights_only=True, mmap=True)
    if not isinstance(payload, dict) or payload.get("torpor_format") != SHARD_FORMAT:
        raise ValueError(f"not a torpor shard of format {SHARD_FORMAT} (got {type(payload).__name__})")
    return payload


def meta_of(payload: dict[str, Any]) -> dict[str, Any]:
    """The JSON metadata stored in a shard."""
    return json.loads(payload["meta"])
