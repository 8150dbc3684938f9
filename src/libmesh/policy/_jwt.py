"""JWT validation as Envoy's ``jwt_authn`` filter does it for Istio's RequestAuthentication: find
the token (headers with a prefix, query parameters), check its signature against the issuer's
JWKS, then issuer, audiences and times. Failures carry Envoy's own messages ("Jwt is expired",
"Jwt verification fails", …), which are what a caller sees in the 401's body.

Pure: JWKS documents come in as text (fetching and caching them is the caller's business), and
the clock is an argument.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

__all__ = ["Jwks", "JwtError", "JwtProvider", "ValidatedJwt"]

_HASHES: dict[str, Callable[[], hashes.HashAlgorithm]] = {
    "256": hashes.SHA256,
    "384": hashes.SHA384,
    "512": hashes.SHA512,
}
_CURVES: dict[str, Callable[[], ec.EllipticCurve]] = {
    "P-256": ec.SECP256R1,
    "P-384": ec.SECP384R1,
    "P-521": ec.SECP521R1,
}


class JwtError(ValueError):
    """A token that is not accepted; the message is Envoy's for the same failure."""


def _b64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _integer(text: str) -> int:
    return int.from_bytes(_b64(text), "big")


@dataclass(frozen=True)
class Jwks:
    """An issuer's public keys (a JWKS document), by ``kid``."""

    keys: tuple[tuple[str, str, Any], ...]  # (kid, alg or "", public key)

    @classmethod
    def parse(cls, text: str) -> Jwks:
        try:
            document = json.loads(text)
            # a JWK Set, or one JSON Web Key (RequestAuthentication's jwks may be either)
            entries = document.get("keys", [document])
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise JwtError(f"Jwks is not a JSON object with keys: {exc}") from exc
        keys = []
        for entry in entries:
            try:
                key = _public_key(entry)
            except (KeyError, ValueError, TypeError, binascii.Error):
                continue  # a key we cannot use is skipped, as Envoy does
            if key is not None:
                keys.append((str(entry.get("kid", "")), str(entry.get("alg", "")), key))
        if not keys:
            raise JwtError("Jwks doesn't have any usable key (RSA or EC)")
        return cls(tuple(keys))

    def candidates(self, kid: str | None, alg: str) -> list[Any]:
        return [
            key
            for key_id, key_alg, key in self.keys
            if (kid is None or not key_id or key_id == kid) and (not key_alg or key_alg == alg)
        ]

    def has_kid(self, kid: str) -> bool:
        return any(key_id == kid for key_id, _, _ in self.keys)


def _public_key(entry: Mapping[str, Any]) -> Any:
    kty = entry.get("kty")
    if kty == "RSA":
        return rsa.RSAPublicNumbers(_integer(entry["e"]), _integer(entry["n"])).public_key()
    if kty == "EC":
        curve = _CURVES[entry["crv"]]()
        return ec.EllipticCurvePublicNumbers(
            _integer(entry["x"]), _integer(entry["y"]), curve
        ).public_key()
    return None


@dataclass(frozen=True)
class ValidatedJwt:
    """A token that passed: its claims, and Istio's request principal ``iss/sub``."""

    claims: Mapping[str, Any]
    token: str

    @property
    def principal(self) -> str:
        return f"{self.claims.get('iss', '')}/{self.claims.get('sub', '')}"

    @property
    def audiences(self) -> tuple[str, ...]:
        audience = self.claims.get("aud")
        if isinstance(audience, str):
            return (audience,)
        return tuple(str(a) for a in audience) if isinstance(audience, list) else ()


