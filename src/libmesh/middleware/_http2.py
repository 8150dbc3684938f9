"""HTTP/2 for the ASGI apps libmesh serves: gRPC through libmesh-proxy's inbound side, h2c on
its outbound side, and HTTP/2 for any app under :func:`libmesh.serve` (uvicorn speaks HTTP/1.1
only).

One asyncio protocol per connection, with the ``h2`` state machine; one task per stream runs
the app. The ASGI ``http.response.trailers`` extension is offered, so gRPC's status arrives as
trailers. A response's HEADERS wait for its first body bytes: a response with nothing to send
but its headers (gRPC's "trailers-only" answer to a failed call) goes out as one HEADERS frame
that ends the stream, as gRPC clients expect.

Flow control: a stream's received DATA is acknowledged when the app reads it, so a slow app
slows its caller; the connection's window is raised once at the start, so that one slow stream
does not stall the others.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable
from typing import Any
from urllib.parse import unquote

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings

from ._asgi import ASGIApp, Message

__all__ = ["PREFACE", "Http2Protocol"]

logger = logging.getLogger("libmesh")

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"

_STREAM_WINDOW = 1 << 20  # bytes a caller may send on one stream before the app reads them
_CONNECTION_WINDOW = 1 << 24
_MAX_STREAMS = 256
_ASGI = {"version": "3.0", "spec_version": "2.3"}


class _Stream:
    """One request: its body as it arrives, and the response as the app sends it."""

    __slots__ = (
        "body_read",
        "chunks",
        "ended",
        "gone",
        "headers",
        "id",
        "response_done",
        "status",
        "task",
        "trailers",
        "wake",
    )

    def __init__(self, stream_id: int) -> None:
        self.id = stream_id
        self.chunks: deque[tuple[bytes, int]] = deque()  # (data, flow-controlled length)
        self.ended = False  # the caller sent everything
        self.body_read = False  # ... and the app has read it all
        self.gone = False  # reset by the caller, or the connection lost
        self.wake: asyncio.Future[None] | None = None
        self.task: asyncio.Task[None] | None = None
        self.status = 0  # the response's, once the app started it
        self.headers: list[tuple[bytes, bytes]] = []
        self.trailers = False  # the app announced trailers
        self.response_done = False

    def notify(self) -> None:
        if self.wake is not None and not self.wake.done():
            self.wake.set_result(None)


class Http2Protocol(asyncio.Protocol):
    """Serves ``app`` over HTTP/2 on one connection (prior knowledge, or ALPN ``h2``).

    ``extensions`` go into every request's scope (the ``tls`` extension of a mutual-TLS
    connection); ``server_state`` is uvicorn's, when uvicorn runs the server: the connection
    then counts in its graceful shutdown."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        extensions: dict[str, Any] | None = None,
        server_state: Any = None,
        on_close: Callable[[Http2Protocol], None] | None = None,
    ) -> None:
        self.app = app
        self.extensions = extensions or {}
        self.server_state = server_state
        self.on_close = on_close
        self.loop = asyncio.get_running_loop()
        self.transport: Any = None
        self.h2 = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=False, header_encoding=None)
        )
        self.streams: dict[int, _Stream] = {}
        self.closed = False
        self.closing = False
        self.scheme = "http"
        self.client: tuple[str, int] | None = None
        self.server: tuple[str, int] | None = None
        self._window: asyncio.Future[None] | None = None  # writers wait here for window
        self._writable: asyncio.Future[None] | None = None

    # asyncio ----------------------------------------------------------------------------------

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        if transport.get_extra_info("ssl_object") is not None:
            self.scheme = "https"
        self.client = _address(transport.get_extra_info("peername"))
        self.server = _address(transport.get_extra_info("sockname"))
        self.h2.local_settings = h2.settings.Settings(
            client=False,
            initial_values={
                h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: _MAX_STREAMS,
                h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: _STREAM_WINDOW,
                h2.settings.SettingCodes.MAX_HEADER_LIST_SIZE: 1 << 16,
            },
        )
        self.h2.initiate_connection()
        self.h2.increment_flow_control_window(_CONNECTION_WINDOW - 65535)
        self._flush()
        if self.server_state is not None:
            self.server_state.connections.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        for stream in self.streams.values():
            stream.gone = True
            stream.notify()
        self._wake_writers()
        if self._writable is not None and not self._writable.done():
            self._writable.set_result(None)
        if self.server_state is not None:
            self.server_state.connections.discard(self)
        if self.on_close is not None:
            self.on_close(self)

    def pause_writing(self) -> None:
        if self._writable is None or self._writable.done():
            self._writable = self.loop.create_future()

    def resume_writing(self) -> None:
        if self._writable is not None and not self._writable.done():
            self._writable.set_result(None)

    def data_received(self, data: bytes) -> None:
        try:
            events = self.h2.receive_data(data)
        except h2.exceptions.ProtocolError as exc:
            logger.info("libmesh: closed an HTTP/2 connection from %s: %s", _peer(self), exc)
            self._flush()  # h2 queued a GOAWAY saying why
            self.transport.close()
            return
        started = []
        for event in events:
            if isinstance(event, h2.events.RequestReceived):
                stream = _Stream(event.stream_id or 0)
                stream.headers = list(event.headers or ())
                stream.ended = event.stream_ended is not None
                self.streams[stream.id] = stream
                started.append(stream)
            elif isinstance(event, h2.events.DataReceived):
                self._data(event)
            elif isinstance(event, h2.events.StreamEnded | h2.events.StreamReset):
                self._ended(event.stream_id or 0, reset=isinstance(event, h2.events.StreamReset))
            elif isinstance(event, h2.events.WindowUpdated | h2.events.RemoteSettingsChanged):
                self._wake_writers()
            elif isinstance(event, h2.events.ConnectionTerminated):
                self.closing = True
                if not self.streams:
                    self.transport.close()
        self._flush()
        # Streams start once everything that arrived with them is read: a request whose body
        # came in the same packets (a unary gRPC call) is then whole on its first receive.
        for stream in started:
            stream.task = task = self.loop.create_task(self._run(stream))
            if self.server_state is not None:
                self.server_state.tasks.add(task)
                task.add_done_callback(self.server_state.tasks.discard)

    def _data(self, event: h2.events.DataReceived) -> None:
        stream_id, length = event.stream_id or 0, event.flow_controlled_length or 0
        stream = self.streams.get(stream_id)
        if stream is None:  # answered already, nobody reads it
            self.h2.acknowledge_received_data(length, stream_id)
            return
        stream.chunks.append((event.data or b"", length))
        stream.ended = stream.ended or event.stream_ended is not None
        stream.notify()

    def _ended(self, stream_id: int, *, reset: bool) -> None:
        stream = self.streams.get(stream_id)
        if stream is None:
            return
        if reset:
            stream.gone = True
            if stream.task is not None and not stream.response_done:
                stream.task.cancel()
            self._wake_writers()
        else:
            stream.ended = True
        stream.notify()

    def shutdown(self) -> None:
        """Graceful: GOAWAY (no new streams), close once the running ones are answered."""
        if self.closed or self.closing:
            return
        self.closing = True
        self.h2.close_connection()
        self._flush()
        if not self.streams:
            self.transport.close()

    # one stream -------------------------------------------------------------------------------

    def _scope(self, stream: _Stream) -> dict[str, Any]:
        method = path = b""
        authority = None
        headers = []
        has_host = False
        for name, value in stream.headers:
            if name[:1] == b":":
                if name == b":method":
                    method = value
                elif name == b":path":
                    path = value
                elif name == b":authority":
                    authority = value
            else:
                has_host = has_host or name == b"host"
                headers.append((name, value))
        if authority is not None and not has_host:
            headers.insert(0, (b"host", authority))
        raw_path, _, query = path.partition(b"?")
        return {
            "type": "http",
            "asgi": _ASGI,
            "http_version": "2",
            "method": method.decode("ascii"),
            "scheme": self.scheme,
            "path": unquote(raw_path.decode("latin-1")),
            "raw_path": raw_path,
            "query_string": query,
            "root_path": "",
            "headers": headers,
            "client": self.client,
            "server": self.server,
            "extensions": {"http.response.trailers": {}, **self.extensions},
        }

    async def _run(self, stream: _Stream) -> None:
        async def receive() -> Message:
            return await self._receive(stream)

        async def send(message: Message) -> None:
            await self._send(stream, message)

        try:
            await self.app(self._scope(stream), receive, send)
        except asyncio.CancelledError:
            pass  # the caller reset the stream
        except Exception:
            logger.exception("libmesh: the app failed answering an HTTP/2 request")
        finally:
            if not stream.response_done and not stream.gone and not self.closed:
                if stream.status:  # started, never finished: the caller must not take it whole
                    self._reset(stream, h2.errors.ErrorCodes.INTERNAL_ERROR)
                else:
                    await self._answer_error(stream)
            self._forget(stream)

    async def _receive(self, stream: _Stream) -> Message:
        while True:
            if stream.gone:
                return {"type": "http.disconnect"}
            if stream.chunks:
                # everything that arrived, in one message (and one acknowledgement)
                body = b"".join(chunk for chunk, _ in stream.chunks)
                counted = sum(length for _, length in stream.chunks)
                stream.chunks.clear()
                if counted and not self.closed:
                    self.h2.acknowledge_received_data(counted, stream.id)
                    self._flush()
                stream.body_read = stream.ended
                return {"type": "http.request", "body": body, "more_body": not stream.ended}
            if stream.response_done:
                return {"type": "http.disconnect"}
            if stream.ended and not stream.body_read:
                stream.body_read = True
                return {"type": "http.request", "body": b"", "more_body": False}
            # (after the whole body: until the answer is sent or the caller goes away)
            stream.wake = self.loop.create_future()
            await stream.wake

    async def _send(self, stream: _Stream, message: Message) -> None:
        if stream.gone or self.closed:
            return  # the caller went away; the app finds out on receive (http.disconnect)
        try:
            await self._send_message(stream, message)
        except h2.exceptions.StreamClosedError:  # reset by the caller as the answer went out
            stream.gone = True
        if stream.response_done:
            stream.notify()
            self._forget_when_read(stream)

    async def _send_message(self, stream: _Stream, message: Message) -> None:
        kind = message["type"]
        if kind == "http.response.start":
            stream.status = int(message["status"])
            stream.trailers = bool(message.get("trailers", False))
            stream.headers = [
                (b":status", b"%d" % stream.status),
                *(
                    (bytes(name).lower(), bytes(value))
                    for name, value in message.get("headers", ())
                    if bytes(name).lower() not in _CONNECTION_SPECIFIC
                ),
            ]
        elif kind == "http.response.body":
            body = bytes(message.get("body", b""))
            last = not message.get("more_body", False)
            if stream.headers and (body or last):  # (an empty chunk says nothing yet)
                ends_here = last and not body and not stream.trailers
                self.h2.send_headers(stream.id, stream.headers, end_stream=ends_here)
                stream.headers = []
                self._flush()
                if ends_here:
                    stream.response_done = True
                    return
            if body:
                await self._send_data(stream, body)
            if last and not stream.trailers and not stream.response_done:
                self.h2.end_stream(stream.id)
                stream.response_done = True
                self._flush()
        elif kind == "http.response.trailers":
            trailers = [(bytes(k).lower(), bytes(v)) for k, v in message.get("headers", ())]
            if stream.headers:  # trailers-only: the headers end the stream, with the trailers
                self.h2.send_headers(stream.id, stream.headers + trailers, end_stream=True)
                stream.headers = []
            elif trailers:
                self.h2.send_headers(stream.id, trailers, end_stream=True)
            else:
                self.h2.end_stream(stream.id)
            stream.response_done = True
            self._flush()

    async def _send_data(self, stream: _Stream, data: bytes) -> None:
        view = memoryview(data)
        while view:
            if stream.gone or self.closed:
                return
            if self._writable is not None and not self._writable.done():
                await self._writable
                continue
            window = min(
                self.h2.local_flow_control_window(stream.id), self.h2.max_outbound_frame_size
            )
            if window <= 0:
                self._window = self._window or self.loop.create_future()
                await self._window
                continue
            chunk, view = view[:window], view[window:]
            self.h2.send_data(stream.id, chunk.tobytes())
            self._flush()

    async def _answer_error(self, stream: _Stream) -> None:
        await self._send(
            stream,
            {
                "type": "http.response.start",
                "status": 500,
                "headers": [(b"content-type", b"text/plain")],
            },
        )
        await self._send(stream, {"type": "http.response.body", "body": b"Internal Server Error\n"})

    # connection -------------------------------------------------------------------------------

    def _forget_when_read(self, stream: _Stream) -> None:
        """An answered stream whose caller still sends is reset (NO_ERROR), as RFC 9113 §8.1
        lets a server do: nothing more is read for it."""
        if not stream.ended and not self.closed:
            self._reset(stream, h2.errors.ErrorCodes.NO_ERROR)

    def _forget(self, stream: _Stream) -> None:
        self.streams.pop(stream.id, None)
        unread = sum(length for _, length in stream.chunks)
        stream.chunks.clear()
        if unread and not self.closed:  # the window a body nobody read holds is given back
            self.h2.acknowledge_received_data(unread, stream.id)
            self._flush()
        if self.closing and not self.streams and not self.closed:
            self.transport.close()

    def _reset(self, stream: _Stream, code: h2.errors.ErrorCodes) -> None:
        try:
            self.h2.reset_stream(stream.id, code)
        except h2.exceptions.StreamClosedError:
            return
        stream.gone = True
        self._flush()

    def _wake_writers(self) -> None:
        if self._window is not None:
            window, self._window = self._window, None
            if not window.done():
                window.set_result(None)

    def _flush(self) -> None:
        data = self.h2.data_to_send()
        if data and not self.closed:
            self.transport.write(data)


_CONNECTION_SPECIFIC = frozenset(
    {b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding", b"upgrade"}
)


def _address(info: Any) -> tuple[str, int] | None:
    if isinstance(info, tuple) and len(info) >= 2:
        return str(info[0]), int(info[1])
    return None


def _peer(protocol: Http2Protocol) -> str:
    return f"{protocol.client[0]}:{protocol.client[1]}" if protocol.client else "a caller"
