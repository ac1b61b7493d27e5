"""A fork server for the runtime tier's rank processes: torch imported once, every rank forked.

Each rank of a runtime test is a real process of its own (its own pid, signals, sockets, gloo
process group, exit status); what it skips is the interpreter start-up and ``import torch``
with ``torch._dynamo`` (which the first optimizer imports): about 4.5 s of CPU per rank, most
of the tier's CPU on a 2-core machine. Forking a torch-imported parent is what a DataLoader's
workers do by default. torpor itself is *not* imported here: every rank imports it after the
fork, with its own environment, as a fresh interpreter would.

Protocol, over a Unix socket (one connection per rank): the client sends one JSON line
``{"argv": [script, *args], "env": {...}, "cwd": ..., "log": path}``; the server answers
``{"pid": n}`` once the rank is forked and ``{"status": s}`` (a wait status) once it has been
reaped, then closes the connection. The server is single-threaded (a fork copies only the
calling thread): it reaps on SIGCHLD through a self-pipe.

    python tests/runtime/rank_forkserver.py SOCKET_PATH
"""

from __future__ import annotations

import contextlib
import json
import os
import selectors
import signal
import socket
import sys
import traceback


def _preload() -> None:
    import numpy  # noqa: F401
    import torch
    import torch._dynamo  # torch.optim's first optimizer imports it
    import torch.distributed
    import torch.utils.data

    del torch


def _run_rank(request: dict, close: set[int]) -> None:
    """In the forked child: become the rank, run its script as ``__main__``, exit as Python would."""
    signal.set_wakeup_fd(-1)
    for fd in close:
        with contextlib.suppress(OSError):
            os.close(fd)
    for sig in (signal.SIGCHLD, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    log = os.open(request["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.dup2(log, 1)
    os.dup2(log, 2)
    os.close(log)
    os.close(null)
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    script = os.path.abspath(request["argv"][0])
    sys.argv = [script, *request["argv"][1:]]
    # sys.path as a fresh interpreter would build it: the script's directory, then PYTHONPATH
    extra = [p for p in request["env"].get("PYTHONPATH", "").split(os.pathsep) if p]
    sys.path[:] = [os.path.dirname(script), *extra, *(p for p in sys.path[1:] if p not in extra)]
    code = 0
    try:
        import runpy

        runpy.run_path(script, run_name="__main__")
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        if exc.code is not None and not isinstance(exc.code, int):
            print(exc.code, file=sys.stderr)
    except BaseException:
        traceback.print_exc()
        code = 1
    # what Py_FinalizeEx does before it exits: wait for non-daemon threads, run atexit
    try:
        import threading

        threading._shutdown()  # type: ignore[attr-defined]
        import atexit

        atexit._run_exitfuncs()
    finally:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        os._exit(code)


def serve(path: str) -> None:
    _preload()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(64)
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)  # the wake-up fd gets the byte
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    selector = selectors.DefaultSelector()
    selector.register(listener, selectors.EVENT_READ, "accept")
    selector.register(wake_r, selectors.EVENT_READ, "reap")
    ranks: dict[int, socket.socket] = {}
    print("ready", flush=True)
    while True:
        for key, _ in selector.select():
            if key.data == "accept":
                conn, _ = listener.accept()
                with conn.makefile("rb") as lines:
                    request = json.loads(lines.readline())
                pid = os.fork()
                if pid == 0:
                    _run_rank(request, {listener.fileno(), wake_r, wake_w, selector.fileno(), conn.fileno(),
                                        *(c.fileno() for c in ranks.values())})
                ranks[pid] = conn
                with contextlib.suppress(OSError):
                    conn.sendall(json.dumps({"pid": pid}).encode() + b"\n")
            else:
                with contextlib.suppress(BlockingIOError):
                    os.read(wake_r, 4096)
            while ranks:
                try:
                    pid, status = os.waitpid(-1, os.WNOHANG)
                except ChildProcessError:
                    break
                if pid == 0:
                    break
                conn = ranks.pop(pid, None)
                if conn is not None:
                    with contextlib.suppress(OSError):
                        conn.sendall(json.dumps({"status": status}).encode() + b"\n")
                    conn.close()


if __name__ == "__main__":
    serve(sys.argv[1])
