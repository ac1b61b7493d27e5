"""Finding and loading a checkpoint: ``'latest'``, a name or a path, local or ``s3://``.

Only complete checkpoints are loaded; every byte is checked against its manifest (size and
sha256) before ``torch.load(weights_only=True)`` sees it.
"""

from __future__ import annotations

import contextlib
import itertools
import mmap
import os
import re
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from torpor import _distributed, _state, _user_state
from torpor.checkpoints import Checkpoint, FileEntry, FileKind, Manifest, newest_complete, scan
from torpor.crypto import Encryption, encrypted_mode, is_encrypted
from torpor.env import RuntimeEnv, read_enc_key
from torpor.errors import CheckpointNotFoundError, IncompleteCheckpointError, IntegrityError
from torpor.storage import Storage, open_storage, read_verified_fast

_RANK_SEGMENT = re.compile(r"^rank_[0-9]+$")
_FILE_SUFFIXES = (".manifest.json", ".network.pt", ".trainable.pt", ".ckpt", ".pt2")


@dataclass(frozen=True)
class LoadedCheckpoint:
    """What a load restored, and where training continues."""

    name: str
    """Checkpoint name."""
    directory: str
    """Checkpoint root it came from."""
    epoch: int
    """Epoch in progress when saved."""
    step: int
    """Global steps completed when saved."""
    step_in_epoch: int
    """Steps of ``epoch`` completed; a resume skips that many batches."""
    batch_num: int | None
    """Batches per epoch of the saving run, if known."""
    append_info: dict[str, Any]
    """The seed's ``append_info`` as saved (scalars and tensors)."""
    manifest: Manifest
    """This rank's manifest (or rank 0's when this rank did not exist in the saving run)."""
    rng: _state.RngState | None = field(default=None, repr=False)
    """Generators at the save (this rank's); ``None`` if this rank had no shard."""
    epoch_rng: _state.RngState | None = field(default=None, repr=False)
    """Generators when the saved epoch's iterator was created, for the exact mid-epoch resume."""
    consumed_samples: int | None = None
    """``step * global_batch_size`` when the saver knew the global batch size."""


def split_source(source: str, default_directory: str) -> tuple[str, str | None]:
    """``(root, name)`` of a resume source; ``name`` is ``None`` for ``'latest'``.

    ``'latest'`` and bare names live in ``default_directory``; a path or URI names the
    checkpoint itself (``root/CKP-1_5``, ``root/rank_0/CKP-1_5.ckpt``).
    """
    if source == "latest":
        return default_directory, None
    if "/" not in source:
        return default_directory, source
    head, _, tail = source.rstrip("/").rpartition("/")
    for suffix in _FILE_SUFFIXES:
        if tail.endswith(suffix):
            tail = tail[: -len(suffix)]
            break
    parent_head, _, parent = head.rpartition("/")
    if _RANK_SEGMENT.match(parent):
        head = parent_head
    return head or "/", tail


def find_checkpoint(storage: Storage, name: str | None) -> Checkpoint | None:
    """The complete checkpoint ``name`` (or the newest complete one for ``None``).

    Raises:
        CheckpointNotFoundError: ``name`` is not stored at all.
        IncompleteCheckpointError: ``name`` is stored but not complete (the message says why).
    """
    checkpoints = scan(storage, names=None if name is None else {name})
    if name is None:
        return newest_complete(checkpoints)
    found = next((c for c in checkpoints if c.name == name), None)
    if found is None:
        raise CheckpointNotFoundError(f"checkpoint {name!r} not found in {storage.uri}")
    if not found.complete:
        raise IncompleteCheckpointError(
            f"checkpoint {name!r} in {storage.uri} is incomplete and will not be loaded: {found.problem}"
        )
    return found


