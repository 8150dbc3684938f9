"""Looking up where a value was written."""

from __future__ import annotations

from ._schema import Message
from ._source import NOWHERE, Location

__all__ = ["where"]


def where(obj: Message, field: str | None = None, key: int | str | None = None) -> Location:
    """The source location of ``obj``, of one of its fields, or of one item of a field.

    ``where(route, "weight")`` is the line of ``weight:``; ``where(vs, "hosts", 1)`` the line of
    the second host; ``where(match, "headers", "x-user")`` the line of that header's key.
    Falls back to the object's own location when the field was not written.
    """
    if field is None:
        return obj._at
    name = field if key is None else f"{field}[{key}]"
    return obj._field_at.get(name) or obj._field_at.get(field) or obj._at or NOWHERE
