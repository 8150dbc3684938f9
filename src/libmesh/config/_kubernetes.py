"""Kubernetes Services, read as registry entries.

Istio users' YAML often carries the Kubernetes ``Service`` objects their VirtualServices route
to. libmesh has no Kubernetes, but a Service says exactly what a ServiceEntry would: a host
(``name.namespace.svc.cluster.local``), its ports, and a label selector for its workloads. So
a ``v1 Service`` is read as a registry entry instead of being skipped.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import yaml

from .._frozen import FrozenMap
from ._findings import Codes, Finding
from ._resource import DEFAULT_NAMESPACE, ResourceRef
from ._source import Location
from ._yaml import Document, UnreadableValue, construct

__all__ = ["KubernetesService", "KubernetesServicePort", "decode_kubernetes_service"]

EXPORT_TO_ANNOTATION = "networking.istio.io/exportTo"


@dataclass(frozen=True, slots=True)
class KubernetesServicePort:
    number: int
    name: str
    protocol: str


@dataclass(frozen=True, slots=True)
class KubernetesService:
    name: str
    namespace: str
    ports: tuple[KubernetesServicePort, ...]
    selector: FrozenMap[str, str]
    export_to: tuple[str, ...]  # from the networking.istio.io/exportTo annotation
    location: Location

    @property
    def ref(self) -> ResourceRef:
        return ResourceRef("Service", self.namespace, self.name)


def is_kubernetes_service(api_version: str, kind: str) -> bool:
    return api_version == "v1" and kind == "Service"


def decode_kubernetes_service(doc: Document) -> tuple[KubernetesService | None, list[Finding]]:
    try:
        raw: Any = construct(doc.node)
    except UnreadableValue as exc:
        raw = {}
        unreadable = str(exc)
    else:
        unreadable = ""
    meta = _mapping(raw.get("metadata"))
    spec = _mapping(raw.get("spec"))
    name = str(meta.get("name") or "")
    namespace = str(meta.get("namespace") or DEFAULT_NAMESPACE)
    ref = ResourceRef("Service", namespace, name or "<unnamed>")
    problems: list[str] = []
    ports = []
    raw_ports = spec.get("ports")
    for i, port in enumerate(raw_ports if isinstance(raw_ports, list) else []):
        number = port.get("port") if isinstance(port, dict) else None
        if not isinstance(number, int) or isinstance(number, bool):
            problems.append(f"spec.ports[{i}].port must be a port number")
            continue
        ports.append(
            KubernetesServicePort(
                number, str(port.get("name") or ""), str(port.get("protocol") or "TCP")
            )
        )
    if not name:
        problems.append("metadata.name is required")
    if unreadable:
        problems.append(unreadable)
    if problems:
        findings = [
            Finding(
                Codes.UNSUPPORTED_KIND,
                f"this Service is not usable as a registry entry and is skipped: {problem}",
                doc.location,
                resource=ref,
                document=doc.index,
            )
            for problem in problems
        ]
        return None, findings
    annotations = _mapping(meta.get("annotations"))
    exported = str(annotations.get(EXPORT_TO_ANNOTATION) or "")
    export_to = tuple(e.strip() for e in exported.split(",") if e.strip())
    selector = _mapping(spec.get("selector"))
    return (
        KubernetesService(
            name=name,
            namespace=namespace,
            ports=tuple(ports),
            selector=FrozenMap((str(k), str(v)) for k, v in selector.items()),
            export_to=export_to,
            location=doc.location,
        ),
        [],
    )


def _mapping(value: Any) -> dict[Any, Any]:
    return value if isinstance(value, dict) else {}


def document_kind(node: yaml.Node) -> tuple[str, str]:
    """The ``apiVersion`` and ``kind`` of a document, or empty strings."""
    if not isinstance(node, yaml.MappingNode):
        return "", ""
    found = {"apiVersion": "", "kind": ""}
    for key, value in node.value:
        if (
            isinstance(key, yaml.ScalarNode)
            and key.value in found
            and isinstance(value, yaml.ScalarNode)
        ):
            found[key.value] = str(value.value)
    return found["apiVersion"], found["kind"]
