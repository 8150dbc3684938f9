"""Mutual TLS between workloads, each handshake real on 127.0.0.1: SVIDs from meshd's CA,
auto mTLS for workloads labelled ``security.istio.io/tlsMode: istio``, DestinationRule TLS
modes, PeerAuthentication enforced by ``libmesh.serve``, and what is refused."""

from __future__ import annotations

import datetime
import os
import socket
import ssl
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

import libmesh
from tests.conftest import unused_port
from tests.meshd_process import MeshdProcess

StartMeshd = Callable[..., MeshdProcess]
PAY = "http://pay.shop.svc.cluster.local:8080/"
PAY_ID = "spiffe://cluster.local/ns/shop/sa/pay"
WEB_ID = "spiffe://cluster.local/ns/shop/sa/web"
BILLING_ID = "spiffe://cluster.local/ns/shop/sa/billing"

SERVICE = """
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: pay, namespace: shop}
spec:
  hosts: [pay.shop.svc.cluster.local]
  location: MESH_INTERNAL
  resolution: STATIC
  ports: [{number: 8080, name: http, protocol: HTTP}]
  workloadSelector: {labels: {app: pay}}
"""


def peer_authentication(mode: str, name: str = "default") -> str:
    return f"""
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {{name: {name}, namespace: shop}}
spec: {{mtls: {{mode: {mode}}}}}
"""


def token(meshd: MeshdProcess, namespace: str, account: str) -> str:
    run = subprocess.run(
        [sys.executable, "-m", "meshd._meshctl", "token", "create", "-n", namespace,
         "-s", account, "--ca-dir", str(meshd.ca_dir), "--ttl", "10m"],
        capture_output=True, text=True, timeout=30, check=True,
    )  # fmt: skip
    return run.stdout.strip()


