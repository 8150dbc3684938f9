"""xDS v3: the translator from Istio configuration, the resources every data plane reads, and
how a data plane introduces itself to the control plane."""

from ._node import HEALTH_INFO_TYPE, NodeError, Registration, node_from_proto, node_to_proto
from ._rbac import (
    DRY_RUN_ANNOTATION,
    RBAC_FILTER,
    RbacFilters,
    policy_applies,
    rbac_filters,
    rbac_policy_name,
)
from ._snapshot import (
    CLUSTER,
    ENDPOINT,
    FLAVORS,
    LISTENER,
    MESSAGE_TYPES,
    ROUTE,
    TYPE_URLS,
    Locality,
    Node,
    Snapshot,
)
from ._translate import (
    DEFAULT_RETRY_ON,
    HTTP_PROXY_LISTENER,
    TranslationCache,
    cluster_name,
    labels_read,
    parse_cluster_name,
    translate,
    translation_key,
)

__all__ = [
    "CLUSTER",
    "DEFAULT_RETRY_ON",
    "DRY_RUN_ANNOTATION",
    "ENDPOINT",
    "FLAVORS",
    "HEALTH_INFO_TYPE",
    "HTTP_PROXY_LISTENER",
    "LISTENER",
    "MESSAGE_TYPES",
    "RBAC_FILTER",
    "ROUTE",
    "TYPE_URLS",
    "Locality",
    "Node",
    "NodeError",
    "RbacFilters",
    "Registration",
    "Snapshot",
    "TranslationCache",
    "cluster_name",
    "labels_read",
    "node_from_proto",
    "node_to_proto",
    "parse_cluster_name",
    "policy_applies",
    "rbac_filters",
    "rbac_policy_name",
    "translate",
    "translation_key",
]
