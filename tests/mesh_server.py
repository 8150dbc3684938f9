"""A FastAPI workload in the mesh, for tests: connects to meshd with a bootstrap token,
registers itself, and serves with ``libmesh.serve`` (the mesh's mutual TLS, PeerAuthentication).

    python -m tests.mesh_server XDS_ADDRESS TOKEN PORT [NAMESPACE SERVICE_ACCOUNT APP]

``SVID_TTL`` (seconds) shortens its certificates' lifetime. ``GET /`` answers the caller's
verified SPIFFE ID (``""`` over plaintext) as JSON; ``GET /?show=jwt`` what RequestAuthentication
made of the request (its principal, the headers the app got)."""

from __future__ import annotations

import logging
import os
import sys

from fastapi import FastAPI, Request

import libmesh


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    address, token, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
    extra = sys.argv[4:7]
    namespace = extra[0] if extra else "shop"
    account = extra[1] if len(extra) > 1 else "pay"
    app_label = extra[2] if len(extra) > 2 else "pay"
    mesh = libmesh.Mesh.connect(
        address,
        namespace=namespace,
        service_account=account,
        labels={"app": app_label, "security.istio.io/tlsMode": "istio"},
        ports={"http": port},
        token=token,
        state_file=None,
        svid_ttl=float(os.environ.get("SVID_TTL", 24 * 3600)),
    )
    app = FastAPI()

    @app.get("/")
    async def who(request: Request) -> dict[str, str]:
        inbound = libmesh.current_inbound()
        if request.query_params.get("show") == "jwt":  # what authentication made of it
            return {
                "request": inbound.request_principal if inbound else "?",
                "authorization": request.headers.get("authorization", ""),
                "x-sub": request.headers.get("x-sub", ""),
            }
        return {"peer": inbound.peer_principal if inbound else "?"}

    app.add_middleware(libmesh.middleware.MeshMiddleware, mesh=mesh)
    print("serving", flush=True)
    libmesh.serve(app, mesh, host="127.0.0.1", port=port, log_level="warning")


if __name__ == "__main__":
    main()
