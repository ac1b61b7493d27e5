"""The TrainingJob spec as frozen dataclasses, parsed from the custom resource's ``spec`` dict.

The CRD (``crds/trainingjobs.yaml``) is the one source of truth. Every field here carries a
:class:`CrdField` that repeats its CRD name, requiredness, default, enum and bounds, and
``tests/unit/test_crd_spec_model.py`` walks the CRD schema and checks them one by one, so the
two cannot drift. Parsing applies the same defaults as the API server (so a dict that never
went through the server, as in unit tests, means the same thing) and re-checks the CEL rules,
with errors that name the field and the value.
"""

from __future__ import annotations

import dataclasses
import functools
import re
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Annotated, Any, TypeVar

__all__ = [
    "DEFAULT_KEEP_MAX",
    "CheckpointSpec",
    "CrdField",
    "ElasticSpec",
    "EncryptionSpec",
    "GracefulExitSpec",
    "SpecError",
    "TrainingJobSpec",
    "check_job_name",
    "crd_fields",
    "parse_spec",
]

#: Checkpoints kept when neither keepMax nor keepPerNMinutes is set (the seed's default).
DEFAULT_KEEP_MAX = 5

_URI = re.compile(r"^s3://[a-z0-9][a-z0-9.-]{1,61}[a-z0-9](/.*)?$")
_ENDPOINT = re.compile(r"^https?://[^/]+")
_JOB_NAME = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
_JOB_NAME_MAX = 40
_SIGNALS = ("SIGTERM", "SIGINT", "SIGHUP", "SIGUSR1", "SIGUSR2")
_CIPHERS = ("AES-GCM", "AES-CBC", "SM4-CBC")


class SpecError(ValueError):
    """A TrainingJob spec that can never work; the message names the field and the value."""


@dataclass(frozen=True)
class CrdField:
    """How one dataclass field maps onto one property of the CRD schema.

    Attached with ``Annotated``; the field's Python default is the schema's ``default`` (a
    nested spec's default factory stands for the schema default ``{}``), and an optional
    field without a schema default defaults to ``None``.

    Attributes:
        name: the property's name in the CRD (camelCase).
        kind: the JSON type: ``integer``, ``boolean``, ``string`` or ``object``.
        required: listed in the parent's ``required``.
        enum: the schema's ``enum``.
        minimum: ``minimum`` (integers) or ``minLength`` (strings).
        maximum: ``maximum`` (integers) or ``maxLength`` (strings).
        nested: the dataclass parsing an object property; ``None`` for an opaque object.
    """

    name: str
    kind: str
    required: bool = False
    enum: tuple[str, ...] | None = None
    minimum: int | None = None
    maximum: int | None = None
    nested: type | None = None


@functools.cache
def crd_fields(cls: type) -> tuple[tuple[dataclasses.Field[Any], CrdField], ...]:
    """The dataclass fields of a spec class with their CRD mapping, in declaration order.

    Cached per class: ``typing.get_type_hints`` resolves every annotation anew on each call, and
    the operator parses the spec on every reconcile (it was most of ``Job.from_dict``'s 2 ms)."""
    hints = typing.get_type_hints(cls, include_extras=True)
    return tuple((f, next(m for m in hints[f.name].__metadata__ if isinstance(m, CrdField)))
                 for f in dataclasses.fields(cls))


@dataclass(frozen=True)
class EncryptionSpec:
    """``spec.checkpoint.encryption``: the cipher and where its key lives."""

    key_secret: Annotated[str, CrdField("keySecret", "string", required=True, minimum=1, maximum=253)]
    mode: Annotated[str, CrdField("mode", "string", enum=_CIPHERS)] = "AES-GCM"
    key_secret_key: Annotated[str, CrdField("keySecretKey", "string", minimum=1, maximum=253)] = "key"


