"""Load balancing, as Envoy does it: priorities with overprovisioning, panic mode, optional
locality weighting, then one of round robin, least request (power of two choices), random,
ring hash or Maglev among the hosts of the chosen locality."""

from __future__ import annotations

import bisect
import hashlib
import random
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from envoy.config.cluster.v3 import cluster_pb2

from ._outlier import Availability, HostMonitor

__all__ = ["Balancer", "BalancerConfig", "Host", "hash_key"]

OVERPROVISIONING = 1.4  # Envoy's default factor: a level at 71% health still takes all its load


class Host:
    """One upstream endpoint of a cluster, with the state the policies keep about it."""

    __slots__ = (
        "_healthy",
        "active",
        "address",
        "key",
        "labels",
        "locality",
        "monitor",
        "port",
        "priority",
        "requests",
        "tls_match",
        "uds",
        "weight",
    )

    def __init__(
        self,
        address: str,
        port: int,
        *,
        uds: str | None = None,
        locality: str = "",
        priority: int = 0,
        weight: int = 1,
        healthy: bool = True,
        labels: dict[str, str] | None = None,
    ) -> None:
        self.address = address
        self.port = port
        self.uds = uds
        self.key = f"unix:{uds}" if uds else f"{address}:{port}"
        self.locality = locality
        self.priority = priority
        self.weight = max(weight, 1)
        self._healthy = healthy
        self.labels = labels or {}
        self.tls_match: dict[str, str] = {}  # its envoy.transport_socket_match metadata
        self.monitor = HostMonitor()
        self.active = 0  # requests in flight
        self.requests = 0  # lifetime attempts

    @property
    def healthy(self) -> bool:
        return self._healthy

    @healthy.setter
    def healthy(self, value: bool) -> None:
        if value != self._healthy:
            self._healthy = value
            Availability.changed()

    @property
    def available(self) -> bool:
        return self._healthy and not self.monitor.ejected

    def __repr__(self) -> str:
        return f"Host({self.key}, priority={self.priority}, locality={self.locality!r})"


def hash_key(text: str) -> int:
    """A 64-bit hash that is stable across processes (unlike ``hash``)."""
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big")


@dataclass(frozen=True, slots=True)
class BalancerConfig:
    policy: int = cluster_pb2.Cluster.ROUND_ROBIN
    panic_threshold: float = 50.0
    locality_weighted: bool = False
    ring_size: int = 1024
    maglev_table_size: int = 65537
    locality_weights: dict[str, int] = field(default_factory=dict)


class _SmoothRoundRobin:
    """Weighted round robin with even interleaving, over a changing set of candidates whose
    weights may change between picks (as least request's do)."""

    def __init__(self) -> None:
        self._current: dict[str, float] = {}

    def pick(
        self, candidates: Sequence[Any], weight: Callable[[Any], float] = lambda h: h.weight
    ) -> Any:
        total = 0.0
        best = None
        best_value = 0.0
        current = self._current
        for candidate in candidates:
            w = weight(candidate)
            value = current.get(candidate.key, 0.0) + w
            current[candidate.key] = value
            total += w
            if best is None or value > best_value:
                best, best_value = candidate, value
        assert best is not None
        current[best.key] = best_value - total
        return best


