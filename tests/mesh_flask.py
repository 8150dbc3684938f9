"""A Flask workload in the mesh, for tests: served by ``libmesh.serve(..., interface="wsgi")``
(uvicorn, the mesh's mutual TLS terminated in the process), ``MeshWSGIMiddleware`` inside.

    python -m tests.mesh_flask XDS_ADDRESS TOKEN PORT

``GET /`` answers the caller's verified SPIFFE ID (``""`` over plaintext) and the headers the
app saw, as JSON."""

from __future__ import annotations

import logging
import sys

from flask import Flask, jsonify, request

import libmesh


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    address, token, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
    mesh = libmesh.Mesh.connect(
        address,
        namespace="shop",
        service_account="pay",
        labels={"app": "pay", "security.istio.io/tlsMode": "istio"},
        ports={"http": port},
        token=token,
        state_file=None,
    )
    app = Flask(__name__)

    @app.get("/")
    def who():  # type: ignore[no-untyped-def]
        inbound = libmesh.current_inbound()
        seen = sorted(name.lower() for name, _ in request.headers.items())
        return jsonify(peer=inbound.peer_principal if inbound else "?", headers=seen)

    app.wsgi_app = libmesh.middleware.MeshWSGIMiddleware(app.wsgi_app, mesh=mesh)  # type: ignore[method-assign]
    print("serving", flush=True)
    libmesh.serve(app, mesh, host="127.0.0.1", port=port, interface="wsgi", log_level="warning")


if __name__ == "__main__":
    main()
