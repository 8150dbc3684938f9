"""The inbound side for ASGI applications (FastAPI, Starlette, Quart, …)::

    app.add_middleware(libmesh.middleware.MeshMiddleware, mesh=mesh)

A pure ASGI middleware: it wraps ``receive`` and ``send`` and never buffers a body, so
streaming responses, server-sent events and contextvars work as without it (Starlette's
``BaseHTTPMiddleware`` runs the app in another task, which loses contextvars and costs about
twice the time). Per request it continues the caller's trace, records Istio's server-side
metrics and an access-log line, and makes the request's mesh context available to the app
(``libmesh.current_inbound()``, or ``request.state.libmesh`` in Starlette).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from ..identity._tls import principal_of_pem
from ..policy._authz import AuthzRequest
from ..telemetry import Telemetry
from ..telemetry._tracing import REQUEST_ID
from ..transport._jwks import JwksCache
from ._authentication import NOTHING, Authenticated, authenticate_async, unauthorized_headers
from ._authorization import RBAC_DENIED, report_decision

__all__ = ["ASGIApp", "MeshMiddleware", "metrics_asgi_app"]

_REQUEST_ID = REQUEST_ID.encode()
_NO_HEADERS: list[tuple[bytes, bytes]] = []  # (never changed: _Exchange only reads it)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


def _telemetry_of(mesh: Any, telemetry: Telemetry | None) -> Telemetry:
    if telemetry is not None:
        return telemetry
    if mesh is None:
        raise TypeError("give the middleware the mesh (mesh=...) whose telemetry it records")
    return mesh.telemetry  # type: ignore[no-any-return]


def _headers(raw: list[tuple[bytes, bytes]]) -> dict[str, str]:
    """ASGI header names are lower-case already; repeated headers are joined, as Envoy does."""
    headers = {name.decode("latin-1"): value.decode("latin-1") for name, value in raw}
    if len(headers) == len(raw):
        return headers
    headers = {}  # a header came more than once: join its values
    for name, value in raw:
        key = name.decode("latin-1")
        text = value.decode("latin-1")
        headers[key] = f"{headers[key]},{text}" if key in headers else text
    return headers


class MeshMiddleware:
    """libmesh's inbound middleware for any ASGI application."""

    def __init__(
        self, app: ASGIApp, mesh: Any = None, *, telemetry: Telemetry | None = None
    ) -> None:
        self.app = app
        self.telemetry = _telemetry_of(mesh, telemetry)
        self._source = mesh  # its engine holds the workload's inbound policy
        self._jwks = JwksCache()

    async def _admit(
        self, scope: Scope, headers: dict[str, str]
    ) -> tuple[Authenticated, ASGIApp | None, str]:
        """The workload's PeerAuthentication, RequestAuthentication and AuthorizationPolicy
        for one request: (what authentication made of it, the answer refusing it or ``None``,
        the caller's SPIFFE ID)."""
        server = scope.get("server")
        client = scope.get("client")
        authority = headers.get("host") or (f"{server[0]}:{server[1]}" if server else "")
        principal = _principal(scope)
        inbound = self._source.engine.inbound
        port = server[1] if server else None
        if not principal and not inbound.accepts(port, tls=False):
            return NOTHING, _refusal(port, inbound.mode(port).value), principal
        query = scope.get("query_string") or b""
        # the path as the app routes on it (decoded: /admin%2Fx is /admin/x to it), so no
        # encoding of it can pass a path rule that the route it reaches should meet
        target = scope.get("root_path", "") + scope["path"]
        method = scope.get("method", "GET")  # (a websocket upgrade is a GET)
        authenticated = NOTHING
        jwt = inbound.jwt(port)
        if jwt is not None:
            authenticated = await authenticate_async(
                jwt, headers, query.decode("latin-1"), self._jwks
            )
            if authenticated.error:
                return (
                    authenticated,
                    _unauthorized(authenticated.error, authority, target),
                    principal,
                )
            _rewrite_headers(scope, headers, authenticated)
        authorizer = inbound.authorizer(port)
        if not authorizer.empty:
            decision = authorizer.check(
                AuthzRequest(
                    method=method,
                    path=f"{target}?{query.decode('latin-1')}" if query else target,
                    host=authority,
                    headers=headers,
                    principal=principal,
                    source_ip=client[0] if client else "",
                    destination_ip=server[0] if server else "",
                    destination_port=port or 0,
                    jwt_claims=authenticated.claims,
                )
            )
            report_decision(decision, method, target, client, principal)
            if not decision.allowed:
                return authenticated, _rbac_denied, principal
        return authenticated, None, principal

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind != "http":
            if kind == "websocket" and self._source is not None:
                # the upgrade request meets the same policies (Envoy runs its filters on it)
                refusal = (await self._admit(scope, _headers(scope["headers"])))[1]
                if refusal is not None:
                    await receive()  # websocket.connect
                    await send({"type": "websocket.close", "code": 1008})  # policy violation
                    return
            await self.app(scope, receive, send)
            return
        headers = _headers(scope["headers"])
        server = scope.get("server")
        authority = headers.get("host") or (f"{server[0]}:{server[1]}" if server else "")
        client = scope.get("client")
        grpc = headers.get("content-type", "").startswith("application/grpc")
        app = self.app
        authenticated, refusal, principal = NOTHING, None, ""
        if self._source is not None:
            (authenticated, refusal, principal) = await self._admit(scope, headers)
            if refusal is not None:
                app = refusal
        else:
            principal = _principal(scope)
        request = self.telemetry.inbound_request(
            method=scope["method"],
            path=scope["path"],
            authority=authority,
            headers=headers,
            protocol="grpc" if grpc else "http",
            client_address=client[0] if client else "",
            peer_principal=principal,
            request_principal=authenticated.principal,
        )
        if request.request_id_generated:  # as Envoy does: the app sees the id it logs
            # (the scope is this request's own: servers make one per request)
            added = (_REQUEST_ID, request.request_id.encode())
            scope["headers"] = [*scope["headers"], added]
        state = scope.get("state")
        if state is None:
            state = scope["state"] = {}
        state["libmesh"] = request.inbound
        extra = (
            [(k.encode("latin-1"), v.encode("latin-1")) for k, v in request.response_headers()]
            if request.exchanged
            else _NO_HEADERS
        )
        exchange = _Exchange(receive, send, extra, grpc)
        with request:
            try:
                await app(scope, exchange.receive, exchange.send)
            except BaseException:
                if not exchange.status:
                    exchange.status = 500  # what the server will answer
                raise
            finally:
                status = exchange.status
                request.finish(
                    status=status,
                    grpc_status=exchange.grpc_status,
                    request_bytes=exchange.received,
                    response_bytes=exchange.sent,
                    flags="-" if status else "DC",  # no response: the caller went away
                )


