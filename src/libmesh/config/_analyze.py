"""Analysis across resources, like ``istioctl analyze``: references that resolve to nothing,
resources that silently override each other, and settings that contradict each other.

Each analyzer is a function over an :class:`AnalysisContext` that reports through cursors, so
every finding points at the field to fix and names the other resources involved.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from ._decode import Report
from ._findings import Codes, Finding
from ._loader import LoadResult
from ._mesh import MeshSettings
from ._networking import (
    ClientTLSSettings,
    Destination,
    DestinationRule,
    TLSMode,
    VirtualService,
)
from ._registry import Registry, RegistryService, Workload, labels_match
from ._resource import Resource, ResourceRef
from ._security import MutualTLSMode, PeerAuthentication
from ._validate import Cursor

__all__ = ["ANALYZERS", "AnalysisContext", "analyze"]


@dataclass
class AnalysisContext:
    resources: tuple[Resource[Any], ...]
    registry: Registry
    mesh: MeshSettings
    findings: list[Finding] = field(default_factory=list)

    def of_kind(self, kind: str) -> Iterator[Resource[Any]]:
        return (r for r in self.resources if r.kind == kind)

    def cursor(self, resource: Resource[Any]) -> Cursor:
        report = Report(resource.location.file, resource=resource.ref, findings=self.findings)
        return Cursor(resource.spec, "spec", report, resource)

    def metadata_cursor(self, resource: Resource[Any]) -> Cursor:
        report = Report(resource.location.file, resource=resource.ref, findings=self.findings)
        return Cursor(resource.metadata, "metadata", report, resource)

    @property
    def declares_workloads(self) -> bool:
        """Whether the config names any workload; without, selector checks would only guess,
        because workloads may still register with meshd at run time."""
        return bool(self.registry.workloads) or any(s.endpoints for s in self.registry.services)

    def all_workloads(self) -> Iterator[Workload]:
        yield from self.registry.workloads
        for service in self.registry.services:
            yield from service.endpoints


Analyzer = Callable[[AnalysisContext], None]


def analyze(
    result: LoadResult,
    *,
    only: Iterable[str] | None = None,
    mesh: MeshSettings | None = None,
) -> list[Finding]:
    """Run the analyzers (all, or those named in ``only``) over everything a load decoded.

    Resources with validation errors take part too, as in ``istioctl analyze``: a reference to
    a broken resource is still a reference.
    """
    mesh = mesh or MeshSettings()
    resources = result.config.resources + result.rejected
    context = AnalysisContext(
        resources=resources,
        registry=Registry.build(resources, result.services, mesh.domain),
        mesh=mesh,
    )
    names = list(ANALYZERS) if only is None else list(only)
    for name in names:
        if name not in ANALYZERS:
            raise ValueError(
                f"unknown analyzer {name!r}; the analyzers are: {', '.join(ANALYZERS)}"
            )
        ANALYZERS[name](context)
    return context.findings


# -- VirtualService ------------------------------------------------------------------------------


def _applies_to_mesh(vs: VirtualService) -> bool:
    return not vs.gateways or "mesh" in vs.gateways


def conflicting_virtual_services(ctx: AnalysisContext) -> None:
    """IST0109: two VirtualServices for the mesh claim one host; which one wins is undefined."""
    by_key: dict[tuple[str, str], list[Resource[Any]]] = defaultdict(list)
    for resource in ctx.of_kind("VirtualService"):
        vs: VirtualService = resource.spec
        if not _applies_to_mesh(vs):
            continue
        scopes = _export_scopes(vs.export_to, resource.namespace)
        for scope in sorted(scopes):
            for host in vs.hosts:
                by_key[(scope, ctx.registry.fqdn(host, resource.namespace))].append(resource)
    reported: set[ResourceRef] = set()
    for (scope, host), claimants in by_key.items():
        group = list(claimants)
        if scope != "*":
            for (other_scope, other_host), others in by_key.items():
                if other_scope == "*" and _host_overlap(host, other_host):
                    group.extend(others)
        unique = list(dict.fromkeys(group))
        if len(unique) < 2:
            continue
        for resource in unique:
            if resource.ref in reported:
                continue
            reported.add(resource.ref)
            other_refs = tuple(r.ref for r in unique if r is not resource)
            ctx.metadata_cursor(resource).add(
                Codes.CONFLICTING_MESH_GATEWAY_VIRTUAL_SERVICE_HOSTS,
                f"host {host} is also routed by {_names(other_refs)}; with several "
                "VirtualServices for one host only one takes effect. Merge them into a single "
                "VirtualService",
                "name",
                related=other_refs,
            )


def _host_overlap(a: str, b: str) -> bool:
    from ._hosts import host_matches

    return host_matches(a, b)


def _export_scopes(export_to: tuple[str, ...], namespace: str) -> set[str]:
    if not export_to or "*" in export_to:
        return {"*"}
    return {namespace if e == "." else e for e in export_to}


@dataclass(frozen=True)
class _RouteDestination:
    cursor: Cursor  # at the Destination
    destination: Destination
    mirror: bool


def _destinations(c: Cursor) -> Iterator[_RouteDestination]:
    for kind in ("http", "tls", "tcp"):
        for _, route in c.items(kind):
            for _, target in route.items("route"):
                yield _RouteDestination(target.child("destination"), target.node.destination, False)
    for _, route in c.items("http"):
        if route.node.mirror is not None:
            yield _RouteDestination(route.child("mirror"), route.node.mirror, True)
        for _, mirror in route.items("mirrors"):
            yield _RouteDestination(mirror.child("destination"), mirror.node.destination, True)


def destination_hosts(ctx: AnalysisContext) -> None:
    """IST0101 and IST0112: every destination names a known service, and a port it has."""
    for resource in ctx.of_kind("VirtualService"):
        vs: VirtualService = resource.spec
        for target in _destinations(ctx.cursor(resource)):
            host = target.destination.host
            service = ctx.registry.lookup(host, resource.namespace, vs.export_to)
            what = "mirror host" if target.mirror else "host"
            if service is None:
                target.cursor.add(
                    Codes.REFERENCED_RESOURCE_NOT_FOUND,
                    f"{what} {host!r} is not a known service: no ServiceEntry or Service "
                    f"visible from namespace {resource.namespace} declares "
                    f"{ctx.registry.fqdn(host, resource.namespace)}",
                    "host",
                )
                continue
            related = (service.source,) if service.source else ()
            ports = [p.number for p in service.ports]
            if target.destination.port is None:
                if len(ports) > 1:
                    target.cursor.add(
                        Codes.VIRTUAL_SERVICE_DESTINATION_PORT_SELECTOR_REQUIRED,
                        f"service {host!r} has several ports ({', '.join(map(str, ports))}); "
                        "name the one to route to with port.number",
                        "host",
                        related=related,
                    )
            elif target.destination.port.number not in ports:
                number = target.destination.port.number
                target.cursor.add(
                    Codes.REFERENCED_RESOURCE_NOT_FOUND,
                    f"{what}:port '{host}:{number}' not found: the service's ports are "
                    f"{', '.join(map(str, ports)) or 'none'}",
                    "port",
                    related=related,
                )


def destination_subsets(ctx: AnalysisContext) -> None:
    """IST0101: a destination's subset is defined by a DestinationRule for its host."""
    defined: dict[tuple[str, str], set[str]] = defaultdict(set)
    for resource in ctx.of_kind("DestinationRule"):
        rule: DestinationRule = resource.spec
        key = _host_identity(rule.host, resource.namespace, ctx.registry.domain)
        defined[key].update(s.name for s in rule.subsets)
    for resource in ctx.of_kind("VirtualService"):
        for target in _destinations(ctx.cursor(resource)):
            subset = target.destination.subset
            if not subset:
                continue
            key = _host_identity(target.destination.host, resource.namespace, ctx.registry.domain)
            if subset in defined[key]:
                continue
            known = sorted(defined[key])
            hint = (
                f"; its subsets are {', '.join(known)}"
                if known
                else "; no DestinationRule defines subsets for it"
            )
            what = "mirror" if target.mirror else "route"
            target.cursor.add(
                Codes.REFERENCED_RESOURCE_NOT_FOUND,
                f"{what} subset {subset!r} of host {target.destination.host!r} is not defined "
                f"by any DestinationRule{hint}",
                "subset",
            )


