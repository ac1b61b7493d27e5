"""One background save at a time: the thread behind ``async_save=True``.

Why one: a second save in flight would need a second snapshot (memory) and could finish
before the first (a newer checkpoint complete before an older one confuses nobody, but
retention and the operator's "last checkpoint" would flap). So :meth:`BackgroundSaver.submit`
first waits for the previous save; with saves spaced further apart than an upload takes,
that wait is zero.

Failures are never swallowed: a finished save's exception is kept until the training loop
asks for it (:meth:`BackgroundSaver.take_error`, at the next step boundary) or until
:meth:`BackgroundSaver.drain`. Every saver registers itself so that the exit save of
``OnRequestExit`` can wait for all of them (:func:`drain_all`) before writing its own.
"""

from __future__ import annotations

import logging
import threading
import weakref
from collections.abc import Callable
from typing import Any

_SAVERS: weakref.WeakSet[BackgroundSaver] = weakref.WeakSet()
_SAVERS_LOCK = threading.Lock()


class BackgroundSaver:
    """Runs save jobs in a daemon thread, at most one at a time."""

    def __init__(self, name: str = "torpor-async-save") -> None:
        """Create an idle saver (the thread starts with the first job)."""
        self._name = name
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._label = ""
        self.completed: list[tuple[str, Any]] = []
        """``(label, result)`` of every job that finished without error, in order."""
        with _SAVERS_LOCK:
            _SAVERS.add(self)

    @property
    def in_flight(self) -> bool:
        """Whether a job is running now."""
        return self._thread is not None and self._thread.is_alive()

    @property
    def failed(self) -> bool:
        """Whether the last job has finished with an error not yet taken (a peek, unlike :meth:`take_error`)."""
        return not self.in_flight and self._error is not None

    @property
    def label(self) -> str:
        """The label of the last job submitted."""
        return self._label

    def submit(self, label: str, job: Callable[[], Any]) -> float:
        """Wait for the job in flight (if any), then start ``job`` in the background.

        Returns:
            Seconds spent waiting for the previous job (part of the training stall).
        """
        import time

        started = time.perf_counter()
        self.wait()
        waited = time.perf_counter() - started

        def run() -> None:
            try:
                result = job()
            except BaseException as exc:  # kept and reported at the next step, never dropped
                self._error = exc
            else:
                self.completed.append((label, result))

        self._label = label
        self._thread = threading.Thread(target=run, name=f"{self._name}:{label}", daemon=True)
        self._thread.start()
        return waited

    def wait(self) -> None:
        """Block until the job in flight (if any) has finished."""
        thread = self._thread
        if thread is not None:
            thread.join()
            self._thread = None

    def take_error(self) -> tuple[str, BaseException] | None:
        """The failure of the last finished job, once (``(label, exception)``), else ``None``."""
        if self.in_flight or self._error is None:
            return None
        error, self._error = self._error, None
        return self._label, error

    def drain(self) -> tuple[str, BaseException] | None:
        """Wait for everything in flight, then return its failure if it had one."""
        self.wait()
        return self.take_error()


def drain_all() -> list[tuple[str, BaseException]]:
    """Wait for every saver's job in flight; returns the failures (each reported once)."""
    with _SAVERS_LOCK:
        savers = list(_SAVERS)
    failures = []
    for saver in savers:
        failure = saver.drain()
        if failure is not None:
            failures.append(failure)
    return failures


def warm_in_background(storage: Any) -> None:
    """Build ``storage``'s client in a daemon thread (``S3Storage.warm``), if it has one.

    Creating a boto3 client takes a second or more on a busy machine; doing it when training
    starts keeps it out of the first save and, above all, out of the exit save's grace
    period. A failure here is only logged: the save itself reports for real.
    """
    warm = getattr(storage, "warm", None)
    if not callable(warm):
        return

    def run() -> None:
        try:
            warm()
        except Exception as exc:
            logging.getLogger("torpor").debug("warming the checkpoint store failed: %s", exc)

    threading.Thread(target=run, name="torpor-warm-store", daemon=True).start()
