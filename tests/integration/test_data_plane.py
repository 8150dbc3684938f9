"""The in-process data plane against real HTTP servers on 127.0.0.1, with httpx's sync and async
clients and with requests: what a user of libmesh observes, counted at the servers."""

from __future__ import annotations

import random
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

import libmesh
from tests.conftest import Backends, service, unused_port

from .conftest import Caller

URL = "http://reviews.shop.svc.cluster.local:8080"
Connect = Callable[[libmesh.Mesh], Caller]
MeshDir = Callable[..., Path]
StartBackends = Callable[[int], Backends]


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def mesh_of(path: Path, **kwargs: object) -> libmesh.Mesh:
    options: dict[str, object] = {"namespace": "shop", "watch": False, "rng": random.Random(7)}
    options.update(kwargs)
    return libmesh.Mesh.from_files(path, **options)  # type: ignore[arg-type]


def instance(response: httpx.Response) -> str:
    return str(response.json()["instance"])


def canary(weights: tuple[int, int]) -> str:
    return f"""
    apiVersion: networking.istio.io/v1
    kind: DestinationRule
    metadata: {{name: reviews, namespace: shop}}
    spec:
      host: reviews
      subsets:
      - {{name: v1, labels: {{version: v1}}}}
      - {{name: v2, labels: {{version: v2}}}}
    ---
    apiVersion: networking.istio.io/v1
    kind: VirtualService
    metadata: {{name: reviews, namespace: shop}}
    spec:
      hosts: [reviews]
      http:
      - route:
        - {{destination: {{host: reviews, subset: v1}}, weight: {weights[0]}}}
        - {{destination: {{host: reviews, subset: v2}}, weight: {weights[1]}}}
    """


# -- routing ---------------------------------------------------------------------------------------


def test_canary_weights_hold_over_2000_requests(
    start_backends: StartBackends, mesh_dir: MeshDir, connect: Connect
) -> None:
    backends = start_backends(2)
    path = mesh_dir(
        service("reviews", "shop", backends.ports, labels=[{"version": "v1"}, {"version": "v2"}]),
        canary((90, 10)),
    )
    caller = connect(mesh_of(path))

    responses = caller.gets(2000, URL + "/reviews/1")

    assert all(r.status_code == 200 for r in responses)
    assert Counter(instance(r) for r in responses) == {"instance-0": 1800, "instance-1": 200}
    assert backends.requests(0) == 1800
    assert backends.requests(1) == 200


def test_short_names_and_the_service_host_header_reach_the_service(
    start_backends: StartBackends, mesh_dir: MeshDir, connect: Connect
) -> None:
    backends = start_backends(1)
    caller = connect(mesh_of(mesh_dir(service("reviews", "shop", backends.ports))))

    by_short_name = caller.get("http://reviews:8080/a")
    without_port = caller.get("http://reviews/a")

    assert by_short_name.status_code == without_port.status_code == 200
    # The request keeps naming the service; only the connection goes to the endpoint.
    assert by_short_name.json()["host"] == "reviews:8080"
    assert by_short_name.request.url == httpx.URL("http://reviews:8080/a")
    assert by_short_name.extensions["libmesh"].upstream_host == f"127.0.0.1:{backends.ports[0]}"


def test_hosts_the_mesh_does_not_know_pass_straight_through(
    start_backends: StartBackends, mesh_dir: MeshDir, connect: Connect
) -> None:
    backends = start_backends(2)
    caller = connect(mesh_of(mesh_dir(service("reviews", "shop", backends.ports[:1]))))

    response = caller.get(f"http://127.0.0.1:{backends.ports[1]}/direct")

    assert instance(response) == "instance-1"
    assert "libmesh" not in response.extensions


