"""What libmesh's httpx transport records about outbound calls, against a real backend: a span
per logical call and one per attempt, the trace headers each attempt carries (W3C, B3), the
request id, Istio's metrics with their labels and buckets, and the access log — and nothing
recorded twice when OpenTelemetry's own httpx instrumentation is on."""

from __future__ import annotations

import io
import json
import re
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

import libmesh
from libmesh.telemetry import AccessLog, Propagation
from tests.conftest import Backends, service

URL = "http://reviews.shop.svc.cluster.local:8080"
StartBackends = Callable[[int], Backends]

_EXPORTER = InMemorySpanExporter()


@pytest.fixture(scope="module", autouse=True)
def tracer_provider() -> None:
    """One SDK provider for the process (OpenTelemetry allows setting it once)."""
    current = trace.get_tracer_provider()
    if not isinstance(current, TracerProvider):
        provider = TracerProvider()
        provider.add_span_processor(SimpleSpanProcessor(_EXPORTER))
        trace.set_tracer_provider(provider)
    else:  # another module set it first: add our exporter to it
        current.add_span_processor(SimpleSpanProcessor(_EXPORTER))


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    _EXPORTER.clear()
    yield _EXPORTER
    _EXPORTER.clear()


@pytest.fixture
def mesh(start_backends: StartBackends, tmp_path: Path) -> Iterator[tuple[libmesh.Mesh, Backends]]:
    backends = start_backends(1)
    routes = """
    apiVersion: networking.istio.io/v1
    kind: VirtualService
    metadata: {name: reviews, namespace: shop}
    spec:
      hosts: [reviews]
      http:
      - route: [{destination: {host: reviews}}]
        retries: {attempts: 2, retryOn: 5xx}
    """
    registry = service("reviews", "shop", backends.ports, labels=[{"version": "v2"}])
    (tmp_path / "mesh.yaml").write_text(registry + "\n---\n" + textwrap.dedent(routes))
    mesh = libmesh.Mesh.from_files(
        tmp_path, namespace="shop", labels={"app": "frontend", "version": "v1"}, watch=False
    )
    yield mesh, backends
    mesh.close()


def test_a_retried_call_is_one_logical_span_with_a_client_span_per_attempt(
    mesh: tuple[libmesh.Mesh, Backends], spans: InMemorySpanExporter
) -> None:
    mesh_, backends = mesh
    backends.behave(0, status=503, fail_first=1)
    with mesh_.client() as client:
        response = client.get(URL + "/reviews/1")
    assert response.status_code == 200

    finished = spans.get_finished_spans()
    (call,) = [s for s in finished if s.kind is trace.SpanKind.INTERNAL]
    attempts = sorted(
        (s for s in finished if s.kind is trace.SpanKind.CLIENT), key=lambda s: s.start_time or 0
    )
    assert call.name == "reviews.shop.svc.cluster.local:8080/*"
    assert [a.attributes["http.response.status_code"] for a in attempts] == [503, 200]
    assert [a.attributes["http.request.resend_count"] for a in attempts] == [0, 1]
    assert all(a.parent is not None and a.parent.span_id == call.context.span_id for a in attempts)
    # the last attempt's context is what the backend received
    sent = backends.stats(0)["last_headers"]
    trace_id, span_id = (
        f"{attempts[1].context.trace_id:032x}",
        f"{attempts[1].context.span_id:016x}",
    )
    assert sent["traceparent"].startswith(f"00-{trace_id}-{span_id}-")
    assert sent["x-b3-traceid"] == trace_id
    assert sent["x-b3-spanid"] == span_id
    assert re.fullmatch(r"[0-9a-f-]{36}", sent["x-request-id"])
    assert "x-envoy-peer-metadata" in sent


def test_b3_only_propagation(
    mesh: tuple[libmesh.Mesh, Backends], spans: InMemorySpanExporter
) -> None:
    mesh_, backends = mesh
    mesh_.telemetry.propagation = Propagation(("b3",))
    with mesh_.client() as client:
        client.get(URL + "/")
    sent = backends.stats(0)["last_headers"]
    (attempt,) = [s for s in spans.get_finished_spans() if s.kind is trace.SpanKind.CLIENT]
    context = attempt.context
    assert sent["b3"] == f"{context.trace_id:032x}-{context.span_id:016x}-1"
    assert "traceparent" not in sent
    assert "x-b3-traceid" not in sent


