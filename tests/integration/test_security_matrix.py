"""The client side of the security matrix: libmesh's clients (httpx sync and async, requests)
with an SVID from meshd, calling a TLS server whose certificate is each case of the matrix —
the right SVID, expired, not yet valid, from a foreign CA, from another trust domain, the wrong
SPIFFE ID — and DestinationRule TLS origination (SIMPLE, MUTUAL) to a server outside the mesh.
Every handshake is real, on 127.0.0.1. (The server side of the same cases is in test_mtls.py.)"""

from __future__ import annotations

import asyncio
import datetime
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

import libmesh
from tests.integration.test_mtls import StartMeshd, sign, token
from tests.meshd_process import MeshdProcess

PAY_ID = "spiffe://cluster.local/ns/shop/sa/pay"
PAY = "http://pay.shop.svc.cluster.local:8080/"
EXTERNAL = "http://bank.example.com:8443/"


class TlsServer:
    """An HTTP/1.1 server on 127.0.0.1 whose TLS context can be swapped between connections;
    it answers 200 with who the client was (its certificate's URI SAN, if any)."""

    def __init__(self) -> None:
        self.context: ssl.SSLContext | None = None
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.handshakes = 0
        self._stop = False
        threading.Thread(target=self._serve, daemon=True).start()

    def use(self, chain: Path, key: Path, client_roots: Path | None = None) -> None:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(chain, key)
        if client_roots is not None:
            context.verify_mode = ssl.CERT_OPTIONAL
            context.load_verify_locations(client_roots)
        self.context = context

    def _serve(self) -> None:
        while not self._stop:
            try:
                raw, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._answer, args=(raw,), daemon=True).start()

    def _answer(self, raw: socket.socket) -> None:
        assert self.context is not None
        try:
            with self.context.wrap_socket(raw, server_side=True) as tls:
                self.handshakes += 1
                tls.recv(65536)
                peer = tls.getpeercert() or {}
                uris = [v for k, v in peer.get("subjectAltName", ()) if k == "URI"]
                body = (uris[0] if uris else "-").encode()
                tls.sendall(
                    b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s"
                    % (len(body), body)
                )
        except (ssl.SSLError, OSError, ValueError):  # the client refused the handshake
            raw.close()

    def close(self) -> None:
        self._stop = True
        self.listener.close()


def mesh_yaml(port: int) -> str:
    return f"""
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: pay, namespace: shop}}
spec:
  hosts: [pay.shop.svc.cluster.local]
  location: MESH_INTERNAL
  resolution: STATIC
  ports: [{{number: 8080, name: http, protocol: HTTP}}]
  endpoints:
  - address: 127.0.0.1
    ports: {{http: {port}}}
    serviceAccount: pay
    labels: {{security.istio.io/tlsMode: istio}}
"""


@pytest.fixture(scope="module")
def server() -> Iterator[TlsServer]:
    instance = TlsServer()
    yield instance
    instance.close()


@pytest.fixture
def meshd(tmp_path: Path, start_meshd: StartMeshd, server: TlsServer) -> MeshdProcess:
    (tmp_path / "mesh").mkdir()
    (tmp_path / "mesh" / "pay.yaml").write_text(mesh_yaml(server.port))
    return start_meshd(tmp_path / "mesh")


@pytest.fixture
def client_mesh(meshd: MeshdProcess) -> Iterator[libmesh.Mesh]:
    mesh = libmesh.Mesh.connect(
        meshd.xds_address, namespace="shop", service_account="web",
        token=token(meshd, "shop", "web"), state_file=None,
    )  # fmt: skip
    deadline = time.monotonic() + 10
    while not ((c := mesh.engine.cluster("outbound|8080||pay.shop.svc.cluster.local")) and c.hosts):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    yield mesh
    mesh.close()


Call = Callable[[libmesh.Mesh, str], str]


def with_httpx(mesh: libmesh.Mesh, url: str) -> str:
    with mesh.client() as client:
        return client.get(url, headers={"connection": "close"}).text


def with_async_httpx(mesh: libmesh.Mesh, url: str) -> str:
    async def call() -> str:
        async with mesh.async_client() as client:
            return (await client.get(url, headers={"connection": "close"})).text

    return asyncio.run(call())


def with_requests(mesh: libmesh.Mesh, url: str) -> str:
    with mesh.session() as session:
        return str(session.get(url, headers={"connection": "close"}, timeout=10).text)


