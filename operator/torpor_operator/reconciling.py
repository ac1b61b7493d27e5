"""The pure reconcile: given a TrainingJob and what was observed, what should change.

:func:`decide` is the operator's whole judgement; the kopf handlers only gather its inputs
and apply the :class:`Decision`. Deterministic child names make creation idempotent, and every
counter moves in the same status patch as the phase change that caused it, so an operator
killed between two steps and started again neither duplicates pods nor counts twice.

Phases (docs/operator.md has the full table)::

    (new) -> Pending -> Running -> Succeeded
                 \\         |
                  +--> Stopping --> Restarting --> Pending (next incarnation)
                          |   \\--> Suspended --(suspend: false)--> Pending
                          +--> Failed (maxRestarts exceeded)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from torpor_operator.builders import build_config_map, build_pdb, build_service, read_graceful_exit
from torpor_operator.contract import ANNOTATION_EXIT_REQUESTED, LABEL_INCARNATION
from torpor_operator.decisions import Decision, Event, ObjectRef
from torpor_operator.naming import JobRef, config_map_name, pdb_name, pod_name
from torpor_operator.observing import (
    CheckpointInfo,
    NodeView,
    PodView,
    format_time,
    newest_complete,
    parse_time,
    preemption_signals,
)
from torpor_operator.outcomes import Outcome, RankOutcome, classify
from torpor_operator.owning import Stale, controlled_by, free_incarnation, incarnation_of, stale_objects
from torpor_operator.placing import nodes_back, nodes_to_avoid
from torpor_operator.pods import build_pod
from torpor_operator.settings import OperatorSettings
from torpor_operator.shaping import changed_parts, shape_digests
from torpor_operator.sizing import UNTRAINED_RANK_GRACE_SECONDS, Resize, launch_size, resize
from torpor_operator.spec import TrainingJobSpec, check_job_name, parse_spec
from torpor_operator.status import JobStatus, LastCheckpoint, merge_patch, set_condition

__all__ = ["Decision", "Event", "Job", "ObjectRef", "decide"]  # the output types live in decisions.py

#: Longest wait between two decisions while a stop is in progress, seconds: a bound on how
#: late a missed watch event can make the operator.
MAX_REQUEUE_SECONDS = 30.0
#: Stops in which every rank is asked to save (GracefulExit) and given exitDeadlineSeconds.
_GRACEFUL_STOPS = ("Preemption", "Suspend", "SpecChanged", "Resize")
#: Grace period, seconds, of the live ranks of an incarnation one of whose ranks is on a node
#: gone for good (:func:`_abandon_peers_of_lost`). They are blocked in a collective with a rank
#: that will never answer, so neither SIGTERM nor a longer wait lets them save. Not 0: a grace
#: keeps each pod in the API until its kubelet has stopped the process, so the next incarnation
#: never starts beside a rank of this one; a few seconds is all that costs.
PEERS_OF_LOST_RANK_GRACE_SECONDS = 5


@dataclass(frozen=True)
class Job:
    """The observed TrainingJob: identity, generation, parsed spec and status."""

    ref: JobRef
    generation: int
    spec: TrainingJobSpec
    status: JobStatus

    @classmethod
    def from_dict(cls, body: Mapping[str, Any]) -> Job:
        """Parse a TrainingJob as the API returns it.

        Raises:
            torpor_operator.spec.SpecError: the spec can never work (the message names the field).
        """
        meta = body.get("metadata") or {}
        check_job_name(meta.get("name", ""))
        return cls(
            ref=JobRef(meta.get("name", ""), meta.get("namespace", ""), meta.get("uid", "")),
            generation=int(meta.get("generation") or 0),
            spec=parse_spec(body.get("spec") or {}),
            status=JobStatus.from_dict(body.get("status")),
        )


@dataclass
class _Plan:
    """The decision under construction (mutable inside :func:`decide` only)."""

    status: JobStatus
    create: list[dict[str, Any]] = field(default_factory=list)
    delete: list[ObjectRef] = field(default_factory=list)
    graceful_exit: tuple[str, int] | None = None
    annotate: list[tuple[str, dict[str, str]]] = field(default_factory=list)
    stop_sidecars: list[str] = field(default_factory=list)
    events: list[Event] = field(default_factory=list)
    requeue_after: float | None = None

    def update(self, **changes: Any) -> None:
        self.status = dataclasses.replace(self.status, **changes)

    def requeue(self, seconds: float) -> None:
        seconds = max(0.0, min(seconds, MAX_REQUEUE_SECONDS))
        self.requeue_after = seconds if self.requeue_after is None else min(self.requeue_after, seconds)


@dataclass(frozen=True)
class _World:
    """Everything observed, indexed for the phase functions."""

    job: Job
    pods: tuple[PodView, ...]
    nodes: Mapping[str, NodeView]
    checkpoints: Sequence[CheckpointInfo] | None
    children: Mapping[tuple[str, str], Mapping[str, Any]]
    """Services, ConfigMaps and PDBs by (kind, name)."""
    now: datetime
    settings: OperatorSettings
    stale: tuple[Stale, ...] = ()
    """What an earlier job of this name left (:mod:`torpor_operator.owning`): never acted on, it only holds names."""

    @property
    def spec(self) -> TrainingJobSpec:
        return self.job.spec

    def pods_of(self, incarnation: int) -> list[PodView]:
        return sorted((p for p in self.pods if p.incarnation == incarnation), key=lambda p: (p.rank, p.name))

    def exists(self, kind: str, name: str) -> bool:
        if kind == "Pod":
            return any(p.name == name for p in self.pods)
        return (kind, name) in self.children

    def classify(self, pod: PodView) -> RankOutcome:
        """How the rank ended, its node's state counting as evidence (:mod:`torpor_operator.outcomes`)."""
        return classify(pod, self.nodes.get(pod.node or ""), self.settings.termination_taints)

    def size(self, status: JobStatus) -> int:
        """World size of ``status``'s incarnation: ``status.worldSize``; for an incarnation an
        operator that did not record it made, its pods' ``WORLD_SIZE`` (then ``spec.replicas``,
        which that operator's CRD kept from changing)."""
        if status.world_size is not None:
            return status.world_size
        sizes = [p.world_size for p in self.pods_of(status.incarnation) if p.world_size is not None]
        return min(sizes) if sizes else self.spec.replicas

    def avoid_nodes(self) -> list[str]:
        """The nodes a rank made now is kept off (:mod:`torpor_operator.placing`)."""
        tolerations = self.spec.template["spec"].get("tolerations") or []
        return nodes_to_avoid(self.nodes.values(), tolerations, self.settings.termination_taints)


