"""A worker for tests/runtime/test_runtime_launcher.py: waits for SIGTERM like a saving rank,
counts the signals it got, or crashes on request (``CRASH_RANK``)."""

import json
import os
import signal
import sys
import time
from pathlib import Path

from torpor.termination import StopReason, TerminationMessage, write_termination_message

out = Path(sys.argv[1])
rank = int(os.environ["RANK"])
got: list[int] = []
signal.signal(signal.SIGTERM, lambda signum, _f: got.append(signum))
(out / f"env.{rank}").write_text(json.dumps({k: os.environ[k] for k in (
    "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "WORLD_SIZE", "GROUP_RANK", "TORPOR_TERMINATION_LOG")}))
if os.environ.get("CRASH_RANK") == str(rank):
    # only once every other worker of the pod is up (its handler installed), so the test sees
    # the launcher stop a rank that is ready to save
    others = [r for r in range(int(os.environ["WORLD_SIZE"])) if r != rank
              and r // int(os.environ["LOCAL_WORLD_SIZE"]) == int(os.environ["GROUP_RANK"])]
    while not all((out / f"env.{r}").exists() for r in others):
        time.sleep(0.01)
    os.abort()
while not got:
    time.sleep(0.01)
time.sleep(0.3)  # "saving": a second signal would show up in the count
(out / f"signals.{rank}").write_text(str(len(got)))
write_termination_message(TerminationMessage(StopReason.SIGNAL, 143, checkpoint="Net-1_7", step=7, rank=rank,
                                             signal="SIGTERM"), os.environ["TORPOR_TERMINATION_LOG"])
sys.exit(143)
