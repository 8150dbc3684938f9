"""The proxy's own HTTP/1.1 server, for its outbound listeners (a connection that opens with
HTTP/2's preface — h2c, gRPC — goes to :mod:`libmesh.middleware._http2` instead).

An ASGI server would turn each request into dictionaries and each header list into another;
the outbound side only hands requests to the mesh's transport and its answers back, so this
server parses with httptools straight into an :class:`httpx.Request` and writes the
:class:`httpx.Response` straight out. Keep-alive, pipelined requests (answered in order),
streamed bodies both ways (a request body of known length up to ``RETRY_BUFFER`` is read first,
so that the mesh can send it again), ``Connection: close`` while draining, an idle timeout.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import httptools
import httpx

from ..middleware._asgi import ASGIApp
from ..middleware._grpc_port import Relay
from ..middleware._http2 import PREFACE, Http2Protocol
from ..transport._http1 import Tunnel
from ._forward import RETRY_BUFFER, Drain, forwarded_entries, header_entries, outbound_app

__all__ = ["Http1Server", "Incoming"]

logger = logging.getLogger("libmesh.proxy")

_HIGH_WATER = 1 << 20  # request body bytes held before reading pauses
_MAX_PIPELINED = 16  # requests read ahead of their answers before reading pauses
_NO_BODY = frozenset({204, 304})
_REASONS = {200: b"OK"}


@dataclass(slots=True)
class Incoming:
    """A request as it came in: the method, the request target as sent (origin or absolute
    form), the headers, and the body (bytes, or a stream when it is large or chunked)."""

    method: str
    target: bytes
    headers: list[tuple[bytes, bytes]]
    body: bytes | AsyncIterator[bytes] = b""
    version: str = "1.1"
    upgrade: bytes = b""  # the protocol an Upgrade request asks for (websocket)
    _chunks: deque[bytes] = field(default_factory=deque)
    _done: bool = False


Handler = Callable[[Incoming], Awaitable[httpx.Response]]


class _Connection(asyncio.Protocol):
    def __init__(
        self, server: Http1Server, handler: Handler | None = None, authority: str = ""
    ) -> None:
        self.server = server
        self.handler = handler or server.handler
        self.authority = authority  # inside a CONNECT tunnel: the host:port it was opened to
        self.loop = asyncio.get_running_loop()
        self.parser = httptools.HttpRequestParser(self)
        self.transport: Any = None
        self.pending: deque[Incoming] = deque()
        self.current: Incoming | None = None
        self.worker: asyncio.Task[None] | None = None
        self._ready: asyncio.Future[None] | None = None  # the worker waits here for requests
        self.busy = False
        self.closed = False
        self._url = b""
        self._headers: list[tuple[bytes, bytes]] = []
        self._streamed: Incoming | None = None
        self._wake: asyncio.Future[None] | None = None
        self._buffered = 0
        self._paused = False
        self._held = False  # reading paused for too many pipelined requests
        # The keep-alive timer is one per connection, armed lazily: activity only moves
        # ``_active`` and the timer, when it fires early, waits the rest (a timer made and
        # cancelled on every request costs more than the rest of its bookkeeping).
        self._idle: asyncio.TimerHandle | None = None
        self._active = 0.0
        self._fresh = True  # nothing read yet: HTTP/2's preface is looked for
        self._seen = b""
        self._early = b""  # what a caller sent after its Upgrade request, before the answer

    # asyncio ----------------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        self.server.connections.add(self)
        self._arm_idle()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.server.connections.discard(self)
        self._stop_idle()
        self._wake_body()
        if self._ready is not None and not self._ready.done():
            self._ready.set_result(None)  # the worker sees the connection is gone

    def data_received(self, data: bytes) -> None:
        self._active = self.loop.time()
        if self._fresh:
            self._seen += data
            if len(self._seen) < len(PREFACE) and PREFACE.startswith(self._seen):
                return  # maybe HTTP/2: wait for the rest of the preface
            self._fresh = False
            data, self._seen = self._seen, b""
            if data.startswith(PREFACE):
                self._to_http2(data)
                return
            if self.authority and data[0] == _TLS_HANDSHAKE:
                self._pass_through(data)
                return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade as upgrade:  # CONNECT, or an Upgrade request
            self._early = data[upgrade.args[0] :]  # answered in turn; what follows is the tunnel's
            self.transport.pause_reading()
        except httptools.HttpParserError as exc:
            self._refuse(400, f"not an HTTP/1.1 request: {exc}")

    def _to_http2(self, data: bytes) -> None:
        """HTTP/2 with prior knowledge (h2c, gRPC): the connection goes to the HTTP/2 server,
        with the same handler behind it."""
        server = self.server
        server.connections.discard(self)
        self._stop_idle()
        app = outbound_app(self.handler) if self.authority else server.http2_app()
        protocol = Http2Protocol(app, on_close=server.connections.discard)
        server.connections.add(protocol)
        self.transport.set_protocol(protocol)
        protocol.connection_made(self.transport)
        protocol.data_received(data)

    def _refuse(self, status: int, message: str) -> None:
        body = (message + "\n").encode()
        self.transport.write(
            b"HTTP/1.1 %d %b\r\ncontent-type: text/plain\r\ncontent-length: %d\r\n"
            b"connection: close\r\n\r\n%b" % (status, _reason(status), len(body), body)
        )
        self.transport.close()

    # httptools --------------------------------------------------------------------------------

    def on_message_begin(self) -> None:
        self._url = b""
        self._headers = []

    def on_url(self, url: bytes) -> None:
        self._url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name, value))

    def on_headers_complete(self) -> None:
        parser = self.parser
        request = Incoming(
            parser.get_method().decode("latin-1"),
            self._url,
            self._headers,
            version=parser.get_http_version(),
        )
        length = chunked = None
        expects = False
        for name, value in self._headers:
            lowered = name.lower()
            if lowered == b"content-length":
                length = int(value) if value.isdigit() else None
            elif lowered == b"transfer-encoding":
                chunked = True
            elif lowered == b"expect" and value.lower() == b"100-continue":
                expects = True
        if parser.should_upgrade():
            request.upgrade = next(
                (v for k, v in self._headers if k.lower() == b"upgrade"), b""
            ).strip()
        if expects:
            # The body is read here in any case: say so at once (curl otherwise waits a second
            # before sending it), and do not ask the upstream again (as Envoy does by default).
            self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            request.headers = [(k, v) for k, v in self._headers if k.lower() != b"expect"]
        if chunked or (length is not None and length > RETRY_BUFFER):
            request.body = self._stream(request)
            self.pending.append(request)  # answered while its body still arrives
            self._streamed = request
            self._start()
        else:
            self.current = request

    def on_body(self, body: bytes) -> None:
        streamed = self._streamed
        if streamed is not None:
            streamed._chunks.append(body)
            self._buffered += len(body)
            if self._buffered > _HIGH_WATER and not self._paused:
                self.transport.pause_reading()
                self._paused = True
            self._wake_body()
        elif self.current is not None:
            self.current._chunks.append(body)

    def on_message_complete(self) -> None:
        streamed = self._streamed
        if streamed is not None:
            streamed._done = True
            self._streamed = None
            self._wake_body()
            return
        request = self.current
        if request is None:
            return
        self.current = None
        if request._chunks:
            request.body = b"".join(request._chunks)
            request._chunks.clear()
        self.pending.append(request)
        if len(self.pending) >= _MAX_PIPELINED and not self._held:
            self.transport.pause_reading()  # a caller far ahead of its answers waits
            self._held = True
        self._start()

    # answering --------------------------------------------------------------------------------

    def _wake_body(self) -> None:
        if self._wake is not None and not self._wake.done():
            self._wake.set_result(None)

    async def _stream(self, request: Incoming) -> AsyncIterator[bytes]:
        while True:
            while request._chunks:
                chunk = request._chunks.popleft()
                self._buffered -= len(chunk)
                if self._paused and self._buffered < _HIGH_WATER // 4:
                    self.transport.resume_reading()
                    self._paused = False
                yield chunk
            if request._done:
                return
            if self.closed:
                raise ConnectionError("the caller went away while sending the request body")
            self._wake = self.loop.create_future()
            await self._wake

    def _start(self) -> None:
        if self.busy:
            return
        self.busy = True
        if self.worker is None:
            self.worker = self.loop.create_task(self._answer_all())
        elif self._ready is not None and not self._ready.done():
            self._ready.set_result(None)

    async def _answer_all(self) -> None:
        """The connection's one worker (a task per connection, not per request): answers what
        is pending, in order, then waits for more."""
        try:
            while not self.closed:
                if not self.pending:
                    self.busy = False
                    self._arm_idle()
                    self._ready = self.loop.create_future()
                    await self._ready
                    continue
                request = self.pending.popleft()
                if self._held and len(self.pending) < _MAX_PIPELINED // 4:
                    self.transport.resume_reading()
                    self._held = False
                keep = await self._answer(request)
                if keep is None:
                    return
                if not keep:
                    self.transport.close()
                    return
        except ConnectionError as exc:  # the caller went away mid-request
            logger.debug("libmesh-proxy: %s", exc)
            self.transport.close()
        except Exception:  # a bug: the caller gets its connection closed, the log says why
            logger.exception("libmesh-proxy: answering a request failed")
            self.transport.close()
        finally:
            self.busy = False

    async def _answer(self, request: Incoming) -> bool | None:
        """Answer one request; whether the connection stays open (``None``: it is another
        protocol's now)."""
        if request.method == "CONNECT":
            return self._open_tunnel(request)
        response = await self.handler(request)
        server = self.server
        headers, tokens = forwarded_entries(header_entries(response.headers), server.drop)
        keep = (
            request.version == "1.1"
            and not server.drain.active
            and not _says_close(request.headers)
            and b"close" not in tokens
        )
        status = response.status_code
        if request.upgrade:
            tunnel = response.extensions.get("libmesh.tunnel")
            if status == 101 and tunnel is not None:
                await self._tunnel(response, tunnel)
                return False
            keep = False  # the caller's bytes after its request were meant for another protocol
        lines = [b"HTTP/1.1 %d %b\r\n" % (status, _reason(status))]
        length = False
        for name, lowered, value in headers:
            lines.append(b"%b: %b\r\n" % (name, value))
            length = length or lowered == b"content-length"
        bodiless = request.method == "HEAD" or status in _NO_BODY or status < 200
        chunked = not bodiless and not length and request.version == "1.1"
        if not bodiless and not length and not chunked:
            keep = False  # an HTTP/1.0 caller: the body ends where the connection does
        if chunked:
            lines.append(b"transfer-encoding: chunked\r\n")
        if not keep:
            lines.append(b"connection: close\r\n")
        lines.append(b"\r\n")
        write = self.transport.write
        stream = response.stream
        assert isinstance(stream, httpx.AsyncByteStream)
        try:
            if bodiless:
                write(b"".join(lines))
                return keep
            first = True
            async for chunk in stream:
                if self.closed:
                    return False
                if not chunk:
                    continue
                data = b"%x\r\n%b\r\n" % (len(chunk), chunk) if chunked else chunk
                if first:
                    lines.append(data)
                    write(b"".join(lines))
                    first = False
                else:
                    write(data)
            tail = b"0\r\n\r\n" if chunked else b""
            write(b"".join(lines) + tail if first else tail)
        except httpx.TransportError as exc:  # the upstream failed mid-answer: cut this one too
            logger.info("libmesh-proxy: the answer broke off: %s", exc)
            return False
        finally:
            await stream.aclose()
        return keep

    def _open_tunnel(self, request: Incoming) -> bool | None:
        """CONNECT host:port (what grpcio does with ``http_proxy``, curl with ``-p``): the
        tunnel's bytes are served as a new connection whose requests all go to that service
        through the mesh (HTTP/1.1 or HTTP/2); TLS inside it — the caller's own, to a host
        outside the mesh — passes through untouched."""
        authority = request.target.decode("latin-1")
        host, sep, port = authority.rpartition(":")
        if self.server.for_target is None or self.authority:
            self._refuse(405, "libmesh-proxy does not tunnel CONNECT on this port")
            return None
        if not sep or not host or not port.isdigit():
            self._refuse(400, f"CONNECT needs host:port, not {authority!r}")
            return None
        self.transport.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
        self._stop_idle()
        inner = _Connection(self.server, self.server.for_target(authority), authority)
        self.server.connections.discard(self)
        self.transport.set_protocol(inner)
        inner.connection_made(self.transport)
        early, self._early = self._early, b""
        if early:
            inner.data_received(early)
        self.transport.resume_reading()
        return None

    def _pass_through(self, data: bytes) -> None:
        self.busy = True  # (not idle: a drain leaves it to the end of its timeout)
        self.transport.pause_reading()
        task = self.loop.create_task(self._relay_bytes(data))
        self.server.tasks.add(task)
        task.add_done_callback(self.server.tasks.discard)

    async def _relay_bytes(self, first: bytes) -> None:
        host, _, port = self.authority.rpartition(":")
        downstream = self.transport
        try:
            upstream, _ = await asyncio.wait_for(
                self.loop.create_connection(lambda: Relay(downstream), host.strip("[]"), int(port)),
                10,
            )
        except (OSError, TimeoutError) as exc:
            logger.info("libmesh-proxy: CONNECT %s: %s", self.authority, exc or "timed out")
            downstream.close()
            return
        upstream.write(first)
        downstream.set_protocol(Relay(upstream, lambda: self.connection_lost(None)))
        downstream.resume_reading()

    async def _tunnel(self, response: httpx.Response, tunnel: Tunnel) -> None:
        """The upstream switched protocols (a WebSocket): say so to the caller, then pass the
        bytes both ways until either side closes; the exchange is counted when it ends."""
        head = [b"HTTP/1.1 101 Switching Protocols\r\n"]
        for name, value in response.headers.raw:  # Connection and Upgrade included, this once
            if name.lower() not in _NOT_ON_A_SWITCH:
                head.append(b"%b: %b\r\n" % (name, value))
        head.append(b"\r\n")
        self.transport.write(b"".join(head))
        pipe = _Pipe(self, tunnel)
        self.transport.set_protocol(pipe)
        tunnel.start(
            self.transport.write,
            pipe.upstream_closed,
            pause=self.transport.pause_reading,
            resume=self.transport.resume_reading,
        )
        early, self._early = self._early, b""
        if early:
            tunnel.write(early)
        self.transport.resume_reading()
        try:
            await pipe.done
        finally:
            tunnel.close()
            await response.aclose()

    def _arm_idle(self) -> None:
        if not self.closed and not self.busy:
            self._active = self.loop.time()
            if self._idle is None:
                self._idle = self.loop.call_at(
                    self._active + self.server.keep_alive, self._idle_close
                )

    def _stop_idle(self) -> None:
        """The connection is another protocol's now: its keep-alive is no longer ours."""
        if self._idle is not None:
            self._idle.cancel()
            self._idle = None

    def _idle_close(self) -> None:
        self._idle = None
        if self.closed or self.busy or self.current is not None:
            return  # a request under way: armed again when the connection is idle
        quiet_until = self._active + self.server.keep_alive
        if self.loop.time() >= quiet_until:
            self.transport.close()
        else:
            self._idle = self.loop.call_at(quiet_until, self._idle_close)

    def close_if_idle(self) -> None:
        if not self.busy and self.current is None and not self.closed:
            self.transport.close()


_TLS_HANDSHAKE = 0x16


_NOT_ON_A_SWITCH = frozenset({b"content-length", b"transfer-encoding", b"keep-alive"})


class _Pipe(asyncio.Protocol):
    """The caller's side of a tunnel: its bytes go to the upstream as they come."""

    def __init__(self, connection: _Connection, tunnel: Tunnel) -> None:
        self.connection = connection
        self.tunnel = tunnel
        self.done: asyncio.Future[None] = connection.loop.create_future()

    def data_received(self, data: bytes) -> None:
        self.tunnel.write(data)

    def eof_received(self) -> bool:
        return False  # the caller is done: so is the tunnel

    def pause_writing(self) -> None:
        self.tunnel.pause_reading()  # the caller is not reading: neither do we from upstream

    def resume_writing(self) -> None:
        self.tunnel.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        self.connection.connection_lost(exc)
        if not self.done.done():
            self.done.set_result(None)

    def upstream_closed(self) -> None:
        self.connection.transport.close()
        if not self.done.done():
            self.done.set_result(None)


class Http1Server:
    """Serves ``handler`` on a bound socket."""

    def __init__(
        self,
        handler: Handler,
        drain: Drain,
        *,
        drop: frozenset[bytes] = frozenset(),
        keep_alive: float = 60.0,
        for_target: Callable[[str], Handler] | None = None,
    ) -> None:
        """``for_target(authority)``: the handler for a CONNECT tunnel's requests (none: CONNECT
        is refused)."""
        self.handler = handler
        self.for_target = for_target
        self.tasks: set[asyncio.Task[None]] = set()
        self.drain = drain
        self.drop = drop
        self.keep_alive = keep_alive
        self.connections: set[_Connection | Http2Protocol] = set()
        self._server: asyncio.AbstractServer | None = None
        self._http2: ASGIApp | None = None

    def http2_app(self) -> ASGIApp:
        if self._http2 is None:
            self._http2 = outbound_app(self.handler)
        return self._http2

    async def start(self, sock: Any) -> None:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(lambda: _Connection(self), sock=sock)

    def stop_accepting(self) -> None:
        if self._server is not None:
            self._server.close()

    async def shutdown(self, timeout: float) -> None:
        """Close the idle connections, give the busy ones ``timeout`` to finish, then cut."""
        self.stop_accepting()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while self.connections and loop.time() < deadline:
            for connection in list(self.connections):
                if isinstance(connection, Http2Protocol):
                    connection.shutdown()  # GOAWAY: closed once its streams are answered
                else:
                    connection.close_if_idle()
            await asyncio.sleep(0.05)
        for connection in list(self.connections):
            connection.transport.abort()


def _says_close(headers: list[tuple[bytes, bytes]]) -> bool:
    return any(
        name.lower() == b"connection" and b"close" in value.lower() for name, value in headers
    )


def _reason(status: int) -> bytes:
    known = _REASONS.get(status)
    if known is None:
        from http import HTTPStatus

        try:
            known = HTTPStatus(status).phrase.encode()
        except ValueError:
            known = b""
        _REASONS[status] = known
    return known