@dataclass(frozen=True)
class JwtProvider:
    """One RequestAuthentication ``jwtRules`` entry, with its issuer's keys."""

    issuer: str
    jwks: Jwks
    audiences: tuple[str, ...] = ()
    # where the token is: (header, prefix) pairs; Istio's default is Authorization: Bearer
    from_headers: tuple[tuple[str, str], ...] = (("authorization", "Bearer "),)
    from_params: tuple[str, ...] = ("access_token",)
    clock_skew: float = 60.0  # seconds, Envoy's default
    forward_original_token: bool = False
    claim_to_headers: tuple[tuple[str, str], ...] = field(default=())

    def extract(self, headers: Mapping[str, str], query: Mapping[str, str]) -> str | None:
        """The token the request carries where this provider looks, if any."""
        return _extract(self.from_headers, self.from_params, headers, query)

    def validate(self, token: str, now: float) -> ValidatedJwt:
        """Check ``token``'s signature, issuer, audiences and times at ``now`` (Unix time);
        :class:`JwtError` with Envoy's message when it fails."""
        parts = token.split(".")
        if len(parts) != 3:
            raise JwtError("Jwt is not in the form of Header.Payload.Signature")
        try:
            header = json.loads(_b64(parts[0]))
            claims = json.loads(_b64(parts[1]))
            signature = _b64(parts[2])
        except (ValueError, binascii.Error) as exc:
            raise JwtError("Jwt header or payload is an invalid JSON") from exc
        if not isinstance(header, dict) or not isinstance(claims, dict):
            raise JwtError("Jwt header or payload is an invalid JSON")
        if claims.get("iss") != self.issuer:
            raise JwtError("Jwt issuer is not configured")
        alg = str(header.get("alg", ""))
        kid = header.get("kid")
        keys = self.jwks.candidates(str(kid) if kid is not None else None, alg)
        if not keys:
            raise JwtError("Jwks doesn't have key to match kid or alg from Jwt")
        signing_input = f"{parts[0]}.{parts[1]}".encode("ascii")
        if not any(_verifies(key, alg, signing_input, signature) for key in keys):
            raise JwtError("Jwt verification fails")
        expires = claims.get("exp")
        if isinstance(expires, (int, float)) and now > expires + self.clock_skew:
            raise JwtError("Jwt is expired")
        not_before = claims.get("nbf")
        if isinstance(not_before, (int, float)) and now + self.clock_skew < not_before:
            raise JwtError("Jwt not yet valid")
        validated = ValidatedJwt(claims, token)
        if self.audiences and not set(validated.audiences) & set(self.audiences):
            raise JwtError("Audiences in Jwt are not allowed")
        return validated

    def needs_refresh(self, token: str) -> bool:
        """Whether ``token`` names a ``kid`` these keys lack: the JWKS may have rotated, so
        the caller should fetch it again (once) before refusing."""
        try:
            header = json.loads(_b64(token.split(".")[0]))
        except (ValueError, binascii.Error, IndexError):
            return False
        kid = header.get("kid") if isinstance(header, dict) else None
        return isinstance(kid, str) and not self.jwks.has_kid(kid)


def _verifies(key: Any, alg: str, data: bytes, signature: bytes) -> bool:
    family, size = alg[:2], alg[2:]
    digest = _HASHES.get(size)
    if digest is None:
        return False
    try:
        if family == "RS" and isinstance(key, rsa.RSAPublicKey):
            key.verify(signature, data, padding.PKCS1v15(), digest())
        elif family == "PS" and isinstance(key, rsa.RSAPublicKey):
            key.verify(
                signature,
                data,
                padding.PSS(mgf=padding.MGF1(digest()), salt_length=padding.PSS.DIGEST_LENGTH),
                digest(),
            )
        elif family == "ES" and isinstance(key, ec.EllipticCurvePublicKey):
            half = len(signature) // 2
            der = encode_dss_signature(
                int.from_bytes(signature[:half], "big"), int.from_bytes(signature[half:], "big")
            )
            key.verify(der, data, ec.ECDSA(digest()))
        else:
            return False
    except InvalidSignature:
        return False
    return True


def providers_from(rules: Sequence[Any], jwks_by_issuer: Mapping[str, str]) -> list[JwtProvider]:
    """Providers for RequestAuthentication ``jwtRules`` (config model objects), with each
    issuer's JWKS text (inline ``jwks``, else from ``jwks_by_issuer``)."""
    providers = []
    for rule in rules:
        text = rule.jwks or jwks_by_issuer.get(rule.issuer or "")
        if not text:
            continue
        headers = tuple((h.name.lower(), h.prefix or "") for h in rule.from_headers) or (
            ("authorization", "Bearer "),
        )
        params = tuple(rule.from_params) or (("access_token",) if not rule.from_headers else ())
        providers.append(
            JwtProvider(
                issuer=rule.issuer or "",
                jwks=Jwks.parse(text),
                audiences=tuple(rule.audiences),
                from_headers=headers,
                from_params=params,
                forward_original_token=bool(rule.forward_original_token),
                claim_to_headers=tuple((c.header, c.claim) for c in rule.output_claim_to_headers),
            )
        )
    return providers


# -- the jwt_authn filter, as xDS carries it -----------------------------------------------------


