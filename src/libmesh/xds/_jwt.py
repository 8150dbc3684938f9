"""RequestAuthentication as Envoy's ``jwt_authn`` HTTP filter, the way Istio builds it for a
workload's inbound side: one provider per ``jwtRules`` entry of every policy that applies (root
namespace, the workload's namespace, a selector matching its labels), and one requirement —
any provider, or no token at all (``allow_missing``). So a request with an invalid token is
refused (401), a request without one passes authentication, and AuthorizationPolicy's
``requestPrincipals`` decide whether a token is required.

Keys: an inline ``jwks`` becomes ``local_jwks``; a ``jwksUri`` becomes ``remote_jwks``, which
the data plane fetches and caches (libmesh refetches once when a token names an unknown
``kid``). The validated payload is put in the filter's metadata under ``payload``, where the
RBAC filter's ``request.auth.*`` matchers read it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from envoy.extensions.filters.http.jwt_authn.v3 import config_pb2 as jwt_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from google.protobuf import any_pb2

from ..config import Resource
from ._rbac import JWT_AUTHN_FILTER, JWT_PAYLOAD_KEY, policy_applies

__all__ = ["jwt_authn_filter"]

_DEFAULT_TIMEOUT_SECONDS = 5  # Istio's default for fetching a jwksUri


def jwt_authn_filter(
    policies: Iterable[Resource[Any]],
    *,
    namespace: str,
    labels: Mapping[str, str],
    root_namespace: str = "istio-system",
) -> hcm_pb2.HttpFilter | None:
    """The ``jwt_authn`` filter for a workload, or ``None`` when no RequestAuthentication
    applies to it."""
    config = jwt_pb2.JwtAuthentication()
    names: list[str] = []
    for policy in policies:
        if policy.kind != "RequestAuthentication" or not policy_applies(
            policy, namespace=namespace, labels=labels, root_namespace=root_namespace
        ):
            continue
        for index, rule in enumerate(policy.spec.jwt_rules):
            name = f"origins-{policy.namespace}-{policy.name}-{index}"
            config.providers[name].CopyFrom(_provider(rule))
            names.append(name)
    if not names:
        return None
    requirement = config.rules.add()
    requirement.match.prefix = "/"
    alternatives = requirement.requires.requires_any.requirements
    for name in names:
        alternatives.add(provider_name=name)
    alternatives.add().allow_missing.SetInParent()
    packed = any_pb2.Any()
    packed.Pack(config)
    return hcm_pb2.HttpFilter(name=JWT_AUTHN_FILTER, typed_config=packed)


def _provider(rule: Any) -> jwt_pb2.JwtProvider:
    provider = jwt_pb2.JwtProvider(issuer=rule.issuer or "", audiences=list(rule.audiences))
    if rule.jwks:
        provider.local_jwks.inline_string = rule.jwks
    elif rule.jwks_uri:
        remote = provider.remote_jwks
        remote.http_uri.uri = rule.jwks_uri
        remote.http_uri.cluster = rule.jwks_uri  # fetched by the data plane itself
        timeout = rule.timeout.nanos / 1e9 if rule.timeout is not None else 0
        seconds = timeout or _DEFAULT_TIMEOUT_SECONDS
        remote.http_uri.timeout.FromNanoseconds(int(seconds * 1e9))
        remote.cache_duration.FromSeconds(20 * 60)  # Istio's JWKS refresh interval
    if rule.from_headers:
        for header in rule.from_headers:
            provider.from_headers.add(name=header.name, value_prefix=header.prefix or "")
    if rule.from_params:
        provider.from_params.extend(rule.from_params)
    if not rule.from_headers and not rule.from_params:  # Istio's defaults
        provider.from_headers.add(name="Authorization", value_prefix="Bearer ")
        provider.from_params.append("access_token")
    provider.forward = bool(rule.forward_original_token)
    if rule.output_payload_to_header:
        provider.forward_payload_header = rule.output_payload_to_header
    for claim in rule.output_claim_to_headers:
        provider.claim_to_headers.add(header_name=claim.header, claim_name=claim.claim)
    provider.payload_in_metadata = JWT_PAYLOAD_KEY
    return provider
