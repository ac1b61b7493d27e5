"""What the operator watches and holds, against the real API server (issue 13, items 1, 2, 4).

Read as a user would: ``/metrics`` (``torpor_cached_entries``, ``torpor_watch_events_total``,
``torpor_reconciles_total``) and the objects kubectl shows. The pods stay Pending (a
nodeSelector no node matches), so the operator's own actions are all there is to observe.
"""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Iterator

import pytest
from prometheus_client.parser import text_string_to_metric_families
from test_operator_shell import UNSCHEDULABLE, Kube, _free_port, job

from controlplane import ControlPlane, wait_for_condition
from operator_process import OperatorProcess

pytestmark = pytest.mark.cluster

#: Caches that are not per job: the nodes of the cluster.
CLUSTER_WIDE = {"nodes", "troubled_nodes"}


class Metrics:
    """The operator's ``/metrics``, read as Prometheus would."""

    def __init__(self, port: int) -> None:
        self.port = port

    def read(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics", timeout=5) as resp:
            text = resp.read().decode()
        return {(s.name, tuple(sorted(s.labels.items()))): s.value
                for family in text_string_to_metric_families(text) for s in family.samples}

    def value(self, name: str, **labels: str) -> float:
        return self.read().get((name, tuple(sorted(labels.items()))), 0.0)

    def started(self) -> float:
        """Reconciles begun (any trigger)."""
        return sum(v for (name, _), v in self.read().items() if name == "torpor_reconciles_total")

    def finished(self) -> float:
        """Reconciles ended."""
        return self.value("torpor_reconcile_seconds_count")

    def caches(self) -> dict[str, float]:
        return {dict(labels)["cache"]: v for (name, labels), v in self.read().items()
                if name == "torpor_cached_entries"}


def with_metrics(op: OperatorProcess, **env: str) -> Metrics:
    """Restart the test's operator with its metrics endpoint on a free port (and ``env``)."""
    op.stop()
    port = _free_port()
    op.env.update(TORPOR_METRICS_PORT=str(port), **env)
    op.start()
    m = Metrics(port)
    wait_for_condition(lambda: "torpor_reconcile_seconds_count" in {n for n, _ in m.read()}, timeout=60,
                       what="the operator's /metrics")
    return m


@pytest.fixture
def metrics(operator_process: OperatorProcess) -> Iterator[Metrics]:
    """The test's operator restarted with its metrics endpoint on a free port."""
    yield with_metrics(operator_process)


def create(cp: ControlPlane, namespace: str, body: dict) -> None:
    cp.kubectl("create", "-n", namespace, "-f", "-", input=json.dumps(body))


def test_a_pod_without_torpors_label_never_reaches_the_operator(control_plane: ControlPlane, namespace: str,
                                                                s3_bucket: str, metrics: Metrics) -> None:
    other = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "not-torpors", "labels": {"app": "other"}},
             "spec": {"nodeSelector": UNSCHEDULABLE, "containers": [{"name": "c", "image": "python:3.11"}]}}
    create(control_plane, namespace, other)
    # the watch sends events in order: once the job's pods (created after it) have arrived, so
    # would the other pod have
    create(control_plane, namespace, job(s3_bucket))
    k = Kube(control_plane, namespace)
    k.wait("Pending", lambda: k.status().get("phase") == "Pending")
    wait_for_condition(lambda: metrics.caches().get("pods", 0) >= 2, timeout=30, what="the job's 2 pods seen")
    assert metrics.caches()["pods"] == 2, metrics.caches()
    assert k.names("pods") == ["not-torpors", "shell-1-0", "shell-1-1"]


def test_annotations_and_the_operators_own_status_patches_reconcile_nothing(
        control_plane: ControlPlane, namespace: str, s3_bucket: str, metrics: Metrics) -> None:
    k = Kube(control_plane, namespace)
    create(control_plane, namespace, job(s3_bucket))
    k.wait("Pending", lambda: k.status().get("phase") == "Pending")
    reconciled = metrics.value("torpor_watch_events_total", resource="trainingjobs", outcome="reconcile")
    unchanged = metrics.value("torpor_watch_events_total", resource="trainingjobs", outcome="unchanged")
    # as kopf and other tools annotate objects: nothing a decision reads
    control_plane.kubectl("annotate", "-n", namespace, "tj", "shell", "example.com/note=1")
    wait_for_condition(lambda: metrics.value("torpor_watch_events_total", resource="trainingjobs",
                                             outcome="unchanged") > unchanged, timeout=30,
                       what="the annotation's event counted unchanged")
    assert metrics.value("torpor_watch_events_total", resource="trainingjobs", outcome="reconcile") == reconciled
    # a spec change reconciles once; the operator's status patch that follows (Suspended) none
    unchanged = metrics.value("torpor_watch_events_total", resource="trainingjobs", outcome="unchanged")
    k.patch({"suspend": True})
    k.wait("Suspended", lambda: k.status().get("phase") == "Suspended" and k.names("pods") == [])
    wait_for_condition(lambda: metrics.value("torpor_watch_events_total", resource="trainingjobs",
                                             outcome="unchanged") > unchanged, timeout=30,
                       what="the operator's own status patch counted unchanged")
    assert metrics.value("torpor_watch_events_total", resource="trainingjobs", outcome="reconcile") == reconciled + 1
    assert metrics.value("torpor_reconciles_total", trigger="job") >= 1


