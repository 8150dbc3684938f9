"""Semantic validation: Istio's rules for each kind, run on the typed model after decoding.

Each ``validate_*`` function walks one spec through a :class:`Cursor`, which knows the YAML path
and source line of every value, so that a finding points at the field to fix.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from typing import Any

from ._annotations import annotation_problems
from ._decode import Report
from ._findings import Code, Codes, Finding
from ._resource import Resource, ResourceRef
from ._schema import Message, field_specs
from ._where import where

__all__ = ["Cursor", "validate_resource"]


def _yaml_names(cls: type[Message]) -> dict[str, str]:
    return {spec.name: spec.yaml for spec in field_specs(cls)}


class Cursor:
    """A message inside a resource, with its YAML path, to report findings against."""

    __slots__ = ("node", "path", "report", "resource")

    def __init__(self, node: Any, path: str, report: Report, resource: Resource[Any]) -> None:
        self.node = node
        self.path = path
        self.report = report
        self.resource = resource

    def path_of(self, field: str | None = None, key: int | str | None = None) -> str:
        if field is None:
            return self.path
        name = _yaml_names(type(self.node)).get(field, field)
        path = f"{self.path}.{name}" if self.path else name
        return path if key is None else f"{path}[{key}]"

    def add(
        self,
        code: Code,
        message: str,
        field: str | None = None,
        key: int | str | None = None,
        *,
        related: tuple[ResourceRef, ...] = (),
    ) -> None:
        location = where(self.node, field, key) or self.resource.location
        self.report.add(code, location, self.path_of(field, key), message, related=related)

    def error(self, message: str, field: str | None = None, key: int | str | None = None) -> None:
        self.add(Codes.SCHEMA_VALIDATION_ERROR, message, field, key)

    def warning(self, message: str, field: str | None = None, key: int | str | None = None) -> None:
        self.add(Codes.SCHEMA_WARNING, message, field, key)

    def child(self, field: str, key: int | str | None = None) -> Cursor:
        value = getattr(self.node, field)
        if key is not None:
            value = value[key]
        return Cursor(value, self.path_of(field, key), self.report, self.resource)

    def items(self, field: str) -> Iterator[tuple[int, Cursor]]:
        """Each message of a list field, with its index."""
        for i in range(len(getattr(self.node, field))):
            yield i, self.child(field, i)

    def entries(self, field: str) -> Iterator[tuple[str, Cursor]]:
        """Each message of a map field, with its key."""
        for key in getattr(self.node, field):
            yield key, self.child(field, key)

    def check(
        self,
        problem: str | None,
        field: str | None = None,
        key: int | str | None = None,
    ) -> bool:
        """Report ``problem`` if there is one; True when the value was fine."""
        if problem:
            self.error(problem, field, key)
            return False
        return True


Validator = Callable[[Cursor], None]


def _validators() -> dict[str, Validator]:
    from ._validate_networking import (
        validate_destination_rule,
        validate_service_entry,
        validate_virtual_service,
        validate_workload_entry,
    )
    from ._validate_security import (
        validate_authorization_policy,
        validate_peer_authentication,
        validate_request_authentication,
    )

    return {
        "VirtualService": validate_virtual_service,
        "DestinationRule": validate_destination_rule,
        "ServiceEntry": validate_service_entry,
        "WorkloadEntry": validate_workload_entry,
        "PeerAuthentication": validate_peer_authentication,
        "AuthorizationPolicy": validate_authorization_policy,
        "RequestAuthentication": validate_request_authentication,
    }


_VALIDATORS: dict[str, Validator] = {}


def validate_resource(resource: Resource[Any], prior: list[Finding]) -> list[Finding]:
    """Istio's semantic checks for one decoded resource (structural checks already ran)."""
    if not _VALIDATORS:
        _VALIDATORS.update(_validators())
    report = Report(resource.location.file, resource=resource.ref)
    cursor = Cursor(resource.spec, "spec", report, resource)
    _check_metadata(resource, report)
    _VALIDATORS[resource.kind](cursor)
    broken = [f.path for f in prior if f.is_error and f.path]
    return [f for f in report.findings if not _follows_from(f.path, broken)]


def _follows_from(path: str, broken: list[str]) -> bool:
    """Whether a semantic finding at ``path`` is only a consequence of a structural error.

    Where decoding failed it substituted a zero value; checks on that value, on what contains
    it, or on what it contains would report the same mistake again, less clearly.
    """
    for bad in broken:
        if bad == path or _is_under(path, bad):
            return True
        if _is_under(bad, path) and (path != "spec" or _depth(bad) == 1):
            return True
    return False


def _is_under(path: str, ancestor: str) -> bool:
    return path.startswith(ancestor) and path[len(ancestor) : len(ancestor) + 1] in (".", "[")


def _depth(path: str) -> int:
    return path.count(".") + path.count("[")


_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
_NAMESPACE = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")


def _check_metadata(resource: Resource[Any], report: Report) -> None:
    meta = Cursor(resource.metadata, "metadata", report, resource)
    for annotation, problem in annotation_problems(resource.kind, resource.metadata.annotations):
        meta.error(problem, "annotations", annotation)
    name = resource.metadata.name
    if name and not (len(name) <= 253 and _SUBDOMAIN.fullmatch(name)):
        meta.error(
            f"name {name!r} is invalid: use lower-case letters, digits, '-' and '.', "
            "starting and ending with a letter or digit (at most 253 characters)",
            "name",
        )
    namespace = resource.metadata.namespace
    if namespace is not None and not (len(namespace) <= 63 and _NAMESPACE.fullmatch(namespace)):
        meta.error(
            f"namespace {namespace!r} is invalid: use a DNS-1123 label in lower case, "
            "such as 'shop'",
            "namespace",
        )
