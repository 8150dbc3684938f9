"""A workload's own SVID, kept current: the key is made in this process and never leaves it;
the CSR goes to meshd's certificate API (Istio's CreateCertificate); the SVID is renewed at
about half its lifetime, with retries and back-off, and an expired one is never handed out.

While meshd cannot be reached, the current SVID stays in use for as long as it is valid, and
renewal goes on trying; ``on_rotate`` callbacks (and :meth:`WorkloadIdentity.write_files`, for
grpcio's ``file_watcher`` certificate provider) see every new one.
"""

from __future__ import annotations

import datetime
import logging
import os
import random
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory, struct_pb2

from ._spiffe import SpiffeId
from ._svid import Svid, SvidError, make_csr, new_private_key, verify_svid

__all__ = ["IdentityError", "WorkloadIdentity"]

logger = logging.getLogger("libmesh")
CREATE_CERTIFICATE = "/istio.v1.auth.IstioCertificateService/CreateCertificate"


class IdentityError(RuntimeError):
    """No valid SVID could be had; the message says why."""


def _messages() -> tuple[Any, Any]:
    """Istio's CreateCertificate messages (istio/api security/v1alpha1/ca.proto)."""
    pool = descriptor_pool.DescriptorPool()
    pool.AddSerializedFile(struct_pb2.DESCRIPTOR.serialized_pb)
    file = descriptor_pb2.FileDescriptorProto(
        name="security/v1alpha1/ca.proto",
        package="istio.v1.auth",
        syntax="proto3",
        dependency=["google/protobuf/struct.proto"],
    )
    request = file.message_type.add(name="IstioCertificateRequest")
    request.field.add(name="csr", number=1, type=9, label=1)
    request.field.add(name="validity_duration", number=3, type=3, label=1)
    request.field.add(
        name="metadata", number=4, type=11, label=1, type_name=".google.protobuf.Struct"
    )
    response = file.message_type.add(name="IstioCertificateResponse")
    response.field.add(name="cert_chain", number=1, type=9, label=3)
    pool.Add(file)
    find = pool.FindMessageTypeByName
    return (
        message_factory.GetMessageClass(find("istio.v1.auth.IstioCertificateRequest")),
        message_factory.GetMessageClass(find("istio.v1.auth.IstioCertificateResponse")),
    )


CertificateRequest, CertificateResponse = _messages()


def _utcnow() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


