"""libmesh's xDS client against a scripted control plane: a real gRPC server that sends exactly
the responses a test gives it, to show what the client does with resources meshd would never
send (a route with a regex RE2 refuses, a listener libmesh cannot use, a corrupt saved file)."""

from __future__ import annotations

import queue
import textwrap
import threading
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import pytest
from envoy.config.listener.v3 import listener_pb2
from envoy.config.route.v3 import route_pb2
from envoy.service.discovery.v3 import discovery_pb2

import libmesh
from libmesh.config import Registry, load_text
from libmesh.xds import CLUSTER, ENDPOINT, LISTENER, ROUTE, Node, translate

MESH = """
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: reviews, namespace: shop}
spec:
  hosts: [reviews.shop.svc.cluster.local]
  location: MESH_INTERNAL
  resolution: STATIC
  ports: [{number: 8080, name: http, protocol: HTTP}]
  endpoints: [{address: 127.0.0.1, ports: {http: 9}}]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: ratings, namespace: shop}
spec:
  hosts: [ratings.shop.svc.cluster.local]
  location: MESH_INTERNAL
  resolution: STATIC
  ports: [{number: 8080, name: http, protocol: HTTP}]
  endpoints: [{address: 127.0.0.1, ports: {http: 9}}]
"""
REVIEWS = "reviews.shop.svc.cluster.local:8080"
RATINGS = "ratings.shop.svc.cluster.local:8080"


class ScriptedControlPlane:
    """Answers the first request of each type with the response queued for it, pushes whatever
    the test pushes afterwards, and records every request."""

    def __init__(self) -> None:
        self.requests: queue.Queue[discovery_pb2.DiscoveryRequest] = queue.Queue()
        self.initial: dict[str, discovery_pb2.DiscoveryResponse] = {}
        self.outbox: queue.Queue[discovery_pb2.DiscoveryResponse | None] = queue.Queue()
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        handler = grpc.method_handlers_generic_handler(
            "envoy.service.discovery.v3.AggregatedDiscoveryService",
            {
                "StreamAggregatedResources": grpc.stream_stream_rpc_method_handler(
                    self._stream,
                    request_deserializer=discovery_pb2.DiscoveryRequest.FromString,
                    response_serializer=discovery_pb2.DiscoveryResponse.SerializeToString,
                )
            },
        )
        self.server.add_generic_rpc_handlers((handler,))
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()
        self.nonce = 0

    def response(self, type_url: str, version: str, resources: list[Any]) -> Any:
        self.nonce += 1
        response = discovery_pb2.DiscoveryResponse(
            type_url=type_url, version_info=version, nonce=str(self.nonce)
        )
        for resource in resources:
            response.resources.add().Pack(resource)
        return response

    def serve_first(self, type_url: str, version: str, resources: list[Any]) -> None:
        self.initial[type_url] = self.response(type_url, version, resources)

    def push(self, type_url: str, version: str, resources: list[Any]) -> str:
        """Send a response now; returns its nonce."""
        response = self.response(type_url, version, resources)
        self.outbox.put(response)
        return str(response.nonce)

    def _stream(self, requests: Iterator[Any], context: Any) -> Iterator[Any]:
        def read() -> None:
            try:
                for request in requests:
                    self.requests.put(request)
                    first = self.initial.pop(request.type_url, None)
                    if first is not None:
                        self.outbox.put(first)
            except grpc.RpcError:
                pass  # the client closed the stream
            self.outbox.put(None)

        threading.Thread(target=read, daemon=True).start()
        while (response := self.outbox.get()) is not None:
            yield response

    def request_for(self, type_url: str, nonce: str, timeout: float = 10) -> Any:
        """The client's answer (ACK or NACK) to the response with ``nonce``."""
        while True:
            request = self.requests.get(timeout=timeout)
            if request.type_url == type_url and request.response_nonce == nonce:
                return request

    def stop(self) -> None:
        self.outbox.put(None)
        self.server.stop(None)


@pytest.fixture
def control_plane() -> Iterator[ScriptedControlPlane]:
    plane = ScriptedControlPlane()
    yield plane
    plane.stop()


def resources() -> dict[str, dict[str, Any]]:
    result = load_text(textwrap.dedent(MESH))
    snapshot = translate(result.config, Registry.build(result.config), Node(namespace="shop"))
    return {t: dict(snapshot.of_type(t)) for t in (LISTENER, ROUTE, CLUSTER, ENDPOINT)}


def serve_all(plane: ScriptedControlPlane, xds: dict[str, dict[str, Any]], version: str) -> None:
    for type_url in (LISTENER, CLUSTER, ROUTE, ENDPOINT):
        plane.serve_first(type_url, version, list(xds[type_url].values()))


