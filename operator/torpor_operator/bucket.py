"""The imperative half of retention: scan a job's prefix, delete what the policy says.

Uses only the runtime's public, torch-free modules (``torpor.storage``, ``torpor.checkpoints``),
so operator and runtime agree on the layout and on completeness. Synchronous (boto3); the
handlers run it in a worker thread.

Credentials and endpoint come from the operator's own environment (boto3's usual sources,
``AWS_ENDPOINT_URL``), so every job the operator prunes must live in a store those reach.

Requests are short: ``timeout_seconds`` to connect and to read, two attempts (botocore's
defaults, 60 s reads and 8 attempts, let one listing of a dead endpoint take minutes). The
shell runs this on a pool of its own, never on the threads its API calls use.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from torpor.checkpoints import Checkpoint, ManifestCache, delete_checkpoints, scan
from torpor.storage import S3Settings, Storage, open_storage, s3_client
from torpor_operator.naming import JobRef
from torpor_operator.observing import CheckpointInfo, checkpoint_infos
from torpor_operator.pruning import stale_upload_keys, to_prune
from torpor_operator.spec import TrainingJobSpec

__all__ = ["Bucket", "PruneResult"]

log = logging.getLogger("torpor.bucket")

#: Multipart uploads older than this are abandoned by a killed save, not in progress.
STALE_UPLOAD_SECONDS = 3600.0


@dataclass(frozen=True)
class PruneResult:
    """What one retention pass saw and did."""

    checkpoints: list[CheckpointInfo]
    """Everything scanned (before deletion), for ``status.lastCheckpoint`` and resumes."""
    deleted: list[str] = field(default_factory=list)
    """Names of the deleted checkpoints."""
    keys_deleted: int = 0
    uploads_aborted: int = 0


class Bucket:
    """Scans and prunes job prefixes, caching parsed manifests between passes."""

    def __init__(self, timeout_seconds: float | None = None, attempts: int = 2) -> None:
        """``timeout_seconds``: connect and read timeout of each request (``None``: the runtime's
        S3 settings, ``TORPOR_S3_*``); ``attempts`` per request, with it."""
        self.timeout_seconds = timeout_seconds
        self.attempts = attempts
        self._caches: dict[str, ManifestCache] = {}
        self._client: Any = None
        self._lock = threading.Lock()

    def _shared_client(self) -> Any:
        """One boto3 client for every job: credentials and endpoint are the operator's own, and
        a client per job cost ~100 client builds (and their log lines) for 100 jobs."""
        with self._lock:
            if self._client is None:
                self._client = s3_client(self._s3_settings())
            return self._client

    def _s3_settings(self) -> S3Settings:
        settings = S3Settings.from_environ()
        if self.timeout_seconds is None:
            return settings
        return dataclasses.replace(settings, max_attempts=self.attempts, connect_timeout=self.timeout_seconds,
                                   read_timeout=self.timeout_seconds)

    def _storage(self, spec: TrainingJobSpec, job: JobRef) -> tuple[str, Storage]:
        uri = spec.checkpoint.job_uri(job.namespace, job.name)
        if not uri.startswith("s3://"):
            return uri, open_storage(uri)
        return uri, open_storage(uri, s3=self._s3_settings(), client=self._shared_client())

    def scan(self, spec: TrainingJobSpec, job: JobRef) -> list[Checkpoint]:
        """Every checkpoint under the job's prefix, judged complete or not."""
        uri, storage = self._storage(spec, job)
        return scan(storage, cache=self._caches.setdefault(uri, ManifestCache()))

    def list(self, spec: TrainingJobSpec, job: JobRef) -> list[CheckpointInfo]:
        """The job's checkpoints as :func:`torpor_operator.reconciling.decide` wants them."""
        return checkpoint_infos(self.scan(spec, job))

    def prune(self, spec: TrainingJobSpec, job: JobRef, resume_from: str | None) -> PruneResult:
        """One retention pass: delete what the policy does not keep, abort stale uploads."""
        uri, storage = self._storage(spec, job)
        scanned = scan(storage, cache=self._caches.setdefault(uri, ManifestCache()))
        doomed = to_prune(spec.checkpoint, scanned, protected=[resume_from or ""])
        keys = delete_checkpoints(storage, doomed) if doomed else 0
        aborted = 0
        stale = stale_upload_keys(doomed)
        if stale and hasattr(storage, "abort_stale_uploads"):
            aborted = storage.abort_stale_uploads(time.time() - STALE_UPLOAD_SECONDS, keys=stale)
        if doomed:
            log.info("pruned %d checkpoints (%d keys) of %s: %s", len(doomed), keys, job.key,
                     ", ".join(c.name for c in doomed))
        return PruneResult(checkpoint_infos(scanned), [c.name for c in doomed], keys, aborted)

    def delete_all(self, spec: TrainingJobSpec, job: JobRef) -> int:
        """Delete every checkpoint of the job (``deleteOnJobDeletion``); returns keys deleted."""
        uri, storage = self._storage(spec, job)
        scanned = scan(storage)
        self._caches.pop(uri, None)
        return delete_checkpoints(storage, scanned)
