"""libmesh-proxy with programs that are not Python: curl sending through its outbound side
(routing, retries, timeouts, injected faults), nginx behind its inbound side (reachable only
over mTLS, from an allowed SPIFFE ID), a drain under load, a change in meshd picked up, and
the errors a user sees when it cannot start. Every process is real, on 127.0.0.1."""

from __future__ import annotations

import json
import re
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

import libmesh
from tests.conftest import Backends, service, unused_port
from tests.integration.test_http2_pool import certificates
from tests.integration.test_mtls import token
from tests.meshd_process import MeshdProcess
from tests.proxy_process import Nginx, ProxyProcess, curl

StartBackends = Callable[[int], Backends]
MeshDir = Callable[..., Path]
StartProxy = Callable[..., ProxyProcess]
VERSIONS = [{"version": "v1"}, {"version": "v2"}]
REVIEWS = "http://reviews.shop.svc.cluster.local:8080"

ROUTES_TEMPLATE = """
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: reviews, namespace: shop}
spec:
  host: reviews
  subsets:
  - {name: v1, labels: {version: v1}}
  - {name: v2, labels: {version: v2}}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: reviews, namespace: shop}
spec:
  hosts: [reviews]
  http:
  - match: [{headers: {x-fault: {exact: abort}}}]
    fault: {abort: {httpStatus: 418, percentage: {value: 100}}}
    route: [{destination: {host: reviews, subset: v1}}]
  - match: [{headers: {x-fault: {exact: delay}}}]
    fault: {delay: {fixedDelay: 300ms, percentage: {value: 100}}}
    route: [{destination: {host: reviews, subset: v1}}]
  - match: [{uri: {prefix: /slow}}]
    timeout: 200ms
    route: [{destination: {host: reviews, subset: v1}}]
  - match: [{headers: {x-canary: {exact: "yes"}}}]
    route: [{destination: {host: reviews, subset: v2}}]
  - retries: {attempts: 3, retryOn: 5xx}
    route:
    - {destination: {host: reviews, subset: v1}, weight: V1}
    - {destination: {host: reviews, subset: v2}, weight: V2}
"""


def routes(v1: int = 100, v2: int = 0) -> str:
    return ROUTES_TEMPLATE.replace("V1", str(v1)).replace("V2", str(v2))


ROUTES = routes()


@pytest.fixture
def reviews(
    start_backends: StartBackends, mesh_dir: MeshDir, start_proxy: StartProxy
) -> tuple[Backends, ProxyProcess]:
    """Two instances of reviews (v1, v2) and a proxy on their YAML, with its outbound port and a
    port bound to reviews."""
    backends = start_backends(2)
    registry = service(
        "reviews", "shop", backends.ports, labels=[{"version": "v1"}, {"version": "v2"}]
    )
    path = mesh_dir(registry, ROUTES)
    proxy = start_proxy(
        "--config-dir", str(path), "--namespace", "shop", "--outbound", "0", "--admin", "0",
        "--route", f"0={REVIEWS.removeprefix('http://')}",
    )  # fmt: skip
    return backends, proxy


def _json(result: subprocess.CompletedProcess[str]) -> dict[str, object]:
    assert result.returncode == 0, result.stderr
    body: dict[str, object] = json.loads(result.stdout)
    return body


# -- the outbound side, with curl ------------------------------------------------------------------


def test_curl_through_the_proxy_is_routed_by_the_virtual_service(
    reviews: tuple[Backends, ProxyProcess],
) -> None:
    backends, proxy = reviews
    via = ("-x", proxy.url("outbound"))

    stable = [_json(curl(*via, f"{REVIEWS}/items"))["instance"] for _ in range(4)]
    canary = _json(curl(*via, "-H", "x-canary: yes", f"{REVIEWS}/items"))
    short_name = _json(curl(*via, "http://reviews:8080/items"))  # resolved in the namespace

    assert stable == ["instance-0"] * 4  # weight 100 to v1
    assert canary["instance"] == "instance-1"
    assert short_name["instance"] == "instance-0"
    seen = backends.stats(0)["last_headers"]
    assert seen["host"] == "reviews:8080"
    assert re.fullmatch(r"[0-9a-f-]{36}", seen["x-request-id"])  # the mesh adds one
    assert "proxy-connection" not in seen  # hop-by-hop headers stay behind


