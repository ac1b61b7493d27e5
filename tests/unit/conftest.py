"""Fixtures of the unit tests that need a real client but no server."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest
from kubernetes import client

from torpor_operator.applying import KubeClient


@pytest.fixture
def refused_api() -> Iterator[KubeClient]:
    """A KubeClient whose API server is away: a bound, non-listening loopback port, so its
    errors are the ones an API-server restart produces."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        config = client.Configuration(host=f"http://127.0.0.1:{sock.getsockname()[1]}")
        config.retries = 0
        api = client.ApiClient(config)
        yield KubeClient(api)
        api.close()
