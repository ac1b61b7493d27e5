"""Why a rank ended: its exit code and the runtime's termination message, classified.

The runtime (``torpor.termination``) exits 0 after ``completed``, 128 + signal number after a
save on a signal, 75 after a save on the GracefulExit file and 1 after an exception, and
writes a JSON message naming the reason and the checkpoint. Pods whose script does not use
the runtime have only an exit code; they are classified by it alone.

=========================================  ============  ==================================
Observed                                    Outcome       Counted as
=========================================  ============  ==================================
message ``signal``/``file``                 STOPPED       preemption (never a failure)
message ``completed``, exit 0               FINISHED      success of that rank
message ``error``                           CRASHED       failure (maxRestarts, backoff)
no message, exit 0                          FINISHED      success of that rank
no message, exit 75                         STOPPED       preemption
no message, reason ``OOMKilled``            CRASHED       failure
no message, exit 128+n                      KILLED        preemption (ended from outside)
pod Failed without a container exit         KILLED        preemption (evicted, node lost)
anything else                               CRASHED       failure
=========================================  ============  ==================================
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from torpor.termination import EXIT_COMPLETED, EXIT_FILE_REQUEST, StopReason, TerminationMessage, signal_from_exit_code
from torpor_operator.observing import PodView

__all__ = ["Outcome", "RankOutcome", "classify"]


class Outcome(StrEnum):
    """How a rank's pod stands or ended."""

    ACTIVE = "Active"
    """Pending or running."""
    STOPPED = "Stopped"
    """Stopped on request (signal or GracefulExit file), after saving if it could."""
    FINISHED = "Finished"
    """Training completed."""
    CRASHED = "Crashed"
    """The training code failed: counts against maxRestarts."""
    KILLED = "Killed"
    """Ended from outside without a save (signal, eviction, node loss): a preemption."""


@dataclass(frozen=True)
class RankOutcome:
    """A rank's outcome with what the runtime reported."""

    rank: int
    outcome: Outcome
    checkpoint: str | None = None
    """Checkpoint the rank saved on its way out, if it said so."""
    step: int | None = None
    detail: str = ""
    """One line for Events and conditions."""


def _parse(message: str) -> TerminationMessage | None:
    if not message.lstrip().startswith("{"):
        return None
    try:
        return TerminationMessage.from_json(message)
    except (ValueError, TypeError):
        return None


def classify(pod: PodView) -> RankOutcome:
    """Classify one rank's pod (pure)."""
    if not pod.terminated:
        return RankOutcome(pod.rank, Outcome.ACTIVE)
    term = pod.termination
    if term is None:
        why = pod.status_reason or pod.disruption or "no exit status"
        return RankOutcome(pod.rank, Outcome.KILLED, detail=f"rank {pod.rank} ended without an exit code ({why})")
    msg = _parse(term.message)
    code = term.exit_code
    if msg is not None:
        if msg.reason in (StopReason.SIGNAL, StopReason.FILE):
            saved = f"saved {msg.checkpoint} at step {msg.step}" if msg.checkpoint else "saved nothing"
            return RankOutcome(pod.rank, Outcome.STOPPED, msg.checkpoint, msg.step,
                               f"rank {pod.rank} stopped on request ({msg.reason.value}), {saved}, exit {code}")
        if msg.reason is StopReason.COMPLETED and code == EXIT_COMPLETED:
            return RankOutcome(pod.rank, Outcome.FINISHED, msg.checkpoint, msg.step,
                               f"rank {pod.rank} completed at step {msg.step}")
        error = msg.error or term.reason or "error"
        return RankOutcome(pod.rank, Outcome.CRASHED, msg.checkpoint, msg.step,
                           f"rank {pod.rank} failed with exit {code}: {error}")
    if code == EXIT_COMPLETED:
        return RankOutcome(pod.rank, Outcome.FINISHED, detail=f"rank {pod.rank} exited 0")
    if code == EXIT_FILE_REQUEST:
        return RankOutcome(pod.rank, Outcome.STOPPED, detail=f"rank {pod.rank} stopped on the GracefulExit file")
    if term.reason == "OOMKilled":
        return RankOutcome(pod.rank, Outcome.CRASHED, detail=f"rank {pod.rank} was OOMKilled (exit {code})")
    signum = signal_from_exit_code(code)
    if signum is not None:
        return RankOutcome(pod.rank, Outcome.KILLED,
                           detail=f"rank {pod.rank} was ended by signal {signum} (exit {code}) without a save report")
    tail = term.message.strip().splitlines()[-1][:200] if term.message.strip() else term.reason
    return RankOutcome(pod.rank, Outcome.CRASHED, detail=f"rank {pod.rank} failed with exit {code}: {tail}")
