"""The inbound side for WSGI applications (Flask, Django, Bottle, …)::

    app.wsgi_app = libmesh.middleware.MeshWSGIMiddleware(app.wsgi_app, mesh=mesh)

The request's span stays current, and the request is counted, until the server has sent the
whole response body (WSGI bodies are iterables that the server drains after the app returns).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from http import HTTPStatus
from typing import Any

from ..identity._tls import principal_of_pem
from ..policy._inbound import Arrival, Refusal, authorize, refuse_plaintext
from ..telemetry import InboundRequest, Telemetry
from ..transport._jwks import JwksCache
from ._asgi import _telemetry_of
from ._authentication import NOTHING, Authenticated, authenticate
from ._authorization import report_decision

__all__ = ["MeshWSGIMiddleware", "WSGIApp", "metrics_wsgi_app"]

StartResponse = Callable[..., Any]
WSGIApp = Callable[[dict[str, Any], StartResponse], Iterable[bytes]]


def _headers(environ: dict[str, Any]) -> dict[str, str]:
    headers = {
        key[5:].replace("_", "-").lower(): value
        for key, value in environ.items()
        if key.startswith("HTTP_")
    }
    if environ.get("CONTENT_TYPE"):
        headers["content-type"] = environ["CONTENT_TYPE"]
    if environ.get("CONTENT_LENGTH"):
        headers["content-length"] = environ["CONTENT_LENGTH"]
    return headers


class MeshWSGIMiddleware:
    """libmesh's inbound middleware for any WSGI application."""

    def __init__(
        self, app: WSGIApp, mesh: Any = None, *, telemetry: Telemetry | None = None
    ) -> None:
        self.app = app
        self.telemetry = _telemetry_of(mesh, telemetry)
        self._source = mesh  # its engine holds the workload's inbound policy
        self._jwks = JwksCache()

    def _admit(
        self, environ: dict[str, Any], headers: dict[str, str], host: str, principal: str
    ) -> tuple[Authenticated, Refusal | None]:
        """The workload's PeerAuthentication, RequestAuthentication and AuthorizationPolicy
        for one request (decided in ``policy``)."""
        inbound = self._source.engine.inbound
        port = environ.get("SERVER_PORT", "")
        query = environ.get("QUERY_STRING", "")
        arrival = Arrival(
            method=environ["REQUEST_METHOD"],
            # the path as the app routes on it (decoded), so that no encoding of it passes a
            # path rule the route it reaches should meet
            path=environ.get("SCRIPT_NAME", "") + environ.get("PATH_INFO", "/"),
            query=query,
            host=host,
            headers=headers,
            principal=principal,
            source_ip=environ.get("REMOTE_ADDR", ""),
            destination_ip=environ.get("SERVER_ADDR", ""),
            port=int(port) if port.isdigit() else None,
        )
        refusal = refuse_plaintext(inbound, arrival)
        if refusal is not None:
            return NOTHING, refusal
        jwt = inbound.jwt(arrival.port)
        authenticated = NOTHING
        if jwt is not None:
            authenticated = authenticate(jwt, headers, query, self._jwks)
            if not authenticated.error:
                _rewrite_environ(environ, headers, authenticated)
        refusal, decision = authorize(inbound, arrival, authenticated)
        if decision is not None:
            client = (arrival.source_ip,) if arrival.source_ip else None
            report_decision(decision, arrival.method, arrival.path, client, principal)
        return authenticated, refusal

    def __call__(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        headers = _headers(environ)
        authority = headers.get("host") or f"{environ['SERVER_NAME']}:{environ['SERVER_PORT']}"
        # a server that terminated mutual TLS passes the client's certificate (werkzeug,
        # mod_wsgi and Apache's mod_ssl name it so)
        # (only a verified one: mod_ssl says so in SSL_CLIENT_VERIFY, e.g. not for
        # optional_no_ca; werkzeug passes a certificate only once OpenSSL verified it)
        verified = environ.get("SSL_CLIENT_VERIFY", "SUCCESS") == "SUCCESS"
        certificate = environ.get("SSL_CLIENT_CERT") if verified else None
        principal = principal_of_pem(certificate) if certificate else ""
        app = self.app
        authenticated = NOTHING
        if self._source is not None:
            authenticated, refusal = self._admit(environ, headers, authority, principal)
            if refusal is not None:
                app = _refusal_app(refusal)
        request = self.telemetry.inbound_request(
            method=environ["REQUEST_METHOD"],
            path=environ.get("PATH_INFO", "/"),
            authority=authority,
            headers=headers,
            client_address=environ.get("REMOTE_ADDR", ""),
            peer_principal=principal,
            request_principal=authenticated.principal,
        )
        if request.request_id_generated:
            environ["HTTP_X_REQUEST_ID"] = request.request_id
        environ["libmesh.inbound"] = request.inbound
        length = environ.get("CONTENT_LENGTH")
        request_bytes = int(length) if length and length.isdigit() else 0
        extra = list(request.response_headers())
        status = [0]

        def observing_start_response(
            status_line: str, response_headers: list[tuple[str, str]], exc_info: Any = None
        ) -> Any:
            status[0] = int(status_line.split(" ", 1)[0])
            return start_response(status_line, [*response_headers, *extra], exc_info)

        request.__enter__()
        try:
            body = app(environ, observing_start_response)
        except BaseException as exc:
            request.finish(status=status[0] or 500, request_bytes=request_bytes)
            request.__exit__(type(exc), exc, exc.__traceback__)
            raise
        return _ObservedBody(body, request, status, request_bytes)


def _rewrite_environ(
    environ: dict[str, Any], headers: dict[str, str], authenticated: Authenticated
) -> None:
    """The token's header gone unless forwarded; claim headers replaced by the claims."""
    for name in authenticated.remove_headers:
        environ.pop("HTTP_" + name.upper().replace("-", "_"), None)
        headers.pop(name, None)
    for name, value in authenticated.add_headers:
        environ["HTTP_" + name.upper().replace("-", "_")] = value
        headers[name.lower()] = value


def _refusal_app(refusal: Refusal) -> WSGIApp:
    """The answer refusing a request, as Envoy gives it (status, the reason as the body)."""
    body = refusal.message.encode()
    status = f"{refusal.status} {HTTPStatus(refusal.status).phrase}"
    headers = [
        ("Content-Type", "text/plain"),
        ("Content-Length", str(len(body))),
        *refusal.headers,
    ]

    def app(environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        start_response(status, headers)
        return [body]

    return app


class _ObservedBody:
    """The app's body as the server drains it; closing it ends the request."""

    def __init__(
        self,
        body: Iterable[bytes],
        request: InboundRequest,
        status: list[int],
        request_bytes: int,
    ) -> None:
        self._body = body
        self._request: InboundRequest | None = request
        self._status = status
        self._request_bytes = request_bytes
        self._sent = 0

    def __iter__(self) -> Iterator[bytes]:
        for chunk in self._body:
            self._sent += len(chunk)
            yield chunk

    def close(self) -> None:
        try:
            close = getattr(self._body, "close", None)
            if close is not None:
                close()
        finally:
            request, self._request = self._request, None
            if request is not None:
                request.finish(
                    status=self._status[0] or 500,
                    request_bytes=self._request_bytes,
                    response_bytes=self._sent,
                )
                request.__exit__(None, None, None)


def metrics_wsgi_app(mesh: Any = None, *, telemetry: Telemetry | None = None) -> WSGIApp:
    """A WSGI app serving the mesh's metrics in Prometheus' text format, e.g. with
    ``werkzeug.middleware.dispatcher.DispatcherMiddleware(app.wsgi_app, {"/metrics": ...})``."""
    source = _telemetry_of(mesh, telemetry)

    def app(environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        body = source.render_metrics().encode()
        start_response(
            "200 OK",
            [
                ("Content-Type", "text/plain; version=0.0.4; charset=utf-8"),
                ("Content-Length", str(len(body))),
            ],
        )
        return [body]

    return app
