"""Which watch events can alter a decision, and the slim node the shell keeps (issue 13, items
1, 2 and 4; pure, no cluster)."""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest
from test_operator_world import Cluster, job_body, node, pod

from torpor_operator.contract import ANNOTATION_EXIT_REQUESTED
from torpor_operator.observing import NodeView, PodView
from torpor_operator.owning import controlled_by, stale_objects
from torpor_operator.watching import Seen, merge, relevant, slim_node, slim_pod


def full_node(name: str = "node-a", **kw: Any) -> dict[str, Any]:
    """A Node as a kubelet keeps it: heartbeats, images, capacity, several conditions."""
    body = node(name, **kw)
    body["metadata"].update(resourceVersion="41", labels={"kubernetes.io/hostname": name},
                            managedFields=[{"manager": "kubelet"}])
    body["status"]["conditions"][0].update(lastHeartbeatTime="2026-01-01T11:00:00Z", reason="KubeletReady",
                                           message="kubelet is posting ready status")
    body["status"]["conditions"].append({"type": "MemoryPressure", "status": "False",
                                         "lastHeartbeatTime": "2026-01-01T11:00:00Z"})
    body["status"].update(images=[{"names": ["python:3.11"], "sizeBytes": 10**9}], capacity={"cpu": "2"},
                          addresses=[{"type": "InternalIP", "address": "10.0.0.1"}])
    return body


@pytest.mark.parametrize("kw", [{}, {"unschedulable": True}, {"taints": ("a", "node.kubernetes.io/unreachable")},
                                {"ready": "Unknown", "since": "2026-01-01T10:00:00Z"}])
def test_a_slim_node_reads_as_the_whole_node(kw: dict[str, Any]) -> None:
    whole = full_node(**kw)
    whole["spec"].setdefault("taints", []).append({"key": "t", "value": "v", "effect": "NoExecute",
                                                   "timeAdded": "2026-01-01T10:30:00Z"})
    slim = slim_node(whole)
    assert NodeView.from_dict(slim) == NodeView.from_dict(whole)
    assert "images" not in slim["status"] and "labels" not in slim["metadata"]
    assert [c["type"] for c in slim["status"]["conditions"]] == ["Ready"]


def test_a_node_heartbeat_is_no_change() -> None:
    before, after = full_node(), full_node()
    after["metadata"]["resourceVersion"] = "42"
    for c in after["status"]["conditions"]:
        c["lastHeartbeatTime"] = "2026-01-01T11:00:40Z"
    after["status"]["images"].append({"names": ["busybox"], "sizeBytes": 1})
    assert relevant("Node", before) == relevant("Node", after)
    cordoned = full_node(unschedulable=True)
    assert relevant("Node", before) != relevant("Node", cordoned)


def test_kopfs_annotations_and_a_resource_version_are_no_change_of_a_job() -> None:
    before = job_body(status={"phase": "Running", "incarnation": 1})
    before["metadata"].update(resourceVersion="7", generation=1)
    after = copy.deepcopy(before)
    after["metadata"].update(resourceVersion="8", finalizers=["torpor.dev/kopf-finalizer"],
                             annotations={"torpor.dev/last-handled-configuration": "{...}",
                                          "torpor.dev/delete_checkpoints": "{}"},
                             managedFields=[{"manager": "kopf"}])
    assert relevant("TrainingJob", before) == relevant("TrainingJob", after)


@pytest.mark.parametrize("change", [
    lambda j: j["spec"].update(replicas=3),
    lambda j: j["metadata"].update(generation=2),
    lambda j: j["metadata"].update(deletionTimestamp="2026-01-01T11:00:00Z"),
    lambda j: j["status"].update(phase="Stopping"),
    lambda j: j["metadata"].update(uid="uid-2"),
])
def test_what_a_decision_reads_of_a_job_is_a_change(change: Any) -> None:
    before = job_body(status={"phase": "Running", "incarnation": 1})
    after = copy.deepcopy(before)
    change(after)
    assert relevant("TrainingJob", before) != relevant("TrainingJob", after)


def test_a_pod_change_counts_unless_only_its_version_or_probe_time_moved() -> None:
    before = pod("demo", 1, 0)
    before["metadata"].update(resourceVersion="3", managedFields=[{"manager": "kubelet"}])
    before["status"].setdefault("conditions", []).append({"type": "PodScheduled", "status": "True",
                                                          "lastProbeTime": None})
    noise = copy.deepcopy(before)
    noise["metadata"].update(resourceVersion="4", managedFields=[{"manager": "kubelet"}, {"manager": "x"}])
    noise["status"]["conditions"][-1]["lastProbeTime"] = "2026-01-01T11:00:00Z"
    assert relevant("Pod", before) == relevant("Pod", noise)
    for change in (lambda p: p["metadata"].setdefault("annotations", {}).update({ANNOTATION_EXIT_REQUESTED: "x"}),
                   lambda p: p["status"].update(phase="Failed"),
                   lambda p: p["metadata"].update(deletionTimestamp="2026-01-01T11:00:00Z"),
                   lambda p: p["spec"].update(nodeName="node-b")):
        after = copy.deepcopy(before)
        change(after)
        assert relevant("Pod", before) != relevant("Pod", after)


def test_relevant_names_an_unknown_kind() -> None:
    with pytest.raises(ValueError, match=r"kind must be .*got 'Service'"):
        relevant("Service", {})


