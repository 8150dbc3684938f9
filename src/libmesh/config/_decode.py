"""Structural decoding: YAML nodes to typed messages, reporting every mismatch on the way.

This is the CRD schema check, done against the model in ``_networking``/``_security``: unknown
fields (with a "did you mean"), wrong types, bad enum values, ranges and lengths, missing
required fields, oneof groups, deprecated fields. Decoding never stops at the first problem:
it reports, substitutes a zero value and goes on, so a file's problems are all reported at once.
"""

from __future__ import annotations

import base64
import binascii
import difflib
import enum
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import yaml

from .._duration import Duration, parse_duration
from .._frozen import FrozenMap
from ._findings import Code, Codes, Finding, Severity
from ._resource import KINDS, ObjectMeta, Resource, ResourceRef
from ._rules import is_number
from ._schema import FieldSpec, Message, Shape, TypeSpec, field_specs, fields_by_key, zero_of
from ._source import Location
from ._yaml import Document, UnreadableValue, construct, flatten_merge_keys, location_of

__all__ = ["Report", "decode_document"]

_MIN_DURATION_NS = 1_000_000  # Istio: every duration it validates must be at least 1ms
_SURROGATES = re.compile("[\ud800-\udfff]")


@dataclass
class Report:
    """Collects the findings for one document."""

    file: str
    document: int = 0
    resource: ResourceRef | None = None
    findings: list[Finding] = field(default_factory=list)

    def add(
        self,
        code: Code,
        where: Location,
        path: str,
        message: str,
        *,
        severity: Severity | None = None,
        related: tuple[ResourceRef, ...] = (),
    ) -> None:
        self.findings.append(
            Finding(
                code=code,
                message=message,
                location=where,
                resource=self.resource,
                path=path,
                severity=severity,
                related=related,
                document=self.document,
            )
        )

    def error(self, where: Location, path: str, message: str) -> None:
        self.add(Codes.SCHEMA_VALIDATION_ERROR, where, path, message)

    def warning(self, where: Location, path: str, message: str) -> None:
        self.add(Codes.SCHEMA_WARNING, where, path, message)

    @property
    def has_errors(self) -> bool:
        return any(f.is_error for f in self.findings)


_TOP_LEVEL = ("apiVersion", "kind", "metadata", "spec", "status")


def decode_document(doc: Document, file: str) -> tuple[Resource[Any] | None, list[Finding]]:
    """Decode one YAML document into a resource of a supported kind.

    Returns ``(None, findings)`` for documents of other kinds (a warning) and for documents
    that are not resources at all (an error). A resource with errors is still returned, fully
    typed with zero values where input was unusable, so that later checks can run on it;
    callers decide from the findings whether to keep it.
    """
    report = Report(file, document=doc.index)
    node = doc.node
    here = doc.location
    if not isinstance(node, yaml.MappingNode):
        report.add(
            Codes.NOT_A_RESOURCE,
            here,
            "",
            "a resource must be a mapping with apiVersion, kind, metadata and spec",
        )
        return None, report.findings
    merge_problem = flatten_merge_keys(node, file)
    if merge_problem is not None:
        report.add(Codes.INVALID_YAML, merge_problem.location, "", merge_problem.message)
        return None, report.findings
    entries = _entries(node, file, "", report)
    api_version = _plain_string(entries.get("apiVersion"))
    kind_name = _plain_string(entries.get("kind"))
    if not api_version or not kind_name:
        missing = " and ".join(
            k for k, v in (("apiVersion", api_version), ("kind", kind_name)) if not v
        )
        report.add(
            Codes.NOT_A_RESOURCE, here, "", f"this document has no {missing}; it is not a resource"
        )
        return None, report.findings
    if kind_name == "List" and api_version == "v1":
        report.add(
            Codes.NOT_A_RESOURCE,
            here,
            "",
            "a v1 List is not read: write each resource as its own YAML document, separated by "
            "'---'",
        )
        return None, report.findings
    kind = KINDS.get(kind_name)
    if kind is None or kind.group != api_version.rpartition("/")[0]:
        report.resource = _raw_ref(kind_name, entries.get("metadata"))
        report.add(
            Codes.UNSUPPORTED_KIND,
            here,
            "",
            f"{kind_name} ({api_version}) is not a kind libmesh reads; it is skipped",
        )
        return None, report.findings

    decoder = _Decoder(file, report)
    meta_entry = entries.get("metadata")
    metadata = (
        decoder.message(meta_entry[1], ObjectMeta, "metadata", location_of(meta_entry[0], file))
        if meta_entry is not None and not _is_null(meta_entry[1])
        else ObjectMeta()
    )
    report.resource = ResourceRef(
        kind.name, metadata.namespace or "default", metadata.name or "<unnamed>"
    )
    if not kind.accepts(api_version):
        versions = ", ".join(f"{kind.group}/{v}" for v in kind.versions)
        report.error(
            location_of(entries["apiVersion"][1], file),
            "apiVersion",
            f"{api_version} does not serve {kind.name}; use one of {versions}",
        )
    if not metadata.name:
        where = location_of(meta_entry[1], file) if meta_entry else here
        report.error(where, "metadata.name", "every resource needs a name")
    for key, (key_node, _) in entries.items():
        if key not in _TOP_LEVEL:
            report.error(location_of(key_node, file), key, _unknown_field_message(key, _TOP_LEVEL))
    spec_entry = entries.get("spec")
    if spec_entry is None or _is_null(spec_entry[1]):
        spec = zero_of(TypeSpec(Shape.MESSAGE, kind.spec))
        spec = _with_location(spec, here, FrozenMap())
    else:
        spec = decoder.message(spec_entry[1], kind.spec, "spec", location_of(spec_entry[0], file))
    status_entry = entries.get("status")
    status = None
    if status_entry is not None:
        try:
            status = _freeze(construct(status_entry[1]))
        except UnreadableValue as exc:
            report.error(location_of(status_entry[1], file), "status", str(exc))
    resource: Resource[Any] = Resource(
        api_version=api_version,
        kind=kind.name,
        metadata=metadata,
        spec=spec,
        status=status,
        _at=here,
    )
    return resource, report.findings


