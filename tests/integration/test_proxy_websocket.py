"""WebSocket through libmesh-proxy, both sides: a client of the ``websockets`` library (not
libmesh) calls a WebSocket server through one proxy's port bound to the service and a second
proxy's inbound side; messages flow both ways as they are sent, text and binary, and a close
from the server reaches the client with its code."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import connect

from tests.conftest import unused_port
from tests.proxy_process import ProxyProcess

StartProxy = Callable[..., ProxyProcess]

CHAT = """
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: chat, namespace: shop}}
spec:
  hosts: [chat.shop.svc.cluster.local]
  location: MESH_INTERNAL
  resolution: STATIC
  ports: [{{number: 8080, name: http, protocol: HTTP}}]
  endpoints: [{{address: 127.0.0.1, ports: {{http: {port}}}}}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: chat, namespace: shop}}
spec:
  action: DENY
  rules: [{{to: [{{operation: {{paths: [/forbidden]}}}}]}}]
"""


class ChatServer:
    """A WebSocket server (the ``websockets`` library) on 127.0.0.1 in a thread of its own:
    echoes each message in capitals, says who it is on ``whoami``, closes with 4000 on ``bye``."""

    def __init__(self) -> None:
        self.port = 0
        self.paths: list[str] = []
        self._ready = threading.Event()
        self._loop = asyncio.new_event_loop()
        self._stop: asyncio.Future[None] | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        assert self._ready.wait(10)

    async def _chat(self, connection: ServerConnection) -> None:
        self.paths.append(connection.request.path if connection.request else "")
        async for message in connection:
            if message == "bye":
                await connection.close(4000, "see you")
                return
            if message == "whoami":
                headers = connection.request.headers if connection.request else {}
                await connection.send(headers.get("x-forwarded-client-cert", "nobody"))
            else:
                await connection.send(message.upper())

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)

        async def main() -> None:
            async with serve(self._chat, "127.0.0.1", 0) as server:
                self.port = next(iter(server.sockets)).getsockname()[1]
                self._stop = self._loop.create_future()
                self._ready.set()
                await self._stop

        try:
            self._loop.run_until_complete(main())
        finally:
            self._loop.close()

    def stop(self) -> None:
        if self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set_result, None)
        self._thread.join(10)


@pytest.fixture
def chat() -> Iterator[ChatServer]:
    server = ChatServer()
    yield server
    server.stop()


def test_a_websocket_goes_through_both_sides_of_the_proxy(
    chat: ChatServer, start_proxy: StartProxy, tmp_path: Path
) -> None:
    inbound = unused_port()
    (tmp_path / "mesh").mkdir()
    (tmp_path / "mesh" / "chat.yaml").write_text(CHAT.format(port=inbound))
    common = ("--config-dir", str(tmp_path / "mesh"), "--namespace", "shop", "--admin", "off")
    start_proxy(*common, "--inbound", f"{inbound}={chat.port}", "--outbound", "off")
    caller = start_proxy(
        *common, "--outbound", "0", "--route", "0=chat.shop.svc.cluster.local:8080"
    )
    url = f"ws://127.0.0.1:{caller.port('route')}"

    with connect(f"{url}/room?id=1", open_timeout=10) as websocket:
        websocket.send("hello")
        first = websocket.recv(timeout=5)
        websocket.send(b"\x00binary\xff")
        binary = websocket.recv(timeout=5)
        websocket.send("x" * 200_000)  # more than a frame, more than a socket buffer
        large = websocket.recv(timeout=5)
        websocket.send("bye")
        with pytest.raises(ConnectionClosed) as closed:
            websocket.recv(timeout=5)
    with pytest.raises(InvalidStatus) as denied:
        connect(f"{url}/forbidden", open_timeout=10)

    assert first == "HELLO"
    assert binary == b"\x00BINARY\xff"
    assert large == "X" * 200_000
    assert closed.value.rcvd is not None
    assert (closed.value.rcvd.code, closed.value.rcvd.reason) == (4000, "see you")
    assert chat.paths == ["/room?id=1"]  # the forbidden one never reached it
    assert denied.value.response.status_code == 403