def test_matches_rewrites_headers_redirects_and_direct_responses(
    start_backends: StartBackends, mesh_dir: MeshDir, connect: Connect
) -> None:
    backends = start_backends(2)
    path = mesh_dir(
        service("reviews", "shop", backends.ports, labels=[{"version": "v1"}, {"version": "v2"}]),
        """
        apiVersion: networking.istio.io/v1
        kind: DestinationRule
        metadata: {name: reviews, namespace: shop}
        spec:
          host: reviews
          subsets:
          - {name: v1, labels: {version: v1}}
          - {name: v2, labels: {version: v2}}
        ---
        apiVersion: networking.istio.io/v1
        kind: VirtualService
        metadata: {name: reviews, namespace: shop}
        spec:
          hosts: [reviews]
          http:
          - match:
            - headers: {x-user: {prefix: test-}}
              queryParams: {debug: {exact: "1"}}
            route: [{destination: {host: reviews, subset: v2}}]
          - match: [{uri: {prefix: /old/}}]
            redirect: {uri: /new/, redirectCode: 308}
          - match: [{uri: {exact: /health}, method: {exact: GET}}]
            directResponse: {status: 204}
          - match: [{uri: {regex: "/v[0-9]+/.*"}}]
            rewrite: {uri: /api/}
            headers:
              request:
                set: {x-mesh: "yes"}
                remove: [x-secret]
              response:
                add: {x-served-by: mesh}
            route: [{destination: {host: reviews, subset: v1}}]
          - route: [{destination: {host: reviews, subset: v1}}]
        """,
    )
    caller = connect(mesh_of(path))

    tester = caller.get(URL + "/x?debug=1", headers={"x-user": "test-ann"})
    not_debug = caller.get(URL + "/x", headers={"x-user": "test-ann"})
    redirect = caller.get(URL + "/old/page?q=1")
    health = caller.get(URL + "/health")
    rewritten = caller.get(URL + "/v2/items?a=b", headers={"x-secret": "s"})

    assert instance(tester) == "instance-1"
    assert instance(not_debug) == "instance-0"
    assert redirect.status_code == 308
    assert redirect.headers["location"] == "http://reviews.shop.svc.cluster.local:8080/new/?q=1"
    assert health.status_code == 204
    assert rewritten.json()["path"] == "/api/?a=b"
    assert rewritten.json()["headers"]["x-mesh"] == "yes"
    assert "x-secret" not in rewritten.json()["headers"]
    assert rewritten.headers["x-served-by"] == "mesh"


# -- retries, timeouts, budgets --------------------------------------------------------------------


def retrying(retry_on: str, attempts: int = 3, extra: str = "") -> str:
    return f"""
    apiVersion: networking.istio.io/v1
    kind: VirtualService
    metadata: {{name: reviews, namespace: shop}}
    spec:
      hosts: [reviews]
      http:
      - route: [{{destination: {{host: reviews}}}}]
        retries: {{attempts: {attempts}, retryOn: "{retry_on}"{extra}}}
    """


NO_RETRIES = """
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: reviews, namespace: shop}
spec:
  hosts: [reviews]
  http:
  - route: [{destination: {host: reviews}}]
    retries: {attempts: 0}
"""


def test_retries_are_counted_at_the_server_and_recover(
    start_backends: StartBackends, mesh_dir: MeshDir, connect: Connect
) -> None:
    backends = start_backends(1)
    backends.behave(0, status=503, fail_first=2)
    caller = connect(mesh_of(mesh_dir(service("reviews", "shop", backends.ports), retrying("5xx"))))

    response = caller.get(URL + "/flaky")

    assert response.status_code == 200
    assert backends.requests(0) == 3
    assert response.extensions["libmesh"].attempts == 3


def test_retries_stop_at_the_configured_attempts(
    start_backends: StartBackends, mesh_dir: MeshDir, connect: Connect
) -> None:
    backends = start_backends(1)
    backends.behave(0, status=500)
    caller = connect(
        mesh_of(mesh_dir(service("reviews", "shop", backends.ports), retrying("5xx", attempts=2)))
    )

    response = caller.get(URL + "/broken")

    assert response.status_code == 500
    assert backends.requests(0) == 3  # the request and two retries


