"""The imperative half of retention: scan a job's prefix, delete what the policy says.

Uses only the runtime's public, torch-free modules (``torpor.storage``, ``torpor.checkpoints``),
so operator and runtime agree on the layout and on completeness. Synchronous (boto3); the
handlers run it in a worker thread.

Each job's store is reached as its ranks reach it (:mod:`torpor_operator.credentials`): the
job's ``checkpoint.endpoint`` and the keys of its ``credentialsSecret``, read from the job's
namespace on every pass (one GET: a rotated Secret is used at once); the operator's own
endpoint and credentials only for a job that names neither. Clients are cached per endpoint and
Secret resourceVersion: a client per pass cost ~100 client builds for 100 jobs.

Requests are short: ``timeout_seconds`` to connect and to read, two attempts (botocore's
defaults, 60 s reads and 8 attempts, let one listing of a dead endpoint take minutes). The
shell runs this on a pool of its own, never on the threads its API calls use.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from torpor.checkpoints import Checkpoint, ManifestCache, delete_checkpoints, scan
from torpor.storage import S3Settings, Storage, open_storage, s3_client
from torpor_operator.applying import api_message
from torpor_operator.credentials import S3Access, job_access, unreadable
from torpor_operator.naming import JobRef
from torpor_operator.observing import CheckpointInfo, checkpoint_infos
from torpor_operator.pruning import held_by_uploads, stale_upload_keys, to_prune
from torpor_operator.spec import TrainingJobSpec

__all__ = ["Bucket", "PruneResult"]

log = logging.getLogger("torpor.bucket")

#: Reads a Secret: ``(namespace, name)`` -> the API's dict, ``None`` if it does not exist.
SecretReader = Callable[[str, str], Mapping[str, Any] | None]


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
    """Scans and prunes job prefixes, caching parsed manifests and clients between passes."""

    def __init__(self, timeout_seconds: float | None = None, attempts: int = 2, *,
                 stale_upload_seconds: float = 3600.0, secrets: SecretReader | None = None) -> None:
        """``timeout_seconds``: connect and read timeout of each request (``None``: the runtime's
        S3 settings, ``TORPOR_S3_*``); ``attempts`` per request, with it. Multipart uploads of
        doomed incomplete checkpoints older than ``stale_upload_seconds`` are aborted. ``secrets``
        reads a job's credentials Secret (``None``: no API, so a job that names one is refused)."""
        self.timeout_seconds = timeout_seconds
        self.attempts = attempts
        self.stale_upload_seconds = stale_upload_seconds
        self.secrets = secrets
        self.default_endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None
        self._caches: dict[tuple[str | None, str], ManifestCache] = {}
        self._where: dict[tuple[str, str], tuple[str | None, str]] = {}
        """Which ``_caches`` entry each job's scans use, by (namespace, name): :meth:`forget` drops it."""
        self._clients: dict[tuple[Any, ...], Any] = {}
        self._lock = threading.Lock()

    def access(self, spec: TrainingJobSpec, job: JobRef) -> S3Access:
        """The job's endpoint and credentials, its Secret read now.

        Raises:
            torpor_operator.credentials.CredentialsError: the job's Secret is missing, unreadable
                or lacks a key.
        """
        name = spec.checkpoint.credentials_secret
        secret = None
        if name is not None:
            if self.secrets is None:
                raise unreadable(spec.checkpoint, job.namespace, "the operator has no API client")
            try:
                secret = self.secrets(job.namespace, name)
            except Exception as exc:  # 403 (RBAC), the API away: shown on the job, tried next pass
                raise unreadable(spec.checkpoint, job.namespace, api_message(exc)) from exc
        return job_access(spec.checkpoint, job.namespace, secret, self.default_endpoint)

    def _client(self, access: S3Access) -> Any:
        """One client per endpoint and Secret version; a Secret's older versions' clients go."""
        with self._lock:
            client = self._clients.get(access.cache_key)
            if client is None:
                if access.secret is not None:
                    same = (access.endpoint, *access.secret[:2])
                    for key in [k for k in self._clients if k[1] is not None and (k[0], *k[1][:2]) == same]:
                        del self._clients[key]
                client = self._clients[access.cache_key] = s3_client(
                    self._s3_settings(), endpoint_url=access.endpoint, credentials=access.credentials)
            return client

    def _s3_settings(self) -> S3Settings:
        settings = S3Settings.from_environ()
        if self.timeout_seconds is None:
            return settings
        return dataclasses.replace(settings, max_attempts=self.attempts, connect_timeout=self.timeout_seconds,
                                   read_timeout=self.timeout_seconds)

    def _storage(self, spec: TrainingJobSpec, job: JobRef) -> tuple[tuple[str | None, str], Storage]:
        uri = spec.checkpoint.job_uri(job.namespace, job.name)
        if not uri.startswith("s3://"):
            where: tuple[str | None, str] = (None, uri)
            storage = open_storage(uri)
        else:
            access = self.access(spec, job)
            where = (access.endpoint, uri)
            storage = open_storage(uri, s3=self._s3_settings(), client=self._client(access))
        with self._lock:
            self._where[(job.namespace, job.name)] = where
        return where, storage

    def forget(self, namespace: str, name: str) -> None:
        """Drop the parsed manifests of a deleted job."""
        with self._lock:
            where = self._where.pop((namespace, name), None)
            if where is not None:
                self._caches.pop(where, None)

    def known_jobs(self) -> int:
        """How many jobs the bucket knows where to scan (``torpor_cached_entries{cache="bucket_jobs"}``)."""
        return len(self._where)

    def cached_jobs(self) -> int:
        """How many jobs have parsed manifests cached (``torpor_cached_entries{cache="manifests"}``)."""
        return len(self._caches)

    def scan(self, spec: TrainingJobSpec, job: JobRef) -> list[Checkpoint]:
        """Every checkpoint under the job's prefix, judged complete or not."""
        where, storage = self._storage(spec, job)
        return scan(storage, cache=self._caches.setdefault(where, ManifestCache()))

    def list(self, spec: TrainingJobSpec, job: JobRef) -> list[CheckpointInfo]:
        """The job's checkpoints as :func:`torpor_operator.reconciling.decide` wants them."""
        return checkpoint_infos(self.scan(spec, job))

    def prune(self, spec: TrainingJobSpec, job: JobRef, resume_from: str | None) -> PruneResult:
        """One retention pass: delete what the policy does not keep, abort stale uploads."""
        where, storage = self._storage(spec, job)
        scanned = scan(storage, cache=self._caches.setdefault(where, ManifestCache()))
        doomed = to_prune(spec.checkpoint, scanned, protected=[resume_from or ""])
        aborted = 0
        stale = stale_upload_keys(doomed)
        if stale and hasattr(storage, "multipart_uploads"):
            abort, kept = held_by_uploads(doomed, storage.multipart_uploads(stale),
                                          time.time() - self.stale_upload_seconds)
            for upload in abort:
                storage.abort_upload(upload)
            aborted = len(abort)
            doomed = [c for c in doomed if c.name not in kept]
        keys = delete_checkpoints(storage, doomed) if doomed else 0
        if doomed:
            log.info("pruned %d checkpoints (%d keys) of %s: %s", len(doomed), keys, job.key,
                     ", ".join(c.name for c in doomed))
        if aborted:
            log.info("aborted %d stale multipart uploads of %s", aborted, job.key)
        return PruneResult(checkpoint_infos(scanned), [c.name for c in doomed], keys, aborted)

    def delete_all(self, spec: TrainingJobSpec, job: JobRef) -> int:
        """Delete every checkpoint of the job (``deleteOnJobDeletion``) and abort the uploads of
        its incomplete ones, whatever their age: call it once no rank runs. Returns keys deleted."""
        where, storage = self._storage(spec, job)
        scanned = scan(storage)
        self._caches.pop(where, None)
        if hasattr(storage, "abort_stale_uploads"):  # no rank is left: every upload is a dead one
            stale = stale_upload_keys(scanned)
            if stale:  # MinIO lists uploads only per exact key: the missing shards'
                storage.abort_stale_uploads(time.time() + 1.0, keys=stale)
            storage.abort_stale_uploads(time.time() + 1.0)  # AWS: the whole prefix
        return delete_checkpoints(storage, scanned)
