"""Several operator replicas through kopf peering, on the real control plane and node agent.

Each test starts two ``python -m torpor_operator`` processes with ``TORPOR_PEERING`` and a
6 s peering lifetime, and shows what a user would check: the replicas' logs (kopf's "Pausing
operations in favour of …" / "Resuming operations after the pause"), the peering object's
status (one keep-alive record per replica, keyed by its ``POD_ID``), and a TrainingJob whose
ranks sleep: one set of pods, reconciled by the active replica only, and a change to the job
handled by the standby once the active replica is gone — after its lease expired (SIGKILL) or
at once (SIGTERM: kopf removes its record on exit).

The figures measured (SIGKILL and SIGTERM takeover) are printed; ``pytest -s`` shows them.
"""

from __future__ import annotations

import json
import os
import re
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from controlplane import ControlPlane, wait_for_condition
from operator_process import OperatorProcess

pytestmark = pytest.mark.cluster

#: kopf's peering lifetime of every replica here, seconds: a SIGKILLed replica is replaced
#: after at most this long. kopf refreshes a record every second at this lifetime.
LIFETIME = 6
PAUSED = "Pausing operations in favour of"
RESUMED = "Resuming operations after the pause"
ALL_PAUSED = "Pausing all operators, including self"
#: torpor's own lines: whether scheduled reconciles and retention run in this replica
OUTRANKED = "outrank this replica"
ACTING = "scheduled reconciles and retention run here"


def sleeping_job(bucket: str, name: str, **spec: Any) -> dict[str, Any]:
    """Two ranks that sleep: Running as soon as the node agent starts them, deaf to GracefulExit."""
    body: dict[str, Any] = {
        "apiVersion": "torpor.dev/v1alpha1",
        "kind": "TrainingJob",
        "metadata": {"name": name},
        "spec": {
            "replicas": 2,
            "template": {"spec": {"containers": [{"name": "train", "image": "python:3.11-slim",
                                                  "command": ["python", "-c", "import time; time.sleep(600)"]}]}},
            "checkpoint": {"uri": f"s3://{bucket}/runs"},
            "gracefulExit": {"exitDeadlineSeconds": 1, "terminationGracePeriodSeconds": 5},
        },
    }
    body["spec"].update(spec)
    return body


class Cluster:
    """The test's namespace, and the peering object as ``kubectl`` shows it."""

    def __init__(self, cp: ControlPlane, namespace: str) -> None:
        self.cp, self.ns = cp, namespace

    def get(self, *what: str, namespaced: bool = True) -> Any:
        where = ("-n", self.ns) if namespaced else ()
        return json.loads(self.cp.kubectl("get", *where, *what, "-o", "json").stdout)

    def status(self, job: str) -> dict[str, Any]:
        return self.get("tj", job).get("status", {})

    def pods(self, job: str) -> list[str]:
        return sorted(p["metadata"]["name"] for p in self.get("pods", "-l", f"torpor.dev/job={job}")["items"])

    def reasons(self, job: str) -> list[str]:
        events = self.get("events", "--field-selector", f"involvedObject.kind=TrainingJob,involvedObject.name={job}")
        return [e["reason"] for e in sorted(events["items"], key=lambda e: int(e["metadata"]["resourceVersion"]))]

    def create(self, body: dict[str, Any]) -> None:
        self.cp.kubectl("create", "-n", self.ns, "-f", "-", input=json.dumps(body))

    def patch(self, job: str, spec: dict[str, Any]) -> None:
        self.cp.kubectl("patch", "-n", self.ns, "tj", job, "--type=merge", "-p", json.dumps({"spec": spec}))

    def peers(self, peering: str, *, namespaced: bool = False) -> dict[str, dict[str, Any]]:
        """The keep-alive records of a peering object, by replica identity (``POD_ID``)."""
        kind = "kopfpeering" if namespaced else "clusterkopfpeering"
        return self.get(kind, peering, namespaced=namespaced).get("status") or {}

    def wait_phase(self, job: str, phase: str, timeout: float = 90) -> dict[str, Any]:
        def reached() -> dict[str, Any] | None:
            status = self.status(job)
            return status if status.get("phase") == phase else None
        return wait_for_condition(reached, timeout=timeout, what=f"{job} {phase}")


