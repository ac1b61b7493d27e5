"""The job cache and the child index a reconcile reads instead of a GET and three LISTs
(issue 13, item 1: a cordon's reconcile waits for no read): pure bookkeeping first, then the
shell deciding from them, with a stand-in API that counts what it is asked (no cluster; the same
path against the real API server is in tests/operator/test_operator_watch_scope.py)."""

from __future__ import annotations

import asyncio
import copy
from collections import Counter
from typing import Any

from prometheus_client import CollectorRegistry
from test_operator_world import Cluster, job_body, node

from torpor_operator.bucket import Bucket
from torpor_operator.caching import ChildIndex, JobCache
from torpor_operator.decisions import Decision
from torpor_operator.handlers import Shell
from torpor_operator.metrics import Metrics
from torpor_operator.settings import OperatorSettings
from torpor_operator.watching import slim_node

KEY = ("team", "demo")


def at(body: dict[str, Any], version: int, **status: Any) -> dict[str, Any]:
    body = copy.deepcopy(body)
    body["metadata"]["resourceVersion"] = str(version)
    body["status"].update(status)
    return body


# --- JobCache ------------------------------------------------------------------------------------

def test_the_newest_body_wins_whatever_order_the_watch_and_the_answers_come_in() -> None:
    cache = JobCache()
    assert cache.get(KEY) is None  # the watch has not shown it: GET
    cache.watched(KEY, at(job_body(), 5, phase="Pending"))
    cache.answered(KEY, at(job_body(), 7, phase="Running"))  # the operator's status patch
    cache.watched(KEY, at(job_body(), 6, phase="Pending"))  # a watch event older than that answer
    assert cache.get(KEY)["status"]["phase"] == "Running"  # type: ignore[index]
    cache.watched(KEY, at(job_body(), 8, phase="Stopping"))
    assert cache.get(KEY)["status"]["phase"] == "Stopping"  # type: ignore[index]


def test_a_new_job_of_the_name_replaces_the_old_one_whatever_its_version() -> None:
    cache = JobCache()
    cache.watched(KEY, at(job_body(), 9))
    again = at(job_body(), 3)
    again["metadata"]["uid"] = "uid-2"
    cache.watched(KEY, again)
    assert cache.get(KEY)["metadata"]["uid"] == "uid-2"  # type: ignore[index]


def test_an_answer_never_brings_a_deleted_job_back_and_managed_fields_are_not_kept() -> None:
    cache = JobCache()
    cache.answered(KEY, at(job_body(), 5))  # a GET before the watch showed the job
    assert cache.get(KEY) is None and len(cache) == 0
    body = at(job_body(), 6)
    body["metadata"]["managedFields"] = [{"manager": "kubectl"}]
    cache.watched(KEY, body)
    assert "managedFields" not in cache.get(KEY)["metadata"]  # type: ignore[index]
    cache.drop(KEY)
    cache.answered(KEY, at(job_body(), 7))  # the answer to a patch sent before the deletion
    assert cache.get(KEY) is None and len(cache) == 0


def test_a_suspect_body_is_read_again_until_a_newer_one_comes() -> None:
    cache = JobCache()
    cache.watched(KEY, at(job_body(), 5))
    cache.suspect(KEY)  # kopf lists again (a resumed replica): another one may have written the job
    assert cache.get(KEY) is None
    cache.answered(KEY, at(job_body(), 9))  # the GET
    assert cache.get(KEY) is not None
    cache.clear()  # this replica was paused
    assert cache.get(KEY) is None
    cache.watched(KEY, at(job_body(), 10))
    assert cache.get(KEY) is not None


def test_a_listed_body_is_suspect_until_an_answer_confirms_it() -> None:
    """At start-up a reconcile made from a pod event may write the job before its watch shows it
    (the answer cannot be kept: the cache does not hold the job yet); kopf's listing, read before
    that write, then arrives: decided from, it would take the write back."""
    cache = JobCache()
    cache.watched(KEY, at(job_body(), 5, phase="Running"), listed=True)
    assert cache.get(KEY) is None
    cache.answered(KEY, at(job_body(), 7, phase="Stopping"))
    assert cache.get(KEY)["status"]["phase"] == "Stopping"  # type: ignore[index]


