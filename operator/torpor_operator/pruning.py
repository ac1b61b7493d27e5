"""Which of a job's checkpoints the operator deletes: the runtime's retention policy, applied
to the bucket from the operator so that it survives restarts of both.

Pure: the shell scans the bucket with :func:`torpor.checkpoints.scan`, asks :func:`to_prune`,
and deletes with :func:`torpor.checkpoints.delete_checkpoints` (manifests first, batched).
The policy itself lives in :mod:`torpor.retention`, shared with the runtime byte for byte;
this module only maps the CRD onto it and adds what only the operator knows: the checkpoint
the current incarnation resumed from, which is never deleted.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from torpor.checkpoints import Checkpoint, FileKind, file_key, parse_key
from torpor.retention import RetentionPolicy, candidates, to_delete
from torpor.storage import Upload
from torpor_operator.spec import CheckpointSpec

__all__ = ["held_by_uploads", "retention_policy", "stale_upload_keys", "to_prune"]


def retention_policy(spec: CheckpointSpec) -> RetentionPolicy:
    """The runtime's policy for a job: ``keepPerNMinutes``, else ``keepMax`` (5 when neither is set)."""
    if spec.keep_per_n_minutes is not None:
        return RetentionPolicy(keep_max=0, keep_per_n_minutes=spec.keep_per_n_minutes)
    return RetentionPolicy(keep_max=spec.effective_keep_max)


def to_prune(
    spec: CheckpointSpec, checkpoints: Sequence[Checkpoint], protected: Iterable[str] = ()
) -> list[Checkpoint]:
    """The checkpoints to delete now, oldest first.

    Args:
        spec: the job's ``spec.checkpoint``.
        checkpoints: everything scanned under the job's prefix, complete or not, from any run.
        protected: names never deleted (``status.resumeFrom``).
    """
    names = set(to_delete(candidates(checkpoints), retention_policy(spec), protected=[p for p in protected if p]))
    return [c for c in checkpoints if c.name in names]


def stale_upload_keys(doomed: Iterable[Checkpoint]) -> list[str]:
    """Shard keys of incomplete doomed checkpoints that the bucket lacks: where an interrupted
    save may have left a multipart upload (MinIO lists uploads only per exact key).

    Ranks come from the manifests' world size, else from the ranks seen in the keys.
    """
    keys: set[str] = set()
    for c in doomed:
        if c.complete:
            continue
        world = c.world_size
        if world is not None:
            ranks: Iterable[int] = range(world)
        else:
            ranks = {p.rank for p in (parse_key(k) for k in c.keys) if p is not None}
        keys |= {file_key(c.name, r, FileKind.SHARD) for r in ranks} - set(c.keys)
    return sorted(keys)


def held_by_uploads(doomed: Sequence[Checkpoint], uploads: Iterable[Upload],
                    older_than: float) -> tuple[list[Upload], set[str]]:
    """Which uploads of the doomed checkpoints to abort now, and which checkpoints to keep a while.

    An upload started before ``older_than`` belongs to a save that was killed: it is aborted.
    A younger one may still be running — or be the remains of a kill too recent to tell — so its
    checkpoint is not deleted yet: deleting it would leave nothing that names the upload's key
    (MinIO lists uploads only per exact key), and the parts would stay for good. A later pass,
    once the upload is old enough, aborts it and deletes the checkpoint.

    Args:
        doomed: what :func:`to_prune` returned.
        uploads: the uploads in progress of :func:`stale_upload_keys` of ``doomed``.
        older_than: epoch seconds (now minus ``TORPOR_STALE_UPLOAD_SECONDS``).

    Returns:
        ``(uploads to abort, names of checkpoints to keep this pass)``.
    """
    owner = {key: c.name for c in doomed for key in stale_upload_keys([c])}
    abort: list[Upload] = []
    kept: set[str] = set()
    for upload in uploads:
        if upload.key not in owner:
            continue
        if upload.initiated < older_than:
            abort.append(upload)
        else:
            kept.add(owner[upload.key])
    return abort, kept
