"""Properties of ``decide`` over random histories: it converges, never duplicates, and survives
an operator that dies half-way through applying a decision.

Two copies of the same job see the same events (pods run, crash, save, nodes are cordoned,
time passes, suspend flips…). After each event copy A applies every decision in full until
nothing is left to do; copy B first applies only a random part of one decision — as an
operator killed mid-way would — and then does the same. Both must end in the same state:
same status, same pods, same children. Restarts and preemptions are never counted twice, and
no object is ever created twice (the stand-in asserts that on every create).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_operator_world import Cluster, ckpt, job_body, message, node

from torpor_operator.contract import LABEL_INCARNATION, LABEL_RANK
from torpor_operator.observing import format_time

REPLICAS = 2
MAX_RESTARTS = 3


def _live_pod(c: Cluster, rank: int) -> dict[str, Any] | None:
    for p in c.live_pods():
        if int(p["metadata"]["labels"][LABEL_RANK]) == rank:
            return p
    return None


def _on_pod(action: Callable[[Cluster, dict[str, Any], int], None]) -> Callable[[Cluster, int], None]:
    def run(c: Cluster, rank: int) -> None:
        p = _live_pod(c, rank)
        if p is not None:
            action(c, p, rank)
    return run


def _exit(code: int, text: Callable[[], str]) -> Callable[[Cluster, int], None]:
    def act(c: Cluster, p: dict[str, Any], rank: int) -> None:
        c.exit(rank, code, text(), incarnation=int(p["metadata"]["labels"][LABEL_INCARNATION]))
    return _on_pod(act)


def _toggle_suspend(c: Cluster, _: int) -> None:
    c.body["spec"]["suspend"] = not c.body["spec"].get("suspend", False)


def _add_checkpoint(c: Cluster, _: int) -> None:
    assert c.checkpoints is not None
    n = len(c.checkpoints) + 1
    c.checkpoints.append(ckpt(f"CKP-1_{n * 10}", n * 10, n))


def _lost_connection(c: Cluster, p: dict[str, Any], rank: int) -> None:
    text = message("error", 1).replace('"reason"', '"error":"RuntimeError: Connection reset by peer","reason"')
    c.exit(rank, 1, text, incarnation=int(p["metadata"]["labels"][LABEL_INCARNATION]),
           finished_at=format_time(c.now))


def _vanish(c: Cluster, _: int) -> None:
    c.vanish_deleted()


def _unschedulable(c: Cluster, rank: int) -> None:
    """The scheduler finds no node for the rank's Pending pod (made now), and places the other
    Pending ranks (they wait in the rendezvous)."""
    p = _live_pod(c, rank)
    if p is None or p["status"].get("phase") != "Pending" or "deletionTimestamp" in p["metadata"]:
        return
    for other in c.live_pods():
        if other is not p and other["status"].get("phase") == "Pending":
            other["spec"]["nodeName"] = "node-a"
    p["metadata"]["creationTimestamp"] = format_time(c.now)
    p["spec"].pop("nodeName", None)
    p["status"] = {"phase": "Pending", "conditions": [
        {"type": "PodScheduled", "status": "False", "reason": "Unschedulable", "message": "0/2 nodes"}]}


def _resize(c: Cluster, _: int) -> None:
    """A user changes spec.replicas between 2 and 1."""
    c.body["spec"]["replicas"] = 3 - c.body["spec"]["replicas"]


OPS: dict[str, Callable[[Cluster, int], None]] = {
    "run": lambda c, _: c.run(node_for={0: "node-a", 1: "node-b"}),
    "cordon": lambda c, r: c.nodes.__setitem__(f"node-{'ab'[r]}", node(f"node-{'ab'[r]}", unschedulable=True)),
    "taint": lambda c, r: c.nodes.__setitem__(
        f"node-{'ab'[r]}", node(f"node-{'ab'[r]}", taints=("ToBeDeletedByClusterAutoscaler",))),
    "heal": lambda c, r: c.nodes.__setitem__(f"node-{'ab'[r]}", node(f"node-{'ab'[r]}")),
    "disrupt": _on_pod(lambda c, p, r: p["status"].setdefault("conditions", []).append(
        {"type": "DisruptionTarget", "status": "True", "reason": "EvictionByEvictionAPI"})),
    "delete": _on_pod(lambda c, p, r: p["metadata"].__setitem__("deletionTimestamp", "2026-01-01T12:00:00Z")),
    "crash": _exit(1, lambda: message("error", 1)),
    "saved": _exit(143, lambda: message("signal", 143, "Net", 7)),
    "killed": _exit(137, lambda: ""),
    "abort": _exit(134, lambda: ""),
    "lost-connection": _on_pod(_lost_connection),
    "node-lost": lambda c, r: c.nodes.__setitem__(f"node-{'ab'[r]}", node(f"node-{'ab'[r]}", ready="Unknown")),
    "finish": _exit(0, lambda: message("completed", 0)),
    "all-saved": lambda c, _: c.exit_all_saved("Net", 7),
    "vanish": _vanish,
    "later": lambda c, _: c.later(30),
    "much-later": lambda c, _: c.later(700),
    "suspend": _toggle_suspend,
    "checkpoint": _add_checkpoint,
    "unschedulable": _unschedulable,
    "resize": _resize,
}

PARTS = ("creates", "deletes", "flag", "annotate", "status")


def converge(c: Cluster, limit: int = 8) -> None:
    """Decide and apply in full until a decision has nothing left to do."""
    for _ in range(limit):
        before = copy.deepcopy(c.status)
        d = c.decide()
        if not (d.create or d.delete or d.graceful_exit or d.annotate or d.status):
            return
        c.apply(d)
        if before.get("phase") != c.status.get("phase"):
            assert d.events, f"phase {before.get('phase')} -> {c.status.get('phase')} without an Event"
        assert c.status.get("restarts", 0) <= MAX_RESTARTS
    raise AssertionError(f"no fixpoint after {limit} decisions; last: {d}")


def snapshot(c: Cluster) -> dict[str, Any]:
    pods = {name: ("deletionTimestamp" in p["metadata"], p["status"].get("phase"),
                   dict(p["metadata"].get("annotations") or {})) for name, p in c.pods.items()}
    return {"status": c.status, "pods": pods, "children": {k: v.get("data") for k, v in c.children.items()}}


def check_invariants(c: Cluster) -> None:
    incarnation = str(c.status.get("incarnation", 0))
    for p in c.pods.values():
        live = p["status"].get("phase") not in ("Succeeded", "Failed") and "deletionTimestamp" not in p["metadata"]
        if live and c.status.get("phase") not in ("Stopping",):
            assert p["metadata"]["labels"][LABEL_INCARNATION] == incarnation, "a live pod of an old incarnation"
    if c.status.get("phase") == "Failed":
        assert c.status.get("restarts") == MAX_RESTARTS
    if c.status.get("phase") in ("Pending", "Running"):
        pods = [p for p in c.pods.values() if p["metadata"]["labels"][LABEL_INCARNATION] == incarnation]
        ranks = [p["metadata"]["labels"][LABEL_RANK] for p in pods]
        assert len(ranks) == len(set(ranks)) == c.status["worldSize"]
    # one incarnation, one WORLD_SIZE, whatever spec.replicas said while it was made
    for inc in {p["metadata"]["labels"][LABEL_INCARNATION] for p in c.pods.values()}:
        sizes = {e["value"] for p in c.pods.values() if p["metadata"]["labels"][LABEL_INCARNATION] == inc
                 for e in p["spec"]["containers"][0]["env"] if e["name"] == "WORLD_SIZE"}
        assert len(sizes) == 1, (inc, sizes)


history = st.lists(st.tuples(st.sampled_from(sorted(OPS)), st.integers(0, REPLICAS - 1)), min_size=1, max_size=25)
#: The elastic variant draws the moves that make a job shrink and grow (a rank unschedulable, time,
#: the deleted ranks gone, running, checkpoints) more often, so that its histories reach them.
elastic_history = st.lists(st.tuples(st.sampled_from(sorted(OPS) + ["unschedulable", "later", "vanish", "run",
                                                                    "checkpoint", "much-later"] * 3),
                                     st.integers(0, REPLICAS - 1)), min_size=1, max_size=25)
partial = st.lists(st.sets(st.sampled_from(PARTS), max_size=len(PARTS) - 1), min_size=1, max_size=3)


def _converges_when_half_applied(spec: dict[str, Any], events: list[tuple[str, int]], data: st.DataObject,
                                 start: tuple[tuple[str, int], ...] = ()) -> None:
    a = Cluster(job_body(replicas=REPLICAS, maxRestarts=MAX_RESTARTS, **copy.deepcopy(spec)))
    b = Cluster(job_body(replicas=REPLICAS, maxRestarts=MAX_RESTARTS, **copy.deepcopy(spec)))
    converge(a)
    converge(b)
    for op, rank in start:  # applied in full to both
        for c in (a, b):
            OPS[op](c, rank)
            converge(c)
    for op, rank in events:
        OPS[op](a, rank)
        OPS[op](b, rank)
        converge(a)
        crashes = data.draw(partial, label=f"parts applied after {op}({rank})")
        for parts in crashes:  # the operator dies this many times, each time after applying only these parts
            b.apply(b.decide(), **{part: part in parts for part in PARTS})
        converge(b)
        assert snapshot(a) == snapshot(b), f"after {op}({rank}) with only {crashes} applied"
        check_invariants(a)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(history, st.data())
def test_half_applied_decisions_converge_to_the_same_state(events: list[tuple[str, int]], data: st.DataObject) -> None:
    _converges_when_half_applied({}, events, data)


#: An elastic job that could place one rank of two: it runs short, on one, past its grow interval
#: (the next checkpoint makes it grow).
SHORT = (("unschedulable", 1), ("later", 0), ("vanish", 0), ("run", 0), ("much-later", 0))


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(elastic_history, st.booleans(), st.data())
def test_half_applied_decisions_of_an_elastic_job_converge_to_the_same_state(
        events: list[tuple[str, int]], short: bool, data: st.DataObject) -> None:
    """The same with spec.elastic, from the start or running short: shrinks, grows and resizes
    half-applied, never two WORLD_SIZE values in one incarnation."""
    _converges_when_half_applied({"elastic": {"minReplicas": 1, "waitSeconds": 30, "growIntervalSeconds": 60}},
                                 events, data, SHORT if short else ())


@settings(max_examples=60, deadline=None)
@given(history)
def test_deciding_again_on_an_applied_state_creates_nothing(events: list[tuple[str, int]]) -> None:
    c = Cluster(job_body(replicas=REPLICAS, maxRestarts=MAX_RESTARTS))
    converge(c)
    for op, rank in events:
        OPS[op](c, rank)
        d = c.decide()
        c.apply(d)
        again = c.decide()
        existing = {f"{k}/{n}" for k, n in c.children} | {f"Pod/{n}" for n in c.pods}
        assert not {f"{o['kind']}/{o['metadata']['name']}" for o in again.create} & existing
        counters = (c.status.get("restarts", 0), c.status.get("preemptions", 0))
        c.apply(again)
        if again.status is None or "phase" not in again.status:
            assert (c.status.get("restarts", 0), c.status.get("preemptions", 0)) == counters
        converge(c)


def test_a_startup_timeout_whose_status_patch_was_lost_is_still_a_restart_not_a_preemption() -> None:
    # Found by the property above: the operator deleted the ranks of a startup timeout and died
    # before its status patch; the next one saw its own deletions of ranks that never started.
    c = Cluster(job_body(replicas=REPLICAS, maxRestarts=MAX_RESTARTS))
    converge(c)
    OPS["unschedulable"](c, 0)  # rank 0 finds no node; rank 1 is placed and waits
    converge(c)
    OPS["much-later"](c, 0)  # past startupTimeoutSeconds
    d = c.decide()
    assert d.status["stopReason"] == "StartupTimeout" and len(d.delete) == REPLICAS, d
    c.apply(d, **{part: part in ("creates", "deletes") for part in PARTS})
    assert c.status["phase"] == "Pending"  # the status patch never happened
    again = c.decide()
    assert (again.status["stopReason"], again.status["restarts"]) == ("StartupTimeout", 1), again.status
    assert "preemptions" not in again.status, again.status