def test_deleted_jobs_leave_nothing_in_the_operators_caches(control_plane: ControlPlane, namespace: str,
                                                            s3_bucket: str, metrics: Metrics) -> None:
    k = Kube(control_plane, namespace)
    names = ["cached-a", "cached-b", "cached-c"]
    for name in names:
        spec = {"checkpoint": {"uri": f"s3://{s3_bucket}/runs", "saveSteps": 10,
                               "deleteOnJobDeletion": name == "cached-c"}}
        create(control_plane, namespace, job(s3_bucket, name, **spec))
    for name in names:
        k.wait(f"{name} Pending", lambda name=name: k.status(name).get("phase") == "Pending")
    # a retention pass lists every job's bucket prefix (every 2 s here)
    wait_for_condition(lambda: metrics.caches().get("manifests", 0) == 3, timeout=30, what="3 jobs' manifests")
    held = metrics.caches()
    assert held["jobs"] == 3 and held["pods"] == 6 and held["locks"] == 3, held
    control_plane.kubectl("delete", "-n", namespace, "tj", *names, "--wait=true", "--timeout=90s")
    k.wait("no pods", lambda: k.names("pods") == [], timeout=90)

    def emptied() -> dict[str, float] | None:
        held = {c: v for c, v in metrics.caches().items() if c not in CLUSTER_WIDE}
        return held if not any(held.values()) else None

    try:
        wait_for_condition(emptied, timeout=30, what="every per-job cache empty")
    except TimeoutError as exc:
        raise AssertionError(f"{exc}; still held: {metrics.caches()}") from exc


def test_a_big_template_is_not_copied_into_an_annotation(control_plane: ControlPlane, namespace: str,
                                                         s3_bucket: str, metrics: Metrics) -> None:
    k = Kube(control_plane, namespace)
    big = job(s3_bucket, "big", checkpoint={"uri": f"s3://{s3_bucket}/runs", "saveSteps": 10,
                                             "deleteOnJobDeletion": True})
    big["spec"]["template"]["spec"]["containers"][0]["env"] = [{"name": "BIG", "value": "x" * 100_000}]
    create(control_plane, namespace, big)
    k.wait("Pending", lambda: k.status("big").get("phase") == "Pending")
    meta = k.get("tj", "big")["metadata"]
    assert meta.get("finalizers"), "the deletion handler's finalizer is on the job"
    annotations = meta.get("annotations") or {}
    assert "torpor.dev/last-handled-configuration" not in annotations
    assert len(json.dumps(annotations)) < 1024, annotations
    control_plane.kubectl("delete", "-n", namespace, "tj", "big", "--wait=true", "--timeout=90s")


def test_a_pod_change_is_reconciled_from_the_watch_without_a_get_or_a_list(control_plane: ControlPlane, namespace: str,
                                                                  s3_bucket: str,
                                                                  operator_process: OperatorProcess) -> None:
    # no retention pass (each LISTs its job's pods) during the test
    metrics = with_metrics(operator_process, TORPOR_RETENTION_INTERVAL_SECONDS="3600")
    k = Kube(control_plane, namespace)
    create(control_plane, namespace, job(s3_bucket))
    k.wait("Pending", lambda: k.status().get("phase") == "Pending")
    wait_for_condition(lambda: metrics.caches().get("pod_index", 0) == 2, timeout=30, what="2 pods indexed")
    reads = ("torpor_pod_lists_total", "torpor_child_lists_total", "torpor_job_reads_total")
    # a first change, reconciled after the launch's own reconciles (the one after the launch's
    # writes LISTs the children written); once it has ended, every LIST of the launch is counted
    started = metrics.started()
    control_plane.kubectl("annotate", "-n", namespace, "pod", "shell-1-0", "example.com/warm=1")
    wait_for_condition(lambda: metrics.started() > started and metrics.started() == metrics.finished(),
                       timeout=30, what="the first annotation's reconcile ended")
    before_reads = {name: metrics.value(name) for name in reads}
    assert before_reads["torpor_pod_lists_total"] >= 1  # the first reconcile LISTs: the index answers only after one
    for rank in (0, 1):  # a change a decision reads (a pod's annotations) reconciles the job
        before = metrics.value("torpor_reconciles_total", trigger="pod")
        control_plane.kubectl("annotate", "-n", namespace, "pod", f"shell-1-{rank}", "example.com/note=1")
        wait_for_condition(lambda before=before: metrics.value("torpor_reconciles_total", trigger="pod") > before,
                           timeout=30, what=f"a reconcile for rank {rank}'s annotation")
    # the job from its watch, the pods from the pod index, the children from the last LIST
    assert {name: metrics.value(name) for name in reads} == before_reads
