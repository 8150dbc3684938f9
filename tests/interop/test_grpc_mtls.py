"""grpcio's own xDS client and a grpcio server in mutual TLS with SVIDs from meshd: the client's
certificates through the file_watcher provider (written by libmesh's WorkloadIdentity), the
server's through libmesh's rotating server credentials, the server's SPIFFE ID checked by grpcio
against the SANs meshd puts in the cluster, and the server's interceptor enforcing
AuthorizationPolicy on the client's SPIFFE ID."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent import futures
from pathlib import Path

import grpc
import pytest

import libmesh
from tests.conftest import unused_port
from tests.integration.test_mtls import sign, token
from tests.meshd_process import MeshdProcess

StartMeshd = Callable[..., MeshdProcess]
TARGET = "echo.shop.svc.cluster.local:8080"
WEB = "spiffe://cluster.local/ns/shop/sa/web"


def mesh(port: int, sans: str = "") -> str:
    return f"""
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: echo, namespace: shop}}
spec:
  hosts: [echo.shop.svc.cluster.local]
  location: MESH_INTERNAL
  resolution: STATIC
  ports: [{{number: 8080, name: grpc, protocol: GRPC}}]
  workloadSelector: {{labels: {{app: echo}}}}
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {{name: echo-1, namespace: shop}}
spec:
  address: 127.0.0.1
  ports: {{grpc: {port}}}
  labels: {{app: echo, security.istio.io/tlsMode: istio}}
  serviceAccount: echo
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: echo, namespace: shop}}
spec:
  host: echo.shop.svc.cluster.local
  trafficPolicy: {{tls: {{mode: ISTIO_MUTUAL{sans}}}}}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: echo-callers, namespace: shop}}
spec:
  action: ALLOW
  rules: [{{from: [{{source: {{principals: [cluster.local/ns/shop/sa/web]}}}}]}}]