CLIENTS = {"httpx": with_httpx, "async": with_async_httpx, "requests": with_requests}


def outcome(call: Call, mesh: libmesh.Mesh, url: str = PAY) -> str:
    try:
        return f"200 {call(mesh, url)}"
    except Exception as exc:
        return f"refused: {exc}"


@pytest.mark.parametrize("client", CLIENTS)
def test_the_client_presents_its_svid_and_accepts_only_the_expected_server(
    client: str, meshd: MeshdProcess, server: TlsServer, client_mesh: libmesh.Mesh, tmp_path: Path
) -> None:
    call = CLIENTS[client]
    roots = meshd.ca_dir / "root-cert.pem"
    cases = {
        "right": (meshd.ca_dir, PAY_ID, (-60, 600)),
        "expired": (meshd.ca_dir, PAY_ID, (-7200, -3600)),
        "not yet valid": (meshd.ca_dir, PAY_ID, (3600, 7200)),
        "foreign CA": (tmp_path / "foreign-ca", PAY_ID, (-60, 600)),
        "other trust domain": (tmp_path / "other-ca", "spiffe://example.org/ns/shop/sa/pay",
                               (-60, 600)),
        "wrong SPIFFE ID": (meshd.ca_dir, "spiffe://cluster.local/ns/shop/sa/billing", (-60, 600)),
    }  # fmt: skip
    seen = {}
    for name, (ca_dir, spiffe_id, valid) in cases.items():
        server.use(*sign(ca_dir, tmp_path / name, spiffe_id, valid=valid), client_roots=roots)
        seen[name] = outcome(call, client_mesh)
    assert seen["right"] == "200 spiffe://cluster.local/ns/shop/sa/web"  # it presented its SVID
    assert "CERTIFICATE_VERIFY_FAILED: certificate has expired" in seen["expired"]
    assert "CERTIFICATE_VERIFY_FAILED: certificate is not yet valid" in seen["not yet valid"]
    for name in ("foreign CA", "other trust domain"):
        assert "CERTIFICATE_VERIFY_FAILED: unable to get local issuer" in seen[name], seen[name]
    assert (
        f"the server presented spiffe://cluster.local/ns/shop/sa/billing, which is not among "
        f"the expected {PAY_ID}" in seen["wrong SPIFFE ID"]
    )
    for name, text in seen.items():
        if name != "right":
            assert text.startswith("refused: upstream connect error"), (name, text)


