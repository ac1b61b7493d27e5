"""Watching the GracefulExit file off the step path.

Reading and parsing a JSON file on every step (what the seed does) costs a syscall and a
parse per step, and a ConfigMap file changes at most every kubelet sync. A daemon thread
polls ``os.stat`` and re-reads only when the file changed; the step reads a bool.

Problems (missing, malformed) are never raised nor warned from the thread: a warning in a
background thread would not reach the caller's warning filters reliably. They are queued and
the step path turns each new one into one ``TorporWarning``.
"""

from __future__ import annotations

import json
import os
import threading

GRACEFUL_EXIT_KEY = "GracefulExit"


def read_request(path: str) -> tuple[bool, str | None]:
    """``(requested, problem)`` for the exit file at ``path``.

    ``{"GracefulExit": 1}`` or ``true`` requests a stop (as the seed, ``== 1``; ``"1"`` does
    not). A missing or malformed file is ``(False, problem)``: never a stop, never a crash.
    """
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        return False, f"exit file {path!r} does not exist (yet); no stop requested"
    except OSError as exc:
        return False, f"exit file {path!r} cannot be read: {exc}"
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as exc:
        return False, f"exit file {path!r} is not valid JSON ({exc}); ignored"
    if not isinstance(doc, dict):
        return False, f"exit file {path!r} must hold a JSON object, got {type(doc).__name__}; ignored"
    value = doc.get(GRACEFUL_EXIT_KEY, 0)
    if isinstance(value, int | float) and value == 1:
        return True, None
    return False, None


class ExitFileWatcher:
    """Polls one file in a daemon thread; :attr:`requested` is what the step reads."""

    def __init__(self, path: str, poll_seconds: float = 1.0) -> None:
        """Watch ``path`` every ``poll_seconds`` once :meth:`start` is called."""
        self.path = path
        self.poll_seconds = poll_seconds
        self.requested = False
        self._problems: list[str] = []
        self._last_problem: str | None = None
        self._signature: tuple[int, int, int] | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _poll(self) -> None:
        try:
            st = os.stat(self.path)  # follows kubelet's ..data symlink swap
            signature: tuple[int, int, int] | None = (st.st_mtime_ns, st.st_size, st.st_ino)
        except OSError:
            signature = None
        if signature is not None and signature == self._signature:
            return
        self._signature = signature
        requested, problem = read_request(self.path)
        self.requested = requested
        with self._lock:
            if problem is not None and problem != self._last_problem:
                self._problems.append(problem)
            self._last_problem = problem

    def start(self) -> None:
        """Read once now (so a request already present is seen at the first step), then poll."""
        self._poll()
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="torpor-exit-file", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.poll_seconds):
            self._poll()

    def take_problems(self) -> list[str]:
        """New problems since the last call (the step path warns about each once)."""
        with self._lock:
            problems, self._problems = self._problems, []
        return problems

    def stop(self) -> None:
        """Stop polling and join the thread."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5 * self.poll_seconds + 1)
            self._thread = None