class WorkloadIdentity:
    """Keeps ``identity``'s SVID from the CA at ``address`` current, in a background thread.

    ``token`` is a bootstrap token (``meshctl token create``), used for the first SVID; with
    ``secure_address`` (meshd's TLS address) later renewals present the SVID still held over
    mTLS instead, so the token may expire. ``ttl`` is the lifetime to ask for (the CA may give
    less)."""

    def __init__(
        self,
        address: str,
        identity: SpiffeId,
        *,
        token: str,
        secure_address: str | None = None,
        ttl: datetime.timedelta = datetime.timedelta(hours=24),
        backoff: tuple[float, float] = (0.5, 30.0),
        clock: Callable[[], datetime.datetime] = _utcnow,
        rng: random.Random | None = None,
    ) -> None:
        self.address = address
        self.identity = identity
        self._token = token
        self.secure_address = secure_address
        self._ttl = ttl
        self._backoff = backoff
        self._clock = clock
        self._rng = rng or random.Random()
        self._svid: Svid | None = None
        self._issued = clock()
        self._bundle: list[x509.Certificate] = []
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._callbacks: list[Callable[[Svid], None]] = []
        self.rotations = 0
        self.last_error = ""

    # what the process uses --------------------------------------------------------------------

    def current(self) -> Svid | None:
        """The SVID to present now: ``None`` rather than an expired one."""
        svid = self._svid
        if svid is None or self._clock() >= svid.expires:
            return None
        return svid

    @property
    def bundle(self) -> list[x509.Certificate]:
        return list(self._bundle)

    def on_rotate(self, callback: Callable[[Svid], None]) -> None:
        self._callbacks.append(callback)

    def wait(self, timeout: float | None = 10.0) -> Svid:
        """The first SVID, once the CA has signed it."""
        with self._changed:
            if not self._changed.wait_for(lambda: self._svid is not None, timeout):
                raise IdentityError(
                    f"no SVID for {self.identity} from {self.address} within {timeout} s"
                    + (f": {self.last_error}" if self.last_error else "")
                )
        svid = self._svid
        assert svid is not None
        return svid

    def write_files(self, directory: Path) -> None:
        """Keep ``cert-chain.pem``, ``key.pem`` (0600) and ``root-cert.pem`` in ``directory``
        for grpcio's ``file_watcher`` provider; each rotation rewrites them (by rename)."""
        directory.mkdir(parents=True, exist_ok=True)

        def write(svid: Svid) -> None:
            roots = b"".join(c.public_bytes(serialization.Encoding.PEM) for c in self._bundle)
            for name, data, mode in (
                ("key.pem", svid.key_pem(), 0o600),
                ("cert-chain.pem", svid.chain_pem(), 0o644),
                ("root-cert.pem", roots, 0o644),
            ):
                temporary = directory / f".{name}.tmp"
                descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
                with os.fdopen(descriptor, "wb") as file:
                    file.write(data)
                os.replace(temporary, directory / name)

        self.on_rotate(write)
        if self._svid is not None:
            write(self._svid)

    # the lifecycle ------------------------------------------------------------------------------

    def start(self) -> WorkloadIdentity:
        self._thread = threading.Thread(
            target=self._run, name=f"libmesh-identity-{self.identity}", daemon=True
        )
        self._thread.start()
        return self

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _run(self) -> None:
        failures = 0
        while not self._stop.is_set():
            try:
                self._renew()
                failures = 0
                wait = self._until_renewal()
            except (grpc.RpcError, SvidError, ValueError) as exc:
                failures += 1
                self.last_error = _describe(exc)
                wait = self._retry_delay(failures)
                logger.warning(
                    "libmesh: could not renew the SVID for %s (attempt %d, next in %.1f s): %s",
                    self.identity, failures, wait, self.last_error,
                )  # fmt: skip
            self._stop.wait(wait)

    def _renew(self) -> None:
        key = new_private_key()
        csr = make_csr(key, self.identity).public_bytes(serialization.Encoding.PEM)
        request = CertificateRequest(
            csr=csr.decode("ascii"), validity_duration=int(self._ttl.total_seconds())
        )
        held = self.current()
        if held is not None and self.secure_address:
            try:
                response = self._create_over_mtls(request, held)
            except grpc.RpcError as exc:
                logger.info(
                    "libmesh: renewing over mTLS at %s failed (%s); using the token",
                    self.secure_address, _describe(exc),
                )  # fmt: skip
                response = self._create_with_token(request)
        else:
            response = self._create_with_token(request)
        chain = [x509.load_pem_x509_certificate(p.encode("ascii")) for p in response.cert_chain]
        if not chain:
            raise SvidError("the CA answered with no certificate")
        # The chain ends at the CA's root; during a root rotation meshd appends the other
        # roots it trusts. Every self-signed certificate is a root of the bundle.
        path, bundle = _split_roots(chain)
        spiffe_id = verify_svid(path, bundle, now=self._clock(), expected=self.identity)
        svid = Svid(spiffe_id, tuple(path), key)
        with self._changed:
            self._svid = svid
            self._issued = self._clock()
            self._bundle = bundle
            self.rotations += 1
            self.last_error = ""
            self._changed.notify_all()
        logger.info("libmesh: SVID for %s valid until %s", spiffe_id, svid.expires.isoformat())
        for callback in list(self._callbacks):
            try:
                callback(svid)
            except Exception:  # one consumer's failure must not stop rotation
                logger.exception("libmesh: an SVID rotation callback failed")

    def _create_with_token(self, request: Any) -> Any:
        with grpc.insecure_channel(self.address) as channel:
            return _create(channel)(
                request, metadata=(("authorization", f"Bearer {self._token}"),), timeout=10
            )

    def _create_over_mtls(self, request: Any, held: Svid) -> Any:
        assert self.secure_address is not None
        credentials = grpc.ssl_channel_credentials(
            root_certificates=b"".join(
                c.public_bytes(serialization.Encoding.PEM) for c in self._bundle
            ),
            private_key=held.key_pem(),
            certificate_chain=held.chain_pem(),
        )
        with grpc.secure_channel(self.secure_address, credentials) as channel:
            return _create(channel)(request, timeout=10)

    def _until_renewal(self) -> float:
        """Seconds until about half the SVID's lifetime from when it arrived (jittered by
        ±10%; CAs backdate the start of validity for clock skew, so that is not used)."""
        svid = self._svid
        assert svid is not None
        lifetime = (svid.expires - self._issued).total_seconds()
        half = self._issued + datetime.timedelta(seconds=lifetime / 2)
        jitter = lifetime * 0.1 * (self._rng.random() - 0.5)
        return max(0.0, (half - self._clock()).total_seconds() + jitter)

    def _retry_delay(self, failures: int) -> float:
        low, high = self._backoff
        delay: float = min(high, low * 2.0 ** (failures - 1))
        svid = self._svid
        if svid is not None:  # never sleep past the expiry of what we hold
            left = (svid.expires - self._clock()).total_seconds()
            delay = min(delay, max(low, left / 4))
        return float(delay * (0.5 + self._rng.random() / 2))


def _split_roots(
    chain: list[x509.Certificate],
) -> tuple[list[x509.Certificate], list[x509.Certificate]]:
    """(the leaf's chain up to its root, every root given)."""
    roots = [c for c in chain[1:] if c.issuer == c.subject]
    if not roots:
        return chain, [chain[-1]]
    end = chain.index(roots[0]) + 1
    return chain[:end], roots


def _create(channel: grpc.Channel) -> Any:
    return channel.unary_unary(
        CREATE_CERTIFICATE,
        request_serializer=CertificateRequest.SerializeToString,
        response_deserializer=CertificateResponse.FromString,
    )


def _describe(exc: BaseException) -> str:
    if isinstance(exc, grpc.RpcError):
        code = exc.code() if hasattr(exc, "code") else None
        details = exc.details() if hasattr(exc, "details") else str(exc)
        return f"{getattr(code, 'name', code)}: {details}"
    return str(exc)
