"""Circuit breaking with Envoy's semantics: request, connection and pending limits that overflow
with a local 503 UO, concurrent-retry limits and retry budgets, per-host limits; and whole calls
driven through the engine as a transport would, from Istio YAML, with a fake clock and a seeded
random generator: retries, back-off, UO/UH local replies, UT on the route deadline.
"""

from __future__ import annotations

import random
from typing import Any

import pytest
import yaml
from envoy.config.cluster.v3 import circuit_breaker_pb2, cluster_pb2
from envoy.config.core.v3 import base_pb2
from google.protobuf import wrappers_pb2

from libmesh.config import Registry, load_text
from libmesh.policy import (
    DELIVER,
    Admission,
    Attempt,
    Backoff,
    Breaker,
    Call,
    ClusterState,
    Engine,
    Fail,
    Failure,
    Host,
    Limits,
    LocalReply,
    RequestInfo,
)
from libmesh.xds import Node, translate


class FakeClock:
    def __init__(self, now: float = 0.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


# the breaker alone ------------------------------------------------------------------------------


def test_requests_beyond_max_requests_overflow_until_one_finishes() -> None:
    breaker, host = Breaker(Limits(max_requests=2)), Host("10.0.0.1", 80)
    assert [breaker.admit(host) for _ in range(3)] == [
        Admission.OK,
        Admission.OK,
        Admission.OVERFLOW,
    ]
    breaker.release(host)
    assert breaker.admit(host) is Admission.OK


def test_http1_requests_wait_for_a_connection_until_the_pending_queue_is_full() -> None:
    breaker, host = Breaker(Limits(max_connections=2, max_pending_requests=1)), Host("a", 80)
    admitted = [breaker.admit(host) for _ in range(4)]
    assert admitted == [Admission.OK] * 3 + [Admission.OVERFLOW]


def test_max_retries_limits_retries_in_progress_across_the_cluster() -> None:
    breaker = Breaker(Limits(max_retries=2))
    assert [breaker.reserve_retry() for _ in range(3)] == [True, True, False]
    breaker.release_retry()
    assert breaker.reserve_retry()


@pytest.mark.parametrize(("calls", "allowed"), [(1, 3), (10, 3), (20, 4), (100, 20)])
def test_a_retry_budget_allows_a_share_of_active_calls_but_never_below_the_minimum(
    calls: int, allowed: int
) -> None:
    breaker = Breaker(Limits(max_retries=0, budget_percent=20.0, min_retry_concurrency=3))
    for _ in range(calls):
        breaker.begin_call()
    granted = 0
    while breaker.reserve_retry():
        granted += 1
    assert granted == allowed


def test_limits_are_read_from_the_clusters_circuit_breakers() -> None:
    cluster = cluster_pb2.Cluster(name="reviews")
    thresholds = cluster.circuit_breakers.thresholds.add()
    thresholds.max_connections.value = 7
    thresholds.max_requests.value = 9
    thresholds.retry_budget.SetInParent()
    cluster.circuit_breakers.per_host_thresholds.append(
        circuit_breaker_pb2.CircuitBreakers.Thresholds(
            max_connections=wrappers_pb2.UInt32Value(value=2)
        )
    )
    limits = Limits.of(cluster)
    assert (limits.max_connections, limits.max_pending_requests, limits.max_requests) == (
        7,
        1024,
        9,
    )
    assert limits.max_retries == 3
    assert (limits.budget_percent, limits.min_retry_concurrency) == (20.0, 3)
    assert limits.per_host_max_connections == 2
    assert Limits.of(cluster_pb2.Cluster()) == Limits()  # Envoy's defaults


def test_only_the_default_priority_thresholds_apply() -> None:
    cluster = cluster_pb2.Cluster(name="reviews")
    cluster.circuit_breakers.thresholds.add(priority=base_pb2.HIGH).max_requests.value = 1
    cluster.circuit_breakers.thresholds.add(priority=base_pb2.DEFAULT).max_requests.value = 100
    assert Limits.of(cluster).max_requests == 100


def test_a_host_at_its_per_host_limit_is_passed_over_for_one_with_room() -> None:
    cluster = cluster_pb2.Cluster(name="reviews", lb_policy=cluster_pb2.Cluster.ROUND_ROBIN)
    cluster.circuit_breakers.per_host_thresholds.add().max_connections.value = 1
    for address in ("10.0.0.1", "10.0.0.2"):
        endpoint = cluster.load_assignment.endpoints.add().lb_endpoints.add().endpoint
        endpoint.address.socket_address.address = address
        endpoint.address.socket_address.port_value = 80
    state = ClusterState(cluster, FakeClock(), random.Random(1))
    busy = state.hosts[0]
    assert state.breaker.admit(busy) is Admission.OK
    assert not state.breaker.host_has_room(busy)
    picks = [state.pick(None, None, attempts=3) for _ in range(10)]
    assert {h.address for h in picks if h is not None} == {"10.0.0.2"}
    assert None not in picks


# whole calls ------------------------------------------------------------------------------------

HOST = "reviews.shop.internal"
ADDRESSES = ["10.0.0.1", "10.0.0.2", "10.0.0.3"]


def mesh(
    route: dict[str, Any] | None = None,
    policy: dict[str, Any] | None = None,
    annotations: dict[str, str] | None = None,
    addresses: list[str] = ADDRESSES,
) -> tuple[Engine, FakeClock]:
    """An engine for one service, configured as a user would write it."""
    docs: list[dict[str, Any]] = [
        {
            "apiVersion": "networking.istio.io/v1",
            "kind": "ServiceEntry",
            "metadata": {"name": "reviews", "namespace": "shop"},
            "spec": {
                "hosts": [HOST],
                "location": "MESH_INTERNAL",
                "resolution": "STATIC",
                "ports": [{"number": 8080, "name": "http", "protocol": "HTTP"}],
                "endpoints": [{"address": a} for a in addresses],
            },
        },
        {
            "apiVersion": "networking.istio.io/v1",
            "kind": "VirtualService",
            "metadata": {"name": "reviews", "namespace": "shop"},
            "spec": {
                "hosts": [HOST],
                "http": [{"route": [{"destination": {"host": HOST}}], **(route or {})}],
            },
        },
    ]
    if policy is not None:
        metadata = {"name": "reviews", "namespace": "shop", "annotations": annotations or {}}
        docs.append(
            {
                "apiVersion": "networking.istio.io/v1",
                "kind": "DestinationRule",
                "metadata": metadata,
                "spec": {"host": HOST, "trafficPolicy": policy},
            }
        )
    result = load_text(yaml.safe_dump_all(docs), "mesh.yaml")
    assert result.ok, [f.format() for f in result.errors]
    snapshot = translate(result.config, Registry.build(result.config, result.services), Node())
    clock = FakeClock()
    return Engine(snapshot, clock=clock, rng=random.Random(11)), clock


def start(engine: Engine) -> Call:
    call = engine.start(HOST, 8080, RequestInfo("GET", f"{HOST}:8080", "/reviews/1"))
    assert isinstance(call, Call)
    return call


def attempt(call: Call) -> Attempt:
    step = call.next()
    assert isinstance(step, Attempt), step
    return step


def cluster(engine: Engine) -> ClusterState:
    (state,) = engine.clusters.values()
    return state


def test_a_503_is_retried_on_another_host_after_a_jittered_back_off() -> None:
    engine, _ = mesh(route={"retries": {"attempts": 2, "retryOn": "5xx"}})
    call = start(engine)
    first = attempt(call)
    backoff = call.responded(first, 503, {})
    assert isinstance(backoff, Backoff)
    assert 0 <= backoff.seconds <= 0.025
    second = attempt(call)
    assert second.retry
    assert second.host.key != first.host.key
    delivered = call.responded(second, 200, {})
    assert delivered is DELIVER
    call.finish(second)
    state = cluster(engine)
    assert (state.stats.upstream_rq_total, state.stats.upstream_rq_retry) == (2, 1)
    assert (state.breaker.in_flight, state.breaker.calls, state.breaker.retries) == (0, 0, 0)


def test_retries_stop_at_the_configured_attempts_and_the_last_response_is_delivered() -> None:
    engine, _ = mesh(route={"retries": {"attempts": 2, "retryOn": "gateway-error"}})
    call = start(engine)
    ceilings, hosts = [], set()
    for _ in range(2):
        step = attempt(call)
        hosts.add(step.host.key)
        backoff = call.responded(step, 502, {})
        assert isinstance(backoff, Backoff)
        ceilings.append(backoff.seconds)
    last = attempt(call)
    assert call.responded(last, 502, {}) is DELIVER
    assert hosts | {last.host.key} == {f"{a}:8080" for a in ADDRESSES}
    assert ceilings[0] <= 0.025
    assert ceilings[1] <= 0.075


def test_a_response_the_policy_does_not_retry_is_delivered_at_once() -> None:
    engine, _ = mesh(route={"retries": {"attempts": 3, "retryOn": "gateway-error"}})
    call = start(engine)
    first = attempt(call)
    assert call.responded(first, 500, {}) is DELIVER


def test_a_connect_failure_is_retried_by_istios_default_policy() -> None:
    engine, _ = mesh()
    call = start(engine)
    first = attempt(call)
    assert isinstance(call.failed(first, Failure.CONNECT_FAILURE), Backoff)
    assert attempt(call).host.key != first.host.key


def test_without_retries_a_connect_failure_fails_the_call_with_UF() -> None:
    engine, _ = mesh(route={"retries": {"attempts": 0}})
    call = start(engine)
    outcome = call.failed(attempt(call), Failure.CONNECT_FAILURE)
    assert isinstance(outcome, Fail)
    assert (outcome.kind, outcome.flags) == ("connect", "UF")
    assert cluster(engine).breaker.in_flight == 0


def overloaded(step: object) -> bool:
    return (
        isinstance(step, LocalReply)
        and (step.status, step.flags) == (503, "UO")
        and ("x-envoy-overloaded", "true") in step.headers
    )


def test_calls_beyond_connections_plus_pending_get_a_local_503_UO() -> None:
    engine, _ = mesh(
        policy={
            "connectionPool": {"tcp": {"maxConnections": 1}, "http": {"http1MaxPendingRequests": 1}}
        }
    )
    calls = [start(engine) for _ in range(3)]
    attempts = [attempt(calls[0]), attempt(calls[1])]
    assert overloaded(calls[2].next())
    assert cluster(engine).stats.upstream_rq_pending_overflow == 1
    calls[0].responded(attempts[0], 200, {})
    calls[0].finish(attempts[0])
    assert isinstance(start(engine).next(), Attempt)


def test_concurrent_requests_beyond_max_requests_get_a_local_503_UO() -> None:
    engine, _ = mesh(policy={"connectionPool": {"http": {"http2MaxRequests": 2}}})
    for _ in range(2):
        attempt(start(engine))
    assert overloaded(start(engine).next())


def test_a_call_that_fills_max_requests_may_still_retry() -> None:
    # Envoy checks only the retry limit when deciding; the failed attempt's slot is freed first.
    engine, _ = mesh(
        route={"retries": {"attempts": 1, "retryOn": "5xx"}},
        policy={"connectionPool": {"http": {"http2MaxRequests": 1}}},
    )
    call = start(engine)
    assert isinstance(call.responded(attempt(call), 503, {}), Backoff)
    assert attempt(call).retry


def test_max_retries_limits_retries_in_progress_across_calls() -> None:
    engine, _ = mesh(
        route={"retries": {"attempts": 3, "retryOn": "5xx"}},
        policy={"connectionPool": {"http": {"maxRetries": 1}}},
    )
    first, second = start(engine), start(engine)
    a, b = attempt(first), attempt(second)
    assert isinstance(first.responded(a, 503, {}), Backoff)
    assert second.responded(b, 503, {}) is DELIVER  # the 503 stands; no retry storm
    assert cluster(engine).stats.upstream_rq_retry_overflow == 1
    retry = attempt(first)
    first.responded(retry, 200, {})
    first.finish(retry)
    second.finish(b)
    third = start(engine)
    assert isinstance(third.responded(attempt(third), 503, {}), Backoff)


def test_a_retry_budget_allows_retries_for_a_share_of_active_calls() -> None:
    engine, _ = mesh(
        route={"retries": {"attempts": 3, "retryOn": "5xx"}},
        policy={"retryBudget": {"percent": 25, "minRetryConcurrency": 1}},
        addresses=[f"10.0.1.{i}" for i in range(8)],
    )
    calls = [start(engine) for _ in range(8)]
    attempts = [attempt(call) for call in calls]
    outcomes = [c.responded(a, 503, {}) for c, a in zip(calls, attempts, strict=True)]
    assert [type(o).__name__ for o in outcomes] == ["Backoff"] * 2 + ["Deliver"] * 6


def test_with_every_host_ejected_a_call_gets_a_local_503_UH_until_one_returns() -> None:
    engine, clock = mesh(
        route={"retries": {"attempts": 0}},
        policy={
            "outlierDetection": {
                "consecutive5xxErrors": 1,
                "interval": "1s",
                "baseEjectionTime": "30s",
                "maxEjectionPercent": 100,
            }
        },
        addresses=["10.0.0.1"],
    )
    call = start(engine)
    first = attempt(call)
    assert call.responded(first, 503, {}) is DELIVER
    call.finish(first)
    reply = start(engine).next()
    assert isinstance(reply, LocalReply)
    assert (reply.status, reply.flags) == (503, "UH")
    clock.now = 30.0
    assert attempt(start(engine)).host.key == "10.0.0.1:8080"


def test_the_route_timeout_ends_the_call_with_UT() -> None:
    engine, clock = mesh(route={"timeout": "1s", "retries": {"attempts": 0}})
    call = start(engine)
    first = attempt(call)
    assert (first.timeout, first.per_try) == (1.0, False)
    clock.now = 1.0
    outcome = call.failed(first, Failure.TIMEOUT)
    assert isinstance(outcome, Fail)
    assert (outcome.kind, outcome.flags) == ("timeout", "UT")
    assert cluster(engine).breaker.in_flight == 0


def test_the_route_deadline_bounds_back_off_and_ends_the_call_with_UT() -> None:
    engine, clock = mesh(route={"timeout": "1s", "retries": {"attempts": 5, "retryOn": "5xx"}})
    call = start(engine)
    first = attempt(call)
    clock.now = 0.995
    backoff = call.responded(first, 503, {})
    assert isinstance(backoff, Backoff)
    assert backoff.seconds <= 0.005 + 1e-9
    clock.now = 1.0
    outcome = call.next()
    assert isinstance(outcome, Fail)
    assert outcome.flags == "UT"
    breaker = cluster(engine).breaker
    assert (breaker.in_flight, breaker.calls, breaker.retries) == (0, 0, 0)


def test_a_per_try_timeout_is_retried_within_the_route_timeout() -> None:
    engine, clock = mesh(
        route={
            "timeout": "0.5s",
            "retries": {"attempts": 3, "perTryTimeout": "0.3s", "retryOn": "gateway-error"},
        }
    )
    call = start(engine)
    first = attempt(call)
    assert (first.timeout, first.per_try) == (0.3, True)
    clock.now = 0.3
    assert isinstance(call.failed(first, Failure.TIMEOUT), Backoff)
    clock.now = 0.31
    second = attempt(call)
    assert second.timeout == pytest.approx(0.19)
    assert not second.per_try  # what is left of the route timeout comes first
    assert cluster(engine).stats.upstream_rq_timeout == 1
