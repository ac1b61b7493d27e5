"""Errors the runtime raises for integrity, storage and resume failures.

Bad arguments raise the built-in ``ValueError``/``TypeError`` exactly as the MindSpore seeds
list them; this module holds the errors a caller can act on at run time: a checkpoint that
must not be loaded, storage that is away, a resume target that does not exist. Torch-free:
the operator imports it.
"""

from __future__ import annotations


class TorporError(Exception):
    """Base of every torpor run-time error, so a caller can catch them all at once."""


class IntegrityError(TorporError):
    """Bytes read back do not match their manifest (size or sha256): nothing was loaded.

    Raised instead of loading, because a shard that differs from what was written is either
    corrupted or tampered with, and resuming from it would silently train on garbage.
    """


class StorageError(TorporError):
    """The checkpoint store failed after its retries (network, permissions, missing bucket)."""


class AsyncSaveError(TorporError):
    """A background (``async_save=True``) save failed; its cause is chained (``__cause__``).

    Raised on every rank at the same step boundary after the failure (every rank learns of
    one rank's failure through the step's collective) when the monitor's ``async_errors``
    is ``"raise"``; with ``"record"`` (the default) it is logged and appended to
    ``CheckpointMonitor.save_errors`` instead and training goes on. Either way the failed
    checkpoint has no manifest for this rank, so it is incomplete and never resumed from.
    """


class CheckpointSaveError(TorporError):
    """A synchronous save (periodic, final or exit) failed on at least one rank.

    Raised on **every** rank at the same step, after every rank's save has ended, so no rank
    is left waiting for the others; the failed ranks are named, and on a failed rank the
    cause is chained. The checkpoint lacks those ranks' manifests: it is incomplete and never
    resumed from.
    """

    @classmethod
    def of(cls, name: str, directory: str, failed: list[int], cause: BaseException | None) -> CheckpointSaveError:
        """The error every rank raises for checkpoint ``name``; ``cause`` is this rank's own failure."""
        why = f"{type(cause).__name__}: {cause}" if cause is not None else "see the failed ranks' logs"
        return cls(f"checkpoint {name!r} was not saved on rank(s) {failed} in {directory}: {why}; "
                   "it is incomplete and will not be resumed from")

class ShardedStateError(TorporError):
    """State laid out over several ranks that this save cannot write correctly, refused.

    Raised on every rank alike, before anything is written, instead of a checkpoint that would
    hold one rank's shard as if it were the whole (a breakpoint of a sharded model, the
    trainable parameters of one, a ``ZeroRedundancyOptimizer`` without ``integrated_save``).
    The message names the module, parameter or setting and what to do instead; see
    ``torpor._sharded`` for what is supported.
    """


class ResizeError(TorporError):
    """A checkpoint cannot be resumed exactly on this world size, refused on every rank alike.

    Raised when a run resumes on another number of ranks than the checkpoint was saved with
    (or continues an epoch that was already resized) and something would make the data
    position or the state inexact: a loader whose order torpor cannot redraw, a
    ``global_batch_size`` that does not split over the ranks, a loader in ``state=`` that keeps
    a per-rank position the new ranks do not have, per-rank state a new rank has no copy of.
    The message names the value; see ``torpor._resharding`` for what is supported.
    """


class RetentionError(TorporError):
    """Pruning old checkpoints failed after a save; its cause is chained (``__cause__``).

    The checkpoint just saved is complete and will be resumed from; only older ones may be
    left over until the next prune (or the operator's retention) removes them. Logged,
    appended to ``CheckpointMonitor.prune_errors`` and warned about (``TorporWarning``) at the
    next step boundary; it never ends training, whatever ``async_errors`` says.
    """


class CheckpointNotFoundError(TorporError):
    """The requested checkpoint (a name, a path or ``'latest'`` with ``required=True``) is absent."""


class IncompleteCheckpointError(TorporError):
    """A checkpoint lacks a rank's manifest, or its manifests disagree: it is never loaded.

    Each rank writes its manifest only after its shard is durable, so a missing manifest
    means a save that did not finish (a kill mid-save, a rank that crashed).
    """


class TorporWarning(UserWarning):
    """Something was skipped but training goes on: a malformed exit file, a failed export."""
