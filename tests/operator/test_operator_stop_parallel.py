"""A stop of N ranks annotates every pod, in parallel, and one failed patch loses no other (issue 13, item 2).

The real API server: the pods are real objects (no node runs them, none is needed to annotate
them). The fault is real too: one pod deleted before the stop (the API answers 404) and one pod
whose updates a ValidatingAdmissionPolicy denies (the API answers 422), so that pod's patch
fails while the others' succeed. The timing (sub-linear in N) is a bench, not asserted here.
"""

from __future__ import annotations

import contextlib
import json
import threading
from typing import TYPE_CHECKING, Any

import pytest
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from controlplane import wait_for_condition
from torpor_operator.applying import KubeClient
from torpor_operator.contract import ANNOTATION_EXIT_REQUESTED
from torpor_operator.decisions import Decision

if TYPE_CHECKING:
    from controlplane import ControlPlane

RANKS = 12
STAMP = "2026-01-01T00:00:00Z"


def _pod(name: str) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "labels": {"test": "stop"}},
            "spec": {"containers": [{"name": "c", "image": "none"}]}}


def _annotated(core: client.CoreV1Api, namespace: str) -> set[str]:
    pods = core.list_namespaced_pod(namespace, label_selector="test=stop").items
    return {p.metadata.name for p in pods if (p.metadata.annotations or {}).get(ANNOTATION_EXIT_REQUESTED) == STAMP}


def _deny(control_plane: ControlPlane, namespace: str, pod: str, operation: str = "UPDATE") -> str:
    """A ValidatingAdmissionPolicy that refuses every ``operation`` (UPDATE, CREATE: as a quota
    would) of ``pod`` in ``namespace``; the name of its binding."""
    name = f"deny-{operation.lower()}-{namespace}"[:60].rstrip("-")
    policy = {"apiVersion": "admissionregistration.k8s.io/v1", "kind": "ValidatingAdmissionPolicy",
              "metadata": {"name": name},
              "spec": {"failurePolicy": "Fail",
                       "matchConstraints": {"resourceRules": [{"apiGroups": [""], "apiVersions": ["v1"],
                                                               "operations": [operation], "resources": ["pods"]}]},
                       "validations": [{"expression": f"object.metadata.name != '{pod}'",
                                        "message": "this is denied by the test"}]}}
    binding = {"apiVersion": "admissionregistration.k8s.io/v1", "kind": "ValidatingAdmissionPolicyBinding",
               "metadata": {"name": name},
               "spec": {"policyName": name, "validationActions": ["Deny"],
                        "matchResources": {"namespaceSelector": {"matchLabels": {
                            "kubernetes.io/metadata.name": namespace}}}}}
    control_plane.kubectl("apply", "-f", "-", input=json.dumps({"apiVersion": "v1", "kind": "List",
                                                                 "items": [policy, binding]}))
    return name


def test_a_stop_annotates_every_rank_and_one_failed_patch_loses_no_other(
        control_plane: ControlPlane, namespace: str, kube: client.ApiClient) -> None:
    core = client.CoreV1Api(kube)
    names = [f"rank-{i}" for i in range(RANKS)]
    for name in names:
        core.create_namespaced_pod(namespace, _pod(name))
    gone, denied = names[3], names[7]
    core.delete_namespaced_pod(gone, namespace, grace_period_seconds=0)
    wait_for_condition(lambda: gone not in {p.metadata.name for p in core.list_namespaced_pod(namespace).items},
                       timeout=30, what=f"{gone} deleted")
    binding = _deny(control_plane, namespace, denied)

    def policy_in_force() -> bool:  # the API server compiles and loads a policy asynchronously
        try:
            core.patch_namespaced_pod(denied, namespace, {"metadata": {"annotations": {"probe": "1"}}})
        except ApiException as exc:
            return exc.status == 422
        return False

    wait_for_condition(policy_in_force, timeout=60, what="the test's admission policy in force")

    kube_client = KubeClient(kube, workers=4)
    decision = Decision(annotate=tuple((name, {ANNOTATION_EXIT_REQUESTED: STAMP}) for name in names))
    with pytest.raises(ApiException) as raised:
        kube_client.apply(namespace, "job", decision)
    assert raised.value.status == 422, "the denied patch is reported, so the shell retries the reconcile"
    assert _annotated(core, namespace) == set(names) - {gone, denied}, "every other rank was annotated"

    # the retry (the next reconcile) finds the pods it could not annotate, and the fault has gone
    control_plane.kubectl("delete", "validatingadmissionpolicybinding", binding)
    wait_for_condition(lambda: not policy_in_force(), timeout=60, what="the test's admission policy gone")
    kube_client.apply(namespace, "job", Decision(annotate=((denied, {ANNOTATION_EXIT_REQUESTED: STAMP}),)))
    assert _annotated(core, namespace) == set(names) - {gone}


