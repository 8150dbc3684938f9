"""One upstream cluster at run time: its hosts, balancer, outlier detector and circuit breaker.

Built from a Cluster and its ClusterLoadAssignment; when configuration changes, hosts that stay
keep their state (ejections, counters), as they do in Envoy.
"""

from __future__ import annotations

import enum
import random
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import base_pb2, health_check_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.extensions.outlier_detection_monitors.consecutive_errors.v3 import (
    consecutive_errors_pb2,
)
from envoy.extensions.upstreams.http.v3 import http_protocol_options_pb2

from ..xds._tls import TRANSPORT_SOCKET_MATCH
from ._balancer import Balancer, BalancerConfig, Host
from ._outlier import OutlierConfig, OutlierDetector
from ._units import seconds
from ._upstream_tls import PLAINTEXT, transport_sockets

__all__ = ["Admission", "Breaker", "ClusterState", "ClusterStats", "Limits"]

MAX = 2**32 - 1
HTTP_PROTOCOL_OPTIONS = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
_USABLE = (health_check_pb2.HEALTHY, health_check_pb2.UNKNOWN, health_check_pb2.DEGRADED)


class Admission(enum.Enum):
    OK = "ok"
    OVERFLOW = "overflow"  # 503 UO: a circuit-breaker limit is reached


@dataclass(frozen=True, slots=True)
class Limits:
    """Envoy's circuit-breaker thresholds (DEFAULT priority), per cluster and per host."""

    max_connections: int = 1024
    max_pending_requests: int = 1024
    max_requests: int = 1024
    max_retries: int = 3
    budget_percent: float | None = None
    min_retry_concurrency: int = 3
    per_host_max_connections: int | None = None
    per_host_max_requests: int | None = None

    @classmethod
    def of(cls, cluster: cluster_pb2.Cluster) -> Limits:
        breakers = cluster.circuit_breakers
        default = base_pb2.RoutingPriority.DEFAULT
        thresholds = next((t for t in breakers.thresholds if t.priority == default), None)
        per_host = next((t for t in breakers.per_host_thresholds if t.priority == default), None)
        limits = cls()
        if thresholds is not None:
            budget = thresholds.retry_budget if thresholds.HasField("retry_budget") else None
            limits = cls(
                max_connections=_value(thresholds, "max_connections", 1024),
                max_pending_requests=_value(thresholds, "max_pending_requests", 1024),
                max_requests=_value(thresholds, "max_requests", 1024),
                max_retries=_value(thresholds, "max_retries", 3),
                budget_percent=(
                    budget.budget_percent.value if budget.HasField("budget_percent") else 20.0
                )
                if budget is not None
                else None,
                min_retry_concurrency=_value(budget, "min_retry_concurrency", 3)
                if budget is not None
                else 3,
            )
        if per_host is not None:
            limits = Limits(
                **{
                    **{f: getattr(limits, f) for f in limits.__dataclass_fields__},
                    "per_host_max_connections": per_host.max_connections.value
                    if per_host.HasField("max_connections")
                    else None,
                    "per_host_max_requests": per_host.max_requests.value
                    if per_host.HasField("max_requests")
                    else None,
                }
            )
        return limits


def _value(message: object, name: str, default: int) -> int:
    return getattr(message, name).value if message.HasField(name) else default  # type: ignore[attr-defined]


@dataclass
class ClusterStats:
    """Counters named after Envoy's cluster stats."""

    upstream_rq_total: int = 0
    upstream_rq_retry: int = 0
    upstream_rq_retry_overflow: int = 0
    upstream_rq_pending_overflow: int = 0
    upstream_rq_timeout: int = 0
    upstream_cx_connect_fail: int = 0
    upstream_rq_5xx: int = 0
    upstream_rq_2xx: int = 0
    outlier_ejections: int = 0
    outlier_unejections: int = 0
    by_host: dict[str, int] = field(default_factory=dict)


