"""Workloads that register themselves by connecting.

A node that declares its ports in its metadata becomes an endpoint of every service whose
selector matches its labels, for as long as its stream lives and a grace period after (so a
reconnect, or a meshd restart, does not flap it out of every client's endpoints). Its health
reports flow into EDS. This is Istio's WorkloadGroup auto-registration, without the group.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, replace

from libmesh.config import Workload
from libmesh.xds import Node, Registration

__all__ = ["Registrations"]

logger = logging.getLogger("meshd")


@dataclass
class _Entry:
    workload: Workload
    streams: int = 0
    disconnected_at: float | None = None


class Registrations:
    """The registered workloads, by namespace and name. Not thread-safe: meshd calls it from
    its event loop only."""

    def __init__(self, *, grace: float, clock: Callable[[], float]) -> None:
        self.grace = grace
        self._clock = clock
        self._entries: dict[tuple[str, str], _Entry] = {}
        self._workloads: tuple[Workload, ...] = ()

    @property
    def workloads(self) -> tuple[Workload, ...]:
        return self._workloads

    def connect(self, node: Node, registration: Registration, peer_address: str) -> tuple[str, str]:
        """A stream of a registering node opened; returns the key to report on it with."""
        locality = str(node.locality)
        workload = Workload(
            name=registration.name,
            namespace=node.namespace,
            address=registration.address or peer_address,
            ports=registration.ports,
            labels=node.labels,
            locality=locality,
            service_account=node.service_account,
        )
        key = (node.namespace, registration.name)
        entry = self._entries.get(key)
        if entry is None:
            entry = self._entries[key] = _Entry(workload)
            logger.info(
                "meshd: workload %s/%s registered at %s (ports %s)",
                node.namespace,
                registration.name,
                workload.address,
                ", ".join(f"{n}={p}" for n, p in registration.ports.items()),
            )
        else:
            entry.workload = replace(workload, healthy=entry.workload.healthy)
        entry.streams += 1
        entry.disconnected_at = None
        self._refresh()
        return key

    def disconnect(self, key: tuple[str, str]) -> None:
        entry = self._entries.get(key)
        if entry is None:
            return
        entry.streams -= 1
        if entry.streams <= 0:
            entry.disconnected_at = self._clock()

    def report_health(self, key: tuple[str, str], healthy: bool, message: str = "") -> bool:
        """Record a health report; whether it changed anything."""
        entry = self._entries.get(key)
        if entry is None or entry.workload.healthy == healthy:
            return False
        entry.workload = replace(entry.workload, healthy=healthy)
        namespace, name = key
        if healthy:
            logger.info("meshd: workload %s/%s reports healthy", namespace, name)
        else:
            logger.warning(
                "meshd: workload %s/%s reports unhealthy%s",
                namespace,
                name,
                f": {message}" if message else "",
            )
        self._refresh()
        return True

    def expire(self) -> bool:
        """Forget workloads disconnected for longer than the grace period; whether any went."""
        now = self._clock()
        gone = [
            key
            for key, entry in self._entries.items()
            if entry.disconnected_at is not None and now - entry.disconnected_at >= self.grace
        ]
        for key in gone:
            del self._entries[key]
            logger.info("meshd: workload %s/%s deregistered (disconnected)", *key)
        if gone:
            self._refresh()
        return bool(gone)

    def next_expiry(self) -> float | None:
        """Seconds until the next workload may expire, or ``None`` when none is waiting to."""
        times = [e.disconnected_at for e in self._entries.values() if e.disconnected_at is not None]
        if not times:
            return None
        return max(0.0, min(times) + self.grace - self._clock())

    def _refresh(self) -> None:
        self._workloads = tuple(e.workload for _, e in sorted(self._entries.items()))
