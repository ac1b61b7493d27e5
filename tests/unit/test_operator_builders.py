"""Pure builders: Service, ConfigMap, PDB and rank Pods as the API will receive them."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from torpor import env as runtime_env
from torpor.run import worker_env
from torpor_operator.builders import (
    build_config_map,
    build_pdb,
    build_service,
    graceful_exit_data,
    owner_reference,
    read_graceful_exit,
)
from torpor_operator.contract import (
    ANNOTATION_AVOIDED_NODES,
    ANNOTATION_POD_SHAPE,
    ANNOTATION_RESUME_FROM,
    ENV,
    EXIT_DIR,
    EXIT_FILE,
    KEY_DIR,
    KEY_FILE,
)
from torpor_operator.naming import JobRef, pod_name
from torpor_operator.observing import PodView
from torpor_operator.pods import EXIT_VOLUME, KEY_VOLUME, build_pod
from torpor_operator.shaping import format_digests, shape_digests
from torpor_operator.spec import parse_spec

JOB = JobRef("demo", "team", "uid-1")
LABELS = {"app.kubernetes.io/managed-by": "torpor", "torpor.dev/job": "demo", "torpor.dev/incarnation": "3"}


def spec(**overrides: Any) -> Any:
    base: dict[str, Any] = {
        "replicas": 4,
        "template": {
            "metadata": {"labels": {"team": "ml"}, "annotations": {"note": "x"}},
            "spec": {"containers": [{"name": "train", "image": "python:3.11",
                                     "env": [{"name": "RANK", "value": "99"}, {"name": "USER_VAR", "value": "1"}]}]},
        },
        "checkpoint": {"uri": "s3://bucket/runs", "saveSteps": 50},
    }
    base.update(overrides)
    return parse_spec(base)


def pod(rank: int = 1, **kwargs: Any) -> dict[str, Any]:
    s = kwargs.pop("spec", None) or spec()
    return build_pod(JOB, s, 3, rank, resume_from=kwargs.pop("resume_from", "CKP-1_100"), master_port=29500,
                     **kwargs)


def container(p: dict[str, Any], name: str = "train") -> dict[str, Any]:
    return next(c for c in p["spec"]["containers"] if c["name"] == name)


def env(p: dict[str, Any], name: str = "train") -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container(p, name)["env"]}


def test_owner_reference_makes_the_job_the_controller() -> None:
    assert owner_reference(JOB) == {"apiVersion": "torpor.dev/v1alpha1", "kind": "TrainingJob", "name": "demo",
                                    "uid": "uid-1", "controller": True, "blockOwnerDeletion": True}


def test_service_is_headless_and_publishes_unready_ranks() -> None:
    svc = build_service(JOB, 3, 29500)
    assert svc["metadata"]["name"] == "demo-3"
    assert svc["metadata"]["namespace"] == "team"
    assert svc["metadata"]["labels"] == LABELS
    assert svc["metadata"]["ownerReferences"] == [owner_reference(JOB)]
    assert svc["spec"]["clusterIP"] == "None"
    assert svc["spec"]["publishNotReadyAddresses"] is True
    assert svc["spec"]["selector"] == {"torpor.dev/job": "demo", "torpor.dev/incarnation": "3"}
    assert svc["spec"]["ports"][0]["port"] == 29500


def test_config_map_holds_the_graceful_exit_json() -> None:
    cm = build_config_map(JOB, 3)
    assert cm["metadata"]["name"] == "demo-3-exit"
    assert json.loads(cm["data"]["graceful-exit.json"]) == {"GracefulExit": 0}
    assert read_graceful_exit(cm) == 0
    assert read_graceful_exit({"data": graceful_exit_data(1)}) == 1
    assert read_graceful_exit({"data": {"graceful-exit.json": "not json"}}) is None
    assert read_graceful_exit({}) is None


def test_pdb_keeps_every_rank() -> None:
    pdb = build_pdb(JOB, 3, 4)
    assert pdb["apiVersion"] == "policy/v1"
    assert pdb["spec"] == {"minAvailable": 4, "unhealthyPodEvictionPolicy": "AlwaysAllow",
                           "selector": {"matchLabels": {"torpor.dev/job": "demo", "torpor.dev/incarnation": "3"}}}


def test_pdb_lets_a_drain_evict_a_rank_that_is_not_ready() -> None:
    """With the default ``IfHealthyBudget`` one NotReady rank (a hung collective, a lost
    node's pod) keeps the budget unmet forever, and ``kubectl drain`` would wait on it for good."""
    assert build_pdb(JOB, 1, 2)["spec"]["unhealthyPodEvictionPolicy"] == "AlwaysAllow"


def test_pod_identity_labels_and_owner() -> None:
    p = pod(2)
    meta = p["metadata"]
    assert meta["name"] == "demo-3-2"
    assert meta["labels"] == {"team": "ml", **LABELS, "torpor.dev/rank": "2"}
    assert meta["annotations"] == {"note": "x", ANNOTATION_RESUME_FROM: "CKP-1_100",
                                   ANNOTATION_POD_SHAPE: format_digests(shape_digests(spec()))}
    assert meta["ownerReferences"] == [owner_reference(JOB)]
    assert p["spec"]["hostname"] == "demo-3-2"
    assert p["spec"]["subdomain"] == "demo-3"
    assert p["spec"]["restartPolicy"] == "Never"
    assert p["spec"]["terminationGracePeriodSeconds"] == 120


def test_pod_environment_is_the_contract() -> None:
    e = env(pod(1))
    assert e[ENV.RANK] == "1"  # ours wins over the template's
    assert e["USER_VAR"] == "1"
    assert e[ENV.WORLD_SIZE] == "4"
    assert e[ENV.MASTER_ADDR] == "demo-3-0.demo-3"
    assert e[ENV.MASTER_PORT] == "29500"
    assert (e[ENV.LOCAL_RANK], e[ENV.LOCAL_WORLD_SIZE]) == ("0", "1")
    assert (e[ENV.NNODES], e[ENV.NODE_RANK]) == ("4", "1")
    assert e[ENV.JOB] == "team/demo"
    assert e[ENV.INCARNATION] == "3"
    assert e[ENV.CHECKPOINT_URI] == "s3://bucket/runs/team/demo"
    assert e[ENV.RESUME_FROM] == "CKP-1_100"
    assert e[ENV.EXIT_FILE] == EXIT_FILE == f"{EXIT_DIR}/graceful-exit.json"
    assert e[ENV.EXIT_SIGNAL] == "SIGTERM"
    assert e[ENV.TERMINATION_LOG] == "/dev/termination-log"
    assert (e[ENV.SAVE_STEPS], e[ENV.SAVE_SECONDS]) == ("50", "0")
    assert (e[ENV.KEEP_MAX], e[ENV.KEEP_PER_N_MINUTES]) == ("5", "0")
    assert e[ENV.ASYNC_SAVE] == "0"
    for absent in (ENV.AWS_ENDPOINT_URL, ENV.AWS_ACCESS_KEY_ID, ENV.ENC_MODE, ENV.ENC_KEY_FILE):
        assert absent not in e
    assert [x["name"] for x in container(pod(1))["env"]].count(ENV.RANK) == 1


def test_several_processes_per_pod_get_what_a_torchrun_style_launch_needs(tmp_path: Path) -> None:
    s = spec(procsPerPod=2)
    e = env(pod(1, spec=s))
    assert (e[ENV.NNODES], e[ENV.NODE_RANK], e[ENV.LOCAL_WORLD_SIZE]) == ("4", "1", "2")
    assert (e[ENV.WORLD_SIZE], e[ENV.RANK], e[ENV.LOCAL_RANK]) == ("8", "2", "0")  # the pod's first process
    assert (e[ENV.PET_NNODES], e[ENV.PET_NPROC_PER_NODE], e[ENV.PET_NODE_RANK]) == ("4", "2", "1")
    assert (e[ENV.PET_MASTER_ADDR], e[ENV.PET_MASTER_PORT]) == (e[ENV.MASTER_ADDR], e[ENV.MASTER_PORT])
    # torpor's launcher reads what the operator writes: every process of the job has its own RANK
    plain = {k: v for k, v in e.items() if isinstance(v, str)}
    ranks = [worker_env(plain, int(e[ENV.LOCAL_WORLD_SIZE]), local, tmp_path) for local in (0, 1)]
    assert [(w["RANK"], w["LOCAL_RANK"], w["WORLD_SIZE"]) for w in ranks] == [("2", "0", "8"), ("3", "1", "8")]
    # an elastic job running short: the pods it has, each with all its processes
    short = env(pod(2, spec=s, world_size=3))
    assert (short[ENV.NNODES], short[ENV.WORLD_SIZE], short[ENV.RANK]) == ("3", "6", "4")


def test_the_pod_count_is_read_back_from_nnodes_or_an_older_pods_world_size() -> None:
    s = spec(procsPerPod=2)
    assert PodView.from_dict(pod(1, spec=s, world_size=3), "train").world_size == 3  # not its WORLD_SIZE 6
    older = pod(1)
    container(older)["env"] = [x for x in container(older)["env"] if x["name"] != ENV.NNODES]
    assert PodView.from_dict(older, "train").world_size == 4


# Read by the runtime but left to its defaults (prefix, reduction interval), or set only with
# encryption (the key as a file, never the raw key in the environment).
ENCRYPTION_VARS = {getattr(runtime_env, n, f"TORPOR_{n}") for n in ("ENC_MODE", "ENC_KEY_FILE", "ENC_KEY")}
UNSET_BY_DEFAULT = {runtime_env.CHECKPOINT_PREFIX, runtime_env.EXIT_CHECK_STEPS} | ENCRYPTION_VARS


def test_the_torpor_variables_are_the_runtime_names() -> None:
    names = {x["name"] for x in container(pod(0))["env"]}
    assert set(runtime_env.ALL) - UNSET_BY_DEFAULT <= names
    assert {n for n in names if n.startswith("TORPOR_")} <= set(runtime_env.ALL) | {ENV.ASYNC_SAVE}
    encrypted = spec(checkpoint={"uri": "s3://bucket/runs", "encryption": {"keySecret": "k"}})
    names = {x["name"] for x in container(pod(0, spec=encrypted))["env"]}
    assert {ENV.ENC_MODE, ENV.ENC_KEY_FILE} <= names & ENCRYPTION_VARS


def test_the_runtime_reads_what_the_operator_writes() -> None:
    e = {x["name"]: x["value"] for x in container(pod(0))["env"] if "value" in x}
    parsed = runtime_env.RuntimeEnv.from_environ(e)
    assert parsed.checkpoint_uri == "s3://bucket/runs/team/demo"
    assert parsed.resume_from == "CKP-1_100"
    assert parsed.exit_file == EXIT_FILE
    assert parsed.exit_signal == 15
    assert (parsed.save_steps, parsed.save_seconds, parsed.keep_max) == (50, 0, 5)
    assert parsed.job == "team/demo" and parsed.under_operator


def test_s3_endpoint_credentials_and_policy() -> None:
    s = spec(checkpoint={"uri": "s3://bucket/runs", "endpoint": "http://minio:9000", "credentialsSecret": "creds",
                         "saveSeconds": 300, "keepPerNMinutes": 30, "asyncSave": True})
    e = env(pod(0, spec=s))
    assert e[ENV.AWS_ENDPOINT_URL] == "http://minio:9000"
    for key in (ENV.AWS_ACCESS_KEY_ID, ENV.AWS_SECRET_ACCESS_KEY):
        assert e[key] == {"secretKeyRef": {"name": "creds", "key": key}}
    assert (e[ENV.SAVE_STEPS], e[ENV.SAVE_SECONDS]) == ("0", "300")
    assert (e[ENV.KEEP_MAX], e[ENV.KEEP_PER_N_MINUTES]) == ("0", "30")
    assert e[ENV.ASYNC_SAVE] == "1"


def test_no_periodic_saves_when_neither_is_set() -> None:
    s = spec(checkpoint={"uri": "s3://bucket/runs", "keepMax": 2})
    e = env(pod(0, spec=s))
    assert (e[ENV.SAVE_STEPS], e[ENV.SAVE_SECONDS], e[ENV.KEEP_MAX]) == ("0", "0", "2")


def test_volumes_mount_whole_directories_never_sub_paths() -> None:
    s = spec(checkpoint={"uri": "s3://bucket/runs", "encryption": {"mode": "AES-CBC", "keySecret": "ckpt-key",
                                                                   "keySecretKey": "aes"}})
    p = pod(0, spec=s)
    volumes = {v["name"]: v for v in p["spec"]["volumes"]}
    assert volumes[EXIT_VOLUME] == {"name": EXIT_VOLUME, "configMap": {"name": "demo-3-exit"}}
    assert volumes[KEY_VOLUME]["secret"] == {"secretName": "ckpt-key", "items": [{"key": "aes", "path": "key"}],
                                            "defaultMode": 0o400}
    mounts = {m["name"]: m for m in container(p)["volumeMounts"]}
    assert mounts[EXIT_VOLUME]["mountPath"] == EXIT_DIR
    assert mounts[KEY_VOLUME]["mountPath"] == KEY_DIR
    assert all(m["readOnly"] for m in mounts.values())
    assert "subPath" not in json.dumps(p)
    e = env(p)
    assert (e[ENV.ENC_MODE], e[ENV.ENC_KEY_FILE]) == ("AES-CBC", KEY_FILE)


def test_only_the_training_container_is_changed() -> None:
    s = spec(containerName="train", template={"spec": {"containers": [
        {"name": "sidecar", "image": "busybox"}, {"name": "train", "image": "python:3.11",
                                                  "terminationMessagePath": "/tmp/why"}]}})
    p = pod(0, spec=s)
    assert container(p, "sidecar") == {"name": "sidecar", "image": "busybox"}
    assert env(p)[ENV.TERMINATION_LOG] == "/tmp/why"
    assert container(p)["terminationMessagePolicy"] == "FallbackToLogsOnError"


def test_the_template_is_not_modified() -> None:
    s = spec()
    before = json.dumps(dict(s.template), sort_keys=True)
    pod(0, spec=s, avoid_nodes=["n1"])
    assert json.dumps(dict(s.template), sort_keys=True) == before


def test_restart_policy_and_grace_period_come_from_the_job() -> None:
    s = spec(gracefulExit={"terminationGracePeriodSeconds": 45, "signal": "SIGUSR1"})
    p = pod(0, spec=s)
    assert p["spec"]["terminationGracePeriodSeconds"] == 45
    assert env(p)[ENV.EXIT_SIGNAL] == "SIGUSR1"


@pytest.mark.parametrize(
    ("affinity", "terms"),
    [
        (None, [{"matchFields": [{"key": "metadata.name", "operator": "NotIn", "values": ["n1", "n2"]}]}]),
        ({"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
            {"matchExpressions": [{"key": "gpu", "operator": "Exists"}]},
            {"matchExpressions": [{"key": "tpu", "operator": "Exists"}]}]}}},
         [{"matchExpressions": [{"key": "gpu", "operator": "Exists"}],
           "matchFields": [{"key": "metadata.name", "operator": "NotIn", "values": ["n1", "n2"]}]},
          {"matchExpressions": [{"key": "tpu", "operator": "Exists"}],
           "matchFields": [{"key": "metadata.name", "operator": "NotIn", "values": ["n1", "n2"]}]}]),
    ],
    ids=["no-affinity", "every-term-gets-the-exclusion"],
)
def test_nodes_going_away_are_excluded(affinity: dict[str, Any] | None, terms: list[dict[str, Any]]) -> None:
    template: dict[str, Any] = {"spec": {"containers": [{"name": "train"}]}}
    if affinity:
        template["spec"]["affinity"] = affinity
    p = pod(0, spec=spec(template=template), avoid_nodes=["n2", "n1", "n2"])
    required = p["spec"]["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    assert required["nodeSelectorTerms"] == terms
    assert p["metadata"]["annotations"][ANNOTATION_AVOIDED_NODES] == "n1,n2"


def test_an_avoided_nodes_annotation_of_the_template_is_not_copied() -> None:
    """Only the operator's own list may make a Pending pod be made again when a node is back."""
    template: dict[str, Any] = {"metadata": {"annotations": {ANNOTATION_AVOIDED_NODES: "n9"}},
                                "spec": {"containers": [{"name": "train"}]}}
    assert ANNOTATION_AVOIDED_NODES not in pod(0, spec=spec(template=template))["metadata"]["annotations"]


def test_no_affinity_is_added_without_nodes_to_avoid() -> None:
    assert "affinity" not in pod(0)["spec"]


def test_names_fit_in_a_hostname_for_the_longest_job_name() -> None:
    longest = "a" * 40
    assert len(pod_name(longest, 9_999_999_999, 1023)) <= 63
