"""The typed model covers every field of Istio's CRD schemas, with the same types and limits.

Walks each CRD's OpenAPI schema beside the model's dataclasses: every property must be a field
(or an alias of one), every field a property, and types, enums, required fields, oneof groups,
ranges and lengths must agree. A new Istio field therefore fails this test until it is modelled.
"""

from __future__ import annotations

import enum
from pathlib import Path
from typing import Any

import pytest
import yaml

from libmesh._duration import Duration
from libmesh.config._resource import KINDS
from libmesh.config._schema import FieldSpec, Shape, TypeSpec, field_specs

CRDS = (
    Path(__file__).parents[2].parent
    / "shared/istio-corpus/schema/customresourcedefinitions.gen.yaml"
)
DURATION_RULE = "duration(self) >= duration('1ms')"


def _spec_schemas() -> dict[str, tuple[str, dict[str, Any]]]:
    found = {}
    for doc in yaml.safe_load_all(CRDS.read_text()):
        if not doc:
            continue
        kind = doc["spec"]["names"]["kind"]
        for version in doc["spec"]["versions"]:
            found[f"{kind}/{version['name']}"] = (kind, version["schema"]["openAPIV3Schema"])
    return found


SCHEMAS = _spec_schemas()
CASES = sorted(
    key
    for key, (kind, _) in SCHEMAS.items()
    if kind in KINDS and KINDS[kind].accepts(f"{KINDS[kind].group}/{key.split('/')[1]}")
)


def _oneof_groups(schema: dict[str, Any]) -> set[frozenset[str]]:
    clauses = []
    if "oneOf" in schema:
        clauses.append(schema["oneOf"])
    clauses.extend(part["oneOf"] for part in schema.get("allOf", []) if "oneOf" in part)
    groups = set()
    for clause in clauses:
        names = frozenset(name for option in clause for name in option.get("required", []))
        groups.add(names)
    return groups


def _check_scalar(path: str, schema: dict[str, Any], spec: FieldSpec, tspec: TypeSpec) -> None:
    target = tspec.python
    declared = schema.get("type")
    if target is object:
        return
    if isinstance(target, type) and issubclass(target, enum.Enum):
        assert declared == "string", path
        assert [m.value for m in target] == schema["enum"], path
        return
    assert "enum" not in schema, f"{path}: the schema has an enum, the model a {target}"
    expected = {
        str: "string",
        bytes: "string",
        Duration: "string",
        int: "integer",
        float: "number",
        bool: "boolean",
    }[target]
    assert declared == expected, f"{path}: schema {declared}, model {target.__name__}"
    if target is bytes:
        assert schema.get("format") == "byte", path
    if target is Duration:
        has_rule = any(
            v["rule"] == DURATION_RULE for v in schema.get("x-kubernetes-validations", [])
        )
        assert has_rule == (spec.minimum is None), f"{path}: 1ms minimum mismatch"
    if target is int:
        assert tspec.int_range is not None
        low = spec.minimum if spec.minimum is not None else tspec.int_range.minimum
        high = spec.maximum if spec.maximum is not None else tspec.int_range.maximum
        if schema.get("format") == "int32":
            assert (low, high) == (-(2**31), 2**31 - 1), f"{path}: int32 range"
        else:
            assert low == schema.get("minimum", low), f"{path}: minimum"
            assert high == schema.get("maximum"), (
                f"{path}: maximum {high} vs {schema.get('maximum')}"
            )
    if target is float:
        assert spec.minimum == schema.get("minimum"), f"{path}: minimum"
        assert spec.maximum == schema.get("maximum"), f"{path}: maximum"
    if target is str:
        assert spec.pattern == schema.get("pattern"), f"{path}: pattern"


def _check_lengths(path: str, schema: dict[str, Any], spec: FieldSpec) -> None:
    if schema.get("type") == "string":
        assert spec.min_length == schema.get("minLength"), f"{path}: minLength"
        assert spec.max_length == schema.get("maxLength"), f"{path}: maxLength"


def _walk_value(path: str, schema: dict[str, Any], spec: FieldSpec, tspec: TypeSpec) -> None:
    if tspec.shape is Shape.MESSAGE:
        _walk_message(path, schema, tspec.python)
    elif tspec.shape is Shape.LIST:
        assert schema.get("type") == "array", f"{path}: schema {schema.get('type')}, model list"
        assert spec.max_items == schema.get("maxItems"), f"{path}: maxItems"
        assert tspec.item is not None
        _walk_value(path + "[]", schema["items"], spec, tspec.item)
    elif tspec.shape is Shape.MAP:
        assert schema.get("type") == "object", path
        assert spec.max_items == schema.get("maxProperties"), f"{path}: maxProperties"
        assert tspec.item is not None
        _walk_value(path + "{}", schema["additionalProperties"], spec, tspec.item)
    else:
        _check_scalar(path, schema, spec, tspec)
        _check_lengths(path, schema, spec)


def _walk_message(path: str, schema: dict[str, Any], cls: type) -> None:
    assert schema.get("type") == "object", f"{path}: schema {schema.get('type')}, model message"
    properties: dict[str, Any] = schema.get("properties", {})
    specs = field_specs(cls)
    modelled = {key for s in specs for key in (s.yaml, *s.aliases)}
    assert set(properties) == modelled, (
        f"{path} ({cls.__name__}): missing in model {sorted(set(properties) - modelled)}, "
        f"not in schema {sorted(modelled - set(properties))}"
    )
    required = set(schema.get("required", []))
    assert required == {s.yaml for s in specs if s.required}, f"{path}: required"
    by_name = {s.name: s for s in specs}
    model_groups = {frozenset(by_name[n].yaml for n in group) for group in cls.__oneofs__}
    assert model_groups == _oneof_groups(schema), f"{path}: oneof groups"
    for spec in specs:
        for key in (spec.yaml, *spec.aliases):
            _walk_value(f"{path}.{key}", properties[key], spec, spec.type)


@pytest.mark.parametrize("case", CASES)
def test_every_crd_field_is_modelled(case: str) -> None:
    kind, schema = SCHEMAS[case]
    _walk_message(kind, schema["properties"]["spec"], KINDS[kind].spec)


def test_every_kind_and_version_in_scope_is_checked() -> None:
    assert len(CASES) == 4 * 3 + 3 * 2
