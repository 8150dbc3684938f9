"""The pay service: a FastAPI app in the mesh, served by libmesh (mutual TLS in the process).

    LIBMESH_TOKEN=$(meshctl token create -n shop -s pay --ca-dir ...) \
        python examples/mtls/pay.py XDS_ADDRESS PORT
"""

from __future__ import annotations

import logging
import sys

from fastapi import FastAPI

import libmesh

logging.basicConfig(level=logging.INFO, format="    pay | %(message)s")
address, port = sys.argv[1], int(sys.argv[2])

# The token (LIBMESH_TOKEN) gets this process its SVID, spiffe://cluster.local/ns/shop/sa/pay;
# the tlsMode label tells callers it terminates the mesh's mTLS (auto mTLS).
mesh = libmesh.Mesh.connect(
    address,
    namespace="shop",
    service_account="pay",
    labels={"app": "pay", "security.istio.io/tlsMode": "istio"},
    ports={"http": port},
    state_file=None,
)
app = FastAPI()
app.add_middleware(libmesh.middleware.MeshMiddleware, mesh=mesh)


@app.get("/balance")
async def balance() -> dict[str, object]:
    caller = libmesh.current_inbound()
    return {"balance": 42, "caller": caller.peer_principal if caller else ""}


libmesh.serve(app, mesh, host="127.0.0.1", port=port, log_level="warning")
