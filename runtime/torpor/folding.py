"""One pod, several ranks: how the workers' exits fold into the one exit the pod reports.

Kubernetes keeps one exit code and one termination message per container. With
``spec.procsPerPod`` > 1 a pod runs several ranks (one per GPU), and the operator must still tell
a saved preemption from a crash (:mod:`torpor_operator.outcomes` reads the code and the message).
``python -m torpor.run`` waits for every worker and reports the fold below; torchrun reports 1
for anything that is not 0, and every worker would write the same termination-log path.

=================================================  ==============================================
Workers ended with                                 The pod reports
=================================================  ==============================================
every one 0                                        0, the message of the lowest local rank
any error (a code that is not 0, 75 or 128+N with  the code and message of the first worker to
a message saying ``signal``; a kill without a      fail, in the order they ended (the cause, not a
message; a missing message after 128+N)            rank the launcher stopped after it), so a
                                                   SIGABRT stays 134 with no message: a crash
every one a stop (75 or 128+N with its message),   the highest code (a signal wins over the
or 0 for ranks that finished                       file, as the runtime's MAX reduction does),
                                                   the message of the lowest local rank with it
=================================================  ==============================================

A worker killed by a signal (``returncode`` −N from :mod:`subprocess`) counts as 128+N with no
message: without the runtime's message saying it saved, the operator takes it for a crash.

Pure and torch-free: the launcher and the tests import it without torch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from torpor.termination import (
    EXIT_COMPLETED,
    EXIT_FILE_REQUEST,
    SIGNAL_EXIT_BASE,
    StopReason,
    TerminationMessage,
    signal_from_exit_code,
)

__all__ = ["WorkerExit", "exit_code_of", "fold_exits", "is_stop"]


@dataclass(frozen=True)
class WorkerExit:
    """How one local rank ended: its exit code as the shell reports it, and its message."""

    local_rank: int
    code: int
    """0..255; a kill by signal N is 128+N (see :func:`exit_code_of`)."""
    message: TerminationMessage | None = None


def exit_code_of(returncode: int) -> int:
    """``subprocess`` returncode → the shell's code: −N (killed by signal N) becomes 128+N."""
    return SIGNAL_EXIT_BASE - returncode if returncode < 0 else returncode


def is_stop(worker: WorkerExit) -> bool:
    """A stop after a save: 75 or 128+N, and the runtime's own message says so."""
    message = worker.message
    if message is None or message.exit_code != worker.code:
        return False
    if worker.code == EXIT_FILE_REQUEST:
        return message.reason is StopReason.FILE
    return signal_from_exit_code(worker.code) is not None and message.reason is StopReason.SIGNAL


def fold_exits(workers: Sequence[WorkerExit]) -> tuple[int, TerminationMessage | None]:
    """The pod's exit code and message for ``workers``, given in the order they ended (the
    module's table).

    Raises:
        ValueError: ``workers`` is empty.
    """
    if not workers:
        raise ValueError("fold_exits: no workers to fold")
    failed = [w for w in workers if w.code != EXIT_COMPLETED and not is_stop(w)]
    if failed:
        return failed[0].code, failed[0].message
    ordered = sorted(workers, key=lambda w: w.local_rank)
    stops = [w for w in ordered if w.code != EXIT_COMPLETED]
    if not stops:
        return EXIT_COMPLETED, ordered[0].message
    code = max(w.code for w in stops)
    first = next(w for w in stops if w.code == code)
    return code, first.message
