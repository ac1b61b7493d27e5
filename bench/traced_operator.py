#!/usr/bin/env python3
"""``python -m torpor_operator`` under :mod:`tracemalloc`, for ``bench_operator_cluster.py --tracemalloc``.

Where the operator's memory goes, by the code that allocated it: SIGUSR2 writes the largest
allocation sites still alive (grouped by their innermost frames) to the file named by
``TORPOR_TRACEMALLOC_OUT``. Tracing makes every allocation slower, so a traced run's CPU and
latency figures are not the operator's; only its composition of memory is.
"""

from __future__ import annotations

import gc
import os
import runpy
import signal
import sys
import threading
import tracemalloc
import types
from collections.abc import Callable
from pathlib import Path
from types import FrameType

FRAMES = 6
TOP = 40


def _dump(signum: int, frame: FrameType | None) -> None:
    threading.Thread(target=_write, daemon=True).start()  # not in the handler: the loop keeps running


def _deep_size(root: object, seen: set[int]) -> int:
    """Bytes of ``root`` and what it holds (containers, instances' attributes), each object once
    across calls sharing ``seen``; modules, classes and functions are not followed."""
    total, stack = 0, [root]
    while stack:
        obj = stack.pop()
        if id(obj) in seen or isinstance(obj, type | types.ModuleType | types.FunctionType | types.MethodType):
            continue
        seen.add(id(obj))
        total += sys.getsizeof(obj, 0)
        if isinstance(obj, dict):
            stack.extend(_copied(lambda d=obj: [x for kv in d.items() for x in kv]))
        elif isinstance(obj, list | tuple | set | frozenset):
            stack.extend(_copied(lambda c=obj: list(c)))
        elif hasattr(obj, "__dict__"):
            stack.append(vars(obj))
        for slot in getattr(type(obj), "__slots__", ()):
            if isinstance(slot, str) and hasattr(obj, slot):
                stack.append(getattr(obj, slot))
    return total


def _copied(read: Callable[[], list[object]]) -> list[object]:
    """A container's items, read again while the event loop changes it under this thread."""
    for _ in range(10):
        try:
            return read()
        except RuntimeError:  # changed size during iteration
            continue
    return []


def _holders() -> list[str]:
    """The deep size of each attribute of the operator's shell and of kopf's per-object memories."""
    lines = []
    for obj in gc.get_objects():
        kind = type(obj)
        if kind.__name__ == "Shell" and kind.__module__ == "torpor_operator.handlers":
            seen: set[int] = set()
            sizes = sorted(((_deep_size(v, seen), k) for k, v in vars(obj).items()), reverse=True)
            lines.append("\n== the shell's attributes, deep size (each object counted once, largest first) ==")
            lines += [f"{size / 2**20:8.2f} MiB  {name}" for size, name in sizes[:20]]
        elif kind.__name__ == "ResourceMemories":
            lines.append(f"\n== kopf ResourceMemories: {_deep_size(obj, set()) / 2**20:.2f} MiB ==")
    return lines


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
    lines += _holders()
    out = Path(os.environ["TORPOR_TRACEMALLOC_OUT"])
    out.with_suffix(".tmp").write_text("\n".join(lines) + "\n")
    out.with_suffix(".tmp").replace(out)  # whole, or not there


if __name__ == "__main__":
    tracemalloc.start(FRAMES)
    signal.signal(signal.SIGUSR2, _dump)
    sys.argv = ["torpor_operator", *sys.argv[1:]]
    runpy.run_module("torpor_operator", run_name="__main__", alter_sys=True)
