"""Prometheus metrics of the operator, fed from the decisions it applies."""

from __future__ import annotations

import collections
from collections.abc import Callable

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram

from torpor_operator.reconciling import Decision
from torpor_operator.status import PHASES, JobStatus

__all__ = ["Metrics"]


class Metrics:
    """The operator's metrics; one instance per process (the default registry)."""

    def __init__(self, registry: CollectorRegistry = REGISTRY) -> None:
        self.jobs = Gauge("torpor_trainingjobs", "TrainingJobs by phase", ["phase"], registry=registry)
        self.preemptions = Counter("torpor_preemptions_total", "Stops caused by preemption signals",
                                   registry=registry)
        self.restarts = Counter("torpor_restarts_total", "Restarts after failures", registry=registry)
        self.reaction = Histogram(
            "torpor_graceful_exit_reaction_seconds",
            "From the watch event that triggered a decision to GracefulExit written",
            buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
            registry=registry,
        )
        self.reconcile = Histogram("torpor_reconcile_seconds", "One observe-decide-apply pass", registry=registry)
        self.retention_deletions = Counter("torpor_retention_deleted_checkpoints_total",
                                           "Checkpoints deleted by retention", registry=registry)
        self.reconcile_errors = Counter("torpor_reconcile_errors_total",
                                        "Reconciles that met an API error (retried with backoff)", registry=registry)
        self.retention_errors = Counter("torpor_retention_errors_total",
                                        "Retention passes of a job, or whole passes, that failed", registry=registry)
        self.retention_up = Gauge("torpor_retention_loop_up",
                                  "1 while the retention/resync task runs and makes progress, else 0",
                                  registry=registry)
        self.reconciles = Counter("torpor_reconciles_total", "Reconcile passes run, by what triggered them "
                                  "(job, pod or node event; wakeup: a scheduled step or an API retry; retention)",
                                  ["trigger"], registry=registry)
        self.watch_events = Counter("torpor_watch_events_total", "Watch events received, by resource and outcome "
                                    "(reconcile, or unchanged: nothing a decision reads changed)",
                                    ["resource", "outcome"], registry=registry)
        self.pod_lists = Counter("torpor_pod_lists_total", "LISTs of a job's pods: the pod index could not answer "
                                 "(first reconcile of a job, a pod just created not yet watched) or a resync",
                                 registry=registry)
        self.job_reads = Counter("torpor_job_reads_total", "GETs of a job by a reconcile: the job cache could not "
                                 "answer (not watched yet, a resumed replica) or a retention pass, an API retry, "
                                 "a decision that creates", registry=registry)
        self.child_lists = Counter("torpor_child_lists_total", "LISTs of a job's Services, ConfigMaps and PDBs: the "
                                   "child index could not answer (first reconcile, a child written since, a "
                                   "resync, a retention pass, an API error)", registry=registry)
        self.cache_rereads = Counter("torpor_cache_rereads_total", "Decisions made from the caches that would "
                                     "create pods or children, made again from a GET and a LIST", registry=registry)
        self.cached = Gauge("torpor_cached_entries", "Entries held in the operator's caches, by cache; every "
                            "per-job cache empties when its jobs are deleted", ["cache"], registry=registry)
        self._phases: dict[str, str] = {}
        self._counts: collections.Counter[str] = collections.Counter()
        for name in PHASES:
            self.jobs.labels(phase=name).set(0)

    def watch_cache(self, name: str, size: Callable[[], int]) -> None:
        """Report ``size()`` as ``torpor_cached_entries{cache=name}`` at every scrape."""
        self.cached.labels(cache=name).set_function(lambda: float(size()))

    def observe(self, key: str, decision: Decision, before: JobStatus) -> None:
        """Count what a decision changed and track the job's phase.

        The counters move by how much ``status.preemptions`` / ``status.restarts`` grew against
        ``before`` (the status the decision was made on), not by the key's presence: a new job's
        first patch carries both at 0 so ``kubectl get tj`` shows zeros.
        """
        status = decision.status or {}
        grew = {name: int(status.get(name, old)) - old
                for name, old in (("preemptions", before.preemptions), ("restarts", before.restarts))}
        if grew["preemptions"] > 0:
            self.preemptions.inc(grew["preemptions"])
        if grew["restarts"] > 0:
            self.restarts.inc(grew["restarts"])
        self.set_phase(key, status.get("phase", before.phase))

    def set_phase(self, key: str, phase: str | None) -> None:
        """Record a job's phase (``None`` forgets the job). Counted as it changes: a reconcile
        costs the same with 10 jobs or 10 000."""
        old = self._phases.pop(key, None) if phase is None else self._phases.get(key)
        if phase is not None:
            self._phases[key] = phase
        if old == phase:
            return
        for name, delta in ((old, -1), (phase, 1)):
            if name is not None:
                self._counts[name] += delta
                if name in PHASES:
                    self.jobs.labels(phase=name).set(self._counts[name])

    def phases_known(self) -> int:
        """Jobs whose phase is counted (``torpor_cached_entries{cache="phases"}``)."""
        return len(self._phases)
