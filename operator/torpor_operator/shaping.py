"""What shapes a rank's pod, as short digests the pod carries: how a spec change is noticed.

A live incarnation keeps the pods it was made with; a change of the spec that would make
different pods (another image, args, env, resources, save interval, signal, grace period…)
must reach the ranks, and the only way to change a pod's containers is a new pod. So every
rank's pod carries, in ``torpor.dev/pod-shape``, one digest per part of the spec it was built
from, and :func:`torpor_operator.reconciling.decide` compares them with the spec's: a difference
is a graceful restart into a new incarnation (stop reason ``SpecChanged``).

Parts are digested separately so that the message can say which part changed, and so that a
part a later operator version adds is not a change of pods an earlier one made
(:func:`changed_parts` compares only the parts both sides know). Fields that do not shape the
pods (``maxRestarts``, ``startupTimeoutSeconds``, ``gracefulExit.exitDeadlineSeconds``,
``gracefulExit.drainProtection``, ``checkpoint.deleteOnJobDeletion``, ``suspend``) are left out:
they apply without new pods. The digests are of the parsed spec (the CRD's defaults applied,
``containerName`` resolved), so writing out a default or reordering keys changes nothing.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Mapping
from typing import Any

from torpor_operator.spec import TrainingJobSpec

__all__ = ["changed_parts", "format_digests", "parse_digests", "shape_digests"]

#: Hex digits of each digest: 48 bits, plenty to tell two versions of one job's spec apart.
_DIGEST_LENGTH = 12


def _plain(value: Any) -> Any:
    """JSON for the read-only mappings :func:`torpor_operator.spec.parse_spec` makes."""
    if isinstance(value, Mapping):
        return dict(value)
    raise TypeError(f"cannot digest {type(value).__name__}")


def _digest(value: Any) -> str:
    text = json.dumps(value, sort_keys=True, separators=(",", ":"), default=_plain)
    return hashlib.sha256(text.encode()).hexdigest()[:_DIGEST_LENGTH]


def shape_digests(spec: TrainingJobSpec) -> dict[str, str]:
    """One digest per part of ``spec`` that shapes a rank's pod, keyed by the spec field's name.

    ``replicas`` is among them although the CRD refuses to change it (until elastic world size):
    should it change anyway (an older CRD), the job restarts with one world size instead of
    mixing two in one incarnation.
    """
    checkpoint = dataclasses.asdict(spec.checkpoint)
    checkpoint.pop("delete_on_job_deletion")
    parts: dict[str, Any] = {
        "replicas": spec.replicas,
        "procsPerPod": spec.procs_per_pod,
        "containerName": spec.training_container,
        "template": spec.template,
        "checkpoint": checkpoint,
        "gracefulExit": {"signal": spec.graceful_exit.signal,
                         "terminationGracePeriodSeconds": spec.graceful_exit.termination_grace_period_seconds},
    }
    return {name: _digest(value) for name, value in parts.items()}


def format_digests(digests: Mapping[str, str]) -> str:
    """The annotation's value: ``part=digest`` pairs, comma-separated, sorted."""
    return ",".join(f"{name}={digest}" for name, digest in sorted(digests.items()))


def parse_digests(text: str) -> dict[str, str]:
    """Read :func:`format_digests`' output back; malformed pairs are dropped (never a change)."""
    digests = {}
    for pair in text.split(","):
        name, sep, digest = pair.partition("=")
        if sep and name.strip() and digest.strip():
            digests[name.strip()] = digest.strip()
    return digests


def changed_parts(carried: Mapping[str, str], wanted: Mapping[str, str]) -> list[str]:
    """The parts whose digest a pod carries (``carried``) differs from the spec's (``wanted``),
    in the spec's order; parts only one side knows are not changes."""
    return [name for name, digest in wanted.items() if name in carried and carried[name] != digest]