# -- internals -----------------------------------------------------------------------------------


def _raw_ref(kind: str, metadata: tuple[yaml.Node, yaml.Node] | None) -> ResourceRef:
    """A best-effort name for a document that is not decoded (another kind)."""
    try:
        raw = construct(metadata[1]) if metadata is not None else None
    except UnreadableValue:
        raw = None
    raw = raw if isinstance(raw, dict) else {}
    return ResourceRef(
        kind, str(raw.get("namespace") or "default"), str(raw.get("name") or "<unnamed>")
    )


def _is_null(node: yaml.Node) -> bool:
    return isinstance(node, yaml.ScalarNode) and node.tag.endswith(":null")


def _plain_string(entry: tuple[yaml.Node, yaml.Node] | None) -> str:
    if entry is None or not isinstance(entry[1], yaml.ScalarNode):
        return ""
    value = entry[1].value
    return value if isinstance(value, str) else ""


def _entries(
    node: yaml.MappingNode, file: str, path: str, report: Report, *, map_keys: bool = False
) -> dict[str, tuple[yaml.Node, yaml.Node]]:
    """The mapping's entries by key, with duplicate and non-scalar keys reported.

    ``map_keys``: the mapping is a map field (labels, headers), whose entries are written
    ``path[key]`` in findings; otherwise it is a message, whose fields are ``path.field``.
    """
    entries: dict[str, tuple[yaml.Node, yaml.Node]] = {}
    for key_node, value_node in node.value:
        if not isinstance(key_node, yaml.ScalarNode):
            report.error(location_of(key_node, file), path, "a key must be a plain value")
            continue
        try:
            key = str(construct(key_node))
        except UnreadableValue as exc:
            report.error(location_of(key_node, file), path, str(exc))
            continue
        if key in entries:
            first = location_of(entries[key][0], file)
            report.error(
                location_of(key_node, file),
                f"{path}[{key}]" if map_keys else _join(path, key),
                f"{key!r} is given twice (first on line {first.line}); YAML keeps only the last",
            )
        entries[key] = (key_node, value_node)
    return entries


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _normalise(name: str) -> str:
    return name.replace("_", "").replace("-", "").lower()


def _unknown_field_message(key: str, known: tuple[str, ...] | list[str]) -> str:
    by_normal = {_normalise(k): k for k in known}
    guess = by_normal.get(_normalise(key))
    if guess is None:
        close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
        guess = close[0] if close else None
    if guess is not None:
        return f"unknown field {key!r}; did you mean {guess!r}?"
    listing = ", ".join(sorted(known))
    return f"unknown field {key!r}; the fields here are: {listing}"


_JSON_TYPES = ((bool, "a boolean"), (int, "an integer"), (float, "a number"), (str, "a string"),
               (list, "a list"), (dict, "a mapping"))  # fmt: skip


