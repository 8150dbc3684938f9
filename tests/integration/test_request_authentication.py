"""RequestAuthentication end to end: meshd translates it to jwt_authn on the workload's inbound
listener, the workload (FastAPI on libmesh.serve, its own process) fetches the issuer's JWKS
from a real HTTP server, checks tokens as Envoy does, and AuthorizationPolicy reads the result."""

from __future__ import annotations

import http.server
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from tests.integration.test_mtls import SERVICE, StartMeshd, Workload
from tests.meshd_process import MeshdProcess
from tests.unit.test_jwt import ISSUER, b64, number

NOW = int(time.time())


class Issuer:
    """An OpenID-style issuer: its keys (rotatable) at /jwks on 127.0.0.1, fetches counted."""

    def __init__(self) -> None:
        self.keys = {"key-1": rsa.generate_private_key(public_exponent=65537, key_size=2048)}
        self.fetches = 0
        issuer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                issuer.fetches += 1
                body = issuer.jwks().encode()
                self.send_response(200)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/jwks"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def jwks(self) -> str:
        numbers = {kid: key.public_key().public_numbers() for kid, key in self.keys.items()}
        return json.dumps({"keys": [
            {"kty": "RSA", "kid": kid, "alg": "RS256", "n": number(n.n), "e": number(n.e)}
            for kid, n in numbers.items()
        ]})  # fmt: skip

    def token(
        self, kid: str = "key-1", key: rsa.RSAPrivateKey | None = None, **claims: object
    ) -> str:
        body: dict[str, object] = {
            "iss": ISSUER, "sub": "alice", "aud": "pay", "exp": NOW + 600, "groups": ["admins"],
        }  # fmt: skip
        body.update(claims)
        header = b64(json.dumps({"alg": "RS256", "kid": kid, "typ": "JWT"}).encode())
        payload = b64(json.dumps({k: v for k, v in body.items() if v is not None}).encode())
        signing = key or self.keys[kid]
        signature = signing.sign(
            f"{header}.{payload}".encode(), padding.PKCS1v15(), hashes.SHA256()
        )
        return f"{header}.{payload}.{b64(signature)}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def issuer() -> Iterator[Issuer]:
    server = Issuer()
    yield server
    server.close()


def policies(jwks_uri: str) -> str:
    return f"""
apiVersion: security.istio.io/v1
kind: RequestAuthentication
metadata: {{name: pay-jwt, namespace: shop}}
spec:
  selector: {{matchLabels: {{app: pay}}}}
  jwtRules:
  - issuer: {ISSUER}
    jwksUri: {jwks_uri}
    audiences: [pay]
    outputClaimToHeaders: [{{header: x-sub, claim: sub}}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: pay-users, namespace: shop}}
spec:
  selector: {{matchLabels: {{app: pay}}}}
  action: ALLOW
  rules:
  - from: [{{source: {{requestPrincipals: ["{ISSUER}/*"]}}}}]
    when: [{{key: "request.auth.claims[groups]", values: [admins]}}]
"""


@pytest.fixture
def pay(tmp_path: Path, start_meshd: StartMeshd, issuer: Issuer) -> Iterator[Workload]:
    config = tmp_path / "mesh"
    config.mkdir()
    (config / "pay.yaml").write_text(SERVICE + "---\n" + policies(issuer.url))
    meshd: MeshdProcess = start_meshd(config)
    workload = Workload(meshd)
    yield workload
    workload.stop()


def bearer(token: str) -> dict[str, str]:
    return {"authorization": f"Bearer {token}"}


def call(workload: Workload, token: str) -> httpx.Response:
    """GET /?show=jwt with ``token``, once the workload has its policies from meshd (until
    then the token is not looked at: no request principal)."""
    deadline = time.monotonic() + 10
    while True:
        response = httpx.get(f"http://127.0.0.1:{workload.port}/?show=jwt", headers=bearer(token))
        done = response.status_code != 200 or response.json()["request"]
        if done or time.monotonic() > deadline:
            return response
        time.sleep(0.1)


def test_a_valid_token_passes_with_its_principal_and_claims(pay: Workload, issuer: Issuer) -> None:
    response = call(pay, issuer.token())
    assert response.status_code == 200, response.text
    assert response.json() == {
        "request": f"{ISSUER}/alice",
        "authorization": "",  # not forwarded: forwardOriginalToken is false
        "x-sub": "alice",  # outputClaimToHeaders
    }


@pytest.mark.parametrize(
    ("claims", "message"),
    [
        ({"exp": NOW - 3600}, "Jwt is expired"),
        ({"iss": "https://someone-else.example"}, "Jwt issuer is not configured"),
        ({"aud": "billing"}, "Audiences in Jwt are not allowed"),
    ],
)
def test_invalid_tokens_get_401_with_envoys_reason(
    pay: Workload, issuer: Issuer, claims: dict[str, object], message: str
) -> None:
    call(pay, issuer.token())  # the policy is in place
    response = httpx.get(
        f"http://127.0.0.1:{pay.port}/",
        headers={"authorization": f"Bearer {issuer.token(**claims)}"},
    )
    assert response.status_code == 401
    assert response.text == message
    assert 'error="invalid_token"' in response.headers["www-authenticate"]


def test_a_bad_signature_a_missing_token_and_a_missing_claim(pay: Workload, issuer: Issuer) -> None:
    call(pay, issuer.token())
    forged = issuer.token(key=rsa.generate_private_key(public_exponent=65537, key_size=2048))
    response = httpx.get(
        f"http://127.0.0.1:{pay.port}/", headers={"authorization": f"Bearer {forged}"}
    )
    assert (response.status_code, response.text) == (401, "Jwt verification fails")
    # no token: authentication lets it through, authorization wants a request principal
    response = httpx.get(f"http://127.0.0.1:{pay.port}/")
    assert (response.status_code, response.text) == (403, "RBAC: access denied")
    # a valid token without the group the policy's `when` asks for
    response = httpx.get(
        f"http://127.0.0.1:{pay.port}/",
        headers={"authorization": f"Bearer {issuer.token(groups=['users'])}"},
    )
    assert (response.status_code, response.text) == (403, "RBAC: access denied")


def test_an_unknown_kid_refetches_the_jwks(pay: Workload, issuer: Issuer) -> None:
    assert call(pay, issuer.token()).status_code == 200
    fetched = issuer.fetches
    issuer.keys["key-2"] = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    time.sleep(1.1)  # libmesh refetches one URI at most once a second
    response = httpx.get(
        f"http://127.0.0.1:{pay.port}/?show=jwt",
        headers=bearer(issuer.token(kid="key-2")),
    )
    assert response.status_code == 200, response.text
    assert issuer.fetches == fetched + 1