#: Phases whose decision may start an incarnation: ``TORPOR_RESUME_FROM`` must name the newest
#: checkpoint, so the shell lists the bucket afresh for them.
LAUNCHING_PHASES: tuple[str | None, ...] = (None, "Restarting", "Suspended", "Stopping")


def wants_fresh_checkpoints(job: Job, pods: Iterable[Mapping[str, Any]]) -> bool:
    """Whether deciding on ``job`` needs a listing of its checkpoints begun after the pods were
    read, not the last one the operator has.

    A launching phase does (the new ranks resume from what it names); so does a running job one
    of whose current ranks has ended: the decision may be the job's last (``Succeeded`` or
    ``Failed``), and the ``status.lastCheckpoint`` it leaves must show the save the ranks made on
    their way out, not the one before it. Every other reconcile reads the last listing, never
    waiting for the bucket.
    """
    phase = job.status.phase
    if phase in LAUNCHING_PHASES:
        return True
    if phase != "Running":
        return False
    container, uid, incarnation = job.spec.training_container, job.ref.uid, job.status.incarnation
    views = (PodView.from_dict(p, container) for p in pods if controlled_by(p, uid))
    return any(v is not None and v.incarnation == incarnation and v.terminated for v in views)


def decide(
    job: Job,
    pods: Iterable[Mapping[str, Any]],
    nodes: Iterable[Mapping[str, Any]],
    checkpoints: Sequence[CheckpointInfo] | None,
    now: datetime,
    settings: OperatorSettings,
    children: Iterable[Mapping[str, Any]] = (),
) -> Decision:
    """Decide what to do about one TrainingJob (pure: no clock, no I/O).

    Args:
        job: the observed job.
        pods: every pod labelled with the job's name, as API dicts. Only those the job controls
            (by uid) are its ranks; the others only hold names (:mod:`torpor_operator.owning`).
        nodes: nodes as API dicts (at least those hosting the job's pods).
        checkpoints: the job's checkpoints in the bucket, or ``None`` when the bucket could
            not be listed (the ranks then resolve "newest complete" themselves).
        now: the current time (timezone-aware).
        settings: the operator's settings.
        children: the Services, ConfigMaps and PodDisruptionBudgets labelled with the job's name,
            as API dicts; as for pods, only those it controls are its own.

    Returns:
        The actions; deciding again on the state they produce never repeats a creation or a count.
    """
    container, uid = job.spec.training_container, job.ref.uid
    pods, children = list(pods), list(children)
    views = tuple(v for v in (PodView.from_dict(p, container) for p in pods if controlled_by(p, uid))
                  if v is not None)
    world = _World(
        job=job,
        pods=views,
        nodes={v.name: v for v in (NodeView.from_dict(n) for n in nodes)},
        checkpoints=checkpoints,
        children={(c.get("kind", ""), (c.get("metadata") or {}).get("name", "")): c for c in children
                  if controlled_by(c, uid)},
        now=now,
        settings=settings,
        stale=(*stale_objects(pods, job.ref.name, uid, kind="Pod"), *stale_objects(children, job.ref.name, uid)),
    )
    plan = _Plan(status=dataclasses.replace(job.status, observed_generation=job.generation))
    _refresh_last_checkpoint(world, plan)
    phase = job.status.phase
    if phase is None:
        _start(world, plan)
    elif phase in ("Pending", "Running"):
        _active(world, plan)
    elif phase == "Stopping":
        _stopping(world, plan)
    elif phase == "Restarting":
        _restarting(world, plan)
    elif phase == "Suspended":
        _suspended(world, plan)
    else:  # Succeeded, Failed: pods stay for their logs; finish a half-applied release
        _release(world, plan)
    _stop_sidecars(world, plan)
    _refresh_ready(world, plan)
    return Decision(
        create=tuple(plan.create),
        delete=tuple(dict.fromkeys(plan.delete)),
        graceful_exit=plan.graceful_exit,
        annotate=tuple(plan.annotate),
        stop_sidecars=tuple(plan.stop_sidecars),
        status=merge_patch(job.status, plan.status),
        events=tuple(plan.events),
        requeue_after=plan.requeue_after,
    )


# --- status bookkeeping ------------------------------------------------------------------


def _transition(world: _World, plan: _Plan, phase: str, event: Event) -> None:
    """Move to ``phase``, set the conditions that follow from it, and post ``event``."""
    s = plan.status
    now, gen = world.now, world.job.generation
    conditions = s.conditions
    conditions = set_condition(conditions, "Ready", phase == "Running", phase, event.message, now, gen)
    stopping = phase == "Stopping"
    conditions = set_condition(conditions, "Stopping", stopping, s.stop_reason if stopping else phase,
                               event.message if stopping else "", now, gen)
    conditions = set_condition(conditions, "Suspended", phase == "Suspended", phase,
                               event.message if phase == "Suspended" else "", now, gen)
    if phase in ("Succeeded", "Failed"):
        conditions = set_condition(conditions, phase, True, event.reason, event.message, now, gen)
    plan.update(phase=phase, conditions=conditions)
    if phase == "Suspended":  # a shrink's reason is stale by the resume: it asks for every rank again
        plan.update(next_world_size=None)
    plan.events.append(event)


def _refresh_last_checkpoint(world: _World, plan: _Plan) -> None:
    if world.checkpoints is None:
        return
    newest = newest_complete(world.checkpoints)
    if newest is not None:
        plan.update(last_checkpoint=LastCheckpoint(newest.name, newest.step, format_time(newest.time)))


