"""Outlier detection, with Envoy's semantics, evaluated lazily: no timer thread.

Every mode Envoy has: consecutive 5xx, consecutive gateway errors, consecutive local-origin
failures (when they are split from upstream errors), success rate (hosts far below the cluster's
mean) and failure percentage. An ejected host stays out for ``base_ejection_time`` times its
ejection count (capped by ``max_ejection_time``), and no ejection may push the ejected share of
hosts above ``max_ejection_percent``. Interval work (success-rate statistics, returning hosts)
runs on the first report or pick after each interval has passed, so a quiet process does nothing.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from envoy.config.cluster.v3 import outlier_detection_pb2

from ._units import seconds

__all__ = ["Availability", "EjectionReason", "HostMonitor", "OutlierConfig", "OutlierDetector"]


class EjectionReason:
    CONSECUTIVE_5XX = "consecutive_5xx"
    CONSECUTIVE_GATEWAY_FAILURE = "consecutive_gateway_failure"
    CONSECUTIVE_LOCAL_ORIGIN_FAILURE = "consecutive_local_origin_failure"
    SUCCESS_RATE = "success_rate"
    SUCCESS_RATE_LOCAL_ORIGIN = "success_rate_local_origin"
    FAILURE_PERCENTAGE = "failure_percentage"
    FAILURE_PERCENTAGE_LOCAL_ORIGIN = "failure_percentage_local_origin"


def _wrapped(proto: object, name: str, default: int) -> int:
    return getattr(proto, name).value if proto.HasField(name) else default  # type: ignore[attr-defined]


@dataclass(frozen=True, slots=True)
class OutlierConfig:
    """``envoy.config.cluster.v3.OutlierDetection`` with Envoy's defaults filled in."""

    interval: float = 10.0
    base_ejection_time: float = 30.0
    max_ejection_time: float = 300.0
    max_ejection_time_jitter: float = 0.0
    max_ejection_percent: int = 10
    consecutive_5xx: int = 5
    enforcing_consecutive_5xx: int = 100
    consecutive_gateway_failure: int = 5
    enforcing_consecutive_gateway_failure: int = 0
    split_external_local_origin_errors: bool = False
    consecutive_local_origin_failure: int = 5
    enforcing_consecutive_local_origin_failure: int = 100
    enforcing_success_rate: int = 100
    enforcing_local_origin_success_rate: int = 100
    success_rate_minimum_hosts: int = 5
    success_rate_request_volume: int = 100
    success_rate_stdev_factor: int = 1900
    enforcing_failure_percentage: int = 0
    enforcing_failure_percentage_local_origin: int = 0
    failure_percentage_threshold: int = 85
    failure_percentage_minimum_hosts: int = 5
    failure_percentage_request_volume: int = 50
    always_eject_one_host: bool = False
    error_codes: frozenset[int] = frozenset()  # extra HTTP codes counted as errors

    @classmethod
    def of(
        cls, proto: outlier_detection_pb2.OutlierDetection, error_codes: Iterable[int] = ()
    ) -> OutlierConfig:
        base = seconds(proto.base_ejection_time) if proto.HasField("base_ejection_time") else 30.0
        return cls(
            interval=seconds(proto.interval) if proto.HasField("interval") else 10.0,
            base_ejection_time=base,
            max_ejection_time=seconds(proto.max_ejection_time)
            if proto.HasField("max_ejection_time")
            else max(300.0, base),
            max_ejection_time_jitter=seconds(proto.max_ejection_time_jitter)
            if proto.HasField("max_ejection_time_jitter")
            else 0.0,
            max_ejection_percent=min(100, _wrapped(proto, "max_ejection_percent", 10)),
            consecutive_5xx=_wrapped(proto, "consecutive_5xx", 5),
            enforcing_consecutive_5xx=_wrapped(proto, "enforcing_consecutive_5xx", 100),
            consecutive_gateway_failure=_wrapped(proto, "consecutive_gateway_failure", 5),
            enforcing_consecutive_gateway_failure=_wrapped(
                proto, "enforcing_consecutive_gateway_failure", 0
            ),
            split_external_local_origin_errors=proto.split_external_local_origin_errors,
            consecutive_local_origin_failure=_wrapped(proto, "consecutive_local_origin_failure", 5),
            enforcing_consecutive_local_origin_failure=_wrapped(
                proto, "enforcing_consecutive_local_origin_failure", 100
            ),
            enforcing_success_rate=_wrapped(proto, "enforcing_success_rate", 100),
            enforcing_local_origin_success_rate=_wrapped(
                proto, "enforcing_local_origin_success_rate", 100
            ),
            success_rate_minimum_hosts=_wrapped(proto, "success_rate_minimum_hosts", 5),
            success_rate_request_volume=_wrapped(proto, "success_rate_request_volume", 100),
            success_rate_stdev_factor=_wrapped(proto, "success_rate_stdev_factor", 1900),
            enforcing_failure_percentage=_wrapped(proto, "enforcing_failure_percentage", 0),
            enforcing_failure_percentage_local_origin=_wrapped(
                proto, "enforcing_failure_percentage_local_origin", 0
            ),
            failure_percentage_threshold=_wrapped(proto, "failure_percentage_threshold", 85),
            failure_percentage_minimum_hosts=_wrapped(proto, "failure_percentage_minimum_hosts", 5),
            failure_percentage_request_volume=_wrapped(
                proto, "failure_percentage_request_volume", 50
            ),
            always_eject_one_host=_wrapped(proto, "always_eject_one_host", 0) != 0
            if proto.HasField("always_eject_one_host")
            else False,
            error_codes=frozenset(error_codes),
        )


