"""The proxy's two directions.

:class:`Outbound` (served by the proxy's own HTTP/1.1 server) takes what the program sends —
as an HTTP proxy (``HTTP_PROXY``, the target in the absolute-form request line or the Host
header) or on a port bound to one service — and sends it on through the mesh: the same
:class:`~libmesh.transport.AsyncMeshTransport` that a Python app's httpx client uses, so
routing, retries, timeouts, breakers, outlier detection, faults, mTLS, metrics and trace
headers are decided by the same code. :class:`Inbound`, an ASGI application, sits behind
:class:`~libmesh.middleware.MeshMiddleware` (which authenticates and authorizes the caller) and
hands each request to the program on its local port, with the caller's verified identity in
``x-forwarded-client-cert``.

Bodies stream both ways. A request body of known length up to :data:`RETRY_BUFFER` bytes is read
first so that the mesh can send it again (retries, hedging, mirrors), as Envoy buffers one.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import logging
import os
import re
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from typing import TYPE_CHECKING, Any

import httptools
import httpx

from .._exceptions import UpstreamError, UpstreamTimeout
from ..middleware._asgi import ASGIApp, Receive, Scope, Send, _principal
from ..telemetry._peer import GRPC_PEER_METADATA, PEER_METADATA
from ..transport._http1 import Http1Endpoint, Tunnel
from ..transport._http2 import Http2Endpoint
from ..transport._httpx import _is_grpc, wire_request

if TYPE_CHECKING:
    from ._server import Incoming

__all__ = [
    "EXCHANGE_HEADERS",
    "RETRY_BUFFER",
    "Drain",
    "Inbound",
    "Outbound",
    "forwarded_entries",
    "forwarded_headers",
    "header_entries",
    "outbound_app",
    "service_url",
    "xfcc",
]

logger = logging.getLogger("libmesh.proxy")

RETRY_BUFFER = 1 << 20  # Envoy's default per-connection buffer limit

# RFC 9110 §7.6.1: meaningful only for one connection, never forwarded
_HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
    }
)
_XFCC = b"x-forwarded-client-cert"
# Istio's metadata exchange is between the proxies: the program sees neither side's
EXCHANGE_HEADERS = _EXCHANGE = frozenset(
    name.encode() for name in (PEER_METADATA, PEER_METADATA + "-id", GRPC_PEER_METADATA)
)
_NOT_FOR_THE_APP = _EXCHANGE | {_XFCC}
_CLOSE = [(b"connection", b"close")]


class Drain:
    """Whether the proxy drains: then every answer asks the caller to close its connection
    (``Connection: close``), so that keep-alive callers move on instead of finding it closed
    under their next request."""

    active = False

    def headers(self) -> list[tuple[bytes, bytes]]:
        return _CLOSE if self.active else []


Entry = tuple[bytes, bytes, bytes]  # a header: its name, the name in lower case, its value


def forwarded_headers(
    raw: Iterable[tuple[bytes, bytes]], drop: frozenset[bytes] = frozenset()
) -> list[tuple[bytes, bytes]]:
    """``raw`` without the hop-by-hop headers (and those the Connection header names), nor
    ``drop``."""
    kept, _ = forwarded_entries([(name, name.lower(), value) for name, value in raw], drop)
    return [(name, value) for name, _, value in kept]


def forwarded_entries(
    entries: Iterable[Entry], drop: frozenset[bytes] = frozenset()
) -> tuple[list[Entry], frozenset[bytes]]:
    """:func:`forwarded_headers` for headers whose names are already in lower case too (as
    ``httpx.Headers`` keeps them), in one pass; and the tokens of the Connection header
    (``close``, say)."""
    named = _DROPPED.get(drop)
    if named is None:
        named = _DROPPED[drop] = _HOP_BY_HOP | drop
    kept = []
    tokens: frozenset[bytes] = frozenset()
    for entry in entries:
        lowered = entry[1]
        if lowered == b"connection":
            tokens |= {t.strip().lower() for t in entry[2].split(b",")} - {b""}
        elif lowered not in named or (lowered == b"te" and entry[2].lower() == b"trailers"):
            kept.append(entry)  # (gRPC needs "te: trailers" end to end, as Envoy keeps it)
    if tokens - _USUAL_TOKENS:  # rare: a Connection header naming headers kept so far
        kept = [entry for entry in kept if entry[1] not in tokens]
    return kept, tokens


def header_entries(headers: httpx.Headers) -> list[Entry]:
    """The entries of ``headers``: httpx keeps them so (its ``raw`` makes a list of pairs)."""
    entries: list[Entry] | None = getattr(headers, "_list", None)
    if entries is None:  # pragma: no cover - another httpx layout
        return [(name, name.lower(), value) for name, value in headers.raw]
    return entries


_DROPPED: dict[frozenset[bytes], frozenset[bytes]] = {}
# what Connection usually says: "close", or headers that are dropped anyway
_USUAL_TOKENS = frozenset({b"close", b"keep-alive", b"upgrade"})


def xfcc(own: str, peer: str, certificate_der: bytes | None) -> bytes:
    """Envoy's ``x-forwarded-client-cert`` for a caller that presented a certificate, as an
    Istio sidecar sets it: ``By=<this workload>;Hash=<sha256 of the caller's certificate>;
    URI=<the caller's SPIFFE ID>``."""
    parts = [f"By={own}"] if own else []
    if certificate_der is not None:
        parts.append(f"Hash={hashlib.sha256(certificate_der).hexdigest()}")
    parts.append(f"URI={peer}")
    return ";".join(parts).encode("latin-1")