def _stop_sidecars(world: _World, plan: _Plan) -> None:
    """Stop the other containers of pods whose training container has ended.

    A regular sidecar (a log shipper, a service-mesh proxy) keeps its pod Running after the
    trainer exits; the rank's outcome is read from the trainer's status all the same, but the
    sidecar would hold the node's capacity for ever. ``activeDeadlineSeconds: 1`` makes the
    kubelet stop every container the way it stops a pod (SIGTERM, the grace period) and keep
    the pod, with the trainer's status and logs (``kubectl logs POD -c TRAINER``), as Job
    pods are kept; deleting the pod would lose both. Pods this decision deletes need nothing."""
    deleting = {r.name for r in plan.delete if r.kind == "Pod"}
    pods = [p for p in world.pods if p.sidecars_outlive_trainer and p.name not in deleting]
    if not pods:
        return
    plan.stop_sidecars += [p.name for p in pods]
    containers = ", ".join(sorted({c for p in pods for c in p.sidecars}))
    ranks = ", ".join(str(p.rank) for p in sorted(pods, key=lambda p: (p.incarnation, p.rank)))
    many = len(pods) > 1
    plan.events.append(Event("Normal", "SidecarsStopped",
                             f"the training container of rank{'s' if many else ''} {ranks} has ended; stopping the "
                             f"other containers of {'their pods' if many else 'its pod'} ({containers}) with "
                             "activeDeadlineSeconds"))


def _refresh_ready(world: _World, plan: _Plan) -> None:
    current = world.pods_of(plan.status.incarnation) if plan.status.incarnation else []
    ready = sum(1 for p in current if p.phase == "Running" and p.ready and not p.deleting)
    plan.update(ready_replicas=ready, ready=f"{ready}/{world.spec.replicas}")
    if plan.status.incarnation and plan.status.world_size is None:  # a job an earlier operator launched
        plan.update(world_size=world.size(plan.status))


# --- children ------------------------------------------------------------------------------


def _desired_children(world: _World, incarnation: int, resume_from: str, size: int) -> list[dict[str, Any]]:
    """Every child of an incarnation of ``size`` ranks, in creation order (the ConfigMap before
    the pods mounting it)."""
    ref, spec, settings = world.job.ref, world.spec, world.settings
    objects = [build_config_map(ref, incarnation), build_service(ref, incarnation, settings.master_port)]
    if spec.graceful_exit.drain_protection:
        objects.append(build_pdb(ref, incarnation, size))
    avoid = world.avoid_nodes()
    objects += [
        build_pod(ref, spec, incarnation, rank, resume_from=resume_from, master_port=settings.master_port,
                  avoid_nodes=avoid, world_size=size)
        for rank in range(size)
    ]
    return objects


def _create_missing(world: _World, plan: _Plan, incarnation: int, resume_from: str, *, pods: bool) -> None:
    """Create the incarnation's children that do not exist; pods only when ``pods``. Always with
    the incarnation's own world size: one incarnation never mixes two ``WORLD_SIZE`` values,
    whatever ``spec.replicas`` says now."""
    for obj in _desired_children(world, incarnation, resume_from, world.size(plan.status)):
        if obj["kind"] == "Pod" and not pods:
            continue
        if not world.exists(obj["kind"], obj["metadata"]["name"]):
            plan.create.append(obj)
    pdb = pdb_name(world.job.ref.name, incarnation)
    if not world.spec.graceful_exit.drain_protection and world.exists("PodDisruptionBudget", pdb):
        plan.delete.append(ObjectRef("policy/v1", "PodDisruptionBudget", pdb))


def _delete_children_before(world: _World, plan: _Plan, incarnation: int, *, pods: bool) -> None:
    """Delete Services, ConfigMaps, PDBs (and pods when ``pods``) of incarnations below ``incarnation``."""
    if pods:
        for p in world.pods:
            if p.incarnation < incarnation and not p.deleting:
                plan.delete.append(ObjectRef("v1", "Pod", p.name))
    for (kind, name), obj in sorted(world.children.items()):
        labels = (obj.get("metadata") or {}).get("labels") or {}
        try:
            owner_incarnation = int(labels.get(LABEL_INCARNATION, ""))
        except ValueError:
            continue
        if owner_incarnation < incarnation and not (obj.get("metadata") or {}).get("deletionTimestamp"):
            plan.delete.append(ObjectRef(obj.get("apiVersion", "v1"), kind, name))


def _live(pods: Iterable[PodView]) -> list[PodView]:
    return [p for p in pods if not p.terminated]


def _lost_for_good(world: _World, pods: Iterable[PodView]) -> list[PodView]:
    """The pods on nodes no kubelet will ever finish (:meth:`NodeView.gone_for_good` with
    ``TORPOR_LOST_NODE_FORCE_DELETE_SECONDS``)."""
    bound = world.settings.lost_node_force_delete_seconds
    return [p for p in pods if (node := world.nodes.get(p.node or "")) is not None
            and node.gone_for_good(world.now, bound)]


def _release_lost(world: _World, plan: _Plan, live: list[PodView]) -> list[PodView]:
    """Force-delete (grace 0) the live pods of nodes gone for good; returns the others.

    A pod on a node that stopped reporting never finishes a deletion (no kubelet to stop its
    containers and remove it), so a stop would wait for it for ever. Once the node has been lost
    for ``TORPOR_LOST_NODE_FORCE_DELETE_SECONDS`` (or is tainted out-of-service) the API object
    is all that is left of the rank: it is removed. Until then the decision is re-made when the
    bound passes. The rank had no chance to save: the job resumes from the newest complete
    checkpoint, like after any preemption."""
    bound = world.settings.lost_node_force_delete_seconds
    released = {p.name for p in _lost_for_good(world, live)}
    kept = []
    for p in live:
        node = world.nodes.get(p.node or "")
        if p.name in released and node is not None:
            plan.delete.append(ObjectRef("v1", "Pod", p.name, grace_period_seconds=0))
            plan.events.append(Event("Warning", "LostNodePodDeleted",
                                     f"force-deleted rank {p.rank} (pod {p.name}): node {node.name} is "
                                     f"{node.lost() or 'out of service'}, no kubelet will finish its deletion"))
            continue
        kept.append(p)
        if node is not None and node.lost() and node.lost_since is not None:
            plan.requeue((node.lost_since + timedelta(seconds=bound) - world.now).total_seconds())
    return kept


