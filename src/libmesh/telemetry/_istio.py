"""Istio's standard request metrics, with Istio's names, labels and buckets, so that Istio's
Grafana dashboards and alerts work unchanged on libmesh's ``/metrics``."""

from __future__ import annotations

import bisect
import threading
from typing import Any

from ._peer import UNKNOWN, Peer
from ._prometheus import MetricsRegistry

__all__ = ["ISTIO_LABELS", "IstioMetrics", "service_name_and_namespace"]

ISTIO_LABELS = (
    "reporter",
    "source_workload",
    "source_workload_namespace",
    "source_principal",
    "source_app",
    "source_version",
    "source_canonical_service",
    "source_canonical_revision",
    "source_cluster",
    "destination_workload",
    "destination_workload_namespace",
    "destination_principal",
    "destination_app",
    "destination_version",
    "destination_service",
    "destination_service_name",
    "destination_service_namespace",
    "destination_canonical_service",
    "destination_canonical_revision",
    "destination_cluster",
    "request_protocol",
    "response_code",
    "grpc_response_status",
    "response_flags",
    "connection_security_policy",
)
# Istio's buckets (the stats filter's defaults).
DURATION_BUCKETS_MS = (
    0.5, 1, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000, 60000, 300000,
    600000, 1800000, 3600000,
)  # fmt: skip
SIZE_BUCKETS_BYTES = tuple(10.0**n for n in range(10))  # 1 B … 1 GB


def service_name_and_namespace(host: str) -> tuple[str, str]:
    name, _, rest = host.partition(".")
    namespace = rest.partition(".")[0] if rest.count(".") >= 1 else UNKNOWN
    return name or UNKNOWN, namespace or UNKNOWN


class _Series:
    """One label set's counts, for all four metrics at once."""

    __slots__ = (
        "attributes",
        "count",
        "durations",
        "labels",
        "request_sizes",
        "response_sizes",
        "sums",
    )

    def __init__(self, labels: tuple[str, ...]) -> None:
        self.labels = labels
        self.attributes = dict(zip(ISTIO_LABELS, labels, strict=True))
        self.count = 0
        self.durations = [0] * (len(DURATION_BUCKETS_MS) + 1)
        self.request_sizes = [0] * (len(SIZE_BUCKETS_BYTES) + 1)
        self.response_sizes = [0] * (len(SIZE_BUCKETS_BYTES) + 1)
        self.sums = [0.0, 0.0, 0.0]  # duration, request bytes, response bytes


