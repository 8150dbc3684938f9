"""A lean HTTP/1.1 connection pool to one endpoint, for asyncio: what libmesh-proxy sends its
requests through (``AsyncMeshTransport(..., connection_pool="libmesh")``).

httpcore's pool costs a proxy most of its time: on every request it polls each idle connection
for readability, looks for sniffio, and wraps the socket in anyio. Here a connection is an
asyncio protocol with httptools' parser: the event loop already knows when a server closes an
idle connection (``connection_lost``), timeouts are timer handles rather than tasks, and a body
is handed over chunk by chunk as it arrives (reading pauses when the caller falls behind).

It speaks httpx's transport interface, and raises httpx's exceptions (``ConnectError``,
``ConnectTimeout``, ``ReadError``, ``ReadTimeout``, ``RemoteProtocolError``), so the mesh's
transport decides retries and outlier detection on them as on httpcore's.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from typing import Any

import httptools
import httpx

from ._httpx import _server_name, _tls_reason, wire_headers

__all__ = ["Endpoint", "Http1Endpoint", "Tunnel"]

_MAX_IDLE = 100
_HIGH_WATER = 1 << 16  # bytes of response body held before reading pauses
_CHUNKED = b"chunked"


class _Connection(asyncio.Protocol):
    """One connection: one request at a time, its response parsed as it arrives."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.transport: Any = None  # asyncio's, or uvloop's (not an asyncio.Transport)
        self.parser = httptools.HttpResponseParser(self)
        self.closed = False
        self.idle_since = 0.0
        self._head: asyncio.Future[None] | None = None
        self._status = 0
        self._headers: list[tuple[bytes, bytes]] = []
        self._chunks: deque[bytes] = deque()
        self._buffered = 0
        self._wake: asyncio.Future[None] | None = None
        self._writable: asyncio.Future[None] | None = None
        self._paused = False
        self.complete = False
        self.keep_alive = True
        self._until_close = False
        self.error: Exception | None = None
        self.tunnel: Tunnel | None = None  # after a 101 answer: the bytes are the caller's
        self._waiting: tuple[asyncio.Future[Any], str] | None = None  # (what, why) for _wait
        self._deadline = 0.0
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0

    # asyncio ----------------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        if self.tunnel is not None:
            self.tunnel._feed(data)
            return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade as exc:  # 101 Switching Protocols: a tunnel now
            self.tunnel = Tunnel(self, data[exc.args[0] :])
        except httptools.HttpParserError as exc:
            self._fail(httpx.RemoteProtocolError(f"the server's answer is not HTTP/1.1: {exc}"))
            self.close()

    def eof_received(self) -> bool:
        return False  # close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self.tunnel is not None:
            self.tunnel._lost()
        if self._status and not self.complete and self._until_close and exc is None:
            self.complete = True  # an answer without a length ends where the connection does
            self._notify()
        if not self.complete:
            if self._head is not None and not self._head.done():
                self._fail(
                    httpx.RemoteProtocolError("the server closed the connection without answering")
                )
            else:
                self._fail(
                    httpx.ReadError(
                        f"the server closed the connection mid-answer{f': {exc}' if exc else ''}"
                    )
                )
        if self._writable is not None and not self._writable.done():
            self._writable.set_result(None)

    def pause_writing(self) -> None:
        self._writable = self.loop.create_future()
        if self.tunnel is not None and self.tunnel._pause is not None:
            self.tunnel._pause()  # the server is not reading: neither do we from the caller

    def resume_writing(self) -> None:
        if self._writable is not None and not self._writable.done():
            self._writable.set_result(None)
        self._writable = None
        if self.tunnel is not None and self.tunnel._resume is not None:
            self.tunnel._resume()

    # httptools --------------------------------------------------------------------------------

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name, value))

    def on_headers_complete(self) -> None:
        status = self.parser.get_status_code()
        if 100 <= status < 200 and status != 101:  # an interim answer: the real one follows
            self._headers = []
            return
        self._status = status
        self.keep_alive = self.parser.should_keep_alive()
        self._until_close = not any(
            name.lower() in (b"content-length", b"transfer-encoding") for name, _ in self._headers
        )
        if self._head is not None and not self._head.done():
            self._head.set_result(None)

    def on_body(self, body: bytes) -> None:
        self._chunks.append(body)
        self._buffered += len(body)
        if self._buffered > _HIGH_WATER and not self._paused and self.transport is not None:
            self.transport.pause_reading()
            self._paused = True
        self._notify()

    def on_message_complete(self) -> None:
        if self._status:
            self.complete = True
            self._notify()

    # the exchange -----------------------------------------------------------------------------

    def _notify(self) -> None:
        if self._wake is not None and not self._wake.done():
            self._wake.set_result(None)

    def _fail(self, error: Exception) -> None:
        self.error = error
        if self._head is not None and not self._head.done():
            self._head.set_exception(error)
        self._notify()

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()

    async def _wait(self, future: asyncio.Future[Any], timeout: float | None, what: str) -> None:
        """Wait for ``future``, failing it with ``ReadTimeout(what)`` after ``timeout``.

        One timer per connection, armed lazily: a wait only sets the deadline, and the timer,
        when it fires before the deadline, waits the rest (a timer made and cancelled on every
        request costs more than the rest of the wait's bookkeeping)."""
        if timeout is None:
            await future
            return
        deadline = self.loop.time() + timeout
        self._waiting, self._deadline = (future, what), deadline
        if self._timer is None or self._timer_at > deadline:
            if self._timer is not None:
                self._timer.cancel()
            self._timer, self._timer_at = self.loop.call_at(deadline, self._expired), deadline
        try:
            await future
        finally:
            self._waiting = None

    def _expired(self) -> None:
        self._timer = None
        if self._waiting is None:
            return  # nothing waits: the timer lapses, the next wait arms it again
        if self.loop.time() >= self._deadline:
            future, what = self._waiting
            _expire(future, httpx.ReadTimeout(what))
        else:
            self._timer = self.loop.call_at(self._deadline, self._expired)
            self._timer_at = self._deadline

    async def send(self, request: httpx.Request, head: bytes, timeouts: dict[str, Any]) -> None:
        """Write the request (streaming its body) and wait for the answer's head."""
        assert self.transport is not None
        self._status, self._headers, self.complete, self.error = 0, [], False, None
        self._until_close = False
        self._chunks.clear()
        self._buffered = 0
        self._head = self.loop.create_future()
        self.transport.write(head)
        stream = request.stream
        chunked = any(  # (httpx's Headers.get costs more than this scan)
            name.lower() == b"transfer-encoding" and value.lower() == _CHUNKED
            for name, value in request.headers.raw
        )
        if isinstance(stream, httpx.ByteStream):
            body = b"".join(stream)  # one chunk: the whole body
            if body:
                self.transport.write(
                    b"%x\r\n%b\r\n0\r\n\r\n" % (len(body), body) if chunked else body
                )
        else:
            assert isinstance(stream, httpx.AsyncByteStream)
            async for chunk in stream:
                if self.closed:
                    break
                if chunk:
                    self.transport.write(
                        b"%x\r\n%b\r\n" % (len(chunk), chunk) if chunked else chunk
                    )
                if self._writable is not None:
                    await self._writable
            if chunked and not self.closed:
                self.transport.write(b"0\r\n\r\n")
        await self._wait(self._head, timeouts.get("read"), "no answer within the read timeout")

    @property
    def silent(self) -> bool:
        """Whether the server said nothing at all to the request sent last."""
        return self._status == 0 and not self._headers and not self._chunks

    def response_head(self) -> tuple[int, list[tuple[bytes, bytes]]]:
        return self._status, self._headers

    async def next_chunk(self, timeout: float | None) -> bytes | None:
        """The answer's next piece of body, ``None`` at its end."""
        while True:
            if self._chunks:
                chunk = self._chunks.popleft()
                self._buffered -= len(chunk)
                if self._paused and self._buffered <= _HIGH_WATER // 4 and self.transport:
                    self.transport.resume_reading()
                    self._paused = False
                return chunk
            if self.complete:
                return None
            if self.error is not None:
                raise self.error
            self._wake = self.loop.create_future()
            await self._wait(self._wake, timeout, "the answer stalled past the read timeout")


