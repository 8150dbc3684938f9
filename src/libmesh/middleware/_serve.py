"""Serving an ASGI app in the mesh: uvicorn, with the mesh's mutual TLS terminated in the
process and the caller's verified identity handed to the app.

    libmesh.serve(app, mesh=mesh, host="127.0.0.1", port=8080)
    libmesh.serve(flask_app, mesh=mesh, port=8080, interface="wsgi")   # WSGI apps too

uvicorn does not pass client certificates to the app (no ``tls`` scope extension), and its
TLS is all or nothing on a port. Here libmesh accepts the connections itself: it peeks at the
first byte of each (a TLS handshake starts with 0x16), applies the workload's
PeerAuthentication for the port — STRICT refuses plaintext, DISABLE refuses TLS, PERMISSIVE
takes both on one port — and hands the connection, after the mutual-TLS handshake with the
workload's current SVID, to uvicorn's own protocol. Each request's scope then carries the ASGI
``tls`` extension with the client's certificate, which :class:`MeshMiddleware` reads as the
peer's SPIFFE ID (``current_inbound().peer_principal``).

HTTP/2 too, which uvicorn does not speak: a connection that negotiates ``h2`` (ALPN) or opens
with HTTP/2's preface (prior knowledge, as gRPC clients do in plaintext) is served by
:class:`~libmesh.middleware._http2.Http2Protocol`, with the same app, the same ``tls``
extension, and trailers (gRPC's status).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
from collections.abc import Callable, Coroutine
from typing import Any
from urllib.parse import quote, unquote

from ..identity._tls import PeerError, peer_identity
from ._http2 import PREFACE, Http2Protocol

__all__ = ["serve", "serve_async"]

logger = logging.getLogger("libmesh")

_HANDSHAKE = 0x16  # the first byte of a TLS record carrying a handshake
_FIRST_BYTE_TIMEOUT = 10.0
_MAX_UNDECIDED = 1024  # connections accepted whose first byte has not come yet


def serve(
    app: Any, mesh: Any, *, host: str = "127.0.0.1", port: int = 8000, **options: Any
) -> None:
    """Run ``app`` with uvicorn on ``host:port``, accepting callers as the mesh's
    PeerAuthentication says; ``options`` go to ``uvicorn.Config`` (``log_level``, …; not
    ``ssl_*``: the mesh's SVID is the certificate). ``interface="wsgi"`` serves a WSGI app
    (Flask), which gets the caller's certificate as ``SSL_CLIENT_CERT``. Returns when the server
    stops (Ctrl+C, SIGTERM: uvicorn's graceful shutdown)."""
    server = _server(app, mesh, host, port, options)
    server.run()


async def serve_async(
    app: Any, mesh: Any, *, host: str = "127.0.0.1", port: int = 8000, **options: Any
) -> None:
    """:func:`serve` in a running event loop (without uvicorn's signal handling)."""
    server = _server(app, mesh, host, port, options)
    await server.serve()


def _server(app: Any, mesh: Any, host: str, port: int, options: dict[str, Any]) -> Any:
    import uvicorn

    given = [name for name in options if name.startswith("ssl")]
    if given:
        raise TypeError(
            f"libmesh.serve terminates the mesh's mutual TLS with the workload's SVID; "
            f"{', '.join(given)} cannot be given"
        )
    if options.get("interface") == "wsgi":
        app = _certificate_to_environ(app)
    config = uvicorn.Config(app, host=host, port=port, **options)
    return _mesh_server(config, mesh)


def _mesh_server(config: Any, mesh: Any) -> Any:
    """A uvicorn server whose connections libmesh accepts (uvicorn is imported only when
    libmesh serves)."""
    import uvicorn

    class MeshServer(uvicorn.Server):
        def __init__(self) -> None:
            super().__init__(config)
            self.mesh = mesh
            self.listener: socket.socket | None = None
            self.acceptor: asyncio.Task[None] | None = None
            self.port = 0

        async def startup(self, sockets: list[socket.socket] | None = None) -> None:
            # uvicorn runs the lifespan and its main loop; libmesh owns the socket
            await super().startup(sockets=[])
            if self.should_exit:
                return
            self.listener = (  # one bound already (libmesh-proxy binds its own first)
                sockets[0]
                if sockets
                else socket.create_server(
                    (config.host, config.port), backlog=config.backlog, reuse_port=False
                )
            )
            self.listener.setblocking(False)
            self.port = self.listener.getsockname()[1]
            if config.interface == "wsgi":
                config.loaded_app = _certificate_to_header(config.loaded_app)
            protocol = _protocol_class(config.http_protocol_class)

            def http1() -> asyncio.Protocol:
                return protocol(  # type: ignore[no-any-return]
                    config=config, server_state=self.server_state, app_state=self.lifespan.state
                )

            def http2(extensions: dict[str, Any]) -> asyncio.Protocol:
                return Http2Protocol(
                    config.loaded_app, extensions=extensions, server_state=self.server_state
                )

            def create_protocol() -> asyncio.Protocol:
                return _Chooser(http1, http2)

            mesh, port = self.mesh, self.port

            async def admit(connection: socket.socket, peer: tuple[str, int]) -> None:
                await _admit(connection, peer, create_protocol, mesh, port)

            self.acceptor = asyncio.create_task(accept_connections(self.listener, admit))
            logger.info(
                "libmesh: serving on %s:%d (%s)",
                config.host,
                self.port,
                self.mesh.engine.inbound.mode(self.port).value,
            )

        async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
            if self.acceptor is not None:
                self.acceptor.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self.acceptor
            if self.listener is not None:
                self.listener.close()
            await super().shutdown(sockets=[])

    return MeshServer()


async def accept_connections(
    listener: socket.socket,
    admit: Callable[[socket.socket, tuple[str, int]], Coroutine[Any, Any, None]],
    what: str = "a connection",
) -> None:
    """Accept on ``listener`` until cancelled, each connection handed to ``admit`` (in a task
    of its own) with the caller's address. At most ``_MAX_UNDECIDED`` admissions at a time:
    past that, callers that connect and say nothing cannot pile up, a new one is closed."""
    loop = asyncio.get_running_loop()
    pending: set[asyncio.Task[None]] = set()
    try:
        while True:
            try:
                connection, peer = await loop.sock_accept(listener)
            except OSError as exc:  # out of descriptors, a reset before accept: keep serving
                logger.warning("libmesh: accepting %s failed: %s", what, exc)
                await asyncio.sleep(0.1)
                continue
            if len(pending) >= _MAX_UNDECIDED:
                connection.close()  # too many connections that have not spoken yet
                continue
            # (asyncio sets this only on sockets it knows to be TCP; uvicorn's small writes
            # would otherwise wait on the peer's delayed ACK, 40 ms each)
            connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            task = loop.create_task(admit(connection, (peer[0], peer[1])))
            pending.add(task)
            task.add_done_callback(pending.discard)
    finally:
        for task in pending:
            task.cancel()


async def _admit(
    connection: socket.socket,
    peer: Any,
    create_protocol: Callable[[], asyncio.Protocol],
    mesh: Any,
    port: int,
) -> None:
    """Decide on one connection: peek at its first byte, apply the port's mode, and hand it
    (through the mutual-TLS handshake when it is TLS) to uvicorn's protocol."""
    loop = asyncio.get_running_loop()
    caller = f"{peer[0]}:{peer[1]}"
    try:
        first = await asyncio.wait_for(_peek(loop, connection), _FIRST_BYTE_TIMEOUT)
    except (TimeoutError, OSError):
        connection.close()
        return
    except asyncio.CancelledError:  # the server stops
        connection.close()
        raise
    if not first:
        connection.close()  # closed before saying anything
        return
    tls = first[0] == _HANDSHAKE
    inbound = mesh.engine.inbound
    if not inbound.accepts(port, tls):
        logger.warning(
            "libmesh: refused a %s connection from %s: port %d is %s (PeerAuthentication)",
            "TLS" if tls else "plaintext",
            caller,
            port,
            inbound.mode(port).value,
        )
        connection.close()
        return
    context: ssl.SSLContext | None = None
    if tls:
        try:
            if mesh.tls is None:
                raise ssl.SSLError("this workload has no identity (Mesh.connect(token=...))")
            context = mesh.tls.server(alpn=("h2", "http/1.1"))
        except ssl.SSLError as exc:
            logger.warning("libmesh: refused mTLS from %s: %s", caller, exc)
            connection.close()
            return
    try:
        await loop.connect_accepted_socket(create_protocol, connection, ssl=context)
    except asyncio.CancelledError:
        connection.close()
        raise
    except (ssl.SSLError, OSError) as exc:
        logger.warning("libmesh: refused mTLS from %s: %s", caller, _reason(exc))
        connection.close()


async def _peek(loop: asyncio.AbstractEventLoop, connection: socket.socket) -> bytes:
    ready: asyncio.Future[None] = loop.create_future()
    descriptor = connection.fileno()

    def readable() -> None:
        if not ready.done():
            ready.set_result(None)

    loop.add_reader(descriptor, readable)
    try:
        await ready
    finally:
        loop.remove_reader(descriptor)
    return connection.recv(1, socket.MSG_PEEK)


def _reason(exc: BaseException) -> str:
    message = getattr(exc, "verify_message", None)
    reason = getattr(exc, "reason", None)
    if message:
        return f"{reason}: {message}"
    return str(reason or exc)


# A WSGI app under uvicorn gets its environ built from the ASGI scope, which has no place for the
# client's certificate: it travels from the scope to the environ in this header, which the
# server sets itself after removing any copy a caller sent, and which the app never sees.
_CERTIFICATE_HEADER = b"x-libmesh-client-certificate"
_CERTIFICATE_ENVIRON = "HTTP_X_LIBMESH_CLIENT_CERTIFICATE"


def _certificate_to_header(app: Any) -> Any:
    async def carrying(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            # (a WSGI environ spells "-" and "_" alike: neither spelling of a caller's survives)
            headers = [
                (k, v)
                for k, v in scope["headers"]
                if k.lower().replace(b"_", b"-") != _CERTIFICATE_HEADER
            ]
            tls = (scope.get("extensions") or {}).get("tls") or {}
            chain = tls.get("client_cert_chain")
            if chain and not tls.get("client_cert_error"):
                headers.append((_CERTIFICATE_HEADER, quote(chain[0]).encode("ascii")))
            scope = {**scope, "headers": headers}
        await app(scope, receive, send)

    return carrying


def _certificate_to_environ(app: Any) -> Any:
    """The WSGI app, given the certificate as mod_ssl and werkzeug name it (``SSL_CLIENT_CERT``,
    read by :class:`MeshWSGIMiddleware`)."""

    def wsgi(environ: dict[str, Any], start_response: Any) -> Any:
        certificate = environ.pop(_CERTIFICATE_ENVIRON, None)
        if certificate:
            environ["SSL_CLIENT_CERT"] = unquote(certificate)
            environ["SSL_CLIENT_VERIFY"] = "SUCCESS"
            environ["HTTPS"] = "on"
        return app(environ, start_response)

    return wsgi


class _Chooser(asyncio.Protocol):
    """Hands a connection to HTTP/1.1 (uvicorn's protocol) or HTTP/2: as ALPN chose on TLS;
    otherwise by its first bytes (HTTP/2's preface, else HTTP/1.1). Envoy offers only Istio's
    ALPN names on the mesh's mTLS, so a TLS connection without a choice is looked at too."""

    def __init__(
        self,
        http1: Callable[[], asyncio.Protocol],
        http2: Callable[[dict[str, Any]], asyncio.Protocol],
    ) -> None:
        self.http1 = http1
        self.http2 = http2
        self.transport: Any = None
        self.seen = b""

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        ssl_object = transport.get_extra_info("ssl_object")
        chosen = ssl_object.selected_alpn_protocol() if ssl_object is not None else None
        if chosen is not None:
            self._choose(chosen == "h2")

    def data_received(self, data: bytes) -> None:
        self.seen += data
        if len(self.seen) < len(PREFACE) and PREFACE.startswith(self.seen):
            return  # maybe HTTP/2: wait for the rest of the preface
        self._choose(self.seen.startswith(PREFACE))

    def eof_received(self) -> bool | None:
        return None  # closed before saying what it speaks

    def _choose(self, http2: bool) -> None:
        transport = self.transport
        if http2:
            try:
                extensions = _tls_extensions(transport)
            except PeerError as exc:
                logger.warning("libmesh: refused mTLS from %s: %s", _peer(transport), exc)
                transport.close()
                return
            protocol = self.http2(extensions)
        else:
            protocol = self.http1()
        transport.set_protocol(protocol)
        protocol.connection_made(transport)
        if self.seen:
            protocol.data_received(self.seen)


def _peer(transport: Any) -> str:
    peer = transport.get_extra_info("peername")
    return f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else "a caller"


def _tls_extensions(transport: Any) -> dict[str, Any]:
    """The ASGI ``tls`` extension for a mutual-TLS connection (none for plaintext); raises
    :class:`PeerError` when the client's certificate is not an SVID."""
    ssl_object = transport.get_extra_info("ssl_object")
    if ssl_object is None:
        return {}
    der = ssl_object.getpeercert(True)
    peer_identity(der)
    return {
        "tls": {
            "server_cert": None,
            "client_cert_chain": [ssl.DER_cert_to_PEM_cert(der)],
            "client_cert_name": None,
            "client_cert_error": None,
            "tls_version": None,
            "cipher_suite": None,
        }
    }


_PROTOCOLS: dict[type, type] = {}


def _protocol_class(base: type) -> type:
    """uvicorn's HTTP protocol, made to give each request of a mutual-TLS connection the ASGI
    ``tls`` scope extension (and to refuse a client whose certificate is not an SVID)."""
    made = _PROTOCOLS.get(base)
    if made is not None:
        return made

    def connection_made(self: Any, transport: asyncio.Transport) -> None:
        base.connection_made(self, transport)  # type: ignore[attr-defined]
        try:
            extensions = _tls_extensions(transport)
        except PeerError as exc:
            logger.warning("libmesh: refused mTLS from %s: %s", self.client, exc)
            transport.close()
            return
        if not extensions:
            return
        app = self.app

        async def with_tls(scope: Any, receive: Any, send: Any) -> None:
            scope_extensions = scope.get("extensions")
            if scope_extensions is None:
                scope_extensions = scope["extensions"] = {}
            scope_extensions.update(extensions)
            await app(scope, receive, send)

        self.app = with_tls

    made = _PROTOCOLS[base] = type(
        f"Mesh{base.__name__}", (base,), {"connection_made": connection_made}
    )
    return made