def load_checkpoint(
    source: str = "latest",
    network: Any = None,
    optimizer: Any = None,
    lr_scheduler: Any = None,
    *,
    directory: str | None = None,
    strict: bool = True,
    restore_rng: bool = True,
    required: bool = False,
    map_location: Any = "cpu",
    enc_key: bytes | None = None,
    enc_mode: str | None = None,
    state: Mapping[str, Any] | None = None,
) -> LoadedCheckpoint | None:
    """Restore model, optimizer, scheduler, RNG and ``state`` from a checkpoint.

    Args:
        source: ``'latest'`` (the newest complete checkpoint; ``TORPOR_RESUME_FROM`` names
            it instead when set, so every rank of a job loads the one the operator chose),
            a checkpoint name, or a path/URI to one (``s3://b/p/CKP-1_5``).
        network: module to load the weights into (DDP wrappers are looked through).
        optimizer: optimizer to restore, if any.
        lr_scheduler: LR scheduler to restore, if any.
        directory: root for ``'latest'`` and bare names; default ``TORPOR_CHECKPOINT_URI``
            or ``./checkpoints``.
        strict: passed to ``load_state_dict``.
        restore_rng: also restore python, numpy and torch generators of this rank.
        required: raise instead of returning ``None`` when ``'latest'`` finds nothing.
        map_location: where tensors are loaded.
        enc_key: key of encrypted checkpoints; default: ``TORPOR_ENC_KEY_FILE`` /
            ``TORPOR_ENC_KEY`` when set. With a key, plaintext shards are refused.
        enc_mode: expected mode; default: the one named in the shard's header.
        state: more objects to restore by name (``state_dict``/``load_state_dict`` or a
            ``torch.Generator``), as saved by ``Loop``/``Model`` with the same ``state=``. A
            key the checkpoint lacks raises ``KeyError`` (with ``strict=False``: a warning,
            the object is left as it is); keys only the checkpoint has are ignored.

    Returns:
        What was loaded, or ``None`` when ``'latest'`` found no complete checkpoint (a fresh
        start).

    Raises:
        CheckpointNotFoundError: a named checkpoint is absent (or none, with ``required``).
        IncompleteCheckpointError: the named checkpoint lacks a rank's manifest or its
            manifests disagree.
        IntegrityError: a file does not match its manifest's size or sha256, a wrong key,
            a modified encrypted chunk, or a plaintext shard where a key was given.
        ValueError: the shard is encrypted and no key was given.
        KeyError: a ``state`` key is not in the checkpoint (with ``strict``).
        TypeError: ``state`` is not a dict of such objects.
    """
    state = _user_state.validate(state)
    env = RuntimeEnv.from_environ()
    if enc_key is None:
        enc_key = read_enc_key()
    if source == "latest" and env.resume_from:
        source = env.resume_from
    root, name = split_source(source, directory or env.checkpoint_uri)
    storage = open_storage(root)
    found = find_checkpoint(storage, name)
    if found is None:
        if required:
            raise CheckpointNotFoundError(f"no complete checkpoint in {storage.uri}")
        return None
    keys = (enc_key, enc_mode or env.enc_mode)
    return _load(storage, found, network, optimizer, lr_scheduler, strict, restore_rng, map_location, keys,
                 state=state)


def read_shard(storage: Storage, entry: FileEntry, enc_key: bytes | None, enc_mode: str | None) -> Any:
    """The verified, decrypted bytes of one file (parallel ranged reads on S3).

    Raises:
        IntegrityError: size/sha256 mismatch, wrong key, modified chunk, or a plaintext file
            where a key was given (an attacker swapping in a plaintext shard must not work).
        ValueError: the file is encrypted and no key was given.
    """
    data = read_verified_fast(storage, entry.key, size=entry.size, sha256=entry.sha256)
    if is_encrypted(data):
        return b"".join(_decrypting(storage, entry, iter([data]), enc_key, enc_mode))
    if enc_key is not None:
        raise IntegrityError(f"{storage.uri}/{entry.key} is not encrypted but an enc_key was given; refusing to "
                             "load a plaintext shard in its place")
    return data


def _scratch_dir(size: int) -> str | None:
    """A RAM-backed directory with room for ``size`` bytes (twice, for safety), else ``None``.

    ``/dev/shm`` is often tiny in containers (64 MiB by default), so its free space is
    checked rather than assumed.
    """
    path = "/dev/shm"
    try:
        st = os.statvfs(path)
    except OSError:
        return None
    free = st.f_bavail * st.f_frsize
    return path if os.access(path, os.W_OK) and free > 2 * size + (64 << 20) else None


def load_shard(storage: Storage, entry: FileEntry, enc_key: bytes | None, enc_mode: str | None,
               map_location: Any = "cpu") -> dict[str, Any]:
    """Verify, decrypt and deserialise one file, with as few copies as the store allows.

    Large S3 shards are downloaded (parallel, verified) into a memory-mapped file in
    ``/dev/shm`` that ``torch.load(mmap=True)`` then uses in place: the tensors' bytes are
    the downloaded pages, where a ``BytesIO`` would copy them twice. The file is unlinked
    as soon as it is mapped. Elsewhere (small files, local stores, no room in ``/dev/shm``)
    the bytes are read into memory.

    Raises:
        IntegrityError: see :func:`read_shard`.
        ValueError: the file is encrypted and no key was given; not a torpor shard.
    """
    scratch = _scratch_dir(entry.size) if hasattr(storage, "get_verified") and entry.size > (64 << 20) else None
    if scratch is None:
        return _state.decode(read_shard(storage, entry, enc_key, enc_mode), map_location)
    fd, path = tempfile.mkstemp(prefix=".torpor-load-", dir=scratch)
    try:
        os.ftruncate(fd, entry.size)
        with mmap.mmap(fd, entry.size) as mapped:
            storage.get_verified(entry.key, size=entry.size, sha256=entry.sha256, into=mapped)  # type: ignore[attr-defined]
            encrypted = crypto_header(mapped)
        if encrypted:  # decrypt into a second file, chunk by chunk, then map that one
            plain_fd, plain_path = tempfile.mkstemp(prefix=".torpor-plain-", dir=scratch)
            try:
                with open(path, "rb") as source, os.fdopen(plain_fd, "wb") as sink:
                    chunks = iter(lambda: source.read(8 << 20), b"")
                    for chunk in _decrypting(storage, entry, chunks, enc_key, enc_mode):
                        sink.write(chunk)
                os.unlink(path)
                path = plain_path
            except BaseException:
                os.unlink(plain_path)
                raise
        elif enc_key is not None:
            raise IntegrityError(f"{storage.uri}/{entry.key} is not encrypted but an enc_key was given; refusing "
                                 "to load a plaintext shard in its place")
        return _state.decode_file(path, map_location)
    finally:
        os.close(fd)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