def _json_type(value: Any) -> str:
    """How JSON (and so Kubernetes) would name a value's type, for messages."""
    if value is None:
        return "null"
    return next(
        (name for kind, name in _JSON_TYPES if isinstance(value, kind)), type(value).__name__
    )


def _node_type(node: yaml.Node) -> str:
    if isinstance(node, yaml.MappingNode):
        return "a mapping"
    if isinstance(node, yaml.SequenceNode):
        return "a list"
    try:
        return _json_type(construct(node))
    except UnreadableValue:
        return "an unreadable value"


def _freeze(value: Any) -> Any:
    if isinstance(value, dict):
        return FrozenMap((str(k), _freeze(v)) for k, v in value.items())
    if isinstance(value, list):
        return tuple(_freeze(v) for v in value)
    return value


def _with_location(message: Message, at: Location, field_at: FrozenMap[str, Location]) -> Message:
    object.__setattr__(message, "_at", at)
    object.__setattr__(message, "_field_at", field_at)
    return message


class _Decoder:
    def __init__(self, file: str, report: Report) -> None:
        self.file = file
        self.report = report

    def at(self, node: yaml.Node) -> Location:
        return location_of(node, self.file)

    def error(self, node: yaml.Node, path: str, message: str) -> None:
        self.report.error(self.at(node), path, message)

    def merge_keys(self, node: yaml.MappingNode, path: str) -> None:
        problem = flatten_merge_keys(node, self.file)
        if problem is not None:
            self.report.add(Codes.INVALID_YAML, problem.location, path, problem.message)

    # messages ------------------------------------------------------------------------------

    def message(
        self, node: yaml.Node, cls: type[Message], path: str, at: Location | None = None
    ) -> Any:
        """Decode a message; ``at`` is where it was introduced (its key), if not its node."""
        here = at or self.at(node)
        if not isinstance(node, yaml.MappingNode):
            self.error(node, path, f"expected a mapping of fields, found {_node_type(node)}")
            return _with_location(zero_of(TypeSpec(Shape.MESSAGE, cls)), here, FrozenMap())
        self.merge_keys(node, path)
        by_key = fields_by_key(cls)
        entries = _entries(node, self.file, path, self.report)
        values: dict[str, Any] = {}
        seen_via: dict[str, str] = {}
        field_at: dict[str, Location] = {}
        for key, (key_node, value_node) in entries.items():
            spec = by_key.get(key)
            field_path = _join(path, key)
            if spec is None:
                self.error(key_node, field_path, _unknown_field_message(key, list(by_key)))
                continue
            if spec.name in seen_via:
                self.error(
                    key_node,
                    field_path,
                    f"{key!r} and {seen_via[spec.name]!r} are the same field; set only one",
                )
                continue
            seen_via[spec.name] = key
            field_at[spec.name] = self.at(key_node)
            if _is_null(value_node):
                continue  # Kubernetes drops null fields: they read as unset
            if spec.deprecated:
                self.report.add(
                    Codes.DEPRECATED,
                    self.at(key_node),
                    field_path,
                    f"{key!r} is deprecated; {spec.deprecated}",
                )
            values[spec.name] = self.value(
                value_node, spec, spec.type, field_path, field_at, field_at[spec.name]
            )
        for spec in field_specs(cls):
            if spec.required and spec.name not in values:
                self.error(node, _join(path, spec.yaml), f"{spec.yaml!r} is required")
                zero = spec.zero()
                if isinstance(zero, Message):
                    zero = _with_location(zero, here, FrozenMap())
                values[spec.name] = zero
        for group in cls.__oneofs__:
            given = [name for name in group if name in values]
            if len(given) > 1:
                keys = [seen_via[name] for name in given]
                self.error(
                    entries[keys[1]][0],
                    _join(path, keys[1]),
                    f"{' and '.join(repr(k) for k in keys)} cannot be set together; "
                    f"choose one of {', '.join(_yaml_name(cls, n) for n in group)}",
                )
        return cls(**values, _at=here, _field_at=FrozenMap(field_at))

    # values --------------------------------------------------------------------------------

    def value(
        self,
        node: yaml.Node,
        spec: FieldSpec,
        tspec: TypeSpec,
        path: str,
        field_at: dict[str, Location],
        at: Location,
    ) -> Any:
        if tspec.shape is Shape.MESSAGE:
            return self.message(node, tspec.python, path, at)
        if tspec.shape is Shape.LIST:
            return self.list(node, spec, tspec, path, field_at)
        if tspec.shape is Shape.MAP:
            return self.map(node, spec, tspec, path, field_at)
        return self.scalar(node, spec, tspec, path)

    def list(
        self,
        node: yaml.Node,
        spec: FieldSpec,
        tspec: TypeSpec,
        path: str,
        field_at: dict[str, Location],
    ) -> tuple[Any, ...]:
        assert tspec.item is not None
        if not isinstance(node, yaml.SequenceNode):
            hint = ""
            if isinstance(node, yaml.ScalarNode):
                hint = f"; write it as a list item: '- {node.value}'"
            self.error(node, path, f"expected a list, found {_node_type(node)}{hint}")
            return ()
        if spec.max_items is not None and len(node.value) > spec.max_items:
            self.error(
                node, path, f"at most {spec.max_items} items are allowed, found {len(node.value)}"
            )
        items = []
        for i, item in enumerate(node.value):
            item_path = f"{path}[{i}]"
            field_at[f"{spec.name}[{i}]"] = self.at(item)
            if _is_null(item):
                self.error(item, item_path, "this list item is empty")
                continue
            items.append(self.value(item, spec, tspec.item, item_path, field_at, self.at(item)))
        return tuple(items)

    def map(
        self,
        node: yaml.Node,
        spec: FieldSpec,
        tspec: TypeSpec,
        path: str,
        field_at: dict[str, Location],
    ) -> FrozenMap[str, Any]:
        assert tspec.item is not None
        if not isinstance(node, yaml.MappingNode):
            self.error(node, path, f"expected a mapping, found {_node_type(node)}")
            return FrozenMap()
        self.merge_keys(node, path)
        entries = _entries(node, self.file, path, self.report, map_keys=True)
        if spec.max_items is not None and len(entries) > spec.max_items:
            self.error(
                node, path, f"at most {spec.max_items} entries are allowed, found {len(entries)}"
            )
        values = {}
        for key, (key_node, value_node) in entries.items():
            entry_path = f"{path}[{key}]"
            field_at[f"{spec.name}[{key}]"] = self.at(key_node)
            if _is_null(value_node) and tspec.item.shape is not Shape.MESSAGE:
                self.error(value_node, entry_path, "this entry has no value")
                continue
            if _is_null(value_node):
                values[key] = _with_location(zero_of(tspec.item), self.at(key_node), FrozenMap())
                continue
            values[key] = self.value(
                value_node, spec, tspec.item, entry_path, field_at, self.at(key_node)
            )
        return FrozenMap(values)

    def scalar(self, node: yaml.Node, spec: FieldSpec, tspec: TypeSpec, path: str) -> Any:
        target = tspec.python
        if target is object:
            try:
                return _freeze(construct(node))
            except UnreadableValue as exc:
                self.error(node, path, str(exc))
                return None
        if not isinstance(node, yaml.ScalarNode):
            self.error(node, path, f"expected {_describe(target)}, found {_node_type(node)}")
            return zero_of(tspec)
        try:
            raw = construct(node)
        except UnreadableValue as exc:
            self.error(node, path, str(exc))
            return zero_of(tspec)
        if isinstance(raw, str) and _SURROGATES.search(raw):
            self.error(node, path, "contains an escaped lone surrogate (\\uD800-\\uDFFF), not text")
            return zero_of(tspec)
        converter = _CONVERTERS.get(target)
        if converter is None:
            assert issubclass(target, enum.Enum)
            return self.enum(node, raw, target, path)
        try:
            value = converter(raw, node)
        except _Mismatch as exc:
            self.error(node, path, str(exc))
            return zero_of(tspec)
        self.check_constraints(node, spec, tspec, path, value)
        return value

    def enum(self, node: yaml.Node, raw: Any, target: type[enum.Enum], path: str) -> Any:
        names = [m.value for m in target]
        if isinstance(raw, str) and raw in names:
            return target(raw)
        shown = node.value if isinstance(node, yaml.ScalarNode) else raw
        guess = next((n for n in names if isinstance(raw, str) and n == raw.upper()), None)
        hint = f"did you mean {guess!r}? " if guess else ""
        self.error(node, path, f"{shown!r} is not allowed; {hint}use one of {', '.join(names)}")
        return next(iter(target))

    def check_constraints(
        self, node: yaml.Node, spec: FieldSpec, tspec: TypeSpec, path: str, value: Any
    ) -> None:
        if isinstance(value, Duration):
            minimum_ns = _MIN_DURATION_NS if spec.minimum is None else int(spec.minimum * 1e9)
            if value.nanos < minimum_ns:
                self.error(node, path, f"duration {value} is shorter than the 1ms minimum")
            return
        if isinstance(value, bool):
            return
        if isinstance(value, int):
            low: float | None = spec.minimum
            high: float | None = spec.maximum
            if tspec.int_range is not None:
                low = tspec.int_range.minimum if low is None else low
                high = tspec.int_range.maximum if high is None else high
            if (low is not None and value < low) or (high is not None and value > high):
                self.error(node, path, f"{value} is out of range; it must be {_range(low, high)}")
            return
        if isinstance(value, float):
            low, high = spec.minimum, spec.maximum
            if (low is not None and value < low) or (high is not None and value > high):
                self.error(node, path, f"{value:g} is out of range; it must be {_range(low, high)}")
            return
        if isinstance(value, str):
            if spec.min_length is not None and len(value) < spec.min_length:
                self.error(
                    node,
                    path,
                    "must not be empty"
                    if spec.min_length == 1
                    else f"must be at least {spec.min_length} characters long",
                )
            if spec.max_length is not None and len(value) > spec.max_length:
                self.error(
                    node,
                    path,
                    f"is {len(value)} characters long; at most {spec.max_length} are allowed",
                )
            if spec.pattern is not None and not re.search(spec.pattern, value):
                self.error(node, path, f"{value!r} does not match the pattern {spec.pattern}")