def test_a_bad_route_is_nacked_with_its_reason_and_the_good_one_is_applied(
    control_plane: ScriptedControlPlane, tmp_path: Path
) -> None:
    xds = resources()
    serve_all(control_plane, xds, "v1")
    mesh = libmesh.Mesh.connect(
        f"127.0.0.1:{control_plane.port}", namespace="shop", state_file=None, wait=10
    )
    try:
        assert mesh.engine.route_table("reviews.shop.svc.cluster.local", 8080) is not None
        bad: route_pb2.RouteConfiguration = route_pb2.RouteConfiguration()
        bad.CopyFrom(xds[ROUTE][REVIEWS])
        bad.virtual_hosts[0].routes[0].match.ClearField("prefix")
        bad.virtual_hosts[0].routes[0].match.safe_regex.regex = "/(unclosed"
        good: route_pb2.RouteConfiguration = route_pb2.RouteConfiguration()
        good.CopyFrom(xds[ROUTE][RATINGS])
        good.virtual_hosts[0].routes[0].match.prefix = "/v2"
        nonce = control_plane.push(ROUTE, "v2", [bad, good])

        nack = control_plane.request_for(ROUTE, nonce)

        assert nack.HasField("error_detail")
        assert REVIEWS in nack.error_detail.message
        assert "unclosed" in nack.error_detail.message or "missing )" in nack.error_detail.message
        assert nack.version_info == "v1"  # the last version it accepted
        status = mesh.xds_status
        assert status is not None
        assert REVIEWS in status.rejected
        ratings = mesh.engine.route_table("ratings.shop.svc.cluster.local", 8080)
        assert ratings is not None
        reviews = mesh.engine.route_table("reviews.shop.svc.cluster.local", 8080)
        assert reviews is not None  # still the v1 route: the bad one did not replace it
    finally:
        mesh.close()


def test_a_listener_libmesh_cannot_use_is_nacked_and_the_others_are_kept(
    control_plane: ScriptedControlPlane,
) -> None:
    xds = resources()
    tcp = listener_pb2.Listener(name="tcp-only")
    tcp.address.socket_address.address = "127.0.0.1"
    tcp.address.socket_address.port_value = 15006
    xds[LISTENER]["tcp-only"] = tcp
    serve_all(control_plane, xds, "v1")

    mesh = libmesh.Mesh.connect(
        f"127.0.0.1:{control_plane.port}", namespace="shop", state_file=None, wait=10
    )
    try:
        nack = control_plane.request_for(LISTENER, "1")
        assert "tcp-only: libmesh reads listeners with an api_listener" in nack.error_detail.message
        assert mesh.engine.route_table("reviews.shop.svc.cluster.local", 8080) is not None
    finally:
        mesh.close()


def test_a_corrupt_saved_configuration_is_ignored_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    state = tmp_path / "xds.state"
    state.write_bytes(b"LIBMESH-XDS-STATE 1\n\x00\x00\x00\x09garbage!!")

    with pytest.raises(libmesh.ConfigTimeout):
        libmesh.Mesh.connect("127.0.0.1:9", state_file=state, wait=0.5)

    assert any(
        "ignoring the saved configuration in" in r.getMessage() and str(state) in r.getMessage()
        for r in caplog.records
    )


def test_every_response_of_a_version_reaches_the_saved_configuration(
    control_plane: ScriptedControlPlane, tmp_path: Path
) -> None:
    # meshd gives every type of one push the same version: the routes that follow the clusters
    # of version v2 must be saved too, or a restart while meshd is down serves a mix.
    xds = resources()
    serve_all(control_plane, xds, "v1")
    state = tmp_path / "xds.state"
    mesh = libmesh.Mesh.connect(
        f"127.0.0.1:{control_plane.port}", namespace="shop", state_file=state, wait=10
    )
    try:
        control_plane.request_for(
            CLUSTER, control_plane.push(CLUSTER, "v2", list(xds[CLUSTER].values()))
        )
        changed: route_pb2.RouteConfiguration = route_pb2.RouteConfiguration()
        changed.CopyFrom(xds[ROUTE][RATINGS])
        changed.virtual_hosts[0].routes[0].match.prefix = "/v2"
        ack = control_plane.request_for(
            ROUTE, control_plane.push(ROUTE, "v2", [xds[ROUTE][REVIEWS], changed])
        )
        assert not ack.HasField("error_detail")
    finally:
        mesh.close()

    saved = _saved_resources(state)
    assert saved[ROUTE][RATINGS].virtual_hosts[0].routes[0].match.prefix == "/v2"


def _saved_resources(path: Path) -> dict[str, dict[str, Any]]:
    """The resources in a saved configuration file: a magic line, then length-prefixed
    DiscoveryResponses."""
    import struct

    data = path.read_bytes()
    offset = data.index(b"\n") + 1
    found: dict[str, dict[str, Any]] = {}
    while offset < len(data):
        (length,) = struct.unpack(">I", data[offset : offset + 4])
        response = discovery_pb2.DiscoveryResponse.FromString(
            data[offset + 4 : offset + 4 + length]
        )
        offset += 4 + length
        if response.type_url == ROUTE:
            routes = {}
            for packed in response.resources:
                route = route_pb2.RouteConfiguration()
                packed.Unpack(route)
                routes[route.name] = route
            found[ROUTE] = routes
    return found
