"""The shop's frontend: a FastAPI service. GET /checkout/{item} orders the item from the
orders service (Flask); GET /price/{item} is what orders asks it back."""

from __future__ import annotations

import uvicorn
from _common import port, setup
from fastapi import FastAPI

import libmesh

mesh = setup("frontend", {"http": port("FRONTEND_PORT")})
app = FastAPI()
app.add_middleware(libmesh.middleware.MeshMiddleware, mesh=mesh)  # the one line
app.mount("/metrics", libmesh.middleware.metrics_asgi_app(mesh))
orders = mesh.async_client(timeout=10)


@app.get("/checkout/{item}")
async def checkout(item: str) -> dict[str, object]:
    response = await orders.post(
        "http://orders.shop.svc.cluster.local:8001/orders", json={"item": item}
    )
    response.raise_for_status()
    return {"order": response.json(), "request_id": libmesh.current_inbound().request_id}


@app.get("/price/{item}")
async def price(item: str) -> dict[str, object]:
    return {"item": item, "price": 42}


if __name__ == "__main__":
    uvicorn.run(app, host="127.0.0.1", port=port("FRONTEND_PORT"), log_level="warning")
