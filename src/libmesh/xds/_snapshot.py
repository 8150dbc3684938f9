"""What the translator produces and every data plane consumes: a versioned set of xDS resources."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.config.route.v3 import route_pb2
from google.protobuf.message import Message

from .._frozen import EMPTY, FrozenMap

__all__ = [
    "CLUSTER",
    "ENDPOINT",
    "FLAVORS",
    "LISTENER",
    "MESSAGE_TYPES",
    "ROUTE",
    "TYPE_URLS",
    "Locality",
    "Node",
    "Snapshot",
]

_PREFIX = "type.googleapis.com/"
LISTENER = _PREFIX + "envoy.config.listener.v3.Listener"
ROUTE = _PREFIX + "envoy.config.route.v3.RouteConfiguration"
CLUSTER = _PREFIX + "envoy.config.cluster.v3.Cluster"
ENDPOINT = _PREFIX + "envoy.config.endpoint.v3.ClusterLoadAssignment"
# The order a client needs them in: listeners name routes, routes name clusters, clusters name
# endpoints.
TYPE_URLS = (LISTENER, ROUTE, CLUSTER, ENDPOINT)

MESSAGE_TYPES: dict[str, type[Message]] = {
    LISTENER: listener_pb2.Listener,
    ROUTE: route_pb2.RouteConfiguration,
    CLUSTER: cluster_pb2.Cluster,
    ENDPOINT: endpoint_pb2.ClusterLoadAssignment,
}


@dataclass(frozen=True, slots=True, order=True)
class Locality:
    """Where a workload runs: ``region/zone/subzone``, as Istio writes it."""

    region: str = ""
    zone: str = ""
    subzone: str = ""

    @classmethod
    def parse(cls, text: str | None) -> Locality:
        parts = (text or "").split("/")
        parts += [""] * (3 - len(parts))
        return cls(parts[0], parts[1], "/".join(parts[2:]))

    def __str__(self) -> str:
        return "/".join(p for p in (self.region, self.zone, self.subzone) if p)


FLAVORS = ("libmesh", "grpc", "envoy")


@dataclass(frozen=True, slots=True)
class Node:
    """The client the configuration is made for. Routing depends on who asks: short host names
    resolve in its namespace, ``sourceLabels`` matches its labels, locality failover starts at
    its locality, and ``exportTo`` decides what it may see."""

    id: str = "libmesh"
    namespace: str = "default"
    labels: FrozenMap[str, str] = field(default=EMPTY)
    locality: Locality = field(default_factory=Locality)
    service_account: str = "default"
    # What reads the resources: "libmesh" (a listener without a socket per host:port, and
    # everything else Envoy reads), "grpc" (grpcio's xDS client, which reads a subset;
    # Istio's "grpcgen") or "envoy" (a real Envoy: one HTTP listener on http_proxy_address
    # instead of the socketless ones, which Envoy accepts only in its bootstrap).
    flavor: str = "libmesh"
    http_proxy_address: str = "127.0.0.1:15001"  # empty: none (an Envoy for inbound only)
    # For an Envoy: its inbound ports, each (listen address, the program's address), e.g.
    # (("0.0.0.0:15006", "127.0.0.1:8080"),): libmesh-proxy --engine envoy --inbound
    inbound: tuple[tuple[str, str], ...] = ()
    # For an Envoy: its ports bound to one service each, (listen address, "host:port"), e.g.
    # (("127.0.0.1:9001", "pay.shop.svc.cluster.local:8080"),): libmesh-proxy --route
    routes: tuple[tuple[str, str], ...] = ()
    # Whether it can get the mesh's certificates: libmesh and grpcio hold their own; an Envoy
    # only with an SDS server beside it (node metadata LIBMESH_SDS).
    sds: bool = True

    def __post_init__(self) -> None:
        if self.flavor not in FLAVORS:
            raise ValueError(
                f"unknown node flavor {self.flavor!r}; the flavors are {', '.join(FLAVORS)}"
            )


@dataclass(frozen=True)
class Snapshot:
    """xDS resources by type URL, then by name, with a version derived from their content."""

    resources: Mapping[str, Mapping[str, Message]]
    version: str = ""
    # each resource serialized deterministically, when the maker of the snapshot kept them
    serialized: Mapping[str, Mapping[str, bytes]] | None = field(default=None, compare=False)

    @classmethod
    def of(
        cls,
        resources: Mapping[str, Mapping[str, Message]],
        serialized: Mapping[str, Mapping[str, bytes]] | None = None,
    ) -> Snapshot:
        """A snapshot versioned by its content; ``serialized`` (every resource, serialized
        deterministically) saves serializing them again."""
        frozen = FrozenMap(
            (type_url, FrozenMap(sorted(resources.get(type_url, {}).items())))
            for type_url in TYPE_URLS
        )
        wire: dict[str, dict[str, bytes]] = {}
        digest = hashlib.sha256()
        for type_url in TYPE_URLS:
            known = serialized.get(type_url, {}) if serialized is not None else {}
            wire[type_url] = {}
            for name, message in frozen[type_url].items():
                data = known.get(name)
                if data is None:
                    data = message.SerializeToString(deterministic=True)
                wire[type_url][name] = data
                digest.update(name.encode())
                digest.update(data)
        return cls(frozen, digest.hexdigest()[:16], wire)

    def of_type(self, type_url: str) -> Mapping[str, Message]:
        return self.resources.get(type_url, EMPTY)

    def __iter__(self) -> Iterator[tuple[str, str, Message]]:
        for type_url in TYPE_URLS:
            for name, message in self.of_type(type_url).items():
                yield type_url, name, message

    @property
    def listeners(self) -> Mapping[str, listener_pb2.Listener]:
        return self.of_type(LISTENER)

    @property
    def routes(self) -> Mapping[str, route_pb2.RouteConfiguration]:
        return self.of_type(ROUTE)

    @property
    def clusters(self) -> Mapping[str, cluster_pb2.Cluster]:
        return self.of_type(CLUSTER)

    @property
    def endpoints(self) -> Mapping[str, endpoint_pb2.ClusterLoadAssignment]:
        return self.of_type(ENDPOINT)
