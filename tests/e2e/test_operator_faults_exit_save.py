"""The ranks SIGKILLed part-way through an exit save, under the operator (issue 12, "what it must show").

A drain's grace period can end, or the node can vanish, while the ranks are still writing their
exit checkpoint. The ranks reach MinIO through a :class:`faultproxy.FaultProxy` (the job's
``checkpoint.endpoint``) that holds back rank 0's exit shard, so the save hangs part-way with
rank 1's part written; then every rank is SIGKILLed. What a user checks: the torn checkpoint is
never resumed from, the job comes back from the previous complete one, and the stop counts as
one preemption (the cordon is the evidence), not as a failure. Real control plane, node agent,
MinIO and ``examples/train.py`` ranks.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlparse

import pytest

from faultproxy import FaultProxy
from torpor.checkpoints import Reason, newest_complete

if TYPE_CHECKING:  # the fixtures' types; conftest modules are not importable by name in one session
    from conftest import Env
    from s3server import MinioServer

pytestmark = pytest.mark.cluster

#: OnRequestExit's default file name: exit saves are ``Net-{epoch}_{step}``, periodic ones ``CKP-…``.
EXIT_FILE_NAME = "Net"


@pytest.fixture
def rank_proxy(minio: MinioServer) -> Iterator[FaultProxy]:
    endpoint = urlparse(minio.endpoint)
    with FaultProxy(endpoint.hostname or "127.0.0.1", endpoint.port or 80) as proxy:
        yield proxy


def rank_pid(e2e: Env, pod: str) -> int:
    """The rank's process: the container's pid (the node agent execs the command in place)."""
    status = e2e.pod(pod)["status"]["containerStatuses"][0]
    return int(status["containerID"].removeprefix("torpor://"))


def test_ranks_sigkilled_during_an_exit_save_resume_from_the_previous_complete_checkpoint(
        e2e: Env, rank_proxy: FaultProxy) -> None:
    body = e2e.example("--losses", str(e2e.losses()), "--step-delay", "0.05")
    body["spec"]["checkpoint"]["endpoint"] = rank_proxy.url
    e2e.create(body)
    e2e.wait_phase("Running", timeout=120)
    e2e.wait("a periodic checkpoint", lambda: e2e.status().get("lastCheckpoint"), timeout=120)
    pids = [rank_pid(e2e, f"mlp-1-{r}") for r in (0, 1)]

    rank_proxy.hold(f"/rank_0/{EXIT_FILE_NAME}-".encode())
    e2e.cordon(e2e.node_of("mlp-1-0"))
    e2e.wait("rank 0's exit save to reach the store", rank_proxy.held.is_set, timeout=120)

    def torn() -> object | None:
        for c in e2e.checkpoints():
            part = c.manifests.get(1)
            if c.name.startswith(f"{EXIT_FILE_NAME}-") and part is not None and part.reason is Reason.EXIT:
                return c
        return None

    exit_save = e2e.wait("rank 1's part of the exit save", torn, timeout=120)
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    e2e.wait("the ranks to die", lambda: not any(Path(f"/proc/{pid}").exists() for pid in pids), timeout=60)
    written = len(e2e.steps())  # every line the killed ranks wrote
    previous = newest_complete(e2e.checkpoints())
    assert previous is not None and previous.name != exit_save.name
    rank_proxy.release()

    status = e2e.wait_phase("Running", incarnation=2, timeout=180)
    assert (status.get("preemptions", 0), status["restarts"]) == (1, 0), status
    assert "RankFailed" not in e2e.reasons(), e2e.reasons()
    (torn_now,) = [c for c in e2e.checkpoints() if c.name == exit_save.name]
    assert not torn_now.complete, "rank 0's part never landed"
    new = [p for p in e2e.pods() if p["metadata"]["labels"]["torpor.dev/incarnation"] == "2"]
    named = {p["metadata"].get("annotations", {}).get("torpor.dev/resume-from") for p in new}
    assert named <= {None, previous.name}, named

    # What incarnation 2 trains starts right after the previous complete checkpoint.
    e2e.wait("incarnation 2 to train", lambda: len(e2e.steps()) > written, timeout=120)
    assert min(s["step"] for s in e2e.steps()[written:]) == previous.step + 1
