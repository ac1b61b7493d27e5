"""torpor's DCP storage pair in one process: the index, its checks, and safe decoding.

The multi-rank behaviour is in ``test_runtime_sharded.py``; these pin what the index must
refuse (a missing shard, a piece on a rank the checkpoint lacks) and that nothing read from a
checkpoint is ever unpickled, through DCP's own ``save``/``load`` with torpor's writer/reader.
"""

from __future__ import annotations

import io
import json
import warnings
from collections.abc import Iterator
from typing import Any

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import DefaultSavePlanner
from torch.distributed.checkpoint.api import CheckpointException

from torpor._dcp_storage import IN_SHARD, CapturingWriter, SafeLoadPlanner, TorporReader, decode_index
from torpor.errors import IntegrityError


@pytest.fixture(autouse=True)
def _single_process() -> Iterator[None]:
    with warnings.catch_warnings():  # DCP says it assumes one process even when told so
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def _save(state: dict[str, Any]) -> CapturingWriter:
    writer = CapturingWriter(0)
    dcp.save(state, storage_writer=writer, planner=DefaultSavePlanner(dedup_save_to_lowest_rank=True), no_dist=True)
    return writer


def _state() -> dict[str, Any]:
    return {"model": {"w": torch.arange(12.0).reshape(3, 4), "b": torch.tensor([1.5, -2.0])},
            "optimizer": {"param_groups": [{"lr": 0.01, "betas": (0.9, 0.999), "params": ["w", "b"]}],
                          "state": {"w": {"step": torch.tensor(7.0)}}}}


def _blank(state: Any) -> Any:
    if isinstance(state, dict):
        return {k: _blank(v) for k, v in state.items()}
    if isinstance(state, list):
        return [_blank(v) for v in state]
    return torch.zeros_like(state) if isinstance(state, torch.Tensor) else state


def test_the_writer_and_reader_round_trip_tensors_and_values_through_dcp() -> None:
    writer = _save(_state())
    assert writer.index is not None and not writer.shards  # plain tensors: replicated, in the .ckpt
    doc = json.loads(writer.index)
    assert doc["tensors"]["model.w"]["chunks"] == [{"offsets": [0, 0], "sizes": [3, 4], "rank": 0, "file": IN_SHARD,
                                                     "key": "model.w@0,0"}]
    assert doc["bytes"]["optimizer.param_groups.0.lr"] == {"rank": 0, "file": IN_SHARD,
                                                           "key": "optimizer.param_groups.0.lr"}
    files = {(0, IN_SHARD): {**writer.replicated, **writer.blobs}}
    fetched: list[tuple[int, str]] = []

    def fetch(rank: int, file: str) -> dict[str, torch.Tensor]:
        fetched.append((rank, file))
        return files[(rank, file)]

    target = _blank(_state())
    target["optimizer"]["param_groups"][0]["lr"] = 123.0
    dcp.load(target, storage_reader=TorporReader(decode_index(writer.index, 1), fetch), planner=SafeLoadPlanner(),
             no_dist=True)
    assert fetched == [(0, IN_SHARD)]  # each file read once
    torch.testing.assert_close(target["model"], _state()["model"])
    assert target["optimizer"]["param_groups"][0]["lr"] == 0.01
    assert target["optimizer"]["param_groups"][0]["betas"] == (0.9, 0.999)
    assert float(target["optimizer"]["state"]["w"]["step"]) == 7.0


def _index_with(**tensor: Any) -> str:
    return json.dumps({"format": 1, "bytes": {}, "tensors": {"w": {"dtype": "float32", "size": [4, 2], **tensor}}})


def _chunk(offset: int, rows: int, rank: int) -> dict[str, Any]:
    return {"offsets": [offset, 0], "sizes": [rows, 2], "rank": rank, "file": "dcp", "key": f"w@{offset},0"}


def test_an_index_that_lacks_a_shard_is_refused() -> None:
    whole = _index_with(chunks=[_chunk(0, 2, 0), _chunk(2, 2, 1)])
    assert decode_index(whole, 2).ranks == {0, 1}
    with pytest.raises(IntegrityError, match=r"holds 4 of the 8 elements of 'w'.*a rank's shard is missing"):
        decode_index(_index_with(chunks=[_chunk(0, 2, 0)]), 2)
    with pytest.raises(IntegrityError, match="missing or duplicated"):
        decode_index(_index_with(chunks=[_chunk(0, 2, 0), _chunk(0, 2, 1)]), 2)
    with pytest.raises(IntegrityError, match="outside its size"):
        decode_index(_index_with(chunks=[_chunk(0, 2, 0), _chunk(3, 2, 1)]), 2)
    with pytest.raises(IntegrityError, match="stored by rank 1, but the checkpoint has world_size 1"):
        decode_index(whole, 1)


@pytest.mark.parametrize(("text", "message"), [
    ("not json", "not valid JSON"),
    (json.dumps({"format": 99}), "not a sharded-state index of format 1"),
    (_index_with(dtype="complexity", chunks=[_chunk(0, 4, 0)]), "unknown dtype 'complexity'"),
    (_index_with(chunks=[{**_chunk(0, 4, 0), "file": "../x"}]), "malformed location"),
    (_index_with(size=[4, -2], chunks=[]), "non-negative ints"),
])
def test_a_malformed_index_is_refused_with_what_is_wrong(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        decode_index(text, 1)


class Trojan:
    """An object whose unpickling would run code: what no load may ever accept."""

    def __reduce__(self) -> tuple[Any, ...]:
        return (print, ("unpickled!",))


def test_a_value_that_only_pickle_could_load_is_refused_on_save_and_on_load() -> None:
    with pytest.raises(CheckpointException) as saving:
        _save({"model": {"w": torch.ones(2)}, "extra": {"hook": Trojan()}})
    assert "extra.hook is a Trojan" in str(saving.value.failures)

    writer = _save(_state())
    assert writer.index is not None
    buf = io.BytesIO()
    torch.save(Trojan(), buf)  # as if written into the bucket
    blobs = {**writer.blobs, "optimizer.param_groups.0.lr": torch.frombuffer(bytearray(buf.getvalue()),
                                                                              dtype=torch.uint8)}
    files = {(0, IN_SHARD): {**writer.replicated, **blobs}}
    with pytest.raises(CheckpointException) as loading:
        dcp.load(_blank(_state()), storage_reader=TorporReader(decode_index(writer.index, 1),
                                                               lambda r, f: files[(r, f)]),
                 planner=SafeLoadPlanner(), no_dist=True)
    assert "Weights only load failed" in str(loading.value.failures)
