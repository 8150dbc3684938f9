"""Protobuf value types, as the engine uses them."""

from __future__ import annotations

from envoy.type.v3 import percent_pb2
from google.protobuf import duration_pb2

__all__ = ["fraction", "seconds"]

_DENOMINATORS = {
    percent_pb2.FractionalPercent.HUNDRED: 100,
    percent_pb2.FractionalPercent.TEN_THOUSAND: 10_000,
    percent_pb2.FractionalPercent.MILLION: 1_000_000,
}


def seconds(duration: duration_pb2.Duration) -> float:
    return float(duration.seconds) + duration.nanos / 1e9


def fraction(percent: percent_pb2.FractionalPercent) -> float:
    """A FractionalPercent as a probability in [0, 1]."""
    return min(1.0, float(percent.numerator) / _DENOMINATORS.get(percent.denominator, 100))
