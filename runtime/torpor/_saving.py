"""Writing one checkpoint: each rank's shard, extras and, last, its manifest.

Replicated (DDP) state is written once: with ``integrated=True`` rank 0's shard holds the
model, optimizer and scheduler, and every other rank writes only what is its own (RNG, loop
position, and the position of a loader that keeps its own: ``rank_state``, see
:mod:`torpor._user_state`). Every rank writes a manifest all the same, so "complete = every rank's
manifest exists" holds whatever the layout. With ``integrated=False`` each rank writes its own
copy of the model and optimizer state.

Sharded state (FSDP2/DTensor, FSDP1) goes through ``torch.distributed.checkpoint``'s planners
on every rank (:mod:`torpor._sharded`): each rank's shards into its ``.distcp``, beside its
``.ckpt``, whatever ``integrated`` says; a ``ZeroRedundancyOptimizer`` is consolidated on rank 0
first. What a layout cannot save correctly is refused before anything is written.

The shard always holds the trained network: ``saved_network`` (an EMA, an unwrapped copy) is
written beside it as the weights-only ``.network.pt``, never into what a resume loads. The
``torch.export`` program is not part of a save: :func:`export_only` writes it once the
checkpoint is complete, unlisted by the manifest (see :mod:`torpor.checkpoints`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import threading
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from torpor import _distributed, _resharding, _sharded, _state, _user_state
from torpor._callbacks import RunArgs
from torpor._config import is_tensor
from torpor._resuming import loader_generators
from torpor.checkpoints import FileEntry, FileKind, Manifest, Reason, file_key, parse_key
from torpor.crypto import Encryption, manifest_tag, place_context
from torpor.env import RuntimeEnv
from torpor.errors import TorporWarning
from torpor.storage import ObjectWriter, Storage, open_writer


@dataclass(frozen=True)
class SaveOptions:
    """What one save writes besides the shard."""

    integrated: bool = True
    """Replicated state: written by rank 0 only."""
    network_params: bool = False
    """Also ``.network.pt`` (weights only)."""
    trainable_params: bool = False
    """Also ``.trainable.pt`` (parameters that require grad)."""
    saved_network: Any = None
    """Write this module's weights as ``.network.pt`` (even without ``network_params``); the
    shard keeps the trained network's, which the optimizer state belongs to."""
    append_info: list[Any] | None = None
    """The seed's ``append_info``."""
    global_batch_size: int | None = None
    """Samples per global step, to record consumed samples."""
    collective: bool = True
    """Every rank saves at this step (periodic, final, exit); ``False``: this rank alone (a
    breakpoint), so nothing that needs the other ranks may run."""


def _append_info(args: RunArgs, entries: list[Any] | None) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    scalars: dict[str, Any] = {}
    tensors: dict[str, torch.Tensor] = {}
    for entry in entries or []:
        if entry == "epoch_num":
            scalars["epoch_num"] = args.cur_epoch_num
        elif entry == "step_num":
            scalars["step_num"] = args.cur_step_num
        elif isinstance(entry, dict):
            for key, value in entry.items():
                if is_tensor(value):
                    tensors[key] = value.detach().cpu().clone()
                else:
                    scalars[key] = value
    return scalars, tensors


def _export(network: Any, inputs: Any) -> bytes:
    """A ``torch.export`` program of ``network`` on ``inputs``, in eval mode (an inference artifact)."""
    args = tuple(inputs) if isinstance(inputs, tuple | list) else (inputs,)
    was_training = network.training
    network.eval()
    try:
        # The batch dimension is left dynamic where the model allows it (Dim.AUTO
        # specialises silently where it does not), so the program serves any batch size.
        dynamic = tuple({0: torch.export.Dim.AUTO} if isinstance(a, torch.Tensor) and a.dim() > 0 else None
                        for a in args)
        with torch.no_grad():
            program = torch.export.export(network, args, dynamic_shapes=dynamic)
        buf = io.BytesIO()
        torch.export.save(program, buf)
        return buf.getvalue()
    finally:
        network.train(was_training)


