"""The shop's orders service: a Flask app. POST /orders reserves the item in inventory (grpc)
and asks the frontend (FastAPI) for its price, both through the mesh."""

from __future__ import annotations

from _common import port, setup
from flask import Flask, request
from werkzeug.middleware.dispatcher import DispatcherMiddleware
from werkzeug.serving import WSGIRequestHandler, make_server

import libmesh

mesh = setup("orders", {"http": port("ORDERS_PORT")})
app = Flask(__name__)
app.wsgi_app = libmesh.middleware.MeshWSGIMiddleware(app.wsgi_app, mesh=mesh)  # the one line
app.wsgi_app = DispatcherMiddleware(
    app.wsgi_app, {"/metrics": libmesh.middleware.metrics_wsgi_app(mesh)}
)
http = mesh.client(timeout=10)
inventory = mesh.grpc_channel("inventory.shop.svc.cluster.local:9000")
reserve = inventory.unary_unary("/shop.Inventory/Reserve")


@app.post("/orders")
def create_order() -> dict[str, object]:
    item = request.get_json()["item"]
    reservation = reserve(item.encode(), timeout=5).decode()
    price = http.get(f"http://frontend.shop.svc.cluster.local:8000/price/{item}").json()["price"]
    return {"item": item, "reservation": reservation, "price": price}


class Quiet(WSGIRequestHandler):
    def log_request(self, *args: object) -> None:
        pass  # libmesh's access log says more, when LIBMESH_ACCESS_LOG is set


if __name__ == "__main__":
    make_server(
        "127.0.0.1", port("ORDERS_PORT"), app, threaded=True, request_handler=Quiet
    ).serve_forever()
