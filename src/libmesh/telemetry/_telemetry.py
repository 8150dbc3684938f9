"""What a mesh records about each request, whichever library carried it.

Transports and middleware stay thin: they open a :class:`ClientCall` or an
:class:`InboundRequest` here, tell it what happened in their own terms (an attempt, a status,
a byte count), and this module turns it into spans, trace headers, Istio's metrics and an
access-log line — the same for httpx, requests, grpc, ASGI and WSGI.
"""

from __future__ import annotations

import contextvars
import os
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import grpc
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace import SpanKind, Status, StatusCode

from ..config._rules import is_ip
from ..policy import ClusterState
from ..xds import Node
from ._access_log import AccessLog, AccessLogEntry, format_start_time
from ._istio import IstioMetrics, service_name_and_namespace
from ._peer import (
    GRPC_PEER_METADATA,
    PEER_METADATA,
    UNKNOWN,
    Peer,
    decode_peer,
    encode_peer,
)
from ._prometheus import MetricsRegistry
from ._tracing import REQUEST_ID, Propagation, ServerSpan, new_request_id, tracer, tracing_enabled

__all__ = ["ClientCall", "Inbound", "InboundRequest", "Telemetry", "current_inbound"]


@dataclass(slots=True)
class Inbound:
    """The request this code is serving, as the server middleware saw it: what later
    outbound calls propagate, and who is calling (``libmesh.current_inbound()``).

    ``peer_principal`` is the caller's verified SPIFFE ID when the connection is mTLS (``""``
    on plaintext); ``request_principal`` is ``iss/sub`` of a validated JWT (``""`` without
    one)."""

    request_id: str
    source: Peer
    peer_principal: str = ""
    request_principal: str = ""
    headers: Mapping[str, str] = field(default_factory=dict)


_INBOUND: contextvars.ContextVar[Inbound | None] = contextvars.ContextVar(
    "libmesh_inbound", default=None
)


_UNKNOWN_PEER = Peer()


def current_inbound() -> Inbound | None:
    """The inbound request being served in this context, if a libmesh middleware or
    interceptor is serving one."""
    return _INBOUND.get()


# "14" -> "UNAVAILABLE", for access logs
_GRPC_CODES = {str(code.value[0]): code.name for code in grpc.StatusCode}