def _abandon_peers_of_lost(world: _World, plan: _Plan, live: list[PodView]) -> set[str]:
    """Delete promptly (grace :data:`PEERS_OF_LOST_RANK_GRACE_SECONDS`) the live ranks whose peer
    is on a node gone for good; returns their names.

    A node that vanishes (a VM powered off or cut off) resets none of its connections, so the
    ranks on healthy nodes stay blocked in a collective with its rank — gloo waits its whole
    timeout — and the stop step they would agree on needs that rank too. Once the lost rank is
    force-deleted (:func:`_release_lost`) none of them can finish a save: waiting the rest of
    ``exitDeadlineSeconds`` and then their grace period (SIGTERM does not reach a rank inside
    a collective) would only delay the restart from the newest complete checkpoint by minutes.
    A rank that already saved and exited is not live and not touched; one already being deleted
    with a longer grace is deleted again with the short one (a later deletion may shorten it).
    These deletions come before the force deletions in the plan: an operator that dies between
    the two leaves the lost rank, and so this decision, for its next pass."""
    lost = _lost_for_good(world, live)
    if not lost:
        return set()
    grace = PEERS_OF_LOST_RANK_GRACE_SECONDS
    peers = [p for p in live if p not in lost]
    todo = [p for p in peers if not p.deleting or p.deletion_grace is None or p.deletion_grace > grace]
    for p in todo:
        plan.delete.append(ObjectRef("v1", "Pod", p.name, grace_period_seconds=grace))
    if todo:
        ranks = ("rank " if len(todo) == 1 else "ranks ") + ", ".join(str(p.rank) for p in todo)
        gone = ("rank " if len(lost) == 1 else "ranks ") + ", ".join(f"{p.rank} (node {p.node})" for p in lost)
        plan.events.append(Event("Warning", "PeersOfLostRankDeleted",
                                 f"{ranks} cannot finish a save without {gone}, lost with its node: deleting "
                                 f"{'it' if len(todo) == 1 else 'them'} with grace {grace}s rather than waiting "
                                 "out exitDeadlineSeconds and the grace period; the job resumes from the newest "
                                 "complete checkpoint"))
    return {p.name for p in peers}


# --- phases --------------------------------------------------------------------------------


def _start(world: _World, plan: _Plan) -> None:
    if world.spec.suspend:
        _transition(world, plan, "Suspended", Event("Normal", "Suspended", "created with spec.suspend: true"))
        return
    plan.update(start_time=format_time(world.now))
    _launch(world, plan, 1, "Started", "started")


def _launch(world: _World, plan: _Plan, incarnation: int, reason: str, why: str) -> None:
    """Start ``incarnation`` — or the first after it whose names no earlier job of this name
    holds (:func:`torpor_operator.owning.free_incarnation`): fresh children, every rank told the
    same checkpoint."""
    own = [p.incarnation for p in world.pods] + [n for n in map(incarnation_of, world.children.values())
                                                 if n is not None]
    incarnation, skipped = free_incarnation(incarnation, own, world.stale, world.job.ref.name)
    if skipped is not None:
        plan.events.append(skipped)
    made = world.pods_of(incarnation)
    existing = [p.resume_from for p in made if p.resume_from is not None]
    if existing:  # a half-applied launch: keep the choice the created pods already carry
        resume_from = existing[0]
    else:
        newest = newest_complete(world.checkpoints or ())
        resume_from = newest.name if newest is not None else ""
    s = plan.status
    previous = world.size(s) if s.incarnation else None
    size = launch_size(world.spec, s.next_world_size, [p.world_size for p in made if p.world_size is not None])
    if previous is not None and previous != size:
        plan.events.append(_resized(world, plan, incarnation, previous, size))
        plan.update(last_resize_time=format_time(world.now))
    plan.update(incarnation=incarnation, resume_from=resume_from, stop_requested_at=None, next_restart_time=None,
                admission_rejections=0, world_size=size, next_world_size=None)
    _delete_children_before(world, plan, incarnation, pods=True)
    _create_missing(world, plan, incarnation, resume_from, pods=True)
    source = f"resuming from {resume_from}" if resume_from else "from scratch"
    _transition(world, plan, "Pending", Event(
        "Normal", reason, f"incarnation {incarnation} with {size} ranks {source} ({why})"))


def _resized(world: _World, plan: _Plan, incarnation: int, previous: int, size: int) -> Event:
    """The Event of a launch whose world size differs from the incarnation before: from what to
    what, and why (the resize that stopped the last one, or a restart asking for every rank)."""
    s, replicas = plan.status, world.spec.replicas
    if s.stop_reason in ("Resize", "SpecChanged") and s.stop_message:
        why = s.stop_message
    else:
        why = f"after {s.stop_reason or 'a stop'}, a new incarnation asks for all {replicas} ranks"
    short = f" ({size} of spec.replicas {replicas})" if size < replicas else ""
    return Event("Normal", "Resized", f"WORLD_SIZE {previous} -> {size}{short} in incarnation {incarnation}: {why}")