def _host_identity(host: str, namespace: str, domain: str) -> tuple[str, str]:
    """Istio's (namespace, name) of a host: FQDNs name their namespace, others the owner's."""
    suffix = f".svc.{domain}"
    if host.endswith(suffix):
        name, _, ns = host[: -len(suffix)].rpartition(".")
        if name and ns:
            return ns, name
    return namespace, host


# -- DestinationRule -----------------------------------------------------------------------------


def ca_certificates(ctx: AnalysisContext) -> None:
    """IST0128/IST0129: SIMPLE or MUTUAL TLS without caCertificates trusts any server."""
    for resource in ctx.of_kind("DestinationRule"):
        rule: DestinationRule = resource.spec
        if rule.traffic_policy is None:
            continue
        policy = ctx.cursor(resource).child("traffic_policy")
        selected = rule.workload_selector is not None
        if rule.traffic_policy.tls is not None and _unverified(rule.traffic_policy.tls, selected):
            tls = rule.traffic_policy.tls
            assert tls.mode is not None
            policy.add(
                Codes.NO_SERVER_CERTIFICATE_VERIFICATION_DESTINATION_LEVEL,
                f"TLS mode {tls.mode.value} without caCertificates: the server's certificate "
                f"for host {rule.host} is not verified",
                "tls",
            )
        for _, port_policy in policy.items("port_level_settings"):
            tls = port_policy.node.tls
            if tls is not None and _unverified(tls, selected):
                port = port_policy.node.port.number if port_policy.node.port else "?"
                port_policy.add(
                    Codes.NO_SERVER_CERTIFICATE_VERIFICATION_PORT_LEVEL,
                    f"TLS mode {tls.mode.value} without caCertificates: the server's certificate "
                    f"for host {rule.host} at port {port} is not verified",
                    "tls",
                )


