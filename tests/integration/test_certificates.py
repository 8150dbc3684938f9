"""meshd's certificate API (Istio's CreateCertificate) on a real meshd: a bootstrap token from
``meshctl token create`` gets the SVID for its identity and nothing else."""

from __future__ import annotations

import re
import stat
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from libmesh.identity import SpiffeId, make_csr, new_private_key, verify_svid
from meshd._certificates import IstioCertificateRequest, IstioCertificateResponse
from meshd._tokens import TokenIssuer
from tests.meshd_process import MeshdProcess

REVIEWS = SpiffeId.for_workload("cluster.local", "shop", "reviews")
RATINGS = SpiffeId.for_workload("cluster.local", "shop", "ratings")
StartMeshd = Callable[..., MeshdProcess]


def meshctl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "meshd._meshctl", *args],
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip


def create_certificate(meshd: MeshdProcess, identity: SpiffeId, token: str | None) -> list[str]:
    csr = make_csr(new_private_key(), identity).public_bytes(serialization.Encoding.PEM)
    with grpc.insecure_channel(meshd.xds_address) as channel:
        call = channel.unary_unary(
            "/istio.v1.auth.IstioCertificateService/CreateCertificate",
            request_serializer=IstioCertificateRequest.SerializeToString,
            response_deserializer=IstioCertificateResponse.FromString,
        )
        metadata = (("authorization", f"Bearer {token}"),) if token is not None else ()
        request = IstioCertificateRequest(csr=csr.decode(), validity_duration=3600)
        return list(call(request, metadata=metadata, timeout=10).cert_chain)


@pytest.fixture
def meshd(tmp_path: Path, start_meshd: StartMeshd) -> MeshdProcess:
    return start_meshd(tmp_path)


def token_for(meshd: MeshdProcess, namespace: str, service_account: str) -> str:
    run = meshctl("token", "create", "-n", namespace, "-s", service_account,
                  "--ca-dir", str(meshd.ca_dir), "--ttl", "10m")  # fmt: skip
    assert run.returncode == 0, run.stderr
    return run.stdout.strip()


def test_a_token_gets_the_svid_of_its_identity(meshd: MeshdProcess) -> None:
    chain_pem = create_certificate(meshd, REVIEWS, token_for(meshd, "shop", "reviews"))

    chain = [x509.load_pem_x509_certificate(p.encode()) for p in chain_pem]
    roots = x509.load_pem_x509_certificates((meshd.ca_dir / "root-cert.pem").read_bytes())
    assert verify_svid(chain, roots, trust_domain="cluster.local") == REVIEWS
    assert stat.S_IMODE((meshd.ca_dir / "root-key.pem").stat().st_mode) == 0o600
    assert stat.S_IMODE((meshd.ca_dir / "token-key").stat().st_mode) == 0o600
    meshd.wait_for_log(f"signed an SVID for {REVIEWS}")


def test_a_token_for_one_service_account_cannot_get_another(meshd: MeshdProcess) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        create_certificate(meshd, RATINGS, token_for(meshd, "shop", "reviews"))
    assert caught.value.code() is grpc.StatusCode.PERMISSION_DENIED  # type: ignore[attr-defined]
    assert "the token is for spiffe://cluster.local/ns/shop/sa/reviews" in str(
        caught.value.details()  # type: ignore[attr-defined]
    )
    meshd.wait_for_log("refused a certificate request")


@pytest.mark.parametrize("case", ["missing", "tampered", "expired", "foreign"])
def test_no_valid_token_no_certificate(meshd: MeshdProcess, tmp_path: Path, case: str) -> None:
    token: str | None
    if case == "missing":
        token = None
    elif case == "tampered":
        valid = token_for(meshd, "shop", "reviews")
        header, claims, signature = valid.split(".")
        token = f"{header}.{claims[:-2]}AA.{signature}"
    elif case == "expired":
        issuer = TokenIssuer.load_or_create(meshd.ca_dir, clock=lambda: 1_000_000.0)
        token = issuer.create(REVIEWS, 60)
    else:  # signed by another meshd's key
        token = TokenIssuer.load_or_create(tmp_path / "other-ca").create(REVIEWS, 600)

    with pytest.raises(grpc.RpcError) as caught:
        create_certificate(meshd, REVIEWS, token)

    assert caught.value.code() is grpc.StatusCode.UNAUTHENTICATED  # type: ignore[attr-defined]
    expected = {
        "missing": "no credential",
        "tampered": "not valid base64url JSON|does not verify",
        "expired": "has expired",
        "foreign": "does not verify",
    }[case]
    assert re.search(expected, str(caught.value.details()))  # type: ignore[attr-defined]
