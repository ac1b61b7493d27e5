"""Applying a decision: what the API may answer when the job or a child is already gone."""

from __future__ import annotations

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
