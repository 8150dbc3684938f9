"""Istio's standard request metrics, with Istio's names, labels and buckets, so that Istio's
Grafana dashboards and alerts work unchanged on libmesh's ``/metrics``."""

from __future__ import annotations

import threading
from dataclasses import dataclass

from ._peer import UNKNOWN, Peer
from ._prometheus import MetricsRegistry

__all__ = ["ISTIO_LABELS", "IstioMetrics", "RequestRecord"]

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


@dataclass(slots=True)
class RequestRecord:
    """One request as a metric sees it, filled in by whichever side reports it."""

    reporter: str  # "source" (the client's view) or "destination" (the server's)
    source: Peer
    destination: Peer
    destination_service: str  # reviews.shop.svc.cluster.local, or the host for passthrough
    protocol: str = "http"  # "http" or "grpc"
    response_code: int = 0
    grpc_status: str = ""
    response_flags: str = "-"
    security_policy: str = UNKNOWN  # "mutual_tls", "none" (plaintext), or unknown
    duration_ms: float = 0.0
    request_bytes: int = 0
    response_bytes: int = 0


def _service_name_and_namespace(host: str) -> tuple[str, str]:
    name, _, rest = host.partition(".")
    namespace = rest.partition(".")[0] if rest.count(".") >= 1 else UNKNOWN
    return name or UNKNOWN, namespace or UNKNOWN


class IstioMetrics:
    """``istio_requests_total``, ``istio_request_duration_milliseconds``,
    ``istio_request_bytes`` and ``istio_response_bytes``."""

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
        # Label values per (peers, service, outcome): a service sees few distinct ones, so the
        # tuple is built once and looked up after.
        self._keys: dict[tuple[object, ...], tuple[str, ...]] = {}
        self._lock = threading.Lock()

    def record(self, r: RequestRecord) -> None:
        identity = (
            r.reporter, r.source, r.destination, r.destination_service, r.protocol,
            r.response_code, r.grpc_status, r.response_flags, r.security_policy,
        )  # fmt: skip
        values = self._keys.get(identity)
        if values is None:
            values = self._label_values(r)
            with self._lock:
                if len(self._keys) > 10_000:  # a bound, whatever the callers send
                    self._keys.clear()
                self._keys[identity] = values
        self.requests.inc_values(values)
        self.duration.observe_values(values, r.duration_ms)
        self.request_bytes.observe_values(values, r.request_bytes)
        self.response_bytes.observe_values(values, r.response_bytes)

    @staticmethod
    def _label_values(r: RequestRecord) -> tuple[str, ...]:
        s, d = r.source, r.destination
        service_name, service_namespace = _service_name_and_namespace(r.destination_service)
        return (
            r.reporter,
            s.workload, s.namespace, s.principal, s.app, s.version,
            s.canonical_service, s.canonical_revision, s.cluster,
            d.workload, d.namespace, d.principal, d.app, d.version,
            r.destination_service or UNKNOWN, service_name, service_namespace,
            d.canonical_service, d.canonical_revision, d.cluster,
            r.protocol,
            str(r.response_code),
            r.grpc_status or "-",
            r.response_flags or "-",
            r.security_policy,
        )  # fmt: skip
