"""meshd's certificate authority: it signs workloads' CSRs into X.509-SVIDs.

The root is made on first start and kept in the CA directory (``root-key.pem`` is created with
mode 0600 and never rewritten), or an operator's own CA is plugged in (a signing certificate,
its key, and the chain up to the root). A signed SVID follows the SPIFFE X509-SVID standard:
an empty subject, exactly one URI SAN (the SPIFFE ID, critical because the subject is empty),
``CA:FALSE`` (critical), key usage digitalSignature (plus keyEncipherment for an RSA key),
server and client authentication.

Who may get which identity is decided before :meth:`CertificateAuthority.sign` is called (a
bootstrap token or the caller's current SVID); ``sign`` only refuses a CSR that asks for
anything but the identity it is signed for.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from libmesh.identity import SpiffeId

__all__ = ["CAError", "CertificateAuthority"]

ROOT_CERT = "root-cert.pem"
ROOT_KEY = "root-key.pem"
# a root rotation's other roots, trusted beside the signing one (see rotate_* below)
NEXT_ROOT_CERT = "next-root-cert.pem"
NEXT_ROOT_KEY = "next-root-key.pem"
PREVIOUS_ROOT_CERT = "previous-root-cert.pem"
_ROTATION_FILES = (ROOT_CERT, ROOT_KEY, NEXT_ROOT_CERT, PREVIOUS_ROOT_CERT)
ROOT_LIFETIME = datetime.timedelta(days=3650)
CLOCK_SKEW = datetime.timedelta(minutes=1)  # leaves are valid from a little before "now"

SigningKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey


class CAError(ValueError):
    """A CSR the CA will not sign, or CA files it cannot use; the message says why."""


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


@dataclass(frozen=True)
class _Signer:
    certificate: x509.Certificate
    key: SigningKey
    chain: tuple[x509.Certificate, ...]  # above the signer, up to and including the root


class CertificateAuthority:
    """Signs CSRs for one trust domain."""

    def __init__(
        self,
        signer: _Signer,
        trust_domain: str,
        *,
        default_ttl: datetime.timedelta = datetime.timedelta(hours=24),
        max_ttl: datetime.timedelta = datetime.timedelta(days=90),
        clock: Callable[[], datetime.datetime] = _now,
    ) -> None:
        self._signer = signer
        self.trust_domain = trust_domain
        self.default_ttl = default_ttl
        self.max_ttl = max_ttl
        self._clock = clock
        self._directory: Path | None = None  # a root kept in a directory follows rotations
        self._stamp: tuple[tuple[str, int], ...] = ()
        self._other_roots: tuple[x509.Certificate, ...] = ()
        self.generation = 0  # bumped when the signer or the trusted roots change

    # making and loading ---------------------------------------------------------------------

    @classmethod
    def load_or_create(
        cls,
        directory: Path,
        trust_domain: str = "cluster.local",
        *,
        clock: Callable[[], datetime.datetime] = _now,
        **options: datetime.timedelta,
    ) -> CertificateAuthority:
        """The self-signed root kept in ``directory``, made there on first use."""
        cert_path, key_path = directory / ROOT_CERT, directory / ROOT_KEY
        if not key_path.exists():
            directory.mkdir(parents=True, exist_ok=True)
            new_key, new_certificate = _new_root(trust_domain, clock())
            write_private(key_path, _key_pem(new_key))
            cert_path.write_bytes(new_certificate.public_bytes(serialization.Encoding.PEM))
        certificate = _load_certificate(cert_path)
        key = _load_key(key_path)
        _check_signer(certificate, key, cert_path)
        ca = cls(_Signer(certificate, key, (certificate,)), trust_domain, clock=clock, **options)
        ca._directory = directory
        ca._stamp = _stamp(directory)
        ca._other_roots = _other_roots(directory)
        return ca

    def refresh(self) -> bool:
        """Follow a root rotation made in the CA's directory (``meshctl ca rotate``): reload
        the signing root and the other trusted roots when their files changed. Cheap (a stat
        per file); a half-written change keeps the current state and is read next time."""
        directory = self._directory
        if directory is None:
            return False
        stamp = _stamp(directory)
        if stamp == self._stamp:
            return False
        try:
            certificate = _load_certificate(directory / ROOT_CERT)
            key = _load_key(directory / ROOT_KEY)
            _check_signer(certificate, key, directory / ROOT_CERT)
            others = _other_roots(directory)
        except CAError:
            return False
        self._signer = _Signer(certificate, key, (certificate,))
        self._other_roots = others
        self._stamp = stamp
        self.generation += 1
        return True

    @classmethod
    def plug_in(
        cls,
        cert_path: Path,
        key_path: Path,
        chain_path: Path | None,
        trust_domain: str = "cluster.local",
        *,
        clock: Callable[[], datetime.datetime] = _now,
        **options: datetime.timedelta,
    ) -> CertificateAuthority:
        """An operator's CA: a signing (intermediate) certificate and key, and the chain from
        it up to the root (the root last). Without a chain the certificate is the root."""
        certificate = _load_certificate(cert_path)
        key = _load_key(key_path)
        _check_signer(certificate, key, cert_path)
        chain = tuple(_load_certificates(chain_path)) if chain_path else (certificate,)
        if chain[0].fingerprint(hashes.SHA256()) != certificate.fingerprint(hashes.SHA256()):
            chain = (certificate, *chain)
        return cls(_Signer(certificate, key, chain), trust_domain, clock=clock, **options)

    # signing ----------------------------------------------------------------------------------

    @property
    def roots(self) -> list[x509.Certificate]:
        """The trust bundle: the root the chain ends at, and during a root rotation the root
        coming in (before it signs) or going out (while its SVIDs live)."""
        return [self._signer.chain[-1], *self._other_roots]

    @property
    def intermediates(self) -> list[x509.Certificate]:
        """The certificates between a leaf and the root (none when the root signs)."""
        return list(self._signer.chain[:-1])

    def bundle_pem(self) -> str:
        return "".join(
            c.public_bytes(serialization.Encoding.PEM).decode("ascii") for c in self.roots
        )

    def sign(
        self,
        csr_pem: bytes | str,
        identity: SpiffeId,
        ttl: datetime.timedelta | None = None,
    ) -> list[str]:
        """Sign a PEM CSR into an SVID for ``identity``; returns the chain as PEM strings, the
        leaf first and the root last (Istio's CreateCertificate answer). The lifetime is
        ``ttl`` (default ``default_ttl``), at most ``max_ttl`` and never past the CA's own."""
        if identity.trust_domain != self.trust_domain:
            raise CAError(f"{identity} is not in this CA's trust domain {self.trust_domain!r}")
        csr = _load_csr(csr_pem)
        requested = _requested_names(csr)
        if requested != [str(identity)]:
            raise CAError(
                f"the CSR asks for {', '.join(requested) or 'no name'}; it may ask only for "
                f"{identity}"
            )
        public_key = csr.public_key()
        if not isinstance(public_key, (ec.EllipticCurvePublicKey, rsa.RSAPublicKey)):
            raise CAError("the CSR's key is neither ECDSA nor RSA")
        if isinstance(public_key, rsa.RSAPublicKey) and public_key.key_size < 2048:
            raise CAError(f"the CSR's RSA key has {public_key.key_size} bits; 2048 at least")
        now = self._clock()
        lifetime = min(ttl or self.default_ttl, self.max_ttl)
        if lifetime <= datetime.timedelta(0):
            raise CAError(f"a certificate's lifetime must be positive, not {lifetime}")
        signer = self._signer
        not_after = min(now + lifetime, signer.certificate.not_valid_after_utc)
        leaf = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([]))
            .issuer_name(signer.certificate.subject)
            .public_key(public_key)
            .serial_number(int.from_bytes(secrets.token_bytes(16), "big") >> 1)
            .not_valid_before(now - CLOCK_SKEW)
            .not_valid_after(not_after)
            # an empty subject makes the SAN extension critical (RFC 5280 4.2.1.6); besides the
            # one URI SAN, the identity's DNS form (the X509-SVID standard allows other SAN
            # types) for clients that check host names only: grpcio's TLS credentials
            .add_extension(x509.SubjectAlternativeName(_names(identity)), critical=True)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=isinstance(public_key, rsa.RSAPublicKey),
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=False,
                    crl_sign=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(
                x509.ExtendedKeyUsage(
                    [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
                ),
                critical=False,
            )
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(signer.key.public_key()),
                critical=False,
            )
            .sign(signer.key, hashes.SHA256())
        )
        # Istio's answer is the chain up to the root; the other trusted roots follow it, so a
        # workload learns a rotation's roots with its SVID (each root is self-signed)
        return [
            c.public_bytes(serialization.Encoding.PEM).decode("ascii")
            for c in (leaf, *signer.chain, *self._other_roots)
        ]

    def serving_certificate(self, hosts: list[str], identity: SpiffeId) -> tuple[bytes, bytes]:
        """meshd's own TLS certificate for its secure address: a key made here, and a chain
        naming ``hosts`` (DNS names or IP addresses, what a gRPC client checks) and meshd's
        SPIFFE ID. Returns (key PEM, chain PEM)."""
        key = ec.generate_private_key(ec.SECP256R1())
        names: list[x509.GeneralName] = [x509.UniformResourceIdentifier(str(identity))]
        for host in hosts:
            try:
                names.append(x509.IPAddress(ipaddress.ip_address(host)))
            except ValueError:
                names.append(x509.DNSName(host))
        now = self._clock()
        signer = self._signer
        certificate = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "meshd")]))
            .issuer_name(signer.certificate.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - CLOCK_SKEW)
            .not_valid_after(min(now + self.max_ttl, signer.certificate.not_valid_after_utc))
            .add_extension(x509.SubjectAlternativeName(names), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .sign(signer.key, hashes.SHA256())
        )
        chain = b"".join(
            c.public_bytes(serialization.Encoding.PEM) for c in (certificate, *signer.chain)
        )
        return _key_pem(key), chain


