"""crds/trainingjobs.yaml parses, is a structural schema, and documents every field."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

CRD_PATH = Path(__file__).resolve().parents[2] / "crds" / "trainingjobs.yaml"


def load_crd() -> dict[str, Any]:
    with CRD_PATH.open() as f:
        docs = list(yaml.safe_load_all(f))
    assert len(docs) == 1, "crds/trainingjobs.yaml holds exactly one object"
    return docs[0]


def schema() -> dict[str, Any]:
    (version,) = load_crd()["spec"]["versions"]
    return version["openAPIV3Schema"] if "openAPIV3Schema" in version else version["schema"]["openAPIV3Schema"]


def walk(node: dict[str, Any], path: str = "") -> Iterator[tuple[str, dict[str, Any]]]:
    """Every schema node with its dotted path (``[]`` for array items)."""
    yield path or "<root>", node
    for name, child in (node.get("properties") or {}).items():
        yield from walk(child, f"{path}.{name}" if path else name)
    if "items" in node:
        yield from walk(node["items"], f"{path}[]")
    if isinstance(node.get("additionalProperties"), dict):
        yield from walk(node["additionalProperties"], f"{path}{{}}")


def test_identity() -> None:
    crd = load_crd()
    assert crd["apiVersion"] == "apiextensions.k8s.io/v1"
    assert crd["kind"] == "CustomResourceDefinition"
    assert crd["metadata"]["name"] == "trainingjobs.torpor.dev"
    spec = crd["spec"]
    assert (spec["group"], spec["scope"]) == ("torpor.dev", "Namespaced")
    assert spec["names"]["kind"] == "TrainingJob"
    assert spec["names"]["plural"] == "trainingjobs"
    assert spec["names"]["shortNames"] == ["tj"]
    (version,) = spec["versions"]
    assert (version["name"], version["served"], version["storage"]) == ("v1alpha1", True, True)
    assert version["subresources"] == {"status": {}}


def test_every_property_has_a_description() -> None:
    # metadata may carry nothing but its type: the API server refuses a description there
    missing = [path for path, node in walk(schema())
               if path not in ("<root>", "metadata") and not path.endswith("{}") and not node.get("description")]
    assert missing == []


def test_the_schema_is_structural() -> None:
    """Every node has a type (or preserves unknown fields), as apiextensions/v1 demands."""
    for path, node in walk(schema()):
        assert "type" in node or node.get("x-kubernetes-preserve-unknown-fields"), path
        if node.get("type") == "object" and path not in ("metadata",):
            has_shape = ("properties" in node or "additionalProperties" in node
                         or node.get("x-kubernetes-preserve-unknown-fields"))
            assert has_shape, f"{path} is an object without properties; it would be pruned to {{}}"
        if node.get("type") == "array":
            assert "items" in node, path
        for forbidden in ("oneOf", "anyOf", "allOf", "not", "$ref", "additionalItems"):
            assert forbidden not in node, f"{path} uses {forbidden}, which a structural schema restricts"


def test_status_is_closed() -> None:
    """kopf keeps its progress in annotations, so status needs no preserve-unknown-fields."""
    status = schema()["properties"]["status"]
    assert not status.get("x-kubernetes-preserve-unknown-fields")
    assert status["properties"]["phase"]["enum"] == [
        "Pending", "Running", "Stopping", "Restarting", "Succeeded", "Failed", "Suspended"]


def test_defaults_satisfy_their_own_bounds() -> None:
    for path, node in walk(schema()):
        if "default" not in node:
            continue
        default = node["default"]
        if "minimum" in node:
            assert default >= node["minimum"], path
        if "maximum" in node:
            assert default <= node["maximum"], path
        if "enum" in node:
            assert default in node["enum"], path


def rules() -> list[tuple[str, dict[str, Any]]]:
    return [(path, rule) for path, node in walk(schema()) for rule in node.get("x-kubernetes-validations", [])]


def test_cel_rules_have_messages_naming_their_field() -> None:
    assert len(rules()) >= 8
    for path, rule in rules():
        assert rule.get("message"), f"{path}: rule {rule['rule']!r} has no message"
        named = re.findall(r"(?:spec|metadata)\.[A-Za-z.]+", rule["message"])
        assert named, f"{path}: message {rule['message']!r} names no field"


@pytest.mark.parametrize(
    ("path", "fragment"),
    [
        ("spec", "containerName"),
        ("spec.checkpoint", "saveSteps) && has(self.saveSeconds"),
        ("spec.checkpoint", "keepMax) && has(self.keepPerNMinutes"),
        ("spec.checkpoint.uri", "s3://"),
        ("spec.checkpoint.uri", "oldSelf"),
        ("spec", "self.elastic.minReplicas <= self.replicas"),
        ("spec", "self.elastic.waitSeconds < self.startupTimeoutSeconds"),
        ("spec.template.spec", "restartPolicy"),
        ("<root>", "metadata.name"),
    ],
)
def test_cross_field_rules_exist(path: str, fragment: str) -> None:
    assert any(p == path and fragment in r["rule"] for p, r in rules()), (path, fragment)


def test_printer_columns_point_at_schema_fields() -> None:
    (version,) = load_crd()["spec"]["versions"]
    columns = {c["name"]: c for c in version["additionalPrinterColumns"]}
    assert list(columns)[:7] == ["Phase", "Ready", "World-Size", "Restarts", "Preemptions", "Step", "Checkpoint"]
    assert columns["Checkpoint"]["type"] == "date"
    assert columns["Age"]["jsonPath"] == ".metadata.creationTimestamp"
    paths = {p for p, _ in walk(schema())}
    for column in columns.values():
        field = column["jsonPath"].lstrip(".")
        if field.startswith("metadata."):
            continue
        assert field in paths, f"printer column {column['name']} reads {field}, which the schema lacks"
