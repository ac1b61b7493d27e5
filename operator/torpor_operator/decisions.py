"""What :func:`torpor_operator.reconciling.decide` returns: the actions for the shell to apply."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = ["Decision", "Event", "ObjectRef"]


@dataclass(frozen=True)
class ObjectRef:
    """A child to delete, in the job's namespace."""

    api_version: str
    kind: str
    name: str
    grace_period_seconds: int | None = None
    """``None``: the object's own grace period; ``0``: a force deletion (the API server removes a
    pod at once, without waiting for a kubelet — for pods on a node that stopped reporting)."""


@dataclass(frozen=True)
class Event:
    """A Kubernetes Event to post on the job."""

    type: str
    """``Normal`` or ``Warning``."""
    reason: str
    message: str


@dataclass(frozen=True)
class Decision:
    """What to do, in this order: create, delete, write the flag, annotate, stop sidecars, patch
    status, post events."""

    create: tuple[dict[str, Any], ...] = ()
    """Objects to create; a 409 Conflict means it exists already and is not an error."""
    delete: tuple[ObjectRef, ...] = ()
    """Objects to delete (with their own grace period unless the ref says otherwise); a 404 is not an error."""
    graceful_exit: tuple[str, int] | None = None
    """``(ConfigMap name, value)`` to write into the GracefulExit file."""
    annotate: tuple[tuple[str, dict[str, str]], ...] = ()
    """``(pod name, annotations)``: touching a pod makes kubelet refresh its ConfigMap volumes."""
    stop_sidecars: tuple[str, ...] = ()
    """Pods whose training container has ended while other containers still run: annotated
    ``torpor.dev/sidecars-stopped-at`` and given ``spec.activeDeadlineSeconds: 1``, so the kubelet
    stops the sidecars and the pod keeps the trainer's status and logs."""
    status: dict[str, Any] | None = None
    """JSON merge patch of ``.status``; ``None`` when nothing changed."""
    events: tuple[Event, ...] = ()
    requeue_after: float | None = None
    """Decide again after this many seconds even without a watch event (deadlines, backoff)."""

    @property
    def writes_children(self) -> bool:
        """Whether applying it creates, deletes or patches a non-pod child (a Service, a
        ConfigMap, a PodDisruptionBudget): the children a reconcile read are then out of date."""
        return (any(o.get("kind") != "Pod" for o in self.create) or any(r.kind != "Pod" for r in self.delete)
                or self.graceful_exit is not None)

    @property
    def empty(self) -> bool:
        """Nothing to do."""
        return not (self.create or self.delete or self.graceful_exit or self.annotate or self.stop_sidecars
                    or self.status or self.events)
