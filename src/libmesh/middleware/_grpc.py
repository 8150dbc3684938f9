"""The inbound side for grpcio servers::

    server = grpc.server(executor, interceptors=[libmesh.middleware.MeshServerInterceptor(mesh)])
    server = grpc.aio.server(interceptors=[libmesh.middleware.AsyncMeshServerInterceptor(mesh)])

Each call continues the caller's trace in a server span named ``package.Service/Method`` (as
OpenTelemetry's gRPC conventions name it), and is counted in Istio's metrics with
``request_protocol="grpc"``, ``response_code="200"`` and the call's ``grpc_response_status``,
as an Istio sidecar counts it. Given the mesh (not only its telemetry), they also enforce the
workload's PeerAuthentication (a plaintext call to a STRICT workload: UNAUTHENTICATED),
RequestAuthentication (a bad token: UNAUTHENTICATED with Envoy's reason) and
AuthorizationPolicy (PERMISSION_DENIED, "RBAC: access denied"); serve with
``server.add_secure_port(address, libmesh.identity.grpc_server_credentials(mesh.identity))`` for
mutual TLS with the workload's SVID (rotated in place).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any, NamedTuple

import grpc
import grpc.aio

from ..identity._tls import principal_of_pem
from ..policy._authz import AuthzRequest
from ..telemetry import InboundRequest, Telemetry
from ..telemetry._tracing import REQUEST_ID
from ..transport._jwks import JwksCache
from ._asgi import _telemetry_of
from ._authentication import NOTHING, Authenticated, authenticate, authenticate_async
from ._authorization import RBAC_DENIED, report_decision

__all__ = ["AsyncMeshServerInterceptor", "MeshServerInterceptor"]


class _Verdict(NamedTuple):
    """What the mesh's policies make of a call before the handler runs."""

    headers: dict[str, str]
    address: str
    principal: str  # the caller's SPIFFE ID, from its mTLS certificate
    authenticated: Authenticated
    refusal: tuple[grpc.StatusCode, str] | None


def _arrival(details: grpc.HandlerCallDetails, context: Any) -> tuple[dict[str, str], str, str]:
    headers = {k: v for k, v in (details.invocation_metadata or ()) if isinstance(v, str)}
    peer = context.peer() or ""  # "ipv4:127.0.0.1:54321"
    address = peer.split(":", 1)[1].rpartition(":")[0] if ":" in peer else peer
    certificates = (context.auth_context() or {}).get("x509_pem_cert")
    principal = principal_of_pem(certificates[0].decode()) if certificates else ""
    return headers, address, principal


def _decide(
    source: Any,
    details: grpc.HandlerCallDetails,
    arrival: tuple[dict[str, str], str, str],
    authenticated: Authenticated,
) -> _Verdict:
    """PeerAuthentication and AuthorizationPolicy for one call (RequestAuthentication ran
    before, sync or async): a refusal carries the status Envoy would answer with."""
    headers, address, principal = arrival
    refusal = None
    if authenticated.error:
        refusal = (grpc.StatusCode.UNAUTHENTICATED, authenticated.error)
    elif source is not None:
        inbound = source.engine.inbound
        if not principal and not inbound.accepts(None, tls=False):
            mode = inbound.mode(None).value
            refusal = (
                grpc.StatusCode.UNAUTHENTICATED,
                f"mutual TLS required: this workload is {mode} (PeerAuthentication)",
            )
        else:
            authorizer = inbound.authorizer(None)
            if not authorizer.empty:
                decision = authorizer.check(
                    AuthzRequest(
                        method="POST",
                        path=details.method,
                        host=headers.get(":authority", ""),
                        headers=headers,
                        principal=principal,
                        source_ip=address,
                        jwt_claims=authenticated.claims,
                    )
                )
                report_decision(decision, "POST", details.method, (address,), principal)
                if not decision.allowed:
                    refusal = (grpc.StatusCode.PERMISSION_DENIED, RBAC_DENIED.decode())
    return _Verdict(headers, address, principal, authenticated, refusal)


def _judge(source: Any, details: Any, context: Any, jwks: JwksCache) -> _Verdict:
    arrival = _arrival(details, context)
    jwt = source.engine.inbound.jwt(None) if source is not None else None
    authenticated = authenticate(jwt, arrival[0], "", jwks) if jwt is not None else NOTHING
    return _decide(source, details, arrival, authenticated)


async def _ajudge(source: Any, details: Any, context: Any, jwks: JwksCache) -> _Verdict:
    arrival = _arrival(details, context)
    jwt = source.engine.inbound.jwt(None) if source is not None else None
    authenticated = (
        await authenticate_async(jwt, arrival[0], "", jwks) if jwt is not None else NOTHING
    )
    return _decide(source, details, arrival, authenticated)


def _start(
    telemetry: Telemetry, details: grpc.HandlerCallDetails, context: Any, verdict: _Verdict
) -> InboundRequest:
    headers = verdict.headers
    request = telemetry.inbound_request(
        method="POST",
        path=details.method,
        authority=headers.get(":authority", ""),
        headers=headers,
        protocol="grpc",
        client_address=verdict.address,
        span_name=details.method.lstrip("/"),
        peer_principal=verdict.principal,
        request_principal=verdict.authenticated.principal,
    )
    extra = list(request.response_headers())
    if request.request_id_generated:
        extra.append((REQUEST_ID, request.request_id))
    if extra:
        context.send_initial_metadata(tuple(extra))
    return request


