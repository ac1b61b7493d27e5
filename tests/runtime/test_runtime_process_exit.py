"""A rank's process ends with its own exit code, not a native abort from a process group.

A process group's worker threads outlive the script: one still finishing a collective when
the interpreter shuts down (a completion callback, or the last reference to a tensor) used
to abort the process with SIGABRT ("terminate called without an active exception"), which
the operator counts as a crash. Real gloo ranks; the callback is a real ``Future.then`` on
gloo's worker thread, still running when the script's last line has run.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from torpor_harness import launch_ranks, logs, wait_all

PROCS = Path(__file__).parent / "procs"


@pytest.mark.parametrize("group", ["torpor", "own"], ids=["init_distributed", "script-made-group-with-loop"])
def test_a_rank_whose_callback_outlives_the_script_exits_cleanly_after_the_callback(tmp_path: Path,
                                                                                    group: str) -> None:
    argv = ["--marker", str(tmp_path / "callback-{rank}.txt"), *(["--own-group"] if group == "own" else [])]
    procs = launch_ranks(2, {}, argv, tmp_path, script=PROCS / "exit_with_callback_running.py")
    assert wait_all(procs, tmp_path, timeout=120) == [0, 0], logs(tmp_path)
    # the callback finished its work (the all-reduced value of two ranks' ones) before the exit
    for rank in (0, 1):
        assert (tmp_path / f"callback-{rank}.txt").read_text() == "[2.0, 2.0, 2.0, 2.0]", logs(tmp_path)
    assert "terminate called" not in logs(tmp_path)