@dataclass(frozen=True)
class CheckpointSpec:
    """``spec.checkpoint``: where checkpoints go, how often, and how many are kept."""

    uri: Annotated[str, CrdField("uri", "string", required=True, maximum=1024)]
    endpoint: Annotated[str | None, CrdField("endpoint", "string", maximum=1024)] = None
    credentials_secret: Annotated[str | None, CrdField("credentialsSecret", "string", minimum=1, maximum=253)] = None
    save_steps: Annotated[int | None, CrdField("saveSteps", "integer", minimum=1, maximum=100_000_000)] = None
    save_seconds: Annotated[int | None, CrdField("saveSeconds", "integer", minimum=1, maximum=604_800)] = None
    keep_max: Annotated[int | None, CrdField("keepMax", "integer", minimum=1, maximum=10_000)] = None
    keep_per_n_minutes: Annotated[
        int | None, CrdField("keepPerNMinutes", "integer", minimum=1, maximum=525_600)
    ] = None
    async_save: Annotated[bool, CrdField("asyncSave", "boolean")] = False
    delete_on_job_deletion: Annotated[bool, CrdField("deleteOnJobDeletion", "boolean")] = False
    encryption: Annotated[EncryptionSpec | None, CrdField("encryption", "object", nested=EncryptionSpec)] = None

    def __post_init__(self) -> None:
        if not _URI.match(self.uri):
            raise SpecError(
                f"spec.checkpoint.uri must be s3://<bucket>[/<prefix>] with a valid bucket name, got {self.uri!r}"
            )
        if self.endpoint is not None and not _ENDPOINT.match(self.endpoint):
            raise SpecError(f"spec.checkpoint.endpoint must be an http:// or https:// URL, got {self.endpoint!r}")
        if self.save_steps is not None and self.save_seconds is not None:
            raise SpecError(
                "spec.checkpoint.saveSteps and spec.checkpoint.saveSeconds are exclusive; set at most one, "
                f"got saveSteps={self.save_steps} and saveSeconds={self.save_seconds}"
            )
        if self.keep_max is not None and self.keep_per_n_minutes is not None:
            raise SpecError(
                "spec.checkpoint.keepMax and spec.checkpoint.keepPerNMinutes are exclusive; set at most one, "
                f"got keepMax={self.keep_max} and keepPerNMinutes={self.keep_per_n_minutes}"
            )

    @property
    def effective_keep_max(self) -> int:
        """The count kept by keepMax, ``DEFAULT_KEEP_MAX`` when neither retention field is set, else 0."""
        if self.keep_max is not None:
            return self.keep_max
        return 0 if self.keep_per_n_minutes is not None else DEFAULT_KEEP_MAX

    def job_uri(self, namespace: str, name: str) -> str:
        """Where one job's checkpoints live: ``<uri>/<namespace>/<name>``."""
        return f"{self.uri.rstrip('/')}/{namespace}/{name}"


@dataclass(frozen=True)
class GracefulExitSpec:
    """``spec.gracefulExit``: how ranks are asked to stop and how long they have."""

    signal: Annotated[str, CrdField("signal", "string", enum=_SIGNALS)] = "SIGTERM"
    termination_grace_period_seconds: Annotated[
        int, CrdField("terminationGracePeriodSeconds", "integer", minimum=1, maximum=86_400)
    ] = 120
    drain_protection: Annotated[bool, CrdField("drainProtection", "boolean")] = False
    exit_deadline_seconds: Annotated[int, CrdField("exitDeadlineSeconds", "integer", minimum=1, maximum=86_400)] = 60


@dataclass(frozen=True)
class ElasticSpec:
    """``spec.elastic``: run on fewer ranks when not all of them can be placed, and grow back.

    Without it a rank that cannot be placed keeps the job Pending until
    ``startupTimeoutSeconds`` makes that a failure. With it the job restarts on the ranks that
    were placed (at least ``minReplicas``) after ``waitSeconds``, and tries all of
    ``spec.replicas`` again right after a complete checkpoint, at most every
    ``growIntervalSeconds`` (:mod:`torpor_operator.sizing`).
    """

    min_replicas: Annotated[int, CrdField("minReplicas", "integer", required=True, minimum=1, maximum=1024)]
    wait_seconds: Annotated[int, CrdField("waitSeconds", "integer", minimum=1, maximum=86_400)] = 60
    grow_interval_seconds: Annotated[int, CrdField("growIntervalSeconds", "integer", minimum=10,
                                                   maximum=604_800)] = 600