def _principal(scope: Scope) -> str:
    """The caller's SPIFFE ID, from the client certificate the server verified (the ASGI
    ``tls`` extension; a certificate it could not verify proves nothing)."""
    extensions = scope.get("extensions")
    tls = extensions.get("tls") if extensions else None
    chain = tls.get("client_cert_chain") if tls and not tls.get("client_cert_error") else None
    return principal_of_pem(chain[0]) if chain else ""


def _unauthorized(error: str, authority: str, path: str) -> ASGIApp:
    """Envoy's answer to a request whose token failed: 401, the reason as the body."""

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        body = error.encode()
        headers = [
            (k.encode(), v.encode("latin-1")) for k, v in unauthorized_headers(authority, path)
        ]
        headers.append((b"content-length", str(len(body)).encode()))
        await send({"type": "http.response.start", "status": 401, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    return app


def _rewrite_headers(scope: Scope, headers: dict[str, str], authenticated: Authenticated) -> None:
    """What the app sees after authentication: the token's header gone unless forwarded, and
    the claim headers replaced by the validated claims (never the caller's own)."""
    if not authenticated.remove_headers and not authenticated.add_headers:
        return
    removed = {name.encode("latin-1") for name in authenticated.remove_headers}
    removed.update(name.lower().encode("latin-1") for name, _ in authenticated.add_headers)
    raw = [(k, v) for k, v in scope["headers"] if k not in removed]
    for name in authenticated.remove_headers:
        headers.pop(name, None)
    for name, value in authenticated.add_headers:
        raw.append((name.lower().encode("latin-1"), value.encode("latin-1")))
        headers[name.lower()] = value
    scope["headers"] = raw


async def _rbac_denied(scope: Scope, receive: Receive, send: Send) -> None:
    """Envoy's answer when an AuthorizationPolicy denies a request."""
    await _plain(send, 403, RBAC_DENIED)


async def _plain(send: Send, status: int, body: bytes) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"text/plain"),
                (b"content-length", str(len(body)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


def _refusal(port: int | None, mode: str) -> ASGIApp:
    """A plaintext request to a port that requires mutual TLS: the server in front did not
    terminate the mesh's mTLS (serve the app with ``libmesh.serve``), so nothing is known of
    the caller; refused, as Envoy would refuse the connection."""
    body = f"mutual TLS required: port {port} is {mode} (PeerAuthentication)\n".encode()

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await _plain(send, 403, body)

    return app


class _Exchange:
    """One request's receive and send, counted on the way (one object rather than two
    closures and their cells: fewer objects per request for the garbage collector)."""

    __slots__ = (
        "_extra",
        "_grpc",
        "_receive",
        "_send",
        "grpc_status",
        "received",
        "sent",
        "status",
    )

    def __init__(
        self, receive: Receive, send: Send, extra: list[tuple[bytes, bytes]], grpc: bool
    ) -> None:
        self._receive = receive
        self._send = send
        self._extra = extra
        self._grpc = grpc
        self.status = 0
        self.grpc_status = ""
        self.received = 0
        self.sent = 0

    async def receive(self) -> Message:
        message = await self._receive()
        if message["type"] == "http.request":
            self.received += len(message.get("body", b""))
        return message

    async def send(self, message: Message) -> None:
        kind = message["type"]
        if kind == "http.response.body":
            self.sent += len(message.get("body", b""))
        elif kind == "http.response.start":
            self.status = message["status"]
            if self._extra:
                message["headers"] = [*message.get("headers", ()), *self._extra]
            if self._grpc:
                self.grpc_status = _grpc_status(message.get("headers", ()), self.grpc_status)
        elif kind == "http.response.trailers" and self._grpc:
            self.grpc_status = _grpc_status(message.get("headers", ()), self.grpc_status)
        await self._send(message)


def _grpc_status(headers: Any, default: str) -> str:
    for name, value in headers:
        if name == b"grpc-status":
            return bytes(value).decode("ascii")
    return default


def metrics_asgi_app(mesh: Any = None, *, telemetry: Telemetry | None = None) -> ASGIApp:
    """An ASGI app serving the mesh's metrics in Prometheus' text format: mount it, e.g.
    ``app.mount("/metrics", libmesh.middleware.metrics_asgi_app(mesh))``."""
    source = _telemetry_of(mesh, telemetry)

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        body = source.render_metrics().encode()
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [
                    (b"content-type", b"text/plain; version=0.0.4; charset=utf-8"),
                    (b"content-length", str(len(body)).encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})

    return app