def test_a_streamed_request_body_is_sent_once_and_never_retried(
    start_backends: StartBackends, mesh_dir: MeshDir, connect: Connect
) -> None:
    backends = start_backends(1)
    backends.behave(0, status=503, fail_first=1)
    caller = connect(mesh_of(mesh_dir(service("reviews", "shop", backends.ports), retrying("5xx"))))

    if caller.mode == "async":

        async def chunks():  # type: ignore[no-untyped-def]
            yield b"part one, "
            yield b"part two"

        streamed: object = chunks()
    else:
        streamed = iter([b"part one, ", b"part two"])
    failed = caller.request("POST", URL + "/upload", content=streamed)
    replayable = caller.request("POST", URL + "/upload", content=b"all at once")

    assert failed.status_code == 503  # a body that cannot be replayed cannot be retried
    assert failed.extensions["libmesh"].attempts == 1
    assert replayable.status_code == 200
    assert replayable.json()["body"] == "all at once"
    assert backends.requests(0) == 2


def test_connection_failures_retry_on_another_host_first(
    start_backends: StartBackends, mesh_dir: MeshDir, connect: Connect
) -> None:
    backends = start_backends(1)
    dead = unused_port()
    path = mesh_dir(
        service("reviews", "shop", [dead, backends.ports[0]]), retrying("connect-failure")
    )
    caller = connect(mesh_of(path))

    responses = caller.gets(20, URL + "/x")

    assert all(r.status_code == 200 for r in responses)
    assert backends.requests(0) == 20
    retried = [r for r in responses if r.extensions["libmesh"].attempts == 2]
    assert retried  # those that first went to the dead endpoint moved on to the live one


def test_an_unreachable_service_raises_an_httpx_connect_error_with_envoy_flags(
    mesh_dir: MeshDir, connect: Connect
) -> None:
    caller = connect(mesh_of(mesh_dir(service("reviews", "shop", [unused_port()]))))

    with pytest.raises(httpx.ConnectError) as raised:
        caller.get(URL + "/x")

    error = raised.value
    assert isinstance(error, libmesh.UpstreamConnectError)
    assert error.response_flags == "URX,UF"  # Istio's default policy retried twice
    assert error.attempts == 3


def test_the_route_timeout_fires(
    start_backends: StartBackends, mesh_dir: MeshDir, connect: Connect
) -> None:
    backends = start_backends(1)
    backends.behave(0, delay=2)
    path = mesh_dir(
        service("reviews", "shop", backends.ports),
        """
        apiVersion: networking.istio.io/v1
        kind: VirtualService
        metadata: {name: reviews, namespace: shop}
        spec:
          hosts: [reviews]
          http:
          - route: [{destination: {host: reviews}}]
            timeout: 200ms
        """,
    )
    caller = connect(mesh_of(path))

    started = time.monotonic()
    with pytest.raises(libmesh.UpstreamTimeout) as raised:
        caller.get(URL + "/slow")

    assert 0.15 < time.monotonic() - started < 1.5
    assert raised.value.response_flags == "UT"
    assert isinstance(raised.value, httpx.TimeoutException)
    assert isinstance(raised.value, TimeoutError)


def test_a_per_try_timeout_retries_within_the_route_timeout(
    start_backends: StartBackends, mesh_dir: MeshDir, connect: Connect
) -> None:
    backends = start_backends(1)
    backends.behave(0, delay=1, fail_first=1)  # only the first request is slow
    path = mesh_dir(
        service("reviews", "shop", backends.ports),
        """
        apiVersion: networking.istio.io/v1
        kind: VirtualService
        metadata: {name: reviews, namespace: shop}
        spec:
          hosts: [reviews]
          http:
          - route: [{destination: {host: reviews}}]
            timeout: 3s
            retries: {attempts: 2, perTryTimeout: 200ms, retryOn: gateway-error}
        """,
    )
    caller = connect(mesh_of(path))

    started = time.monotonic()
    response = caller.get(URL + "/slow-once")

    assert response.status_code == 200
    assert response.extensions["libmesh"].attempts == 2
    assert time.monotonic() - started < 1.0


