"""Why a rank ended, classified from evidence by one table, like a Job's ``podFailurePolicy``.

The runtime (``torpor.termination``) exits 0 after ``completed``, 128 + signal number after a
save on a signal, 75 after a save on the GracefulExit file and 1 after an exception, and
writes a JSON message naming the reason and the checkpoint. Pods whose script does not use
the runtime have only an exit code; the pod itself and its node say the rest.

A signal says *how* a rank ended, not *why*: SIGABRT from an NCCL watchdog, SIGSEGV, a
liveness-probe kill and ``activeDeadlineSeconds`` all end in one. So a rank that ended by a
signal (or without a container exit at all) is a preemption only with **evidence of a
disruption** (:func:`disruption_evidence`): its pod's ``DisruptionTarget`` condition, its
deletion (by an eviction, a drain, a user, or the operator), a ``status.reason`` the kubelet
gives only to pods it evicted or shut down, or its node cordoned, given a termination taint or
lost. Without evidence it is a failure, counted against ``maxRestarts`` with backoff. A pod
the kubelet refused to admit never ran: that is the node's problem, not the job's — recreated,
a bounded number of times, never a failure.

:data:`RULES` is the table; the first rule that applies decides. docs/operator.md shows
:func:`rules_table` (``tests/unit/test_operator_outcomes.py`` keeps the two equal). How the
outcomes of all ranks become one decision for the job — a preemption's collateral crashes —
is :func:`torpor_operator.reconciling.decide`'s, documented next to the table.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum

from torpor.errors import ResizeError
from torpor.termination import (
    EXIT_COMPLETED,
    EXIT_FILE_REQUEST,
    StopReason,
    TerminationMessage,
    signal_from_exit_code,
    signal_name,
)
from torpor_operator.observing import NodeView, PodView

__all__ = [
    "ADMISSION_REASONS",
    "DISRUPTION_REASONS",
    "PEER_LOSS_PATTERNS",
    "RULES",
    "Facts",
    "Outcome",
    "RankOutcome",
    "Rule",
    "classify",
    "disruption_evidence",
    "facts",
    "rules_table",
]


class Outcome(StrEnum):
    """How a rank's pod stands or ended."""

    ACTIVE = "Active"
    """Pending or running."""
    STOPPED = "Stopped"
    """Stopped on request (a disruption's signal or the GracefulExit file), after saving if it could."""
    FINISHED = "Finished"
    """Training completed."""
    CRASHED = "Crashed"
    """The rank failed (its code, its resources, or an end nobody announced): counts against maxRestarts."""
    KILLED = "Killed"
    """Ended from outside without a save, with evidence of a disruption: a preemption."""
    REJECTED = "Rejected"
    """The kubelet refused to admit the pod; it never ran. Recreated (bounded), not a failure."""


#: What each outcome means for the job.
COUNTS = {
    Outcome.STOPPED: "preemption",
    Outcome.KILLED: "preemption",
    Outcome.FINISHED: "success of that rank",
    Outcome.CRASHED: "failure (maxRestarts, backoff)",
    Outcome.REJECTED: "infrastructure: the rank is recreated, at most `TORPOR_ADMISSION_RETRIES` times",
}

#: ``status.reason`` of a pod the kubelet evicted or shut down: evidence of a disruption by itself.
DISRUPTION_REASONS = ("Evicted", "Preempting", "Shutdown", "Terminated", "NodeLost")

#: ``status.reason`` of a pod the kubelet refused at admission (``OutOfcpu``, ``OutOfmemory``,
#: ``OutOfpods``… are matched by their prefix): the node could not run it, it never started.
ADMISSION_REASONS = ("UnexpectedAdmissionError", "NodeAffinity", "OutOf*")


def _admission(reason: str) -> bool:
    return any(reason.startswith(r[:-1]) if r.endswith("*") else reason == r for r in ADMISSION_REASONS)


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
    ended_at: datetime | None = None
    """When the container ended (``finishedAt``), if it did and the kubelet said."""

    @property
    def lost_peer(self) -> bool:
        """A crash whose words say a collective lost its connection to another rank (gloo, NCCL,
        c10d: :data:`PEER_LOSS_PATTERNS`): the cause may be that other rank, not this one."""
        text = self.detail.lower()
        return self.outcome is Outcome.CRASHED and any(p in text for p in PEER_LOSS_PATTERNS)


#: Lower-case fragments of the errors a rank's collective raises when a peer's process or node is
#: gone: gloo's TCP pairs, NCCL's remote errors, c10d's store and network errors.
PEER_LOSS_PATTERNS = (
    "connection reset by peer", "connection closed by peer", "broken pipe", "connection refused",
    "socket timeout", "remote process exited", "ncclremoteerror", "distnetworkerror", "no route to host",
)