@dataclass
class PendingSave:
    """Everything one rank's save writes, captured at the step boundary.

    Capturing is the only part that must happen while training waits; :func:`write_pending`
    can then run in the same thread (synchronous save) or in the background (async save).
    """

    name: str
    reason: Reason
    rank: int
    world_size: int
    files: list[tuple[FileKind, Any]]
    """``(kind, payload)``: a dict for ``torch.save`` or ready ``bytes`` (the export), shard first."""
    manifest_fields: dict[str, Any]
    """The manifest's fields other than ``files`` and ``created``."""


def capture(
    args: RunArgs,
    name: str,
    reason: Reason,
    options: SaveOptions,
    env: RuntimeEnv,
    staging: _state.Staging | None = None,
) -> PendingSave:
    """Collect this rank's part of checkpoint ``name``.

    Args:
        staging: copy every tensor into these reused CPU buffers (async saves: the optimizer
            will change the originals in place); ``None`` keeps references (synchronous saves
            write them before training resumes).
    """
    rank, world = _distributed.rank(), _distributed.world_size()
    holds_model = _holds_model(options)
    network = _state.unwrap(args.network)
    layout = _sharded.layout_of(network, args.optimizer, args.state)
    check_layout(layout, options)
    pieces = None
    if layout.sharded is not None:  # every rank, at this step: DCP plans each rank's part
        pieces = _sharded.save_pieces(layout, network, args.optimizer, args.state)
    _sharded.consolidate(layout, args.optimizer, args.state)  # ZeroRedundancyOptimizer: onto rank 0
    scalars, info_tensors = _append_info(args, options.append_info)
    before: _state.BeforeLookahead | None = args.before_lookahead
    rng = before.rng if before is not None else _state.RngState.capture(loader_generators(args.train_dataset))
    # A loader that keeps its own position: this rank's own, in every rank's shard (like its generators).
    positioned = _user_state.key_of(args.state, args.train_dataset)
    shared_state = {k: v for k, v in args.state.items() if k != positioned}
    rng_doc, rng_tensors = rng.to_parts()
    epoch_rng_doc, epoch_rng_tensors = (args.epoch_rng.to_parts() if args.epoch_rng is not None else (None, {}))
    consumed = args.cur_step_num * options.global_batch_size if options.global_batch_size else None
    position = _resharding.position_at(args.train_dataset, args.step_in_epoch, args.epoch_start or _resharding.START)
    meta = {
        "name": name,
        "reason": reason.value,
        "epoch": args.cur_epoch_num,
        "step": args.cur_step_num,
        "step_in_epoch": args.step_in_epoch,
        "batch_num": args.batch_num,
        "rng": rng_doc,
        "epoch_rng": epoch_rng_doc,
        "append_info": scalars,
        "global_batch_size": options.global_batch_size,
        "consumed_samples": consumed,
        "position": position.to_doc(),
    }
    payload: dict[str, Any] = {
        "torpor_format": _state.SHARD_FORMAT,
        "meta": json.dumps(meta),
        "rng": rng_tensors,
        "epoch_rng": epoch_rng_tensors,
        "append_info": info_tensors,
    }
    if pieces is not None:
        payload["dcp"] = {"replicated": pieces.replicated, "blobs": pieces.blobs, "state_keys": list(layout.dcp_state)}
        if pieces.index is not None:
            payload["dcp_index"] = pieces.index
        payload["_dcp_shards"] = pieces.shards
    if positioned is not None:
        loader = args.state[positioned]
        taken = before.positions if before is not None else {positioned: _user_state.position(loader)}
        payload["rank_state"] = _user_state.capture({positioned: loader}, taken)
    if holds_model:
        if pieces is None:
            payload["model"] = _state.local_state(network.state_dict())
            if args.optimizer is not None:
                payload["optimizer"] = _state.local_state(args.optimizer.state_dict())
        if args.lr_scheduler is not None:
            payload["lr_scheduler"] = args.lr_scheduler.state_dict()
        plain_state = {k: v for k, v in shared_state.items() if k not in layout.dcp_state}
        if plain_state:
            payload["state"] = _state.local_state(_user_state.capture(plain_state))
        if options.trainable_params:
            payload["_trainable"] = _state.local_state(
                {k: p.detach() for k, p in network.named_parameters() if p.requires_grad})
        if options.saved_network is not None:
            payload["_saved_network"] = _state.local_state(_state.unwrap(options.saved_network).state_dict())
    if staging is not None:
        payload = staging.snapshot(payload)
    trainable = payload.pop("_trainable", None)
    saved_network = payload.pop("_saved_network", None)
    shards = payload.pop("_dcp_shards", None)

    files: list[tuple[FileKind, Any]] = [(FileKind.SHARD, payload)]
    if shards is not None:
        files.append((FileKind.DCP, {"torpor_format": _state.SHARD_FORMAT, "meta": json.dumps(meta),
                                     "tensors": shards}))
    if holds_model and (saved_network is not None or (options.network_params and "model" in payload)):
        # Without a saved_network the network file holds the trained weights and is their only
        # copy (the shard would duplicate every tensor; the default config writes both): a load
        # reads them from it. A saved_network's weights go there instead, beside the shard's.
        # A sharded model's weights are its ranks' shards: no rank has them whole to write.
        model = payload.pop("model") if saved_network is None else saved_network
        files.append((FileKind.NETWORK, {"torpor_format": _state.SHARD_FORMAT, "meta": json.dumps(meta),
                                         "model": model}))
    if trainable is not None:
        files.append((FileKind.TRAINABLE, {"torpor_format": _state.SHARD_FORMAT, "meta": json.dumps(meta),
                                           "model": trainable}))
    resumed = args.resumed_from
    fields = {
        "name": name,
        "rank": rank,
        "world_size": world,
        "epoch": args.cur_epoch_num,
        "step": args.cur_step_num,
        "step_in_epoch": args.step_in_epoch,
        "reason": reason,
        "save_id": f"{args.run_token}:{args.cur_step_num}",
        "replicated_rank": 0 if options.integrated else None,
        "job": env.job or "",
        "incarnation": env.incarnation,
        "resumed_from": resumed.name if resumed is not None else "",
        "extra": {k: v for k, v in (("append_info", scalars), ("global_batch_size", options.global_batch_size),
                                    ("consumed_samples", consumed)) if v},
    }
    return PendingSave(name, reason, rank, world, files, fields)


