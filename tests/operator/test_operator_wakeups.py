"""A scheduled wake-up reads the job's pods from the index, not by LIST (issue 13, item 1).

Against the real API server, with :class:`~torpor_operator.handlers.Shell` driven directly: the
test plays the pod watch (it hands the pods kopf would stream to the index, as ``on_pod`` does),
so ``torpor_pod_lists_total`` counts only the LISTs a reconcile makes itself.
"""

from __future__ import annotations

import asyncio
import json
from typing import TYPE_CHECKING

import pytest
from kubernetes import client
from prometheus_client import CollectorRegistry
from test_operator_shell import job

from torpor_operator.applying import KubeClient
from torpor_operator.bucket import Bucket
from torpor_operator.contract import LABEL_JOB
from torpor_operator.handlers import Shell
from torpor_operator.metrics import Metrics
from torpor_operator.settings import OperatorSettings

if TYPE_CHECKING:
    from controlplane import ControlPlane

pytestmark = pytest.mark.cluster


def test_a_wakeup_reconciles_from_the_index_and_an_api_retry_lists(
        control_plane: ControlPlane, trainingjob_crd: str, namespace: str, kube: client.ApiClient,
        s3_bucket: str) -> None:
    control_plane.kubectl("create", "-n", namespace, "-f", "-", input=json.dumps(job(s3_bucket)))
    registry = CollectorRegistry()
    shell = Shell(OperatorSettings(), KubeClient(kube), Bucket(5.0, 2), Metrics(registry))
    key = (namespace, "shell")

    def lists() -> float:
        return registry.get_sample_value("torpor_pod_lists_total") or 0.0

    def watch_shows_the_pods() -> None:
        for pod in client.CoreV1Api(kube).list_namespaced_pod(namespace, label_selector=LABEL_JOB).items:
            shell.pod_index.put(namespace, pod.metadata.labels[LABEL_JOB], kube.sanitize_for_serialization(pod))

    async def run() -> tuple[float, float, float]:
        await shell.reconcile(*key)  # creates the ranks: expected until the watch shows them
        watch_shows_the_pods()
        await shell.reconcile(*key)  # the index cannot answer yet only for a pod never shown
        first = lists()
        await shell._wake(key)  # a scheduled step: what a requeue_after leads to
        woken = lists()
        shell._errors[key] = 1  # the last reconcile met an API error: its retry re-reads everything
        await shell._wake(key)
        return first, woken, lists()

    try:
        first, woken, retried = asyncio.run(run())
    finally:
        shell.bucket_pool.shutdown(wait=True, cancel_futures=True)
    assert first >= 1
    assert woken == first, "a scheduled wake-up LISTed the job's pods"
    assert retried == first + 1, "a retry after an API error did not LIST"