def _active(world: _World, plan: _Plan) -> None:
    """Pending or Running: watch for the end of training, failures and preemption.

    How the ranks' outcomes become one decision (docs/operator.md, "One stop, one count"):

    1. A crash seen together with evidence of a disruption — a rank Stopped or Killed, or a live
       rank with ``DisruptionTarget`` or on a node going away or lost — is the preemption's
       collateral: the peers of a disrupted rank fail on the broken connection. One preemption,
       no failure. A bare deletion of a live rank does not count here: it may be the operator's
       own, from a failure it was applying when it died.
    2. Otherwise any crash is one failure, however many ranks crashed — held for a bounded
       time when every crash is a lost connection and a rank still reads as running
       (:func:`_awaiting_silent_rank`).
    3. Every rank Finished: success.
    4. Any other signal (a Stopped or Killed rank, a deletion, a vanished rank): one preemption.
    5. Ranks the kubelet refused are recreated, bounded by ``TORPOR_ADMISSION_RETRIES``.

    Then, with nothing of that: a spec that now makes other pods than the live ranks were made
    from is a graceful restart (stop reason ``SpecChanged``, :func:`_spec_changed`), and a
    Pending rank kept off a node that is back is made again (:func:`_recreate_kept_off`).
    """
    incarnation = plan.status.incarnation
    current = world.pods_of(incarnation)
    _delete_children_before(world, plan, incarnation, pods=True)  # finishes a half-applied launch
    outcomes = [world.classify(p) for p in current]
    taints = world.settings.termination_taints
    crashed = [o for o in outcomes if o.outcome is Outcome.CRASHED]
    ended = [o for o in outcomes if o.outcome in (Outcome.STOPPED, Outcome.KILLED)]
    disruptions = [o.detail for o in ended] + preemption_signals(current, world.nodes, taints, deletions=False)
    if crashed and disruptions:
        more = f" (and {len(disruptions) - 1} more)" if len(disruptions) > 1 else ""
        ranks = ", ".join(str(o.rank) for o in crashed)
        collateral = (f"{len(crashed)} crashed ranks are its collateral" if len(crashed) > 1
                      else "1 crashed rank is its collateral")
        _begin_stop(world, plan, current, "Preemption",
                    f"{disruptions[0]}{more}; {collateral}, not failures (rank {ranks}: {crashed[0].detail})")
        return
    rank_0 = next((o for p, o in zip(current, outcomes, strict=True) if p.rank == 0), None)
    if (rank_0 is not None and rank_0.outcome is Outcome.FINISHED and all(o.lost_peer for o in crashed)
            and _completing(world, plan, current, rank_0)):
        return
    if crashed:
        if not _awaiting_silent_rank(world, plan, current, crashed):
            _begin_failure(world, plan, current, crashed)
        return
    ranks = {p.rank for p in current}
    size = world.size(plan.status)
    finished = [o for o in outcomes if o.outcome is Outcome.FINISHED]
    if len(finished) == size and ranks == set(range(size)):
        _finish(world, plan, incarnation)
        return
    signals = [o.detail for o in ended] + preemption_signals(current, world.nodes, taints)
    if plan.status.phase == "Running":
        signals += [f"rank {r} (pod {pod_name(world.job.ref.name, incarnation, r)}) is gone"
                    for r in range(size) if r not in ranks]
    if signals:
        more = f" (and {len(signals) - 1} more)" if len(signals) > 1 else ""
        _begin_stop(world, plan, current, "Preemption", signals[0] + more)
        return
    if world.spec.suspend:
        _begin_stop(world, plan, current, "Suspend", "spec.suspend is true")
        return
    changed = _spec_changed(world, current)
    if changed:
        _begin_stop(world, plan, current, "SpecChanged", changed)
        return
    kept_off = _kept_off_and_back(world, current)
    sizing = resize(world.spec, plan.status.phase or "Pending", incarnation, size, current, world.now,
                    last_resize=parse_time(plan.status.last_resize_time), new_checkpoint=_new_checkpoint(world, plan),
                    recreating={p.name for p, _ in kept_off})
    if sizing.resize is not None:
        _begin_resize(world, plan, current, sizing.resize)
        return
    if sizing.recheck_after is not None:
        plan.requeue(sizing.recheck_after)
    if _startup_timed_out(world, plan, current):
        return
    rejected = [(p, o) for p, o in zip(current, outcomes, strict=True) if o.outcome is Outcome.REJECTED]
    if any(not p.deleting for p, _ in rejected) and _recreate_rejected(world, plan, current, rejected):
        return
    _recreate_kept_off(plan, kept_off)
    _create_missing(world, plan, incarnation, plan.status.resume_from or "", pods=plan.status.phase == "Pending")
    running = [p for p in current if p.phase == "Running" and p.ready and not p.deleting]
    if plan.status.phase == "Pending" and len(running) == size:
        _transition(world, plan, "Running", Event(
            "Normal", "Running", f"all {size} ranks of incarnation {incarnation} are running"))


def _new_checkpoint(world: _World, plan: _Plan) -> LastCheckpoint | None:
    """The newest complete checkpoint if this decision is the first to see it (the status had
    another before it), else ``None``: the moment right after a checkpoint, when an elastic job
    grows (:mod:`torpor_operator.sizing`, row 4)."""
    newest = plan.status.last_checkpoint
    if world.checkpoints is None or newest is None or newest == world.job.status.last_checkpoint:
        return None
    return newest


def _begin_resize(world: _World, plan: _Plan, current: list[PodView], change: Resize) -> None:
    """Stop the incarnation for a new world size (stop reason ``Resize``).

    A graceful resize (a changed ``spec.replicas``, an elastic job growing back) is a graceful
    stop like a spec change: every rank saves at one step, and the next incarnation, made with
    ``spec.replicas`` ranks, resumes from that checkpoint. A shrink comes while ranks wait in
    the rendezvous for one that was never placed, so none of them has trained: the stop is
    recorded first (``nextWorldSize`` carries the size to the next launch), and the next decision,
    Stopping, deletes the pods (:func:`_shrinking`). Deleting them in this decision would let an
    operator that dies before the status patch find ranks being deleted and no stop — a
    preemption."""
    if change.graceful:
        plan.update(next_world_size=None)
        _begin_stop(world, plan, current, "Resize", change.message, to=change.to)
        return
    plan.update(stop_reason="Resize", stop_message=change.message, stop_requested_at=format_time(world.now),
                next_world_size=change.to)
    _transition(world, plan, "Stopping", Event("Warning", "Resizing",
                                               f"{change.message}; deleting the ranks, none has trained yet"))
    plan.requeue(0.0)


def _shrinking(status: JobStatus) -> bool:
    """A ``Resize`` stop of an incarnation that never trained (an elastic shrink, :func:`_begin_resize`)."""
    return status.stop_reason == "Resize" and status.next_world_size is not None


def _stop_grace(status: JobStatus, pod: PodView) -> int | None:
    """The grace period a stop deletes a live rank with: its own, but for a shrink, whose ranks wait
    in the rendezvous with nothing to save (:data:`~torpor_operator.sizing.UNTRAINED_RANK_GRACE_SECONDS`;
    0 for a rank never scheduled, which never ran)."""
    if not _shrinking(status):
        return None
    return 0 if pod.node is None else UNTRAINED_RANK_GRACE_SECONDS


