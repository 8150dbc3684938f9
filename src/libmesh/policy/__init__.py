"""The engine: pure decisions built from xDS resources, shared by every transport."""

from ._authz import Authorizer, AuthzConfigError, AuthzRequest, Decision, DryRun
from ._balancer import Balancer, BalancerConfig, Host, hash_key
from ._cluster import Admission, Breaker, ClusterState, ClusterStats, Limits
from ._engine import DELIVER, Attempt, Backoff, Call, Deliver, Engine, Fail, LocalReply
from ._outlier import EjectionReason, HostMonitor, OutlierConfig, OutlierDetector
from ._request import RequestInfo, RequestView
from ._retry import Failure, RetryPolicy
from ._routing import DirectResponse, Forward, Redirect, RouteTable, WeightedPicker

__all__ = [
    "DELIVER",
    "Admission",
    "Attempt",
    "Authorizer",
    "AuthzConfigError",
    "AuthzRequest",
    "Backoff",
    "Balancer",
    "BalancerConfig",
    "Breaker",
    "Call",
    "ClusterState",
    "ClusterStats",
    "Decision",
    "Deliver",
    "DirectResponse",
    "DryRun",
    "EjectionReason",
    "Engine",
    "Fail",
    "Failure",
    "Forward",
    "Host",
    "HostMonitor",
    "Limits",
    "LocalReply",
    "OutlierConfig",
    "OutlierDetector",
    "Redirect",
    "RequestInfo",
    "RequestView",
    "RetryPolicy",
    "RouteTable",
    "WeightedPicker",
    "hash_key",
]