def _code_of(context: Any, failed: bool) -> str:
    """The status the call ends with: the one the handler set, else OK, or UNKNOWN for an
    exception grpc turns into one."""
    code = context.code() if hasattr(context, "code") else None
    if isinstance(code, grpc.StatusCode):
        return str(code.value[0])
    if isinstance(code, int):
        return str(code)
    return "2" if failed else "0"


def _end(request: InboundRequest, context: Any, failed: bool, exc: BaseException | None) -> None:
    request.finish(status=200, grpc_status=_code_of(context, failed))
    request.__exit__(type(exc) if exc else None, exc, exc.__traceback__ if exc else None)


class MeshServerInterceptor(grpc.ServerInterceptor):
    """libmesh's inbound interceptor for ``grpc.server``."""

    def __init__(self, mesh: Any = None, *, telemetry: Telemetry | None = None) -> None:
        self.telemetry = _telemetry_of(mesh, telemetry)
        self._source = mesh  # its engine holds the workload's inbound policy
        self._jwks = JwksCache()

    def intercept_service(
        self, continuation: Callable[[grpc.HandlerCallDetails], Any], details: Any
    ) -> Any:
        handler = continuation(details)
        if handler is None:
            return None
        telemetry, source, jwks = self.telemetry, self._source, self._jwks

        def unary(behavior: Callable[..., Any]) -> Callable[..., Any]:
            def observed(request_or_iterator: Any, context: Any) -> Any:
                verdict = _judge(source, details, context, jwks)
                request = _start(telemetry, details, context, verdict)
                request.__enter__()
                try:
                    if verdict.refusal is not None:
                        context.abort(*verdict.refusal)
                    response = behavior(request_or_iterator, context)
                except BaseException as exc:
                    _end(request, context, True, exc)
                    raise
                _end(request, context, False, None)
                return response

            return observed

        def streaming(behavior: Callable[..., Iterator[Any]]) -> Callable[..., Iterator[Any]]:
            def observed(request_or_iterator: Any, context: Any) -> Iterator[Any]:
                verdict = _judge(source, details, context, jwks)
                request = _start(telemetry, details, context, verdict)
                request.__enter__()
                try:
                    if verdict.refusal is not None:
                        context.abort(*verdict.refusal)
                    yield from behavior(request_or_iterator, context)
                except BaseException as exc:
                    _end(request, context, True, exc)
                    raise
                _end(request, context, False, None)

            return observed

        return _wrap(handler, unary, streaming)


class AsyncMeshServerInterceptor(grpc.aio.ServerInterceptor):
    """libmesh's inbound interceptor for ``grpc.aio.server``."""

    def __init__(self, mesh: Any = None, *, telemetry: Telemetry | None = None) -> None:
        self.telemetry = _telemetry_of(mesh, telemetry)
        self._source = mesh
        self._jwks = JwksCache()

    async def intercept_service(
        self, continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Any]], details: Any
    ) -> Any:
        handler = await continuation(details)
        if handler is None:
            return None
        telemetry, source, jwks = self.telemetry, self._source, self._jwks

        def unary(behavior: Callable[..., Any]) -> Callable[..., Any]:
            async def observed(request_or_iterator: Any, context: Any) -> Any:
                verdict = await _ajudge(source, details, context, jwks)
                request = _start(telemetry, details, context, verdict)
                request.__enter__()
                try:
                    if verdict.refusal is not None:
                        await context.abort(*verdict.refusal)
                    response = await behavior(request_or_iterator, context)
                except BaseException as exc:
                    _end(request, context, True, exc)
                    raise
                _end(request, context, False, None)
                return response

            return observed

        def streaming(behavior: Callable[..., Any]) -> Callable[..., AsyncIterator[Any]]:
            async def observed(request_or_iterator: Any, context: Any) -> AsyncIterator[Any]:
                verdict = await _ajudge(source, details, context, jwks)
                request = _start(telemetry, details, context, verdict)
                request.__enter__()
                try:
                    if verdict.refusal is not None:
                        await context.abort(*verdict.refusal)
                    async for response in behavior(request_or_iterator, context):
                        yield response
                except BaseException as exc:
                    _end(request, context, True, exc)
                    raise
                _end(request, context, False, None)

            return observed

        return _wrap(handler, unary, streaming)


def _wrap(
    handler: Any,
    unary: Callable[[Callable[..., Any]], Callable[..., Any]],
    streaming: Callable[[Callable[..., Any]], Callable[..., Any]],
) -> Any:
    """The same handler with its behaviour observed: unary responses by ``unary``, streamed
    ones by ``streaming``."""
    options = {
        "request_deserializer": handler.request_deserializer,
        "response_serializer": handler.response_serializer,
    }
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(unary(handler.unary_unary), **options)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(streaming(handler.unary_stream), **options)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(unary(handler.stream_unary), **options)
    return grpc.stream_stream_rpc_method_handler(streaming(handler.stream_stream), **options)
