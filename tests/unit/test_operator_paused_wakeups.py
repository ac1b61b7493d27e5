"""A wake-up that finds the replica paused is tried again, not dropped.

Found by tests/operator/test_operator_peering.py failing one run in three: the standby resumed
(kopf saw the active replica's lease expire), its resume reconcile asked the ranks to save and
scheduled a wake-up at the exit deadline one second later; that wake-up read
:meth:`Shell.acting` from a reading cached just before kopf resumed, took the replica for
paused and was dropped — and nothing else reconciles a job whose ranks ignore the request, so
it stayed Stopping. Here the peering records are played by a function in place of the API read
(what kopf would have written), and the reconcile meets a refused API server: it ran when
``torpor_reconcile_errors_total`` counts it.
"""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime
from typing import Any

from prometheus_client import CollectorRegistry

from torpor_operator import handlers
from torpor_operator.applying import KubeClient
from torpor_operator.bucket import Bucket
from torpor_operator.handlers import Shell
from torpor_operator.metrics import Metrics
from torpor_operator.settings import OperatorSettings

KEY = ("team", "demo")


def test_a_wakeup_that_meets_a_stale_paused_reading_runs_once_the_replica_acts(refused_api: KubeClient) -> None:
    settings = OperatorSettings(peering="p", peering_priority=1, api_retry_base_seconds=30)
    shell = Shell(settings, refused_api, Bucket(), Metrics(CollectorRegistry()), identity="low")
    records: dict[str, Any] = {"high": {"priority": 2, "lifetime": 6, "lastseen": datetime.now(UTC).isoformat()}}
    shell.kube.read_peering = lambda name, namespace: dict(records)  # type: ignore[method-assign]
    errors = shell.metrics.reconcile_errors._value

    async def run() -> None:
        assert not await shell.acting()  # outranked; the reading is cached
        shell.jobs.add(KEY)  # a job this replica reconciled
        records.clear()  # the active replica is gone and kopf resumed this one: the cache is stale
        shell._schedule(KEY, 0.05)  # the resume reconcile's exit deadline
        first = shell._wakeups[KEY]
        while shell._wakeups.get(KEY) is first:
            await asyncio.sleep(0.01)
        assert errors.get() == 0  # it met the cached "paused" and did not reconcile ...
        assert KEY in shell._wakeups  # ... but is tried again
        started = time.monotonic()
        while errors.get() == 0:
            assert time.monotonic() - started < 3 * handlers._PAUSED_WAKE_RETRY_SECONDS, "the wake-up was dropped"
            await asyncio.sleep(0.05)
        assert await shell.acting()
        shell._wakeups[KEY].cancel()  # the refused reconcile's retry

    asyncio.run(asyncio.wait_for(run(), 30))


def _outranked(api: KubeClient) -> Shell:
    """A replica "low" that a live "high" of a higher priority outranks for the next minute."""
    shell = Shell(OperatorSettings(peering="p", peering_priority=1), api, Bucket(), Metrics(CollectorRegistry()),
                  identity="low")
    shell.kube.read_peering = lambda name, namespace: {  # type: ignore[method-assign]
        "high": {"priority": 2, "lifetime": 60, "lastseen": datetime.now(UTC).isoformat()}}
    return shell


def test_a_paused_wakeup_of_a_forgotten_job_is_not_tried_again(refused_api: KubeClient) -> None:
    shell = _outranked(refused_api)

    async def run() -> None:
        shell.jobs.add(KEY)
        shell._schedule(KEY, 0.05)
        shell.forget(KEY)  # deleted before its wake-up
        await shell._wake(KEY)
        assert KEY not in shell._wakeups

    asyncio.run(asyncio.wait_for(run(), 30))


def test_a_wakeup_that_finds_the_replica_paused_twice_is_dropped(refused_api: KubeClient) -> None:
    """The retry reads the records afresh: still paused means paused, and kopf's listing on
    resuming reschedules every job, so a standby does not poll its jobs every 2 s for ever."""
    shell = _outranked(refused_api)

    async def run() -> None:
        shell.jobs.add(KEY)
        await shell._wake(KEY)
        assert KEY in shell._wakeups  # tried once more ...
        shell._wakeups[KEY].cancel()
        await shell._wake(KEY, retried=True)
        assert shell._wakeups[KEY].cancelled()  # ... and not again: nothing new was scheduled
        assert shell.metrics.reconcile_errors._value.get() == 0

    asyncio.run(asyncio.wait_for(run(), 30))
