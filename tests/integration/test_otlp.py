"""OpenTelemetry's OTLP exporter works beside xds-protos (DESIGN.md §5: xds-protos installs stale
copies of OpenTelemetry's protos, and whichever package installed last wins): it imports and
exports spans to a collector on 127.0.0.1."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parents[2] / "examples" / "services"))
from collector import Collector


def test_the_otlp_exporter_imports_and_exports_with_xds_protos_installed() -> None:
    import envoy.config.cluster.v3.cluster_pb2  # noqa: F401  (xds-protos, loaded first)
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor

    collector = Collector()
    try:
        provider = TracerProvider(resource=Resource.create({"service.name": "otlp-check"}))
        exporter = OTLPSpanExporter(endpoint=f"{collector.endpoint}/v1/traces")
        provider.add_span_processor(SimpleSpanProcessor(exporter))
        with provider.get_tracer("test").start_as_current_span("exported") as span:
            span.set_attribute("mesh", "libmesh")
        provider.shutdown()

        (received,) = collector.spans
        assert received.name == "exported"
        assert received.service == "otlp-check"
        assert received.attributes == {"mesh": "libmesh"}
        assert received.trace_id == f"{span.get_span_context().trace_id:032x}"
    finally:
        collector.close()
