"""Who is at each end of a request, as Istio's metrics label it, and how the two ends tell
each other: Istio's HTTP metadata exchange.

An Istio sidecar sends ``x-envoy-peer-metadata-id`` and ``x-envoy-peer-metadata`` (a base64
``google.protobuf.Struct`` of the node's metadata: ``NAME``, ``NAMESPACE``, ``LABELS``,
``WORKLOAD_NAME``, ``SERVICE_ACCOUNT``, ``CLUSTER_ID``) with each request to a mesh service,
and the server answers with its own in the response. libmesh sends and reads the second (the
one Istio reads; its metadata cut to what metrics use), so a libmesh client and a libmesh server
(or an Istio sidecar on either side) label ``source_*`` and ``destination_*`` alike without
asking anyone.
"""

from __future__ import annotations

import base64
import binascii
import functools
import os
from collections.abc import Mapping
from dataclasses import dataclass, field

from google.protobuf import struct_pb2
from google.protobuf.message import DecodeError

from ..xds import Node

__all__ = [
    "GRPC_PEER_METADATA",
    "PEER_METADATA",
    "UNKNOWN",
    "Peer",
    "decode_peer",
    "encode_peer",
    "workload_name",
]

PEER_METADATA = "x-envoy-peer-metadata"
# grpc-core drops x-envoy-peer-metadata from call metadata (it reserves the name), so gRPC calls
# carry the same value under libmesh's own names.
GRPC_PEER_METADATA = "x-libmesh-peer-metadata"
UNKNOWN = "unknown"
# Istio's canonical-service labels, and the Kubernetes ones Istio falls back on.
_SERVICE_LABELS = ("service.istio.io/canonical-name", "app.kubernetes.io/name", "app")
_REVISION_LABELS = ("service.istio.io/canonical-revision", "app.kubernetes.io/version", "version")


@dataclass(frozen=True, slots=True)
class Peer:
    """One end of a request, in the words of Istio's metric labels."""

    workload: str = UNKNOWN
    namespace: str = UNKNOWN
    principal: str = UNKNOWN
    app: str = UNKNOWN
    version: str = UNKNOWN
    canonical_service: str = UNKNOWN
    canonical_revision: str = "latest"
    cluster: str = UNKNOWN
    # Peers key the metrics' series on every request: hash once.
    _hash: int = field(init=False, repr=False, compare=False, default=0)

    def __post_init__(self) -> None:
        object.__setattr__(
            self,
            "_hash",
            hash((self.workload, self.namespace, self.principal, self.app, self.version,
                  self.canonical_service, self.canonical_revision, self.cluster)),
        )  # fmt: skip

    def __hash__(self) -> int:
        return self._hash

    @classmethod
    def from_labels(
        cls,
        labels: Mapping[str, str],
        *,
        workload: str = "",
        namespace: str = "",
        principal: str = "",
        cluster: str = "",
    ) -> Peer:
        service = next((labels[k] for k in _SERVICE_LABELS if labels.get(k)), "")
        revision = next((labels[k] for k in _REVISION_LABELS if labels.get(k)), "")
        return cls(
            workload=workload or UNKNOWN,
            namespace=namespace or UNKNOWN,
            principal=principal or UNKNOWN,
            app=labels.get("app") or UNKNOWN,
            version=labels.get("version") or UNKNOWN,
            canonical_service=service or workload or UNKNOWN,
            canonical_revision=revision or "latest",
            cluster=cluster or UNKNOWN,
        )

    @classmethod
    def of_node(cls, node: Node, principal: str = "") -> Peer:
        return cls.from_labels(
            node.labels,
            workload=workload_name(node),
            namespace=node.namespace,
            principal=principal,
            cluster=os.environ.get("LIBMESH_CLUSTER_ID", "Kubernetes"),
        )


def workload_name(node: Node) -> str:
    """What Istio calls the workload: stable across the processes that run it (its
    Deployment's name under Kubernetes). ``LIBMESH_WORKLOAD_NAME``, else ``app-version`` from
    the labels, else the app; never the per-process node id, which would make every process a
    new time series."""
    explicit = os.environ.get("LIBMESH_WORKLOAD_NAME")
    if explicit:
        return explicit
    app = node.labels.get("app")
    if not app:
        return UNKNOWN
    version = node.labels.get("version")
    return f"{app}-{version}" if version else app


def encode_peer(node: Node, workload: str, cluster: str) -> str:
    """The metadata-exchange header's value that describes ``node``, as an Istio sidecar sends
    it."""
    metadata = struct_pb2.Struct()
    # Only what the other side's metrics use: the header goes with every request, and
    # every byte of it is parsed and validated by both HTTP stacks.
    metadata.update({"NAMESPACE": node.namespace, "WORKLOAD_NAME": workload})
    if cluster != "Kubernetes":
        metadata["CLUSTER_ID"] = cluster
    metadata["LABELS"] = {
        k: v
        for k, v in node.labels.items()
        if k in ("app", "version", *_SERVICE_LABELS, *_REVISION_LABELS)
    }
    return base64.b64encode(metadata.SerializeToString(deterministic=True)).decode("ascii")


@functools.lru_cache(maxsize=256)
def decode_peer(value: str, principal: str = "") -> Peer | None:
    """The peer a metadata-exchange header describes; ``None`` when it cannot be read (a
    header from elsewhere must never fail a request). Cached: a peer sends the same value with
    every request."""
    try:
        metadata = struct_pb2.Struct.FromString(base64.b64decode(value, validate=True))
    except (binascii.Error, DecodeError, ValueError):
        return None
    fields = metadata.fields

    def text(key: str) -> str:
        field = fields.get(key)
        return field.string_value if field is not None else ""

    labels_field = fields.get("LABELS")
    labels = (
        {k: v.string_value for k, v in labels_field.struct_value.fields.items()}
        if labels_field is not None
        else {}
    )
    return Peer.from_labels(
        labels,
        workload=text("WORKLOAD_NAME") or text("NAME"),
        namespace=text("NAMESPACE"),
        principal=principal,
        cluster=text("CLUSTER_ID") or "Kubernetes",
    )
