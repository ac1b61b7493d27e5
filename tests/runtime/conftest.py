"""Fixtures of the runtime tests that several files share."""

from __future__ import annotations

import signal
from collections.abc import Iterator

import pytest


@pytest.fixture
def previous_handler() -> Iterator[list[int]]:
    """A user's own SIGTERM handler, installed before training: torpor chains to it and must put it back."""
    calls: list[int] = []
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: calls.append(signum))
    try:
        yield calls
    finally:
        signal.signal(signal.SIGTERM, previous)
