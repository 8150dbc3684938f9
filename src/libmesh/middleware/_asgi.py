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

from ..telemetry import Telemetry
from ..telemetry._tracing import REQUEST_ID

__all__ = ["ASGIApp", "MeshMiddleware", "metrics_asgi_app"]

_REQUEST_ID = REQUEST_ID.encode()

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

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = _headers(scope["headers"])
        server = scope.get("server")
        authority = headers.get("host") or (f"{server[0]}:{server[1]}" if server else "")
        client = scope.get("client")
        grpc = headers.get("content-type", "").startswith("application/grpc")
        request = self.telemetry.inbound_request(
            method=scope["method"],
            path=scope["path"],
            authority=authority,
            headers=headers,
            protocol="grpc" if grpc else "http",
            client_address=client[0] if client else "",
        )
        if request.request_id_generated:  # as Envoy does: the app sees the id it logs
            # (the scope is this request's own: servers make one per request)
            added = (_REQUEST_ID, request.request_id.encode())
            scope["headers"] = [*scope["headers"], added]
        state = scope.get("state")
        if state is None:
            state = scope["state"] = {}
        state["libmesh"] = request.inbound
        extra = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in request.response_headers()]
        exchange = _Exchange(receive, send, extra, grpc)
        with request:
            try:
                await self.app(scope, exchange.receive, exchange.send)
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