def _target(scope: Scope) -> bytes:
    query = scope.get("query_string") or b""
    path: bytes = scope.get("raw_path") or scope["path"].encode("latin-1")
    return path + b"?" + query if query else path


async def _body(receive: Receive) -> AsyncIterator[bytes]:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ConnectionError("the caller went away while sending the request body")
        chunk = message.get("body", b"")
        if chunk:
            yield chunk
        if not message.get("more_body", False):
            return


async def _request_content(scope: Scope, receive: Receive) -> bytes | AsyncIterator[bytes]:
    """The body to send on: bytes when it came whole in the first message or is small enough
    to replay (and has a length), else a stream — a gRPC stream's body has no end to wait for."""
    first = await receive()
    if first["type"] == "http.disconnect":
        raise ConnectionError("the caller went away while sending the request body")
    body: bytes = first.get("body", b"")
    if not first.get("more_body", False):
        return body
    length = next((v for k, v in scope["headers"] if k == b"content-length"), None)
    if length is not None and length.isdigit() and int(length) <= RETRY_BUFFER:
        return body + b"".join([chunk async for chunk in _body(receive)])
    return _then(body, _body(receive))


async def _then(first: bytes, rest: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    if first:
        yield first
    async for chunk in rest:
        yield chunk


async def _reply(send: Send, status: int, message: str, headers: list[tuple[bytes, bytes]]) -> None:
    body = (message + "\n").encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"text/plain"),
                (b"content-length", str(len(body)).encode()),
                *headers,
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


async def _relay(
    response: httpx.Response, send: Send, extra: list[tuple[bytes, bytes]], scope: Scope
) -> None:
    """Stream ``response`` to the caller as it arrives, and its trailers after it (an HTTP/2
    answer's, to a caller whose server takes them: gRPC's status)."""
    trailers: list[tuple[bytes, bytes]] | None = response.extensions.get("trailers")
    if trailers is not None and "http.response.trailers" not in scope.get("extensions", ()):
        trailers = None
    try:
        headers = forwarded_headers(response.headers.raw, drop=_EXCHANGE)
        await send(
            {
                "type": "http.response.start",
                "status": response.status_code,
                "headers": headers + extra if extra else headers,
                "trailers": trailers is not None,
            }
        )
        stream = response.stream
        assert isinstance(stream, httpx.AsyncByteStream)
        async for chunk in stream:
            if chunk:
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
        if trailers is None:
            await send({"type": "http.response.body", "body": b""})
        else:
            await send({"type": "http.response.body", "body": b"", "more_body": True})
            await send({"type": "http.response.trailers", "headers": trailers})
    finally:
        await response.aclose()