class Breaker:
    """Circuit breaking with Envoy's semantics. HTTP/1.1 carries one request per connection,
    so attempts beyond ``max_connections`` are pending (they wait in the endpoint's connection
    pool), and attempts beyond ``max_connections + max_pending_requests`` overflow at once."""

    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        self.in_flight = 0
        self.calls = 0  # logical requests in progress, for the retry budget
        self.retries = 0
        self._lock = threading.Lock()

    def reserve_retry(self) -> bool:
        """Take one of the cluster's concurrent retries, if ``max_retries`` or the retry budget
        (a share of the active requests, with a minimum) allows one more."""
        limits = self.limits
        with self._lock:
            if limits.budget_percent is not None:
                allowed = max(
                    limits.min_retry_concurrency, int(limits.budget_percent / 100.0 * self.calls)
                )
            else:
                allowed = limits.max_retries
            if self.retries >= allowed:
                return False
            self.retries += 1
            return True

    def release_retry(self) -> None:
        with self._lock:
            self.retries -= 1

    def admit(self, host: Host) -> Admission:
        """Admit one attempt to ``host``, or overflow as Envoy's connection pool would."""
        limits = self.limits
        with self._lock:
            in_flight = self.in_flight
            if in_flight >= limits.max_requests or (
                in_flight >= limits.max_connections + limits.max_pending_requests
            ):
                return Admission.OVERFLOW
            self.in_flight = in_flight + 1
            host.active += 1
            host.requests += 1
            return Admission.OK

    def release(self, host: Host, *, retry: bool = False, end_call: bool = False) -> None:
        """Free an attempt's slot (and its retry's), and with ``end_call`` the call's."""
        with self._lock:
            self.in_flight -= 1
            host.active -= 1
            if retry:
                self.retries -= 1
            if end_call:
                self.calls -= 1

    def begin_call(self) -> None:
        with self._lock:
            self.calls += 1

    def end_call(self) -> None:
        with self._lock:
            self.calls -= 1

    def host_has_room(self, host: Host) -> bool:
        limits = self.limits
        if limits.per_host_max_requests is not None and host.active >= limits.per_host_max_requests:
            return False
        return not (
            limits.per_host_max_connections is not None
            and host.active >= limits.per_host_max_connections
        )


class ClusterKind(enum.Enum):
    ENDPOINTS = "endpoints"  # EDS or static endpoints
    ORIGINAL_DESTINATION = "original_dst"  # pass through to where the caller sent it


@dataclass(frozen=True, slots=True)
class ConnectionSettings:
    connect_timeout: float = 5.0
    idle_timeout: float | None = None
    max_requests_per_connection: int | None = None
    http2: bool = False