class Workload:
    """tests/mesh_server.py in its own process: a FastAPI app served by libmesh.serve."""

    def __init__(
        self, meshd: MeshdProcess, account: str = "pay", svid_ttl: float | None = None
    ) -> None:
        self.output: str | None = None
        self.port = unused_port()
        environment = dict(os.environ)
        if svid_ttl is not None:
            environment["SVID_TTL"] = str(svid_ttl)
        self.process = subprocess.Popen(
            [sys.executable, "-m", "tests.mesh_server", meshd.xds_address,
             token(meshd, "shop", account), str(self.port), "shop", account, "pay"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=environment,
        )  # fmt: skip
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            with socket.socket() as probe:
                if probe.connect_ex(("127.0.0.1", self.port)) == 0:
                    return
            if self.process.poll() is not None:
                raise AssertionError(f"the workload exited: {self.process.stdout.read()}")  # type: ignore[union-attr]
            time.sleep(0.1)
        raise AssertionError("the workload did not start listening")

    def stop(self) -> str:
        """Stop it (once); its output."""
        if self.output is None:
            self.process.terminate()
            self.output, _ = self.process.communicate(timeout=15)
        return self.output


@pytest.fixture
def config_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "mesh"
    directory.mkdir()
    (directory / "pay.yaml").write_text(SERVICE)
    return directory


@pytest.fixture
def meshd(config_dir: Path, start_meshd: StartMeshd) -> MeshdProcess:
    return start_meshd(config_dir)


@pytest.fixture
def pay(meshd: MeshdProcess) -> Iterator[Workload]:
    workload = Workload(meshd)
    yield workload
    workload.stop()


def connect(meshd: MeshdProcess, account: str | None = "web") -> libmesh.Mesh:
    return libmesh.Mesh.connect(
        meshd.xds_address,
        namespace="shop",
        service_account=account or "default",
        token=token(meshd, "shop", account) if account else None,
        state_file=None,
    )


def wait_for_endpoint(mesh: libmesh.Mesh) -> None:
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        cluster = mesh.engine.cluster("outbound|8080||pay.shop.svc.cluster.local")
        if cluster is not None and cluster.hosts:
            return
        time.sleep(0.05)
    raise AssertionError("pay's endpoint never reached the client")


def set_mode(meshd: MeshdProcess, config_dir: Path, mesh: libmesh.Mesh, mode: str) -> None:
    """Apply a PeerAuthentication and wait until the client's config has it (the server's
    follows from the same push)."""
    before = mesh.engine.version
    (config_dir / "peer-authentication.yaml").write_text(peer_authentication(mode))
    deadline = time.monotonic() + 10
    while mesh.engine.version == before:
        assert time.monotonic() < deadline, "the PeerAuthentication change never arrived"
        time.sleep(0.05)
    time.sleep(0.3)  # the server's stream gets the same push


def test_auto_mtls_the_server_sees_the_callers_spiffe_id(
    meshd: MeshdProcess, pay: Workload
) -> None:
    mesh = connect(meshd)
    try:
        wait_for_endpoint(mesh)
        with mesh.client() as client:
            answers = [client.get(PAY).json()["peer"] for _ in range(5)]
        assert answers == [WEB_ID] * 5
        # Istio's metrics name the caller by its SPIFFE ID
        assert f'source_principal="{WEB_ID}"' in mesh.telemetry.render_metrics()
        # plain httpx, no mesh: plaintext, which the default PERMISSIVE mode takes
        direct = httpx.get(f"http://127.0.0.1:{pay.port}/", timeout=5)
        assert direct.json() == {"peer": ""}
    finally:
        mesh.close()


def test_libmesh_serve_speaks_http2_in_plaintext_and_over_mtls(
    meshd: MeshdProcess, pay: Workload
) -> None:
    """uvicorn speaks HTTP/1.1 only: libmesh.serve takes HTTP/2 itself, by ALPN on mTLS and by
    its preface in plaintext (prior knowledge), with the same app and the caller's identity."""
    mesh = connect(meshd)
    try:
        assert mesh.tls is not None
        context = mesh.tls.client(alpn=("h2",))  # the workload's SVID, the mesh's trust bundle
        with httpx.Client(http1=False, http2=True, timeout=5) as plain:
            plaintext = plain.get(f"http://127.0.0.1:{pay.port}/")
        with httpx.Client(http2=True, verify=context, timeout=5) as secure:
            mutual = [secure.get(f"https://127.0.0.1:{pay.port}/") for _ in range(3)]
    finally:
        mesh.close()
    assert plaintext.http_version == "HTTP/2"
    assert plaintext.json() == {"peer": ""}
    assert [r.http_version for r in mutual] == ["HTTP/2"] * 3
    assert [r.json() for r in mutual] == [{"peer": WEB_ID}] * 3


def test_strict_refuses_plaintext_and_permissive_accepts_both(
    meshd: MeshdProcess, config_dir: Path, pay: Workload
) -> None:
    mesh = connect(meshd)
    try:
        wait_for_endpoint(mesh)
        set_mode(meshd, config_dir, mesh, "STRICT")
        with pytest.raises(httpx.TransportError):
            httpx.get(f"http://127.0.0.1:{pay.port}/", timeout=5)
        with mesh.client() as client:
            assert client.get(PAY).json() == {"peer": WEB_ID}
        set_mode(meshd, config_dir, mesh, "PERMISSIVE")
        assert httpx.get(f"http://127.0.0.1:{pay.port}/", timeout=5).json() == {"peer": ""}
        with mesh.client() as client:
            assert client.get(PAY).json() == {"peer": WEB_ID}
    finally:
        mesh.close()
    assert "refused a plaintext connection" in pay.stop()


def test_a_client_without_identity_cannot_reach_an_mtls_only_server(
    meshd: MeshdProcess, config_dir: Path, pay: Workload
) -> None:
    mesh = connect(meshd, account=None)
    try:
        wait_for_endpoint(mesh)
        with mesh.client() as client, pytest.raises(libmesh.UpstreamConnectError) as caught:
            client.get(PAY)
        assert "no workload identity" in str(caught.value)
    finally:
        mesh.close()


def test_the_wrong_spiffe_id_is_refused_by_the_client(
    meshd: MeshdProcess, config_dir: Path, pay: Workload
) -> None:
    (config_dir / "rule.yaml").write_text(textwrap.dedent("""
        apiVersion: networking.istio.io/v1
        kind: DestinationRule
        metadata: {name: pay, namespace: shop}
        spec:
          host: pay.shop.svc.cluster.local
          trafficPolicy:
            tls: {mode: ISTIO_MUTUAL, subjectAltNames: [spiffe://cluster.local/ns/shop/sa/billing]}
        """))  # fmt: skip
    mesh = connect(meshd)
    try:
        wait_for_endpoint(mesh)
        deadline = time.monotonic() + 10
        while True:
            cluster = mesh.engine.cluster("outbound|8080||pay.shop.svc.cluster.local")
            tls = cluster.tls.for_endpoint({}) if cluster is not None else None
            if tls is not None and tls.subject_alt_names == {BILLING_ID}:
                break
            assert time.monotonic() < deadline, "the DestinationRule never reached the client"
            time.sleep(0.05)
        with mesh.client() as client, pytest.raises(libmesh.UpstreamConnectError) as caught:
            client.get(PAY)
        message = str(caught.value)
        assert f"the server presented {PAY_ID}" in message
        assert BILLING_ID in message
    finally:
        mesh.close()


def raw_handshake(port: int, certificate: Path | None, key: Path | None, roots: Path) -> str:
    """One TLS handshake to ``port`` with a hand-made client certificate, then a request:
    the status line, or the error that ended it."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.load_verify_locations(roots)
    if certificate is not None:
        context.load_cert_chain(certificate, key)
    try:
        with (
            socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
            context.wrap_socket(raw) as tls,
        ):
            tls.sendall(b"GET / HTTP/1.1\r\nHost: pay\r\nConnection: close\r\n\r\n")
            answer = tls.recv(4096)
            # (with TLS 1.3 the server judges the client's certificate after the client's
            # side of the handshake is done: a refusal is then a closed connection)
            return answer.split(b"\r\n")[0].decode() if answer else "refused: closed"
    except (ssl.SSLError, OSError) as exc:
        return f"refused: {exc}"


def sign(ca_dir: Path, out: Path, spiffe_id: str, *, valid: tuple[int, int]) -> tuple[Path, Path]:
    """A client certificate signed by the CA in ``ca_dir``, valid from ``valid[0]`` to
    ``valid[1]`` seconds from now (the CA's own code, with its clock moved)."""
    from cryptography.hazmat.primitives import serialization

    from libmesh.identity import SpiffeId, make_csr, new_private_key
    from meshd._ca import CertificateAuthority

    identity = SpiffeId.parse(spiffe_id)
    start = datetime.datetime.now(datetime.UTC) + datetime.timedelta(seconds=valid[0])
    ca = CertificateAuthority.load_or_create(ca_dir, identity.trust_domain, clock=lambda: start)
    key = new_private_key()
    csr = make_csr(key, identity).public_bytes(serialization.Encoding.PEM)
    chain = ca.sign(csr, identity, datetime.timedelta(seconds=valid[1] - valid[0]))
    out.mkdir(parents=True, exist_ok=True)
    (out / "cert.pem").write_text("".join(chain[:-1]))  # the root stays out, as a client sends
    (out / "key.pem").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return out / "cert.pem", out / "key.pem"


def test_the_server_refuses_foreign_expired_and_not_yet_valid_certificates(
    meshd: MeshdProcess, config_dir: Path, pay: Workload, tmp_path: Path
) -> None:
    roots = meshd.ca_dir / "root-cert.pem"
    good = sign(meshd.ca_dir, tmp_path / "good", WEB_ID, valid=(-60, 600))
    assert raw_handshake(pay.port, *good, roots) == "HTTP/1.1 200 OK"
    expired = sign(meshd.ca_dir, tmp_path / "expired", WEB_ID, valid=(-7200, -3600))
    assert raw_handshake(pay.port, *expired, roots).startswith("refused")
    future = sign(meshd.ca_dir, tmp_path / "future", WEB_ID, valid=(3600, 7200))
    assert raw_handshake(pay.port, *future, roots).startswith("refused")
    foreign_ca = tmp_path / "foreign-ca"
    foreign = sign(foreign_ca, tmp_path / "foreign", WEB_ID, valid=(-60, 600))
    assert raw_handshake(pay.port, *foreign, roots).startswith("refused")
    other_domain = tmp_path / "other-domain-ca"
    wrong_id = "spiffe://example.org/ns/shop/sa/web"
    wrong = sign(other_domain, tmp_path / "wrong", wrong_id, valid=(-60, 600))
    assert raw_handshake(pay.port, *wrong, roots).startswith("refused")
    log = pay.stop()
    assert "refused mTLS from 127.0.0.1" in log


POLICIES = """
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: only-web, namespace: shop}
spec:
  selector: {matchLabels: {app: pay}}
  action: ALLOW
  rules:
  - from: [{source: {principals: [cluster.local/ns/shop/sa/web]}}]
    to: [{operation: {methods: [GET], paths: ["/", "/admin*"]}}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: no-admin, namespace: shop}
spec:
  action: DENY
  rules:
  - to: [{operation: {paths: ["/admin*"]}}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: watch-web, namespace: shop}
spec:
  action: AUDIT
  rules:
  - from: [{source: {namespaces: [shop]}}]
"""


def eventually(check: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def test_authorization_policies_allow_deny_and_audit_by_principal_path_and_method(
    meshd: MeshdProcess, config_dir: Path, pay: Workload
) -> None:
    web = connect(meshd, "web")
    intruder = connect(meshd, "intruder")
    try:
        wait_for_endpoint(web)
        wait_for_endpoint(intruder)
        (config_dir / "policies.yaml").write_text(POLICIES)
        with web.client() as allowed, intruder.client() as denied:
            eventually(lambda: denied.get(PAY).status_code == 403, "the policies to apply")
            refused = denied.get(PAY)
            assert refused.text == "RBAC: access denied"
            assert allowed.get(PAY).json() == {"peer": WEB_ID}
            assert allowed.post(PAY).status_code == 403  # the ALLOW rule names GET only
            assert allowed.get(PAY + "admin/users").status_code == 403  # DENY wins
        plaintext = httpx.get(f"http://127.0.0.1:{pay.port}/", timeout=5)
        assert plaintext.status_code == 403  # no principal: not the one allowed
    finally:
        web.close()
        intruder.close()
    log = pay.stop()
    assert "AUDIT GET / from spiffe://cluster.local/ns/shop/sa/web" in log
    assert "ns[shop]-policy[no-admin]-rule[0]" in log


def test_calls_keep_succeeding_across_several_rotations_on_both_sides(
    meshd: MeshdProcess,
) -> None:
    server = Workload(meshd, svid_ttl=3)
    mesh = libmesh.Mesh.connect(
        meshd.xds_address, namespace="shop", service_account="web",
        token=token(meshd, "shop", "web"), state_file=None, svid_ttl=3,
    )  # fmt: skip
    try:
        wait_for_endpoint(mesh)
        identity = mesh.identity
        assert identity is not None
        answers: list[str] = []
        deadline = time.monotonic() + 8
        with mesh.client() as client:
            while time.monotonic() < deadline:
                # a new connection (a new handshake) each time: every SVID gets presented
                response = client.get(PAY, headers={"connection": "close"})
                answers.append(response.json()["peer"])
                time.sleep(0.05)
        assert identity.rotations >= 3
        assert set(answers) == {WEB_ID}
        assert len(answers) > 50
    finally:
        mesh.close()
    renewals = server.stop().count("libmesh: SVID for spiffe://cluster.local/ns/shop/sa/pay")
    assert renewals >= 3
