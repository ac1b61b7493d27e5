"""What the operator watches, and which changes of a watched object can alter a decision.

The pod watch is scoped server-side (kopf's ``settings.watching.label_selectors``) to the pods
torpor made: they all carry :data:`~torpor_operator.contract.LABEL_JOB`, so the API server
sends no other pod and the operator keeps none in memory. Nodes are kept as the few fields
:class:`~torpor_operator.observing.NodeView` reads (:func:`slim_node`), not whole objects, and
the pod index holds each pod as the fields decisions read (:func:`slim_pod`): a rank's whole
pod (its template, volumes, env, the kubelet's status) is several times that, for every rank.

A watch event reconciles its job only when the object's *decision-relevant content*
(:func:`relevant`) differs from the last one the shell saw or wrote itself (:class:`Seen`):
kopf's annotation patches, a resourceVersion-only change, a node's heartbeat, a kubelet's
bookkeeping of a pod and the operator's own status and pod-annotation patches (recorded as they
are sent and, for the status, as the API answers) cost no reconcile. Time-based
steps never depended on such events: they are scheduled from ``Decision.requeue_after``.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any

import kopf

from torpor_operator.contract import ENV, LABEL_JOB

__all__ = ["POD_SELECTOR", "NoDiffBase", "Seen", "merge", "relevant", "resource_version", "slim_node", "slim_pod"]

#: The server-side label selector of the pod watch: every pod torpor makes has the label.
POD_SELECTOR = LABEL_JOB


def resource_version(obj: Mapping[str, Any]) -> int | None:
    """An object's ``metadata.resourceVersion`` as the etcd revision it is (what orders a watch
    event against a LIST or a write's answer), or ``None`` when it has none or it is not a number."""
    try:
        return int((obj.get("metadata") or {}).get("resourceVersion") or "")
    except ValueError:
        return None


def slim_node(node: Mapping[str, Any]) -> dict[str, Any]:
    """The fields of a Node that decisions read (:meth:`NodeView.from_dict`), in the Node's own
    shape: its name, ``spec.unschedulable``, ``spec.taints`` and the ``Ready`` condition's status
    and transition time. Heartbeats, images, addresses and capacity are left out: they change
    every few seconds on a real cluster and no decision reads them."""
    meta, spec = node.get("metadata") or {}, node.get("spec") or {}
    ready = [{"type": "Ready", **{k: c[k] for k in ("status", "lastTransitionTime") if k in c}}
             for c in (node.get("status") or {}).get("conditions") or [] if c.get("type") == "Ready"]
    slim: dict[str, Any] = {"metadata": {"name": meta.get("name", "")}, "spec": {}, "status": {"conditions": ready}}
    if spec.get("unschedulable"):
        slim["spec"]["unschedulable"] = True
    if spec.get("taints"):
        slim["spec"]["taints"] = [{k: t[k] for k in ("key", "value", "effect", "timeAdded") if k in t}
                                  for t in spec["taints"]]
    return slim


#: What :func:`slim_pod` keeps of each part of a pod.
_POD_META = ("name", "namespace", "uid", "resourceVersion", "labels", "annotations", "creationTimestamp",
             "deletionTimestamp", "deletionGracePeriodSeconds")
_POD_STATUS = ("phase", "reason", "message")
_CONDITION = ("type", "status", "reason", "message")
#: The env of a container that decisions read: the world size it was started with.
_POD_ENV = (ENV.WORLD_SIZE, ENV.NNODES)


def slim_pod(pod: Mapping[str, Any]) -> dict[str, Any]:
    """The fields of a rank's pod that decisions read, in the Pod's own shape, for the pod index.

    Kept: the metadata a decision or a stale-object check reads (name, uid, labels,
    annotations, owners, creation and deletion), ``spec.nodeName``, each container's name and
    its ``WORLD_SIZE``/``NNODES`` env, the init containers' names and restart policies, and the
    status' phase, reason, message, conditions (without their times) and container states.
    :meth:`~torpor_operator.observing.PodView.from_dict`, ``controlled_by`` and
    ``stale_objects`` read the same of it as of the whole pod (the unit tests decide every
    scenario from both). Left out: the template's volumes, env and resources, tolerations,
    affinity, the kubelet's IPs, images and probe times — most of the pod's bytes.
    """
    meta, spec, status = pod.get("metadata") or {}, pod.get("spec") or {}, pod.get("status") or {}
    slim_meta = {k: meta[k] for k in _POD_META if k in meta}
    if meta.get("ownerReferences"):
        slim_meta["ownerReferences"] = [{k: r[k] for k in ("kind", "name", "uid", "controller") if k in r}
                                        for r in meta["ownerReferences"]]
    slim_spec: dict[str, Any] = {}
    if spec.get("nodeName"):
        slim_spec["nodeName"] = spec["nodeName"]
    containers = []
    for c in spec.get("containers") or []:
        kept: dict[str, Any] = {"name": c.get("name")}
        env = [{"name": e.get("name"), "value": e.get("value")} for e in c.get("env") or []
               if e.get("name") in _POD_ENV]
        if env:
            kept["env"] = env
        containers.append(kept)
    if containers:
        slim_spec["containers"] = containers
    if spec.get("initContainers"):
        slim_spec["initContainers"] = [{k: c[k] for k in ("name", "restartPolicy") if k in c}
                                       for c in spec["initContainers"]]
    slim_status = {k: status[k] for k in _POD_STATUS if k in status}
    if status.get("conditions"):
        slim_status["conditions"] = [{k: c[k] for k in _CONDITION if k in c} for c in status["conditions"]]
    for key in ("containerStatuses", "initContainerStatuses"):
        if status.get(key):
            slim_status[key] = [{k: cs[k] for k in ("name", "state") if k in cs} for cs in status[key]]
    slim = {k: pod[k] for k in ("apiVersion", "kind") if k in pod}
    slim.update(metadata=slim_meta, spec=slim_spec, status=slim_status)
    return slim


