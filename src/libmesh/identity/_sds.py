"""The workload's SVID and trust bundle for a local Envoy, over SDS (Envoy's Secret Discovery
Service), as Istio's node agent serves them: the secret ``default`` is the certificate chain and
private key, ``ROOTCA`` the trust bundle. meshd's clusters for Envoy name these secrets with
an SDS source of cluster ``sds-grpc`` (Istio's name), which the Envoy bootstrap points here.

Serve it on a Unix socket in a private directory (``unix:/run/libmesh/sds.sock``): the private
key crosses it. Each rotation is pushed to every stream at once; Envoy uses the new certificate
for new connections.
"""

from __future__ import annotations

import hashlib
import logging
import queue
import threading
from collections.abc import Iterator
from concurrent import futures
from typing import Any

import grpc
from cryptography.hazmat.primitives import serialization
from envoy.extensions.transport_sockets.tls.v3 import secret_pb2
from envoy.service.discovery.v3 import discovery_pb2
from envoy.service.secret.v3 import sds_pb2_grpc
from google.protobuf import any_pb2

from ..xds._tls import ROOT_SECRET, SVID_SECRET
from ._svid import Svid
from ._tls import IdentitySource

__all__ = ["ROOT_SECRET", "SECRET_TYPE", "SVID_SECRET", "SdsServer"]

logger = logging.getLogger("libmesh")

SECRET_TYPE = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret"
_WAKE = object()


class SdsServer(sds_pb2_grpc.SecretDiscoveryServiceServicer):  # type: ignore[misc]
    """Serves ``identity``'s secrets at ``address`` (``unix:PATH`` or ``HOST:PORT``)."""

    def __init__(self, identity: Any, address: str) -> None:
        if not address.startswith("unix:"):
            raise ValueError(
                f"SDS hands out the workload's private key: serve it on a Unix socket in a "
                f"private directory (unix:/run/libmesh/sds.sock), not on {address!r}"
            )
        self._identity: IdentitySource = identity
        self._streams: set[queue.Queue[object]] = set()
        self._lock = threading.Lock()
        # a stream holds a thread for its life: room for many Envoy subscriptions
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=64))
        sds_pb2_grpc.add_SecretDiscoveryServiceServicer_to_server(self, self._server)
        self.port = self._server.add_insecure_port(address)
        self.address = address
        if hasattr(identity, "on_rotate"):
            identity.on_rotate(self._rotated)

    def start(self) -> SdsServer:
        self._server.start()
        return self

    def close(self) -> None:
        self._server.stop(grace=None)
        with self._lock:
            streams, self._streams = list(self._streams), set()
        for stream in streams:
            stream.put(None)

    def _rotated(self, svid: Svid) -> None:
        with self._lock:
            streams = list(self._streams)
        for stream in streams:
            stream.put(_WAKE)

    # what is served ---------------------------------------------------------------------------

    def _secrets(self) -> tuple[str, dict[str, secret_pb2.Secret]]:
        svid = self._identity.current()
        roots = b"".join(c.public_bytes(serialization.Encoding.PEM) for c in self._identity.bundle)
        secrets = {}
        if svid is not None:
            secret = secret_pb2.Secret(name=SVID_SECRET)
            secret.tls_certificate.certificate_chain.inline_bytes = svid.chain_pem()
            secret.tls_certificate.private_key.inline_bytes = svid.key_pem()
            secrets[SVID_SECRET] = secret
        if roots:
            secret = secret_pb2.Secret(name=ROOT_SECRET)
            secret.validation_context.trusted_ca.inline_bytes = roots
            secrets[ROOT_SECRET] = secret
        serial = str(svid.leaf.serial_number) if svid is not None else ""
        version = hashlib.sha256(serial.encode() + roots).hexdigest()[:16]
        return version, secrets

    def _response(
        self, names: list[str], version: str, secrets: dict[str, secret_pb2.Secret], nonce: int
    ) -> discovery_pb2.DiscoveryResponse:
        response = discovery_pb2.DiscoveryResponse(
            version_info=version, type_url=SECRET_TYPE, nonce=str(nonce)
        )
        for name in names or list(secrets):
            if name in secrets:
                packed = any_pb2.Any()
                packed.Pack(secrets[name])
                response.resources.append(packed)
        return response

    # the protocol -----------------------------------------------------------------------------

    def StreamSecrets(
        self, request_iterator: Iterator[discovery_pb2.DiscoveryRequest], context: Any
    ) -> Iterator[discovery_pb2.DiscoveryResponse]:
        inbox: queue.Queue[object] = queue.Queue()

        def read() -> None:
            try:
                for request in request_iterator:
                    inbox.put(request)
            except grpc.RpcError:
                pass
            inbox.put(None)

        threading.Thread(target=read, name="libmesh-sds-reader", daemon=True).start()
        with self._lock:
            self._streams.add(inbox)
        names: list[str] = []
        sent = ""
        nonce = 0
        try:
            while True:
                item = inbox.get()
                if item is None:
                    return
                if isinstance(item, discovery_pb2.DiscoveryRequest):
                    if item.HasField("error_detail"):
                        logger.warning(
                            "libmesh: Envoy refused SDS secrets: %s", item.error_detail.message
                        )
                    requested = list(item.resource_names)
                    if requested != names:
                        names, sent = requested, ""  # a new subscription: answer it
                version, secrets = self._secrets()
                if version == sent or not secrets:
                    continue
                nonce += 1
                sent = version
                yield self._response(names, version, secrets, nonce)
        finally:
            with self._lock:
                self._streams.discard(inbox)

    def FetchSecrets(
        self, request: discovery_pb2.DiscoveryRequest, context: Any
    ) -> discovery_pb2.DiscoveryResponse:
        version, secrets = self._secrets()
        return self._response(list(request.resource_names), version, secrets, 0)
