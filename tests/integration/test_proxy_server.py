"""libmesh-proxy's HTTP/1.1 server on 127.0.0.1: how long an idle caller's connection stays
open (its keep-alive timer is armed lazily, one per connection, so these pin what it must
still do)."""

from __future__ import annotations

import asyncio
import socket

import httpx

from libmesh.proxy._forward import Drain
from libmesh.proxy._server import Http1Server, Incoming

from .test_http1_pool import on_a_loop

REQUEST = b"GET / HTTP/1.1\r\nhost: svc\r\n\r\n"


async def answer(_: Incoming) -> httpx.Response:
    return httpx.Response(200, content=b"ok")


async def serving(keep_alive: float) -> tuple[Http1Server, int]:
    server = Http1Server(answer, Drain(), keep_alive=keep_alive)
    sock = socket.create_server(("127.0.0.1", 0))
    sock.setblocking(False)
    await server.start(sock)
    return server, sock.getsockname()[1]


async def closed_after(reader: asyncio.StreamReader, started: float) -> float:
    """Seconds from ``started`` until the server closes the connection."""
    assert await reader.read() == b""
    return asyncio.get_running_loop().time() - started


@on_a_loop
async def test_an_idle_callers_connection_is_closed_after_the_keep_alive() -> None:
    server, port = await serving(keep_alive=0.4)
    loop = asyncio.get_running_loop()
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(REQUEST)
        assert (await reader.readuntil(b"ok")).startswith(b"HTTP/1.1 200 OK\r\n")
        assert 0.3 < await closed_after(reader, loop.time()) < 2
        writer.close()

        # Activity moves the deadline: a second request 0.25 s in keeps the connection open
        # past the first request's deadline, until 0.4 s after the second answer.
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(REQUEST)
        await reader.readuntil(b"ok")
        await asyncio.sleep(0.25)
        writer.write(REQUEST)
        await reader.readuntil(b"ok")
        assert 0.3 < await closed_after(reader, loop.time()) < 2
        writer.close()

        # A caller that sends half a request and then nothing is closed as idle too.
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(REQUEST[:10])
        assert 0.3 < await closed_after(reader, loop.time()) < 2
        writer.close()
    finally:
        await server.shutdown(timeout=1)
