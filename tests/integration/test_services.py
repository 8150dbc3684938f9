"""The README's services example, run for real: meshd, FastAPI under uvicorn, Flask under
werkzeug and a grpc server, each a process of its own joined to the mesh with one line, each
exporting spans over OTLP to a collector in this process. A checkout is one trace across all
three, with W3C and with B3 headers; each side's /metrics counts it under Istio's names; the
access log is JSON."""

from __future__ import annotations

import json
import re
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

SERVICES = Path(__file__).parents[2] / "examples" / "services"
sys.path.insert(0, str(SERVICES))
from collector import tree  # noqa: E402
from run import Shop  # noqa: E402

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"
# FastAPI makes the server spans itself when a tracer provider is set (named after the route);
# libmesh then adds to them rather than making a second one.
EXPECTED_TREE = [
    "frontend: SERVER GET /checkout/{item}",
    "  frontend: INTERNAL orders.shop.svc.cluster.local:8001/*",
    "    frontend: CLIENT POST",
    "      orders: SERVER POST",
    "        orders: INTERNAL inventory.shop.svc.cluster.local:9000/*",
    "          orders: CLIENT POST",
    "            inventory: SERVER shop.Inventory/Reserve",
    "        orders: INTERNAL frontend.shop.svc.cluster.local:8000/*",
    "          orders: CLIENT GET",
    "            frontend: SERVER GET /price/{item}",
]


@pytest.fixture(scope="module")
def shop(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Shop]:
    log = tmp_path_factory.mktemp("shop") / "access.log"
    with Shop(access_log=log) as running:
        yield running


@pytest.fixture(scope="module")
def b3_shop() -> Iterator[Shop]:
    with Shop(propagators="b3multi") as running:
        yield running


def test_a_checkout_is_one_trace_across_fastapi_flask_and_grpc_with_w3c(shop: Shop) -> None:
    traceparent = f"00-{TRACE_ID}-{PARENT_ID}-01"
    response = httpx.get(
        f"{shop.frontend}/checkout/pen", headers={"traceparent": traceparent}, timeout=10
    )
    assert response.status_code == 200
    assert response.json()["order"]["reservation"] == "reserved:pen"

    spans = shop.collector.wait_for(TRACE_ID, len(EXPECTED_TREE))
    assert tree(spans) == EXPECTED_TREE
    (root,) = [s for s in spans if s.parent_id == PARENT_ID]  # a child of the caller's span
    assert root.service == "frontend"


def test_the_same_trace_with_b3_headers_only(b3_shop: Shop) -> None:
    response = httpx.get(
        f"{b3_shop.frontend}/checkout/pen",
        headers={"x-b3-traceid": TRACE_ID, "x-b3-spanid": PARENT_ID, "x-b3-sampled": "1"},
        timeout=10,
    )
    assert response.status_code == 200

    spans = b3_shop.collector.wait_for(TRACE_ID, len(EXPECTED_TREE))
    assert tree(spans) == EXPECTED_TREE


def test_each_side_counts_the_calls_under_istios_names(shop: Shop) -> None:
    before = _scrape(shop)
    for _ in range(5):
        assert httpx.get(f"{shop.frontend}/checkout/mug", timeout=10).status_code == 200
    after = _scrape(shop)

    def added(side: str, **labels: str) -> float:
        return _total(after[side], labels) - _total(before[side], labels)

    # the frontend: 5 calls to orders as the source, and 5 price calls served
    assert added("frontend", reporter="source", destination_service_name="orders",
                 response_code="200", source_workload="frontend-v1") == 5  # fmt: skip
    assert added("frontend", reporter="destination", source_workload="orders-v1",
                 destination_workload="frontend-v1", request_protocol="http") == 5  # fmt: skip
    # orders sees who called it (Istio's metadata exchange), and calls inventory over grpc
    assert added("orders", reporter="destination", source_workload="frontend-v1",
                 source_app="frontend", destination_app="orders",
                 connection_security_policy="none") == 5  # fmt: skip
    assert added("orders", reporter="source", destination_service_name="inventory",
                 request_protocol="grpc", grpc_response_status="0",
                 destination_workload="inventory-v1") == 5  # fmt: skip
    assert added("inventory", reporter="destination", source_workload="orders-v1",
                 request_protocol="grpc", response_code="200",
                 grpc_response_status="0") == 5  # fmt: skip
    # a histogram with Istio's buckets, one observation per call
    buckets = [line for line in after["inventory"].splitlines()
               if line.startswith("istio_request_duration_milliseconds_bucket{")]  # fmt: skip
    assert any('le="0.5"' in line for line in buckets)
    assert any('le="3600000"' in line for line in buckets)


def test_the_access_log_is_json_lines_with_envoys_fields(shop: Shop) -> None:
    assert shop.access_log is not None
    httpx.get(f"{shop.frontend}/checkout/lamp", headers={"x-request-id": "checkout-77"})

    def ours_so_far() -> list[dict[str, object]]:
        entries = [json.loads(line) for line in log.read_text().splitlines()]
        return [e for e in entries if e["request_id"] == "checkout-77"]

    log = shop.access_log
    deadline = time.monotonic() + 5
    # each side writes its line once its response is out: the caller may read first
    while len(ours := ours_so_far()) < 7 and time.monotonic() < deadline:
        time.sleep(0.05)
    # every hop of the checkout carries the caller's request id, on both sides of each call
    assert {(e["reporter"], e["authority"].split(":")[0].split(".")[0]) for e in ours} >= {
        ("destination", "127"),
        ("source", "orders"),
        ("source", "inventory"),
        ("source", "frontend"),
    }
    inbound = next(
        e for e in ours if e["reporter"] == "destination" and e["path"] == "/checkout/lamp"
    )
    assert inbound["method"] == "GET"
    assert inbound["response_code"] == 200
    assert inbound["response_flags"] == "-"
    assert inbound["protocol"] == "HTTP/1.1"
    assert inbound["bytes_sent"] > 0
    assert re.fullmatch(r"[0-9a-f]{32}", inbound["trace_id"])
    grpc_call = next(e for e in ours if e["reporter"] == "source" and "inventory" in e["authority"])
    assert grpc_call["grpc_status"] == "OK"
    assert grpc_call["upstream_cluster"] == "outbound|9000||inventory.shop.svc.cluster.local"


def _scrape(shop: Shop) -> dict[str, str]:
    return {
        name: httpx.get(f"{url}/metrics/", timeout=5, follow_redirects=True).text
        for name, url in (
            ("frontend", shop.frontend),
            ("orders", shop.orders),
            ("inventory", shop.inventory_metrics),
        )
    }


def _total(text: str, wanted: dict[str, str]) -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith("istio_requests_total{"):
            labels = dict(re.findall(r'(\w+)="([^"]*)"', line))
            if all(labels.get(k) == v for k, v in wanted.items()):
                total += float(line.rsplit(" ", 1)[1])
    return total
