"""What the three example services share: who they are, tracing, and the mesh."""

from __future__ import annotations

import os

from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor

import libmesh


def setup(app: str, ports: dict[str, int]) -> libmesh.Mesh:
    """Trace to OTLP when OTEL_EXPORTER_OTLP_ENDPOINT is set (OpenTelemetry's own variable),
    then join the mesh: meshd at LIBMESH_XDS_ADDRESS, registered as an instance of ``app``."""
    if os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT"):
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        provider = TracerProvider(resource=Resource.create({"service.name": app}))
        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
        trace.set_tracer_provider(provider)
    return libmesh.Mesh.connect(
        namespace="shop",
        labels={"app": app, "version": "v1"},
        service_account=app,
        ports=ports,
        workload_address="127.0.0.1",
        state_file=None,
    )


def port(name: str) -> int:
    return int(os.environ[name])
