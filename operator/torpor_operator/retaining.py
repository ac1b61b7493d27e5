"""When a job's bucket prefix is scanned for retention, and when a finished job expires.

A retention pass costs a GET, an S3 listing and a reconcile. Before this module every known job
got one every ``TORPOR_RETENTION_INTERVAL_SECONDS``, Succeeded and Failed ones included, for
ever: the work grew with every job ever created. Here it grows with the jobs that can have saved
since their last pass:

======================  ==============================================================
job                     due
======================  ==============================================================
never passed            at once (after an operator start, every job once)
phase changed           at once: a stop ends with exit saves, a finish with the last
                        save, a resume starts saving again; also when the job came
                        back to the phase of its last pass in between (a stop and a
                        restart within one interval). Not for Pending -> Running:
                        starting saves nothing
spec edited             at once (``metadata.generation`` moved: a new keepMax)
last pass left work     every interval (an incomplete checkpoint whose upload was too
                        young to abort: ``TORPOR_STALE_UPLOAD_SECONDS``)
Succeeded, Failed       never again after the one pass in that phase
Suspended               never again after the one pass in that phase
no periodic save        never again after the one pass in that phase (neither
                        saveSteps nor saveSeconds: the ranks save only on the way
                        out, and that comes with a phase change)
any other phase         every ``max(interval, saveSeconds)`` (saveSeconds only, no
                        saveSteps: no checkpoint can appear sooner); else every interval
======================  ==============================================================

Why not a rank reporting its completed save (issue 13's suggestion): ranks have no API
credentials (their ServiceAccount is the user's, and giving every rank the right to patch its
job would let a training script rewrite its own status), and a report the operator has to trust
is one more thing to secure. The phase is what the operator already knows for free, and every
save that matters to retention outside the periodic ones (the exit save of a stop, the final
save) comes with a phase change.

The state is the process's memory on purpose: an operator that restarts passes each job once
(as it reconciles each at start-up anyway), then follows the table. The TTL of a finished job
is the other way round: :func:`ttl_expiry` derives it from ``status.completionTime``, so a
restart never loses or extends it.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from torpor_operator.observing import CheckpointInfo, parse_time

__all__ = ["FINISHED", "JobFacts", "RetentionSchedule", "saves_periodically", "settled", "ttl_expiry"]

Key = tuple[str, str]

#: Phases a job never leaves by itself.
FINISHED = frozenset({"Succeeded", "Failed"})
#: Phases after which nothing saves until the phase changes.
_QUIET = FINISHED | {"Suspended"}
#: Phases of a job starting or running: a move between them saves nothing.
_STARTING = frozenset({"Pending", "Running"})


def _saves_on_move(old: str, new: str) -> bool:
    """Whether moving from phase ``old`` to ``new`` can have left a checkpoint to see at once."""
    return old != new and not (old in _STARTING and new in _STARTING)


@dataclass(frozen=True)
class JobFacts:
    """What the schedule needs of a job: read from each reconcile, so no pass has to GET it."""

    phase: str
    """``status.phase`` as last decided."""
    save_seconds: int | None = None
    """``spec.checkpoint.saveSeconds``: the fastest a periodic checkpoint can appear."""
    save_steps: int | None = None
    """``spec.checkpoint.saveSteps``: saves by steps, at a rate the operator cannot know."""
    generation: int | None = None
    """``metadata.generation``: an edit of the spec (retention settings) makes the job due."""


@dataclass(frozen=True)
class _Pass:
    phase: str
    at: float
    generation: int | None
    settled: bool


@dataclass
class RetentionSchedule:
    """Which jobs a retention pass visits; pure bookkeeping, times are ``time.monotonic()`` seconds."""

    interval_seconds: float
    """``TORPOR_RETENTION_INTERVAL_SECONDS``: the shortest period of a running job."""
    _facts: dict[Key, JobFacts] = field(default_factory=dict)
    _passes: dict[Key, _Pass] = field(default_factory=dict)
    _moved: set[Key] = field(default_factory=set)
    """Jobs whose phase moved (:func:`_saves_on_move`) since their last pass."""

    def __post_init__(self) -> None:
        if not self.interval_seconds > 0:
            raise ValueError(f"interval_seconds must be > 0, got {self.interval_seconds!r}")

    def observe(self, key: Key, facts: JobFacts) -> None:
        """Record a job's phase and save settings (from a reconcile)."""
        old = self._facts.get(key)
        if old is not None and _saves_on_move(old.phase, facts.phase):
            self._moved.add(key)
        self._facts[key] = facts

    def passed(self, key: Key, phase: str, now: float, *, generation: int | None = None,
               settled: bool = True) -> None:
        """Record a pass over ``key`` made at ``now`` while the job was in ``phase`` and
        ``generation``; ``settled=False``: it left an incomplete checkpoint for a later pass."""
        self._passes[key] = _Pass(phase, now, generation, settled)
        self._moved.discard(key)

    def listed_empty(self, key: Key, now: float, *, generation: int | None = None) -> None:
        """A launch's listing found the job's prefix empty at ``now``: that is the job's first
        pass (nothing to prune, nothing incomplete), so a new job costs no second listing. Only
        for a job not passed yet; recorded as made while starting (``Pending``), so a later
        stop or finish still makes it due."""
        if key not in self._passes:
            self.passed(key, "Pending", now, generation=generation)

    def never_passed(self, key: Key) -> bool:
        """Whether no pass (nor a launch's empty listing) was recorded for ``key`` yet."""
        return key not in self._passes

    def __len__(self) -> int:
        """Jobs the schedule holds facts or a pass of (``torpor_cached_entries{cache="schedule"}``)."""
        return len(self._facts.keys() | self._passes.keys())

    def forget(self, key: Key) -> None:
        """Drop a deleted job."""
        self._facts.pop(key, None)
        self._passes.pop(key, None)
        self._moved.discard(key)

    def tracked(self) -> set[Key]:
        """The jobs the schedule holds anything about (for tests and memory checks)."""
        return set(self._facts) | set(self._passes) | self._moved

    def period(self, facts: JobFacts) -> float:
        """Seconds between passes of a job that saves periodically (the table above)."""
        if facts.save_seconds is not None and facts.save_steps is None:
            return max(self.interval_seconds, float(facts.save_seconds))
        return self.interval_seconds

    def due(self, key: Key, now: float) -> bool:
        """Whether a pass at ``now`` should visit ``key`` (the table above)."""
        facts, last = self._facts.get(key), self._passes.get(key)
        if facts is None or last is None:
            return True
        if key in self._moved or _saves_on_move(last.phase, facts.phase) or facts.generation != last.generation:
            return True
        if last.phase in _QUIET or not saves_periodically(facts):
            return not last.settled and now - last.at >= self.interval_seconds
        return now - last.at >= self.period(facts)

    def due_keys(self, keys: Iterable[Key], now: float) -> list[Key]:
        """The due ones of ``keys``, sorted."""
        return sorted(k for k in keys if self.due(k, now))


