"""The inbound side of a workload as Istio builds it: the ``virtualInbound`` listener, whose
filter chains say which transports a port accepts (PeerAuthentication) and whose HTTP filters
say who may call (AuthorizationPolicy as RBAC).

PeerAuthentication is resolved as Istio resolves it: the workload's own policy (selector
matching its labels) over its namespace's policy (no selector) over the mesh's (root
namespace, no selector); ``UNSET`` inherits from the next level; the default is PERMISSIVE;
``portLevelMtls`` applies only in a policy with a selector. Per port and mode, the chains are:

- STRICT: one chain matching ``transport_protocol: tls`` (mutual TLS required);
- PERMISSIVE: a ``tls`` chain and a ``raw_buffer`` (plaintext) chain;
- DISABLE: one ``raw_buffer`` chain.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.listener.v3 import listener_components_pb2, listener_pb2
from envoy.extensions.filters.http.router.v3 import router_pb2
from envoy.extensions.filters.listener.tls_inspector.v3 import tls_inspector_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from envoy.extensions.transport_sockets.tls.v3 import tls_pb2
from google.protobuf import any_pb2

from ..config import ConfigSet, Resource, labels_match
from ..config._security import MutualTLSMode, PeerAuthentication
from ._tls import ROOT_SECRET, SVID_SECRET, TLS_SOCKET, sds_secret

__all__ = [
    "GRPC_SERVER_PREFIX",
    "GRPC_SERVER_TEMPLATE",
    "INBOUND_LISTENER",
    "envoy_inbound",
    "grpc_server_listener",
    "grpc_server_listener_for",
    "inbound_listener",
    "peer_authentication_modes",
]

INBOUND_LISTENER = "virtualInbound"
_HCM = "envoy.filters.network.http_connection_manager"


@dataclass(frozen=True, slots=True)
class InboundModes:
    """The resolved mode for the workload, and per port where a port overrides it."""

    default: MutualTLSMode
    ports: Mapping[int, MutualTLSMode]


def peer_authentication_modes(
    config: ConfigSet, namespace: str, labels: Mapping[str, str], root_namespace: str
) -> InboundModes:
    """Which PeerAuthentication applies to a workload, per port (Istio's precedence)."""
    mesh: Resource[PeerAuthentication] | None = None
    space: Resource[PeerAuthentication] | None = None
    workload: Resource[PeerAuthentication] | None = None
    for resource in config.of_kind("PeerAuthentication"):
        spec: PeerAuthentication = resource.spec
        selector = spec.selector.match_labels if spec.selector is not None else None
        if selector:
            if resource.namespace == namespace and labels_match(selector, labels):
                workload = workload or resource  # the first one read wins, as the oldest does
        elif resource.namespace == namespace:
            space = space or resource
        elif resource.namespace == root_namespace:
            mesh = mesh or resource
    mode = MutualTLSMode.PERMISSIVE
    for level in (mesh, space, workload):
        given = _mode(level.spec) if level is not None else None
        if given is not None:
            mode = given
    ports: dict[int, MutualTLSMode] = {}
    if workload is not None:
        for port, mtls in workload.spec.port_level_mtls.items():
            if mtls.mode is not None and mtls.mode is not MutualTLSMode.UNSET:
                ports[int(port)] = mtls.mode
    return InboundModes(mode, ports)


def _mode(spec: PeerAuthentication) -> MutualTLSMode | None:
    mode = spec.mtls.mode if spec.mtls is not None else None
    return None if mode is None or mode is MutualTLSMode.UNSET else mode


def inbound_listener(
    modes: InboundModes, http_filters: Sequence[hcm_pb2.HttpFilter] = ()
) -> listener_pb2.Listener:
    """The ``virtualInbound`` listener: a filter chain per port override and transport, then
    the workload-wide ones; each runs ``http_filters`` (RBAC, …) before the router."""
    listener = listener_pb2.Listener(
        name=INBOUND_LISTENER,
        traffic_direction=2,  # core.v3.TrafficDirection.INBOUND
    )
    listener.address.socket_address.address = "0.0.0.0"
    listener.address.socket_address.port_value = 15006  # Istio's inbound capture port
    for port, mode in sorted(modes.ports.items()):
        _chains(listener, mode, port, http_filters)
    _chains(listener, modes.default, None, http_filters)
    return listener


_TRANSPORTS = {
    MutualTLSMode.STRICT: ("tls",),
    MutualTLSMode.PERMISSIVE: ("tls", "raw_buffer"),
    MutualTLSMode.DISABLE: ("raw_buffer",),
}


def _chains(
    listener: listener_pb2.Listener,
    mode: MutualTLSMode,
    port: int | None,
    http_filters: Sequence[hcm_pb2.HttpFilter],
) -> None:
    for transport in _TRANSPORTS[mode]:
        chain = listener.filter_chains.add()
        chain.name = f"{port or 'default'}-{transport}-{mode.value.lower()}"
        if port is not None:
            chain.filter_chain_match.destination_port.value = port
        chain.filter_chain_match.transport_protocol = transport
        if transport == "tls":
            chain.transport_socket.name = TLS_SOCKET
            chain.transport_socket.typed_config.Pack(_downstream_mtls())
        chain.filters.append(_connection_manager(http_filters))


def _downstream_mtls() -> tls_pb2.DownstreamTlsContext:
    context = tls_pb2.DownstreamTlsContext()
    context.require_client_certificate.value = True
    common = context.common_tls_context
    for config, name in (
        (common.tls_certificate_sds_secret_configs.add(), SVID_SECRET),
        (common.validation_context_sds_secret_config, ROOT_SECRET),
    ):
        sds_secret(config, name)
    common.alpn_protocols.extend(("h2", "http/1.1"))
    return context


def _connection_manager(
    http_filters: Sequence[hcm_pb2.HttpFilter],
    cluster: str = "inbound|http|0",
    stat_prefix: str = "inbound_0.0.0.0_15006",
    *,
    forwarding: bool = False,
) -> listener_components_pb2.Filter:
    manager = hcm_pb2.HttpConnectionManager(stat_prefix=stat_prefix)
    manager.route_config.name = cluster
    host = manager.route_config.virtual_hosts.add(name=cluster, domains=["*"])
    route = host.routes.add()
    route.match.prefix = "/"
    route.route.cluster = cluster
    if forwarding:  # a real Envoy's, forwarding to the program
        route.route.timeout.SetInParent()  # no limit: the caller's side times the request
        manager.upgrade_configs.add(upgrade_type="websocket")
        # the caller's verified identity for the program, never one the caller wrote (as
        # Istio's sidecars): By=<this workload>;Hash=...;URI=<the caller's SPIFFE ID>
        manager.forward_client_cert_details = hcm_pb2.HttpConnectionManager.SANITIZE_SET
        manager.set_current_client_cert_details.uri = True
    manager.http_filters.extend(http_filters)
    manager.http_filters.add(name="envoy.filters.http.router").typed_config.Pack(
        router_pb2.Router()
    )
    packed = any_pb2.Any()
    packed.Pack(manager)
    return listener_components_pb2.Filter(name=_HCM, typed_config=packed)


# -- Envoy's inbound ports (libmesh-proxy --engine envoy) ---------------------------------------


def envoy_inbound(
    listen: str,
    app: str,
    mode: MutualTLSMode,
    http_filters: Sequence[hcm_pb2.HttpFilter],
    *,
    certificates: bool,
) -> tuple[listener_pb2.Listener, cluster_pb2.Cluster]:
    """A real Envoy's inbound port at ``listen`` in front of the program at ``app``: the port's
    PeerAuthentication ``mode`` as filter chains told apart by the TLS inspector, the
    ``http_filters`` (jwt_authn, RBAC) on each, and a static cluster to the program. Without
    ``certificates`` (no SDS beside this Envoy) no TLS chain can be served: STRICT then
    accepts nobody, which is what STRICT asks for rather than plaintext."""
    host, _, port = listen.rpartition(":")
    app_host, _, app_port = app.rpartition(":")
    cluster_name = f"inbound|{port}||"
    listener = listener_pb2.Listener(name=f"inbound_{host}_{port}", traffic_direction=2)
    listener.address.socket_address.address = host.strip("[]")
    listener.address.socket_address.port_value = int(port)
    inspector = listener.listener_filters.add(name="envoy.filters.listener.tls_inspector")
    inspector.typed_config.Pack(tls_inspector_pb2.TlsInspector())
    for transport in _TRANSPORTS[mode]:
        if transport == "tls" and not certificates:
            continue
        chain = listener.filter_chains.add(name=f"{port}-{transport}-{mode.value.lower()}")
        chain.filter_chain_match.transport_protocol = transport
        if transport == "tls":
            chain.transport_socket.name = TLS_SOCKET
            chain.transport_socket.typed_config.Pack(_downstream_mtls())
        chain.filters.append(
            _connection_manager(
                http_filters, cluster_name, f"inbound_{host}_{port}", forwarding=True
            )
        )
    cluster = cluster_pb2.Cluster(name=cluster_name, type=cluster_pb2.Cluster.STATIC)
    cluster.connect_timeout.FromSeconds(10)
    cluster.load_assignment.cluster_name = cluster_name
    endpoint = cluster.load_assignment.endpoints.add().lb_endpoints.add().endpoint
    endpoint.address.socket_address.address = app_host.strip("[]")
    endpoint.address.socket_address.port_value = int(app_port)
    return listener, cluster


# -- grpcio's xDS servers (gRFC A36, A41) -------------------------------------------------------

GRPC_SERVER_TEMPLATE = "grpc/server?xds.resource.listening_address=%s"  # gRPC's and Istio's
GRPC_SERVER_PREFIX = GRPC_SERVER_TEMPLATE.removesuffix("%s")


def grpc_server_listener(
    modes: InboundModes, http_filters: Sequence[hcm_pb2.HttpFilter] = ()
) -> listener_pb2.Listener:
    """What a grpcio xDS server (``grpc.server(..., xds=True)``) of this workload serves: the
    listener named by gRPC's template, for any address (meshd fills in the one asked for).
    grpcio cannot tell TLS from plaintext on one port, so, as Istio's proxyless servers,
    STRICT is mutual TLS (certificate provider ``default``) and PERMISSIVE or DISABLE are
    plaintext; the RBAC filters are grpcio's own to enforce (gRFC A41)."""
    listener = listener_pb2.Listener(name=GRPC_SERVER_TEMPLATE, traffic_direction=2)
    listener.address.socket_address.address = "0.0.0.0"
    chain = listener.filter_chains.add(name="inbound-grpc")
    if modes.default is MutualTLSMode.STRICT:
        context = tls_pb2.DownstreamTlsContext()
        context.require_client_certificate.value = True
        common = context.common_tls_context
        common.tls_certificate_provider_instance.instance_name = SVID_SECRET
        common.tls_certificate_provider_instance.certificate_name = SVID_SECRET
        validation = common.validation_context.ca_certificate_provider_instance
        validation.instance_name = SVID_SECRET
        validation.certificate_name = ROOT_SECRET
        chain.transport_socket.name = TLS_SOCKET
        chain.transport_socket.typed_config.Pack(context)
    manager = hcm_pb2.HttpConnectionManager(stat_prefix="inbound_grpc")
    manager.route_config.name = "inbound|grpc|0"
    host = manager.route_config.virtual_hosts.add(name="inbound|grpc|0", domains=["*"])
    route = host.routes.add()
    route.match.prefix = "/"
    route.non_forwarding_action.SetInParent()  # a server's route: the handler answers
    manager.http_filters.extend(http_filters)
    manager.http_filters.add(name="envoy.filters.http.router").typed_config.Pack(
        router_pb2.Router()
    )
    chain.filters.add(name=_HCM).typed_config.Pack(manager)
    return listener


def grpc_server_listener_for(
    template: listener_pb2.Listener, name: str
) -> listener_pb2.Listener | None:
    """The template for the address a grpcio server asked for in ``name``
    (``grpc/server?xds.resource.listening_address=127.0.0.1:50051``), or ``None``."""
    if not name.startswith(GRPC_SERVER_PREFIX):
        return None
    host, _, port = name[len(GRPC_SERVER_PREFIX) :].rpartition(":")
    if not port.isdigit():
        return None
    listener = listener_pb2.Listener()
    listener.CopyFrom(template)
    listener.name = name
    listener.address.socket_address.address = host.strip("[]") or "0.0.0.0"
    listener.address.socket_address.port_value = int(port)
    return listener