def _unverified(tls: ClientTLSSettings, has_workload_selector: bool) -> bool:
    if tls.mode not in (TLSMode.SIMPLE, TLSMode.MUTUAL) or tls.ca_certificates:
        return False
    return not (tls.credential_name and has_workload_selector)


def destination_rule_hosts(ctx: AnalysisContext) -> None:
    """IST0174: the host matches no service; IST0173: a subset selects none of its workloads."""
    for resource in ctx.of_kind("DestinationRule"):
        rule: DestinationRule = resource.spec
        cursor = ctx.cursor(resource)
        service = ctx.registry.lookup(rule.host, resource.namespace, rule.export_to)
        if service is None:
            fqdn = ctx.registry.fqdn(rule.host, resource.namespace)
            shown = rule.host if fqdn == rule.host else f"{rule.host} ({fqdn})"
            cursor.add(
                Codes.UNKNOWN_DESTINATION_RULE_HOST,
                f"host {shown} matches no service in the mesh: no ServiceEntry or Service "
                "declares it, so this DestinationRule has no effect",
                "host",
            )
            continue
        workloads = ctx.registry.workloads_of(service)
        if not workloads:
            continue  # workloads may register at run time; nothing to check against
        for _, subset in cursor.items("subsets"):
            selector = {**(service.selector or {}), **subset.node.labels}
            if not any(labels_match(selector, w.labels) for w in workloads):
                shown = ", ".join(f"{k}={v}" for k, v in sorted(selector.items()))
                subset.add(
                    Codes.DESTINATION_RULE_SUBSET_NOT_SELECT_PODS,
                    f"subset {subset.node.name!r} ({shown}) selects none of the "
                    f"{len(workloads)} workloads of {service.host}; requests routed to it "
                    "fail with 503 (no healthy upstream)",
                    "labels",
                    related=tuple({w.source for w in workloads if w.source}),
                )


def merged_destination_rules(ctx: AnalysisContext) -> None:
    """LM0101/LM0102: several DestinationRules for one host are merged, and parts are lost."""
    groups: dict[str, list[Resource[Any]]] = defaultdict(list)
    for resource in ctx.of_kind("DestinationRule"):
        rule: DestinationRule = resource.spec
        if rule.workload_selector is not None:
            continue
        groups[ctx.registry.fqdn(rule.host, resource.namespace)].append(resource)
    for host, rules in groups.items():
        if len(rules) < 2:
            continue
        first, *later = rules
        for resource in later:
            rule = resource.spec
            refs = tuple(r.ref for r in rules if r is not resource)
            cursor = ctx.cursor(resource)
            lost: list[str] = []
            if rule.traffic_policy is not None and any(
                r.spec.traffic_policy is not None for r in rules[: rules.index(resource)]
            ):
                lost.append("its trafficPolicy is ignored")
            earlier_subsets = {
                s.name for r in rules[: rules.index(resource)] for s in r.spec.subsets
            }
            clashes = sorted(earlier_subsets & {s.name for s in rule.subsets})
            if clashes:
                lost.append(f"its subsets {', '.join(clashes)} are ignored")
            if lost:
                cursor.add(
                    Codes.CONFLICTING_DESTINATION_RULES,
                    f"{first.ref} already configures host {host}, so {' and '.join(lost)}; "
                    "put the settings for one host in one DestinationRule",
                    "host",
                    related=refs,
                )
            else:
                cursor.add(
                    Codes.MERGED_DESTINATION_RULES,
                    f"host {host} is also configured by {_names(refs)}; the rules are merged",
                    "host",
                    related=refs,
                )


