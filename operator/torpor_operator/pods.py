"""Pure builder of one rank's Pod from the job's template.

The user's template is copied, never changed in place; the operator's additions win over
same-named entries of the template (environment variables, volumes, mounts), because a
rank with a wrong ``RANK`` or exit file would break the whole job.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping
from typing import Any

from torpor_operator.builders import owner_reference
from torpor_operator.contract import (
    ANNOTATION_AVOIDED_NODES,
    ANNOTATION_POD_SHAPE,
    ANNOTATION_RESUME_FROM,
    DEFAULT_TERMINATION_LOG,
    ENV,
    EXIT_DIR,
    EXIT_FILE,
    KEY_DIR,
    KEY_FILE,
)
from torpor_operator.naming import JobRef, child_labels, config_map_name, pod_name, service_name
from torpor_operator.shaping import format_digests, shape_digests
from torpor_operator.spec import TrainingJobSpec

__all__ = ["EXIT_VOLUME", "KEY_VOLUME", "build_pod", "rank_env"]

EXIT_VOLUME = "torpor-exit"
KEY_VOLUME = "torpor-key"


def master_addr(job: str, incarnation: int) -> str:
    """Rank 0's DNS name through the headless Service (resolved via the pod's search path)."""
    return f"{pod_name(job, incarnation, 0)}.{service_name(job, incarnation)}"


def rank_env(
    job: JobRef, spec: TrainingJobSpec, incarnation: int, rank: int, resume_from: str, master_port: int,
    termination_log: str = DEFAULT_TERMINATION_LOG, world_size: int | None = None,
) -> list[dict[str, Any]]:
    """The environment of one rank's training container: rendezvous, TORPOR_* and S3.

    Every periodic-save and retention variable is set explicitly (``0`` = off), so the
    runtime's own defaults never apply under the operator. ``rank`` is the pod's place among
    the incarnation's pods and ``world_size`` their number (``spec.replicas`` unless an elastic
    job runs short); with ``spec.procsPerPod`` processes in each pod, ``WORLD_SIZE`` counts the
    processes and ``RANK`` is the pod's first one (``NODE_RANK * procsPerPod``), as torchrun
    numbers them, so a one-process pod keeps ``RANK`` = its pod's rank.
    """
    ckpt = spec.checkpoint
    pods = world_size if world_size is not None else spec.replicas
    procs = spec.procs_per_pod
    addr = master_addr(job.name, incarnation)
    values: list[tuple[str, str]] = [
        (ENV.RANK, str(rank * procs)),
        (ENV.WORLD_SIZE, str(pods * procs)),
        (ENV.MASTER_ADDR, addr),
        (ENV.MASTER_PORT, str(master_port)),
        (ENV.LOCAL_RANK, "0"),
        (ENV.LOCAL_WORLD_SIZE, str(procs)),
        (ENV.NNODES, str(pods)),
        (ENV.NODE_RANK, str(rank)),
        (ENV.PET_NNODES, str(pods)),
        (ENV.PET_NPROC_PER_NODE, str(procs)),
        (ENV.PET_NODE_RANK, str(rank)),
        (ENV.PET_MASTER_ADDR, addr),
        (ENV.PET_MASTER_PORT, str(master_port)),
        (ENV.JOB, job.key),
        (ENV.INCARNATION, str(incarnation)),
        (ENV.CHECKPOINT_URI, ckpt.job_uri(job.namespace, job.name)),
        (ENV.RESUME_FROM, resume_from),
        (ENV.EXIT_FILE, EXIT_FILE),
        (ENV.EXIT_SIGNAL, spec.graceful_exit.signal),
        (ENV.TERMINATION_LOG, termination_log),
        (ENV.SAVE_STEPS, str(ckpt.save_steps or 0)),
        (ENV.SAVE_SECONDS, str(ckpt.save_seconds or 0)),
        (ENV.KEEP_MAX, str(ckpt.effective_keep_max)),
        (ENV.KEEP_PER_N_MINUTES, str(ckpt.keep_per_n_minutes or 0)),
        (ENV.ASYNC_SAVE, "1" if ckpt.async_save else "0"),
    ]
    if ckpt.encryption is not None:
        values += [(ENV.ENC_MODE, ckpt.encryption.mode), (ENV.ENC_KEY_FILE, KEY_FILE)]
    if ckpt.endpoint is not None:
        values.append((ENV.AWS_ENDPOINT_URL, ckpt.endpoint))
    env: list[dict[str, Any]] = [{"name": name, "value": value} for name, value in values]
    if ckpt.credentials_secret is not None:
        for key in (ENV.AWS_ACCESS_KEY_ID, ENV.AWS_SECRET_ACCESS_KEY):
            env.append({"name": key, "valueFrom": {"secretKeyRef": {"name": ckpt.credentials_secret, "key": key}}})
    return env


def _replace_named(items: Iterable[Mapping[str, Any]], ours: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The template's entries without those we define, then ours: ours win, order is stable."""
    taken = {item["name"] for item in ours}
    return [dict(item) for item in items if item.get("name") not in taken] + ours


