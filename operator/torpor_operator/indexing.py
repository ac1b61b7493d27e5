"""The pods of each job, kept from the pod watch so that a reconcile reads them without a LIST.

An informer's index with the three guards a level-triggered controller needs when it reads its
own writes through a watch:

- **Synced per job.** A job's pods are answered from the index only after one LIST of them
  (:meth:`PodIndex.seed`) in this process: at start-up kopf may hand a job's event to the shell
  before the pod watch's first listing has reached it, and an index that lacks a pod would
  read as a rank that vanished.
- **Expectations.** The pods a decision creates are expected until the watch shows them (or a
  LIST shows they were never made): a decision read from an index that lacks a pod the
  operator just made would make it again or count it lost. While one is expected, the shell
  LISTs instead.
- **Own deletions.** A pod the operator deleted is marked deleting in the index when the DELETE
  returns, before the watch shows it: a reconcile in between would otherwise delete it again and
  tell it again. A deletion is never undone, so an older event of the same pod that arrives later
  keeps the mark.
- **Ghosts.** A watch that reconnects with a new listing tells nobody of a pod deleted in the
  gap. Every LIST of a job drops the index's pods of that job that the LIST lacks, unless the
  index's copy is newer than the LIST (its resourceVersion, an etcd revision, is greater). A
  job's pods are LISTed again when ``resync_seconds`` have passed since its last LIST, so a
  ghost lives at most that long in a job that is being reconciled (one that is not decides
  nothing from it), and a deleted job takes its pods out of the index with it.

Pure bookkeeping, no I/O (the clock is read where a caller passes no ``now``); one instance
per operator process.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from typing import Any

from torpor_operator.watching import resource_version as _version
from torpor_operator.watching import slim_pod

__all__ = ["PodIndex"]

Key = tuple[str, str]
_DELETION = ("deletionTimestamp", "deletionGracePeriodSeconds")


class PodIndex:
    """Pods by (namespace, job), as the watch last showed them (the fields decisions read:
    :func:`~torpor_operator.watching.slim_pod`)."""

    def __init__(self, resync_seconds: float = 300.0) -> None:
        """``resync_seconds``: the longest a job's pods are answered from the index without a LIST."""
        self.resync_seconds = resync_seconds
        self._seeded_at: dict[Key, float] = {}
        """(namespace, job) -> ``time.monotonic()`` of its last LIST."""
        self._pods: dict[Key, tuple[str, dict[str, Any]]] = {}
        """(namespace, pod) -> (job, body)."""
        self._names: dict[Key, set[str]] = {}
        """(namespace, job) -> its pods' names in ``_pods``."""
        self._synced: set[Key] = set()
        self._expected: dict[Key, dict[str, str | None]] = {}
        """(namespace, job) -> pod name -> the uid the index held under that name when the create
        was expected (a pod of the same name may still be on its way out)."""
        self._listed_at: dict[Key, int] = {}
        """(namespace, job) -> resourceVersion of its last LIST: older events are already in it."""
        self._deleted: dict[Key, set[str]] = {}
        """Names deleted while a LIST of the job runs: the LIST must not bring them back."""

    def _stale(self, namespace: str, job: str, body: Mapping[str, Any]) -> bool:
        """Whether a watch event is older than what the index holds: than the pod of that name
        it has, or than the job's last LIST (a LIST reads newer than a lagging watch)."""
        version = _version(body)
        if version is None:
            return False
        listed = self._listed_at.get((namespace, job))
        old = self._pods.get((namespace, str((body.get("metadata") or {}).get("name", ""))))
        held = _version(old[1]) if old is not None else None
        return (listed is not None and version <= listed) or (held is not None and version < held)

    def put(self, namespace: str, job: str, body: Mapping[str, Any]) -> None:
        """A pod event (added, modified, listed) of a pod labelled with ``job``; an event older
        than what the index holds is ignored."""
        if self._stale(namespace, job, body):
            return
        self._store(namespace, job, body)

    def _store(self, namespace: str, job: str, body: Mapping[str, Any]) -> None:
        meta = body.get("metadata") or {}
        name = str(meta.get("name", ""))
        kept = slim_pod(body)
        old = self._pods.get((namespace, name))
        if old is not None and not meta.get("deletionTimestamp"):
            held = old[1].get("metadata") or {}
            if held.get("deletionTimestamp") and held.get("uid") == meta.get("uid"):
                kept["metadata"].update({k: held[k] for k in _DELETION if k in held})
        if old is not None and old[0] != job:
            self._unlink(namespace, old[0], name)
        self._pods[(namespace, name)] = (job, kept)
        self._names.setdefault((namespace, job), set()).add(name)
        self._satisfy(namespace, job, name, meta.get("uid"))

    def delete(self, namespace: str, name: str, body: Mapping[str, Any] | None = None) -> None:
        """A pod's deletion event (``body``: the pod as it was deleted). A deletion of an older
        pod of the name than the one held (the name made again since) is ignored."""
        old = self._pods.get((namespace, name))
        if old is None:
            return
        gone = (body.get("metadata") or {}).get("uid") if body is not None else None
        if gone is not None and gone != (old[1].get("metadata") or {}).get("uid"):
            return
        del self._pods[(namespace, name)]
        job = old[0]
        self._unlink(namespace, job, name)
        if (namespace, job) in self._deleted:
            self._deleted[(namespace, job)].add(name)

    def _unlink(self, namespace: str, job: str, name: str) -> None:
        names = self._names.get((namespace, job))
        if names is not None:
            names.discard(name)
            if not names:
                del self._names[(namespace, job)]

    def _satisfy(self, namespace: str, job: str, name: str, uid: str | None) -> None:
        expected = self._expected.get((namespace, job))
        if expected is not None and name in expected and expected[name] != uid:
            del expected[name]
            if not expected:
                del self._expected[(namespace, job)]

    def pods(self, namespace: str, job: str, now: float | None = None) -> list[dict[str, Any]] | None:
        """The job's pods, or ``None`` when the index cannot answer (not synced, a pod the
        operator made not in it yet, or its last LIST older than ``resync_seconds`` at ``now``,
        default ``time.monotonic()``): then LIST them."""
        key = (namespace, job)
        if key not in self._synced or key in self._expected:
            return None
        now = time.monotonic() if now is None else now
        if now - self._seeded_at.get(key, now) >= self.resync_seconds:
            return None
        return [self._pods[(namespace, n)][1] for n in sorted(self._names.get(key, ()))]

    def expect(self, namespace: str, job: str, names: Iterable[str]) -> None:
        """The operator is creating these pods of the job."""
        # "" for a name the index does not hold: any pod shown under it is the new one
        held = {n: (self._pods[(namespace, n)][1].get("metadata") or {}).get("uid")
                if (namespace, n) in self._pods else "" for n in names}
        if held:
            self._expected.setdefault((namespace, job), {}).update(held)

    def deleted(self, namespace: str, name: str, at: str, grace_seconds: int | None) -> None:
        """The operator's DELETE of a pod returned (``at``: an RFC 3339 time; ``grace_seconds``:
        the grace period asked for, ``None`` for the pod's own): the held copy reads as
        deleting until the watch shows the deletion. A pod the index does not hold (gone
        already) stays out of it."""
        old = self._pods.get((namespace, name))
        if old is None:
            return
        meta = old[1].get("metadata") or {}
        if meta.get("deletionTimestamp"):
            return
        if grace_seconds is None:
            grace_seconds = int((old[1].get("spec") or {}).get("terminationGracePeriodSeconds", 30))
        old[1]["metadata"] = {**meta, "deletionTimestamp": at, "deletionGracePeriodSeconds": grace_seconds}

    def annotated(self, namespace: str, name: str, annotations: Mapping[str, str], *,
                  apply: bool = True) -> dict[str, Any] | None:
        """The operator's annotation patch of a pod returned: the held copy carries the
        annotations until the watch shows the pod (a decision in between would tell the rank
        again). The held copy with them, or ``None`` if the index holds no such pod; with
        ``apply=False`` only that copy, the index unchanged (what the patch will make of the pod)."""
        old = self._pods.get((namespace, name))
        if old is None:
            return None
        meta = old[1].get("metadata") or {}
        copy = {**old[1], "metadata": {**meta, "annotations": {**(meta.get("annotations") or {}), **annotations}}}
        if apply:
            self._pods[(namespace, name)] = (old[0], copy)
        return copy

    def listing(self, namespace: str, job: str) -> None:
        """A LIST of the job's pods begins: deletions seen from now on are remembered for :meth:`seed`."""
        self._deleted.setdefault((namespace, job), set())

    def seed(self, namespace: str, job: str, items: Iterable[Mapping[str, Any]], version: str | None,
             now: float | None = None) -> None:
        """The answer of a LIST begun with :meth:`listing` (``version``: the list's
        resourceVersion): adds the pods the index lacks, drops the job's ghosts, clears the
        job's expectations, and marks the job synced."""
        key = (namespace, job)
        deleted = self._deleted.pop(key, set())
        listed: dict[str, Mapping[str, Any]] = {str((i.get("metadata") or {}).get("name", "")): i for i in items}
        try:
            at = int(version or "")
        except ValueError:
            at = None
        for name in sorted(self._names.get(key, set()) - set(listed)):
            mine = _version(self._pods[(namespace, name)][1])
            if at is not None and mine is not None and mine <= at:
                self.delete(namespace, name)  # gone when the LIST was read, and no event since
        for name, item in listed.items():
            if name in deleted:
                continue
            old = self._pods.get((namespace, name))
            held, new = (_version(old[1]) if old is not None else None), _version(item)
            if old is None or (held is not None and new is not None and new > held):
                self._store(namespace, job, item)
        if at is not None:
            self._listed_at[key] = at
        # a pod still expected was never made: reconciles of one job are serialised, so this
        # LIST began after the create that expected it had returned
        self._expected.pop(key, None)
        self._synced.add(key)
        self._seeded_at[key] = time.monotonic() if now is None else now

    def abandon(self, namespace: str, job: str) -> None:
        """A LIST begun with :meth:`listing` failed."""
        self._deleted.pop((namespace, job), None)

    def forget(self, namespace: str, job: str) -> list[str]:
        """The job is deleted: drop its state and its pods (those whose deletion events are still
        to come, and any the watch never reported deleted); the names of the pods dropped."""
        key = (namespace, job)
        self._synced.discard(key)
        self._expected.pop(key, None)
        self._deleted.pop(key, None)
        self._listed_at.pop(key, None)
        self._seeded_at.pop(key, None)
        names = sorted(self._names.pop(key, set()))
        for name in names:
            self._pods.pop((namespace, name), None)
        return names

    def jobs(self) -> int:
        """Jobs with index state (synced, expected or listing): ``torpor_cached_entries{cache="pod_index_jobs"}``."""
        return len(self._synced | set(self._expected) | set(self._deleted) | set(self._listed_at))

    def __len__(self) -> int:
        return len(self._pods)