@dataclass(frozen=True)
class Facts:
    """Everything the rules read about one ended rank."""

    rank: int
    message: TerminationMessage | None
    """The runtime's termination message, if the container wrote one that parses."""
    exit_code: int | None
    """``None``: the training container never exited (rejected, evicted before it started, node lost)."""
    container_reason: str
    """Kubernetes' reason of the container's end: ``Completed``, ``Error``, ``OOMKilled``…"""
    log_tail: str
    """The last line of a termination message that is not the runtime's (a log tail)."""
    pod_reason: str
    pod_message: str
    init_failure: str | None
    disruption: str | None
    """Evidence of a disruption (:func:`disruption_evidence`), or ``None``."""
    world_size: int | None = None
    """The pod's ``WORLD_SIZE``, if it has one."""
    resume_from: str | None = None
    """The checkpoint the pod was told to resume (``TORPOR_RESUME_FROM``), if any."""

    @property
    def refused_resize(self) -> bool:
        """The script raised ``torpor.ResizeError``: it cannot resume its checkpoint on this world size."""
        error = self.message.error if self.message is not None else None
        return bool(error) and error.startswith(f"{ResizeError.__name__}:")

    @property
    def signal(self) -> int | None:
        return signal_from_exit_code(self.exit_code) if self.exit_code is not None else None

    def words(self) -> dict[str, object]:
        """The fields a rule's ``detail`` may name."""
        msg = self.message
        signum = self.signal or (msg.exit_code - 128 if msg is not None and msg.exit_code > 128 else None)
        saved = (f"saved {msg.checkpoint} at step {msg.step}" if msg is not None and msg.checkpoint
                 else "saved nothing")
        return {
            "rank": self.rank, "code": self.exit_code, "reason": msg.reason.value if msg else "",
            "saved": saved, "step": msg.step if msg else None,
            "error": (msg.error if msg else None) or self.container_reason or "error",
            "signal": f"signal {signum} ({signal_name(signum)})" if signum else "a signal",
            "ended": f"by signal {signum} ({signal_name(signum)}) without a save" if self.signal
            else "without a container exit",
            "evidence": self.disruption, "pod_reason": self.pod_reason or "no exit status",
            "pod_message": f": {self.pod_message}" if self.pod_message else "",
            "init": self.init_failure, "tail": self.log_tail or self.container_reason,
            "container_reason": self.container_reason,
            "world_size": self.world_size if self.world_size is not None else "?",
            "checkpoint": f"checkpoint {self.resume_from}" if self.resume_from else "its checkpoint",
        }


@dataclass(frozen=True)
class Rule:
    """One row of the table: when it applies, what the rank's end is, and how to say it."""

    observed: str
    """The condition in words, as docs/operator.md shows it."""
    applies: Callable[[Facts], bool]
    outcome: Outcome
    detail: str
    """``str.format`` template over :meth:`Facts.words`, for Events and conditions."""


def _says(*reasons: StopReason) -> Callable[[Facts], bool]:
    return lambda f: f.message is not None and f.message.reason in reasons


def _by_signal_or_no_exit(f: Facts) -> bool:
    return f.exit_code is None or f.signal is not None


#: The classification, first match wins. Order matters: the runtime's own word first, then
#: what the kubelet said of the pod, then evidence, then the exit code alone.
RULES: tuple[Rule, ...] = (
    Rule("message `signal`, with evidence of a disruption", lambda f: _says(StopReason.SIGNAL)(f)
         and f.disruption is not None, Outcome.STOPPED,
         "rank {rank} stopped on request (signal), {saved}, exit {code} ({evidence})"),
    Rule("message `file` (exit 75)", _says(StopReason.FILE), Outcome.STOPPED,
         "rank {rank} stopped on request (file), {saved}, exit {code}"),
    Rule("message `signal`, no evidence (a liveness probe, a `kill`)", _says(StopReason.SIGNAL), Outcome.CRASHED,
         "rank {rank} was stopped by {signal} with no disruption in sight (liveness probe? kill?), "
         "{saved}, exit {code}"),
    Rule("message `completed`, exit 0",
         lambda f: _says(StopReason.COMPLETED)(f) and f.exit_code == EXIT_COMPLETED, Outcome.FINISHED,
         "rank {rank} completed at step {step}"),
    Rule("message `error` with a `torpor.ResizeError`: the script cannot resume its checkpoint on this "
         "`WORLD_SIZE` (docs: \"A resize the script refuses\")", lambda f: _says(StopReason.ERROR)(f)
         and f.refused_resize, Outcome.CRASHED,
         "rank {rank} cannot resume {checkpoint} on WORLD_SIZE {world_size}: {error}"),
    Rule("any other message (`error`; `completed` with another exit)", lambda f: f.message is not None,
         Outcome.CRASHED, "rank {rank} failed with exit {code}: {error}"),
    Rule("no message, exit 0", lambda f: f.exit_code == EXIT_COMPLETED, Outcome.FINISHED,
         "rank {rank} exited 0"),
    Rule("no message, exit 75", lambda f: f.exit_code == EXIT_FILE_REQUEST, Outcome.STOPPED,
         "rank {rank} stopped on the GracefulExit file"),
    Rule("pod `status.reason` `UnexpectedAdmissionError`, `OutOf*` (`OutOfcpu`, `OutOfmemory`, `OutOfpods`…), "
         "`NodeAffinity`: the kubelet refused the pod", lambda f: _admission(f.pod_reason), Outcome.REJECTED,
         "rank {rank} was rejected by the kubelet of its node ({pod_reason}{pod_message})"),
    Rule("pod `status.reason` `DeadlineExceeded` (`activeDeadlineSeconds`)",
         lambda f: f.pod_reason == "DeadlineExceeded", Outcome.CRASHED,
         "rank {rank} ran past its pod's activeDeadlineSeconds{pod_message}"),
    Rule("container reason `OOMKilled`", lambda f: f.container_reason == "OOMKilled", Outcome.CRASHED,
         "rank {rank} was OOMKilled (exit {code})"),
    Rule("exit 128+n or no container exit, with evidence of a disruption",
         lambda f: _by_signal_or_no_exit(f) and f.disruption is not None, Outcome.KILLED,
         "rank {rank} was ended {ended} ({evidence})"),
    Rule("an init container failed", lambda f: f.init_failure is not None, Outcome.CRASHED,
         "rank {rank} could not start: {init}"),
    Rule("exit 128+n, no evidence (SIGABRT from an NCCL watchdog, SIGSEGV, SIGKILL…)",
         lambda f: f.signal is not None, Outcome.CRASHED,
         "rank {rank} was ended by {signal} (exit {code}) with no disruption in sight"),
    Rule("pod Failed without a container exit, no evidence", lambda f: f.exit_code is None, Outcome.CRASHED,
         "rank {rank} ended without an exit code ({pod_reason}{pod_message})"),
    Rule("anything else", lambda f: True, Outcome.CRASHED, "rank {rank} failed with exit {code}: {tail}"),
)


