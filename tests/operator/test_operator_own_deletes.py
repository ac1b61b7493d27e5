"""The operator's own pod deletions are read back from the index: a reconcile that runs before
the watch has shown a deletion neither deletes the pod again nor tells it again.

Against the real API server, with :class:`~torpor_operator.handlers.Shell` driven directly and
the test playing the pod watch (as in ``test_operator_wakeups``): the watch is held back after
the first deletion, as a loaded API server or a slow event stream holds it back in CI.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import TYPE_CHECKING

import pytest
from kubernetes import client
from prometheus_client import CollectorRegistry
from test_operator_shell import Kube, job

from torpor_operator.applying import KubeClient
from torpor_operator.bucket import Bucket
from torpor_operator.contract import LABEL_JOB
from torpor_operator.handlers import Shell
from torpor_operator.metrics import Metrics
from torpor_operator.settings import OperatorSettings

if TYPE_CHECKING:
    from controlplane import ControlPlane

pytestmark = pytest.mark.cluster


def test_a_rank_deleted_past_its_exit_deadline_is_deleted_and_told_once(
        control_plane: ControlPlane, trainingjob_crd: str, namespace: str, kube: client.ApiClient,
        s3_bucket: str) -> None:
    control_plane.kubectl("create", "-n", namespace, "-f", "-", input=json.dumps(job(s3_bucket)))
    k = Kube(control_plane, namespace)
    shell = Shell(OperatorSettings(), KubeClient(kube), Bucket(5.0, 2), Metrics(CollectorRegistry()))
    key = (namespace, "shell")

    def watch_shows_the_pods() -> None:
        for pod in client.CoreV1Api(kube).list_namespaced_pod(namespace, label_selector=LABEL_JOB).items:
            shell.pod_index.put(namespace, pod.metadata.labels[LABEL_JOB], kube.sanitize_for_serialization(pod))

    def told() -> int:
        return k.reasons().count("ExitDeadlineExceeded")

    async def run() -> None:
        await shell.reconcile(*key)  # creates the ranks
        watch_shows_the_pods()
        await shell.reconcile(*key)
        k.patch({"suspend": True})
        await shell.reconcile(*key)  # Suspending: GracefulExit; nobody exits (the pods never run)
        watch_shows_the_pods()

        async def past_the_deadline() -> bool:
            await shell.reconcile(*key)
            return told() > 0

        deadline = time.monotonic() + 30
        while not await past_the_deadline():
            assert time.monotonic() < deadline, "no rank was deleted past its exit deadline"
            await asyncio.sleep(0.2)
        # the watch has not shown the deletions yet: the next reconciles read the index as it was
        await shell.reconcile(*key)
        await shell.reconcile(*key)

    try:
        asyncio.run(run())
    finally:
        shell.bucket_pool.shutdown(wait=True, cancel_futures=True)
    assert told() == 1, f"ExitDeadlineExceeded told {told()} times: {k.reasons()}"
