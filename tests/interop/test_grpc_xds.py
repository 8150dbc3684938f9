"""grpcio's built-in xDS client (``xds:///``) configured by meshd: weighted routing, fault
injection with a gRPC status, the retry policy, and a weight changed by editing the YAML."""

from __future__ import annotations

import textwrap
import time
from collections.abc import Callable
from pathlib import Path

from tests.meshd_process import MeshdProcess

from .conftest import GrpcBackends, GrpcXdsClient

TARGET = "echo.shop.svc.cluster.local:8080"
StartMeshd = Callable[..., MeshdProcess]
StartGrpcBackends = Callable[[int], GrpcBackends]
StartGrpcClient = Callable[..., GrpcXdsClient]


def echo_mesh(ports: list[int], route: str) -> str:
    """The echo gRPC service with a v1 and a v2 instance, and the given http route rules."""
    entries = "\n---\n".join(
        f"""
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {{name: echo-v{i + 1}, namespace: shop}}
spec: {{address: 127.0.0.1, ports: {{grpc: {port}}}, labels: {{app: echo, version: v{i + 1}}}}}
"""
        for i, port in enumerate(ports)
    )
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
{entries}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: echo, namespace: shop}}
spec:
  host: echo
  subsets: [{{name: v1, labels: {{version: v1}}}}, {{name: v2, labels: {{version: v2}}}}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: echo, namespace: shop}}
spec:
  hosts: [echo]
  http:
{textwrap.indent(textwrap.dedent(route).strip(), "  ")}
"""


def split(v1: int, v2: int, extra: str = "") -> str:
    return f"""
    - route:
      - {{destination: {{host: echo, subset: v1}}, weight: {v1}}}
      - {{destination: {{host: echo, subset: v2}}, weight: {v2}}}
      {extra}
    """


def write(directory: Path, text: str) -> None:
    (directory / "mesh").mkdir(exist_ok=True)
    (directory / "mesh" / "mesh.yaml").write_text(text)


def setup(
    tmp_path: Path,
    route: str,
    start_grpc_backends: Callable[[int], GrpcBackends],
    start_meshd: StartMeshd,
    start_grpc_client: Callable[..., GrpcXdsClient],
) -> tuple[GrpcBackends, MeshdProcess, GrpcXdsClient]:
    backends = start_grpc_backends(2)
    write(tmp_path, echo_mesh(backends.ports, route))
    meshd = start_meshd(tmp_path / "mesh")
    client = start_grpc_client(meshd, TARGET, "grpc-client-1", "shop")
    return backends, meshd, client


def test_grpcio_follows_weighted_routing_and_acks_everything(
    tmp_path: Path,
    start_grpc_backends: StartGrpcBackends,
    start_meshd: StartMeshd,
    start_grpc_client: StartGrpcClient,
) -> None:
    _, meshd, client = setup(
        tmp_path, split(80, 20), start_grpc_backends, start_meshd, start_grpc_client
    )

    outcomes = client.call(1000)

    # 800 expected; 5 standard deviations of a binomial(1000, 0.8) is 63
    assert set(outcomes) == {"instance-0", "instance-1"}
    assert abs(outcomes["instance-0"] - 800) < 63, outcomes
    status = meshd.client("grpc-client-1")
    assert status["flavor"] == "grpc"
    assert {t: s["status"] for t, s in status["types"].items()} == dict.fromkeys(
        ("cds", "eds", "lds", "rds"), "SYNCED"
    )
    assert status["types"]["lds"]["subscribed"] == [TARGET]  # grpcio names what it dials


def test_grpcio_injects_the_abort_with_its_grpc_status(
    tmp_path: Path,
    start_grpc_backends: StartGrpcBackends,
    start_meshd: StartMeshd,
    start_grpc_client: StartGrpcClient,
) -> None:
    route = """
    - match: [{headers: {x-fault: {exact: "yes"}}}]
      fault: {abort: {grpcStatus: RESOURCE_EXHAUSTED, percentage: {value: 100}}}
      route: [{destination: {host: echo, subset: v1}}]
    - fault: {abort: {grpcStatus: UNAVAILABLE, percentage: {value: 50}}}
      route: [{destination: {host: echo, subset: v1}}]
    """
    backends, _, client = setup(
        tmp_path, route, start_grpc_backends, start_meshd, start_grpc_client
    )

    assert client.call(20, **{"x-fault": "yes"}) == {"RESOURCE_EXHAUSTED: Fault injected": 20}
    outcomes = client.call(400)
    assert set(outcomes) == {"instance-0", "UNAVAILABLE: Fault injected"}
    assert abs(outcomes["instance-0"] - 200) < 50, outcomes  # 5 sd of binomial(400, 0.5)
    assert backends.calls(0) == outcomes["instance-0"]  # aborted calls never left the client


def test_grpcio_retries_as_the_yaml_says(
    tmp_path: Path,
    start_grpc_backends: StartGrpcBackends,
    start_meshd: StartMeshd,
    start_grpc_client: StartGrpcClient,
) -> None:
    route = """
    - retries: {attempts: 3, retryOn: unavailable}
      route: [{destination: {host: echo, subset: v1}}]
    """
    backends, _, client = setup(
        tmp_path, route, start_grpc_backends, start_meshd, start_grpc_client
    )
    backends.behave(0, fail_every=2, code="UNAVAILABLE")

    assert client.call(50) == {"instance-0": 50}
    assert backends.calls(0) == 100  # every other call failed once and was retried


def test_grpcio_follows_a_weight_change_made_by_editing_the_yaml(
    tmp_path: Path,
    start_grpc_backends: StartGrpcBackends,
    start_meshd: StartMeshd,
    start_grpc_client: StartGrpcClient,
) -> None:
    backends, meshd, client = setup(
        tmp_path, split(100, 0), start_grpc_backends, start_meshd, start_grpc_client
    )
    assert client.call(20) == {"instance-0": 20}

    write(tmp_path, echo_mesh(backends.ports, split(0, 100)))

    deadline = time.monotonic() + 15
    while client.call(10) != {"instance-1": 10}:
        assert time.monotonic() < deadline, f"grpcio did not follow the edit:\n{meshd.log}"
        time.sleep(0.1)
    assert client.call(50) == {"instance-1": 50}