class ClusterState:
    """A cluster with its live state. Rebuilt policies keep hosts (by address) and counters."""

    def __init__(
        self,
        proto: cluster_pb2.Cluster,
        clock: Callable[[], float],
        rng: random.Random,
    ) -> None:
        self.name = proto.name
        self._clock = clock
        self._rng = rng
        self.stats = ClusterStats()
        self.kind = ClusterKind.ENDPOINTS
        self.hosts: list[Host] = []
        self._original: dict[str, Host] = {}
        self.breaker = Breaker(Limits())
        self.balancer = Balancer(BalancerConfig(), rng)
        self.detector: OutlierDetector | None = None
        self.settings = ConnectionSettings()
        self.tls = PLAINTEXT
        self.proto = proto
        self.configure(proto)

    def configure(self, proto: cluster_pb2.Cluster) -> None:
        self.proto = proto
        self.kind = (
            ClusterKind.ORIGINAL_DESTINATION
            if proto.type == cluster_pb2.Cluster.ORIGINAL_DST
            else ClusterKind.ENDPOINTS
        )
        limits = Limits.of(proto)
        if limits != self.breaker.limits:
            self.breaker.limits = limits
        common = proto.common_lb_config
        balancer_config = BalancerConfig(
            policy=proto.lb_policy,
            panic_threshold=common.healthy_panic_threshold.value
            if common.HasField("healthy_panic_threshold")
            else 50.0,
            locality_weighted=common.HasField("locality_weighted_lb_config"),
            ring_size=proto.ring_hash_lb_config.minimum_ring_size.value
            if proto.ring_hash_lb_config.HasField("minimum_ring_size")
            else 1024,
            maglev_table_size=proto.maglev_lb_config.table_size.value
            if proto.maglev_lb_config.HasField("table_size")
            else 65537,
            locality_weights=self.balancer.config.locality_weights,
        )
        if balancer_config != self.balancer.config:
            self.balancer = Balancer(balancer_config, self._rng)
            self.balancer.set_hosts(self.hosts)
        if proto.HasField("outlier_detection"):
            config = OutlierConfig.of(proto.outlier_detection, _error_codes(proto))
            if self.detector is None or self.detector.config != config:
                self.detector = OutlierDetector(config, self._clock, self._rng, self._on_ejection)
                self.detector.set_hosts(list(self.hosts))
        else:
            self.detector = None
        self.settings = _connection_settings(proto)
        self.tls = transport_sockets(proto)
        if proto.HasField("load_assignment"):
            self.set_endpoints(proto.load_assignment)

    def _on_ejection(self, host: object, reason: str, ejected: bool) -> None:
        if ejected:
            self.stats.outlier_ejections += 1
        else:
            self.stats.outlier_unejections += 1

    def set_endpoints(self, assignment: endpoint_pb2.ClusterLoadAssignment) -> None:
        existing = {h.key: h for h in self.hosts}
        hosts: list[Host] = []
        locality_weights: dict[str, int] = {}
        for group in assignment.endpoints:
            locality = "/".join(
                p
                for p in (group.locality.region, group.locality.zone, group.locality.sub_zone)
                if p
            )
            locality_weights[locality] = group.load_balancing_weight.value
            for lb_endpoint in group.lb_endpoints:
                address = lb_endpoint.endpoint.address
                uds = address.pipe.path if address.HasField("pipe") else None
                socket = address.socket_address
                weight = (
                    lb_endpoint.load_balancing_weight.value
                    if lb_endpoint.HasField("load_balancing_weight")
                    else 1
                )
                key = f"unix:{uds}" if uds else f"{socket.address}:{socket.port_value}"
                host = existing.get(key)
                if host is None:
                    host = Host(socket.address, socket.port_value, uds=uds)
                host.locality = locality
                host.priority = group.priority
                host.weight = max(weight, 1)
                host.healthy = lb_endpoint.health_status in _USABLE
                metadata = lb_endpoint.metadata.filter_metadata
                host.labels = dict(metadata["labels"].items()) if "labels" in metadata else {}
                host.tls_match = (
                    dict(metadata[TRANSPORT_SOCKET_MATCH].items())
                    if TRANSPORT_SOCKET_MATCH in metadata
                    else {}
                )
                hosts.append(host)
        self.hosts = hosts
        if locality_weights != self.balancer.config.locality_weights:
            config = self.balancer.config
            self.balancer = Balancer(
                BalancerConfig(
                    policy=config.policy,
                    panic_threshold=config.panic_threshold,
                    locality_weighted=config.locality_weighted,
                    ring_size=config.ring_size,
                    maglev_table_size=config.maglev_table_size,
                    locality_weights=locality_weights,
                ),
                self._rng,
            )
        self.balancer.set_hosts(hosts)
        if self.detector is not None:
            self.detector.set_hosts(list(hosts))

    def original_destination(self, address: str, port: int) -> Host:
        key = f"{address}:{port}"
        host = self._original.get(key)
        if host is None:
            host = self._original[key] = Host(address, port)
        return host

    def pick(
        self, key: int | None, accept: Callable[[Host], bool] | None, attempts: int
    ) -> Host | None:
        detector = self.detector
        if detector is not None and self._clock() >= detector.next_interval:
            detector.tick()
        limits = self.breaker.limits
        if limits.per_host_max_connections is None and limits.per_host_max_requests is None:
            return self.balancer.pick(key, accept, attempts)

        def usable(host: Host) -> bool:
            if not self.breaker.host_has_room(host):
                return False
            return accept is None or accept(host)

        return self.balancer.pick(key, usable, attempts)


def _error_codes(proto: cluster_pb2.Cluster) -> list[int]:
    codes: list[int] = []
    for monitor in proto.outlier_detection.monitors:
        config = consecutive_errors_pb2.ConsecutiveErrors()
        if monitor.typed_config.Unpack(config):
            for bucket in config.error_buckets.http_errors:
                codes.extend(range(bucket.range.start, bucket.range.end))
    return codes


def _connection_settings(proto: cluster_pb2.Cluster) -> ConnectionSettings:
    connect = seconds(proto.connect_timeout) if proto.HasField("connect_timeout") else 5.0
    idle = None
    per_connection = None
    http2 = False
    if HTTP_PROTOCOL_OPTIONS in proto.typed_extension_protocol_options:
        options = http_protocol_options_pb2.HttpProtocolOptions()
        proto.typed_extension_protocol_options[HTTP_PROTOCOL_OPTIONS].Unpack(options)
        common = options.common_http_protocol_options
        if common.HasField("idle_timeout"):
            idle = seconds(common.idle_timeout)
        if common.HasField("max_requests_per_connection"):
            per_connection = common.max_requests_per_connection.value
        http2 = options.explicit_http_config.HasField("http2_protocol_options")
    return ConnectionSettings(connect, idle, per_connection, http2)
