"""Transports: thin adapters that drive the engine's calls over real clients."""

from typing import TYPE_CHECKING, Any

from ._grpc import (
    RESPONSE_FLAGS_KEY,
    AsyncMeshClientInterceptor,
    MeshClientInterceptor,
    MeshRpcError,
    xds_aio_channel,
    xds_bootstrap,
    xds_channel,
)
from ._httpx import AsyncMeshTransport, MeshInfo, MeshTransport

if TYPE_CHECKING:
    from ._requests import (
        MeshAdapter,
        MeshResponse,
        RequestsUpstreamConnectError,
        RequestsUpstreamError,
        RequestsUpstreamReset,
        RequestsUpstreamTimeout,
    )

__all__ = [
    "RESPONSE_FLAGS_KEY",
    "AsyncMeshClientInterceptor",
    "AsyncMeshTransport",
    "MeshAdapter",
    "MeshClientInterceptor",
    "MeshInfo",
    "MeshResponse",
    "MeshRpcError",
    "MeshTransport",
    "RequestsUpstreamConnectError",
    "RequestsUpstreamError",
    "RequestsUpstreamReset",
    "RequestsUpstreamTimeout",
    "xds_aio_channel",
    "xds_bootstrap",
    "xds_channel",
]

_NEED_REQUESTS = frozenset(
    {
        "MeshAdapter",
        "MeshResponse",
        "RequestsUpstreamConnectError",
        "RequestsUpstreamError",
        "RequestsUpstreamReset",
        "RequestsUpstreamTimeout",
    }
)


def __getattr__(name: str) -> Any:
    # requests is an optional extra: it is imported when its adapter is first asked for, so that
    # ``import libmesh`` works (and stays light) without it.
    if name in _NEED_REQUESTS:
        from . import _requests

        return getattr(_requests, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
