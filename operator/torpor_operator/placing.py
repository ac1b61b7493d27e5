"""Which nodes a new rank is kept off, and when a Pending rank should be made again.

A rank started on a node that is being drained or reclaimed is stopped again within minutes,
and every other rank with it (one more save, one more restart). So when the operator makes a
rank's pod it keeps it off the nodes going away *now* — cordoned, carrying a termination taint
(``TORPOR_TERMINATION_TAINTS``), or lost — with a *required* node affinity
(``metadata.name NotIn [...]``), and records the names in the ``torpor.dev/avoided-nodes``
annotation.

Only nodes the scheduler would otherwise allow are listed: a cordon keeps off every pod that
does not tolerate ``node.kubernetes.io/unschedulable:NoSchedule``, and a ``NoSchedule`` or
``NoExecute`` taint every pod that does not tolerate it, so for most templates the list is
empty; it matters for templates that tolerate broadly (``operator: Exists``) and for
``PreferNoSchedule`` termination taints. A node the scheduler keeps off by itself is free
again the moment it is uncordoned; a node on the list is not (a pod's affinity cannot change),
so :func:`nodes_back` tells the reconcile which Pending, unscheduled ranks to delete and make
again with a fresh list.

Why required and not preferred: a preferred term lets the scheduler put a rank on a node being
drained whenever nothing else fits, and that rank's eviction then costs the whole job another
preemption; a required term keeps it Pending — within ``startupTimeoutSeconds`` — until a node
that stays is free or the node comes back.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, Literal

from torpor_operator.observing import NodeView

__all__ = ["UNSCHEDULABLE_TAINT", "node_change", "nodes_back", "nodes_to_avoid", "scheduler_keeps_off", "tolerates"]

#: The taint a cordoned node is treated as having by the scheduler's NodeUnschedulable filter.
UNSCHEDULABLE_TAINT = "node.kubernetes.io/unschedulable"
#: Taint effects the scheduler's TaintToleration filter enforces (PreferNoSchedule only scores).
_HARD_EFFECTS = ("NoSchedule", "NoExecute")


def tolerates(tolerations: Iterable[Mapping[str, Any]], key: str, value: str, effect: str) -> bool:
    """Whether one of ``tolerations`` matches the taint, by Kubernetes' rule: an empty effect
    matches every effect, an empty key with ``Exists`` every key, ``Equal`` (the default
    operator) needs the same value."""
    for t in tolerations:
        if t.get("effect") and t.get("effect") != effect:
            continue
        if t.get("key") and t.get("key") != key:
            continue
        if (t.get("operator") or "Equal") == "Exists" or str(t.get("value") or "") == value:
            return True
    return False


def scheduler_keeps_off(node: NodeView, tolerations: Iterable[Mapping[str, Any]]) -> bool:
    """Whether the scheduler never places a pod with ``tolerations`` on ``node`` by itself: the
    node is cordoned and the pod does not tolerate the unschedulable taint, or the node has a
    ``NoSchedule``/``NoExecute`` taint the pod does not tolerate."""
    tolerations = list(tolerations)
    if node.unschedulable and not tolerates(tolerations, UNSCHEDULABLE_TAINT, "", "NoSchedule"):
        return True
    return any(t.effect in _HARD_EFFECTS and not tolerates(tolerations, t.key, t.value, t.effect)
               for t in node.taint_details)


def _unwanted(node: NodeView, termination_taints: Iterable[str]) -> bool:
    return node.going_away(termination_taints) is not None or node.lost() is not None


def nodes_to_avoid(nodes: Iterable[NodeView], tolerations: Iterable[Mapping[str, Any]],
                   termination_taints: Iterable[str]) -> list[str]:
    """The nodes a new rank's pod must be kept off, sorted: going away or lost now, and not
    already kept off by the scheduler."""
    tolerations, taints = list(tolerations), tuple(termination_taints)
    return sorted(n.name for n in nodes if _unwanted(n, taints) and not scheduler_keeps_off(n, tolerations))


def nodes_back(avoided: Iterable[str], nodes: Mapping[str, NodeView], termination_taints: Iterable[str]) -> list[str]:
    """Of the nodes a pod was kept off, those that are neither going away nor lost any more, in
    the given order. A node that no longer exists is not back."""
    taints = tuple(termination_taints)
    return [name for name in avoided if name in nodes and not _unwanted(nodes[name], taints)]


def node_change(before: NodeView | None, after: NodeView,
                termination_taints: Iterable[str]) -> Literal["away", "back"] | None:
    """What a node's watch event means for jobs: ``away`` when it is now going away or lost and
    was not, or for another reason (the jobs with ranks on it must stop them); ``back`` when it
    was and is no more (the jobs with Pending ranks kept off it may place them there now);
    ``None`` otherwise. ``before`` is ``None`` for the first event of a node the operator sees."""
    taints = tuple(termination_taints)

    def why(node: NodeView) -> str | None:
        return node.going_away(taints) or node.lost()

    was, now = (why(before) if before else None), why(after)
    if now == was:
        return None
    return "away" if now is not None else "back"
