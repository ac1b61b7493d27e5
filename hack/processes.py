"""Small process helpers shared by the local control plane, MinIO and the node agent.

Why a module of its own: every server we start for tests must bind to 127.0.0.1 on a free
port, log to a file a failing test can show, and die with the process that started it —
even when pytest is killed — so that a red run never leaves servers behind.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")

_PR_SET_PDEATHSIG = 1


def free_port(host: str = "127.0.0.1") -> int:
    """A port that was free a moment ago on ``host`` (the caller binds it soon after)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


# Resolved once in the parent: loading a library between fork and exec, with other threads
# about, can deadlock on the dynamic loader's lock.
_PRCTL = ctypes.CDLL(None, use_errno=True).prctl


def die_with_starting_thread() -> None:
    """A ``preexec_fn``: SIGKILL the child when the thread that started it exits.

    Linux ties the death signal to the forking *thread*, so start such children from a thread
    that outlives them (the main thread, or a worker that kills them before it ends); then
    they also die when our whole process is killed, teardown or not.
    """
    _PRCTL(_PR_SET_PDEATHSIG, signal.SIGKILL)


def _die_with_parent() -> None:
    """Runs in the child before exec: SIGKILL it when the parent thread exits; own session."""
    die_with_starting_thread()
    os.setsid()


def start_server(argv: Sequence[str], log_path: Path, env: dict[str, str] | None = None,
                 cwd: Path | None = None) -> subprocess.Popen[bytes]:
    """Start a long-running server that logs to ``log_path`` and dies with us."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log = open(log_path, "ab")  # noqa: SIM115 - handed to the child, closed in stop_server
    try:
        return subprocess.Popen(
            list(argv), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env=env, cwd=cwd, preexec_fn=_die_with_parent,
        )
    finally:
        log.close()


def stop_server(proc: subprocess.Popen[bytes] | None, timeout: float = 10.0) -> None:
    """SIGTERM the server's process group, then SIGKILL it if it lingers."""
    if proc is None or proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=timeout)


class StartupError(RuntimeError):
    """A server did not become ready; the message carries the tail of its log."""


def log_tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except FileNotFoundError:
        return "(no log)"


def poll(check: Callable[[], T], *, timeout: float, what: str, interval: float = 0.1,
         retry_errors: bool = False, error: type[Exception] = AssertionError) -> T:
    """Call ``check`` until it returns something truthy, and return that.

    The one polling loop of the test harness (awaiting a condition, never sleeping a guess).

    Args:
        retry_errors: an exception from ``check`` means "not yet" (a server still starting);
            the last one is named in the failure. Otherwise it propagates at once.
        error: raised at the deadline, naming ``what`` and the last value or exception.
    """
    deadline = time.monotonic() + timeout
    last: Any = None
    while True:
        try:
            value = check()
        except Exception as exc:
            if not retry_errors:
                raise
            last = exc
        else:
            if value:
                return value
            last = value
        if time.monotonic() > deadline:
            raise error(f"timed out after {timeout:g}s waiting for {what} (last: {last!r})")
        time.sleep(interval)


def wait_until(check: Callable[[], bool], *, timeout: float, what: str,
               proc: subprocess.Popen[bytes] | None = None, log_path: Path | None = None,
               interval: float = 0.1) -> None:
    """Poll ``check`` until it is true; fail early if ``proc`` exits.

    Raises:
        StartupError: on timeout or when the watched process died, with its log tail.
    """
    deadline = time.monotonic() + timeout
    while True:
        try:
            if check():
                return
        except Exception:
            pass
        if proc is not None and proc.poll() is not None:
            tail = log_tail(log_path) if log_path else ""
            raise StartupError(f"{what}: process exited with code {proc.returncode}\n{tail}")
        if time.monotonic() > deadline:
            tail = log_tail(log_path) if log_path else ""
            raise StartupError(f"{what}: not ready after {timeout:.0f}s\n{tail}")
        time.sleep(interval)


def descendants(pid: int) -> set[int]:
    """``pid`` and every process below it, read from /proc (children files)."""
    found = {pid}
    queue = [pid]
    while queue:
        current = queue.pop()
        try:
            tasks = os.listdir(f"/proc/{current}/task")
        except FileNotFoundError:
            continue
        for task in tasks:
            try:
                children = Path(f"/proc/{current}/task/{task}/children").read_text().split()
            except FileNotFoundError:
                continue
            for child in map(int, children):
                if child not in found:
                    found.add(child)
                    queue.append(child)
    return found


def listening_addresses(pids: set[int]) -> set[tuple[str, int]]:
    """TCP (v4 and v6) addresses on which any of ``pids`` listens, from /proc.

    Why: tests prove that nothing we start is reachable from another machine.
    """
    inodes: set[str] = set()
    for pid in pids:
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except (FileNotFoundError, PermissionError):
            continue
        for fd in fds:
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    addresses: set[tuple[str, int]] = set()
    for table, family in (("/proc/net/tcp", 4), ("/proc/net/tcp6", 6)):
        try:
            rows = Path(table).read_text().splitlines()[1:]
        except FileNotFoundError:
            continue
        for row in rows:
            fields = row.split()
            local, state, inode = fields[1], fields[3], fields[9]
            if state == "0A" and inode in inodes:  # 0A = LISTEN
                addresses.add(_decode_address(local, family))
    return addresses


def _decode_address(hex_address: str, family: int) -> tuple[str, int]:
    host_hex, port_hex = hex_address.split(":")
    raw = bytes.fromhex(host_hex)
    if family == 4:
        host = socket.inet_ntop(socket.AF_INET, raw[::-1])
    else:
        # /proc prints IPv6 as four little-endian 32-bit words.
        words = b"".join(raw[i:i + 4][::-1] for i in range(0, 16, 4))
        host = socket.inet_ntop(socket.AF_INET6, words)
    return host, int(port_hex, 16)