@dataclass(frozen=True)
class TrainingJobSpec:
    """``spec`` of a TrainingJob.

    ``template`` is the user's PodTemplateSpec as a read-only mapping; builders copy it before
    adding to it.
    """

    template: Annotated[Mapping[str, Any], CrdField("template", "object", required=True)]
    checkpoint: Annotated[CheckpointSpec, CrdField("checkpoint", "object", required=True, nested=CheckpointSpec)]
    replicas: Annotated[int, CrdField("replicas", "integer", minimum=1, maximum=1024)] = 1
    procs_per_pod: Annotated[int, CrdField("procsPerPod", "integer", minimum=1, maximum=64)] = 1
    """Training processes in each rank's pod (one per GPU, as ``torchrun --nproc-per-node``).
    The operator sets ``NNODES``/``NODE_RANK``, ``LOCAL_WORLD_SIZE`` and the job-wide
    ``WORLD_SIZE`` (pods × processes); the pod's command starts the processes: torpor's
    launcher ``python -m torpor.run`` (which stops them together and folds their exits into
    the pod's) or ``torchrun``. ``replicas`` and ``elastic`` count pods."""
    container_name: Annotated[str | None, CrdField("containerName", "string", minimum=1, maximum=63)] = None
    graceful_exit: Annotated[GracefulExitSpec, CrdField("gracefulExit", "object", nested=GracefulExitSpec)] = (
        dataclasses.field(default_factory=GracefulExitSpec)
    )
    max_restarts: Annotated[int, CrdField("maxRestarts", "integer", minimum=0, maximum=1000)] = 3
    startup_timeout_seconds: Annotated[int, CrdField("startupTimeoutSeconds", "integer", minimum=10,
                                                     maximum=86_400)] = 600
    suspend: Annotated[bool, CrdField("suspend", "boolean")] = False
    ttl_seconds_after_finished: Annotated[int | None, CrdField("ttlSecondsAfterFinished", "integer", minimum=0,
                                                               maximum=31_536_000)] = None
    """Seconds after ``status.completionTime`` when the operator deletes a finished job (batch/v1
    Job's field); ``None`` keeps it. Read from the status, so a restarted operator keeps the time."""
    elastic: Annotated[ElasticSpec | None, CrdField("elastic", "object", nested=ElasticSpec)] = None

    def __post_init__(self) -> None:
        if self.elastic is not None:
            if self.elastic.min_replicas > self.replicas:
                raise SpecError(
                    "spec.elastic.minReplicas must be at most spec.replicas; "
                    f"got minReplicas {self.elastic.min_replicas} and replicas {self.replicas}"
                )
            if self.elastic.wait_seconds >= self.startup_timeout_seconds:
                raise SpecError(
                    "spec.elastic.waitSeconds must be less than spec.startupTimeoutSeconds (past it a rank that "
                    f"cannot start is a failure); got waitSeconds {self.elastic.wait_seconds} and "
                    f"startupTimeoutSeconds {self.startup_timeout_seconds}"
                )
        pod_spec = self.template.get("spec")
        if not isinstance(pod_spec, Mapping):
            raise SpecError(f"spec.template.spec must be an object, got {pod_spec!r}")
        restart_policy = pod_spec.get("restartPolicy", "Never")
        if restart_policy != "Never":
            raise SpecError(
                "spec.template.spec.restartPolicy must be Never or left out: the operator restarts the whole job, "
                f"never a single rank; got {restart_policy!r}"
            )
        containers = pod_spec.get("containers")
        if not isinstance(containers, list) or not containers:
            raise SpecError(f"spec.template.spec.containers must be a non-empty list, got {containers!r}")
        names = [c.get("name") if isinstance(c, Mapping) else None for c in containers]
        if self.container_name is None:
            if len(containers) != 1:
                raise SpecError(
                    "spec.containerName must name one of spec.template.spec.containers when the template has "
                    f"more than one container; got containerName unset and containers {names}"
                )
        elif self.container_name not in names:
            raise SpecError(
                f"spec.containerName must name one of spec.template.spec.containers {names}, "
                f"got {self.container_name!r}"
            )

    @property
    def training_container(self) -> str:
        """Name of the container that runs the training script."""
        if self.container_name is not None:
            return self.container_name
        return str(self.template["spec"]["containers"][0]["name"])


