"""What deleting a job with ``checkpoint.deleteOnJobDeletion`` does before its checkpoints go (pure).

A rank that still runs when the prefix is deleted saves on its way out — its pod's deletion
sends it the exit signal, and the runtime saves on it — and that checkpoint outlives the job.
So the deletion handler (which holds the job's finalizer) first deletes the job's pods with
their own grace period, waits until none of them exists any more — the kubelet removes a pod
only once its containers have stopped, so no process of the job is left to write — and only
then deletes the prefix.

A pod whose deletion no kubelet will finish (its node lost for longer than
``TORPOR_LOST_NODE_FORCE_DELETE_SECONDS``, or tainted out-of-service) is force-deleted, as a
stopping job does (:func:`torpor_operator.reconciling._release_lost`), or the job could never be
deleted. Only pods the job owns (``ownerReferences`` with its UID) are touched: pods of an
earlier job of the same name are not this job's to stop.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from torpor_operator.decisions import ObjectRef
from torpor_operator.observing import NodeView

__all__ = ["RankStop", "owned_by", "stop_ranks"]


@dataclass(frozen=True)
class RankStop:
    """One step of stopping a deleted job's ranks."""

    delete: tuple[ObjectRef, ...]
    """Pods to delete now: with their grace period, or grace 0 on a node gone for good."""
    remaining: tuple[str, ...]
    """Names of the job's pods that still exist: the checkpoints wait while any is left."""


def owned_by(obj: Mapping[str, Any], uid: str) -> bool:
    """Whether ``obj`` has an ownerReference to the object with ``uid``."""
    refs = (obj.get("metadata") or {}).get("ownerReferences") or []
    return any(ref.get("uid") == uid for ref in refs)


def stop_ranks(job_uid: str, pods: Iterable[Mapping[str, Any]], nodes: Mapping[str, Mapping[str, Any]],
               now: datetime, lost_node_bound_seconds: float) -> RankStop:
    """The deletions that stop the job's ranks, and which of its pods still exist.

    Args:
        job_uid: the TrainingJob's UID.
        pods: pods labelled with the job's name, as API dicts (any owner).
        nodes: nodes by name, as API dicts (those hosting the pods, where known).
        now: the current time (timezone-aware).
        lost_node_bound_seconds: how long a node must have been lost before its pods are
            force-deleted.
    """
    delete: list[ObjectRef] = []
    remaining: list[str] = []
    for pod in pods:
        if not owned_by(pod, job_uid):
            continue
        meta = pod.get("metadata") or {}
        name = str(meta.get("name", ""))
        remaining.append(name)
        node = nodes.get((pod.get("spec") or {}).get("nodeName") or "")
        if node is not None and NodeView.from_dict(node).gone_for_good(now, lost_node_bound_seconds):
            delete.append(ObjectRef("v1", "Pod", name, grace_period_seconds=0))
        elif not meta.get("deletionTimestamp"):
            delete.append(ObjectRef("v1", "Pod", name))
    return RankStop(tuple(delete), tuple(sorted(remaining)))