def _new_root(
    trust_domain: str, now: datetime.datetime
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, trust_domain),
            x509.NameAttribute(NameOID.COMMON_NAME, "libmesh root CA"),
        ]
    )
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CLOCK_SKEW)
        .not_valid_after(now + ROOT_LIFETIME)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.UniformResourceIdentifier(f"spiffe://{trust_domain}")]
            ),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    return key, certificate


def _names(identity: SpiffeId) -> list[x509.GeneralName]:
    names: list[x509.GeneralName] = [x509.UniformResourceIdentifier(str(identity))]
    if identity.dns_name is not None:
        names.append(x509.DNSName(identity.dns_name))
    return names


def _stamp(directory: Path) -> tuple[tuple[str, int], ...]:
    stamps = []
    for name in _ROTATION_FILES:
        try:
            stamps.append((name, (directory / name).stat().st_mtime_ns))
        except FileNotFoundError:
            stamps.append((name, 0))
    return tuple(stamps)


def _other_roots(directory: Path) -> tuple[x509.Certificate, ...]:
    return tuple(
        _load_certificate(directory / name)
        for name in (NEXT_ROOT_CERT, PREVIOUS_ROOT_CERT)
        if (directory / name).exists()
    )


# -- root rotation, in three steps with overlap (meshctl ca rotate prepare|activate|finish) ------