def test_hedging_races_a_second_attempt_and_takes_the_first_answer(
    start_backends: StartBackends, mesh_dir: MeshDir, connect: Connect
) -> None:
    backends = start_backends(2)
    backends.behave(0, delay=0.3)
    backends.behave(1, delay=0.8)
    path = mesh_dir(
        service("reviews", "shop", backends.ports),
        """
        apiVersion: networking.istio.io/v1
        kind: DestinationRule
        metadata: {name: reviews, namespace: shop}
        spec:
          host: reviews
          trafficPolicy: {loadBalancer: {simple: ROUND_ROBIN}}
        ---
        apiVersion: networking.istio.io/v1
        kind: VirtualService
        metadata:
          name: reviews
          namespace: shop
          annotations: {libmesh.io/hedge: "onPerTryTimeout=true"}
        spec:
          hosts: [reviews]
          http:
          - route: [{destination: {host: reviews}}]
            timeout: 3s
            retries: {attempts: 1, perTryTimeout: 100ms, retryOn: 5xx}
        """,
    )
    caller = connect(mesh_of(path))

    started = time.monotonic()
    response = caller.get(URL + "/x")
    elapsed = time.monotonic() - started

    # The first attempt (0.3 s) outlived the per-try timeout, a hedge (0.8 s) raced it, and
    # the first answer won: without hedging the retry would have answered after 0.9 s.
    assert instance(response) == "instance-0"
    assert response.extensions["libmesh"].attempts == 2
    assert 0.25 < elapsed < 0.7
    assert backends.requests(1) == 1


def test_the_retry_budget_caps_extra_load_when_every_attempt_fails(
    start_backends: StartBackends, mesh_dir: MeshDir, connect: Connect
) -> None:
    backends = start_backends(2)
    for i in (0, 1):
        backends.behave(i, status=503, delay=0.3)
    budget = """
    apiVersion: networking.istio.io/v1
    kind: DestinationRule
    metadata: {name: reviews, namespace: shop}
    spec:
      host: reviews
      trafficPolicy:
        retryBudget: {percent: 20, minRetryConcurrency: 1}
    """
    calls = 10
    without = connect(
        mesh_of(mesh_dir(service("reviews", "shop", backends.ports), retrying("5xx", 3)))
    )
    without.concurrently(calls, URL + "/down")
    unbudgeted = backends.requests(0) + backends.requests(1)
    backends.clear()
    with_budget = connect(
        mesh_of(mesh_dir(service("reviews", "shop", backends.ports), retrying("5xx", 3), budget))
    )

    results = with_budget.concurrently(calls, URL + "/down")

    budgeted = backends.requests(0) + backends.requests(1)
    assert unbudgeted == calls * 4  # every call tried 4 times
    # 20% of 10 active calls allows 2 concurrent retries: a failing upstream is not multiplied.
    assert calls <= budgeted <= calls + 2 * 3
    assert [r.status_code for r in results if isinstance(r, httpx.Response)] == [503] * calls


# -- circuit breaking ------------------------------------------------------------------------------


