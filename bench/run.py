#!/usr/bin/env python3
"""Run every ``bench/bench_*.py`` in turn; each prints its ratios against a baseline last.

Benchmarks are never timed assertions in tests: each compares torpor with a baseline
measured side by side in the same process and prints the ratio, and ``bench/README.md``
records the figures with the command that produced them.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path


def main() -> int:
    here = Path(__file__).resolve().parent
    benches = sorted(here.glob("bench_*.py"))
    if not benches:
        print("[bench] no benchmarks yet in bench/ (they arrive with the runtime speed work)")
        return 0
    failed = []
    for script in benches:
        print(f"[bench] {script.name} ...", flush=True)
        started = time.monotonic()
        code = subprocess.call([sys.executable, str(script), *sys.argv[1:]], cwd=here.parent)
        print(f"[bench] {script.name}: exit {code} after {time.monotonic() - started:.1f}s", flush=True)
        if code:
            failed.append(script.name)
    if failed:
        print(f"[bench] failed: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