def test_a_port_bound_to_a_service_needs_no_proxy_settings(
    reviews: tuple[Backends, ProxyProcess],
) -> None:
    backends, proxy = reviews

    posted = _json(curl("-d", "a body", "-H", "x-canary: yes", proxy.url("route", "/orders?id=7")))

    assert posted["instance"] == "instance-1"
    assert posted["path"] == "/orders?id=7"
    assert posted["body"] == "a body"
    # curl asks for a 100 Continue before a larger body, and waits a second without one
    big = "x" * 5000
    sent = curl("-d", big, "-w", "\n%{time_total}", proxy.url("route", "/upload"))
    body, took = sent.stdout.rsplit("\n", 1)
    assert json.loads(body)["body"] == big
    assert float(took) < 0.9
    assert "expect" not in json.loads(body)["headers"]
    assert backends.stats(1)["hosts"] == {"reviews.shop.svc.cluster.local:8080": 1}


def test_pipelined_requests_are_answered_in_order(reviews: tuple[Backends, ProxyProcess]) -> None:
    _, proxy = reviews
    host = b"Host: reviews.shop.svc.cluster.local:8080\r\n"
    sent = b"".join(
        b"GET /%b HTTP/1.1\r\n%b%b\r\n" % (path, host, b"Connection: close\r\n" if last else b"")
        for path, last in ((b"a", False), (b"b", False), (b"c", True))
    )
    with socket.create_connection(("127.0.0.1", proxy.port("outbound")), timeout=10) as caller:
        caller.sendall(sent)  # all three at once, before any answer
        received = b""
        while chunk := caller.recv(65536):
            received += chunk

    assert re.findall(rb'"path": "(/\w)"', received) == [b"/a", b"/b", b"/c"]
    assert received.count(b"HTTP/1.1 200 OK") == 3
    assert received.rstrip().endswith(b"}")  # the connection closed after the third answer


def test_connect_tunnels_are_served_by_the_mesh_and_tls_inside_passes_through(
    reviews: tuple[Backends, ProxyProcess], tmp_path: Path
) -> None:
    """CONNECT host:port (curl -p; grpcio with http_proxy): the tunnel's requests go through
    the mesh to that service; TLS inside a tunnel (the caller's own, to a host outside the
    mesh) passes through untouched."""
    _, proxy = reviews
    via = ("-x", proxy.url("outbound"))
    tunneled = _json(curl("-p", *via, f"{REVIEWS}/items"))
    canary = _json(curl("-p", *via, "-H", "x-canary: yes", f"{REVIEWS}/items"))

    ca, certificate, key = certificates()
    (tmp_path / "ca.pem").write_bytes(ca)
    (tmp_path / "server.pem").write_bytes(certificate + key)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(tmp_path / "server.pem")
    with socket.create_server(("127.0.0.1", 0)) as listener:

        def answer_once() -> None:
            connection, _ = listener.accept()
            with context.wrap_socket(connection, server_side=True) as secure:
                secure.recv(65536)
                secure.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: 6\r\n\r\ntls ok")

        threading.Thread(target=answer_once, daemon=True).start()
        port = listener.getsockname()[1]
        secured = curl(*via, "--cacert", str(tmp_path / "ca.pem"), f"https://localhost:{port}/")

    assert tunneled["instance"] == "instance-0"  # the VirtualService's route
    assert tunneled["host"] == "reviews.shop.svc.cluster.local:8080"
    assert canary["instance"] == "instance-1"
    assert secured.returncode == 0, secured.stderr
    assert secured.stdout == "tls ok"  # the server's own certificate, checked by curl


