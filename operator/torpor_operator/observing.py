"""Read-only views of what the operator observes: rank pods, nodes and checkpoints.

The shell hands :func:`torpor_operator.reconciling.decide` raw API dicts; these views pick out
the few fields a decision needs, so the decision code never digs through nested dicts and the
tests can build inputs from a handful of values.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from torpor_operator.contract import (
    ANNOTATION_AVOIDED_NODES,
    ANNOTATION_EXIT_REQUESTED,
    ANNOTATION_POD_SHAPE,
    ANNOTATION_RESUME_FROM,
    ANNOTATION_SIDECARS_STOPPED,
    ENV,
    LABEL_INCARNATION,
    LABEL_RANK,
)
from torpor_operator.shaping import parse_digests

if TYPE_CHECKING:
    from torpor.checkpoints import Checkpoint

__all__ = [
    "CheckpointInfo",
    "NodeView",
    "PodView",
    "Taint",
    "avoided_nodes",
    "checkpoint_infos",
    "format_time",
    "newest_complete",
    "parse_time",
    "preemption_signals",
]


def avoided_nodes(annotations: Mapping[str, str] | None) -> tuple[str, ...]:
    """The nodes named by a pod's ``torpor.dev/avoided-nodes`` annotation (for the shell's
    index as well as for :class:`PodView`)."""
    text = (annotations or {}).get(ANNOTATION_AVOIDED_NODES, "")
    return tuple(n for n in (part.strip() for part in text.split(",")) if n)


def parse_time(value: str | None) -> datetime | None:
    """An RFC 3339 timestamp as the API writes it (``2025-01-02T03:04:05Z``), or ``None``."""
    if not value:
        return None
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


def format_time(value: datetime) -> str:
    """RFC 3339 in UTC with a ``Z``, whole seconds: the form the API server stores."""
    return value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass(frozen=True)
class Termination:
    """How the training container of a rank ended (``state.terminated`` of its status)."""

    exit_code: int
    reason: str
    """Kubernetes' reason: ``Completed``, ``Error``, ``OOMKilled``, …"""
    message: str
    """The termination message: the runtime's JSON, or the log tail after a crash."""
    finished_at: datetime | None = None
    """``finishedAt``: when the container ended, by the kubelet's clock."""


