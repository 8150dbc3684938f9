"""libmesh: an in-process service mesh for Python services.

Istio's traffic management, resilience and security features, applied inside the process by
the HTTP and gRPC clients and servers the application already uses.
"""

import logging

from ._exceptions import ConfigError, MeshError

__all__ = ["ConfigError", "MeshError", "__version__"]

__version__ = "0.1.0"

logging.getLogger(__name__).addHandler(logging.NullHandler())
