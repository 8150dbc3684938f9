"""meshd speaks xDS v3 as Envoy and grpcio expect: tested over real ADS streams to a real meshd.

Each test starts meshd on a directory of YAML, opens streams whose every request it writes,
and checks what comes back: versions and nonces, ACK and NACK bookkeeping, wildcard and named
subscriptions, pushes of only what changed, the delta protocol, self-registration, and what the
admin pages and ``meshctl proxy-status`` say about it all.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from envoy.config.core.v3 import health_check_pb2
from google.rpc import status_pb2

from libmesh.xds import CLUSTER, ENDPOINT, HEALTH_INFO_TYPE, LISTENER, ROUTE
from tests.ads_client import RawAds, node, unpack
from tests.conftest import service
from tests.meshd_process import MeshdProcess

REVIEWS = "reviews.shop.svc.cluster.local"
REVIEWS_LISTENER = f"{REVIEWS}:8080"
RATINGS_LISTENER = "ratings.shop.svc.cluster.local:8080"
SHOP = {"NAMESPACE": "shop"}

SUBSETS = """
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: reviews, namespace: shop}
spec:
  host: reviews
  subsets:
  - {name: v1, labels: {version: v1}}
  - {name: v2, labels: {version: v2}}
"""


def canary(v1: int, v2: int) -> str:
    return f"""
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: reviews, namespace: shop}}
spec:
  hosts: [reviews]
  http:
  - route:
    - {{destination: {{host: reviews, subset: v1}}, weight: {v1}}}
    - {{destination: {{host: reviews, subset: v2}}, weight: {v2}}}
"""


NO_SUBSETS = """
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: reviews, namespace: shop}
spec:
  hosts: [reviews]
  http:
  - route:
    - destination: {host: reviews}