class IstioMetrics:
    """``istio_requests_total``, ``istio_request_duration_milliseconds``,
    ``istio_request_bytes`` and ``istio_response_bytes``.

    A request updates one series (all four metrics) under one lock; the registered metrics
    are filled from the series when they are rendered."""

    def __init__(self, registry: MetricsRegistry) -> None:
        self.requests = registry.counter("istio_requests_total", "Total requests.", ISTIO_LABELS)
        self.duration = registry.histogram(
            "istio_request_duration_milliseconds",
            "Request duration in milliseconds.",
            ISTIO_LABELS,
            buckets=DURATION_BUCKETS_MS,
        )
        self.request_bytes = registry.histogram(
            "istio_request_bytes",
            "Request size in bytes.",
            ISTIO_LABELS,
            buckets=SIZE_BUCKETS_BYTES,
        )
        self.response_bytes = registry.histogram(
            "istio_response_bytes",
            "Response size in bytes.",
            ISTIO_LABELS,
            buckets=SIZE_BUCKETS_BYTES,
        )
        # Per (peers, service, outcome): a service sees few distinct ones.
        self._series: dict[tuple[object, ...], _Series] = {}
        self._lock = threading.Lock()
        self._otel: tuple[Any, Any, Any, Any] | None = None
        registry.on_render(self._publish)

    def export_to(self, meter: Any) -> None:
        """Also record the four metrics through OpenTelemetry's metrics API with ``meter``
        (an ``opentelemetry.metrics.Meter``), under Istio's names, attributes and buckets, for
        applications that ship metrics with OpenTelemetry rather than scraping ``/metrics``."""
        self._otel = (
            meter.create_counter("istio_requests_total", unit="1", description="Total requests."),
            meter.create_histogram(
                "istio_request_duration_milliseconds",
                unit="ms",
                description="Request duration in milliseconds.",
                explicit_bucket_boundaries_advisory=list(DURATION_BUCKETS_MS),
            ),
            meter.create_histogram(
                "istio_request_bytes",
                unit="By",
                description="Request size in bytes.",
                explicit_bucket_boundaries_advisory=list(SIZE_BUCKETS_BYTES),
            ),
            meter.create_histogram(
                "istio_response_bytes",
                unit="By",
                description="Response size in bytes.",
                explicit_bucket_boundaries_advisory=list(SIZE_BUCKETS_BYTES),
            ),
        )

    def observe(
        self,
        reporter: str,
        source: Peer,
        destination: Peer,
        destination_service: str,
        protocol: str,
        response_code: int,
        grpc_status: str,
        response_flags: str,
        security_policy: str,
        duration_ms: float,
        request_bytes: int,
        response_bytes: int,
    ) -> None:
        """One request's outcome (the hot path)."""
        identity = (
            reporter, source, destination, destination_service, protocol, response_code,
            grpc_status, response_flags, security_policy,
        )  # fmt: skip
        series = self._series.get(identity)
        if series is None:
            series = _Series(_label_values(*identity))
            with self._lock:
                if len(self._series) > 10_000:  # a bound, whatever the callers send
                    self._series.clear()
                series = self._series.setdefault(identity, series)
        duration_at = bisect.bisect_left(DURATION_BUCKETS_MS, duration_ms)
        request_at = bisect.bisect_left(SIZE_BUCKETS_BYTES, request_bytes)
        response_at = bisect.bisect_left(SIZE_BUCKETS_BYTES, response_bytes)
        with self._lock:
            series.count += 1
            series.durations[duration_at] += 1
            series.request_sizes[request_at] += 1
            series.response_sizes[response_at] += 1
            sums = series.sums
            sums[0] += duration_ms
            sums[1] += request_bytes
            sums[2] += response_bytes
        otel = self._otel
        if otel is not None:
            attributes = series.attributes
            otel[0].add(1, attributes)
            otel[1].record(duration_ms, attributes)
            otel[2].record(request_bytes, attributes)
            otel[3].record(response_bytes, attributes)

    def _publish(self) -> None:
        """Copy the series into the registered metrics, for rendering."""
        with self._lock:
            snapshot = [
                (s.labels, s.count, list(s.durations), list(s.request_sizes),
                 list(s.response_sizes), list(s.sums))
                for s in self._series.values()
            ]  # fmt: skip
        self.requests.replace({labels: float(count) for labels, count, *_ in snapshot})
        self.duration.replace({labels: (d, [sums[0]]) for labels, _, d, _, _, sums in snapshot})
        self.request_bytes.replace(
            {labels: (q, [sums[1]]) for labels, _, _, q, _, sums in snapshot}
        )
        self.response_bytes.replace(
            {labels: (r, [sums[2]]) for labels, _, _, _, r, sums in snapshot}
        )


def _label_values(
    reporter: str,
    s: Peer,
    d: Peer,
    destination_service: str,
    protocol: str,
    response_code: int,
    grpc_status: str,
    response_flags: str,
    security_policy: str,
) -> tuple[str, ...]:
    service_name, service_namespace = service_name_and_namespace(destination_service)
    return (
        reporter,
        s.workload, s.namespace, s.principal, s.app, s.version,
        s.canonical_service, s.canonical_revision, s.cluster,
        d.workload, d.namespace, d.principal, d.app, d.version,
        destination_service or UNKNOWN, service_name, service_namespace,
        d.canonical_service, d.canonical_revision, d.cluster,
        protocol,
        str(response_code),
        grpc_status,
        response_flags or "-",
        security_policy,
    )  # fmt: skip
