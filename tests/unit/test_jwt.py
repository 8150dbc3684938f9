"""JWT validation as Envoy's jwt_authn does it, with real keys: valid, expired, not yet valid,
wrong issuer, wrong audience, bad signature, unknown kid (a JWKS refresh is due), missing."""

from __future__ import annotations

import base64
import json

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

from libmesh.policy._jwt import Jwks, JwtError, JwtProvider

NOW = 1_800_000_000
ISSUER = "https://issuer.example"
RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
EC_KEY = ec.generate_private_key(ec.SECP256R1())


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def number(value: int, size: int | None = None) -> str:
    length = size or (value.bit_length() + 7) // 8
    return b64(value.to_bytes(length, "big"))


def jwks() -> str:
    rsa_numbers = RSA_KEY.public_key().public_numbers()
    ec_numbers = EC_KEY.public_key().public_numbers()
    return json.dumps({"keys": [
        {"kty": "RSA", "kid": "rsa-1", "alg": "RS256", "n": number(rsa_numbers.n),
         "e": number(rsa_numbers.e)},
        {"kty": "EC", "kid": "ec-1", "crv": "P-256", "x": number(ec_numbers.x, 32),
         "y": number(ec_numbers.y, 32)},
    ]})  # fmt: skip


def token(claims: dict[str, object], *, kid: str = "rsa-1", alg: str = "RS256") -> str:
    header = b64(json.dumps({"alg": alg, "kid": kid, "typ": "JWT"}).encode())
    payload = b64(json.dumps(claims).encode())
    data = f"{header}.{payload}".encode()
    if alg == "RS256":
        signature = RSA_KEY.sign(data, padding.PKCS1v15(), hashes.SHA256())
    else:
        r, s = decode_dss_signature(EC_KEY.sign(data, ec.ECDSA(hashes.SHA256())))
        signature = r.to_bytes(32, "big") + s.to_bytes(32, "big")
    return f"{header}.{payload}.{b64(signature)}"


def claims(**overrides: object) -> dict[str, object]:
    base: dict[str, object] = {
        "iss": ISSUER, "sub": "alice", "aud": ["shop"], "exp": NOW + 600, "nbf": NOW - 10,
    }  # fmt: skip
    base.update(overrides)
    return {k: v for k, v in base.items() if v is not None}


@pytest.fixture
def provider() -> JwtProvider:
    return JwtProvider(issuer=ISSUER, jwks=Jwks.parse(jwks()), audiences=("shop",))


@pytest.mark.parametrize(("kid", "alg"), [("rsa-1", "RS256"), ("ec-1", "ES256")])
def test_a_valid_token_gives_its_principal_and_claims(
    provider: JwtProvider, kid: str, alg: str
) -> None:
    validated = provider.validate(token(claims(), kid=kid, alg=alg), NOW)
    assert validated.principal == f"{ISSUER}/alice"
    assert validated.audiences == ("shop",)
    assert validated.claims["sub"] == "alice"


@pytest.mark.parametrize(
    ("made", "message"),
    [
        (lambda: token(claims(exp=NOW - 61)), "Jwt is expired"),
        (lambda: token(claims(nbf=NOW + 61)), "Jwt not yet valid"),
        (lambda: token(claims(iss="https://other.example")), "Jwt issuer is not configured"),
        (lambda: token(claims(aud=["billing"])), "Audiences in Jwt are not allowed"),
        (lambda: token(claims())[:-4] + "AAAA", "Jwt verification fails"),
        (lambda: token(claims(), kid="rotated-2"), "Jwks doesn't have key to match kid"),
        (lambda: "not-a-jwt", "Jwt is not in the form"),
    ],
    ids=["expired", "not-yet-valid", "issuer", "audience", "signature", "unknown-kid", "garbage"],
)
def test_a_bad_token_is_refused_with_envoys_message(
    provider: JwtProvider, made: object, message: str
) -> None:
    with pytest.raises(JwtError, match=message):
        provider.validate(made(), NOW)  # type: ignore[operator]


def test_within_the_clock_skew_a_token_is_still_accepted(provider: JwtProvider) -> None:
    assert provider.validate(token(claims(exp=NOW - 30)), NOW).principal == f"{ISSUER}/alice"


def test_an_unknown_kid_asks_for_a_jwks_refresh(provider: JwtProvider) -> None:
    assert provider.needs_refresh(token(claims(), kid="rotated-2"))
    assert not provider.needs_refresh(token(claims()))


def test_the_token_is_found_where_the_rule_says(provider: JwtProvider) -> None:
    raw = token(claims())
    assert provider.extract({"authorization": f"Bearer {raw}"}, {}) == raw
    assert provider.extract({}, {"access_token": raw}) == raw
    assert provider.extract({"authorization": f"Basic {raw}"}, {}) is None  # missing
    custom = JwtProvider(
        issuer=ISSUER, jwks=provider.jwks, from_headers=(("x-jwt", ""),), from_params=()
    )
    assert custom.extract({"x-jwt": raw}, {"access_token": "ignored"}) == raw
    assert custom.extract({}, {"access_token": raw}) is None


def test_providers_come_from_requestauthentication_yaml(tmp_path: object) -> None:
    from pathlib import Path

    from libmesh import config
    from libmesh.policy._jwt import providers_from

    directory = Path(str(tmp_path))
    (directory / "ra.yaml").write_text(
        "apiVersion: security.istio.io/v1\n"
        "kind: RequestAuthentication\n"
        "metadata: {name: jwt, namespace: shop}\n"
        "spec:\n"
        "  jwtRules:\n"
        f"  - issuer: {ISSUER}\n"
        "    audiences: [shop]\n"
        "    fromHeaders: [{name: x-token, prefix: 'Token '}]\n"
        f"    jwks: '{jwks()}'\n"
    )
    result = config.load(directory)
    assert not result.errors, [f.format() for f in result.errors]
    (resource,) = result.config.of_kind("RequestAuthentication")

    (provider,) = providers_from(resource.spec.jwt_rules, {})

    raw = token(claims())
    assert provider.extract({"x-token": f"Token {raw}"}, {}) == raw
    assert provider.validate(raw, NOW).principal == f"{ISSUER}/alice"


def test_a_single_jwk_is_a_jwks_and_an_unusable_inline_one_fails_tokens_not_the_config() -> None:
    from envoy.extensions.filters.http.jwt_authn.v3 import config_pb2

    from libmesh.policy._jwt import JwtPolicy

    single = json.dumps(json.loads(jwks())["keys"][0])
    provider = JwtProvider(issuer=ISSUER, jwks=Jwks.parse(single))
    assert provider.validate(token(claims()), NOW).principal == f"{ISSUER}/alice"
    config = config_pb2.JwtAuthentication()
    config.providers["p"].issuer = ISSUER
    config.providers["p"].local_jwks.inline_string = '{"keys": [{"kty": "oct", "k": "c2VjcmV0"}]}'
    (rule,) = JwtPolicy.of(config).rules  # the listener is not refused for it
    assert rule.jwks is not None
    with pytest.raises(JwtError, match="Jwks doesn't have key to match kid or alg"):
        rule.provider(rule.jwks).validate(token(claims()), NOW)
