"""X.509-SVIDs: the key and certificate signing request a workload makes, and the checks the
SPIFFE X509-SVID standard asks of a certificate before it stands for a workload.

The private key is made here, in the process, and never leaves it: the certificate authority
only ever sees the CSR.
"""

from __future__ import annotations

import datetime
import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypeVar

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa

from ._spiffe import SpiffeId, SpiffeIdError

__all__ = [
    "Svid",
    "SvidError",
    "certificate_spiffe_id",
    "make_csr",
    "new_private_key",
    "verify_svid",
]

PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey


class SvidError(ValueError):
    """A certificate that cannot stand for a workload; the message says why."""


def new_private_key() -> ec.EllipticCurvePrivateKey:
    """An ECDSA P-256 key, what Istio's workloads use by default."""
    return ec.generate_private_key(ec.SECP256R1())


def make_csr(key: PrivateKey, identity: SpiffeId) -> x509.CertificateSigningRequest:
    """A CSR asking for ``identity``: its only name is the SPIFFE ID, as a URI SAN."""
    return (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([]))
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(str(identity))]),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )


def certificate_spiffe_id(certificate: x509.Certificate) -> SpiffeId:
    """The SPIFFE ID a leaf certificate carries: exactly one URI SAN, a valid SPIFFE ID."""
    try:
        names = certificate.extensions.get_extension_for_class(
            x509.SubjectAlternativeName
        ).value.get_values_for_type(x509.UniformResourceIdentifier)
    except x509.ExtensionNotFound as exc:
        raise SvidError("the certificate has no subject alternative names") from exc
    if len(names) != 1:
        raise SvidError(f"an X509-SVID has exactly one URI SAN; this one has {len(names)}")
    try:
        return SpiffeId.parse(names[0])
    except SpiffeIdError as exc:
        raise SvidError(f"its URI SAN is not a SPIFFE ID: {exc}") from exc


@dataclass(frozen=True)
class Svid:
    """A workload's identity: its SPIFFE ID, certificate chain (leaf first) and key."""

    spiffe_id: SpiffeId
    chain: tuple[x509.Certificate, ...]
    key: PrivateKey

    @property
    def leaf(self) -> x509.Certificate:
        return self.chain[0]

    @property
    def expires(self) -> datetime.datetime:
        return self.leaf.not_valid_after_utc

    def chain_pem(self) -> bytes:
        return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in self.chain)

    def key_pem(self) -> bytes:
        return self.key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )


def verify_svid(
    chain: Sequence[x509.Certificate],
    bundle: Sequence[x509.Certificate],
    *,
    now: datetime.datetime | None = None,
    trust_domain: str | None = None,
    expected: SpiffeId | None = None,
) -> SpiffeId:
    """The SPIFFE ID ``chain`` (leaf first) proves, checked as the X509-SVID standard asks: a
    leaf with exactly one SPIFFE URI SAN, ``CA:FALSE``, a digital-signature key usage and no
    certificate-signing one; every certificate valid at ``now``; each signed by the next, the
    last by a certificate of ``bundle`` (the trust domain's roots). Raises
    :class:`SvidError` naming the first failed check."""
    if not chain:
        raise SvidError("no certificate was presented")
    now = now or datetime.datetime.now(datetime.UTC)
    leaf = chain[0]
    spiffe_id = certificate_spiffe_id(leaf)
    if trust_domain is not None and spiffe_id.trust_domain != trust_domain:
        raise SvidError(
            f"{spiffe_id} is in trust domain {spiffe_id.trust_domain!r}, not {trust_domain!r}"
        )
    if expected is not None and spiffe_id != expected:
        raise SvidError(f"the peer is {spiffe_id}, not the expected {expected}")
    constraints = _extension(leaf, x509.BasicConstraints)
    if constraints is not None and constraints.ca:
        raise SvidError("the leaf certificate is a CA (CA:TRUE); an X509-SVID leaf is not")
    usage = _extension(leaf, x509.KeyUsage)
    if usage is None or not usage.digital_signature:
        raise SvidError("the leaf certificate's key usage lacks digitalSignature")
    if usage.key_cert_sign or usage.crl_sign:
        raise SvidError("the leaf certificate may sign certificates; an X509-SVID leaf may not")
    for certificate in chain:
        if now < certificate.not_valid_before_utc:
            raise SvidError(
                f"{_name(certificate)} is not valid before "
                f"{certificate.not_valid_before_utc:%Y-%m-%d %H:%M:%S}Z"
            )
        if now > certificate.not_valid_after_utc:
            raise SvidError(
                f"{_name(certificate)} expired at "
                f"{certificate.not_valid_after_utc:%Y-%m-%d %H:%M:%S}Z"
            )
    for child, parent in itertools.pairwise(chain):
        if not _signed_by(child, parent):
            raise SvidError(f"{_name(child)} is not signed by {_name(parent)}")
    top = chain[-1]
    for root in bundle:
        if top.fingerprint(hashes.SHA256()) == root.fingerprint(hashes.SHA256()):
            return spiffe_id
        if top.issuer == root.subject and _signed_by(top, root):
            if not root.not_valid_before_utc <= now <= root.not_valid_after_utc:
                raise SvidError(f"the trust bundle's {_name(root)} is not valid now")
            return spiffe_id
    raise SvidError(f"{_name(top)} is not signed by the trust bundle (a foreign CA?)")


_E = TypeVar("_E", bound=x509.ExtensionType)


def _extension(certificate: x509.Certificate, kind: type[_E]) -> _E | None:
    try:
        return certificate.extensions.get_extension_for_class(kind).value
    except x509.ExtensionNotFound:
        return None


def _name(certificate: x509.Certificate) -> str:
    try:
        return f"certificate {certificate_spiffe_id(certificate)}"
    except SvidError:
        return f"certificate {certificate.subject.rfc4514_string() or '(no subject)'}"


def _signed_by(child: x509.Certificate, parent: x509.Certificate) -> bool:
    public_key = parent.public_key()
    algorithm = child.signature_hash_algorithm
    try:
        if isinstance(public_key, ec.EllipticCurvePublicKey):
            assert algorithm is not None
            public_key.verify(child.signature, child.tbs_certificate_bytes, ec.ECDSA(algorithm))
        elif isinstance(public_key, rsa.RSAPublicKey):
            assert algorithm is not None
            public_key.verify(
                child.signature, child.tbs_certificate_bytes, padding.PKCS1v15(), algorithm
            )
        else:
            return False
    except InvalidSignature:
        return False
    return True
