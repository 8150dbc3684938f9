"""Which outcomes a route retries, and how long it waits, as Envoy's router decides
(source/common/router/retry_state_impl.cc). Policies are built from Envoy's RetryPolicy proto;
back-off is drawn from a seeded ``random.Random``.
"""

from __future__ import annotations

import random
from typing import Any

import pytest
from envoy.config.route.v3 import route_components_pb2 as rc
from envoy.type.matcher.v3 import string_pb2
from google.protobuf import duration_pb2, wrappers_pb2

from libmesh.policy import Failure, RetryPolicy


def policy(retry_on: str, **fields: Any) -> RetryPolicy:
    return RetryPolicy.of(rc.RetryPolicy(retry_on=retry_on, **fields))


def retried(retry_on: str, status: int, headers: dict[str, str] | None = None) -> bool:
    return policy(retry_on).retries_status(status, headers or {})


# responses --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("retry_on", "status", "expected"),
    [
        ("5xx", 500, True),
        ("5xx", 503, True),
        ("5xx", 599, True),
        ("5xx", 404, False),
        ("5xx", 200, False),
        ("gateway-error", 502, True),
        ("gateway-error", 503, True),
        ("gateway-error", 504, True),
        ("gateway-error", 500, False),
        ("gateway-error", 501, False),
        ("retriable-4xx", 409, True),
        ("retriable-4xx", 429, False),
        ("retriable-4xx", 400, False),
        ("connect-failure", 503, False),
        ("reset", 503, False),
        ("refused-stream", 503, False),
        ("connect-failure,refused-stream,gateway-error", 502, True),
    ],
)
def test_which_response_statuses_are_retried(retry_on: str, status: int, expected: bool) -> None:
    assert retried(retry_on, status) is expected


def test_retriable_status_codes_retries_only_the_listed_codes() -> None:
    listed = policy("retriable-status-codes", retriable_status_codes=[429, 503])
    assert listed.retries_status(429, {})
    assert listed.retries_status(503, {})
    assert not listed.retries_status(500, {})
    unlisted = policy("5xx", retriable_status_codes=[429])  # codes without the condition
    assert not unlisted.retries_status(429, {})


def test_retriable_headers_retries_responses_with_a_matching_header() -> None:
    matchers = [
        rc.HeaderMatcher(name="X-Upstream-Retry", exact_match="yes"),
        rc.HeaderMatcher(
            name="x-overloaded", string_match=string_pb2.StringMatcher(exact="please")
        ),
        rc.HeaderMatcher(name="x-try-elsewhere", present_match=True),
    ]
    retry = policy("retriable-headers", retriable_headers=matchers)
    assert retry.retries_status(200, {"x-upstream-retry": "yes"})
    assert retry.retries_status(400, {"x-overloaded": "please"})
    assert retry.retries_status(200, {"x-try-elsewhere": ""})
    assert not retry.retries_status(200, {"x-upstream-retry": "no"})
    assert not retry.retries_status(503, {})


def test_envoy_ratelimited_retries_when_an_upstream_envoy_rate_limited() -> None:
    assert retried("envoy-ratelimited", 429, {"x-envoy-ratelimited": "true"})
    assert not retried("envoy-ratelimited", 429)


def test_an_upstream_envoys_rate_limit_is_not_retried_under_other_conditions() -> None:
    limited = {"x-envoy-ratelimited": "true"}
    assert not retried("5xx", 503, limited)
    assert not policy("retriable-status-codes", retriable_status_codes=[429]).retries_status(
        429, limited
    )


@pytest.mark.parametrize(
    ("retry_on", "grpc_status", "expected"),
    [
        ("cancelled", 1, True),
        ("deadline-exceeded", 4, True),
        ("resource-exhausted", 8, True),
        ("internal", 13, True),
        ("unavailable", 14, True),
        ("unavailable", 13, False),
        ("cancelled,unavailable", 4, False),
        ("unavailable", 0, False),
        ("5xx", 14, False),
    ],
)
def test_grpc_conditions_follow_the_grpc_status(
    retry_on: str, grpc_status: int, expected: bool
) -> None:
    assert policy(retry_on).retries_status(200, {}, grpc_status=grpc_status) is expected


def test_grpc_conditions_ignore_responses_without_a_grpc_status() -> None:
    assert not policy("unavailable,cancelled,internal").retries_status(200, {})


# failures without a response --------------------------------------------------------------------

CONNECT, RESET, REFUSED, TIMEOUT = (
    Failure.CONNECT_FAILURE,
    Failure.RESET,
    Failure.REFUSED_STREAM,
    Failure.TIMEOUT,
)


