"""Who a data plane is, as it tells the control plane: the xDS ``Node`` and its metadata.

The keys are Istio's where Istio has one, so a node describes itself the way an Istio
sidecar does:

==============================  =============================================================
``NAMESPACE``                   the workload's namespace (else ``default``)
``LABELS``                      its labels, a map of strings
``SERVICE_ACCOUNT``             its service account
``WORKLOAD_NAME``               its name (else the node id)
``INSTANCE_IPS``                the addresses it serves on, comma-separated
``POD_PORTS``                   the ports it serves, a JSON list of
                                ``{"name": "http", "containerPort": 8080}``
``LIBMESH_HTTP_PROXY_ADDRESS``  for Envoy: where its HTTP listener binds (``host:port``;
                                ``off``: no such listener)
``LIBMESH_INBOUND``             for Envoy: its inbound ports and the program behind each,
                                ``LISTEN=APP,...`` (``0.0.0.0:15006=127.0.0.1:8080``); each
                                gets a listener applying the workload's PeerAuthentication,
                                RequestAuthentication and AuthorizationPolicy
``LIBMESH_ROUTES``              for Envoy: its ports bound to one service each,
                                ``LISTEN=HOST:PORT,...``
                                (``127.0.0.1:9001=pay.shop.svc.cluster.local:8080``)
``LIBMESH_SDS``                 for Envoy: ``"true"`` when its bootstrap has the ``sds-grpc``
                                cluster (libmesh's SDS server): only then do its clusters use
                                the mesh's mTLS, whose certificates come from there
==============================  =============================================================

``Node.locality`` is the workload's locality. The client's kind comes from
``user_agent_name``: Envoy says ``envoy``, grpcio ``gRPC …``, libmesh ``libmesh``.

A node that declares ``POD_PORTS`` registers itself: while its stream lives it is an endpoint
of every service whose selector matches its labels, as Istio's WorkloadGroup auto-registration
makes a WorkloadEntry of a connecting VM.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from envoy.config.core.v3 import base_pb2
from google.protobuf import json_format

from .._frozen import EMPTY, FrozenMap
from ._snapshot import Locality, Node

__all__ = [
    "HEALTH_INFO_TYPE",
    "NodeError",
    "Registration",
    "node_from_proto",
    "node_to_proto",
]

NAMESPACE = "NAMESPACE"
LABELS = "LABELS"
SERVICE_ACCOUNT = "SERVICE_ACCOUNT"
WORKLOAD_NAME = "WORKLOAD_NAME"
INSTANCE_IPS = "INSTANCE_IPS"
POD_PORTS = "POD_PORTS"
HTTP_PROXY_ADDRESS = "LIBMESH_HTTP_PROXY_ADDRESS"
SDS = "LIBMESH_SDS"
INBOUND = "LIBMESH_INBOUND"
ROUTES = "LIBMESH_ROUTES"
USER_AGENT = "libmesh"
# Istio's: a workload reports its health on its ADS stream as a request of this type, healthy
# without error_detail, unhealthy with it.
HEALTH_INFO_TYPE = "type.googleapis.com/istio.v1.HealthInformation"


@dataclass(frozen=True, slots=True)
class Registration:
    """A workload that asks to be an endpoint while it is connected."""

    name: str
    address: str  # empty: the address its connection comes from
    ports: FrozenMap[str, int]


def node_to_proto(
    node: Node, registration: Registration | None = None, *, version: str = ""
) -> base_pb2.Node:
    """The ``Node`` libmesh sends on its ADS stream."""
    proto = base_pb2.Node(id=node.id, user_agent_name=USER_AGENT, user_agent_version=version)
    metadata: dict[str, Any] = {
        NAMESPACE: node.namespace,
        LABELS: dict(node.labels),
        SERVICE_ACCOUNT: node.service_account,
    }
    if registration is not None:
        metadata[WORKLOAD_NAME] = registration.name
        if registration.address:
            metadata[INSTANCE_IPS] = registration.address
        ports = registration.ports.items()
        metadata[POD_PORTS] = json.dumps(
            [{"name": n, "containerPort": p, "protocol": "TCP"} for n, p in ports]
        )
    proto.metadata.update(metadata)
    proto.locality.region = node.locality.region
    proto.locality.zone = node.locality.zone
    proto.locality.sub_zone = node.locality.subzone
    return proto


class NodeError(ValueError):
    """Node metadata that cannot be read; the message names the key."""


def node_from_proto(proto: base_pb2.Node) -> tuple[Node, Registration | None]:
    """Who is asking, and whether it registers itself. Raises :class:`NodeError` for metadata
    that is present but malformed; missing keys take Istio's defaults."""
    metadata = json_format.MessageToDict(proto.metadata) if proto.HasField("metadata") else {}
    namespace = _string(metadata, NAMESPACE) or "default"
    labels = metadata.get(LABELS) or {}
    if not isinstance(labels, Mapping) or not all(isinstance(v, str) for v in labels.values()):
        raise NodeError(f"node metadata {LABELS} must be a map of strings, not {labels!r}")
    agent = proto.user_agent_name.lower()
    flavor = "grpc" if "grpc" in agent else "envoy" if agent == "envoy" else "libmesh"
    node = Node(
        id=proto.id,
        namespace=namespace,
        labels=FrozenMap(labels) if labels else EMPTY,
        locality=Locality(proto.locality.region, proto.locality.zone, proto.locality.sub_zone),
        service_account=_string(metadata, SERVICE_ACCOUNT) or "default",
        flavor=flavor,
        http_proxy_address=_proxy_address(metadata),
        sds=str(metadata.get(SDS, "")).lower() == "true" if flavor == "envoy" else True,
        inbound=_pairs(metadata, INBOUND, "LISTEN=APP") if flavor == "envoy" else (),
        routes=_pairs(metadata, ROUTES, "LISTEN=HOST:PORT") if flavor == "envoy" else (),
    )
    if flavor == "envoy" and node.http_proxy_address:
        _check_address(node.http_proxy_address, HTTP_PROXY_ADDRESS)
    ports = _ports(metadata)
    if not ports:
        return node, None
    addresses = _string(metadata, INSTANCE_IPS)
    name = _string(metadata, WORKLOAD_NAME) or proto.id
    address = addresses.split(",")[0].strip() if addresses else ""
    return node, Registration(name=name, address=address, ports=ports)