class Telemetry:
    """One mesh's telemetry: its metrics registry, its trace propagation and its access log.

    ``clusters`` gives the engine's clusters, whose statistics become libmesh's own metrics at
    each scrape; ``config_version`` the configuration version applied."""

    def __init__(
        self,
        node: Node,
        *,
        propagation: Propagation | None = None,
        access_log: AccessLog | None = None,
        clusters: Callable[[], Mapping[str, ClusterState]] | None = None,
        config_version: Callable[[], str] | None = None,
    ) -> None:
        env = os.environ
        self.registry = MetricsRegistry()
        self.istio = IstioMetrics(self.registry)
        self.propagation = propagation or Propagation.from_environment(env)
        self.access_log = access_log or AccessLog.from_environment(env.get("LIBMESH_ACCESS_LOG"))
        self._node = node
        self.local = Peer.of_node(node)
        self._peer = encode_peer(node, self.local.workload, self.local.cluster)
        self._own = _OwnMetrics(self.registry, clusters, config_version)
        self._served: dict[str, str] = {}  # authority -> destination_service
        # (service, id(endpoint labels)) -> (the labels, their peer); the labels are kept so
        # that an id cannot be reused while its entry lives
        self._destinations: dict[tuple[str, int], tuple[object, Peer]] = {}
        self.clock = time.perf_counter

    # outbound --------------------------------------------------------------------------------

    def client_call(
        self,
        *,
        service: str,
        method: str,
        path: str,
        protocol: str = "http",
        request_id: str | None = None,
    ) -> ClientCall:
        """Start observing one logical outbound call to ``service`` (``host:port``);
        ``request_id`` is the ``x-request-id`` the caller set, if it set one."""
        return ClientCall(self, service, method, path, protocol, request_id)

    # inbound ---------------------------------------------------------------------------------

    def inbound_request(
        self,
        *,
        method: str,
        path: str,
        authority: str,
        headers: Mapping[str, str],
        protocol: str = "http",
        client_address: str = "",
        span_name: str | None = None,
        peer_principal: str = "",
        request_principal: str = "",
    ) -> InboundRequest:
        """Start observing one inbound request; ``headers`` must have lower-case names;
        ``peer_principal`` is the caller's SPIFFE ID, verified by mutual TLS."""
        return InboundRequest(
            self, method, path, authority, headers, protocol, client_address, span_name,
            peer_principal, request_principal,
        )  # fmt: skip

    def render_metrics(self) -> str:
        return self.registry.render()

    def watch_identity(self, identity: Any) -> None:
        """This workload is ``identity`` (a WorkloadIdentity): its SPIFFE ID becomes the
        ``destination_principal`` of what it serves, as Istio reports it. And export the SVID's
        expiry (``libmesh_svid_expiry_timestamp_seconds``) and
        its renewals, read from ``identity`` (a WorkloadIdentity) at each scrape."""
        expiry = self.registry.gauge(
            "libmesh_svid_expiry_timestamp_seconds",
            "When the workload's current SVID expires (Unix time; 0 without one).",
            ["spiffe_id"],
        )
        renewals = self.registry.counter(
            "libmesh_svid_renewals_total", "SVIDs received from the CA.", ["spiffe_id"]
        )
        self.local = Peer.of_node(self._node, principal=str(identity.identity))
        self._served.clear()

        def collect() -> None:
            svid = identity.current()
            name = str(identity.identity)
            expiry.set(svid.expires.timestamp() if svid is not None else 0, spiffe_id=name)
            renewals.mirror(identity.rotations, spiffe_id=name)

        self.registry.on_render(collect)

    def use_opentelemetry_metrics(self, meter_provider: Any = None) -> None:
        """Also record Istio's request metrics through OpenTelemetry's metrics API (the
        global meter provider, or ``meter_provider``): for an OTLP metrics pipeline instead of
        a Prometheus scrape. ``/metrics`` keeps working either way."""
        from opentelemetry import metrics

        from .. import __version__

        provider = meter_provider or metrics.get_meter_provider()
        self.istio.export_to(provider.get_meter("libmesh", __version__))

    def _destination(self, service: str, labels: Mapping[str, str] | None) -> Peer:
        """The peer an endpoint is, from its labels (when it did not say who it is)."""
        key = (service, id(labels))
        found = self._destinations.get(key)
        if found is None or found[0] is not labels:
            if len(self._destinations) > 10_000:
                self._destinations.clear()
            peer = Peer.from_labels(
                labels or {}, namespace=service_name_and_namespace(service.rpartition(":")[0])[1]
            )
            found = self._destinations[key] = (labels, peer)
        return found[1]


class _OwnMetrics:
    """libmesh's own metrics, read from the engine at scrape time: nothing to do per
    request. Named after Envoy's cluster statistics."""

    def __init__(
        self,
        registry: MetricsRegistry,
        clusters: Callable[[], Mapping[str, ClusterState]] | None,
        config_version: Callable[[], str] | None,
    ) -> None:
        self._clusters = clusters
        self._version = config_version
        labels = ["cluster"]
        counter, gauge = registry.counter, registry.gauge
        self.counters = {
            "upstream_rq_total": counter(
                "libmesh_upstream_rq_total", "Attempts sent, per cluster.", labels
            ),
            "upstream_rq_retry": counter(
                "libmesh_upstream_rq_retry_total", "Retries, per cluster.", labels
            ),
            "upstream_rq_retry_overflow": counter(
                "libmesh_upstream_rq_retry_overflow_total",
                "Retries refused by the retry budget or the maxRetries limit.",
                labels,
            ),
            "upstream_rq_pending_overflow": counter(
                "libmesh_upstream_rq_pending_overflow_total",
                "Requests refused by the circuit breaker (503, flag UO).",
                labels,
            ),
            "upstream_rq_timeout": counter(
                "libmesh_upstream_rq_timeout_total", "Requests that timed out (UT).", labels
            ),
            "outlier_ejections": counter(
                "libmesh_outlier_detection_ejections_total", "Endpoint ejections.", labels
            ),
        }
        self.ejected = gauge(
            "libmesh_outlier_detection_ejections_active", "Endpoints ejected now.", labels
        )
        self.breaker_open = gauge(
            "libmesh_circuit_breakers_rq_open",
            "1 while the cluster's concurrent request limit is reached (Envoy's rq_open).",
            labels,
        )
        self.version = gauge(
            "libmesh_config_info", "The configuration version applied (value 1).", ["version"]
        )
        registry.on_render(self.collect)

    def collect(self) -> None:
        if self._clusters is not None:
            for name, cluster in self._clusters().items():
                stats = cluster.stats
                for field_name, metric in self.counters.items():
                    metric.mirror(getattr(stats, field_name), cluster=name)
                ejected = sum(1 for h in cluster.hosts if h.monitor.ejected)
                self.ejected.set(ejected, cluster=name)
                breaker = cluster.breaker
                self.breaker_open.set(
                    int(breaker.in_flight >= breaker.limits.max_requests), cluster=name
                )
        if self._version is not None:
            version = self._version() or "none"
            self.version.clear()
            self.version.set(1, version=version)


