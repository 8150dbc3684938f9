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
from ..policy._inbound import Arrival, authorize, refuse_plaintext
from ..telemetry import InboundRequest, Telemetry
from ..telemetry._tracing import REQUEST_ID
from ..transport._jwks import JwksCache
from ._asgi import _telemetry_of
from ._authentication import NOTHING, Authenticated, authenticate, authenticate_async
from ._authorization import report_decision
from ._grpc_port import caller_of

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
    origin = caller_of(peer)  # passed on by a MeshGrpcPort: the real caller
    if origin is not None:
        address = origin[0]
    else:
        address = peer.split(":", 1)[1].rpartition(":")[0] if ":" in peer else peer
    certificates = (context.auth_context() or {}).get("x509_pem_cert")
    principal = principal_of_pem(certificates[0].decode()) if certificates else ""
    return headers, address, principal


def _decide(
    source: Any,
    details: grpc.HandlerCallDetails,
    arrival: tuple[dict[str, str], str, str],
    authenticated: Authenticated,
    port: int | None,
) -> _Verdict:
    """PeerAuthentication and AuthorizationPolicy for one call, decided in ``policy``
    (RequestAuthentication ran before, sync or async): a refusal carries the status Envoy
    would answer a gRPC call with."""
    headers, address, principal = arrival
    if source is None:
        return _Verdict(headers, address, principal, authenticated, None)
    inbound = source.engine.inbound
    request = Arrival(
        method="POST",
        path=details.method,
        host=headers.get(":authority", ""),
        headers=headers,
        principal=principal,
        source_ip=address,
        port=port,
    )
    refusal = refuse_plaintext(inbound, request)
    if refusal is None:
        refusal, decision = authorize(inbound, request, authenticated)
        if decision is not None:
            report_decision(decision, "POST", details.method, (address,), principal)
    code = (getattr(grpc.StatusCode, refusal.grpc_status), refusal.message) if refusal else None
    return _Verdict(headers, address, principal, authenticated, code)


def _judge(source: Any, details: Any, context: Any, jwks: JwksCache, port: int | None) -> _Verdict:
    arrival = _arrival(details, context)
    jwt = source.engine.inbound.jwt(port) if source is not None else None
    authenticated = authenticate(jwt, arrival[0], "", jwks) if jwt is not None else NOTHING
    return _decide(source, details, arrival, authenticated, port)


async def _ajudge(
    source: Any, details: Any, context: Any, jwks: JwksCache, port: int | None
) -> _Verdict:
    arrival = _arrival(details, context)
    jwt = source.engine.inbound.jwt(port) if source is not None else None
    authenticated = (
        await authenticate_async(jwt, arrival[0], "", jwks) if jwt is not None else NOTHING
    )
    return _decide(source, details, arrival, authenticated, port)


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

    def __init__(
        self, mesh: Any = None, *, telemetry: Telemetry | None = None, port: int | None = None
    ) -> None:
        """``port``: the port the server listens on, for port-level PeerAuthentication and
        ``ports`` rules (grpcio does not tell an interceptor)."""
        self.telemetry = _telemetry_of(mesh, telemetry)
        self._source = mesh  # its engine holds the workload's inbound policy
        self._jwks = JwksCache()
        self._port = port

    def intercept_service(
        self, continuation: Callable[[grpc.HandlerCallDetails], Any], details: Any
    ) -> Any:
        handler = continuation(details)
        if handler is None:
            return None
        telemetry, source, jwks, port = self.telemetry, self._source, self._jwks, self._port

        def unary(behavior: Callable[..., Any]) -> Callable[..., Any]:
            def observed(request_or_iterator: Any, context: Any) -> Any:
                verdict = _judge(source, details, context, jwks, port)
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
                verdict = _judge(source, details, context, jwks, port)
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

    def __init__(
        self, mesh: Any = None, *, telemetry: Telemetry | None = None, port: int | None = None
    ) -> None:
        self.telemetry = _telemetry_of(mesh, telemetry)
        self._source = mesh
        self._jwks = JwksCache()
        self._port = port

    async def intercept_service(
        self, continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Any]], details: Any
    ) -> Any:
        handler = await continuation(details)
        if handler is None:
            return None
        telemetry, source, jwks, port = self.telemetry, self._source, self._jwks, self._port

        def unary(behavior: Callable[..., Any]) -> Callable[..., Any]:
            async def observed(request_or_iterator: Any, context: Any) -> Any:
                verdict = await _ajudge(source, details, context, jwks, port)
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
                verdict = await _ajudge(source, details, context, jwks, port)
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
