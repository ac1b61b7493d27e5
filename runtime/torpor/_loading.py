"""Finding and loading a checkpoint: ``'latest'``, a name or a path, local or ``s3://``.

Only complete checkpoints are loaded; every byte is checked against its manifest (size and
sha256) before ``torch.load(weights_only=True)`` sees it. With a key, the manifest's own tag
is checked first and every file must have been sealed for the place the manifest gives it.

**Every rank loads the same checkpoint, and a bad newest one is never the end.** Rank 0
lists the store and broadcasts the candidates in order; every rank then reads, verifies,
decrypts and decodes its payloads of the first candidate *before anything is applied to the
model*, and one all-reduce of an ok flag decides: if any rank failed (an integrity error, an
object gone, a wrong key), every rank moves on to the next candidate, with a warning naming
both. A checkpoint that is sound but cannot continue exactly on this world size
(``ResizeError``) is no such failure: every rank raises it, since an older checkpoint of the
current size would resume quietly and lose the steps since. The candidates are

* ``'latest'``: every resumable checkpoint (complete, not a breakpoint) of the run's
  prefixes, newest first: the MindFormers resume behaviour, without its marker files;
* ``TORPOR_RESUME_FROM`` (the operator's choice): that one, then the resumable ones older
  than it, so a damaged choice costs the steps since the next older one, not a crash loop;
* a name or path a user passed in code: that one only. Whoever names a checkpoint means it,
  and gets its error rather than another checkpoint's state.

A sharded checkpoint (FSDP2/DTensor, FSDP1: its manifests list ``.distcp`` files) is read in
two agreed steps: first every rank's own files and rank 0's ``.ckpt`` (which holds the index),
then, if every rank got that far, ``torch.distributed.checkpoint``'s collective read of each
rank's shards into new tensors (:mod:`torpor._sharded`); only then is anything applied.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import logging
import mmap
import pickle
import re
import warnings
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from torpor import _distributed, _resharding, _sharded, _state, _user_state
from torpor.checkpoints import Checkpoint, FileEntry, FileKind, Manifest, file_key, resumable_newest_first, scan
from torpor.crypto import (
    HEADER_SIZE,
    Encryption,
    encrypted_mode,
    is_encrypted,
    manifest_tag_matches,
    place_context,
)
from torpor.env import RuntimeEnv, read_enc_key
from torpor.errors import (
    CheckpointNotFoundError,
    IncompleteCheckpointError,
    IntegrityError,
    ResizeError,
    TorporError,
    TorporWarning,
)
from torpor.storage import Storage, open_storage, read_verified_fast

_log = logging.getLogger("torpor")
UNLOADABLE = (TorporError, OSError, ValueError, KeyError, RuntimeError, pickle.UnpicklingError)
"""What reading a candidate may raise that makes every rank try the next one: integrity and
decryption errors, a storage error, an object gone (``FileNotFoundError``), a payload torch
cannot decode. Raised before anything is applied, so the model is untouched. Except a
``ResizeError``: the checkpoint is sound but cannot continue on this world size, and an older
one that could would silently lose the steps since; it is raised at once, on every rank."""

_RANK_SEGMENT = re.compile(r"^rank_[0-9]+$")
_FILE_SUFFIXES = (".manifest.json", ".network.pt", ".trainable.pt", ".ckpt", ".pt2", ".distcp")


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
    """Steps of ``epoch`` completed; a resume on the same world size skips that many batches
    (on another one it continues from :attr:`position`)."""
    batch_num: int | None
    """Batches per epoch of the saving run, if known."""
    append_info: dict[str, Any]
    """The seed's ``append_info`` as saved (scalars and tensors)."""
    manifest: Manifest
    """This rank's manifest (or rank 0's when this rank did not exist in the saving run)."""
    rng: _state.RngState | None = field(default=None, repr=False)
    """Generators at the save (this rank's); for a rank the saving run did not have, derived
    from rank 0's (see :mod:`torpor._resharding`)."""
    epoch_rng: _state.RngState | None = field(default=None, repr=False)
    """Generators when the saved epoch's iterator was created, for the exact mid-epoch resume."""
    consumed_samples: int | None = None
    """``step * global_batch_size`` when the saver knew the global batch size."""
    skipped: tuple[str, ...] = ()
    """Newer candidates that could not be loaded on every rank, newest first (fallback)."""
    world_size: int = 1
    """Ranks of the run that saved it (a resume on another number continues resharded)."""
    position: _resharding.EpochPosition | None = None
    """Where the save stood in its epoch's global order (samples consumed over every rank);
    ``None`` for a checkpoint of an older torpor."""


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


