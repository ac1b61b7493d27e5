"""State that lives on several ranks at once: how a save and a load handle it, or refuse it.

The one table (:func:`layout_of` decides, :func:`check_options` refuses)::

    ==============================  ============================================  ========================
    the run's state                 a save                                        a load
    ==============================  ============================================  ========================
    plain or DDP (replicated)       as before: model and optimizer written once,  every rank reads rank 0's
                                    by rank 0 (``integrated_save``)               ``.ckpt``
    DTensor parameters (FSDP2       DCP's planners on every rank: each rank's     DCP on every rank: each
    ``fully_shard``, tensor         shards into its ``.distcp``, replicated       reads the pieces of its
    parallel), FSDP1                values once (rank 0's ``.ckpt``), an index    own shards, whatever the
                                    in rank 0's ``.ckpt``                         saving layout
    ZeroRedundancyOptimizer         consolidated on rank 0 (every rank takes      every rank loads the full
                                    part), then written as replicated             state, keeps its part
    ==============================  ============================================  ========================

Refused with :class:`torpor.errors.ShardedStateError`, on every rank alike and before anything
is written (the layout is the same on every rank, so is the decision):

* a breakpoint (``exception_save``) of sharded or ZeRO state: it needs every rank in a
  collective, and the other ranks may be stuck in one of their own;
* ``save_trainable_params`` with sharded weights, and a ``saved_network`` holding sharded
  weights: each rank would write its own shard of them as if it were the whole;
* ``ZeroRedundancyOptimizer`` with ``integrated_save=False``: its consolidated state exists
  on rank 0 only, so no other rank can write its own copy.

Refused at a load with :class:`torpor.errors.ResizeError` (:func:`check_resizable`), on every
rank alike and before DCP's collective read: FSDP1 state on any world size but the saving one.
2 → 3 failed in DCP's load plan (the new rank's misses the optimizer's ``param_groups``); 2 → 1
ran without an error, but nothing checks that flat parameters' optimizer state reshards
exactly, so a shrink is refused too.

Everything that needs every rank runs in the training thread at the step boundary, with an
agreement first (:func:`torpor._distributed.all_ok`), so a rank that failed to build its state
never leaves the others waiting in DCP's collectives; DCP forwards a failure inside its own
steps to every rank. What runs in the background writes bytes only.
"""

from __future__ import annotations

import contextlib
import copy
import sys
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from torpor import _distributed
from torpor.errors import IntegrityError, ResizeError, ShardedStateError

if TYPE_CHECKING:
    from torch.distributed.checkpoint.api import CheckpointException

IN_SHARD = "ckpt"
"""In the index: the piece is in the rank's ``.ckpt`` (replicated tensors, non-tensor values)."""
IN_DCP = "dcp"
"""In the index: the piece is in the rank's ``.distcp`` (shards of DTensors / ShardedTensors)."""

# DCP, DTensor and FSDP are imported only by a run that has sharded state: importing DCP brings
# DTensor, torch.fx's symbolic shapes and sympy, about a second of CPU in every rank at start-up.
# A sharded object exists only after its class's module was imported, so a module not imported
# yet means there is none of its objects to find.


def _loaded_type(module: str, name: str) -> type | None:
    """``module.name`` if ``module`` is imported already, else ``None`` (no object of it exists)."""
    found = sys.modules.get(module)
    value = getattr(found, name, None) if found is not None else None
    return value if isinstance(value, type) else None


def _dtensor_type() -> type | None:
    return _loaded_type("torch.distributed.tensor._api", "DTensor")


def _sharded_tensor_type() -> type | None:
    return _loaded_type("torch.distributed._shard.sharded_tensor.api", "ShardedTensor")


def _fsdp1_type() -> type | None:
    return _loaded_type("torch.distributed.fsdp.fully_sharded_data_parallel", "FullyShardedDataParallel")


def _zero_type() -> type | None:
    return _loaded_type("torch.distributed.optim.zero_redundancy_optimizer", "ZeroRedundancyOptimizer")


def _is(value: Any, kind: type | None) -> bool:
    return kind is not None and isinstance(value, kind)


