"""The translator: Istio resources and the registry, for one client, to xDS v3 resources.

A pure function, written once: meshd serves its output over ADS, and libmesh's local mode calls it
in-process, so the two cannot drift apart. Each Istio feature is expressed in Envoy's own fields,
following Istio's own translation (pilot's ``networking/core``), so that grpcio and Envoy read the
same resources the way libmesh does.

Names follow Istio: a listener and its route configuration are named ``host:port``; a cluster
``outbound|port|subset|host``.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from envoy.config.cluster.v3 import cluster_pb2, outlier_detection_pb2
from envoy.config.core.v3 import address_pb2, base_pb2, config_source_pb2, health_check_pb2
from envoy.config.endpoint.v3 import endpoint_components_pb2, endpoint_pb2
from envoy.config.listener.v3 import api_listener_pb2, listener_pb2
from envoy.config.route.v3 import route_components_pb2 as rc
from envoy.config.route.v3 import route_pb2
from envoy.extensions.filters.http.fault.v3 import fault_pb2
from envoy.extensions.filters.http.router.v3 import router_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm,
)
from envoy.extensions.outlier_detection_monitors.consecutive_errors.v3 import (
    consecutive_errors_pb2,
)
from envoy.extensions.retry.host.previous_hosts.v3 import previous_hosts_pb2
from envoy.extensions.retry.priority.previous_priorities.v3 import (
    previous_priorities_config_pb2,
)
from envoy.extensions.upstreams.http.v3 import http_protocol_options_pb2
from envoy.type.matcher.v3 import regex_pb2, string_pb2
from envoy.type.v3 import percent_pb2, range_pb2
from google.protobuf import any_pb2, duration_pb2, struct_pb2, wrappers_pb2
from google.protobuf.message import Message

from .._duration import Duration
from .._frozen import EMPTY, FrozenMap
from ..config import (
    ConfigSet,
    DestinationRule,
    HTTPMatchRequest,
    HTTPRoute,
    Registry,
    RegistryService,
    Resource,
    ServicePortInfo,
    Subset,
    TrafficPolicy,
    VirtualService,
    Workload,
    labels_match,
)
from ..config._annotations import FailurePercentage, Hedge, SuccessRate, read_annotation
from ..config._hosts import host_matches
from ..config._networking import (
    ClientTLSSettings,
    ConnectionPoolSettings,
    Destination,
    Headers,
    HTTPFaultInjection,
    HTTPRetry,
    LoadBalancerSettings,
    OutlierDetection,
    Percent,
    PortTrafficPolicy,
    Resolution,
    ServiceEntryLocation,
    SimpleLB,
    StringMatch,
)
from ..config._rules import HTTP_PROTOCOLS, is_number
from ._inbound import (
    GRPC_SERVER_TEMPLATE,
    INBOUND_LISTENER,
    InboundModes,
    envoy_inbound,
    grpc_server_listener,
    inbound_listener,
    peer_authentication_modes,
)
from ._jwt import jwt_authn_filter
from ._rbac import rbac_filters
from ._snapshot import CLUSTER, ENDPOINT, LISTENER, ROUTE, Locality, Node, Snapshot
from ._tls import (
    TLS_MODE_LABEL,
    TRANSPORT_SOCKET_MATCH,
    apply_upstream_tls,
    expected_identities,
)

__all__ = [
    "DEFAULT_RETRY_ON",
    "FAULT_FILTER",
    "HTTP_PROXY_LISTENER",
    "ROUTER_FILTER",
    "TranslationCache",
    "cluster_name",
    "labels_read",
    "parse_cluster_name",
    "translate",
    "translation_key",
]

FAULT_FILTER = "envoy.filters.http.fault"
HCM_FILTER = "envoy.filters.network.http_connection_manager"
# The listener (and its route configuration) a real Envoy serves applications on.
HTTP_PROXY_LISTENER = "http_proxy"
ROUTER_FILTER = "envoy.filters.http.router"
HTTP_PROTOCOL_OPTIONS = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
CONSECUTIVE_ERRORS_MONITOR = "envoy.outlier_detection_monitors.consecutive_errors"

# Istio's retry policy for routes that configure none.
DEFAULT_RETRY_ON = "connect-failure,refused-stream,unavailable,cancelled,retriable-status-codes"
DEFAULT_RETRY_ATTEMPTS = 2
DEFAULT_CONNECT_TIMEOUT = Duration.of(seconds=10)
MAX_UINT32 = 2**32 - 1

_GRPC_CODES = {
    "OK": 0, "CANCELLED": 1, "UNKNOWN": 2, "INVALID_ARGUMENT": 3, "DEADLINE_EXCEEDED": 4,
    "NOT_FOUND": 5, "ALREADY_EXISTS": 6, "PERMISSION_DENIED": 7, "RESOURCE_EXHAUSTED": 8,
    "FAILED_PRECONDITION": 9, "ABORTED": 10, "OUT_OF_RANGE": 11, "UNIMPLEMENTED": 12,
    "INTERNAL": 13, "UNAVAILABLE": 14, "DATA_LOSS": 15, "UNAUTHENTICATED": 16,
}  # fmt: skip
_REDIRECT_CODES = {
    301: rc.RedirectAction.MOVED_PERMANENTLY,
    302: rc.RedirectAction.FOUND,
    303: rc.RedirectAction.SEE_OTHER,
    307: rc.RedirectAction.TEMPORARY_REDIRECT,
    308: rc.RedirectAction.PERMANENT_REDIRECT,
}
_LB_POLICIES = {
    SimpleLB.ROUND_ROBIN: cluster_pb2.Cluster.ROUND_ROBIN,
    SimpleLB.LEAST_CONN: cluster_pb2.Cluster.LEAST_REQUEST,
    SimpleLB.LEAST_REQUEST: cluster_pb2.Cluster.LEAST_REQUEST,
    SimpleLB.RANDOM: cluster_pb2.Cluster.RANDOM,
    SimpleLB.PASSTHROUGH: cluster_pb2.Cluster.CLUSTER_PROVIDED,
    SimpleLB.UNSPECIFIED: cluster_pb2.Cluster.LEAST_REQUEST,
}


def cluster_name(port: int, subset: str, host: str) -> str:
    return f"outbound|{port}|{subset}|{host}"


def parse_cluster_name(name: str) -> tuple[int, str, str] | None:
    parts = name.split("|")
    if len(parts) != 4 or parts[0] != "outbound" or not is_number(parts[1]):
        return None
    return int(parts[1]), parts[2], parts[3]


def labels_read(config: ConfigSet) -> frozenset[str]:
    """The node labels translation looks at (``sourceLabels``, DestinationRule selectors)."""
    keys: set[str] = set()
    for resource in config.resources:
        if resource.kind == "VirtualService":
            for http in resource.spec.http:
                for match in http.match:
                    keys.update(match.source_labels)
        elif resource.kind == "DestinationRule" and resource.spec.workload_selector is not None:
            keys.update(resource.spec.workload_selector.match_labels)
        elif resource.kind in _SELECTING_POLICIES and resource.spec.selector is not None:
            keys.update(resource.spec.selector.match_labels)
    return frozenset(keys)


_SELECTING_POLICIES = ("PeerAuthentication", "AuthorizationPolicy", "RequestAuthentication")


def translation_key(node: Node, labels: frozenset[str]) -> Node:
    """``node`` reduced to what :func:`translate` reads of it, given the ``labels`` the config
    reads (:func:`labels_read`): nodes with the same key get the same resources, so a control
    plane translates once per key, not once per client."""
    return Node(
        id="",
        namespace=node.namespace,
        labels=FrozenMap((k, v) for k, v in sorted(node.labels.items()) if k in labels),
        locality=node.locality,
        service_account="",
        flavor=node.flavor,
        http_proxy_address=node.http_proxy_address if node.flavor == "envoy" else "",
        inbound=node.inbound,
        routes=node.routes,
        sds=node.sds,
    )


class TranslationCache:
    """What earlier translations for one node built, per service port, with everything each
    piece read to build it. :func:`translate` reuses a piece when all it read is unchanged (the
    same resource objects, equal registry entries), so that a change to one service translates
    one service: pass the same cache to each translation for the same node (or translation
    key). A cache used for another node starts over."""

    def __init__(self) -> None:
        self.node: Node | None = None
        self.units: dict[tuple[str, int], _Unit] = {}
        self.reused = 0  # of the last translation: pieces reused, and pieces built
        self.built = 0


def translate(
    config: ConfigSet,
    registry: Registry,
    node: Node | None = None,
    *,
    root_namespace: str = "istio-system",
    trust_domain: str = "cluster.local",
    cache: TranslationCache | None = None,
) -> Snapshot:
    """Build the xDS resources ``node`` needs, from valid configuration and the registry.

    ``root_namespace`` is where mesh-wide configuration lives (Istio's ``istio-system``);
    ``trust_domain`` names the workloads' SPIFFE IDs (what mTLS expects servers to present);
    ``cache`` makes repeated translations for the same node incremental."""
    return _Translator(config, registry, node or Node(), root_namespace, cache, trust_domain).run()


# -- helpers that build protobuf values ----------------------------------------------------------


def _duration(value: Duration) -> duration_pb2.Duration:
    seconds, nanos = divmod(value.nanos, 1_000_000_000)
    return duration_pb2.Duration(seconds=seconds, nanos=nanos)


def _uint32(value: int) -> wrappers_pb2.UInt32Value:
    return wrappers_pb2.UInt32Value(value=min(max(value, 0), MAX_UINT32))


def _any(message: Message) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)
    return packed


def _fraction(percent: float) -> percent_pb2.FractionalPercent:
    """A percentage with Istio's precision: parts per million."""
    numerator = round(min(max(percent, 0.0), 100.0) * 10_000)
    return percent_pb2.FractionalPercent(
        numerator=numerator, denominator=percent_pb2.FractionalPercent.MILLION
    )


def _percent_value(percent: Percent | None, legacy: int | None = None) -> float:
    if percent is not None and percent.value is not None:
        return percent.value
    if legacy is not None:
        return float(legacy)
    return 100.0


def _string_matcher(match: StringMatch, *, ignore_case: bool = False) -> string_pb2.StringMatcher:
    if match.exact is not None:
        return string_pb2.StringMatcher(exact=match.exact, ignore_case=ignore_case)
    if match.prefix is not None:
        return string_pb2.StringMatcher(prefix=match.prefix, ignore_case=ignore_case)
    if match.regex is not None:
        return string_pb2.StringMatcher(safe_regex=regex_pb2.RegexMatcher(regex=match.regex))
    return string_pb2.StringMatcher(safe_regex=regex_pb2.RegexMatcher(regex=".*"))


def _is_empty(match: StringMatch) -> bool:
    return match.exact is None and match.prefix is None and match.regex is None


def _header_matcher(name: str, match: StringMatch, *, invert: bool = False) -> rc.HeaderMatcher:
    if _is_empty(match) or (invert and match.regex == "*"):
        return rc.HeaderMatcher(name=name, present_match=True, invert_match=invert)
    return rc.HeaderMatcher(
        name=name,
        string_match=_string_matcher(match),
        invert_match=invert,
        # withoutHeaders must match requests that lack the header too (as Istio sets it).
        treat_missing_header_as_empty=invert,
    )


def _header_value(name: str, value: str, *, append: bool) -> base_pb2.HeaderValueOption:
    action = (
        base_pb2.HeaderValueOption.APPEND_IF_EXISTS_OR_ADD
        if append
        else base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD
    )
    return base_pb2.HeaderValueOption(
        header=base_pb2.HeaderValue(key=name, value=value), append_action=action
    )


# -- the translation ---------------------------------------------------------------------------


@dataclass
class _Rules:
    """The DestinationRules for one host, merged as Istio merges them: the first rule's traffic
    policy wins, subsets are the union (the first definition of a name wins)."""

    policy: TrafficPolicy | None = None
    subsets: dict[str, Subset] = field(default_factory=dict)
    annotations: dict[str, str] = field(default_factory=dict)


class _Index:
    """The configuration by the hosts it names, so that translating a large mesh stays linear."""

    def __init__(self, config: ConfigSet, registry: Registry) -> None:
        self.rules_by_host: dict[str, list[tuple[int, Resource[Any]]]] = {}
        self.wildcard_rules: list[tuple[int, str, Resource[Any]]] = []
        self.services_by_host: dict[str, list[Resource[Any]]] = {}
        self.wildcard_services: list[tuple[str, Resource[Any]]] = []
        self.virtual_services: dict[tuple[str, str], Resource[Any]] = {}
        rules = 0
        for resource in config.resources:
            if resource.kind == "DestinationRule":
                host = registry.fqdn(resource.spec.host, resource.namespace)
                if host.startswith("*"):
                    self.wildcard_rules.append((rules, host, resource))
                else:
                    self.rules_by_host.setdefault(host, []).append((rules, resource))
                rules += 1
            elif resource.kind == "VirtualService":
                self.virtual_services.setdefault((resource.namespace, resource.name), resource)
                vs: VirtualService = resource.spec
                if not vs.hosts or (vs.gateways and "mesh" not in vs.gateways):
                    continue
                hosts = dict.fromkeys(registry.fqdn(h, resource.namespace) for h in vs.hosts)
                for vs_host in hosts:
                    if vs_host.startswith("*"):
                        self.wildcard_services.append((vs_host, resource))
                    else:
                        self.services_by_host.setdefault(vs_host, []).append(resource)


@dataclass
class _Unit:
    """The resources of one service port, and what building them read."""

    service: RegistryService
    port: ServicePortInfo
    reads: tuple[tuple[Any, ...], ...]
    resources: dict[str, dict[str, Message]]
    serialized: dict[str, dict[str, bytes]]
    vhost: rc.VirtualHost | None


def _empty() -> dict[str, dict[str, Any]]:
    return {LISTENER: {}, ROUTE: {}, CLUSTER: {}, ENDPOINT: {}}


class _Translator:
    def __init__(
        self,
        config: ConfigSet,
        registry: Registry,
        node: Node,
        root_namespace: str,
        cache: TranslationCache | None,
        trust_domain: str = "cluster.local",
    ) -> None:
        self.config = config
        self.registry = registry
        self.node = node
        self.root_namespace = root_namespace
        self.trust_domain = trust_domain
        self.cache = cache
        self.resources: dict[str, dict[str, Message]] = _empty()
        self.index = _Index(config, registry)
        self._rules: dict[tuple[str, str | None], _Rules] = {}
        self._out = self.resources  # where the resources being built go
        self._reads: list[tuple[Any, ...]] | None = None  # what the piece being built reads

    def run(self) -> Snapshot:
        cache = self.cache
        if cache is not None and cache.node != self.node:
            cache.node, cache.units = self.node, {}
        units: dict[tuple[str, int], _Unit] = {}
        reused = 0
        for service in self._visible_services():
            for port in service.ports:
                key = (service.host, port.number)
                unit = cache.units.get(key) if cache is not None else None
                if unit is not None and self._unchanged(unit, service, port):
                    reused += 1
                else:
                    unit = self._build_unit(service, port)
                units[key] = unit
        if cache is not None:
            cache.units, cache.reused, cache.built = units, reused, len(units) - reused
        serialized: dict[str, dict[str, bytes]] = _empty()
        for unit in units.values():
            for type_url, named in unit.resources.items():
                self.resources[type_url].update(named)
                serialized[type_url].update(unit.serialized[type_url])
        if self.node.flavor == "envoy":
            vhosts = [u.vhost for u in units.values() if u.vhost is not None]
            if self.node.http_proxy_address:
                self._build_proxy_listener(vhosts)  # Snapshot.of serializes what is not yet
            self._build_route_listeners(vhosts)
            self._build_envoy_inbound()
        elif self.node.flavor == "libmesh":
            self._build_inbound_listener()
        else:  # grpc: what its xDS servers ask for
            self._build_grpc_server_listener()
        return Snapshot.of(self.resources, serialized)

    def _build_grpc_server_listener(self) -> None:
        """The listener template for this workload's grpcio xDS servers: PeerAuthentication
        and AuthorizationPolicy (grpcio has no jwt_authn: RequestAuthentication is not sent)."""
        modes, filters = self._inbound_policies(tokens=False)
        self.resources[LISTENER][GRPC_SERVER_TEMPLATE] = grpc_server_listener(modes, filters)

    def _inbound_policies(self, tokens: bool = True) -> tuple[InboundModes, tuple[Any, ...]]:
        """What this workload accepts from its callers: PeerAuthentication (which transports,
        per port), then RequestAuthentication (which tokens, as jwt_authn; unless not
        ``tokens``) and AuthorizationPolicy (who, as RBAC filters) as HTTP filters."""
        node = self.node
        modes = peer_authentication_modes(
            self.config, node.namespace, node.labels, self.root_namespace
        )
        rbac = rbac_filters(
            self.config.of_kind("AuthorizationPolicy"),
            namespace=node.namespace,
            labels=node.labels,
            root_namespace=self.root_namespace,
            trust_domain=self.trust_domain,
        )
        authentication = (
            jwt_authn_filter(
                self.config.of_kind("RequestAuthentication"),
                namespace=node.namespace,
                labels=node.labels,
                root_namespace=self.root_namespace,
            )
            if tokens
            else None
        )
        filters = (authentication,) if authentication is not None else ()
        return modes, (*filters, *rbac.http_filters())

    def _build_inbound_listener(self) -> None:
        """The ``virtualInbound`` listener libmesh reads its inbound policies from."""
        modes, filters = self._inbound_policies()
        self.resources[LISTENER][INBOUND_LISTENER] = inbound_listener(modes, filters)

    def _build_envoy_inbound(self) -> None:
        """For an Envoy with inbound ports (libmesh-proxy --engine envoy): a listener per port,
        in front of the program, enforcing the same policies."""
        if not self.node.inbound:
            return
        modes, filters = self._inbound_policies()
        for listen, app in self.node.inbound:
            port = int(listen.rpartition(":")[2])
            listener, cluster = envoy_inbound(
                listen,
                app,
                modes.ports.get(port, modes.default),
                filters,
                certificates=self.node.sds,
            )
            if not listener.filter_chains:
                # STRICT without certificates: nobody may be taken, and Envoy refuses a
                # listener without filter chains; no listener (connections refused) says the same
                continue
            self.resources[LISTENER][listener.name] = listener
            self.resources[CLUSTER][cluster.name] = cluster

    # incremental translation ----------------------------------------------------------------

    def _build_unit(self, service: RegistryService, port: ServicePortInfo) -> _Unit:
        out = self._out = _empty()
        reads = self._reads = []
        try:
            rules = self._rules_for(service.host, service.namespace)
            self._build_clusters(service, port, rules)
            vhost = None
            reachable = cluster_name(port.number, "", service.host) in out[CLUSTER]
            # unreachable: grpcio has no original-destination clusters
            if reachable and (port.protocol in HTTP_PROTOCOLS or port.protocol is None):
                vhost = self._virtual_host(service, port)
                if self.node.flavor != "envoy":
                    self._build_api_listener(vhost)
        finally:
            self._out, self._reads = self.resources, None
        serialized = {
            type_url: {n: m.SerializeToString(deterministic=True) for n, m in named.items()}
            for type_url, named in out.items()
        }
        return _Unit(service, port, tuple(reads), out, serialized, vhost)

    def _read(self, *read: Any) -> None:
        if self._reads is not None:
            self._reads.append(read)

    def _unchanged(self, unit: _Unit, service: RegistryService, port: ServicePortInfo) -> bool:
        """Whether everything ``unit`` read is as it was: then its resources stand."""
        if unit.service != service or unit.port != port:
            return False
        for read in unit.reads:
            kind = read[0]
            if kind == "rules":
                now = [r for _, _, r in self._rule_candidates(read[1])]
                if len(now) != len(read[2]):
                    return False
                if any(a is not b for a, b in zip(now, read[2], strict=True)):
                    return False
            elif kind == "virtual service":
                if self._find_virtual_service(read[1]) is not read[2]:
                    return False
            elif kind == "delegate":
                if self.index.virtual_services.get(read[1]) is not read[2]:
                    return False
            elif kind == "lookup":
                if self.registry.lookup(read[1], read[2]) != read[3]:
                    return False
            elif kind == "workloads":
                if self.registry.workloads_of(read[1]) != read[2]:
                    return False
            else:  # pragma: no cover - a read this method does not know cannot be trusted
                return False
        return True

    def _lookup(self, host: str, namespace: str) -> RegistryService | None:
        target = self.registry.lookup(host, namespace)
        self._read("lookup", host, namespace, target)
        return target

    # visibility ---------------------------------------------------------------------------

    def _visible(self, export_to: Sequence[str], namespace: str) -> bool:
        if not export_to or "*" in export_to:
            return True
        return any((namespace if e == "." else e) == self.node.namespace for e in export_to)

    def _visible_services(self) -> Iterator[RegistryService]:
        seen: set[str] = set()
        for service in self.registry.services:
            if service.is_wildcard or service.host in seen:
                continue
            if "*" in service.scopes or self.node.namespace in service.scopes:
                seen.add(service.host)
                yield service

    # DestinationRules ----------------------------------------------------------------------

    def _rule_candidates(self, host: str) -> tuple[tuple[int, int, Resource[Any]], ...]:
        """(specificity, order, rule) of every DestinationRule whose host covers ``host``."""
        exact = tuple((0, order, r) for order, r in self.index.rules_by_host.get(host, ()))
        wildcard = tuple(
            (1, order, r)
            for order, rule_host, r in self.index.wildcard_rules
            if host_matches(rule_host, host)
        )
        return exact + wildcard

    def _rules_for(self, host: str, namespace: str | None) -> _Rules:
        """The merged DestinationRules for ``host``, a service in ``namespace``."""
        candidates = self._rule_candidates(host)
        self._read("rules", host, tuple(r for _, _, r in candidates))
        key = (host, namespace)
        rules = self._rules.get(key)
        if rules is None:
            rules = self._rules[key] = self._merge_rules(candidates, namespace)
        return rules

    def _merge_rules(
        self, found: Sequence[tuple[int, int, Resource[Any]]], namespace: str | None
    ) -> _Rules:
        candidates: list[tuple[int, int, int, Resource[Any]]] = []
        for specificity, order, resource in found:
            rule: DestinationRule = resource.spec
            if not self._visible(rule.export_to, resource.namespace):
                continue
            if rule.workload_selector is not None:
                selects_me = resource.namespace == self.node.namespace and labels_match(
                    rule.workload_selector.match_labels, self.node.labels
                )
                if not selects_me:
                    continue
            # Istio looks in the client's namespace, the service's, and the root namespace.
            if resource.namespace not in (self.node.namespace, namespace, self.root_namespace):
                continue
            locality = 0 if resource.namespace == self.node.namespace else 1
            candidates.append((specificity, locality, order, resource))
        merged = _Rules()
        for _, _, _, resource in sorted(candidates, key=lambda c: c[:3]):
            rule = resource.spec
            if merged.policy is None and rule.traffic_policy is not None:
                merged.policy = rule.traffic_policy
            for key, value in resource.metadata.annotations.items():
                merged.annotations.setdefault(key, value)
            for subset in rule.subsets:
                merged.subsets.setdefault(subset.name, subset)
        return merged

    # clusters and endpoints -----------------------------------------------------------------

    def _build_clusters(
        self, service: RegistryService, port: ServicePortInfo, rules: _Rules
    ) -> None:
        workloads = self.registry.workloads_of(service)
        self._read("workloads", service, workloads)
        base_policy = _port_policy(rules.policy, port.number)
        self._add_cluster(service, port, "", base_policy, rules, workloads)
        for name, subset in rules.subsets.items():
            policy = _merge_policy(base_policy, _port_policy(subset.traffic_policy, port.number))
            selected = tuple(w for w in workloads if labels_match(subset.labels, w.labels))
            self._add_cluster(service, port, name, policy, rules, selected)

    def _add_cluster(
        self,
        service: RegistryService,
        port: ServicePortInfo,
        subset: str,
        policy: _PolicyView,
        rules: _Rules,
        workloads: Sequence[Workload],
    ) -> None:
        name = cluster_name(port.number, subset, service.host)
        cluster = cluster_pb2.Cluster(name=name)
        cluster.connect_timeout.CopyFrom(
            _duration(
                policy.connection_pool.tcp.connect_timeout
                if policy.connection_pool
                and policy.connection_pool.tcp
                and policy.connection_pool.tcp.connect_timeout
                else DEFAULT_CONNECT_TIMEOUT
            )
        )
        assignment = self._assignment(name, service, port, workloads, policy)
        grpc = self.node.flavor == "grpc"
        if service.resolution in (Resolution.DNS, Resolution.DNS_ROUND_ROBIN):
            # grpcio resolves DNS only as LOGICAL_DNS: one name, its addresses in turn.
            cluster.type = (
                cluster_pb2.Cluster.STRICT_DNS
                if service.resolution is Resolution.DNS and not grpc
                else cluster_pb2.Cluster.LOGICAL_DNS
            )
            if cluster.type == cluster_pb2.Cluster.LOGICAL_DNS:
                _first_endpoint_only(assignment)
            cluster.load_assignment.CopyFrom(assignment)
        elif service.resolution is Resolution.NONE and not workloads:
            if grpc:
                return  # grpcio has no original-destination clusters: not served to it
            cluster.type = cluster_pb2.Cluster.ORIGINAL_DST
            cluster.lb_policy = cluster_pb2.Cluster.CLUSTER_PROVIDED
        else:
            cluster.type = cluster_pb2.Cluster.EDS
            cluster.eds_cluster_config.service_name = name
            cluster.eds_cluster_config.eds_config.ads.SetInParent()
            cluster.eds_cluster_config.eds_config.resource_api_version = config_source_pb2.V3
            self._out[ENDPOINT][name] = assignment
        if cluster.type != cluster_pb2.Cluster.ORIGINAL_DST:
            _apply_load_balancer(cluster, policy.load_balancer)
            if self.node.flavor == "grpc":
                _grpc_load_balancer(cluster)
        _apply_connection_pool(cluster, policy.connection_pool, rules.annotations)
        if port.protocol in _HTTP2_PROTOCOLS:
            _speak_http2(cluster)
        _apply_outlier_detection(cluster, policy.outlier_detection, rules.annotations)
        if policy.retry_budget is not None:
            # Istio's applyRetryBudget: a budget is on as soon as it is given; defaults fill it.
            budget = cluster.circuit_breakers.thresholds[0].retry_budget
            given = policy.retry_budget
            budget.budget_percent.value = 20.0 if given.percent is None else given.percent
            budget.min_retry_concurrency.value = (
                3 if given.min_retry_concurrency is None else given.min_retry_concurrency
            )
        apply_upstream_tls(
            cluster,
            policy.tls,
            sans=expected_identities(service, workloads, self.trust_domain),
            sni=f"outbound_.{port.number}_.{subset}_.{service.host}",
            auto=service.location is ServiceEntryLocation.MESH_INTERNAL,
            flavor=self.node.flavor,
            certificates=self.node.sds,
        )
        cluster.metadata.filter_metadata["istio"].update(
            {"services": [{"host": service.host, "namespace": service.namespace}]}
        )
        if subset:
            cluster.metadata.filter_metadata["istio"].update({"subset": subset})
        self._out[CLUSTER][name] = cluster

    def _assignment(
        self,
        name: str,
        service: RegistryService,
        port: ServicePortInfo,
        workloads: Sequence[Workload],
        policy: _PolicyView,
    ) -> endpoint_pb2.ClusterLoadAssignment:
        assignment = endpoint_pb2.ClusterLoadAssignment(cluster_name=name)
        assignment.policy.overprovisioning_factor.value = 140
        if not workloads and service.resolution in (Resolution.DNS, Resolution.DNS_ROUND_ROBIN):
            # A DNS service without endpoints resolves its own host name.
            workloads = (
                Workload(name=service.host, namespace=service.namespace, address=service.host,
                         ports=EMPTY, labels=EMPTY),
            )  # fmt: skip
        groups: dict[Locality, list[endpoint_components_pb2.LbEndpoint]] = {}
        for workload in workloads:
            if self.node.flavor == "grpc" and workload.address.startswith("unix://"):
                continue  # grpcio's EDS reads socket addresses only
            endpoint = _lb_endpoint(workload, port)
            if endpoint is not None:
                groups.setdefault(Locality.parse(workload.locality), []).append(endpoint)
        lb = policy.load_balancer
        locality_setting = lb.locality_lb_setting if lb is not None else None
        failover_enabled = policy.outlier_detection is not None and (
            locality_setting is None or locality_setting.enabled is not False
        )
        distribute = _distribute_rule(locality_setting, self.node.locality)
        for locality in sorted(groups):
            endpoints = groups[locality]
            group = assignment.endpoints.add()
            group.locality.region = locality.region
            group.locality.zone = locality.zone
            group.locality.sub_zone = locality.subzone
            group.lb_endpoints.extend(endpoints)
            group.load_balancing_weight.value = sum(
                e.load_balancing_weight.value for e in endpoints
            )
            if failover_enabled and distribute is None:
                group.priority = _failover_priority(
                    self.node.locality,
                    locality,
                    locality_setting.failover if locality_setting else (),
                )
        if distribute is not None:
            _apply_distribution(assignment, distribute)
        _compact_priorities(assignment)
        return assignment

    # listeners and routes -------------------------------------------------------------------

    def _http_connection_manager(self, name: str) -> hcm.HttpConnectionManager:
        manager = hcm.HttpConnectionManager(stat_prefix=name)
        manager.rds.route_config_name = name
        manager.rds.config_source.ads.SetInParent()
        manager.rds.config_source.resource_api_version = config_source_pb2.V3
        manager.http_filters.add(name=FAULT_FILTER).typed_config.Pack(fault_pb2.HTTPFault())
        manager.http_filters.add(name=ROUTER_FILTER).typed_config.Pack(router_pb2.Router())
        return manager

    def _build_api_listener(self, vhost: rc.VirtualHost) -> None:
        """A listener without a socket, one per ``host:port``, as grpcio reads them: the
        client dialing ``xds:///host:port`` asks for it by name."""
        name = vhost.name
        manager = self._http_connection_manager(name)
        listener = listener_pb2.Listener(name=name)
        listener.api_listener.CopyFrom(api_listener_pb2.ApiListener(api_listener=_any(manager)))
        self._out[LISTENER][name] = listener
        config = route_pb2.RouteConfiguration(name=name, validate_clusters=wrappers_pb2.BoolValue())
        config.virtual_hosts.append(vhost)
        self._out[ROUTE][name] = config

    def _build_route_listeners(self, virtual_hosts: Sequence[rc.VirtualHost]) -> None:
        """For a real Envoy: a listener per port bound to one service (libmesh-proxy
        ``--route``). Every request on it takes that service's routes, whatever its Host, and
        reaches the service with the service's authority, as the Python engine sends it. A
        service not (yet) known leaves the listener without routes: Envoy answers 404 (NR)."""
        for listen, service in self.node.routes:
            host, _, port = listen.rpartition(":")
            name = f"route_{host.strip('[]')}_{port}"
            manager = self._http_connection_manager(name)
            manager.upgrade_configs.add(upgrade_type="websocket")
            listener = listener_pb2.Listener(name=name)
            listener.address.socket_address.address = host.strip("[]")
            listener.address.socket_address.port_value = int(port)
            listener.filter_chains.add().filters.add(name=HCM_FILTER).typed_config.Pack(manager)
            self.resources[LISTENER][name] = listener
            config = route_pb2.RouteConfiguration(
                name=name, validate_clusters=wrappers_pb2.BoolValue()
            )
            found = next((v for v in virtual_hosts if service in v.domains), None)
            if found is not None:
                bound = config.virtual_hosts.add()
                bound.CopyFrom(found)
                del bound.domains[:]
                bound.domains.append("*")
                for route in bound.routes:
                    action = route.route if route.HasField("route") else None
                    if action is not None and not action.WhichOneof("host_rewrite_specifier"):
                        action.host_rewrite_literal = service
            self.resources[ROUTE][name] = config

    def _build_proxy_listener(self, virtual_hosts: Sequence[rc.VirtualHost]) -> None:
        """For a real Envoy: one HTTP listener on the node's proxy address that routes every
        service by the request's authority. Applications send it plain requests with the
        service's host (or use it as their ``http_proxy``), the way Istio's sidecar is reached
        without iptables. Each domain belongs to one virtual host: a bare host name only to its
        port 80, as that is the only port a client leaves out of ``Host``."""
        host, _, port = self.node.http_proxy_address.rpartition(":")
        manager = self._http_connection_manager(HTTP_PROXY_LISTENER)
        manager.http_protocol_options.allow_absolute_url.value = True
        manager.upgrade_configs.add(upgrade_type="websocket")  # as Istio's sidecars
        listener = listener_pb2.Listener(name=HTTP_PROXY_LISTENER)
        listener.address.socket_address.address = host.strip("[]")
        listener.address.socket_address.port_value = int(port)
        chain = listener.filter_chains.add()
        chain.filters.add(name=HCM_FILTER).typed_config.Pack(manager)
        self.resources[LISTENER][HTTP_PROXY_LISTENER] = listener
        config = route_pb2.RouteConfiguration(
            name=HTTP_PROXY_LISTENER, validate_clusters=wrappers_pb2.BoolValue()
        )
        taken: set[str] = set()
        for vhost in virtual_hosts:
            port_suffix = ":" + vhost.name.rpartition(":")[2]
            domains = [d for d in vhost.domains if d.endswith(port_suffix) or port_suffix == ":80"]
            domains = [d for d in domains if d not in taken]
            if not domains:
                continue
            taken.update(domains)
            proxied = config.virtual_hosts.add()
            proxied.CopyFrom(vhost)
            del proxied.domains[:]
            proxied.domains.extend(domains)
        self.resources[ROUTE][HTTP_PROXY_LISTENER] = config

    def _domains(self, service: RegistryService, port: int) -> list[str]:
        names = [service.host]
        suffix = f".svc.{self.registry.domain}"
        if service.host.endswith(suffix) and service.namespace == self.node.namespace:
            short = service.host[: -len(suffix)]
            names += [short.rpartition(".")[0], short, short + ".svc"]
        elif service.host.endswith(suffix):
            short = service.host[: -len(suffix)]
            names += [short, short + ".svc"]
        return [d for n in dict.fromkeys(names) for d in (n, f"{n}:{port}")]

    def _virtual_host(self, service: RegistryService, port: ServicePortInfo) -> rc.VirtualHost:
        name = f"{service.host}:{port.number}"
        vhost = rc.VirtualHost(name=name, domains=self._domains(service, port.number))
        virtual_service = self._virtual_service_for(service.host)
        routes = (
            self._http_routes(virtual_service, service, port)
            if virtual_service is not None
            else None
        )
        if routes is None:
            routes = [self._default_route(service, port)]
        vhost.routes.extend(routes)
        return vhost

    def _virtual_service_for(self, host: str) -> Resource[Any] | None:
        found = self._find_virtual_service(host)
        self._read("virtual service", host, found)
        return found

    def _find_virtual_service(self, host: str) -> Resource[Any] | None:
        for resource in self.index.services_by_host.get(host, ()):
            if self._visible(resource.spec.export_to, resource.namespace):
                return resource
        wildcard = [
            (-len(vs_host), resource)
            for vs_host, resource in self.index.wildcard_services
            if host_matches(vs_host, host)
            and self._visible(resource.spec.export_to, resource.namespace)
        ]
        return min(wildcard, key=lambda w: w[0])[1] if wildcard else None

    def _default_route(self, service: RegistryService, port: ServicePortInfo) -> rc.Route:
        route = rc.Route(name="default")
        route.match.prefix = "/"
        target = cluster_name(port.number, "", service.host)
        route.route.cluster = target
        route.route.timeout.CopyFrom(duration_pb2.Duration())
        route.route.retry_policy.CopyFrom(_retry_policy(None, hashed=False))
        self._apply_hash_policy(route.route, [target])
        return route

    def _http_routes(
        self, resource: Resource[Any], service: RegistryService, port: ServicePortInfo
    ) -> list[rc.Route] | None:
        vs: VirtualService = resource.spec
        hedge = read_annotation(resource.metadata.annotations, "hedge")
        routes: list[rc.Route] = []
        for http in self._expand_delegates(vs.http, resource):
            matches: list[HTTPMatchRequest | None] = [
                m for m in http.match if self._match_applies(m, port.number)
            ]
            if http.match and not matches:
                continue  # none of its matches is for this client or port
            action = self._action(http, resource, service, port, hedge)
            for match in matches or [None]:
                route = rc.Route(name=http.name or "")
                route.match.CopyFrom(_route_match(match))
                route.MergeFrom(action)
                routes.append(route)
        return routes

    def _expand_delegates(
        self, routes: Sequence[HTTPRoute], owner: Resource[Any]
    ) -> Iterator[HTTPRoute]:
        for http in routes:
            if http.delegate is None:
                yield http
                continue
            namespace = http.delegate.namespace or owner.namespace
            key = (namespace, http.delegate.name or "")
            delegate = self.index.virtual_services.get(key)
            self._read("delegate", key, delegate)
            if delegate is None:
                continue
            for child in delegate.spec.http:
                yield _merge_delegate(http, child)

    def _match_applies(self, match: HTTPMatchRequest, port: int) -> bool:
        if match.port and match.port != port:
            return False
        if match.source_namespace and match.source_namespace != self.node.namespace:
            return False
        if match.source_labels and not labels_match(match.source_labels, self.node.labels):
            return False
        return not match.gateways or "mesh" in match.gateways

    def _destination_cluster(
        self, destination: Destination, owner: Resource[Any], service: RegistryService,
        port: ServicePortInfo,
    ) -> str:  # fmt: skip
        host = self.registry.fqdn(destination.host, owner.namespace)
        if destination.port is not None and destination.port.number:
            number = destination.port.number
        elif host == service.host:
            number = port.number
        else:
            target = self._lookup(destination.host, owner.namespace)
            number = target.ports[0].number if target is not None and target.ports else port.number
        return cluster_name(number, destination.subset or "", host)

    def _action(
        self,
        http: HTTPRoute,
        owner: Resource[Any],
        service: RegistryService,
        port: ServicePortInfo,
        hedge: Hedge | None,
    ) -> rc.Route:
        route = rc.Route()
        if http.redirect is not None:
            route.redirect.CopyFrom(_redirect(http))
        elif http.direct_response is not None:
            response = http.direct_response
            route.direct_response.status = response.status
            if response.body is not None and response.body.string_ is not None:
                route.direct_response.body.inline_string = response.body.string_
            elif response.body is not None and response.body.bytes_ is not None:
                route.direct_response.body.inline_bytes = response.body.bytes_
        else:
            self._route_action(route.route, http, owner, service, port, hedge)
        if http.headers is not None:
            _apply_headers(route, http.headers)
            authority = _authority_header(http.headers)
            if authority is not None and route.HasField("route"):
                route.route.host_rewrite_literal = authority
        if http.fault is not None:
            route.typed_per_filter_config[FAULT_FILTER].Pack(_fault(http.fault))
        return route

    def _route_action(
        self,
        action: rc.RouteAction,
        http: HTTPRoute,
        owner: Resource[Any],
        service: RegistryService,
        port: ServicePortInfo,
        hedge: Hedge | None,
    ) -> None:
        # Istio drops zero-weight destinations (they would get no traffic anyway).
        destinations = [d for d in http.route if len(http.route) == 1 or d.weight]
        targets = [
            (self._destination_cluster(d.destination, owner, service, port), d)
            for d in destinations
        ]
        if len(http.route) == 1 and not targets[0][1].headers:
            action.cluster = targets[0][0]
        else:
            weighted = action.weighted_clusters
            for name, destination in targets:
                entry = weighted.clusters.add(name=name)
                entry.weight.value = 100 if len(targets) == 1 else (destination.weight or 0)
                if destination.headers is not None:
                    _apply_headers(entry, destination.headers)
        timeout = http.timeout or Duration(0)
        action.timeout.CopyFrom(_duration(timeout))
        if timeout.nanos:
            action.max_stream_duration.max_stream_duration.CopyFrom(_duration(timeout))
            action.max_stream_duration.grpc_timeout_header_max.CopyFrom(_duration(timeout))
        hashed = self._apply_hash_policy(action, [name for name, _ in targets])
        retry = _retry_policy(http.retries, hashed=hashed)
        if retry is not None:
            action.retry_policy.CopyFrom(retry)
        if http.rewrite is not None:
            if http.rewrite.uri is not None:
                action.prefix_rewrite = http.rewrite.uri
            if http.rewrite.uri_regex_rewrite is not None:
                action.regex_rewrite.pattern.regex = http.rewrite.uri_regex_rewrite.match or ""
                action.regex_rewrite.substitution = http.rewrite.uri_regex_rewrite.rewrite or ""
            if http.rewrite.authority:
                action.host_rewrite_literal = http.rewrite.authority
        mirrors = [(m.destination, _percent_value(m.percentage)) for m in http.mirrors]
        if http.mirror is not None:
            percent = _percent_value(http.mirror_percentage, http.mirror_percent)
            mirrors.insert(0, (http.mirror, percent))
        for mirror, percent in mirrors:
            policy = action.request_mirror_policies.add(
                cluster=self._destination_cluster(mirror, owner, service, port)
            )
            policy.runtime_fraction.default_value.CopyFrom(_fraction(percent))
        if hedge is not None:
            action.hedge_policy.initial_requests.value = hedge.initial_requests
            action.hedge_policy.additional_request_chance.CopyFrom(
                _fraction(hedge.additional_request_chance)
            )
            action.hedge_policy.hedge_on_per_try_timeout = hedge.on_per_try_timeout

    def _apply_hash_policy(self, action: rc.RouteAction, clusters: Iterable[str]) -> bool:
        """Consistent hashing is configured on the destination's cluster but applied by the
        route, as in Envoy; the first target's DestinationRule decides."""
        for name in clusters:
            parsed = parse_cluster_name(name)
            if parsed is None:
                continue
            number, subset, host = parsed
            target = self._lookup(host, self.node.namespace)
            rules = self._rules_for(host, target.namespace if target is not None else None)
            policy = _merge_policy(
                _port_policy(rules.policy, number),
                _port_policy(rules.subsets[subset].traffic_policy, number)
                if subset in rules.subsets
                else _PolicyView(),
            )
            lb = policy.load_balancer
            if lb is None or lb.consistent_hash is None:
                return False
            hashing = lb.consistent_hash
            hash_policy = action.hash_policy.add()
            if hashing.http_header_name:
                hash_policy.header.header_name = hashing.http_header_name
            elif hashing.http_cookie is not None:
                hash_policy.cookie.name = hashing.http_cookie.name
                if hashing.http_cookie.path:
                    hash_policy.cookie.path = hashing.http_cookie.path
                if hashing.http_cookie.ttl is not None:
                    hash_policy.cookie.ttl.CopyFrom(_duration(hashing.http_cookie.ttl))
            elif hashing.use_source_ip:
                hash_policy.connection_properties.source_ip = True
            elif hashing.http_query_parameter_name:
                hash_policy.query_parameter.name = hashing.http_query_parameter_name
            return True
        return False


# -- pieces of the translation that need no state ---------------------------------------------


@dataclass(frozen=True)
class _PolicyView:
    """A traffic policy with port-level settings already applied."""

    load_balancer: LoadBalancerSettings | None = None
    connection_pool: ConnectionPoolSettings | None = None
    outlier_detection: OutlierDetection | None = None
    tls: ClientTLSSettings | None = None
    retry_budget: Any = None


def _port_policy(policy: TrafficPolicy | None, port: int) -> _PolicyView:
    if policy is None:
        return _PolicyView()
    view = _PolicyView(
        load_balancer=policy.load_balancer,
        connection_pool=policy.connection_pool,
        outlier_detection=policy.outlier_detection,
        tls=policy.tls,
        retry_budget=policy.retry_budget,
    )
    port_level: PortTrafficPolicy | None = next(
        (p for p in policy.port_level_settings if p.port is not None and p.port.number == port),
        None,
    )
    if port_level is None:
        return view
    # Istio: port-level settings replace the top level; what they omit takes its default.
    return _PolicyView(
        load_balancer=port_level.load_balancer,
        connection_pool=port_level.connection_pool,
        outlier_detection=port_level.outlier_detection,
        tls=port_level.tls,
        retry_budget=view.retry_budget,
    )


def _merge_policy(base: _PolicyView, override: _PolicyView) -> _PolicyView:
    """A subset's policy replaces the top-level one field by field, as in Istio."""
    return _PolicyView(
        load_balancer=override.load_balancer or base.load_balancer,
        connection_pool=override.connection_pool or base.connection_pool,
        outlier_detection=override.outlier_detection or base.outlier_detection,
        tls=override.tls or base.tls,
        retry_budget=override.retry_budget or base.retry_budget,
    )


def _lb_endpoint(
    workload: Workload, port: ServicePortInfo
) -> endpoint_components_pb2.LbEndpoint | None:
    endpoint = endpoint_components_pb2.LbEndpoint()
    address = workload.address
    if address.startswith("unix://"):
        endpoint.endpoint.address.pipe.path = address[len("unix://") :]
    elif address:
        number = workload.ports.get(port.name) or port.target_port or port.number
        socket = endpoint.endpoint.address.socket_address
        socket.address = address
        socket.port_value = number
        socket.protocol = address_pb2.SocketAddress.TCP
    else:
        return None
    endpoint.health_status = (
        health_check_pb2.HEALTHY if workload.healthy else health_check_pb2.UNHEALTHY
    )
    endpoint.load_balancing_weight.value = workload.weight or 1
    labels = struct_pb2.Struct()
    labels.update(dict(workload.labels))
    endpoint.metadata.filter_metadata["istio"].update(
        {"workload": workload.name, "namespace": workload.namespace}
    )
    endpoint.metadata.filter_metadata["labels"].CopyFrom(labels)
    if workload.service_account:
        endpoint.metadata.filter_metadata["istio"].update(
            {"serviceAccount": workload.service_account}
        )
    if workload.labels.get(TLS_MODE_LABEL) == "istio":  # it terminates the mesh's mTLS
        endpoint.metadata.filter_metadata[TRANSPORT_SOCKET_MATCH].update({"tlsMode": "istio"})
    return endpoint


def _distribute_rule(setting: Any, client: Locality) -> Any:
    """The first ``distribute`` rule whose ``from`` matches the client, if any."""
    if setting is None or not setting.distribute or setting.enabled is False:
        return None
    return next((r for r in setting.distribute if _locality_matches(r.from_ or "", client)), None)


def _apply_distribution(assignment: endpoint_pb2.ClusterLoadAssignment, rule: Any) -> None:
    """Istio's ``applyLocalityWeights``: each ``to`` pattern's share goes to the localities it
    matches in proportion to their endpoints' weight; localities it does not name get nothing."""
    groups = list(assignment.endpoints)
    unmatched = set(range(len(groups)))
    for pattern, share in rule.to.items():
        matched = {
            i: groups[i].load_balancing_weight.value or 1
            for i in sorted(unmatched)
            if _locality_matches(pattern, _locality_of(groups[i]))
        }
        unmatched -= matched.keys()
        total = sum(matched.values())
        for i, weight in matched.items():
            value = -(-weight * share // total) if total else 0  # ceiling, as Istio rounds
            if value > 0:
                groups[i].load_balancing_weight.value = value
    kept = [g for i, g in enumerate(groups) if i not in unmatched]
    del assignment.endpoints[:]
    assignment.endpoints.extend(kept)


def _locality_of(group: endpoint_components_pb2.LocalityLbEndpoints) -> Locality:
    return Locality(group.locality.region, group.locality.zone, group.locality.sub_zone)


def _locality_matches(pattern: str, locality: Locality) -> bool:
    parts = pattern.split("/")
    values = [locality.region, locality.zone, locality.subzone]
    for i, part in enumerate(parts):
        if part == "*":
            return True
        if i >= 3 or values[i] != part:
            return False
    return True


def _failover_priority(client: Locality, endpoint: Locality, failover: Sequence[Any]) -> int:
    """Istio's locality failover: the same region/zone/subzone first, then zone, then region,
    then the regions ``failover`` names for the client's region, then anywhere."""
    if not client.region:
        return 0
    if endpoint.region == client.region:
        if endpoint.zone == client.zone:
            return 0 if endpoint.subzone == client.subzone else 1
        return 2
    targets = [f.to for f in failover if f.from_ == client.region]
    if endpoint.region in targets:
        return 3 + targets.index(endpoint.region)
    return 3 + len(targets)


def _compact_priorities(assignment: endpoint_pb2.ClusterLoadAssignment) -> None:
    """EDS priorities must be contiguous from 0; Envoy and grpc reject gaps."""
    used = sorted({group.priority for group in assignment.endpoints})
    rank = {p: i for i, p in enumerate(used)}
    for group in assignment.endpoints:
        group.priority = rank[group.priority]


def _apply_load_balancer(cluster: cluster_pb2.Cluster, lb: LoadBalancerSettings | None) -> None:
    cluster.lb_policy = cluster_pb2.Cluster.LEAST_REQUEST
    if lb is None:
        return
    if lb.simple is not None:
        cluster.lb_policy = _LB_POLICIES[lb.simple]
    elif lb.consistent_hash is not None:
        hashing = lb.consistent_hash
        if hashing.maglev is not None:
            cluster.lb_policy = cluster_pb2.Cluster.MAGLEV
            cluster.maglev_lb_config.table_size.value = hashing.maglev.table_size or 65537
        else:
            cluster.lb_policy = cluster_pb2.Cluster.RING_HASH
            size = (hashing.ring_hash.minimum_ring_size if hashing.ring_hash else None) or (
                hashing.minimum_ring_size or 1024
            )
            cluster.ring_hash_lb_config.minimum_ring_size.value = size
    if lb.locality_lb_setting is not None and lb.locality_lb_setting.distribute:
        cluster.common_lb_config.locality_weighted_lb_config.SetInParent()
    warmup = lb.warmup.duration if lb.warmup is not None else lb.warmup_duration_secs
    if warmup is not None:
        slow_start = (
            cluster.round_robin_lb_config.slow_start_config
            if cluster.lb_policy == cluster_pb2.Cluster.ROUND_ROBIN
            else cluster.least_request_lb_config.slow_start_config
        )
        slow_start.slow_start_window.CopyFrom(_duration(warmup))
        if lb.warmup is not None and lb.warmup.aggression is not None:
            slow_start.aggression.default_value = lb.warmup.aggression
        if lb.warmup is not None and lb.warmup.minimum_percent is not None:
            slow_start.min_weight_percent.value = lb.warmup.minimum_percent


def _grpc_load_balancer(cluster: cluster_pb2.Cluster) -> None:
    """grpcio balances with ROUND_ROBIN or RING_HASH only (Istio's grpcgen does the same)."""
    if cluster.lb_policy == cluster_pb2.Cluster.MAGLEV:
        cluster.lb_policy = cluster_pb2.Cluster.RING_HASH
        cluster.ClearField("maglev_lb_config")
    elif cluster.lb_policy != cluster_pb2.Cluster.RING_HASH:
        cluster.lb_policy = cluster_pb2.Cluster.ROUND_ROBIN
        cluster.ClearField("least_request_lb_config")


def _first_endpoint_only(assignment: endpoint_pb2.ClusterLoadAssignment) -> None:
    """A LOGICAL_DNS cluster takes exactly one endpoint, the name it resolves."""
    first = next((g for g in assignment.endpoints if g.lb_endpoints), None)
    if first is None:
        return
    del first.lb_endpoints[1:]
    del assignment.endpoints[:]
    assignment.endpoints.append(first)
    first.priority = 0


def _apply_connection_pool(
    cluster: cluster_pb2.Cluster,
    pool: ConnectionPoolSettings | None,
    annotations: Mapping[str, str],
) -> None:
    # Istio lifts Envoy's default limits (1024) to the maximum: limits apply only when configured.
    thresholds = cluster.circuit_breakers.thresholds.add(priority=base_pb2.DEFAULT)
    thresholds.max_connections.value = MAX_UINT32
    thresholds.max_pending_requests.value = MAX_UINT32
    thresholds.max_requests.value = MAX_UINT32
    thresholds.max_retries.value = MAX_UINT32
    thresholds.track_remaining = True
    per_host_connections = read_annotation(annotations, "per-host-max-connections")
    per_host_requests = read_annotation(annotations, "per-host-max-requests")
    if per_host_connections is not None or per_host_requests is not None:
        per_host = cluster.circuit_breakers.per_host_thresholds.add(priority=base_pb2.DEFAULT)
        if per_host_connections is not None:
            per_host.max_connections.value = per_host_connections
        if per_host_requests is not None:
            per_host.max_requests.value = per_host_requests
    if pool is None:
        return
    options = http_protocol_options_pb2.HttpProtocolOptions()
    if pool.tcp is not None:
        if pool.tcp.max_connections:
            thresholds.max_connections.value = pool.tcp.max_connections
        if pool.tcp.max_connection_duration is not None:
            options.common_http_protocol_options.max_connection_duration.CopyFrom(
                _duration(pool.tcp.max_connection_duration)
            )
        if pool.tcp.tcp_keepalive is not None:
            keepalive = cluster.upstream_connection_options.tcp_keepalive
            if pool.tcp.tcp_keepalive.probes:
                keepalive.keepalive_probes.value = pool.tcp.tcp_keepalive.probes
            if pool.tcp.tcp_keepalive.time is not None:
                keepalive.keepalive_time.value = max(1, pool.tcp.tcp_keepalive.time.nanos // 10**9)
            if pool.tcp.tcp_keepalive.interval is not None:
                keepalive.keepalive_interval.value = max(
                    1, pool.tcp.tcp_keepalive.interval.nanos // 10**9
                )
    http = pool.http
    if http is not None:
        if http.http1_max_pending_requests:
            thresholds.max_pending_requests.value = http.http1_max_pending_requests
        if http.http2_max_requests:
            thresholds.max_requests.value = http.http2_max_requests
        if http.max_retries:
            thresholds.max_retries.value = http.max_retries
        if http.max_requests_per_connection:
            options.common_http_protocol_options.max_requests_per_connection.value = (
                http.max_requests_per_connection
            )
        if http.idle_timeout is not None:
            options.common_http_protocol_options.idle_timeout.CopyFrom(_duration(http.idle_timeout))
        if http.h2_upgrade_policy is not None and http.h2_upgrade_policy.value == "UPGRADE":
            options.explicit_http_config.http2_protocol_options.SetInParent()
        if http.max_concurrent_streams:
            options.explicit_http_config.http2_protocol_options.max_concurrent_streams.value = (
                http.max_concurrent_streams
            )
        if http.use_client_protocol:
            options.use_downstream_protocol_config.SetInParent()
    if options.ByteSize():
        if options.WhichOneof("upstream_protocol_options") is None:
            options.explicit_http_config.http_protocol_options.SetInParent()
        cluster.typed_extension_protocol_options[HTTP_PROTOCOL_OPTIONS].Pack(options)


_HTTP2_PROTOCOLS = frozenset({"GRPC", "GRPC-Web", "HTTP2"})


def _speak_http2(cluster: cluster_pb2.Cluster) -> None:
    """A gRPC or HTTP/2 port's upstream speaks HTTP/2 (as Istio sets it): a proxy in front of
    it must too, whatever its caller spoke. A DestinationRule's useClientProtocol stays."""
    options = http_protocol_options_pb2.HttpProtocolOptions()
    packed = cluster.typed_extension_protocol_options.get(HTTP_PROTOCOL_OPTIONS)
    if packed is not None:
        packed.Unpack(options)
    if options.WhichOneof("upstream_protocol_options") == "use_downstream_protocol_config":
        return
    if not options.explicit_http_config.HasField("http2_protocol_options"):
        options.explicit_http_config.http2_protocol_options.SetInParent()
    cluster.typed_extension_protocol_options[HTTP_PROTOCOL_OPTIONS].Pack(options)


def _apply_outlier_detection(
    cluster: cluster_pb2.Cluster, outlier: OutlierDetection | None, annotations: Mapping[str, str]
) -> None:
    success_rate: SuccessRate | None = read_annotation(annotations, "outlier-success-rate")
    failure_percentage: FailurePercentage | None = read_annotation(
        annotations, "outlier-failure-percentage"
    )
    if outlier is None and success_rate is None and failure_percentage is None:
        return
    out = outlier_detection_pb2.OutlierDetection()
    # Istio disables success-rate ejection; libmesh enables it only through its annotation.
    out.enforcing_success_rate.value = 0
    if outlier is not None:
        if outlier.consecutive_5xx_errors is not None:
            value = outlier.consecutive_5xx_errors
            out.consecutive_5xx.value = value
            out.enforcing_consecutive_5xx.value = 100 if value > 0 else 0
        if outlier.consecutive_gateway_errors is not None:
            value = outlier.consecutive_gateway_errors
            out.consecutive_gateway_failure.value = value
            out.enforcing_consecutive_gateway_failure.value = 100 if value > 0 else 0
        elif outlier.consecutive_errors:
            out.consecutive_gateway_failure.value = outlier.consecutive_errors
            out.enforcing_consecutive_gateway_failure.value = 100
        if outlier.interval is not None:
            out.interval.CopyFrom(_duration(outlier.interval))
        if outlier.base_ejection_time is not None:
            out.base_ejection_time.CopyFrom(_duration(outlier.base_ejection_time))
        if outlier.max_ejection_percent:
            out.max_ejection_percent.value = outlier.max_ejection_percent
        if outlier.split_external_local_origin_errors:
            out.split_external_local_origin_errors = True
            if outlier.consecutive_local_origin_failures:
                out.consecutive_local_origin_failure.value = (
                    outlier.consecutive_local_origin_failures
                )
                out.enforcing_consecutive_local_origin_failure.value = 100
            out.enforcing_local_origin_success_rate.value = 0
        if outlier.outlier_detection_http_error_codes:
            monitor = consecutive_errors_pb2.ConsecutiveErrors(
                name="http-error-codes",
                threshold=_uint32(outlier.consecutive_5xx_errors or 5),
                enforcing=_uint32(100),
            )
            for code in outlier.outlier_detection_http_error_codes:
                bucket = monitor.error_buckets.http_errors.add()
                bucket.range.CopyFrom(range_pb2.Int32Range(start=code, end=code + 1))
            out.monitors.add(name=CONSECUTIVE_ERRORS_MONITOR).typed_config.Pack(monitor)
        # Istio disables the panic threshold unless minHealthPercent says otherwise.
        cluster.common_lb_config.healthy_panic_threshold.value = float(
            outlier.min_health_percent or 0
        )
    if success_rate is not None:
        out.enforcing_success_rate.value = success_rate.enforcing
        out.success_rate_minimum_hosts.value = success_rate.minimum_hosts
        out.success_rate_request_volume.value = success_rate.request_volume
        out.success_rate_stdev_factor.value = round(success_rate.stdev_factor * 1000)
    if failure_percentage is not None:
        out.enforcing_failure_percentage.value = failure_percentage.enforcing
        out.failure_percentage_threshold.value = failure_percentage.threshold
        out.failure_percentage_minimum_hosts.value = failure_percentage.minimum_hosts
        out.failure_percentage_request_volume.value = failure_percentage.request_volume
    max_ejection_time = read_annotation(annotations, "outlier-max-ejection-time")
    if max_ejection_time is not None:
        out.max_ejection_time.CopyFrom(_duration(max_ejection_time))
    cluster.outlier_detection.CopyFrom(out)


def _route_match(match: HTTPMatchRequest | None) -> rc.RouteMatch:
    out = rc.RouteMatch()
    if match is None:
        out.prefix = "/"
        return out
    uri = match.uri
    if uri is None or (uri.exact is None and uri.prefix is None and uri.regex is None):
        out.prefix = "/"
    elif uri.exact is not None:
        out.path = uri.exact
    elif uri.prefix is not None:
        out.prefix = uri.prefix
    else:
        out.safe_regex.regex = uri.regex or ""
    if match.ignore_uri_case:
        out.case_sensitive.value = False
    for name, value in ((":method", match.method), (":authority", match.authority),
                        (":scheme", match.scheme)):  # fmt: skip
        if value is not None:
            out.headers.append(_header_matcher(name, value))
    for name, value in match.headers.items():
        out.headers.append(_header_matcher(name.lower(), value))
    for name, value in match.without_headers.items():
        out.headers.append(_header_matcher(name.lower(), value, invert=True))
    for name, value in match.query_params.items():
        query = out.query_parameters.add(name=name)
        if _is_empty(value):
            query.present_match = True
        else:
            query.string_match.CopyFrom(_string_matcher(value))
    return out


def _merge_delegate(root: HTTPRoute, child: HTTPRoute) -> HTTPRoute:
    """A root route's matches narrow its delegate's routes (Istio's delegate semantics)."""
    if not root.match:
        return child
    if not child.match:
        return dataclasses.replace(child, match=root.match)
    merged = []
    for outer in root.match:
        for inner in child.match:
            merged.append(
                dataclasses.replace(
                    outer,
                    uri=inner.uri or outer.uri,
                    method=inner.method or outer.method,
                    authority=inner.authority or outer.authority,
                    scheme=inner.scheme or outer.scheme,
                    headers=type(outer.headers)({**outer.headers, **inner.headers}),
                    query_params=type(outer.query_params)(
                        {**outer.query_params, **inner.query_params}
                    ),
                    without_headers=type(outer.without_headers)(
                        {**outer.without_headers, **inner.without_headers}
                    ),
                )
            )
    return dataclasses.replace(child, match=tuple(merged))


def _redirect(http: HTTPRoute) -> rc.RedirectAction:
    redirect = http.redirect
    assert redirect is not None
    out = rc.RedirectAction()
    if redirect.uri is not None:
        out.path_redirect = redirect.uri
    if redirect.prefix_rewrite is not None:
        out.prefix_rewrite = redirect.prefix_rewrite
    if redirect.authority:
        out.host_redirect = redirect.authority
    if redirect.port:
        out.port_redirect = redirect.port
    if redirect.scheme:
        out.scheme_redirect = redirect.scheme
    out.response_code = _REDIRECT_CODES.get(
        redirect.redirect_code or 301, rc.RedirectAction.MOVED_PERMANENTLY
    )
    return out


def _authority_header(headers: Headers) -> str | None:
    """A request ``set`` (or ``add``) of Host or :authority: Envoy rewrites the authority
    instead of adding a header (Istio's TranslateHeadersOperations)."""
    if headers.request is None:
        return None
    for operations in (headers.request.set, headers.request.add):
        for name, value in operations.items():
            if name.lower() in ("host", ":authority"):
                return value
    return None


def _apply_headers(target: Any, headers: Headers) -> None:
    if headers.request is not None:
        for name, value in headers.request.set.items():
            if name.lower() not in ("host", ":authority"):
                target.request_headers_to_add.append(_header_value(name, value, append=False))
        for name, value in headers.request.add.items():
            if name.lower() not in ("host", ":authority"):
                target.request_headers_to_add.append(_header_value(name, value, append=True))
        target.request_headers_to_remove.extend(headers.request.remove)
    if headers.response is not None:
        for name, value in headers.response.set.items():
            target.response_headers_to_add.append(_header_value(name, value, append=False))
        for name, value in headers.response.add.items():
            target.response_headers_to_add.append(_header_value(name, value, append=True))
        target.response_headers_to_remove.extend(headers.response.remove)


def _fault(fault: HTTPFaultInjection) -> fault_pb2.HTTPFault:
    out = fault_pb2.HTTPFault()
    if fault.delay is not None and fault.delay.fixed_delay is not None:
        out.delay.fixed_delay.CopyFrom(_duration(fault.delay.fixed_delay))
        out.delay.percentage.CopyFrom(
            _fraction(_percent_value(fault.delay.percentage, fault.delay.percent))
        )
    if fault.abort is not None:
        abort = fault.abort
        if abort.http_status is not None:
            out.abort.http_status = abort.http_status
        elif abort.grpc_status is not None:
            out.abort.grpc_status = _GRPC_CODES.get(abort.grpc_status, 2)
        out.abort.percentage.CopyFrom(_fraction(_percent_value(abort.percentage)))
    return out


_STATUS_TOKEN = re.compile(r"^\d+$")


def _retry_policy(retries: HTTPRetry | None, *, hashed: bool) -> rc.RetryPolicy | None:
    """Istio's ``retry.ConvertPolicy``: no policy means Istio's default one."""
    if retries is not None and not retries.attempts:
        return None
    policy = rc.RetryPolicy(
        retry_on=DEFAULT_RETRY_ON,
        num_retries=_uint32(DEFAULT_RETRY_ATTEMPTS),
        retriable_status_codes=[503],
        host_selection_retry_max_attempts=5,
    )
    ignore_previous = True
    if retries is not None:
        policy.num_retries.value = retries.attempts or 0
        if retries.retry_on:
            tokens = [t for t in retries.retry_on.split(",") if t]
            codes = [int(t) for t in tokens if _STATUS_TOKEN.match(t)]
            conditions = [t for t in tokens if not _STATUS_TOKEN.match(t)]
            if codes and "retriable-status-codes" not in conditions:
                conditions.append("retriable-status-codes")
            policy.retry_on = ",".join(conditions)
            del policy.retriable_status_codes[:]
            policy.retriable_status_codes.extend(codes)
        if retries.per_try_timeout is not None:
            policy.per_try_timeout.CopyFrom(_duration(retries.per_try_timeout))
        if retries.backoff is not None:
            policy.retry_back_off.base_interval.CopyFrom(_duration(retries.backoff))
        if retries.retry_remote_localities:
            policy.retry_priority.name = "envoy.retry_priorities.previous_priorities"
            policy.retry_priority.typed_config.Pack(
                previous_priorities_config_pb2.PreviousPrioritiesConfig(update_frequency=2)
            )
        if retries.retry_ignore_previous_hosts is False:
            ignore_previous = False
    if ignore_previous and not hashed:
        predicate = policy.retry_host_predicate.add(
            name="envoy.retry_host_predicates.previous_hosts"
        )
        predicate.typed_config.Pack(previous_hosts_pb2.PreviousHostsPredicate())
    return policy
