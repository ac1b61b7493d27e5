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
from test_operator_world import job_body, pod

from torpor_operator.bucket import Bucket
from torpor_operator.handlers import Shell
from torpor_operator.metrics import Metrics
from torpor_operator.observing import CheckpointInfo
from torpor_operator.reconciling import Job, wants_fresh_checkpoints
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


RUNNING = {"phase": "Running", "incarnation": 2}


@pytest.mark.parametrize(("status", "pods", "fresh"), [
    pytest.param(RUNNING, [pod("demo", 2, 0, exit_code=0), pod("demo", 2, 1)], True, id="a current rank completed"),
    pytest.param(RUNNING, [pod("demo", 2, 0, exit_code=1), pod("demo", 2, 1)], True, id="a current rank failed"),
    pytest.param(RUNNING, [pod("demo", 2, 0), pod("demo", 2, 1)], False, id="every rank running"),
    pytest.param(RUNNING, [pod("demo", 1, 0, exit_code=143), pod("demo", 2, 0), pod("demo", 2, 1)], False,
                 id="only an old incarnation's rank ended"),
    pytest.param(RUNNING, [pod("demo", 2, 0, exit_code=0, owner_uid="other"), pod("demo", 2, 1)], False,
                 id="the ended pod belongs to another job"),
    pytest.param({"phase": "Succeeded", "incarnation": 2}, [pod("demo", 2, 0, exit_code=0)], False, id="Succeeded"),
    pytest.param({"phase": "Restarting", "incarnation": 2}, [], True, id="Restarting"),
    pytest.param({}, [], True, id="new job"),
])
def test_a_decision_lists_afresh_where_it_may_launch_or_finish_the_job(
        status: dict[str, object], pods: list[dict[str, object]], fresh: bool) -> None:
    """A running job whose rank has ended may be decided ``Succeeded`` (or ``Failed``) now: its
    ``status.lastCheckpoint`` is written once, and must show the save the ranks made on their way out."""
    assert wants_fresh_checkpoints(Job.from_dict(job_body(status=status)), pods) is fresh


def test_a_running_job_whose_ranks_completed_sees_their_final_save() -> None:
    """The cached listing predates the ranks' exit save (step 60); the decision gets the fresh one."""
    final = [CheckpointInfo("CKP-1_40", 40, datetime(2026, 1, 1, tzinfo=UTC), True),
             CheckpointInfo("CKP-1_60", 60, datetime(2026, 1, 1, 0, 1, tzinfo=UTC), True)]
    bucket = Bucket()
    bucket.list = lambda spec, ref: final  # type: ignore[method-assign]
    shell = Shell(OperatorSettings(), kube=None, bucket=bucket, metrics=Metrics(CollectorRegistry()))  # type: ignore[arg-type]
    key = ("team", "demo")
    shell.jobs.add(key)
    shell.checkpoints[key] = final[:1]
    job = Job.from_dict(job_body(status=RUNNING))
    ended = [pod("demo", 2, 0, exit_code=0), pod("demo", 2, 1, exit_code=0)]
    try:
        listed = asyncio.run(shell._checkpoints(key, job, 0.0, fresh=wants_fresh_checkpoints(job, ended)))
    finally:
        shell.bucket_pool.shutdown(wait=False)
    assert listed is not None and max(c.step for c in listed) == 60