def _yaml_name(cls: type[Message], name: str) -> str:
    return next(s.yaml for s in field_specs(cls) if s.name == name)


def _range(low: float | None, high: float | None) -> str:
    if low is not None and high is not None:
        return f"between {_number(low)} and {_number(high)}"
    if low is not None:
        return f"at least {_number(low)}"
    return f"at most {_number(high)}"


def _number(value: float | None) -> str:
    return str(int(value)) if value is not None and float(value).is_integer() else f"{value:g}"


def _describe(target: type) -> str:
    if issubclass(target, enum.Enum):
        return "one of " + ", ".join(m.value for m in target)
    return {
        str: "a string",
        int: "an integer",
        float: "a number",
        bool: "a boolean (true or false)",
        bytes: "base64-encoded bytes",
        Duration: "a duration such as '5s'",
    }[target]


class _Mismatch(Exception):
    pass


def _to_str(raw: Any, node: yaml.Node) -> str:
    if isinstance(raw, str):
        return raw
    text = node.value if isinstance(node, yaml.ScalarNode) else raw
    raise _Mismatch(
        f'expected a string, found {_json_type(raw)}; quote it to keep it as text: "{text}"'
    )


def _to_int(raw: Any, node: yaml.Node) -> int:
    if isinstance(raw, int) and not isinstance(raw, bool):
        return raw
    if isinstance(raw, float) and raw.is_integer():
        return int(raw)
    hint = ""
    if isinstance(raw, str) and is_number(raw.strip().lstrip("-")):
        hint = f"; remove the quotes: {raw.strip()}"
    raise _Mismatch(f"expected an integer, found {_json_type(raw)} ({node.value!r}){hint}")