def sharded_module(module: Any) -> str | None:
    """The first submodule or tensor of ``module`` that lives on several ranks, named, or ``None``.

    A DTensor parameter or buffer (``fully_shard``, tensor parallel) or an FSDP1 wrapper: its
    ``state_dict()`` is not the whole on any one rank (or, for FSDP1, is a collective).
    """
    if not isinstance(module, nn.Module):
        return None
    fsdp1, dtensor = _fsdp1_type(), _dtensor_type()
    for name, sub in module.named_modules():
        if _is(sub, fsdp1):
            return f"{name or 'the model'} (FullyShardedDataParallel)"
    for name, tensor in (*module.named_parameters(), *module.named_buffers()):
        if _is(tensor, dtensor):
            return f"{name} (DTensor, {tuple(tensor.placements)})"
    return None


def _sharded_optimizer(optimizer: Any, network_params: set[int], network_sharded: bool) -> bool:
    """An optimizer whose state is sharded with the network's parameters."""
    if not isinstance(optimizer, torch.optim.Optimizer):
        return False
    params = [p for group in optimizer.param_groups for p in group["params"]]
    dtensor = _dtensor_type()
    if any(_is(p, dtensor) for p in params):
        return True
    return network_sharded and bool(params) and all(id(p) in network_params for p in params)


@dataclass(frozen=True)
class Layout:
    """How one run's state is laid out over the ranks (the same on every rank)."""

    sharded: str | None = None
    """What makes the model sharded (a module or parameter, named), or ``None``: replicated."""
    zero: tuple[str, ...] = ()
    """ZeroRedundancyOptimizers among the optimizer and ``state=``, by name."""
    dcp_state: tuple[str, ...] = ()
    """Keys of ``state=`` whose objects are sharded (optimizers of the sharded model, sharded
    modules): saved and loaded through DCP with the model."""

    @property
    def needs_every_rank(self) -> bool:
        """Whether a save of this state is a collective."""
        return self.sharded is not None or bool(self.zero)


def layout_of(network: Any, optimizer: Any = None, state: Mapping[str, Any] | None = None) -> Layout:
    """Decide the layout from the objects' types and parameters (pure: no state_dict() call)."""
    sharded = sharded_module(network)
    params = {id(p) for p in network.parameters()} if isinstance(network, nn.Module) else set()
    zero_type = _zero_type()
    named = [("optimizer", optimizer), *((f"state[{k!r}]", v) for k, v in (state or {}).items())]
    zero = tuple(name for name, obj in named if zero_type is not None and isinstance(obj, zero_type))
    dcp_state = tuple(k for k, v in (state or {}).items()
                      if _sharded_optimizer(v, params, sharded is not None) or sharded_module(v) is not None)
    return Layout(sharded=sharded, zero=zero, dcp_state=dcp_state)


def check_options(layout: Layout, *, integrated: bool, trainable_params: bool = False, saved_network: Any = None,
                  collective: bool = True) -> None:
    """Refuse what this layout cannot save correctly (the module docstring's list).

    Raises:
        ShardedStateError: naming the module, parameter or setting, and what to do instead.
    """
    if not collective and layout.needs_every_rank:
        what = layout.sharded or ", ".join(layout.zero)
        raise ShardedStateError(
            f"a breakpoint (exception_save) of this run cannot be saved: {what} is sharded over the ranks, so a save "
            "needs every rank in a collective, and after an exception the other ranks may be stuck in one of their "
            "own; resume from the last periodic or exit checkpoint instead")
    if layout.sharded is not None and trainable_params:
        raise ShardedStateError(
            f"save_trainable_params=True cannot be saved for a sharded model ({layout.sharded}): each rank holds "
            "only its shard of the parameters. Set save_trainable_params=False; the checkpoint holds every shard, "
            "and torpor.load_checkpoint into an unsharded copy of the model gathers them")
    held = sharded_module(saved_network)
    if held is not None:
        raise ShardedStateError(
            f"saved_network holds sharded weights ({held}): each rank would write its shard as if it were the "
            "whole. Pass an unsharded module as saved_network, or pass it in state= (saved with the model's shards)")
    if layout.zero and not integrated:
        raise ShardedStateError(
            f"{', '.join(layout.zero)} (ZeroRedundancyOptimizer) needs integrated_save=True: its state is "
            "consolidated on rank 0 for a save, so the other ranks cannot write their own copy")


def agree(what: str, build: Callable[[], Any]) -> Any:
    """``build()`` on every rank, then one agreement, so no rank enters a collective alone.

    Raises:
        ShardedStateError: on every rank, when ``build`` raised on any (this rank's error chained).
    """
    result, error = None, None
    try:
        result = build()
    except Exception as exc:
        error = exc
    failed = _distributed.failed_ranks(error is None)
    if failed:
        raise ShardedStateError(f"{what} failed on rank(s) {failed}" +
                                (f": {type(error).__name__}: {error}" if error else "")) from error
    return result