def saves_periodically(facts: JobFacts) -> bool:
    """Whether the job's ranks save while they run (``0`` and unset both mean no).

    Under the operator ``TORPOR_SAVE_STEPS``/``TORPOR_SAVE_SECONDS`` come from these fields, so
    a job with neither saves only on exit. A checkpoint a script writes on its own schedule,
    past the operator's settings, is pruned at the job's next phase change."""
    return bool(facts.save_steps) or bool(facts.save_seconds)


def settled(checkpoints: Sequence[CheckpointInfo], deleted: Iterable[str]) -> bool:
    """Whether a pass left nothing for a later one: no surviving incomplete checkpoint that
    retention deletes (one whose stale upload was still too young to abort, a deletion that
    failed). Retention deletes an incomplete checkpoint only when it is older than the newest
    complete one and of an earlier step (``torpor.retention.to_delete``); others are kept for
    good, so a job left with only those (failed mid-save, never saved whole) is settled too."""
    gone = set(deleted)
    left = [c for c in checkpoints if c.name not in gone]
    complete = [c for c in left if c.complete and c.resumable]
    if not complete:
        return True

    def order(c: CheckpointInfo) -> tuple[datetime, int, str]:
        return (c.time, c.step, c.name)

    newest = max(complete, key=order)
    return not any(not c.complete and order(c) < order(newest) and c.step < newest.step for c in left)


def ttl_expiry(phase: str | None, completion_time: str | None, ttl_seconds: int | None) -> datetime | None:
    """When a finished job is to be deleted (``spec.ttlSecondsAfterFinished``), or ``None``.

    Only Succeeded and Failed jobs expire, counted from ``status.completionTime`` (written in the
    same patch as the phase), so the time survives an operator restart. A job edited back to
    life has no finished phase and does not expire.
    """
    if ttl_seconds is None or phase not in FINISHED:
        return None
    finished = parse_time(completion_time)
    if finished is None:
        return None
    return finished + timedelta(seconds=ttl_seconds)
