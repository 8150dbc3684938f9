"""The proxy's admin port: readiness, Prometheus metrics and a dump of the configuration in
force, as Envoy's admin interface has them (``/ready``, ``/stats/prometheus``,
``/config_dump``)."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from typing import Any

from google.protobuf import json_format

from ..middleware import metrics_asgi_app
from ..middleware._asgi import ASGIApp, Receive, Scope, Send
from ..xds import CLUSTER, ENDPOINT, LISTENER, ROUTE

__all__ = ["admin_app"]

_SECTIONS = {LISTENER: "listeners", ROUTE: "routes", CLUSTER: "clusters", ENDPOINT: "endpoints"}


def config_dump(mesh: Any, listeners: list[dict[str, str]]) -> dict[str, Any]:
    """What the proxy runs on: its own listeners, the control plane connection, and the xDS
    resources in force (as JSON, Envoy's field names)."""
    engine = mesh.engine
    status = mesh.xds_status
    dump: dict[str, Any] = {
        "version": engine.version,
        "node": {"id": mesh.node.id, "namespace": mesh.node.namespace},
        "identity": str(mesh.identity.identity) if mesh.identity is not None else None,
        "proxy_listeners": listeners,
        "control_plane": dataclasses.asdict(status) if status is not None else None,
    }
    snapshot = engine.snapshot
    for type_url, section in _SECTIONS.items():
        resources = snapshot.resources.get(type_url, {}) if snapshot is not None else {}
        dump[section] = [
            json_format.MessageToDict(message, preserving_proto_field_name=True)
            for message in resources.values()
        ]
    return dump


def admin_app(mesh: Any, listeners: list[dict[str, str]], draining: Callable[[], bool]) -> ASGIApp:
    metrics = metrics_asgi_app(mesh)

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        path = scope["path"]
        if path in ("/metrics", "/stats/prometheus"):
            await metrics(scope, receive, send)
            return
        if path == "/ready":
            # Envoy's answers: LIVE, or 503 while it has no configuration or drains
            state = "DRAINING" if draining() else "LIVE" if mesh.engine.version else "INITIALIZING"
            await _send(send, 200 if state == "LIVE" else 503, "text/plain", state + "\n")
        elif path == "/config_dump":
            body = json.dumps(config_dump(mesh, listeners), indent=2, default=str)
            await _send(send, 200, "application/json", body + "\n")
        elif path == "/":
            await _send(send, 200, "text/plain", _INDEX)
        else:
            await _send(send, 404, "text/plain", f"no {path} here\n{_INDEX}")

    return app


_INDEX = """libmesh-proxy admin
  /ready          200 LIVE when configured; 503 INITIALIZING or DRAINING
  /metrics        Istio's metrics, Prometheus text format (also /stats/prometheus)
  /config_dump    the proxy's listeners and the xDS configuration in force (JSON)
"""


async def _send(send: Send, status: int, content_type: str, text: str) -> None:
    body = text.encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", content_type.encode()),
                (b"content-length", str(len(body)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})