def test_istio_metrics_count_each_call_with_istios_labels_and_buckets(
    mesh: tuple[libmesh.Mesh, Backends],
) -> None:
    mesh_, backends = mesh
    with mesh_.client() as client:
        for _ in range(7):
            client.get(URL + "/ok")
        backends.behave(0, status=404)
        for _ in range(3):
            client.get(URL + "/missing")

    text = mesh_.telemetry.render_metrics()
    samples = _samples(text, "istio_requests_total")
    ok = [s for s in samples if s[0]["response_code"] == "200"]
    missing = [s for s in samples if s[0]["response_code"] == "404"]
    assert [value for _, value in ok] == [7.0]
    assert [value for _, value in missing] == [3.0]
    labels = ok[0][0]
    assert labels["reporter"] == "source"
    assert labels["source_workload"] == "frontend-v1"
    assert labels["source_app"] == "frontend"
    assert labels["source_workload_namespace"] == "shop"
    assert labels["destination_service"] == "reviews.shop.svc.cluster.local"
    assert labels["destination_service_name"] == "reviews"
    assert labels["destination_service_namespace"] == "shop"
    assert labels["destination_app"] == "reviews"
    assert labels["destination_version"] == "v2"
    assert labels["request_protocol"] == "http"
    assert labels["response_flags"] == "-"
    assert len(labels) == 25
    buckets = _samples(text, "istio_request_duration_milliseconds_bucket")
    infinite = [v for lab, v in buckets if lab["le"] == "+Inf" and lab["response_code"] == "200"]
    assert infinite == [7.0]
    sizes = _samples(text, "istio_response_bytes_count")
    assert sorted(v for _, v in sizes) == [3.0, 7.0]
    assert "# TYPE istio_request_duration_milliseconds histogram" in text
    # libmesh's own counters, read from the engine
    own = {lab["cluster"]: v for lab, v in _samples(text, "libmesh_upstream_rq_total")}
    assert own["outbound|8080||reviews.shop.svc.cluster.local"] == 10.0


def test_failures_are_counted_with_their_response_flags(
    mesh: tuple[libmesh.Mesh, Backends],
) -> None:
    mesh_, backends = mesh
    backends.behave(0, status=503)
    with mesh_.client() as client:
        assert client.get(URL + "/").status_code == 503

    (sample,) = _samples(mesh_.telemetry.render_metrics(), "istio_requests_total")
    assert sample[0]["response_code"] == "503"
    assert sample[0]["response_flags"] == "URX"  # retries exhausted, as Envoy flags it


def test_the_access_log_is_json_lines_with_envoys_fields(
    mesh: tuple[libmesh.Mesh, Backends], spans: InMemorySpanExporter
) -> None:
    mesh_, _ = mesh
    stream = io.StringIO()
    mesh_.telemetry.access_log = AccessLog(stream)
    with mesh_.client() as client:
        client.get(URL + "/reviews/2?x=1", headers={"x-request-id": "req-42"})

    (line,) = stream.getvalue().splitlines()
    entry = json.loads(line)
    (call,) = [s for s in spans.get_finished_spans() if s.kind is trace.SpanKind.INTERNAL]
    assert entry["method"] == "GET"
    assert entry["path"] == "/reviews/2"
    assert entry["response_code"] == 200
    assert entry["response_flags"] == "-"
    assert entry["request_id"] == "req-42"
    assert entry["authority"] == "reviews.shop.svc.cluster.local:8080"
    assert entry["upstream_cluster"] == "outbound|8080||reviews.shop.svc.cluster.local"
    assert re.fullmatch(r"127\.0\.0\.1:\d+", entry["upstream_host"])
    assert entry["trace_id"] == f"{call.context.trace_id:032x}"
    assert entry["bytes_received"] > 0
    assert isinstance(entry["duration"], int)
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", entry["start_time"])


def test_opentelemetrys_httpx_instrumentation_does_not_duplicate_attempt_spans(
    mesh: tuple[libmesh.Mesh, Backends], spans: InMemorySpanExporter
) -> None:
    from opentelemetry.instrumentation.httpx import HTTPXClientInstrumentor

    mesh_, _ = mesh
    instrumentor = HTTPXClientInstrumentor()
    instrumentor.instrument()
    try:
        with mesh_.client() as client:
            client.get(URL + "/")
    finally:
        instrumentor.uninstrument()

    kinds = sorted(s.kind.name for s in spans.get_finished_spans())
    assert kinds == ["CLIENT", "INTERNAL"]