def consolidate(layout: Layout, optimizer: Any, state: Mapping[str, Any]) -> None:
    """Gather every ZeroRedundancyOptimizer's state on rank 0 (a collective: every rank calls it)."""
    if not layout.zero:
        return
    zero_type = _zero_type()
    targets = [o for o in (optimizer, *state.values()) if zero_type is not None and isinstance(o, zero_type)]
    for opt in targets:
        opt.consolidate_state_dict(to=0)


@dataclass
class Pieces:
    """This rank's part of the sharded state, as DCP planned it (references, not copies)."""

    shards: dict[str, torch.Tensor] = field(default_factory=dict)
    """Its shards: the ``.distcp`` file."""
    replicated: dict[str, torch.Tensor] = field(default_factory=dict)
    """Replicated tensors DCP gave this rank to write (rank 0): into the ``.ckpt``."""
    blobs: dict[str, torch.Tensor] = field(default_factory=dict)
    """Non-tensor values (``torch.save`` bytes as uint8 tensors): into the ``.ckpt``."""
    index: str | None = None
    """The index (JSON), on rank 0."""


def _state_dict(network: nn.Module, optimizer: Any, state: Mapping[str, Any], keys: tuple[str, ...]) -> dict[str, Any]:
    """What DCP saves and loads: model, optimizer and the ``state=`` objects of ``keys``, by FQN."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    result: dict[str, Any] = {"model": get_model_state_dict(network)}
    if optimizer is not None:
        result["optimizer"] = get_optimizer_state_dict(network, optimizer)
    if keys:
        result["state"] = {key: (get_optimizer_state_dict(network, state[key])
                                 if isinstance(state[key], torch.optim.Optimizer)
                                 else get_model_state_dict(state[key])) for key in keys}
    return result


def save_pieces(layout: Layout, network: nn.Module, optimizer: Any, state: Mapping[str, Any]) -> Pieces:
    """Plan this rank's part of a sharded save with DCP (every rank calls it at the same step).

    Replicated values go to rank 0 (``dedup_save_to_lowest_rank``), as a replicated save
    writes them: every rank then reads its own files and rank 0's ``.ckpt``, never another
    rank's shards, when it loads on the same world size.

    Raises:
        ShardedStateError: building the state failed on some rank, or DCP's planning did
            (on every rank alike).
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    from torpor._dcp_storage import CapturingWriter

    state_dict = agree("building the sharded state dict",
                       lambda: _state_dict(network, optimizer, state, layout.dcp_state))
    writer = CapturingWriter(_distributed.rank())
    try:
        with _single_process_quiet():
            dcp.save(state_dict, storage_writer=writer, planner=dcp.DefaultSavePlanner(dedup_save_to_lowest_rank=True),
                     no_dist=not _distributed.is_initialized())
    except CheckpointException as exc:
        raise _own_failure(exc, ShardedStateError, "planning the sharded save") from None
    return Pieces(writer.shards, writer.replicated, writer.blobs, writer.index)


@contextlib.contextmanager
def _single_process_quiet() -> Iterator[None]:
    """DCP warns that it "assumes a single process" even when told so (``no_dist``)."""
    if _distributed.is_initialized():
        yield
        return
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def _own_failure(exc: CheckpointException, kind: type[Exception], what: str) -> BaseException:
    """This rank's own exception out of DCP's collective one, else an error naming the failed ranks."""
    failures = exc.failures
    mine = failures.get(_distributed.rank())
    ranks = sorted(failures)
    if mine is not None:
        own = mine[0] if isinstance(mine, tuple) else mine
        if isinstance(own, Exception):
            own.add_note(f"torpor: {what} failed on rank(s) {ranks}")
            return own
    first = next(iter(failures.values()))
    cause = first[0] if isinstance(first, tuple) else first
    return kind(f"{what} failed on rank(s) {ranks}: {type(cause).__name__}: {cause}")


# -- loading -----------------------------------------------------------------------------------