@dataclass(frozen=True)
class PodView:
    """The parts of one rank's pod that decisions read."""

    name: str
    incarnation: int
    rank: int
    phase: str
    """``Pending``, ``Running``, ``Succeeded``, ``Failed`` or ``Unknown``."""
    node: str | None
    ready: bool
    deleting: bool
    """``metadata.deletionTimestamp`` is set."""
    disruption: str | None
    """Reason of a true ``DisruptionTarget`` condition (``EvictionByEvictionAPI``, …)."""
    status_reason: str | None
    """``status.reason`` of the pod (``Evicted``, ``Shutdown``, ``NodeLost``, ``OutOfcpu``…)."""
    termination: Termination | None
    annotations: Mapping[str, str]
    status_message: str = ""
    """``status.message`` of the pod: the kubelet's words for an eviction or a rejection."""
    init_failure: str | None = None
    """``init container NAME exited CODE (REASON)`` for the first init container that failed; native
    sidecars (``restartPolicy: Always``), which are ended with the pod, never count."""
    created: datetime | None = None
    """``metadata.creationTimestamp``: where a rank's startup timeout starts."""
    not_starting: str = ""
    """Why a Pending pod has not started, in the cluster's words: ``Unschedulable: 0/2 nodes…``
    (its ``PodScheduled`` condition) or a container's waiting reason and message
    (``ImagePullBackOff: …``, ``CreateContainerConfigError: …``); empty when nothing says."""
    sidecars: tuple[str, ...] = ()
    """The pod's other (regular) containers that have not ended: a log shipper or a mesh proxy
    keeps the pod Running after the training container has ended."""
    deletion_grace: int | None = None
    """``metadata.deletionGracePeriodSeconds`` of a pod being deleted: the grace period its
    deletion was given (a later deletion may only shorten it)."""
    unschedulable: bool = False
    """The scheduler found no node for it: ``PodScheduled`` is False with reason ``Unschedulable``
    (and the pod has no node). What an elastic job counts as a rank that does not fit."""
    world_size: int | None = None
    """The pods of its incarnation, as the operator set them in its training container:
    ``NNODES`` (``WORLD_SIZE`` in pods an operator made before ``spec.procsPerPod``, one
    process each); ``None`` if absent."""

    @property
    def terminated(self) -> bool:
        """The rank has ended for good (``restartPolicy: Never``): its pod has, or its training
        container has while sidecars keep the pod Running."""
        return self.phase in ("Succeeded", "Failed") or self.termination is not None

    @property
    def sidecars_outlive_trainer(self) -> bool:
        """The training container has ended, other containers still run and nobody has stopped
        them yet (the pod is not being deleted, the operator has not marked it): without help the
        pod would stay Running for ever."""
        return (self.termination is not None and bool(self.sidecars) and self.phase not in ("Succeeded", "Failed")
                and not self.deleting and ANNOTATION_SIDECARS_STOPPED not in self.annotations)

    @property
    def exit_requested_at(self) -> str | None:
        """The stop request this pod was annotated with, if any."""
        return self.annotations.get(ANNOTATION_EXIT_REQUESTED)

    @property
    def resume_from(self) -> str | None:
        """The checkpoint the pod was told to resume from."""
        return self.annotations.get(ANNOTATION_RESUME_FROM)

    @property
    def avoided_nodes(self) -> tuple[str, ...]:
        """The nodes the pod's required node affinity keeps it off (they were going away when
        it was made); empty for a pod made without such a list."""
        return avoided_nodes(self.annotations)

    @property
    def shape(self) -> dict[str, str]:
        """The digests of the spec parts the pod was made from (:mod:`torpor_operator.shaping`);
        empty for a pod made by an operator that did not record them."""
        return parse_digests(self.annotations.get(ANNOTATION_POD_SHAPE, ""))

    @classmethod
    def from_dict(cls, pod: Mapping[str, Any], container: str) -> PodView | None:
        """View a pod; ``None`` for a pod without torpor's incarnation and rank labels."""
        meta = pod.get("metadata") or {}
        labels = meta.get("labels") or {}
        try:
            incarnation = int(labels[LABEL_INCARNATION])
            rank = int(labels[LABEL_RANK])
        except (KeyError, ValueError):
            return None
        status = pod.get("status") or {}
        conditions = {c.get("type"): c for c in status.get("conditions") or []}
        disruption = conditions.get("DisruptionTarget")
        termination = None
        for cs in status.get("containerStatuses") or []:
            if cs.get("name") != container:
                continue
            terminated = (cs.get("state") or {}).get("terminated")
            if terminated:
                termination = Termination(
                    exit_code=int(terminated.get("exitCode", 0)),
                    reason=terminated.get("reason") or "",
                    message=terminated.get("message") or "",
                    finished_at=parse_time(terminated.get("finishedAt")),
                )
        annotations = dict(meta.get("annotations") or {})
        reason, message = status.get("reason"), status.get("message") or ""
        if reason == "DeadlineExceeded" and ANNOTATION_SIDECARS_STOPPED in annotations:
            # the deadline is the operator's way of stopping the sidecars of an ended trainer, not the rank's end
            reason, message = None, ""
        return cls(
            name=meta.get("name", ""),
            incarnation=incarnation,
            status_message=message,
            init_failure=_init_failure(pod),
            rank=rank,
            phase=status.get("phase") or "Pending",
            node=(pod.get("spec") or {}).get("nodeName"),
            ready=(conditions.get("Ready") or {}).get("status") == "True",
            deleting=bool(meta.get("deletionTimestamp")),
            disruption=(disruption.get("reason") or "DisruptionTarget")
            if disruption and disruption.get("status") == "True" else None,
            status_reason=reason,
            termination=termination,
            annotations=annotations,
            created=parse_time(meta.get("creationTimestamp")),
            not_starting=_not_starting(status, conditions),
            sidecars=_sidecars(pod, container),
            deletion_grace=_int_or_none(meta.get("deletionGracePeriodSeconds")),
            unschedulable=not (pod.get("spec") or {}).get("nodeName") and _unschedulable(conditions),
            world_size=_world_size(pod, container),
        )


def _int_or_none(value: Any) -> int | None:
    try:
        return None if value is None else int(value)
    except (TypeError, ValueError):
        return None


def _unschedulable(conditions: Mapping[str, Any]) -> bool:
    scheduled = conditions.get("PodScheduled") or {}
    return scheduled.get("status") == "False" and scheduled.get("reason") == "Unschedulable"


