"""The retention/resync task: one job's failing pass never stops the others', and a task that died
or stalled fails ``/healthz`` (issue 12, item 2).

The shell is the real one; only its per-job pass (``Shell._prune``) is replaced where a test needs
a job whose pass raises or hangs. ``/healthz`` is kopf's own health reporter serving the
operator's probe, so "fails" means what the liveness probe sees: HTTP 500.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator

import kopf
import pytest
from kopf._core.engines.probing import health_reporter
from prometheus_client import CollectorRegistry

from torpor_operator.bucket import Bucket
from torpor_operator.handlers import Shell, retention_alive
from torpor_operator.metrics import Metrics
from torpor_operator.settings import OperatorSettings

A, B, C = ("team", "a"), ("team", "b"), ("team", "c")


class RecordingShell(Shell):
    """A shell whose per-job pass records the job and raises for the jobs in ``failing``, hangs for
    those in ``hanging``."""

    def __init__(self, settings: OperatorSettings, failing: set[tuple[str, str]] = frozenset(),  # type: ignore[assignment]
                 hanging: set[tuple[str, str]] = frozenset()) -> None:  # type: ignore[assignment]
        super().__init__(settings, kube=None, bucket=Bucket(), metrics=Metrics(CollectorRegistry()))  # type: ignore[arg-type]
        self.failing, self.hanging = failing, hanging
        self.passes: list[tuple[str, str]] = []

    async def _prune(self, key: tuple[str, str]) -> None:
        self.passes.append(key)
        if key in self.failing:
            raise ConnectionRefusedError(f"{key[0]}/{key[1]}: the API server is away")
        if key in self.hanging:
            await asyncio.Event().wait()


def test_a_jobs_failing_retention_pass_leaves_the_other_jobs_pass_to_run() -> None:
    shell = RecordingShell(OperatorSettings(), failing={A})
    shell.jobs |= {A, B, C}
    asyncio.run(shell.prune_all())  # does not raise
    assert shell.passes == [A, B, C]  # b and c still had their pass, in the same pass as a's error
    assert shell.metrics.retention_errors._value.get() == 1


def _port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.asynccontextmanager
async def healthz(shell: Shell) -> AsyncIterator[str]:
    """kopf's health reporter serving only the operator's retention probe; yields its URL."""
    registry = kopf.OperatorRegistry()
    kopf.on.probe(id="retention", registry=registry)(retention_alive)
    memo = kopf.Memo(shell=shell)
    ready = asyncio.Event()
    url = f"http://127.0.0.1:{_port()}/healthz"
    reporter = asyncio.get_running_loop().create_task(health_reporter(
        url, memo=memo, indices={}, registry=registry,
        settings=kopf.OperatorSettings(), ready_flag=ready))
    await asyncio.wait_for(ready.wait(), 30)
    try:
        yield url
    finally:
        reporter.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await reporter


def _status(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


async def _probe(shell: Shell) -> tuple[int, str]:
    async with healthz(shell) as url:
        return await asyncio.to_thread(_status, url)


def test_a_healthy_retention_task_passes_the_probe() -> None:
    shell = RecordingShell(OperatorSettings(retention_interval_seconds=0.01))
    shell.jobs |= {A, B}

    async def run() -> None:
        shell.retention_task = asyncio.get_running_loop().create_task(shell.retention_loop())
        while len(shell.passes) < 4:  # two passes over both jobs: it loops
            await asyncio.sleep(0.01)
        assert shell.retention_problem() is None
        assert await retention_alive(memo=kopf.Memo(shell=shell)) == "ok"
        status, body = await _probe(shell)
        assert status == 200, body
        assert '"retention": "ok"' in body
        shell.retention_task.cancel()

    asyncio.run(asyncio.wait_for(run(), 60))
    assert shell.metrics.retention_up._value.get() == 0.0  # cancelled at the end


def test_a_retention_task_that_died_fails_the_probe() -> None:
    shell = RecordingShell(OperatorSettings())

    async def dies() -> None:
        raise RuntimeError("the loop broke")

    async def run() -> None:
        shell.retention_task = asyncio.get_running_loop().create_task(dies())
        with contextlib.suppress(RuntimeError):
            await shell.retention_task
        assert shell.metrics.retention_up._value.get() == 0.0
        with pytest.raises(kopf.PermanentError, match="the retention task ended: RuntimeError"):
            await retention_alive(memo=kopf.Memo(shell=shell))
        status, body = await _probe(shell)
        assert status == 500, body

    asyncio.run(asyncio.wait_for(run(), 60))


def test_a_stalled_retention_task_fails_the_probe() -> None:
    """A pass that never returns (a job's pass hanging) leaves the task alive but stalled: past
    three intervals plus 20 bucket timeouts without progress, the probe fails."""
    shell = RecordingShell(OperatorSettings(retention_interval_seconds=0.01, bucket_timeout_seconds=0.01),
                           hanging={B})
    shell.jobs |= {A, B, C}

    async def run() -> None:
        shell.retention_task = asyncio.get_running_loop().create_task(shell.retention_loop())
        started = time.monotonic()
        while shell.retention_problem() is None:
            await asyncio.sleep(0.01)
        print(f"stall seen after {time.monotonic() - started:.2f} s")
        assert not shell.retention_task.done()  # alive, but stuck in b's pass
        assert shell.passes == [A, B]
        assert shell.metrics.retention_up._value.get() == 0.0
        with pytest.raises(kopf.PermanentError, match="made no progress"):
            await retention_alive(memo=kopf.Memo(shell=shell))
        status, body = await _probe(shell)
        assert status == 500, body
        shell.retention_task.cancel()

    asyncio.run(asyncio.wait_for(run(), 60))


def test_a_new_jobs_empty_launch_listing_leaves_it_out_of_the_next_retention_pass() -> None:
    """The shell's wiring of ``RetentionSchedule.listed_empty``: a listing that found nothing is
    the job's first pass; one that found a checkpoint is not."""
    from torpor_operator.handlers import _Listing
    from torpor_operator.retaining import JobFacts

    async def scenario() -> list[tuple[str, str]]:
        shell = RecordingShell(OperatorSettings())
        shell.jobs |= {A, B}
        loop = asyncio.get_running_loop()
        for key, found in ((A, []), (B, ["a checkpoint"])):
            shell.schedule.observe(key, JobFacts(phase="Pending", generation=1))  # the launch's reconcile
            listing = _Listing(started=time.monotonic(), generation=1)
            listing.future = loop.create_future()
            listing.future.set_result(found)
            shell._listed(key, listing)
        await shell.prune_all()
        return shell.passes

    assert asyncio.run(scenario()) == [B]


def test_a_job_whose_launch_listing_lands_while_a_pass_runs_is_left_out_of_that_pass() -> None:
    """500 jobs created at once: a pass that wakes while their launch listings are still queued
    finds them all due, then takes ~0.1 s each, one after another — by the time it reaches a job,
    that job's own listing has long recorded its first pass. Each job is asked again right before
    its turn, and one whose launch listing is still running is left to it."""
    from torpor_operator.handlers import _Listing
    from torpor_operator.retaining import JobFacts

    async def scenario() -> list[tuple[str, str]]:
        loop = asyncio.get_running_loop()

        class LandingShell(RecordingShell):
            async def _prune(self, key: tuple[str, str]) -> None:
                await super()._prune(key)
                if key == A:  # while A is passed, B's launch listing lands: empty prefix
                    listing = _Listing(started=time.monotonic(), generation=1)
                    listing.future = loop.create_future()
                    listing.future.set_result([])
                    self._listed(B, listing)

        shell = LandingShell(OperatorSettings())
        shell.jobs |= {A, B, C}
        for key in (A, B, C):
            shell.schedule.observe(key, JobFacts(phase="Pending", generation=1))
        running = shell._listings[C] = _Listing(started=time.monotonic(), generation=1)
        running.future = loop.create_future()  # C's launch listing is still under way
        await shell.prune_all()
        running.future.cancel()
        return shell.passes

    assert asyncio.run(scenario()) == [A]


def test_a_job_with_a_listing_in_flight_at_every_pass_is_passed_once_one_listing_has_landed() -> None:
    """Only a job's first listing is left to itself: a job reconciled again and again against a
    slow store can have a listing in flight at every pass, and a listing that found checkpoints
    records no pass, so leaving every such job out would never prune it."""
    from torpor_operator.handlers import _Listing
    from torpor_operator.retaining import JobFacts

    async def scenario() -> list[tuple[str, str]]:
        loop = asyncio.get_running_loop()
        shell = RecordingShell(OperatorSettings())
        shell.jobs |= {A}
        shell.schedule.observe(A, JobFacts(phase="Stopping", generation=1))
        shell._listed_at[A] = time.monotonic() - 30  # an earlier listing landed (and found checkpoints)
        running = shell._listings[A] = _Listing(started=time.monotonic(), generation=1)
        running.future = loop.create_future()  # and another is under way now
        await shell.prune_all()
        running.future.cancel()
        return shell.passes

    assert asyncio.run(scenario()) == [A]


def test_a_retention_pass_that_finds_what_the_last_one_found_reconciles_nothing() -> None:
    """Each pass of a job that saves periodically was a GET, a listing and a whole reconcile (three
    LISTs of children, a status patch) even when the listing showed nothing new; now the second
    such pass stops after the listing. A new checkpoint, or a deletion, reconciles again."""
    from datetime import UTC, datetime

    from torpor_operator.bucket import PruneResult
    from torpor_operator.observing import CheckpointInfo

    body = {"apiVersion": "torpor.dev/v1alpha1", "kind": "TrainingJob",
            "metadata": {"name": "a", "namespace": "team", "uid": "uid-a", "generation": 1},
            "spec": {"replicas": 1, "checkpoint": {"uri": "s3://bucket/runs", "saveSteps": 10},
                     "template": {"spec": {"containers": [{"name": "train", "image": "x", "command": ["python"]}]}}},
            "status": {"phase": "Running"}}

    def ckpt(step: int) -> CheckpointInfo:
        return CheckpointInfo(name=f"Net-1_{step}", step=step, time=datetime(2026, 1, 1, 0, step, tzinfo=UTC),
                              complete=True)

    class Store:  # what the bucket answers, pass by pass: the bucket's own code is tested against MinIO
        def __init__(self) -> None:
            self.answers = [PruneResult([ckpt(1)]), PruneResult([ckpt(1)]), PruneResult([ckpt(1), ckpt(2)]),
                            PruneResult([ckpt(2)], deleted=["Net-1_1"]), PruneResult([ckpt(2)])]

        def prune(self, *_: object) -> PruneResult:
            return self.answers.pop(0)

    class Jobs:
        def read_job(self, *_: object) -> dict[str, object]:
            return body

    class PassShell(Shell):
        def __init__(self) -> None:
            super().__init__(OperatorSettings(), kube=Jobs(), bucket=Bucket(),  # type: ignore[arg-type]
                             metrics=Metrics(CollectorRegistry()))
            self.bucket = Store()  # type: ignore[assignment]
            self.reconciled: list[str] = []

        async def reconcile(self, namespace: str, name: str, **_: object) -> None:
            self.reconciled.append(name)

    async def passes() -> list[int]:
        shell = PassShell()
        shell.jobs.add(A)
        counts = []
        for _ in range(5):
            await shell._prune(A)
            counts.append(len(shell.reconciled))
        return counts

    assert asyncio.run(passes()) == [1, 1, 2, 3, 4], "first pass, same again, a new one, a deletion, after a deletion"


def test_a_retention_pass_over_an_empty_prefix_of_a_job_that_shows_no_checkpoint_reconciles_nothing() -> None:
    """A new job whose launch listing timed out is passed once; finding nothing stored for a job
    whose status shows no checkpoint, that pass changes no decision input: no reconcile (500 new
    jobs made 500 reconciles in the bench's idle minute). A job that shows one is reconciled."""
    from torpor_operator.bucket import PruneResult

    def body(status: dict[str, object]) -> dict[str, object]:
        return {"apiVersion": "torpor.dev/v1alpha1", "kind": "TrainingJob",
                "metadata": {"name": "a", "namespace": "team", "uid": "uid-a", "generation": 1},
                "spec": {"replicas": 1, "checkpoint": {"uri": "s3://bucket/runs", "saveSteps": 10},
                         "template": {"spec": {"containers": [{"name": "train", "image": "x",
                                                               "command": ["python"]}]}}},
                "status": status}

    class Empty:
        def prune(self, *_: object) -> PruneResult:
            return PruneResult([])

    class Jobs:
        def __init__(self, status: dict[str, object]) -> None:
            self.body = body(status)

        def read_job(self, *_: object) -> dict[str, object]:
            return self.body

    class PassShell(Shell):
        def __init__(self, status: dict[str, object]) -> None:
            super().__init__(OperatorSettings(), kube=Jobs(status), bucket=Bucket(),  # type: ignore[arg-type]
                             metrics=Metrics(CollectorRegistry()))
            self.bucket = Empty()  # type: ignore[assignment]
            self.reconciled = 0

        async def reconcile(self, namespace: str, name: str, **_: object) -> None:
            self.reconciled += 1

    async def reconciles(status: dict[str, object]) -> int:
        shell = PassShell(status)
        shell.jobs.add(A)
        for _ in range(2):
            await shell._prune(A)
        return shell.reconciled

    assert asyncio.run(reconciles({"phase": "Running"})) == 0
    shown = {"phase": "Running", "lastCheckpoint": {"name": "Net-1_10", "step": 10}}
    assert asyncio.run(reconciles(shown)) == 1  # its checkpoints are gone: the status must follow
