"""Telemetry: Istio's request metrics, OpenTelemetry tracing with W3C and B3 propagation,
and access logs — recorded the same way for every client and server integration."""

from ._access_log import DEFAULT_FIELDS, AccessLog
from ._istio import ISTIO_LABELS, IstioMetrics
from ._peer import Peer, workload_name
from ._prometheus import Counter, Gauge, Histogram, MetricsRegistry
from ._telemetry import ClientCall, Inbound, InboundRequest, Telemetry, current_inbound
from ._tracing import Propagation

__all__ = [
    "DEFAULT_FIELDS",
    "ISTIO_LABELS",
    "AccessLog",
    "ClientCall",
    "Counter",
    "Gauge",
    "Histogram",
    "Inbound",
    "InboundRequest",
    "IstioMetrics",
    "MetricsRegistry",
    "Peer",
    "Propagation",
    "Telemetry",
    "current_inbound",
    "workload_name",
]