def _world_size(pod: Mapping[str, Any], container: str) -> int | None:
    for c in (pod.get("spec") or {}).get("containers") or []:
        if c.get("name") == container:
            env = {e.get("name"): e.get("value") for e in c.get("env") or []}  # the last of a name wins
            return _int_or_none(env.get(ENV.NNODES, env.get(ENV.WORLD_SIZE)))
    return None


def _sidecars(pod: Mapping[str, Any], container: str) -> tuple[str, ...]:
    """The regular containers other than ``container`` that have not ended (by their status; a
    container without one has not started yet). Native sidecars are init containers: not here."""
    statuses = {cs.get("name"): cs for cs in (pod.get("status") or {}).get("containerStatuses") or []}
    names = [c.get("name") for c in (pod.get("spec") or {}).get("containers") or []]
    names += [n for n in statuses if n not in names]
    return tuple(str(n) for n in names if n != container
                 and not ((statuses.get(n) or {}).get("state") or {}).get("terminated"))


def _not_starting(status: Mapping[str, Any], conditions: Mapping[str, Any]) -> str:
    scheduled = conditions.get("PodScheduled") or {}
    if scheduled.get("status") == "False":
        return f"{scheduled.get('reason') or 'NotScheduled'}: {scheduled.get('message') or ''}".rstrip(": ")
    for cs in [*(status.get("initContainerStatuses") or []), *(status.get("containerStatuses") or [])]:
        waiting = (cs.get("state") or {}).get("waiting") or {}
        if waiting.get("reason") and waiting["reason"] not in ("ContainerCreating", "PodInitializing"):
            return f"{waiting['reason']}: {waiting.get('message') or ''}".rstrip(": ")
    return ""


def _init_failure(pod: Mapping[str, Any]) -> str | None:
    sidecars = {c.get("name") for c in (pod.get("spec") or {}).get("initContainers") or []
                if c.get("restartPolicy") == "Always"}
    for cs in (pod.get("status") or {}).get("initContainerStatuses") or []:
        terminated = (cs.get("state") or {}).get("terminated") or {}
        code = int(terminated.get("exitCode", 0) or 0)
        if cs.get("name") not in sidecars and code != 0:
            return f"init container {cs.get('name')} exited {code} ({terminated.get('reason') or 'Error'})"
    return None


#: Taints the node lifecycle controller puts on a node that stopped reporting.
LOST_NODE_TAINTS = ("node.kubernetes.io/unreachable", "node.kubernetes.io/not-ready")
#: The taint an administrator (or a cloud controller) puts on a node that is down for good:
#: Kubernetes' non-graceful node shutdown. Its pods will never be finished by a kubelet.
OUT_OF_SERVICE_TAINT = "node.kubernetes.io/out-of-service"


@dataclass(frozen=True)
class Taint:
    """One taint of a node, as the scheduler matches it against a pod's tolerations."""

    key: str
    value: str = ""
    effect: str = ""
    """``NoSchedule``, ``PreferNoSchedule`` or ``NoExecute``."""