class ClientCall:
    """One logical outbound call: a span, a span per attempt, then one metric sample and one
    access-log line when it ends."""

    __slots__ = (
        "_attempt_span",
        "_method",
        "_path",
        "_protocol",
        "_request_id_given",
        "_service",
        "_span",
        "_started",
        "_telemetry",
        "attempts",
        "request_id",
    )

    def __init__(
        self,
        telemetry: Telemetry,
        service: str,
        method: str,
        path: str,
        protocol: str,
        request_id: str | None,
    ) -> None:
        self._telemetry = telemetry
        self._service = service
        self._method = method
        self._path = path
        self._protocol = protocol
        self._started = telemetry.clock()
        self._request_id_given = request_id is not None
        if request_id is None:
            inbound = _INBOUND.get()
            request_id = inbound.request_id if inbound is not None else new_request_id()
        self.request_id = request_id
        self._span: trace.Span | None = None
        if tracing_enabled():
            self._span = tracer().start_span(
                f"{service}/*",
                kind=SpanKind.INTERNAL,
                attributes={"upstream.service": service, "http.request.method": method},
            )
        self._attempt_span: trace.Span | None = None
        self.attempts = 0

    def attempt(self, endpoint: str, cluster: str) -> list[tuple[str, str]]:
        """An attempt is about to go to ``endpoint``: its span starts. Returns the headers
        the attempt must carry (set, replacing any of the same name): the trace context, the
        request id, and this workload's peer metadata."""
        self.attempts += 1
        telemetry = self._telemetry
        headers: dict[str, str] = {}
        if self._span is None:  # no tracer provider: pass the caller's context along, if any
            if trace.get_current_span().get_span_context().is_valid:
                telemetry.propagation.inject(headers)
        else:
            host, _, port = endpoint.rpartition(":")
            span = self._attempt_span = tracer().start_span(
                self._method,
                context=trace.set_span_in_context(self._span),
                kind=SpanKind.CLIENT,
                attributes={
                    "http.request.method": self._method,
                    "url.path": self._path,
                    "server.address": self._service.rpartition(":")[0],
                    "network.peer.address": host,
                    "network.peer.port": int(port) if port.isdigit() else 0,
                    "upstream_cluster": cluster,
                    "http.request.resend_count": self.attempts - 1,
                },
            )
            telemetry.propagation.inject(headers, trace.set_span_in_context(span, Context()))
        pairs = list(headers.items())
        if not self._request_id_given:
            pairs.append((REQUEST_ID, self.request_id))
        pairs.append(
            (GRPC_PEER_METADATA if self._protocol == "grpc" else PEER_METADATA, telemetry._peer)
        )
        return pairs

    @property
    def traced(self) -> bool:
        """Whether the attempt under way has a span (:meth:`attempt_done` ends it)."""
        return self._attempt_span is not None

    def attempt_done(self, status: int = 0, grpc_status: str = "", error: str = "") -> None:
        span, self._attempt_span = self._attempt_span, None
        if span is None:
            return
        if status:
            span.set_attribute("http.response.status_code", status)
        if grpc_status:
            span.set_attribute("rpc.grpc.status_code", int(grpc_status))
        if error or status >= 500:
            span.set_status(Status(StatusCode.ERROR, error or None))
        span.end()

    def finish(
        self,
        *,
        status: int,
        flags: str = "-",
        grpc_status: str = "",
        request_bytes: int = 0,
        response_bytes: int = 0,
        upstream_host: str = "",
        cluster: str = "",
        route: str = "",
        destination_labels: Mapping[str, str] | None = None,
        response_headers: Mapping[str, str] | None = None,
    ) -> None:
        """The call is over: the response was read (or there was none, ``status`` 0)."""
        self.attempt_done(status, grpc_status)
        telemetry = self._telemetry
        duration_ms = (telemetry.clock() - self._started) * 1000
        destination: Peer | None = None
        if response_headers is not None:
            exchanged = _exchanged(response_headers)
            if exchanged:
                destination = decode_peer(exchanged)
        if destination is None:
            destination = telemetry._destination(self._service, destination_labels)
        host = self._service.rpartition(":")[0]
        telemetry.istio.observe(
            "source", telemetry.local, destination, host, self._protocol, status, grpc_status,
            flags or "-", UNKNOWN, duration_ms, request_bytes, response_bytes,
        )  # fmt: skip
        span = self._span
        if span is not None:
            span.set_attribute("response_flags", flags or "-")
            if status:
                span.set_attribute("http.response.status_code", status)
            if status == 0 or status >= 500:
                span.set_status(Status(StatusCode.ERROR, f"response flags {flags}"))
            span.end()
        log = telemetry.access_log
        if log is not None:
            context = (span if span is not None else trace.get_current_span()).get_span_context()
            log.write(
                AccessLogEntry(
                    start_time=format_start_time(time.time() - duration_ms / 1000),
                    route_name=route or None,
                    method=self._method,
                    path=self._path,
                    protocol="HTTP/2" if self._protocol == "grpc" else "HTTP/1.1",
                    response_code=status,
                    response_flags=flags or "-",
                    bytes_received=response_bytes,
                    bytes_sent=request_bytes,
                    duration=round(duration_ms),
                    request_id=self.request_id,
                    authority=self._service,
                    upstream_host=upstream_host or None,
                    upstream_cluster=cluster or None,
                    trace_id=f"{context.trace_id:032x}" if context.trace_id else None,
                    grpc_status=_GRPC_CODES.get(grpc_status, grpc_status) or None,
                    reporter="source",
                )
            )