def test_an_answer_about_an_older_job_of_the_name_is_not_kept() -> None:
    """A GET in flight while the job was deleted and made again answers with the old job."""
    cache = JobCache()
    new = at(job_body(), 20, phase="Pending")
    new["metadata"]["uid"] = "uid-2"
    cache.watched(KEY, new)
    cache.answered(KEY, at(job_body(), 30, phase="Stopping"))  # uid-1, the deleted one
    assert cache.get(KEY)["metadata"]["uid"] == "uid-2"  # type: ignore[index]
    assert cache.get(KEY)["status"]["phase"] == "Pending"  # type: ignore[index]


# --- ChildIndex ----------------------------------------------------------------------------------

def test_children_are_answered_from_the_last_list_until_written_or_resync() -> None:
    index = ChildIndex(resync_seconds=300)
    assert index.children(KEY, now=0) is None
    index.listed(KEY, [{"kind": "ConfigMap", "metadata": {"name": "demo-1-exit", "managedFields": [{}]}}], now=0)
    assert index.children(KEY, now=299) == [{"kind": "ConfigMap", "metadata": {"name": "demo-1-exit"}}]
    assert index.children(KEY, now=300) is None  # a child someone else changed is seen at the resync
    index.listed(KEY, [], now=300)
    index.invalidate(KEY)  # the operator wrote one
    assert index.children(KEY, now=301) is None and len(index) == 0


def test_a_list_that_an_invalidation_overtook_is_not_kept() -> None:
    index = ChildIndex()
    token = index.token()
    index.invalidate(("team", "other"))  # kopf lists again, say, while this LIST runs
    index.listed(KEY, [], token, now=0)
    assert index.children(KEY, now=1) is None
    index.listed(KEY, [], index.token(), now=0)
    assert index.children(KEY, now=1) == []


def test_a_decision_says_whether_it_writes_children() -> None:
    assert not Decision().writes_children
    assert not Decision(create=[{"kind": "Pod", "metadata": {"name": "demo-1-0"}}]).writes_children
    assert not Decision(annotate=(("demo-1-0", {"a": "b"}),), status={"phase": "Stopping"}).writes_children
    assert Decision(graceful_exit=("demo-1-exit", 1)).writes_children
    assert Decision(create=[{"kind": "ConfigMap", "metadata": {"name": "demo-1-exit"}}]).writes_children


# --- the shell -----------------------------------------------------------------------------------

class CountingApi:
    """The API calls a reconcile makes, answered from a :class:`Cluster` and counted."""

    def __init__(self, cluster: Cluster) -> None:
        self.cluster = cluster
        self.calls: Counter[str] = Counter()
        self.gone = False
        self.applied: list[Decision] = []

    def read_job(self, namespace: str, name: str) -> dict[str, Any] | None:
        self.calls["GET job"] += 1
        return None if self.gone else copy.deepcopy(self.cluster.body)

    def list_children(self, namespace: str, job: str) -> list[dict[str, Any]]:
        self.calls["LIST children"] += 1
        return copy.deepcopy(list(self.cluster.children.values()))

    def list_pods_at(self, namespace: str, job: str) -> tuple[list[dict[str, Any]], str | None]:
        self.calls["LIST pods"] += 1
        return copy.deepcopy(list(self.cluster.pods.values())), None

    def apply(self, namespace: str, job: str, decision: Decision) -> dict[str, Any] | None:
        self.applied.append(decision)
        self.cluster.apply(decision)
        return copy.deepcopy(self.cluster.body) if decision.status else None

    def post_events(self, body: dict[str, Any], decision: Decision) -> None:
        pass


def shell_for(cluster: Cluster) -> tuple[Shell, CountingApi]:
    api = CountingApi(cluster)
    shell = Shell(OperatorSettings(), kube=api, bucket=Bucket(), metrics=Metrics(CollectorRegistry()))  # type: ignore[arg-type]
    shell.checkpoints[KEY] = []  # the job's listing is made: no bucket in these tests
    shell.nodes = {name: slim_node(n) for name, n in cluster.nodes.items()}
    return shell, api


