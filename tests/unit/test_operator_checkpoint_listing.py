"""What the shell hands ``decide`` when the bucket cannot be listed: nothing, never a stale copy.

A real boto3 client against a loopback port that refuses connections (one attempt), so the
listing fails the way it does when the store is away; no cluster is needed.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Iterator
from datetime import UTC, datetime

import pytest
from prometheus_client import CollectorRegistry
from test_operator_world import job_body

from torpor_operator.bucket import Bucket
from torpor_operator.handlers import Shell
from torpor_operator.metrics import Metrics
from torpor_operator.observing import CheckpointInfo
from torpor_operator.reconciling import Job
from torpor_operator.settings import OperatorSettings


@pytest.fixture
def refused_endpoint(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """An S3 endpoint on a bound, non-listening loopback port: every connection is refused."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        endpoint = f"http://127.0.0.1:{sock.getsockname()[1]}"
        for key, value in {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "x", "AWS_SECRET_ACCESS_KEY": "y",
                           "AWS_DEFAULT_REGION": "us-east-1", "AWS_MAX_ATTEMPTS": "1"}.items():
            monkeypatch.setenv(key, value)
        monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
        yield endpoint


@pytest.mark.parametrize("phase", [None, "Restarting", "Suspended", "Stopping"])
def test_a_failed_listing_passes_no_checkpoints_not_the_cached_ones(refused_endpoint: str, phase: str | None) -> None:
    """The cache may name a checkpoint older than the newest, or one retention has pruned since:
    with ``None`` the pods get an empty ``TORPOR_RESUME_FROM`` and the ranks resolve the newest."""
    job = Job.from_dict(job_body(status={"phase": phase} if phase else {}))
    shell = Shell(OperatorSettings(), kube=None, bucket=Bucket(), metrics=Metrics(CollectorRegistry()))  # type: ignore[arg-type]
    key = ("team", "demo")
    shell.checkpoints[key] = [CheckpointInfo("CKP-1_10", 10, datetime(2026, 1, 1, tzinfo=UTC), True)]
    assert asyncio.run(shell._checkpoints(key, job)) is None


def test_a_reconcile_waiting_for_a_dead_bucket_gives_its_turn_to_another_job() -> None:
    """With ``TORPOR_RECONCILE_CONCURRENCY`` turns all held by jobs waiting for their listing on a
    store that never answers, a cordon's reconcile of another job would wait for
    ``bucket_timeout_seconds``; the waiting one gives its turn up while it waits."""
    import threading

    stuck = threading.Event()
    bucket = Bucket()
    bucket.list = lambda spec, ref: stuck.wait(30) and []  # type: ignore[method-assign]
    shell = Shell(OperatorSettings(reconcile_concurrency=1, bucket_timeout_seconds=5.0), kube=None,  # type: ignore[arg-type]
                  bucket=bucket, metrics=Metrics(CollectorRegistry()))
    waiting = Job.from_dict(job_body(status={"phase": "Stopping"}))
    finished: dict[str, float] = {}

    async def reconcile(key: tuple[str, str], triggered_at: float | None, *, fresh: bool) -> None:
        if key[1] == "stuck":
            await shell._checkpoints(key, waiting)
        finished[key[1]] = asyncio.get_running_loop().time()

    shell._reconcile = reconcile  # type: ignore[method-assign]

    async def run() -> float:
        started = asyncio.get_running_loop().time()
        shell.request("team", "stuck", triggered_at=0.0, trigger="job")
        await asyncio.sleep(0.05)  # it holds the only turn and waits for the bucket
        shell.request("team", "cordoned", triggered_at=0.0, trigger="node")
        while "cordoned" not in finished:
            await asyncio.sleep(0.01)
        took = finished["cordoned"] - started
        stuck.set()
        while shell._requests:
            await asyncio.wait(list(shell._requests), timeout=10)
        return took

    try:
        took = asyncio.run(asyncio.wait_for(run(), 30))
    finally:
        stuck.set()
        shell.bucket_pool.shutdown(wait=False)
    assert took < 1.0, f"the other job waited {took:.1f} s for a turn"
    assert "stuck" in finished and shell._running._value == 1  # every turn back
