"""Outlier detection as a user of the mesh sees it: which upstream hosts get ejected, why, and
when they come back, with Envoy's semantics (source/common/upstream/outlier_detection_impl.cc).

Time is a fake clock; randomness a seeded ``random.Random``. Each test advances the clock and
runs the interval work as Envoy's interval timer would.
"""

from __future__ import annotations

import random
from dataclasses import replace
from typing import Any

import pytest
from envoy.config.cluster.v3 import outlier_detection_pb2
from google.protobuf import duration_pb2, wrappers_pb2

from libmesh.policy import EjectionReason, Host, OutlierConfig, OutlierDetector


class FakeClock:
    def __init__(self, now: float = 0.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class Mesh:
    """A cluster of ``size`` hosts watched by one detector, and what it reported."""

    def __init__(self, size: int = 10, seed: int = 7, **config: Any) -> None:
        self.clock = FakeClock()
        self.hosts = [Host(f"10.0.0.{i}", 8080) for i in range(size)]
        self.events: list[tuple[str, str, bool]] = []
        self.detector = OutlierDetector(
            replace(OutlierConfig(), **config), self.clock, random.Random(seed), self._record
        )
        self.detector.set_hosts(list(self.hosts))

    def _record(self, host: object, reason: str, ejected: bool) -> None:
        assert isinstance(host, Host)
        self.events.append((host.address, reason, ejected))

    def respond(self, host: Host, *statuses: int) -> None:
        for status in statuses:
            self.detector.report_status(host, status)

    def wait(self, seconds: float) -> None:
        """Let time pass one second at a time, running the interval timer when it is due."""
        end = self.clock.now + seconds
        while self.clock.now < end:
            self.clock.now = min(end, self.clock.now + 1.0)
            self.detector.tick()

    def ejected(self) -> list[str]:
        return [h.address for h in self.hosts if not h.available]

    def reasons(self) -> list[str]:
        return [reason for _, reason, ejected in self.events if ejected]


# consecutive errors -----------------------------------------------------------------------------


def test_five_consecutive_5xx_eject_a_host_by_default() -> None:
    mesh = Mesh()
    first = mesh.hosts[0]
    mesh.respond(first, 500, 503, 500, 502)
    assert mesh.ejected() == []
    mesh.respond(first, 500)
    assert mesh.ejected() == ["10.0.0.0"]
    assert mesh.reasons() == [EjectionReason.CONSECUTIVE_5XX]
    assert not first.available


def test_a_success_between_errors_starts_the_count_again() -> None:
    mesh = Mesh()
    mesh.respond(mesh.hosts[0], 500, 500, 500, 500, 200, 500, 500, 500, 500)
    assert mesh.ejected() == []


def test_client_errors_are_not_upstream_failures() -> None:
    mesh = Mesh()
    mesh.respond(mesh.hosts[0], 404, 429, 400, 403, 409, 404, 404)
    assert mesh.ejected() == []


@pytest.mark.parametrize("status", [502, 503, 504])
def test_consecutive_gateway_errors_eject_when_enforced(status: int) -> None:
    mesh = Mesh(consecutive_5xx=100, enforcing_consecutive_gateway_failure=100)
    mesh.respond(mesh.hosts[0], *[status] * 5)
    assert mesh.ejected() == ["10.0.0.0"]
    assert mesh.reasons() == [EjectionReason.CONSECUTIVE_GATEWAY_FAILURE]


def test_gateway_errors_do_not_eject_by_default_because_envoy_does_not_enforce_them() -> None:
    mesh = Mesh(consecutive_5xx=100)
    mesh.respond(mesh.hosts[0], *[503] * 20)
    assert mesh.ejected() == []


def test_a_plain_500_is_not_a_gateway_error_and_breaks_the_streak() -> None:
    mesh = Mesh(consecutive_5xx=100, enforcing_consecutive_gateway_failure=100)
    mesh.respond(mesh.hosts[0], *[500] * 10)
    mesh.respond(mesh.hosts[1], 502, 503, 504, 504, 500, 502, 503, 504, 504)
    assert mesh.ejected() == []


def test_configured_error_codes_count_as_errors() -> None:
    plain, custom = Mesh(), Mesh(error_codes=frozenset({429}))
    for mesh in (plain, custom):
        mesh.respond(mesh.hosts[0], *[429] * 5)
    assert plain.ejected() == []
    assert custom.ejected() == ["10.0.0.0"]


# local-origin failures --------------------------------------------------------------------------


def test_unsplit_connect_failures_count_as_503s() -> None:
    mesh = Mesh(consecutive_5xx=3)
    for _ in range(3):
        mesh.detector.report_local_failure(mesh.hosts[0], timeout=False)
    assert mesh.ejected() == ["10.0.0.0"]
    assert mesh.reasons() == [EjectionReason.CONSECUTIVE_5XX]


def test_unsplit_timeouts_count_as_504_gateway_errors() -> None:
    mesh = Mesh(
        consecutive_5xx=100,
        consecutive_gateway_failure=3,
        enforcing_consecutive_gateway_failure=100,
    )
    for _ in range(3):
        mesh.detector.report_local_failure(mesh.hosts[0], timeout=True)
    assert mesh.reasons() == [EjectionReason.CONSECUTIVE_GATEWAY_FAILURE]


def test_unsplit_a_working_connection_alone_does_not_reset_the_5xx_streak() -> None:
    mesh = Mesh(consecutive_5xx=3)
    host = mesh.hosts[0]
    mesh.respond(host, 503, 503)
    mesh.detector.report_local_success(host)
    mesh.respond(host, 503)
    assert mesh.ejected() == ["10.0.0.0"]


def test_split_local_failures_have_their_own_count() -> None:
    mesh = Mesh(
        split_external_local_origin_errors=True,
        consecutive_5xx=3,
        consecutive_local_origin_failure=3,
    )
    host = mesh.hosts[0]
    mesh.respond(host, 503, 503)
    mesh.detector.report_local_failure(host, timeout=False)
    mesh.detector.report_local_failure(host, timeout=True)
    assert mesh.ejected() == []
    mesh.detector.report_local_failure(host, timeout=False)
    assert mesh.reasons() == [EjectionReason.CONSECUTIVE_LOCAL_ORIGIN_FAILURE]


def test_split_local_failures_do_not_feed_the_5xx_count() -> None:
    mesh = Mesh(
        split_external_local_origin_errors=True,
        consecutive_5xx=3,
        consecutive_local_origin_failure=9,
    )
    host = mesh.hosts[0]
    for _ in range(5):
        mesh.detector.report_local_failure(host, timeout=False)
    mesh.respond(host, 503, 503)
    assert mesh.ejected() == []
    mesh.respond(host, 503)
    assert mesh.reasons() == [EjectionReason.CONSECUTIVE_5XX]


def test_split_a_successful_connection_resets_the_local_count() -> None:
    mesh = Mesh(split_external_local_origin_errors=True, consecutive_local_origin_failure=3)
    host = mesh.hosts[0]
    for _ in range(2):
        mesh.detector.report_local_failure(host, timeout=False)
    mesh.detector.report_local_success(host)
    for _ in range(2):
        mesh.detector.report_local_failure(host, timeout=False)
    assert mesh.ejected() == []


# statistical ejection ---------------------------------------------------------------------------


def serve(mesh: Mesh, host: Host, requests: int, failures: int) -> None:
    mesh.respond(host, *[503] * failures, *[200] * (requests - failures))


def test_success_rate_ejects_a_host_below_mean_minus_stdev_factor_times_stdev() -> None:
    # Envoy's own example: rates {50, 100, 100, 100, 100} give mean 90, stdev 20, threshold 52.
    mesh = Mesh(size=5, max_ejection_percent=20, consecutive_5xx=1000)
    for index, host in enumerate(mesh.hosts):
        serve(mesh, host, 100, failures=50 if index == 0 else 0)
    assert mesh.ejected() == []  # success rate is judged when the interval ends
    mesh.wait(10)
    assert mesh.ejected() == ["10.0.0.0"]
    assert mesh.reasons() == [EjectionReason.SUCCESS_RATE]


def test_a_larger_stdev_factor_tolerates_the_same_host() -> None:
    # One host at 100 - d among four at 100: threshold = 100 - d * (0.2 + 0.4 * factor).
    mesh = Mesh(
        size=5, max_ejection_percent=20, consecutive_5xx=1000, success_rate_stdev_factor=3000
    )
    for index, host in enumerate(mesh.hosts):
        serve(mesh, host, 100, failures=50 if index == 0 else 0)
    mesh.wait(10)
    assert mesh.ejected() == []


def test_success_rate_needs_enough_hosts_with_enough_requests() -> None:
    mesh = Mesh(size=5, max_ejection_percent=20, consecutive_5xx=1000)
    for index, host in enumerate(mesh.hosts):
        requests = 99 if index == 4 else 100  # only four hosts reach the request volume
        serve(mesh, host, requests, failures=50 if index == 0 else 0)
    mesh.wait(10)
    assert mesh.ejected() == []


def test_success_rate_looks_at_the_last_complete_interval_only() -> None:
    mesh = Mesh(size=5, max_ejection_percent=20, consecutive_5xx=1000)
    for index, host in enumerate(mesh.hosts):
        serve(mesh, host, 100, failures=50 if index == 0 else 0)
    mesh.wait(10)
    assert mesh.ejected() == ["10.0.0.0"]
    mesh.wait(30)  # back after 30s; the bad interval is long gone
    for host in mesh.hosts:
        serve(mesh, host, 100, failures=0)
    mesh.wait(10)
    assert mesh.ejected() == []


def test_failure_percentage_ejects_hosts_at_or_above_the_threshold_when_enforced() -> None:
    mesh = Mesh(
        size=5,
        max_ejection_percent=100,
        consecutive_5xx=1000,
        enforcing_success_rate=0,
        enforcing_failure_percentage=100,
    )
    for host, failures in zip(mesh.hosts, [50, 43, 42, 0, 0], strict=True):
        serve(mesh, host, 50, failures)  # 100%, 86%, 84% failing
    mesh.wait(10)
    assert mesh.ejected() == ["10.0.0.0", "10.0.0.1"]
    assert set(mesh.reasons()) == {EjectionReason.FAILURE_PERCENTAGE}


def test_failure_percentage_is_off_by_default() -> None:
    mesh = Mesh(size=5, max_ejection_percent=100, consecutive_5xx=1000, enforcing_success_rate=0)
    for host in mesh.hosts:
        serve(mesh, host, 50, failures=50)
    mesh.wait(10)
    assert mesh.ejected() == []


# how many may be ejected ------------------------------------------------------------------------


def test_max_ejection_percent_caps_how_many_hosts_are_out() -> None:
    mesh = Mesh(size=10, max_ejection_percent=20)
    for host in mesh.hosts[:4]:
        mesh.respond(host, *[500] * 5)
    assert mesh.ejected() == ["10.0.0.0", "10.0.0.1"]


def test_with_ten_percent_and_three_hosts_nothing_is_ejected() -> None:
    # Envoy ejects only while 100 * (ejected + 1) / hosts <= max_ejection_percent.
    mesh = Mesh(size=3)
    mesh.respond(mesh.hosts[0], *[500] * 50)
    assert mesh.ejected() == []


def test_always_eject_one_host_overrides_the_percentage_for_the_first_host() -> None:
    mesh = Mesh(size=3, always_eject_one_host=True)
    for host in mesh.hosts:
        mesh.respond(host, *[500] * 5)
    assert mesh.ejected() == ["10.0.0.0"]


# how long hosts stay out ------------------------------------------------------------------------


def test_an_ejected_host_returns_on_the_first_interval_after_its_ejection_time() -> None:
    mesh = Mesh(interval=10, base_ejection_time=30)
    mesh.wait(1)
    mesh.respond(mesh.hosts[0], *[500] * 5)
    mesh.wait(38)  # t=39: the timer ran at 10, 20, 30 (only 29s out)
    assert mesh.ejected() == ["10.0.0.0"]
    mesh.wait(1)  # t=40
    assert mesh.ejected() == []
    assert mesh.hosts[0].available
    assert mesh.events[-1] == ("10.0.0.0", "", False)


def test_errors_while_ejected_do_not_count_once_the_host_is_back() -> None:
    mesh = Mesh(interval=10, base_ejection_time=10)
    host = mesh.hosts[0]
    mesh.respond(host, *[500] * 5)
    mesh.respond(host, 500, 500, 500)  # in-flight requests that failed while it was out
    mesh.wait(10)
    mesh.respond(host, 500, 500, 500, 500)
    assert host.available


def test_ejection_time_grows_with_each_ejection_and_is_capped() -> None:
    mesh = Mesh(interval=5, base_ejection_time=10, max_ejection_time=25)
    host = mesh.hosts[0]
    times = []
    for _ in range(4):
        mesh.respond(host, *[500] * 5)
        times.append(mesh.detector.ejection_time(host))
        while not host.available:  # fail again as soon as it is back: no healthy interval
            mesh.wait(1)
    assert times == [10, 20, 25, 25]


def test_the_multiplier_decays_by_one_per_healthy_interval() -> None:
    mesh = Mesh(interval=5, base_ejection_time=10, max_ejection_time=100)
    host = mesh.hosts[0]
    mesh.respond(host, *[500] * 5)
    mesh.wait(10)
    mesh.respond(host, *[500] * 5)
    assert mesh.detector.ejection_time(host) == 20
    mesh.wait(20)  # back at t=30
    mesh.wait(5)  # one healthy interval
    mesh.respond(host, *[500] * 5)
    assert mesh.detector.ejection_time(host) == 20  # 2 -> 1, then 1 -> 2 for this ejection
    mesh.wait(20)
    mesh.wait(10)  # two healthy intervals
    mesh.respond(host, *[500] * 5)
    assert mesh.detector.ejection_time(host) == 10


def test_the_multiplier_decays_for_every_interval_of_an_idle_spell() -> None:
    mesh = Mesh(interval=5, base_ejection_time=10, max_ejection_time=100)
    host = mesh.hosts[0]
    mesh.respond(host, *[500] * 5)
    mesh.wait(10)
    mesh.respond(host, *[500] * 5)
    mesh.wait(20)  # back at t=30 with multiplier 2
    mesh.clock.now += 3600  # an idle hour: nothing reported, nothing picked
    mesh.respond(host, *[500] * 5)
    assert mesh.detector.ejection_time(host) == 10


def test_jitter_adds_up_to_max_ejection_time_jitter() -> None:
    mesh = Mesh(
        size=50, max_ejection_percent=100, base_ejection_time=30, max_ejection_time_jitter=5
    )
    for host in mesh.hosts:
        mesh.respond(host, *[500] * 5)
    times = [mesh.detector.ejection_time(h) for h in mesh.hosts]
    assert all(30 <= t <= 35 for t in times)
    assert len(set(times)) > 10


# enforcement ------------------------------------------------------------------------------------


def test_enforcing_zero_detects_but_never_ejects() -> None:
    mesh = Mesh(enforcing_consecutive_5xx=0)
    mesh.respond(mesh.hosts[0], *[500] * 25)
    assert mesh.ejected() == []


def test_enforcing_percent_ejects_that_share_of_detected_outliers() -> None:
    mesh = Mesh(size=400, max_ejection_percent=100, enforcing_consecutive_5xx=25)
    for host in mesh.hosts:
        mesh.respond(host, *[500] * 5)
    assert 70 <= len(mesh.ejected()) <= 130


# configuration ----------------------------------------------------------------------------------


def test_an_empty_proto_means_envoys_defaults() -> None:
    assert OutlierConfig.of(outlier_detection_pb2.OutlierDetection()) == OutlierConfig()


def test_proto_fields_and_error_codes_are_read() -> None:
    proto = outlier_detection_pb2.OutlierDetection(
        consecutive_5xx=wrappers_pb2.UInt32Value(value=3),
        base_ejection_time=duration_pb2.Duration(seconds=600),
        max_ejection_percent=wrappers_pb2.UInt32Value(value=150),
    )
    config = OutlierConfig.of(proto, error_codes=[429])
    assert (config.consecutive_5xx, config.base_ejection_time) == (3, 600)
    assert config.max_ejection_time == 600  # never below the base ejection time
    assert config.max_ejection_percent == 100
    assert config.error_codes == frozenset({429})