def relevant(kind: str, body: Mapping[str, Any]) -> dict[str, Any]:
    """The part of a watched object that a decision can depend on.

    - ``TrainingJob``: uid, generation, deletionTimestamp, ``spec`` and ``status`` — not its
      annotations (kopf's state lives there, and no decision reads them), labels, finalizers or
      resourceVersion. A status the operator wrote itself is told apart by :class:`Seen`.
    - ``Pod``: what the pod index keeps of it (:func:`slim_pod`, the fields decisions read) but
      its ``resourceVersion``: a kubelet's IPs, image IDs and probe times change no decision, and
      the operator's own annotation patch is recorded before it is sent
      (:meth:`Seen.record` of :meth:`~torpor_operator.indexing.PodIndex.annotated`).
    - ``Node``: :func:`slim_node`.

    Raises:
        ValueError: ``kind`` is none of those.
    """
    if kind == "Node":
        return slim_node(body)
    meta = body.get("metadata") or {}
    if kind == "TrainingJob":
        return {"metadata": {k: meta.get(k) for k in ("uid", "generation", "deletionTimestamp")},
                "spec": body.get("spec"), "status": body.get("status")}
    if kind == "Pod":
        slim = slim_pod(body)
        slim["metadata"].pop("resourceVersion", None)
        for key in ("apiVersion", "kind"):  # a LIST's items carry neither, a watch event's both
            slim.pop(key, None)
        return slim
    raise ValueError(f"relevant: kind must be TrainingJob, Pod or Node, got {kind!r}")


def merge(target: Mapping[str, Any], patch: Mapping[str, Any]) -> dict[str, Any]:
    """``target`` with the JSON merge patch ``patch`` applied (RFC 7386: ``None`` removes a key,
    objects merge, anything else replaces)."""
    merged = dict(target)
    for key, value in patch.items():
        if value is None:
            merged.pop(key, None)
        elif isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _digest(content: Mapping[str, Any]) -> bytes:
    return hashlib.blake2b(json.dumps(content, sort_keys=True, default=str).encode(), digest_size=16).digest()


class Seen:
    """The last decision-relevant content seen per watched object, as a 16-byte digest.

    One instance per kind. Keys are ``(namespace, name)`` (``("", name)`` for nodes); the job a
    pod belongs to is kept with it, so that a job's entries can be counted and dropped.
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._digests: dict[tuple[str, str], bytes] = {}

    def changed(self, key: tuple[str, str], body: Mapping[str, Any]) -> bool:
        """Record ``body`` as seen; whether its relevant content differs from the last seen
        (an object not seen before has changed)."""
        digest = _digest(relevant(self.kind, body))
        if self._digests.get(key) == digest:
            return False
        self._digests[key] = digest
        return True

    def record(self, key: tuple[str, str], body: Mapping[str, Any] | None) -> None:
        """Record what the operator wrote (an API response): its watch event will be no change."""
        if body is not None:
            self._digests[key] = _digest(relevant(self.kind, body))

    def expect(self, key: tuple[str, str], body: Mapping[str, Any], status_patch: Mapping[str, Any]) -> None:
        """Record ``body`` as the operator's merge patch of its status will leave it, before the
        patch is sent: its watch event may arrive before the API's answer to the patch does."""
        self.record(key, {**body, "status": merge(body.get("status") or {}, status_patch)})

    def drop(self, key: tuple[str, str]) -> None:
        """Forget an object that is gone."""
        self._digests.pop(key, None)

    def __contains__(self, key: object) -> bool:
        return key in self._digests

    def __len__(self) -> int:
        return len(self._digests)



class NoDiffBase(kopf.DiffBaseStorage):
    """A kopf diff-base storage that keeps nothing.

    kopf's default copies the whole spec — the pod template included — into an annotation of
    every job after each change, against the API server's 256 KiB limit on annotations. No
    handler of torpor reads a diff: the only change-detecting one is ``on.delete``, which kopf
    runs on ``deletionTimestamp`` alone. The base fetched is the object's own essence, so kopf
    sees no change (neither a creation nor an update) in any event, has nothing to handle and
    nothing to write; had it none, it would take every event for a creation and process it.
    """

    def fetch(self, *, body: kopf.Body) -> kopf.BodyEssence | None:
        return self.build(body=body)

    def store(self, *, body: kopf.Body, patch: kopf.Patch, essence: kopf.BodyEssence) -> None:
        return None