def _string(metadata: Mapping[str, Any], key: str) -> str:
    value = metadata.get(key, "")
    if not isinstance(value, str):
        raise NodeError(f"node metadata {key} must be a string, not {value!r}")
    return value


def _ports(metadata: Mapping[str, Any]) -> FrozenMap[str, int]:
    raw = metadata.get(POD_PORTS)
    if raw is None:
        return EMPTY
    try:
        entries = json.loads(raw) if isinstance(raw, str) else raw
        ports = {}
        for entry in entries:
            number = int(entry["containerPort"])
            if not 1 <= number <= 65535:
                raise ValueError(f"port {number} is not between 1 and 65535")
            ports[str(entry.get("name") or number)] = number
    except (TypeError, ValueError, KeyError) as exc:
        raise NodeError(
            f'node metadata {POD_PORTS} must be a JSON list of {{"name": ..., '
            f'"containerPort": ...}}: {exc}'
        ) from exc
    return FrozenMap(ports)


def _proxy_address(metadata: Mapping[str, Any]) -> str:
    value = _string(metadata, HTTP_PROXY_ADDRESS)
    return "" if value == "off" else value or "127.0.0.1:15001"


def _pairs(metadata: Mapping[str, Any], key: str, form: str) -> tuple[tuple[str, str], ...]:
    """``A=B,C=D`` of two addresses each (``host:port``)."""
    entries = []
    for entry in filter(None, (e.strip() for e in _string(metadata, key).split(","))):
        listen, sep, target = entry.partition("=")
        if not sep:
            raise NodeError(f"node metadata {key} must be {form},..., not {entry!r}")
        _check_address(listen, key)
        _check_address(target, key)
        entries.append((listen, target))
    return tuple(entries)


def _check_address(address: str, key: str) -> None:
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise NodeError(f"node metadata {key}: {address!r} is not host:port")
