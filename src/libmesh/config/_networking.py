"""The ``networking.istio.io`` kinds: VirtualService, DestinationRule, ServiceEntry, WorkloadEntry.

Class and field names follow Istio's protos (``networking/v1alpha3/*.proto``) in Python
spelling, so Istio's reference documentation reads straight onto this model. A field that
Istio's CRD marks deprecated is kept, decoded, and reported as a warning when used.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from .._duration import Duration
from .._frozen import EMPTY, FrozenMap
from ._schema import Double, Int32, Message, UInt32, UInt64, optional, required

__all__ = [
    "Abort",
    "ClientTLSSettings",
    "ConnectionPoolSettings",
    "ConsistentHashLB",
    "CorsPolicy",
    "Delay",
    "Delegate",
    "Destination",
    "DestinationRule",
    "Distribute",
    "Failover",
    "H2UpgradePolicy",
    "HTTP2KeepAlive",
    "HTTPBody",
    "HTTPCookie",
    "HTTPCookieAttribute",
    "HTTPDirectResponse",
    "HTTPFaultInjection",
    "HTTPMatchRequest",
    "HTTPMirrorPolicy",
    "HTTPRedirect",
    "HTTPRetry",
    "HTTPRewrite",
    "HTTPRoute",
    "HTTPRouteDestination",
    "HTTPSettings",
    "HeaderOperations",
    "Headers",
    "L4MatchAttributes",
    "LoadBalancerSettings",
    "LocalityLoadBalancerSetting",
    "MagLev",
    "OutlierDetection",
    "Percent",
    "PortSelector",
    "PortTrafficPolicy",
    "ProxyProtocol",
    "ProxyProtocolVersion",
    "RedirectPortSelection",
    "RegexRewrite",
    "Resolution",
    "RetryBudget",
    "RingHash",
    "RouteDestination",
    "ServiceEntry",
    "ServiceEntryLocation",
    "ServiceEntryWorkloadSelector",
    "ServicePort",
    "SimpleLB",
    "StringMatch",
    "Subset",
    "TCPRoute",
    "TCPSettings",
    "TLSMatchAttributes",
    "TLSMode",
    "TLSRoute",
    "TcpKeepalive",
    "TrafficPolicy",
    "TunnelSettings",
    "UnmatchedPreflights",
    "VirtualService",
    "WarmupConfiguration",
    "WorkloadEntry",
    "WorkloadSelector",
    "ZoneAwareLoadBalancerSetting",
]


# -- shared --------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class Percent(Message):
    """A percentage in [0, 100] with fractions: ``{value: 0.1}`` is one request in a thousand."""

    value: Double | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class PortSelector(Message):
    number: UInt32 | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class Destination(Message):
    """A service (``host``), optionally one ``subset`` of it and one ``port``."""

    host: str = required()
    subset: str | None = None
    port: PortSelector | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class WorkloadSelector(Message):
    """``istio.type.v1beta1.WorkloadSelector``: the workloads a policy applies to."""

    match_labels: FrozenMap[str, str] = optional(EMPTY, max_items=4096, max_length=63)


@dataclass(frozen=True, slots=True, kw_only=True)
class StringMatch(Message):
    __oneofs__ = (("exact", "prefix", "regex"),)

    exact: str | None = None
    prefix: str | None = None
    regex: str | None = None


# -- VirtualService ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class HTTPMatchRequest(Message):
    name: str | None = None
    uri: StringMatch | None = None
    scheme: StringMatch | None = None
    method: StringMatch | None = None
    authority: StringMatch | None = None
    headers: FrozenMap[str, StringMatch] = EMPTY
    port: UInt32 | None = None
    source_labels: FrozenMap[str, str] = EMPTY
    gateways: tuple[str, ...] = ()
    query_params: FrozenMap[str, StringMatch] = EMPTY
    ignore_uri_case: bool | None = None
    without_headers: FrozenMap[str, StringMatch] = EMPTY
    source_namespace: str | None = None
    stat_prefix: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class HeaderOperations(Message):
    set: FrozenMap[str, str] = EMPTY
    add: FrozenMap[str, str] = EMPTY
    remove: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True, kw_only=True)
class Headers(Message):
    request: HeaderOperations | None = None
    response: HeaderOperations | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class HTTPRouteDestination(Message):
    destination: Destination = required()
    weight: Int32 | None = None
    headers: Headers | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class RouteDestination(Message):
    destination: Destination = required()
    weight: Int32 | None = None


class RedirectPortSelection(enum.Enum):
    FROM_PROTOCOL_DEFAULT = "FROM_PROTOCOL_DEFAULT"
    FROM_REQUEST_PORT = "FROM_REQUEST_PORT"


@dataclass(frozen=True, slots=True, kw_only=True)
class HTTPRedirect(Message):
    __oneofs__ = (("port", "derive_port"),)

    uri: str | None = None
    prefix_rewrite: str | None = None
    authority: str | None = None
    port: UInt32 | None = None
    derive_port: RedirectPortSelection | None = None
    scheme: str | None = None
    redirect_code: UInt32 | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class HTTPBody(Message):
    __oneofs__ = (("string_", "bytes_"),)

    string_: str | None = None
    bytes_: bytes | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class HTTPDirectResponse(Message):
    status: UInt32 = required()
    body: HTTPBody | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class Delegate(Message):
    name: str | None = None
    namespace: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class RegexRewrite(Message):
    match: str | None = None
    rewrite: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class HTTPRewrite(Message):
    uri: str | None = None
    authority: str | None = None
    uri_regex_rewrite: RegexRewrite | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class HTTPRetry(Message):
    attempts: Int32 | None = None
    per_try_timeout: Duration | None = None
    retry_on: str | None = None
    retry_remote_localities: bool | None = None
    retry_ignore_previous_hosts: bool | None = None
    backoff: Duration | None = None


class UnmatchedPreflights(enum.Enum):
    UNSPECIFIED = "UNSPECIFIED"
    FORWARD = "FORWARD"
    IGNORE = "IGNORE"


@dataclass(frozen=True, slots=True, kw_only=True)
class CorsPolicy(Message):
    allow_origin: tuple[str, ...] = optional((), deprecated="use allowOrigins")
    allow_origins: tuple[StringMatch, ...] = ()
    allow_methods: tuple[str, ...] = ()
    allow_headers: tuple[str, ...] = ()
    expose_headers: tuple[str, ...] = ()
    max_age: Duration | None = None
    allow_credentials: bool | None = None
    unmatched_preflights: UnmatchedPreflights | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class Delay(Message):
    __oneofs__ = (("fixed_delay", "exponential_delay"),)

    fixed_delay: Duration | None = None
    exponential_delay: Duration | None = None
    percentage: Percent | None = None
    percent: Int32 | None = optional(deprecated="use percentage")


@dataclass(frozen=True, slots=True, kw_only=True)
class Abort(Message):
    __oneofs__ = (("http_status", "grpc_status", "http2_error"),)

    http_status: Int32 | None = None
    grpc_status: str | None = None
    http2_error: str | None = None
    percentage: Percent | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class HTTPFaultInjection(Message):
    delay: Delay | None = None
    abort: Abort | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class HTTPMirrorPolicy(Message):
    destination: Destination = required()
    percentage: Percent | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class HTTPRoute(Message):
    name: str | None = None
    match: tuple[HTTPMatchRequest, ...] = ()
    route: tuple[HTTPRouteDestination, ...] = ()
    redirect: HTTPRedirect | None = None
    direct_response: HTTPDirectResponse | None = None
    delegate: Delegate | None = None
    rewrite: HTTPRewrite | None = None
    timeout: Duration | None = None
    retries: HTTPRetry | None = None
    fault: HTTPFaultInjection | None = None
    mirror: Destination | None = None
    mirrors: tuple[HTTPMirrorPolicy, ...] = ()
    mirror_percent: UInt32 | None = optional(
        yaml="mirrorPercent", aliases=("mirror_percent",), deprecated="use mirrorPercentage"
    )
    mirror_percentage: Percent | None = None
    cors_policy: CorsPolicy | None = None
    headers: Headers | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class L4MatchAttributes(Message):
    destination_subnets: tuple[str, ...] = ()
    port: UInt32 | None = None
    source_subnet: str | None = None
    source_labels: FrozenMap[str, str] = EMPTY
    gateways: tuple[str, ...] = ()
    source_namespace: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class TLSMatchAttributes(Message):
    sni_hosts: tuple[str, ...] = required()
    destination_subnets: tuple[str, ...] = ()
    port: UInt32 | None = None
    source_labels: FrozenMap[str, str] = EMPTY
    gateways: tuple[str, ...] = ()
    source_namespace: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class TCPRoute(Message):
    match: tuple[L4MatchAttributes, ...] = ()
    route: tuple[RouteDestination, ...] = ()


@dataclass(frozen=True, slots=True, kw_only=True)
class TLSRoute(Message):
    match: tuple[TLSMatchAttributes, ...] = required()
    route: tuple[RouteDestination, ...] = ()


@dataclass(frozen=True, slots=True, kw_only=True)
class VirtualService(Message):
    """Routing for one or more hosts: HTTP, TLS and TCP rules, evaluated first match first."""

    hosts: tuple[str, ...] = ()
    gateways: tuple[str, ...] = ()
    http: tuple[HTTPRoute, ...] = ()
    tls: tuple[TLSRoute, ...] = ()
    tcp: tuple[TCPRoute, ...] = ()
    export_to: tuple[str, ...] = ()


# -- DestinationRule -----------------------------------------------------------------------------


class SimpleLB(enum.Enum):
    UNSPECIFIED = "UNSPECIFIED"
    LEAST_CONN = "LEAST_CONN"
    RANDOM = "RANDOM"
    PASSTHROUGH = "PASSTHROUGH"
    ROUND_ROBIN = "ROUND_ROBIN"
    LEAST_REQUEST = "LEAST_REQUEST"


@dataclass(frozen=True, slots=True, kw_only=True)
class HTTPCookieAttribute(Message):
    name: str = required()
    value: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class HTTPCookie(Message):
    name: str = required()
    path: str | None = None
    ttl: Duration | None = optional(minimum=0)
    attributes: tuple[HTTPCookieAttribute, ...] = ()


@dataclass(frozen=True, slots=True, kw_only=True)
class RingHash(Message):
    minimum_ring_size: UInt64 | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class MagLev(Message):
    table_size: UInt64 | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class ConsistentHashLB(Message):
    __oneofs__ = (
        ("http_header_name", "http_cookie", "use_source_ip", "http_query_parameter_name"),
        ("ring_hash", "maglev"),
    )

    http_header_name: str | None = None
    http_cookie: HTTPCookie | None = None
    use_source_ip: bool | None = None
    http_query_parameter_name: str | None = None
    ring_hash: RingHash | None = None
    maglev: MagLev | None = None
    minimum_ring_size: UInt64 | None = optional(deprecated="use ringHash.minimumRingSize")


@dataclass(frozen=True, slots=True, kw_only=True)
class Distribute(Message):
    from_: str | None = None
    to: FrozenMap[str, UInt32] = EMPTY


@dataclass(frozen=True, slots=True, kw_only=True)
class Failover(Message):
    from_: str | None = None
    to: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class LocalityLoadBalancerSetting(Message):
    distribute: tuple[Distribute, ...] = ()
    failover: tuple[Failover, ...] = ()
    failover_priority: tuple[str, ...] = ()
    enabled: bool | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class ZoneAwareLoadBalancerSetting(Message):
    enabled: bool | None = None
    failover: tuple[Failover, ...] = ()
    failover_priority: tuple[str, ...] = ()
    min_cluster_size: UInt64 | None = optional(minimum=1)


@dataclass(frozen=True, slots=True, kw_only=True)
class WarmupConfiguration(Message):
    duration: Duration = required()
    minimum_percent: Double | None = optional(minimum=0, maximum=100)
    aggression: Double | None = optional(minimum=0)


@dataclass(frozen=True, slots=True, kw_only=True)
class LoadBalancerSettings(Message):
    __oneofs__ = (("simple", "consistent_hash"),)

    simple: SimpleLB | None = None
    consistent_hash: ConsistentHashLB | None = None
    locality_lb_setting: LocalityLoadBalancerSetting | None = None
    zone_aware_lb_setting: ZoneAwareLoadBalancerSetting | None = None
    warmup_duration_secs: Duration | None = optional(deprecated="use warmup.duration")
    warmup: WarmupConfiguration | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class TcpKeepalive(Message):
    probes: UInt32 | None = None
    time: Duration | None = None
    interval: Duration | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class TCPSettings(Message):
    max_connections: Int32 | None = None
    connect_timeout: Duration | None = None
    tcp_keepalive: TcpKeepalive | None = None
    max_connection_duration: Duration | None = None
    idle_timeout: Duration | None = optional(minimum=0)


class H2UpgradePolicy(enum.Enum):
    DEFAULT = "DEFAULT"
    DO_NOT_UPGRADE = "DO_NOT_UPGRADE"
    UPGRADE = "UPGRADE"


@dataclass(frozen=True, slots=True, kw_only=True)
class HTTP2KeepAlive(Message):
    interval: Duration | None = None
    timeout: Duration | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class HTTPSettings(Message):
    http1_max_pending_requests: Int32 | None = None
    http2_max_requests: Int32 | None = None
    max_requests_per_connection: Int32 | None = None
    max_retries: Int32 | None = None
    idle_timeout: Duration | None = None
    h2_upgrade_policy: H2UpgradePolicy | None = None
    use_client_protocol: bool | None = None
    max_concurrent_streams: Int32 | None = None
    http2_keep_alive: HTTP2KeepAlive | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class ConnectionPoolSettings(Message):
    tcp: TCPSettings | None = None
    http: HTTPSettings | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class OutlierDetection(Message):
    consecutive_errors: Int32 | None = optional(deprecated="use consecutive5xxErrors")
    split_external_local_origin_errors: bool | None = None
    consecutive_local_origin_failures: UInt32 | None = None
    consecutive_gateway_errors: UInt32 | None = None
    consecutive_5xx_errors: UInt32 | None = None
    interval: Duration | None = None
    base_ejection_time: Duration | None = None
    max_ejection_percent: Int32 | None = None
    min_health_percent: Int32 | None = None
    outlier_detection_http_error_codes: tuple[UInt32, ...] = optional((), minimum=100, maximum=599)


class TLSMode(enum.Enum):
    DISABLE = "DISABLE"
    SIMPLE = "SIMPLE"
    MUTUAL = "MUTUAL"
    ISTIO_MUTUAL = "ISTIO_MUTUAL"


@dataclass(frozen=True, slots=True, kw_only=True)
class ClientTLSSettings(Message):
    mode: TLSMode | None = None
    client_certificate: str | None = None
    private_key: str | None = None
    ca_certificates: str | None = None
    credential_name: str | None = None
    subject_alt_names: tuple[str, ...] = ()
    sni: str | None = None
    insecure_skip_verify: bool | None = None
    ca_crl: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class PortTrafficPolicy(Message):
    port: PortSelector | None = None
    load_balancer: LoadBalancerSettings | None = None
    connection_pool: ConnectionPoolSettings | None = None
    outlier_detection: OutlierDetection | None = None
    tls: ClientTLSSettings | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class TunnelSettings(Message):
    protocol: str | None = None
    target_host: str = required()
    target_port: UInt32 = required()


class ProxyProtocolVersion(enum.Enum):
    V1 = "V1"
    V2 = "V2"


@dataclass(frozen=True, slots=True, kw_only=True)
class ProxyProtocol(Message):
    version: ProxyProtocolVersion | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class RetryBudget(Message):
    percent: Double | None = optional(minimum=0, maximum=100)
    min_retry_concurrency: UInt32 | None = None
    budget_interval: Duration | None = optional(minimum=0)


@dataclass(frozen=True, slots=True, kw_only=True)
class TrafficPolicy(Message):
    load_balancer: LoadBalancerSettings | None = None
    connection_pool: ConnectionPoolSettings | None = None
    outlier_detection: OutlierDetection | None = None
    tls: ClientTLSSettings | None = None
    port_level_settings: tuple[PortTrafficPolicy, ...] = optional((), max_items=4096)
    tunnel: TunnelSettings | None = None
    proxy_protocol: ProxyProtocol | None = None
    retry_budget: RetryBudget | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class Subset(Message):
    name: str = required()
    labels: FrozenMap[str, str] = EMPTY
    traffic_policy: TrafficPolicy | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class DestinationRule(Message):
    """What happens to traffic for a host once routing has chosen it: load balancing,
    connection limits, outlier detection, TLS, and the named subsets routes refer to."""

    host: str = required()
    traffic_policy: TrafficPolicy | None = None
    subsets: tuple[Subset, ...] = ()
    export_to: tuple[str, ...] = ()
    workload_selector: WorkloadSelector | None = None


# -- ServiceEntry and WorkloadEntry --------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class WorkloadEntry(Message):
    """One workload: an address with ports, labels, a locality and a service account."""

    address: str | None = optional(max_length=256)
    ports: FrozenMap[str, UInt32] = optional(EMPTY, max_items=128)
    labels: FrozenMap[str, str] = optional(EMPTY, max_items=256)
    network: str | None = optional(max_length=2048)
    locality: str | None = optional(max_length=2048)
    weight: UInt32 | None = None
    service_account: str | None = optional(max_length=253)


@dataclass(frozen=True, slots=True, kw_only=True)
class ServicePort(Message):
    number: UInt32 = required()
    protocol: str | None = optional(max_length=256)
    name: str = required(max_length=256)
    target_port: UInt32 | None = None


class ServiceEntryLocation(enum.Enum):
    MESH_EXTERNAL = "MESH_EXTERNAL"
    MESH_INTERNAL = "MESH_INTERNAL"


class Resolution(enum.Enum):
    NONE = "NONE"
    STATIC = "STATIC"
    DNS = "DNS"
    DNS_ROUND_ROBIN = "DNS_ROUND_ROBIN"
    DYNAMIC_DNS = "DYNAMIC_DNS"


@dataclass(frozen=True, slots=True, kw_only=True)
class ServiceEntryWorkloadSelector(Message):
    """``networking.v1alpha3.WorkloadSelector``: selects WorkloadEntries by their labels."""

    labels: FrozenMap[str, str] = optional(EMPTY, max_items=256, max_length=63)


@dataclass(frozen=True, slots=True, kw_only=True)
class ServiceEntry(Message):
    """A service in the registry: its hosts, ports, and where its endpoints come from."""

    hosts: tuple[str, ...] = required(max_items=256)
    addresses: tuple[str, ...] = optional((), max_items=256, max_length=64)
    ports: tuple[ServicePort, ...] = optional((), max_items=256)
    location: ServiceEntryLocation | None = None
    resolution: Resolution | None = None
    endpoints: tuple[WorkloadEntry, ...] = optional((), max_items=4096)
    workload_selector: ServiceEntryWorkloadSelector | None = None
    export_to: tuple[str, ...] = ()
    subject_alt_names: tuple[str, ...] = ()
