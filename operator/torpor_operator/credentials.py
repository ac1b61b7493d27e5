"""Which S3 endpoint and credentials the operator uses for one job's checkpoints (pure).

The ranks reach their store with the job's ``checkpoint.endpoint`` and the keys in its
``checkpoint.credentialsSecret``; the operator's own listings and retention must reach the same
store as the same tenant, or a job on another store gets no retention and no ``lastCheckpoint``,
and one operator-wide credential reads every tenant's bucket. So:

=====================================  =====================================================
the job sets                           the operator uses
=====================================  =====================================================
``endpoint``                           that endpoint (else its own ``AWS_ENDPOINT_URL``)
``credentialsSecret``                  the Secret's ``AWS_ACCESS_KEY_ID`` and
                                       ``AWS_SECRET_ACCESS_KEY``, read from the job's
                                       namespace; never its own keys instead
neither                                its own endpoint and credentials (boto3's sources:
                                       environment, IRSA, workload identity)
=====================================  =====================================================

A Secret that does not exist, cannot be read or lacks a key is a :class:`CredentialsError`
whose reason and message the shell shows in ``Ready``; nothing is listed or pruned for the
job until it is fixed. The shell reads the Secret; this module only interprets it.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from torpor_operator.spec import CheckpointSpec

__all__ = ["CREDENTIALS_REASONS", "KEYS", "CredentialsError", "S3Access", "job_access", "unreadable"]

#: The Secret keys the ranks' environment takes (``secretKeyRef``, :mod:`torpor_operator.pods`).
KEYS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")

#: ``Ready=False`` reasons of a job whose credentials Secret the operator cannot use.
CREDENTIALS_REASONS = ("CredentialsSecretMissing", "CredentialsSecretUnreadable", "CredentialsSecretInvalid")

_CONSEQUENCE = "the operator cannot list or prune this job's checkpoints (no lastCheckpoint, no retention)"


class CredentialsError(Exception):
    """The job's credentials Secret cannot be used; ``reason`` is one of :data:`CREDENTIALS_REASONS`."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


@dataclass(frozen=True)
class S3Access:
    """How to reach one job's store."""

    endpoint: str | None
    """The S3 endpoint URL; ``None``: boto3's default (AWS)."""
    secret: tuple[str, str, str] | None
    """``(namespace, name, resourceVersion)`` of the Secret the keys come from; ``None``: the
    operator's own credentials. With ``endpoint`` it keys the client cache, so a rotated Secret
    (a new resourceVersion) gets a new client and the keys never serve as a cache key."""
    credentials: tuple[str, str] | None = field(default=None, repr=False)
    """Access key id and secret access key; ``None`` with ``secret`` ``None``."""

    @property
    def cache_key(self) -> tuple[str | None, tuple[str, str, str] | None]:
        return (self.endpoint, self.secret)


def job_access(spec: CheckpointSpec, namespace: str, secret: Mapping[str, Any] | None,
               default_endpoint: str | None) -> S3Access:
    """The endpoint and credentials for a job (the table above).

    Args:
        spec: the job's ``spec.checkpoint``.
        namespace: the job's namespace, where its Secret lives.
        secret: the Secret named by ``credentialsSecret`` as the API returns it, ``None`` if it
            does not exist; ignored when the job names none.
        default_endpoint: the operator's own endpoint (``AWS_ENDPOINT_URL``), or ``None``.

    Raises:
        CredentialsError: the job names a Secret that does not exist or lacks a key.
    """
    endpoint = spec.endpoint or default_endpoint
    name = spec.credentials_secret
    if name is None:
        return S3Access(endpoint, None)
    if secret is None:
        raise CredentialsError("CredentialsSecretMissing",
                               f'checkpoint.credentialsSecret "{name}" does not exist in namespace {namespace}: '
                               f"{_CONSEQUENCE}")
    data = secret.get("data") or {}
    values: list[str] = []
    for key in KEYS:
        try:
            value = base64.b64decode(data[key], validate=True).decode() if key in data else ""
        except (binascii.Error, UnicodeDecodeError, TypeError):
            value = ""
        if not value:
            raise CredentialsError("CredentialsSecretInvalid",
                                   f'checkpoint.credentialsSecret "{name}" in namespace {namespace} has no {key}: '
                                   f"{_CONSEQUENCE}")
        values.append(value)
    version = str((secret.get("metadata") or {}).get("resourceVersion", ""))
    return S3Access(endpoint, (namespace, name, version), (values[0], values[1]))


def unreadable(spec: CheckpointSpec, namespace: str, why: str) -> CredentialsError:
    """The error for a Secret the API would not give the operator (``why``: the API's message)."""
    return CredentialsError("CredentialsSecretUnreadable",
                            f'checkpoint.credentialsSecret "{spec.credentials_secret}" in namespace {namespace} '
                            f"cannot be read ({why}): {_CONSEQUENCE}")