def _completing(world: _World, plan: _Plan, current: list[PodView], rank_0: RankOutcome) -> bool:
    """The success policy: rank 0's completion is the job's (PyTorchJob's rule for its master).

    The others usually finish the same last step within moments; one still running after
    ``exitDeadlineSeconds`` from rank 0's ``finishedAt`` is blocked in a collective rank 0 will
    never join, and is deleted (stop reason ``Completion``) instead of waiting for its collective
    timeout. Peers that crash on the lost connection to rank 0 are part of that ending, not
    failures (the caller only comes here when every crash is a lost connection). Returns whether
    the decision is made here: always, once every rank has a pod."""
    if {p.rank for p in current} != set(range(world.size(plan.status))):
        return False
    live = [p for p in _live(current) if not p.deleting]
    if not _live(current):
        _finish(world, plan, plan.status.incarnation)
        return True
    if rank_0.ended_at is None or not live:
        plan.requeue(MAX_REQUEUE_SECONDS)
        return True
    deadline = rank_0.ended_at + timedelta(seconds=world.spec.graceful_exit.exit_deadline_seconds)
    if world.now < deadline:
        plan.requeue((deadline - world.now).total_seconds())
        return True
    ranks = ", ".join(str(p.rank) for p in live)
    message = (f"rank 0 completed; ranks {ranks} still running {world.spec.graceful_exit.exit_deadline_seconds}s "
               "after it are stopped")
    plan.update(stop_reason="Completion", stop_message=message, stop_requested_at=format_time(world.now))
    for p in live:
        plan.delete.append(ObjectRef("v1", "Pod", p.name))
    _transition(world, plan, "Stopping", Event("Normal", "Completing", message))
    plan.requeue(world.spec.graceful_exit.exit_deadline_seconds)
    return True


def _awaiting_silent_rank(world: _World, plan: _Plan, current: list[PodView], crashed: list[RankOutcome]) -> bool:
    """Whether to hold a failure decision: every crashed rank lost its connection to a peer,
    and some rank still reads as running — the sign of a node that stopped reporting, whose
    NotReady (the evidence that makes those crashes collateral) comes only after the node
    controller's grace period. Held at most ``TORPOR_PEER_LOSS_GRACE_SECONDS`` after the first
    crash; the silent rank ending, or evidence arriving, decides earlier."""
    if not all(o.lost_peer for o in crashed) or not _live(current):
        return False
    first = min((o.ended_at for o in crashed if o.ended_at is not None), default=None)
    if first is None:
        return False
    deadline = first + timedelta(seconds=world.settings.peer_loss_grace_seconds)
    if world.now >= deadline:
        return False
    plan.requeue((deadline - world.now).total_seconds())
    return True


def _startup_timed_out(world: _World, plan: _Plan, current: list[PodView]) -> bool:
    """A rank still Pending ``spec.startupTimeoutSeconds`` after its pod was created (never
    scheduled, its image not pulled, its Secret missing) would leave the others blocking in the
    rendezvous until its timeout, holding their capacity: the incarnation is torn down as a
    failure (maxRestarts, backoff), the pod's own reason in the message. Returns whether it was.

    A late rank counts while it is being deleted too: the deletion is this very decision's, made
    by an operator that died before its status patch, and the next one must reach the same end
    (a restart), not count the deletion as something else."""
    timeout = timedelta(seconds=world.spec.startup_timeout_seconds)
    late = []
    for p in current:
        if p.phase != "Pending" or p.created is None:
            continue
        if world.now >= p.created + timeout:
            late.append(p)
        else:
            plan.requeue((p.created + timeout - world.now).total_seconds())
    if not late:
        return False
    p = late[0]
    why = p.not_starting or "still Pending"
    detail = f"rank {p.rank} (pod {p.name}) did not start within {world.spec.startup_timeout_seconds}s: {why}"
    detail += f" (and {len(late) - 1} more)" if len(late) > 1 else ""
    _begin_failure(world, plan, current, [], detail=detail, reason="StartupTimeout")
    return True


def _recreate_rejected(world: _World, plan: _Plan, current: list[PodView],
                       rejected: list[tuple[PodView, RankOutcome]]) -> bool:
    """Delete the pods the kubelet refused, so that they are created again once gone.

    Counted in ``admissionRejections`` (in the same patch as the deletion, which is applied
    first: an operator dying in between undercounts, never counts twice). Past
    ``TORPOR_ADMISSION_RETRIES`` for the incarnation the rejection is a failure; returns whether
    the incarnation is ending.
    """
    bound, done = world.settings.admission_retries, plan.status.admission_rejections
    fresh = [(p, o) for p, o in rejected if not p.deleting]
    if done + len(fresh) > bound:
        first = fresh[0][1]
        detail = (f"{first.detail}; past the {bound} admission retries of incarnation "
                  f"{plan.status.incarnation}")
        _begin_failure(world, plan, current, [dataclasses.replace(first, detail=detail)])
        return True
    for n, (p, o) in enumerate(fresh, done + 1):
        plan.delete.append(ObjectRef("v1", "Pod", p.name))
        plan.events.append(Event("Warning", "RankRejected",
                                 f"{o.detail}; recreating it (admission retry {n}/{bound}, not a failure)"))
    plan.update(admission_rejections=done + len(fresh))
    return False


def _spec_changed(world: _World, current: list[PodView]) -> str | None:
    """Why the live ranks no longer match the spec, or ``None``.

    A rank's pod carries the digests of the spec parts it was made from
    (:mod:`torpor_operator.shaping`); a part whose digest differs from the spec's now would make
    another pod, and a pod's containers cannot change, so the incarnation is replaced through a
    graceful restart — neither a preemption nor a failure. A pod without digests (made by an
    earlier operator version) says nothing: an upgrade of the operator restarts no job."""
    wanted = shape_digests(world.spec)
    parts: list[str] = []
    for p in current:
        if not p.terminated and not p.deleting:
            parts += [part for part in changed_parts(p.shape, wanted) if part not in parts]
    if "replicas" in parts and world.size(world.job.status) == world.spec.replicas:
        parts.remove("replicas")  # the ranks run the size asked for already (an elastic job that ran short)
    if not parts or parts == ["replicas"]:  # a change of size alone is a resize (torpor_operator.sizing)
        return None
    names = " and ".join(f"spec.{part}" for part in sorted(parts, key=list(wanted).index))
    return (f"{names} changed since incarnation {world.job.status.incarnation} was made "
            f"(generation {world.job.generation})")