def watched(shell: Shell, cluster: Cluster) -> None:
    """The job's watch event, as ``on_job`` takes it."""
    shell.job_cache.watched(KEY, copy.deepcopy(cluster.body))
    shell.seen_jobs.changed(KEY, cluster.body)


def running() -> Cluster:
    cluster = Cluster(job_body())
    cluster.step()  # launch
    cluster.run()
    cluster.step()  # Running
    assert cluster.status["phase"] == "Running"
    return cluster


def test_a_cordon_of_a_running_jobs_node_writes_the_flag_without_reading_the_api() -> None:
    """The reconcile of a node event is the latency the users see: its job from the watch, its
    pods from the pod index, its children from the last LIST; only the writes go to the API."""
    cluster = running()
    shell, api = shell_for(cluster)
    watched(shell, cluster)
    asyncio.run(shell._reconcile(KEY, None, fresh=False))  # the first reconcile in the process
    assert api.calls == Counter({"LIST children": 1, "LIST pods": 1})
    cluster.nodes["node-a"] = node("node-a", unschedulable=True)
    shell.nodes["node-a"] = slim_node(cluster.nodes["node-a"])
    api.calls.clear()
    asyncio.run(shell._reconcile(KEY, None, fresh=False))
    assert api.applied[-1].graceful_exit == ("demo-1-exit", 1)
    assert api.calls == Counter(), "no GET of the job, no LIST of its children or pods"
    assert cluster.flag() == 1
    # the flag is a write of a child: the next reconcile LISTs the children again
    asyncio.run(shell._reconcile(KEY, None, fresh=False))
    assert api.calls == Counter({"LIST children": 1})


def test_a_retention_pass_or_an_api_retry_reads_everything_afresh() -> None:
    cluster = running()
    shell, api = shell_for(cluster)
    watched(shell, cluster)
    asyncio.run(shell._reconcile(KEY, None, fresh=False))
    api.calls.clear()
    asyncio.run(shell._reconcile(KEY, None, fresh=True))
    assert api.calls == Counter({"GET job": 1, "LIST children": 1, "LIST pods": 1})


def new_job_all_cached() -> tuple[Cluster, Shell, CountingApi]:
    """A new job whose body, (no) children and (no) pods are all in the caches: its launch is due."""
    cluster = Cluster(job_body())
    shell, api = shell_for(cluster)
    watched(shell, cluster)
    shell.child_index.listed(KEY, [])
    shell.pod_index.listing(*KEY)
    shell.pod_index.seed(*KEY, [], "1")
    return cluster, shell, api


def test_a_launch_decided_from_the_caches_is_decided_again_from_a_get_that_finds_the_job_gone() -> None:
    """kopf's listing after a watch gap tells no deletions: a job deleted meanwhile stays in the
    cache. Its pods vanish (the garbage collector), and a decision from the cache would make
    them again — for ever, each one collected at once. The GET that any create waits for finds
    the job gone, and the shell forgets it."""
    _, shell, api = new_job_all_cached()
    api.gone = True
    asyncio.run(shell._reconcile(KEY, None, fresh=False))
    assert api.applied == [], "nothing created for a job that is gone"
    assert api.calls["GET job"] == 1
    assert shell.job_cache.get(KEY) is None and KEY not in shell.jobs


def test_a_launch_decided_from_the_caches_is_applied_once_the_get_and_list_agree() -> None:
    _, shell, api = new_job_all_cached()
    asyncio.run(shell._reconcile(KEY, None, fresh=False))
    assert api.calls == Counter({"GET job": 1, "LIST children": 1})
    assert len(api.applied) == 1 and {o["kind"] for o in api.applied[0].create} >= {"Pod", "ConfigMap"}
    assert shell.metrics.cache_rereads._value.get() == 1  # type: ignore[attr-defined]


