"""The watch handlers hand their reconcile to a task and return (issue 13, item 4).

kopf keeps an event's body, and the worker of its object, until the handler returns; a handler
that waited for its job's reconcile kept one body per event in flight. The Kubernetes client is
real, pointed at a loopback port that refuses connections: the reconcile that follows meets the
error an absent API server gives, and is retried, as in tests/unit/test_operator_api_errors.py.
"""

from __future__ import annotations

import asyncio

import kopf
from prometheus_client import CollectorRegistry

from torpor_operator import handlers
from torpor_operator.applying import KubeClient
from torpor_operator.bucket import Bucket
from torpor_operator.contract import LABEL_JOB
from torpor_operator.handlers import Shell
from torpor_operator.metrics import Metrics
from torpor_operator.settings import OperatorSettings


def _pod(name: str) -> dict:
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": "team", "uid": f"uid-{name}", "resourceVersion": "7",
                         "labels": {LABEL_JOB: "demo"}},
            "spec": {"nodeName": "n1", "containers": [{"name": "trainer"}]},
            "status": {"phase": "Running"}}


def test_a_pod_event_returns_while_its_jobs_reconcile_waits_and_the_reconcile_runs_after(
        refused_api: KubeClient) -> None:
    shell = Shell(OperatorSettings(api_retry_base_seconds=30), refused_api, Bucket(), Metrics(CollectorRegistry()))
    memo = kopf.Memo(shell=shell)

    async def event(name: str) -> None:
        pod = _pod(name)
        await handlers.on_pod(event={"type": "MODIFIED", "object": pod}, body=kopf.Body(pod),
                              labels=pod["metadata"]["labels"], namespace="team", name=name, memo=memo)

    async def run() -> None:
        lock = shell._locks.setdefault(("team", "demo"), asyncio.Lock())
        await lock.acquire()  # a reconcile of the job is running
        # each handler returns though the job's reconcile cannot start yet
        await asyncio.wait_for(asyncio.gather(event("demo-1-0"), event("demo-1-1"), event("demo-1-2")), 5)
        assert len(shell.pod_index) == 3  # the pods are in the index for the reconcile to read
        assert shell.metrics.reconcile_errors._value.get() == 0
        lock.release()
        while shell._requests:  # the three requests are one reconcile (coalesced), then done
            await asyncio.wait(list(shell._requests), timeout=10)
        assert shell.metrics.reconcile_errors._value.get() == 1  # it ran, met the absent API, is retried
        assert ("team", "demo") in shell._wakeups
        shell._wakeups[("team", "demo")].cancel()

    asyncio.run(asyncio.wait_for(run(), 30))


def test_the_operators_exit_cancels_the_reconciles_still_waiting(refused_api: KubeClient) -> None:
    shell = Shell(OperatorSettings(), refused_api, Bucket(), Metrics(CollectorRegistry()))

    async def run() -> None:
        lock = shell._locks.setdefault(("team", "demo"), asyncio.Lock())
        await lock.acquire()
        shell.request("team", "demo", triggered_at=0.0, trigger="pod")
        while ("team", "demo") not in shell._waiting:  # the request starts and waits for the lock
            await asyncio.sleep(0)
        assert len(shell._requests) == 1
        await handlers.stop_retention(memo=kopf.Memo(shell=shell))
        assert not shell._requests and shell.metrics.reconcile_errors._value.get() == 0

    asyncio.run(asyncio.wait_for(run(), 30))


def test_reconciles_of_different_jobs_run_at_most_reconcile_concurrency_at_once(refused_api: KubeClient) -> None:
    """500 jobs created at once held 500 reconciles' jobs, pods and decisions together at the
    operator's peak RSS; the bound keeps that to ``TORPOR_RECONCILE_CONCURRENCY``, and every
    job is still reconciled, including one asked for again while it waits (coalesced)."""
    shell = Shell(OperatorSettings(reconcile_concurrency=2), refused_api, Bucket(), Metrics(CollectorRegistry()))
    running: set[str] = set()
    most = 0
    done: list[str] = []

    async def reconcile(key: tuple[str, str], triggered_at: float | None, *, fresh: bool) -> None:
        nonlocal most
        running.add(key[1])
        most = max(most, len(running))
        await asyncio.sleep(0.05)  # the reads of a real reconcile
        running.discard(key[1])
        done.append(key[1])

    shell._reconcile = reconcile  # type: ignore[method-assign]

    async def run() -> None:
        for i in range(6):
            shell.request("team", f"job-{i}", triggered_at=0.0, trigger="job")
        await asyncio.sleep(0)
        shell.request("team", "job-5", triggered_at=0.0, trigger="pod")  # still waiting: coalesced
        while shell._requests:
            await asyncio.wait(list(shell._requests), timeout=10)

    asyncio.run(asyncio.wait_for(run(), 30))
    assert most == 2
    assert sorted(done) == [f"job-{i}" for i in range(6)]
