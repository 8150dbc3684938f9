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
from urllib.parse import quote

from ..config._rules import GRPC_STATUS_NAMES
from ..identity._tls import principal_of_pem
from ..policy._inbound import Arrival, Refusal, authorize, refuse_plaintext
from ..telemetry import Telemetry
from ..telemetry._tracing import REQUEST_ID
from ..transport._jwks import JwksCache
from ._authentication import NOTHING, Authenticated, authenticate_async
from ._authorization import report_decision

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
        for one request (decided in ``policy``): (what authentication made of it, the answer
        refusing it or ``None``, the caller's SPIFFE ID)."""
        server = scope.get("server")
        client = scope.get("client")
        inbound = self._source.engine.inbound
        query = (scope.get("query_string") or b"").decode("latin-1")
        arrival = Arrival(
            method=scope.get("method", "GET"),  # (a websocket upgrade is a GET)
            # the path as the app routes on it (decoded: /admin%2Fx is /admin/x to it), so no
            # encoding of it can pass a path rule that the route it reaches should meet
            path=scope.get("root_path", "") + scope["path"],
            query=query,
            host=headers.get("host") or (f"{server[0]}:{server[1]}" if server else ""),
            headers=headers,
            principal=_principal(scope),
            source_ip=client[0] if client else "",
            destination_ip=server[0] if server else "",
            port=server[1] if server else None,
        )
        refusal = refuse_plaintext(inbound, arrival)
        if refusal is not None:
            return NOTHING, _refusal_app(refusal), arrival.principal
        jwt = inbound.jwt(arrival.port)
        authenticated = NOTHING
        if jwt is not None:
            authenticated = await authenticate_async(jwt, headers, query, self._jwks)
            if not authenticated.error:
                _rewrite_headers(scope, headers, authenticated)
        refusal, decision = authorize(inbound, arrival, authenticated)
        if decision is not None:
            report_decision(decision, arrival.method, arrival.path, client, arrival.principal)
        return authenticated, _refusal_app(refusal) if refusal else None, arrival.principal

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


def _refusal_app(refusal: Refusal) -> ASGIApp:
    """The answer refusing a request, as Envoy gives it: the status and the reason as the
    body; to a gRPC call, a trailers-only answer with the gRPC status and the reason as its
    message (what a gRPC client reports, rather than a bare HTTP status)."""
    body = refusal.message.encode()
    extra = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in refusal.headers]
    headers = [
        (b"content-type", b"text/plain"),
        (b"content-length", str(len(body)).encode()),
        *extra,
    ]
    grpc_headers = [
        (b"content-type", b"application/grpc"),
        (b"grpc-status", b"%d" % GRPC_STATUS_NAMES.index(refusal.grpc_status)),
        (b"grpc-message", quote(refusal.message, safe=" ").encode("ascii")),
        *extra,
    ]

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if _is_grpc(scope):
            await send({"type": "http.response.start", "status": 200, "headers": grpc_headers})
            await send({"type": "http.response.body", "body": b""})
            return
        await send({"type": "http.response.start", "status": refusal.status, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    return app


def _is_grpc(scope: Scope) -> bool:
    return any(
        name == b"content-type" and value.startswith(b"application/grpc")
        for name, value in scope["headers"]
    )


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