def test_curl_gets_retries_timeouts_and_injected_faults(
    reviews: tuple[Backends, ProxyProcess],
) -> None:
    backends, proxy = reviews
    via = ("-x", proxy.url("outbound"), "-w", "\n%{http_code} %{time_total}")
    backends.behave(0, status=503, fail_first=2)

    retried = curl(*via, f"{REVIEWS}/retried")
    assert retried.stdout.splitlines()[-1].startswith("200 ")
    assert backends.requests(0) == 3  # two 503s, then the answer

    aborted = curl(*via, "-H", "x-fault: abort", f"{REVIEWS}/x").stdout.splitlines()
    assert aborted == ["fault filter abort", aborted[-1]]
    assert aborted[-1].startswith("418 ")

    delayed = curl(*via, "-H", "x-fault: delay", f"{REVIEWS}/x").stdout.splitlines()[-1]
    status, took = delayed.split()
    assert status == "200"
    assert float(took) >= 0.3

    backends.behave(0, delay=2)
    timed_out = curl("-i", *via, f"{REVIEWS}/slow")
    assert timed_out.stdout.splitlines()[-1].startswith("504 ")
    assert "x-libmesh-response-flags: UT" in timed_out.stdout
    assert "upstream request timeout" in timed_out.stdout


def test_a_service_without_endpoints_and_a_host_outside_the_mesh(
    reviews: tuple[Backends, ProxyProcess], start_backends: StartBackends
) -> None:
    backends, proxy = reviews
    backends.stop()  # reviews' endpoints are gone: connection refused
    outside = start_backends(1)
    via = ("-i", "-x", proxy.url("outbound"))

    refused = curl(*via, f"{REVIEWS}/x").stdout
    passed = _json(curl("-x", proxy.url("outbound"), f"http://127.0.0.1:{outside.ports[0]}/y"))
    nowhere = curl(*via, f"http://127.0.0.1:{unused_port()}/z").stdout

    assert refused.startswith("HTTP/1.1 503")
    flags = re.search(r"x-libmesh-response-flags: (\S+)", refused)
    assert flags
    assert set(flags[1].split(",")) == {"UF", "URX"}
    assert passed["path"] == "/y"  # not a mesh service: passed through as it is
    assert nowhere.startswith("HTTP/1.1 502")
    assert "ConnectError" in nowhere


def test_the_admin_port_shows_readiness_metrics_and_the_configuration(
    reviews: tuple[Backends, ProxyProcess],
) -> None:
    _, proxy = reviews
    curl("-x", proxy.url("outbound"), f"{REVIEWS}/x")

    ready = httpx.get(proxy.url("admin", "/ready"))
    metrics = httpx.get(proxy.url("admin", "/metrics")).text
    dump = httpx.get(proxy.url("admin", "/config_dump")).json()

    assert (ready.status_code, ready.text) == (200, "LIVE\n")
    assert re.search(
        r'istio_requests_total\{reporter="source",.*destination_service="reviews.shop.svc.'
        r'cluster.local",.*response_code="200".*\} 1',
        metrics,
    )
    assert [x["kind"] for x in dump["proxy_listeners"]] == ["outbound", "route", "admin"]
    assert "outbound|8080|v1|reviews.shop.svc.cluster.local" in {
        c["name"] for c in dump["clusters"]
    }
    assert dump["version"]
    assert dump["control_plane"] is None


def test_without_label_arguments_the_workload_labels_come_from_the_environment(
    start_backends: StartBackends, mesh_dir: MeshDir, start_proxy: StartProxy
) -> None:
    backends = start_backends(1)
    path = mesh_dir(service("reviews", "shop", backends.ports))
    proxy = start_proxy(
        "--config-dir", str(path), "--namespace", "shop", "--outbound", "0", "--admin", "0",
        env={"LIBMESH_LABELS": "app=ratings,version=v7"},
    )  # fmt: skip
    assert curl("-x", proxy.url("outbound"), f"{REVIEWS}/x").returncode == 0

    metrics = httpx.get(proxy.url("admin", "/metrics")).text

    assert re.search(
        r'istio_requests_total\{reporter="source",.*source_app="ratings",'
        r'.*source_version="v7",.*response_code="200".*\} 1',
        metrics,
    ), metrics


# -- draining --------------------------------------------------------------------------------------


