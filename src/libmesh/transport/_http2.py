"""A lean HTTP/2 connection pool to one endpoint, for asyncio: the twin of
:mod:`libmesh.transport._http1` for upstreams that speak HTTP/2 (gRPC servers, h2c services).

A connection is an asyncio protocol driving the ``h2`` state machine. Concurrent requests share
it as streams up to the server's SETTINGS_MAX_CONCURRENT_STREAMS; another connection opens only
when every one is full. Plain TCP speaks HTTP/2 with prior knowledge (h2c); over TLS the server
must choose ``h2`` in ALPN. Timeouts are timer handles rather than tasks, and a body is handed
over as its DATA arrives, acknowledged as the caller reads it (a slow reader slows its server).
A GOAWAY stops new streams on its connection; the streams the server kept still finish.

It raises httpx's exceptions (``ConnectError``, ``ConnectTimeout``, ``ReadError``,
``ReadTimeout``, ``WriteTimeout``, ``RemoteProtocolError``), so the mesh's transport decides
retries and outlier detection on them as on httpcore's. A response's trailers (gRPC's status)
are ``response.extensions["trailers"]``: a list filled when they arrive, at the body's end.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
from collections import deque
from collections.abc import AsyncIterable, AsyncIterator
from typing import Any

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings
import httpx

from ._http1 import Endpoint, _expire

__all__ = ["Http2Endpoint"]

# Flow control of what the server sends. A stream's DATA is acknowledged as its reader takes
# it, so a stream holds at most _STREAM_WINDOW unread bytes; the connection's window is the
# largest HTTP/2 allows and is acknowledged at the same time (h2 hands it back once half of it
# is read). With at most _MAX_STREAMS streams, unread bytes (1000 MiB) stay below half the
# connection window: however slow some readers are, the others never find it shut.
_STREAM_WINDOW = 1 << 20
_CONNECTION_WINDOW = (1 << 31) - 1
_MAX_STREAMS = 1000
_DEFAULT_WINDOW = 65535
_LAST_STREAM_ID = (1 << 31) - 1
_SHUT = "the server's flow-control window stayed shut past the write timeout"
_CONNECTION_SPECIFIC = frozenset(
    {b"host", b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding", b"upgrade"}
)


class _DrainingStateMachine(h2.connection.H2ConnectionStateMachine):
    """h2 closes a connection the moment a GOAWAY arrives (python-hyper/h2#1181), yet the
    streams the server kept (up to its last stream id) are still to be answered: here the
    connection stays open, and the pool opens no stream on it."""

    _transitions = {
        **h2.connection.H2ConnectionStateMachine._transitions,
        (h2.connection.ConnectionState.CLIENT_OPEN, h2.connection.ConnectionInputs.RECV_GOAWAY): (
            None,
            h2.connection.ConnectionState.CLIENT_OPEN,
        ),
    }


class _Stream:
    """One exchange: the answer as it arrives (head, body, trailers) and how it ended."""

    def __init__(self, stream_id: int) -> None:
        self.id = stream_id
        self.status = 0
        self.headers: list[tuple[bytes, bytes]] = []
        self.trailers: list[tuple[bytes, bytes]] = []  # the response's, filled at its end
        self.chunks: deque[tuple[bytes, int]] = deque()  # (data, flow-controlled length)
        self.ended = False  # the server sent END_STREAM
        self.sent_all = False  # so did we
        self.reset = False  # RST_STREAM, either way
        self.error: Exception | None = None
        self.wake: asyncio.Future[None] | None = None
        self.sender: asyncio.Task[None] | None = None  # a streamed body still going out

    def notify(self) -> None:
        if self.wake is not None and not self.wake.done():
            self.wake.set_result(None)

    def fail(self, error: Exception) -> None:
        if self.error is None:
            self.error = error
        self.notify()


class _Connection(asyncio.Protocol):
    """One connection to the server, its streams multiplexed."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.transport: Any = None  # asyncio's, or uvloop's (not an asyncio.Transport)
        self.h2 = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=True, header_encoding=None)
        )
        self.h2.state_machine = _DrainingStateMachine()
        self.h2.local_settings = h2.settings.Settings(
            client=True,
            initial_values={
                h2.settings.SettingCodes.ENABLE_PUSH: 0,
                h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: _STREAM_WINDOW,
                h2.settings.SettingCodes.MAX_HEADER_LIST_SIZE: 1 << 16,
            },
        )
        # the server's first SETTINGS (None), or why they never came
        self.ready: asyncio.Future[str | None] = loop.create_future()
        self.streams: dict[int, _Stream] = {}
        self.closed = False
        self.goaway = False
        self.idle_since = time.monotonic()
        self._failure: str | None = None  # why we closed it, for the streams still running
        self._writable: asyncio.Future[None] | None = None

    # asyncio ----------------------------------------------------------------------------------

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        self.h2.initiate_connection()
        self.h2.increment_flow_control_window(_CONNECTION_WINDOW - _DEFAULT_WINDOW)
        self.flush()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        lost = "the server closed the connection" + (f": {exc}" if exc else "")
        if not self.ready.done():
            self.ready.set_result(self._failure or lost)
        for stream in self.streams.values():
            if stream.ended:
                continue
            if self._failure is not None:
                stream.fail(httpx.RemoteProtocolError(self._failure))
            elif stream.status:
                stream.fail(httpx.ReadError(f"{lost}, mid-answer"))
            else:
                stream.fail(httpx.RemoteProtocolError(f"{lost}, without answering"))
        if self._writable is not None and not self._writable.done():
            self._writable.set_result(None)

    def pause_writing(self) -> None:
        self._writable = self.loop.create_future()

    def resume_writing(self) -> None:
        if self._writable is not None and not self._writable.done():
            self._writable.set_result(None)
        self._writable = None

    def data_received(self, data: bytes) -> None:
        try:
            events = self.h2.receive_data(data)
        except h2.exceptions.ProtocolError as exc:
            self.flush()  # h2 queued a GOAWAY saying why
            self.close(f"the server broke the HTTP/2 protocol: {exc}")
            return
        for event in events:
            if isinstance(event, h2.events.ResponseReceived):
                self._head(event)
            elif isinstance(event, h2.events.DataReceived):
                self._data(event)
            elif isinstance(event, h2.events.TrailersReceived):
                if stream := self.streams.get(event.stream_id):
                    stream.trailers.extend(_fields(event.headers))
            elif isinstance(event, h2.events.StreamEnded):
                if stream := self.streams.get(event.stream_id):
                    stream.ended = True
                    stream.notify()
            elif isinstance(event, h2.events.StreamReset):
                self._reset(event)
            elif isinstance(event, h2.events.WindowUpdated | h2.events.RemoteSettingsChanged):
                if isinstance(event, h2.events.RemoteSettingsChanged) and not self.ready.done():
                    self.ready.set_result(None)
                for stream in self.streams.values():  # (a writer may wait for window)
                    stream.notify()
            elif isinstance(event, h2.events.ConnectionTerminated):
                self._goaway(event)
        self.flush()

    # h2's events ------------------------------------------------------------------------------

    def _head(self, event: h2.events.ResponseReceived) -> None:
        stream = self.streams.get(event.stream_id)
        if stream is None:
            return
        for name, value in _fields(event.headers):
            if name == b":status":
                stream.status = int(value)
            elif not name.startswith(b":"):
                stream.headers.append((name, value))
        stream.notify()

    def _data(self, event: h2.events.DataReceived) -> None:
        stream = self.streams.get(event.stream_id)
        if stream is None:  # dropped already: nobody reads it
            self.h2.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            return
        stream.chunks.append((event.data, event.flow_controlled_length))
        stream.notify()

    def _reset(self, event: h2.events.StreamReset) -> None:
        stream = self.streams.get(event.stream_id)
        if stream is None:
            return
        stream.reset = True
        stream.notify()
        # After a whole answer a reset only stops our upload (RFC 9113 §8.1): the answer stands.
        if not stream.ended:
            why = (
                "the server reset the stream"
                if event.remote_reset
                else "the server's answer broke HTTP/2, so its stream was reset"
            )
            stream.fail(httpx.RemoteProtocolError(f"{why}: {_code_name(event.error_code)}"))

    def _goaway(self, event: h2.events.ConnectionTerminated) -> None:
        self.goaway = True
        code = _code_name(event.error_code)
        for stream in self.streams.values():
            if stream.id > (event.last_stream_id or 0):
                stream.fail(
                    httpx.RemoteProtocolError(
                        f"the server refused the stream with GOAWAY ({code}) before processing "
                        "it: a retry is safe"
                    )
                )
        if not self.streams:
            self.close()

    # the exchange -----------------------------------------------------------------------------

    @property
    def has_room(self) -> bool:
        limit = min(_MAX_STREAMS, self.h2.remote_settings.max_concurrent_streams)
        return (
            not self.closed
            and not self.goaway
            and len(self.streams) < limit
            and self.h2.highest_outbound_stream_id < _LAST_STREAM_ID - 1
        )

    def flush(self) -> None:
        data = self.h2.data_to_send()
        if data and not self.closed:
            self.transport.write(data)

    def close(self, failure: str | None = None) -> None:
        if self.closed:
            return
        if failure is None:
            self.h2.close_connection()  # GOAWAY: done with it
            self.flush()
        self._failure = failure or "the connection was closed on this side"
        self.closed = True
        self.transport.close()

    def open_stream(self, headers: list[tuple[bytes, bytes]], end_stream: bool) -> _Stream:
        stream = _Stream(self.h2.get_next_available_stream_id())
        try:
            self.h2.send_headers(stream.id, headers, end_stream=end_stream)
        except h2.exceptions.ProtocolError as exc:
            raise httpx.LocalProtocolError(f"the request cannot go out as HTTP/2: {exc}") from exc
        stream.sent_all = end_stream
        self.streams[stream.id] = stream
        self.flush()
        return stream

    async def send_body(
        self, stream: _Stream, body: bytes | AsyncIterable[bytes], timeout: float | None
    ) -> None:
        if isinstance(body, bytes):
            await self._send(stream, body, timeout)
        else:
            async for chunk in body:
                await self._send(stream, chunk, timeout)
                if stream.reset:
                    break
        if stream.error is not None:
            raise stream.error
        if not stream.reset and not self.closed:
            self.h2.end_stream(stream.id)
            stream.sent_all = True
            self.flush()

    async def _send(self, stream: _Stream, data: bytes, timeout: float | None) -> None:
        view = memoryview(data)
        while view and not stream.reset:
            if stream.error is not None:
                raise stream.error
            if self.closed:
                raise httpx.WriteError(self._failure or "the connection closed mid-request")
            if self._writable is not None and not self._writable.done():
                # (shared by the connection's writers: waited on, never cancelled)
                if not (await asyncio.wait((self._writable,), timeout=timeout))[0]:
                    raise httpx.WriteTimeout("the socket stayed full past the write timeout")
                continue
            window = self.h2.local_flow_control_window(stream.id)
            if window <= 0:
                await self._wait(stream, timeout, httpx.WriteTimeout(_SHUT))
                continue
            window = min(window, self.h2.max_outbound_frame_size)
            chunk, view = view[:window], view[window:]
            self.h2.send_data(stream.id, chunk.tobytes())
            self.flush()

    async def wait_head(self, stream: _Stream, timeout: float | None) -> None:
        while not stream.status:
            if stream.error is not None:
                raise stream.error
            await self._wait(
                stream, timeout, httpx.ReadTimeout("no answer within the read timeout")
            )

    async def body(self, stream: _Stream, timeout: float | None) -> AsyncIterator[bytes]:
        while True:
            while stream.chunks:
                data, length = stream.chunks.popleft()
                if length and not self.closed:
                    self.h2.acknowledge_received_data(length, stream.id)
                    self.flush()
                if data:
                    yield data
            if stream.ended:
                self.forget(stream)  # (its slot is free before the caller closes the response)
                return
            if stream.error is not None:
                raise stream.error
            await self._wait(
                stream, timeout, httpx.ReadTimeout("the answer stalled past the read timeout")
            )

    async def _wait(self, stream: _Stream, timeout: float | None, error: Exception) -> None:
        stream.wake = wake = self.loop.create_future()
        timer = self.loop.call_later(timeout, _expire, wake, error) if timeout is not None else None
        try:
            await wake
        finally:
            stream.wake = None
            if timer is not None:
                timer.cancel()

    def forget(self, stream: _Stream) -> None:
        """The exchange is over (read out, dropped or failed): free its slot, cancel what the
        server would still send, and hand back the window its unread DATA holds."""
        if self.streams.pop(stream.id, None) is None:
            return
        if stream.sender is not None:
            stream.sender.cancel()
        if not self.closed:
            unread = sum(length for _, length in stream.chunks)
            stream.chunks.clear()
            if not stream.reset and not (stream.ended and stream.sent_all):
                with contextlib.suppress(h2.exceptions.StreamClosedError):
                    self.h2.reset_stream(stream.id, h2.errors.ErrorCodes.CANCEL)
                stream.reset = True
            if unread:
                self.h2.acknowledge_received_data(unread, stream.id)
            self.flush()
        if not self.streams:
            self.idle_since = time.monotonic()
            if self.goaway:
                self.close()


