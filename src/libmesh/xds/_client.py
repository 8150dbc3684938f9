"""libmesh's xDS client: one background ADS stream per process, from which the engine runs.

The stream lives in its own thread, so sync and asyncio applications use it alike. It
subscribes the way Envoy does (every listener and cluster, then the routes and endpoints they
name), validates each resource on its own and applies the ones that are good: a bad resource
is NACKed with the reason and keeps its previous version, and never poisons the others. When
the control plane goes away the engine keeps serving what it has and the client reconnects
with exponential back-off and jitter. Each complete configuration is saved to disk, so that a
process restarted while the control plane is down starts from it (static stability).
"""

from __future__ import annotations

import logging
import os
import queue
import random
import struct
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm,
)
from envoy.service.discovery.v3 import discovery_pb2
from google.protobuf.message import DecodeError, Message
from google.rpc import status_pb2

from ._node import HEALTH_INFO_TYPE, Registration, node_to_proto
from ._snapshot import CLUSTER, ENDPOINT, LISTENER, MESSAGE_TYPES, ROUTE, TYPE_URLS, Node, Snapshot

__all__ = ["ResourceCheck", "XdsClient", "XdsStatus"]

logger = logging.getLogger("libmesh")

ADS_METHOD = "/envoy.service.discovery.v3.AggregatedDiscoveryService/StreamAggregatedResources"
_STATE_MAGIC = b"LIBMESH-XDS-STATE 1\n"
_INVALID_ARGUMENT = 3
_UNAVAILABLE = 14

# Checks a resource before it is applied: returns an error message, or None when it is usable.
ResourceCheck = Callable[[str, Message], str | None]


@dataclass
class XdsStatus:
    """What the client knows, for logs, health pages and tests."""

    connected: bool = False
    versions: dict[str, str] = field(default_factory=dict)  # accepted, by type URL
    applied_version: str = ""
    from_saved_state: bool = False
    last_error: str = ""  # why the last stream ended
    rejected: dict[str, str] = field(default_factory=dict)  # resource name -> reason
    reconnects: int = 0