def outbound_app(handler: Callable[[Incoming], Awaitable[httpx.Response]]) -> ASGIApp:
    """The outbound handler as an ASGI app, for the HTTP/2 (h2c, gRPC) connections that the
    proxy's HTTP/1.1 server hands over to :class:`~libmesh.middleware._http2.Http2Protocol`."""
    from ._server import Incoming

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        incoming = Incoming(
            scope["method"],
            _target(scope),
            list(scope["headers"]),
            await _request_content(scope, receive),
            version="2",
        )
        await _relay(await handler(incoming), send, [], scope)

    return app


class Outbound:
    """Forwards what the program sends through the mesh (served by :class:`Http1Server`).

    With ``target`` (``host:port``) every request goes to that service (a port bound to one
    service); without, the request line's absolute form or else the Host header names it, as
    an HTTP proxy's caller gives it.
    """

    def __init__(self, transport: httpx.AsyncBaseTransport, target: str | None = None) -> None:
        self.transport = transport
        self.target = target

    async def __call__(self, incoming: Incoming) -> httpx.Response:
        if incoming.method == "CONNECT":
            return _local(
                405,
                "libmesh-proxy does not tunnel CONNECT: call http://service:port/ through it "
                "and the mesh secures the connection (mTLS) itself",
            )
        target = incoming.target
        authority = self.target
        if target[:1] != b"/" and target != b"*":  # absolute form: http://host:port/path
            try:
                parsed = httptools.parse_url(target)
            except httptools.HttpParserInvalidURLError:
                return _local(400, f"cannot forward to {target.decode('latin-1')!r}")
            if authority is None and parsed.host:
                port = b":%d" % parsed.port if parsed.port else b""
                authority = (parsed.host + port).decode("latin-1")
            target = (parsed.path or b"/") + (b"?" + parsed.query if parsed.query else b"")
        headers, _ = forwarded_entries([(k, k.lower(), v) for k, v in incoming.headers])
        if incoming.upgrade and incoming.upgrade.lower() != b"h2c":  # (h2c: answered in 1.1)
            headers += [
                (b"connection", b"connection", b"upgrade"),
                (b"upgrade", b"upgrade", incoming.upgrade),
            ]
        if authority is None:
            authority = next((v.decode("latin-1") for _, k, v in headers if k == b"host"), "")
            if not authority:
                return _local(400, "no Host header: which service is this request for?")
        elif self.target is not None:
            headers = [entry for entry in headers if entry[1] != b"host"]
            headers.append((b"host", b"host", authority.encode("latin-1")))
        try:
            url = service_url(authority, target)
        except httpx.InvalidURL as exc:
            return _local(400, f"cannot forward to {authority!r}: {exc}")
        body = incoming.body
        request = (
            wire_request(incoming.method, url, headers, body)
            if isinstance(body, bytes)
            else httpx.Request(
                incoming.method, url, headers=[(k, v) for k, _, v in headers], content=body
            )
        )
        try:
            return await self.transport.handle_async_request(request)
        except UpstreamError as exc:
            status = 504 if isinstance(exc, UpstreamTimeout) else 503
            flags = exc.response_flags.encode()
            return _local(status, str(exc), [(b"x-libmesh-response-flags", flags)])
        except httpx.TransportError as exc:  # a host outside the mesh, passed through
            return _local(502, f"{authority}: {type(exc).__name__}: {exc}")


_BASES: dict[str, httpx.URL] = {}  # http://<authority>/ by authority, each validated once
_PLAIN_TARGET = re.compile(rb"/[A-Za-z0-9\-._~!$&'()*+,;=:@/?]*")


def service_url(authority: str, target: bytes) -> httpx.URL:
    """``http://<authority><target>`` as httpx parses it. httpx's parser is the largest single
    cost of a proxied request (it checks every character, then percent-encodes and normalizes
    the path): the authority is parsed once, and a target that parsing would leave as it is
    (only characters allowed as they are, no dot segments) is put into the URL directly."""
    base = _BASES.get(authority)
    if base is None:
        base = httpx.URL(f"http://{authority}/")
        if len(_BASES) >= 1024:
            _BASES.clear()
        _BASES[authority] = base
    if _PLAIN_TARGET.fullmatch(target) and b"/." not in target:
        path, mark, query = target.decode("ascii").partition("?")
        reference = getattr(base, "_uri_reference", None)
        if reference is not None and hasattr(reference, "_replace"):  # httpx 0.23 and later
            url = httpx.URL.__new__(httpx.URL)
            url._uri_reference = reference._replace(path=path, query=query if mark else None)
            return url
    return httpx.URL(f"http://{authority}{target.decode('latin-1')}")


