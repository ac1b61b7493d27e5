"""Capturing and restoring training state, and the shard's byte format.

A shard is ``torch.save`` of a dict holding only tensors, containers and primitives, so it
loads with ``torch.load(weights_only=True)``: nothing from a bucket is ever unpickled as an
arbitrary object. Loop and RNG metadata travel as one JSON string inside it (``meta``).
"""

from __future__ import annotations

import io
import json
import random
from dataclasses import dataclass
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
    """Every generator a training step may draw from."""

    python: tuple[Any, ...]
    numpy: tuple[Any, ...]
    torch_cpu: torch.Tensor
    torch_cuda: tuple[torch.Tensor, ...] = ()

    @classmethod
    def capture(cls) -> RngState:
        """Snapshot the global generators now."""
        cuda_live = torch.cuda.is_available() and torch.cuda.is_initialized()
        cuda = tuple(torch.cuda.get_rng_state_all()) if cuda_live else ()
        return cls(random.getstate(), np.random.get_state(legacy=True), torch.get_rng_state().clone(), cuda)

    def restore(self) -> None:
        """Put the generators back exactly as captured."""
        random.setstate(self.python)
        np.random.set_state(self.numpy)
        torch.set_rng_state(self.torch_cpu)
        if self.torch_cuda and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(list(self.torch_cuda))

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
            tensors[f"torch_cuda_{i}"] = t
        return doc, tensors

    @classmethod
    def from_parts(cls, doc: dict[str, Any], tensors: dict[str, torch.Tensor]) -> RngState:
        """Inverse of :meth:`to_parts`."""
        version, internal, gauss = doc["python"]
        name, keys, pos, has_gauss, cached = doc["numpy"]
        cuda = tuple(tensors[k] for k in sorted(tensors) if k.startswith("torch_cuda_"))
        return cls(
            (version, tuple(internal), gauss),
            (name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached),
            tensors["torch_cpu"],
            cuda,
        )


def encode(payload: dict[str, Any]) -> bytes:
    """Serialise a shard payload."""
    buf = io.BytesIO()
    torch.save(payload, buf)
    return buf.getvalue()


def decode(data: bytes, map_location: Any = "cpu") -> dict[str, Any]:
    """Deserialise a shard payload safely (``weights_only=True``).

    Raises:
        ValueError: the bytes are not a torpor shard of a known format.
    """
    payload = torch.load(io.BytesIO(data), map_location=map_location, weights_only=True)
    if not isinstance(payload, dict) or payload.get("torpor_format") != SHARD_FORMAT:
        raise ValueError(f"not a torpor shard of format {SHARD_FORMAT} (got {type(payload).__name__})")
    return payload


def meta_of(payload: dict[str, Any]) -> dict[str, Any]:
    """The JSON metadata stored in a shard."""
    return json.loads(payload["meta"])