def _sent(stream: _Stream, sender: asyncio.Task[None]) -> None:
    """A streamed request body is over: if it failed (the caller went away, the connection
    broke), so does the exchange."""
    stream.sender = None
    if sender.cancelled():
        return
    error = sender.exception()
    if error is not None:
        if not isinstance(error, httpx.TransportError):
            error = httpx.WriteError(f"the request body broke off: {error}")
        stream.fail(error)


class _Body(httpx.AsyncByteStream):
    def __init__(self, connection: _Connection, stream: _Stream, timeout: float | None) -> None:
        self._connection = connection
        self._stream = stream
        self._timeout = timeout

    async def __aiter__(self) -> AsyncIterator[bytes]:
        async for chunk in self._connection.body(self._stream, self._timeout):
            yield chunk

    async def aclose(self) -> None:
        self._connection.forget(self._stream)  # (a reset, if the answer was not read out)


class Http2Endpoint(Endpoint):
    """HTTP/2 to one endpoint, every request keeping its own URL and Host header (as
    ``:authority``); with ``tls``, a connection's ALPN must offer ``h2``."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._scheme = b"https" if self._tls is not None else b"http"
        self._connections: list[_Connection] = []
        # one connection opens at a time: requests arriving meanwhile wait to see its room
        self._connecting: asyncio.Future[BaseException | None] | None = None

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        timeouts = request.extensions.get("timeout") or {}
        headers = _request_headers(request, self._scheme)
        body: bytes | AsyncIterable[bytes]
        if isinstance(request.stream, httpx.ByteStream):
            body = b"".join(request.stream)
        else:
            assert isinstance(request.stream, httpx.AsyncByteStream)
            body = request.stream
        connection = await self._acquire(request, timeouts.get("connect"))
        try:
            stream = connection.open_stream(headers, end_stream=body == b"")
        except httpx.TransportError as exc:
            exc.request = request
            raise
        try:
            if isinstance(body, bytes):
                if body:
                    await connection.send_body(stream, body, timeouts.get("write"))
            else:
                # A streamed body goes out while the answer comes in: a gRPC stream's answers do
                # not wait for its end (full duplex, as Envoy forwards it).
                stream.sender = asyncio.ensure_future(
                    connection.send_body(stream, body, timeouts.get("write"))
                )
                stream.sender.add_done_callback(functools.partial(_sent, stream))
            await connection.wait_head(stream, timeouts.get("read"))
        except BaseException as exc:  # (a cancelled call resets its stream too)
            connection.forget(stream)
            if isinstance(exc, httpx.TransportError):
                exc.request = request
            raise
        return httpx.Response(
            stream.status,
            headers=stream.headers,
            stream=_Body(connection, stream, timeouts.get("read")),
            extensions={"http_version": b"HTTP/2", "trailers": stream.trailers},
        )

    async def aclose(self) -> None:
        connections, self._connections = self._connections, []
        for connection in connections:
            connection.close()

    def _pick(self) -> _Connection | None:
        """The oldest connection with room (so that the newer ones empty and expire), closing
        the idle ones past their keep-alive on the way."""
        now = time.monotonic()
        chosen = None
        kept = []
        for connection in self._connections:
            idle = not connection.closed and not connection.streams
            if idle and (connection.goaway or now - connection.idle_since >= self._expiry):
                connection.close()
            if connection.closed:
                continue
            kept.append(connection)
            if chosen is None and connection.has_room:
                chosen = connection
        self._connections = kept
        return chosen

    async def _acquire(self, request: httpx.Request, timeout: float | None) -> _Connection:
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        while True:
            connection = self._pick()
            if connection is not None:
                return connection
            if self._connecting is None:
                return await self._open(request, timeout)
            remaining = None if deadline is None else max(deadline - loop.time(), 0)
            done, _ = await asyncio.wait((self._connecting,), timeout=remaining)
            if not done:
                raise httpx.ConnectTimeout(
                    f"connecting to {self._where} timed out", request=request
                )
            failure = next(iter(done)).result()
            if isinstance(failure, httpx.ConnectError | httpx.ConnectTimeout):
                raise type(failure)(str(failure), request=request) from failure
            # (opened: look for room again; or its opener gave up: open one ourselves)

    async def _open(self, request: httpx.Request, timeout: float | None) -> _Connection:
        self._connecting = opened = asyncio.get_running_loop().create_future()
        failure: BaseException | None = None
        try:
            connection = await self._connect(request, timeout)
            self._connections.append(connection)
            return connection
        except BaseException as exc:
            failure = exc
            raise
        finally:
            self._connecting = None
            opened.set_result(failure)

    async def _connect(self, request: httpx.Request, timeout: float | None) -> _Connection:
        loop = asyncio.get_running_loop()
        transport, connection = await self._dial(lambda: _Connection(loop), request, timeout)
        try:
            if self._tls is not None:
                chosen = transport.get_extra_info("ssl_object").selected_alpn_protocol()
                if chosen not in (None, "h2"):
                    raise httpx.ConnectError(
                        f"TLS error: {self._where} chose {chosen} instead of h2 in ALPN, so it "
                        "does not speak HTTP/2 over TLS: send it HTTP/1.1, or enable h2 on it",
                        request=request,
                    )
            # Until the server's SETTINGS its stream limit is unknown: streams sent beyond it
            # would be refused.
            try:
                failure = await asyncio.wait_for(asyncio.shield(connection.ready), timeout)
            except TimeoutError as exc:
                raise httpx.ConnectTimeout(
                    f"{self._where} sent no HTTP/2 SETTINGS within the connect timeout",
                    request=request,
                ) from exc
            if failure is not None:
                raise httpx.ConnectError(
                    f"{self._where} does not speak HTTP/2 (with prior knowledge, or h2 in "
                    f"ALPN): {failure}",
                    request=request,
                )
        except BaseException:
            transport.close()
            raise
        return connection  # type: ignore[no-any-return]


def _request_headers(request: httpx.Request, scheme: bytes) -> list[tuple[bytes, bytes]]:
    authority = None
    fields = []
    for raw_name, value in request.headers.raw:
        name = raw_name.lower()
        if name == b"host":
            authority = authority or value
        elif name in _CONNECTION_SPECIFIC or (name == b"te" and value.lower() != b"trailers"):
            continue
        else:
            fields.append((name, value))
    return [
        (b":method", request.method.encode()),
        (b":scheme", scheme),
        (b":authority", authority or request.url.netloc),
        (b":path", request.url.raw_path or b"/"),
        *fields,
    ]


def _fields(headers: Any) -> list[tuple[bytes, bytes]]:
    # (h2 hands over bytes: the connection's header_encoding is None)
    return [(bytes(name), bytes(value)) for name, value in headers or ()]


def _code_name(code: h2.errors.ErrorCodes | int | None) -> str:
    return code.name if isinstance(code, h2.errors.ErrorCodes) else f"error code {code}"