class XdsClient:
    """Keeps ``on_update`` fed with complete snapshots from the control plane at ``address``."""

    def __init__(
        self,
        address: str,
        node: Node,
        on_update: Callable[[Snapshot], None],
        *,
        check: ResourceCheck,
        registration: Registration | None = None,
        state_file: Path | None = None,
        version: str = "",
        backoff: tuple[float, float] = (0.5, 30.0),
        warming_timeout: float = 5.0,
        rng: random.Random | None = None,
    ) -> None:
        self.address = address
        self.node = node
        self.registration = registration
        self.state_file = state_file
        self._proto = node_to_proto(node, registration, version=version)
        self._on_update = on_update
        self._check = check
        self._backoff = backoff
        self._warming_timeout = warming_timeout
        self._rng = rng or random.Random()
        self.status = XdsStatus()
        # accepted resources and the version and nonce of the response they came in, by type
        self._cache: dict[str, dict[str, Message]] = {t: {} for t in TYPE_URLS}
        self._nonces: dict[str, str] = {}
        self._received: set[str] = set()  # types the control plane has answered
        self._subscriptions: dict[str, list[str]] = {ROUTE: [], ENDPOINT: []}
        self._ready = threading.Event()
        self._first_failure = threading.Event()
        self._stop = threading.Event()
        self._lock = threading.RLock()  # the stream thread and the waiting thread share state
        self._requests: queue.Queue[discovery_pb2.DiscoveryRequest | None] | None = None
        self._call: Any = None
        self._healthy: tuple[bool, str] | None = None
        self._incomplete_since: float | None = None
        self._unsaved = False  # the cache changed since the state file was written
        self._thread = threading.Thread(target=self._run, name="libmesh-xds", daemon=True)

    # public -----------------------------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def wait(self, timeout: float | None) -> bool:
        """Wait for a first configuration: from the control plane, or from the saved state as
        soon as the control plane proves unreachable. Whether one was applied."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self._ready.is_set():
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                break
            if self._first_failure.is_set() and self._apply_saved_state():
                break
            self._ready.wait(0.05 if remaining is None else min(0.05, remaining))
        return self._ready.is_set() or self._apply_saved_state()

    def report_health(self, healthy: bool, message: str = "") -> None:
        """Tell the control plane whether this workload can take traffic (Istio's health
        report on the ADS stream); repeated after every reconnect."""
        self._healthy = (healthy, message)
        self._send(self._health_request())

    def close(self) -> None:
        self._stop.set()
        requests, call = self._requests, self._call
        if requests is not None:
            requests.put(None)
        if call is not None:
            call.cancel()
        if self._thread.is_alive():
            self._thread.join(timeout=5)

    # the stream -------------------------------------------------------------------------------

    def _run(self) -> None:
        failures = 0
        while not self._stop.is_set():
            connected = self._stream()
            if self._stop.is_set():
                return
            failures = 0 if connected else failures + 1
            self.status.reconnects += 1
            base, cap = self._backoff
            delay = min(cap, base * 2 ** min(failures, 16))
            delay *= 0.5 + self._rng.random()  # jitter: clients that lost meshd together spread out
            self._stop.wait(delay)

    def _stream(self) -> bool:
        """One ADS stream, until it ends; whether it ever received a response."""
        requests: queue.Queue[discovery_pb2.DiscoveryRequest | None] = queue.Queue()
        received = False
        channel = grpc.insecure_channel(
            self.address,
            options=[
                ("grpc.max_receive_message_length", -1),
                ("grpc.keepalive_time_ms", 30_000),
                ("grpc.keepalive_timeout_ms", 10_000),
            ],
        )
        try:
            method = channel.stream_stream(
                ADS_METHOD,
                request_serializer=discovery_pb2.DiscoveryRequest.SerializeToString,
                response_deserializer=discovery_pb2.DiscoveryResponse.FromString,
            )
            with self._lock:
                self._requests = requests
                for request in self._initial_requests():
                    requests.put(request)
            call = method(iter(requests.get, None))
            self._call = call
            for response in call:
                if not received:
                    received = True
                    self.status.connected = True
                    logger.info("libmesh: connected to the control plane at %s", self.address)
                self._on_response(response)
        except grpc.RpcError as exc:
            if not self._stop.is_set():
                self._stream_failed(_describe(exc), received)
        finally:
            with self._lock:
                self._requests = None
            requests.put(None)
            self._call = None
            channel.close()
            if received:
                self.status.connected = False
        return received

    def _stream_failed(self, reason: str, was_connected: bool) -> None:
        self.status.last_error = reason
        self._first_failure.set()
        if was_connected:
            logger.warning(
                "libmesh: lost the control plane at %s (%s); serving configuration %s until it "
                "is back",
                self.address,
                reason,
                self.status.applied_version or "(none)",
            )
        else:
            logger.debug("libmesh: cannot reach the control plane at %s: %s", self.address, reason)

    def _initial_requests(self) -> Iterator[discovery_pb2.DiscoveryRequest]:
        """A new stream asks again for everything, saying which versions it already has."""
        yield discovery_pb2.DiscoveryRequest(
            node=self._proto,
            type_url=LISTENER,
            version_info=self.status.versions.get(LISTENER, ""),
        )
        yield discovery_pb2.DiscoveryRequest(
            type_url=CLUSTER, version_info=self.status.versions.get(CLUSTER, "")
        )
        for type_url in (ROUTE, ENDPOINT):
            if self._subscriptions[type_url]:
                yield discovery_pb2.DiscoveryRequest(
                    type_url=type_url,
                    version_info=self.status.versions.get(type_url, ""),
                    resource_names=self._subscriptions[type_url],
                )
        if self._healthy is not None:
            yield self._health_request()

    def _health_request(self) -> discovery_pb2.DiscoveryRequest:
        request = discovery_pb2.DiscoveryRequest(type_url=HEALTH_INFO_TYPE)
        if self._healthy is not None and not self._healthy[0]:
            request.error_detail.CopyFrom(
                status_pb2.Status(code=_UNAVAILABLE, message=self._healthy[1] or "unhealthy")
            )
        return request

    def _send(self, request: discovery_pb2.DiscoveryRequest) -> None:
        with self._lock:
            if self._requests is not None:
                self._requests.put(request)

    # responses --------------------------------------------------------------------------------

    def _on_response(self, response: discovery_pb2.DiscoveryResponse) -> None:
        with self._lock:
            self._handle(response)

    def _handle(self, response: discovery_pb2.DiscoveryResponse) -> None:
        type_url = response.type_url
        if type_url not in MESSAGE_TYPES:
            self._send(
                discovery_pb2.DiscoveryRequest(
                    type_url=type_url,
                    response_nonce=response.nonce,
                    error_detail=status_pb2.Status(
                        code=_INVALID_ARGUMENT, message=f"libmesh does not read {type_url}"
                    ),
                )
            )
            return
        accepted, errors = self._decode(type_url, response)
        previous = self._cache[type_url]
        if type_url in (LISTENER, CLUSTER):
            # The state of the world: what is left out is gone; what was rejected stays as it was.
            resources = {n: m for n, m in previous.items() if n in errors}
            resources.update(accepted)
        else:
            resources = {**previous, **accepted}
        self._cache[type_url] = resources
        self._unsaved = True
        self._nonces[type_url] = response.nonce
        self._received.add(type_url)
        for name, reason in errors.items():
            self.status.rejected[name] = reason
        for name in accepted:
            self.status.rejected.pop(name, None)
        if errors:
            message = "; ".join(f"{name}: {reason}" for name, reason in sorted(errors.items()))
            logger.warning(
                "libmesh: rejected %d of the %d resources of %s version %s: %s",
                len(errors),
                len(response.resources),
                type_url.rpartition(".")[2],
                response.version_info,
                message,
            )
            self._send(
                discovery_pb2.DiscoveryRequest(
                    type_url=type_url,
                    version_info=self.status.versions.get(type_url, ""),
                    response_nonce=response.nonce,
                    resource_names=self._names(type_url),
                    error_detail=status_pb2.Status(code=_INVALID_ARGUMENT, message=message),
                )
            )
        else:
            self.status.versions[type_url] = response.version_info
            self._send(
                discovery_pb2.DiscoveryRequest(
                    type_url=type_url,
                    version_info=response.version_info,
                    response_nonce=response.nonce,
                    resource_names=self._names(type_url),
                )
            )
        if type_url == LISTENER:
            self._resubscribe(ROUTE, _route_names(self._cache[LISTENER].values()))
        elif type_url == CLUSTER:
            self._resubscribe(ENDPOINT, _eds_names(self._cache[CLUSTER].values()))
        self._apply(response.version_info)

    def _names(self, type_url: str) -> list[str]:
        return list(self._subscriptions.get(type_url, []))

    def _decode(
        self, type_url: str, response: discovery_pb2.DiscoveryResponse
    ) -> tuple[dict[str, Message], dict[str, str]]:
        accepted: dict[str, Message] = {}
        errors: dict[str, str] = {}
        message_type = MESSAGE_TYPES[type_url]
        for index, packed in enumerate(response.resources):
            message = message_type()
            if packed.type_url != type_url:
                errors[f"resource #{index}"] = f"is a {packed.type_url}, not a {type_url}"
                continue
            try:
                message.ParseFromString(packed.value)
            except DecodeError as exc:
                errors[f"resource #{index}"] = f"cannot be decoded: {exc}"
                continue
            name = _name_of(message)
            if not name:
                errors[f"resource #{index}"] = "has no name"
                continue
            problem = self._check(type_url, message)
            if problem is not None:
                errors[name] = problem
            else:
                accepted[name] = message
        return accepted, errors

    def _resubscribe(self, type_url: str, names: list[str]) -> None:
        if names == self._subscriptions[type_url]:
            return
        self._subscriptions[type_url] = names
        wanted = set(names)
        self._cache[type_url] = {n: m for n, m in self._cache[type_url].items() if n in wanted}
        self._unsaved = True
        self._send(
            discovery_pb2.DiscoveryRequest(
                type_url=type_url,
                version_info=self.status.versions.get(type_url, ""),
                response_nonce=self._nonces.get(type_url, ""),
                resource_names=names,
            )
        )

    # applying ---------------------------------------------------------------------------------

    def _missing(self) -> list[str]:
        """What the listeners and clusters name that has not arrived yet (Envoy's warming)."""
        if not {LISTENER, CLUSTER} <= self._received:
            return ["the first listeners and clusters"]
        missing = [n for n in self._subscriptions[ROUTE] if n not in self._cache[ROUTE]]
        missing += [n for n in self._subscriptions[ENDPOINT] if n not in self._cache[ENDPOINT]]
        return missing

    def _apply(self, version: str) -> None:
        missing = self._missing()
        if missing:
            now = time.monotonic()
            if self._incomplete_since is None:
                self._incomplete_since = now
            if not self._ready.is_set() or now - self._incomplete_since < self._warming_timeout:
                return
            logger.warning(
                "libmesh: applying configuration %s without %s, which the control plane has "
                "not sent in %.0fs",
                version,
                ", ".join(missing[:5]) + (" …" if len(missing) > 5 else ""),
                self._warming_timeout,
            )
        self._incomplete_since = None
        snapshot = Snapshot(
            {t: dict(self._cache[t]) for t in TYPE_URLS},
            version,
        )
        self._on_update(snapshot)
        self.status.applied_version = version
        self.status.from_saved_state = False
        if not self._ready.is_set():
            logger.info("libmesh: configuration %s from %s applied", version, self.address)
        self._ready.set()
        self._save(snapshot)

    # saved state ------------------------------------------------------------------------------

    def _save(self, snapshot: Snapshot) -> None:
        # Not by version: meshd gives every type of one push the same version, and each of
        # them changes what must be saved.
        if self.state_file is None or not self._unsaved:
            return
        chunks = [_STATE_MAGIC]
        for type_url in TYPE_URLS:
            response = discovery_pb2.DiscoveryResponse(
                type_url=type_url, version_info=self.status.versions.get(type_url, "")
            )
            for message in snapshot.of_type(type_url).values():
                response.resources.add().Pack(message)
            data = response.SerializeToString()
            chunks.append(struct.pack(">I", len(data)) + data)
        try:
            self.state_file.parent.mkdir(parents=True, exist_ok=True)
            temporary = self.state_file.with_name(f".{self.state_file.name}.{os.getpid()}.tmp")
            temporary.write_bytes(b"".join(chunks))
            os.replace(temporary, self.state_file)
            self._unsaved = False
        except OSError as exc:
            logger.warning(
                "libmesh: cannot save the configuration to %s: %s; a restart while the control "
                "plane is down will start without it",
                self.state_file,
                exc.strerror or exc,
            )

    def _apply_saved_state(self) -> bool:
        """Apply the saved configuration if nothing better has arrived; whether it was."""
        with self._lock:
            if self._ready.is_set():
                return True
            saved = self._load_saved_state()
            if saved is None:
                return False
            self._on_update(saved)
            self.status.applied_version = saved.version
            self.status.from_saved_state = True
            self._ready.set()
        logger.warning(
            "libmesh: the control plane at %s is unreachable (%s); serving the configuration "
            "saved in %s (version %s) until it is back",
            self.address,
            self.status.last_error or "no answer",
            self.state_file,
            saved.version,
        )
        return True

    def _load_saved_state(self) -> Snapshot | None:
        if self.state_file is None:
            return None
        try:
            data = self.state_file.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            logger.warning("libmesh: cannot read %s: %s", self.state_file, exc.strerror or exc)
            return None
        try:
            return self._parse_state(data)
        except (ValueError, DecodeError, struct.error) as exc:
            logger.warning(
                "libmesh: ignoring the saved configuration in %s: %s", self.state_file, exc
            )
            return None

    def _parse_state(self, data: bytes) -> Snapshot:
        if not data.startswith(_STATE_MAGIC):
            raise ValueError("it is not a libmesh configuration file")
        offset = len(_STATE_MAGIC)
        resources: dict[str, dict[str, Message]] = {}
        versions: dict[str, str] = {}
        while offset < len(data):
            (length,) = struct.unpack_from(">I", data, offset)
            offset += 4
            response = discovery_pb2.DiscoveryResponse.FromString(data[offset : offset + length])
            offset += length
            accepted, errors = self._decode(response.type_url, response)
            if errors:
                raise ValueError("; ".join(f"{n}: {r}" for n, r in errors.items()))
            resources[response.type_url] = accepted
            versions[response.type_url] = response.version_info
        for type_url, by_name in resources.items():
            self._cache[type_url] = dict(by_name)
        self._subscriptions[ROUTE] = _route_names(resources.get(LISTENER, {}).values())
        self._subscriptions[ENDPOINT] = _eds_names(resources.get(CLUSTER, {}).values())
        # Kept, so that the control plane, once back, knows what this client has.
        self.status.versions.update(versions)
        return Snapshot(resources, versions.get(LISTENER, ""))


def _describe(error: grpc.RpcError) -> str:
    code = getattr(error, "code", None)
    details = getattr(error, "details", None)
    if code is None or details is None:
        return str(error)
    return f"{code().name}: {details()}"


def _name_of(message: Message) -> str:
    if isinstance(message, endpoint_pb2.ClusterLoadAssignment):
        return str(message.cluster_name)
    return str(getattr(message, "name", ""))


def _route_names(listeners: Any) -> list[str]:
    names = []
    for listener in listeners:
        manager = _connection_manager(listener)
        if manager is not None and manager.HasField("rds"):
            names.append(str(manager.rds.route_config_name))
    return sorted(set(names))


def _eds_names(clusters: Any) -> list[str]:
    return sorted(
        {
            str(c.eds_cluster_config.service_name or c.name)
            for c in clusters
            if c.type == cluster_pb2.Cluster.EDS
        }
    )


def _connection_manager(listener: listener_pb2.Listener) -> hcm.HttpConnectionManager | None:
    manager = hcm.HttpConnectionManager()
    if listener.HasField("api_listener") and listener.api_listener.api_listener.Unpack(manager):
        return manager
    for chain in listener.filter_chains:
        for network_filter in chain.filters:
            if network_filter.typed_config.Unpack(manager):
                return manager
    return None