def test_sigterm_under_load_drains_with_no_failed_request(
    reviews: tuple[Backends, ProxyProcess],
) -> None:
    backends, proxy = reviews
    backends.behave(0, delay=0.2)
    answers: list[int] = []
    closes: list[int] = []
    failures: list[str] = []
    refused = threading.Barrier(9)

    def caller() -> None:  # a keep-alive client, sending until the proxy refuses it
        with httpx.Client(proxy=proxy.url("outbound"), timeout=10) as client:
            while True:
                try:
                    response = client.get(f"{REVIEWS}/load")
                except httpx.ConnectError:
                    break  # refused: a new connection while draining
                except httpx.HTTPError as exc:
                    failures.append(repr(exc))
                    break
                answers.append(response.status_code)
                if response.headers.get("connection") == "close":
                    closes.append(1)
        refused.wait(10)

    threads = [threading.Thread(target=caller) for _ in range(8)]
    for thread in threads:
        thread.start()
    time.sleep(1.0)
    before = len(answers)
    started = time.monotonic()
    proxy.terminate()
    refused.wait(10)
    code = proxy.wait(10)
    took = time.monotonic() - started
    for thread in threads:
        thread.join(5)

    assert before >= 8
    assert failures == []
    assert set(answers) == {200}
    assert len(closes) == 8  # every caller was told to close, on an answer
    assert code == 0
    assert took < 3  # it left when the callers had gone, not at the end of the drain time
    assert "draining (SIGTERM)" in proxy.log


# -- start-up errors -------------------------------------------------------------------------------