class _Window:
    """Success-rate counters: the interval being written, and the last complete one."""

    __slots__ = ("previous_success", "previous_total", "success", "total")

    def __init__(self) -> None:
        self.success = self.total = 0
        self.previous_success = self.previous_total = 0

    def record(self, ok: bool) -> None:
        self.total += 1
        if ok:
            self.success += 1

    def roll(self) -> None:
        self.previous_success, self.previous_total = self.success, self.total
        self.success = self.total = 0

    def rate(self) -> tuple[float, int] | None:
        if not self.previous_total:
            return None
        return self.previous_success * 100.0 / self.previous_total, self.previous_total


class Availability:
    """A process-wide count of availability changes: balancers cache which hosts are usable
    and recompute when it moves, however a host was ejected, returned or marked unhealthy."""

    epoch = 0

    @classmethod
    def changed(cls) -> None:
        cls.epoch += 1


class HostMonitor:
    """One host's outlier state."""

    __slots__ = (
        "_ejected",
        "consecutive_5xx",
        "consecutive_gateway",
        "consecutive_local",
        "ejected_at",
        "ejections",
        "external",
        "jitter",
        "local",
        "multiplier",
        "unejected_at",
    )

    def __init__(self) -> None:
        self.consecutive_5xx = 0
        self.consecutive_gateway = 0
        self.consecutive_local = 0
        self._ejected = False
        self.ejected_at = 0.0
        self.unejected_at: float | None = None
        self.ejections = 0  # lifetime count
        self.multiplier = 0  # Envoy's ejection time back-off
        self.jitter = 0.0
        self.external = _Window()
        self.local = _Window()

    @property
    def ejected(self) -> bool:
        return self._ejected

    @ejected.setter
    def ejected(self, value: bool) -> None:
        self._ejected = value
        Availability.changed()

    def reset_consecutive(self) -> None:
        self.consecutive_5xx = self.consecutive_gateway = self.consecutive_local = 0


EjectCallback = Callable[[object, str, bool], None]

# Intervals to catch up on after a quiet spell; more would change nothing (multipliers are
# small, and windows empty after two intervals).
_CATCH_UP = 64


