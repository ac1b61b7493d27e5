"""``.status`` of a TrainingJob as a frozen dataclass, and the merge patch between two of them.

The status is the operator's memory: phase, incarnation, counters, the current stop and the
next allowed restart all live here, so an operator restarted at any point carries on without
duplicating pods or counting a restart twice.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from torpor_operator.observing import format_time

__all__ = ["API_ERROR_REASONS", "PHASES", "Condition", "JobStatus", "LastCheckpoint", "api_error", "api_recovered",
           "invalid_spec", "merge_patch", "not_ready", "set_condition"]

#: ``Ready=False`` reasons of a reconcile the API refused: a create (``CreateFailed``) or any other call.
API_ERROR_REASONS = ("CreateFailed", "ApiError")

PHASES = ("Pending", "Running", "Stopping", "Restarting", "Succeeded", "Failed", "Suspended")


@dataclass(frozen=True)
class LastCheckpoint:
    """``status.lastCheckpoint``: the newest complete checkpoint."""

    name: str
    step: int
    time: str
    """RFC 3339."""


@dataclass(frozen=True)
class Condition:
    """One entry of ``status.conditions`` (the usual Kubernetes shape)."""

    type: str
    status: str
    reason: str
    message: str
    last_transition_time: str
    observed_generation: int | None = None

    def to_dict(self) -> dict[str, Any]:
        """The API form (camelCase)."""
        doc: dict[str, Any] = {
            "type": self.type,
            "status": self.status,
            "reason": self.reason,
            "message": self.message,
            "lastTransitionTime": self.last_transition_time,
        }
        if self.observed_generation is not None:
            doc["observedGeneration"] = self.observed_generation
        return doc

    @classmethod
    def from_dict(cls, doc: Mapping[str, Any]) -> Condition:
        """Parse the API form; missing fields read as empty."""
        return cls(
            type=str(doc.get("type", "")),
            status=str(doc.get("status", "Unknown")),
            reason=str(doc.get("reason", "")),
            message=str(doc.get("message", "")),
            last_transition_time=str(doc.get("lastTransitionTime", "")),
            observed_generation=doc.get("observedGeneration"),
        )


# Dataclass field -> status key. Fields with a None value are left out of the API form.
_KEYS = {
    "phase": "phase",
    "incarnation": "incarnation",
    "restarts": "restarts",
    "preemptions": "preemptions",
    "preemptions_without_progress": "preemptionsWithoutProgress",
    "admission_rejections": "admissionRejections",
    "world_size": "worldSize",
    "next_world_size": "nextWorldSize",
    "last_resize_time": "lastResizeTime",
    "ready_replicas": "readyReplicas",
    "ready": "ready",
    "resume_from": "resumeFrom",
    "last_checkpoint": "lastCheckpoint",
    "stop_reason": "stopReason",
    "stop_message": "stopMessage",
    "stop_requested_at": "stopRequestedAt",
    "next_restart_time": "nextRestartTime",
    "start_time": "startTime",
    "completion_time": "completionTime",
    "observed_generation": "observedGeneration",
    "conditions": "conditions",
}


@dataclass(frozen=True)
class JobStatus:
    """The operator-owned status. Times are RFC 3339 strings, as stored by the API server."""

    phase: str | None = None
    incarnation: int = 0
    restarts: int = 0
    preemptions: int = 0
    preemptions_without_progress: int = 0
    """Preemptions in a row after which no checkpoint newer than ``resume_from`` existed."""
    admission_rejections: int = 0
    """Pods of the current incarnation the kubelet refused and the operator recreated."""
    world_size: int | None = None
    """WORLD_SIZE of the current incarnation; ``None`` for a job launched by an operator that did
    not record it (its pods' ``WORLD_SIZE`` says, :mod:`torpor_operator.sizing`)."""
    next_world_size: int | None = None
    """WORLD_SIZE of the next incarnation after an elastic shrink; ``None``: ``spec.replicas``."""
    last_resize_time: str | None = None
    """When an incarnation last started with another world size than the one before it."""
    ready_replicas: int = 0
    ready: str | None = None
    resume_from: str | None = None
    last_checkpoint: LastCheckpoint | None = None
    stop_reason: str | None = None
    stop_message: str | None = None
    stop_requested_at: str | None = None
    next_restart_time: str | None = None
    start_time: str | None = None
    completion_time: str | None = None
    observed_generation: int | None = None
    conditions: tuple[Condition, ...] = ()

    @classmethod
    def from_dict(cls, doc: Mapping[str, Any] | None) -> JobStatus:
        """Parse ``.status``; unknown keys (another tool's) are ignored."""
        doc = doc or {}
        kwargs: dict[str, Any] = {}
        for name, key in _KEYS.items():
            if doc.get(key) is None:
                continue
            value = doc[key]
            if name == "last_checkpoint":
                value = LastCheckpoint(
                    str(value.get("name", "")), int(value.get("step", 0)), str(value.get("time", ""))
                )
            elif name == "conditions":
                value = tuple(Condition.from_dict(c) for c in value)
            kwargs[name] = value
        return cls(**kwargs)

    def to_dict(self) -> dict[str, Any]:
        """The API form, without unset fields."""
        doc: dict[str, Any] = {}
        for name, key in _KEYS.items():
            value = getattr(self, name)
            if value is None:
                continue
            if isinstance(value, LastCheckpoint):
                value = dataclasses.asdict(value)
            elif name == "conditions":
                value = [c.to_dict() for c in value]
            doc[key] = value
        return doc

    def condition(self, type_: str) -> Condition | None:
        """The condition of that type, if set."""
        return next((c for c in self.conditions if c.type == type_), None)


def set_condition(
    conditions: tuple[Condition, ...], type_: str, true: bool, reason: str, message: str, now: datetime,
    generation: int | None,
) -> tuple[Condition, ...]:
    """Conditions with ``type_`` set; its lastTransitionTime moves only when the status flips."""
    status = "True" if true else "False"
    old = next((c for c in conditions if c.type == type_), None)
    since = old.last_transition_time if old is not None and old.status == status else format_time(now)
    new = Condition(type_, status, reason, message, since, generation)
    others = tuple(c for c in conditions if c.type != type_)
    return tuple(sorted((*others, new), key=lambda c: c.type))


def invalid_spec(status: JobStatus, message: str, generation: int | None, now: datetime) -> JobStatus | None:
    """The status recording that this generation's spec cannot run; ``None`` if it already does.

    ``Ready`` goes False with reason ``InvalidSpec`` and the message naming the field; the
    caller posts a Warning Event only when this returns a status, so a job the operator cannot
    run gets one Event per distinct problem, not one per reconcile (its own status patch
    triggers the next one). A valid spec later sets ``Ready`` from its phase again.
    """
    old = status.condition("Ready")
    if (old is not None and old.reason == "InvalidSpec" and old.message == message
            and status.observed_generation == generation):
        return None
    conditions = set_condition(status.conditions, "Ready", False, "InvalidSpec", message, now, generation)
    return dataclasses.replace(status, conditions=conditions, observed_generation=generation)


def _same_error(a: str, b: str) -> bool:
    """Whether two API messages are one error: equal but for the objects they name (``pods "x-1-0"
    is forbidden: exceeded quota`` for rank 0, then for rank 1, is one quota refusing the job)."""
    def unnamed(text: str) -> str:
        return re.sub(r'"[^"]*"', '""', text)
    return unnamed(a) == unnamed(b)


def api_error(status: JobStatus, reason: str, message: str, generation: int | None, now: datetime) -> JobStatus | None:
    """The status recording that a reconcile met an API error; ``None`` if it already does.

    ``Ready`` goes False with ``reason`` (one of :data:`API_ERROR_REASONS`) and the API's own
    message. Like :func:`invalid_spec`, the caller posts a Warning Event only when this returns a
    status, so a quota that keeps refusing a job gives one Event, not one per retry; the phase
    and counters are untouched (the decision that failed is simply made again).
    """
    old = status.condition("Ready")
    if old is not None and old.status == "False" and old.reason == reason and _same_error(old.message, message):
        return None
    conditions = set_condition(status.conditions, "Ready", False, reason, message, now, generation)
    return dataclasses.replace(status, conditions=conditions)


def api_recovered(status: JobStatus, generation: int | None, now: datetime,
                  reasons: tuple[str, ...] = API_ERROR_REASONS) -> JobStatus | None:
    """After an API error (or another problem whose ``Ready`` reasons are ``reasons``), the status
    whose ``Ready`` follows the phase again; ``None`` if ``Ready`` does not show such a problem (a
    transition since has set it already)."""
    old = status.condition("Ready")
    if old is None or old.reason not in reasons:
        return None
    phase = status.phase or "Pending"
    conditions = set_condition(status.conditions, "Ready", phase == "Running", phase,
                               "" if phase == "Running" else f"recovered from: {old.message}", now, generation)
    return dataclasses.replace(status, conditions=conditions)


def not_ready(status: JobStatus, reason: str, message: str, generation: int | None,
              now: datetime) -> JobStatus | None:
    """The status whose ``Ready`` is False with ``reason`` and ``message``; ``None`` if it is already
    (so a problem found on every retention pass patches the job once). The phase and counters are
    untouched: the job goes on as far as it can (a missing credentials Secret, for one)."""
    old = status.condition("Ready")
    if old is not None and (old.status, old.reason, old.message) == ("False", reason, message):
        return None
    return dataclasses.replace(status, conditions=set_condition(status.conditions, "Ready", False, reason, message,
                                                                now, generation))


def merge_patch(old: JobStatus, new: JobStatus) -> dict[str, Any] | None:
    """A JSON merge patch for ``.status`` turning ``old`` into ``new``; ``None`` if equal.

    The first patch of a job (``old`` has no phase) carries every field, zero counters
    included: ``kubectl get tj`` shows ``0`` restarts and preemptions rather than blanks.
    """
    before, after = old.to_dict(), new.to_dict()
    if old.phase is None and new.phase is not None:
        before = {}
    patch: dict[str, Any] = {key: value for key, value in after.items() if before.get(key) != value}
    patch.update({key: None for key in before if key not in after})
    return patch or None