class Replica(OperatorProcess):
    """One operator replica, named by its ``POD_ID`` (kopf's identity in the peering object)."""

    def __init__(self, name: str, env: dict[str, str], log_path: Path) -> None:
        super().__init__({**env, "POD_ID": name}, log_path)
        self.name = name

    def wait_log(self, text: str, count: int = 1, timeout: float = 60) -> float:
        """Wait until ``text`` occurs ``count`` times in the log; return ``time.monotonic()`` then."""
        def found() -> bool:
            assert self.proc is not None and self.proc.poll() is None, f"{self.name} exited:\n{self.log()[-3000:]}"
            return self.log().count(text) >= count
        wait_for_condition(found, timeout=timeout, what=f"{count}x {text!r} in {self.name}'s log", interval=0.02)
        return time.monotonic()

    def handled(self, since: int = 0) -> list[str]:
        """kopf's "Handler '…' succeeded/failed" lines after character ``since`` of the log: a paused
        replica has none, as its watches are stopped."""
        return [line for line in self.log()[since:].splitlines() if line.startswith("Handler '")]

    @property
    def priority(self) -> int:
        """The priority the replica logged at start-up (explicit or drawn)."""
        match = re.search(r"with priority (-?\d+)", self.log())
        assert match, self.log()[-2000:]
        return int(match[1])


@pytest.fixture
def cluster(control_plane: ControlPlane, namespace: str) -> Cluster:
    return Cluster(control_plane, namespace)


@pytest.fixture
def replicas(control_plane: ControlPlane, trainingjob_crd: str, peering_crds: tuple[str, str], node_agent: Any,
             namespace: str, s3_bucket: str, tmp_path: Path) -> Iterator[Callable[..., Replica]]:
    """Start replicas with a peering named after the test's namespace; all are stopped afterwards."""
    started: list[Replica] = []
    base = {k: v for k, v in os.environ.items() if not k.startswith("TORPOR_")}  # s3_bucket: MinIO's credentials
    base.update(KUBECONFIG=str(control_plane.kubeconfig), TORPOR_HEALTH_PORT="0", TORPOR_METRICS_PORT="0",
                TORPOR_LOG_FORMAT="plain", TORPOR_PEERING=namespace, TORPOR_PEERING_LIFETIME_SECONDS=str(LIFETIME),
                TORPOR_WATCH_TIMEOUT_SECONDS="60", TORPOR_RETENTION_INTERVAL_SECONDS="1")

    def start(name: str, priority: int | None = None, *, namespaced: bool = False) -> Replica:
        env = dict(base)
        if priority is not None:
            env["TORPOR_PEERING_PRIORITY"] = str(priority)
        if namespaced:
            env["TORPOR_NAMESPACES"] = namespace
        replica = Replica(name, env, tmp_path / f"{name}.log")
        replica.start()
        started.append(replica)
        return replica

    try:
        yield start
    finally:
        # all at once: stopped one by one, each standby would take over for a moment
        for replica in started:
            if replica.proc is not None and replica.proc.poll() is None:
                os.kill(replica.proc.pid, signal.SIGTERM)
        for replica in started:
            replica.stop()
        for replica in started:
            print(f"--- {replica.name}\n{replica.log()[-6000:]}")  # shown by pytest only when the test failed


def test_the_lower_priority_replica_waits_and_takes_over_after_a_sigkill(
        cluster: Cluster, replicas: Callable[..., Replica], namespace: str, s3_bucket: str) -> None:
    low = replicas("low", priority=1)
    low.wait_log(RESUMED)  # alone, it acts
    high = replicas("high", priority=2)
    high.wait_log(RESUMED)
    low.wait_log(PAUSED)
    assert "priority=2" in next(line for line in low.log().splitlines() if PAUSED in line)
    assert cluster.peers(namespace).keys() == {"low", "high"}

    paused_at = len(low.log())
    cluster.create(sleeping_job(s3_bucket, "peered"))
    cluster.wait_phase("peered", "Running")
    wait_for_condition(lambda: cluster.reasons("peered") == ["Started", "Running"], timeout=30, what="events")
    assert cluster.pods("peered") == ["peered-1-0", "peered-1-1"]
    assert f"{namespace}/peered Started" in high.log()
    assert f"{namespace}/peered" not in low.log()
    assert low.handled(since=paused_at) == []

    killed = time.monotonic()  # before the signal: the clock must not start after the handover
    high.kill()
    cluster.patch("peered", {"suspend": True})  # while nobody acts: the standby finds it when it resumes
    takeover = low.wait_log(RESUMED, count=2, timeout=LIFETIME + 30) - killed
    cluster.wait_phase("peered", "Stopping")
    reacted = time.monotonic() - killed
    cluster.wait_phase("peered", "Suspended")
    print(f"\nSIGKILL: the standby resumed {takeover:.2f} s after the kill and the job was Stopping after "
          f"{reacted:.2f} s (peering lifetime {LIFETIME} s)")
    # it waited for the lease: kopf refreshes a record every second at this lifetime
    assert LIFETIME - 2 <= takeover <= LIFETIME + 5
    assert f"{namespace}/peered Suspended" in low.log()
    assert cluster.reasons("peered") == ["Started", "Running", "Suspending", "ExitDeadlineExceeded", "Suspended"]
    assert set(cluster.pods("peered")) <= {"peered-1-0", "peered-1-1"}
    assert cluster.status("peered")["incarnation"] == 1
    assert ALL_PAUSED not in low.log() + high.log()


