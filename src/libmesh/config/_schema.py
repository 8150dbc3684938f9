"""The vocabulary the config model is written in.

Every Istio message is a frozen, slotted, keyword-only dataclass deriving from :class:`Message`.
A field's YAML name is its camelCase spelling unless ``yaml=`` says otherwise; constraints that
Istio's CRD schema states (ranges, lengths, required, oneof groups) are declared beside the
field, so the decoder, the validator and the schema conformance test all read one definition.
"""

from __future__ import annotations

import dataclasses
import enum
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Annotated, Any, ClassVar, Union, get_args, get_origin

from .._duration import Duration
from .._frozen import EMPTY, FrozenMap
from ._source import NOWHERE, Location

__all__ = [
    "Double",
    "FieldSpec",
    "Int32",
    "Int64",
    "IntRange",
    "Message",
    "UInt32",
    "UInt64",
    "field_specs",
    "optional",
    "required",
]


@dataclass(frozen=True, slots=True)
class IntRange:
    minimum: int
    maximum: int | None


Int32 = Annotated[int, IntRange(-(2**31), 2**31 - 1)]
UInt32 = Annotated[int, IntRange(0, 2**32 - 1)]
Int64 = Annotated[int, IntRange(-(2**63), 2**63 - 1)]
UInt64 = Annotated[int, IntRange(0, None)]
Double = float


@dataclass(frozen=True, slots=True, kw_only=True)
class Message:
    """Base of every config value object.

    ``_at`` is where the object starts in its source file and ``_field_at`` where each of its
    fields (and list items, as ``name[i]``, and map entries, as ``name.key``) was written. Read
    them with :func:`libmesh.config.where`.
    """

    __oneofs__: ClassVar[tuple[tuple[str, ...], ...]] = ()

    _at: Location = field(default=NOWHERE, repr=False, compare=False)
    _field_at: FrozenMap[str, Location] = field(default=EMPTY, repr=False, compare=False)


def _metadata(
    *,
    yaml: str | None,
    aliases: tuple[str, ...],
    deprecated: str | None,
    minimum: float | None,
    maximum: float | None,
    min_length: int | None,
    max_length: int | None,
    max_items: int | None,
    pattern: str | None,
    required: bool,
) -> dict[str, Any]:
    return {
        "yaml": yaml,
        "aliases": aliases,
        "deprecated": deprecated,
        "minimum": minimum,
        "maximum": maximum,
        "min_length": min_length,
        "max_length": max_length,
        "max_items": max_items,
        "pattern": pattern,
        "required": required,
    }


def required(
    *,
    yaml: str | None = None,
    max_items: int | None = None,
    min_length: int | None = None,
    max_length: int | None = None,
    minimum: float | None = None,
    maximum: float | None = None,
    pattern: str | None = None,
) -> Any:
    """A field Istio requires. The decoder reports it when missing and fills in a zero value."""
    return field(
        metadata=_metadata(
            yaml=yaml,
            aliases=(),
            deprecated=None,
            minimum=minimum,
            maximum=maximum,
            min_length=min_length,
            max_length=max_length,
            max_items=max_items,
            pattern=pattern,
            required=True,
        )
    )


def optional(
    default: Any = None,
    *,
    yaml: str | None = None,
    aliases: tuple[str, ...] = (),
    deprecated: str | None = None,
    minimum: float | None = None,
    maximum: float | None = None,
    min_length: int | None = None,
    max_length: int | None = None,
    max_items: int | None = None,
    pattern: str | None = None,
) -> Any:
    """An optional field with constraints or another YAML name."""
    return field(
        default=default,
        metadata=_metadata(
            yaml=yaml,
            aliases=aliases,
            deprecated=deprecated,
            minimum=minimum,
            maximum=maximum,
            min_length=min_length,
            max_length=max_length,
            max_items=max_items,
            pattern=pattern,
            required=False,
        ),
    )


# -- introspection, shared by the decoder, the validators and the conformance test -------------


class Shape(enum.Enum):
    SCALAR = "scalar"
    MESSAGE = "message"
    LIST = "list"
    MAP = "map"


@dataclass(frozen=True, slots=True)
class TypeSpec:
    """What one value must look like: a scalar type, an enum, a message, a list or a map."""

    shape: Shape
    python: type  # str, int, float, bool, bytes, Duration, an Enum or a Message subclass
    item: TypeSpec | None = None  # of a list or a map
    int_range: IntRange | None = None

    @property
    def is_message(self) -> bool:
        return self.shape is Shape.MESSAGE


