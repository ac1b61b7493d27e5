"""The node agent's pure parts, without a cluster: kubelet's volume layout, downward API, env.

These need no control plane (milliseconds); they pin down the details the cluster tests
only see through a pod: the `..data` swap, file modes, quoting, `$(VAR)` expansion.
"""

from __future__ import annotations

import base64
import os
from pathlib import Path

import pytest

from nodeagent_volumes import (
    DATA_LINK,
    ConfigError,
    container_env,
    expand,
    field_value,
    parse_quantity,
    volume_payload,
    write_atomic,
)

POD = {
    "metadata": {
        "name": "p",
        "namespace": "ns",
        "uid": "u-1",
        "labels": {"b": "2", "a": 'say "hi"'},
        "annotations": {"torpor.dev/exit": "now"},
    },
    "spec": {
        "nodeName": "torpor-node-0",
        "serviceAccountName": "trainer",
        "containers": [{"name": "main", "resources": {"limits": {"cpu": "1500m", "memory": "1Gi"}}}],
    },
    "status": {"podIP": "127.1.2.3", "hostIP": "127.0.0.1"},
}

OBJECTS = {
    ("ConfigMap", "ns", "cfg"): {
        "data": {"mode": "fast", "retries": "3"},
        "binaryData": {"blob": base64.b64encode(b"\x00\x01").decode()},
    },
    ("Secret", "ns", "creds"): {"data": {"token": base64.b64encode(b"s3cr3t").decode()}},
}


def fetch(kind: str, ns: str, name: str):
    return OBJECTS.get((kind, ns, name))


def test_atomic_writer_swaps_data_link_and_removes_stale_entries(tmp_path: Path):
    target = tmp_path / "vol"
    assert write_atomic(target, {"a": (b"1", 0o644), "dir/b": (b"2", 0o600)})
    first = os.readlink(target / DATA_LINK)
    assert os.readlink(target / "a") == f"{DATA_LINK}/a"
    assert (target / "dir" / "b").read_bytes() == b"2"
    assert (target / "dir" / "b").stat().st_mode & 0o777 == 0o600

    assert not write_atomic(target, {"a": (b"1", 0o644), "dir/b": (b"2", 0o600)})  # unchanged: no new version
    assert os.readlink(target / DATA_LINK) == first

    assert write_atomic(target, {"a": (b"one", 0o644)})
    second = os.readlink(target / DATA_LINK)
    assert second != first and not (target / first).exists()
    assert (target / "a").read_text() == "one"
    assert not (target / "dir").exists() and not (target / "dir").is_symlink()
    assert sorted(p.name for p in target.iterdir()) == sorted([second, DATA_LINK, "a"])


def test_configmap_secret_and_downward_payloads():
    items = {"configMap": {"name": "cfg", "items": [{"key": "mode", "path": "conf/mode", "mode": 0o400}]}}
    assert volume_payload(POD, {"name": "v", **items}, fetch, lambda _: b"") == {"conf/mode": (b"fast", 0o400)}
    whole = volume_payload(POD, {"name": "v", "configMap": {"name": "cfg", "defaultMode": 0o640}}, fetch, bytes)
    assert whole == {"mode": (b"fast", 0o640), "retries": (b"3", 0o640), "blob": (b"\x00\x01", 0o640)}
    secret = volume_payload(POD, {"name": "v", "secret": {"secretName": "creds"}}, fetch, bytes)
    assert secret == {"token": (b"s3cr3t", 0o644)}
    assert volume_payload(POD, {"name": "v", "secret": {"secretName": "gone", "optional": True}}, fetch, bytes) == {}
    with pytest.raises(ConfigError, match='configmap "gone" not found'):
        volume_payload(POD, {"name": "v", "configMap": {"name": "gone"}}, fetch, bytes)
    projected = {
        "projected": {
            "sources": [
                {"serviceAccountToken": {"path": "token", "expirationSeconds": 600}},
                {"downwardAPI": {"items": [{"path": "labels", "fieldRef": {"fieldPath": "metadata.labels"}}]}},
            ]
        }
    }
    payload = volume_payload(POD, {"name": "v", **projected}, fetch, lambda source: b"tok")
    assert payload == {"token": (b"tok", 0o644), "labels": (b'a="say \\"hi\\""\nb="2"', 0o644)}


def test_field_values():
    assert field_value(POD, "metadata.labels['b']") == "2"
    assert field_value(POD, "metadata.annotations['torpor.dev/exit']") == "now"
    assert field_value(POD, "metadata.annotations['missing']") == ""
    assert field_value(POD, "status.podIP") == "127.1.2.3"
    assert field_value(POD, "spec.serviceAccountName") == "trainer"
    with pytest.raises(ConfigError, match="unsupported fieldPath"):
        field_value(POD, "spec.nope")


def test_container_env_resolves_refs_and_expands_variables():
    container = {
        "name": "main",
        "envFrom": [{"configMapRef": {"name": "cfg"}, "prefix": "CFG_"}],
        "env": [
            {"name": "NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
            {"name": "TOKEN", "valueFrom": {"secretKeyRef": {"name": "creds", "key": "token"}}},
            {"name": "OPT", "valueFrom": {"configMapKeyRef": {"name": "cfg", "key": "nope", "optional": True}}},
            {"name": "CPU", "valueFrom": {"resourceFieldRef": {"resource": "limits.cpu", "divisor": "0"}}},
            {"name": "MEM_MI", "valueFrom": {"resourceFieldRef": {"resource": "limits.memory", "divisor": "1Mi"}}},
            {"name": "URL", "value": "http://$(NAME):$(PORT)/$$(NAME)"},
        ],
    }
    env = container_env(POD, container, fetch)
    assert env == {
        "CFG_mode": "fast",
        "CFG_retries": "3",
        "NAME": "p",
        "TOKEN": "s3cr3t",
        "CPU": "2",
        "MEM_MI": "1024",
        "URL": "http://p:$(PORT)/$(NAME)",
    }
    missing = {"name": "main", "env": [{"name": "X", "valueFrom": {"secretKeyRef": {"name": "creds", "key": "k"}}}]}
    with pytest.raises(ConfigError, match='couldn\'t find key k in secret "creds"'):
        container_env(POD, missing, fetch)


def test_quantities_and_expansion():
    assert parse_quantity("500m") * 2 == 1
    assert parse_quantity("16Gi") == 16 * 2**30
    assert parse_quantity("2k") == 2000
    assert expand("$(A)$(B)$$", {"A": "x"}) == "x$(B)$"