def test_after_kopfs_listing_the_next_reconcile_reads_the_job_and_its_children_afresh() -> None:
    """kopf lists again at start-up, after a watch gap and when a paused replica resumes: another
    replica (or this one, before the cache held the job) may have written the job and its
    children since the listing was read, and a pod's listing event may come before its job's.
    Either listing event makes the next reconcile GET the job and LIST its children."""
    import kopf

    from torpor_operator import handlers

    cluster = running()
    shell, api = shell_for(cluster)
    memo = kopf.Memo(shell=shell)
    watched(shell, cluster)
    asyncio.run(shell._reconcile(KEY, None, fresh=False))
    pod = copy.deepcopy(next(iter(cluster.pods.values())))

    async def listed_pod() -> None:
        await handlers.on_pod(event={"type": None, "object": pod}, body=kopf.Body(pod),
                              labels=pod["metadata"]["labels"], namespace="team", name=pod["metadata"]["name"],
                              memo=memo)
        await asyncio.gather(*shell._requests)

    async def listed_job() -> None:
        body = copy.deepcopy(cluster.body)
        await handlers.on_job(event={"type": None, "object": body}, body=kopf.Body(body), namespace="team",
                              name="demo", memo=memo)
        await asyncio.gather(*shell._requests)

    api.calls.clear()
    asyncio.run(listed_pod())
    assert api.calls == Counter({"GET job": 1, "LIST children": 1})
    api.calls.clear()
    asyncio.run(shell._reconcile(KEY, None, fresh=False))
    assert api.calls == Counter(), "the GET's answer and the LIST are cached again"
    asyncio.run(listed_job())
    assert api.calls == Counter({"GET job": 1, "LIST children": 1}), "a listed body is suspect too"


def test_a_replica_that_was_paused_reads_every_job_afresh() -> None:
    """While outranked, kopf stopped this replica's watches and another replica acted: once it
    acts again (:meth:`Shell.acting`), no job is decided from what it held before."""
    from datetime import UTC, datetime

    from torpor_operator import handlers

    cluster = running()
    shell, api = shell_for(cluster)
    watched(shell, cluster)
    asyncio.run(shell._reconcile(KEY, None, fresh=False))
    shell.settings = OperatorSettings(peering="p", peering_priority=1)
    shell.identity = "low"
    records: dict[str, Any] = {"high": {"priority": 2, "lifetime": 60, "lastseen": datetime.now(UTC).isoformat()}}
    api.read_peering = lambda name, namespace: dict(records)  # type: ignore[attr-defined]

    async def acting() -> bool:
        shell._acting = None if shell._acting is None else (shell._acting[0] - handlers._ACTING_CACHE_SECONDS,
                                                            shell._acting[1])  # the reading has expired
        return await shell.acting()

    shell._acting = (0.0, True)
    assert asyncio.run(acting()) is False  # outranked: paused
    records.clear()
    assert asyncio.run(acting()) is True  # the other replica is gone: acting again
    api.calls.clear()
    asyncio.run(shell._reconcile(KEY, None, fresh=False))
    assert api.calls == Counter({"GET job": 1, "LIST children": 1})


def test_the_stops_own_annotations_reconcile_nothing_and_are_not_written_twice() -> None:
    """A stop annotates every live rank; each patch's watch event used to reconcile the job, and a
    reconcile before the event reached the index annotated the rank again (1024 ranks: 1024
    events, and patches twice over)."""
    import kopf

    from torpor_operator import handlers

    cluster = running()
    shell, api = shell_for(cluster)
    memo = kopf.Memo(shell=shell)

    async def pod_event(name: str) -> None:
        body = copy.deepcopy(cluster.pods[name])
        await handlers.on_pod(event={"type": "MODIFIED", "object": body}, body=kopf.Body(body),
                              labels=body["metadata"]["labels"], namespace="team", name=name, memo=memo)

    watched(shell, cluster)
    for name in cluster.pods:  # the pods as the watch showed them before the stop
        asyncio.run(pod_event(name))
    asyncio.run(asyncio.sleep(0))
    for task in list(shell._requests):
        task.cancel()
    asyncio.run(shell._reconcile(KEY, None, fresh=False))
    cluster.nodes["node-a"] = node("node-a", unschedulable=True)
    shell.node_seen("node-a", slim_node(cluster.nodes["node-a"]))
    asyncio.run(shell._reconcile(KEY, None, fresh=False))
    told = [p for p, _ in api.applied[-1].annotate]
    assert told == sorted(cluster.pods), "every rank is told"
    applied = len(api.applied)
    asyncio.run(shell._reconcile(KEY, None, fresh=False))  # before the watch shows the annotations
    assert not any(d.annotate for d in api.applied[applied:]), "each rank told once"
    events = shell.metrics.watch_events.labels(resource="pods", outcome="reconcile")._value.get()
    for name in told:  # the annotation patches' own watch events
        asyncio.run(pod_event(name))
    assert shell.metrics.watch_events.labels(resource="pods", outcome="reconcile")._value.get() == events
    assert not shell._requests, "no reconcile for the operator's own writes"


