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
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl

from ..policy._jwt import JwtError, JwtPolicy, JwtRule, ValidatedJwt
from ..transport._jwks import JwksCache

__all__ = ["Authenticated", "authenticate", "authenticate_async", "unauthorized_headers"]


@dataclass(frozen=True)
class Authenticated:
    """What authentication made of a request. ``error``: refuse with 401 and this message."""

    jwt: ValidatedJwt | None = None
    error: str = ""
    remove_header: str = ""  # the token's header, when it is not forwarded
    add_headers: tuple[tuple[str, str], ...] = field(default=())

    @property
    def principal(self) -> str:
        return self.jwt.principal if self.jwt is not None else ""

    @property
    def claims(self) -> Mapping[str, Any] | None:
        return self.jwt.claims if self.jwt is not None else None


NOTHING = Authenticated()


def _query(query_string: str) -> dict[str, str]:
    return dict(parse_qsl(query_string, keep_blank_values=True)) if query_string else {}


def _check(rule: JwtRule, token: str, keys: Any) -> ValidatedJwt:
    return rule.provider(keys).validate(token, time.time())


def _outcome(rule: JwtRule, validated: ValidatedJwt, headers: Mapping[str, str]) -> Authenticated:
    removed = ""
    if not rule.forward:
        removed = next((name for name, _ in rule.from_headers if name in headers), "")
    added = tuple(
        (header, str(validated.claims[claim]))
        for header, claim in rule.claim_to_headers
        if claim in validated.claims and isinstance(validated.claims[claim], (str, int, float))
    )
    return Authenticated(validated, "", removed, added)


def authenticate(
    policy: JwtPolicy, headers: Mapping[str, str], query_string: str, cache: JwksCache
) -> Authenticated:
    found = policy.token(headers, _query(query_string))
    if found is None:
        return NOTHING if policy.allow_missing else Authenticated(error="Jwt is missing")
    rule, token = found
    try:
        try:
            validated = _check(rule, token, cache.get(rule))
        except JwtError:
            if not rule.provider(cache.get(rule)).needs_refresh(token):
                raise
            validated = _check(rule, token, cache.get(rule, refetch=True))
    except JwtError as exc:
        return Authenticated(error=str(exc))
    return _outcome(rule, validated, headers)


async def authenticate_async(
    policy: JwtPolicy, headers: Mapping[str, str], query_string: str, cache: JwksCache
) -> Authenticated:
    found = policy.token(headers, _query(query_string))
    if found is None:
        return NOTHING if policy.allow_missing else Authenticated(error="Jwt is missing")
    rule, token = found
    try:
        try:
            validated = _check(rule, token, await cache.aget(rule))
        except JwtError:
            if not rule.provider(await cache.aget(rule)).needs_refresh(token):
                raise
            validated = _check(rule, token, await cache.aget(rule, refetch=True))
    except JwtError as exc:
        return Authenticated(error=str(exc))
    return _outcome(rule, validated, headers)


def unauthorized_headers(authority: str, path: str) -> list[tuple[str, str]]:
    """Envoy's 401 headers for a refused token."""
    return [
        ("content-type", "text/plain"),
        ("www-authenticate", f'Bearer realm="http://{authority}{path}", error="invalid_token"'),
    ]
