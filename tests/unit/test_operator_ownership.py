"""A job's children are the objects it controls (by uid), never those of an earlier job of its name.

``kubectl delete tj NAME --cascade=orphan`` leaves the pods, the ConfigMap and the Service of
the old job behind without an owner; a background deletion leaves them owned by the old uid
until the garbage collector gets to them. A TrainingJob created again under the same name sees
them through its labels (``torpor.dev/job=NAME``) and the same deterministic names. Pure: no
cluster (``test_operator_world``'s stand-in holds the objects).
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
from test_operator_world import Cluster, job_body, message, owner, pod

from torpor_operator.builders import build_pdb, graceful_exit_data
from torpor_operator.naming import JobRef
from torpor_operator.owning import controlled_by
from torpor_operator.reconciling import ObjectRef

OLD_UID = "uid-0"


def stale_config_map(incarnation: int, graceful_exit: int, owner_uid: str | None) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": f"demo-{incarnation}-exit", "namespace": "team",
                            "labels": {"torpor.dev/job": "demo", "torpor.dev/incarnation": str(incarnation),
                                       "app.kubernetes.io/managed-by": "torpor"}}
    if owner_uid is not None:
        meta["ownerReferences"] = [owner("demo", owner_uid)]
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": meta, "data": graceful_exit_data(graceful_exit)}


def stale_service(incarnation: int, owner_uid: str | None) -> dict[str, Any]:
    cm = stale_config_map(incarnation, 0, owner_uid)
    meta = dict(cm["metadata"], name=f"demo-{incarnation}")
    return {"apiVersion": "v1", "kind": "Service", "metadata": meta, "spec": {"clusterIP": "None"}}


def recreated(owner_uid: str | None, *, stale_pods: dict[str, Any], config_map: int | None = None,
              incarnations: tuple[int, ...] = (1,)) -> Cluster:
    """A new job ``demo`` (uid-1) next to what the old one (``owner_uid``) left of ``incarnations``."""
    c = Cluster(job_body())
    for inc in incarnations:
        for rank in (0, 1):
            c.pods[f"demo-{inc}-{rank}"] = pod("demo", inc, rank, owner_uid=owner_uid, **stale_pods)
        c.children[("Service", f"demo-{inc}")] = stale_service(inc, owner_uid)
        if config_map is not None:
            c.children[("ConfigMap", f"demo-{inc}-exit")] = stale_config_map(inc, config_map, owner_uid)
    return c


def names(objects: Any) -> list[str]:
    return [f"{o['kind']}/{o['metadata']['name']}" for o in objects]


def test_controlled_by_reads_the_controller_reference_uid() -> None:
    assert controlled_by(pod("demo", 1, 0), "uid-1")
    assert not controlled_by(pod("demo", 1, 0), OLD_UID)
    assert not controlled_by(pod("demo", 1, 0, owner_uid=None), "uid-1")
    shared = pod("demo", 1, 0)
    shared["metadata"]["ownerReferences"][0]["controller"] = False  # owned, not controlled: not ours to act on
    assert not controlled_by(shared, "uid-1")
    assert not controlled_by(pod("demo", 1, 0), "")


def test_orphaned_succeeded_pods_do_not_finish_a_job_recreated_under_their_name() -> None:
    c = recreated(None, stale_pods={"exit_code": 0, "term_message": message("completed", 0, "CKP-1_30", 30)})
    old = copy.deepcopy(c.pods)
    d = c.step()
    # the old names are taken: the new job starts at the first incarnation whose names are free
    assert names(d.create) == ["ConfigMap/demo-2-exit", "Service/demo-2", "Pod/demo-2-0", "Pod/demo-2-1"]
    assert c.status["phase"] == "Pending" and c.status["incarnation"] == 2
    assert ("Warning", "StaleChildren") in c.events
    c.run()
    c.step()
    assert c.status["phase"] == "Running"
    for rank in (0, 1):
        c.exit(rank, 0, message("completed", 0, "CKP-1_60", 60))
    c.step()
    assert c.status["phase"] == "Succeeded"
    assert (c.status.get("restarts", 0), c.status.get("preemptions", 0)) == (0, 0)
    assert {k: c.pods[k] for k in old} == old  # the old pods: never deleted, patched or annotated


def test_an_orphaned_config_map_with_graceful_exit_does_not_stop_the_new_ranks() -> None:
    # the old job was deleted (--cascade=orphan) while stopping: its flag says 1, its ranks saved and exited 75
    c = recreated(None, stale_pods={"exit_code": 75, "term_message": message("file", 75, "Net", 40)}, config_map=1)
    stale = copy.deepcopy(c.children)
    d = c.step()
    assert c.status["incarnation"] == 2 and d.graceful_exit is None
    c.run()
    d = c.step()
    assert c.status["phase"] == "Running" and c.status.get("preemptions", 0) == 0
    assert c.flag(2) == 0
    assert not d.delete and not d.annotate and d.graceful_exit is None
    for _ in range(3):  # and on every later pass
        d = c.step()
        assert d.empty
    assert {k: c.children[k] for k in stale} == stale


def test_children_still_owned_by_the_old_uid_are_left_to_the_garbage_collector() -> None:
    # a background deletion: the old children carry the old uid until the GC deletes them
    c = recreated(OLD_UID, stale_pods={"phase": "Running"}, config_map=1, incarnations=(1, 2, 3))
    d = c.step()
    assert c.status["incarnation"] == 4
    assert names(d.create)[:2] == ["ConfigMap/demo-4-exit", "Service/demo-4"]
    assert not d.delete and not d.annotate and d.graceful_exit is None
    warning = next(e for e in d.events if e.reason == "StaleChildren")
    assert "incarnations 1-3" in warning.message and OLD_UID in warning.message, warning.message
    assert "demo-1-0" in warning.message, warning.message


def test_a_live_orphan_never_holds_up_the_restart_of_the_new_job() -> None:
    c = recreated(None, stale_pods={"phase": "Running"})
    c.step()
    c.run()
    c.step()
    assert c.status["phase"] == "Running" and c.status["incarnation"] == 2
    c.exit(1, 1, message("error", 1))
    c.step()
    c.vanish_deleted()
    c.step()
    assert c.status["phase"] == "Restarting"
    c.later(3600)
    d = c.step()
    assert c.status["incarnation"] == 3, c.status  # the orphans of incarnation 1 are not waited for
    assert d.delete and all(r.name.startswith("demo-2") for r in d.delete), d.delete  # its own old children only
    assert {f"demo-1-{r}" for r in (0, 1)} <= set(c.pods) and ("Service", "demo-1") in c.children


def test_a_half_applied_launch_at_a_skipped_incarnation_is_finished_where_it_began() -> None:
    c = recreated(None, stale_pods={"exit_code": 0})
    c.step(status=False)  # the operator died before the status patch: pods of incarnation 2 exist
    assert sorted(p for p in c.pods if p.startswith("demo-2-")) == ["demo-2-0", "demo-2-1"]
    for rank in (0, 1):  # and the orphans were deleted by their user meanwhile
        del c.pods[f"demo-1-{rank}"]
    c.children.pop(("Service", "demo-1"))
    d = c.step()
    assert c.status["incarnation"] == 2 and not d.create, names(d.create)


def test_a_job_without_stale_children_starts_at_incarnation_1_without_a_warning() -> None:
    c = Cluster(job_body())
    c.pods["other-1-0"] = pod("other", 1, 0, owner_uid="uid-9")  # another job's pod (a label query never lists it)
    d = c.step()
    assert c.status["incarnation"] == 1
    assert "StaleChildren" not in [e.reason for e in d.events]


@pytest.mark.parametrize("owner_uid", [OLD_UID, None], ids=["owned-by-the-old-uid", "orphaned"])
def test_a_pdb_left_by_an_earlier_job_is_never_adopted_patched_or_deleted(owner_uid: str | None) -> None:
    """The old PDB ``demo-1`` selects ``torpor.dev/job=demo, incarnation=1``: adopted, it would
    guard the new job's ranks with the old one's budget, and deleted, it is not the new job's to
    delete. The new job skips incarnation 1 and, through a restart and to its end, acts only on
    its own PDBs."""
    stale = build_pdb(JobRef("demo", "team", owner_uid or ""), 1, 2)
    if owner_uid is None:
        del stale["metadata"]["ownerReferences"]
    c = Cluster(job_body(gracefulExit={"drainProtection": True}))
    c.children[("PodDisruptionBudget", "demo-1")] = copy.deepcopy(stale)
    decisions = [c.step()]
    assert c.status["incarnation"] == 2
    assert "PodDisruptionBudget/demo-2" in names(decisions[0].create)
    assert ("Warning", "StaleChildren") in c.events
    c.run()
    decisions.append(c.step())
    c.exit(1, 1, message("error", 1))  # a failure: a restart into incarnation 3 deletes incarnation 2's PDB
    decisions.append(c.step())
    c.vanish_deleted()
    decisions.append(c.step())
    c.later(3600)
    decisions.append(c.step())
    assert c.status["incarnation"] == 3
    c.run()
    decisions.append(c.step())
    for rank in (0, 1):
        c.exit(rank, 0, message("completed", 0, "CKP-3_60", 60))
    decisions.append(c.step())  # Succeeded: the job's own PDBs released
    assert c.status["phase"] == "Succeeded"
    deleted = [r for d in decisions for r in d.delete]
    assert ObjectRef("policy/v1", "PodDisruptionBudget", "demo-2") in deleted  # its own: released
    assert all(r.name != "demo-1" for r in deleted), deleted
    assert all(o["metadata"]["name"] != "demo-1" for d in decisions for o in d.create)
    assert all(name != "demo-1" for d in decisions for name, _ in d.annotate)
    assert c.children[("PodDisruptionBudget", "demo-1")] == stale
