"""The Aggregated Discovery Service: xDS v3 over one gRPC stream per client.

Both variants of the protocol are served: state of the world
(``StreamAggregatedResources``: versions, nonces, ACK and NACK per type, wildcard and named
subscriptions) and incremental (``DeltaAggregatedResources``). Each stream has a reader,
which records what the client asks for and what it accepted or rejected, and a writer, which
sends whatever the client's snapshot has that the client was not sent yet. A change of
configuration only wakes the writers; each sends only the types (and, for RDS and EDS, only
the resources) that changed for it.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
import weakref
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import grpc
from envoy.service.discovery.v3 import discovery_pb2

from libmesh.xds import (
    CLUSTER,
    ENDPOINT,
    HEALTH_INFO_TYPE,
    LISTENER,
    ROUTE,
    TYPE_URLS,
    Node,
    NodeError,
    Registration,
    node_from_proto,
)

from ._cache import STATE_OF_THE_WORLD, NodeSnapshot, SnapshotCache, Subscription, add_nonce
from ._metrics import SHORT_TYPES, Metrics

__all__ = ["Connection", "TypeState", "XdsServer"]

logger = logging.getLogger("meshd")

SERVICE = "envoy.service.discovery.v3.AggregatedDiscoveryService"
# Istio's push order: clusters before the endpoints and listeners that use them, listeners
# before their routes, so that nothing ever refers to what a client does not have yet.
PUSH_ORDER = (CLUSTER, ENDPOINT, LISTENER, ROUTE)


@dataclass
class Nack:
    error: str
    version: str  # the version the client rejected
    at: float  # wall-clock time


@dataclass
class TypeState:
    """One resource type on one stream."""

    requested: bool = False
    names: Subscription = None  # None: wildcard
    explicit: bool = False  # names were given once: an empty list now means none, not all
    sent: NodeSnapshot | None = None
    sent_names: Subscription = None
    nonce: str = ""
    version: str = ""  # the version of the last response
    sent_at: float = 0.0  # wall-clock time of the last response
    acked: str = ""  # the last version the client accepted
    acked_nonce: str = ""
    nack: Nack | None = None
    known: dict[str, str] = field(default_factory=dict)  # delta: what the client has

    @property
    def status(self) -> str:
        """Istio's words: SYNCED (the last response was accepted), NACKED (it was rejected),
        STALE (no answer yet), NOT SENT."""
        if not self.nonce:
            return "NOT SENT"
        if self.nack is not None and self.acked_nonce != self.nonce:
            return "NACKED"
        if self.acked_nonce == self.nonce:
            return "SYNCED"
        return "STALE"


@dataclass
class Connection:
    id: str
    node: Node
    peer: str
    delta: bool
    connected_at: float  # wall clock
    registration: Registration | None = None
    registration_key: tuple[str, str] | None = None
    types: dict[str, TypeState] = field(default_factory=dict)
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    nonces: itertools.count[int] = field(default_factory=lambda: itertools.count(1))
    # monotonic time of the change this stream has still to receive, for convergence time
    pending_change: float | None = None

    def state(self, type_url: str) -> TypeState:
        state = self.types.get(type_url)
        if state is None:
            state = self.types[type_url] = TypeState()
        return state


class XdsServer:
    """Serves snapshots from ``cache``; knows nothing of how they are made."""

    def __init__(
        self,
        cache: SnapshotCache,
        metrics: Metrics,
        *,
        identifier: str,
        on_connect: Callable[[Connection], None] = lambda c: None,
        on_disconnect: Callable[[Connection], None] = lambda c: None,
        on_health: Callable[[Connection, bool, str], None] = lambda c, h, m: None,
    ) -> None:
        self.cache = cache
        self.metrics = metrics
        self.identifier = identifier
        self.connections: dict[str, Connection] = {}
        self._on_connect = on_connect
        self._on_disconnect = on_disconnect
        self._on_health = on_health
        self._ids = itertools.count(1)
        # Clients of one kind subscribe to the same names: one shared set for all of them
        # saves memory, and lets shared responses be found by identity.
        self._subscriptions: weakref.WeakValueDictionary[frozenset[str], frozenset[str]] = (
            weakref.WeakValueDictionary()
        )

    def _intern(self, names: frozenset[str]) -> frozenset[str]:
        shared = self._subscriptions.get(names)
        if shared is None:
            self._subscriptions[names] = shared = names
        return shared

    def handler(self) -> grpc.GenericRpcHandler:
        return grpc.method_handlers_generic_handler(
            SERVICE,
            {
                "StreamAggregatedResources": grpc.stream_stream_rpc_method_handler(
                    self._stream_sotw,
                    request_deserializer=discovery_pb2.DiscoveryRequest.FromString,
                ),
                "DeltaAggregatedResources": grpc.stream_stream_rpc_method_handler(
                    self._stream_delta,
                    request_deserializer=discovery_pb2.DeltaDiscoveryRequest.FromString,
                ),
            },
        )

    def push(self, changed_at: float | None = None) -> None:
        """The cache has new inputs: wake every stream to send what changed for it."""
        for connection in self.connections.values():
            if changed_at is not None and connection.pending_change is None:
                connection.pending_change = changed_at
            connection.wake.set()

    # streams ------------------------------------------------------------------------------------

    async def _stream_sotw(
        self, requests: AsyncIterator[Any], context: grpc.aio.ServicerContext[Any, Any]
    ) -> None:
        await self._serve(context, delta=False)

    async def _stream_delta(
        self, requests: AsyncIterator[Any], context: grpc.aio.ServicerContext[Any, Any]
    ) -> None:
        await self._serve(context, delta=True)

    async def _serve(self, context: grpc.aio.ServicerContext[Any, Any], *, delta: bool) -> None:
        # Requests are read with context.read(), not by iterating: grpc.aio's request iterator
        # holds the previous message while it waits for the next, and a request lives in a
        # native protobuf arena (an EDS subscription names every cluster: ~100 KB at 1000
        # services) that Python's memory accounting does not see — per idle client.
        connection: Connection | None = None
        writer: asyncio.Task[None] | None = None
        try:
            while (request := await context.read()) is not grpc.aio.EOF:
                if connection is None:
                    connection = await self._open(request.node, context, delta=delta)
                    writer = asyncio.create_task(self._write(connection, context))
                if delta:
                    self._on_delta_request(connection, request)
                else:
                    self._on_request(connection, request)
                del request
                if writer is not None and writer.done():
                    break  # the writer failed: the stream is over
        finally:
            if writer is not None:
                writer.cancel()
            if connection is not None:
                self._close(connection)

    async def _open(
        self, proto: Any, context: grpc.aio.ServicerContext[Any, Any], *, delta: bool
    ) -> Connection:
        try:
            node, registration = node_from_proto(proto)
        except NodeError as exc:
            logger.warning("meshd: refused a stream from %s: %s", context.peer(), exc)
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
            raise  # abort raises; this line is never reached
        connection = Connection(
            id=f"{node.id or 'anonymous'}-{next(self._ids)}",
            node=node,
            peer=context.peer(),
            delta=delta,
            connected_at=time.time(),
            registration=registration,
        )
        self.connections[connection.id] = connection
        self.metrics.connected.set(len(self.connections))
        logger.info(
            "meshd: %s connected from %s (%s, namespace %s%s)",
            node.id or "a client without a node id",
            connection.peer,
            node.flavor,
            node.namespace,
            ", delta" if delta else "",
        )
        self._on_connect(connection)
        return connection

    def _close(self, connection: Connection) -> None:
        self.connections.pop(connection.id, None)
        self.metrics.connected.set(len(self.connections))
        logger.info("meshd: %s disconnected", connection.node.id or connection.id)
        self._on_disconnect(connection)

    # what clients say -------------------------------------------------------------------------

    def _acknowledge(
        self, connection: Connection, state: TypeState, type_url: str, nonce: str, error: Any
    ) -> bool:
        """Record an ACK or NACK; ``False`` for a stale nonce, which the request is ignored for."""
        if nonce != state.nonce:
            self.metrics.expired_nonce.inc(type=SHORT_TYPES[type_url])
            return False
        if error is not None and error.message:
            state.nack = Nack(error.message, state.version, time.time())
            self.metrics.rejects.inc(type=SHORT_TYPES[type_url])
            logger.warning(
                "meshd: %s rejected %s version %s: %s",
                connection.node.id or connection.id,
                SHORT_TYPES[type_url].upper(),
                state.version,
                error.message,
            )
        else:
            state.acked = state.version
            state.acked_nonce = nonce
            state.nack = None
            self._check_converged(connection)
        return True

    def _check_converged(self, connection: Connection) -> None:
        if connection.pending_change is None:
            return
        if all(s.status == "SYNCED" for s in connection.types.values() if s.nonce):
            self.metrics.convergence.observe(time.monotonic() - connection.pending_change)
            connection.pending_change = None

    def _health(self, connection: Connection, request: Any) -> None:
        error = request.error_detail if request.HasField("error_detail") else None
        healthy = error is None or not (error.message or error.code)
        self._on_health(connection, healthy, error.message if error is not None else "")

    def _begin(self, connection: Connection, request: Any) -> TypeState | None:
        """What both protocols do first with a request: a health report is taken, an unknown
        type ignored, an ACK or NACK recorded. Returns the type's state when the request goes
        on to its subscription, ``None`` when it is done (or carries a stale nonce)."""
        type_url = request.type_url
        if type_url == HEALTH_INFO_TYPE:
            self._health(connection, request)
            return None
        if type_url not in TYPE_URLS:
            logger.debug("meshd: %s asked for unknown type %s", connection.id, type_url)
            return None
        state = connection.state(type_url)
        if request.response_nonce:
            error = request.error_detail if request.HasField("error_detail") else None
            if not self._acknowledge(connection, state, type_url, request.response_nonce, error):
                return None
        return state

    def _on_request(self, connection: Connection, request: Any) -> None:
        state = self._begin(connection, request)
        if state is None:
            return
        type_url = request.type_url
        names = list(request.resource_names)
        if names:
            state.explicit = True
        wildcard = "*" in names or (
            not names and type_url in STATE_OF_THE_WORLD and not state.explicit
        )
        subscription: Subscription = None if wildcard else self._intern(frozenset(names))
        if not state.requested or subscription is not state.names:
            state.requested = True
            state.names = subscription
            connection.wake.set()

    def _on_delta_request(self, connection: Connection, request: Any) -> None:
        state = self._begin(connection, request)
        if state is None:
            return
        type_url = request.type_url
        first = not state.requested
        if first:
            state.known = dict(request.initial_resource_versions)
        subscribe = set(request.resource_names_subscribe)
        unsubscribe = set(request.resource_names_unsubscribe)
        names = set(state.names) if state.names is not None else None
        if first:
            wildcard = "*" in subscribe or (not subscribe and type_url in STATE_OF_THE_WORLD)
            names = None if wildcard else subscribe
        elif "*" in subscribe:
            names = None
        elif names is not None:
            names = (names | subscribe) - unsubscribe
        else:  # wildcard: "*" may be left
            names = None if "*" not in unsubscribe else subscribe - unsubscribe
        for name in unsubscribe:
            state.known.pop(name, None)
        subscription: Subscription = (
            None if names is None else self._intern(frozenset(names - {"*"}))
        )
        if first or subscription != state.names or subscribe:
            state.requested = True
            state.names = subscription
            connection.wake.set()

    # what clients are sent --------------------------------------------------------------------

    async def _snapshot(self, connection: Connection) -> NodeSnapshot:
        key = self.cache.key(connection.node)
        snapshot = self.cache.cached(key)
        if snapshot is None:
            started = time.perf_counter()
            snapshot = await asyncio.to_thread(self.cache.get, key)
            self.metrics.translate_time.observe(time.perf_counter() - started)
        return snapshot

    async def _write(
        self, connection: Connection, context: grpc.aio.ServicerContext[Any, Any]
    ) -> None:
        while True:
            await connection.wake.wait()
            connection.wake.clear()
            snapshot = await self._snapshot(connection)
            for type_url in PUSH_ORDER:
                state = connection.types.get(type_url)
                if state is None or not state.requested:
                    continue
                started = time.perf_counter()
                body = self._next_response(connection, state, type_url, snapshot)
                if body is None:
                    continue
                await context.write(body)
                del body  # an idle stream must not keep its last (possibly large) response
                short = SHORT_TYPES[type_url]
                self.metrics.pushes.inc(type=short)
                self.metrics.push_time.observe(time.perf_counter() - started, type=short)

    def _next_response(
        self, connection: Connection, state: TypeState, type_url: str, snapshot: NodeSnapshot
    ) -> bytes | None:
        if connection.delta:
            body, state.known = snapshot.delta_response(
                type_url, state.names, state.known, identifier=self.identifier
            )
            if body is None:
                return None
            state.nonce = str(next(connection.nonces))
            body = add_nonce(body, state.nonce, delta=True)
        else:
            if state.sent is snapshot and state.sent_names == state.names:
                return None
            prepared = snapshot.response(
                type_url, state.names, state.sent, state.sent_names, identifier=self.identifier
            )
            state.sent, state.sent_names = snapshot, state.names
            if prepared is None:
                return None
            state.nonce, body = prepared.nonce, prepared.body
        state.version = snapshot.version
        state.sent_at = time.time()
        return body
