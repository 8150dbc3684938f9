"""RequestAuthentication in the inbound middlewares: find the request's token, check it with
the provider's keys (fetched by :class:`~libmesh.transport._jwks.JwksCache`, refetched once for
an unknown ``kid``), and say what the request becomes — Envoy's ``jwt_authn`` behaviour:

- no token: passes (Istio's ``allow_missing``); AuthorizationPolicy decides whether one is needed;
- an invalid token: 401 with Envoy's message and a ``www-authenticate`` header;
- a valid one: its claims go to authorization (``request.auth.*``) and to
  ``current_inbound().request_principal`` (``iss/sub``); the token header is removed unless
  ``forwardOriginalToken``; ``outputClaimToHeaders`` adds the claims as headers.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any
from urllib.parse import parse_qsl

from ..policy._inbound import NOTHING, Authenticated
from ..policy._jwt import JwtError, JwtPolicy, JwtRule, ValidatedJwt
from ..transport._jwks import JwksCache

__all__ = ["NOTHING", "Authenticated", "authenticate", "authenticate_async"]


def _query(query_string: str) -> dict[str, str]:
    return dict(parse_qsl(query_string, keep_blank_values=True)) if query_string else {}


def _check(rule: JwtRule, token: str, keys: Any) -> ValidatedJwt:
    return rule.provider(keys).validate(token, time.time())


def _claim(claims: Mapping[str, Any], name: str) -> str | None:
    """A claim as Envoy's ``claim_to_headers`` writes it: nested names with dots, booleans as
    ``true``/``false``, numbers and strings as they are; anything else is not written."""
    value: Any = claims
    for part in name.split("."):
        if not isinstance(value, Mapping) or part not in value:
            return None
        value = value[part]
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (str, int, float)):
        return str(value)
    return None


def _claim_headers(policy: JwtPolicy) -> tuple[str, ...]:
    return tuple(header.lower() for rule in policy.rules for header, _ in rule.claim_to_headers)


def _outcome(
    policy: JwtPolicy, rule: JwtRule, validated: ValidatedJwt, headers: Mapping[str, str]
) -> Authenticated:
    removed = _claim_headers(policy)
    if not rule.forward:
        removed += tuple(name for name, _ in rule.from_headers if name in headers)
    added = tuple(
        (header, value)
        for header, claim in rule.claim_to_headers
        if (value := _claim(validated.claims, claim)) is not None
    )
    return Authenticated(validated, "", removed, added)


def _without_token(policy: JwtPolicy) -> Authenticated:
    if not policy.allow_missing:
        return Authenticated(error="Jwt is missing")
    headers = _claim_headers(policy)
    return Authenticated(remove_headers=headers) if headers else NOTHING


def authenticate(
    policy: JwtPolicy, headers: Mapping[str, str], query_string: str, cache: JwksCache
) -> Authenticated:
    found = policy.token(headers, _query(query_string))
    if found is None:
        return _without_token(policy)
    rule, token = found
    try:
        keys = cache.get(rule)
        try:
            validated = _check(rule, token, keys)
        except JwtError:
            if not rule.provider(keys).needs_refresh(token):
                raise
            validated = _check(rule, token, cache.get(rule, refetch=True))
    except JwtError as exc:
        return Authenticated(error=str(exc))
    return _outcome(policy, rule, validated, headers)


async def authenticate_async(
    policy: JwtPolicy, headers: Mapping[str, str], query_string: str, cache: JwksCache
) -> Authenticated:
    found = policy.token(headers, _query(query_string))
    if found is None:
        return _without_token(policy)
    rule, token = found
    try:
        keys = await cache.aget(rule)
        try:
            validated = _check(rule, token, keys)
        except JwtError:
            if not rule.provider(keys).needs_refresh(token):
                raise
            validated = _check(rule, token, await cache.aget(rule, refetch=True))
    except JwtError as exc:
        return Authenticated(error=str(exc))
    return _outcome(policy, rule, validated, headers)
