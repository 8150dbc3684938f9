"""Upstream TLS as Istio configures it in a cluster: DestinationRule ``tls`` modes, and
auto mTLS for mesh services.

- ``ISTIO_MUTUAL``: the workload's SVID and the mesh's roots, which Istio names as SDS secrets
  ``default`` and ``ROOTCA`` (grpcio reads them from certificate provider instances instead,
  gRFC A29); the server must present one of the service's SPIFFE IDs.
- ``SIMPLE`` / ``MUTUAL``: TLS origination with the files the DestinationRule names.
- ``DISABLE``: plaintext.
- No ``tls`` at all, for a mesh-internal service: auto mTLS. Envoy's transport socket matches
  pick mTLS for endpoints labelled ``security.istio.io/tlsMode: istio`` (workloads that
  terminate the mesh's mTLS) and plaintext for the others, as Istio does.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import base_pb2, config_source_pb2
from envoy.extensions.transport_sockets.raw_buffer.v3 import raw_buffer_pb2
from envoy.extensions.transport_sockets.tls.v3 import common_pb2, tls_pb2
from envoy.type.matcher.v3 import string_pb2
from google.protobuf import any_pb2, struct_pb2

from ..config import RegistryService, Workload
from ..config._networking import ClientTLSSettings, TLSMode

__all__ = [
    "ISTIO_MUTUAL_ALPN",
    "ROOT_SECRET",
    "SDS_CLUSTER",
    "SVID_SECRET",
    "TLS_MODE_LABEL",
    "TLS_SOCKET",
    "TRANSPORT_SOCKET_MATCH",
    "apply_upstream_tls",
    "expected_identities",
    "sds_secret",
]

TLS_MODE_LABEL = "security.istio.io/tlsMode"
TRANSPORT_SOCKET_MATCH = "envoy.transport_socket_match"
TLS_SOCKET = "envoy.transport_sockets.tls"
SVID_SECRET = "default"  # Istio's SDS name for the workload's certificate and key
ROOT_SECRET = "ROOTCA"  # ... and for the mesh's trust bundle
ISTIO_MUTUAL_ALPN = ("istio-peer-exchange", "istio")
SDS_CLUSTER = "sds-grpc"  # the bootstrap's cluster for the local SDS server, as in Istio


def expected_identities(
    service: RegistryService, workloads: Sequence[Workload], trust_domain: str
) -> tuple[str, ...]:
    """The SPIFFE IDs the service's servers may present: its ServiceEntry's
    ``subjectAltNames``, and the identity of each workload's service account (Istio's
    ``ServiceAccounts`` of a service)."""
    names = dict.fromkeys(service.subject_alt_names)
    for workload in workloads:
        if workload.service_account:
            names.setdefault(
                f"spiffe://{trust_domain}/ns/{workload.namespace}/sa/{workload.service_account}"
            )
    return tuple(sorted(names))


def apply_upstream_tls(
    cluster: cluster_pb2.Cluster,
    tls: ClientTLSSettings | None,
    *,
    sans: Sequence[str],
    sni: str,
    auto: bool,
    flavor: str,
    certificates: bool = True,
) -> None:
    """Set ``cluster``'s transport socket(s) from the DestinationRule's ``tls`` (the port's or
    subset's, already merged); ``auto``: the service may use auto mTLS; ``certificates``: the
    client can get the mesh's certificates (an Envoy without an SDS server cannot: it is given
    no mesh mTLS, rather than clusters that wait for secrets that never come)."""
    mode = tls.mode if tls is not None else None
    if mode is TLSMode.DISABLE:
        return
    if not certificates and (mode is TLSMode.ISTIO_MUTUAL or mode is None):
        return
    if mode is TLSMode.ISTIO_MUTUAL:
        names = tls.subject_alt_names if tls is not None and tls.subject_alt_names else sans
        cluster.transport_socket.CopyFrom(
            _socket(_istio_mutual(names, tls.sni if tls and tls.sni else sni, flavor))
        )
        return
    if mode in (TLSMode.SIMPLE, TLSMode.MUTUAL) and tls is not None:
        cluster.transport_socket.CopyFrom(_socket(_originate(tls, mode)))
        return
    if mode is None and auto and flavor != "grpc":
        # grpcio reads no transport socket matches: it gets mTLS only when a DestinationRule
        # asks for ISTIO_MUTUAL (as Istio's proxyless gRPC does).
        secure = cluster.transport_socket_matches.add(name="tlsMode-istio")
        secure.match.update({"tlsMode": "istio"})
        secure.transport_socket.CopyFrom(_socket(_istio_mutual(sans, sni, flavor)))
        plain = cluster.transport_socket_matches.add(name="tlsMode-disabled")
        plain.match.CopyFrom(struct_pb2.Struct())
        plain.transport_socket.name = "envoy.transport_sockets.raw_buffer"
        plain.transport_socket.typed_config.Pack(raw_buffer_pb2.RawBuffer())


def _socket(context: tls_pb2.UpstreamTlsContext) -> base_pb2.TransportSocket:
    packed = any_pb2.Any()
    packed.Pack(context)
    return base_pb2.TransportSocket(name=TLS_SOCKET, typed_config=packed)


def _san_matchers(names: Sequence[str]) -> list[common_pb2.SubjectAltNameMatcher]:
    return [
        common_pb2.SubjectAltNameMatcher(
            san_type=(
                common_pb2.SubjectAltNameMatcher.URI
                if "://" in name
                else common_pb2.SubjectAltNameMatcher.DNS
            ),
            matcher=string_pb2.StringMatcher(exact=name),
        )
        for name in names
    ]


def _istio_mutual(sans: Sequence[str], sni: str, flavor: str) -> tls_pb2.UpstreamTlsContext:
    context = tls_pb2.UpstreamTlsContext(sni=sni)
    common = context.common_tls_context
    validation = common.combined_validation_context
    if flavor == "grpc":  # grpcio reads the untyped matchers (gRFC A29)
        validation.default_validation_context.match_subject_alt_names.extend(
            string_pb2.StringMatcher(exact=name) for name in sans
        )
        common.tls_certificate_provider_instance.instance_name = SVID_SECRET
        common.tls_certificate_provider_instance.certificate_name = SVID_SECRET
        provider = validation.default_validation_context.ca_certificate_provider_instance
        provider.instance_name = SVID_SECRET
        provider.certificate_name = ROOT_SECRET
        return context
    validation.default_validation_context.match_typed_subject_alt_names.extend(_san_matchers(sans))
    common.alpn_protocols.extend(ISTIO_MUTUAL_ALPN)
    for config, name in (
        (common.tls_certificate_sds_secret_configs.add(), SVID_SECRET),
        (validation.validation_context_sds_secret_config, ROOT_SECRET),
    ):
        sds_secret(config, name)
    return context


def sds_secret(config: Any, name: str) -> None:
    """Name an SDS secret as Istio's proxies find it: from the node agent, cluster
    ``sds-grpc`` of the bootstrap (libmesh's ``SdsServer``; libmesh itself reads the name)."""
    config.name = name
    source = config.sds_config
    source.resource_api_version = config_source_pb2.V3
    api = source.api_config_source
    api.api_type = config_source_pb2.ApiConfigSource.GRPC
    api.transport_api_version = config_source_pb2.V3
    api.set_node_on_first_message_only = True
    api.grpc_services.add().envoy_grpc.cluster_name = SDS_CLUSTER


def _originate(tls: ClientTLSSettings, mode: TLSMode) -> tls_pb2.UpstreamTlsContext:
    context = tls_pb2.UpstreamTlsContext(sni=tls.sni or "")
    common = context.common_tls_context
    validation = common.validation_context
    if not tls.insecure_skip_verify:
        if tls.ca_certificates:
            validation.trusted_ca.filename = tls.ca_certificates
        else:  # no CA named: the system's roots, as Istio does
            validation.system_root_certs.SetInParent()
        validation.match_typed_subject_alt_names.extend(_san_matchers(tls.subject_alt_names))
    if mode is TLSMode.MUTUAL:
        certificate = common.tls_certificates.add()
        if tls.client_certificate:
            certificate.certificate_chain.filename = tls.client_certificate
        if tls.private_key:
            certificate.private_key.filename = tls.private_key
    return context
