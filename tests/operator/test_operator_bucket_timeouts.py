"""The bucket never slows the reaction (issue 12, item 13), piece by piece: the operator's S3
requests have short timeouts and two attempts, and a decision that may start an incarnation goes
on without a listing once ``TORPOR_BUCKET_TIMEOUT_SECONDS`` has passed.

Real MinIO behind :class:`faultproxy.FaultProxy`, blackholed (a port that accepts and never
answers); the second test also the real API server. The end-to-end effect on another job's
cordon → GracefulExit is ``tests/e2e/test_operator_faults_bucket.py``.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

import pytest
from kubernetes import client
from prometheus_client import CollectorRegistry

from faultproxy import FaultProxy
from processes import poll
from torpor.errors import StorageError
from torpor_operator.applying import KubeClient
from torpor_operator.bucket import Bucket
from torpor_operator.contract import ENV
from torpor_operator.handlers import Shell
from torpor_operator.metrics import Metrics
from torpor_operator.reconciling import Job
from torpor_operator.settings import OperatorSettings

if TYPE_CHECKING:  # the fixtures' types
    from controlplane import ControlPlane
    from s3server import MinioServer

#: The operator's per-request timeout in these tests (its default is 5 s).
TIMEOUT_SECONDS = 0.5
#: Attempts per request, as the operator builds its Bucket.
ATTEMPTS = 2


@pytest.fixture
def proxy(minio: MinioServer) -> Iterator[FaultProxy]:
    endpoint = urlparse(minio.endpoint)
    with FaultProxy(endpoint.hostname or "127.0.0.1", endpoint.port or 80) as proxy:
        yield proxy


def job_body(bucket: str, endpoint: str, name: str = "blackholed") -> dict[str, Any]:
    return {
        "apiVersion": "torpor.dev/v1alpha1",
        "kind": "TrainingJob",
        "metadata": {"name": name},
        "spec": {
            "replicas": 2,
            # no node matches: the pods stay Pending, the operator's actions are all there is
            "template": {"spec": {"nodeSelector": {"torpor.dev/test": "never-scheduled"},
                                  "containers": [{"name": "train", "image": "python:3.11"}]}},
            "checkpoint": {"uri": f"s3://{bucket}/runs", "saveSteps": 10, "endpoint": endpoint},
        },
    }


def a_job(bucket: str, endpoint: str) -> Job:
    body = job_body(bucket, endpoint)
    body["metadata"].update(namespace="team", uid="uid-1", generation=1)
    return Job.from_dict(body)


@pytest.mark.s3
def test_a_blackholed_store_fails_a_listing_after_two_short_attempts(s3_bucket: str, proxy: FaultProxy) -> None:
    job = a_job(s3_bucket, proxy.url)
    # through the proxy, the store answers: the path works
    assert Bucket(TIMEOUT_SECONDS, ATTEMPTS).list(job.spec, job.ref) == []

    proxy.blackhole()
    before = proxy.accepted
    started = time.monotonic()
    with pytest.raises(StorageError, match=r"(?i)timeout|timed out") as raised:
        Bucket(TIMEOUT_SECONDS, ATTEMPTS).list(job.spec, job.ref)
    elapsed = time.monotonic() - started
    # botocore's defaults (8 attempts, 60 s reads) would take minutes and make 8 connections
    print(f"a listing of a blackholed store failed after {elapsed:.2f} s, {proxy.accepted - before} connections "
          f"({TIMEOUT_SECONDS} s timeout, {ATTEMPTS} attempts): {raised.value!r}")
    assert proxy.accepted - before == ATTEMPTS


@pytest.mark.cluster
def test_a_launch_decides_without_a_listing_when_the_store_does_not_answer(
        control_plane: ControlPlane, trainingjob_crd: str, namespace: str, kube: client.ApiClient,
        s3_bucket: str, proxy: FaultProxy) -> None:
    """A new job's first reconcile waits for its listing at most ``bucket_timeout_seconds``, then
    creates its ranks with no resume name, while the listing still hangs on the store."""
    proxy.blackhole()
    control_plane.kubectl("create", "-n", namespace, "-f", "-", input=json.dumps(job_body(s3_bucket, proxy.url)))
    # the Bucket's own timeout far longer than the shell's wait: the listing outlasts the decision
    shell = Shell(OperatorSettings(bucket_timeout_seconds=TIMEOUT_SECONDS), KubeClient(kube), Bucket(30.0, 1),
                  Metrics(CollectorRegistry()))
    key = (namespace, "blackholed")

    async def run() -> bool:
        started = time.monotonic()
        await shell.reconcile(*key)
        print(f"the first reconcile with the store blackholed took {time.monotonic() - started:.2f} s")
        listing = shell._listings.get(key)
        return listing is not None and listing.future is not None and not listing.future.done()

    try:
        still_listing = asyncio.run(run())
        # the listing reaches the store (its thread may connect after the decision: a slow machine)
        reached = poll(lambda: proxy.accepted >= 1, timeout=30, what="the listing to reach the store",
                       error=TimeoutError)
    finally:
        proxy.close()  # ends the hanging request
        shell.bucket_pool.shutdown(wait=True, cancel_futures=True)
    assert still_listing, "the decision waited for the listing to end"
    assert reached
    pods = client.CoreV1Api(kube).list_namespaced_pod(namespace).items
    assert sorted(p.metadata.name for p in pods) == ["blackholed-1-0", "blackholed-1-1"]
    for pod in pods:
        env = {e.name: e.value for e in pod.spec.containers[0].env}
        assert env[ENV.RESUME_FROM] in ("", None), (pod.metadata.name, env[ENV.RESUME_FROM])
