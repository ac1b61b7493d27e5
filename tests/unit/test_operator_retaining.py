"""The retention schedule (issue 13, item 3): work grows with jobs that can have saved, not with all jobs."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from torpor_operator.retaining import JobFacts, RetentionSchedule, ttl_expiry

KEY = ("ns", "job")
T0 = 1000.0


def schedule(**facts: object) -> RetentionSchedule:
    s = RetentionSchedule(interval_seconds=60)
    s.observe(KEY, JobFacts(**{"phase": "Running", **facts}))  # type: ignore[arg-type]
    return s


def test_a_job_never_passed_is_due_and_an_unknown_one_too() -> None:
    assert schedule().due(KEY, T0)
    assert RetentionSchedule(interval_seconds=60).due(("ns", "unseen"), T0), "the pass reads the job to learn"


def test_a_running_job_is_due_every_interval() -> None:
    s = schedule(save_steps=100)
    s.passed(KEY, "Running", T0)
    assert not s.due(KEY, T0 + 59)
    assert s.due(KEY, T0 + 60)


@pytest.mark.parametrize("saves", [{}, {"save_steps": 0, "save_seconds": 0}])
def test_a_running_job_that_saves_only_on_exit_is_not_scanned_again_until_its_phase_changes(
        saves: dict[str, int]) -> None:
    s = schedule(**saves)
    s.passed(KEY, "Running", T0)
    assert not s.due(KEY, T0 + 10**6), "no periodic save: nothing new can appear while it runs"
    s.observe(KEY, JobFacts(phase="Stopping", **saves))  # type: ignore[arg-type]
    assert s.due(KEY, T0 + 10**6 + 1), "the stop's exit saves come with the phase change"
    s.passed(KEY, "Running", T0, settled=False)
    s.observe(KEY, JobFacts(phase="Running", **saves))  # type: ignore[arg-type]
    assert s.due(KEY, T0 + 60), "an unsettled pass is still retried every interval"


def test_save_seconds_longer_than_the_interval_sets_the_period() -> None:
    s = schedule(save_seconds=600)
    s.passed(KEY, "Running", T0)
    assert not s.due(KEY, T0 + 599), "no checkpoint can have appeared since"
    assert s.due(KEY, T0 + 600)
    short = schedule(save_seconds=10)
    short.passed(KEY, "Running", T0)
    assert not short.due(KEY, T0 + 59) and short.due(KEY, T0 + 60), "never more often than the interval"


@pytest.mark.parametrize("phase", ["Succeeded", "Failed", "Suspended"])
def test_a_finished_or_suspended_job_gets_one_pass_then_none(phase: str) -> None:
    s = schedule()
    s.passed(KEY, "Running", T0)
    s.observe(KEY, JobFacts(phase=phase))
    assert s.due(KEY, T0 + 1), "its final (exit) saves are pruned and shown at once"
    s.passed(KEY, phase, T0 + 1)
    assert not s.due(KEY, T0 + 10**7), "never scanned again"


def test_a_phase_change_makes_a_job_due_at_once() -> None:
    s = schedule()
    s.passed(KEY, "Running", T0)
    s.observe(KEY, JobFacts(phase="Stopping"))
    assert s.due(KEY, T0 + 1), "a stop ends with exit saves"
    s.passed(KEY, "Stopping", T0 + 1)
    s.observe(KEY, JobFacts(phase="Suspended"))
    s.passed(KEY, "Suspended", T0 + 2)
    s.observe(KEY, JobFacts(phase="Running"))
    assert s.due(KEY, T0 + 3), "a resumed job is scanned again"


@pytest.mark.parametrize("saves", [{}, {"save_steps": 100}])
def test_a_job_that_only_started_running_is_not_due_at_once(saves: dict[str, int]) -> None:
    """Starting saves nothing: 500 new jobs going Running would otherwise cost 500 passes at once
    (bench_operator_cluster's first idle minute)."""
    s = schedule(phase="Pending", **saves)
    s.passed(KEY, "Pending", T0)
    s.observe(KEY, JobFacts(phase="Running", **saves))  # type: ignore[arg-type]
    assert not s.due(KEY, T0 + 1)
    assert s.due(KEY, T0 + 60) == bool(saves), "then the table: every interval when it saves periodically"


def test_a_stop_and_a_restart_between_two_passes_make_the_job_due() -> None:
    """Running -> Stopping -> Restarting -> Pending -> Running within one interval: the job is in
    the phase of its last pass again, but the stop wrote exit saves."""
    s = schedule()
    s.passed(KEY, "Running", T0)
    for phase in ("Stopping", "Restarting", "Pending", "Running"):
        s.observe(KEY, JobFacts(phase=phase))
    assert s.due(KEY, T0 + 1)
    s.passed(KEY, "Running", T0 + 1)
    assert not s.due(KEY, T0 + 2)


def test_a_forgotten_job_is_dropped_and_the_due_ones_are_listed() -> None:
    s = schedule()
    other = ("ns", "done")
    s.observe(other, JobFacts(phase="Succeeded"))
    s.passed(other, "Succeeded", T0)
    assert s.due_keys([KEY, other], T0) == [KEY]
    s.forget(KEY)
    assert s.tracked() == {other}


def test_ttl_expiry_counts_from_the_completion_time() -> None:
    done = datetime(2026, 1, 1, tzinfo=UTC)
    assert ttl_expiry("Succeeded", "2026-01-01T00:00:00Z", 30) == done + timedelta(seconds=30)
    assert ttl_expiry("Failed", "2026-01-01T00:00:00Z", 0) == done
    assert ttl_expiry("Succeeded", "2026-01-01T00:00:00Z", None) is None, "unset keeps the job"
    assert ttl_expiry("Running", None, 0) is None, "only a finished job expires"
    assert ttl_expiry("Suspended", "2026-01-01T00:00:00Z", 0) is None
    assert ttl_expiry("Succeeded", None, 0) is None, "a finish not yet recorded waits for its status"


def test_bad_schedule_settings_name_the_field() -> None:
    with pytest.raises(ValueError, match=r"interval_seconds.*0"):
        RetentionSchedule(interval_seconds=0)


def test_an_edited_finished_job_is_passed_once_more() -> None:
    s = schedule(phase="Succeeded", generation=1)
    s.passed(KEY, "Succeeded", T0, generation=1)
    assert not s.due(KEY, T0 + 10**6)
    s.observe(KEY, JobFacts(phase="Succeeded", generation=2))
    assert s.due(KEY, T0 + 10**6), "a new keepMax is applied"


def test_a_pass_that_left_work_keeps_a_finished_job_due_every_interval() -> None:
    s = schedule(phase="Succeeded")
    s.passed(KEY, "Succeeded", T0, settled=False)  # an incomplete checkpoint whose upload is too young to abort
    assert not s.due(KEY, T0 + 59) and s.due(KEY, T0 + 60)
    s.passed(KEY, "Succeeded", T0 + 60, settled=True)
    assert not s.due(KEY, T0 + 10**6)


def test_a_pass_is_settled_when_no_incomplete_checkpoint_survived_it() -> None:
    from torpor_operator.observing import CheckpointInfo
    from torpor_operator.retaining import settled

    def info(name: str, complete: bool, step: int) -> CheckpointInfo:
        return CheckpointInfo(name=name, step=step, time=datetime(2026, 1, 1, 0, step, tzinfo=UTC), complete=complete)

    assert settled([info("a", True, 2), info("b", False, 1)], ["b"])
    assert not settled([info("a", True, 2), info("b", False, 1)], [])


def test_an_incomplete_checkpoint_retention_never_deletes_leaves_a_pass_settled() -> None:
    """A job that failed mid-save, or never completed one, keeps its incomplete checkpoints (no
    complete one proves them stale, or they are newer than the newest complete one): a later
    pass could do nothing to them, so a finished job is not scanned again for them."""
    from torpor_operator.observing import CheckpointInfo
    from torpor_operator.retaining import settled

    def info(name: str, step: int, minute: int, complete: bool) -> CheckpointInfo:
        return CheckpointInfo(name=name, step=step, time=datetime(2026, 1, 1, 0, minute, tzinfo=UTC),
                              complete=complete)

    assert settled([info("only", 5, 1, False)], [])  # no complete checkpoint at all
    assert settled([info("a", 5, 1, True), info("b", 9, 2, False)], [])  # newer than the newest complete
    assert not settled([info("a", 5, 2, True), info("b", 3, 1, False)], [])  # older: a later pass deletes it
    assert settled([info("a", 5, 2, True), info("b", 3, 1, False)], ["b"])


def test_a_launch_that_found_the_prefix_empty_is_the_jobs_first_pass() -> None:
    """500 new jobs would each get a second listing of their empty prefix at the next wake,
    deferred into bench_operator_cluster's first idle minute; the launch's own listing counts."""
    s = RetentionSchedule(interval_seconds=60)
    s.listed_empty(KEY, T0, generation=1)
    s.observe(KEY, JobFacts(phase="Pending", generation=1))
    assert not s.due(KEY, T0 + 1)
    s.observe(KEY, JobFacts(phase="Running", generation=1))
    assert not s.due(KEY, T0 + 10**6), "saves only on exit: nothing until it stops"
    s.observe(KEY, JobFacts(phase="Stopping", generation=1))
    assert s.due(KEY, T0 + 10**6)


def test_an_empty_listing_never_replaces_a_real_pass() -> None:
    s = schedule(phase="Succeeded")
    s.passed(KEY, "Succeeded", T0, settled=False)
    s.listed_empty(KEY, T0 + 1)
    assert s.due(KEY, T0 + 60), "the unsettled pass stands"
