"""examples/trainingjob.yaml through crashes and suspend/resume, with real training (retention:
test_operator_checkpoints.py)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:  # the fixtures' types; conftest modules are not importable by name in one session
    from conftest import Env

pytestmark = pytest.mark.cluster


def first_steps(e2e: Env) -> dict[int, int]:
    """The first step each rank logged in the current losses file."""
    out: dict[int, int] = {}
    for s in e2e.steps():
        out.setdefault(s["rank"], s["step"])
    return out


def test_a_crashing_rank_restarts_from_the_latest_checkpoint_then_fails_past_max_restarts(e2e: Env) -> None:
    e2e.create(e2e.example("--losses", str(e2e.losses()), "--step-delay", "0.05", maxRestarts=1))
    e2e.wait_phase("Running", timeout=120)
    e2e.wait("a periodic checkpoint", lambda: e2e.status().get("lastCheckpoint"), timeout=120)

    e2e.break_losses()
    # counted with the move to Stopping, which may last less than one poll: wait for the count
    counted = e2e.wait("the crash counted", lambda: (st := e2e.status()).get("restarts") == 1 and st)
    assert counted["phase"] in ("Stopping", "Restarting", "Pending"), counted
    e2e.losses().rmdir()  # incarnation 2 can write again (it starts after a 1 s backoff at least)

    status = e2e.wait_phase("Running", incarnation=2, timeout=120)
    assert (status["restarts"], status.get("preemptions", 0)) == (1, 0)
    resumed = next(c for c in e2e.checkpoints() if c.name == status["resumeFrom"])
    assert resumed.complete and resumed.step % 20 == 0  # the newest periodic save before the crash
    for pod in e2e.pods():
        if pod["metadata"]["labels"]["torpor.dev/incarnation"] == "2":
            assert pod["metadata"]["annotations"]["torpor.dev/resume-from"] == resumed.name
    e2e.wait("steps of incarnation 2", lambda: len(first_steps(e2e)) == 2)
    assert first_steps(e2e) == {0: resumed.step + 1, 1: resumed.step + 1}
    events = e2e.reasons()
    assert [r for r in events if r in ("RankFailed", "Restarting", "Restarted")] == \
        ["RankFailed", "Restarting", "Restarted"], events

    # past maxRestarts: the next crash fails the job, with the rank's error in the condition
    e2e.break_losses()
    failed = e2e.wait_phase("Failed", timeout=120)
    assert (failed["restarts"], failed["incarnation"]) == (1, 2)
    condition = next(c for c in failed["conditions"] if c["type"] == "Failed")
    assert (condition["status"], condition["reason"]) == ("True", "MaxRestartsExceeded")
    assert "IsADirectoryError" in condition["message"], condition
    assert "MaxRestartsExceeded" in e2e.reasons()
    assert e2e.get("services")["items"] == [] and e2e.get("pdb")["items"] == []


def test_suspend_saves_and_stops_and_unsuspend_resumes_from_that_checkpoint(e2e: Env) -> None:
    e2e.create(e2e.example("--losses", str(e2e.losses()), "--step-delay", "0.05"))
    e2e.wait_phase("Running", timeout=120)
    e2e.wait("some steps", lambda: len(e2e.steps()) >= 30)

    e2e.patch({"suspend": True})
    suspended = e2e.wait_phase("Suspended", timeout=120)
    saved = suspended["lastCheckpoint"]
    checkpoint = next(c for c in e2e.checkpoints() if c.name == saved["name"])
    assert checkpoint.complete and sorted(checkpoint.manifests) == [0, 1] and checkpoint.step == saved["step"]
    assert max(s["step"] for s in e2e.steps()) == saved["step"]  # nothing trained after the save
    assert (suspended.get("preemptions", 0), suspended.get("restarts", 0)) == (0, 0)
    assert e2e.get("services")["items"] == []
    e2e.wait("ranks ended", lambda: all(e2e.terminated(p) for p in e2e.pods()))
    stopped_at = len(e2e.steps())

    e2e.patch({"suspend": False})
    resumed = e2e.wait_phase("Running", incarnation=2, timeout=120)
    assert resumed["resumeFrom"] == saved["name"]
    e2e.wait("steps of incarnation 2", lambda: len(e2e.steps()) >= stopped_at + 2)
    after = e2e.steps()[stopped_at:]
    assert {s["rank"]: s["step"] for s in reversed(after)} == {0: saved["step"] + 1, 1: saved["step"] + 1}
    assert [r for r in e2e.reasons() if r in ("Suspending", "Suspended", "Resumed")] == \
        ["Suspending", "Suspended", "Resumed"]