def find_checkpoint(storage: Storage, name: str | None, prefixes: Iterable[str] | None = None,
                    fallback: bool = False) -> list[Checkpoint]:
    """The checkpoints a resume tries, in order (see the module docstring); empty: none.

    Args:
        storage: the checkpoint root.
        name: the named checkpoint, or ``None`` for ``'latest'``.
        prefixes: names ``'latest'`` and the fallbacks may have (``None``: any).
        fallback: after ``name``, the resumable checkpoints older than it; a ``name`` that is
            absent or incomplete is then a warning and the resumable ones are tried instead.

    Raises:
        CheckpointNotFoundError: ``name`` is not stored at all (without ``fallback``).
        IncompleteCheckpointError: ``name`` is stored but not complete (without ``fallback``).
    """
    checkpoints = scan(storage, names=None if name is None or fallback else {name})
    if name is None:
        return resumable_newest_first(checkpoints, prefixes)
    found = next((c for c in checkpoints if c.name == name), None)
    problem = (f"checkpoint {name!r} not found in {storage.uri}" if found is None else
               f"checkpoint {name!r} in {storage.uri} is incomplete and will not be loaded: {found.problem}"
               if not found.complete else None)
    if problem is None:
        assert found is not None
        return [found, *(resumable_newest_first(checkpoints, prefixes, older_than=found) if fallback else [])]
    if not fallback:
        raise (CheckpointNotFoundError if found is None else IncompleteCheckpointError)(problem)
    rest = resumable_newest_first(checkpoints, prefixes)
    _warn(f"{problem}; resuming from the newest resumable checkpoint instead: "
          f"{rest[0].name if rest else 'none, a fresh start'}")
    return rest


def _warn(message: str) -> None:
    """A fallback is news for whoever reads the logs and for a test's warning filter alike."""
    _log.warning("%s", message)
    warnings.warn(message, TorporWarning, stacklevel=3)


