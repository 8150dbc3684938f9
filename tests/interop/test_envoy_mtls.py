"""A real Envoy in the mesh's mTLS: its SVID and trust bundle from libmesh's SDS server (for a
WorkloadIdentity with meshd's CA), its clusters from meshd with auto mTLS, calling a workload
that serves with libmesh.serve: the workload sees Envoy's SPIFFE ID, and Envoy refuses a server
whose SPIFFE ID is not the expected one."""

from __future__ import annotations

import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from libmesh.identity import SdsServer, SpiffeId, WorkloadIdentity
from tests.integration.test_mtls import SERVICE, Workload, token
from tests.meshd_process import MeshdProcess

from .conftest import EnvoyProcess

StartMeshd = Callable[..., MeshdProcess]
StartEnvoy = Callable[..., EnvoyProcess]
PAY = "http://pay.shop.svc.cluster.local:8080/"
LEGACY = "spiffe://cluster.local/ns/shop/sa/legacy"


@pytest.fixture
def meshd(tmp_path: Path, start_meshd: StartMeshd) -> MeshdProcess:
    (tmp_path / "mesh").mkdir()
    (tmp_path / "mesh" / "pay.yaml").write_text(SERVICE)
    return start_meshd(tmp_path / "mesh")


@pytest.fixture
def sds(meshd: MeshdProcess, tmp_path: Path) -> Iterator[str]:
    """The SVID of shop/legacy, served over SDS on a Unix socket."""
    identity = WorkloadIdentity(
        meshd.xds_address,
        SpiffeId.for_workload("cluster.local", "shop", "legacy"),
        token=token(meshd, "shop", "legacy"),
    ).start()
    identity.wait()
    path = str(tmp_path / "sds.sock")
    server = SdsServer(identity, f"unix:{path}").start()
    yield path
    server.close()
    identity.close()


def get(envoy: EnvoyProcess, url: str, expect: int, timeout: float = 15) -> str:
    """GET through Envoy until the answer has status ``expect`` (Envoy's clusters follow
    meshd's pushes and the SDS secrets a moment after they start)."""
    deadline = time.monotonic() + timeout
    with envoy.client() as client:
        while True:
            response = client.get(url)
            if response.status_code == expect or time.monotonic() > deadline:
                assert response.status_code == expect, response.text
                return response.text
            time.sleep(0.2)


def test_envoy_calls_a_libmesh_server_with_its_svid_from_sds(
    meshd: MeshdProcess, sds: str, start_envoy: StartEnvoy
) -> None:
    pay = Workload(meshd)
    try:
        envoy = start_envoy(meshd, "legacy-1", sds=sds)
        assert f'"peer":"{LEGACY}"' in get(envoy, PAY, 200)
        assert int(envoy.stats().get("cluster.outbound|8080||pay.shop.svc.cluster.local."
                                     "ssl.handshake", "0")) >= 1  # fmt: skip
    finally:
        pay.stop()


def test_envoy_refuses_a_server_that_is_not_the_expected_identity(
    meshd: MeshdProcess, sds: str, start_envoy: StartEnvoy
) -> None:
    (meshd.config_dir / "rule.yaml").write_text(textwrap.dedent("""
        apiVersion: networking.istio.io/v1
        kind: DestinationRule
        metadata: {name: pay, namespace: shop}
        spec:
          host: pay.shop.svc.cluster.local
          trafficPolicy:
            tls: {mode: ISTIO_MUTUAL, subjectAltNames: [spiffe://cluster.local/ns/shop/sa/billing]}
        """))  # fmt: skip
    pay = Workload(meshd)
    try:
        envoy = start_envoy(meshd, "legacy-1", sds=sds)
        body = get(envoy, PAY, 503)
        assert "upstream connect error" in body
        stats = envoy.stats()
        assert int(stats.get("cluster.outbound|8080||pay.shop.svc.cluster.local."
                             "ssl.fail_verify_san", "0")) >= 1  # fmt: skip
    finally:
        pay.stop()