def _kept_off_and_back(world: _World, current: list[PodView]) -> list[tuple[PodView, list[str]]]:
    """The Pending, unscheduled ranks whose required affinity keeps them off a node that is back
    (uncordoned, its termination taint removed, Ready again), with those nodes."""
    taints = world.settings.termination_taints
    found = []
    for p in current:
        if p.phase != "Pending" or p.node is not None or p.deleting or not p.avoided_nodes:
            continue
        back = nodes_back(p.avoided_nodes, world.nodes, taints)
        if back:
            found.append((p, back))
    return found


def _recreate_kept_off(plan: _Plan, kept_off: list[tuple[PodView, list[str]]]) -> None:
    """Delete the ranks :func:`_kept_off_and_back` found, so that they are made again with the
    nodes going away now (:mod:`torpor_operator.placing`).

    The pod never ran: deleted with grace 0 it is gone at once (an unscheduled pod is, anyway),
    and the next decision makes it again in the same incarnation — no failure, no preemption.
    Its startup timeout starts again with the new pod."""
    for p, back in kept_off:
        plan.delete.append(ObjectRef("v1", "Pod", p.name, grace_period_seconds=0))
        plan.events.append(Event("Normal", "RankRecreated",
                                 f"rank {p.rank} (pod {p.name}) is Pending, kept off {', '.join(back)} while it was "
                                 "going away; it is back: making the pod again so that it may be scheduled there"))


def _begin_stop(world: _World, plan: _Plan, current: list[PodView], reason: str, message: str, *,
                to: int | None = None) -> None:
    """Write GracefulExit 1 and touch every live rank so kubelet refreshes the file at once
    (``to``: the world size a ``Resize`` stop restarts with)."""
    stamp = format_time(world.now)
    changes: dict[str, Any] = {"stop_reason": reason, "stop_message": message, "stop_requested_at": stamp}
    if reason == "Preemption":
        changes["preemptions"] = plan.status.preemptions + 1
    plan.update(**changes)
    _request_exit(world, plan, current)
    if reason == "Preemption":
        event = Event("Warning", "Preempted", f"{message}; asking every rank to save and exit")
    elif reason == "SpecChanged":
        event = Event("Normal", "SpecChanged",
                      f"{message}; asking every rank to save and exit, then restarting with the new spec")
    elif reason == "Resize":
        event = Event("Normal", "Resizing",
                      f"{message}; asking every rank to save and exit, then restarting with WORLD_SIZE {to}")
    else:
        event = Event("Normal", "Suspending", f"{message}; asking every rank to save")
    _transition(world, plan, "Stopping", event)
    plan.requeue(world.spec.graceful_exit.exit_deadline_seconds)


def _request_exit(world: _World, plan: _Plan, current: list[PodView]) -> None:
    """Write the flag (unless the observed ConfigMap has it) and annotate live ranks not yet told."""
    incarnation = plan.status.incarnation
    name = config_map_name(world.job.ref.name, incarnation)
    observed = world.children.get(("ConfigMap", name))
    if observed is None or read_graceful_exit(dict(observed)) != 1:
        plan.graceful_exit = (name, 1)
    stamp = plan.status.stop_requested_at or format_time(world.now)
    for p in _live(current):
        if not p.deleting and p.exit_requested_at != stamp:
            plan.annotate.append((p.name, {ANNOTATION_EXIT_REQUESTED: stamp}))


def _begin_failure(world: _World, plan: _Plan, current: list[PodView], crashed: list[RankOutcome], *,
                   detail: str = "", reason: str = "Failure") -> None:
    """A rank crashed (or could not start: ``detail`` and ``reason`` say so): the others cannot
    finish a collective without it, so delete them now.

    The message leads with a crash that is not a lost connection: the rank that failed by itself,
    not the peers that then lost their connection to it."""
    if not detail:
        crashed = sorted(crashed, key=lambda o: o.lost_peer)
        detail = crashed[0].detail + (f" (and {len(crashed) - 1} more)" if len(crashed) > 1 else "")
    spec, s = world.spec, plan.status
    event_reason = "RankFailed" if reason == "Failure" else reason
    if s.restarts >= spec.max_restarts:
        plan.update(stop_reason="MaxRestartsExceeded", stop_message=f"{detail}; maxRestarts {spec.max_restarts} "
                    "exhausted", stop_requested_at=format_time(world.now))
        event = Event("Warning", event_reason, plan.status.stop_message or "")
    else:
        restarts = s.restarts + 1
        delay = world.settings.backoff_seconds(restarts)
        plan.update(restarts=restarts, stop_reason=reason, stop_message=detail,
                    stop_requested_at=format_time(world.now),
                    next_restart_time=format_time(world.now + timedelta(seconds=delay)))
        event = Event("Warning", event_reason,
                      f"{detail}; restart {restarts}/{spec.max_restarts} in {delay:g}s from the newest checkpoint")
    for p in _live(current):
        if not p.deleting:
            plan.delete.append(ObjectRef("v1", "Pod", p.name))
    _transition(world, plan, "Stopping", event)
    plan.requeue(world.spec.graceful_exit.exit_deadline_seconds)


