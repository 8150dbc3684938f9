"""The inbound side: middleware for ASGI (FastAPI, Starlette) and WSGI (Flask) applications,
and interceptors for grpcio servers. Each is one line to add; each continues the caller's
trace, records Istio's server-side metrics and access logs, and gives the application the
request's mesh context (``libmesh.current_inbound()``)."""

from ._asgi import MeshMiddleware, metrics_asgi_app
from ._grpc import AsyncMeshServerInterceptor, MeshServerInterceptor
from ._grpc_port import MeshGrpcPort
from ._serve import serve, serve_async
from ._wsgi import MeshWSGIMiddleware, metrics_wsgi_app

__all__ = [
    "AsyncMeshServerInterceptor",
    "MeshGrpcPort",
    "MeshMiddleware",
    "MeshServerInterceptor",
    "MeshWSGIMiddleware",
    "metrics_asgi_app",
    "metrics_wsgi_app",
    "serve",
    "serve_async",
]