def _decided(storage: Storage, name: str | None, prefixes: Iterable[str] | None,
             fallback: bool) -> list[Checkpoint]:
    """Rank 0's :func:`find_checkpoint`, on every rank (its error too, so no rank waits alone)."""
    result: tuple[list[Checkpoint], BaseException | None] = ([], None)
    if _distributed.rank() == 0 or not _distributed.is_initialized():
        try:
            result = (find_checkpoint(storage, name, None if prefixes is None else sorted(set(prefixes)), fallback),
                      None)
        except Exception as exc:  # forwarded, so every rank raises it and none waits in the broadcast
            result = ([], exc)
    candidates, error = _distributed.broadcast_object(result)
    if error is not None:
        raise error
    return candidates


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
    prefixes: Iterable[str] | None = None,
    state: Mapping[str, Any] | None = None,
) -> LoadedCheckpoint | None:
    """Restore model, optimizer, scheduler, RNG and ``state`` from a checkpoint.

    Every rank must call it (rank 0 decides, the others follow); see the module docstring for
    the candidates and the fallback.

    Args:
        source: ``'latest'`` (the newest resumable checkpoint, falling back to older ones;
            ``TORPOR_RESUME_FROM`` names it instead when set, so every rank of a job loads
            the one the operator chose, with the same fallback), a checkpoint name, or a
            path/URI to one (``s3://b/p/CKP-1_5``); a name or path given here is loaded or
            raises, it never falls back.
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
        prefixes: ``'latest'`` and fallbacks consider only names of these prefixes (a run's
            monitors' and exit save's, so a shared directory may hold other experiments);
            default ``None``: every name.
        state: more objects to restore by name (``state_dict``/``load_state_dict`` or a
            ``torch.Generator``), as saved by ``Loop``/``Model`` with the same ``state=``. A
            key the checkpoint lacks raises ``KeyError`` (with ``strict=False``: a warning,
            the object is left as it is); keys only the checkpoint has are ignored.

    Returns:
        What was loaded (``skipped`` names the newer candidates that failed), or ``None``
        when ``'latest'`` found no resumable checkpoint (a fresh start).

    Raises:
        CheckpointNotFoundError: a named checkpoint is absent (or none, with ``required``).
        IncompleteCheckpointError: the named checkpoint lacks a rank's manifest or its
            manifests disagree.
        IntegrityError: a file does not match its manifest's size or sha256, a wrong key,
            a modified encrypted chunk, or a plaintext shard where a key was given (for
            ``'latest'``: on every candidate; a rank whose own reads all succeeded says that
            another rank refused them).
        ResizeError: the checkpoint to resume cannot continue exactly on this world size
            (per-rank copies on more ranks, FSDP1 on another size, a per-rank loader position
            on more ranks); never passed over for an older checkpoint.
        ValueError: the shard is encrypted and no key was given.
        KeyError: a ``state`` key is not in the checkpoint (with ``strict``).
        TypeError: ``state`` is not a dict of such objects.
    """
    state = _user_state.validate(state)
    env = RuntimeEnv.from_environ()
    if enc_key is None:
        enc_key = read_enc_key()
    fallback = source == "latest"
    if source == "latest" and env.resume_from:
        source = env.resume_from
    root, name = split_source(source, directory or env.checkpoint_uri)
    storage = open_storage(root)
    candidates = _decided(storage, name, prefixes, fallback)
    if not candidates:
        if required:
            raise CheckpointNotFoundError(f"no complete checkpoint in {storage.uri}")
        return None
    keys = (enc_key, enc_mode or env.enc_mode)
    targets = Targets(network, optimizer, state, strict)
    payloads, skipped = _first_readable(storage, candidates, keys, map_location, targets)
    loaded = _apply(payloads, network, optimizer, lr_scheduler, strict, restore_rng, skipped, state=state)
    _log.info("resumed from checkpoint %r in %s at step %d", loaded.name, loaded.directory, loaded.step)
    return loaded


@dataclass(frozen=True)
class Targets:
    """What a load restores into: a sharded checkpoint is read in the shape of these."""

    network: Any = None
    optimizer: Any = None
    state: Mapping[str, Any] = field(default_factory=dict)
    strict: bool = True


def is_sharded(ckpt: Checkpoint) -> bool:
    """Whether ``ckpt`` holds sharded state (its manifests list ``.distcp`` files); the same on every rank."""
    return any(m.file(FileKind.DCP) is not None for m in ckpt.manifests.values())