def test_connection_pool_limits_fail_fast_with_503_uo(
    start_backends: StartBackends, mesh_dir: MeshDir, connect: Connect
) -> None:
    backends = start_backends(1)
    backends.behave(0, delay=0.5)
    path = mesh_dir(
        service("reviews", "shop", backends.ports),
        """
        apiVersion: networking.istio.io/v1
        kind: DestinationRule
        metadata: {name: reviews, namespace: shop}
        spec:
          host: reviews
          trafficPolicy:
            connectionPool:
              tcp: {maxConnections: 1}
              http: {http1MaxPendingRequests: 1}
        """,
        NO_RETRIES,
    )
    caller = connect(mesh_of(path))

    results = caller.concurrently(6, URL + "/slow")

    statuses = Counter(r.status_code for r in results if isinstance(r, httpx.Response))
    assert statuses == {200: 2, 503: 4}
    overflowed = [r for r in results if isinstance(r, httpx.Response) and r.status_code == 503]
    assert all(r.extensions["libmesh"].response_flags == "UO" for r in overflowed)
    assert all(r.headers["x-envoy-overloaded"] == "true" for r in overflowed)
    assert backends.requests(0) == 2


def test_a_cancelled_call_gives_its_circuit_breaker_slots_back(
    start_backends: StartBackends, mesh_dir: MeshDir
) -> None:
    # An asyncio task cancelled mid-attempt (a client timeout, a disconnect) must free its
    # slot, or a cluster with maxConnections 1 would answer 503 UO for ever after.
    import asyncio

    backends = start_backends(1)
    backends.behave(0, delay=0.5)
    path = mesh_dir(
        service("reviews", "shop", backends.ports),
        """
        apiVersion: networking.istio.io/v1
        kind: DestinationRule
        metadata: {name: reviews, namespace: shop}
        spec:
          host: reviews
          trafficPolicy:
            connectionPool:
              tcp: {maxConnections: 1}
              http: {http1MaxPendingRequests: 0}
        """,
        NO_RETRIES,
    )
    mesh = mesh_of(path)

    async def cancel_one_then_call() -> int:
        async with mesh.async_client(timeout=5) as client:
            task = asyncio.ensure_future(client.get(URL + "/slow"))
            await asyncio.sleep(0.2)  # in flight at the backend
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            backends.behave(0, delay=0)
            return (await client.get(URL + "/after")).status_code

    try:
        assert asyncio.run(cancel_one_then_call()) == 200
        (cluster,) = [c for name, c in mesh.engine.clusters.items() if "reviews" in name]
        assert cluster.breaker.in_flight == 0
        assert cluster.breaker.calls == 0
    finally:
        mesh.close()


# -- outlier detection -----------------------------------------------------------------------------


def outliers(extra: str = "") -> str:
    return f"""
    apiVersion: networking.istio.io/v1
    kind: DestinationRule
    metadata: {{name: reviews, namespace: shop}}
    spec:
      host: reviews
      trafficPolicy:
        loadBalancer: {{simple: ROUND_ROBIN}}
        outlierDetection:
          consecutive5xxErrors: 3
          interval: 1s
          baseEjectionTime: 30s
          maxEjectionPercent: 100
          {extra}
    """


def test_a_failing_endpoint_is_ejected_and_returns_after_its_ejection_time(
    start_backends: StartBackends, mesh_dir: MeshDir, connect: Connect
) -> None:
    backends = start_backends(3)
    backends.behave(1, status=500)
    clock = FakeClock()
    path = mesh_dir(service("reviews", "shop", backends.ports), outliers(), NO_RETRIES)
    mesh = mesh_of(path, clock=clock)
    caller = connect(mesh)

    caller.gets(30, URL + "/x")
    bad_before = backends.requests(1)
    backends.clear()
    after = caller.gets(30, URL + "/x")

    assert bad_before == 3  # ejected on its third consecutive 5xx
    assert backends.requests(1) == 0
    assert all(r.status_code == 200 for r in after)
    assert mesh.ejected_hosts() == {
        "outbound|8080||reviews.shop.svc.cluster.local": [f"127.0.0.1:{backends.ports[1]}"]
    }

    backends.behave(1, status=200)
    clock.now += 31  # past baseEjectionTime, and an interval has passed
    caller.gets(30, URL + "/x")

    assert backends.requests(1) == 10
    assert mesh.ejected_hosts() == {}


