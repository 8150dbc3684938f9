"""libmesh: an in-process service mesh for Python services.

Istio's traffic management, resilience and security features, applied inside the process by
the HTTP and gRPC clients and servers the application already uses.
"""

import logging

from . import middleware
from ._exceptions import (
    ConfigError,
    ConfigTimeout,
    MeshError,
    UpstreamConnectError,
    UpstreamError,
    UpstreamReset,
    UpstreamTimeout,
)
from ._mesh import Mesh, node_from_environment
from ._testing import is_testing, set_testing
from .middleware import serve, serve_async
from .telemetry import AccessLog, Inbound, Propagation, current_inbound
from .transport import (
    AsyncMeshClientInterceptor,
    AsyncMeshTransport,
    MeshClientInterceptor,
    MeshInfo,
    MeshRpcError,
    MeshTransport,
    xds_aio_channel,
    xds_bootstrap,
    xds_channel,
)

__all__ = [
    "AccessLog",
    "AsyncMeshClientInterceptor",
    "AsyncMeshTransport",
    "ConfigError",
    "ConfigTimeout",
    "Inbound",
    "Mesh",
    "MeshClientInterceptor",
    "MeshError",
    "MeshInfo",
    "MeshRpcError",
    "MeshTransport",
    "Propagation",
    "UpstreamConnectError",
    "UpstreamError",
    "UpstreamReset",
    "UpstreamTimeout",
    "__version__",
    "current_inbound",
    "is_testing",
    "middleware",
    "node_from_environment",
    "serve",
    "serve_async",
    "set_testing",
    "xds_aio_channel",
    "xds_bootstrap",
    "xds_channel",
]

__version__ = "0.1.0"

logging.getLogger(__name__).addHandler(logging.NullHandler())