# -- security ------------------------------------------------------------------------------------


def _peer_mode(
    ctx: AnalysisContext, namespace: str, labels: Mapping[str, str] | None, port: int | None
) -> tuple[MutualTLSMode, Resource[Any] | None]:
    """The effective mTLS mode for a workload: its own policy, else its namespace's, else the
    mesh's (in the root namespace); port-level settings win where they apply."""
    workload_policy = namespace_policy = mesh_policy = None
    for resource in ctx.of_kind("PeerAuthentication"):
        pa: PeerAuthentication = resource.spec
        has_selector = pa.selector is not None and bool(pa.selector.match_labels)
        if resource.namespace == namespace and has_selector:
            if (
                labels is not None
                and pa.selector is not None
                and labels_match(pa.selector.match_labels, labels)
            ):
                workload_policy = workload_policy or resource
        elif resource.namespace == namespace and not has_selector:
            namespace_policy = namespace_policy or resource
        elif resource.namespace == ctx.mesh.root_namespace and not has_selector:
            mesh_policy = mesh_policy or resource
    for candidate in (workload_policy, namespace_policy, mesh_policy):
        if candidate is None:
            continue
        pa = candidate.spec
        if port is not None and str(port) in pa.port_level_mtls:
            mode = pa.port_level_mtls[str(port)].mode
            if mode not in (None, MutualTLSMode.UNSET):
                return mode, candidate
        if pa.mtls is not None and pa.mtls.mode not in (None, MutualTLSMode.UNSET):
            return pa.mtls.mode, candidate
    return MutualTLSMode.PERMISSIVE, None


def tls_against_peer_authentication(ctx: AnalysisContext) -> None:
    """IST0113: a DestinationRule sends plaintext where PeerAuthentication demands mTLS."""
    for resource in ctx.of_kind("DestinationRule"):
        rule: DestinationRule = resource.spec
        service = ctx.registry.lookup(rule.host, resource.namespace, rule.export_to)
        if service is None:
            continue
        for cursor, tls, port in _tls_settings(ctx.cursor(resource)):
            if tls.mode is not TLSMode.DISABLE:
                continue
            strict = _strict_policy(ctx, service, port)
            if strict is None:
                continue
            where_port = f" port {port}" if port else ""
            cursor.add(
                Codes.MTLS_POLICY_CONFLICT,
                f"tls.mode DISABLE sends plaintext to {service.host}{where_port}, but "
                f"{strict.ref} requires mTLS (STRICT) there: every request will be refused",
                "mode",
                related=(strict.ref,),
            )


def _tls_settings(c: Cursor) -> Iterator[tuple[Cursor, ClientTLSSettings, int | None]]:
    rule: DestinationRule = c.node
    policies: list[Cursor] = []
    if rule.traffic_policy is not None:
        policies.append(c.child("traffic_policy"))
    policies.extend(
        s.child("traffic_policy")
        for _, s in c.items("subsets")
        if s.node.traffic_policy is not None
    )
    for policy in policies:
        if policy.node.tls is not None:
            yield policy.child("tls"), policy.node.tls, None
        for _, port_policy in policy.items("port_level_settings"):
            if port_policy.node.tls is not None:
                number = port_policy.node.port.number if port_policy.node.port else None
                yield port_policy.child("tls"), port_policy.node.tls, number


def _strict_policy(
    ctx: AnalysisContext, service: RegistryService, port: int | None
) -> Resource[Any] | None:
    workloads = ctx.registry.workloads_of(service)
    targets: list[Mapping[str, str] | None] = [w.labels for w in workloads] or [None]
    ports: list[int | None] = [port] if port else [p.target_port or p.number for p in service.ports]
    ports = ports or [None]
    for labels in targets:
        for number in ports:
            mode, policy = _peer_mode(ctx, service.namespace, labels, number)
            if mode is MutualTLSMode.STRICT and policy is not None:
                return policy
    return None


