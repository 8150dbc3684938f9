"""xDS v3: the translator from Istio configuration, and the resources every data plane reads."""

from ._snapshot import CLUSTER, ENDPOINT, LISTENER, ROUTE, TYPE_URLS, Locality, Node, Snapshot
from ._translate import DEFAULT_RETRY_ON, cluster_name, parse_cluster_name, translate

__all__ = [
    "CLUSTER",
    "DEFAULT_RETRY_ON",
    "ENDPOINT",
    "LISTENER",
    "ROUTE",
    "TYPE_URLS",
    "Locality",
    "Node",
    "Snapshot",
    "cluster_name",
    "parse_cluster_name",
    "translate",
]
