"""API errors inside the shell: shown once per distinct error, retried with backoff, and the
retention/resync task outliving them (issue 12, items 1 and 2).

The Kubernetes client is real, pointed at a loopback port that refuses connections, so the
errors are the ones an API-server restart produces; no cluster is needed (the end-to-end
versions are in tests/e2e/test_operator_faults_api.py).
"""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime

import pytest
from kubernetes import client
from prometheus_client import CollectorRegistry

from torpor_operator.applying import KubeClient, api_message, refused
from torpor_operator.bucket import Bucket
from torpor_operator.handlers import Shell
from torpor_operator.metrics import Metrics
from torpor_operator.settings import OperatorSettings, SettingsError
from torpor_operator.status import JobStatus, api_error, api_recovered

NOW = datetime(2026, 1, 1, tzinfo=UTC)
QUOTA = 'pods "demo-1-1" is forbidden: exceeded quota: one-pod, requested: pods=1, used: pods=1, limited: pods=1'




def test_an_api_error_sets_ready_false_once_per_distinct_error() -> None:
    first = api_error(JobStatus(), "CreateFailed", QUOTA, 1, NOW)
    assert first is not None
    ready = first.condition("Ready")
    assert ready is not None and (ready.status, ready.reason, ready.message) == ("False", "CreateFailed", QUOTA)
    # the same quota refusing rank 0 next time is the same error: no second Event
    assert api_error(first, "CreateFailed", QUOTA.replace("demo-1-1", "demo-1-0"), 1, NOW) is None
    assert api_error(first, "CreateFailed", "pods \"demo-1-0\" is forbidden: violates PodSecurity", 1, NOW)


def test_recovery_sets_ready_from_the_phase_again() -> None:
    failed = api_error(JobStatus(phase="Running"), "ApiError", "etcdserver: request timed out", 1, NOW)
    assert failed is not None
    again = api_recovered(failed, 1, NOW)
    assert again is not None and again.condition("Ready").status == "True"  # type: ignore[union-attr]
    assert api_recovered(again, 1, NOW) is None


def test_what_counts_as_refused() -> None:
    assert refused(client.ApiException(status=403)) and refused(client.ApiException(status=422))
    assert not refused(client.ApiException(status=409)) and not refused(client.ApiException(status=429))
    assert not refused(client.ApiException(status=503)) and not refused(OSError("refused"))
    exc = client.ApiException(status=403, reason="Forbidden")
    exc.body = json.dumps({"kind": "Status", "message": QUOTA})
    assert api_message(exc) == QUOTA


def test_retry_backoff_doubles_up_to_its_cap() -> None:
    settings = OperatorSettings(api_retry_base_seconds=1, api_retry_max_seconds=5)
    assert [settings.api_retry_seconds(n) for n in range(1, 6)] == [1, 2, 4, 5, 5]
    with pytest.raises(SettingsError, match="TORPOR_BUCKET_WORKERS"):
        OperatorSettings.from_env({"TORPOR_BUCKET_WORKERS": "0"})
    with pytest.raises(SettingsError, match="TORPOR_API_RETRY_MAX_SECONDS"):
        OperatorSettings.from_env({"TORPOR_API_RETRY_BASE_SECONDS": "10", "TORPOR_API_RETRY_MAX_SECONDS": "1"})


def test_a_reconcile_against_an_absent_api_server_is_retried_not_raised(refused_api: KubeClient) -> None:
    shell = Shell(OperatorSettings(api_retry_base_seconds=30), refused_api, Bucket(), Metrics(CollectorRegistry()))

    async def run() -> None:
        await shell.reconcile("team", "demo")  # on main this raised out of the kopf handler
        assert ("team", "demo") in shell._wakeups  # the retry is scheduled
        shell._wakeups[("team", "demo")].cancel()

    asyncio.run(run())
    assert shell.metrics.reconcile_errors._value.get() == 1


def test_the_retention_task_outlives_an_absent_api_server(refused_api: KubeClient) -> None:
    metrics = Metrics(CollectorRegistry())
    shell = Shell(OperatorSettings(retention_interval_seconds=0.01), refused_api, Bucket(), metrics)
    shell.jobs |= {("team", "a"), ("team", "b")}

    async def run() -> None:
        shell.retention_task = asyncio.get_running_loop().create_task(shell.retention_loop())
        while metrics.retention_errors._value.get() < 4:  # both jobs, in two passes at least
            await asyncio.sleep(0.01)
        assert shell.retention_problem() is None
        shell.retention_task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await shell.retention_task
        assert shell.retention_problem() == "the retention task ended"

    asyncio.run(asyncio.wait_for(run(), 30))
    assert metrics.retention_up._value.get() == 0.0  # a stopped task reads 0 (set_function: evaluated on read)


def test_api_workers_bound_the_parallel_patches_of_a_stop() -> None:
    assert OperatorSettings().api_workers == 16
    assert OperatorSettings.from_env({"TORPOR_API_WORKERS": "64"}).api_workers == 64
    for bad in ("0", "257", "-3"):
        with pytest.raises(SettingsError, match=f"TORPOR_API_WORKERS.*{bad}"):
            OperatorSettings.from_env({"TORPOR_API_WORKERS": bad})