def test_seen_skips_what_it_saw_or_was_told_was_written() -> None:
    seen = Seen("TrainingJob")
    key = ("ns", "demo")
    first = job_body(status={"phase": "Pending"})
    assert seen.changed(key, first)
    assert not seen.changed(key, copy.deepcopy(first))
    written = copy.deepcopy(first)
    written["status"]["phase"] = "Running"
    seen.record(key, written)  # the operator's own status patch, as the API answered it
    event = copy.deepcopy(written)
    event["metadata"]["resourceVersion"] = "99"
    assert not seen.changed(key, event)
    event["status"]["phase"] = "Stopping"  # someone else's change after it
    assert seen.changed(key, event)
    assert key in seen and len(seen) == 1
    seen.record(key, None)  # a patch of a job that was gone records nothing
    seen.drop(key)
    assert key not in seen and len(seen) == 0
    assert seen.changed(key, event)  # a job of the same name created again is new


def test_an_expected_status_patch_is_no_change_when_its_event_comes_first() -> None:
    seen = Seen("TrainingJob")
    key = ("team", "demo")
    body = job_body(status={"phase": "Pending", "restarts": 0, "lastCheckpoint": {"name": "a", "step": 1}})
    assert seen.changed(key, body)
    patch = {"phase": "Running", "lastCheckpoint": {"step": 2}, "restarts": None}
    seen.expect(key, body, patch)
    event = copy.deepcopy(body)
    event["metadata"]["resourceVersion"] = "12"
    event["status"] = {"phase": "Running", "lastCheckpoint": {"name": "a", "step": 2}}
    assert not seen.changed(key, event)


def test_merge_follows_rfc_7386() -> None:
    assert merge({"a": 1, "b": {"c": 1, "d": 2}, "e": [1]}, {"a": None, "b": {"c": None, "x": 3}, "e": [2]}) == \
        {"b": {"d": 2, "x": 3}, "e": [2]}


def kubelet_pod() -> dict[str, Any]:
    """A rank's pod as the operator makes it, with the metadata the API server adds and the
    status a kubelet writes while it runs."""
    c = Cluster(job_body())
    made = next(o for o in c.decide().create if o["kind"] == "Pod")
    body = copy.deepcopy(made)
    body["metadata"].update(uid="pod-uid", resourceVersion="77", creationTimestamp="2026-01-01T11:00:00Z",
                            managedFields=[{"manager": "torpor", "operation": "Update", "fieldsV1": {"f:spec": {}}}])
    body["spec"].update(nodeName="node-a", tolerations=[{"key": "node.kubernetes.io/not-ready", "operator": "Exists",
                                                         "effect": "NoExecute", "tolerationSeconds": 300}])
    body["status"] = {
        "phase": "Running", "hostIP": "10.0.0.1", "podIP": "10.1.0.7", "qosClass": "BestEffort",
        "startTime": "2026-01-01T11:00:01Z",
        "conditions": [{"type": t, "status": "True", "lastProbeTime": None,
                        "lastTransitionTime": "2026-01-01T11:00:02Z"}
                       for t in ("PodReadyToStartContainers", "Initialized", "Ready", "ContainersReady",
                                 "PodScheduled")],
        "containerStatuses": [{"name": "train", "ready": True, "restartCount": 0, "started": True,
                               "image": "python:3.11", "imageID": "sha256:" + "0" * 64, "containerID": "local://1234",
                               "state": {"running": {"startedAt": "2026-01-01T11:00:02Z"}}, "lastState": {}}],
    }
    return body


def test_the_pod_index_keeps_a_pod_as_the_fields_decisions_read() -> None:
    whole = kubelet_pod()
    slim = slim_pod(whole)
    assert PodView.from_dict(slim, "train") == PodView.from_dict(whole, "train")
    assert controlled_by(slim, "uid-1") and controlled_by(whole, "uid-1")
    assert stale_objects([slim], "demo", "other") == stale_objects([whole], "demo", "other")
    assert slim["metadata"]["resourceVersion"] == "77"  # the index orders events by it
    assert "managedFields" not in slim["metadata"] and "volumes" not in slim["spec"]
    # what each rank costs the index: the figure is in bench/README.md (issue 13, item 4)
    assert len(json.dumps(slim)) < len(json.dumps(whole)) / 2, (len(json.dumps(slim)), len(json.dumps(whole)))


def test_a_kubelets_bookkeeping_of_a_pod_is_no_change_and_the_slim_copy_is_its_own_slim_copy() -> None:
    """A pod's relevant content is what the pod index keeps (the fields decisions read): so the
    operator can tell its own annotation patch's event from the slim copy it holds."""
    before = kubelet_pod()
    after = copy.deepcopy(before)
    after["metadata"]["resourceVersion"] = "78"
    after["status"].update(podIP="10.1.0.8", hostIP="10.0.0.2")
    after["status"]["containerStatuses"][0].update(imageID="sha256:" + "1" * 64, restartCount=0)
    after["status"]["conditions"][0]["lastTransitionTime"] = "2026-01-01T11:05:00Z"
    assert relevant("Pod", before) == relevant("Pod", after)
    assert slim_pod(slim_pod(before)) == slim_pod(before)
    assert relevant("Pod", slim_pod(before)) == relevant("Pod", before)
    listed = {k: v for k, v in before.items() if k not in ("apiVersion", "kind")}  # a LIST's item
    assert relevant("Pod", listed) == relevant("Pod", before)
