"""A spec change under a live job (issue 12, item 9): what shapes the pods applies through a
graceful restart into a new incarnation, never counted as a preemption or a failure; the rest
applies at once or at the next incarnation (pure, no cluster)."""

from __future__ import annotations

import copy
from typing import Any

import pytest
from test_operator_world import Cluster, ckpt, job_body, node

from torpor_operator.contract import ANNOTATION_POD_SHAPE, ENV
from torpor_operator.shaping import changed_parts, format_digests, parse_digests, shape_digests
from torpor_operator.spec import parse_spec


def running(**spec: Any) -> Cluster:
    c = Cluster(job_body(**spec))
    c.step()
    c.run(node_for={0: "node-a", 1: "node-b"})
    c.step()
    assert c.status["phase"] == "Running"
    return c


def container(c: Cluster) -> dict[str, Any]:
    return c.body["spec"]["template"]["spec"]["containers"][0]


def env_of(p: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e.get("value", "") for e in p["spec"]["containers"][0]["env"]}


def test_a_template_change_while_running_saves_and_restarts_into_a_new_incarnation() -> None:
    c = running()
    container(c)["args"] = ["--lr", "0.01"]
    container(c)["env"] = [{"name": "MARK", "value": "v2"}]
    c.body["metadata"]["generation"] = 2
    d = c.step()
    assert c.status["phase"] == "Stopping" and c.status["stopReason"] == "SpecChanged"
    assert "spec.template changed" in c.status["stopMessage"]
    assert d.graceful_exit == ("demo-1-exit", 1)  # a graceful stop: every rank saves
    assert {name for name, _ in d.annotate} == {"demo-1-0", "demo-1-1"}
    assert not d.delete
    assert [(e.type, e.reason) for e in d.events] == [("Normal", "SpecChanged")]
    stopping = next(x for x in c.status["conditions"] if x["type"] == "Stopping")
    assert (stopping["status"], stopping["reason"]) == ("True", "SpecChanged")

    c.checkpoints = [ckpt("Net", 40, 9)]
    c.exit_all_saved("Net", 40)
    d = c.step()
    assert c.status["phase"] == "Restarting"
    assert d.requeue_after == 0.0  # no backoff: nothing went wrong
    d = c.step()
    assert (c.status["phase"], c.status["incarnation"], c.status["resumeFrom"]) == ("Pending", 2, "Net")
    new = [o for o in d.create if o["kind"] == "Pod"]
    assert [p["spec"]["containers"][0]["args"] for p in new] == [["--lr", "0.01"]] * 2
    assert {env_of(p)["MARK"] for p in new} == {"v2"} and {env_of(p)[ENV.RESUME_FROM] for p in new} == {"Net"}
    assert (c.status.get("preemptions", 0), c.status.get("restarts", 0)) == (0, 0)
    assert c.status.get("preemptionsWithoutProgress", 0) == 0
    assert "RankFailed" not in [r for _, r in c.events] and "Preempted" not in [r for _, r in c.events]

    c.run()
    c.step()
    assert c.status["phase"] == "Running"
    assert c.decide().empty  # the new pods carry the new spec: no second restart


@pytest.mark.parametrize(
    ("change", "part"),
    [
        (lambda s: s["template"]["spec"]["containers"][0].update(image="python:3.12"), "spec.template"),
        (lambda s: s["template"]["spec"]["containers"][0].update(
            resources={"requests": {"cpu": "2"}}), "spec.template"),
        (lambda s: s["template"].update(metadata={"labels": {"team": "ml"}}), "spec.template"),
        (lambda s: s["checkpoint"].update(saveSteps=50), "spec.checkpoint"),
        (lambda s: s["checkpoint"].update(endpoint="http://minio:9000"), "spec.checkpoint"),
        (lambda s: s.update(gracefulExit={"signal": "SIGUSR1"}), "spec.gracefulExit"),
        (lambda s: s.update(gracefulExit={"terminationGracePeriodSeconds": 30}), "spec.gracefulExit"),
        (lambda s: s.update(containerName="other"), "spec.containerName"),
        (lambda s: s.update(procsPerPod=2), "spec.procsPerPod"),
    ],
    ids=["image", "resources", "pod-labels", "save-steps", "endpoint", "signal", "grace-period", "container-name",
         "procs-per-pod"],
)
def test_every_part_that_shapes_the_pods_restarts_the_job_naming_it(change: Any, part: str) -> None:
    c = running()
    if part == "spec.containerName":
        c.body["spec"]["template"]["spec"]["containers"].append({"name": "other", "image": "busybox"})
    change(c.body["spec"])
    c.step()
    assert (c.status["phase"], c.status["stopReason"]) == ("Stopping", "SpecChanged")
    named, _, rest = c.status["stopMessage"].partition(" changed since incarnation 1 was made")
    assert part in named.split(" and ") and rest, c.status["stopMessage"]


@pytest.mark.parametrize(
    "change",
    [
        {"maxRestarts": 7},
        {"startupTimeoutSeconds": 900},
        {"gracefulExit": {"exitDeadlineSeconds": 5}},
        {"checkpoint": {"uri": "s3://bucket/runs", "saveSteps": 10, "deleteOnJobDeletion": True}},
    ],
    ids=["max-restarts", "startup-timeout", "exit-deadline", "delete-on-job-deletion"],
)
def test_fields_that_do_not_shape_the_pods_restart_nothing(change: dict[str, Any]) -> None:
    c = running()
    c.body["spec"].update(copy.deepcopy(change))
    d = c.decide()
    assert d.empty, d