def _samples(text: str, name: str) -> list[tuple[dict[str, str], float]]:
    found = []
    for line in text.splitlines():
        if line.startswith(name + "{"):
            labels = dict(re.findall(r'(\w+)="([^"]*)"', line))
            found.append((labels, float(line.rsplit(" ", 1)[1])))
    return found


def test_istio_metrics_through_the_opentelemetry_metrics_api(
    mesh: tuple[libmesh.Mesh, Backends],
) -> None:
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader

    mesh_, _ = mesh
    reader = InMemoryMetricReader()
    mesh_.telemetry.use_opentelemetry_metrics(MeterProvider(metric_readers=[reader]))
    with mesh_.client() as client:
        for _ in range(4):
            client.get(URL + "/")

    data = reader.get_metrics_data()
    assert data is not None
    metrics = {
        m.name: m for rm in data.resource_metrics for sm in rm.scope_metrics for m in sm.metrics
    }
    (requests,) = metrics["istio_requests_total"].data.data_points
    assert requests.value == 4
    assert requests.attributes["destination_service"] == "reviews.shop.svc.cluster.local"
    assert requests.attributes["reporter"] == "source"
    (duration,) = metrics["istio_request_duration_milliseconds"].data.data_points
    assert duration.count == 4
    assert list(duration.explicit_bounds)[:3] == [0.5, 1, 5]
    assert metrics["istio_response_bytes"].unit == "By"
    # and the Prometheus endpoint still counts them
    text = mesh_.telemetry.render_metrics()
    assert [v for _, v in _samples(text, "istio_requests_total")] == [4.0]


def test_the_asgi_middleware_gives_the_app_its_request_id_and_joined_headers() -> None:
    import asyncio

    from libmesh.telemetry import Telemetry
    from libmesh.xds import Node

    telemetry = Telemetry(Node(namespace="shop", labels={"app": "reviews", "version": "v2"}))
    seen: dict[str, object] = {}

    async def app(scope: dict[str, object], receive: object, send: object) -> None:
        inbound = libmesh.current_inbound()
        assert inbound is not None
        await receive()  # type: ignore[operator]
        seen["request_id"] = inbound.request_id
        seen["header"] = dict(scope["headers"])[b"x-request-id"]  # type: ignore[call-overload]
        seen["accept"] = inbound.headers["accept"]
        await send({"type": "http.response.start", "status": 201, "headers": []})  # type: ignore[operator]
        await send({"type": "http.response.body", "body": b"made"})  # type: ignore[operator]

    middleware = libmesh.middleware.MeshMiddleware(app, telemetry=telemetry)
    scope = {
        "type": "http", "method": "POST", "path": "/reviews", "headers": [
            (b"host", b"reviews.shop.svc.cluster.local:8080"),
            (b"accept", b"text/plain"), (b"accept", b"application/json"),
        ], "client": ("127.0.0.1", 5000), "server": ("127.0.0.1", 8080),
    }  # fmt: skip

    async def receive() -> dict[str, object]:
        return {"type": "http.request", "body": b"abc", "more_body": False}

    async def send(message: dict[str, object]) -> None:
        pass

    asyncio.run(middleware(scope, receive, send))

    assert re.fullmatch(r"[0-9a-f-]{36}", str(seen["request_id"]))
    assert seen["header"] == str(seen["request_id"]).encode()
    assert seen["accept"] == "text/plain,application/json"
    (sample,) = _samples(telemetry.render_metrics(), "istio_requests_total")
    assert sample[0]["reporter"] == "destination"
    assert sample[0]["response_code"] == "201"
    assert sample[0]["destination_workload"] == "reviews-v2"
    assert sample[0]["destination_service"] == "reviews.shop.svc.cluster.local"
    assert sample[0]["connection_security_policy"] == "none"
    sizes = {
        lab["le"]: v
        for lab, v in _samples(telemetry.render_metrics(), "istio_request_bytes_bucket")
    }
    assert sizes["1"] == 0.0
    assert sizes["10"] == 1.0  # 3 bytes received
