"""The service registry that configuration declares: services, their ports and their workloads.

Services come from ServiceEntries (and Kubernetes Services in the same files); workloads from
WorkloadEntries and ServiceEntry endpoints. Host lookup follows Istio's visibility rules
(``exportTo`` on both sides, short names, wildcard hosts) so that analysis, the translator and
meshd agree on which service a host names.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import cached_property
from typing import Any

from .._frozen import EMPTY, FrozenMap
from ._hosts import DEFAULT_DOMAIN, resolve_host
from ._kubernetes import KubernetesService
from ._networking import Resolution, ServiceEntry, ServiceEntryLocation, WorkloadEntry
from ._resource import Resource, ResourceRef
from ._rules import parse_protocol
from ._source import Location

__all__ = ["Registry", "RegistryService", "ServicePortInfo", "Workload", "labels_match"]

EVERYWHERE = "*"


@dataclass(frozen=True, slots=True)
class ServicePortInfo:
    number: int
    name: str
    protocol: str | None  # canonical ("HTTP", "GRPC", …) or None when unset or unknown
    target_port: int | None = None


@dataclass(frozen=True, slots=True)
class Workload:
    """One instance that serves traffic: where it listens, and the labels that select it."""

    name: str
    namespace: str
    address: str
    ports: FrozenMap[str, int]
    labels: FrozenMap[str, str]
    locality: str = ""
    weight: int = 0
    network: str = ""
    service_account: str = ""
    source: ResourceRef | None = None
    healthy: bool = True  # what the workload last reported (self-registered ones report)


@dataclass(frozen=True, slots=True)
class RegistryService:
    """A host that routes can name, with its ports and how its workloads are found."""

    host: str  # fully qualified, or a wildcard
    namespace: str
    ports: tuple[ServicePortInfo, ...]
    scopes: frozenset[str]  # namespaces that may see it; "*" for all
    selector: FrozenMap[str, str] | None  # workloads by label, or None
    endpoints: tuple[Workload, ...]  # inline endpoints
    location: ServiceEntryLocation = ServiceEntryLocation.MESH_EXTERNAL
    resolution: Resolution = Resolution.NONE
    source: ResourceRef | None = None
    source_location: Location | None = None
    subject_alt_names: tuple[str, ...] = ()  # the identities its workloads present (mTLS)

    @property
    def is_wildcard(self) -> bool:
        return self.host.startswith("*")


def labels_match(selector: Mapping[str, str], labels: Mapping[str, str]) -> bool:
    """A Kubernetes equality selector: every selector label present with the same value."""
    return all(labels.get(k) == v for k, v in selector.items())


@dataclass(frozen=True)
class Registry:
    services: tuple[RegistryService, ...] = ()
    workloads: tuple[Workload, ...] = ()  # from WorkloadEntries (selected by label)
    domain: str = DEFAULT_DOMAIN

    @classmethod
    def build(
        cls,
        resources: Iterable[Resource[Any]],
        kubernetes_services: Iterable[KubernetesService] = (),
        domain: str = DEFAULT_DOMAIN,
    ) -> Registry:
        services: list[RegistryService] = []
        workloads: list[Workload] = []
        for resource in resources:
            if resource.kind == "ServiceEntry":
                services.extend(_from_service_entry(resource, domain))
            elif resource.kind == "WorkloadEntry":
                workloads.append(
                    _workload(resource.spec, resource.name, resource.namespace, resource.ref)
                )
        for k8s in kubernetes_services:
            services.append(_from_kubernetes(k8s, domain))
        return cls(tuple(services), tuple(workloads), domain)

    def with_workloads(self, workloads: Iterable[Workload]) -> Registry:
        """This registry plus ``workloads`` (registered at run time), selected like
        WorkloadEntries."""
        return Registry(self.services, (*self.workloads, *workloads), self.domain)

    def fqdn(self, host: str, namespace: str) -> str:
        return resolve_host(host, namespace, self.domain)

    def lookup(
        self, host: str, namespace: str, export_to: Iterable[str] = ()
    ) -> RegistryService | None:
        """The service ``host`` names for a resource in ``namespace`` exported to ``export_to``.

        Istio's rule (``GetDestinationHost``): a service visible everywhere; else one visible in
        the referring resource's own scopes; else a wildcard service host that covers ``host``.
        """
        fqdn = self.fqdn(host, namespace)
        scopes = [namespace if e == "." else e for e in export_to] or [namespace]
        named = self._by_host.get(fqdn, ())
        for service in named:
            if EVERYWHERE in service.scopes:
                return service
        for scope in scopes:
            for service in named:
                if scope in service.scopes:
                    return service
        bare = fqdn.lstrip("*")
        for service in self._by_host.get("*", ()):
            visible = EVERYWHERE in service.scopes or namespace in service.scopes
            if visible and bare.endswith(service.host[1:]):
                return service
        return None

    @cached_property
    def _by_host(self) -> dict[str, list[RegistryService]]:
        """Services by host, in declaration order; wildcard hosts together under ``*``."""
        index: dict[str, list[RegistryService]] = {}
        for service in self.services:
            index.setdefault("*" if service.is_wildcard else service.host, []).append(service)
        return index

    def workloads_of(self, service: RegistryService) -> tuple[Workload, ...]:
        """The workloads behind a service: inline endpoints, or WorkloadEntries it selects."""
        if service.endpoints:
            return service.endpoints
        if service.selector is None:
            return ()
        return tuple(
            w
            for w in self._workloads_by_namespace.get(service.namespace, ())
            if labels_match(service.selector, w.labels)
        )

    @cached_property
    def _workloads_by_namespace(self) -> dict[str, list[Workload]]:
        index: dict[str, list[Workload]] = {}
        for workload in self.workloads:
            index.setdefault(workload.namespace, []).append(workload)
        return index


def _scopes(export_to: Iterable[str], namespace: str) -> frozenset[str]:
    entries = list(export_to)
    if not entries or EVERYWHERE in entries:
        return frozenset({EVERYWHERE})
    return frozenset(namespace if e == "." else e for e in entries if e != "~")


def _workload(
    entry: WorkloadEntry, name: str, namespace: str, source: ResourceRef | None
) -> Workload:
    return Workload(
        name=name,
        namespace=namespace,
        address=entry.address or "",
        ports=FrozenMap(entry.ports),
        labels=FrozenMap(entry.labels),
        locality=entry.locality or "",
        weight=entry.weight or 0,
        network=entry.network or "",
        service_account=entry.service_account or "",
        source=source,
    )


def _from_service_entry(resource: Resource[Any], domain: str) -> list[RegistryService]:
    se: ServiceEntry = resource.spec
    namespace = resource.namespace
    ports = tuple(
        ServicePortInfo(p.number, p.name, parse_protocol(p.protocol), p.target_port)
        for p in se.ports
    )
    endpoints = tuple(
        _workload(e, f"{resource.name}[{i}]", namespace, resource.ref)
        for i, e in enumerate(se.endpoints)
    )
    selector = FrozenMap(se.workload_selector.labels) if se.workload_selector is not None else None
    return [
        RegistryService(
            host=resolve_host(host, namespace, domain),
            namespace=namespace,
            ports=ports,
            scopes=_scopes(se.export_to, namespace),
            selector=selector,
            endpoints=endpoints,
            location=se.location or ServiceEntryLocation.MESH_EXTERNAL,
            resolution=se.resolution or Resolution.NONE,
            source=resource.ref,
            source_location=resource.location,
            subject_alt_names=se.subject_alt_names,
        )
        for host in se.hosts
    ]


def _from_kubernetes(service: KubernetesService, domain: str) -> RegistryService:
    ports = tuple(
        ServicePortInfo(p.number, p.name, parse_protocol(p.protocol)) for p in service.ports
    )
    return RegistryService(
        host=f"{service.name}.{service.namespace}.svc.{domain}",
        namespace=service.namespace,
        ports=ports,
        scopes=_scopes(service.export_to, service.namespace),
        selector=service.selector or EMPTY,
        endpoints=(),
        location=ServiceEntryLocation.MESH_INTERNAL,
        resolution=Resolution.STATIC,
        source=service.ref,
        source_location=service.location,
    )