class OutlierDetector:
    """The outlier detector of one cluster. Hosts are any hashable objects with a ``monitor``
    attribute holding a :class:`HostMonitor`."""

    def __init__(
        self,
        config: OutlierConfig,
        clock: Callable[[], float],
        rng: random.Random,
        on_change: EjectCallback | None = None,
    ) -> None:
        self.config = config
        self._clock = clock
        self._rng = rng
        self._hosts: list[object] = []
        self._ejected = 0
        self._next_interval = clock() + config.interval
        self._on_change = on_change

    @property
    def next_interval(self) -> float:
        """When the interval work is next due (a cheap check before :meth:`tick`)."""
        return self._next_interval

    @property
    def ejected_count(self) -> int:
        return self._ejected

    def set_hosts(self, hosts: list[object]) -> None:
        self._hosts = hosts
        self._ejected = sum(1 for h in hosts if _monitor(h).ejected)

    # reports ----------------------------------------------------------------------------------

    def report_status(self, host: object, status: int) -> None:
        """An upstream response (or, unsplit, a local failure mapped to 503/504)."""
        if self._clock() >= self._next_interval:
            self.tick()
        m = _monitor(host)
        window = m.external
        window.total += 1
        if status < 500 and status not in self.config.error_codes:
            window.success += 1
            m.consecutive_5xx = m.consecutive_gateway = 0
            return
        if status in (502, 503, 504):
            m.consecutive_gateway += 1
            if m.consecutive_gateway == self.config.consecutive_gateway_failure:
                self._consecutive(host, EjectionReason.CONSECUTIVE_GATEWAY_FAILURE)
        else:
            m.consecutive_gateway = 0
        m.consecutive_5xx += 1
        if m.consecutive_5xx == self.config.consecutive_5xx:
            self._consecutive(host, EjectionReason.CONSECUTIVE_5XX)

    def report_local_failure(self, host: object, *, timeout: bool) -> None:
        """A failure that happened here: could not connect, reset, or timed out."""
        if not self.config.split_external_local_origin_errors:
            self.report_status(host, 504 if timeout else 503)
            return
        self.tick()
        m = _monitor(host)
        m.local.record(False)
        m.consecutive_local += 1
        if m.consecutive_local == self.config.consecutive_local_origin_failure:
            self._consecutive(host, EjectionReason.CONSECUTIVE_LOCAL_ORIGIN_FAILURE)

    def report_local_success(self, host: object) -> None:
        """The connection worked (only counted when local-origin errors are split)."""
        if not self.config.split_external_local_origin_errors:
            return
        m = _monitor(host)
        m.local.record(True)
        m.consecutive_local = 0

    # ejection ---------------------------------------------------------------------------------

    def _enforced(self, reason: str) -> bool:
        c = self.config
        r = EjectionReason
        percent = {
            r.CONSECUTIVE_5XX: c.enforcing_consecutive_5xx,
            r.CONSECUTIVE_GATEWAY_FAILURE: c.enforcing_consecutive_gateway_failure,
            r.CONSECUTIVE_LOCAL_ORIGIN_FAILURE: c.enforcing_consecutive_local_origin_failure,
            r.SUCCESS_RATE: c.enforcing_success_rate,
            r.SUCCESS_RATE_LOCAL_ORIGIN: c.enforcing_local_origin_success_rate,
            r.FAILURE_PERCENTAGE: c.enforcing_failure_percentage,
            r.FAILURE_PERCENTAGE_LOCAL_ORIGIN: c.enforcing_failure_percentage_local_origin,
        }[reason]
        return percent >= 100 or (percent > 0 and self._rng.random() * 100 < percent)

    def _consecutive(self, host: object, reason: str) -> None:
        m = _monitor(host)
        if not m.ejected:
            self._eject(host, reason)
        if reason == EjectionReason.CONSECUTIVE_5XX:
            m.consecutive_5xx = 0
        elif reason == EjectionReason.CONSECUTIVE_GATEWAY_FAILURE:
            m.consecutive_gateway = 0
        else:
            m.consecutive_local = 0

    def _eject(self, host: object, reason: str) -> None:
        if not self._hosts:
            return
        percent = 100.0 * (self._ejected + 1) / len(self._hosts)
        allowed = percent <= self.config.max_ejection_percent or (
            self.config.always_eject_one_host and self._ejected == 0
        )
        if not allowed or not self._enforced(reason):
            return
        m = _monitor(host)
        now = self._clock()
        m.ejected = True
        m.ejected_at = now
        m.ejections += 1
        jitter_ms = int(self.config.max_ejection_time_jitter * 1000)
        m.jitter = self._rng.randint(0, jitter_ms) / 1000 if jitter_ms else 0.0
        base, cap = self.config.base_ejection_time, self.config.max_ejection_time
        if m.multiplier * base < cap + base:
            m.multiplier += 1
        self._ejected += 1
        if self._on_change is not None:
            self._on_change(host, reason, True)

    def _uneject(self, host: object, at: float) -> None:
        m = _monitor(host)
        m.ejected = False
        m.unejected_at = at
        m.reset_consecutive()
        self._ejected -= 1
        if self._on_change is not None:
            self._on_change(host, "", False)

    def ejection_time(self, host: object) -> float:
        m = _monitor(host)
        c = self.config
        return min(c.base_ejection_time * max(m.multiplier, 1), c.max_ejection_time) + m.jitter

    # the interval -----------------------------------------------------------------------------

    def tick(self) -> None:
        """Run the interval work for every interval that has passed since it last ran.

        Envoy runs it on a timer; here it runs on the next report or pick, catching up on
        the intervals a quiet spell skipped (each one returns hosts and decays multipliers).
        """
        now = self._clock()
        if now < self._next_interval:
            return
        interval = self.config.interval
        missed = int((now - self._next_interval) // interval) + 1
        first = self._next_interval + max(0, missed - _CATCH_UP) * interval
        self._next_interval += missed * interval
        for i in range(min(missed, _CATCH_UP)):
            self._interval(first + i * interval, statistics=i == min(missed, _CATCH_UP) - 1)

    def _interval(self, at: float, *, statistics: bool) -> None:
        for host in self._hosts:
            m = _monitor(host)
            if m.ejected and at - m.ejected_at >= self.ejection_time(host):
                self._uneject(host, at)
            m.external.roll()
            m.local.roll()
        if statistics:
            self._statistical_ejections(external=True)
            if self.config.split_external_local_origin_errors:
                self._statistical_ejections(external=False)
        for host in self._hosts:
            m = _monitor(host)
            if (
                not m.ejected
                and m.unejected_at is not None
                and at - m.unejected_at >= self.config.interval
                and m.multiplier > 0
            ):
                m.multiplier -= 1

    def _statistical_ejections(self, *, external: bool) -> None:
        c = self.config
        if len(self._hosts) < c.success_rate_minimum_hosts and (
            len(self._hosts) < c.failure_percentage_minimum_hosts
        ):
            return
        rates: list[tuple[object, float]] = []
        failure_candidates: list[tuple[object, float]] = []
        for host in self._hosts:
            m = _monitor(host)
            if m.ejected:
                continue
            measured = (m.external if external else m.local).rate()
            if measured is None:
                continue
            rate, volume = measured
            if volume >= c.success_rate_request_volume:
                rates.append((host, rate))
            if volume >= c.failure_percentage_request_volume:
                failure_candidates.append((host, rate))
        if rates and len(rates) >= c.success_rate_minimum_hosts:
            mean = sum(r for _, r in rates) / len(rates)
            stdev = math.sqrt(sum((r - mean) ** 2 for _, r in rates) / len(rates))
            threshold = mean - (c.success_rate_stdev_factor / 1000.0) * stdev
            reason = (
                EjectionReason.SUCCESS_RATE
                if external
                else EjectionReason.SUCCESS_RATE_LOCAL_ORIGIN
            )
            for host, rate in rates:
                if rate < threshold and not _monitor(host).ejected:
                    self._eject(host, reason)
        if failure_candidates and len(failure_candidates) >= c.failure_percentage_minimum_hosts:
            reason = (
                EjectionReason.FAILURE_PERCENTAGE
                if external
                else EjectionReason.FAILURE_PERCENTAGE_LOCAL_ORIGIN
            )
            for host, rate in failure_candidates:
                if 100.0 - rate >= c.failure_percentage_threshold and not _monitor(host).ejected:
                    self._eject(host, reason)


def _monitor(host: object) -> HostMonitor:
    return host.monitor  # type: ignore[attr-defined, no-any-return]
