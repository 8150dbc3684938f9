"""The libmesh exception tree.

Every error libmesh raises derives from :class:`MeshError`, and also from the standard or httpx
exception a caller already catches for that situation, so ``except httpx.HTTPError`` and
``except TimeoutError`` keep working::

    MeshError
     ├── ConfigError (ValueError)              configuration that cannot be used as it is
     ├── ConfigTimeout (TimeoutError)          no configuration from the control plane in time
     ├── MeshRpcError (grpc.RpcError, grpc.aio.AioRpcError)  a gRPC call the mesh ended itself:
     │                                          code(), details(), flags in trailing metadata
     └── UpstreamError (httpx.TransportError)  a request got no response from upstream
          ├── UpstreamConnectError (httpx.ConnectError, ConnectionError)   flags UF, URX
          ├── UpstreamTimeout (httpx.TimeoutException, TimeoutError)       flag UT
          ├── UpstreamReset (httpx.ReadError, ConnectionError)             flags UC, UR
          └── RequestsUpstreamError (requests.RequestException)      the same, from requests
               ├── RequestsUpstreamConnectError (UpstreamConnectError, requests.ConnectionError)
               ├── RequestsUpstreamTimeout (UpstreamTimeout, requests.ReadTimeout)
               └── RequestsUpstreamReset (UpstreamReset, requests.ConnectionError)

``response_flags`` carries Envoy's response flags for the request, as an access log would show
them (``UF,URX``: connection failures, retries exhausted).

The ``Requests*`` errors are what the requests adapter raises, so that ``except
requests.ConnectionError`` (or ``requests.Timeout``) keeps working. They live in
:mod:`libmesh.transport` with the adapter, because only the ``libmesh[requests]`` extra brings
requests; their ``request`` is the ``requests.PreparedRequest``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import httpx

if TYPE_CHECKING:
    from .config import Finding

__all__ = [
    "ConfigError",
    "ConfigTimeout",
    "MeshError",
    "UpstreamConnectError",
    "UpstreamError",
    "UpstreamReset",
    "UpstreamTimeout",
]


class MeshError(Exception):
    """Base of every error libmesh raises."""


class ConfigError(MeshError, ValueError):
    """Configuration was rejected; ``findings`` says what, where, and how to fix it."""

    def __init__(self, message: str, findings: Sequence[Finding] = ()) -> None:
        lines = [message, *(f.format() for f in findings if f.is_error)]
        super().__init__("\n  ".join(lines))
        self.findings = tuple(findings)


class ConfigTimeout(MeshError, TimeoutError):
    """The control plane sent no configuration within the wait, and none was saved."""


class UpstreamError(MeshError, httpx.TransportError):
    """No response came back from the service; ``response_flags`` says why, Envoy-style."""

    def __init__(
        self, message: str, *, request: httpx.Request, response_flags: str, attempts: int
    ) -> None:
        super().__init__(message, request=request)
        self.response_flags = response_flags
        self.attempts = attempts


class UpstreamConnectError(UpstreamError, httpx.ConnectError, ConnectionError):
    """No endpoint of the service accepted a connection."""


class UpstreamTimeout(UpstreamError, httpx.TimeoutException, TimeoutError):
    """The route's timeout (or the last try's) passed before a response arrived."""


class UpstreamReset(UpstreamError, httpx.ReadError, ConnectionError):
    """The connection broke before the response headers arrived."""
