"""TLS for the mesh: contexts that present the workload's SVID and trust the mesh's bundle, and
the check of a peer's SPIFFE ID after the handshake.

OpenSSL verifies the chain (signatures up to a root of the trust bundle, validity dates);
what X.509 has no notion of — that the peer is a workload, and the expected one — is checked
here on the leaf, as Envoy does with ``match_subject_alt_names``. Host names are never checked
for mesh traffic: an SVID names a workload, not a host.

The private key stays in the process: ``ssl`` loads certificates only from files, so the SVID
is handed to OpenSSL through an in-memory file (``memfd``) on Linux, and a private temporary
file, removed at once, elsewhere.
"""

from __future__ import annotations

import contextlib
import functools
import os
import ssl
import tempfile
import threading
from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from ._spiffe import SpiffeId
from ._svid import Svid, SvidError, certificate_spiffe_id

__all__ = [
    "IdentitySource",
    "PeerError",
    "TlsContexts",
    "check_peer",
    "client_context",
    "grpc_server_credentials",
    "peer_identity",
    "principal_of_pem",
    "server_context",
]


class PeerError(ssl.SSLError):
    """The peer completed a TLS handshake but is not who it must be (wrong SPIFFE ID, not a
    workload certificate); the message names what it presented and what was expected."""


class IdentitySource(Protocol):
    """Where the workload's SVID and the trust bundle come from (a :class:`WorkloadIdentity`)."""

    def current(self) -> Svid | None: ...

    @property
    def bundle(self) -> list[x509.Certificate]: ...


@contextlib.contextmanager
def _in_memory_file(data: bytes) -> Iterator[str]:
    """A path whose content is ``data``, readable only by this process, gone on exit."""
    if hasattr(os, "memfd_create"):
        descriptor = os.memfd_create("libmesh-svid", 0)
        try:
            os.write(descriptor, data)
            yield f"/proc/self/fd/{descriptor}"
        finally:
            os.close(descriptor)
        return
    descriptor, path = tempfile.mkstemp(prefix="libmesh-svid-")  # pragma: no cover - not Linux
    try:  # pragma: no cover
        with os.fdopen(descriptor, "wb") as file:
            file.write(data)
        yield path
    finally:  # pragma: no cover
        os.unlink(path)


def _pem(certificates: Sequence[x509.Certificate]) -> str:
    return "".join(c.public_bytes(serialization.Encoding.PEM).decode() for c in certificates)


def _present(context: ssl.SSLContext, svid: Svid) -> None:
    with _in_memory_file(svid.chain_pem() + svid.key_pem()) as path:
        context.load_cert_chain(path)


def client_context(
    svid: Svid | None,
    bundle: Sequence[x509.Certificate],
    *,
    alpn: Sequence[str] = ("http/1.1",),
) -> ssl.SSLContext:
    """A client context for mesh traffic (ISTIO_MUTUAL): presents ``svid`` (when there is
    one) and trusts only ``bundle``; the server's SPIFFE ID is checked by :func:`check_peer`."""
    if not bundle:
        raise ssl.SSLError("no trust bundle yet: the mesh's CA has not answered")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.check_hostname = False
    context.verify_mode = ssl.CERT_REQUIRED
    context.load_verify_locations(cadata=_pem(bundle))
    if svid is not None:
        _present(context, svid)
    if alpn:
        context.set_alpn_protocols(list(alpn))
    return context


def server_context(
    svid: Svid,
    bundle: Sequence[x509.Certificate],
    *,
    alpn: Sequence[str] = ("h2", "http/1.1"),
) -> ssl.SSLContext:
    """A server context for mesh traffic: presents ``svid`` and requires a client certificate
    chained to ``bundle`` (mutual TLS; the client's SPIFFE ID is read with
    :func:`peer_identity`)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.verify_mode = ssl.CERT_REQUIRED
    context.load_verify_locations(cadata=_pem(bundle))
    _present(context, svid)
    if alpn:
        context.set_alpn_protocols(list(alpn))
    return context


def peer_identity(der: bytes | None) -> SpiffeId:
    """The SPIFFE ID of a peer's (already chain-verified) leaf certificate, in DER; raises
    :class:`PeerError` when it is not an X509-SVID."""
    if not der:
        raise PeerError("the peer presented no certificate")
    try:
        leaf = x509.load_der_x509_certificate(der)
        spiffe_id = certificate_spiffe_id(leaf)
    except (ValueError, SvidError) as exc:
        raise PeerError(f"the peer's certificate is not an X509-SVID: {exc}") from exc
    constraints = _extension(leaf, x509.BasicConstraints)
    if constraints is not None and constraints.ca:
        raise PeerError(f"the peer's certificate for {spiffe_id} is a CA certificate")
    return spiffe_id


@functools.lru_cache(maxsize=1024)
def principal_of_pem(pem: str) -> str:
    """The SPIFFE ID (as a string) of a client certificate a server passed on in PEM (the ASGI
    ``tls`` extension's ``client_cert_chain[0]``, WSGI's ``SSL_CLIENT_CERT``); ``""`` when it
    is not an X509-SVID. Cached: a connection's requests all carry the same certificate."""
    try:
        return str(peer_identity(ssl.PEM_cert_to_DER_cert(pem)))
    except (PeerError, ValueError):
        return ""


