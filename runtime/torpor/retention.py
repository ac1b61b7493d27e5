"""Which checkpoints to delete: a pure policy the runtime and the operator both apply.

The seeds' retention has three traps torpor does not copy: it deletes the oldest file
*before* writing the new one (a kill then leaves nothing), keeps the *oldest* file of each
N-minute window although it documents the latest, and forgets files of an earlier run. Here:

* Only complete checkpoints count and are kept; the policy runs after a save is complete.
* ``keep_per_n_minutes > 0`` keeps the **newest** complete checkpoint of each window
  (windows are aligned on the epoch: ``floor(time / (n * 60))``) and takes precedence over
  ``keep_max`` (the seeds ignore the window setting while ``keep_max > 0``, so setting it
  would otherwise do nothing with the default ``keep_max=5``).
* Otherwise ``keep_max > 0`` keeps the newest ``keep_max`` complete checkpoints.
* Both 0: every complete checkpoint is kept.
* The newest complete checkpoint and every ``protected`` name (the one the run resumed
  from) are never deleted, whatever the policy says.
* An incomplete checkpoint older than the newest complete one *and* at a lower step is a
  leftover of an interrupted save and is deleted; any other may still be being written and
  is kept. The step matters because ranks finish a save at different moments: a fast rank's
  shard of step 18 can be listed before a slow rank completes step 16, so by time alone the
  in-flight step 18 would look stale. (The cost: an incomplete checkpoint from an earlier run
  with a higher step than anything complete now lingers until deleted by hand.)
* Everything in the listing counts, whichever run wrote it; the caller chooses the listing:
  a ``CheckpointMonitor`` passes only its own prefix's checkpoints (a second monitor with
  ``prefix='best'``, keep 1, must not delete the first one's), the operator its job's
  directory.
* Breakpoint checkpoints (``reason: exception``) are neither counted nor deleted: they are
  not resume points (a breakpoint must not push the last resumable checkpoint out of
  ``keep_max``), and they are kept for whoever investigates the crash, who deletes them.

Torch-free; the operator imports it.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

from torpor.checkpoints import Checkpoint


@dataclass(frozen=True)
class RetentionPolicy:
    """How many checkpoints to keep. See the module docstring for the precedence."""

    keep_max: int = 5
    """Newest complete checkpoints kept; 0 means no count limit. Default 5, as the seeds."""
    keep_per_n_minutes: float = 0
    """Window length in minutes; > 0 keeps the newest complete checkpoint per window and
    overrides ``keep_max``. Default 0 (off)."""

    def __post_init__(self) -> None:
        if not isinstance(self.keep_max, int) or isinstance(self.keep_max, bool):
            raise TypeError(f"keep_max must be an int, got {self.keep_max!r}")
        if self.keep_max < 0:
            raise ValueError(f"keep_max must be >= 0, got {self.keep_max!r}")
        if not isinstance(self.keep_per_n_minutes, int | float) or isinstance(self.keep_per_n_minutes, bool):
            raise TypeError(f"keep_per_n_minutes must be a number, got {self.keep_per_n_minutes!r}")
        if not math.isfinite(self.keep_per_n_minutes) or self.keep_per_n_minutes < 0:
            raise ValueError(f"keep_per_n_minutes must be a finite number >= 0, got {self.keep_per_n_minutes!r}")


@dataclass(frozen=True)
class Candidate:
    """What the policy needs to know about one checkpoint."""

    name: str
    time: float
    """When it was written, seconds since the epoch (the store's modification time)."""
    complete: bool
    step: int = 0
    """Global step; breaks ties between equal times."""
    resumable: bool = True
    """Not a breakpoint (see the module docstring): only resumable ones are counted."""


def candidates(checkpoints: Iterable[Checkpoint]) -> list[Candidate]:
    """Project scanned checkpoints onto what the policy reads."""
    return [Candidate(c.name, c.modified, c.complete, c.step, c.resumable or not c.complete) for c in checkpoints]


def _order(c: Candidate) -> tuple[float, int, str]:
    return (c.time, c.step, c.name)


def to_delete(
    items: Iterable[Candidate], policy: RetentionPolicy, protected: Iterable[str] = ()
) -> list[str]:
    """Names the policy deletes, oldest first. Pure: no clock, no I/O.

    Args:
        items: every checkpoint in the store, complete or not, from any run.
        policy: the retention policy.
        protected: names never deleted (the checkpoint this run resumed from).
    """
    pool = sorted(items, key=_order)
    keep_always = set(protected)
    complete = [c for c in pool if c.complete and c.resumable]
    if not complete:
        return []  # nothing proves any leftover is stale, and nothing is over any limit
    newest = complete[-1]
    keep_always.add(newest.name)

    keep: set[str] = set()
    if policy.keep_per_n_minutes > 0:
        width = policy.keep_per_n_minutes * 60.0
        newest_per_window: dict[int, Candidate] = {}
        for c in complete:  # ascending, so the last one written per window wins
            newest_per_window[math.floor(c.time / width)] = c
        keep = {c.name for c in newest_per_window.values()}
    elif policy.keep_max > 0:
        keep = {c.name for c in complete[-policy.keep_max:]}
    else:
        keep = {c.name for c in complete}

    doomed = [c.name for c in complete if c.name not in keep and c.name not in keep_always]
    doomed += [c.name for c in pool
               if not c.complete and _order(c) < _order(newest) and c.step < newest.step
               and c.name not in keep_always]
    order = {c.name: i for i, c in enumerate(pool)}
    return sorted(set(doomed), key=order.__getitem__)
