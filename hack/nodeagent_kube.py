"""A small JSON-over-HTTPS client for the node agent.

The node agent speaks to the API server in plain JSON dictionaries (the shapes of the
Kubernetes API reference, camelCase keys) rather than through the generated model classes:
pods are compared, patched and copied as dictionaries, and a watch is read line by line so
that `stop()` can cut it off at once (`urllib3`'s `HTTPResponse.shutdown`).

The official `kubernetes` package is used for what it is good at: reading a kubeconfig
(client certificates, bearer tokens, CA bundles).

Requests are not retried here (`retries=False`): each caller knows whether it may wait, so
it asks `is_transient` and paces itself with a `Backoff` (kubelet, likewise, keeps retrying
its status updates and heartbeats while the API server is away, and re-lists after a watch
breaks).
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import kubernetes.config
import urllib3

JsonDict = dict[str, Any]

STRATEGIC_MERGE = "application/strategic-merge-patch+json"
MERGE = "application/merge-patch+json"


class ApiError(Exception):
    """The API server answered with an error status.

    Attributes:
        status: HTTP status code (404, 409, 410, ...).
        body: the decoded `Status` object, or the raw text.
    """

    def __init__(self, method: str, path: str, status: int, body: Any):
        self.status = status
        self.body = body
        message = body.get("message", body) if isinstance(body, dict) else body
        super().__init__(f"{method} {path}: HTTP {status}: {message}")


def is_transient(exc: BaseException) -> bool:
    """Whether a failed request is worth sending again as it is: the API server is away,
    restarting or overloaded (a refused or reset connection, a timeout, HTTP 429 or 5xx), as
    opposed to an answer about the request itself (404, 409, 422, ...)."""
    if isinstance(exc, ApiError):
        return exc.status == 429 or exc.status >= 500
    return isinstance(exc, (urllib3.exceptions.HTTPError, OSError))


class Backoff:
    """Delays between attempts at something the API server could not serve: `first` seconds,
    doubling up to `most`, and back to `first` after a success. One per retrying loop."""

    def __init__(self, first: float = 0.5, most: float = 5.0) -> None:
        self.first, self.most = first, most
        self._next = first

    def next(self) -> float:
        """The delay before the next attempt (and double it for the one after)."""
        delay, self._next = self._next, min(self.most, self._next * 2)
        return delay

    def reset(self) -> None:
        self._next = self.first


MAX_CONNECTIONS = 64  # connections kept open to the API server


class KubeClient:
    """JSON requests against one API server, authenticated from a kubeconfig.

    Args:
        kubeconfig: path of the kubeconfig file; its current context is used.
    """

    def __init__(self, kubeconfig: Path):
        api = kubernetes.config.new_client_from_config(config_file=str(kubeconfig))
        cfg = api.configuration
        self.host = cfg.host.rstrip("/")
        self._headers = {"Accept": "application/json", "User-Agent": "torpor-node-agent"}
        token = (cfg.api_key or {}).get("BearerToken") or (cfg.api_key or {}).get("authorization")
        if token:
            self._headers["Authorization"] = token if token.startswith("Bearer ") else f"Bearer {token}"
        # Every pod's worker thread talks to the API server: with fewer kept connections than
        # threads, urllib3 opens and drops one per request, and the TLS handshakes alone held
        # one core at 500 pods on a node (bench_operator_cluster, py-spy).
        self._pool = urllib3.PoolManager(
            num_pools=4,
            maxsize=MAX_CONNECTIONS,
            cert_reqs="CERT_REQUIRED" if cfg.verify_ssl else "CERT_NONE",
            ca_certs=cfg.ssl_ca_cert,
            cert_file=cfg.cert_file,
            key_file=cfg.key_file,
            retries=False,
        )
        self._open_watches: set[urllib3.BaseHTTPResponse] = set()
        self._lock = threading.Lock()
        self._closed = False

    def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        query: dict[str, Any] | None = None,
        content_type: str = "application/json",
        timeout: float = 30.0,
    ) -> JsonDict:
        """Send one request and return the decoded JSON answer.

        Raises:
            ApiError: the server answered with a status of 400 or more.
        """
        url = self.host + path + (f"?{urlencode(query)}" if query else "")
        headers = dict(self._headers)
        data = None
        if body is not None:
            headers["Content-Type"] = content_type
            data = json.dumps(body).encode()
        resp = self._pool.request(method, url, body=data, headers=headers, timeout=timeout)
        try:
            decoded = json.loads(resp.data) if resp.data else {}
        except ValueError:
            decoded = resp.data.decode(errors="replace")
        if resp.status >= 400:
            raise ApiError(method, path, resp.status, decoded)
        return decoded

    def get(self, path: str, **query: Any) -> JsonDict:
        return self.request("GET", path, query=query or None)

    def create(self, path: str, body: JsonDict, timeout: float = 30.0) -> JsonDict:
        return self.request("POST", path, body, timeout=timeout)

    def patch(self, path: str, body: JsonDict, content_type: str = STRATEGIC_MERGE, timeout: float = 30.0) -> JsonDict:
        return self.request("PATCH", path, body, content_type=content_type, timeout=timeout)

    def delete(self, path: str, body: JsonDict | None = None) -> JsonDict:
        return self.request("DELETE", path, body)

    def watch(self, path: str, resource_version: str, timeout_seconds: int = 300) -> Iterator[JsonDict]:
        """Yield watch events (`{"type": ..., "object": {...}}`) from `resource_version` on.

        The generator ends when the server closes the stream (after `timeout_seconds`) or
        when `close()` is called from another thread. A stream silent for 15 s longer than
        `timeout_seconds` (a server gone without closing the connection) raises
        `urllib3.exceptions.ReadTimeoutError` rather than hanging.

        Raises:
            ApiError: the watch could not be opened (410 when `resource_version` is too old).
        """
        query = {
            "watch": "true",
            "resourceVersion": resource_version,
            "allowWatchBookmarks": "true",
            "timeoutSeconds": str(timeout_seconds),
        }
        url = f"{self.host}{path}?{urlencode(query)}"
        resp = self._pool.request(
            "GET",
            url,
            headers=self._headers,
            preload_content=False,
            timeout=urllib3.Timeout(connect=10.0, read=timeout_seconds + 15.0),
        )
        if resp.status >= 400:
            data = resp.read()
            resp.release_conn()
            try:
                decoded = json.loads(data)
            except ValueError:
                decoded = data.decode(errors="replace")
            raise ApiError("WATCH", path, resp.status, decoded)
        with self._lock:
            if self._closed:
                resp.shutdown()
            self._open_watches.add(resp)
        try:
            buffer = b""
            for chunk in resp.stream(65536):
                buffer += chunk
                while b"\n" in buffer:
                    line, buffer = buffer.split(b"\n", 1)
                    if line.strip():
                        yield json.loads(line)
        finally:
            with self._lock:
                self._open_watches.discard(resp)
            resp.release_conn()

    def cut_watches(self) -> None:
        """Drop the connection of every open watch, as a network failure would."""
        with self._lock:
            watches = list(self._open_watches)
        for resp in watches:
            resp.shutdown()

    def close(self) -> None:
        """Cut off every open watch and refuse new ones; other requests still work."""
        with self._lock:
            self._closed = True
        self.cut_watches()