def check_peer(ssl_object: Any, expected: Collection[str]) -> SpiffeId:
    """After a handshake: the server's SPIFFE ID, which must be one of ``expected`` (any, when
    ``expected`` is empty). Raises :class:`PeerError` naming both."""
    spiffe_id = peer_identity(ssl_object.getpeercert(True))
    if expected and str(spiffe_id) not in expected:
        raise PeerError(
            f"the server presented {spiffe_id}, which is not among the expected "
            f"{', '.join(sorted(expected))}"
        )
    return spiffe_id


def _extension(certificate: x509.Certificate, kind: type[x509.BasicConstraints]) -> Any:
    try:
        return certificate.extensions.get_extension_for_class(kind).value
    except x509.ExtensionNotFound:
        return None


@dataclass(frozen=True)
class _Made:
    svid: Svid | None
    bundle: tuple[bytes, ...]
    context: ssl.SSLContext


class TlsContexts:
    """The workload's TLS contexts, remade when its SVID rotates or the bundle changes (new
    connections get the new certificate; open ones keep theirs until they close, as in
    Envoy). Cheap to ask on every connection."""

    def __init__(self, identity: IdentitySource) -> None:
        self.identity = identity
        self._made: dict[tuple[str, tuple[str, ...]], _Made] = {}
        self._lock = threading.Lock()

    def client(self, alpn: Sequence[str] = ("http/1.1",)) -> ssl.SSLContext:
        """For mesh connections (ISTIO_MUTUAL). Raises :class:`ssl.SSLError` when there is
        no valid SVID to present."""
        return self._context("client", tuple(alpn), lambda s, b: client_context(s, b, alpn=alpn))

    def server(self, alpn: Sequence[str] = ("h2", "http/1.1")) -> ssl.SSLContext:
        return self._context("server", tuple(alpn), lambda s, b: server_context(s, b, alpn=alpn))

    def _context(
        self,
        role: str,
        alpn: tuple[str, ...],
        make: Callable[[Svid, list[x509.Certificate]], ssl.SSLContext],
    ) -> ssl.SSLContext:
        svid = self.identity.current()
        if svid is None:
            raise ssl.SSLError(
                "this workload has no valid SVID to present (never issued, or expired and "
                "not yet renewed)"
            )
        bundle = self.identity.bundle
        made = self._made.get((role, alpn))
        if made is not None and made.svid is svid and len(made.bundle) == len(bundle):
            fingerprints = tuple(c.tbs_certificate_bytes for c in bundle)
            if made.bundle == fingerprints:
                return made.context
        with self._lock:
            context = make(svid, bundle)
            self._made[(role, alpn)] = _Made(
                svid, tuple(c.tbs_certificate_bytes for c in bundle), context
            )
        return context


def grpc_server_credentials(identity: IdentitySource) -> Any:
    """``grpc.ServerCredentials`` for mutual TLS with the workload's SVID: a client must present
    a certificate chained to the trust bundle (its SPIFFE ID then reaches libmesh's server
    interceptors), and each new connection gets the current SVID — grpcio asks again before
    every handshake, so a rotation needs no restart. For ``server.add_secure_port``."""
    import grpc

    def configuration(svid: Svid, bundle: Sequence[x509.Certificate]) -> Any:
        return grpc.ssl_server_certificate_configuration(
            [(svid.key_pem(), svid.chain_pem())], root_certificates=_pem(bundle).encode()
        )

    svid = identity.current()
    if svid is None:
        raise ssl.SSLError("this workload has no valid SVID yet (wait for mesh.identity)")
    served: dict[str, Any] = {"svid": svid, "bundle": tuple(identity.bundle)}

    def fetch() -> Any:
        current, bundle = identity.current(), tuple(identity.bundle)
        if current is None or (current is served["svid"] and bundle == served["bundle"]):
            return None  # nothing new to serve (grpcio keeps what it has)
        served.update(svid=current, bundle=bundle)
        return configuration(current, bundle)

    return grpc.dynamic_ssl_server_credentials(
        configuration(svid, served["bundle"]), fetch, require_client_authentication=True
    )