def check_layout(layout: _sharded.Layout, options: SaveOptions) -> None:
    """Refuse, before anything is written, what ``layout`` cannot save with ``options``.

    Raises:
        ShardedStateError: see :func:`torpor._sharded.check_options`.
    """
    _sharded.check_options(layout, integrated=options.integrated, trainable_params=options.trainable_params,
                           saved_network=options.saved_network, collective=options.collective)


def _holds_model(options: SaveOptions) -> bool:
    """Whether this rank writes model state (replicated state is written by rank 0 only)."""
    return not options.integrated or _distributed.rank() == 0


def reserve_staging(staging: _state.Staging, args: RunArgs, options: SaveOptions) -> None:
    """Make the staging buffers for the model this rank will snapshot (see ``Staging.reserve``)."""
    network = _state.unwrap(args.network)
    if _sharded.sharded_module(network) is not None:  # its state_dict() is no rank's whole (FSDP1: a collective)
        return
    if _holds_model(options) and callable(getattr(network, "state_dict", None)):
        staging.reserve({"model": _state.local_state(network.state_dict())})


def _storage_ranges(content: Any) -> list[tuple[int, int]]:
    """``(start, end)`` addresses of every CPU tensor storage in ``content``."""
    ranges = []
    stack = [content]
    while stack:
        value = stack.pop()
        if isinstance(value, torch.Tensor):
            if value.device.type == "cpu":
                storage = value.untyped_storage()
                ranges.append((storage.data_ptr(), storage.data_ptr() + storage.nbytes()))
        elif isinstance(value, dict):
            stack.extend(value.values())
        elif isinstance(value, list | tuple):
            stack.extend(value)
    return ranges


class _Sink:
    """What ``torch.save`` writes into: keeps the first exception of ``write``.

    torch's zip writer swallows an exception raised in ``write`` and fails later with
    "unexpected pos"; :func:`write_file` re-raises the kept one instead.
    """

    error: BaseException | None = None

    def write(self, data: Any) -> int:
        try:
            return self._write(data)
        except BaseException as exc:
            self.error = self.error or exc
            raise

    def _write(self, data: Any) -> int:
        raise NotImplementedError

    def flush(self) -> None:
        """``torch.save`` flushes; nothing is buffered here."""