def _avoid_nodes(affinity: dict[str, Any], nodes: list[str]) -> dict[str, Any]:
    """Add ``metadata.name NotIn nodes`` to every required node-selector term (terms are ORed)."""
    node_affinity = affinity.setdefault("nodeAffinity", {})
    required = node_affinity.setdefault("requiredDuringSchedulingIgnoredDuringExecution", {})
    terms = required.setdefault("nodeSelectorTerms", [])
    if not terms:
        terms.append({})
    expression = {"key": "metadata.name", "operator": "NotIn", "values": nodes}
    for term in terms:
        term.setdefault("matchFields", []).append(dict(expression, values=list(nodes)))
    return affinity


def build_pod(
    job: JobRef,
    spec: TrainingJobSpec,
    incarnation: int,
    rank: int,
    *,
    resume_from: str,
    master_port: int,
    avoid_nodes: Iterable[str] = (),
    world_size: int | None = None,
) -> dict[str, Any]:
    """One rank's Pod.

    Args:
        job: the owning TrainingJob.
        spec: its parsed spec.
        incarnation: the incarnation the pod belongs to (in its name and labels).
        rank: the global rank, 0..world_size-1.
        resume_from: checkpoint name every rank of the incarnation loads; empty for the
            newest complete one (none on a fresh start).
        master_port: rendezvous port.
        avoid_nodes: nodes going away (:func:`torpor_operator.placing.nodes_to_avoid`); the
            pod may not be scheduled there, even where its tolerations would allow it. Named in
            the ``torpor.dev/avoided-nodes`` annotation too.
        world_size: ``WORLD_SIZE`` of the incarnation; ``None``: ``spec.replicas``.

    Returns:
        The Pod as a dict, ready to create.
    """
    template = copy.deepcopy(dict(spec.template))
    meta = template.get("metadata") or {}
    pod_spec: dict[str, Any] = template["spec"]
    name = pod_name(job.name, incarnation, rank)
    labels = {**(meta.get("labels") or {}), **child_labels(job.name, incarnation, rank)}
    annotations = {**(meta.get("annotations") or {}), ANNOTATION_RESUME_FROM: resume_from,
                   ANNOTATION_POD_SHAPE: format_digests(shape_digests(spec))}
    annotations.pop(ANNOTATION_AVOIDED_NODES, None)  # only the operator's own list may say so

    pod_spec["restartPolicy"] = "Never"
    pod_spec["terminationGracePeriodSeconds"] = spec.graceful_exit.termination_grace_period_seconds
    pod_spec["hostname"] = name
    pod_spec["subdomain"] = service_name(job.name, incarnation)
    avoid = sorted(set(avoid_nodes))
    if avoid:
        pod_spec["affinity"] = _avoid_nodes(pod_spec.get("affinity") or {}, avoid)
        annotations[ANNOTATION_AVOIDED_NODES] = ",".join(avoid)

    volumes: list[dict[str, Any]] = [
        {"name": EXIT_VOLUME, "configMap": {"name": config_map_name(job.name, incarnation)}}
    ]
    mounts: list[dict[str, Any]] = [{"name": EXIT_VOLUME, "mountPath": EXIT_DIR, "readOnly": True}]
    encryption = spec.checkpoint.encryption
    if encryption is not None:
        volumes.append({
            "name": KEY_VOLUME,
            "secret": {
                "secretName": encryption.key_secret,
                "items": [{"key": encryption.key_secret_key, "path": KEY_FILE.rsplit("/", 1)[1]}],
                "defaultMode": 0o400,
            },
        })
        mounts.append({"name": KEY_VOLUME, "mountPath": KEY_DIR, "readOnly": True})
    pod_spec["volumes"] = _replace_named(pod_spec.get("volumes") or [], volumes)

    containers = []
    for container in pod_spec["containers"]:
        container = dict(container)
        if container["name"] == spec.training_container:
            termination_log = container.setdefault("terminationMessagePath", DEFAULT_TERMINATION_LOG)
            # The runtime writes JSON to the file; when a crash leaves it empty, the log tail
            # still explains the failure in the pod status.
            container.setdefault("terminationMessagePolicy", "FallbackToLogsOnError")
            env = rank_env(job, spec, incarnation, rank, resume_from, master_port, termination_log, world_size)
            container["env"] = _replace_named(container.get("env") or [], env)
            container["volumeMounts"] = _replace_named(container.get("volumeMounts") or [], mounts)
        containers.append(container)
    pod_spec["containers"] = containers

    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": name,
            "namespace": job.namespace,
            "labels": labels,
            "annotations": annotations,
            "ownerReferences": [owner_reference(job)],
        },
        "spec": pod_spec,
    }
