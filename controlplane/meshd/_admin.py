"""meshd's admin HTTP server: a few read-only pages on the event loop, over h11."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass

import h11

__all__ = ["AdminServer", "Page"]

logger = logging.getLogger("meshd")


@dataclass(frozen=True, slots=True)
class Page:
    status: int
    content_type: str
    body: bytes


class AdminServer:
    """Serves ``GET`` for each path in ``routes``; a route returns the page to send."""

    def __init__(self, routes: dict[str, Callable[[], Page]]) -> None:
        self.routes = routes
        self._server: asyncio.Server | None = None

    async def start(self, host: str, port: int) -> int:
        """Listen; returns the bound port (``port`` may be 0)."""
        self._server = await asyncio.start_server(self._serve, host, port)
        return int(self._server.sockets[0].getsockname()[1])

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    def _page(self, method: str, target: str) -> Page:
        path = target.split("?", 1)[0]
        if method not in ("GET", "HEAD"):
            return Page(405, "text/plain", b"only GET is served here\n")
        route = self.routes.get(path)
        if route is None:
            known = "\n".join(sorted(self.routes))
            return Page(404, "text/plain", f"no page {path}; the pages are:\n{known}\n".encode())
        try:
            return route()
        except Exception:
            logger.exception("meshd: the admin page %s failed", path)
            return Page(500, "text/plain", b"this page failed; meshd's log has the details\n")

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connection = h11.Connection(h11.SERVER)
        try:
            while True:
                event = connection.next_event()
                if event is h11.NEED_DATA:
                    data = await reader.read(65536)
                    connection.receive_data(data)
                    if not data:
                        break
                    continue
                if isinstance(event, h11.Request):
                    page = self._page(event.method.decode(), event.target.decode())
                    body = b"" if event.method == b"HEAD" else page.body
                    headers = [
                        ("content-type", page.content_type),
                        ("content-length", str(len(page.body))),
                    ]
                    response = h11.Response(status_code=page.status, headers=headers)
                    writer.write(connection.send(response) or b"")
                    writer.write((connection.send(h11.Data(data=body)) or b"") if body else b"")
                    writer.write(connection.send(h11.EndOfMessage()) or b"")
                    await writer.drain()
                    if connection.our_state is h11.MUST_CLOSE:
                        break
                elif isinstance(event, h11.ConnectionClosed):
                    break
                elif isinstance(event, h11.EndOfMessage) and connection.our_state is h11.DONE:
                    if connection.their_state is not h11.DONE:
                        break
                    connection.start_next_cycle()
        except (h11.RemoteProtocolError, ConnectionError):
            pass
        finally:
            writer.close()
