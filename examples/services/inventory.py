"""The shop's inventory: a grpc service (/shop.Inventory/Reserve, bytes in and out), with its
metrics on a separate HTTP port."""

from __future__ import annotations

import threading
from concurrent import futures
from wsgiref.simple_server import WSGIRequestHandler, make_server

import grpc
from _common import port, setup

import libmesh


class _Quiet(WSGIRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass


def reserve(item: bytes, context: grpc.ServicerContext) -> bytes:
    if not item:
        context.abort(grpc.StatusCode.INVALID_ARGUMENT, "which item?")
    return b"reserved:" + item


def main() -> None:
    mesh = setup("inventory", {"grpc": port("INVENTORY_PORT")})
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=8),
        interceptors=[libmesh.middleware.MeshServerInterceptor(mesh)],  # the one line
    )
    server.add_generic_rpc_handlers(
        [
            grpc.method_handlers_generic_handler(
                "shop.Inventory", {"Reserve": grpc.unary_unary_rpc_method_handler(reserve)}
            )
        ]
    )
    server.add_insecure_port(f"127.0.0.1:{port('INVENTORY_PORT')}")
    server.start()
    metrics = make_server(
        "127.0.0.1",
        port("INVENTORY_METRICS_PORT"),
        libmesh.middleware.metrics_wsgi_app(mesh),
        handler_class=_Quiet,
    )
    threading.Thread(target=metrics.serve_forever, daemon=True).start()
    server.wait_for_termination()


if __name__ == "__main__":
    main()
