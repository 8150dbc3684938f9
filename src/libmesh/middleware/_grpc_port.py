"""One port for a grpcio server, as the workload's PeerAuthentication says: STRICT takes the
mesh's mutual TLS only, DISABLE plaintext only, PERMISSIVE both on the same port.

grpcio's server takes TLS or plaintext per port, never both. Here libmesh accepts the
connections on the public port itself, looks at each one's first byte (a TLS handshake starts
with 0x16) as :func:`libmesh.serve` does, and passes its bytes untouched to one of two loopback
ports of the same server: one secured with the workload's SVID (the client's certificate is
checked by grpcio, its SPIFFE ID read by the interceptor), one plaintext. The interceptor learns
each connection's real caller address from here, so AuthorizationPolicy's ``ipBlocks`` see it::

    port = libmesh.middleware.MeshGrpcPort(server, mesh, "0.0.0.0:8080")
    server.start()
    port.start()
"""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
from collections.abc import Callable
from typing import Any

from ..identity._tls import grpc_server_credentials
from ._serve import _FIRST_BYTE_TIMEOUT, _HANDSHAKE, _peek, accept_connections

__all__ = ["MeshGrpcPort", "Relay", "caller_of"]

logger = logging.getLogger("libmesh")


# the loopback port each passed-on connection comes from -> the caller's real address (each
# such connection binds its own port first: an unbound connect may share a local port with a
# connection to another destination, which would mix up two callers here)
_CALLERS: dict[int, tuple[str, int]] = {}


def caller_of(peer: str) -> tuple[str, int] | None:
    """The real caller of a connection that a :class:`MeshGrpcPort` passed on, from grpcio's
    ``context.peer()`` (``ipv4:127.0.0.1:54321``); ``None`` for any other connection."""
    host, _, port = peer.rpartition(":")
    if not port.isdigit() or not host.endswith(("127.0.0.1", "[::1]")):
        return None
    return _CALLERS.get(int(port))


class Relay(asyncio.Protocol):
    """One side of a byte relay: what arrives goes to ``peer`` as it is, with back-pressure."""

    def __init__(self, peer: Any, lost: Callable[[], None] | None = None) -> None:
        self.peer = peer  # (None until the other side is connected: bytes wait in early)
        self.lost = lost
        self.early: list[bytes] = []

    def connect(self, peer: Any) -> None:
        self.peer = peer
        for data in self.early:
            peer.write(data)
        self.early.clear()

    def data_received(self, data: bytes) -> None:
        if self.peer is None:
            self.early.append(data)
        else:
            self.peer.write(data)

    def eof_received(self) -> bool:
        if self.peer is not None and self.peer.can_write_eof():
            self.peer.write_eof()
            return True  # half-closed: the other way may still talk
        return False

    def pause_writing(self) -> None:
        if self.peer is not None:
            self.peer.pause_reading()

    def resume_writing(self) -> None:
        if self.peer is not None:
            self.peer.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.peer is not None:
            self.peer.close()
        if self.lost is not None:
            self.lost()


class MeshGrpcPort:
    """``server`` (a ``grpc.Server``, not started yet) served on ``address`` (``host:port``;
    port 0 picks one: :attr:`port`) as the mesh's PeerAuthentication says for that port. Call
    :meth:`start` after ``server.start()``; :meth:`close` stops accepting."""

    def __init__(self, server: Any, mesh: Any, address: str) -> None:
        host, _, port = address.rpartition(":")
        self.mesh = mesh
        self.listener = socket.create_server((host.strip("[]") or "0.0.0.0", int(port)))
        self.listener.setblocking(False)
        self.port: int = self.listener.getsockname()[1]
        self.plaintext_port: int = server.add_insecure_port("127.0.0.1:0")
        self.tls_port: int | None = None
        if mesh.identity is not None:  # without an identity nobody can be taken over mTLS
            credentials = grpc_server_credentials(mesh.identity)
            self.tls_port = server.add_secure_port("127.0.0.1:0", credentials)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._open: set[Any] = set()  # the relays' transports, closed with the port

    def start(self) -> MeshGrpcPort:
        ready = threading.Event()

        def run() -> None:
            loop = self._loop = asyncio.new_event_loop()
            ready.set()
            try:
                loop.run_until_complete(
                    accept_connections(self.listener, self._admit, "a grpc connection")
                )
            except asyncio.CancelledError:
                pass
            finally:
                for transport in list(self._open):
                    transport.abort()
                loop.run_until_complete(asyncio.sleep(0.05))  # (their connection_lost)
                loop.close()

        self._thread = threading.Thread(target=run, name=f"libmesh-grpc-port-{self.port}")
        self._thread.daemon = True
        self._thread.start()
        ready.wait()
        logger.info(
            "libmesh: serving grpc on port %d (%s)",
            self.port,
            self.mesh.engine.inbound.mode(self.port).value,
        )
        return self

    def close(self) -> None:
        loop = self._loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(lambda: [t.cancel() for t in asyncio.all_tasks(loop)])
        if self._thread is not None:
            self._thread.join(5)
        self.listener.close()

    async def _admit(self, connection: socket.socket, peer: tuple[str, int]) -> None:
        loop = asyncio.get_running_loop()
        try:
            await self._pass_on(loop, connection, peer)
        except BaseException:  # (cancelled with the port, or a bug): the caller is let go
            connection.close()
            raise

    async def _pass_on(
        self, loop: asyncio.AbstractEventLoop, connection: socket.socket, peer: tuple[str, int]
    ) -> None:
        try:
            first = await asyncio.wait_for(_peek(loop, connection), _FIRST_BYTE_TIMEOUT)
        except (TimeoutError, OSError):
            connection.close()
            return
        if not first:
            connection.close()
            return
        tls = first[0] == _HANDSHAKE
        inbound = self.mesh.engine.inbound
        target = self.tls_port if tls else self.plaintext_port
        if not inbound.accepts(self.port, tls) or target is None:
            why = (
                f"port {self.port} is {inbound.mode(self.port).value} (PeerAuthentication)"
                if target is not None
                else "this workload has no identity (Mesh.connect(token=...))"
            )
            logger.warning(
                "libmesh: refused a %s grpc connection from %s:%d: %s",
                "TLS" if tls else "plaintext",
                *peer,
                why,
            )
            connection.close()
            return
        try:
            upstream, relay = await loop.create_connection(
                lambda: Relay(None), "127.0.0.1", target, local_addr=("127.0.0.1", 0)
            )
        except OSError as exc:
            logger.warning("libmesh: the grpc server's port %d did not answer: %s", target, exc)
            connection.close()
            return
        local: int = upstream.get_extra_info("sockname")[1]
        _CALLERS[local] = peer
        self._open.add(upstream)
        downstream: Any = None

        def forget() -> None:
            _CALLERS.pop(local, None)
            self._open.discard(upstream)
            self._open.discard(downstream)

        try:
            downstream, _ = await loop.connect_accepted_socket(
                lambda: Relay(upstream, forget), connection
            )
        except BaseException:
            upstream.close()
            self._open.discard(upstream)
            raise
        self._open.add(downstream)
        relay.connect(downstream)
