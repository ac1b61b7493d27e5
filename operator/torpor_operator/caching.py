"""What a reconcile reads without a round trip: each job's body and its non-pod children.

A node cordoned under a running job used to cost the job's reconcile a GET of the job and three
LISTs of its children (Services, ConfigMaps, PodDisruptionBudgets) before it could write the
GracefulExit flag — one round trip to the API server on the path whose latency the users see.
The pods come from the pod watch (:mod:`torpor_operator.indexing`); these two caches do the
same for the rest, with guards of their own:

- :class:`JobCache` keeps the newest body of each job that the job watch showed or the
  operator's own status patch returned (newest by resourceVersion, an etcd revision: a watch
  event that arrives after the patch's answer never takes the cache back). Only the job
  watch adds a job; a deleted job leaves with its deletion event.
- :class:`ChildIndex` keeps what the last LIST of a job's children showed, and only until the
  operator writes any child of that job (a create, a delete, the GracefulExit patch): the
  reconcile after a write LISTs again, as every reconcile did before. Nothing but the operator
  writes a job's children on its own; a child someone else deletes or edits is seen at the
  next LIST: after ``resync_seconds``, after an API error, in a retention pass, or after the
  operator's next write.

What the caches may serve is limited where a stale answer would cost something: the shell
(:meth:`~torpor_operator.handlers.Shell._reconcile`) decides from them only decisions that
create nothing. A decision that would create a pod or a child — a launch, a restart — is
made again from a GET and a LIST, so a job the watch never reported deleted (kopf's listing
after a watch gap tells no deletions) cannot make its pods again and again from a ghost: the
GET finds it gone. A stop, a status change, an Event are written from the caches: the ones the
users wait for.

Pure bookkeeping, no I/O (the clock is read where a caller passes no ``now``); one instance of
each per operator process.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from typing import Any

from torpor_operator.watching import resource_version as _version

__all__ = ["ChildIndex", "JobCache"]

Key = tuple[str, str]


def _uid(obj: Mapping[str, Any]) -> str | None:
    return (obj.get("metadata") or {}).get("uid")


def _without_managed_fields(obj: Mapping[str, Any]) -> dict[str, Any]:
    """A shallow copy without ``metadata.managedFields``: the server-side-apply bookkeeping is
    most of a small object's bytes and no decision reads it."""
    meta = obj.get("metadata") or {}
    return {**obj, "metadata": {k: v for k, v in meta.items() if k != "managedFields"}}


class JobCache:
    """The newest body of each TrainingJob, from its watch events and the operator's own writes."""

    def __init__(self) -> None:
        self._bodies: dict[Key, dict[str, Any]] = {}
        self._suspect: set[Key] = set()
        """Jobs whose held body is answered by a GET until a newer one comes (:meth:`suspect`)."""

    def watched(self, key: Key, body: Mapping[str, Any], *, listed: bool = False) -> None:
        """A watch event (added, modified, listed) of the job; one older than the body held is
        ignored. A listed one (kopf's listing: at start-up, after a watch gap, on resuming) is
        held suspect: a reconcile may have written the job since the listing was read, before the
        cache held it and could keep that write's answer."""
        self._put(key, body)
        if listed:
            self.suspect(key)

    def answered(self, key: Key, body: Mapping[str, Any] | None) -> None:
        """The API's answer to a read or a write of the job (``None``: the job was gone). Only for
        a job the watch has shown and not yet deleted, and of the same uid: a late answer never
        brings a deleted job back, nor replaces a new job of the name by the old one."""
        held = self._bodies.get(key)
        if body is None or held is None:
            return
        if _uid(held) != _uid(body):
            return
        self._put(key, body)

    def _put(self, key: Key, body: Mapping[str, Any]) -> None:
        held = self._bodies.get(key)
        if held is not None:
            old, new = _version(held), _version(body)
            if _uid(held) == _uid(body) and old is not None and new is not None and new < old:
                return
        self._bodies[key] = _without_managed_fields(body)
        self._suspect.discard(key)

    def get(self, key: Key) -> dict[str, Any] | None:
        """The job's body as last seen, or ``None`` when the watch has not shown it or it is
        suspect (then GET it)."""
        return None if key in self._suspect else self._bodies.get(key)

    def suspect(self, key: Key) -> None:
        """The held body may be older than the job (kopf lists again, say on resuming a paused
        replica, and the job's own listing may come after its pods'): the next read GETs it."""
        if key in self._bodies:
            self._suspect.add(key)

    def drop(self, key: Key) -> None:
        """The job is deleted."""
        self._bodies.pop(key, None)
        self._suspect.discard(key)

    def clear(self) -> None:
        """Every held body is suspect (a replica that was paused: its watch saw nothing meanwhile)."""
        self._suspect.update(self._bodies)

    def __len__(self) -> int:
        return len(self._bodies)


class ChildIndex:
    """The Services, ConfigMaps and PodDisruptionBudgets of each job, as its last LIST showed them."""

    def __init__(self, resync_seconds: float = 300.0) -> None:
        """``resync_seconds``: the longest a job's children are answered without a LIST."""
        self.resync_seconds = resync_seconds
        self._children: dict[Key, tuple[float, list[dict[str, Any]]]] = {}
        """(namespace, job) -> (``time.monotonic()`` of the LIST, its items)."""
        self._epoch = 0
        """Counts invalidations: a LIST begun before one (of any job) is not kept."""

    def token(self) -> int:
        """Taken as a LIST begins, handed to :meth:`listed` with its answer."""
        return self._epoch

    def listed(self, key: Key, items: Iterable[Mapping[str, Any]], token: int | None = None,
               now: float | None = None) -> None:
        """The answer of a LIST of the job's children, begun after the operator's last write of
        them; dropped when an invalidation came while it ran (``token``: :meth:`token` at its start)."""
        if token is not None and token != self._epoch:
            return
        now = time.monotonic() if now is None else now
        self._children[key] = (now, [_without_managed_fields(i) for i in items])

    def children(self, key: Key, now: float | None = None) -> list[dict[str, Any]] | None:
        """The job's children, or ``None`` when the index cannot answer (never listed, written
        since, or listed ``resync_seconds`` ago or more): then LIST them."""
        held = self._children.get(key)
        if held is None:
            return None
        now = time.monotonic() if now is None else now
        if now - held[0] >= self.resync_seconds:
            return None
        return list(held[1])

    def invalidate(self, key: Key) -> None:
        """The operator wrote (or may have written) a child of the job, or the job is gone."""
        self._epoch += 1
        self._children.pop(key, None)

    def clear(self) -> None:
        """Forget every job's children."""
        self._epoch += 1
        self._children.clear()

    def __len__(self) -> int:
        return len(self._children)