def _to_float(raw: Any, node: yaml.Node) -> float:
    if isinstance(raw, (int, float)) and not isinstance(raw, bool):
        return float(raw)
    raise _Mismatch(f"expected a number, found {_json_type(raw)} ({node.value!r})")


def _to_bool(raw: Any, node: yaml.Node) -> bool:
    if isinstance(raw, bool):
        return raw
    raise _Mismatch(f"expected true or false, found {_json_type(raw)} ({node.value!r})")


def _to_bytes(raw: Any, node: yaml.Node) -> bytes:
    if not isinstance(raw, (str, bytes)):
        raise _Mismatch(f"expected base64-encoded bytes, found {_json_type(raw)}")
    if isinstance(raw, bytes):
        return raw
    try:
        return base64.b64decode(raw, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise _Mismatch(f"is not valid base64: {exc}") from exc


def _to_duration(raw: Any, node: yaml.Node) -> Duration:
    if isinstance(raw, (int, float)) and not isinstance(raw, bool):
        raise _Mismatch(
            f"a duration needs a unit: write '{node.value}s' for seconds or '{node.value}ms'"
        )
    if not isinstance(raw, str):
        raise _Mismatch(f"expected a duration such as '5s', found {_json_type(raw)}")
    try:
        return parse_duration(raw)
    except ValueError as exc:
        raise _Mismatch(str(exc)) from exc


_CONVERTERS: dict[type, Callable[[Any, yaml.Node], Any]] = {
    str: _to_str,
    int: _to_int,
    float: _to_float,
    bool: _to_bool,
    bytes: _to_bytes,
    Duration: _to_duration,
}