def web_pki(tmp_path: Path, name: str) -> tuple[Path, Path, Path]:
    """A CA outside the mesh and a server certificate for ``name`` (a DNS SAN): (CA file,
    chain, key)."""
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Example Web CA")])
    ca = (
        x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
        .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )  # fmt: skip
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    leaf = (
        x509.CertificateBuilder().subject_name(subject)
        .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )  # fmt: skip
    pem = serialization.Encoding.PEM
    tmp_path.mkdir(parents=True, exist_ok=True)
    paths = (tmp_path / "web-ca.pem", tmp_path / "web-chain.pem", tmp_path / "web-key.pem")
    paths[0].write_bytes(ca.public_bytes(pem))
    paths[1].write_bytes(leaf.public_bytes(pem))
    paths[2].write_bytes(
        key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return paths


def external(port: int, tls: str) -> str:
    return f"""
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: bank, namespace: shop}}
spec:
  hosts: [bank.example.com]
  location: MESH_EXTERNAL
  resolution: STATIC
  ports: [{{number: 8443, name: http, protocol: HTTP}}]
  endpoints: [{{address: 127.0.0.1, ports: {{http: {port}}}}}]
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: bank, namespace: shop}}
spec:
  host: bank.example.com
  trafficPolicy: {{tls: {tls}}}
"""


def apply(meshd: MeshdProcess, mesh: libmesh.Mesh, text: str) -> None:
    before = mesh.engine.version
    (meshd.config_dir / "bank.yaml").write_text(text)
    deadline = time.monotonic() + 10
    while mesh.engine.version == before:
        assert time.monotonic() < deadline, "the change never reached the client"
        time.sleep(0.05)


def test_destination_rule_simple_and_mutual_originate_tls_outside_the_mesh(
    meshd: MeshdProcess, server: TlsServer, client_mesh: libmesh.Mesh, tmp_path: Path
) -> None:
    ca_file, chain, key = web_pki(tmp_path, "bank.example.com")
    web = "spiffe://cluster.local/ns/shop/sa/web"
    client_chain, client_key = sign(meshd.ca_dir, tmp_path / "client", web, valid=(-60, 600))
    server.use(chain, key, client_roots=meshd.ca_dir / "root-cert.pem")

    def tls(mode: str, **fields: str) -> str:
        settings = ", ".join(f"{k}: {v}" for k, v in fields.items())
        return external(server.port, f"{{mode: {mode}, {settings}}}")

    apply(meshd, client_mesh, tls("SIMPLE", caCertificates=str(ca_file), sni="bank.example.com"))
    assert outcome(with_httpx, client_mesh, EXTERNAL) == "200 -"  # TLS, no client certificate
    apply(
        meshd, client_mesh,
        tls("MUTUAL", caCertificates=str(ca_file), sni="bank.example.com",
            clientCertificate=str(client_chain), privateKey=str(client_key)),
    )  # fmt: skip
    assert outcome(with_httpx, client_mesh, EXTERNAL) == f"200 {web}"
    # the server's name must be the SNI (or one of subjectAltNames), verified at the client
    apply(meshd, client_mesh, tls("SIMPLE", caCertificates=str(ca_file), sni="other.example.com"))
    assert "CERTIFICATE_VERIFY_FAILED" in outcome(with_httpx, client_mesh, EXTERNAL)
    apply(
        meshd, client_mesh,
        tls("SIMPLE", caCertificates=str(ca_file), subjectAltNames="[bank.example.org]"),
    )  # fmt: skip
    refused = outcome(with_httpx, client_mesh, EXTERNAL)
    assert "none of the expected bank.example.org" in refused, refused
    apply(meshd, client_mesh, tls("SIMPLE", sni="bank.example.com"))  # the system's roots
    assert "CERTIFICATE_VERIFY_FAILED" in outcome(with_httpx, client_mesh, EXTERNAL)
    # no sni: the request's host is the name sent and checked (Istio's auto SNI and SAN check)
    apply(meshd, client_mesh, tls("SIMPLE", caCertificates=str(ca_file)))
    assert outcome(with_httpx, client_mesh, EXTERNAL) == "200 -"
    _, other_chain, other_key = web_pki(tmp_path / "other", "attacker.example.net")
    server.use(other_chain, other_key)
    ca_of_other = tmp_path / "other" / "web-ca.pem"
    apply(meshd, client_mesh, tls("SIMPLE", caCertificates=str(ca_of_other)))
    refused = outcome(with_httpx, client_mesh, EXTERNAL)
    assert "Hostname mismatch" in refused, refused


def test_a_flask_app_behind_werkzeugs_tls_sees_the_callers_spiffe_id(
    meshd: MeshdProcess, client_mesh: libmesh.Mesh, server: TlsServer, tmp_path: Path
) -> None:
    """Flask, served by werkzeug with mutual TLS (the workload's SVID, client certificates
    required): MeshWSGIMiddleware reads SSL_CLIENT_CERT, as the app's mesh context."""
    from flask import Flask
    from werkzeug.serving import make_server

    chain, key = sign(meshd.ca_dir, tmp_path / "flask", PAY_ID, valid=(-60, 600))
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(chain, key)
    context.verify_mode = ssl.CERT_REQUIRED
    context.load_verify_locations(meshd.ca_dir / "root-cert.pem")
    app = Flask("pay")

    @app.get("/")
    def who() -> str:
        inbound = libmesh.current_inbound()
        return inbound.peer_principal if inbound else "?"

    app.wsgi_app = libmesh.middleware.MeshWSGIMiddleware(  # type: ignore[method-assign]
        app.wsgi_app, telemetry=client_mesh.telemetry
    )
    flask_server = make_server("127.0.0.1", 0, app, threaded=True, ssl_context=context)
    threading.Thread(target=flask_server.serve_forever, daemon=True).start()
    try:
        (meshd.config_dir / "pay.yaml").write_text(mesh_yaml(flask_server.port))
        deadline = time.monotonic() + 10
        while True:
            cluster = client_mesh.engine.cluster("outbound|8080||pay.shop.svc.cluster.local")
            if cluster is not None and [h.port for h in cluster.hosts] == [flask_server.port]:
                break
            assert time.monotonic() < deadline, "the new endpoint never reached the client"
            time.sleep(0.05)
        assert outcome(with_requests, client_mesh) == "200 spiffe://cluster.local/ns/shop/sa/web"
    finally:
        flask_server.shutdown()