def _observe(kube_client: KubeClient, call: str, workers: int) -> tuple[threading.Barrier, list[int]]:
    """Wrap ``kube_client.core.<call>`` so that every real call is observed on its way to the API
    server: the first ``workers`` wait for each other (a sequential loop would never get past the
    first) and the most ever in flight is counted. Returns the barrier and ``[most]``."""
    real = getattr(kube_client.core, call)
    together = threading.Barrier(workers, timeout=30)
    lock, in_flight, most = threading.Lock(), [0], [0]

    def observed(*args: Any, **kwargs: Any) -> Any:
        with lock:
            in_flight[0] += 1
            most[0] = max(most[0], in_flight[0])
        try:
            if not together.broken:
                with contextlib.suppress(threading.BrokenBarrierError):
                    together.wait()  # passes once `workers` calls are in flight
            return real(*args, **kwargs)
        finally:
            with lock:
                in_flight[0] -= 1

    setattr(kube_client.core, call, observed)
    return together, most


def test_a_stop_patches_up_to_the_bound_at_once(control_plane: ControlPlane, namespace: str,
                                                kube: client.ApiClient) -> None:
    """The patches of one stop overlap, ``workers`` at most. Each real patch is observed on its
    way to the API server: the first ``workers`` wait for each other (a sequential stop would
    never get past the first), and no more than ``workers`` are ever in flight."""
    core = client.CoreV1Api(kube)
    names = [f"rank-{i}" for i in range(RANKS)]
    for name in names:
        core.create_namespaced_pod(namespace, _pod(name))
    workers = 4
    kube_client = KubeClient(kube, workers=workers)
    together, most = _observe(kube_client, "patch_namespaced_pod", workers)
    kube_client.apply(namespace, "job", Decision(annotate=tuple(
        (name, {ANNOTATION_EXIT_REQUESTED: STAMP}) for name in names)))
    assert not together.broken, "the first patches never were in flight together"
    assert most[0] == workers, most
    assert _annotated(core, namespace) == set(names)


def test_a_launch_creates_its_pods_up_to_the_bound_at_once(control_plane: ControlPlane, namespace: str,
                                                            kube: client.ApiClient) -> None:
    """The creates of one launch overlap, ``workers`` at most (observed as the patches are)."""
    workers = 4
    kube_client = KubeClient(kube, workers=workers)
    together, most = _observe(kube_client, "create_namespaced_pod", workers)
    kube_client.apply(namespace, "job", Decision(create=tuple(_pod(f"rank-{i}") for i in range(RANKS))))
    assert not together.broken, "the first creates never were in flight together"
    assert most[0] == workers, most
    core = client.CoreV1Api(kube)
    assert {p.metadata.name for p in core.list_namespaced_pod(namespace, label_selector="test=stop").items} == {
        f"rank-{i}" for i in range(RANKS)}


def test_a_refused_create_among_parallel_ones_leaves_no_rank_of_the_launch(
        control_plane: ControlPlane, namespace: str, kube: client.ApiClient) -> None:
    from torpor_operator.applying import CreateRefused

    core = client.CoreV1Api(kube)
    refused = "rank-5"
    binding = _deny(control_plane, namespace, refused, "CREATE")

    def policy_in_force() -> bool:
        try:
            core.create_namespaced_pod(namespace, _pod(refused), dry_run="All")
        except ApiException as exc:
            return exc.status == 422
        return False

    wait_for_condition(policy_in_force, timeout=60, what="the test's admission policy in force")
    try:
        with pytest.raises(CreateRefused) as raised:
            KubeClient(kube, workers=4).apply(namespace, "job", Decision(
                create=tuple(_pod(f"rank-{i}") for i in range(RANKS))))
    finally:
        control_plane.kubectl("delete", "validatingadmissionpolicybinding", binding)
    assert raised.value.name == refused
    assert sorted(raised.value.torn_down) == sorted(f"rank-{i}" for i in range(RANKS) if f"rank-{i}" != refused)
    wait_for_condition(lambda: not core.list_namespaced_pod(namespace, label_selector="test=stop").items,
                       timeout=30, what="every created rank of the refused launch deleted")