def _local(
    status: int, message: str, headers: list[tuple[bytes, bytes]] | None = None
) -> httpx.Response:
    """The proxy's own answer: the reason as a line of text."""
    return httpx.Response(
        status,
        headers=[(b"content-type", b"text/plain"), *(headers or ())],
        content=(message + "\n").encode(),
    )


class Inbound:
    """Hands each request, already admitted by :class:`~libmesh.middleware.MeshMiddleware`,
    to the program at ``app`` (``host:port``), with the caller's identity in
    ``x-forwarded-client-cert`` (never one the caller sent: Envoy's SANITIZE_SET)."""

    def __init__(self, app: str, own_identity: str = "", drain: Drain | None = None) -> None:
        self.app = app
        self.own_identity = own_identity
        self.drain = drain or Drain()
        self._url = httpx.URL(f"http://{app}")
        host, port = self._url.host, self._url.port or 80
        self.transport: httpx.AsyncBaseTransport = Http1Endpoint(host, port)
        self.grpc_transport: httpx.AsyncBaseTransport = Http2Endpoint(host, port)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "websocket":
            await self._websocket(scope, receive, send)
            return
        if kind != "http":
            raise NotImplementedError(f"libmesh-proxy does not forward {kind} connections")
        headers = forwarded_headers(scope["headers"], drop=_NOT_FOR_THE_APP)
        identity = _caller(scope)
        if identity is not None:
            headers.append((_XFCC, xfcc(self.own_identity, *identity)))
        request = httpx.Request(
            scope["method"],
            self._url.copy_with(raw_path=_target(scope)),
            headers=headers,
            content=await _request_content(scope, receive),
        )
        # gRPC exists only over HTTP/2 (with trailers); everything else goes as HTTP/1.1
        grpc = _is_grpc(request)
        transport = self.grpc_transport if grpc else self.transport
        try:
            response = await transport.handle_async_request(request)
        except httpx.TransportError as exc:
            logger.warning("libmesh-proxy: the app at %s did not answer: %s", self.app, exc)
            message = f"the app at {self.app} did not answer: {exc}"
            await _reply(send, 503, message, self.drain.headers())
            return
        await _relay(response, send, self.drain.headers(), scope)

    async def _websocket(self, scope: Scope, receive: Receive, send: Send) -> None:
        """A WebSocket (the server in front did the caller's handshake): the same handshake
        with the program, then each message passed on as it comes, both ways, until a side
        closes (its close code passed on too)."""
        from wsproto.connection import Connection, ConnectionType

        if (await receive())["type"] != "websocket.connect":
            return
        key = base64.b64encode(os.urandom(16))
        headers = [
            (name, value)
            for name, value in forwarded_headers(scope["headers"], drop=_NOT_FOR_THE_APP)
            if not name.startswith(b"sec-websocket-")  # (extensions are per hop: none here)
        ]
        headers += [
            (b"connection", b"upgrade"),
            (b"upgrade", b"websocket"),
            (b"sec-websocket-version", b"13"),
            (b"sec-websocket-key", key),
        ]
        if scope.get("subprotocols"):
            headers.append((b"sec-websocket-protocol", ", ".join(scope["subprotocols"]).encode()))
        identity = _caller(scope)
        if identity is not None:
            headers.append((_XFCC, xfcc(self.own_identity, *identity)))
        url = self._url.copy_with(raw_path=_target(scope))
        try:
            response = await self.transport.handle_async_request(
                httpx.Request("GET", url, headers=headers)
            )
        except httpx.TransportError as exc:
            logger.warning("libmesh-proxy: the app at %s did not answer: %s", self.app, exc)
            await send({"type": "websocket.close", "code": 1011})  # the caller gets a 403
            return
        tunnel: Tunnel | None = response.extensions.get("libmesh.tunnel")
        accepted = response.headers.get("sec-websocket-accept", "").encode()
        if response.status_code != 101 or tunnel is None or accepted != _accept(key):
            await response.aclose()
            if tunnel is not None:
                tunnel.close()
            logger.info(
                "libmesh-proxy: the app at %s refused a WebSocket (%d)",
                self.app,
                response.status_code,
            )
            await send({"type": "websocket.close", "code": 1008})
            return
        await send(
            {
                "type": "websocket.accept",
                "subprotocol": response.headers.get("sec-websocket-protocol"),
            }
        )
        relay = _WebSocketRelay(Connection(ConnectionType.CLIENT), tunnel, receive, send)
        try:
            await relay.run()
        finally:
            tunnel.close()
            await response.aclose()

    async def aclose(self) -> None:
        await self.transport.aclose()
        await self.grpc_transport.aclose()


