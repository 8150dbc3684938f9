"""Retry decisions, as Envoy's router makes them from a RouteAction's RetryPolicy.

The policy is immutable and shared; what one call has tried lives in the call (see
``_engine.Call``), so one policy can serve every concurrent request safely.
"""

from __future__ import annotations

import enum
import random
from collections.abc import Mapping
from dataclasses import dataclass, field

from envoy.config.route.v3 import route_components_pb2 as rc

from ._units import seconds

__all__ = ["Failure", "RetryPolicy"]

DEFAULT_BASE_INTERVAL = 0.025  # Envoy's default back-off base
GRPC_CONDITIONS = {
    "cancelled": 1,
    "deadline-exceeded": 4,
    "resource-exhausted": 8,
    "internal": 13,
    "unavailable": 14,
}


class Failure(enum.Enum):
    """How an attempt failed before a response, in Envoy's terms."""

    CONNECT_FAILURE = "connect-failure"  # could not connect (refused, unreachable, timeout)
    RESET = "reset"  # the connection broke before response headers
    REFUSED_STREAM = "refused-stream"  # HTTP/2 REFUSED_STREAM: safe to retry anywhere
    TIMEOUT = "per-try-timeout"  # no response within the per-try timeout


@dataclass(frozen=True, slots=True)
class _HeaderMatch:
    name: str
    value: str | None  # None: presence

    def matches(self, headers: Mapping[str, str]) -> bool:
        actual = headers.get(self.name)
        return actual is not None and (self.value is None or actual == self.value)


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    retry_on: frozenset[str]
    num_retries: int
    per_try_timeout: float | None = None
    retriable_status_codes: frozenset[int] = frozenset()
    retriable_headers: tuple[_HeaderMatch, ...] = ()
    base_interval: float = DEFAULT_BASE_INTERVAL
    max_interval: float = DEFAULT_BASE_INTERVAL * 10
    avoid_previous_hosts: bool = False
    host_selection_attempts: int = 1
    # Derived once: whether a gRPC status matters, and whether any status below 500 can be
    # retried (most policies look at 5xx only, so a 2xx needs no further look).
    grpc: bool = field(init=False)
    below_500: bool = field(init=False)

    def __post_init__(self) -> None:
        on = self.retry_on
        object.__setattr__(self, "grpc", any(c in GRPC_CONDITIONS for c in on))
        object.__setattr__(
            self,
            "below_500",
            bool(on & {"retriable-4xx", "retriable-headers", "envoy-ratelimited"})
            or (
                "retriable-status-codes" in on and any(c < 500 for c in self.retriable_status_codes)
            )
            or self.grpc,
        )

    @classmethod
    def of(cls, proto: rc.RetryPolicy) -> RetryPolicy:
        base = (
            seconds(proto.retry_back_off.base_interval)
            if proto.retry_back_off.HasField("base_interval")
            else DEFAULT_BASE_INTERVAL
        )
        maximum = (
            seconds(proto.retry_back_off.max_interval)
            if proto.retry_back_off.HasField("max_interval")
            else base * 10
        )
        headers = []
        for matcher in proto.retriable_headers:
            kind = matcher.WhichOneof("header_match_specifier")
            value = None
            if (
                kind == "string_match"
                and matcher.string_match.WhichOneof("match_pattern") == "exact"
            ):
                value = matcher.string_match.exact
            elif kind == "exact_match":
                value = matcher.exact_match
            headers.append(_HeaderMatch(matcher.name.lower(), value))
        return cls(
            retry_on=frozenset(t.strip() for t in proto.retry_on.split(",") if t.strip()),
            num_retries=proto.num_retries.value if proto.HasField("num_retries") else 1,
            per_try_timeout=seconds(proto.per_try_timeout)
            if proto.HasField("per_try_timeout")
            else None,
            retriable_status_codes=frozenset(proto.retriable_status_codes),
            retriable_headers=tuple(headers),
            base_interval=base,
            max_interval=max(maximum, base),
            avoid_previous_hosts=any(
                p.name == "envoy.retry_host_predicates.previous_hosts"
                for p in proto.retry_host_predicate
            ),
            host_selection_attempts=max(1, proto.host_selection_retry_max_attempts),
        )

    def retries_status(
        self, status: int, headers: Mapping[str, str], grpc_status: int | None = None
    ) -> bool:
        """Whether a response with this status (and headers) is worth another attempt."""
        if status < 500 and not self.below_500:
            return False
        on = self.retry_on
        if headers.get("x-envoy-ratelimited") is not None:
            # An upstream Envoy rate-limited us: only envoy-ratelimited retries that.
            return "envoy-ratelimited" in on
        if "5xx" in on and 500 <= status <= 599:
            return True
        if "gateway-error" in on and status in (502, 503, 504):
            return True
        if "retriable-4xx" in on and status == 409:
            return True
        if "retriable-status-codes" in on and status in self.retriable_status_codes:
            return True
        if "retriable-headers" in on and any(h.matches(headers) for h in self.retriable_headers):
            return True
        if grpc_status is not None:
            return any(GRPC_CONDITIONS.get(c) == grpc_status for c in on)
        return False

    def retries_failure(self, failure: Failure) -> bool:
        """Whether an attempt that got no response is worth another attempt."""
        on = self.retry_on
        if on & {"5xx", "gateway-error", "reset"}:
            # A per-try timeout is a local reset in Envoy: these three retry it.
            return True
        if failure is Failure.CONNECT_FAILURE:
            return bool(on & {"connect-failure", "reset-before-request"})
        if failure is Failure.REFUSED_STREAM:
            return "refused-stream" in on
        return False

    def backoff(self, retry_number: int, rng: random.Random) -> float:
        """Envoy's fully jittered exponential back-off before retry ``retry_number`` (1-based)."""
        ceiling = min(self.base_interval * ((1 << min(retry_number, 30)) - 1), self.max_interval)
        return rng.uniform(0, ceiling)
