"""Pure builders of a job's non-pod children: headless Service, GracefulExit ConfigMap, PDB.

Each returns a plain dict as the API expects it, with owner references to the job (so that
deleting the job deletes them) and the incarnation's labels. Pods are in :mod:`pods`.
"""

from __future__ import annotations

import json
from typing import Any

from torpor_operator.contract import API_VERSION, EXIT_FILE_KEY, KIND
from torpor_operator.naming import (
    JobRef,
    child_labels,
    config_map_name,
    pdb_name,
    selector,
    service_name,
)

__all__ = [
    "build_config_map",
    "build_pdb",
    "build_service",
    "graceful_exit_data",
    "owner_reference",
    "read_graceful_exit",
]


def owner_reference(job: JobRef) -> dict[str, Any]:
    """The controller reference every child carries.

    ``blockOwnerDeletion`` keeps a foreground deletion of the job waiting until its pods are
    gone, so a re-created job of the same name does not meet the old ranks; after any other
    deletion it may, and tells them apart by this reference's uid (:mod:`torpor_operator.owning`).
    """
    return {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "name": job.name,
        "uid": job.uid,
        "controller": True,
        "blockOwnerDeletion": True,
    }


def _metadata(job: JobRef, name: str, incarnation: int) -> dict[str, Any]:
    return {
        "name": name,
        "namespace": job.namespace,
        "labels": child_labels(job.name, incarnation),
        "ownerReferences": [owner_reference(job)],
    }


def build_service(job: JobRef, incarnation: int, master_port: int) -> dict[str, Any]:
    """Headless Service whose DNS gives every rank a name: ``<pod>.<service>``.

    ``publishNotReadyAddresses`` because rank 0 must be resolvable while the ranks are still
    rendezvousing, before any of them is Ready.
    """
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _metadata(job, service_name(job.name, incarnation), incarnation),
        "spec": {
            "clusterIP": "None",
            "publishNotReadyAddresses": True,
            "selector": selector(job.name, incarnation),
            "ports": [{"name": "rendezvous", "port": master_port, "targetPort": master_port, "protocol": "TCP"}],
        },
    }


def graceful_exit_data(value: int) -> dict[str, str]:
    """ConfigMap ``data`` holding ``{"GracefulExit": value}``, the file OnRequestExit watches."""
    return {EXIT_FILE_KEY: json.dumps({"GracefulExit": int(value)})}


def read_graceful_exit(config_map: dict[str, Any]) -> int | None:
    """The GracefulExit value of an observed ConfigMap, ``None`` if absent or unreadable."""
    raw = (config_map.get("data") or {}).get(EXIT_FILE_KEY)
    if raw is None:
        return None
    try:
        value = json.loads(raw).get("GracefulExit")
    except (ValueError, AttributeError):
        return None
    return int(value) if isinstance(value, int) else None


def build_config_map(job: JobRef, incarnation: int, graceful_exit: int = 0) -> dict[str, Any]:
    """ConfigMap with the incarnation's GracefulExit file, mounted as a directory in every rank."""
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _metadata(job, config_map_name(job.name, incarnation), incarnation),
        "data": graceful_exit_data(graceful_exit),
    }


def build_pdb(job: JobRef, incarnation: int, replicas: int) -> dict[str, Any]:
    """PodDisruptionBudget that allows no voluntary eviction of a running rank.

    ``minAvailable`` as a number, not ``maxUnavailable``: the disruption controller computes a
    ``maxUnavailable`` budget from the owner's scale subresource, which a TrainingJob lacks.
    A rank that has exited after saving no longer counts, so a drain proceeds once the ranks
    have saved; pods the operator deletes itself bypass the budget.

    ``unhealthyPodEvictionPolicy: AlwaysAllow``: a rank that is Running but not Ready (a hung
    collective, a pod on a lost node) may always be evicted. With the default
    (``IfHealthyBudget``) such a rank keeps the budget unmet, and the drain would wait for it
    forever; the ranks that are healthy stay protected until they have saved.
    """
    return {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": _metadata(job, pdb_name(job.name, incarnation), incarnation),
        "spec": {
            "minAvailable": replicas,
            "unhealthyPodEvictionPolicy": "AlwaysAllow",
            "selector": {"matchLabels": selector(job.name, incarnation)},
        },
    }