class _TorchSink(_Sink):
    """What ``torch.save`` writes into without encryption.

    ``torch.save`` hands over each tensor's storage as a memoryview of the tensor's own
    memory, which stays alive and unchanged until the save returns (the caller holds the
    payload; async saves write a staged copy). Those views are lent to the writer, which can
    then upload them without copying; anything else (headers, pickle data in torch's own
    transient buffers) is copied before ``write`` returns.
    """

    def __init__(self, writer: ObjectWriter, content: Any) -> None:
        self._writer = writer
        self._ranges = _storage_ranges(content)

    def _lendable(self, view: memoryview) -> bool:
        if len(view) < (1 << 20) or not self._ranges:
            return False
        start = int(np.frombuffer(view, dtype=np.uint8).ctypes.data)
        return any(lo <= start and start + len(view) <= hi for lo, hi in self._ranges)

    def _write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        return self._writer.write(view, borrow=self._lendable(view))


class _EncryptingSink(_Sink):
    """What ``torch.save`` writes into: encrypts chunk by chunk on the way to the store.

    The file is sealed for its place (``place_context``: key and save id), so it only
    decrypts where its manifest says it belongs.
    """

    def __init__(self, writer: ObjectWriter, encryption: Encryption, place: bytes) -> None:
        self._writer = writer
        self._enc = encryption.encryptor(place)

    def _write(self, data: Any) -> int:
        for record in self._enc.update(data):
            # Copied into the warm staging buffer, not lent: lending would keep ~40 fresh 4 MiB
            # records alive until their parts upload, each new one page-faulting in (measured:
            # AES-GCM save 4.0 s -> 6.5 s per GiB), where a freed record's memory is reused.
            self._writer.write(record)
        return len(memoryview(data))

    def flush(self) -> None:
        """``torch.save`` flushes; the records go out as they are sealed."""

    def finish(self) -> None:
        for record in self._enc.finalize():
            self._writer.write(record)


_CRC_LOCK = threading.Lock()
_crc_off_count = 0
_crc_saved = True


@contextlib.contextmanager
def _without_zip_crc32() -> Iterator[None]:
    """``torch.save`` without its per-record CRC32 (torch >= 2.6; elsewhere a no-op).

    The CRC costs ~0.7 s per GiB on a 2-core machine and guards nothing the manifest's
    sha256 (checked before every load) and, with encryption, the AEAD do not already guard;
    ``torch.load`` reads such files as usual. The setting is process-wide, so overlapping
    saves count themselves in and out and the user's own value comes back after the last.
    """
    global _crc_off_count, _crc_saved
    config = getattr(getattr(getattr(torch, "utils", None), "serialization", None), "config", None)
    save_config = getattr(config, "save", None)
    if save_config is None or not hasattr(save_config, "compute_crc32"):
        yield
        return
    with _CRC_LOCK:
        if _crc_off_count == 0:
            _crc_saved = save_config.compute_crc32
            save_config.compute_crc32 = False
        _crc_off_count += 1
    try:
        yield
    finally:
        with _CRC_LOCK:
            _crc_off_count -= 1
            if _crc_off_count == 0:
                save_config.compute_crc32 = _crc_saved


def write_file(storage: Storage, key: str, content: Any, encryption: Encryption | None, *,
               save_id: str = "") -> FileEntry:
    """Serialise ``content`` (a payload dict or bytes) straight into the store.

    ``torch.save`` hands each tensor's storage to the writer as a memoryview: with the
    streaming writers of :mod:`torpor.storage` those bytes go into upload parts (and through
    the cipher) without a serialised copy of the whole shard ever existing. An encrypted
    file is bound to ``key`` and ``save_id`` (the manifest's), see :func:`place_context`.
    """
    writer = open_writer(storage, key)
    try:
        sink: Any = (_EncryptingSink(writer, encryption, place_context(key, save_id)) if encryption is not None
                     else _TorchSink(writer, content))
        if isinstance(content, bytes | bytearray | memoryview):
            sink.write(content)
        else:
            with _without_zip_crc32():
                try:
                    torch.save(content, sink)
                except Exception:
                    # torch's zip writer turns an exception in our write() into "unexpected
                    # pos"; the store's own error is the one that says what went wrong.
                    if sink.error is not None:
                        raise sink.error from None
                    raise
        if encryption is not None:
            sink.finish()
        writer.close()
    except BaseException:
        if not writer.closed:
            writer.abort()
        raise
    return FileEntry(FileKind(_kind_of(key)), key, writer.size, writer.sha256)


