"""libmesh: an in-process service mesh for Python services.

Istio's traffic management, resilience and security features, applied inside the process by
the HTTP and gRPC clients and servers the application already uses.
"""

import logging

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
from .transport import AsyncMeshTransport, MeshInfo, MeshTransport

__all__ = [
    "AsyncMeshTransport",
    "ConfigError",
    "ConfigTimeout",
    "Mesh",
    "MeshError",
    "MeshInfo",
    "MeshTransport",
    "UpstreamConnectError",
    "UpstreamError",
    "UpstreamReset",
    "UpstreamTimeout",
    "__version__",
    "is_testing",
    "node_from_environment",
    "set_testing",
]

__version__ = "0.1.0"

logging.getLogger(__name__).addHandler(logging.NullHandler())