class Tunnel:
    """The connection a ``101 Switching Protocols`` answer left open (a WebSocket): bytes both
    ways from then on, handed to whoever took the answer (``response.extensions
    ["libmesh.tunnel"]``). Bytes the server sent before :meth:`start` are kept for it."""

    def __init__(self, connection: _Connection, early: bytes) -> None:
        self._connection = connection
        self._early = [early] if early else []
        self._on_data: Callable[[bytes], None] | None = None
        self._on_close: Callable[[], None] | None = None
        self._pause: Callable[[], None] | None = None
        self._resume: Callable[[], None] | None = None
        self.closed = False

    def start(
        self,
        on_data: Callable[[bytes], None],
        on_close: Callable[[], None],
        *,
        pause: Callable[[], None] | None = None,
        resume: Callable[[], None] | None = None,
    ) -> None:
        """Hand each chunk the server sends to ``on_data``, and its end to ``on_close``;
        ``pause``/``resume`` are called while the server's side cannot take more."""
        self._on_data, self._on_close = on_data, on_close
        self._pause, self._resume = pause, resume
        early, self._early = self._early, []
        for chunk in early:
            on_data(chunk)
        if self.closed:
            on_close()

    def write(self, data: bytes) -> None:
        if not self._connection.closed:
            self._connection.transport.write(data)

    def pause_reading(self) -> None:
        if not self._connection.closed:
            self._connection.transport.pause_reading()

    def resume_reading(self) -> None:
        if not self._connection.closed:
            self._connection.transport.resume_reading()

    def close(self) -> None:
        self._connection.close()

    def _feed(self, data: bytes) -> None:
        if self._on_data is None:
            self._early.append(data)
        else:
            self._on_data(data)

    def _lost(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self._on_close is not None:
            self._on_close()


def _expire(future: asyncio.Future[Any], error: Exception) -> None:
    if not future.done():
        future.set_exception(error)


class _Body(httpx.AsyncByteStream):
    """The answer's body as it arrives. Its own iterator (no async generator: asyncio tracks
    each one it starts, a cost on every request)."""

    def __init__(
        self, connection: _Connection, timeout: float | None, release: Callable[[_Connection], None]
    ) -> None:
        self._connection = connection
        self._timeout = timeout
        self._release: Callable[[_Connection], None] | None = release

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self

    async def __anext__(self) -> bytes:
        try:
            chunk = await self._connection.next_chunk(self._timeout)
        except httpx.TransportError:
            self._connection.close()
            raise
        if chunk is None:
            raise StopAsyncIteration
        return chunk

    async def aclose(self) -> None:
        release, self._release = self._release, None
        if release is not None:
            release(self._connection)


class Endpoint(httpx.AsyncBaseTransport):
    """One endpoint (``address``, ``port``, or a Unix socket ``uds``) and how a connection to
    it is made: what the lean HTTP/1.1 and HTTP/2 pools share. ``tls`` (the mesh transport's)
    secures and checks each new connection."""

    def __init__(
        self,
        address: str,
        port: int,
        *,
        uds: str | None = None,
        tls: Any = None,
        keepalive_expiry: float = 5.0,
    ) -> None:
        self._address = address
        self._port = port
        self._uds = uds
        self._tls = tls
        self._expiry = keepalive_expiry
        self._where = f"unix:{uds}" if uds is not None else f"{address}:{port}"

    async def _dial(
        self,
        factory: Callable[[], asyncio.Protocol],
        request: httpx.Request,
        timeout: float | None,
    ) -> tuple[Any, Any]:
        """A new connection, secured and its server checked when ``tls`` says so; failures
        are httpx's errors, which the mesh decides retries and outlier detection on. The
        transport and the protocol ``factory`` made."""
        loop = asyncio.get_running_loop()
        address, port, uds, tls = self._address, self._port, self._uds, self._tls
        context = server_name = None
        if tls is not None:
            if uds is not None:
                raise httpx.ConnectError(
                    f"TLS error: the cluster asks for TLS to unix:{uds}, which libmesh "
                    "does not secure (refused rather than sent in plaintext)",
                    request=request,
                )
            context = tls.context()
            server_name = _server_name(tls, request.url.host)
        try:
            if uds is not None:
                connecting = loop.create_unix_connection(factory, uds)
            else:
                connecting = loop.create_connection(
                    factory,
                    address,
                    port,
                    ssl=context,
                    server_hostname=server_name if context is not None else None,
                )
            transport, protocol = await asyncio.wait_for(connecting, timeout)
        except TimeoutError as exc:
            message = f"connecting to {self._where} timed out"
            raise httpx.ConnectTimeout(message, request=request) from exc
        except ssl.SSLError as exc:
            raise httpx.ConnectError(f"TLS error: {_tls_reason(exc)}", request=request) from exc
        except OSError as exc:
            raise httpx.ConnectError(str(exc) or type(exc).__name__, request=request) from exc
        if tls is not None:
            try:
                tls.check(transport.get_extra_info("ssl_object"))
            except ssl.SSLError as exc:
                transport.close()
                raise httpx.ConnectError(f"TLS error: {_tls_reason(exc)}", request=request) from exc
        return transport, protocol


class Http1Endpoint(Endpoint):
    """HTTP/1.1 to one endpoint, every request keeping its own URL and Host header."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._idle: list[_Connection] = []

    async def _connect(self, request: httpx.Request, timeout: float | None) -> _Connection:
        loop = asyncio.get_running_loop()
        _, connection = await self._dial(lambda: _Connection(loop), request, timeout)
        return connection  # type: ignore[no-any-return]

    def _take_idle(self) -> _Connection | None:
        now = time.monotonic()
        while self._idle:
            connection = self._idle.pop()
            if not connection.closed and now - connection.idle_since < self._expiry:
                return connection
            connection.close()
        return None

    def _release(self, connection: _Connection) -> None:
        if (
            connection.complete
            and connection.keep_alive
            and not connection.closed
            and len(self._idle) < _MAX_IDLE
        ):
            connection.idle_since = time.monotonic()
            self._idle.append(connection)
        else:
            connection.close()

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        timeouts = request.extensions.get("timeout") or {}
        head = _head(request)
        connection = self._take_idle()
        reused = connection is not None
        if connection is None:
            connection = await self._connect(request, timeouts.get("connect"))
        try:
            try:
                await connection.send(request, head, timeouts)
            except httpx.RemoteProtocolError:
                if not (
                    reused and connection.silent and isinstance(request.stream, httpx.ByteStream)
                ):
                    raise
                # The server closed this idle connection as the request went out (its
                # keep-alive ran out first): nothing was answered, so send it once more on a
                # new connection, as browsers and urllib3 do.
                connection.close()
                connection = await self._connect(request, timeouts.get("connect"))
                await connection.send(request, head, timeouts)
        except httpx.TransportError as exc:
            connection.close()
            exc.request = request
            raise
        except BaseException:
            connection.close()
            raise
        status, headers = connection.response_head()
        if connection.tunnel is not None:  # the connection is the caller's now, never pooled
            return httpx.Response(
                status,
                headers=headers,
                stream=httpx.ByteStream(b""),
                extensions={"http_version": b"HTTP/1.1", "libmesh.tunnel": connection.tunnel},
            )
        if request.method == "HEAD":  # no body follows, whatever the headers say
            connection.complete, connection.keep_alive = True, False
        response = httpx.Response(
            status,
            stream=_Body(connection, timeouts.get("read"), self._release),
            extensions={"http_version": b"HTTP/1.1"},
        )
        wire_headers(response.headers, headers)
        return response

    async def aclose(self) -> None:
        idle, self._idle = self._idle, []
        for connection in idle:
            connection.close()


def _head(request: httpx.Request) -> bytes:
    target = request.url.raw_path or b"/"
    lines = [b"%b %b HTTP/1.1\r\n" % (request.method.encode(), target)]
    for name, value in request.headers.raw:
        lines.append(b"%b: %b\r\n" % (name, value))
    lines.append(b"\r\n")
    return b"".join(lines)
