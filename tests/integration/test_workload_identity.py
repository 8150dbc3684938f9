"""A workload keeps its SVID current from a real meshd: rotation at about half the lifetime,
files for grpcio's file_watcher, and a meshd that is down through a rotation window."""

from __future__ import annotations

import datetime
import stat
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from cryptography import x509

from libmesh.identity import SpiffeId, WorkloadIdentity, verify_svid
from tests.meshd_process import MeshdProcess

REVIEWS = SpiffeId.for_workload("cluster.local", "shop", "reviews")
StartMeshd = Callable[..., MeshdProcess]


def token_for(meshd: MeshdProcess) -> str:
    run = subprocess.run(
        [sys.executable, "-m", "meshd._meshctl", "token", "create", "-n", "shop",
         "-s", "reviews", "--ca-dir", str(meshd.ca_dir), "--ttl", "10m"],
        capture_output=True, text=True, timeout=30, check=True,
    )  # fmt: skip
    return run.stdout.strip()


def wait_until(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


@pytest.fixture
def meshd(tmp_path: Path, start_meshd: StartMeshd) -> MeshdProcess:
    return start_meshd(tmp_path)


def test_the_svid_rotates_at_half_its_lifetime_and_the_files_follow(
    meshd: MeshdProcess, tmp_path: Path
) -> None:
    identity = WorkloadIdentity(
        meshd.xds_address, REVIEWS, token=token_for(meshd), ttl=datetime.timedelta(seconds=3)
    ).start()
    try:
        first = identity.wait()
        files = tmp_path / "svid"
        identity.write_files(files)
        seen = {first.leaf.serial_number}
        deadline = time.monotonic() + 8
        while len(seen) < 4 and time.monotonic() < deadline:
            current = identity.current()
            assert current is not None  # never a gap, never an expired one
            seen.add(current.leaf.serial_number)
            time.sleep(0.05)
        assert len(seen) >= 4, f"{len(seen)} SVIDs in 8 s with a 3 s lifetime"

        chain = x509.load_pem_x509_certificates((files / "cert-chain.pem").read_bytes())
        roots = x509.load_pem_x509_certificates((files / "root-cert.pem").read_bytes())
        assert verify_svid(chain, roots, expected=REVIEWS) == REVIEWS
        assert stat.S_IMODE((files / "key.pem").stat().st_mode) == 0o600
    finally:
        identity.close()


def test_with_meshd_down_the_valid_svid_stays_and_renews_once_meshd_is_back(
    meshd: MeshdProcess,
) -> None:
    identity = WorkloadIdentity(
        meshd.xds_address, REVIEWS, token=token_for(meshd), ttl=datetime.timedelta(seconds=6),
        backoff=(0.2, 1.0),
    ).start()  # fmt: skip
    try:
        first = identity.wait()
        meshd.kill()
        wait_until(lambda: bool(identity.last_error), 10, "a failed renewal")
        held = identity.current()
        assert held is not None
        assert held.leaf.serial_number == first.leaf.serial_number  # still valid: kept

        meshd.restart()
        wait_until(
            lambda: (
                (c := identity.current()) is not None
                and c.leaf.serial_number != first.leaf.serial_number
            ),
            15,
            "a renewal after meshd came back",
        )
        assert identity.last_error == ""
    finally:
        identity.close()


def test_mesh_connect_with_a_token_gets_the_workloads_svid(
    meshd: MeshdProcess, tmp_path: Path
) -> None:
    import libmesh

    mesh = libmesh.Mesh.connect(
        meshd.xds_address,
        namespace="shop",
        service_account="reviews",
        token=token_for(meshd),
        state_file=tmp_path / "state",
    )
    try:
        assert mesh.identity is not None
        svid = mesh.identity.current()
        assert svid is not None
        assert svid.spiffe_id == REVIEWS
        metrics = mesh.telemetry.render_metrics()
        line = next(
            line for line in metrics.splitlines()
            if line.startswith("libmesh_svid_expiry_timestamp_seconds{")
        )  # fmt: skip
        assert f'spiffe_id="{REVIEWS}"' in line
        assert float(line.rsplit(" ", 1)[1]) == svid.expires.timestamp()
    finally:
        mesh.close()


def test_renewal_presents_the_held_svid_over_mtls_once_the_token_has_expired(
    meshd: MeshdProcess,
) -> None:
    run = subprocess.run(
        [sys.executable, "-m", "meshd._meshctl", "token", "create", "-n", "shop",
         "-s", "reviews", "--ca-dir", str(meshd.ca_dir), "--ttl", "2s"],
        capture_output=True, text=True, timeout=30, check=True,
    )  # fmt: skip
    identity = WorkloadIdentity(
        meshd.xds_address,
        REVIEWS,
        token=run.stdout.strip(),
        secure_address=f"127.0.0.1:{meshd.secure_xds_port}",
        ttl=datetime.timedelta(seconds=4),
    ).start()
    try:
        first = identity.wait()
        time.sleep(2.5)  # the token has expired now
        wait_until(
            lambda: (
                (c := identity.current()) is not None
                and c.leaf.serial_number != first.leaf.serial_number
            ),
            10,
            "a renewal over mTLS",
        )
        meshd.wait_for_log(f"signed an SVID for {REVIEWS}")
        assert "mTLS" in meshd.wait_for_log("mTLS)")
    finally:
        identity.close()