def _run_proxy(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "libmesh.proxy", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_start_up_errors_say_what_is_wrong(mesh_dir: MeshDir, tmp_path: Path) -> None:
    broken = mesh_dir(
        """
        apiVersion: networking.istio.io/v1
        kind: VirtualService
        metadata: {name: reviews, namespace: shop}
        spec:
          hosts: [reviews]
          http:
          - route:
            - {destination: {host: reviews}, weight: 50}
            - {destination: {host: ratings}, weight: 40}
        """
    )
    good = tmp_path / "good"
    good.mkdir()
    with __import__("socket").create_server(("127.0.0.1", 0)) as busy:
        port = busy.getsockname()[1]
        in_use = _run_proxy("--config-dir", str(good), "--outbound", str(port), "--admin", "off")
    invalid = _run_proxy("--config-dir", str(broken), "--outbound", "0", "--admin", "0")
    nothing = _run_proxy("--config-dir", str(good), "--outbound", "off")
    unregistered = _run_proxy("--inbound", "0=8080", "--register", "http=9", "--admin", "off")
    bad_address = _run_proxy("--config-dir", str(good), "--route", "0=reviews")

    assert in_use.returncode == 2
    assert f"cannot listen on 127.0.0.1:{port} (--outbound): Address already in use" in (
        in_use.stderr
    )
    assert invalid.returncode == 1
    assert re.search(r"mesh.yaml:\d+: VirtualService shop/reviews: spec.http\[0\]", invalid.stderr)
    assert nothing.returncode == 2
    assert "nothing to proxy" in nothing.stderr
    assert unregistered.returncode == 2
    assert "port 9 is not an --inbound port of this proxy" in unregistered.stderr
    assert bad_address.returncode == 2
    assert "SERVICE:PORT" in bad_address.stderr


# -- connected: meshd, mTLS, nginx -----------------------------------------------------------------


def strict_service(name: str, port: str = "http", protocol: str = "HTTP", caller: str = "") -> str:
    """A service of shop whose workloads register themselves (``app: <name>``), mTLS STRICT in
    the namespace, and, with ``caller``, only that service account allowed to call it."""
    text = f"""
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: {name}, namespace: shop}}
spec:
  hosts: [{name}.shop.svc.cluster.local]
  location: MESH_INTERNAL
  resolution: STATIC
  ports: [{{number: 8080, name: {port}, protocol: {protocol}}}]
  workloadSelector: {{labels: {{app: {name}}}}}
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {{name: default, namespace: shop}}
spec: {{mtls: {{mode: STRICT}}}}
"""
    if caller:
        text += f"""---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: {name}-callers, namespace: shop}}
spec:
  selector: {{matchLabels: {{app: {name}}}}}
  action: ALLOW
  rules: [{{from: [{{source: {{principals: [cluster.local/ns/shop/sa/{caller}]}}}}]}}]
"""
    return text


NGINX_MESH = strict_service("nginx", caller="web")
NGINX_URL = "http://nginx.shop.svc.cluster.local:8080"


def caller_proxy(start_proxy: StartProxy, meshd: MeshdProcess, account: str) -> ProxyProcess:
    return start_proxy(
        "--xds-address", meshd.xds_address, "--namespace", "shop", "--service-account",
        account, "--token", token(meshd, "shop", account), "--outbound", "0", "--admin", "off",
    )  # fmt: skip


def _until(check: Callable[[], bool], timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError("not within the time")
        time.sleep(0.1)


def test_nginx_behind_the_proxy_is_reached_only_over_mtls_by_an_allowed_identity(
    start_meshd: Callable[..., MeshdProcess],
    mesh_dir: MeshDir,
    start_proxy: StartProxy,
    tmp_path: Path,
) -> None:
    mesh_dir(NGINX_MESH)
    meshd = start_meshd()
    nginx = Nginx(tmp_path / "nginx")
    try:
        inbound = unused_port()
        start_proxy(
            "--xds-address", meshd.xds_address, "--namespace", "shop", "--service-account",
            "nginx", "--label", "app=nginx", "--label", "security.istio.io/tlsMode=istio",
            "--token", token(meshd, "shop", "nginx"), "--inbound", f"{inbound}={nginx.port}",
            "--register", f"http={inbound}", "--outbound", "off", "--admin", "off",
        )  # fmt: skip
        web = caller_proxy(start_proxy, meshd, "web")
        intruder = caller_proxy(start_proxy, meshd, "intruder")

        # curl -> proxy (web's SVID) -> mTLS -> proxy (nginx's) -> nginx
        allowed: list[subprocess.CompletedProcess[str]] = []
        _until(lambda: allowed.append(curl("-x", web.url("outbound"), f"{NGINX_URL}/hi"))
               or allowed[-1].stdout.startswith("nginx saw"))  # fmt: skip
        denied = curl("-i", "-x", intruder.url("outbound"), f"{NGINX_URL}/hi")
        plaintext = curl(f"http://127.0.0.1:{inbound}/hi")
        forged = curl(f"http://127.0.0.1:{inbound}/hi", "-H", "x-forwarded-client-cert: URI=x")

        # a Python app with libmesh, as web, and with the forged header: the proxy replaces it
        with libmesh.Mesh.connect(
            meshd.xds_address, namespace="shop", service_account="web",
            token=token(meshd, "shop", "web"), state_file=None,
        ) as mesh, mesh.client() as client:  # fmt: skip
            python = client.get(f"{NGINX_URL}/py", headers={"x-forwarded-client-cert": "URI=x"})
    finally:
        nginx.stop()

    saw = allowed[-1].stdout
    assert re.fullmatch(
        r"nginx saw xfcc=By=spiffe://cluster.local/ns/shop/sa/nginx;Hash=[0-9a-f]{64};"
        r"URI=spiffe://cluster.local/ns/shop/sa/web uri=/hi\n",
        saw,
    )
    assert denied.stdout.startswith("HTTP/1.1 403")
    assert denied.stdout.endswith("RBAC: access denied")
    assert "peer-metadata" not in denied.stdout.lower()  # the proxies' business, not curl's
    assert plaintext.returncode != 0
    assert plaintext.stdout == ""
    assert forged.returncode != 0
    assert python.status_code == 200
    assert "URI=spiffe://cluster.local/ns/shop/sa/web uri=/py" in python.text
    assert "URI=x" not in python.text


def test_the_proxy_follows_a_change_in_meshd(
    start_meshd: Callable[..., MeshdProcess],
    start_backends: StartBackends,
    mesh_dir: MeshDir,
    start_proxy: StartProxy,
) -> None:
    backends = start_backends(2)
    registry = service(
        "reviews", "shop", backends.ports, labels=[{"version": "v1"}, {"version": "v2"}]
    )
    mesh_dir(registry, ROUTES)
    meshd = start_meshd()
    proxy = start_proxy(
        "--xds-address", meshd.xds_address, "--namespace", "shop", "--outbound", "0",
        "--admin", "0",
    )  # fmt: skip
    via = ("-x", proxy.url("outbound"), f"{REVIEWS}/x")
    assert _json(curl(*via))["instance"] == "instance-0"

    mesh_dir(registry, routes(v1=0, v2=100))
    _until(lambda: _json(curl(*via))["instance"] == "instance-1")

    dump = httpx.get(proxy.url("admin", "/config_dump")).json()
    assert dump["control_plane"]["connected"] is True
