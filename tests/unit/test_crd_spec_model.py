"""The Python spec model equals the CRD schema field by field (STYLE.md, "Generated copies").

Walks ``spec`` of crds/trainingjobs.yaml and the dataclasses of torpor_operator.spec side by
side: the same property names, the same required set, the same defaults, enums and bounds.
A change to either side that is not made to the other fails here, naming the field.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
from test_crd_schema import schema

from torpor_operator.spec import (
    CheckpointSpec,
    CrdField,
    ElasticSpec,
    EncryptionSpec,
    GracefulExitSpec,
    TrainingJobSpec,
    crd_fields,
)

MODELS: list[tuple[str, type]] = [
    ("spec", TrainingJobSpec),
    ("spec.checkpoint", CheckpointSpec),
    ("spec.checkpoint.encryption", EncryptionSpec),
    ("spec.gracefulExit", GracefulExitSpec),
    ("spec.elastic", ElasticSpec),
]


def node_at(path: str) -> dict[str, Any]:
    node = schema()
    for part in path.split("."):
        node = node["properties"][part]
    return node


def model_default(f: dataclasses.Field[Any]) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


@pytest.mark.parametrize(("path", "model"), MODELS, ids=[p for p, _ in MODELS])
def test_property_names_and_required_match(path: str, model: type) -> None:
    node = node_at(path)
    fields = crd_fields(model)
    assert {crd.name for _, crd in fields} == set(node["properties"]), path
    assert {crd.name for _, crd in fields if crd.required} == set(node.get("required", [])), path


def field_cases() -> list[tuple[str, dataclasses.Field[Any], CrdField]]:
    return [(f"{path}.{crd.name}", f, crd) for path, model in MODELS for f, crd in crd_fields(model)]


@pytest.mark.parametrize(("path", "field", "crd"), field_cases(), ids=[c[0] for c in field_cases()])
def test_field_matches_schema(path: str, field: dataclasses.Field[Any], crd: CrdField) -> None:
    parent, name = path.rsplit(".", 1)
    prop = node_at(parent)["properties"][name]
    assert crd.kind == prop["type"], f"{path}: type"
    assert crd.enum == (tuple(prop["enum"]) if "enum" in prop else None), f"{path}: enum"
    low, high = ("minimum", "maximum") if prop["type"] == "integer" else ("minLength", "maxLength")
    assert crd.minimum == prop.get(low), f"{path}: {low}"
    assert crd.maximum == prop.get(high), f"{path}: {high}"
    default = model_default(field)
    if crd.required:
        assert default is dataclasses.MISSING, f"{path}: a required field has no default"
        assert "default" not in prop, f"{path}: required and defaulted"
    elif "default" in prop:
        if crd.nested is not None:
            # an object default is the nested spec parsed from the schema's default
            from torpor_operator.spec import _parse_object

            assert default == _parse_object(crd.nested, prop["default"], path), f"{path}: default"
        else:
            assert default == prop["default"], f"{path}: default"
    else:
        assert default is None, f"{path}: optional without a schema default must default to None"
    if crd.nested is not None:
        assert prop["type"] == "object"


def test_every_default_in_the_spec_schema_is_modelled() -> None:
    covered = {path for path, _, _ in field_cases()}

    def defaults(node: dict[str, Any], path: str) -> list[str]:
        found = [path] if "default" in node else []
        for name, child in (node.get("properties") or {}).items():
            if path.startswith("spec.template"):
                continue
            found += defaults(child, f"{path}.{name}")
        return found

    assert set(defaults(node_at("spec"), "spec")) - {"spec"} <= covered
