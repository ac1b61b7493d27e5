"""How many ranks an incarnation gets, and when a live job changes its size (pure).

The ranks of one incarnation share one ``WORLD_SIZE`` (``status.worldSize``), always: a change
of size is a new incarnation, reached through a stop with reason ``Resize``, and the runtime
resumes the checkpoint written by N ranks on M (model and optimizer resharded, the data
position kept as samples consumed). So two decisions are made here, each a short table whose
first matching row wins; docs/operator.md ("Resize and elastic") shows the same tables.

:func:`resize`, while an incarnation is Pending or Running:

== ======== ==================================================== ===============================
#  phase    observed                                             decision
== ======== ==================================================== ===============================
1  any      ``spec.replicas`` differs from the world size, and   graceful resize to
            the live ranks were made for another                 ``spec.replicas``: every rank
            ``spec.replicas`` (a user's change), or the job is   saves at one step first
            not elastic, or it runs more ranks than
            ``spec.replicas``
2  Pending  elastic; a rank still unschedulable                  resize to the ranks placed; the
            ``waitSeconds`` after its pod was made; at least     pods are deleted, not asked to
            ``minReplicas`` ranks placed (they have a node)      save: the rendezvous needs every
                                                                 rank, so none has trained
3  Pending  as 2, fewer than ``minReplicas`` placed              none: ``startupTimeoutSeconds``
                                                                 decides, as without elastic
4  Running  elastic; fewer ranks than ``spec.replicas``;         graceful resize to
            ``growIntervalSeconds`` since ``lastResizeTime``;    ``spec.replicas``
            this decision is the first to see a new complete
            checkpoint (or the job writes no periodic ones)
== ======== ==================================================== ===============================

:func:`launch_size`, when an incarnation is made:

== ==================================================== ===================================
#  observed                                             world size
== ==================================================== ===================================
5  pods of the incarnation exist (a half-applied        their ``WORLD_SIZE``
   launch)
6  ``status.nextWorldSize`` (set by row 2)              it, at most ``spec.replicas``
7  otherwise                                            ``spec.replicas``: every new
                                                        incarnation asks for every rank
== ==================================================== ===================================

How "as many as fit" is known: the scheduler says so. A rank whose pod has a node fits; one
whose ``PodScheduled`` condition is False with reason ``Unschedulable`` does not (too little
capacity, a node selector or affinity nothing satisfies, the operator keeping it off nodes
going away). The operator simulates no scheduling. Nor does it guess when capacity returns:
it tries (row 4), at most every ``growIntervalSeconds`` and right after a complete checkpoint,
so a try that cannot place every rank costs one restart and ``waitSeconds``, and never a step.

Nor does it know whether the script can resume on the new size: the runtime refuses with
``torpor.ResizeError`` where it cannot, which is a failure (:mod:`torpor_operator.outcomes`
names the size), and these tables then ask for the same sizes again; docs/operator.md ("A resize
the script refuses") says what that leads to.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from torpor_operator.observing import PodView, format_time
from torpor_operator.shaping import shape_digests
from torpor_operator.spec import TrainingJobSpec
from torpor_operator.status import LastCheckpoint

__all__ = ["UNTRAINED_RANK_GRACE_SECONDS", "Resize", "Sizing", "launch_size", "placed", "resize", "unplaced"]

#: Grace period, seconds, of the placed ranks of an incarnation that shrinks (row 2). They wait
#: in the rendezvous for a rank that was never scheduled, so they have nothing to save and do not
#: see SIGTERM inside it; not 0, so that each pod stays in the API until its kubelet has stopped
#: the process and the smaller incarnation never starts beside it.
UNTRAINED_RANK_GRACE_SECONDS = 5


@dataclass(frozen=True)
class Resize:
    """A change of world size: the reconcile turns it into a stop with reason ``Resize``."""

    to: int
    """``WORLD_SIZE`` of the next incarnation."""
    message: str
    """Why, for the status and the Events."""
    graceful: bool
    """Every rank saves and exits first (GracefulExit); ``False``: the incarnation never trained,
    its pods are deleted (row 2)."""
    row: int
    """The row of the table that decided (the tests name it)."""


@dataclass(frozen=True)
class Sizing:
    """What :func:`resize` decided: a resize, or when to look again (``None``: at the next event)."""

    resize: Resize | None = None
    recheck_after: float | None = None
    """Seconds until a row may apply without any other event (a wait or an interval passing)."""


def placed(pods: Sequence[PodView]) -> list[PodView]:
    """The ranks that fit: their pod has a node, and is neither ended nor being deleted."""
    return [p for p in pods if p.node is not None and not p.terminated and not p.deleting]


def unplaced(pods: Sequence[PodView], recreating: Collection[str] = ()) -> list[PodView]:
    """The ranks that do not fit: Pending, no node, the scheduler said ``Unschedulable``. Pods
    about to be made again (``recreating``: kept off a node that is back) are not counted."""
    return [p for p in pods if p.phase == "Pending" and p.unschedulable and not p.deleting
            and p.name not in recreating]


def _replicas_changed(spec: TrainingJobSpec, pods: Sequence[PodView]) -> bool:
    """Whether a live rank was made for another ``spec.replicas`` (its ``replicas`` shape digest
    differs); a pod without digests says nothing."""
    wanted = shape_digests(spec)["replicas"]
    return any(p.shape.get("replicas", wanted) != wanted for p in pods if not p.terminated and not p.deleting)


def resize(
    spec: TrainingJobSpec,
    phase: str,
    incarnation: int,
    size: int,
    pods: Sequence[PodView],
    now: datetime,
    *,
    last_resize: datetime | None,
    new_checkpoint: LastCheckpoint | None,
    recreating: Collection[str] = (),
) -> Sizing:
    """Rows 1-4 of the module's table.

    Args:
        spec: the job's spec now.
        phase: ``Pending`` or ``Running``.
        incarnation: the current incarnation.
        size: its world size.
        pods: its pods.
        now: the current time.
        last_resize: ``status.lastResizeTime``.
        new_checkpoint: the newest complete checkpoint if this decision is the first to see it
            (it differs from ``status.lastCheckpoint`` before the decision), else ``None``.
        recreating: pods the reconcile is about to make again (not counted as unplaced).
    """
    replicas, elastic = spec.replicas, spec.elastic
    changed = _replicas_changed(spec, pods)
    if replicas != size and (elastic is None or size > replicas or changed):
        why = (f"spec.replicas changed to {replicas} while incarnation {incarnation} runs with WORLD_SIZE {size}"
               if changed or elastic is None
               else f"spec.replicas is {replicas}, fewer than the {size} ranks of incarnation {incarnation}")
        return Sizing(Resize(replicas, why, graceful=True, row=1))
    if elastic is None:
        return Sizing()
    if phase == "Pending":
        return _shrink(pods, size, elastic.min_replicas, elastic.wait_seconds, now, recreating)
    if phase == "Running" and size < replicas:
        return _grow(spec, size, now, last_resize, new_checkpoint)
    return Sizing()


def _shrink(pods: Sequence[PodView], size: int, min_replicas: int, wait_seconds: int, now: datetime,
            recreating: Collection[str]) -> Sizing:
    """Rows 2 and 3: ranks unschedulable for ``wait_seconds`` since their pod was made."""
    waiting = unplaced(pods, recreating)
    if not waiting:
        return Sizing()
    wait = timedelta(seconds=wait_seconds)
    late = [p for p in waiting if p.created is not None and now >= p.created + wait]
    if not late:
        pending = [p.created + wait - now for p in waiting if p.created is not None]
        return Sizing(recheck_after=min(pending).total_seconds() if pending else None)
    fit = len(placed(pods))
    if fit < min_replicas:  # row 3
        return Sizing()
    first = min(late, key=lambda p: p.rank)
    more = f" (and {len(late) - 1} more)" if len(late) > 1 else ""
    why = first.not_starting or "Unschedulable"
    message = (f"rank {first.rank} (pod {first.name}) could not be placed within elastic.waitSeconds {wait_seconds}s "
               f"({why}){more}; {fit} of {size} ranks were: restarting with WORLD_SIZE {fit} "
               f"(elastic.minReplicas {min_replicas})")
    return Sizing(Resize(fit, message, graceful=False, row=2))


def _grow(spec: TrainingJobSpec, size: int, now: datetime, last_resize: datetime | None,
          new_checkpoint: LastCheckpoint | None) -> Sizing:
    """Row 4: try every rank again, at most every ``growIntervalSeconds``, right after a checkpoint."""
    assert spec.elastic is not None
    interval = spec.elastic.grow_interval_seconds
    periodic = spec.checkpoint.save_steps is not None or spec.checkpoint.save_seconds is not None
    since = f" since {format_time(last_resize)}" if last_resize is not None else ""
    if last_resize is not None and now < last_resize + timedelta(seconds=interval):
        # with periodic checkpoints, the listing that finds the next one reconciles the job anyway
        left = (last_resize + timedelta(seconds=interval) - now).total_seconds()
        return Sizing(recheck_after=None if periodic else left)
    if periodic and new_checkpoint is None:
        return Sizing()
    after = (f"checkpoint {new_checkpoint.name} (step {new_checkpoint.step}) is complete"
             if new_checkpoint is not None else "the job writes no periodic checkpoints")
    message = (f"running with {size} of {spec.replicas} ranks{since}; elastic.growIntervalSeconds {interval}s "
               f"has passed and {after}: trying all {spec.replicas} ranks again")
    return Sizing(Resize(spec.replicas, message, graceful=True, row=4))


def launch_size(spec: TrainingJobSpec, next_world_size: int | None, existing: Collection[int]) -> int:
    """Rows 5-7: the world size of an incarnation being made.

    Args:
        spec: the job's spec now.
        next_world_size: ``status.nextWorldSize``.
        existing: ``WORLD_SIZE`` of the incarnation's pods that exist already (a launch whose
            status patch was lost); they keep theirs, so one incarnation never mixes two.
    """
    if existing:
        return min(existing)
    if next_world_size is not None:
        return max(1, min(next_world_size, spec.replicas))
    return spec.replicas
