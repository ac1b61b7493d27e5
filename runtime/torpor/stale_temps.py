"""Temp files of local saves: who wrote them, and when one a killed save left behind may go.

A local save writes ``.{file}.tmp-{owner}-{pid}-{random}`` beside its target and renames it
when complete. A save killed part-way (grace period over, SIGKILL, node gone) leaves that file:
hidden from listings, never resumed from, but as large as a shard, and a job preempted every
few hours would fill its volume with them. The next save into the same rank directory removes
the ones no live writer owns:

==========================================  ===============================================
temp file                                   removed when
==========================================  ===============================================
open in this process                        never (a save in flight: async and exit saves)
written on this host, pid namespace (same   its pid is not alive, or is this process's own
``owner``)                                  (a pid reused after the writer died)
another owner, or no owner in the name      last modified more than ``STALE_SECONDS`` ago
(another node on a shared volume, a         (a live writer touches its file with every
restarted pod, an older torpor)             write; one silent that long is gone)
==========================================  ===============================================

Torch-free (the operator may import :mod:`torpor.storage`).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import re
import socket
import threading
import time
import uuid
from pathlib import Path

STALE_SECONDS = 3600.0
"""Age after which a temp file of an unknown owner is taken for abandoned (seconds)."""

_NAME = re.compile(r"^\..+\.tmp-(?:(?P<owner>[0-9a-f]{8})-(?P<pid>[0-9]+)-)?[0-9a-f]{8}$")
_open: set[str] = set()
_lock = threading.Lock()


@functools.cache
def owner_tag() -> str:
    """8 hex digits naming this host and pid namespace: where a pid means the same process."""
    try:
        namespace = str(os.stat("/proc/self/ns/pid").st_ino)
    except OSError:
        namespace = ""
    return hashlib.sha256(f"{socket.gethostname()}/{namespace}".encode()).hexdigest()[:8]


def temp_path(target: Path) -> Path:
    """A fresh temp name beside ``target``, marked with this process as its writer."""
    return target.parent / f".{target.name}.tmp-{owner_tag()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def opened(path: Path) -> None:
    """Record ``path`` as written by this process (never removed as stale while recorded)."""
    with _lock:
        _open.add(str(path))


def closed(path: Path) -> None:
    """``path`` was renamed or removed by its writer."""
    with _lock:
        _open.discard(str(path))


def is_stale(name: str, age: float, *, owner: str, pid: int, alive: bool | None) -> bool:
    """Whether a temp file named ``name``, last modified ``age`` seconds ago, is abandoned.

    Args:
        owner: this process's :func:`owner_tag`.
        pid: this process's pid.
        alive: whether the pid in ``name`` is a live process here (``None``: not asked).

    The caller has excluded the files this process has open (see the table above).
    """
    m = _NAME.match(name)
    if m is None:
        return False  # not one of ours: leave it
    if m.group("owner") == owner:
        return int(m.group("pid")) == pid or alive is False
    return age > STALE_SECONDS


def pid_of(name: str) -> int | None:
    """The writer's pid in a temp file name, if it has one."""
    m = _NAME.match(name)
    return int(m.group("pid")) if m is not None and m.group("pid") else None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return True


def remove_stale(directory: Path) -> list[str]:
    """Remove the abandoned temp files in ``directory``; returns their names.

    Called by every local write into a directory, before it creates its own temp file.
    Best effort: a file another sweeper removed first, or one that cannot be removed, is
    left to the next save.
    """
    removed = []
    now = time.time()
    owner, me = owner_tag(), os.getpid()
    try:
        entries = list(os.scandir(directory))
    except OSError:
        return removed
    for entry in entries:
        if not entry.name.startswith(".") or ".tmp-" not in entry.name:
            continue
        with _lock:
            if entry.path in _open:
                continue
        pid = pid_of(entry.name)
        try:
            age = now - entry.stat(follow_symlinks=False).st_mtime
        except OSError:
            continue
        if is_stale(entry.name, age, owner=owner, pid=me, alive=_alive(pid) if pid is not None else None):
            with contextlib.suppress(OSError):
                os.unlink(entry.path)
                removed.append(entry.name)
    return removed
