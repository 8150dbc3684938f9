"""The web service: a FastAPI app with libmesh, calling catalog (nginx behind libmesh-proxy).

    LIBMESH_TOKEN=$(meshctl token create -n shop -s web --ca-dir ...) \
        python examples/proxy/web.py XDS_ADDRESS PORT
"""

from __future__ import annotations

import sys

from fastapi import FastAPI
from fastapi.responses import PlainTextResponse

import libmesh

address, port = sys.argv[1], int(sys.argv[2])
mesh = libmesh.Mesh.connect(
    address,
    namespace="shop",
    service_account="web",
    labels={"app": "web", "security.istio.io/tlsMode": "istio"},
    ports={"http": port},
    state_file=None,
)
catalog = mesh.async_client()
app = FastAPI()
app.add_middleware(libmesh.middleware.MeshMiddleware, mesh=mesh)


@app.get("/", response_class=PlainTextResponse)
async def home() -> str:
    caller = libmesh.current_inbound()
    answer = await catalog.get("http://catalog.shop.svc.cluster.local:8080/items")
    who = caller.peer_principal if caller else "?"
    return f"web (called by {who}) got from catalog: {answer.text}"


libmesh.serve(app, mesh, host="127.0.0.1", port=port, log_level="warning")
