"""The kopf handlers: observe, call :func:`~torpor_operator.reconciling.decide`, apply.

Level-triggered: every watch event of a TrainingJob, of one of its pods, or of a node hosting
one of its pods that changes what a decision reads (:mod:`torpor_operator.watching`) leads to
one *reconcile* of that job, which reads the job, its pods and its other children — from the
watches' caches where they can answer (:mod:`torpor_operator.indexing`,
:mod:`torpor_operator.caching`), else by a GET and LISTs — decides, and applies.
Reconciles of one job are serialised by a lock and coalesced (an event that arrives while a
reconcile is already waiting adds nothing: the waiting one will read the newer state), so a
burst of pod events costs one or two passes. The handlers do not wait for the reconcile
(:meth:`Shell.request`): kopf holds each event's body until its handler returns.

No kopf daemons or timers: they would put a finalizer on every TrainingJob, and a job could
then not be deleted while the operator is down. Time-based steps (exit deadlines, restart
backoff) are re-scheduled on the event loop from ``Decision.requeue_after``; retention runs
in one operator-wide background task. The only finalizer is the deletion handler's, and only
on jobs with ``checkpoint.deleteOnJobDeletion: true`` (remove it by hand —
``kubectl patch tj NAME --type=json -p '[{"op":"remove","path":"/metadata/finalizers"}]'`` —
if the operator is gone for good). That handler stops the ranks first and waits until no pod of
the job exists (:mod:`torpor_operator.deleting`), then deletes the prefix: a rank still running
would save on its way out and leave a checkpoint behind.

kopf keeps its own state in annotations under ``torpor.dev/`` (the status schema is closed):
the deletion handler's progress while it runs; no copy of the spec
(:class:`~torpor_operator.watching.NoDiffBase`).

With peering, kopf stops a paused replica's watches but tells no handler; scheduled reconciles
and retention passes first ask :meth:`Shell.acting`, which reads the peering records with
kopf's rule (:mod:`torpor_operator.peering`), so an outranked replica stops those as well.
When kopf resumes a replica it lists every job again, and reconciles schedule afresh.

kopf never retries an ``@kopf.on.event`` handler, so a reconcile that meets an API error (a
create refused by a ResourceQuota or Pod Security, a 422, a 5xx, no connection) would simply
be dropped. The shell catches it, logs it, retries the job after a backoff
(``TORPOR_API_RETRY_*``; other events of that job wait for the retry), and — when the API
answered — shows it: ``Ready=False`` with reason ``CreateFailed`` or ``ApiError`` and the
API's message, and one Warning Event per distinct error.

Bucket work (listings, retention) runs on a pool of its own (``TORPOR_BUCKET_WORKERS``) with
short timeouts (``TORPOR_BUCKET_TIMEOUT_SECONDS``): a slow or dead store never queues the API
calls of a reconcile, a decision waits for a listing only where it may start an incarnation and
at most that timeout, and the path that writes GracefulExit (a Running job) never lists.
The retention task isolates each job's pass and survives any error; if it dies or stalls
anyway, the liveness probe fails and ``torpor_retention_loop_up`` reads 0.

Each job's bucket is reached with its own endpoint and credentials Secret
(:mod:`torpor_operator.credentials`). A Secret the operator cannot use is shown by the retention
pass: ``Ready=False`` with a ``CredentialsSecret*`` reason and a message naming the Secret, one
Warning Event per distinct problem; once the Secret is usable, ``Ready`` follows the phase again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import kopf
from kubernetes import client, config
from kubernetes.client.exceptions import ApiException
from urllib3.exceptions import HTTPError

from torpor_operator.applying import CreateRefused, KubeClient, api_message
from torpor_operator.bucket import Bucket
from torpor_operator.caching import ChildIndex, JobCache
from torpor_operator.contract import GROUP, LABEL_JOB, PLURAL, VERSION
from torpor_operator.credentials import CREDENTIALS_REASONS, CredentialsError
from torpor_operator.deleting import stop_ranks
from torpor_operator.indexing import PodIndex
from torpor_operator.metrics import Metrics
from torpor_operator.observing import CheckpointInfo, NodeView, avoided_nodes
from torpor_operator.peering import blockers
from torpor_operator.placing import node_change
from torpor_operator.reconciling import LAUNCHING_PHASES, Job, decide, wants_fresh_checkpoints
from torpor_operator.retaining import JobFacts, RetentionSchedule, settled, ttl_expiry
from torpor_operator.settings import OperatorSettings
from torpor_operator.spec import SpecError
from torpor_operator.status import JobStatus, api_error, api_recovered, invalid_spec, merge_patch, not_ready
from torpor_operator.watching import POD_SELECTOR, NoDiffBase, Seen, slim_node

__all__ = ["Shell"]

log = logging.getLogger("torpor.handlers")

#: How long one reading of the peering records answers :meth:`Shell.acting`, seconds: a burst of
#: wake-ups costs one GET; kopf itself reacts to a record within about this long.
_ACTING_CACHE_SECONDS = 1.0
#: When a wake-up finds this replica paused it is tried once more after this long, seconds, not
#: dropped: kopf may have resumed the replica a moment before the cached reading expired, and the
#: reconcile kopf ran on resuming is what scheduled this wake-up (an exit deadline, say): dropped,
#: nothing would bring it back. Longer than the cache, so the next try reads the records afresh.
_PAUSED_WAKE_RETRY_SECONDS = 2 * _ACTING_CACHE_SECONDS
#: How long one run of the deletion handler waits for the ranks to stop before kopf retries it
#: (kopf logs each retry: once a minute for a rank stuck Terminating, not every poll).
_STOP_WAIT_SECONDS = 60.0
_STOP_POLL_SECONDS = 1.0


@dataclass
class _Listing:
    """One listing of a job's bucket prefix, queued or running on the bucket pool."""

    started: float | None = None
    """When a worker began it (monotonic); ``None`` while queued."""
    future: asyncio.Future[list[CheckpointInfo]] | None = field(default=None, repr=False)
    generation: int | None = None
    """``metadata.generation`` of the job it lists for."""


