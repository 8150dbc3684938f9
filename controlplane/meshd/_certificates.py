"""Istio's certificate API on meshd's gRPC address: ``istio.v1.auth.IstioCertificateService/
CreateCertificate`` — a PEM CSR and a validity in seconds in, the chain (leaf first, root
last) out — so Istio's own agents and libmesh ask for SVIDs the same way.

A CSR is signed only for the identity the caller proves: a bootstrap token in the
``authorization: Bearer …`` metadata (``meshctl token create``). Everything else is refused
with the reason, and logged.
"""

from __future__ import annotations

import datetime
import logging
from typing import Any, NoReturn

import grpc
from cryptography import x509

from libmesh.identity import SvidError, verify_svid
from libmesh.identity._workload import CertificateRequest, CertificateResponse

from ._ca import CAError, CertificateAuthority
from ._tokens import TokenError, TokenIssuer

__all__ = ["CertificateService", "IstioCertificateRequest", "IstioCertificateResponse"]

logger = logging.getLogger("meshd")
SERVICE = "istio.v1.auth.IstioCertificateService"


# Istio's messages (istio/api security/v1alpha1/ca.proto): libmesh's client defines them.
IstioCertificateRequest, IstioCertificateResponse = CertificateRequest, CertificateResponse


class CertificateService:
    """CreateCertificate, authorized by bootstrap tokens."""

    def __init__(self, ca: CertificateAuthority, tokens: TokenIssuer) -> None:
        self.ca = ca
        self.tokens = tokens

    def handler(self) -> grpc.GenericRpcHandler:
        return grpc.method_handlers_generic_handler(
            SERVICE,
            {
                "CreateCertificate": grpc.unary_unary_rpc_method_handler(
                    self._create,
                    request_deserializer=IstioCertificateRequest.FromString,
                    response_serializer=IstioCertificateResponse.SerializeToString,
                )
            },
        )

    async def _create(self, request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        peer = context.peer()
        token = _bearer(context.invocation_metadata() or ())
        presented = _peer_certificate(context)
        if token is not None:
            try:
                identity = self.tokens.verify(token)
            except TokenError as exc:
                await self._refuse(context, grpc.StatusCode.UNAUTHENTICATED, str(exc), peer)
            how = "token"
        elif presented is not None:  # renewal over mTLS with the SVID still held
            try:
                identity = verify_svid(
                    [presented, *self.ca.intermediates],
                    self.ca.roots,
                    trust_domain=self.ca.trust_domain,
                )
            except SvidError as exc:
                await self._refuse(context, grpc.StatusCode.UNAUTHENTICATED, str(exc), peer)
            how = "mTLS"
        else:
            await self._refuse(
                context,
                grpc.StatusCode.UNAUTHENTICATED,
                "no credential: send a bootstrap token as 'authorization: Bearer <token>' "
                "(meshctl token create), or present your current SVID over TLS",
                peer,
            )
        ttl = (
            datetime.timedelta(seconds=request.validity_duration)
            if request.validity_duration > 0
            else None
        )
        if self.ca.refresh():
            logger.info(
                "meshd: the CA's roots changed (a rotation): signing with %s, trusting %d",
                self.ca.roots[0].subject.rfc4514_string(),
                len(self.ca.roots),
            )
        try:
            chain = self.ca.sign(request.csr, identity, ttl)
        except CAError as exc:
            await self._refuse(
                context,
                grpc.StatusCode.PERMISSION_DENIED,
                f"{exc} (the token is for {identity})",
                peer,
            )
        logger.info("meshd: signed an SVID for %s (%s, %s)", identity, peer, how)
        return IstioCertificateResponse(cert_chain=chain)

    async def _refuse(
        self,
        context: grpc.aio.ServicerContext[Any, Any],
        code: grpc.StatusCode,
        message: str,
        peer: str,
    ) -> NoReturn:
        logger.warning("meshd: refused a certificate request from %s: %s", peer, message)
        await context.abort(code, message)
        raise AssertionError("abort raises")  # pragma: no cover


def _peer_certificate(context: Any) -> x509.Certificate | None:
    """The client certificate of a TLS connection (grpc verified it against the bundle)."""
    try:
        pems = context.auth_context().get("x509_pem_cert") or []
    except (AttributeError, ValueError):
        return None
    if not pems:
        return None
    return x509.load_pem_x509_certificate(pems[0])


def _bearer(metadata: Any) -> str | None:
    for key, value in metadata:
        if key == "authorization" and isinstance(value, str) and value.startswith("Bearer "):
            return value[len("Bearer ") :].strip()
    return None