def rotate_prepare(directory: Path, trust_domain: str = "cluster.local") -> x509.Certificate:
    """Step 1: make the next root, for the current root's trust domain (``trust_domain`` only
    for a root that names none). It is trusted at once (workloads get it with their next
    SVID) but signs nothing yet. Wait until every workload has renewed (half an SVID
    lifetime) before :func:`rotate_activate`."""
    _require_root(directory)
    if (directory / NEXT_ROOT_KEY).exists():
        raise CAError(
            f"a root rotation is already prepared in {directory}: activate it "
            "(meshctl ca rotate activate) or remove next-root-*.pem"
        )
    if (directory / PREVIOUS_ROOT_CERT).exists():
        raise CAError(
            f"the last rotation in {directory} is not finished: the previous root is still "
            "trusted (meshctl ca rotate finish, once its SVIDs have expired)"
        )
    current = _load_certificate(directory / ROOT_CERT)
    key, certificate = _new_root(_trust_domain_of(current) or trust_domain, _now())
    write_private(directory / NEXT_ROOT_KEY, _key_pem(key))
    _write_public(directory / NEXT_ROOT_CERT, certificate)
    return certificate


def rotate_activate(directory: Path) -> x509.Certificate:
    """Step 2: the next root signs from now on; the old one stays trusted until the SVIDs it
    signed have expired (the longest SVID lifetime), then :func:`rotate_finish`."""
    _require_root(directory)
    if not (directory / NEXT_ROOT_KEY).exists():
        raise CAError(
            f"no prepared root in {directory}: run meshctl ca rotate prepare first, and "
            "activate once every workload has renewed its SVID"
        )
    certificate = _load_certificate(directory / NEXT_ROOT_CERT)
    _check_signer(certificate, _load_key(directory / NEXT_ROOT_KEY), directory / NEXT_ROOT_CERT)
    os.replace(directory / ROOT_CERT, directory / PREVIOUS_ROOT_CERT)
    os.replace(directory / NEXT_ROOT_KEY, directory / ROOT_KEY)  # the old key is gone
    os.replace(directory / NEXT_ROOT_CERT, directory / ROOT_CERT)
    return certificate