def test_a_decision_reads_the_nodes_of_its_ranks_and_those_in_trouble_not_every_node() -> None:
    cluster = Cluster(job_body())
    shell, _ = shell_for(cluster)
    for i in range(100):
        shell.node_seen(f"idle-{i}", slim_node(node(f"idle-{i}")))
    shell.node_seen("cordoned", slim_node(node("cordoned", unschedulable=True)))
    shell.node_seen("lost", slim_node(node("lost", ready="Unknown")))
    pods = [{"spec": {"nodeName": "node-a"}, "metadata": {}}]
    assert [n["metadata"]["name"] for n in shell._nodes_for(pods)] == ["cordoned", "lost", "node-a"]
    shell.node_seen("cordoned", slim_node(node("cordoned")))  # uncordoned
    shell.node_seen("lost", None)  # deleted
    assert [n["metadata"]["name"] for n in shell._nodes_for(pods)] == ["node-a"]


def test_a_launch_made_again_lists_the_checkpoints_afresh_when_the_job_read_again_wants_it() -> None:
    """The cache said Pending (a launch half made: its pods are missing), the GET says Restarting:
    the pods it makes must name the newest checkpoint, so the decision made again lists afresh."""
    cluster = Cluster(job_body())
    cluster.step()  # launched: Pending
    shell, _ = shell_for(cluster)
    watched(shell, cluster)
    cluster.pods.clear()
    shell.child_index.listed(KEY, list(cluster.children.values()))
    shell.pod_index.listing(*KEY)
    shell.pod_index.seed(*KEY, [], "1")
    cluster.status["phase"] = "Restarting"  # what the API holds now
    asked: list[bool | None] = []

    async def checkpoints(key: tuple[str, str], job: object, since: float | None = None, *,
                          fresh: bool | None = None) -> list[object]:
        asked.append(fresh)
        return []

    shell._checkpoints = checkpoints  # type: ignore[method-assign,assignment]
    asyncio.run(shell._reconcile(KEY, None, fresh=False))
    assert asked == [False, True], "the first decision from the cache, the second from the GET"


def test_a_job_deleted_while_its_decision_is_applied_leaves_nothing_behind() -> None:
    """Its DELETED event runs ``forget`` while the reconcile waits for the API: what the reconcile
    does after (the phase gauge, the retention schedule, a wake-up) must not bring it back."""
    cluster = running()
    shell, api = shell_for(cluster)
    watched(shell, cluster)
    asyncio.run(shell._reconcile(KEY, None, fresh=False))
    cluster.nodes["node-a"] = node("node-a", unschedulable=True)
    shell.node_seen("node-a", slim_node(cluster.nodes["node-a"]))
    applying = api.apply

    def apply_then_deleted(namespace: str, job: str, decision: Decision) -> dict[str, Any] | None:
        answer = applying(namespace, job, decision)
        shell.forget(KEY)  # the DELETED event, handled on the loop while this thread ran
        return answer

    api.apply = apply_then_deleted  # type: ignore[method-assign]
    asyncio.run(shell._reconcile(KEY, None, fresh=False))
    assert api.applied[-1].graceful_exit is not None
    held = {name: size() for name, size in shell.cache_sizes().items() if name not in ("nodes", "troubled_nodes")}
    assert not any(held.values()), held