@dataclass(frozen=True)
class JwtRule:
    """One provider of a ``jwt_authn`` filter: where its token is, whose it must be, where its
    keys are (``jwks`` inline, else fetched from ``jwks_uri``), what to do with it after."""

    name: str
    issuer: str
    audiences: tuple[str, ...]
    from_headers: tuple[tuple[str, str], ...]
    from_params: tuple[str, ...]
    jwks: Jwks | None
    jwks_uri: str
    fetch_timeout: float
    cache_duration: float
    forward: bool
    claim_to_headers: tuple[tuple[str, str], ...]

    def provider(self, jwks: Jwks) -> JwtProvider:
        return JwtProvider(
            issuer=self.issuer,
            jwks=jwks,
            audiences=self.audiences,
            from_headers=self.from_headers,
            from_params=self.from_params,
            forward_original_token=self.forward,
            claim_to_headers=self.claim_to_headers,
        )

    def extract(self, headers: Mapping[str, str], query: Mapping[str, str]) -> str | None:
        return _extract(self.from_headers, self.from_params, headers, query)


@dataclass(frozen=True)
class JwtPolicy:
    """A workload's RequestAuthentication, compiled from its ``jwt_authn`` filter: the
    providers, and whether a request without any token may pass (Istio's ``allow_missing``)."""

    rules: tuple[JwtRule, ...]
    allow_missing: bool = True

    @classmethod
    def of(cls, config: Any) -> JwtPolicy:
        """From an ``envoy.extensions.filters.http.jwt_authn.v3.JwtAuthentication``; raises
        :class:`JwtError` for what libmesh cannot honour (the listener is then NACKed)."""
        rules = []
        for name, provider in sorted(config.providers.items()):
            jwks = None
            uri = ""
            timeout = 5.0
            cache = 600.0
            if provider.HasField("local_jwks"):
                try:
                    jwks = Jwks.parse(provider.local_jwks.inline_string)
                except JwtError:
                    # as Envoy: the configuration stands, and this provider's tokens fail
                    # ("Jwks doesn't have key to match kid or alg from Jwt")
                    jwks = Jwks(())
            elif provider.HasField("remote_jwks"):
                remote = provider.remote_jwks
                uri = remote.http_uri.uri
                if remote.http_uri.HasField("timeout"):
                    timeout = remote.http_uri.timeout.ToNanoseconds() / 1e9 or timeout
                if remote.HasField("cache_duration"):
                    cache = remote.cache_duration.ToNanoseconds() / 1e9 or cache
            else:
                raise JwtError(f"jwt provider {name}: no local_jwks and no remote_jwks")
            rules.append(
                JwtRule(
                    name=name,
                    issuer=provider.issuer,
                    audiences=tuple(provider.audiences),
                    from_headers=tuple(
                        (h.name.lower(), h.value_prefix) for h in provider.from_headers
                    ),
                    from_params=tuple(provider.from_params),
                    jwks=jwks,
                    jwks_uri=uri,
                    fetch_timeout=timeout,
                    cache_duration=cache,
                    forward=provider.forward,
                    claim_to_headers=tuple(
                        (c.header_name, c.claim_name) for c in provider.claim_to_headers
                    ),
                )
            )
        allow_missing = (
            any(
                requirement.HasField("allow_missing")
                or requirement.HasField("allow_missing_or_failed")
                for rule in config.rules
                for requirement in rule.requires.requires_any.requirements
            )
            or not config.rules
        )
        return cls(tuple(rules), allow_missing)

    def token(
        self, headers: Mapping[str, str], query: Mapping[str, str]
    ) -> tuple[JwtRule, str] | None:
        """The token the request carries, with the provider to check it: among the providers
        that find one, the one whose issuer the token names (as Envoy picks by ``iss``)."""
        found = [(rule, t) for rule in self.rules if (t := rule.extract(headers, query))]
        if len(found) > 1:
            issuer = _unverified_issuer(found[0][1])
            for candidate in found:
                if candidate[0].issuer == issuer:
                    return candidate
        return found[0] if found else None


def _extract(
    from_headers: Sequence[tuple[str, str]],
    from_params: Sequence[str],
    headers: Mapping[str, str],
    query: Mapping[str, str],
) -> str | None:
    for name, prefix in from_headers:
        value = headers.get(name.lower())
        if value is not None and value.startswith(prefix):
            return value[len(prefix) :].strip()
    for name in from_params:
        if name in query:
            return query[name]
    return None


def _unverified_issuer(token: str) -> str:
    """``iss`` of a token, read without checking anything (to pick the provider)."""
    try:
        claims = json.loads(_b64(token.split(".")[1]))
    except (ValueError, binascii.Error, IndexError):
        return ""
    return str(claims.get("iss", "")) if isinstance(claims, dict) else ""
