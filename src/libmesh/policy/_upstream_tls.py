"""Which TLS a connection to an upstream host uses, read from the cluster as Envoy reads it:
``transport_socket_matches`` against the endpoint's ``envoy.transport_socket_match``
metadata (the first match wins), else the cluster's ``transport_socket``, else plaintext."""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import base_pb2
from envoy.extensions.transport_sockets.tls.v3 import tls_pb2

from ..xds._tls import ROOT_SECRET, SVID_SECRET, TLS_SOCKET

__all__ = ["TlsKind", "UpstreamTls", "UpstreamTlsError", "transport_sockets"]

_TLS_TYPE = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext"
_MESH_SECRETS = (SVID_SECRET, ROOT_SECRET)  # Istio's SDS names: the workload's SVID, the roots


class UpstreamTlsError(ValueError):
    """A transport socket libmesh cannot honour (the cluster is NACKed with this message)."""


class TlsKind(enum.Enum):
    MESH = "ISTIO_MUTUAL"  # the workload's SVID, the mesh's trust bundle
    ORIGINATE = "SIMPLE/MUTUAL"  # TLS to a server outside the mesh, with named files


@dataclass(frozen=True, slots=True)
class UpstreamTls:
    kind: TlsKind
    sni: str = ""
    subject_alt_names: frozenset[str] = frozenset()  # the server must present one of these
    ca_file: str | None = None  # ORIGINATE: None means the system's roots
    cert_file: str | None = None  # ORIGINATE with a client certificate (MUTUAL)
    key_file: str | None = None
    verify: bool = True
    alpn: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class _Match:
    match: Mapping[str, str]
    tls: UpstreamTls | None


class TransportSockets:
    """A cluster's choice of TLS per endpoint."""

    __slots__ = ("_default", "_matches")

    def __init__(self, default: UpstreamTls | None, matches: tuple[_Match, ...]) -> None:
        self._default = default
        self._matches = matches

    @property
    def plaintext(self) -> bool:
        return self._default is None and all(m.tls is None for m in self._matches)

    def for_endpoint(self, metadata: Mapping[str, str]) -> UpstreamTls | None:
        for candidate in self._matches:
            if all(metadata.get(k) == v for k, v in candidate.match.items()):
                return candidate.tls
        return self._default


PLAINTEXT = TransportSockets(None, ())


def transport_sockets(proto: cluster_pb2.Cluster) -> TransportSockets:
    """Read a cluster's transport sockets; raises :class:`UpstreamTlsError`."""
    if not proto.HasField("transport_socket") and not proto.transport_socket_matches:
        return PLAINTEXT
    default = _tls(proto.transport_socket) if proto.HasField("transport_socket") else None
    matches = tuple(
        _Match(
            {k: v for k, v in m.match.items() if isinstance(v, str)},
            _tls(m.transport_socket) if m.HasField("transport_socket") else None,
        )
        for m in proto.transport_socket_matches
    )
    return TransportSockets(default, matches)


_RAW = "envoy.transport_sockets.raw_buffer"
_RAW_TYPE = "type.googleapis.com/envoy.extensions.transport_sockets.raw_buffer.v3.RawBuffer"


def _tls(socket: base_pb2.TransportSocket) -> UpstreamTls | None:
    if socket.name == _RAW or socket.typed_config.type_url == _RAW_TYPE:
        return None
    if socket.name != TLS_SOCKET and socket.typed_config.type_url != _TLS_TYPE:
        # (never a silent plaintext for what may wrap TLS)
        raise UpstreamTlsError(
            f"transport socket {socket.name or socket.typed_config.type_url!r} is not one "
            "libmesh knows (tls, raw_buffer)"
        )
    context = tls_pb2.UpstreamTlsContext()
    if not socket.typed_config.Unpack(context):
        raise UpstreamTlsError(f"transport socket {socket.name}: not an UpstreamTlsContext")
    common = context.common_tls_context
    validation = (
        common.combined_validation_context.default_validation_context
        if common.HasField("combined_validation_context")
        else common.validation_context
    )
    matchers = [m.matcher for m in validation.match_typed_subject_alt_names]
    matchers += list(validation.match_subject_alt_names)
    if any(m.WhichOneof("match_pattern") != "exact" for m in matchers):
        # dropping one would accept any server: refuse the cluster instead
        raise UpstreamTlsError("libmesh matches subject alternative names exactly only")
    sans = frozenset(m.exact for m in matchers)
    sds = [c.name for c in common.tls_certificate_sds_secret_configs]
    providers = common.HasField("tls_certificate_provider_instance")
    if sds or providers:
        unknown = [name for name in sds if name not in _MESH_SECRETS]
        if unknown:
            raise UpstreamTlsError(
                f"SDS secret {unknown[0]!r} is not one libmesh serves (it knows Istio's "
                f"{' and '.join(_MESH_SECRETS)})"
            )
        return UpstreamTls(TlsKind.MESH, context.sni, sans, alpn=("http/1.1",))
    certificate = common.tls_certificates[0] if common.tls_certificates else None
    for source in ([validation.trusted_ca] if validation.HasField("trusted_ca") else []) + (
        [certificate.certificate_chain, certificate.private_key] if certificate else []
    ):
        if source.WhichOneof("specifier") not in ("filename", None):
            raise UpstreamTlsError(
                "TLS files must be named by filename (inline bytes and environment variables "
                "are not supported)"
            )
    verify = validation.HasField("trusted_ca") or validation.HasField("system_root_certs")
    return UpstreamTls(
        TlsKind.ORIGINATE,
        context.sni,
        sans,
        ca_file=validation.trusted_ca.filename or None,
        cert_file=certificate.certificate_chain.filename or None if certificate else None,
        key_file=certificate.private_key.filename or None if certificate else None,
        verify=verify,
        alpn=tuple(common.alpn_protocols) or ("http/1.1",),
    )