def test_locality_failover_moves_traffic_when_the_local_zone_fails(
    start_backends: StartBackends, mesh_dir: MeshDir, connect: Connect
) -> None:
    backends = start_backends(3)
    path = mesh_dir(
        service(
            "reviews",
            "shop",
            backends.ports,
            localities=["eu-west/zone-a", "eu-west/zone-a", "eu-west/zone-b"],
        ),
        outliers(),
        NO_RETRIES,
    )
    caller = connect(mesh_of(path, locality="eu-west/zone-a"))

    caller.gets(20, URL + "/x")
    assert backends.requests(2) == 0  # zone-b is only for failover
    backends.clear()
    backends.behave(0, status=503)
    backends.behave(1, status=503)
    caller.gets(20, URL + "/x")

    assert backends.requests(0) == backends.requests(1) == 3  # each ejected after 3 errors
    assert backends.requests(2) == 14


# -- load balancing --------------------------------------------------------------------------------


def test_consistent_hashing_keeps_a_key_on_one_host(
    start_backends: StartBackends, mesh_dir: MeshDir, connect: Connect
) -> None:
    backends = start_backends(4)
    path = mesh_dir(
        service("reviews", "shop", backends.ports),
        """
        apiVersion: networking.istio.io/v1
        kind: DestinationRule
        metadata: {name: reviews, namespace: shop}
        spec:
          host: reviews
          trafficPolicy:
            loadBalancer:
              consistentHash: {httpHeaderName: x-user}
        """,
    )
    caller = connect(mesh_of(path))

    homes = {}
    for user in range(40):
        seen = {instance(r) for r in caller.gets(5, URL + "/x", headers={"x-user": f"u{user}"})}
        assert len(seen) == 1
        homes[user] = seen.pop()

    assert len(set(homes.values())) >= 3  # keys spread across the hosts


def test_least_request_avoids_a_slow_host(
    start_backends: StartBackends, mesh_dir: MeshDir, connect: Connect
) -> None:
    backends = start_backends(2)
    backends.behave(0, delay=0.4)
    path = mesh_dir(
        service("reviews", "shop", backends.ports),
        """
        apiVersion: networking.istio.io/v1
        kind: DestinationRule
        metadata: {name: reviews, namespace: shop}
        spec:
          host: reviews
          trafficPolicy: {loadBalancer: {simple: LEAST_REQUEST}}
        """,
    )
    caller = connect(mesh_of(path))

    caller.workers(4, 10, URL + "/x")

    # While the slow host holds requests, new ones see it busier and go to the fast one.
    assert backends.requests(1) > 2 * backends.requests(0)


# -- faults and mirrors ----------------------------------------------------------------------------


def test_injected_aborts_happen_at_their_configured_rate(
    start_backends: StartBackends, mesh_dir: MeshDir, connect: Connect
) -> None:
    backends = start_backends(1)
    path = mesh_dir(
        service("reviews", "shop", backends.ports),
        """
        apiVersion: networking.istio.io/v1
        kind: VirtualService
        metadata: {name: reviews, namespace: shop}
        spec:
          hosts: [reviews]
          http:
          - route: [{destination: {host: reviews}}]
            fault:
              abort: {httpStatus: 418, percentage: {value: 25}}
        """,
    )
    caller = connect(mesh_of(path, rng=random.Random(11)))

    responses = caller.gets(2000, URL + "/x")

    aborted = [r for r in responses if r.status_code == 418]
    assert 400 <= len(aborted) <= 600  # 25% of 2000, within about 5 standard deviations
    assert backends.requests(0) == 2000 - len(aborted)
    assert all(r.extensions["libmesh"].response_flags == "FI" for r in aborted)