def check_job_name(name: str) -> None:
    """Apply the CRD's rule on ``metadata.name`` (it prefixes hostnames and the Service name).

    Raises:
        SpecError: the name is not a DNS-1035 label of at most 40 characters.
    """
    if len(name) > _JOB_NAME_MAX or not _JOB_NAME.match(name):
        raise SpecError(
            "metadata.name must be a DNS-1035 label (lower-case letters, digits and '-', starting with a letter) "
            f"of at most {_JOB_NAME_MAX} characters, got {name!r}"
        )


def parse_spec(spec: Mapping[str, Any]) -> TrainingJobSpec:
    """Parse a TrainingJob's ``spec``, applying the CRD's defaults and rules.

    Args:
        spec: the ``spec`` of the custom resource, as the API returns it (camelCase keys).

    Returns:
        The frozen spec model.

    Raises:
        SpecError: a field is missing, of the wrong type, out of bounds, not in its enum, or
            breaks a cross-field rule; the message names the field and the value.
    """
    return _parse_object(TrainingJobSpec, spec, "spec")


_T = TypeVar("_T")


def _parse_object(cls: type[_T], data: Any, path: str) -> _T:
    if not isinstance(data, Mapping):
        raise SpecError(f"{path} must be an object, got {data!r}")
    fields = crd_fields(cls)
    known = {crd.name for _, crd in fields}
    unknown = sorted(set(data) - known)
    if unknown:
        raise SpecError(f"{path} has unknown fields {unknown}; known fields are {sorted(known)}")
    kwargs: dict[str, Any] = {}
    for f, crd in fields:
        where = f"{path}.{crd.name}"
        if data.get(crd.name) is None:
            if crd.required:
                raise SpecError(f"{where} is required")
            continue  # the dataclass default is the CRD default
        kwargs[f.name] = _parse_value(crd, data[crd.name], where)
    return cls(**kwargs)


def _parse_value(crd: CrdField, value: Any, where: str) -> Any:
    if crd.kind == "object":
        if crd.nested is not None:
            return _parse_object(crd.nested, value, where)
        if not isinstance(value, Mapping):
            raise SpecError(f"{where} must be an object, got {value!r}")
        return types.MappingProxyType(dict(value))
    if crd.kind == "boolean":
        if not isinstance(value, bool):
            raise SpecError(f"{where} must be true or false, got {value!r}")
        return value
    if crd.kind == "integer":
        if isinstance(value, bool) or not isinstance(value, int):
            raise SpecError(f"{where} must be an integer, got {value!r}")
        if crd.minimum is not None and value < crd.minimum:
            raise SpecError(f"{where} must be >= {crd.minimum}, got {value}")
        if crd.maximum is not None and value > crd.maximum:
            raise SpecError(f"{where} must be <= {crd.maximum}, got {value}")
        return value
    if not isinstance(value, str):
        raise SpecError(f"{where} must be a string, got {value!r}")
    if crd.enum is not None and value not in crd.enum:
        raise SpecError(f"{where} must be one of {list(crd.enum)}, got {value!r}")
    if crd.minimum is not None and len(value) < crd.minimum:
        raise SpecError(f"{where} must be at least {crd.minimum} characters long, got {value!r}")
    if crd.maximum is not None and len(value) > crd.maximum:
        raise SpecError(f"{where} must be at most {crd.maximum} characters long, got {len(value)} characters")
    return value
