"""A tiny OpenTelemetry collector for the example and its tests: it accepts OTLP over HTTP
(protobuf, ``POST /v1/traces``) on 127.0.0.1 and keeps the spans in memory. Point any
OpenTelemetry SDK at it with ``OTEL_EXPORTER_OTLP_ENDPOINT=http://127.0.0.1:<port>``."""

from __future__ import annotations

import http.server
import threading
import time
from dataclasses import dataclass

from opentelemetry.proto.collector.trace.v1 import trace_service_pb2

KINDS = {0: "UNSPECIFIED", 1: "INTERNAL", 2: "SERVER", 3: "CLIENT", 4: "PRODUCER", 5: "CONSUMER"}


@dataclass(frozen=True)
class Span:
    service: str
    name: str
    kind: str
    trace_id: str
    span_id: str
    parent_id: str
    scope: str  # the instrumentation that made the span (libmesh, fastapi, …)
    start: int  # nanoseconds since the epoch
    attributes: dict[str, object]


class Collector:
    def __init__(self) -> None:
        self.spans: list[Span] = []
        self._lock = threading.Lock()
        collector = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                if self.path == "/v1/traces":
                    collector._add(trace_service_pb2.ExportTraceServiceRequest.FromString(body))
                reply = trace_service_pb2.ExportTraceServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("content-type", "application/x-protobuf")
                self.send_header("content-length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            def log_message(self, format: str, *args: object) -> None:
                pass

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.endpoint = f"http://127.0.0.1:{self._server.server_address[1]}"
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def _add(self, request: trace_service_pb2.ExportTraceServiceRequest) -> None:
        spans = []
        for resource_spans in request.resource_spans:
            service = next(
                (a.value.string_value for a in resource_spans.resource.attributes
                 if a.key == "service.name"), "",
            )  # fmt: skip
            for scope_spans in resource_spans.scope_spans:
                scope = scope_spans.scope.name
                for span in scope_spans.spans:
                    attributes = {
                        a.key: getattr(a.value, a.value.WhichOneof("value") or "string_value")
                        for a in span.attributes
                    }
                    spans.append(
                        Span(service, span.name, KINDS[span.kind], span.trace_id.hex(),
                             span.span_id.hex(), span.parent_span_id.hex(), scope,
                             span.start_time_unix_nano, attributes)
                    )  # fmt: skip
        with self._lock:
            self.spans.extend(spans)

    def trace(self, trace_id: str) -> list[Span]:
        with self._lock:
            return [s for s in self.spans if s.trace_id == trace_id]

    def wait_for(self, trace_id: str, count: int, timeout: float = 15) -> list[Span]:
        """The trace's spans once ``count`` of them show in its :func:`tree` (services export
        in batches, each on its own schedule)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            spans = self.trace(trace_id)
            if len(tree(spans)) >= count:
                time.sleep(0.2)  # stragglers
                return self.trace(trace_id)
            time.sleep(0.05)
        return self.trace(trace_id)

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def tree(spans: list[Span]) -> list[str]:
    """The spans of one trace as an indented tree, each sibling list in start order. Spans
    frameworks make inside a service (FastAPI's ``fastapi.endpoint``, …) are left out, their
    children shown under the nearest span kept: the tree shows the calls between services."""
    by_id = {s.span_id: s for s in spans}

    def kept(span: Span) -> bool:
        return span.scope == "libmesh" or span.kind != "INTERNAL"

    def parent_of(span: Span) -> str:
        parent = by_id.get(span.parent_id)
        while parent is not None and not kept(parent):
            parent = by_id.get(parent.parent_id)
        return parent.span_id if parent is not None else ""

    children: dict[str, list[Span]] = {}
    for span in spans:
        if kept(span):
            children.setdefault(parent_of(span), []).append(span)
    lines: list[str] = []

    def walk(parent: str, depth: int) -> None:
        for span in sorted(children.get(parent, []), key=lambda s: s.start):
            lines.append(f"{'  ' * depth}{span.service}: {span.kind} {span.name}")
            walk(span.span_id, depth + 1)

    walk("", 0)
    return lines
