"""libmesh's grpc server interceptor with the workload's policies, on a real grpcio server on
127.0.0.1 called in plaintext: port-level PeerAuthentication (the interceptor is told its port),
and AuthorizationPolicy on the method path and on the port."""

from __future__ import annotations

import textwrap
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import pytest

import libmesh
from tests.conftest import unused_port

POLICIES = """
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {{name: echo, namespace: shop}}
spec:
  selector: {{matchLabels: {{app: echo}}}}
  mtls: {{mode: PERMISSIVE}}
  portLevelMtls: {{"{strict}": {{mode: STRICT}}}}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: no-admin, namespace: shop}}
spec:
  selector: {{matchLabels: {{app: echo}}}}
  action: DENY
  rules:
  - to: [{{operation: {{paths: ["/test.Admin/*"]}}}}]
  - to: [{{operation: {{ports: ["{closed}"]}}}}]
"""


def serve(mesh: libmesh.Mesh, port: int) -> grpc.Server:
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=4),
        interceptors=[libmesh.middleware.MeshServerInterceptor(mesh, port=port)],
    )
    handler = grpc.unary_unary_rpc_method_handler(lambda request, context: b"ok")
    for service in ("test.Echo", "test.Admin"):
        server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(service, {"Call": handler}),)
        )
    server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    return server


def call(port: int, method: str = "/test.Echo/Call") -> str:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        try:
            return channel.unary_unary(method)(b"", timeout=5).decode()
        except grpc.RpcError as exc:
            return f"{exc.code().name}: {exc.details()}"


@pytest.fixture
def ports(tmp_path: Path) -> Iterator[tuple[int, int, int]]:
    open_port, strict, closed = unused_port(), unused_port(), unused_port()
    (tmp_path / "policies.yaml").write_text(
        textwrap.dedent(POLICIES.format(strict=strict, closed=closed))
    )
    mesh = libmesh.Mesh.from_files(tmp_path, namespace="shop", labels={"app": "echo"}, watch=False)
    servers = [serve(mesh, port) for port in (open_port, strict, closed)]
    yield open_port, strict, closed
    for server in servers:
        server.stop(None)
    mesh.close()


def test_port_level_mtls_and_authorization_reach_grpc_calls(ports: tuple[int, int, int]) -> None:
    open_port, strict, closed = ports
    assert call(open_port) == "ok"  # PERMISSIVE takes plaintext
    assert call(strict) == (
        f"UNAUTHENTICATED: mutual TLS required: port {strict} is STRICT (PeerAuthentication)"
    )
    assert call(open_port, "/test.Admin/Call") == "PERMISSION_DENIED: RBAC: access denied"
    assert call(closed) == "PERMISSION_DENIED: RBAC: access denied"  # the `ports` rule
