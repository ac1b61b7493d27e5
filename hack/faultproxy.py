"""A loopback TCP proxy that injects network faults between a client and a server.

Fault tests put it between the code under test and a real server (MinIO, the API server):

* ``hold(pattern)``: an HTTP request whose head contains ``pattern`` (e.g. one rank's object
  key) is not forwarded until :meth:`release` — a save that hangs part-way, deterministically,
  with everything else flowing. :attr:`held` is set once such a request is waiting.
* ``blackhole()``: connections are accepted and bytes read, but nothing is forwarded or
  answered — a port that accepts and never answers (a dead endpoint behind a load balancer).

Only loopback: it listens on 127.0.0.1 and forwards to a loopback upstream. Threads are
daemons and :meth:`close` ends them; it stops with the test.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from types import TracebackType

_HEAD_END = b"\r\n\r\n"


def _content_length(head: bytes) -> int:
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return int(value.strip() or 0)
    return 0


class FaultProxy:
    """Forwards 127.0.0.1:``port`` to ``upstream``, with faults switched on and off by the test."""

    def __init__(self, upstream_host: str, upstream_port: int) -> None:
        self.upstream = (upstream_host, upstream_port)
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self.held = threading.Event()
        """Set once a request matching the hold pattern is being kept back."""
        self._pattern: bytes | None = None
        self._released = threading.Event()
        self._blackhole = threading.Event()
        self._closed = threading.Event()
        self._sockets: list[socket.socket] = []
        self.accepted = 0
        """Connections accepted so far (a test can await its client's attempts)."""
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, name="faultproxy-accept", daemon=True).start()

    @property
    def url(self) -> str:
        """``http://127.0.0.1:<port>``: what the client uses as its endpoint."""
        return f"http://127.0.0.1:{self.port}"

    def hold(self, pattern: bytes) -> None:
        """Keep back every request whose head contains ``pattern`` until :meth:`release`."""
        self._released.clear()
        self.held.clear()
        self._pattern = pattern

    def release(self) -> None:
        """Let held requests go on and stop holding."""
        self._pattern = None
        self._released.set()

    def blackhole(self, on: bool = True) -> None:
        """Accept and read, never forward nor answer (new and open connections alike)."""
        if on:
            self._blackhole.set()
        else:
            self._blackhole.clear()

    def close(self) -> None:
        """Stop listening and drop every connection."""
        self._closed.set()
        self._released.set()
        with contextlib.suppress(OSError):
            self._listener.close()
        with self._lock:
            for sock in self._sockets:
                with contextlib.suppress(OSError):
                    sock.close()

    def __enter__(self) -> FaultProxy:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def _track(self, sock: socket.socket) -> socket.socket:
        """Note ``sock`` for :meth:`close`; one made while :meth:`close` runs or after it is closed
        at once (raises OSError), or it would outlive the proxy (a ResourceWarning in the test)."""
        with self._lock:
            if self._closed.is_set():
                sock.close()
                raise OSError("the fault proxy is closed")
            self._sockets.append(sock)
        return sock

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                client, _ = self._listener.accept()
                self._track(client)
            except OSError:
                return
            with self._lock:
                self.accepted += 1
            threading.Thread(target=self._serve, args=(client,), name="faultproxy-conn", daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        if self._blackhole.is_set():
            self._swallow(client)
            return
        try:
            upstream = self._track(socket.create_connection(self.upstream))
        except OSError:
            client.close()
            return
        threading.Thread(target=self._pipe, args=(upstream, client), name="faultproxy-down", daemon=True).start()
        self._requests(client, upstream)

    def _swallow(self, client: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while client.recv(65536):
                pass

    def _pipe(self, source: socket.socket, sink: socket.socket) -> None:
        """Bytes from ``source`` to ``sink`` until either end closes (or a blackhole starts)."""
        with contextlib.suppress(OSError):
            while data := source.recv(65536):
                if self._blackhole.is_set():
                    continue
                sink.sendall(data)
        with contextlib.suppress(OSError):
            sink.shutdown(socket.SHUT_WR)

    def _requests(self, client: socket.socket, upstream: socket.socket) -> None:
        """Forward requests one by one, holding back those that match the pattern."""
        buffer = b""
        with contextlib.suppress(OSError):
            while True:
                while _HEAD_END not in buffer:
                    data = client.recv(65536)
                    if not data:
                        upstream.shutdown(socket.SHUT_WR)
                        return
                    buffer += data
                end = buffer.index(_HEAD_END) + len(_HEAD_END)
                head, buffer = buffer[:end], buffer[end:]
                pattern = self._pattern
                if pattern is not None and pattern in head:
                    self.held.set()
                    self._released.wait()
                    if self._closed.is_set():
                        return
                if self._blackhole.is_set():
                    self._swallow(client)
                    return
                if b"transfer-encoding: chunked" in head.lower():
                    raise ValueError("faultproxy forwards Content-Length bodies only, got a chunked request")
                upstream.sendall(head)
                remaining = _content_length(head)
                while remaining > 0:
                    if not buffer:
                        buffer = client.recv(min(remaining, 1 << 20))
                        if not buffer:
                            return
                    piece, buffer = buffer[:remaining], buffer[remaining:]
                    upstream.sendall(piece)
                    remaining -= len(piece)
