"""Operator-wide settings, read once from ``TORPOR_*`` environment variables at start-up.

Never read at import: tests and the chart set the environment before ``python -m
torpor_operator`` starts, and unit tests build :class:`OperatorSettings` directly.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

__all__ = ["DEFAULT_TERMINATION_TAINTS", "OperatorSettings", "SettingsError", "start_up_priority"]

#: Taints that announce a node is about to go away. Cordoning (``spec.unschedulable``) is
#: watched separately. Soft hints (cluster-autoscaler's ``DeletionCandidateOfClusterAutoscaler``,
#: AWS rebalance recommendations) are left out on purpose: they often do not end in a
#: termination, and each false alarm costs the job a save and a restart.
DEFAULT_TERMINATION_TAINTS: tuple[str, ...] = (
    "ToBeDeletedByClusterAutoscaler",
    "node.kubernetes.io/out-of-service",
    "node.cloudprovider.kubernetes.io/shutdown",
    "cloud.google.com/impending-node-termination",
    "aws-node-termination-handler/spot-itn",
    "aws-node-termination-handler/scheduled-maintenance",
    "aws-node-termination-handler/asg-lifecycle-termination",
    "karpenter.sh/disrupted",
)

_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")

#: Bounds of an explicit peering priority: kopf stores it as a JSON number in the peering
#: object, and integers beyond 2**53 do not survive every JSON reader exactly.
PRIORITY_LIMIT = 2**53 - 1
#: Bounds of the peering lifetime, seconds. kopf refreshes a record 5-10 s before it ends, at
#: least every second: below 5 s a slow keep-alive PATCH would let a working replica look dead;
#: above an hour a crashed replica would block its standby for longer than anyone waits.
PEERING_LIFETIME_BOUNDS = (5, 3600)
#: Most parallel API calls of one decision: each is a thread and a connection to the API server,
#: and past a few hundred the API server's own priority-and-fairness queues throttle anyway.
API_WORKERS_LIMIT = 256


class SettingsError(ValueError):
    """A setting the operator cannot start with; the message names the variable and the value."""


def _env(name: str, parse: type | None = None) -> dict[str, Any]:
    """Field metadata: the variable, and how to parse it when the default's type does not say."""
    return {"env": name, "parse": parse}