def _stopping(world: _World, plan: _Plan) -> None:
    """Wait for every rank of the incarnation to exit; delete stragglers past the deadline."""
    s = plan.status
    current = world.pods_of(s.incarnation)
    abandoned = _abandon_peers_of_lost(world, plan, _live(current))
    live = _release_lost(world, plan, _live(current))
    requested = parse_time(s.stop_requested_at) or world.now
    deadline = requested + timedelta(seconds=world.spec.graceful_exit.exit_deadline_seconds)
    graceful = s.stop_reason in _GRACEFUL_STOPS and not _shrinking(s)
    if graceful:
        # Also with no rank left: an operator that died after writing the Stopping status but
        # before the flag must end in the state it would have reached, flag included.
        if live or world.exists("ConfigMap", config_map_name(world.job.ref.name, s.incarnation)):
            _request_exit(world, plan, current)
        late = [p for p in live if not p.deleting and p.name not in abandoned and world.now >= deadline]
    else:
        late = [p for p in live if not p.deleting and p.name not in abandoned]
    for p in late:
        plan.delete.append(ObjectRef("v1", "Pod", p.name, grace_period_seconds=_stop_grace(s, p)))
    if late and graceful:
        ranks = ", ".join(str(p.rank) for p in late)
        plan.events.append(Event("Warning", "ExitDeadlineExceeded",
                                 f"ranks {ranks} did not exit within {world.spec.graceful_exit.exit_deadline_seconds}s "
                                 "of GracefulExit; deleting them (they get SIGTERM and their grace period)"))
    if live:
        plan.requeue((deadline - world.now).total_seconds() if world.now < deadline else MAX_REQUEUE_SECONDS)
        return
    outcomes = [world.classify(p) for p in current]
    finished = [o for o in outcomes if o.outcome is Outcome.FINISHED]
    if len(finished) == world.size(s) or s.stop_reason == "Completion":
        _finish(world, plan, s.incarnation)
    elif s.stop_reason == "MaxRestartsExceeded":
        plan.update(completion_time=format_time(world.now))
        _release(world, plan)
        _transition(world, plan, "Failed", Event("Warning", "MaxRestartsExceeded", s.stop_message or "failed"))
    elif world.spec.suspend:
        _release(world, plan)
        _transition(world, plan, "Suspended", Event("Normal", "Suspended", _saved_message(world, plan, outcomes)))
    else:
        restart_at = parse_time(s.next_restart_time)
        message = _saved_message(world, plan, outcomes)
        if s.stop_reason == "Preemption":
            restart_at, message = _preemption_backoff(world, plan, restart_at, message)
        elif s.stop_reason not in _GRACEFUL_STOPS and s.stop_message:
            message = _failed_restart_message(world, plan, message)
        _transition(world, plan, "Restarting", Event("Normal", "Restarting", message))
        plan.requeue((restart_at - world.now).total_seconds() if restart_at else 0.0)


def _preemption_backoff(world: _World, plan: _Plan, restart_at: datetime | None,
                        message: str) -> tuple[datetime | None, str]:
    """A preemption after which no checkpoint is newer than the one the incarnation resumed from
    made no progress; the k-th in a row waits the failure backoff of k before the restart, so a
    loop of preemptions that never saves (a node pool reclaimed every minute, a save that never
    completes) does not spin. Progress resets the count and restarts at once.

    A newest checkpoint written after the stop was requested is progress too, whatever its name:
    an exit save may rewrite the name the incarnation resumed from (``Net``). Its time is the
    store's clock, the request's the operator's: skew can only make a rewritten ``Net`` look
    old, which costs one backoff, never a loop."""
    s = plan.status
    newest = s.last_checkpoint
    written, requested = (parse_time(newest.time) if newest else None), parse_time(s.stop_requested_at)
    if newest is not None and (newest.name != (s.resume_from or "")
                               or (written is not None and requested is not None and written >= requested)):
        plan.update(preemptions_without_progress=0)
        return restart_at, message
    k = s.preemptions_without_progress + 1
    delay = world.settings.backoff_seconds(k)
    restart_at = world.now + timedelta(seconds=delay)
    plan.update(preemptions_without_progress=k, next_restart_time=format_time(restart_at))
    since = s.resume_from or "none: a fresh start"
    return restart_at, (f"{message}; no checkpoint newer than the one it resumed from ({since}): restarting in "
                        f"{delay:g}s ({k} preemption{'s' if k > 1 else ''} in a row without progress)")


def _failed_restart_message(world: _World, plan: _Plan, saved: str) -> str:
    """Ready's message during the backoff after a failure: why it failed (the crash, the pod's own
    reason it could not start) first, so that it stays visible in a condition until the next
    incarnation, then what was saved and when the restart comes."""
    s = plan.status
    when = f"; restart {s.restarts}/{world.spec.max_restarts} at {s.next_restart_time}" if s.next_restart_time else ""
    return f"{s.stop_reason}: {s.stop_message}; {saved}{when}"


def _saved_message(world: _World, plan: _Plan, outcomes: list[RankOutcome]) -> str:
    saved = sorted({o.checkpoint for o in outcomes if o.outcome is Outcome.STOPPED and o.checkpoint})
    last = plan.status.last_checkpoint
    newest = f"newest complete checkpoint {last.name} (step {last.step})" if last else "no complete checkpoint"
    what = f"ranks saved {', '.join(saved)}; " if saved else ""
    return f"all ranks of incarnation {plan.status.incarnation} exited after {plan.status.stop_reason}; {what}{newest}"


def _release(world: _World, plan: _Plan) -> None:
    """Delete the Service, ConfigMap and PDB of a job that stops for good or for a while; pods stay for their logs."""
    _delete_children_before(world, plan, plan.status.incarnation + 1, pods=False)


def _finish(world: _World, plan: _Plan, incarnation: int) -> None:
    plan.update(completion_time=format_time(world.now))
    _release(world, plan)
    _transition(world, plan, "Succeeded", Event(
        "Normal", "Succeeded", f"all {world.size(plan.status)} ranks of incarnation {incarnation} completed"))


def _restarting(world: _World, plan: _Plan) -> None:
    """Start the next incarnation once the old ranks are gone and the backoff has passed."""
    s = plan.status
    if world.spec.suspend:
        _release(world, plan)
        _transition(world, plan, "Suspended", Event("Normal", "Suspended", "spec.suspend is true"))
        return
    live = [p for p in _live(world.pods) if p.incarnation <= s.incarnation]
    stragglers = _release_lost(world, plan, live)
    if live:
        for p in stragglers:
            if not p.deleting:
                plan.delete.append(ObjectRef("v1", "Pod", p.name))
        plan.requeue(MAX_REQUEUE_SECONDS)
        return
    restart_at = parse_time(s.next_restart_time)
    if restart_at is not None and world.now < restart_at:
        plan.requeue((restart_at - world.now).total_seconds())
        return
    _launch(world, plan, s.incarnation + 1, "Restarted", f"after {s.stop_reason or 'a stop'}")


def _suspended(world: _World, plan: _Plan) -> None:
    if world.spec.suspend:
        _release(world, plan)
        return
    if plan.status.start_time is None:
        plan.update(start_time=format_time(world.now))
    _launch(world, plan, plan.status.incarnation + 1, "Resumed", "spec.suspend is false")