def _blank(value: Any) -> Any:
    """A state dict of the same structure whose tensors are new (a load fills them)."""
    if _is(value, dtensor := _dtensor_type()):
        local = value.to_local()
        return dtensor.from_local(torch.empty_like(local), value.device_mesh,  # type: ignore[union-attr]
                                  value.placements, run_check=False, shape=value.shape, stride=value.stride())
    if _is(value, _sharded_tensor_type()):  # FSDP1: the copy is overwritten, its structure is what counts
        blank = copy.deepcopy(value)
        for shard in blank.local_shards():
            shard.tensor = torch.empty_like(shard.tensor)
        return blank
    if isinstance(value, torch.Tensor):
        return torch.empty_like(value)
    if isinstance(value, dict):
        return {k: _blank(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_blank(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_blank(v) for v in value)
    return value


def check_resizable(network: Any, checkpoint: str, saved_world: int, world: int) -> None:
    """Refuse to load FSDP1 state on another world size than the one that saved it (alike on every rank).

    FSDP2/DTensor state reshards through DCP's load planner; FSDP1's flattened optimizer state
    did not (2 -> 3 ranks: DCP's load plan on the new rank misses ``optimizer.param_groups``;
    2 -> 1 ran, unchecked), so it is refused before DCP's collective read rather than failing
    inside it, or loading state nobody verified.

    Raises:
        ResizeError: ``network`` holds an FSDP1 wrapper and ``world != saved_world``.
    """
    fsdp1 = _fsdp1_type()
    if world == saved_world or fsdp1 is None or not isinstance(network, nn.Module):
        return
    if any(isinstance(sub, fsdp1) for sub in network.modules()):
        raise ResizeError(f"checkpoint {checkpoint!r} of FullyShardedDataParallel (FSDP1) state was saved on "
                          f"{saved_world} rank(s) and is resumed on {world}: torpor reshards FSDP2 (fully_shard) "
                          f"and DTensor state, not FSDP1's flat parameters. Resume on {saved_world} rank(s), or "
                          "train with fully_shard")


def is_sharded_payload(payload: Mapping[str, Any]) -> bool:
    """Whether a shard payload (a rank's ``.ckpt``) belongs to a sharded checkpoint."""
    return "dcp" in payload


def read_state(index_text: str, world_size: int, fetch: Callable[[int, str], Mapping[str, Any]],
               network: nn.Module, optimizer: Any, state: Mapping[str, Any], strict: bool,
               state_keys: tuple[str, ...] = ()) -> dict[str, Any]:
    """Read the sharded state into new tensors shaped as this rank's (every rank calls it).

    ``state_keys`` are the ``state=`` objects the save put through DCP (as it recorded them,
    so an unsharded copy loaded in one process gets them too); those of ``state`` are read.

    Nothing is applied to ``network`` or ``optimizer`` yet (an optimizer without state gets
    its zero state, as DCP's ``get_optimizer_state_dict`` makes it): :func:`apply_state`
    does that once every rank has read its part.

    Raises:
        IntegrityError, ValueError, OSError, RuntimeError: this rank's own failure (an index
            that does not cover a tensor, a file that does not match its manifest, a key
            the checkpoint lacks with ``strict``); a rank whose reads worked raises an
            ``IntegrityError`` naming the ranks that failed. Every rank raises together.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    from torpor._dcp_storage import SafeLoadPlanner, TorporReader, decode_index

    index = decode_index(index_text, world_size)
    keys = tuple(k for k in state_keys if k in state)
    target = _blank(_state_dict(network, optimizer, state, keys))
    try:
        with _single_process_quiet():
            dcp.load(target, storage_reader=TorporReader(index, fetch),
                     planner=SafeLoadPlanner(allow_partial_load=not strict), no_dist=not _distributed.is_initialized())
    except CheckpointException as exc:
        raise _own_failure(exc, IntegrityError, "reading the sharded state") from None
    return target


def apply_state(loaded: Mapping[str, Any], network: nn.Module, optimizer: Any, state: Mapping[str, Any],
                strict: bool) -> None:
    """Put what :func:`read_state` read into the model, the optimizer and the ``state=`` objects
    it read (its ``"state"`` keys: the caller restores the others from the ``.ckpt``)."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    options = StateDictOptions(strict=strict)
    set_model_state_dict(network, loaded["model"], options=options)
    if optimizer is not None and "optimizer" in loaded:
        set_optimizer_state_dict(network, optimizer, loaded["optimizer"], options=options)
    for key, value in (loaded.get("state") or {}).items():
        obj = state.get(key)
        if isinstance(obj, torch.optim.Optimizer):
            set_optimizer_state_dict(network, obj, value, options=options)
        elif obj is not None:
            set_model_state_dict(obj, value, options=options)