def disruption_evidence(pod: PodView, node: NodeView | None = None, taints: Iterable[str] = ()) -> str | None:
    """What says this rank's pod was disrupted from outside, or ``None``.

    In order of certainty: the pod's ``DisruptionTarget`` condition (an eviction, scheduler
    preemption, the taint manager, pod GC, the kubelet's node shutdown), a ``status.reason`` the
    kubelet gives only to pods it evicted or shut down (:data:`DISRUPTION_REASONS`), the pod's
    deletion, and its node: cordoned, a termination taint, or lost (NotReady, unreachable).
    """
    if pod.disruption:
        return f"DisruptionTarget {pod.disruption}"
    if pod.status_reason in DISRUPTION_REASONS:
        return f"pod {pod.status_reason}"
    if pod.deleting:
        return "pod deleted"
    if node is not None:
        why = node.going_away(taints) or node.lost()
        if why:
            return f"node {node.name} {why}"
    return None


def _parse(message: str) -> TerminationMessage | None:
    if not message.lstrip().startswith("{"):
        return None
    try:
        return TerminationMessage.from_json(message)
    except (ValueError, TypeError):
        return None


def facts(pod: PodView, node: NodeView | None = None, taints: Iterable[str] = ()) -> Facts:
    """Gather what the rules read about an ended rank (pure)."""
    term = pod.termination
    text = term.message if term is not None else ""
    return Facts(
        rank=pod.rank,
        message=_parse(text),
        exit_code=term.exit_code if term is not None else None,
        container_reason=term.reason if term is not None else "",
        log_tail=text.strip().splitlines()[-1][:200] if text.strip() else "",
        pod_reason=pod.status_reason or "",
        pod_message=pod.status_message,
        init_failure=pod.init_failure,
        disruption=disruption_evidence(pod, node, taints),
        world_size=pod.world_size,
        resume_from=pod.resume_from,
    )


def classify(pod: PodView, node: NodeView | None = None, taints: Iterable[str] = ()) -> RankOutcome:
    """Classify one rank's pod by :data:`RULES` (pure).

    Args:
        pod: the rank's pod.
        node: the node it ran on, if known: a node going away or lost is evidence of a disruption.
        taints: the taint keys that mean a node is going away (``OperatorSettings.termination_taints``).
    """
    if not pod.terminated:
        return RankOutcome(pod.rank, Outcome.ACTIVE)
    f = facts(pod, node, taints)
    rule = next(r for r in RULES if r.applies(f))
    msg = f.message
    return RankOutcome(pod.rank, rule.outcome, msg.checkpoint if msg else None, msg.step if msg else None,
                       rule.detail.format(**f.words()), pod.termination.finished_at if pod.termination else None)


def rules_table() -> str:
    """:data:`RULES` as the Markdown table docs/operator.md shows."""
    rows = ["| # | observed (first match wins) | outcome | counts as |", "|---|---|---|---|"]
    rows += [f"| {n} | {r.observed} | {r.outcome.value} | {COUNTS[r.outcome]} |" for n, r in enumerate(RULES, 1)]
    return "\n".join(rows)