def _api_client() -> client.ApiClient:
    try:
        config.load_incluster_config()
    except config.ConfigException:
        config.load_kube_config(config_file=os.environ.get("KUBECONFIG"))
    return client.ApiClient()


class Shell:
    """Per-process state of the handlers: clients, caches, locks and scheduled wake-ups."""

    def __init__(self, settings: OperatorSettings, kube: KubeClient, bucket: Bucket, metrics: Metrics,
                 identity: str | None = None) -> None:
        self.settings = settings
        self.kube = kube
        self.bucket = bucket
        self.metrics = metrics
        self.identity = identity
        self._acting: tuple[float, bool] | None = None
        self.nodes: dict[str, dict[str, Any]] = {}
        """Nodes by name, as :func:`~torpor_operator.watching.slim_node` keeps them (:meth:`node_seen`)."""
        self.troubled: set[str] = set()
        """The nodes going away or lost now: with the nodes hosting a job's ranks, all a decision reads."""
        self.seen_jobs = Seen("TrainingJob")
        self.seen_pods = Seen("Pod")
        self.pod_index = PodIndex()
        self.job_cache = JobCache()
        self.child_index = ChildIndex()
        self.jobs: set[tuple[str, str]] = set()
        self.checkpoints: dict[tuple[str, str], list[CheckpointInfo]] = {}
        self._locks: dict[tuple[str, str], asyncio.Lock] = {}
        self._waiting: set[tuple[str, str]] = set()
        self._running = asyncio.Semaphore(settings.reconcile_concurrency)
        """Reconciles of different jobs at once (``TORPOR_RECONCILE_CONCURRENCY``)."""
        self._requests: set[asyncio.Task[None]] = set()
        """Reconciles the watch handlers asked for and did not wait for (:meth:`request`)."""
        self._wakeups: dict[tuple[str, str], asyncio.TimerHandle] = {}
        self.bucket_pool = ThreadPoolExecutor(settings.bucket_workers, thread_name_prefix="torpor-bucket")
        self._listings: dict[tuple[str, str], _Listing] = {}
        self._listed_at: dict[tuple[str, str], float] = {}
        self._retained: dict[tuple[str, str], list[CheckpointInfo]] = {}
        """What each job's last retention pass found and then reconciled on: a pass that finds
        the same again has nothing new for a decision, and reconciles nothing."""
        self._errors: dict[tuple[str, str], int] = {}
        self._retry_at: dict[tuple[str, str], float] = {}
        self._credentials_shown: dict[tuple[str, str], str] = {}
        """The credentials problem last posted as an Event per job: one Event per distinct problem."""
        self.schedule = RetentionSchedule(settings.retention_interval_seconds)
        """Which jobs a retention pass visits (:mod:`torpor_operator.retaining`)."""
        self.retention_task: asyncio.Task[None] | None = None
        self.retention_progress = time.monotonic()
        metrics.retention_up.set_function(lambda: 0.0 if self.retention_problem() else 1.0)
        for cache, size in self.cache_sizes().items():
            metrics.watch_cache(cache, size)

    def cache_sizes(self) -> dict[str, Callable[[], int]]:
        """Every cache of the shell, by the name ``torpor_cached_entries`` gives it. All but
        ``nodes`` and ``troubled_nodes`` are per job (``pods``: per pod of a job) and empty once
        their jobs are gone."""
        return {"jobs": lambda: len(self.jobs), "job_events": lambda: len(self.seen_jobs),
                "pods": lambda: len(self.seen_pods), "nodes": lambda: len(self.nodes),
                "pod_index": lambda: len(self.pod_index), "pod_index_jobs": self.pod_index.jobs,
                "job_bodies": lambda: len(self.job_cache), "child_index": lambda: len(self.child_index),
                "checkpoints": lambda: len(self.checkpoints), "locks": lambda: len(self._locks),
                "wakeups": lambda: len(self._wakeups), "listings": lambda: len(self._listings),
                "listed_at": lambda: len(self._listed_at), "retained": lambda: len(self._retained),
                "errors": lambda: len(self._errors),
                "retry_at": lambda: len(self._retry_at), "credentials_shown": lambda: len(self._credentials_shown),
                "manifests": self.bucket.cached_jobs, "bucket_jobs": self.bucket.known_jobs,
                "schedule": lambda: len(self.schedule), "phases": self.metrics.phases_known,
                "troubled_nodes": lambda: len(self.troubled)}

    def request(self, namespace: str, name: str, *, triggered_at: float, trigger: str) -> None:
        """Reconcile the job in a task of its own, and return at once.

        kopf keeps an event's body, and the worker of its object, until the handler returns. A
        handler that awaited the reconcile held one body per event in flight behind each job's
        lock — hundreds while a cluster's jobs start, most of the operator's peak memory —
        for work that reads the job and the pod index afresh anyway. Requests while one is
        waiting are that one (coalesced in :meth:`reconcile`)."""
        if (namespace, name) in self._waiting:
            return
        task = asyncio.get_running_loop().create_task(
            self.reconcile(namespace, name, triggered_at=triggered_at, trigger=trigger))
        self._requests.add(task)
        task.add_done_callback(self._requests.discard)

    async def cancel_requests(self) -> None:
        """At the operator's exit: the reconciles still running or waiting end here."""
        tasks = list(self._requests)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def reconcile(self, namespace: str, name: str, *, triggered_at: float | None = None,
                        retry: bool = False, trigger: str = "wakeup") -> None:
        """Observe the job, decide, apply; coalesced with a reconcile already waiting.

        After an API error the job's events wait for the scheduled retry (``retry``): a refused
        create would otherwise be retried by the events of its own teardown, without backoff.
        """
        key = (namespace, name)
        if not retry and time.monotonic() < self._retry_at.get(key, 0.0):
            return
        if key in self._waiting:
            return
        self._waiting.add(key)
        # the job's lock, then a turn among all jobs: a request for the job that comes meanwhile
        # still finds it waiting and is coalesced with it
        async with self._locks.setdefault(key, asyncio.Lock()), self._running:
            self._waiting.discard(key)
            self.metrics.reconciles.labels(trigger=trigger).inc()
            with self.metrics.reconcile.time():
                try:
                    # a LIST re-reads the job's pods after an API error or in a retention pass;
                    # a scheduled wake-up (``retry`` too: it passes the error backoff) reads the index
                    fresh = (retry and key in self._errors) or trigger == "retention"
                    await self._reconcile(key, triggered_at, fresh=fresh)
                except Exception as exc:  # kopf would drop it: retry with backoff and show it
                    await self._failed(key, exc)
                else:
                    await self._recovered(key)
        lock = self._locks.get(key)
        if key not in self.jobs and key not in self._waiting and lock is not None and not lock.locked():
            del self._locks[key]  # the job is gone (or never valid): its lock goes with it

    async def _failed(self, key: tuple[str, str], exc: Exception) -> None:
        """A reconcile met an API error: log it, retry after a backoff, and show it on the job when
        the API answered (a refused connection cannot be shown there)."""
        namespace, name = key
        self.child_index.invalidate(key)
        errors = self._errors[key] = self._errors.get(key, 0) + 1
        delay = self.settings.api_retry_seconds(errors)
        self._retry_at[key] = time.monotonic() + delay
        self._schedule(key, delay)
        self.metrics.reconcile_errors.inc()
        message = api_message(exc.cause if isinstance(exc, CreateRefused) else exc)
        log.warning("%s/%s: %s; retry %d in %.1f s", namespace, name, message, errors, delay,
                    exc_info=not isinstance(exc, ApiException | HTTPError | CreateRefused))
        if not isinstance(exc, CreateRefused | ApiException) or (isinstance(exc, ApiException) and not exc.status):
            return
        reason = "CreateFailed" if isinstance(exc, CreateRefused) else "ApiError"
        try:
            body = await asyncio.to_thread(self.kube.read_job, namespace, name)
            if body is None:
                return
            old = JobStatus.from_dict(body.get("status"))
            new = api_error(old, reason, message, body["metadata"].get("generation"), datetime.now(UTC))
            if new is None:
                return  # this error is on the job already: one Event per distinct error
            patch = merge_patch(old, new)
            if patch:
                self._wrote(key, await asyncio.to_thread(self.kube.patch_status, namespace, name, patch))
            await asyncio.to_thread(self.kube.post_event, body, "Warning", reason, message)
        except Exception as shown:
            log.warning("%s/%s: cannot show the error on the job: %s", namespace, name, api_message(shown))

    async def _recovered(self, key: tuple[str, str]) -> None:
        """A reconcile after API errors went through: ``Ready`` follows the phase again."""
        if self._errors.pop(key, None) is None:
            return
        self._retry_at.pop(key, None)
        namespace, name = key
        log.info("%s/%s: reconciled again after API errors", namespace, name)
        try:
            body = await asyncio.to_thread(self.kube.read_job, namespace, name)
            if body is None:
                return
            old = JobStatus.from_dict(body.get("status"))
            new = api_recovered(old, body["metadata"].get("generation"), datetime.now(UTC))
            patch = merge_patch(old, new) if new is not None else None
            if patch:
                self._wrote(key, await asyncio.to_thread(self.kube.patch_status, namespace, name, patch))
        except Exception as exc:
            log.warning("%s/%s: cannot clear the API error from Ready: %s", namespace, name, api_message(exc))

    async def _reconcile(self, key: tuple[str, str], triggered_at: float | None, *, fresh: bool) -> None:
        namespace, name = key
        # the job, its pods and its children are read at once: a reconcile waits for one round
        # trip to the API server, not four in a row (reconciles of one job are serialised, so
        # each read sees every write of the reconciles before it); none where the caches answer
        observed_at = time.monotonic()
        pods_read = asyncio.ensure_future(self._pods(namespace, name, fresh))
        cached, checked, listed_fresh = not fresh, False, False
        checkpoints: list[CheckpointInfo] | None = None
        while True:
            try:
                body, children, from_cache = await self._read(key, cached=cached)
            except BaseException:
                await asyncio.gather(pods_read, return_exceptions=True)
                raise
            if body is None or body["metadata"].get("deletionTimestamp"):
                await asyncio.gather(pods_read, return_exceptions=True)  # a LIST's answer must not outlive forget
                self.forget(key)
                return
            try:
                job = Job.from_dict(body)
            except SpecError as exc:
                await asyncio.gather(pods_read, return_exceptions=True)
                old = JobStatus.from_dict(body.get("status"))
                new = invalid_spec(old, str(exc), body["metadata"].get("generation"), datetime.now(UTC))
                if new is None:
                    return  # already recorded for this generation: no second Event
                log.warning("TrainingJob %s/%s cannot run: %s", namespace, name, exc)
                patch = merge_patch(old, new)
                if patch:
                    self._wrote(key, await asyncio.to_thread(self.kube.patch_status, namespace, name, patch))
                await asyncio.to_thread(self.kube.post_event, body, "Warning", "InvalidSpec", str(exc))
                return
            self.jobs.add(key)
            pods = await pods_read
            want = wants_fresh_checkpoints(job, pods)
            # once per reconcile, unless the job read again wants a fresh listing the first did not make
            if not checked or (want and not listed_fresh):
                checkpoints = await self._checkpoints(key, job, observed_at, fresh=want)
                nodes = self._nodes_for(pods)
                checked, listed_fresh = True, want
            decision = decide(job, pods, nodes, checkpoints, datetime.now(UTC), self.settings, children)
            if not (from_cache and decision.create):
                break
            # a decision that creates is made from a GET and a LIST (:mod:`torpor_operator.caching`)
            self.metrics.cache_rereads.inc()
            cached = False
        if not decision.empty:
            if decision.writes_children:  # the next reconcile LISTs them (:mod:`torpor_operator.caching`)
                self.child_index.invalidate(key)
            if decision.status and key in self.seen_jobs:
                self.seen_jobs.expect(key, body, decision.status)
            self.pod_index.expect(namespace, name, [o["metadata"]["name"] for o in decision.create
                                                    if o["kind"] == "Pod"])
            for pod, annotations in decision.annotate:  # their watch events are no change (own writes)
                if (namespace, pod) in self.seen_pods:
                    self.seen_pods.record((namespace, pod), self.pod_index.annotated(namespace, pod, annotations,
                                                                                     apply=False))
            self._wrote(key, await asyncio.to_thread(self.kube.apply, namespace, name, decision))
            for pod, annotations in decision.annotate:  # the next decision sees them told, watched yet or not
                self.pod_index.annotated(namespace, pod, annotations)
            deleted_at = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
            for ref in decision.delete:
                if ref.kind == "Pod":
                    self.pod_index.deleted(namespace, ref.name, deleted_at, ref.grace_period_seconds)
        if key not in self.jobs:
            return  # deleted while the decision was applied: its forget has run, nothing comes back
        if decision.graceful_exit is not None and triggered_at is not None:
            self.metrics.reaction.observe(time.monotonic() - triggered_at)
        for event in decision.events:
            log.info("%s/%s %s: %s", namespace, name, event.reason, event.message)
        if decision.events:
            await asyncio.to_thread(self.kube.post_events, body, decision)
        if key not in self.jobs:
            return
        self.metrics.observe(f"{namespace}/{name}", decision, job.status)
        status = decision.status or {}
        phase = status.get("phase", job.status.phase)
        self.schedule.observe(key, JobFacts(phase, job.spec.checkpoint.save_seconds, job.spec.checkpoint.save_steps,
                                            body["metadata"].get("generation")))
        expires = ttl_expiry(phase, status.get("completionTime", job.status.completion_time),
                             job.spec.ttl_seconds_after_finished)
        if expires is not None and await self._expire(key, body, expires):
            return
        delays = [d for d in (decision.requeue_after,
                              None if expires is None else (expires - datetime.now(UTC)).total_seconds())
                  if d is not None]
        self._schedule(key, min(delays) if delays else None)

    def node_seen(self, name: str, node: dict[str, Any] | None) -> None:
        """A node's watch event (``node``: its slim copy; ``None``: deleted)."""
        if node is None:
            self.nodes.pop(name, None)
            self.troubled.discard(name)
            return
        self.nodes[name] = node
        view = NodeView.from_dict(node)
        if view.going_away(self.settings.termination_taints) is not None or view.lost() is not None:
            self.troubled.add(name)
        else:
            self.troubled.discard(name)

    def _nodes_for(self, pods: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The nodes a decision reads: those hosting the job's ranks, those a new rank may have to
        avoid (going away, lost), and those its pods avoid now (one that is back frees a Pending
        rank). Looked up by name: a reconcile costs the same on a cluster of 10 or 10 000 nodes."""
        wanted = {(p.get("spec") or {}).get("nodeName") for p in pods}
        wanted.update(n for p in pods for n in avoided_nodes((p.get("metadata") or {}).get("annotations")))
        wanted |= self.troubled
        return [self.nodes[n] for n in sorted(n for n in wanted if n and n in self.nodes)]

    async def _read(self, key: tuple[str, str], *, cached: bool
                    ) -> tuple[dict[str, Any] | None, list[dict[str, Any]], bool]:
        """The job's body (``None``: gone) and its non-pod children, from the caches where
        ``cached`` and they can answer (:mod:`torpor_operator.caching`), else by a GET and a LIST
        at once; and whether any of it came from a cache."""
        namespace, name = key
        body = self.job_cache.get(key) if cached else None
        children = self.child_index.children(key) if cached else None
        from_cache = body is not None or children is not None
        listing, token = None, self.child_index.token()
        if children is None:
            self.metrics.child_lists.inc()
            listing = asyncio.ensure_future(asyncio.to_thread(self.kube.list_children, namespace, name))
        try:
            if body is None:
                self.metrics.job_reads.inc()
                body = await asyncio.to_thread(self.kube.read_job, namespace, name)
                self.job_cache.answered(key, body)
            if listing is not None:
                children = await listing
                if key in self.seen_jobs:  # never for a job deleted meanwhile (its forget has run)
                    self.child_index.listed(key, children, token)
        except BaseException:
            if listing is not None:
                await asyncio.gather(listing, return_exceptions=True)
            raise
        return body, list(children or ()), from_cache

    async def _expire(self, key: tuple[str, str], body: dict[str, Any], expires: datetime) -> bool:
        """Delete a finished job whose ``spec.ttlSecondsAfterFinished`` has passed (its children go
        by owner references, its checkpoints stay unless ``deleteOnJobDeletion``); whether it did."""
        if datetime.now(UTC) < expires:
            return False
        ttl = body["spec"].get("ttlSecondsAfterFinished")
        message = f"deleting the job {ttl} s after it finished (spec.ttlSecondsAfterFinished)"
        log.info("%s/%s Expired: %s", *key, message)
        try:
            await asyncio.to_thread(self.kube.post_event, body, "Normal", "Expired", message)
        except (ApiException, HTTPError) as exc:  # the deletion matters, its Event less
            log.warning("event Expired on %s/%s not posted: %s", *key, api_message(exc))
        await asyncio.to_thread(self.kube.delete_job, *key)
        return True

    async def _pods(self, namespace: str, name: str, fresh: bool) -> list[dict[str, Any]]:
        """The job's pods from the pod index (:mod:`torpor_operator.indexing`), or LISTed when
        the index cannot answer or ``fresh`` (a retention pass, an API retry: each LIST also
        clears the index of pods a reconnected watch never reported deleted)."""
        if not fresh:
            pods = self.pod_index.pods(namespace, name)
            if pods is not None:
                return pods
        self.pod_index.listing(namespace, name)
        self.metrics.pod_lists.inc()
        try:
            items, version = await asyncio.to_thread(self.kube.list_pods_at, namespace, name)
        except BaseException:
            self.pod_index.abandon(namespace, name)
            raise
        self.pod_index.seed(namespace, name, items, version)
        return items

    async def _checkpoints(self, key: tuple[str, str], job: Job, since: float | None = None, *,
                           fresh: bool | None = None) -> list[CheckpointInfo] | None:
        """The job's checkpoints: listed afresh where the decision needs it (``fresh``; by default
        in the phases that may start an incarnation, see
        :func:`~torpor_operator.reconciling.wants_fresh_checkpoints`), else the last listing (for
        ``status.lastCheckpoint``), never waiting for the bucket.

        A fresh listing is one that began after ``since`` (when the pods were read: it sees every
        save of a rank that had ended by then) and is waited for at most
        ``bucket_timeout_seconds``; past it the decision goes on without one. Outside the launching
        phases a job without a listing yet gets one in the background.

        A listing that fails gives ``None``, never the cached list: that may name a checkpoint older
        than the newest, or one retention has deleted since, and every rank would be told to load
        it. With ``None`` the pods get an empty ``TORPOR_RESUME_FROM`` and the ranks resolve the
        newest complete checkpoint themselves. The cache itself stays: outside the launching
        phases it only feeds ``lastCheckpoint``, and dropping it would make every later reconcile
        list the unreachable bucket before deciding.
        """
        if fresh is None:
            fresh = job.status.phase in LAUNCHING_PHASES
        if not fresh:
            if key not in self.checkpoints:
                self._list(key, job, since)
            return self.checkpoints.get(key)
        try:
            async with self._off_turn():
                return await asyncio.wait_for(asyncio.shield(self._list(key, job, since)),
                                              self.settings.bucket_timeout_seconds)
        except TimeoutError:
            log.warning("listing the checkpoints of %s takes longer than %.1f s; deciding without it",
                        job.ref.key, self.settings.bucket_timeout_seconds)
            return None
        except Exception as exc:  # the bucket is away: the ranks resolve "newest" themselves
            log.warning("cannot list checkpoints of %s: %s", job.ref.key, exc)
            return None

    @contextlib.asynccontextmanager
    async def _off_turn(self) -> AsyncIterator[None]:
        """Give this reconcile's turn (``TORPOR_RECONCILE_CONCURRENCY``) to another job while it
        waits for the bucket, and take one again after: 32 jobs waiting on a dead store for their
        listing would otherwise hold every turn for ``bucket_timeout_seconds``, and a cordon's
        reconcile would wait behind them. Only a reconcile holding a turn calls it. A reconcile
        cancelled while it waits for its turn back (the operator's exit) leaves one turn more."""
        self._running.release()
        try:
            yield
        finally:
            await self._running.acquire()

    def _list(self, key: tuple[str, str], job: Job, since: float | None) -> asyncio.Future[list[CheckpointInfo]]:
        """A listing of the job's prefix on the bucket pool that began after ``since`` (or is still
        queued): the one under way if it qualifies, else a new one. Its result feeds the cache."""
        running = self._listings.get(key)
        if running is not None and running.future is not None and not running.future.done() and (
                since is None or running.started is None or running.started >= since):
            return running.future
        listing = _Listing()

        def run() -> list[CheckpointInfo]:
            listing.started = time.monotonic()
            return self.bucket.list(job.spec, job.ref)

        listing.generation = job.generation

        future = listing.future = asyncio.get_running_loop().run_in_executor(self.bucket_pool, run)
        self._listings[key] = listing
        future.add_done_callback(lambda _: self._listed(key, listing))
        return future

    def _wrote(self, key: tuple[str, str], job: dict[str, Any] | None) -> None:
        """The operator patched the job's status and got ``job`` back: its watch event shows
        nothing a decision has not seen, and reconciles nothing. Only for a job its watch has
        shown and not yet deleted: a late answer never brings a deleted job's entry back."""
        if key in self.seen_jobs:
            self.seen_jobs.record(key, job)
            self.job_cache.answered(key, job)

    def _listed(self, key: tuple[str, str], listing: _Listing) -> None:
        if self._listings.get(key) is listing:
            del self._listings[key]
        if key not in self.jobs:  # deleted while it ran: the manifests it parsed go too
            self.bucket.forget(*key)
        future = listing.future
        if future is None or future.cancelled() or future.exception() is not None or key not in self.jobs:
            return
        started = listing.started or 0.0
        if started >= self._listed_at.get(key, 0.0):  # never replace a newer listing by an older one
            self._listed_at[key] = started
            self.checkpoints[key] = future.result()
        if not future.result():  # a new job's empty prefix: its first retention pass is made
            self.schedule.listed_empty(key, started, generation=listing.generation)

    async def _in_bucket_pool(self, call: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self.bucket_pool, call, *args)

    def _schedule(self, key: tuple[str, str], delay: float | None, *, retried: bool = False) -> None:
        if delay is None:
            return
        old = self._wakeups.pop(key, None)
        if old is not None:
            old.cancel()
        loop = asyncio.get_running_loop()
        self._wakeups[key] = loop.call_later(max(delay, 0.05),
                                             lambda: loop.create_task(self._wake(key, retried=retried)))

    async def _wake(self, key: tuple[str, str], *, retried: bool = False) -> None:
        handle = self._wakeups.get(key)
        if await self.acting():
            await self.reconcile(*key, retry=True, trigger="wakeup")
        elif not retried and self._wakeups.get(key) is handle and (key in self.jobs or key in self._errors):
            # paused: tried once more, unless a reconcile scheduled another wake-up meanwhile or
            # the job was forgotten. Once is enough: the retry comes after the cached reading has
            # expired, so a replica it still finds paused is paused, and kopf's listing on
            # resuming reschedules every job it finds (a standby does not poll its jobs for ever)
            self._schedule(key, _PAUSED_WAKE_RETRY_SECONDS, retried=True)

    async def acting(self) -> bool:
        """Whether kopf lets this replica act: always when standalone; with peering, while no live
        replica of a higher or equal priority has a record in the peering object(s). Unknown
        (unreadable records, no identity) counts as paused and as acting respectively."""
        settings = self.settings
        if not settings.peering or self.identity is None:
            return True
        now = time.monotonic()
        if self._acting is not None and now - self._acting[0] < _ACTING_CACHE_SECONDS:
            return self._acting[1]
        priority = settings.peering_priority if settings.peering_priority is not None else 0  # kopf's default
        blocking: list[str] = []
        for namespace in settings.namespaces or (None,):
            try:
                records = await asyncio.to_thread(self.kube.read_peering, settings.peering, namespace)
            except (ApiException, HTTPError) as exc:
                log.warning("cannot read the peering %s: %s; acting as a standby until it can be read",
                            settings.peering, exc)
                records = None
            if records is None:  # kopf, too, stays paused without the object
                blocking.append(f"(no peering object {settings.peering}{f' in {namespace}' if namespace else ''})")
            else:
                blocking += blockers(records, self.identity, priority, datetime.now(UTC))
        acting = not blocking
        if self._acting is not None and self._acting[1] != acting:
            # the other replica may have written the jobs and their children meanwhile
            self.job_cache.clear()
            self.child_index.clear()
        if self._acting is None or self._acting[1] != acting:
            if acting:
                log.info("peering %s: no live replica of priority >= %d; scheduled reconciles and retention run "
                         "here", settings.peering, priority)
            else:
                log.info("peering %s: %s outrank this replica (priority %d); no scheduled reconciles or retention "
                         "here", settings.peering, ", ".join(blocking), priority)
        self._acting = (now, acting)
        return acting

    def forget(self, key: tuple[str, str]) -> None:
        """Drop every cache entry and the wake-up of a deleted job (``torpor_cached_entries``
        shows what is held). A reconcile holding the job's lock keeps its lock object; a pass
        still listing the bucket drops its result when it ends (:meth:`_listed`). The job's
        pods leave the index and ``seen_pods`` with it (events of its pods still to come, say
        while they terminate, bring them back until their own deletion events)."""
        self.jobs.discard(key)
        self.seen_jobs.drop(key)
        self.job_cache.drop(key)
        self.child_index.invalidate(key)
        self.checkpoints.pop(key, None)
        self._listed_at.pop(key, None)
        self._retained.pop(key, None)
        self._errors.pop(key, None)
        self._retry_at.pop(key, None)
        self._credentials_shown.pop(key, None)
        self.schedule.forget(key)
        lock = self._locks.get(key)
        if lock is not None and not lock.locked():  # a held one goes when its reconcile ends
            del self._locks[key]
        listing = self._listings.get(key)
        if listing is None or listing.future is None or listing.future.done():
            self._listings.pop(key, None)
        handle = self._wakeups.pop(key, None)
        if handle is not None:
            handle.cancel()
        self.bucket.forget(*key)
        for pod in self.pod_index.forget(*key):
            self.seen_pods.drop((key[0], pod))
        self.metrics.set_phase(f"{key[0]}/{key[1]}", None)

    async def prune_all(self) -> None:
        """One retention pass over the known jobs the schedule says are due, each isolated: an error
        (the API server away, the bucket away) is logged and counted, and that job is tried again
        next pass."""
        for key in self.schedule.due_keys(self.jobs, time.monotonic()):
            # asked again at its turn: the passes before it took time, and a new job's launch
            # listing may have made its first pass meanwhile; a new job still making its first
            # listing is left to it (only the first: a job reconciled again and again against a
            # slow store may have a listing in flight at every pass, and one that found
            # checkpoints is no pass, so it would never be pruned)
            listing = self._listings.get(key)
            launching = (key not in self._listed_at and listing is not None and listing.future is not None
                         and not listing.future.done())
            if (launching and self.schedule.never_passed(key)) or not self.schedule.due(key, time.monotonic()):
                continue
            try:
                await self._prune(key)
            except Exception as exc:
                self.metrics.retention_errors.inc()
                log.warning("retention of %s/%s failed, next pass in %.0f s: %s", *key,
                            self.settings.retention_interval_seconds, api_message(exc))
            self.retention_progress = time.monotonic()

    async def _prune(self, key: tuple[str, str]) -> None:
        body = await asyncio.to_thread(self.kube.read_job, *key)
        if body is None:
            self.forget(key)
            return
        try:
            job = Job.from_dict(body)
        except SpecError:
            return
        started = time.monotonic()
        found: list[CheckpointInfo] | None = None
        try:
            result = await self._in_bucket_pool(self.bucket.prune, job.spec, job.ref, job.status.resume_from)
        except CredentialsError as exc:  # nothing to prune with: shown on the job, tried next pass
            self.metrics.retention_errors.inc()
            log.warning("retention of %s/%s: %s", *key, exc.message)
            await self._show_credentials(key, job, exc)
        else:
            if key in self.jobs and started >= self._listed_at.get(key, 0.0):
                self._listed_at[key] = started
                self.checkpoints[key] = result.checkpoints
            elif key not in self.jobs:
                self.bucket.forget(*key)
            self.metrics.retention_deletions.inc(len(result.deleted))
            self.schedule.passed(key, job.status.phase, started, generation=body["metadata"].get("generation"),
                                 settled=settled(result.checkpoints, result.deleted))
            await self._show_credentials(key, job, None)
            if not (result.deleted or result.keys_deleted or result.uploads_aborted):
                found = result.checkpoints
        if found is not None and key in self._retained and self._retained[key] == found:
            return  # the same checkpoints as the last pass: every other change comes by the watch
        if found == [] and job.status.last_checkpoint is None and not self._retained.get(key):
            # nothing stored yet, and the job says so: a decision reads the same as before the pass
            # (a new job whose launch listing was cut short by the bucket timeout gets here once)
            self._retained[key] = found
            return
        await self.reconcile(*key, trigger="retention")
        if found is not None and key in self.jobs:
            self._retained[key] = found
        else:
            self._retained.pop(key, None)

    async def _show_credentials(self, key: tuple[str, str], job: Job, problem: CredentialsError | None) -> None:
        """Show a credentials problem in ``Ready`` (one Warning Event per distinct one), or clear one
        that is shown. ``job`` is the retention pass's reading: a job that shows nothing costs no
        more API calls. The status is read again and patched under the job's lock, so no reconcile
        writes its conditions in between."""
        ready = job.status.condition("Ready")
        if problem is None and (ready is None or ready.reason not in CREDENTIALS_REASONS):
            self._credentials_shown.pop(key, None)
            return
        if problem is not None and ready is not None and \
                (ready.status, ready.reason, ready.message) == ("False", problem.reason, problem.message):
            self._credentials_shown[key] = problem.message  # shown already (by an earlier operator, too)
            return
        async with self._locks.setdefault(key, asyncio.Lock()):
            body = await asyncio.to_thread(self.kube.read_job, *key)
            if body is None or body["metadata"].get("deletionTimestamp"):
                return
            old = JobStatus.from_dict(body.get("status"))
            generation, now = body["metadata"].get("generation"), datetime.now(UTC)
            if problem is None:
                new = api_recovered(old, generation, now, reasons=CREDENTIALS_REASONS)
                self._credentials_shown.pop(key, None)
            else:
                new = not_ready(old, problem.reason, problem.message, generation, now)
            patch = merge_patch(old, new) if new is not None else None
            if patch:
                self._wrote(key, await asyncio.to_thread(self.kube.patch_status, *key, patch))
            if problem is not None and self._credentials_shown.get(key) != problem.message:
                self._credentials_shown[key] = problem.message
                await asyncio.to_thread(self.kube.post_event, body, "Warning", problem.reason, problem.message)

    async def stop_ranks(self, job: Job) -> None:
        """Delete the job's pods and wait until none exists (:mod:`torpor_operator.deleting`).

        Raises:
            kopf.TemporaryError: some still exist after ``_STOP_WAIT_SECONDS``; kopf calls again.
        """
        namespace, name = job.ref.namespace, job.ref.name
        deadline = time.monotonic() + _STOP_WAIT_SECONDS
        while True:
            pods = await asyncio.to_thread(self.kube.list_pods, namespace, name)
            step = stop_ranks(job.ref.uid, pods, self.nodes, datetime.now(UTC),
                              self.settings.lost_node_force_delete_seconds)
            if not step.remaining:
                return
            for ref in step.delete:
                await asyncio.to_thread(self.kube.delete_object, namespace, ref)
            if time.monotonic() >= deadline:
                raise kopf.TemporaryError(f"waiting for the pods {', '.join(step.remaining)} to end before deleting "
                                          f"the checkpoints of {job.ref.key}", delay=_STOP_POLL_SECONDS)
            await asyncio.sleep(_STOP_POLL_SECONDS)

    async def retention_loop(self) -> None:
        """Run :meth:`prune_all` every ``retention_interval_seconds``, whatever a pass meets."""
        while True:
            await asyncio.sleep(self.settings.retention_interval_seconds)
            self.retention_progress = time.monotonic()
            try:
                if await self.acting():
                    await self.prune_all()
            except Exception as exc:  # never silently end: every job's retention and resync hang on it
                self.metrics.retention_errors.inc()
                log.exception("retention pass failed, next in %.0f s: %s", self.settings.retention_interval_seconds,
                              api_message(exc))

    def retention_problem(self) -> str | None:
        """Why the retention/resync task is not working, or ``None``: it ended (it never should), or
        it made no progress for three intervals plus the longest a pass over a dead store may
        block one job. The liveness probe fails on it, so Kubernetes restarts the operator."""
        task = self.retention_task
        if task is not None and task.done():
            error = None if task.cancelled() else task.exception()
            return f"the retention task ended: {error!r}" if error else "the retention task ended"
        stalled = time.monotonic() - self.retention_progress
        bound = 3 * self.settings.retention_interval_seconds + 20 * self.settings.bucket_timeout_seconds
        if stalled > bound:
            return f"the retention task made no progress for {stalled:.0f} s (bound {bound:.0f} s)"
        return None


def _shell(memo: kopf.Memo) -> Shell:
    return memo["shell"]


@kopf.on.startup()
async def configure(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    """Apply torpor's settings to kopf and build the shell."""
    ours: OperatorSettings = memo.get("settings") or OperatorSettings.from_env(os.environ)
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=GROUP)
    settings.persistence.diffbase_storage = NoDiffBase()
    # the API server sends only torpor's pods: no other pod is streamed or kept
    settings.watching.label_selectors["", "v1", "pods"] = POD_SELECTOR
    settings.posting.level = logging.WARNING
    settings.watching.server_timeout = ours.watch_timeout_seconds
    settings.watching.client_timeout = ours.watch_timeout_seconds + 30
    # read by kopf's peering tasks, which start only after the startup handlers
    settings.peering.lifetime = ours.peering_lifetime_seconds
    kube = KubeClient(_api_client(), workers=ours.api_workers)
    bucket = Bucket(ours.bucket_timeout_seconds, stale_upload_seconds=ours.stale_upload_seconds,
                    secrets=kube.read_secret)
    shell = Shell(ours, kube, bucket, memo.get("metrics") or Metrics(), memo.get("identity"))
    memo["shell"] = shell
    memo["retention"] = shell.retention_task = asyncio.get_running_loop().create_task(shell.retention_loop())


@kopf.on.probe(id="retention")
async def retention_alive(memo: kopf.Memo, **_: Any) -> str:
    """Part of ``/healthz``: fails (HTTP 500) when the retention/resync task died or stalled."""
    shell = memo.get("shell")
    problem = shell.retention_problem() if shell is not None else None
    if problem:
        raise kopf.PermanentError(problem)
    return "ok"


@kopf.on.startup()
async def create_peering(memo: kopf.Memo, **_: Any) -> None:
    """With ``TORPOR_PEERING``: create the peering object(s) kopf will keep its records in.

    Runs after :func:`configure` (kopf runs startup handlers in the order they are defined)
    and before kopf's peering starts. Retried every 10 s while the peering CRDs are missing.
    """
    shell = _shell(memo)
    name = shell.settings.peering
    if not name:
        return
    for namespace in shell.settings.namespaces or (None,):
        try:
            exists = await asyncio.to_thread(shell.kube.ensure_peering, name, namespace)
        except ApiException as exc:
            if exc.status != 404:
                raise
            raise kopf.TemporaryError(
                f"cannot create the peering object {name!r}: the kopf.dev peering CRDs are not installed "
                f"(the chart installs them with operator.peering; or kubectl apply -f crds/kopfpeerings.yaml)",
                delay=10) from exc
        if not exists:
            log.warning("namespace %s does not exist: no KopfPeering %s there; if it is created later, create "
                        "the KopfPeering too (or restart the operator), or kopf pauses every replica", namespace, name)


@kopf.on.cleanup()
async def stop_retention(memo: kopf.Memo, **_: Any) -> None:
    """Stop the retention task."""
    task = memo.get("retention")
    if task is not None:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    shell = memo.get("shell")
    if shell is not None:
        await shell.cancel_requests()
        shell.bucket_pool.shutdown(wait=False, cancel_futures=True)


@kopf.on.event(GROUP, VERSION, PLURAL)
async def on_job(event: dict[str, Any], body: kopf.Body, namespace: str, name: str, memo: kopf.Memo,
                 **_: Any) -> None:
    """A change of a TrainingJob that a decision can see (:mod:`torpor_operator.watching`): not
    the operator's own status patches, not kopf's annotations. kopf's listings (``type`` None:
    at start-up, on resuming a paused replica) reconcile every job."""
    shell, key = _shell(memo), (namespace, name)
    if event.get("type") == "DELETED":
        shell.forget(key)
        return
    listed = event.get("type") is None  # kopf's listing: maybe after a pause, when another replica acted
    shell.job_cache.watched(key, body, listed=listed)
    if listed:
        shell.child_index.invalidate(key)
    if not shell.seen_jobs.changed(key, body) and event.get("type") is not None:
        shell.metrics.watch_events.labels(resource="trainingjobs", outcome="unchanged").inc()
        return
    shell.metrics.watch_events.labels(resource="trainingjobs", outcome="reconcile").inc()
    shell.request(namespace, name, triggered_at=time.monotonic(), trigger="job")


@kopf.on.event("", "v1", "pods")
async def on_pod(event: dict[str, Any], body: kopf.Body, labels: dict[str, str], namespace: str, name: str,
                 memo: kopf.Memo, **_: Any) -> None:
    """A rank's pod changed: started, became ready, got a DisruptionTarget, ended, vanished.

    The watch is scoped server-side to pods with torpor's job label (:func:`configure`); every
    pod it sends is remembered (``torpor_cached_entries{cache="pods"}``) and indexed by its job
    for the reconciles to read (:mod:`torpor_operator.indexing`) until it is deleted."""
    shell, key = _shell(memo), (namespace, name)
    job = labels.get(LABEL_JOB)
    if event.get("type") == "DELETED":
        shell.seen_pods.drop(key)
        shell.pod_index.delete(namespace, name, body)
    elif event.get("type") is None and job is not None:
        # kopf's listing, maybe on resuming after a pause: another replica may have written the
        # job and its children meanwhile, and the job's own listing may come after this one
        shell.job_cache.suspect((namespace, job))
        shell.child_index.invalidate((namespace, job))
    if event.get("type") != "DELETED":
        if job is not None:
            shell.pod_index.put(namespace, job, body)
        if not shell.seen_pods.changed(key, body) and event.get("type") is not None:
            shell.metrics.watch_events.labels(resource="pods", outcome="unchanged").inc()
            return
    if job is None:
        return
    shell.metrics.watch_events.labels(resource="pods", outcome="reconcile").inc()
    shell.request(namespace, job, triggered_at=time.monotonic(), trigger="pod")


@kopf.index("", "v1", "pods", labels={LABEL_JOB: kopf.PRESENT})
def ranks_by_node(spec: dict[str, Any], labels: dict[str, str], namespace: str, **_: Any) -> dict[str, Any]:
    """Which jobs have pods on which node, so a node event reaches only the jobs it concerns."""
    node = spec.get("nodeName")
    return {node: (namespace, labels[LABEL_JOB])} if node else {}


@kopf.index("", "v1", "pods", labels={LABEL_JOB: kopf.PRESENT})
def pending_by_avoided_node(spec: dict[str, Any], annotations: dict[str, str], labels: dict[str, str],
                            namespace: str, **_: Any) -> dict[str, Any]:
    """Which jobs have an unscheduled pod kept off which node, so that the node coming back
    reaches the jobs whose Pending ranks may now be scheduled there."""
    if spec.get("nodeName"):
        return {}
    return {node: (namespace, labels[LABEL_JOB]) for node in avoided_nodes(annotations)}


@kopf.on.event("", "v1", "nodes")
async def on_node(event: dict[str, Any], body: kopf.Body, name: str, memo: kopf.Memo,
                  ranks_by_node: kopf.Index[str, tuple[str, str]],
                  pending_by_avoided_node: kopf.Index[str, tuple[str, str]], **_: Any) -> None:
    """A node cordoned, given a termination taint or lost (NotReady, unreachable): reconcile every
    job with a rank on it. A node back from that (uncordoned, untainted, Ready): reconcile every
    job with a Pending rank kept off it."""
    shell = _shell(memo)
    if event.get("type") == "DELETED":
        shell.node_seen(name, None)
        return
    before, after = shell.nodes.get(name), slim_node(body)
    shell.node_seen(name, after)
    change = node_change(NodeView.from_dict(before) if before else None, NodeView.from_dict(after),
                         shell.settings.termination_taints)
    if change is None:
        shell.metrics.watch_events.labels(resource="nodes", outcome="unchanged").inc()
        return
    shell.metrics.watch_events.labels(resource="nodes", outcome="reconcile").inc()
    triggered_at = time.monotonic()
    index = ranks_by_node if change == "away" else pending_by_avoided_node
    jobs = sorted(set(index.get(name, [])))
    for ns, job in jobs:
        shell.request(ns, job, triggered_at=triggered_at, trigger="node")


@kopf.on.delete(GROUP, VERSION, PLURAL,
                when=lambda spec, **_: bool((spec.get("checkpoint") or {}).get("deleteOnJobDeletion")))
async def delete_checkpoints(body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    """``deleteOnJobDeletion: true``: stop the ranks, then remove the job's checkpoints, before the
    job goes (the finalizer holds it until then)."""
    try:
        job = Job.from_dict(dict(body))
    except SpecError as exc:
        raise kopf.PermanentError(f"cannot delete checkpoints of an invalid job: {exc}") from exc
    shell = _shell(memo)
    await shell.stop_ranks(job)
    try:
        keys = await shell._in_bucket_pool(shell.bucket.delete_all, job.spec, job.ref)
    except CredentialsError as exc:
        raise kopf.TemporaryError(f"cannot delete the checkpoints of {job.ref.key}: {exc.message}", delay=30) from exc
    except Exception as exc:
        raise kopf.TemporaryError(f"deleting checkpoints of {job.ref.key} failed: {exc}", delay=30) from exc
    log.info("deleted %d checkpoint objects of %s after its ranks ended", keys, job.ref.key)