class Balancer:
    """Picks hosts for one cluster. Thread-safe; ``clock``-free (health comes from hosts)."""

    def __init__(self, config: BalancerConfig, rng: random.Random) -> None:
        self.config = config
        self._rng = rng
        self._lock = threading.Lock()
        self._round_robin = _SmoothRoundRobin()
        self._locality_rr = _SmoothRoundRobin()
        self._ring_cache: tuple[tuple[str, ...], list[int], list[Host]] | None = None
        self._maglev_cache: tuple[tuple[str, ...], list[Host]] | None = None
        self._hosts: list[Host] = []
        self._levels: list[list[Host]] = []
        # (levels' available hosts, their health) until a host's availability changes
        self._view: tuple[list[list[Host]], list[float]] | None = None
        self._view_epoch = -1
        self._next = 0  # plain round robin over equally weighted hosts

    def set_hosts(self, hosts: list[Host]) -> None:
        with self._lock:
            self._hosts = hosts
            levels: dict[int, list[Host]] = {}
            for host in hosts:
                levels.setdefault(host.priority, []).append(host)
            self._levels = [levels[p] for p in sorted(levels)]
            self._ring_cache = self._maglev_cache = None
            self._view = None

    def _availability(self) -> tuple[list[list[Host]], list[float]]:
        view = self._view
        if view is None or self._view_epoch != Availability.epoch:
            self._view_epoch = Availability.epoch
            available = [[h for h in level if h.available] for level in self._levels]
            health = [
                min(100.0, OVERPROVISIONING * 100.0 * len(ok) / len(level))
                for ok, level in zip(available, self._levels, strict=True)
            ]
            view = self._view = (available, health)
        return view

    @property
    def hosts(self) -> list[Host]:
        return self._hosts

    def pick(
        self,
        key: int | None = None,
        accept: Callable[[Host], bool] | None = None,
        attempts: int = 1,
    ) -> Host | None:
        """A host for one attempt; ``accept`` may refuse hosts (tried before, or at their
        limit), in which case up to ``attempts`` picks are made, as Envoy's host selection
        retries are."""
        choice = None
        for _ in range(max(attempts, 1)):
            choice = self._pick_once(key)
            if choice is None or accept is None or accept(choice):
                return choice
            if key is not None:
                key = hash_key(str(key))  # rehash to move along the ring
        return choice

    def _pick_once(self, key: int | None) -> Host | None:
        with self._lock:
            if not self._levels:
                return None
            available_by_level, health = self._availability()
            if len(health) == 1 and health[0] == 100.0 and not self.config.locality_weighted:
                # The common case: one level, fully available.
                return self._choose_host(available_by_level[0], key)
            index, total_health = self._choose_level(health)
            level = self._levels[index]
            available = available_by_level[index]
            # Envoy: a level panics (routes to all its hosts, healthy or not) when its health
            # is below the threshold, unless the levels together are fully available.
            panic = (
                total_health < 100
                and 100.0 * len(available) / len(level) < self.config.panic_threshold
            )
            candidates = level if panic else available
            if not candidates:
                return None  # no healthy upstream, and panic mode is off
            if self.config.locality_weighted:
                candidates = self._choose_locality(level, candidates, panic)
            return self._choose_host(candidates, key)

    def _choose_level(self, health: list[float]) -> tuple[int, float]:
        """A priority level by Envoy's priority load, and the levels' total health."""
        total = sum(health)
        if len(health) == 1:
            return 0, min(total, 100.0)
        levels = self._levels
        if total == 0:
            loads = [float(len(level)) for level in levels]  # total panic: by host count
        elif total < 100:
            loads = health  # normalised below by their sum
        else:
            loads, remaining = [], 100.0
            for value in health:
                share = min(remaining, value)
                loads.append(share)
                remaining -= share
        point = self._rng.random() * sum(loads)
        for index, load in enumerate(loads):
            if point < load:
                return index, min(total, 100.0)
            point -= load
        return len(levels) - 1, min(total, 100.0)

    def _choose_locality(
        self, level: list[Host], candidates: list[Host], panic: bool
    ) -> list[Host]:
        groups: dict[str, list[Host]] = {}
        for host in candidates:
            groups.setdefault(host.locality, []).append(host)
        if len(groups) == 1:
            return candidates
        sizes: dict[str, int] = {}
        for host in level:
            sizes[host.locality] = sizes.get(host.locality, 0) + 1
        weights = self.config.locality_weights

        def effective(group: _LocalityHost) -> float:
            # Envoy: a locality's weight scales with its availability (overprovisioned).
            if panic:
                return group.weight
            availability = len(groups[group.key]) / sizes[group.key]
            return group.weight * min(1.0, OVERPROVISIONING * availability)

        pseudo = [
            _LocalityHost(name, weights.get(name, 1)) for name in sorted(groups)
            if weights.get(name, 1) > 0
        ]  # fmt: skip
        if not pseudo:
            return candidates
        chosen = self._locality_rr.pick(pseudo, effective)
        return groups[chosen.key]

    def _choose_host(self, candidates: list[Host], key: int | None) -> Host:
        if len(candidates) == 1:
            return candidates[0]
        policy = self.config.policy
        if policy == cluster_pb2.Cluster.RING_HASH and key is not None:
            return self._ring(candidates, key)
        if policy == cluster_pb2.Cluster.MAGLEV and key is not None:
            return self._maglev(candidates, key)
        if policy == cluster_pb2.Cluster.LEAST_REQUEST:
            return self._least_request(candidates)
        if policy in (
            cluster_pb2.Cluster.RANDOM,
            cluster_pb2.Cluster.RING_HASH,
            cluster_pb2.Cluster.MAGLEV,
        ):
            return self._weighted_random(candidates)
        if self._equal_weights(candidates):
            self._next += 1
            return candidates[self._next % len(candidates)]
        picked: Host = self._round_robin.pick(candidates)
        return picked

    @staticmethod
    def _equal_weights(candidates: list[Host]) -> bool:
        first = candidates[0].weight
        return all(h.weight == first for h in candidates)

    def _least_request(self, candidates: list[Host]) -> Host:
        if len({h.weight for h in candidates}) > 1:
            # Envoy's weighted least request: hosts scheduled by weight / (active + 1).
            chosen: Host = self._round_robin.pick(candidates, lambda h: h.weight / (h.active + 1))
            return chosen
        count = len(candidates)
        i = self._rng.randrange(count)
        j = self._rng.randrange(count - 1)
        first, second = candidates[i], candidates[j + 1 if j >= i else j]
        return first if first.active <= second.active else second

    def _weighted_random(self, candidates: list[Host]) -> Host:
        return self._rng.choices(candidates, weights=[h.weight for h in candidates])[0]

    def _ring(self, candidates: list[Host], key: int) -> Host:
        names = tuple(h.key for h in candidates)
        cached = self._ring_cache
        if cached is None or cached[0] != names:
            total = sum(h.weight for h in candidates)
            points: list[tuple[int, Host]] = []
            for host in candidates:
                replicas = max(1, -(-self.config.ring_size * host.weight // total))
                points.extend((hash_key(f"{host.key}_{i}"), host) for i in range(replicas))
            points.sort(key=lambda p: p[0])
            cached = (names, [p[0] for p in points], [p[1] for p in points])
            self._ring_cache = cached
        _, hashes, owners = cached
        index = bisect.bisect_left(hashes, key)
        return owners[index % len(owners)]

    def _maglev(self, candidates: list[Host], key: int) -> Host:
        names = tuple(h.key for h in candidates)
        cached = self._maglev_cache
        if cached is None or cached[0] != names:
            cached = (names, _maglev_table(candidates, self.config.maglev_table_size))
            self._maglev_cache = cached
        table = cached[1]
        return table[key % len(table)]


@dataclass(frozen=True, slots=True)
class _LocalityHost:
    key: str
    weight: int


def _maglev_table(hosts: list[Host], size: int) -> list[Host]:
    """Maglev's lookup table (Eisenbud et al.), weighted by host weight."""
    offsets = [hash_key(h.key + "#offset") % size for h in hosts]
    skips = [hash_key(h.key + "#skip") % (size - 1) + 1 for h in hosts]
    nexts = [0] * len(hosts)
    table: list[Host | None] = [None] * size
    filled = 0
    max_weight = max(h.weight for h in hosts)
    targets = [0.0] * len(hosts)
    while True:
        for i, host in enumerate(hosts):
            targets[i] += host.weight / max_weight
            while targets[i] >= 1:
                targets[i] -= 1
                while True:
                    slot = (offsets[i] + nexts[i] * skips[i]) % size
                    nexts[i] += 1
                    if table[slot] is None:
                        table[slot] = host
                        filled += 1
                        break
                if filled == size:
                    return [h for h in table if h is not None]