def _first_readable(storage: Storage, candidates: list[Checkpoint], keys: tuple[bytes | None, str | None],
                    map_location: Any, targets: Targets | None = None) -> tuple[Payloads, tuple[str, ...]]:
    """The payloads of the first candidate every rank could read, and the names skipped.

    One agreement (:func:`_all_read`) per candidate tried: every rank reaches it whether its
    read worked or not, so all of them move on, or stop, together. A sharded candidate has one
    more before DCP's collective read (see the module docstring), so no rank enters it alone.

    Raises:
        ResizeError: a candidate cannot continue on this world size (every rank, no fallback).
        the newest failure of this rank (or an ``IntegrityError`` saying another rank refused
        them) when no candidate could be read on every rank.
    """
    skipped: list[str] = []
    failures: list[BaseException] = []
    for index, ckpt in enumerate(candidates):
        payloads: Payloads | None = None
        error: BaseException | None = None
        try:
            payloads = read_payloads(storage, ckpt, keys, map_location)
        except UNLOADABLE as exc:
            error = exc
            failures.append(exc)
        if is_sharded(ckpt) and targets is not None and targets.network is not None \
                and _all_read(error, ckpt, storage):
            try:
                assert payloads is not None
                payloads = read_sharded(storage, payloads, keys, map_location, targets)
            except UNLOADABLE as exc:
                error = exc
                failures.append(exc)
        if _all_read(error, ckpt, storage):
            assert payloads is not None
            if skipped:  # the warning went out with each failure; the log says how it ended
                _log.warning("resumed from the older complete checkpoint %r instead of %s in %s", ckpt.name,
                             ", ".join(map(repr, skipped)), storage.uri)
            return payloads, tuple(skipped)
        del payloads  # another rank failed: let this rank's copy go before reading the next one
        skipped.append(ckpt.name)
        why = (f"rank {_distributed.rank()}: {type(error).__name__}: {error}" if error is not None
               else "another rank could not read its part")
        if index + 1 < len(candidates):  # after the last one, the error raised below says it
            _warn(f"checkpoint {ckpt.name!r} in {storage.uri} could not be loaded ({why}); "
                  f"trying the next older complete checkpoint {candidates[index + 1].name!r}")
    tried = ", ".join(map(repr, skipped))
    if failures:
        failures[0].add_note(f"torpor: no checkpoint could be loaded on every rank; tried {tried}")
        raise failures[0]
    raise IntegrityError(f"no checkpoint in {storage.uri} could be loaded on every rank: another rank refused "
                         f"each of {tried}")


def _all_read(error: BaseException | None, ckpt: Checkpoint, storage: Storage) -> bool:
    """Whether every rank read its part of ``ckpt``: one collective, which also carries a refusal.

    Raises:
        ResizeError: on every rank when any rank's read raised one (that rank's own; the
            others one naming it), so no rank falls back to an older checkpoint alone.
    """
    resize = isinstance(error, ResizeError)
    failed, refused = _distributed.max_each([error is not None, resize])
    if refused:
        if resize:
            assert error is not None
            raise error
        raise ResizeError(f"checkpoint {ckpt.name!r} in {storage.uri}: another rank refused to resume it on "
                          f"world_size {_distributed.world_size()} (its log says why); not falling back to an "
                          "older checkpoint, which would lose the steps since")
    return failed == 0


def read_shard(storage: Storage, entry: FileEntry, enc_key: bytes | None, enc_mode: str | None,
               save_id: str = "") -> Any:
    """The verified, decrypted bytes of one file, held in memory (stores without ``get_verified``).

    Raises:
        IntegrityError: size/sha256 mismatch, wrong key, modified chunk, a file sealed for
            another place, or a plaintext file where a key was given (an attacker swapping in
            a plaintext shard must not work).
        ValueError: the file is encrypted and no key was given.
    """
    data = read_verified_fast(storage, entry.key, size=entry.size, sha256=entry.sha256)
    if is_encrypted(data):
        with _naming(storage, entry.key):
            return b"".join(_decrypting(storage, entry, iter([data]), enc_key, enc_mode, save_id))
    if enc_key is not None:
        raise _plaintext_error(storage, entry)
    return data