"""


def client(meshd: MeshdProcess, account: str, calls: int = 3) -> list[dict[str, str]]:
    run = subprocess.run(
        [sys.executable, "-m", "tests.mesh_grpc", "client", meshd.xds_address,
         token(meshd, "shop", account), account, TARGET, str(calls)],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    return [json.loads(line) for line in run.stdout.splitlines() if line.startswith("{")]


def start_server(meshd: MeshdProcess, port: int) -> subprocess.Popen[str]:
    process = subprocess.Popen(
        [sys.executable, "-m", "tests.mesh_grpc", "server", meshd.xds_address,
         token(meshd, "shop", "echo"), str(port)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    assert process.stdout is not None
    line = process.stdout.readline()
    assert line.strip() == "serving", line + process.stdout.read()
    return process


def _meshd(tmp_path: Path, start_meshd: StartMeshd, config: str) -> MeshdProcess:
    """meshd on a directory holding ``config`` as echo.yaml (tmp_path/mesh)."""
    (tmp_path / "mesh").mkdir()
    (tmp_path / "mesh" / "echo.yaml").write_text(config)
    return start_meshd(tmp_path / "mesh")


def stop(server: subprocess.Popen[str]) -> str:
    server.terminate()
    output, _ = server.communicate(timeout=10)
    return output


def test_grpc_xds_client_and_server_run_mtls_with_svids_and_authorization(
    tmp_path: Path, start_meshd: StartMeshd
) -> None:
    port = unused_port()
    meshd = _meshd(tmp_path, start_meshd, mesh(port))
    server = start_server(meshd, port)
    try:
        time.sleep(0.5)  # the server's policies from meshd
        assert client(meshd, "web") == [{"peer": WEB}] * 3
        denied = client(meshd, "intruder", calls=1)
        assert denied == [{"code": "PERMISSION_DENIED", "details": "RBAC: access denied"}]
    finally:
        stop(server)


def test_grpc_xds_client_refuses_a_server_whose_spiffe_id_is_not_expected(
    tmp_path: Path, start_meshd: StartMeshd
) -> None:
    port = unused_port()
    other = ", subjectAltNames: [spiffe://cluster.local/ns/shop/sa/billing]"
    meshd = _meshd(tmp_path, start_meshd, mesh(port, other))
    server = start_server(meshd, port)
    try:
        [answer] = client(meshd, "web", calls=1)
        assert answer["code"] == "UNAVAILABLE", answer
    finally:
        stop(server)


STRICT = """
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: default, namespace: shop}
spec: {mtls: {mode: STRICT}}
"""


def test_a_grpcio_xds_server_takes_its_tls_and_rbac_from_meshd(
    tmp_path: Path, start_meshd: StartMeshd
) -> None:
    """grpcio enforces what meshd sends its xDS server: STRICT as mutual TLS with the SVID from
    the file_watcher provider, and AuthorizationPolicy as RBAC — no libmesh code in the call."""
    port = unused_port()
    meshd = _meshd(tmp_path, start_meshd, mesh(port) + STRICT)
    process = subprocess.Popen(
        [sys.executable, "-m", "tests.mesh_grpc", "xds-server", meshd.xds_address,
         token(meshd, "shop", "echo"), str(port)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        assert process.stdout is not None
        assert process.stdout.readline().strip() == "serving"
        assert client(meshd, "web") == [{"peer": WEB}] * 3
        [denied] = client(meshd, "intruder", calls=1)
        assert denied["code"] == "PERMISSION_DENIED", denied
    finally:
        output = stop(process)
    assert "Traceback" not in output, output


def _connect(
    meshd: MeshdProcess, account: str, with_token: bool = True, ttl: float = 24 * 3600
) -> libmesh.Mesh:
    return libmesh.Mesh.connect(
        meshd.xds_address, namespace="shop", service_account=account,
        token=token(meshd, "shop", account) if with_token else None, state_file=None,
        svid_ttl=ttl,
    )  # fmt: skip


def _who(mesh: libmesh.Mesh) -> bytes | tuple[grpc.StatusCode, str]:
    with mesh.grpc_channel(TARGET) as channel:
        try:
            return bytes(channel.unary_unary("/test.Echo/Who")(b"", timeout=5))
        except grpc.RpcError as error:
            return error.code(), error.details()  # type: ignore[attr-defined]


async def _who_async(mesh: libmesh.Mesh) -> bytes:
    async with mesh.grpc_aio_channel(TARGET) as channel:
        return bytes(await channel.unary_unary("/test.Echo/Who")(b"", timeout=5))


def test_libmeshs_own_grpc_client_runs_mtls_with_its_svid_and_checks_the_servers_identity(
    tmp_path: Path, start_meshd: StartMeshd
) -> None:
    """Not grpcio's xDS client: libmesh's interceptors (``mesh.grpc_channel``) present the SVID
    and check the server's SPIFFE ID through its DNS form in the SVID (grpcio's credentials
    check host names only)."""
    port = unused_port()
    meshd = _meshd(tmp_path, start_meshd, mesh(port))
    server = start_server(meshd, port)
    try:
        time.sleep(0.5)  # the server's policies from meshd
        with _connect(meshd, "web") as web:
            answers = [_who(web) for _ in range(3)]
            streamed = asyncio.run(_who_async(web))
        with _connect(meshd, "web", ttl=3) as rotating, rotating.grpc_channel(TARGET) as channel:
            assert rotating.identity is not None
            who = channel.unary_unary("/test.Echo/Who")
            first = rotating.identity.current()
            before = who(b"", timeout=5)
            deadline = time.monotonic() + 10
            while rotating.identity.current() is first and time.monotonic() < deadline:
                time.sleep(0.1)
            after = who(b"", timeout=5)
            made = [made[0] for made, _ in channel._interceptor._channels._made.values()]  # type: ignore[attr-defined]
            rotated = rotating.identity.current()
        with _connect(meshd, "nobody", with_token=False) as anonymous:
            without_identity = _who(anonymous)
        with _connect(meshd, "intruder") as intruder:
            denied = _who(intruder)
        other = ", subjectAltNames: [spiffe://cluster.local/ns/shop/sa/billing]"
        (tmp_path / "mesh" / "echo.yaml").write_text(mesh(port, other))
        time.sleep(1)  # meshd picks the change up
        with _connect(meshd, "web") as web:
            impostor = _who(web)
    finally:
        stop(server)

    assert answers == [WEB.encode()] * 3  # the server saw the client's SVID
    assert streamed == WEB.encode()  # grpc.aio too
    assert before == after == WEB.encode()
    assert rotated is not first
    assert made == [rotated]  # the endpoint's channel was made again with the rotated SVID
    assert isinstance(without_identity, tuple)
    assert without_identity[0] is grpc.StatusCode.UNAVAILABLE
    assert "no workload identity" in without_identity[1]  # refused, never sent in plaintext
    assert denied == (grpc.StatusCode.PERMISSION_DENIED, "RBAC: access denied")
    assert isinstance(impostor, tuple)
    assert impostor[0] is grpc.StatusCode.UNAVAILABLE  # echo's SVID is not billing's


def test_a_grpc_server_refuses_foreign_expired_not_yet_valid_and_unauthorized_clients(
    tmp_path: Path, start_meshd: StartMeshd
) -> None:
    """The server side of the security matrix for a grpcio server with libmesh's credentials
    and interceptor: each case a real handshake and call from plain grpcio with a hand-made
    client certificate."""
    port = unused_port()
    meshd = _meshd(tmp_path, start_meshd, mesh(port))
    roots = (meshd.ca_dir / "root-cert.pem").read_bytes()
    intruder = "spiffe://cluster.local/ns/shop/sa/intruder"
    cases = {
        "good": sign(meshd.ca_dir, tmp_path / "good", WEB, valid=(-60, 600)),
        "expired": sign(meshd.ca_dir, tmp_path / "expired", WEB, valid=(-7200, -3600)),
        "not yet valid": sign(meshd.ca_dir, tmp_path / "future", WEB, valid=(3600, 7200)),
        "foreign CA": sign(tmp_path / "foreign-ca", tmp_path / "foreign", WEB, valid=(-60, 600)),
        "other trust domain": sign(
            tmp_path / "other-ca", tmp_path / "other", "spiffe://example.org/ns/shop/sa/web",
            valid=(-60, 600),
        ),
        "not allowed": sign(meshd.ca_dir, tmp_path / "intruder", intruder, valid=(-60, 600)),
    }  # fmt: skip
    server = start_server(meshd, port)
    outcomes: dict[str, object] = {}
    try:
        time.sleep(0.5)  # the server's policies from meshd
        for case, (certificate, key) in cases.items():
            credentials = grpc.ssl_channel_credentials(
                roots, key.read_bytes(), certificate.read_bytes()
            )
            # the server's SVID carries its DNS form: plain grpcio can check who it is
            options = [("grpc.ssl_target_name_override", "echo.shop.spiffe.cluster.local")]
            with grpc.secure_channel(f"127.0.0.1:{port}", credentials, options) as channel:
                try:
                    outcomes[case] = channel.unary_unary("/test.Echo/Who")(b"", timeout=5)
                except grpc.RpcError as error:
                    outcomes[case] = error.code()  # type: ignore[attr-defined]
    finally:
        stop(server)

    assert outcomes == {
        "good": WEB.encode(),
        "expired": grpc.StatusCode.UNAVAILABLE,  # the handshake fails
        "not yet valid": grpc.StatusCode.UNAVAILABLE,
        "foreign CA": grpc.StatusCode.UNAVAILABLE,
        "other trust domain": grpc.StatusCode.UNAVAILABLE,
        "not allowed": grpc.StatusCode.PERMISSION_DENIED,  # AuthorizationPolicy
    }


def test_one_grpc_port_takes_mtls_and_plaintext_as_peer_authentication_says(
    tmp_path: Path, start_meshd: StartMeshd
) -> None:
    """grpcio's server takes TLS or plaintext per port; ``MeshGrpcPort`` takes both on one,
    as PERMISSIVE asks, and only mTLS once STRICT."""
    port = unused_port()
    without_policy = mesh(port).rsplit("---", 1)[0]  # (anyone may call: plaintext included)
    meshd = _meshd(tmp_path, start_meshd, without_policy)
    with _connect(meshd, "echo") as echo:

        def who(request: bytes, context: grpc.ServicerContext) -> bytes:
            inbound = libmesh.current_inbound()
            return (inbound.peer_principal if inbound else "?").encode() or b"plaintext"

        server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=4),
            interceptors=[libmesh.middleware.MeshServerInterceptor(echo, port=port)],
        )
        handlers = {"Who": grpc.unary_unary_rpc_method_handler(who)}
        server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler("test.Echo", handlers),)
        )
        served = libmesh.middleware.MeshGrpcPort(server, echo, f"127.0.0.1:{port}")
        server.start()
        served.start()
        try:
            with _connect(meshd, "web") as web:
                mutual = _who(web)
                with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
                    plaintext = channel.unary_unary("/test.Echo/Who")(b"", timeout=5)
                (tmp_path / "mesh" / "strict.yaml").write_text(STRICT.removeprefix("\n---\n"))
                deadline = time.monotonic() + 10
                while echo.engine.inbound.mode(port).value != "STRICT":
                    assert time.monotonic() < deadline, "STRICT never arrived"
                    time.sleep(0.05)
                with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
                    try:
                        refused: object = channel.unary_unary("/test.Echo/Who")(b"", timeout=5)
                    except grpc.RpcError as error:
                        refused = error.code()  # type: ignore[attr-defined]
                still_mutual = _who(web)
        finally:
            served.close()
            server.stop(None)

    assert mutual == WEB.encode()  # the client's SVID reached the interceptor
    assert plaintext == b"plaintext"  # PERMISSIVE: the same port, without TLS
    assert refused is grpc.StatusCode.UNAVAILABLE  # STRICT: the connection is refused
    assert still_mutual == WEB.encode()


def test_a_grpc_port_closes_callers_past_the_limit_of_silent_connections(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Connections accepted but not yet speaking wait for their first byte; past a limit of
    them, a new one is closed at once (callers that connect and say nothing cannot pile up),
    and once they are gone grpc calls get through again."""
    import socket

    from libmesh.middleware import _serve

    monkeypatch.setattr(_serve, "_MAX_UNDECIDED", 2)  # (the accept loop MeshGrpcPort shares)
    (tmp_path / "mesh.yaml").write_text("")
    with libmesh.Mesh.from_files(tmp_path, namespace="shop", watch=False) as echo:
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        handlers = {"Who": grpc.unary_unary_rpc_method_handler(lambda request, _: b"here")}
        server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler("test.Echo", handlers),)
        )
        served = libmesh.middleware.MeshGrpcPort(server, echo, "127.0.0.1:0")
        server.start()
        served.start()
        silent = [socket.create_connection(("127.0.0.1", served.port)) for _ in range(2)]
        try:
            time.sleep(0.2)  # (both accepted, waiting for their first byte)
            with socket.create_connection(("127.0.0.1", served.port), timeout=5) as third:
                assert third.recv(1) == b""  # closed at once
            for sock in silent:
                sock.close()
            time.sleep(0.2)
            with grpc.insecure_channel(f"127.0.0.1:{served.port}") as channel:
                answer = channel.unary_unary("/test.Echo/Who")(b"", timeout=5)
        finally:
            for sock in silent:
                sock.close()
            served.close()
            server.stop(None)
    assert answer == b"here"
