"""Telemetry: metrics under Istio's names (tracing and access logs join them later)."""

from ._prometheus import Counter, Gauge, Histogram, MetricsRegistry

__all__ = ["Counter", "Gauge", "Histogram", "MetricsRegistry"]
