"""Applying a decision: what the API may answer when the job or a child is already gone."""

from __future__ import annotations

import json
from typing import Any

import pytest
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from torpor_operator.applying import KubeClient
from torpor_operator.reconciling import Decision


class StatusAnswers:
    """Stands in for CustomObjectsApi: every status patch fails with one HTTP status."""

    def __init__(self, status: int) -> None:
        self.status = status
        self.calls: list[tuple[Any, ...]] = []

    def patch_namespaced_custom_object_status(self, *args: Any) -> None:
        self.calls.append(args)
        raise ApiException(status=self.status, reason="stub")


def kube_with(custom: StatusAnswers) -> KubeClient:
    kube = KubeClient(client.ApiClient())  # no request is made by constructing it
    kube.custom = custom  # type: ignore[assignment]
    return kube


def test_a_status_patch_of_a_job_deleted_meanwhile_is_not_an_error() -> None:
    # a job deleted between the read and the patch answers 404: nothing is left to record
    custom = StatusAnswers(404)
    kube_with(custom).apply("ns", "gone", Decision(status={"phase": "Running"}))
    assert len(custom.calls) == 1


def test_other_status_patch_failures_surface() -> None:
    with pytest.raises(ApiException):
        kube_with(StatusAnswers(500)).apply("ns", "job", Decision(status={"phase": "Running"}))


class RawLists:
    """Stands in for CoreV1Api/PolicyV1Api: list calls answer raw JSON, as with ``_preload_content=False``."""

    def __init__(self, items: dict[str, list[dict[str, Any]]]) -> None:
        self.items = items

    def __getattr__(self, call: str) -> Any:
        def listing(namespace: str, *, label_selector: str, _preload_content: bool) -> Any:
            assert _preload_content is False and label_selector == "torpor.dev/job=demo"
            return type("Raw", (), {"data": json.dumps({"items": self.items.get(call, [])}).encode()})()
        return listing


def test_lists_are_read_as_the_api_sends_them() -> None:
    pod = {"metadata": {"name": "demo-1-0", "labels": {"torpor.dev/job": "demo"}}, "spec": {"nodeName": "n"},
           "status": {"containerStatuses": [{"state": {"terminated": {"exitCode": 75}}}]}}
    kube = KubeClient(client.ApiClient())
    kube.core = RawLists({"list_namespaced_pod": [pod], "list_namespaced_config_map": [{"metadata": {"name": "c"}}]})  # type: ignore[assignment]
    kube.policy = RawLists({"list_namespaced_pod_disruption_budget": [{"metadata": {"name": "p"}}]})  # type: ignore[assignment]
    assert kube.list_pods("ns", "demo") == [pod]
    assert [(c["kind"], c["apiVersion"], c["metadata"]["name"]) for c in kube.list_children("ns", "demo")] == [
        ("ConfigMap", "v1", "c"), ("PodDisruptionBudget", "policy/v1", "p")]


class RefusingCore:
    """Stands in for CoreV1Api: refuses to create one pod (a quota), lists ``pods``, records deletions."""

    def __init__(self, pods: list[dict[str, Any]], refuse: str) -> None:
        self.pods, self.refuse = pods, refuse
        self.deleted: list[str] = []

    def create_namespaced_pod(self, namespace: str, body: dict[str, Any]) -> None:
        if body["metadata"]["name"] == self.refuse:
            raise ApiException(status=403, reason="Forbidden")

    def list_namespaced_pod(self, namespace: str, *, label_selector: str, _preload_content: bool) -> Any:
        return type("Raw", (), {"data": json.dumps({"items": self.pods}).encode()})()

    def delete_namespaced_pod(self, name: str, namespace: str, **_: Any) -> Any:
        self.deleted.append(name)
        return type("Raw", (), {"read": lambda self: b"{}", "release_conn": lambda self: None})()

    def __getattr__(self, call: str) -> Any:  # the other kinds' calls, never made here
        return lambda *args, **kwargs: None


def test_a_refused_launch_tears_down_only_the_jobs_own_pods() -> None:
    from test_operator_world import pod

    from torpor_operator.applying import CreateRefused

    ours, orphan = pod("demo", 2, 0), pod("demo", 2, 1, owner_uid=None)  # the orphan: an earlier job's
    core = RefusingCore([ours, orphan], refuse="demo-2-1")
    kube = KubeClient(client.ApiClient())
    kube.core = core  # type: ignore[assignment]
    refused = pod("demo", 2, 1)
    with pytest.raises(CreateRefused):
        kube.apply("team", "demo", Decision(create=(refused,), status={"incarnation": 2}))
    assert core.deleted == ["demo-2-0"]


def test_stopping_sidecars_sets_the_deadline_and_the_mark_in_one_patch() -> None:
    patches: list[tuple[str, dict[str, Any]]] = []
    raw = type("Raw", (), {"read": lambda self: b"{}", "release_conn": lambda self: None})()
    core = type("Core", (), {"patch_namespaced_pod": lambda self, name, ns, body, **_: patches.append((name, body))
                             or raw})()
    kube = KubeClient(client.ApiClient())
    kube.core = core  # type: ignore[assignment]
    kube.apply("team", "demo", Decision(stop_sidecars=("demo-1-0",)))
    [(name, body)] = patches
    assert name == "demo-1-0" and body["spec"] == {"activeDeadlineSeconds": 1}
    assert set(body["metadata"]["annotations"]) == {"torpor.dev/sidecars-stopped-at"}
