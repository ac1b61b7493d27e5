"""The node agent's retry decisions: which failed requests it sends again, and how fast."""

from __future__ import annotations

import pytest
import urllib3

from nodeagent_kube import ApiError, Backoff, is_transient


@pytest.mark.parametrize(
    ("exc", "again"),
    [
        (urllib3.exceptions.NewConnectionError(None, "connection refused"), True),  # server down
        (urllib3.exceptions.ProtocolError("connection reset"), True),  # server stopped mid-request
        (urllib3.exceptions.ReadTimeoutError(None, "/api", "read timed out"), True),  # server hung
        (ConnectionResetError(), True),
        (ApiError("PATCH", "/api/v1/pods", 429, {}), True),  # overloaded
        (ApiError("PATCH", "/api/v1/pods", 500, {}), True),  # etcd away
        (ApiError("PATCH", "/api/v1/pods", 503, {}), True),  # starting, shutting down
        (ApiError("PATCH", "/api/v1/pods", 404, {}), False),  # an answer about the object
        (ApiError("PATCH", "/api/v1/pods", 409, {}), False),
        (ApiError("PATCH", "/api/v1/pods", 422, {}), False),  # would fail again the same way
        (KeyError("status"), False),  # a bug: surfaces with its traceback
    ],
)
def test_only_an_absent_or_overloaded_server_is_worth_retrying(exc: BaseException, again: bool) -> None:
    assert is_transient(exc) is again


def test_backoff_doubles_to_its_cap_and_starts_over_after_a_success() -> None:
    backoff = Backoff(first=0.5, most=5.0)
    assert [backoff.next() for _ in range(6)] == [0.5, 1.0, 2.0, 4.0, 5.0, 5.0]
    backoff.reset()
    assert backoff.next() == 0.5
