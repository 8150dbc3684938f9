"""One YAML file, three data planes: libmesh, grpcio's xDS client and Envoy, all configured by
the same meshd, make the same routing decisions: header matches, fault aborts, weights."""

from __future__ import annotations

import textwrap
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import libmesh
from libmesh.policy import Forward, RequestInfo
from tests.conftest import Backends
from tests.meshd_process import MeshdProcess

from .conftest import EnvoyProcess, GrpcBackends, GrpcXdsClient

StartMeshd = Callable[..., MeshdProcess]


def service_and_routes(name: str, protocol: str, ports: list[int]) -> str:
    """``name`` with instances v1 and v2, and the routing every data plane must agree on."""
    port_name = protocol.lower()
    workloads = "\n---\n".join(
        textwrap.dedent(f"""
        apiVersion: networking.istio.io/v1
        kind: WorkloadEntry
        metadata: {{name: {name}-v{i + 1}, namespace: shop}}
        spec:
          address: 127.0.0.1
          ports: {{{port_name}: {port}}}
          labels: {{app: {name}, version: v{i + 1}}}
        """)
        for i, port in enumerate(ports)
    )
    return (
        textwrap.dedent(f"""
        apiVersion: networking.istio.io/v1
        kind: ServiceEntry
        metadata: {{name: {name}, namespace: shop}}
        spec:
          hosts: [{name}.shop.svc.cluster.local]
          location: MESH_INTERNAL
          resolution: STATIC
          ports: [{{number: 8080, name: {port_name}, protocol: {protocol}}}]
          workloadSelector: {{labels: {{app: {name}}}}}
        ---
        apiVersion: networking.istio.io/v1
        kind: DestinationRule
        metadata: {{name: {name}, namespace: shop}}
        spec:
          host: {name}
          subsets: [{{name: v1, labels: {{version: v1}}}}, {{name: v2, labels: {{version: v2}}}}]
        ---
        apiVersion: networking.istio.io/v1
        kind: VirtualService
        metadata: {{name: {name}, namespace: shop}}
        spec:
          hosts: [{name}]
          http:
          - match: [{{headers: {{x-canary: {{exact: "yes"}}}}}}]
            route: [{{destination: {{host: {name}, subset: v2}}}}]
          - match: [{{headers: {{x-fault: {{exact: "yes"}}}}}}]
            fault: {{abort: {{httpStatus: 503, percentage: {{value: 100}}}}}}
            route: [{{destination: {{host: {name}, subset: v1}}}}]
          - route:
            - {{destination: {{host: {name}, subset: v1}}, weight: 90}}
            - {{destination: {{host: {name}, subset: v2}}, weight: 10}}
        ---
        """)
        + workloads
    )


def test_libmesh_grpcio_and_envoy_route_the_same_yaml_the_same_way(
    tmp_path: Path,
    start_backends: Callable[[int], Backends],
    start_grpc_backends: Callable[[int], GrpcBackends],
    start_meshd: StartMeshd,
    start_envoy: Callable[..., EnvoyProcess],
    start_grpc_client: Callable[..., GrpcXdsClient],
) -> None:
    http, grpc = start_backends(2), start_grpc_backends(2)
    directory = tmp_path / "mesh"
    directory.mkdir()
    (directory / "mesh.yaml").write_text(
        service_and_routes("reviews", "HTTP", http.ports)
        + "\n---\n"
        + service_and_routes("echo", "GRPC", grpc.ports)
    )
    meshd = start_meshd(directory)
    envoy = start_envoy(meshd)
    grpcio = start_grpc_client(meshd, "echo.shop.svc.cluster.local:8080", "grpc-1", "shop")
    mesh = libmesh.Mesh.connect(meshd.xds_address, namespace="shop", state_file=None)
    url = "http://reviews.shop.svc.cluster.local:8080/r"

    try:
        with mesh.client() as through_libmesh, envoy.client() as through_envoy:
            for client in (through_libmesh, through_envoy):
                canary = [client.get(url, headers={"x-canary": "yes"}) for _ in range(20)]
                assert {r.json()["instance"] for r in canary} == {"instance-1"}
                faulted = [client.get(url, headers={"x-fault": "yes"}) for _ in range(5)]
                assert {r.status_code for r in faulted} == {503}
            from_libmesh = Counter(through_libmesh.get(url).json()["instance"] for _ in range(500))
            from_envoy = Counter(through_envoy.get(url).json()["instance"] for _ in range(500))
    finally:
        mesh.close()

    assert grpcio.call(20, **{"x-canary": "yes"}) == {"instance-1": 20}
    faulted = grpcio.call(5, **{"x-fault": "yes"})
    assert list(faulted) == ["UNAVAILABLE: Fault injected"]  # HTTP 503 is gRPC's UNAVAILABLE
    from_grpcio = grpcio.call(500)

    assert from_libmesh == {"instance-0": 450, "instance-1": 50}  # smooth weighted: exact
    # 450 expected of each; 5 standard deviations of a binomial(500, 0.9) is 34
    assert abs(from_envoy["instance-0"] - 450) < 34, from_envoy
    assert abs(from_grpcio["instance-0"] - 450) < 34, from_grpcio
    # libmesh's engine decides a gRPC call to echo as grpcio did
    table = mesh.engine.route_table("echo.shop.svc.cluster.local", 8080)
    assert table is not None
    call = RequestInfo(
        "POST", "echo.shop.svc.cluster.local:8080", "/test.Echo/Who",
        headers={"x-canary": "yes", "content-type": "application/grpc"},
    )  # fmt: skip
    decision = table.match(call)
    assert isinstance(decision, Forward)
    assert decision.picker.pick() == "outbound|8080|v2|echo.shop.svc.cluster.local"
