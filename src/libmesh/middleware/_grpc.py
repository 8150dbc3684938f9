"""The inbound side for grpcio servers::

    server = grpc.server(executor, interceptors=[libmesh.middleware.MeshServerInterceptor(mesh)])
    server = grpc.aio.server(interceptors=[libmesh.middleware.AsyncMeshServerInterceptor(mesh)])

Each call continues the caller's trace in a server span named ``package.Service/Method`` (as
OpenTelemetry's gRPC conventions name it), and is counted in Istio's metrics with
``request_protocol="grpc"``, ``response_code="200"`` and the call's ``grpc_response_status``,
as an Istio sidecar counts it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import grpc
import grpc.aio

from ..telemetry import InboundRequest, Telemetry
from ..telemetry._tracing import REQUEST_ID
from ._asgi import _telemetry_of

__all__ = ["AsyncMeshServerInterceptor", "MeshServerInterceptor"]


def _start(telemetry: Telemetry, details: grpc.HandlerCallDetails, context: Any) -> InboundRequest:
    headers = {k: v for k, v in (details.invocation_metadata or ()) if isinstance(v, str)}
    peer = context.peer() or ""  # "ipv4:127.0.0.1:54321"
    address = peer.split(":", 1)[1].rpartition(":")[0] if ":" in peer else peer
    request = telemetry.inbound_request(
        method="POST",
        path=details.method,
        authority=headers.get(":authority", ""),
        headers=headers,
        protocol="grpc",
        client_address=address,
        span_name=details.method.lstrip("/"),
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

    def intercept_service(
        self, continuation: Callable[[grpc.HandlerCallDetails], Any], details: Any
    ) -> Any:
        handler = continuation(details)
        if handler is None:
            return None
        telemetry = self.telemetry

        def unary(behavior: Callable[..., Any]) -> Callable[..., Any]:
            def observed(request_or_iterator: Any, context: Any) -> Any:
                request = _start(telemetry, details, context)
                request.__enter__()
                try:
                    response = behavior(request_or_iterator, context)
                except BaseException as exc:
                    _end(request, context, True, exc)
                    raise
                _end(request, context, False, None)
                return response

            return observed

        def streaming(behavior: Callable[..., Iterator[Any]]) -> Callable[..., Iterator[Any]]:
            def observed(request_or_iterator: Any, context: Any) -> Iterator[Any]:
                request = _start(telemetry, details, context)
                request.__enter__()
                try:
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

    async def intercept_service(
        self, continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Any]], details: Any
    ) -> Any:
        handler = await continuation(details)
        if handler is None:
            return None
        telemetry = self.telemetry

        def unary(behavior: Callable[..., Any]) -> Callable[..., Any]:
            async def observed(request_or_iterator: Any, context: Any) -> Any:
                request = _start(telemetry, details, context)
                request.__enter__()
                try:
                    response = await behavior(request_or_iterator, context)
                except BaseException as exc:
                    _end(request, context, True, exc)
                    raise
                _end(request, context, False, None)
                return response

            return observed

        def streaming(behavior: Callable[..., Any]) -> Callable[..., AsyncIterator[Any]]:
            async def observed(request_or_iterator: Any, context: Any) -> AsyncIterator[Any]:
                request = _start(telemetry, details, context)
                request.__enter__()
                try:
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