def test_injected_delays_delay_and_the_testing_switch_skips_them(
    start_backends: StartBackends, mesh_dir: MeshDir, connect: Connect
) -> None:
    backends = start_backends(1)
    path = mesh_dir(
        service("reviews", "shop", backends.ports),
        """
        apiVersion: networking.istio.io/v1
        kind: VirtualService
        metadata: {name: reviews, namespace: shop}
        spec:
          hosts: [reviews]
          http:
          - route: [{destination: {host: reviews}}]
            fault:
              delay: {fixedDelay: 300ms, percentage: {value: 100}}
        """,
    )
    caller = connect(mesh_of(path))

    started = time.monotonic()
    delayed = caller.get(URL + "/x")
    delayed_for = time.monotonic() - started
    libmesh.set_testing(True)
    try:
        started = time.monotonic()
        instant = caller.get(URL + "/x")
        instant_for = time.monotonic() - started
    finally:
        libmesh.set_testing(False)

    assert delayed_for >= 0.3
    assert instant_for < 0.2
    assert delayed.extensions["libmesh"].response_flags == "DI"
    assert instant.extensions["libmesh"].response_flags == "DI"


def test_mirrors_get_a_copy_and_never_slow_or_fail_the_request(
    start_backends: StartBackends, mesh_dir: MeshDir, connect: Connect
) -> None:
    backends = start_backends(2)
    backends.behave(1, status=500, delay=1)
    path = mesh_dir(
        service("reviews", "shop", backends.ports[:1]),
        service("shadow", "shop", backends.ports[1:]),
        """
        apiVersion: networking.istio.io/v1
        kind: VirtualService
        metadata: {name: reviews, namespace: shop}
        spec:
          hosts: [reviews]
          http:
          - route: [{destination: {host: reviews}}]
            mirror: {host: shadow}
            mirrorPercentage: {value: 100}
        """,
    )
    caller = connect(mesh_of(path))

    started = time.monotonic()
    responses = caller.gets(5, URL + "/x", headers={"x-trace": "1"})
    elapsed = time.monotonic() - started
    deadline = time.monotonic() + 5
    while backends.requests(1) < 5 and time.monotonic() < deadline:
        time.sleep(0.05)

    assert all(r.status_code == 200 for r in responses)
    assert elapsed < 1.0
    assert backends.requests(1) == 5
    assert backends.stats(1)["hosts"] == {"reviews.shop.svc.cluster.local-shadow:8080": 5}


# -- local mode ------------------------------------------------------------------------------------


def test_a_changed_file_is_picked_up_and_a_broken_one_keeps_the_last_good_config(
    start_backends: StartBackends, mesh_dir: MeshDir, connect: Connect
) -> None:
    backends = start_backends(2)
    registry = service(
        "reviews", "shop", backends.ports, labels=[{"version": "v1"}, {"version": "v2"}]
    )
    path = mesh_dir(registry, canary((100, 0)))
    mesh = mesh_of(path, watch=True, poll_interval=0.05)
    caller = connect(mesh)
    assert {instance(r) for r in caller.gets(5, URL + "/x")} == {"instance-0"}

    mesh_dir(registry, canary((0, 100)))
    _wait_for(lambda: instance(caller.get(URL + "/x")) == "instance-1")
    good_version = mesh.engine.version
    mesh_dir(registry, canary((10, 80)))
    _wait_for(lambda: mesh.last_result is not None and not mesh.last_result.ok)

    assert mesh.engine.version == good_version
    assert {instance(r) for r in caller.gets(5, URL + "/x")} == {"instance-1"}
    assert [e.path for e in mesh.last_result.errors] == ["spec.http[0].route"]


def test_a_mesh_with_invalid_configuration_does_not_start(mesh_dir: MeshDir) -> None:
    path = mesh_dir(canary((90, 20)))

    with pytest.raises(libmesh.ConfigError) as raised:
        mesh_of(path)

    assert "the weights of these 2 destinations total 110" in str(raised.value)
    assert isinstance(raised.value, ValueError)


def _wait_for(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.05)
    raise AssertionError("condition not met in time")
