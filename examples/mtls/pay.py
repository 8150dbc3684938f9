"""The pay service: a FastAPI app in the mesh, served by libmesh (mutual TLS in the process),
and a gRPC service beside it on a port libmesh takes as PeerAuthentication says.

    LIBMESH_TOKEN=$(meshctl token create -n shop -s pay --ca-dir ...) \
        python examples/mtls/pay.py XDS_ADDRESS PORT GRPC_PORT
"""

from __future__ import annotations

import logging
import sys
from concurrent import futures

import grpc
from fastapi import FastAPI

import libmesh

logging.basicConfig(level=logging.INFO, format="    pay | %(message)s")
address, port, grpc_port = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])

# The token (LIBMESH_TOKEN) gets this process its SVID, spiffe://cluster.local/ns/shop/sa/pay;
# the tlsMode label tells callers it terminates the mesh's mTLS (auto mTLS).
mesh = libmesh.Mesh.connect(
    address,
    namespace="shop",
    service_account="pay",
    labels={"app": "pay", "security.istio.io/tlsMode": "istio"},
    ports={"http": port, "grpc": grpc_port},
    state_file=None,
)
app = FastAPI()
app.add_middleware(libmesh.middleware.MeshMiddleware, mesh=mesh)


@app.get("/balance")
async def balance() -> dict[str, object]:
    caller = libmesh.current_inbound()
    return {"balance": 42, "caller": caller.peer_principal if caller else ""}


def ledger(request: bytes, context: grpc.ServicerContext) -> bytes:
    caller = libmesh.current_inbound()
    return f"balance 42 for {caller.peer_principal if caller else ''}".encode()


server = grpc.server(
    futures.ThreadPoolExecutor(max_workers=4),
    interceptors=[libmesh.middleware.MeshServerInterceptor(mesh, port=grpc_port)],
)
server.add_generic_rpc_handlers(
    (grpc.method_handlers_generic_handler("pay.Ledger", {
        "Balance": grpc.unary_unary_rpc_method_handler(ledger)
    }),)
)  # fmt: skip
# grpcio takes TLS or plaintext per port; libmesh takes the port and follows PeerAuthentication
grpc_port_served = libmesh.middleware.MeshGrpcPort(server, mesh, f"127.0.0.1:{grpc_port}")
server.start()
grpc_port_served.start()

libmesh.serve(app, mesh, host="127.0.0.1", port=port, log_level="warning")
