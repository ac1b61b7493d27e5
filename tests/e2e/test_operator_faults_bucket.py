"""An S3 endpoint blackholed (issue 12, item 13): the bucket never slows the reaction.

The operator reaches each job's store at the job's ``checkpoint.endpoint``. The idle (suspended)
jobs name a :class:`faultproxy.FaultProxy` in front of MinIO, which is blackholed, so every
listing of theirs hangs; the measured jobs run on MinIO directly. Real control plane, node
agent, MinIO and ``examples/train.py`` ranks.
"""

from __future__ import annotations

import statistics
import threading
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING
from urllib.parse import urlparse

import pytest
from kubernetes import client, watch

from faultproxy import FaultProxy

if TYPE_CHECKING:  # the fixtures' types; conftest modules are not importable by name in one session
    from conftest import Env
    from s3server import MinioServer

pytestmark = pytest.mark.cluster

#: Jobs whose reconciles list the bucket (Suspended jobs list it on every pass, to know what a
#: resume would load) while it is blackholed: more than asyncio's default thread pool has threads.
LISTING_JOBS = 8
#: Running jobs whose cordon -> GracefulExit time is measured: one sample each.
MEASURED_JOBS = 5
#: The bound asserted on the slowest sample (the issue's target, p99 under 1 s, is printed).
GENEROUS_BOUND_SECONDS = 5.0


@pytest.fixture(scope="module")
def bucket_proxy(minio: MinioServer) -> Iterator[FaultProxy]:
    endpoint = urlparse(minio.endpoint)
    with FaultProxy(endpoint.hostname or "127.0.0.1", endpoint.port or 80) as proxy:
        yield proxy


class ExitWrites:
    """Watches the namespace's ConfigMaps and notes when each job's GracefulExit flag turns 1."""

    def __init__(self, kube: client.ApiClient, namespace: str) -> None:
        self.api = client.CoreV1Api(kube)
        self.namespace = namespace
        self.at: dict[str, float] = {}
        self.listening = threading.Event()
        """Set at the first event: the watch has listed the ConfigMaps and follows them."""
        self._watch = watch.Watch()
        self._stopped = False
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            self._follow()
        except Exception:
            if not self._stopped:  # a stopped watch may end its response abruptly
                raise

    def _follow(self) -> None:
        for event in self._watch.stream(self.api.list_namespaced_config_map, self.namespace, timeout_seconds=600):
            cm = event["object"]
            self.listening.set()
            data = (cm.data or {}).get("graceful-exit.json", "")
            if '"GracefulExit": 1' in data.replace('":1', '": 1'):
                self.at.setdefault(cm.metadata.labels["torpor.dev/job"], time.monotonic())

    def stop(self) -> None:
        self._stopped = True
        self._watch.stop()


def test_s3_endpoint_blackholed_keeps_cordon_to_graceful_exit_prompt(e2e: Env, kube: client.ApiClient,
                                                                      bucket_proxy: FaultProxy) -> None:
    measured = [f"run{i}" for i in range(MEASURED_JOBS)]
    for name in measured:
        e2e.create(e2e.example("--step-delay", "0.5", name=name, replicas=1))
    for name in measured:
        e2e.wait_phase("Running", name=name, timeout=240)

    bucket_proxy.blackhole()
    before = bucket_proxy.accepted
    for i in range(LISTING_JOBS):
        idle = e2e.example(name=f"idle{i}", replicas=1, suspend=True)
        idle["spec"]["checkpoint"]["endpoint"] = bucket_proxy.url
        e2e.create(idle)
    # the listings are under way, each stuck on a port that accepts and never answers
    e2e.wait("the operator's listings blackholed", lambda: bucket_proxy.accepted - before >= 4,
             timeout=60)

    writes = ExitWrites(kube, e2e.ns)
    assert writes.listening.wait(60), "the ConfigMap watch never started"
    core = client.CoreV1Api(kube)
    nodes = sorted({e2e.node_of(f"{name}-1-0") for name in measured})
    e2e.cordoned += nodes  # uncordoned after the test, whatever happens
    started = time.monotonic()
    for node in nodes:
        core.patch_node(node, {"spec": {"unschedulable": True}})
    try:
        e2e.wait("GracefulExit written for every measured job", lambda: set(measured) <= set(writes.at),
                 timeout=180)
    finally:
        writes.stop()
    delays = sorted(writes.at[name] - started for name in measured)
    print(f"cordon -> GracefulExit with the bucket blackholed, {len(delays)} jobs: "
          f"min {delays[0]:.3f} s, median {statistics.median(delays):.3f} s, max (p99) {delays[-1]:.3f} s; "
          f"issue 12's target of 1 s {'met' if delays[-1] < 1.0 else 'missed'}")
    # A timing bound, which this suite otherwise avoids: issue 12 names one (p99 under 1 s; with
    # five samples the p99 is the maximum). The five jobs react at once, on a test machine whose
    # load swings: the printed figures were 0.38-0.64 s and, at a load average of 16 on 2 cores,
    # 0.89-1.38 s. So the assertion is generous (GENEROUS_BOUND_SECONDS), and still far from main,
    # where none of the five was written within 180 s (botocore's 8 attempts and 60 s reads of the
    # blackholed listings filled the thread pool the API calls need).
    assert delays[-1] < GENEROUS_BOUND_SECONDS, delays
    # the status patch follows the flag in the same apply: await it (read at once, it may lag a moment)
    e2e.wait("every measured job stopping for a preemption",
             lambda: all(e2e.status(name).get("stopReason") == "Preemption" for name in measured), timeout=60)
