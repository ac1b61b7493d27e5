"""An in-memory stand-in for the API objects one TrainingJob touches, for unit tests of ``decide``.

Not a Kubernetes mock for integration tests: it only holds dicts, applies a Decision the way
the shell will (create keyed by name, delete, flag, annotate, status merge patch), and lets a
test move pods through their life (run, exit, vanish). The tests at the bottom check the
stand-in itself.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from torpor.termination import StopReason, TerminationMessage
from torpor_operator.builders import graceful_exit_data, read_graceful_exit
from torpor_operator.contract import LABEL_INCARNATION, LABEL_JOB, LABEL_RANK
from torpor_operator.observing import CheckpointInfo
from torpor_operator.reconciling import Decision, Job, decide
from torpor_operator.settings import OperatorSettings
from torpor_operator.watching import slim_pod

NOW = datetime(2026, 1, 1, 12, 0, 0, tzinfo=UTC)
SETTINGS = OperatorSettings()


def job_body(name: str = "demo", *, replicas: int = 2, status: dict[str, Any] | None = None,
             generation: int = 1, **spec: Any) -> dict[str, Any]:
    """A TrainingJob as the API would return it; ``spec`` keys override the defaults (camelCase)."""
    body_spec: dict[str, Any] = {
        "replicas": replicas,
        "template": {"spec": {"containers": [{"name": "train", "image": "python:3.11", "command": ["python"]}]}},
        "checkpoint": {"uri": "s3://bucket/runs", "saveSteps": 10},
    }
    body_spec.update(spec)
    return {
        "apiVersion": "torpor.dev/v1alpha1",
        "kind": "TrainingJob",
        "metadata": {"name": name, "namespace": "team", "uid": "uid-1", "generation": generation},
        "spec": body_spec,
        "status": status or {},
    }


def message(reason: str, code: int, checkpoint: str | None = None, step: int | None = None) -> str:
    """A termination message as the runtime writes it."""
    return TerminationMessage(StopReason(reason), code, checkpoint=checkpoint, step=step).to_json()


def pod(job: str, incarnation: int, rank: int, *, phase: str = "Running", ready: bool = True,
        node: str = "node-a", deleting: bool = False, disruption: str | None = None,
        exit_code: int | None = None, term_message: str = "", term_reason: str = "",
        annotations: dict[str, str] | None = None, status_reason: str | None = None,
        owner_uid: str | None = "uid-1") -> dict[str, Any]:
    """A rank's pod; ``exit_code`` makes it terminated (Succeeded for 0, else Failed).

    ``owner_uid`` is the uid of the TrainingJob in its controller reference (``job_body``'s by
    default); ``None``: no owner reference, as after ``kubectl delete --cascade=orphan``."""
    meta: dict[str, Any] = {
        "name": f"{job}-{incarnation}-{rank}",
        "namespace": "team",
        "labels": {LABEL_JOB: job, LABEL_INCARNATION: str(incarnation), LABEL_RANK: str(rank)},
        "annotations": dict(annotations or {}),
    }
    if owner_uid is not None:
        meta["ownerReferences"] = [owner(job, owner_uid)]
    if deleting:
        meta["deletionTimestamp"] = "2026-01-01T11:59:00Z"
    status: dict[str, Any] = {"phase": phase, "conditions": [{"type": "Ready", "status": "True" if ready else "False"}]}
    if disruption:
        status["conditions"].append({"type": "DisruptionTarget", "status": "True", "reason": disruption})
    if status_reason:
        status["reason"] = status_reason
    if exit_code is not None:
        status["phase"] = "Succeeded" if exit_code == 0 else "Failed"
        status["conditions"][0]["status"] = "False"
        status["containerStatuses"] = [{"name": "train", "state": {"terminated": {
            "exitCode": exit_code, "reason": term_reason or ("Completed" if exit_code == 0 else "Error"),
            "message": term_message}}}]
    return {"apiVersion": "v1", "kind": "Pod", "metadata": meta, "spec": {"nodeName": node}, "status": status}


def owner(job: str = "demo", uid: str = "uid-1") -> dict[str, Any]:
    """The controller reference a child of the TrainingJob ``job`` with ``uid`` carries."""
    return {"apiVersion": "torpor.dev/v1alpha1", "kind": "TrainingJob", "name": job, "uid": uid,
            "controller": True, "blockOwnerDeletion": True}


def node(name: str, *, unschedulable: bool = False, taints: tuple[str, ...] = (),
         ready: str = "True", since: str | None = None) -> dict[str, Any]:
    """A Node object; ``ready`` is the status of its ``Ready`` condition, ``since`` its
    ``lastTransitionTime`` (RFC 3339)."""
    spec: dict[str, Any] = {"taints": [{"key": t, "effect": "NoSchedule"} for t in taints]}
    if unschedulable:
        spec["unschedulable"] = True
    condition = {"type": "Ready", "status": ready}
    if since:
        condition["lastTransitionTime"] = since
    return {"apiVersion": "v1", "kind": "Node", "metadata": {"name": name}, "spec": spec,
            "status": {"conditions": [condition]}}


def ckpt(name: str, step: int, minutes: float, complete: bool = True) -> CheckpointInfo:
    """A checkpoint written ``minutes`` after 11:00."""
    return CheckpointInfo(name, step, datetime(2026, 1, 1, 11, 0, tzinfo=UTC) + timedelta(minutes=minutes), complete)


def _merge(target: dict[str, Any], patch: dict[str, Any]) -> None:
    for key, value in patch.items():
        if value is None:
            target.pop(key, None)
        elif isinstance(value, dict) and isinstance(target.get(key), dict):
            _merge(target[key], value)
        else:
            target[key] = copy.deepcopy(value)


@dataclass
class Cluster:
    """The objects of one job, plus nodes and checkpoints; applies decisions like the shell."""

    body: dict[str, Any]
    pods: dict[str, dict[str, Any]] = field(default_factory=dict)
    children: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)
    nodes: dict[str, dict[str, Any]] = field(default_factory=lambda: {"node-a": node("node-a"),
                                                                     "node-b": node("node-b")})
    checkpoints: list[CheckpointInfo] | None = field(default_factory=list)
    now: datetime = NOW
    settings: OperatorSettings = SETTINGS
    events: list[tuple[str, str]] = field(default_factory=list)
    created: list[str] = field(default_factory=list)

    @property
    def job(self) -> Job:
        return Job.from_dict(self.body)

    @property
    def status(self) -> dict[str, Any]:
        return self.body.setdefault("status", {})

    def decide(self) -> Decision:
        """The decision on the whole pods, checked to be the one on the pods as the pod index
        keeps them (``slim_pod``): a reconcile reads either, and both must decide alike."""
        whole = decide(self.job, list(self.pods.values()), list(self.nodes.values()), self.checkpoints, self.now,
                       self.settings, children=list(self.children.values()))
        slim = decide(self.job, [slim_pod(p) for p in self.pods.values()], list(self.nodes.values()),
                      self.checkpoints, self.now, self.settings, children=list(self.children.values()))
        assert slim == whole, "the pod index's slim pods decide otherwise than the whole pods"
        return whole

    def apply(self, d: Decision, *, creates: bool = True, deletes: bool = True, flag: bool = True,
              annotate: bool = True, status: bool = True) -> None:
        """Apply what a decision says; the flags drop parts, as an operator killed mid-way would."""
        if creates:
            for obj in d.create:
                name = obj["metadata"]["name"]
                self.created.append(f"{obj['kind']}/{name}")
                if obj["kind"] == "Pod":
                    assert name not in self.pods, f"duplicate pod {name}"
                    new = copy.deepcopy(obj)
                    new["status"] = {"phase": "Pending"}
                    self.pods[name] = new
                else:
                    assert (obj["kind"], name) not in self.children, f"duplicate {obj['kind']} {name}"
                    self.children[(obj["kind"], name)] = copy.deepcopy(obj)
        if deletes:
            for ref in d.delete:
                if ref.kind == "Pod":
                    if ref.name in self.pods:
                        meta, spec = self.pods[ref.name]["metadata"], self.pods[ref.name]["spec"]
                        grace = (ref.grace_period_seconds if ref.grace_period_seconds is not None
                                 else spec.get("terminationGracePeriodSeconds", 30))
                        meta["deletionTimestamp"] = "2026-01-01T12:00:00Z"
                        # the API server keeps the shortest grace a deletion asked for
                        meta["deletionGracePeriodSeconds"] = min(grace, meta.get("deletionGracePeriodSeconds", grace))
                else:
                    self.children.pop((ref.kind, ref.name), None)
        if flag and d.graceful_exit:
            name, value = d.graceful_exit
            if ("ConfigMap", name) in self.children:
                self.children[("ConfigMap", name)]["data"] = graceful_exit_data(value)
        if annotate:
            for name, annotations in d.annotate:
                if name in self.pods:
                    self.pods[name]["metadata"].setdefault("annotations", {}).update(annotations)
        if status and d.status:
            _merge(self.status, d.status)
        self.events += [(e.type, e.reason) for e in d.events]

    def step(self, **parts: bool) -> Decision:
        """Decide and apply."""
        d = self.decide()
        self.apply(d, **parts)
        return d

    # --- moving pods through their lives ---

    def run(self, *, node_for: dict[int, str] | None = None) -> None:
        """Every pending pod starts running and becomes ready (on node-a, or as given by rank)."""
        for p in self.pods.values():
            if p["status"].get("phase") == "Pending":
                rank = int(p["metadata"]["labels"][LABEL_RANK])
                p["status"] = {"phase": "Running", "conditions": [{"type": "Ready", "status": "True"}]}
                p["spec"]["nodeName"] = (node_for or {}).get(rank, "node-a")

    def exit(self, rank: int, code: int, term_message: str = "", *, incarnation: int | None = None,
             term_reason: str = "", finished_at: str | None = None) -> None:
        """A rank's container ends (at ``finished_at``, RFC 3339, if given)."""
        inc = incarnation if incarnation is not None else self.status["incarnation"]
        p = self.pods[f"{self.body['metadata']['name']}-{inc}-{rank}"]
        reason = term_reason or ("Completed" if not code else "Error")
        terminated = {"exitCode": code, "message": term_message, "reason": reason}
        if finished_at:
            terminated["finishedAt"] = finished_at
        p["status"] = {"phase": "Succeeded" if code == 0 else "Failed",
                       "containerStatuses": [{"name": "train", "state": {"terminated": terminated}}]}

    def exit_all_saved(self, checkpoint: str = "CKP-1_40", step: int = 40) -> None:
        """Every live rank of the current incarnation saves and exits 143."""
        for p in self.live_pods():
            self.exit(int(p["metadata"]["labels"][LABEL_RANK]), 143, message("signal", 143, checkpoint, step))

    def live_pods(self) -> list[dict[str, Any]]:
        inc = str(self.status.get("incarnation"))
        return [p for p in self.pods.values() if p["metadata"]["labels"][LABEL_INCARNATION] == inc
                and p["status"].get("phase") not in ("Succeeded", "Failed")]

    def vanish_deleted(self) -> None:
        """Pods with a deletion timestamp are gone."""
        self.pods = {k: p for k, p in self.pods.items() if "deletionTimestamp" not in p["metadata"]}

    def flag(self, incarnation: int | None = None) -> int | None:
        inc = incarnation if incarnation is not None else self.status["incarnation"]
        cm = self.children.get(("ConfigMap", f"{self.body['metadata']['name']}-{inc}-exit"))
        return None if cm is None else read_graceful_exit(cm)

    def later(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


# --- the stand-in itself --------------------------------------------------------------------


def test_apply_creates_and_merges_status() -> None:
    c = Cluster(job_body())
    d = c.step()
    assert sorted(c.pods) == ["demo-1-0", "demo-1-1"]
    assert ("ConfigMap", "demo-1-exit") in c.children
    assert c.status["phase"] == "Pending"
    assert c.flag() == 0
    assert d.events


def test_message_round_trips_through_the_runtime_parser() -> None:
    text = message("signal", 143, "CKP-1_40", 40)
    assert json.loads(text)["checkpoint"] == "CKP-1_40"
    assert TerminationMessage.from_json(text).reason is StopReason.SIGNAL
