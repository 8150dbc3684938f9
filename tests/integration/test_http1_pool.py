"""libmesh's lean HTTP/1.1 pool (what libmesh-proxy forwards through) against a server on
127.0.0.1 that answers with exactly the bytes each test gives it: framing (Content-Length,
chunked, close-delimited, HEAD, interim 100), streaming both ways, connection reuse and a
server closing an idle connection, and the errors httpx's callers expect."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any

import httpx
import pytest

from libmesh.transport._http1 import Http1Endpoint

Answer = Callable[[bytes], bytes | None]  # the request's bytes -> the answer (None: close)


def on_a_loop(test: Callable[[], Coroutine[Any, Any, None]]) -> Callable[[], None]:
    @functools.wraps(test)
    def run() -> None:
        asyncio.run(test())

    return run


class RawServer:
    def __init__(
        self, answer: Answer, close_after: bool = False, keep_alive_for: int | None = None
    ) -> None:
        self.answer = answer
        self.close_after = close_after
        # after this many answers, the next request on the connection finds it closed (the
        # server's keep-alive ran out as the request went out)
        self.keep_alive_for = keep_alive_for
        self.connections = 0
        self.requests: list[bytes] = []
        self.port = 0
        self._server: asyncio.Server | None = None

    async def __aenter__(self) -> RawServer:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        answered = 0
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                if self.keep_alive_for is not None and answered >= self.keep_alive_for:
                    break
                body = b""
                if b"transfer-encoding: chunked" in head.lower():
                    body = await reader.readuntil(b"0\r\n\r\n")
                elif b"content-length:" in head.lower():
                    length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
                    body = await reader.readexactly(length)
                self.requests.append(head + body)
                answer = self.answer(head + body)
                if answer is None:
                    break
                writer.write(answer)
                await writer.drain()
                answered += 1
                if self.close_after:
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


def request(method: str, port: int, content: bytes | AsyncIterator[bytes] = b"") -> httpx.Request:
    return httpx.Request(
        method,
        f"http://svc.test:{port}/path?q=1",
        content=content,
        extensions={"timeout": {"connect": 2, "read": 2}},
    )


async def read(response: httpx.Response) -> bytes:
    stream = response.stream
    assert isinstance(stream, httpx.AsyncByteStream)
    try:
        return b"".join([chunk async for chunk in stream])
    finally:
        await stream.aclose()


def ok(body: bytes) -> bytes:
    return b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n%b" % (len(body), body)


@on_a_loop
async def test_keep_alive_reuses_one_connection_and_the_host_header_is_the_services() -> None:
    async with RawServer(lambda _: ok(b"hello")) as server:
        pool = Http1Endpoint("127.0.0.1", server.port)
        bodies = [await read(await pool.handle_async_request(request("GET", 1))) for _ in range(3)]
        await pool.aclose()
    assert bodies == [b"hello"] * 3
    assert server.connections == 1
    assert server.requests[0].startswith(b"GET /path?q=1 HTTP/1.1\r\nHost: svc.test:1\r\n")


@on_a_loop
async def test_chunked_close_delimited_head_and_interim_answers() -> None:
    chunked = (
        b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n"
    )
    interim = b"HTTP/1.1 100 Continue\r\n\r\n" + ok(b"after")
    answers = iter([chunked, interim, b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n"])
    async with RawServer(lambda _: next(answers)) as server:
        pool = Http1Endpoint("127.0.0.1", server.port)
        first = await read(await pool.handle_async_request(request("GET", 1)))
        second = await read(await pool.handle_async_request(request("GET", 1)))
        head = await pool.handle_async_request(request("HEAD", 1))
        head_body = await read(head)
        await pool.aclose()
    async with RawServer(lambda _: b"HTTP/1.0 200 OK\r\n\r\nuntil close", close_after=True) as s:
        pool = Http1Endpoint("127.0.0.1", s.port)
        until_close = await read(await pool.handle_async_request(request("GET", 1)))
    assert (first, second, head_body, until_close) == (b"abcde", b"after", b"", b"until close")
    assert head.headers["content-length"] == "5"


@on_a_loop
async def test_a_streamed_request_body_goes_chunked_and_a_large_answer_streams() -> None:
    big = b"x" * 1_000_000

    async def upload() -> AsyncIterator[bytes]:
        yield b"part one,"
        yield b"part two"

    async with RawServer(lambda _: ok(big)) as server:
        pool = Http1Endpoint("127.0.0.1", server.port)
        response = await pool.handle_async_request(request("POST", 1, upload()))
        body = await read(response)
        await pool.aclose()
    assert body == big
    assert server.requests[0].endswith(b"9\r\npart one,\r\n8\r\npart two\r\n0\r\n\r\n")


@on_a_loop
async def test_an_idle_connection_the_server_closed_is_not_reused() -> None:
    async with RawServer(lambda _: ok(b"once"), close_after=True) as server:
        pool = Http1Endpoint("127.0.0.1", server.port)
        first = await read(await pool.handle_async_request(request("GET", 1)))
        await asyncio.sleep(0.05)  # the close reaches this side
        second = await read(await pool.handle_async_request(request("GET", 1)))
        await pool.aclose()
    assert (first, second) == (b"once", b"once")
    assert server.connections == 2


@on_a_loop
async def test_a_request_that_meets_a_keep_alive_running_out_is_sent_again_once() -> None:
    async with RawServer(lambda _: ok(b"fine"), keep_alive_for=1) as server:
        pool = Http1Endpoint("127.0.0.1", server.port)
        first = await read(await pool.handle_async_request(request("GET", 1)))
        second = await read(await pool.handle_async_request(request("POST", 1, b"again")))

        async def stream() -> AsyncIterator[bytes]:
            yield b"cannot be sent twice"

        with pytest.raises(httpx.RemoteProtocolError):  # a streamed body is not replayed
            await pool.handle_async_request(request("POST", 1, stream()))
        await pool.aclose()
    assert (first, second) == (b"fine", b"fine")
    assert server.connections == 2
    assert server.requests[-1].endswith(b"again")


@on_a_loop
async def test_the_errors_are_httpxs() -> None:
    async with RawServer(lambda _: None) as closing:  # closes without answering
        pool = Http1Endpoint("127.0.0.1", closing.port)
        with pytest.raises(httpx.RemoteProtocolError, match="without answering"):
            await pool.handle_async_request(request("GET", 1))

    async with RawServer(lambda _: b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nshort") as s:
        pool = Http1Endpoint("127.0.0.1", s.port)
        slow = request("GET", 1)
        slow.extensions["timeout"] = {"read": 0.2}
        response = await pool.handle_async_request(slow)
        with pytest.raises(httpx.ReadTimeout):
            await read(response)
    async with RawServer(lambda _: b"NOT HTTP AT ALL\r\n\r\n") as garbage:
        pool = Http1Endpoint("127.0.0.1", garbage.port)
        with pytest.raises(httpx.RemoteProtocolError, match=r"not HTTP/1\.1"):
            await pool.handle_async_request(request("GET", 1))
    with socket_bound() as port, pytest.raises(httpx.ConnectError):
        await Http1Endpoint("127.0.0.1", port).handle_async_request(request("GET", 1))


@on_a_loop
async def test_each_request_keeps_its_own_read_timeout_on_a_reused_connection() -> None:
    """The read timeout's timer is one per connection, armed lazily: a request waiting on a
    connection whose timer was set by an earlier request, for a later or an earlier deadline,
    still times out at its own deadline, neither before nor long after."""
    answers = iter([ok(b"first"), b""])  # b"": the server says nothing
    async with RawServer(lambda _: next(answers)) as server:
        pool = Http1Endpoint("127.0.0.1", server.port)
        loop = asyncio.get_running_loop()

        async def send(read_timeout: float) -> tuple[httpx.Response | None, float]:
            sent = request("GET", server.port)
            sent.extensions["timeout"] = {"connect": 2, "read": read_timeout}
            started = loop.time()
            try:
                return await pool.handle_async_request(sent), loop.time() - started
            except httpx.ReadTimeout:
                return None, loop.time() - started

        answered, _ = await send(30)  # arms the connection's timer for 30 s from now
        assert answered is not None
        assert await read(answered) == b"first"
        stalled, waited = await send(0.3)  # an earlier deadline than the timer's
        assert stalled is None
        assert 0.25 < waited < 2

    answers = iter([ok(b"first"), b""])
    async with RawServer(lambda _: next(answers)) as server:
        pool = Http1Endpoint("127.0.0.1", server.port)
        answered, _ = await send(0.4)  # the timer: 0.4 s from now
        assert answered is not None
        assert await read(answered) == b"first"
        await asyncio.sleep(0.2)
        stalled, waited = await send(0.6)  # the timer fires first, 0.4 s early: it waits on
        assert stalled is None
        assert 0.55 < waited < 2
        assert server.connections == 1


class socket_bound:
    """A port nothing accepts on."""

    def __enter__(self) -> int:
        import socket

        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        return int(self.sock.getsockname()[1])

    def __exit__(self, *exc: object) -> None:
        self.sock.close()
