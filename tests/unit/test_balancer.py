"""Load balancing as the traffic sees it: which hosts get how many requests, with Envoy's
semantics (priorities with the 1.4 overprovisioning factor, panic threshold, locality weights,
and the policies that pick a host). Randomness is a seeded ``random.Random``.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Iterable
from typing import Any

import pytest
from envoy.config.cluster.v3 import cluster_pb2

from libmesh.policy import Balancer, BalancerConfig, Host, hash_key

Cluster = cluster_pb2.Cluster


def hosts(names: Iterable[str], **options: Any) -> list[Host]:
    return [Host(name, 8080, **options) for name in names]


def balancer(members: list[Host], policy: int = Cluster.ROUND_ROBIN, **config: Any) -> Balancer:
    lb = Balancer(BalancerConfig(policy=policy, **config), random.Random(42))
    lb.set_hosts(members)
    return lb


def picked(lb: Balancer, key: int | None = None) -> str:
    host = lb.pick(key)
    assert host is not None
    return host.address


def traffic(lb: Balancer, requests: int) -> Counter[str]:
    return Counter(picked(lb) for _ in range(requests))


def share(picks: Counter[str], names: Iterable[str]) -> float:
    return sum(picks[n] for n in names) / sum(picks.values())


def take_down(*members: Host) -> None:
    """Make hosts unavailable, as a failed health check or an outlier ejection does."""
    for host in members:
        host.healthy = False


# round robin ------------------------------------------------------------------------------------


def test_round_robin_visits_every_host_in_turn() -> None:
    lb = balancer(hosts("abc"))
    order = [picked(lb) for _ in range(9)]
    assert sorted(order[:3]) == ["a", "b", "c"]
    assert order == order[:3] * 3


def test_weighted_round_robin_is_exact_in_every_cycle() -> None:
    members = [Host("a", 1, weight=1), Host("b", 1, weight=2), Host("c", 1, weight=3)]
    lb = balancer(members)
    order = [picked(lb) for _ in range(600)]
    for start in range(0, 600, 6):
        assert Counter(order[start : start + 6]) == {"a": 1, "b": 2, "c": 3}
    assert "ccc" not in "".join(order)  # smooth: the heavy host is interleaved


def test_unavailable_hosts_get_no_traffic() -> None:
    members = hosts("abcd")
    members[1].healthy = False
    members[2].monitor.ejected = True  # as outlier detection does
    assert set(traffic(balancer(members), 100)) == {"a", "d"}


# least request ----------------------------------------------------------------------------------


def test_least_request_prefers_the_less_loaded_of_two_random_hosts() -> None:
    members = hosts("abc")
    members[0].active = 10
    picks = traffic(balancer(members, Cluster.LEAST_REQUEST), 3000)
    assert share(picks, "a") < 0.15  # at most when both choices are the busy host
    assert 0.4 < share(picks, "b") < 0.6


def test_least_request_spreads_evenly_when_all_are_idle() -> None:
    picks = traffic(balancer(hosts("abcd"), Cluster.LEAST_REQUEST), 4000)
    assert all(850 < n < 1150 for n in picks.values())


def test_weighted_least_request_shares_idle_traffic_by_weight() -> None:
    lb = balancer([Host("a", 1, weight=3), Host("b", 1, weight=1)], Cluster.LEAST_REQUEST)
    assert share(traffic(lb, 1000), "b") == pytest.approx(0.25, abs=0.05)


def test_random_follows_weights() -> None:
    lb = balancer([Host("a", 1, weight=1), Host("b", 1, weight=3)], Cluster.RANDOM)
    assert 0.70 < share(traffic(lb, 4000), "b") < 0.80


# consistent hashing -----------------------------------------------------------------------------

KEYS = [hash_key(f"user-{i}") for i in range(2000)]
NAMES = [f"10.1.0.{i}" for i in range(5)]


def owners(lb: Balancer) -> list[str]:
    return [picked(lb, key) for key in KEYS]


@pytest.mark.parametrize("policy", [Cluster.RING_HASH, Cluster.MAGLEV])
def test_a_key_always_lands_on_the_same_host_even_in_another_balancer(policy: int) -> None:
    first, second = balancer(hosts(NAMES), policy), balancer(hosts(NAMES), policy)
    assert owners(first) == owners(first) == owners(second)


@pytest.mark.parametrize("policy", [Cluster.RING_HASH, Cluster.MAGLEV])
def test_keys_are_spread_over_all_hosts(policy: int) -> None:
    counts = Counter(owners(balancer(hosts(NAMES), policy)))
    assert set(counts) == set(NAMES)
    assert all(0.12 < n / len(KEYS) < 0.28 for n in counts.values())


@pytest.mark.parametrize("policy", [Cluster.RING_HASH, Cluster.MAGLEV])
def test_removing_a_host_moves_few_of_the_other_hosts_keys(policy: int) -> None:
    members = hosts(NAMES)
    lb = balancer(members, policy)
    before = owners(lb)
    lb.set_hosts(members[1:])
    after = owners(lb)
    gone = NAMES[0]
    assert all(new != gone for new in after)
    kept = [(old, new) for old, new in zip(before, after, strict=True) if old != gone]
    moved = sum(old != new for old, new in kept) / len(kept)
    assert moved < 0.2  # a modulo hash would move about 80% of them


@pytest.mark.parametrize("policy", [Cluster.RING_HASH, Cluster.MAGLEV])
def test_hashing_follows_host_weights(policy: int) -> None:
    members = [Host("a", 1, weight=3), Host("b", 1, weight=1)]
    counts = Counter(owners(balancer(members, policy)))
    assert 0.65 < counts["a"] / len(KEYS) < 0.85


@pytest.mark.parametrize("policy", [Cluster.RING_HASH, Cluster.MAGLEV])
def test_an_unavailable_hosts_keys_move_and_come_back(policy: int) -> None:
    members = hosts(NAMES)
    lb = balancer(members, policy)
    before = owners(lb)
    take_down(members[0])
    assert NAMES[0] not in owners(lb)
    members[0].healthy = True
    assert owners(lb) == before


# priorities -------------------------------------------------------------------------------------


def levels(p0: int, p1: int, p0_down: int = 0, p1_down: int = 0) -> list[Host]:
    first = [Host(f"p0-{i}", 1, priority=0) for i in range(p0)]
    second = [Host(f"p1-{i}", 1, priority=1) for i in range(p1)]
    take_down(*first[:p0_down], *second[:p1_down])
    return first + second


def p0_share(members: list[Host], requests: int = 5000, **config: Any) -> float:
    picks = traffic(balancer(members, **config), requests)
    return share(picks, [h.address for h in members if h.priority == 0])


def test_traffic_stays_in_priority_0_while_it_is_healthy() -> None:
    assert p0_share(levels(5, 5)) == 1.0


def test_priority_0_keeps_all_traffic_down_to_72_percent_available() -> None:
    assert p0_share(levels(5, 5, p0_down=1)) == 1.0  # 80% * 1.4 = 112% -> 100%


@pytest.mark.parametrize(
    ("members", "expected"),
    [
        (levels(5, 5, p0_down=2), 0.84),  # 60% * 1.4 = 84%
        (levels(4, 5, p0_down=2, p1_down=2), 0.70),  # Envoy's table: 50% and 60% -> 70/30
        (levels(4, 4, p0_down=4), 0.0),
    ],
)
def test_traffic_spills_to_priority_1_by_the_overprovisioning_math(
    members: list[Host], expected: float
) -> None:
    assert p0_share(members) == pytest.approx(expected, abs=0.02)


def test_below_full_availability_a_level_in_panic_spreads_its_share_over_all_its_hosts() -> None:
    # Envoy's table: 5% and 65% healthy -> 7% to P0 (in panic), 93% to P1 (not in panic).
    members = levels(20, 20, p0_down=19, p1_down=7)
    picks = traffic(balancer(members), 20000)
    assert share(picks, [f"p0-{i}" for i in range(20)]) == pytest.approx(0.07, abs=0.01)
    assert sum(1 for i in range(19) if picks[f"p0-{i}"]) >= 15  # unavailable P0 hosts get traffic
    assert all(picks[f"p1-{i}"] == 0 for i in range(7))


def test_no_level_panics_while_total_availability_is_100_percent() -> None:
    members = levels(4, 4, p0_down=3)  # p0-0..2 are down, p0-3 is up
    picks = traffic(balancer(members), 4000)
    assert share(picks, ["p0-3"]) == pytest.approx(0.35, abs=0.03)
    assert all(picks[f"p0-{i}"] == 0 for i in (0, 1, 2))


def test_in_total_panic_load_follows_host_counts() -> None:
    assert p0_share(levels(2, 6, p0_down=2, p1_down=6), 4000) == pytest.approx(0.25, abs=0.03)


# panic threshold --------------------------------------------------------------------------------


def test_below_the_panic_threshold_traffic_goes_to_every_host() -> None:
    members = hosts("abcd")
    take_down(*members[1:])
    assert set(traffic(balancer(members), 200)) == {"a", "b", "c", "d"}


def test_at_the_panic_threshold_only_available_hosts_get_traffic() -> None:
    members = hosts("abcd")
    take_down(*members[2:])
    assert set(traffic(balancer(members), 200)) == {"a", "b"}


def test_a_zero_panic_threshold_disables_panic() -> None:
    members = hosts("abcd")
    take_down(*members[1:])
    lb = balancer(members, panic_threshold=0.0)
    assert set(traffic(lb, 200)) == {"a"}
    take_down(members[0])
    assert lb.pick() is None


# locality weighting -----------------------------------------------------------------------------


def zones(x_down: int = 0) -> list[Host]:
    x = hosts(["x1", "x2", "x3", "x4"], locality="x")
    take_down(*x[:x_down])
    return x + hosts(["y1", "y2", "y3", "y4"], locality="y")


def locality_lb(members: list[Host], **weights: int) -> Balancer:
    return balancer(members, locality_weighted=True, locality_weights=weights)


def test_localities_share_traffic_by_their_weights() -> None:
    picks = traffic(locality_lb(zones(), x=1, y=2), 300)
    assert share(picks, ["x1", "x2", "x3", "x4"]) == pytest.approx(1 / 3)


def test_a_locality_of_weight_zero_gets_no_traffic() -> None:
    picks = traffic(locality_lb(zones(), x=0, y=1), 100)
    assert share(picks, ["y1", "y2", "y3", "y4"]) == 1.0


def test_without_locality_weighting_hosts_share_evenly() -> None:
    picks = traffic(balancer(zones(), locality_weights={"x": 1, "y": 9}), 800)
    assert share(picks, ["x1", "x2", "x3", "x4"]) == 0.5


def test_a_partly_available_locality_gets_less_traffic() -> None:
    picks = traffic(locality_lb(zones(x_down=2), x=1, y=2), 3000)
    assert share(picks, ["x1", "x2", "x3", "x4"]) == pytest.approx(0.26, abs=0.02)


# accept: how retries avoid hosts ----------------------------------------------------------------


@pytest.mark.parametrize(
    "policy", [Cluster.ROUND_ROBIN, Cluster.LEAST_REQUEST, Cluster.RANDOM, Cluster.RING_HASH]
)
def test_accept_steers_a_retry_away_from_hosts_already_tried(policy: int) -> None:
    lb = balancer(hosts("abc"), policy)
    tried = {"a", "b"}
    for i in range(50):
        host = lb.pick(hash_key(str(i)), accept=lambda h: h.address not in tried, attempts=50)
        assert host is not None
        assert host.address == "c"


def test_a_hashed_retry_moves_deterministically_to_another_host() -> None:
    lb = balancer(hosts(NAMES), Cluster.RING_HASH)
    key = KEYS[0]
    first = lb.pick(key)
    assert first is not None

    retries = [lb.pick(key, accept=lambda h: h is not first, attempts=5) for _ in range(5)]
    assert first not in retries
    assert len({id(h) for h in retries}) == 1


def test_after_the_last_selection_attempt_the_refused_host_is_used() -> None:
    # Envoy's host_selection_retry_max_attempts: the last pick stands, refused or not.
    lb = balancer(hosts("a"))
    host = lb.pick(accept=lambda h: False, attempts=3)
    assert host is not None
    assert host.address == "a"