class InboundRequest:
    """One inbound request: its server span (current while the application runs), then one
    metric sample and one access-log line."""

    __slots__ = (
        "_authority",
        "_client_address",
        "_headers",
        "_method",
        "_path",
        "_protocol",
        "_span",
        "_span_name",
        "_started",
        "_telemetry",
        "_token",
        "exchanged",
        "inbound",
        "request_id",
        "request_id_generated",
    )

    def __init__(
        self,
        telemetry: Telemetry,
        method: str,
        path: str,
        authority: str,
        headers: Mapping[str, str],
        protocol: str,
        client_address: str,
        span_name: str | None,
        peer_principal: str = "",
        request_principal: str = "",
    ) -> None:
        self._telemetry = telemetry
        self._method = method
        self._path = path
        self._authority = authority
        self._headers = headers
        self._protocol = protocol
        self._client_address = client_address
        self._span_name = span_name or method
        self._started = telemetry.clock()
        given = headers.get(REQUEST_ID)
        self.request_id = given or new_request_id()
        self.request_id_generated = not given
        exchanged = headers.get(PEER_METADATA) or headers.get(GRPC_PEER_METADATA)
        self.exchanged = exchanged is not None
        source = (
            decode_peer(exchanged, peer_principal)
            if exchanged
            else Peer(principal=peer_principal)
            if peer_principal
            else None
        )
        self.inbound = Inbound(
            self.request_id, source or _UNKNOWN_PEER, peer_principal, request_principal, headers
        )
        self._span: ServerSpan | None = None
        self._token: contextvars.Token[Inbound | None] | None = None

    def __enter__(self) -> InboundRequest:
        parent = self._telemetry.propagation.extract(self._headers)
        if tracing_enabled():
            span = self._span = ServerSpan()
            span.enter(
                self._span_name,
                parent,
                {
                    "http.request.method": self._method,
                    "url.path": self._path,
                    "server.address": self._authority,
                    "client.address": self._client_address,
                    "request_id": self.request_id,
                },
            )
        elif parent:  # no tracer: the caller's context still reaches outbound calls
            span = self._span = ServerSpan()
            span.pass_through(parent)
        self._token = _INBOUND.set(self.inbound)
        return self

    def __exit__(self, kind: object = None, error: BaseException | None = None, *_: object) -> None:
        if self._token is not None:
            _INBOUND.reset(self._token)
            self._token = None
        if self._span is not None:
            self._span.exit(error)

    def _served_service(self) -> str:
        """The service this request was for, as ``destination_service`` names it: the host the
        caller named, made whole; for a caller that dialled an address, this workload's
        canonical service."""
        served = self._telemetry._served
        found = served.get(self._authority)
        if found is None:
            if len(served) > 1000:
                served.clear()
            found = served[self._authority] = self._name_served_service()
        return found

    def _name_served_service(self) -> str:
        host = self._authority
        if host.startswith("["):
            host = host[1 : host.find("]")]
        elif host.count(":") == 1:
            host = host.rpartition(":")[0]
        local = self._telemetry.local
        if not host or host == "localhost" or is_ip(host):
            if local.canonical_service == UNKNOWN:
                return UNKNOWN
            return f"{local.canonical_service}.{local.namespace}.svc.cluster.local"
        if "." not in host:
            return f"{host}.{local.namespace}.svc.cluster.local"
        return host

    def response_headers(self) -> Iterator[tuple[str, str]]:
        """Headers the response gets: this workload's peer metadata, for a caller that sent
        its own (Istio's exchange), and the request id when the caller sent none."""
        if self.exchanged:
            peer = self._telemetry._peer
            yield (GRPC_PEER_METADATA if self._protocol == "grpc" else PEER_METADATA), peer

    def finish(
        self,
        *,
        status: int,
        grpc_status: str = "",
        request_bytes: int = 0,
        response_bytes: int = 0,
        flags: str = "-",
    ) -> None:
        telemetry = self._telemetry
        duration_ms = (telemetry.clock() - self._started) * 1000
        server_span = self._span
        # a borrowed span (a framework's) may be over already: only libmesh's own is touched
        span = server_span.span if server_span is not None and server_span.owned else None
        if span is not None:
            if status:
                span.set_attribute("http.response.status_code", status)
            if grpc_status:
                span.set_attribute("rpc.grpc.status_code", int(grpc_status))
            if status >= 500 or (grpc_status not in ("", "0") and self._protocol == "grpc"):
                span.set_status(Status(StatusCode.ERROR))
        telemetry.istio.observe(
            "destination", self.inbound.source, telemetry.local, self._served_service(),
            self._protocol, status, grpc_status, flags,
            "mutual_tls" if self.inbound.peer_principal else "none",
            duration_ms, request_bytes, response_bytes,
        )  # fmt: skip
        log = telemetry.access_log
        if log is not None:
            current = server_span.span if server_span is not None else None
            context = (current or trace.get_current_span()).get_span_context()
            headers = self._headers
            log.write(
                AccessLogEntry(
                    start_time=format_start_time(time.time() - duration_ms / 1000),
                    method=self._method,
                    path=self._path,
                    protocol="HTTP/2" if self._protocol == "grpc" else "HTTP/1.1",
                    response_code=status,
                    response_flags=flags,
                    bytes_received=request_bytes,
                    bytes_sent=response_bytes,
                    duration=round(duration_ms),
                    x_forwarded_for=headers.get("x-forwarded-for"),
                    user_agent=headers.get("user-agent"),
                    request_id=self.request_id,
                    authority=self._authority,
                    downstream_remote_address=self._client_address or None,
                    trace_id=f"{context.trace_id:032x}" if context and context.trace_id else None,
                    grpc_status=_GRPC_CODES.get(grpc_status, grpc_status) or None,
                    reporter="destination",
                )
            )


_EXCHANGED = (PEER_METADATA.encode(), GRPC_PEER_METADATA.encode())


def _exchanged(headers: Mapping[str, str]) -> str | None:
    """The peer's metadata-exchange header: one pass over httpx's raw headers (its ``get``
    normalizes the name and decodes every value), else a mapping lookup."""
    entries = getattr(headers, "_list", None)  # httpx's: (name, lower-case name, value)
    if entries is not None:
        for _, name, value in entries:
            if name in _EXCHANGED:
                return str(value.decode("latin-1"))
        return None
    raw = getattr(headers, "raw", None)
    if raw is None:
        return headers.get(PEER_METADATA) or headers.get(GRPC_PEER_METADATA)
    for name, value in raw:
        if name.lower() in _EXCHANGED:
            return str(value.decode("latin-1"))
    return None
