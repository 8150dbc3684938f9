"""A gRPC workload and a grpcio xDS client in the mesh, for tests, each its own process.

python -m tests.mesh_grpc server XDS_ADDRESS TOKEN PORT
    serves /test.Echo/Who over mutual TLS with its SVID (shop/echo), through libmesh's
    server interceptor: it answers the caller's SPIFFE ID
python -m tests.mesh_grpc client XDS_ADDRESS TOKEN ACCOUNT TARGET CALLS
    gets shop/ACCOUNT's SVID, keeps it in files for grpcio's file_watcher provider, dials
    xds:///TARGET with grpcio's xDS credentials and prints one JSON line per call
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from concurrent import futures
from pathlib import Path

import grpc

import libmesh
from libmesh.identity import SpiffeId, WorkloadIdentity, grpc_server_credentials


def server(address: str, token: str, port: int) -> None:
    mesh = libmesh.Mesh.connect(
        address, namespace="shop", service_account="echo", token=token, state_file=None
    )
    assert mesh.identity is not None

    def who(request: bytes, context: grpc.ServicerContext) -> bytes:
        inbound = libmesh.current_inbound()
        return (inbound.peer_principal if inbound else "?").encode()

    instance = grpc.server(
        futures.ThreadPoolExecutor(max_workers=4),
        interceptors=[libmesh.middleware.MeshServerInterceptor(mesh)],
    )
    handlers = {"Who": grpc.unary_unary_rpc_method_handler(who)}
    instance.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler("test.Echo", handlers),)
    )
    instance.add_secure_port(f"127.0.0.1:{port}", grpc_server_credentials(mesh.identity))
    instance.start()
    print("serving", flush=True)
    instance.wait_for_termination()


def client(address: str, token: str, account: str, target: str, calls: int) -> None:
    identity = WorkloadIdentity(
        address, SpiffeId.for_workload("cluster.local", "shop", account), token=token
    ).start()
    identity.wait()
    directory = tempfile.mkdtemp(prefix="svid-")
    identity.write_files(Path(directory))
    channel = libmesh.xds_channel(
        target, xds_address=address, namespace="shop", service_account=account,
        certificates=directory,
    )  # fmt: skip
    who = channel.unary_unary("/test.Echo/Who")
    for _ in range(calls):
        try:
            answer = {"peer": who(b"", timeout=10).decode()}
        except grpc.RpcError as exc:
            answer = {"code": exc.code().name, "details": exc.details()}
        print(json.dumps(answer), flush=True)
        time.sleep(0.05)
    channel.close()
    identity.close()


def xds_server(address: str, token: str, port: int) -> None:
    """A grpcio xDS server (shop/echo): meshd's listener decides its TLS and its RBAC, which
    grpcio enforces itself; it answers the caller's URI SAN."""
    identity = WorkloadIdentity(
        address, SpiffeId.for_workload("cluster.local", "shop", "echo"), token=token
    ).start()
    identity.wait()
    directory = Path(tempfile.mkdtemp(prefix="svid-"))
    identity.write_files(directory)
    bootstrap = libmesh.xds_bootstrap(
        xds_address=address, namespace="shop", service_account="echo", certificates=directory
    )
    os.environ["GRPC_XDS_BOOTSTRAP_CONFIG"] = json.dumps(bootstrap)

    def who(request: bytes, context: grpc.ServicerContext) -> bytes:
        names = (context.auth_context() or {}).get("x509_subject_alternative_name", [])
        uris = [name for name in names if name.startswith(b"spiffe://")]  # (not the DNS form)
        return b",".join(uris) or b"-"

    instance = grpc.server(futures.ThreadPoolExecutor(max_workers=4), xds=True)
    handlers = {"Who": grpc.unary_unary_rpc_method_handler(who)}
    instance.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler("test.Echo", handlers),)
    )
    credentials = grpc.xds_server_credentials(grpc.insecure_server_credentials())
    instance.add_secure_port(f"127.0.0.1:{port}", credentials)
    instance.start()
    print("serving", flush=True)
    instance.wait_for_termination()


if __name__ == "__main__":
    role, *rest = sys.argv[1:]
    if role == "server":
        server(rest[0], rest[1], int(rest[2]))
    elif role == "xds-server":
        xds_server(rest[0], rest[1], int(rest[2]))
    else:
        client(rest[0], rest[1], rest[2], rest[3], int(rest[4]))
