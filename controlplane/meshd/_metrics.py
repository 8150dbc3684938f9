"""meshd's metrics, under Istio's ``pilot_*`` names where istiod has the same measure."""

from __future__ import annotations

from libmesh.telemetry import MetricsRegistry
from libmesh.xds import CLUSTER, ENDPOINT, LISTENER, ROUTE

__all__ = ["SHORT_TYPES", "Metrics"]

SHORT_TYPES = {CLUSTER: "cds", ENDPOINT: "eds", LISTENER: "lds", ROUTE: "rds"}

_SECONDS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class Metrics:
    """One registry per meshd, so that several can run in one process."""

    def __init__(self) -> None:
        r = self.registry = MetricsRegistry()
        self.connected = r.gauge(
            "pilot_xds", "Number of endpoints connected to this pilot using XDS."
        )
        self.pushes = r.counter(
            "pilot_xds_pushes", "Pilot build and send errors for lds, rds, cds and eds.", ["type"]
        )
        self.push_time = r.histogram(
            "pilot_xds_push_time",
            "Total time in seconds Pilot takes to push lds, rds, cds and eds.",
            ["type"],
            buckets=_SECONDS,
        )
        self.convergence = r.histogram(
            "pilot_proxy_convergence_time",
            "Delay in seconds between config change and a proxy receiving all required "
            "configuration.",
            buckets=_SECONDS,
        )
        self.rejects = r.counter(
            "pilot_total_xds_rejects",
            "Total number of XDS responses from pilot rejected by proxy.",
            ["type"],
        )
        self.expired_nonce = r.counter(
            "pilot_xds_expired_nonce",
            "Total number of XDS requests with an expired nonce.",
            ["type"],
        )
        self.push_triggers = r.counter(
            "pilot_push_triggers",
            "Total number of times a push was triggered, labeled by reason for the push.",
            ["type"],
        )
        self.services = r.gauge("pilot_services", "Total services known to pilot.")
        self.virtual_services = r.gauge(
            "pilot_virt_services", "Total virtual services known to pilot."
        )
        self.destination_rules = r.gauge(
            "pilot_destrules", "Total destination rules known to pilot."
        )
        self.registered = r.gauge(
            "meshd_registered_workloads",
            "Workloads registered by connecting (Istio's auto-registered WorkloadEntries).",
        )
        self.config_loads = r.counter(
            "meshd_config_loads",
            "Loads of the configuration store, by result (accepted or rejected).",
            ["result"],
        )
        self.config_errors = r.gauge(
            "meshd_config_errors",
            "Errors in the configuration as it is now in the store (0 while it is being served).",
        )
        self.config_last_reload_successful = r.gauge(
            "meshd_config_last_reload_successful",
            "Whether the last change to the configuration was accepted (1) or rejected (0).",
        )
        self.translate_time = r.histogram(
            "meshd_translate_seconds",
            "Time to translate the configuration for one kind of client.",
            buckets=_SECONDS,
        )
        for short in SHORT_TYPES.values():
            self.pushes.inc(0, type=short)
            self.rejects.inc(0, type=short)
        for result in ("accepted", "rejected"):
            self.config_loads.inc(0, result=result)
