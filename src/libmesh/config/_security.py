"""The ``security.istio.io`` kinds: PeerAuthentication, AuthorizationPolicy, RequestAuthentication.

Names follow Istio's protos (``security/v1beta1/*.proto``) in Python spelling.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from .._duration import Duration
from .._frozen import EMPTY, FrozenMap
from ._networking import WorkloadSelector
from ._schema import Message, optional, required

__all__ = [
    "AuthorizationPolicy",
    "AuthorizationPolicyAction",
    "ClaimToHeader",
    "Condition",
    "ExtensionProvider",
    "JWTHeader",
    "JWTRule",
    "MutualTLS",
    "MutualTLSMode",
    "Operation",
    "PeerAuthentication",
    "PolicyTargetReference",
    "RequestAuthentication",
    "Rule",
    "RuleFrom",
    "RuleTo",
    "Source",
]


_GROUP = r"^$|^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
_KIND = r"^[a-zA-Z]([-a-zA-Z0-9]*[a-zA-Z0-9])?$"


@dataclass(frozen=True, slots=True, kw_only=True)
class PolicyTargetReference(Message):
    """A Kubernetes Gateway API style reference to the resource a policy attaches to."""

    group: str | None = optional(max_length=253, pattern=_GROUP)
    kind: str = required(min_length=1, max_length=63, pattern=_KIND)
    name: str = required(min_length=1, max_length=253)
    namespace: str | None = None


# -- PeerAuthentication --------------------------------------------------------------------------


class MutualTLSMode(enum.Enum):
    UNSET = "UNSET"
    DISABLE = "DISABLE"
    PERMISSIVE = "PERMISSIVE"
    STRICT = "STRICT"


@dataclass(frozen=True, slots=True, kw_only=True)
class MutualTLS(Message):
    mode: MutualTLSMode | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class PeerAuthentication(Message):
    """Whether a workload accepts plaintext, mTLS or both, mesh-wide, per namespace or per port."""

    selector: WorkloadSelector | None = None
    mtls: MutualTLS | None = None
    port_level_mtls: FrozenMap[str, MutualTLS] = EMPTY


# -- AuthorizationPolicy -------------------------------------------------------------------------


class AuthorizationPolicyAction(enum.Enum):
    ALLOW = "ALLOW"
    DENY = "DENY"
    AUDIT = "AUDIT"
    CUSTOM = "CUSTOM"


@dataclass(frozen=True, slots=True, kw_only=True)
class Source(Message):
    principals: tuple[str, ...] = ()
    not_principals: tuple[str, ...] = ()
    request_principals: tuple[str, ...] = ()
    not_request_principals: tuple[str, ...] = ()
    namespaces: tuple[str, ...] = ()
    not_namespaces: tuple[str, ...] = ()
    service_accounts: tuple[str, ...] = optional((), max_items=16, max_length=320)
    not_service_accounts: tuple[str, ...] = optional((), max_items=16, max_length=320)
    ip_blocks: tuple[str, ...] = ()
    not_ip_blocks: tuple[str, ...] = ()
    remote_ip_blocks: tuple[str, ...] = ()
    not_remote_ip_blocks: tuple[str, ...] = ()
    trust_domains: tuple[str, ...] = ()
    not_trust_domains: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True, kw_only=True)
class Operation(Message):
    hosts: tuple[str, ...] = ()
    not_hosts: tuple[str, ...] = ()
    ports: tuple[str, ...] = ()
    not_ports: tuple[str, ...] = ()
    methods: tuple[str, ...] = ()
    not_methods: tuple[str, ...] = ()
    paths: tuple[str, ...] = ()
    not_paths: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True, kw_only=True)
class RuleFrom(Message):
    source: Source | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class RuleTo(Message):
    operation: Operation | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class Condition(Message):
    key: str = required()
    values: tuple[str, ...] = ()
    not_values: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True, kw_only=True)
class Rule(Message):
    """Matches a request when its sources, operations and conditions all match."""

    from_: tuple[RuleFrom, ...] = optional((), max_items=512)
    to: tuple[RuleTo, ...] = ()
    when: tuple[Condition, ...] = ()


@dataclass(frozen=True, slots=True, kw_only=True)
class ExtensionProvider(Message):
    name: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class AuthorizationPolicy(Message):
    """Who may call what: ALLOW, DENY and AUDIT rules evaluated as Istio evaluates them."""

    __oneofs__ = (("provider",),)

    selector: WorkloadSelector | None = None
    target_ref: PolicyTargetReference | None = None
    target_refs: tuple[PolicyTargetReference, ...] = optional((), max_items=16)
    rules: tuple[Rule, ...] = optional((), max_items=512)
    action: AuthorizationPolicyAction | None = None
    provider: ExtensionProvider | None = None


# -- RequestAuthentication -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class JWTHeader(Message):
    name: str = required(min_length=1)
    prefix: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class ClaimToHeader(Message):
    header: str = required(min_length=1, pattern=r"^[-_A-Za-z0-9]+$")
    claim: str = required(min_length=1)


@dataclass(frozen=True, slots=True, kw_only=True)
class JWTRule(Message):
    issuer: str | None = optional(min_length=1)
    audiences: tuple[str, ...] = optional((), min_length=1)
    jwks_uri: str | None = optional(
        yaml="jwksUri", aliases=("jwks_uri",), min_length=1, max_length=2048
    )
    jwks: str | None = None
    from_headers: tuple[JWTHeader, ...] = ()
    from_params: tuple[str, ...] = optional((), min_length=1)
    output_payload_to_header: str | None = None
    from_cookies: tuple[str, ...] = optional((), min_length=1)
    forward_original_token: bool | None = None
    output_claim_to_headers: tuple[ClaimToHeader, ...] = ()
    timeout: Duration | None = None
    space_delimited_claims: tuple[str, ...] = optional((), max_items=64, min_length=1)


@dataclass(frozen=True, slots=True, kw_only=True)
class RequestAuthentication(Message):
    """Which JWTs a workload accepts, from which issuers, in which headers."""

    selector: WorkloadSelector | None = None
    target_ref: PolicyTargetReference | None = None
    target_refs: tuple[PolicyTargetReference, ...] = optional((), max_items=16)
    jwt_rules: tuple[JWTRule, ...] = optional((), max_items=4096)
