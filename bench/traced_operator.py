#!/usr/bin/env python3
"""``python -m torpor_operator`` under :mod:`tracemalloc`, for ``bench_operator_cluster.py --tracemalloc``.

Where the operator's memory goes, by the code that allocated it: SIGUSR2 writes the largest
allocation sites still alive (grouped by their innermost frames) to the file named by
``TORPOR_TRACEMALLOC_OUT``. Tracing makes every allocation slower, so a traced run's CPU and
latency figures are not the operator's; only its composition of memory is.
"""

from __future__ import annotations

import os
import runpy
import signal
import sys
import threading
import tracemalloc
from pathlib import Path
from types import FrameType

FRAMES = 6
TOP = 40


def _dump(signum: int, frame: FrameType | None) -> None:
    threading.Thread(target=_write, daemon=True).start()  # not in the handler: the loop keeps running


def _write() -> None:
    snapshot = tracemalloc.take_snapshot().filter_traces([tracemalloc.Filter(False, tracemalloc.__file__)])
    lines = [f"traced now {tracemalloc.get_traced_memory()[0] / 2**20:.1f} MiB, "
             f"peak {tracemalloc.get_traced_memory()[1] / 2**20:.1f} MiB"]
    for group in ("filename", "traceback"):
        stats = snapshot.statistics(group)
        lines.append(f"\n== top {TOP} by {group} (of {sum(s.size for s in stats) / 2**20:.1f} MiB) ==")
        for stat in stats[:TOP]:
            lines.append(f"{stat.size / 2**20:8.2f} MiB {stat.count:9d} blocks")
            frames = stat.traceback.format() if group == "traceback" else [f"  {stat.traceback[0].filename}"]
            lines.extend(f"    {f.strip()}" for f in frames if f.strip())
    out = Path(os.environ["TORPOR_TRACEMALLOC_OUT"])
    out.with_suffix(".tmp").write_text("\n".join(lines) + "\n")
    out.with_suffix(".tmp").replace(out)  # whole, or not there


if __name__ == "__main__":
    tracemalloc.start(FRAMES)
    signal.signal(signal.SIGUSR2, _dump)
    sys.argv = ["torpor_operator", *sys.argv[1:]]
    runpy.run_module("torpor_operator", run_name="__main__", alter_sys=True)