def load_shard(storage: Storage, entry: FileEntry, enc_key: bytes | None, enc_mode: str | None,
               map_location: Any = "cpu", *, manifest: Manifest | None = None) -> dict[str, Any]:
    """Verify, decrypt and deserialise one file, holding it about once in memory.

    The file is read (parallel ranged GETs on S3, one pass locally) into a private anonymous
    mapping while its sha256 is checked; an encrypted one is then decrypted in place there
    (each plaintext chunk lands before its own record); ``torch.load`` copies each tensor out
    and the scratch pages are given back right behind the copy (:class:`_state.ConsumingReader`).
    So the peak is the shard once plus a few MiB, and the tensors are ordinary memory.
    Measured in ``bench/bench_memory.py`` (figures in ``bench/README.md``).

    Args:
        manifest: the manifest that lists ``entry``. With ``enc_key`` its tag is checked first
            (nothing in it is trusted otherwise), and its save id is part of the place the
            file must have been sealed for.

    Raises:
        IntegrityError: see :func:`read_shard`; an unauthenticated or modified manifest when a
            key was given. The message names the file.
        ValueError: the file is encrypted and no key was given; not a torpor shard.
    """
    save_id = ""
    if manifest is not None:
        _check_manifest(storage, manifest, enc_key)
        save_id = manifest.save_id
    fetch = getattr(storage, "get_verified", None)
    if not callable(fetch) or entry.size == 0 or not _state.can_consume():
        return _state.decode(read_shard(storage, entry, enc_key, enc_mode, save_id), map_location)
    scratch = mmap.mmap(-1, entry.size, flags=mmap.MAP_PRIVATE)
    try:
        fetch(entry.key, size=entry.size, sha256=entry.sha256, into=scratch)
        length = entry.size
        if is_encrypted(scratch[:16]):
            length = _decrypt_in_place(storage, entry, scratch, enc_key, enc_mode, save_id)
            tail = -(-length // mmap.PAGESIZE) * mmap.PAGESIZE
            if tail < entry.size:  # the ciphertext's leftover tail is not needed any more
                scratch.madvise(mmap.MADV_DONTNEED, tail)
        elif enc_key is not None:
            raise _plaintext_error(storage, entry)
        return _state.decode_consuming(scratch, length, map_location)
    finally:
        _discard(scratch)


def _discard(scratch: mmap.mmap) -> None:
    """Free the scratch mapping now, even while an error's traceback still holds a view of it."""
    try:
        scratch.close()
    except BufferError:  # the mapping itself goes with the last view; its pages go now
        scratch.madvise(mmap.MADV_DONTNEED)


def _check_manifest(storage: Storage, manifest: Manifest, enc_key: bytes | None) -> None:
    """With a key, the manifest must carry a tag that matches it: sizes and hashes come from it."""
    if enc_key is None:
        return
    where = f"{storage.uri}/{file_key(manifest.name, manifest.rank, FileKind.MANIFEST)}"
    if not manifest.auth:
        raise IntegrityError(f"{where}: the manifest is not authenticated (format 1, or its tag was removed) but an "
                             "enc_key was given; refusing to trust the sizes and hashes in it")
    if not manifest_tag_matches(enc_key, manifest.signed_text().encode(), manifest.auth):
        raise IntegrityError(f"{where}: manifest authentication failed: a wrong encryption key, or the manifest was "
                             "modified (a size, hash, step or save id changed); nothing was loaded")


def _decrypt_in_place(storage: Storage, entry: FileEntry, scratch: mmap.mmap, enc_key: bytes | None,
                      enc_mode: str | None, save_id: str) -> int:
    encryption = _encryption(storage, entry, scratch[:HEADER_SIZE], enc_key, enc_mode)
    with _naming(storage, entry.key):
        return encryption.decrypt_into(scratch, place_context(entry.key, save_id))


def _plaintext_error(storage: Storage, entry: FileEntry) -> IntegrityError:
    return IntegrityError(f"{storage.uri}/{entry.key} is not encrypted but an enc_key was given; refusing to "
                          "load a plaintext shard in its place")


@contextlib.contextmanager
def _naming(storage: Storage, key: str) -> Iterator[None]:
    """Cipher errors name the file they are about."""
    try:
        yield
    except IntegrityError as exc:
        raise IntegrityError(f"{storage.uri}/{key}: {exc}") from None


def _encryption(storage: Storage, entry: FileEntry, head: bytes, enc_key: bytes | None,
                enc_mode: str | None) -> Encryption:
    mode = encrypted_mode(head)
    if enc_key is None:
        raise ValueError(f"{storage.uri}/{entry.key} is encrypted ({mode or 'unknown mode'}) and no enc_key was "
                         "given; pass enc_key= or set TORPOR_ENC_KEY_FILE")
    if mode is None:
        raise IntegrityError(f"{storage.uri}/{entry.key}: unknown encryption mode in its header; refusing to load it")
    return Encryption(enc_key, enc_mode or mode)


def _decrypting(storage: Storage, entry: FileEntry, pieces: Any, enc_key: bytes | None,
                enc_mode: str | None, save_id: str = "") -> Any:
    head = next(pieces, b"")
    encryption = _encryption(storage, entry, head, enc_key, enc_mode)
    return encryption.decrypt_chunks(itertools.chain([head], pieces), place_context(entry.key, save_id))


@dataclass(frozen=True)
class Payloads:
    """One rank's verified, decoded part of a checkpoint, not yet applied to anything."""

    storage_uri: str
    checkpoint: Checkpoint
    model: dict[str, Any]
    """The shard holding model/optimizer state (rank 0's when replicated, else this rank's)."""
    own: dict[str, Any] | None
    """This rank's shard (its generators and loop position); ``None`` if it had none."""
    manifest: Manifest
    """This rank's manifest, or rank 0's when this rank did not exist in the saving run."""
    weights: dict[str, Any]
    """The saved model weights (from the shard, or the ``.network.pt`` that is their only copy)."""
    meta: dict[str, Any]
    """The shard's JSON metadata (this rank's, else the model shard's)."""
    rng: _state.RngState | None
    """This rank's generators at the save (not yet restored)."""
    epoch_rng: _state.RngState | None
    """Generators when the saved epoch's iterator was created."""
    read: Mapping[int, dict[str, Any]] = field(default_factory=dict)
    """Every ``.ckpt`` payload read so far, by rank (a sharded read reuses them)."""
    sharded_state: dict[str, Any] | None = None
    """A sharded checkpoint's model, optimizer and sharded ``state=``, read in this rank's
    layout (:func:`read_sharded`), not yet applied."""


def read_payloads(storage: Storage, ckpt: Checkpoint, keys: tuple[bytes | None, str | None],
                  map_location: Any) -> Payloads:
    """Read, verify, decrypt and decode this rank's payloads of ``ckpt`` (nothing is applied).

    A rank the saving run did not have (a resume on more ranks) reads rank 0's shard for
    what is replicated and derives its generators from rank 0's (:mod:`torpor._resharding`);
    a rank that no longer exists is not read, except for the pieces of its sharded state
    that DCP's planners place on the ranks of this run (:func:`read_sharded`).

    Raises:
        ResizeError: per-rank copies of unsharded state (``integrated_save=False``) and this
            run has more ranks than the saving one (the same on every rank).
        IntegrityError, ValueError, OSError: see :func:`load_shard`.
    """
    rank = _distributed.rank()
    world = ckpt.world_size or 1
    own = ckpt.manifests.get(rank)
    anchor = ckpt.manifests[0]
    replicated = anchor.replicated_rank
    sharded = is_sharded(ckpt)
    if replicated is None and not sharded and _distributed.world_size() > world:
        raise ResizeError(
            f"checkpoint {ckpt.name!r} holds each rank's own copy of the model and optimizer "
            f"(integrated_save=False) for world_size {world}; ranks {world}..{_distributed.world_size() - 1} of this "
            f"run have none. Resume on at most {world} rank(s), or save with integrated_save=True (replicated "
            "state, written once) or a sharded model (resharded at load)")
    model_manifest = ckpt.manifests[replicated] if replicated is not None else (own or anchor)

    def fetch(m: Manifest) -> dict[str, Any]:
        return load_shard(storage, m.shard, *keys, map_location, manifest=m)

    model_payload = fetch(model_manifest)
    own_payload = model_payload if own is model_manifest else (fetch(own) if own is not None else None)
    read = {model_manifest.rank: model_payload, **({own.rank: own_payload} if own is not None else {})}
    meta = _state.meta_of(own_payload if own_payload is not None else model_payload)
    rng = epoch_rng = None
    if own_payload is not None:
        rng = _state.RngState.from_parts(meta["rng"], own_payload["rng"])
        if meta.get("epoch_rng") is not None:
            epoch_rng = _state.RngState.from_parts(meta["epoch_rng"], own_payload["epoch_rng"])
    else:  # a rank the saving run did not have: its generators come from rank 0's
        if 0 not in read:
            read[0] = fetch(anchor)
        rank0_meta = _state.meta_of(read[0])
        rng = _resharding.derived_rng(_state.RngState.from_parts(rank0_meta["rng"], read[0]["rng"]), rank)
    if sharded:  # the weights are every rank's shards, read by read_sharded
        if 0 not in read:  # rank 0's .ckpt holds the index: read it now, with this rank's own reads
            read[0] = fetch(anchor)
        weights: dict[str, Any] = {}
    else:
        weights = _model_state(model_payload, model_manifest,
                               lambda e: load_shard(storage, e, *keys, map_location, manifest=model_manifest))
    return Payloads(storage.uri, ckpt, model_payload, own_payload, own or anchor, weights, meta, rng, epoch_rng,
                    read=read)


def read_sharded(storage: Storage, payloads: Payloads, keys: tuple[bytes | None, str | None], map_location: Any,
                 targets: Targets) -> Payloads:
    """Read a sharded checkpoint's model and optimizer state in this rank's layout (collective).

    Every rank calls it for the same checkpoint, after every rank's :func:`read_payloads`
    worked. Each file is verified against its manifest, decrypted and decoded with
    ``weights_only=True``; a rank reads only the files that hold pieces of its own shards.

    Raises:
        ResizeError: FSDP1 state on another world size (:func:`torpor._sharded.check_resizable`).
        IntegrityError, ValueError, OSError, RuntimeError: on every rank alike (a failed rank's
            own error; the others an ``IntegrityError`` naming it), nothing applied.
    """
    ckpt = payloads.checkpoint
    _sharded.check_resizable(_state.unwrap(targets.network), ckpt.name, ckpt.world_size or 1,
                             _distributed.world_size())
    cache = dict(payloads.read)
    index = cache[0].get("dcp_index")
    if not isinstance(index, str):
        raise IntegrityError(f"checkpoint {ckpt.name!r} in {storage.uri}: rank 0's shard holds no index of the "
                             "sharded state; refusing to load part of it")

    def fetch(rank: int, file: str) -> Mapping[str, Any]:
        manifest = ckpt.manifests[rank]
        if file == _sharded.IN_SHARD:
            if rank not in cache:
                cache[rank] = load_shard(storage, manifest.shard, *keys, map_location, manifest=manifest)
            section = cache[rank].get("dcp") or {}
            return {**section.get("replicated", {}), **section.get("blobs", {})}
        entry = manifest.file(FileKind.DCP)
        if entry is None:
            raise IntegrityError(f"checkpoint {ckpt.name!r}: rank {rank}'s manifest lists no .distcp file, but the "
                                 "index places shards in it")
        return load_shard(storage, entry, *keys, map_location, manifest=manifest)["tensors"]  # type: ignore[no-any-return]

    state_keys = tuple(str(k) for k in (cache[0].get("dcp") or {}).get("state_keys", []))
    loaded = _sharded.read_state(index, ckpt.world_size or 1, fetch, _state.unwrap(targets.network),
                                 targets.optimizer, targets.state, targets.strict, state_keys)
    return dataclasses.replace(payloads, sharded_state=loaded)


def _apply(payloads: Payloads, network: Any, optimizer: Any, lr_scheduler: Any, strict: bool,
           restore_rng: bool, skipped: tuple[str, ...] = (), *,
           state: Mapping[str, Any] | None = None) -> LoadedCheckpoint:
    """Load read payloads into the objects and describe what was restored."""
    model_payload, own_payload, ckpt = payloads.model, payloads.own, payloads.checkpoint
    plain_state = dict(state or {})
    # Before anything is applied, and alike on every rank (the keys are rank 0's, the sizes the job's).
    positioned = sorted(set((payloads.read.get(0) or model_payload).get("rank_state") or {}) & set(plain_state))
    _resharding.check_positions(positioned, ckpt.name, ckpt.world_size or 1, _distributed.world_size())
    if payloads.sharded_state is not None:
        module = _state.unwrap(network)
        _sharded.apply_state(payloads.sharded_state, module, optimizer, plain_state, strict)
        for key in payloads.sharded_state.get("state") or {}:
            plain_state.pop(key)
    elif network is not None:
        _state.unwrap(network).load_state_dict(payloads.weights, strict=strict)
    if optimizer is not None and "optimizer" in model_payload:
        optimizer.load_state_dict(model_payload["optimizer"])
    if lr_scheduler is not None and "lr_scheduler" in model_payload:
        lr_scheduler.load_state_dict(model_payload["lr_scheduler"])
    if plain_state:
        # A loader that kept its own position saved it in each rank's own shard (``rank_state``).
        own_state = own_payload.get("rank_state") if own_payload is not None else None
        _user_state.restore(plain_state, {**(model_payload.get("state") or {}), **(own_state or {})}, ckpt.name,
                            strict)

    meta_source = own_payload if own_payload is not None else model_payload
    meta, rng, epoch_rng = payloads.meta, payloads.rng, payloads.epoch_rng
    if rng is not None and restore_rng:
        rng.restore()
    info = dict(meta.get("append_info") or {})
    info.update(meta_source.get("append_info") or {})
    return LoadedCheckpoint(
        name=ckpt.name,
        directory=payloads.storage_uri,
        epoch=int(meta["epoch"]),
        step=int(meta["step"]),
        step_in_epoch=int(meta["step_in_epoch"]),
        batch_num=meta.get("batch_num"),
        append_info=info,
        manifest=payloads.manifest,
        rng=rng,
        epoch_rng=epoch_rng,
        consumed_samples=meta.get("consumed_samples"),
        skipped=skipped,
        world_size=ckpt.world_size or 1,
        position=_resharding.EpochPosition.from_doc(meta.get("position")),
    )


def _load(storage: Storage, ckpt: Checkpoint, network: Any, optimizer: Any, lr_scheduler: Any,
          strict: bool, restore_rng: bool, map_location: Any,
          keys: tuple[bytes | None, str | None] = (None, None), *,
          state: Mapping[str, Any] | None = None) -> LoadedCheckpoint:
    """Read then apply one checkpoint (no fallback): :func:`read_payloads`, then :func:`_apply`."""
    payloads = read_payloads(storage, ckpt, keys, map_location)
    if is_sharded(ckpt) and network is not None:
        payloads = read_sharded(storage, payloads, keys, map_location, Targets(network, optimizer, state or {}, strict))
    return _apply(payloads, network, optimizer, lr_scheduler, strict, restore_rng, state=state)


def _model_state(payload: dict[str, Any], manifest: Manifest, fetch: Any) -> dict[str, Any]:
    """The saved weights: in the shard, or in the ``.network.pt`` that is their only copy."""
    if "model" in payload:
        return payload["model"]
    network_file = manifest.file(FileKind.NETWORK)
    if network_file is None:
        raise IncompleteCheckpointError(f"checkpoint {manifest.name!r} rank {manifest.rank} holds no model weights: "
                                        "neither its shard nor a network file has them")
    return fetch(network_file)["model"]
