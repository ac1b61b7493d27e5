"""The few collectives the runtime needs, and their single-process fallbacks.

Every function works without ``torch.distributed`` initialised (one process, or ranks that
do not talk): rank and world size then come from ``RANK``/``WORLD_SIZE``, reductions are the
identity and barriers return at once.
"""

from __future__ import annotations

import atexit
import gc
import os
import secrets
import socket
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from datetime import timedelta
from typing import TypeVar

import torch
import torch.distributed as dist

from torpor import env as runtime_env

T = TypeVar("T")


def is_initialized() -> bool:
    """Whether a default process group exists."""
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    """The global rank: the process group's, else ``RANK``, else 0."""
    return dist.get_rank() if is_initialized() else int(os.environ.get("RANK", "0") or 0)


def world_size() -> int:
    """The world size: the process group's, else ``WORLD_SIZE``, else 1."""
    return dist.get_world_size() if is_initialized() else int(os.environ.get("WORLD_SIZE", "1") or 1)


def _device() -> torch.device:
    # NCCL reduces only CUDA tensors; gloo and the rest reduce CPU tensors.
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def max_over_ranks(value: int) -> int:
    """All-reduce MAX of one int: how "any rank asked" becomes "every rank knows".

    Must be called by every rank at the same point (the callers call it at the same global
    step on every rank).
    """
    if not is_initialized() or dist.get_world_size() == 1:
        return value
    t = torch.tensor([value], dtype=torch.int64, device=_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def max_each(values: Sequence[int]) -> list[int]:
    """Element-wise all-reduce MAX of a few ints in **one** collective.

    How several per-rank facts (stop requested, data exhausted, a save failed, ...) become
    facts every rank knows at the same point without one collective per fact.
    """
    if not is_initialized() or dist.get_world_size() == 1:
        return [int(v) for v in values]
    t = torch.tensor([int(v) for v in values], dtype=torch.int64, device=_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return [int(v) for v in t.tolist()]


class LateMax:
    """An element-wise all-reduce MAX started at one check and read at the next.

    Why: a blocking all-reduce at a step boundary waits until every rank gets there — a host
    sync of 0.1–2 ms per step that the framework integrations would add to every step (the
    per-step sync Lightning users complain about, #21487). Started with ``async_op`` and read
    one check later, it runs beside that step's compute. Every rank still reads the same
    result at the same step, so the ranks still act at one step: one check after the request.

    At most one reduction is in flight. Every rank must call :meth:`start` and :meth:`take`
    at the same checks (the callers make them at the same global steps); a reduction still in
    flight at the end is waited for by :meth:`take` (every rank started it, so it completes).
    """

    def __init__(self) -> None:
        self._pending: tuple[dist.Work, torch.Tensor] | None = None
        self._group: dist.ProcessGroup | None = None

    def start(self, values: Sequence[int]) -> None:
        """Start reducing ``values`` (one process: nothing to start, :meth:`take` gives them back)."""
        if self._pending is not None:
            raise RuntimeError("LateMax.start: the previous reduction was not taken")
        t = torch.tensor([int(v) for v in values], dtype=torch.int64)
        work = None
        if is_initialized() and dist.get_world_size() > 1:
            if self._group is None:
                # A gloo group of its own (made by every rank at the same first check): the flags
                # stay on the CPU (no CUDA sync under NCCL), and the reduction is not queued behind
                # the training's own collectives on the default group, nor they behind it.
                self._group = dist.new_group(backend="gloo")
            work = dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self._group, async_op=True)
        self._pending = (work, t)  # type: ignore[assignment]

    def take(self) -> list[int] | None:
        """The reduction started last, waited for; ``None`` when none is in flight."""
        if self._pending is None:
            return None
        work, t = self._pending
        self._pending = None
        if work is not None:
            work.wait()
        return [int(v) for v in t.tolist()]


def all_ok(ok: bool) -> bool:
    """Whether ``ok`` holds on every rank: the barrier that also carries the outcome.

    A bare barrier after a save leaves the other ranks waiting forever when one rank's save
    raised before reaching it; with this every rank reaches the same point either way and
    learns whether all of them succeeded, so they all act the same.
    """
    return max_each([0 if ok else 1])[0] == 0


def failed_ranks(ok: bool) -> list[int]:
    """The ranks where ``ok`` is false, known on every rank: :func:`all_ok` that names them.

    One all-reduce of a world-sized vector (each rank sets its own slot), so an error message
    on every rank can say which rank's save failed.
    """
    if not is_initialized() or dist.get_world_size() == 1:
        return [] if ok else [rank()]
    flags = [0] * dist.get_world_size()
    flags[dist.get_rank()] = 0 if ok else 1
    return [r for r, flag in enumerate(max_each(flags)) if flag]


def broadcast_object(obj: T, src: int = 0) -> T:
    """``obj`` as rank ``src`` has it, on every rank (identity in one process).

    For decisions one rank makes for all (which checkpoint to load), so that ranks never
    resolve them independently and disagree.
    """
    if not is_initialized() or dist.get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def barrier() -> None:
    """Wait for every rank (no-op in one process)."""
    if is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def agreed_token(preferred: str = "") -> str:
    """A token every rank shares: ``preferred`` if given, else rank 0's random one.

    Used as the run identity in ``save_id``, so manifests of one save agree across ranks
    and differ from another run's save with the same name and step.
    """
    if preferred:
        return preferred
    token = [secrets.token_hex(6)]
    if is_initialized() and dist.get_world_size() > 1:
        dist.broadcast_object_list(token, src=0)
    return str(token[0])


def init_distributed(backend: str | None = None, timeout_seconds: float = 1800.0) -> bool:
    """Start the default process group from the torch variables when ``WORLD_SIZE > 1``.

    So one script runs alone (nothing set: returns False), under ``torchrun`` and under the
    operator (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT`` set) unchanged.

    Args:
        backend: ``gloo``/``nccl``; default nccl when CUDA is available, else gloo.
        timeout_seconds: collective timeout.

    Returns:
        Whether a process group is initialised.
    """
    if is_initialized():
        return True
    if int(os.environ.get("WORLD_SIZE", "1") or 1) <= 1:
        return False
    cuda = torch.cuda.is_available()
    if cuda:  # before the group: NCCL binds each rank to the current device
        torch.cuda.set_device(local_cuda_device(os.environ, torch.cuda.device_count()))
    chosen = backend or ("nccl" if cuda else "gloo")
    timeout = timedelta(seconds=timeout_seconds)
    store = _rendezvous_store(timeout)
    dist.init_process_group(backend=chosen, store=store, rank=int(os.environ["RANK"]),
                            world_size=int(os.environ["WORLD_SIZE"]), timeout=timeout)
    tear_down_at_exit()
    return True


def local_cuda_device(environ: Mapping[str, str], device_count: int) -> int:
    """The GPU of this process: ``LOCAL_RANK`` (0 when unset), as torchrun and ``torpor.run`` number
    a pod's processes. Without it every process of a pod would run on GPU 0.

    Raises:
        ValueError: ``LOCAL_RANK`` is not an integer, or names no device (with the count): one
            process per GPU, so ``procsPerPod`` must not exceed the GPUs the pod asked for.
    """
    local = runtime_env._int(environ, "LOCAL_RANK", 0, minimum=-sys.maxsize)  # the range: against the devices
    if not 0 <= local < device_count:
        raise ValueError(f"LOCAL_RANK={local} names no CUDA device: this process sees {device_count} "
                         f"(one process per GPU: at most as many processes per pod as GPUs)")
    return local


def _rendezvous_store(timeout: timedelta) -> dist.TCPStore:
    """The TCPStore of ``MASTER_ADDR:MASTER_PORT``, whose server listens only on that address.

    Why not ``init_method="env://"``: its store server listens on every interface (``::``),
    which exposes the rendezvous beyond the pod's address and, where pods share a network
    (our local node agent gives each pod its own loopback address), makes two jobs' rank 0
    collide on the port. Rank 0 binds the address ``MASTER_ADDR`` resolves to and hands the
    socket to the store; if that address is not local, it falls back to torch's default.
    """
    addr, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
    world = int(os.environ["WORLD_SIZE"])
    is_master = int(os.environ["RANK"]) == 0
    listener = _bind_listener(addr, port) if is_master else None
    # The store takes over the descriptor (it does not duplicate it), so the socket object
    # must neither be closed nor garbage-collected: detach it.
    fd = listener.detach() if listener is not None else None
    return dist.TCPStore(addr, port, world, is_master, timeout=timeout, wait_for_workers=False,
                         master_listen_fd=fd)


def _bind_listener(addr: str, port: int) -> socket.socket | None:
    try:
        family, _, _, _, sockaddr = socket.getaddrinfo(addr, port, type=socket.SOCK_STREAM)[0]
        listener = socket.socket(family, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(sockaddr)
        listener.listen(128)
    except OSError:
        return None
    return listener


def shutdown() -> None:
    """Destroy the process group before exiting, so no rank leaves a half-torn-down group."""
    if is_initialized():
        dist.destroy_process_group()


_TEAR_DOWN_REGISTERED = False
FOREIGN_THREADS_WAIT_SECONDS = 30.0
"""How long the exit waits for Python code on threads a process group started (callbacks)."""


def tear_down_at_exit() -> None:
    """Have the process groups end while the interpreter is still whole (once per process).

    Why: a process group's worker threads outlive the Python objects that use them. A
    thread that finishes a collective after the main thread has left the script (a
    completion callback such as a Python DDP communication hook's ``then``, or the last
    reference to a tensor whose Python object it keeps alive) needs the interpreter; once
    interpreter finalization has begun, such a thread is unwound through C++ frames that
    may not throw and the process aborts ("terminate called without an active exception",
    SIGABRT) whatever the script's own exit code was, and the operator counts a crash.

    Registered first (by :func:`init_distributed`, and by a run that finds a group the
    script made itself), the handler runs after the script's own ``atexit`` handlers: it
    destroys the group and collects garbage, so that groups only unreachable objects still
    held (a sharded model's device mesh) are destructed now, which waits for their worker
    threads with the interpreter released; then it waits, with a bound, while a thread the
    ``threading`` module did not start (a process group's) still runs Python code.
    """
    global _TEAR_DOWN_REGISTERED
    if not _TEAR_DOWN_REGISTERED:
        _TEAR_DOWN_REGISTERED = True
        atexit.register(_tear_down)


def _tear_down() -> None:
    shutdown()
    gc.collect()
    deadline = time.monotonic() + FOREIGN_THREADS_WAIT_SECONDS
    while foreign_threads_in_python() and time.monotonic() < deadline:
        time.sleep(0.01)  # releases the interpreter, so the callbacks can finish


def foreign_threads_in_python() -> set[int]:
    """Threads running Python code that ``threading`` did not start (native threads' callbacks)."""
    known = {t.ident for t in threading.enumerate() if not isinstance(t, threading._DummyThread)}
    return set(sys._current_frames()) - known