@dataclass(frozen=True)
class NodeView:
    """A node's schedulability, readiness and taints."""

    name: str
    unschedulable: bool
    taints: tuple[str, ...]
    """The taints' keys."""
    ready: str = "True"
    """Status of the node's ``Ready`` condition: ``True``, ``False`` or ``Unknown`` (the kubelet
    stopped reporting). A node without the condition reads as ready."""
    lost_since: datetime | None = None
    """When the node was last seen reporting, for a lost node: its ``Ready`` condition's
    ``lastTransitionTime`` (the node controller's verdict), else the ``timeAdded`` of its
    unreachable / not-ready taint; ``None`` when neither says."""
    taint_details: tuple[Taint, ...] = ()
    """The taints with their values and effects (:mod:`torpor_operator.placing` matches them
    against a template's tolerations)."""

    @classmethod
    def from_dict(cls, node: Mapping[str, Any]) -> NodeView:
        """View a Node object."""
        spec = node.get("spec") or {}
        conditions = {c.get("type"): c for c in (node.get("status") or {}).get("conditions") or []}
        taints = spec.get("taints") or []
        ready = conditions.get("Ready") or {}
        since = parse_time(ready.get("lastTransitionTime")) if ready.get("status", "True") != "True" else None
        if since is None:
            since = min((t for t in (parse_time(t.get("timeAdded")) for t in taints
                                     if t.get("key") in LOST_NODE_TAINTS) if t is not None), default=None)
        return cls(
            name=(node.get("metadata") or {}).get("name", ""),
            unschedulable=bool(spec.get("unschedulable")),
            taints=tuple(t.get("key", "") for t in taints),
            ready=str(ready.get("status") or "True"),
            lost_since=since,
            taint_details=tuple(Taint(str(t.get("key") or ""), str(t.get("value") or ""), str(t.get("effect") or ""))
                                for t in taints),
        )

    def gone_for_good(self, now: datetime, bound_seconds: float) -> bool:
        """Whether no kubelet will ever finish this node's pods: it is tainted out-of-service, or
        it has been lost for at least ``bound_seconds`` (a lost node without a time never is)."""
        if OUT_OF_SERVICE_TAINT in self.taints:
            return True
        return (self.lost() is not None and self.lost_since is not None
                and (now - self.lost_since).total_seconds() >= bound_seconds)

    def lost(self) -> str | None:
        """Why this node is not running its pods any more (NotReady, unreachable), or ``None``."""
        if self.ready != "True":
            return f"NotReady (Ready={self.ready})"
        for key in self.taints:
            if key in LOST_NODE_TAINTS:
                return f"tainted {key}"
        return None

    def going_away(self, termination_taints: Iterable[str]) -> str | None:
        """Why this node is about to be drained or removed, or ``None``."""
        if self.unschedulable:
            return "cordoned"
        wanted = set(termination_taints)
        for key in self.taints:
            if key in wanted:
                return f"tainted {key}"
        return None


def preemption_signals(pods: Iterable[PodView], nodes: Mapping[str, NodeView], taints: Iterable[str], *,
                       deletions: bool = True) -> list[str]:
    """Why the running ranks are about to be preempted, one message per signal, by rank.

    A rank's own signals (deletion, ``DisruptionTarget``) come before its node's (cordon,
    termination taint, lost), since they are the more certain. ``deletions=False`` leaves out
    bare deletions: a deletion may be the operator's own (a failure it was applying when it
    died), so it alone never turns a crash into collateral (docs/operator.md). The deletion of a
    rank that never started (Pending, scheduled or not) is no signal: it holds no state, and the
    decision makes it again once it is gone, or ends the incarnation when its startup timed out
    (the operator deletes such ranks itself, when a node a rank was kept off is back or at a
    startup timeout, and an operator that dies before its status patch finds them deleting).
    """
    taints = tuple(taints)
    messages = []
    for pod in sorted(pods, key=lambda p: p.rank):
        if pod.terminated:
            continue
        if pod.deleting and deletions and pod.phase != "Pending":
            messages.append(f"rank {pod.rank} (pod {pod.name}) is being deleted")
        if pod.disruption:
            messages.append(f"rank {pod.rank} (pod {pod.name}) has DisruptionTarget {pod.disruption}")
        node = nodes.get(pod.node or "")
        why = (node.going_away(taints) or node.lost()) if node else None
        if why:
            messages.append(f"node {node.name} hosting rank {pod.rank} is {why}")  # type: ignore[union-attr]
    return messages


@dataclass(frozen=True)
class CheckpointInfo:
    """One checkpoint of the job, as far as decisions care.

    ``time`` is when it was last written by the store's clock; checkpoints are ordered by
    ``(time, step, name)``, the order the runtime's ``newest_complete`` uses, so operator and
    runtime pick the same one.
    """

    name: str
    step: int
    time: datetime
    complete: bool
    resumable: bool = True
    """Not a breakpoint (``reason: exception``, the state at a crash): only resumable
    checkpoints are resume points; a breakpoint is loaded only when named by a user."""


def checkpoint_infos(checkpoints: Iterable[Checkpoint]) -> list[CheckpointInfo]:
    """Adapt the runtime's scanned checkpoints (:func:`torpor.checkpoints.scan`)."""
    return [
        CheckpointInfo(c.name, c.step, datetime.fromtimestamp(c.modified, UTC), c.complete,
                       c.resumable or not c.complete)
        for c in checkpoints
    ]


def newest_complete(checkpoints: Iterable[CheckpointInfo]) -> CheckpointInfo | None:
    """The newest complete, resumable checkpoint, or ``None``: what every rank of a new
    incarnation loads (the runtime's ``newest_complete`` skips breakpoints the same way)."""
    complete = [c for c in checkpoints if c.complete and c.resumable]
    return max(complete, key=lambda c: (c.time, c.step, c.name)) if complete else None