def test_drain_protection_applies_at_once_without_a_restart() -> None:
    c = running()
    c.body["spec"]["gracefulExit"] = {"drainProtection": True}
    d = c.step()
    assert [o["kind"] for o in d.create] == ["PodDisruptionBudget"]
    assert c.status["phase"] == "Running"


def test_a_template_change_while_pending_restarts_too() -> None:
    c = Cluster(job_body())
    c.step()  # incarnation 1 Pending: say its image cannot be pulled
    container(c)["image"] = "python:3.12"
    d = c.step()
    assert (c.status["phase"], c.status["stopReason"]) == ("Stopping", "SpecChanged")
    assert not d.create  # no rank is made from the new template beside ranks of the old one


def test_a_template_change_while_stopping_is_picked_up_by_the_next_incarnation() -> None:
    c = running()
    c.nodes["node-b"] = node("node-b", unschedulable=True)
    c.step()
    assert c.status["stopReason"] == "Preemption"
    container(c)["image"] = "python:3.12"
    d = c.step()
    assert c.status["stopReason"] == "Preemption" and not d.events  # no second stop, nothing counted
    c.exit_all_saved("Net", 40)
    c.checkpoints = [ckpt("Net", 40, 9)]
    c.step()
    assert c.status["phase"] == "Restarting"
    container(c)["args"] = ["--again"]  # a change while Restarting, too
    d = c.step()
    assert c.status["incarnation"] == 2
    new = [o for o in d.create if o["kind"] == "Pod"]
    assert {(p["spec"]["containers"][0]["image"], tuple(p["spec"]["containers"][0]["args"])) for p in new} == {
        ("python:3.12", ("--again",))}
    assert (c.status["preemptions"], c.status.get("restarts", 0)) == (1, 0)
    c.run()
    c.step()
    assert c.status["phase"] == "Running" and c.decide().empty


def test_a_preemption_during_a_spec_change_stop_counts_nothing() -> None:
    c = running()
    container(c)["image"] = "python:3.12"
    c.step()
    c.nodes["node-b"] = node("node-b", unschedulable=True)
    d = c.step()
    assert c.status["stopReason"] == "SpecChanged" and c.status.get("preemptions", 0) == 0 and not d.events


def test_a_crash_together_with_a_template_change_is_a_failure() -> None:
    c = running()
    container(c)["image"] = "python:3.12"
    c.exit(1, 1)
    c.step()
    assert (c.status["stopReason"], c.status["restarts"]) == ("Failure", 1)


def test_pods_made_by_an_operator_without_shape_digests_are_left_running() -> None:
    """An operator upgrade must not restart every running job: a pod without the annotation
    cannot say what it was made from."""
    c = running()
    for p in c.pods.values():
        p["metadata"]["annotations"].pop(ANNOTATION_POD_SHAPE)
    container(c)["image"] = "python:3.12"
    assert c.decide().empty


def test_a_suspend_with_a_template_change_suspends_and_resumes_with_the_new_template() -> None:
    c = running()
    container(c)["image"] = "python:3.12"
    c.body["spec"]["suspend"] = True
    c.step()
    assert c.status["stopReason"] == "Suspend"
    c.exit_all_saved()
    c.step()
    assert c.status["phase"] == "Suspended"
    c.body["spec"]["suspend"] = False
    d = c.step()
    assert {o["spec"]["containers"][0]["image"] for o in d.create if o["kind"] == "Pod"} == {"python:3.12"}


# --- the digests themselves -------------------------------------------------------------------


def spec(**fields: Any) -> Any:
    return parse_spec(job_body(**fields)["spec"])


def test_digests_are_stable_and_round_trip_through_the_annotation() -> None:
    digests = shape_digests(spec())
    assert set(digests) == {"replicas", "procsPerPod", "containerName", "template", "checkpoint", "gracefulExit"}
    assert shape_digests(spec()) == digests
    assert parse_digests(format_digests(digests)) == digests
    assert changed_parts(digests, shape_digests(spec())) == []


def test_key_order_and_defaults_written_out_do_not_count_as_changes() -> None:
    a = spec(template={"spec": {"containers": [{"name": "train", "image": "x", "command": ["python"]}]}})
    b = spec(template={"spec": {"containers": [{"command": ["python"], "image": "x", "name": "train"}]}},
             gracefulExit={"signal": "SIGTERM", "terminationGracePeriodSeconds": 120})
    assert changed_parts(shape_digests(a), shape_digests(b)) == []
    # containerName left out or naming the only container: the same pods
    assert changed_parts(shape_digests(a), shape_digests(spec(template=dict(a.template), containerName="train"))) == []


def test_changed_parts_ignore_parts_one_side_does_not_know() -> None:
    """A part added by a later operator version is not a change of the pods an older one made."""
    new = shape_digests(spec())
    old = {k: v for k, v in new.items() if k != "gracefulExit"}
    assert changed_parts(old, new) == []
    assert changed_parts({**old, "template": "0" * 12}, new) == ["template"]


@pytest.mark.parametrize(("text", "parsed"), [
    ("", {}), ("garbage", {}), ("=abc,", {}), ("template=abc,checkpoint", {"template": "abc"}),
    (" template = abc , gracefulExit=def ", {"template": "abc", "gracefulExit": "def"}),
])
def test_a_malformed_annotation_keeps_only_well_formed_pairs(text: str, parsed: dict[str, str]) -> None:
    assert parse_digests(text) == parsed