@pytest.mark.parametrize(
    ("retry_on", "retried_failures"),
    [
        ("5xx", {CONNECT, RESET, REFUSED, TIMEOUT}),
        ("gateway-error", {CONNECT, RESET, REFUSED, TIMEOUT}),
        ("connect-failure", {CONNECT}),
        ("refused-stream", {REFUSED}),
        ("reset-before-request", {CONNECT}),
        ("retriable-4xx", set()),
        ("retriable-status-codes", set()),
        ("unavailable,cancelled", set()),
    ],
)
def test_which_failures_are_retried(retry_on: str, retried_failures: set[Failure]) -> None:
    retry = policy(retry_on)
    assert {f for f in Failure if retry.retries_failure(f)} == retried_failures


def test_reset_retries_connection_failures_and_resets() -> None:
    retry = policy("reset")
    assert retry.retries_failure(CONNECT)
    assert retry.retries_failure(RESET)
    assert retry.retries_failure(REFUSED)


def test_reset_retries_a_per_try_timeout() -> None:
    assert policy("reset").retries_failure(TIMEOUT)


def test_a_per_try_timeout_is_retried_like_a_504() -> None:
    assert policy("5xx").retries_failure(TIMEOUT)
    assert policy("gateway-error").retries_failure(TIMEOUT)
    assert not policy("connect-failure,refused-stream").retries_failure(TIMEOUT)


# the policy's numbers ---------------------------------------------------------------------------


def test_envoys_defaults_one_retry_and_25ms_base_back_off() -> None:
    retry = policy("5xx")
    assert retry.num_retries == 1
    assert retry.per_try_timeout is None
    assert retry.base_interval == pytest.approx(0.025)
    assert retry.max_interval == pytest.approx(0.25)
    assert not retry.avoid_previous_hosts


def test_configured_numbers_are_read_from_the_proto() -> None:
    proto = rc.RetryPolicy(
        retry_on="5xx",
        num_retries=wrappers_pb2.UInt32Value(value=4),
        per_try_timeout=duration_pb2.Duration(nanos=250_000_000),
        retry_back_off=rc.RetryPolicy.RetryBackOff(
            base_interval=duration_pb2.Duration(nanos=100_000_000),
            max_interval=duration_pb2.Duration(seconds=2),
        ),
        host_selection_retry_max_attempts=5,
    )
    proto.retry_host_predicate.add(name="envoy.retry_host_predicates.previous_hosts")
    retry = RetryPolicy.of(proto)
    assert retry.num_retries == 4
    assert retry.per_try_timeout == pytest.approx(0.25)
    assert retry.base_interval == pytest.approx(0.1)
    assert retry.max_interval == pytest.approx(2.0)
    assert retry.avoid_previous_hosts
    assert retry.host_selection_attempts == 5


def test_an_explicit_zero_disables_retries() -> None:
    assert policy("5xx", num_retries=wrappers_pb2.UInt32Value(value=0)).num_retries == 0


# back-off ---------------------------------------------------------------------------------------


def delays(retry: RetryPolicy, retry_number: int, samples: int = 2000) -> list[float]:
    rng = random.Random(2024)
    return [retry.backoff(retry_number, rng) for _ in range(samples)]


@pytest.mark.parametrize(
    ("retry_number", "ceiling"), [(1, 0.025), (2, 0.075), (3, 0.175), (4, 0.25), (9, 0.25)]
)
def test_back_off_is_fully_jittered_below_2_to_the_n_minus_1_times_base(
    retry_number: int, ceiling: float
) -> None:
    drawn = delays(policy("5xx"), retry_number)
    assert all(0 <= d <= ceiling for d in drawn)
    assert min(drawn) < 0.05 * ceiling  # full jitter: right down to zero
    assert max(drawn) > 0.95 * ceiling  # and right up to the ceiling
    assert sum(drawn) / len(drawn) == pytest.approx(ceiling / 2, rel=0.1)


def test_back_off_respects_a_configured_base_and_max_interval() -> None:
    proto = rc.RetryPolicy(
        retry_on="5xx",
        retry_back_off=rc.RetryPolicy.RetryBackOff(
            base_interval=duration_pb2.Duration(seconds=1),
            max_interval=duration_pb2.Duration(seconds=3),
        ),
    )
    retry = RetryPolicy.of(proto)
    assert max(delays(retry, 1)) <= 1.0
    assert 2.9 < max(delays(retry, 2)) <= 3.0  # 3s = (2^2 - 1) * 1s
    assert 2.9 < max(delays(retry, 5)) <= 3.0  # capped


def test_the_same_seed_gives_the_same_back_off() -> None:
    retry = policy("5xx")
    assert delays(retry, 3, samples=20) == delays(retry, 3, samples=20)


def test_sharing_one_policy_between_calls_is_safe() -> None:
    retry = policy("5xx")
    with pytest.raises(AttributeError):
        retry.num_retries = 9  # type: ignore[misc]