def rotate_finish(directory: Path) -> x509.Certificate:
    """Step 3: stop trusting the previous root."""
    previous = directory / PREVIOUS_ROOT_CERT
    if not previous.exists():
        raise CAError(f"no previous root in {directory}: no rotation is waiting to finish")
    certificate = _load_certificate(previous)
    previous.unlink()
    return certificate


def _trust_domain_of(root: x509.Certificate) -> str | None:
    """The trust domain a root names (its ``spiffe://<trust-domain>`` URI SAN)."""
    try:
        names = root.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return None
    for uri in names.get_values_for_type(x509.UniformResourceIdentifier):
        if uri.startswith("spiffe://"):
            return uri[len("spiffe://") :].rstrip("/") or None
    return None


def _require_root(directory: Path) -> None:
    if not (directory / ROOT_KEY).exists():
        raise CAError(f"no CA in {directory}: start meshd with --ca-dir {directory} first")


def _write_public(path: Path, certificate: x509.Certificate) -> None:
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    os.replace(temporary, path)


def _key_pem(key: SigningKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def write_private(path: Path, data: bytes) -> None:
    """Create ``path`` readable by its owner only, from the first byte (never chmod after)."""
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "wb") as file:
        file.write(data)


def _load_certificate(path: Path) -> x509.Certificate:
    certificates = _load_certificates(path)
    return certificates[0]


def _load_certificates(path: Path) -> list[x509.Certificate]:
    try:
        certificates = x509.load_pem_x509_certificates(path.read_bytes())
    except (OSError, ValueError) as exc:
        raise CAError(f"{path}: cannot read a PEM certificate: {exc}") from exc
    if not certificates:
        raise CAError(f"{path}: no certificate in it")
    return certificates


def _load_key(path: Path) -> SigningKey:
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as exc:
        raise CAError(f"{path}: cannot read an unencrypted PEM private key: {exc}") from exc
    if not isinstance(key, (ec.EllipticCurvePrivateKey, rsa.RSAPrivateKey)):
        raise CAError(f"{path}: the CA key must be ECDSA or RSA")
    problem = private_problem(path, "a CA key")
    if problem:
        raise CAError(problem)
    return key


def private_problem(path: Path, what: str) -> str:
    """Why ``path`` (holding ``what``) is not private enough, or ``""`` when it is."""
    mode = path.stat().st_mode & 0o777
    if mode & 0o077:
        return (
            f"{path}: {what} must be readable by its owner only (mode {mode:o}); "
            f"run: chmod 600 {path}"
        )
    return ""


def _check_signer(certificate: x509.Certificate, key: SigningKey, path: Path) -> None:
    def public(k: object) -> bytes:
        return k.public_bytes(  # type: ignore[attr-defined, no-any-return]
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )

    if public(certificate.public_key()) != public(key.public_key()):
        raise CAError(f"{path}: the key does not belong to this certificate")
    try:
        constraints = certificate.extensions.get_extension_for_class(x509.BasicConstraints)
    except x509.ExtensionNotFound as exc:
        raise CAError(f"{path}: not a CA certificate (no basicConstraints)") from exc
    if not constraints.value.ca:
        raise CAError(f"{path}: not a CA certificate (CA:FALSE)")


def _load_csr(pem: bytes | str) -> x509.CertificateSigningRequest:
    data = pem.encode("ascii") if isinstance(pem, str) else pem
    try:
        csr = x509.load_pem_x509_csr(data)
    except ValueError as exc:
        raise CAError(f"not a PEM certificate signing request: {exc}") from exc
    if not csr.is_signature_valid:
        raise CAError("the CSR's signature does not verify (it was altered, or not self-signed)")
    return csr


def _requested_names(csr: x509.CertificateSigningRequest) -> list[str]:
    try:
        names = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return [str(getattr(name, "value", name)) for name in names]
