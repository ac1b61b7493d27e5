"""Deterministic names and labels of a job's children.

Every child of an incarnation carries the incarnation in its name, so a new incarnation gets
fresh objects (an old pod can never read a new GracefulExit flag) and creating a child twice
hits a name conflict instead of making a duplicate: creation is keyed by these names.

The CRD limits job names to DNS-1035 labels of at most 40 characters, so
``<job>-<incarnation>-<rank>`` stays a valid 63-character hostname for any incarnation below
10**10 and any rank below 1024.
"""

from __future__ import annotations

from dataclasses import dataclass

from torpor_operator.contract import LABEL_INCARNATION, LABEL_JOB, LABEL_MANAGED_BY, LABEL_RANK, MANAGED_BY

__all__ = ["JobRef", "child_labels", "config_map_name", "pdb_name", "pod_name", "selector", "service_name"]


@dataclass(frozen=True)
class JobRef:
    """Identity of one TrainingJob: what owner references and names are made from."""

    name: str
    namespace: str
    uid: str

    @property
    def key(self) -> str:
        """``namespace/name``: the TORPOR_JOB value and the log key."""
        return f"{self.namespace}/{self.name}"


def service_name(job: str, incarnation: int) -> str:
    """Headless Service of an incarnation; also the pods' ``subdomain``."""
    return f"{job}-{incarnation}"


def pod_name(job: str, incarnation: int, rank: int) -> str:
    """Pod (and hostname) of one rank."""
    return f"{job}-{incarnation}-{rank}"


def config_map_name(job: str, incarnation: int) -> str:
    """ConfigMap holding the incarnation's GracefulExit file."""
    return f"{job}-{incarnation}-exit"


def pdb_name(job: str, incarnation: int) -> str:
    """PodDisruptionBudget protecting the incarnation's ranks from eviction."""
    return f"{job}-{incarnation}"


def selector(job: str, incarnation: int) -> dict[str, str]:
    """Labels that select exactly the pods of one incarnation."""
    return {LABEL_JOB: job, LABEL_INCARNATION: str(incarnation)}


def child_labels(job: str, incarnation: int, rank: int | None = None) -> dict[str, str]:
    """Labels of a child; pods also carry their rank."""
    labels = {LABEL_MANAGED_BY: MANAGED_BY, **selector(job, incarnation)}
    if rank is not None:
        labels[LABEL_RANK] = str(rank)
    return labels