def test_a_sigterm_hands_over_at_once(cluster: Cluster, replicas: Callable[..., Replica], namespace: str,
                                      s3_bucket: str) -> None:
    active = replicas("active", priority=2)
    active.wait_log(RESUMED)
    standby = replicas("standby", priority=1)
    # A replica that joins below a live one pauses from its start on, silently: its record
    # in the peering object is what shows it is there.
    wait_for_condition(lambda: cluster.peers(namespace).keys() == {"active", "standby"}, timeout=60,
                       what="both keep-alive records")
    cluster.create(sleeping_job(s3_bucket, "handed"))
    cluster.wait_phase("handed", "Running")
    assert f"{namespace}/handed" not in standby.log()
    assert PAUSED not in standby.log() and RESUMED not in standby.log()
    assert standby.handled() == []
    standby.wait_log(f"active {OUTRANKED} (priority 1)")  # the standby says so itself

    assert active.proc is not None
    signalled = time.monotonic()
    os.kill(active.proc.pid, signal.SIGTERM)
    takeover = standby.wait_log(RESUMED, timeout=LIFETIME + 30) - signalled
    active.proc.wait(30)
    exited = time.monotonic() - signalled
    print(f"\nSIGTERM: the standby resumed {takeover:.2f} s after the signal; the old replica exited after "
          f"{exited:.2f} s (peering lifetime {LIFETIME} s)")
    assert takeover < LIFETIME - 2, "the standby waited for the lease instead of seeing the record removed"
    assert cluster.peers(namespace).keys() == {"standby"}

    cluster.patch("handed", {"suspend": True})
    cluster.wait_phase("handed", "Suspended")
    assert f"{namespace}/handed Suspended" in standby.log()
    assert cluster.reasons("handed") == ["Started", "Running", "Suspending", "ExitDeadlineExceeded", "Suspended"]


def test_replicas_without_a_priority_do_not_both_pause(cluster: Cluster, replicas: Callable[..., Replica],
                                                       namespace: str, s3_bucket: str) -> None:
    # namespaced mode: each replica creates (or finds) the KopfPeering in the watched namespace
    first = replicas("first", namespaced=True)
    first.wait_log(RESUMED)
    second = replicas("second", namespaced=True)
    peers = wait_for_condition(lambda: (p := cluster.peers(namespace, namespaced=True)).keys() == {"first", "second"}
                               and p, timeout=60, what="both keep-alive records")
    assert "drawn at start-up" in first.log() and "drawn at start-up" in second.log()
    assert {name: peer["priority"] for name, peer in peers.items()} == {"first": first.priority,
                                                                        "second": second.priority}
    assert first.priority > second.priority  # the earlier start leads

    cluster.create(sleeping_job(s3_bucket, "unranked"))
    cluster.wait_phase("unranked", "Running")
    assert cluster.pods("unranked") == ["unranked-1-0", "unranked-1-1"]
    assert f"{namespace}/unranked Started" in first.log()
    assert f"{namespace}/unranked" not in second.log()
    assert second.handled() == [] and RESUMED not in second.log()
    second.wait_log(f"first {OUTRANKED}")
    for replica in (first, second):
        assert ALL_PAUSED not in replica.log() and PAUSED not in replica.log()


def test_a_replica_outranked_after_it_acted_stops_its_own_timers_too(
        cluster: Cluster, replicas: Callable[..., Replica], namespace: str, s3_bucket: str) -> None:
    """kopf stops an outranked replica's watches; its retention loop (every second here) and the
    reconciles it scheduled stop as well, or two replicas would act on the job it knew."""
    low = replicas("low", priority=1)
    low.wait_log(RESUMED)
    cluster.create(sleeping_job(s3_bucket, "demoted"))
    cluster.wait_phase("demoted", "Running")
    low.wait_log(ACTING)
    assert f"{namespace}/demoted Started" in low.log()

    high = replicas("high", priority=2)
    high.wait_log(RESUMED)
    low.wait_log(PAUSED)
    paused_at = low.log().index(PAUSED)
    low.wait_log(f"high {OUTRANKED} (priority 1)")
    cluster.patch("demoted", {"suspend": True})
    cluster.wait_phase("demoted", "Suspended")
    assert f"{namespace}/demoted Suspending" in high.log()
    assert f"{namespace}/demoted" not in low.log()[paused_at:]
    assert cluster.reasons("demoted") == ["Started", "Running", "Suspending", "ExitDeadlineExceeded", "Suspended"]