def _kind_of(key: str) -> str:
    parts = parse_key(key)
    assert parts is not None, key
    return parts.kind.value


def write_pending(pending: PendingSave, storage: Storage, encryption: Encryption | None = None) -> Manifest:
    """Write every file of ``pending``, then, last, its manifest; returns the manifest.

    The manifest goes out only after every file it lists is durable (each writer's ``close``
    returns once the object exists), so its presence proves this rank's part is complete.
    With encryption every file is sealed for its place and the manifest carries a tag over
    all its fields (format 2), so neither can be swapped or rolled back unnoticed.
    """
    save_id = str(pending.manifest_fields["save_id"])
    files = [write_file(storage, file_key(pending.name, pending.rank, kind), content, encryption, save_id=save_id)
             for kind, content in pending.files]
    fields = dict(pending.manifest_fields)
    if encryption is not None:
        fields["extra"] = {**fields["extra"], "encryption": encryption.mode}  # the mode, never the key
    manifest = Manifest(created=time.time(), files=tuple(files), **fields)
    if encryption is not None:
        manifest = dataclasses.replace(manifest, auth=manifest_tag(encryption.key, manifest.signed_text().encode()))
    storage.put_bytes(file_key(pending.name, pending.rank, FileKind.MANIFEST), manifest.to_json().encode())
    return manifest


def taken_names(storage: Storage) -> set[str]:
    """Every checkpoint name in the store, as rank 0 lists it, on every rank.

    A save picks :func:`torpor.checkpoints.unique_name` against these, so it never rewrites a
    stored checkpoint; one rank lists, so every rank derives the same name.
    """
    listed: tuple[list[str], BaseException | None] = ([], None)
    if _distributed.rank() == 0 or not _distributed.is_initialized():
        try:
            listed = (sorted({p.name for obj in storage.list() if (p := parse_key(obj.key)) is not None}), None)
        except Exception as exc:  # forwarded, so every rank raises it and none waits in the broadcast
            listed = ([], exc)
    names, error = _distributed.broadcast_object(listed)
    if error is not None:
        raise error
    return set(names)


def save_checkpoint(
    args: RunArgs,
    storage: Storage,
    name: str,
    reason: Reason,
    options: SaveOptions,
    env: RuntimeEnv,
    encryption: Encryption | None = None,
) -> Manifest:
    """Write this rank's part of checkpoint ``name`` now and return its manifest.

    Every rank must call it at the same step. The manifest is written last, after every file
    it lists is durable, so its presence proves the rank's part is complete.
    """
    return write_pending(capture(args, name, reason, options, env), storage, encryption)


def export_only(args: RunArgs, storage: Storage, name: str, encryption: Encryption | None = None) -> bool:
    """Rank 0's ``{name}.pt2`` from the last inputs; returns whether it was written.

    Called after checkpoint ``name`` is complete (or with ``save_ckpt=False``, alone): the
    export takes seconds on a large model, so it must never delay a shard, and the manifest
    does not list the ``.pt2``, so a failed or killed export leaves the checkpoint complete.
    Its key shares the checkpoint's name, so retention deletes it with the checkpoint. With
    a cipher it is sealed like every file of the run (it holds the weights).
    """
    if _distributed.rank() != 0:
        return False
    if args.last_inputs is None:
        warnings.warn(f"{name}.pt2 not exported: no step has run, so there are no example inputs",
                      TorporWarning, stacklevel=2)
        return False
    sharded = _sharded.sharded_module(_state.unwrap(args.network))
    if sharded is not None:  # its forward gathers from every rank: on rank 0 alone it would wait forever
        warnings.warn(f"{name}.pt2 not exported: the model is sharded ({sharded}), so running it needs every "
                      "rank; export an unsharded copy loaded with torpor.load_checkpoint instead",
                      TorporWarning, stacklevel=2)
        return False
    try:
        program = _export(_state.unwrap(args.network), args.last_inputs)
        write_file(storage, file_key(name, 0, FileKind.EXPORT), program, encryption)
    except Exception as exc:  # an export failure must not cost the checkpoint
        warnings.warn(f"{name}.pt2 not exported, the checkpoint still counts: {type(exc).__name__}: {exc}",
                      TorporWarning, stacklevel=2)
        return False
    return True
