"""Rotating meshd's root CA while workloads call each other over mTLS: meshctl ca rotate
prepare → activate → finish, the running meshd following the CA directory, SVIDs of a few
seconds on both sides, and not one failed call."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import libmesh
from tests.integration.test_mtls import (
    PAY,
    SERVICE,
    WEB_ID,
    StartMeshd,
    Workload,
    token,
    wait_for_endpoint,
)
from tests.meshd_process import MeshdProcess


@pytest.fixture
def config_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "mesh"
    directory.mkdir()
    (directory / "pay.yaml").write_text(SERVICE)
    return directory


def meshctl(meshd: MeshdProcess, step: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "meshd._meshctl", "ca", "rotate", step, "--ca-dir",
         str(meshd.ca_dir)],
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip


def test_the_root_rotates_in_three_steps_without_a_failed_call(
    config_dir: Path, start_meshd: StartMeshd
) -> None:
    meshd = start_meshd(config_dir)
    pay = Workload(meshd, svid_ttl=3)
    mesh = libmesh.Mesh.connect(
        meshd.xds_address, namespace="shop", service_account="web",
        token=token(meshd, "shop", "web"), state_file=None, svid_ttl=3,
    )  # fmt: skip
    identity = mesh.identity
    assert identity is not None
    failures: list[str] = []
    answers: list[str] = []
    stop = threading.Event()

    def call() -> None:
        with mesh.client() as client:
            while not stop.is_set():
                try:  # a new connection (a new handshake) each time
                    answers.append(client.get(PAY, headers={"connection": "close"}).json()["peer"])
                except Exception as exc:
                    failures.append(repr(exc))
                time.sleep(0.05)

    try:
        wait_for_endpoint(mesh)
        old_root = identity.bundle[0]
        caller = threading.Thread(target=call)
        caller.start()
        time.sleep(1)
        steps = {}
        for step in ("prepare", "activate", "finish"):
            run = meshctl(meshd, step)
            assert run.returncode == 0, run.stderr
            steps[step] = run.stdout
            time.sleep(4)  # longer than an SVID lifetime: everyone renewed, old SVIDs expired
        stop.set()
        caller.join(timeout=10)
        assert failures == []
        assert set(answers) == {WEB_ID}
        assert len(answers) > 100
        new_root = identity.bundle[0]
        assert identity.bundle == [new_root]  # only the new root is trusted at the end
        assert new_root != old_root
        svid = identity.current()
        assert svid is not None
        assert svid.chain[-1] == new_root
        assert "now trusted beside the current root" in steps["prepare"]
        assert "now signs" in steps["activate"]
        assert "is no longer trusted" in steps["finish"]
    finally:
        stop.set()
        mesh.close()
        pay.stop()
    assert "the CA's roots changed (a rotation)" in meshd.log


def test_rotation_steps_out_of_order_are_refused_with_the_next_step(
    config_dir: Path, start_meshd: StartMeshd
) -> None:
    meshd = start_meshd(config_dir)
    token(meshd, "shop", "web")  # meshd made its CA
    activate = meshctl(meshd, "activate")
    assert activate.returncode == 1
    assert "run meshctl ca rotate prepare first" in activate.stderr
    assert meshctl(meshd, "finish").returncode == 1
    assert meshctl(meshd, "prepare").returncode == 0
    again = meshctl(meshd, "prepare")
    assert "already prepared" in again.stderr
    assert meshctl(meshd, "activate").returncode == 0
    early = meshctl(meshd, "prepare")
    assert "is not finished" in early.stderr
