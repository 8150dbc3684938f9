"""The inbound policies on what a client could use to slip past them: a WebSocket upgrade, a
caller's own copy of a claim header, a percent-encoded path, a certificate the server did not
verify. The ASGI app runs in the process (httpx's ASGI transport, and the WebSocket handshake
driven by hand); the policies come from YAML through the same translation and engine as
meshd's."""

from __future__ import annotations

import asyncio
import datetime
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography.hazmat.primitives import serialization
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket

import libmesh
from tests.unit.test_jwt import ISSUER, claims, jwks, token

POLICIES = f"""
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: no-admin, namespace: shop}}
spec:
  action: DENY
  rules: [{{to: [{{operation: {{paths: ["/admin/*"]}}}}]}}]
---
apiVersion: security.istio.io/v1
kind: RequestAuthentication
metadata: {{name: jwt, namespace: shop}}
spec:
  jwtRules:
  - issuer: {ISSUER}
    jwks: '{jwks()}'
    outputClaimToHeaders: [{{header: x-user, claim: sub}}]
"""


@pytest.fixture
def app(tmp_path: Path) -> Iterator[Any]:
    (tmp_path / "policies.yaml").write_text(textwrap.dedent(POLICIES))
    mesh = libmesh.Mesh.from_files(tmp_path, namespace="shop", watch=False)

    async def echo(request: Request) -> JSONResponse:
        return JSONResponse({"x-user": request.headers.getlist("x-user"), "path": request.url.path})

    async def socket(websocket: WebSocket) -> None:
        await websocket.accept()
        await websocket.send_text("secret")
        await websocket.close()

    starlette = Starlette(
        routes=[
            Route("/{path:path}", echo),
            WebSocketRoute("/admin/ws", socket),
            WebSocketRoute("/public/ws", socket),
        ]
    )
    starlette.add_middleware(libmesh.middleware.MeshMiddleware, mesh=mesh)
    yield starlette
    mesh.close()


def get(app: Any, path: str, headers: dict[str, str] | None = None) -> httpx.Response:
    async def call() -> httpx.Response:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://pay") as client:
            return await client.get(path, headers=headers)

    return asyncio.run(call())


def websocket_handshake(app: Any, path: str) -> list[dict[str, Any]]:
    """The messages the app sends for a WebSocket upgrade to ``path`` (the client connects,
    then goes away)."""
    incoming = [{"type": "websocket.connect"}, {"type": "websocket.disconnect", "code": 1000}]
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return incoming.pop(0) if incoming else {"type": "websocket.disconnect", "code": 1000}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {
        "type": "websocket", "asgi": {"version": "3.0"}, "scheme": "ws", "path": path,
        "raw_path": path.encode(), "query_string": b"", "root_path": "",
        "headers": [(b"host", b"pay")], "client": ("127.0.0.1", 5000),
        "server": ("127.0.0.1", 8080), "subprotocols": [],
    }  # fmt: skip
    asyncio.run(app(scope, receive, send))
    return sent


def bearer() -> dict[str, str]:
    now = int(time.time())
    return {"authorization": "Bearer " + token(claims(exp=now + 600, nbf=now - 10))}


def test_a_websocket_upgrade_meets_the_same_authorization_policy(app: Any) -> None:
    assert websocket_handshake(app, "/public/ws")[0]["type"] == "websocket.accept"
    assert websocket_handshake(app, "/admin/ws") == [{"type": "websocket.close", "code": 1008}]


def test_a_callers_own_claim_header_never_reaches_the_app(app: Any) -> None:
    spoofed = {"x-user": "admin"}
    assert get(app, "/profile", {**bearer(), **spoofed}).json()["x-user"] == ["alice"]
    assert get(app, "/profile", spoofed).json()["x-user"] == []


def test_an_encoded_path_is_judged_as_the_app_routes_it(app: Any) -> None:
    for path in ("/admin/x", "/%61dmin/x", "/admin%2Fx", "/public/%2E%2E/admin/x"):
        response = get(app, path)
        assert (response.status_code, response.text) == (403, "RBAC: access denied"), path
    assert get(app, "/public/x").status_code == 200


def test_a_client_certificate_the_server_did_not_verify_is_not_an_identity(
    tmp_path: Path,
) -> None:
    from libmesh.identity import SpiffeId, make_csr, new_private_key
    from libmesh.middleware._asgi import _principal
    from meshd._ca import CertificateAuthority

    ca = CertificateAuthority.load_or_create(tmp_path / "ca")
    web = SpiffeId.for_workload("cluster.local", "shop", "web")
    csr = make_csr(new_private_key(), web).public_bytes(serialization.Encoding.PEM)
    leaf = ca.sign(csr, web, datetime.timedelta(hours=1))[0]
    verified = {"extensions": {"tls": {"client_cert_chain": [leaf], "client_cert_error": None}}}
    assert _principal(verified) == str(web)
    refused = {"extensions": {"tls": {"client_cert_chain": [leaf], "client_cert_error": "x"}}}
    assert _principal(refused) == ""