def policy_selectors(ctx: AnalysisContext) -> None:
    """IST0127: a policy's selector matches none of the workloads the config declares."""
    if not ctx.declares_workloads:
        return
    workloads = list(ctx.all_workloads())
    for kind in ("AuthorizationPolicy", "RequestAuthentication", "PeerAuthentication"):
        for resource in ctx.of_kind(kind):
            selector = resource.spec.selector
            mesh_wide = resource.namespace == ctx.mesh.root_namespace
            candidates = [w for w in workloads if mesh_wide or w.namespace == resource.namespace]
            cursor = ctx.cursor(resource)
            if selector is None or not selector.match_labels:
                if not mesh_wide and not candidates and kind != "PeerAuthentication":
                    cursor.add(
                        Codes.NO_MATCHING_WORKLOADS_FOUND,
                        f"namespace {resource.namespace} has no workloads, so this {kind} "
                        "applies to nothing",
                    )
                continue
            if not any(labels_match(selector.match_labels, w.labels) for w in candidates):
                shown = ",".join(f"{k}={v}" for k, v in sorted(selector.match_labels.items()))
                scope = "any namespace" if mesh_wide else f"namespace {resource.namespace}"
                cursor.child("selector").add(
                    Codes.NO_MATCHING_WORKLOADS_FOUND,
                    f"no workload in {scope} has the labels {shown}, so this {kind} applies "
                    "to nothing",
                    "match_labels",
                )


# -- ServiceEntry and status ---------------------------------------------------------------------


def service_entry_addresses(ctx: AnalysisContext) -> None:
    """IST0134: a TCP port without addresses cannot be told apart from other TCP services."""
    if ctx.mesh.dns_auto_allocate:
        return
    for resource in ctx.of_kind("ServiceEntry"):
        if resource.spec.addresses or _status_addresses(resource.status):
            continue
        for _, port in ctx.cursor(resource).items("ports"):
            protocol = port.node.protocol or ""
            if protocol == "" or protocol.upper() == "TCP":
                port.add(
                    Codes.SERVICE_ENTRY_ADDRESSES_REQUIRED,
                    f"port {port.node.number} serves {protocol or 'unset (TCP)'} traffic, which "
                    "is routed by destination address: give the ServiceEntry addresses, or "
                    "set protocol to HTTP, GRPC or TLS",
                    "name",
                )


def _status_addresses(status: Any) -> bool:
    return isinstance(status, Mapping) and bool(status.get("addresses"))


_NEGATIVE_CONDITIONS: dict[str, dict[str, str]] = {
    "ServiceEntry": {"istio.io/WaypointBound": "False"},
    "AuthorizationPolicy": {"ZtunnelAccepted": "False", "WaypointAccepted": "False"},
}


def negative_conditions(ctx: AnalysisContext) -> None:
    """IST0171: the resource's status reports a condition that failed."""
    for kind, watched in _NEGATIVE_CONDITIONS.items():
        for resource in ctx.of_kind(kind):
            status = resource.status
            conditions = status.get("conditions") if isinstance(status, Mapping) else None
            for condition in conditions or ():
                if not isinstance(condition, Mapping):
                    continue
                kind_name = str(condition.get("type", ""))
                state = str(condition.get("status", ""))
                reason = str(condition.get("reason", ""))
                partially_invalid = kind_name == "WaypointAccepted" and reason == "PartiallyInvalid"
                if watched.get(kind_name) == state or (
                    kind == "AuthorizationPolicy" and partially_invalid
                ):
                    ctx.metadata_cursor(resource).add(
                        Codes.NEGATIVE_CONDITION_STATUS,
                        f"status condition {kind_name} is {state} ({reason}): "
                        f"{condition.get('message', '')}",
                        "name",
                    )


def _names(refs: Iterable[ResourceRef]) -> str:
    return ", ".join(str(r) for r in refs)


ANALYZERS: dict[str, Analyzer] = {
    "virtualservice.conflicting-hosts": conflicting_virtual_services,
    "virtualservice.destination-hosts": destination_hosts,
    "virtualservice.destination-subsets": destination_subsets,
    "destinationrule.ca-certificates": ca_certificates,
    "destinationrule.hosts-and-subsets": destination_rule_hosts,
    "destinationrule.merged": merged_destination_rules,
    "destinationrule.tls-vs-peerauthentication": tls_against_peer_authentication,
    "policy.selectors": policy_selectors,
    "serviceentry.addresses": service_entry_addresses,
    "status.conditions": negative_conditions,
}
