"""A Flask app under ``libmesh.serve(app, mesh, interface="wsgi")``: uvicorn serves it, libmesh
terminates the mesh's mutual TLS, and ``MeshWSGIMiddleware`` sees the caller's verified SPIFFE
ID (as ``SSL_CLIENT_CERT``) — a production server for WSGI apps in the mesh, not werkzeug's."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import quote

import httpx
import pytest

from tests.conftest import unused_port
from tests.integration.test_mtls import (
    PAY,
    SERVICE,
    WEB_ID,
    connect,
    set_mode,
    sign,
    token,
    wait_for_endpoint,
)
from tests.meshd_process import MeshdProcess


@pytest.fixture
def flask_pay(
    tmp_path: Path, start_meshd: Callable[..., MeshdProcess]
) -> Iterator[tuple[MeshdProcess, Path, int]]:
    config = tmp_path / "mesh"
    config.mkdir()
    (config / "pay.yaml").write_text(SERVICE)
    meshd = start_meshd(config)
    port = unused_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "tests.mesh_flask", meshd.xds_address, token(meshd, "shop", "pay"),
         str(port)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=dict(os.environ),
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 20
        while True:
            with socket.socket() as probe:
                if probe.connect_ex(("127.0.0.1", port)) == 0:
                    break
            assert process.poll() is None, process.stdout.read()  # type: ignore[union-attr]
            assert time.monotonic() < deadline, "the Flask workload did not start listening"
            time.sleep(0.1)
        yield meshd, config, port
    finally:
        process.terminate()
        process.communicate(timeout=15)


def test_a_flask_app_served_by_libmesh_sees_the_callers_spiffe_id(
    flask_pay: tuple[MeshdProcess, Path, int],
) -> None:
    meshd, config, port = flask_pay
    mesh = connect(meshd)
    try:
        wait_for_endpoint(mesh)
        with mesh.client() as client:
            mutual = [client.get(PAY).json() for _ in range(3)]
        # plaintext (PERMISSIVE), with a forged copy of the header that carries the certificate
        # inside the server: it never reaches the app as an identity
        forged = httpx.get(
            f"http://127.0.0.1:{port}/",
            headers={"x-libmesh-client-certificate": "-----BEGIN CERTIFICATE-----"},
            timeout=5,
        ).json()
        # the environ spells "_" as "-" does: that spelling is dropped too, a real SVID with it
        stolen, _ = sign(meshd.ca_dir, meshd.ca_dir.parent / "stolen", WEB_ID, valid=(-60, 600))
        pem = stolen.read_text()  # a real SVID's certificate (public: no key needed to send it)
        underscored = httpx.get(
            f"http://127.0.0.1:{port}/",
            headers={"x_libmesh_client_certificate": quote(pem)},
            timeout=5,
        ).json()
        set_mode(meshd, config, mesh, "STRICT")
        with pytest.raises(httpx.TransportError):
            httpx.get(f"http://127.0.0.1:{port}/", timeout=5)
        with mesh.client() as client:
            strict = client.get(PAY).json()
    finally:
        mesh.close()
    assert [answer["peer"] for answer in mutual] == [WEB_ID] * 3
    assert forged["peer"] == ""
    assert underscored["peer"] == ""
    assert "x-libmesh-client-certificate" not in underscored["headers"]
    assert "x-libmesh-client-certificate" not in forged["headers"]
    assert "x-libmesh-client-certificate" not in mutual[0]["headers"]
    assert strict["peer"] == WEB_ID