def _caller(scope: Scope) -> tuple[str, bytes | None] | None:
    """The caller's verified SPIFFE ID and certificate (DER), when it presented one."""
    state = scope.get("state") or {}
    inbound = state.get("libmesh")
    tls = (scope.get("extensions") or {}).get("tls") or {}
    chain = tls.get("client_cert_chain") or ()
    # (a WebSocket's scope has no libmesh state: its certificate says who it is)
    principal = getattr(inbound, "peer_principal", "") if inbound is not None else _principal(scope)
    if not principal:
        return None
    der = ssl.PEM_cert_to_DER_cert(chain[0]) if chain else None
    return principal, der


_WEBSOCKET_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


def _accept(key: bytes) -> bytes:
    """The Sec-WebSocket-Accept a server must answer ``key`` with (RFC 6455 §4.2.2)."""
    return base64.b64encode(hashlib.sha1(key + _WEBSOCKET_GUID).digest())


class _WebSocketRelay:
    """Messages between the caller's WebSocket (ASGI, framed by the server in front) and the
    program's (frames on the tunnel, read and written with wsproto)."""

    def __init__(self, websocket: Any, tunnel: Tunnel, receive: Receive, send: Send) -> None:
        self.websocket = websocket
        self.tunnel = tunnel
        self.receive = receive
        self.send = send
        self.arrived: asyncio.Queue[bytes | None] = asyncio.Queue()

    async def run(self) -> None:
        self.tunnel.start(self.arrived.put_nowait, lambda: self.arrived.put_nowait(None))
        sides = [
            asyncio.ensure_future(self._from_caller()),
            asyncio.ensure_future(self._from_program()),
        ]
        try:
            await asyncio.wait(sides, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for side in sides:
                side.cancel()
            for side in sides:
                with contextlib.suppress(asyncio.CancelledError):
                    await side

    def _write(self, event: Any) -> None:
        from wsproto.utilities import LocalProtocolError

        with contextlib.suppress(LocalProtocolError):  # (closing already)
            self.tunnel.write(self.websocket.send(event))

    async def _from_caller(self) -> None:
        from wsproto.events import CloseConnection, Message

        while True:
            message = await self.receive()
            if message["type"] == "websocket.receive":
                text = message.get("text")
                self._write(Message(data=text if text is not None else message.get("bytes", b"")))
            elif message["type"] == "websocket.disconnect":
                self._write(CloseConnection(code=message.get("code", 1000)))
                return

    async def _from_program(self) -> None:
        from wsproto.events import BytesMessage, CloseConnection, Ping, TextMessage

        parts: list[Any] = []
        while (data := await self.arrived.get()) is not None:
            self.websocket.receive_data(data)
            for event in self.websocket.events():
                if isinstance(event, TextMessage | BytesMessage):
                    parts.append(event.data)
                    if event.message_finished:
                        text = isinstance(event, TextMessage)
                        whole = "".join(parts) if text else b"".join(parts)
                        parts = []
                        await self.send(
                            {"type": "websocket.send", "text" if text else "bytes": whole}
                        )
                elif isinstance(event, Ping):
                    self._write(event.response())
                elif isinstance(event, CloseConnection):
                    self._write(event.response())
                    await self.send(
                        {
                            "type": "websocket.close",
                            "code": event.code,
                            "reason": event.reason or "",
                        }
                    )
                    return
        # the program went away without a close frame: the caller learns of it as abnormal
        await self.send({"type": "websocket.close", "code": 1011})