def crypto_header(mapped: mmap.mmap) -> bool:
    """Whether a mapped file starts with the encryption header."""
    return is_encrypted(mapped[:16])


def _decrypting(storage: Storage, entry: FileEntry, pieces: Any, enc_key: bytes | None,
                enc_mode: str | None) -> Any:
    head = next(pieces, b"")
    mode = encrypted_mode(head)
    if enc_key is None:
        raise ValueError(f"{storage.uri}/{entry.key} is encrypted ({mode or 'unknown mode'}) and no enc_key was "
                         "given; pass enc_key= or set TORPOR_ENC_KEY_FILE")
    if mode is None:
        raise IntegrityError(f"{storage.uri}/{entry.key}: unknown encryption mode in its header; refusing to load it")
    return Encryption(enc_key, enc_mode or mode).decrypt_chunks(itertools.chain([head], pieces))


def _load(storage: Storage, ckpt: Checkpoint, network: Any, optimizer: Any, lr_scheduler: Any,
          strict: bool, restore_rng: bool, map_location: Any,
          keys: tuple[bytes | None, str | None] = (None, None), *,
          state: Mapping[str, Any] | None = None) -> LoadedCheckpoint:
    rank = _distributed.rank()
    world = ckpt.world_size or 1
    own = ckpt.manifests.get(rank)
    anchor = ckpt.manifests[0]
    replicated = anchor.replicated_rank
    if replicated is None and own is None:
        raise IncompleteCheckpointError(
            f"checkpoint {ckpt.name!r} holds per-rank (sharded) state for world_size {world}; "
            f"rank {rank} has no shard in it"
        )
    model_manifest = ckpt.manifests[replicated] if replicated is not None else own
    assert model_manifest is not None

    def fetch(m: Manifest) -> dict[str, Any]:
        return load_shard(storage, m.shard, *keys, map_location)

    model_payload = fetch(model_manifest)
    own_payload = model_payload if own is model_manifest else (fetch(own) if own is not None else None)

    if network is not None:
        weights = _model_state(model_payload, model_manifest, lambda e: load_shard(storage, e, *keys, map_location))
        _state.unwrap(network).load_state_dict(weights, strict=strict)
    if optimizer is not None and "optimizer" in model_payload:
        optimizer.load_state_dict(model_payload["optimizer"])
    if lr_scheduler is not None and "lr_scheduler" in model_payload:
        lr_scheduler.load_state_dict(model_payload["lr_scheduler"])
    if state:
        _user_state.restore(state, model_payload.get("state"), ckpt.name, strict)

    meta_source = own_payload if own_payload is not None else model_payload
    meta = _state.meta_of(meta_source)
    rng = epoch_rng = None
    if own_payload is not None:
        rng = _state.RngState.from_parts(meta["rng"], own_payload["rng"])
        if meta.get("epoch_rng") is not None:
            epoch_rng = _state.RngState.from_parts(meta["epoch_rng"], own_payload["epoch_rng"])
        if restore_rng:
            rng.restore()
    info = dict(meta.get("append_info") or {})
    info.update(meta_source.get("append_info") or {})
    return LoadedCheckpoint(
        name=ckpt.name,
        directory=storage.uri,
        epoch=int(meta["epoch"]),
        step=int(meta["step"]),
        step_in_epoch=int(meta["step_in_epoch"]),
        batch_num=meta.get("batch_num"),
        append_info=info,
        manifest=own or anchor,
        rng=rng,
        epoch_rng=epoch_rng,
        consumed_samples=meta.get("consumed_samples"),
    )


def _model_state(payload: dict[str, Any], manifest: Manifest, fetch: Any) -> dict[str, Any]:
    """The saved weights: in the shard, or in the ``.network.pt`` that is their only copy."""
    if "model" in payload:
        return payload["model"]
    network_file = manifest.file(FileKind.NETWORK)
    if network_file is None:
        raise IncompleteCheckpointError(f"checkpoint {manifest.name!r} rank {manifest.rank} holds no model weights: "
                                        "neither its shard nor a network file has them")
    return fetch(network_file)["model"]