def start_up_priority(started_ns: int, tiebreak: int) -> int:
    """The kopf peering priority of a replica that sets none, from its start time.

    Earlier starts get higher priorities, so the replica that has been working longest keeps
    working: a rollout's new pod or a restarted container joins as a standby instead of pausing
    the active replica, and takes over when that one exits (at once) or dies (after its peering
    lifetime). ``tiebreak`` (a random 0..999, drawn at start-up) separates replicas started in
    the same millisecond: two equal priorities would pause both. The value is negative, about
    -1.8e15 in 2025, so any explicit priority >= 0 outranks every replica that sets none.

    Args:
        started_ns: the start time, ``time.time_ns()``.
        tiebreak: 0..999.

    Raises:
        ValueError: ``tiebreak`` outside 0..999 or a negative ``started_ns``.

    Example:
        >>> start_up_priority(1_700_000_000_123_456_789, 7)
        -1700000000123007
    """
    if not 0 <= tiebreak <= 999 or started_ns < 0:
        raise ValueError(f"started_ns must be >= 0 and tiebreak in 0..999, got {started_ns!r}, {tiebreak!r}")
    return -(started_ns // 1_000_000 * 1000 + tiebreak)


@dataclass(frozen=True)
class OperatorSettings:
    """Everything the operator reads from its environment. Defaults suit a single replica."""

    namespaces: tuple[str, ...] = dataclasses.field(default=(), metadata=_env("TORPOR_NAMESPACES"))
    """Namespaces to watch, comma-separated in the environment; empty (the default) watches the
    whole cluster. A list lets the chart grant Roles instead of a ClusterRole."""

    termination_taints: tuple[str, ...] = dataclasses.field(
        default=DEFAULT_TERMINATION_TAINTS, metadata=_env("TORPOR_TERMINATION_TAINTS")
    )
    """Taint keys that mean "this node is going away": a rank on such a node makes the job save
    and move. Comma-separated; default :data:`DEFAULT_TERMINATION_TAINTS` (cluster-autoscaler,
    out-of-service, cloud spot and maintenance notices, Karpenter)."""

    master_port: int = dataclasses.field(default=29500, metadata=_env("TORPOR_MASTER_PORT"))
    """TCP port of rank 0's rendezvous (``MASTER_PORT``); 29500 is torch.distributed's default."""

    backoff_base_seconds: float = dataclasses.field(default=10.0, metadata=_env("TORPOR_BACKOFF_BASE_SECONDS"))
    """Wait before the first restart after a failure; doubled for each further failure, so a
    job that crashes at start-up does not hammer the scheduler and the bucket."""

    backoff_max_seconds: float = dataclasses.field(default=600.0, metadata=_env("TORPOR_BACKOFF_MAX_SECONDS"))
    """Upper bound of the restart backoff, seconds."""

    admission_retries: int = dataclasses.field(default=5, metadata=_env("TORPOR_ADMISSION_RETRIES"))
    """How often one incarnation's ranks are recreated after the kubelet refused to admit them
    (``UnexpectedAdmissionError``, ``OutOfcpu``…, ``NodeAffinity``) before that counts as a failure.
    Such a pod never ran: a device plugin or the node's resource accounting was briefly wrong, so
    it is recreated without counting against ``maxRestarts``; the bound keeps a node that always
    refuses from looping for ever (past it, the job restarts with backoff like after a crash).
    Default 5; 0 makes the first rejection a failure."""

    peer_loss_grace_seconds: float = dataclasses.field(default=60.0, metadata=_env("TORPOR_PEER_LOSS_GRACE_SECONDS"))
    """How long a crash that reads as a lost connection (``Connection reset by peer``…) waits,
    from its ``finishedAt``, for evidence about a rank that still reads as running, before it is
    decided as a failure. A node that vanishes (a spot VM reclaimed without notice) leaves its
    pods reading Running until the node controller marks it NotReady (its grace period: 40 s,
    50 s since Kubernetes 1.32); its peers crash at once. Seconds, >= 0; 0 decides at once."""

    lost_node_force_delete_seconds: float = dataclasses.field(
        default=30.0, metadata=_env("TORPOR_LOST_NODE_FORCE_DELETE_SECONDS")
    )
    """How long a node must have been lost (``Ready`` not ``True`` since its
    ``lastTransitionTime``) before the job's pods on it are force-deleted (grace 0) so that a
    stopping job can restart: no kubelet is left to finish their deletion, and the node
    controller's own eviction waits 300 s and is not a force deletion either. The wait lets a node
    that only blinked come back before two copies of a rank could run; pods of a node tainted
    ``node.kubernetes.io/out-of-service`` are released at once. With Kubernetes' 50 s
    node-monitor grace period the default restarts a job about 80 s after its node stopped
    reporting (docs/operator.md, "A node that stops reporting"). Seconds, >= 0."""

    retention_interval_seconds: float = dataclasses.field(
        default=60.0, metadata=_env("TORPOR_RETENTION_INTERVAL_SECONDS")
    )
    """How often the retention loop wakes, seconds: the jobs it then lists, prunes and refreshes
    ``status.lastCheckpoint`` of are the due ones of :mod:`torpor_operator.retaining` (a running
    job every interval or every ``saveSeconds``, a finished or suspended one once)."""

    api_retry_base_seconds: float = dataclasses.field(default=1.0, metadata=_env("TORPOR_API_RETRY_BASE_SECONDS"))
    """First wait before a reconcile that met an API error (a refused create, a 5xx, no
    connection) runs again; it doubles with each error in a row, up to
    ``api_retry_max_seconds``. kopf never retries an event handler, so the shell does."""

    api_retry_max_seconds: float = dataclasses.field(default=60.0, metadata=_env("TORPOR_API_RETRY_MAX_SECONDS"))
    """Longest wait between retries of a reconcile that keeps meeting API errors, seconds."""

    bucket_timeout_seconds: float = dataclasses.field(default=5.0, metadata=_env("TORPOR_BUCKET_TIMEOUT_SECONDS"))
    """Connect and read timeout of each S3 request the operator makes (two attempts each), and
    the longest a decision that may start an incarnation waits for the job's listing: past it,
    the decision goes on without one (the ranks resolve the newest checkpoint themselves).
    botocore's defaults (8 attempts, 60 s reads) let a dead endpoint delay a restart by minutes."""

    bucket_workers: int = dataclasses.field(default=4, metadata=_env("TORPOR_BUCKET_WORKERS"))
    """Threads for bucket work (listings, retention), apart from the ones the API calls use, so
    a slow store never queues the calls that write GracefulExit. >= 1."""

    reconcile_concurrency: int = dataclasses.field(default=32, metadata=_env("TORPOR_RECONCILE_CONCURRENCY"))
    """Most reconciles of different jobs running at once; the others wait their turn, holding
    nothing but the job's name. Each running one holds its job, pods, children and decision, so
    500 jobs created at once held 500 of those together at the peak. The API server answers a
    few at a time anyway; one job's reconciles are serialised regardless. >= 1."""

    api_workers: int = dataclasses.field(default=16, metadata=_env("TORPOR_API_WORKERS"))
    """Most API calls one decision makes at once: the pod annotations of a stop (one per rank)
    are patched in parallel, at most this many in flight, so that a 1024-rank job is told to
    save in about 1024 / ``api_workers`` round trips instead of 1024. The client's connection
    pool is sized to match. Default 16; 1 patches one after another. 1..256."""

    stale_upload_seconds: float = dataclasses.field(default=3600.0, metadata=_env("TORPOR_STALE_UPLOAD_SECONDS"))
    """Age past which retention aborts a multipart upload of an incomplete checkpoint it deletes
    (the shard of a rank killed mid-save: its parts cost storage and never become an object),
    seconds. Only checkpoints older than the newest complete one are concerned, so a save in
    progress is never touched; the hour by default leaves room for a slow store. > 0."""

    peering: str = dataclasses.field(default="", metadata=_env("TORPOR_PEERING"))
    """Name of the kopf peering object for several operator replicas; empty (the default)
    runs standalone, which is right for exactly one replica. The operator creates the object
    at start-up (a ClusterKopfPeering, or a KopfPeering per watched namespace); kopf's peering
    CRDs (``crds/kopfpeerings.yaml``) must be installed."""

    peering_priority: int | None = dataclasses.field(default=None, metadata=_env("TORPOR_PEERING_PRIORITY", int))
    """kopf peering priority of this replica: it acts only while no live replica has a higher or
    equal one (equal priorities pause both). Unset (the default): drawn at start-up by
    :func:`start_up_priority`, so the longest-running replica leads and replicas of one
    Deployment never tie. Set it only for a replica that must take over from the deployed ones
    (a debugging session: any value >= 0 does); the same value on several replicas pauses them
    all. Within +-(2**53 - 1)."""

    peering_lifetime_seconds: int = dataclasses.field(default=60, metadata=_env("TORPOR_PEERING_LIFETIME_SECONDS"))
    """How long a replica's peering keep-alive stays valid, whole seconds (kopf's
    ``settings.peering.lifetime``; kopf refreshes it 5-10 s before it ends). A replica that dies
    without exiting (SIGKILL, node loss) is replaced by a standby after at most this long; one
    that exits hands over at once. 5..3600, default 60 (kopf's)."""

    health_port: int = dataclasses.field(default=8080, metadata=_env("TORPOR_HEALTH_PORT"))
    """Port of the liveness endpoint ``/healthz``; 0 turns it off."""

    metrics_port: int = dataclasses.field(default=9090, metadata=_env("TORPOR_METRICS_PORT"))
    """Port of the Prometheus ``/metrics`` endpoint; 0 turns it off."""

    log_format: str = dataclasses.field(default="json", metadata=_env("TORPOR_LOG_FORMAT"))
    """``json`` (one object per line, for log collectors) or ``plain`` (for people)."""

    watch_timeout_seconds: int = dataclasses.field(default=300, metadata=_env("TORPOR_WATCH_TIMEOUT_SECONDS"))
    """Server-side timeout of kopf's watch requests, whole seconds (the API server takes no
    fractions): a watch silently lost by a proxy is re-established within this time."""

    def __post_init__(self) -> None:
        for ns in self.namespaces:
            if not _DNS_LABEL.match(ns):
                raise SettingsError(f"namespaces: {ns!r} is not a valid namespace name")
        for taint in self.termination_taints:
            if not taint or any(c.isspace() for c in taint):
                raise SettingsError(f"termination_taints: {taint!r} is not a taint key")
        for name in ("master_port",):
            self._check_port(name, allow_zero=False)
        for name in ("health_port", "metrics_port"):
            self._check_port(name, allow_zero=True)
        grace = self.peer_loss_grace_seconds
        if not isinstance(grace, int | float) or isinstance(grace, bool) or not math.isfinite(grace) or grace < 0:
            raise SettingsError(f"peer_loss_grace_seconds must be a finite number of seconds >= 0, got {grace!r}")
        bound = self.lost_node_force_delete_seconds
        if not isinstance(bound, int | float) or isinstance(bound, bool) or not math.isfinite(bound) or bound < 0:
            raise SettingsError(f"lost_node_force_delete_seconds must be a finite number of seconds >= 0, "
                                f"got {bound!r}")
        if not _is_int(self.admission_retries) or self.admission_retries < 0:
            raise SettingsError(f"admission_retries must be a whole number >= 0, got {self.admission_retries!r}")
        if not _is_int(self.watch_timeout_seconds) or self.watch_timeout_seconds < 1:
            raise SettingsError(f"watch_timeout_seconds must be a whole number of seconds >= 1, "
                                f"got {self.watch_timeout_seconds!r}")
        for name in ("backoff_base_seconds", "backoff_max_seconds", "retention_interval_seconds",
                     "api_retry_base_seconds", "api_retry_max_seconds", "bucket_timeout_seconds",
                     "stale_upload_seconds"):
            value = getattr(self, name)
            if not isinstance(value, int | float) or isinstance(value, bool) or not math.isfinite(value) or value <= 0:
                raise SettingsError(f"{name} must be a finite number of seconds > 0, got {value!r}")
        if self.backoff_max_seconds < self.backoff_base_seconds:
            raise SettingsError(
                f"backoff_max_seconds ({self.backoff_max_seconds!r}) must be >= backoff_base_seconds "
                f"({self.backoff_base_seconds!r})"
            )
        if self.api_retry_max_seconds < self.api_retry_base_seconds:
            raise SettingsError(
                f"api_retry_max_seconds ({self.api_retry_max_seconds!r}) must be >= api_retry_base_seconds "
                f"({self.api_retry_base_seconds!r})"
            )
        if not _is_int(self.bucket_workers) or self.bucket_workers < 1:
            raise SettingsError(f"bucket_workers must be a whole number >= 1, got {self.bucket_workers!r}")
        if not _is_int(self.reconcile_concurrency) or self.reconcile_concurrency < 1:
            raise SettingsError(f"reconcile_concurrency must be a whole number >= 1, "
                                f"got {self.reconcile_concurrency!r}")
        if not _is_int(self.api_workers) or not 1 <= self.api_workers <= API_WORKERS_LIMIT:
            raise SettingsError(f"api_workers must be a whole number in 1..{API_WORKERS_LIMIT}, "
                                f"got {self.api_workers!r}")
        if self.log_format not in ("json", "plain"):
            raise SettingsError(f"log_format must be 'json' or 'plain', got {self.log_format!r}")
        if self.peering and not _DNS_LABEL.match(self.peering):
            raise SettingsError(f"peering: {self.peering!r} is not a valid object name")
        priority = self.peering_priority
        if priority is not None and (not _is_int(priority) or abs(priority) > PRIORITY_LIMIT):
            raise SettingsError(f"peering_priority must be an integer within +-{PRIORITY_LIMIT}, got {priority!r}")
        low, high = PEERING_LIFETIME_BOUNDS
        lifetime = self.peering_lifetime_seconds
        if not _is_int(lifetime) or not low <= lifetime <= high:
            raise SettingsError(f"peering_lifetime_seconds must be a whole number of seconds in {low}..{high}, "
                                f"got {lifetime!r}")

    def _check_port(self, name: str, *, allow_zero: bool) -> None:
        value = getattr(self, name)
        low = 0 if allow_zero else 1
        if not _is_int(value) or not low <= value <= 65535:
            raise SettingsError(f"{name} must be a port number in {low}..65535, got {value!r}")

    def backoff_seconds(self, failures: int) -> float:
        """Wait before the restart that follows the ``failures``-th failure (1-based)."""
        return min(self.backoff_max_seconds, self.backoff_base_seconds * 2 ** max(0, failures - 1))

    def api_retry_seconds(self, errors: int) -> float:
        """Wait before retrying a reconcile after the ``errors``-th API error in a row (1-based)."""
        return min(self.api_retry_max_seconds, self.api_retry_base_seconds * 2 ** max(0, errors - 1))

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> OperatorSettings:
        """Read the settings from ``environ`` (pass ``os.environ`` at start-up).

        Unset or empty variables keep their defaults.

        Raises:
            SettingsError: a value that does not parse or is out of range; the message names
                the variable and the value.
        """
        kwargs: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            var = f.metadata["env"]
            raw = environ.get(var, "").strip()
            if not raw:
                continue
            kind = f.metadata["parse"] or type(f.default)
            if kind is tuple:
                kwargs[f.name] = tuple(part.strip() for part in raw.split(",") if part.strip())
            elif kind is int:
                try:
                    kwargs[f.name] = int(raw)
                except ValueError:
                    raise SettingsError(f"{var} must be an integer, got {raw!r}") from None
            elif kind is float:
                try:
                    kwargs[f.name] = float(raw)
                except ValueError:
                    raise SettingsError(f"{var} must be a number, got {raw!r}") from None
            else:
                kwargs[f.name] = raw
        try:
            return cls(**kwargs)
        except SettingsError as exc:
            names = {f.name: f.metadata["env"] for f in dataclasses.fields(cls)}
            field_name = str(exc).split(" ", 1)[0].rstrip(":")
            raise SettingsError(f"{names.get(field_name, '?')}: {exc}") from None


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