"""


def write(directory: Path, name: str, *documents: str) -> None:
    path = directory / name
    path.write_text("\n---\n".join(textwrap.dedent(d).strip() for d in documents) + "\n")


@pytest.fixture
def config_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "mesh"
    directory.mkdir()
    reviews = service(
        "reviews", "shop", [9001, 9002], labels=[{"version": "v1"}, {"version": "v2"}]
    )
    write(directory, "services.yaml", reviews, service("ratings", "shop", [9003]))
    write(directory, "reviews.yaml", SUBSETS, canary(90, 10))
    return directory


@pytest.fixture
def meshd(config_dir: Path, start_meshd: Callable[..., MeshdProcess]) -> MeshdProcess:
    return start_meshd(config_dir, "--registration-grace", "300ms")


@pytest.fixture
def streams(meshd: MeshdProcess) -> Iterator[Callable[..., RawAds]]:
    opened: list[RawAds] = []

    def open_stream(*, delta: bool = False) -> RawAds:
        stream = RawAds(meshd.xds_address, delta=delta)
        opened.append(stream)
        return stream

    yield open_stream
    for stream in opened:
        stream.close()


def subscribe_all(stream: RawAds, node_id: str, metadata: dict[str, Any] = SHOP) -> dict[str, Any]:
    """Subscribe as Envoy does (LDS and CDS wildcard, then RDS and EDS by name), ACKing each
    response; the first response of each type, by type."""
    first: dict[str, Any] = {}
    stream.send(node=node(node_id, metadata), type_url=LISTENER)
    listeners = first[LISTENER] = stream.receive()
    stream.ack(listeners)
    stream.send(type_url=CLUSTER)
    clusters = first[CLUSTER] = stream.receive()
    stream.ack(clusters)
    # the routes the API listeners name (the inbound listener carries its own)
    named = sorted(n for n in unpack(listeners) if n != "virtualInbound")
    stream.send(type_url=ROUTE, resource_names=named)
    routes = first[ROUTE] = stream.receive()
    stream.ack(routes, named)
    eds = sorted(n for n, c in unpack(clusters).items() if c.type == c.EDS)  # type: ignore[attr-defined]
    stream.send(type_url=ENDPOINT, resource_names=eds)
    endpoints = first[ENDPOINT] = stream.receive()
    stream.ack(endpoints, eds)
    return first


def weights(route_config: Any) -> list[tuple[str, int]]:
    (route,) = route_config.virtual_hosts[0].routes
    return [(c.name, c.weight.value) for c in route.route.weighted_clusters.clusters]


# -- state of the world -------------------------------------------------------------------------


def test_a_wildcard_subscription_gets_every_resource_with_a_version_and_a_nonce(
    streams: Callable[..., RawAds],
) -> None:
    stream = streams()
    stream.send(node=node("app-1", SHOP), type_url=LISTENER)
    response = stream.receive()

    assert response.type_url == LISTENER
    # (and the workload's own inbound listener: what its callers may send it)
    assert set(unpack(response)) == {REVIEWS_LISTENER, RATINGS_LISTENER, "virtualInbound"}
    assert response.version_info
    assert response.nonce
    assert response.control_plane.identifier.startswith("meshd ")


def test_a_named_subscription_gets_only_the_resources_it_names(
    streams: Callable[..., RawAds],
) -> None:
    stream = streams()
    stream.send(node=node("app-1", SHOP), type_url=ROUTE, resource_names=[REVIEWS_LISTENER])
    response = stream.receive()

    assert set(unpack(response)) == {REVIEWS_LISTENER}
    assert weights(unpack(response)[REVIEWS_LISTENER]) == [
        (f"outbound|8080|v1|{REVIEWS}", 90),
        (f"outbound|8080|v2|{REVIEWS}", 10),
    ]


def test_grpc_style_named_listener_and_cluster_subscriptions(
    streams: Callable[..., RawAds],
) -> None:
    # grpcio names the one listener it dials and the clusters its routes name; a listener
    # that does not exist is answered by its absence.
    stream = streams()
    names = [REVIEWS_LISTENER, "nowhere.shop.svc.cluster.local:80"]
    stream.send(
        node=node("grpc-1", SHOP, user_agent_name="gRPC Python"),
        type_url=LISTENER,
        resource_names=names,
    )
    listeners = stream.receive()
    assert set(unpack(listeners)) == {REVIEWS_LISTENER}

    stream.ack(listeners, names)
    stream.send(type_url=CLUSTER, resource_names=[f"outbound|8080|v1|{REVIEWS}"])
    clusters = stream.receive()
    assert set(unpack(clusters)) == {f"outbound|8080|v1|{REVIEWS}"}


def test_acks_and_nacks_are_recorded_per_type_and_shown_by_proxy_status(
    meshd: MeshdProcess, streams: Callable[..., RawAds]
) -> None:
    stream = streams()
    subscribe_all(stream, "app-1")
    client = meshd.wait_until(
        lambda: (c := meshd.client("app-1"))["types"]["eds"]["status"] == "SYNCED" and c
    )
    assert {t: s["status"] for t, s in client["types"].items()} == dict.fromkeys(
        ("cds", "eds", "lds", "rds"), "SYNCED"
    )

    write(meshd.config_dir, "reviews.yaml", SUBSETS, canary(50, 50))
    routes = stream.receive()
    stream.send(
        type_url=ROUTE,
        version_info="",
        response_nonce=routes.nonce,
        resource_names=[REVIEWS_LISTENER, RATINGS_LISTENER],
        error_detail=status_pb2.Status(code=3, message="route reviews: weights are not welcome"),
    )

    client = meshd.wait_until(
        lambda: (c := meshd.client("app-1"))["types"]["rds"]["status"] == "NACKED" and c
    )
    assert client["types"]["rds"]["nack"]["error"] == "route reviews: weights are not welcome"
    assert client["types"]["rds"]["nack"]["version"] == routes.version_info
    assert meshd.metric("pilot_total_xds_rejects", type="rds") == 1
    meshd.wait_for_log("app-1 rejected RDS version")

    status = subprocess.run(
        [sys.executable, "-m", "meshd._meshctl", "proxy-status", "--admin-address",
         f"127.0.0.1:{meshd.admin_port}"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert status.returncode == 1, status.stderr
    (row,) = [line for line in status.stdout.splitlines() if line.startswith("app-1 ")]
    assert row.split()[1:5] == ["SYNCED", "SYNCED", "SYNCED", "NACKED"]
    assert "route reviews: weights are not welcome" in status.stdout


def test_an_edit_pushes_only_the_route_that_changed_to_subscribed_clients(
    meshd: MeshdProcess, streams: Callable[..., RawAds]
) -> None:
    stream = streams()
    first = subscribe_all(stream, "app-1")

    write(meshd.config_dir, "reviews.yaml", SUBSETS, canary(20, 80))
    pushed = stream.receive()

    assert pushed.type_url == ROUTE
    assert set(unpack(pushed)) == {REVIEWS_LISTENER}  # not the unchanged ratings route
    assert weights(unpack(pushed)[REVIEWS_LISTENER])[0][1] == 20
    assert pushed.version_info != first[ROUTE].version_info
    stream.ack(pushed, [REVIEWS_LISTENER, RATINGS_LISTENER])
    assert stream.nothing(1.0)  # clusters, endpoints and listeners did not change


def test_a_burst_of_edits_is_one_push(meshd: MeshdProcess, streams: Callable[..., RawAds]) -> None:
    stream = streams()
    subscribe_all(stream, "app-1")

    for v1 in (80, 70, 60, 50, 40):
        write(meshd.config_dir, "reviews.yaml", SUBSETS, canary(v1, 100 - v1))
        time.sleep(0.01)
    pushed = stream.receive()

    assert weights(unpack(pushed)[REVIEWS_LISTENER])[0][1] == 40
    stream.ack(pushed, [REVIEWS_LISTENER, RATINGS_LISTENER])
    assert stream.nothing(1.0)


def test_a_client_that_cannot_see_a_change_is_not_pushed(
    meshd: MeshdProcess, streams: Callable[..., RawAds]
) -> None:
    shop, other = streams(), streams()
    subscribe_all(shop, "shop-app")
    subscribe_all(other, "other-app", {"NAMESPACE": "other"})
    private = """
        apiVersion: networking.istio.io/v1
        kind: VirtualService
        metadata: {name: reviews, namespace: shop}
        spec:
          hosts: [reviews]
          exportTo: ["."]
          http:
          - route:
            - {destination: {host: reviews, subset: v1}, weight: 30}
            - {destination: {host: reviews, subset: v2}, weight: 70}
        """

    write(meshd.config_dir, "reviews.yaml", SUBSETS, private)

    assert weights(unpack(shop.receive())[REVIEWS_LISTENER])[0][1] == 30
    # the other namespace saw the old VirtualService; now it sees none: it is pushed too...
    assert unpack(other.receive())[REVIEWS_LISTENER].virtual_hosts[0].routes[0].route.cluster
    write(
        meshd.config_dir,
        "reviews.yaml",
        SUBSETS,
        private.replace("30}", "40}").replace("70}", "60}"),
    )
    assert weights(unpack(shop.receive())[REVIEWS_LISTENER])[0][1] == 40
    # ... but not for a change to a VirtualService it cannot see.
    assert other.nothing(1.0)


def test_a_stale_nonce_is_ignored(meshd: MeshdProcess, streams: Callable[..., RawAds]) -> None:
    stream = streams()
    subscribe_all(stream, "app-1")
    stream.send(type_url=ROUTE, response_nonce="not-the-last-one", resource_names=[])

    meshd.wait_until(lambda: meshd.metric("pilot_xds_expired_nonce", type="rds") == 1)
    assert stream.nothing(0.5)  # the empty subscription it carried was not applied
    assert meshd.client("app-1")["types"]["rds"]["subscribed"] == sorted(
        [REVIEWS_LISTENER, RATINGS_LISTENER]
    )


def test_a_node_with_unreadable_metadata_is_refused_with_the_reason(
    streams: Callable[..., RawAds],
) -> None:
    stream = streams()
    stream.send(node=node("app-1", {"LABELS": "app=reviews"}), type_url=LISTENER)

    with pytest.raises(AssertionError, match="the stream ended"):
        stream.receive()
    assert stream.error is not None
    assert stream.error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "LABELS must be a map of strings" in str(stream.error.details())


# -- configuration changes ----------------------------------------------------------------------


def test_an_invalid_edit_is_rejected_with_file_and_line_and_the_old_config_keeps_serving(
    meshd: MeshdProcess, streams: Callable[..., RawAds]
) -> None:
    stream = streams()
    subscribe_all(stream, "app-1")

    write(meshd.config_dir, "reviews.yaml", SUBSETS, canary(90, 20))

    line = meshd.wait_for_log("configuration change rejected (1 error)")
    assert "still serving" in line
    detail = meshd.wait_for_log("reviews.yaml:")
    assert "VirtualService shop/reviews" in detail
    assert "100" in detail
    configz = meshd.json("/debug/configz")
    (error,) = configz["rejected_change"]["errors"]
    assert "reviews.yaml:" in error
    assert meshd.metric("meshd_config_last_reload_successful") == 0
    assert meshd.metric("meshd_config_loads", result="rejected") == 1
    assert stream.nothing(1.0)

    write(meshd.config_dir, "reviews.yaml", SUBSETS, canary(80, 20))
    assert weights(unpack(stream.receive())[REVIEWS_LISTENER])[0][1] == 80
    assert meshd.json("/debug/configz")["rejected_change"] is None
    assert meshd.metric("meshd_config_last_reload_successful") == 1


def test_meshd_refuses_to_start_on_invalid_configuration(tmp_path: Path) -> None:
    write(tmp_path, "bad.yaml", canary(90, 20))

    result = subprocess.run(
        [sys.executable, "-m", "meshd", "--config-dir", str(tmp_path),
         "--xds-address", "127.0.0.1:0", "--admin-address", "127.0.0.1:0"],
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip

    assert result.returncode == 1
    assert f"{tmp_path / 'bad.yaml'}:" in result.stderr
    assert "has 1 error" in result.stderr
    assert "meshctl validate" in result.stderr


def test_meshd_explains_an_address_it_cannot_use(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "meshd", "--config-dir", str(tmp_path), "--xds-address", "15010"],
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip

    assert result.returncode == 1
    assert "--xds-address must be HOST:PORT" in result.stderr


# -- the delta protocol -------------------------------------------------------------------------


def test_delta_sends_each_resource_with_its_version_and_then_only_changes(
    meshd: MeshdProcess, streams: Callable[..., RawAds]
) -> None:
    stream = streams(delta=True)
    stream.send(node=node("envoy-1", SHOP, user_agent_name="envoy"), type_url=ROUTE,
                resource_names_subscribe=["http_proxy"])  # fmt: skip
    first = stream.receive()
    (resource,) = first.resources
    assert resource.name == "http_proxy"
    assert resource.version
    stream.ack(first)

    write(meshd.config_dir, "reviews.yaml", SUBSETS, canary(60, 40))
    second = stream.receive()
    (changed,) = second.resources
    assert changed.version != resource.version
    stream.ack(second)
    assert stream.nothing(0.5)


def test_delta_removes_deleted_resources_and_skips_what_the_client_already_has(
    meshd: MeshdProcess, streams: Callable[..., RawAds]
) -> None:
    stream = streams(delta=True)
    stream.send(node=node("app-1", SHOP), type_url=CLUSTER)
    first = stream.receive()
    versions = {r.name: r.version for r in first.resources}
    assert f"outbound|8080|v1|{REVIEWS}" in versions
    stream.ack(first)

    write(meshd.config_dir, "reviews.yaml", NO_SUBSETS)
    removed = stream.receive()
    assert set(removed.removed_resources) == {
        f"outbound|8080|v1|{REVIEWS}",
        f"outbound|8080|v2|{REVIEWS}",
    }
    stream.ack(removed)

    # A new stream that says what it has is sent only what differs.
    again = streams(delta=True)
    have = {n: v for n, v in versions.items() if "|v" not in n}
    again.send(node=node("app-2", SHOP), type_url=CLUSTER, initial_resource_versions=have)
    assert again.nothing(1.0)


# -- self-registration --------------------------------------------------------------------------

WORKLOAD = {
    "NAMESPACE": "shop",
    "LABELS": {"app": "reviews", "version": "v2"},
    "INSTANCE_IPS": "127.0.0.9",
    "WORKLOAD_NAME": "reviews-vm-1",
    "POD_PORTS": '[{"name": "http", "containerPort": 9100}]',
}


def endpoint_addresses(response: Any, cluster: str) -> dict[str, int]:
    assignment = unpack(response)[cluster]
    return {
        f"{e.endpoint.address.socket_address.address}:{e.endpoint.address.socket_address.port_value}": e.health_status  # noqa: E501
        for group in assignment.endpoints  # type: ignore[attr-defined]
        for e in group.lb_endpoints
    }


def test_a_workload_that_connects_becomes_an_endpoint_until_it_leaves(
    meshd: MeshdProcess, streams: Callable[..., RawAds]
) -> None:
    v2 = f"outbound|8080|v2|{REVIEWS}"
    client = streams()
    client.send(node=node("app-1", SHOP), type_url=ENDPOINT, resource_names=[v2])
    before = client.receive()
    assert endpoint_addresses(before, v2) == {"127.0.0.1:9002": health_check_pb2.HEALTHY}
    client.ack(before, [v2])

    workload = streams()
    workload.send(node=node("reviews-vm-1.shop", WORKLOAD), type_url=LISTENER)
    joined = client.receive()
    client.ack(joined, [v2])
    assert endpoint_addresses(joined, v2) == {
        "127.0.0.1:9002": health_check_pb2.HEALTHY,
        "127.0.0.9:9100": health_check_pb2.HEALTHY,
    }
    registryz = meshd.json("/debug/registryz")
    (reviews,) = [s for s in registryz["services"] if s["host"] == REVIEWS]
    assert {"name": "reviews-vm-1", "registered": True}.items() <= next(
        e for e in reviews["endpoints"] if e["name"] == "reviews-vm-1"
    ).items()

    workload.send(
        type_url=HEALTH_INFO_TYPE,
        error_detail=status_pb2.Status(code=14, message="readiness probe failed"),
    )
    unhealthy = client.receive()
    client.ack(unhealthy, [v2])
    assert endpoint_addresses(unhealthy, v2)["127.0.0.9:9100"] == health_check_pb2.UNHEALTHY
    meshd.wait_for_log("reviews-vm-1 reports unhealthy: readiness probe failed")

    workload.close()
    gone = client.receive(timeout=5)  # after the 300 ms grace period
    assert endpoint_addresses(gone, v2) == {"127.0.0.1:9002": health_check_pb2.HEALTHY}
    meshd.wait_for_log("reviews-vm-1 deregistered")


def test_a_workload_that_reconnects_within_the_grace_period_never_leaves(
    meshd: MeshdProcess, streams: Callable[..., RawAds]
) -> None:
    v2 = f"outbound|8080|v2|{REVIEWS}"
    workload = streams()
    workload.send(node=node("reviews-vm-1.shop", WORKLOAD), type_url=LISTENER)
    client = streams()
    client.send(node=node("app-1", SHOP), type_url=ENDPOINT, resource_names=[v2])
    response = client.receive()
    if "127.0.0.9:9100" not in endpoint_addresses(response, v2):  # connected before the push
        client.ack(response, [v2])
        assert "127.0.0.9:9100" in endpoint_addresses(client.receive(), v2)

    workload.close()
    again = streams()
    again.send(node=node("reviews-vm-1.shop", WORKLOAD), type_url=LISTENER)

    assert client.nothing(1.0)


# -- what meshd says about itself ---------------------------------------------------------------


def test_ready_and_metrics_use_istios_names(
    meshd: MeshdProcess, streams: Callable[..., RawAds]
) -> None:
    assert meshd.get("/ready").status_code == 200
    stream = streams()
    subscribe_all(stream, "app-1")
    meshd.wait_until(lambda: meshd.metric("pilot_xds") == 1)
    write(meshd.config_dir, "reviews.yaml", SUBSETS, canary(10, 90))
    stream.ack(stream.receive(), [REVIEWS_LISTENER, RATINGS_LISTENER])
    # from the change on disk to the client's ACK
    meshd.wait_until(lambda: meshd.metric("pilot_proxy_convergence_time_count") == 1)

    text = meshd.get("/metrics").text
    for name in ("pilot_xds_pushes", "pilot_proxy_convergence_time_bucket", "pilot_services",
                 "pilot_virt_services", "pilot_destrules", "pilot_total_xds_rejects"):  # fmt: skip
        assert name in text
    assert meshd.metric("pilot_xds_pushes", type="cds") >= 1
    assert meshd.metric("pilot_services") == 2
    assert meshd.get("/nowhere").status_code == 404


def test_a_delta_client_reports_its_health_too(
    meshd: MeshdProcess, streams: Callable[..., RawAds]
) -> None:
    v2 = f"outbound|8080|v2|{REVIEWS}"
    client = streams()
    client.send(node=node("app-1", SHOP), type_url=ENDPOINT, resource_names=[v2])
    client.ack(client.receive(), [v2])
    workload = streams(delta=True)
    workload.send(node=node("reviews-vm-1.shop", WORKLOAD), type_url=LISTENER)
    joined = client.receive()
    client.ack(joined, [v2])
    assert endpoint_addresses(joined, v2)["127.0.0.9:9100"] == health_check_pb2.HEALTHY

    workload.send(
        type_url=HEALTH_INFO_TYPE,
        error_detail=status_pb2.Status(code=14, message="readiness probe failed"),
    )

    unhealthy = client.receive()
    assert endpoint_addresses(unhealthy, v2)["127.0.0.9:9100"] == health_check_pb2.UNHEALTHY
    meshd.wait_for_log("reviews-vm-1 reports unhealthy: readiness probe failed")