@dataclass(frozen=True, slots=True)
class FieldSpec:
    name: str  # the Python attribute
    yaml: str  # the key written in YAML
    aliases: tuple[str, ...]
    type: TypeSpec
    required: bool
    deprecated: str | None
    minimum: float | None
    maximum: float | None
    min_length: int | None
    max_length: int | None
    max_items: int | None
    pattern: str | None

    def zero(self) -> Any:
        """The value a missing required field decodes to, so that objects stay well typed."""
        return zero_of(self.type)


def zero_of(spec: TypeSpec) -> Any:
    if spec.shape is Shape.LIST:
        return ()
    if spec.shape is Shape.MAP:
        return EMPTY
    if spec.shape is Shape.MESSAGE:
        cls = spec.python
        return cls(**{f.name: f.zero() for f in field_specs(cls) if f.required})
    if issubclass(spec.python, enum.Enum):
        return next(iter(spec.python))
    if spec.python is Duration:
        return Duration(0)
    return spec.python()


def camel(name: str) -> str:
    head, *rest = name.rstrip("_").split("_")
    return head + "".join(part[:1].upper() + part[1:] for part in rest)


def _type_spec(annotation: Any) -> TypeSpec:
    int_range: IntRange | None = None
    if annotation is Any:
        return TypeSpec(Shape.SCALAR, object)
    if get_origin(annotation) is Annotated:
        annotation, *extras = get_args(annotation)
        int_range = next((e for e in extras if isinstance(e, IntRange)), None)
    origin = get_origin(annotation)
    if origin in (Union, types.UnionType):
        members = [a for a in get_args(annotation) if a is not type(None)]
        if len(members) != 1:
            raise TypeError(f"unsupported union {annotation!r}")
        return _type_spec(members[0])
    if origin is tuple:
        item, ellipsis = get_args(annotation)
        assert ellipsis is Ellipsis
        return TypeSpec(Shape.LIST, tuple, _type_spec(item))
    if origin in (FrozenMap, Mapping):
        key, value = get_args(annotation)
        assert key is str
        return TypeSpec(Shape.MAP, dict, _type_spec(value))
    if isinstance(annotation, type) and issubclass(annotation, Message):
        return TypeSpec(Shape.MESSAGE, annotation)
    if annotation is int and int_range is None:
        int_range = IntRange(-(2**63), 2**63 - 1)
    if annotation in (str, int, float, bool, bytes, Duration) or (
        isinstance(annotation, type) and issubclass(annotation, enum.Enum)
    ):
        return TypeSpec(Shape.SCALAR, annotation, int_range=int_range)
    raise TypeError(f"unsupported field type {annotation!r}")


_FIELD_SPECS: dict[type, tuple[FieldSpec, ...]] = {}
_FIELDS_BY_KEY: dict[type, Mapping[str, FieldSpec]] = {}


def field_specs(cls: type[Message]) -> tuple[FieldSpec, ...]:
    """The fields of a message, in declaration order, with everything the decoder needs."""
    cached = _FIELD_SPECS.get(cls)
    if cached is None:
        cached = _FIELD_SPECS[cls] = _field_specs(cls)
    return cached


def _field_specs(cls: type[Message]) -> tuple[FieldSpec, ...]:
    hints = typing.get_type_hints(cls, include_extras=True)
    specs = []
    for f in dataclasses.fields(cls):
        if f.name.startswith("_"):
            continue
        md = f.metadata
        specs.append(
            FieldSpec(
                name=f.name,
                yaml=md.get("yaml") or camel(f.name),
                aliases=md.get("aliases", ()),
                type=_type_spec(hints[f.name]),
                required=md.get("required", False),
                deprecated=md.get("deprecated"),
                minimum=md.get("minimum"),
                maximum=md.get("maximum"),
                min_length=md.get("min_length"),
                max_length=md.get("max_length"),
                max_items=md.get("max_items"),
                pattern=md.get("pattern"),
            )
        )
    return tuple(specs)


def fields_by_key(cls: type[Message]) -> Mapping[str, FieldSpec]:
    """Every YAML key a message accepts, aliases included, mapped to its field."""
    table = _FIELDS_BY_KEY.get(cls)
    if table is None:
        table = _FIELDS_BY_KEY[cls] = {
            key: spec for spec in field_specs(cls) for key in (spec.yaml, *spec.aliases)
        }
    return table
