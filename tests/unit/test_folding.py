"""The pod's exit from its workers' (issue 14, item 1): a saved stop stays a stop, a crash a crash."""

from __future__ import annotations

import pytest

from torpor.folding import WorkerExit, exit_code_of, fold_exits
from torpor.termination import StopReason, TerminationMessage


def stop(local_rank: int, code: int = 143) -> WorkerExit:
    reason = StopReason.FILE if code == 75 else StopReason.SIGNAL
    return WorkerExit(local_rank, code, TerminationMessage(reason, code, checkpoint="Net-1_7", step=7, rank=local_rank))


def test_every_worker_saved_on_sigterm_gives_143_and_the_lowest_local_ranks_message() -> None:
    code, message = fold_exits([stop(1), stop(0)])
    assert code == 143 and message is not None and message.rank == 0 and message.checkpoint == "Net-1_7"


def test_a_signal_wins_over_the_file_as_the_runtimes_max_reduction_does() -> None:
    assert fold_exits([stop(0, 75), stop(1, 143)])[0] == 143


def test_a_crash_among_saved_stops_is_the_pods_exit() -> None:
    code, message = fold_exits([stop(0), WorkerExit(1, exit_code_of(-6)), stop(2)])
    assert (code, message) == (134, None), "SIGABRT without a message: the operator sees a crash"


def test_the_first_worker_to_fail_is_the_pods_exit_not_the_one_stopped_after_it() -> None:
    # local rank 1 aborts; local rank 0, SIGTERMed by the launcher before it could save, dies of it
    assert fold_exits([WorkerExit(1, exit_code_of(-6)), WorkerExit(0, exit_code_of(-15))]) == (134, None)


def test_a_signal_code_without_the_runtimes_message_is_no_stop() -> None:
    assert fold_exits([stop(0), WorkerExit(1, 143)]) == (143, None)
    liar = WorkerExit(0, 143, TerminationMessage(StopReason.ERROR, 1))
    assert fold_exits([liar, stop(1)])[1] == liar.message, "a message that disagrees with the code is no stop"


def test_an_error_keeps_its_code_and_message() -> None:
    error = WorkerExit(1, 1, TerminationMessage(StopReason.ERROR, 1, error="RuntimeError: boom"))
    assert fold_exits([WorkerExit(0, 0), error]) == (1, error.message)


def test_all_completed_is_0() -> None:
    done = TerminationMessage(StopReason.COMPLETED, 0, step=10)
    assert fold_exits([WorkerExit(1, 0, None), WorkerExit(0, 0, done)]) == (0, done)


def test_no_workers_is_an_error() -> None:
    with pytest.raises(ValueError, match="no workers"):
        fold_exits([])


def test_exit_code_of_turns_a_kill_into_128_plus_the_signal() -> None:
    assert [exit_code_of(c) for c in (0, 1, -15, -9)] == [0, 1, 143, 137]
