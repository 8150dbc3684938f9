"""The translator: Istio resources in, the xDS resources Envoy and grpcio read out.

The first half runs every file of Istio's own corpus through the translator and checks what every
data plane relies on: resources survive serialization, names follow Istio's conventions, routes
only name clusters that exist, EDS is well formed, and the version is a function of the content.
The second half declares a small mesh (ServiceEntries selecting WorkloadEntries) and checks, one
feature at a time, that the xDS a client receives says what Istio's own translation
(pilot/pkg/networking/core in istio/istio) says.
"""

from __future__ import annotations

import functools
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import base_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.config.route.v3 import route_components_pb2 as rc
from envoy.extensions.filters.http.fault.v3 import fault_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm,
)
from envoy.extensions.retry.priority.previous_priorities.v3 import (
    previous_priorities_config_pb2,
)
from envoy.extensions.upstreams.http.v3 import http_protocol_options_pb2
from envoy.type.v3 import percent_pb2
from google.protobuf import duration_pb2, json_format
from google.protobuf.message import Message

from libmesh.config import FrozenMap, Registry, load, load_text
from libmesh.xds import Locality, Node, Snapshot, cluster_name, parse_cluster_name, translate
from libmesh.xds._inbound import GRPC_SERVER_TEMPLATE, INBOUND_LISTENER

# the workload's own listeners (inbound; grpcio's xDS servers), with their routes inline
SERVER_LISTENERS = {INBOUND_LISTENER, GRPC_SERVER_TEMPLATE}

CORPUS = Path(__file__).parents[2].parent / "shared" / "istio-corpus" / "valid"
VALID = sorted(CORPUS.glob("*.yaml"))

MAX_UINT32 = 2**32 - 1
MILLION = percent_pb2.FractionalPercent.MILLION
FAULT_FILTER = "envoy.filters.http.fault"
ROUTER_FILTER = "envoy.filters.http.router"
PREVIOUS_HOSTS = "envoy.retry_host_predicates.previous_hosts"
HTTP_PROTOCOL_OPTIONS = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
ISTIO_RETRY_ON = "connect-failure,refused-stream,unavailable,cancelled,retriable-status-codes"


# -- the corpus ---------------------------------------------------------------------------------


@functools.cache
def corpus_snapshots(path: Path) -> dict[str, Snapshot]:
    """Each file on its own (some redefine the same resources), for a client in ``default`` and
    one in every namespace the file mentions; and for grpcio and Envoy in ``default``."""
    result = load(path)
    assert result.errors == (), [e.format() for e in result.errors]
    registry = Registry.build(result.config, result.services)
    namespaces = {r.namespace for r in result.config} | {s.namespace for s in result.services}
    snapshots = {
        namespace: translate(result.config, registry, Node(namespace=namespace))
        for namespace in sorted(namespaces | {"default"})
    }
    for flavor in ("grpc", "envoy"):
        snapshots[f"default/{flavor}"] = translate(result.config, registry, Node(flavor=flavor))
    return snapshots


def api_listener_manager(listener: Message) -> hcm.HttpConnectionManager:
    manager = hcm.HttpConnectionManager()
    assert listener.api_listener.api_listener.Unpack(manager)
    return manager


def assignments(snapshot: Snapshot) -> Iterator[tuple[str, endpoint_pb2.ClusterLoadAssignment]]:
    """Every load assignment a client reads: EDS resources and DNS clusters' inline ones."""
    yield from snapshot.endpoints.items()
    for name, cluster in snapshot.clusters.items():
        if cluster.HasField("load_assignment"):
            yield name, cluster.load_assignment


def clusters_named_by_routes(snapshot: Snapshot) -> set[str]:
    named = set()
    for config in snapshot.routes.values():
        for vhost in config.virtual_hosts:
            for route in vhost.routes:
                if route.route.cluster:
                    named.add(route.route.cluster)
                named.update(c.name for c in route.route.weighted_clusters.clusters)
                named.update(m.cluster for m in route.route.request_mirror_policies)
    return named


def check_round_trips(snapshot: Snapshot) -> None:
    for _, name, message in snapshot:
        parsed = type(message)()
        parsed.ParseFromString(message.SerializeToString())
        assert parsed == message, name
        assert json_format.Parse(json_format.MessageToJson(message), type(message)()) == message


def check_listener_names(snapshot: Snapshot) -> None:
    """A listener, its route configuration and its virtual host are all named ``host:port``
    (Envoy's single proxy listener names each virtual host so); the inbound listener has no
    routes of its own; an Envoy's ports bound to one service (``route_<address>_<port>``) reuse
    the virtual hosts of the others."""
    assert set(snapshot.routes) == set(snapshot.listeners) - SERVER_LISTENERS
    bound = {name for name in snapshot.listeners if name.startswith("route_")}
    for name in bound:
        for vhost in snapshot.routes[name].virtual_hosts:
            host, _, port = vhost.name.rpartition(":")
            assert cluster_name(int(port), "", host) in snapshot.clusters
    if set(snapshot.listeners) - bound <= {"http_proxy"}:
        proxied = snapshot.routes.get("http_proxy")
        for vhost in proxied.virtual_hosts if proxied is not None else ():
            host, _, port = vhost.name.rpartition(":")
            assert cluster_name(int(port), "", host) in snapshot.clusters
        return
    for name, listener in snapshot.listeners.items():
        if name in SERVER_LISTENERS or name in bound:
            continue
        host, _, port = name.rpartition(":")
        assert listener.name == name
        assert port.isdigit()
        assert api_listener_manager(listener).rds.route_config_name == name
        config = snapshot.routes[name]
        assert config.name == name
        assert [vhost.name for vhost in config.virtual_hosts] == [name]
        assert {host, name} <= set(config.virtual_hosts[0].domains)
        # Every listener has a default cluster to fall back on.
        assert cluster_name(int(port), "", host) in snapshot.clusters


def check_cluster_names(snapshot: Snapshot) -> None:
    for name, cluster in snapshot.clusters.items():
        parsed = parse_cluster_name(name)
        assert parsed is not None, name
        assert cluster_name(*parsed) == name == cluster.name


def check_eds_pairs(snapshot: Snapshot) -> None:
    eds = {n for n, c in snapshot.clusters.items() if c.type == cluster_pb2.Cluster.EDS}
    assert set(snapshot.endpoints) == eds
    for name in eds:
        assert snapshot.clusters[name].eds_cluster_config.service_name == name
        assert snapshot.clusters[name].eds_cluster_config.eds_config.HasField("ads")
        assert snapshot.endpoints[name].cluster_name == name


def check_route_closure(snapshot: Snapshot) -> None:
    assert clusters_named_by_routes(snapshot) <= set(snapshot.clusters)


def check_locality_groups(snapshot: Snapshot) -> None:
    """grpcio and Envoy NACK a group without ``locality``, a weight of 0 (Envoy: ``gte: 1``) and
    priorities with gaps."""
    for name, assignment in assignments(snapshot):
        for group in assignment.endpoints:
            assert group.HasField("locality"), name
            if group.lb_endpoints:
                assert group.load_balancing_weight.value >= 1, name
        used = sorted({g.priority for g in assignment.endpoints})
        assert used == list(range(len(used))), name


def check_well_formed(snapshot: Snapshot) -> None:
    for check in (
        check_round_trips,
        check_listener_names,
        check_cluster_names,
        check_eds_pairs,
        check_route_closure,
        check_locality_groups,
    ):
        check(snapshot)


def test_the_corpus_is_there() -> None:
    assert len(VALID) == 79


@pytest.mark.parametrize(
    "check",
    [
        check_round_trips,
        check_listener_names,
        check_cluster_names,
        check_eds_pairs,
        check_route_closure,
        check_locality_groups,
    ],
    ids=lambda check: check.__name__.removeprefix("check_"),
)
@pytest.mark.parametrize("path", VALID, ids=lambda p: p.name)
def test_every_corpus_file_translates_to_well_formed_resources(
    path: Path, check: Callable[[Snapshot], None]
) -> None:
    snapshots = corpus_snapshots(path)

    assert set(snapshots) >= {"default"}
    for snapshot in snapshots.values():
        check(snapshot)


@pytest.mark.parametrize("path", VALID, ids=lambda p: p.name)
def test_corpus_snapshot_version_is_a_function_of_the_content(path: Path) -> None:
    first = corpus_snapshots(path)
    result = load(path)
    registry = Registry.build(result.config, result.services)
    for key, snapshot in first.items():
        namespace, _, flavor = key.partition("/")
        node = Node(namespace=namespace, flavor=flavor or "libmesh")
        again = translate(result.config, registry, node)
        assert again.version == snapshot.version
        assert len(snapshot.version) > 0

    extra = load_text(path.read_text(encoding="utf-8") + "\n---\n" + EXTRA_SERVICE)
    changed = translate(
        extra.config, Registry.build(extra.config, extra.services), Node(namespace="default")
    )
    assert changed.version != first["default"].version


EXTRA_SERVICE = """
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: added-later, namespace: default}
spec:
  hosts: [added-later.example.com]
  resolution: STATIC
  ports: [{number: 80, name: http, protocol: HTTP}]
  endpoints: [{address: 10.9.9.9}]
"""


def corpus_file(name: str) -> str:
    return (CORPUS / name).read_text(encoding="utf-8")


def test_the_bookinfo_canary_from_the_corpus_splits_traffic_80_20() -> None:
    snapshot = mesh(
        corpus_file("samples_bookinfo_networking_virtual-service-reviews-80-20.yaml"),
        corpus_file("samples_bookinfo_networking_destination-rule-reviews.yaml"),
        base=MESH_TEMPLATE.format(ns="default"),
        node=Node(namespace="default"),
    )

    route = only_route(snapshot, "reviews.default.svc.cluster.local:8080")
    assert weights(route) == [
        ("outbound|8080|v1|reviews.default.svc.cluster.local", 80),
        ("outbound|8080|v2|reviews.default.svc.cluster.local", 20),
    ]
    v1 = addresses(snapshot, "outbound|8080|v1|reviews.default.svc.cluster.local")
    assert v1 == {"10.0.0.1", "10.0.0.2"}


# -- a small mesh ---------------------------------------------------------------------------------

MESH_TEMPLATE = """
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: reviews, namespace: {ns}}}
spec:
  hosts: [reviews.{ns}.svc.cluster.local]
  location: MESH_INTERNAL
  resolution: STATIC
  ports: [{{number: 8080, name: http, protocol: HTTP}}]
  workloadSelector: {{labels: {{app: reviews}}}}
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {{name: reviews-v1-a, namespace: {ns}}}
spec: {{address: 10.0.0.1, labels: {{app: reviews, version: v1}}, locality: us-east/zone-a/rack-1}}
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {{name: reviews-v1-b, namespace: {ns}}}
spec: {{address: 10.0.0.2, labels: {{app: reviews, version: v1}}, locality: us-east/zone-a/rack-2}}
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {{name: reviews-v2, namespace: {ns}}}
spec: {{address: 10.0.0.3, labels: {{app: reviews, version: v2}}, locality: us-east/zone-b}}
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {{name: reviews-v3-eu, namespace: {ns}}}
spec: {{address: 10.0.0.4, labels: {{app: reviews, version: v3}}, locality: eu-west/zone-c}}
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {{name: reviews-v3-ap, namespace: {ns}}}
spec: {{address: 10.0.0.5, labels: {{app: reviews, version: v3}}, locality: ap-south/zone-d}}
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: ratings, namespace: {ns}}}
spec:
  hosts: [ratings.{ns}.svc.cluster.local]
  location: MESH_INTERNAL
  resolution: STATIC
  ports: [{{number: 9080, name: http, protocol: HTTP}}]
  workloadSelector: {{labels: {{app: ratings}}}}
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {{name: ratings-1, namespace: {ns}}}
spec: {{address: 10.0.1.1, labels: {{app: ratings}}}}
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: details, namespace: {ns}}}
spec:
  hosts: [details.{ns}.svc.cluster.local]
  location: MESH_INTERNAL
  resolution: STATIC
  ports:
  - {{number: 8080, name: http, protocol: HTTP}}
  - {{number: 9090, name: grpc, protocol: GRPC}}
  workloadSelector: {{labels: {{app: details}}}}
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {{name: details-1, namespace: {ns}}}
spec: {{address: 10.0.2.1, labels: {{app: details}}}}
"""
MESH = MESH_TEMPLATE.format(ns="shop")

REVIEWS = "reviews.shop.svc.cluster.local"
RATINGS = "ratings.shop.svc.cluster.local"
DETAILS = "details.shop.svc.cluster.local"
REVIEWS_LISTENER = f"{REVIEWS}:8080"
REVIEWS_CLUSTER = cluster_name(8080, "", REVIEWS)
SHOP = Node(namespace="shop")
EAST = Node(namespace="shop", locality=Locality.parse("us-east/zone-a/rack-1"))


def mesh(*documents: str, node: Node = SHOP, base: str = MESH) -> Snapshot:
    """The xDS ``node`` receives for the small mesh plus ``documents``."""
    text = "\n---\n".join(textwrap.dedent(d).strip() for d in (base, *documents))
    result = load_text(text, "mesh.yaml")
    assert result.errors == (), [e.format() for e in result.errors]
    snapshot = translate(result.config, Registry.build(result.config, result.services), node)
    check_well_formed(snapshot)
    return snapshot


def routes(snapshot: Snapshot, listener: str = REVIEWS_LISTENER) -> list[rc.Route]:
    return list(snapshot.routes[listener].virtual_hosts[0].routes)


def only_route(snapshot: Snapshot, listener: str = REVIEWS_LISTENER) -> rc.Route:
    [route] = routes(snapshot, listener)
    return route


def weights(route: rc.Route) -> list[tuple[str, int]]:
    return [(c.name, c.weight.value) for c in route.route.weighted_clusters.clusters]


def addresses(snapshot: Snapshot, name: str) -> set[str]:
    return {
        e.endpoint.address.socket_address.address
        for group in snapshot.endpoints[name].endpoints
        for e in group.lb_endpoints
    }


def priorities(snapshot: Snapshot, name: str = REVIEWS_CLUSTER) -> dict[str, int]:
    """The EDS priority of each locality, as ``region/zone/subzone``."""
    return {
        str(Locality(g.locality.region, g.locality.zone, g.locality.sub_zone)): g.priority
        for g in snapshot.endpoints[name].endpoints
    }


def locality_shares(snapshot: Snapshot, name: str = REVIEWS_CLUSTER) -> dict[str, float]:
    """The share of traffic each locality's weight gives it."""
    groups = snapshot.endpoints[name].endpoints
    total = sum(g.load_balancing_weight.value for g in groups)
    return {
        str(Locality(g.locality.region, g.locality.zone, g.locality.sub_zone)): round(
            g.load_balancing_weight.value / total, 3
        )
        for g in groups
    }


def seconds(value: float) -> duration_pb2.Duration:
    duration = duration_pb2.Duration()
    duration.FromNanoseconds(round(value * 1e9))
    return duration


def per_million(percent: float) -> percent_pb2.FractionalPercent:
    return percent_pb2.FractionalPercent(numerator=round(percent * 10_000), denominator=MILLION)


def fault_of(route: rc.Route) -> fault_pb2.HTTPFault:
    fault = fault_pb2.HTTPFault()
    assert route.typed_per_filter_config[FAULT_FILTER].Unpack(fault)
    return fault


def block(text: str) -> str:
    """``text`` as a YAML block nested one level (two spaces) deep."""
    text = textwrap.dedent(text).strip()
    return textwrap.indent(text, "  ") + "\n" if text else ""


def annotations_block(annotations: dict[str, str]) -> str:
    if not annotations:
        return ""
    return block("annotations:\n" + "".join(f'  {k}: "{v}"\n' for k, v in annotations.items()))


def virtual_service(
    http: str,
    *,
    namespace: str = "shop",
    extra: str = "",
    annotations: dict[str, str] | None = None,
) -> str:
    """A VirtualService for reviews with the given ``http`` rules."""
    return (
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\n"
        f"metadata:\n  name: reviews\n  namespace: {namespace}\n"
        + annotations_block(annotations or {})
        + f"spec:\n  hosts: [{REVIEWS}]\n"
        + block(extra)
        + "  http:\n"
        + block(http)
    )


def destination_rule(
    spec: str,
    *,
    namespace: str = "shop",
    name: str = "reviews",
    host: str = REVIEWS,
    annotations: dict[str, str] | None = None,
) -> str:
    """A DestinationRule for ``host`` (reviews) with the rest of its ``spec``."""
    return (
        "apiVersion: networking.istio.io/v1\nkind: DestinationRule\n"
        f"metadata:\n  name: {name}\n  namespace: {namespace}\n"
        + annotations_block(annotations or {})
        + f"spec:\n  host: {host}\n"
        + block(spec)
    )


SUBSETS = """
subsets:
- {name: v1, labels: {version: v1}}
- {name: v2, labels: {version: v2}}
- {name: v3, labels: {version: v3}}
"""


def test_the_small_mesh_translates_to_well_formed_resources() -> None:
    snapshot = mesh(destination_rule(SUBSETS))

    assert set(snapshot.listeners) == {
        INBOUND_LISTENER,
        REVIEWS_LISTENER,
        f"{RATINGS}:9080",
        f"{DETAILS}:8080",
        f"{DETAILS}:9090",
    }
    assert clusters_named_by_routes(snapshot) <= set(snapshot.clusters)
    assert set(snapshot.endpoints) == set(snapshot.clusters)
    assert {n for n in snapshot.clusters if n.endswith(REVIEWS)} == {
        REVIEWS_CLUSTER,
        f"outbound|8080|v1|{REVIEWS}",
        f"outbound|8080|v2|{REVIEWS}",
        f"outbound|8080|v3|{REVIEWS}",
    }


def test_a_listener_runs_the_fault_filter_then_the_router_and_reads_routes_over_ads() -> None:
    manager = api_listener_manager(mesh().listeners[REVIEWS_LISTENER])

    assert [f.name for f in manager.http_filters] == [FAULT_FILTER, ROUTER_FILTER]
    assert manager.rds.route_config_name == REVIEWS_LISTENER
    assert manager.rds.config_source.HasField("ads")


def test_a_service_in_the_clients_namespace_answers_to_its_short_names() -> None:
    domains = mesh().routes[REVIEWS_LISTENER].virtual_hosts[0].domains

    assert {
        REVIEWS,
        f"{REVIEWS}:8080",
        "reviews",
        "reviews:8080",
        "reviews.shop",
        "reviews.shop.svc",
    } <= set(domains)


def test_a_service_in_another_namespace_is_not_reachable_by_its_bare_name() -> None:
    domains = mesh(node=Node(namespace="default")).routes[REVIEWS_LISTENER].virtual_hosts[0].domains

    assert "reviews" not in domains
    assert {REVIEWS, "reviews.shop", "reviews.shop.svc"} <= set(domains)


ENVOY = Node(namespace="shop", flavor="envoy", http_proxy_address="127.0.0.1:15901")
PORT_80 = """
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: web, namespace: shop}
spec:
  hosts: [web.shop.svc.cluster.local]
  location: MESH_INTERNAL
  resolution: STATIC
  ports: [{number: 80, name: http, protocol: HTTP}, {number: 8080, name: alt, protocol: HTTP}]
  endpoints: [{address: 10.0.3.1}]
"""


def test_envoy_gets_one_http_listener_on_its_proxy_address_instead_of_socketless_ones() -> None:
    snapshot = mesh(node=ENVOY)

    (listener,) = snapshot.listeners.values()
    assert listener.name == "http_proxy"
    assert not listener.HasField("api_listener")
    address = listener.address.socket_address
    assert (address.address, address.port_value) == ("127.0.0.1", 15901)
    (filter_,) = listener.filter_chains[0].filters
    manager = hcm.HttpConnectionManager()
    assert filter_.typed_config.Unpack(manager)
    assert [f.name for f in manager.http_filters] == [FAULT_FILTER, ROUTER_FILTER]
    assert manager.rds.route_config_name == "http_proxy"
    assert manager.http_protocol_options.allow_absolute_url.value  # usable as http_proxy
    assert set(snapshot.routes) == {"http_proxy"}


def test_envoys_virtual_hosts_route_exactly_as_the_socketless_listeners_do() -> None:
    canary = """
        - route:
          - {destination: {host: reviews, subset: v1}, weight: 90}
          - {destination: {host: reviews, subset: v2}, weight: 10}
        """
    documents = [destination_rule(SUBSETS), virtual_service(canary)]
    libmesh, envoy = mesh(*documents), mesh(*documents, node=ENVOY)

    proxied = {v.name: v for v in envoy.routes["http_proxy"].virtual_hosts}
    for name, config in libmesh.routes.items():
        assert list(proxied[name].routes) == list(config.virtual_hosts[0].routes)
    assert envoy.clusters == libmesh.clusters
    assert envoy.endpoints == libmesh.endpoints


def test_envoys_domains_carry_the_port_but_for_port_80_and_are_never_repeated() -> None:
    config = mesh(PORT_80, node=ENVOY).routes["http_proxy"]

    domains = {v.name: set(v.domains) for v in config.virtual_hosts}
    web = "web.shop.svc.cluster.local"
    assert {"web", "web:80", web} <= domains[f"{web}:80"]
    assert "web" not in domains[f"{web}:8080"]
    assert "web:8080" in domains[f"{web}:8080"]
    assert all(d.endswith(":8080") for d in domains[REVIEWS_LISTENER])
    every = [d for v in config.virtual_hosts for d in v.domains]
    assert len(every) == len(set(every))  # Envoy rejects a route configuration that repeats one


def test_an_envoys_route_ports_are_listeners_bound_to_one_service_each() -> None:
    """libmesh-proxy --engine envoy --route: every request on the port takes the service's
    routes, whatever its Host, and goes upstream with the service's authority."""
    rewrite = """
        - match: [{uri: {prefix: /v2}}]
          rewrite: {authority: v2.example}
          route: [{destination: {host: reviews, subset: v2}}]
        - route: [{destination: {host: reviews, subset: v1}}]
        """
    node = Node(
        namespace="shop",
        flavor="envoy",
        http_proxy_address="",
        routes=(("127.0.0.1:9001", "reviews:8080"), ("127.0.0.1:9002", "nowhere:80")),
    )
    snapshot = mesh(destination_rule(SUBSETS), virtual_service(rewrite), node=node)

    bound, unknown = (
        snapshot.listeners["route_127.0.0.1_9001"],
        snapshot.listeners["route_127.0.0.1_9002"],
    )
    address = bound.address.socket_address
    assert (address.address, address.port_value) == ("127.0.0.1", 9001)
    manager = hcm.HttpConnectionManager()
    assert bound.filter_chains[0].filters[0].typed_config.Unpack(manager)
    assert [u.upgrade_type for u in manager.upgrade_configs] == ["websocket"]
    (vhost,) = snapshot.routes["route_127.0.0.1_9001"].virtual_hosts
    assert list(vhost.domains) == ["*"]
    routes = list(vhost.routes)
    assert [r.route.host_rewrite_literal for r in routes] == ["v2.example", "reviews:8080"]
    assert routes[1].route.cluster == f"outbound|8080|v1|{REVIEWS}"
    assert unknown.address.socket_address.port_value == 9002
    assert list(snapshot.routes["route_127.0.0.1_9002"].virtual_hosts) == []  # Envoy: 404 NR


def test_an_unknown_flavor_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown node flavor 'Envoy'"):
        Node(flavor="Envoy")


# -- routing ---------------------------------------------------------------------------------------


def assert_istio_default_retry_policy(policy: rc.RetryPolicy) -> None:
    assert policy.retry_on == ISTIO_RETRY_ON
    assert policy.num_retries.value == 2
    assert list(policy.retriable_status_codes) == [503]
    assert policy.host_selection_retry_max_attempts == 5
    assert [p.name for p in policy.retry_host_predicate] == [PREVIOUS_HOSTS]


def test_a_service_without_a_virtual_service_gets_one_catch_all_route_to_its_cluster() -> None:
    route = only_route(mesh())

    assert route.name == "default"
    assert route.match.prefix == "/"
    assert route.route.cluster == REVIEWS_CLUSTER
    assert route.route.timeout == seconds(0)
    assert_istio_default_retry_policy(route.route.retry_policy)


def test_weighted_routes_become_weighted_clusters_with_the_same_weights() -> None:
    snapshot = mesh(
        destination_rule(SUBSETS),
        virtual_service("""
            - route:
              - {destination: {host: reviews, subset: v1}, weight: 70}
              - {destination: {host: reviews, subset: v2}, weight: 20}
              - {destination: {host: reviews, subset: v3}, weight: 10}
            """),
    )

    assert weights(only_route(snapshot)) == [
        (f"outbound|8080|v1|{REVIEWS}", 70),
        (f"outbound|8080|v2|{REVIEWS}", 20),
        (f"outbound|8080|v3|{REVIEWS}", 10),
    ]


def test_a_single_destination_becomes_a_plain_cluster() -> None:
    snapshot = mesh(
        destination_rule(SUBSETS),
        virtual_service("- route: [{destination: {host: reviews, subset: v2}}]"),
    )

    assert only_route(snapshot).route.cluster == f"outbound|8080|v2|{REVIEWS}"


def test_zero_weight_destinations_are_left_out_as_istio_does() -> None:
    snapshot = mesh(
        destination_rule(SUBSETS),
        virtual_service("""
            - route:
              - {destination: {host: reviews, subset: v1}, weight: 100}
              - {destination: {host: reviews, subset: v2}, weight: 0}
            """),
    )

    assert weights(only_route(snapshot)) == [(f"outbound|8080|v1|{REVIEWS}", 100)]


def test_subsets_are_clusters_of_exactly_the_workloads_whose_labels_match() -> None:
    snapshot = mesh(
        destination_rule(
            SUBSETS + "- {name: none, labels: {version: v9}}\n- {name: all, labels: {app: reviews}}"
        )
    )

    assert addresses(snapshot, f"outbound|8080|v1|{REVIEWS}") == {"10.0.0.1", "10.0.0.2"}
    assert addresses(snapshot, f"outbound|8080|v2|{REVIEWS}") == {"10.0.0.3"}
    assert addresses(snapshot, f"outbound|8080|v3|{REVIEWS}") == {"10.0.0.4", "10.0.0.5"}
    assert addresses(snapshot, f"outbound|8080|none|{REVIEWS}") == set()
    assert addresses(snapshot, f"outbound|8080|all|{REVIEWS}") == addresses(
        snapshot, REVIEWS_CLUSTER
    )
    assert addresses(snapshot, REVIEWS_CLUSTER) == {f"10.0.0.{i}" for i in range(1, 6)}


def test_endpoints_listen_on_the_service_port_unless_the_workload_maps_it() -> None:
    snapshot = mesh(
        base=MESH.replace("{address: 10.0.1.1,", "{address: 10.0.1.1, ports: {http: 19080},")
    )

    [group] = snapshot.endpoints[cluster_name(9080, "", RATINGS)].endpoints
    assert [e.endpoint.address.socket_address.port_value for e in group.lb_endpoints] == [19080]
    [group] = snapshot.endpoints[cluster_name(8080, "", DETAILS)].endpoints
    assert [e.endpoint.address.socket_address.port_value for e in group.lb_endpoints] == [8080]


def test_a_route_without_retries_gets_istios_default_retry_policy() -> None:
    snapshot = mesh(virtual_service("- route: [{destination: {host: reviews}}]"))

    assert_istio_default_retry_policy(only_route(snapshot).route.retry_policy)


def test_zero_retry_attempts_mean_no_retry_policy_at_all() -> None:
    snapshot = mesh(
        virtual_service("""
            - retries: {attempts: 0}
              route: [{destination: {host: reviews}}]
            """)
    )

    assert not only_route(snapshot).route.HasField("retry_policy")


def test_retry_on_status_codes_become_retriable_status_codes() -> None:
    snapshot = mesh(
        virtual_service("""
            - retries: {attempts: 3, perTryTimeout: 2s, retryOn: "gateway-error,503,504"}
              route: [{destination: {host: reviews}}]
            """)
    )

    policy = only_route(snapshot).route.retry_policy
    assert policy.num_retries.value == 3
    assert policy.retry_on == "gateway-error,retriable-status-codes"
    assert list(policy.retriable_status_codes) == [503, 504]
    assert policy.per_try_timeout == seconds(2)


def test_retry_on_naming_retriable_status_codes_itself_is_not_repeated() -> None:
    snapshot = mesh(
        virtual_service("""
            - retries: {attempts: 1, retryOn: "retriable-status-codes,502"}
              route: [{destination: {host: reviews}}]
            """)
    )

    policy = only_route(snapshot).route.retry_policy
    assert policy.retry_on == "retriable-status-codes"
    assert list(policy.retriable_status_codes) == [502]


def test_retry_on_without_codes_replaces_istios_default_conditions_and_codes() -> None:
    snapshot = mesh(
        virtual_service("""
            - retries: {attempts: 4, retryOn: connect-failure}
              route: [{destination: {host: reviews}}]
            """)
    )

    policy = only_route(snapshot).route.retry_policy
    assert (policy.retry_on, list(policy.retriable_status_codes)) == ("connect-failure", [])
    assert policy.num_retries.value == 4


def test_attempts_alone_keep_istios_default_conditions() -> None:
    snapshot = mesh(
        virtual_service("""
            - retries: {attempts: 5}
              route: [{destination: {host: reviews}}]
            """)
    )

    policy = only_route(snapshot).route.retry_policy
    assert (policy.retry_on, list(policy.retriable_status_codes)) == (ISTIO_RETRY_ON, [503])
    assert policy.num_retries.value == 5


def test_retries_may_try_the_same_host_again_and_back_off() -> None:
    snapshot = mesh(
        virtual_service("""
            - retries: {attempts: 2, retryIgnorePreviousHosts: false, backoff: 250ms}
              route: [{destination: {host: reviews}}]
            """)
    )

    policy = only_route(snapshot).route.retry_policy
    assert list(policy.retry_host_predicate) == []
    assert policy.retry_back_off.base_interval == seconds(0.25)


def test_the_previous_hosts_predicate_carries_its_typed_config() -> None:
    predicate = only_route(mesh()).route.retry_policy.retry_host_predicate[0]

    assert predicate.typed_config.type_url == (
        "type.googleapis.com/envoy.extensions.retry.host.previous_hosts.v3.PreviousHostsPredicate"
    )


def test_retrying_in_remote_localities_uses_previous_priorities_with_istios_config() -> None:
    snapshot = mesh(
        virtual_service("""
            - retries: {attempts: 3, retryRemoteLocalities: true}
              route: [{destination: {host: reviews}}]
            """)
    )

    priority = only_route(snapshot).route.retry_policy.retry_priority
    config = previous_priorities_config_pb2.PreviousPrioritiesConfig()
    assert priority.name == "envoy.retry_priorities.previous_priorities"
    assert priority.typed_config.Unpack(config)
    assert config.update_frequency == 2


def test_route_timeout_bounds_the_whole_request_and_grpc_streams() -> None:
    snapshot = mesh(
        virtual_service("""
            - timeout: 3s
              route: [{destination: {host: reviews}}]
            """)
    )

    action = only_route(snapshot).route
    assert action.timeout == seconds(3)
    assert action.max_stream_duration.max_stream_duration == seconds(3)


def test_a_route_without_timeout_has_none() -> None:
    action = only_route(mesh(virtual_service("- route: [{destination: {host: reviews}}]"))).route

    assert action.timeout == seconds(0)
    assert action.max_stream_duration.max_stream_duration == seconds(0)


def test_fault_delay_and_abort_are_fractions_per_million_on_the_fault_filter() -> None:
    snapshot = mesh(
        virtual_service("""
            - fault:
                delay: {fixedDelay: 5s, percentage: {value: 0.1}}
                abort: {httpStatus: 503, percentage: {value: 12.5}}
              route: [{destination: {host: reviews}}]
            """)
    )

    fault = fault_of(only_route(snapshot))
    assert fault.delay.fixed_delay == seconds(5)
    assert fault.delay.percentage == per_million(0.1)
    assert fault.abort.http_status == 503
    assert fault.abort.percentage == per_million(12.5)


def test_the_bookinfo_fault_injection_from_the_corpus_delays_every_request_for_jason() -> None:
    snapshot = mesh(
        corpus_file("samples_bookinfo_networking_virtual-service-ratings-test-delay.yaml"),
        destination_rule(
            "subsets: [{name: v1, labels: {version: v1}}]",
            namespace="default",
            name="ratings",
            host="ratings",
        ),
        base=MESH_TEMPLATE.format(ns="default"),
        node=Node(namespace="default"),
    )

    jason, everyone = routes(snapshot, "ratings.default.svc.cluster.local:9080")
    assert fault_of(jason).delay.fixed_delay == seconds(7)
    assert fault_of(jason).delay.percentage == per_million(100)
    assert [(h.name, h.string_match.exact) for h in jason.match.headers] == [("end-user", "jason")]
    assert FAULT_FILTER not in everyone.typed_per_filter_config


def test_a_grpc_abort_carries_the_grpc_status_code() -> None:
    snapshot = mesh(
        virtual_service("""
            - fault: {abort: {grpcStatus: UNAVAILABLE, percentage: {value: 100}}}
              route: [{destination: {host: reviews}}]
            """)
    )

    assert fault_of(only_route(snapshot)).abort.grpc_status == 14


def mirrors_of(route: rc.Route) -> list[tuple[str, percent_pb2.FractionalPercent]]:
    policies = route.route.request_mirror_policies
    return [(m.cluster, m.runtime_fraction.default_value) for m in policies]


def test_a_mirror_copies_a_percentage_of_requests_to_its_cluster() -> None:
    snapshot = mesh(
        virtual_service("""
            - match: [{uri: {prefix: /sampled}}]
              mirror: {host: ratings}
              mirrorPercentage: {value: 20}
              route: [{destination: {host: reviews}}]
            - mirror: {host: details, port: {number: 9090}}
              route: [{destination: {host: reviews}}]
            """)
    )

    sampled, everything = routes(snapshot)
    assert mirrors_of(sampled) == [(cluster_name(9080, "", RATINGS), per_million(20))]
    assert mirrors_of(everything) == [(cluster_name(9090, "", DETAILS), per_million(100))]


def test_several_mirrors_each_copy_their_own_percentage() -> None:
    snapshot = mesh(
        virtual_service("""
            - mirrors:
              - destination: {host: details, port: {number: 9090}}
                percentage: {value: 5}
              - destination: {host: ratings}
              route: [{destination: {host: reviews}}]
            """)
    )

    assert mirrors_of(only_route(snapshot)) == [
        (cluster_name(9090, "", DETAILS), per_million(5)),
        (cluster_name(9080, "", RATINGS), per_million(100)),
    ]


def test_header_set_overwrites_add_appends_and_remove_removes() -> None:
    snapshot = mesh(
        virtual_service("""
            - headers:
                request:
                  set: {x-version: v2}
                  add: {x-trace: "on"}
                  remove: [x-debug]
                response:
                  set: {cache-control: no-store}
                  add: {x-served-by: mesh}
                  remove: [server]
              route: [{destination: {host: reviews}}]
            """)
    )

    route = only_route(snapshot)
    overwrite = base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD
    append = base_pb2.HeaderValueOption.APPEND_IF_EXISTS_OR_ADD
    assert [
        (h.header.key, h.header.value, h.append_action) for h in route.request_headers_to_add
    ] == [("x-version", "v2", overwrite), ("x-trace", "on", append)]
    assert list(route.request_headers_to_remove) == ["x-debug"]
    assert [
        (h.header.key, h.header.value, h.append_action) for h in route.response_headers_to_add
    ] == [("cache-control", "no-store", overwrite), ("x-served-by", "mesh", append)]
    assert list(route.response_headers_to_remove) == ["server"]


def test_destination_headers_apply_to_their_own_weighted_cluster() -> None:
    snapshot = mesh(
        destination_rule(SUBSETS),
        virtual_service("""
            - route:
              - destination: {host: reviews, subset: v1}
                weight: 90
              - destination: {host: reviews, subset: v2}
                weight: 10
                headers: {request: {set: {x-canary: "true"}}}
            """),
    )

    stable, canary = only_route(snapshot).route.weighted_clusters.clusters
    assert list(stable.request_headers_to_add) == []
    assert [(h.header.key, h.header.value) for h in canary.request_headers_to_add] == [
        ("x-canary", "true")
    ]


def test_setting_the_host_header_rewrites_the_authority() -> None:
    snapshot = mesh(
        virtual_service("""
            - headers: {request: {set: {host: reviews.internal}}}
              route: [{destination: {host: reviews}}]
            """)
    )

    route = only_route(snapshot)
    assert route.route.host_rewrite_literal == "reviews.internal"
    assert [h.header.key for h in route.request_headers_to_add] == []


def test_rewrites_replace_the_prefix_the_path_by_regex_or_the_authority() -> None:
    snapshot = mesh(
        virtual_service("""
            - match: [{uri: {prefix: /old}}]
              rewrite: {uri: /new, authority: reviews.internal}
              route: [{destination: {host: reviews}}]
            - match: [{uri: {prefix: /v1}}]
              rewrite: {uriRegexRewrite: {match: "^/v1/(.*)$", rewrite: "/api/\\\\1"}}
              route: [{destination: {host: reviews}}]
            """)
    )

    prefix, regex = routes(snapshot)
    assert prefix.route.prefix_rewrite == "/new"
    assert prefix.route.host_rewrite_literal == "reviews.internal"
    assert regex.route.regex_rewrite.pattern.regex == "^/v1/(.*)$"
    assert regex.route.regex_rewrite.substitution == "/api/\\1"


@pytest.mark.parametrize(
    ("code", "expected"),
    [
        (None, rc.RedirectAction.MOVED_PERMANENTLY),
        (301, rc.RedirectAction.MOVED_PERMANENTLY),
        (302, rc.RedirectAction.FOUND),
        (303, rc.RedirectAction.SEE_OTHER),
        (307, rc.RedirectAction.TEMPORARY_REDIRECT),
        (308, rc.RedirectAction.PERMANENT_REDIRECT),
    ],
)
def test_redirects_keep_their_status_code(code: int | None, expected: int) -> None:
    redirect_code = f", redirectCode: {code}" if code else ""
    snapshot = mesh(
        virtual_service(f"""
    - redirect: {{uri: /v2/reviews, authority: new.example.com{redirect_code}}}
    """)
    )

    redirect = only_route(snapshot).redirect
    assert redirect.response_code == expected
    assert (redirect.path_redirect, redirect.host_redirect) == ("/v2/reviews", "new.example.com")


def test_a_redirect_may_change_scheme_and_port() -> None:
    snapshot = mesh(virtual_service("- redirect: {scheme: https, port: 8443}"))

    redirect = only_route(snapshot).redirect
    assert (redirect.scheme_redirect, redirect.port_redirect) == ("https", 8443)


def test_a_direct_response_answers_without_a_cluster() -> None:
    snapshot = mesh(
        virtual_service("""
            - match: [{uri: {exact: /healthz}}]
              directResponse: {status: 503, body: {string: "down for maintenance"}}
            - route: [{destination: {host: reviews}}]
            """)
    )

    direct, _ = routes(snapshot)
    assert direct.direct_response.status == 503
    assert direct.direct_response.body.inline_string == "down for maintenance"
    assert not direct.HasField("route")


@pytest.mark.parametrize(
    ("uri", "field", "value"),
    [
        ("{exact: /api/v1}", "path", "/api/v1"),
        ("{prefix: /api}", "prefix", "/api"),
        ("{regex: '/api/v[0-9]+'}", "safe_regex", "/api/v[0-9]+"),
    ],
)
def test_uri_matches_become_path_prefix_or_safe_regex(uri: str, field: str, value: str) -> None:
    snapshot = mesh(
        virtual_service(f"""
    - match: [{{uri: {uri}}}]
      route: [{{destination: {{host: reviews}}}}]
    """)
    )

    match = routes(snapshot)[0].match
    assert match.WhichOneof("path_specifier") == field
    assert (match.safe_regex.regex if field == "safe_regex" else getattr(match, field)) == value
    assert match.case_sensitive.value or not match.HasField("case_sensitive")


def test_ignore_uri_case_makes_the_path_match_case_insensitive() -> None:
    snapshot = mesh(
        virtual_service("""
            - match: [{uri: {prefix: /API}, ignoreUriCase: true}]
              route: [{destination: {host: reviews}}]
            """)
    )

    match = routes(snapshot)[0].match
    assert match.prefix == "/API"
    assert match.HasField("case_sensitive")
    assert match.case_sensitive.value is False


def header_matchers(match: rc.RouteMatch) -> dict[str, tuple[str, str, bool]]:
    """name -> (how, what, inverted) for each header matcher."""
    out = {}
    for header in match.headers:
        if header.HasField("string_match"):
            kind = header.string_match.WhichOneof("match_pattern")
            what = (
                header.string_match.safe_regex.regex
                if kind == "safe_regex"
                else getattr(header.string_match, kind)
            )
            out[header.name] = (kind, what, header.invert_match)
        else:
            assert header.present_match
            out[header.name] = ("present", "", header.invert_match)
    return out


def test_header_matches_translate_exact_prefix_regex_and_presence() -> None:
    snapshot = mesh(
        virtual_service("""
            - match:
              - headers:
                  end-user: {exact: jason}
                  x-tenant: {prefix: acme-}
                  x-build: {regex: "[0-9]+"}
                  x-debug: {}
              route: [{destination: {host: reviews}}]
            """)
    )

    assert header_matchers(routes(snapshot)[0].match) == {
        "end-user": ("exact", "jason", False),
        "x-tenant": ("prefix", "acme-", False),
        "x-build": ("safe_regex", "[0-9]+", False),
        "x-debug": ("present", "", False),
    }


def test_without_headers_invert_the_match() -> None:
    snapshot = mesh(
        virtual_service("""
            - match:
              - withoutHeaders:
                  x-canary: {exact: "true"}
                  x-debug: {}
              route: [{destination: {host: reviews}}]
            """)
    )

    assert header_matchers(routes(snapshot)[0].match) == {
        "x-canary": ("exact", "true", True),
        "x-debug": ("present", "", True),
    }


def test_without_headers_also_match_requests_that_lack_the_header() -> None:
    snapshot = mesh(
        virtual_service("""
            - match: [{withoutHeaders: {x-canary: {exact: "true"}}}]
              route: [{destination: {host: reviews}}]
            """)
    )

    [header] = routes(snapshot)[0].match.headers
    assert header.invert_match
    assert header.treat_missing_header_as_empty


def test_query_parameters_match_exactly_by_prefix_by_regex_or_by_presence() -> None:
    snapshot = mesh(
        virtual_service("""
            - match:
              - queryParams:
                  page: {exact: "1"}
                  q: {prefix: shoe}
                  id: {regex: "[a-f0-9]+"}
                  debug: {}
              route: [{destination: {host: reviews}}]
            """)
    )

    params = {q.name: q for q in routes(snapshot)[0].match.query_parameters}
    assert params["page"].string_match.exact == "1"
    assert params["q"].string_match.prefix == "shoe"
    assert params["id"].string_match.safe_regex.regex == "[a-f0-9]+"
    assert params["debug"].present_match


def test_method_authority_and_scheme_are_matched_as_pseudo_headers() -> None:
    snapshot = mesh(
        virtual_service("""
            - match:
              - method: {exact: POST}
                authority: {prefix: reviews}
                scheme: {exact: https}
              route: [{destination: {host: reviews}}]
            """)
    )

    assert header_matchers(routes(snapshot)[0].match) == {
        ":method": ("exact", "POST", False),
        ":authority": ("prefix", "reviews", False),
        ":scheme": ("exact", "https", False),
    }


def test_each_match_of_a_rule_becomes_its_own_route_in_order() -> None:
    snapshot = mesh(
        virtual_service("""
            - match: [{uri: {prefix: /a}}, {uri: {prefix: /b}}]
              route: [{destination: {host: ratings}}]
            - route: [{destination: {host: reviews}}]
            """)
    )

    assert [(r.match.prefix, r.route.cluster) for r in routes(snapshot)] == [
        ("/a", cluster_name(9080, "", RATINGS)),
        ("/b", cluster_name(9080, "", RATINGS)),
        ("/", REVIEWS_CLUSTER),
    ]


SOURCE_ROUTED = virtual_service("""
- match: [{sourceLabels: {app: productpage}}]
  route: [{destination: {host: ratings}}]
- match: [{sourceNamespace: batch}]
  route: [{destination: {host: details}}]
- route: [{destination: {host: reviews}}]
""")


@pytest.mark.parametrize(
    ("node", "clusters"),
    [
        (SHOP, [REVIEWS_CLUSTER]),
        (
            Node(namespace="shop", labels=FrozenMap({"app": "productpage", "version": "v1"})),
            [cluster_name(9080, "", RATINGS), REVIEWS_CLUSTER],
        ),
        (Node(namespace="batch"), [cluster_name(8080, "", DETAILS), REVIEWS_CLUSTER]),
        (
            Node(namespace="batch", labels=FrozenMap({"app": "other"})),
            [cluster_name(8080, "", DETAILS), REVIEWS_CLUSTER],
        ),
    ],
    ids=["plain", "productpage", "batch-namespace", "batch-other-app"],
)
def test_source_labels_and_namespace_decide_which_routes_a_client_gets(
    node: Node, clusters: list[str]
) -> None:
    snapshot = mesh(SOURCE_ROUTED, node=node)

    assert [r.route.cluster for r in routes(snapshot)] == clusters


def test_a_port_match_applies_only_to_that_ports_listener() -> None:
    snapshot = mesh("""
        apiVersion: networking.istio.io/v1
        kind: VirtualService
        metadata: {name: details, namespace: shop}
        spec:
          hosts: [details]
          http:
          - match: [{port: 9090}]
            fault: {abort: {grpcStatus: UNAVAILABLE, percentage: {value: 100}}}
            route: [{destination: {host: details}}]
          - route: [{destination: {host: details}}]
        """)

    grpc_routes = routes(snapshot, f"{DETAILS}:9090")
    http_routes = routes(snapshot, f"{DETAILS}:8080")
    assert [r.route.cluster for r in grpc_routes] == [cluster_name(9090, "", DETAILS)] * 2
    assert FAULT_FILTER in grpc_routes[0].typed_per_filter_config
    assert [r.route.cluster for r in http_routes] == [cluster_name(8080, "", DETAILS)]


def test_hedging_from_the_libmesh_annotation_becomes_envoys_hedge_policy() -> None:
    snapshot = mesh(
        virtual_service(
            "- route: [{destination: {host: reviews}}]",
            annotations={"libmesh.io/hedge": "initialRequests=2,additionalRequestChance=10"},
        )
    )

    hedge = only_route(snapshot).route.hedge_policy
    assert hedge.initial_requests.value == 2
    assert hedge.additional_request_chance == per_million(10)
    assert hedge.hedge_on_per_try_timeout is True


# -- DestinationRule ------------------------------------------------------------------------------


def reviews_cluster(*documents: str, node: Node = SHOP, name: str = REVIEWS_CLUSTER) -> Message:
    return mesh(*documents, node=node).clusters[name]


# Cluster.load_balancing_policy, when set, takes precedence over lb_policy in Envoy and grpcio.
LB_EXTENSIONS = {
    "envoy.extensions.load_balancing_policies.round_robin.v3.RoundRobin": (
        cluster_pb2.Cluster.ROUND_ROBIN
    ),
    "envoy.extensions.load_balancing_policies.least_request.v3.LeastRequest": (
        cluster_pb2.Cluster.LEAST_REQUEST
    ),
    "envoy.extensions.load_balancing_policies.random.v3.Random": cluster_pb2.Cluster.RANDOM,
    "envoy.extensions.load_balancing_policies.ring_hash.v3.RingHash": cluster_pb2.Cluster.RING_HASH,
    "envoy.extensions.load_balancing_policies.maglev.v3.Maglev": cluster_pb2.Cluster.MAGLEV,
}
# What grpcio's xDS client implements (anything else in lb_policy is NACKed).
GRPCIO_LB_POLICIES = {cluster_pb2.Cluster.ROUND_ROBIN, cluster_pb2.Cluster.RING_HASH}


def lb_policies(cluster: Message) -> list[int]:
    """The load balancers a cluster offers, first choice first."""
    if not cluster.HasField("load_balancing_policy"):
        return [cluster.lb_policy]
    return [
        LB_EXTENSIONS.get(p.typed_extension_config.typed_config.type_url.rpartition("/")[2], -1)
        for p in cluster.load_balancing_policy.policies
    ]


@pytest.mark.parametrize(
    ("simple", "policy"),
    [
        (None, cluster_pb2.Cluster.LEAST_REQUEST),
        ("ROUND_ROBIN", cluster_pb2.Cluster.ROUND_ROBIN),
        ("LEAST_REQUEST", cluster_pb2.Cluster.LEAST_REQUEST),
        ("LEAST_CONN", cluster_pb2.Cluster.LEAST_REQUEST),
        ("RANDOM", cluster_pb2.Cluster.RANDOM),
    ],
)
def test_simple_load_balancers_map_to_envoys_and_least_request_is_the_default(
    simple: str | None, policy: int
) -> None:
    documents = [destination_rule(f"trafficPolicy: {{loadBalancer: {{simple: {simple}}}}}")]
    cluster = reviews_cluster(*(documents if simple else []))

    assert lb_policies(cluster)[0] == policy


def test_grpc_clients_get_a_load_balancer_grpcio_can_use() -> None:
    # Istio's default (LEAST_REQUEST) is what Envoy and libmesh get; grpcio, which NACKs it,
    # is served ROUND_ROBIN, as Istio's grpcgen serves proxyless gRPC.
    grpc = Node(namespace="shop", flavor="grpc")
    assert set(lb_policies(reviews_cluster(node=grpc))) & GRPCIO_LB_POLICIES
    assert lb_policies(reviews_cluster()) == [cluster_pb2.Cluster.LEAST_REQUEST]


@pytest.mark.parametrize(
    ("hashing", "expected"),
    [
        (
            "{httpHeaderName: x-user}",
            rc.RouteAction.HashPolicy(
                header=rc.RouteAction.HashPolicy.Header(header_name="x-user")
            ),
        ),
        (
            "{httpCookie: {name: session, path: /, ttl: 60s}}",
            rc.RouteAction.HashPolicy(
                cookie=rc.RouteAction.HashPolicy.Cookie(name="session", path="/", ttl=seconds(60))
            ),
        ),
        (
            "{useSourceIp: true}",
            rc.RouteAction.HashPolicy(
                connection_properties=rc.RouteAction.HashPolicy.ConnectionProperties(source_ip=True)
            ),
        ),
        (
            "{httpQueryParameterName: user}",
            rc.RouteAction.HashPolicy(
                query_parameter=rc.RouteAction.HashPolicy.QueryParameter(name="user")
            ),
        ),
    ],
    ids=["header", "cookie", "source-ip", "query-parameter"],
)
def test_consistent_hashing_is_a_ring_hash_cluster_and_a_hash_policy_on_the_route(
    hashing: str, expected: rc.RouteAction.HashPolicy
) -> None:
    snapshot = mesh(
        destination_rule(f"trafficPolicy: {{loadBalancer: {{consistentHash: {hashing}}}}}"),
        virtual_service("- route: [{destination: {host: reviews}}]"),
    )

    cluster = snapshot.clusters[REVIEWS_CLUSTER]
    assert cluster.lb_policy == cluster_pb2.Cluster.RING_HASH
    assert cluster.ring_hash_lb_config.minimum_ring_size.value == 1024
    action = only_route(snapshot).route
    assert list(action.hash_policy) == [expected]
    # Istio's DefaultConsistentHashPolicy: retrying elsewhere would defeat the hashing.
    assert list(action.retry_policy.retry_host_predicate) == []
    assert action.retry_policy.retry_on == ISTIO_RETRY_ON


def test_the_default_route_hashes_too_when_the_destination_rule_asks_for_it() -> None:
    snapshot = mesh(
        destination_rule("trafficPolicy: {loadBalancer: {consistentHash: {useSourceIp: true}}}")
    )

    [hash_policy] = only_route(snapshot).route.hash_policy
    assert hash_policy.connection_properties.source_ip is True


def test_ring_size_and_maglev_table_size_are_configurable() -> None:
    ring = reviews_cluster(
        destination_rule("""
            trafficPolicy:
              loadBalancer:
                consistentHash: {httpHeaderName: x-user, ringHash: {minimumRingSize: 4096}}
            """)
    )
    maglev = reviews_cluster(
        destination_rule("""
            trafficPolicy:
              loadBalancer:
                consistentHash: {httpHeaderName: x-user, maglev: {tableSize: 131}}
            """)
    )

    assert ring.lb_policy == cluster_pb2.Cluster.RING_HASH
    assert ring.ring_hash_lb_config.minimum_ring_size.value == 4096
    assert maglev.lb_policy == cluster_pb2.Cluster.MAGLEV
    assert maglev.maglev_lb_config.table_size.value == 131


def test_a_subset_with_its_own_hashing_hashes_routes_to_that_subset() -> None:
    snapshot = mesh(
        destination_rule("""
            subsets:
            - name: v1
              labels: {version: v1}
              trafficPolicy: {loadBalancer: {consistentHash: {httpHeaderName: x-user}}}
            - {name: v2, labels: {version: v2}}
            """),
        virtual_service("""
            - match: [{uri: {prefix: /sticky}}]
              route: [{destination: {host: reviews, subset: v1}}]
            - route: [{destination: {host: reviews, subset: v2}}]
            """),
    )

    sticky, plain = routes(snapshot)
    assert [h.header.header_name for h in sticky.route.hash_policy] == ["x-user"]
    assert list(plain.route.hash_policy) == []
    assert snapshot.clusters[f"outbound|8080|v1|{REVIEWS}"].lb_policy == (
        cluster_pb2.Cluster.RING_HASH
    )
    assert snapshot.clusters[f"outbound|8080|v2|{REVIEWS}"].lb_policy == (
        cluster_pb2.Cluster.LEAST_REQUEST
    )


def test_istio_lifts_envoys_circuit_breaker_defaults_to_the_maximum() -> None:
    [thresholds] = reviews_cluster().circuit_breakers.thresholds

    assert thresholds.priority == base_pb2.DEFAULT
    assert thresholds.max_connections.value == MAX_UINT32
    assert thresholds.max_pending_requests.value == MAX_UINT32
    assert thresholds.max_requests.value == MAX_UINT32
    assert thresholds.max_retries.value == MAX_UINT32
    assert thresholds.track_remaining is True
    assert not thresholds.HasField("retry_budget")
    assert list(reviews_cluster().circuit_breakers.per_host_thresholds) == []


def test_connection_pool_limits_become_circuit_breaker_thresholds() -> None:
    cluster = reviews_cluster(
        destination_rule("""
            trafficPolicy:
              connectionPool:
                tcp: {maxConnections: 10, connectTimeout: 250ms}
                http: {http1MaxPendingRequests: 20, http2MaxRequests: 30, maxRetries: 4}
            """)
    )

    [thresholds] = cluster.circuit_breakers.thresholds
    assert thresholds.max_connections.value == 10
    assert thresholds.max_pending_requests.value == 20
    assert thresholds.max_requests.value == 30
    assert thresholds.max_retries.value == 4
    assert cluster.connect_timeout == seconds(0.25)


def test_without_a_connect_timeout_clusters_use_istios_ten_seconds() -> None:
    assert reviews_cluster().connect_timeout == seconds(10)


def http_protocol_options(cluster: Message) -> http_protocol_options_pb2.HttpProtocolOptions:
    options = http_protocol_options_pb2.HttpProtocolOptions()
    assert cluster.typed_extension_protocol_options[HTTP_PROTOCOL_OPTIONS].Unpack(options)
    return options


def test_per_connection_settings_go_to_the_http_protocol_options() -> None:
    cluster = reviews_cluster(
        destination_rule("""
            trafficPolicy:
              connectionPool:
                http: {maxRequestsPerConnection: 65, idleTimeout: 30s, h2UpgradePolicy: UPGRADE}
            """)
    )

    options = http_protocol_options(cluster)
    assert options.common_http_protocol_options.max_requests_per_connection.value == 65
    assert options.common_http_protocol_options.idle_timeout == seconds(30)
    assert options.explicit_http_config.HasField("http2_protocol_options")


def test_http_protocol_options_always_say_which_upstream_protocol_to_use() -> None:
    cluster = reviews_cluster(
        destination_rule("""
            trafficPolicy:
              connectionPool:
                http: {maxRequestsPerConnection: 65}
            """)
    )

    assert http_protocol_options(cluster).WhichOneof("upstream_protocol_options") is not None


def test_a_retry_budget_limits_concurrent_retries() -> None:
    cluster = reviews_cluster(
        destination_rule("""
            trafficPolicy:
              retryBudget: {percent: 25, minRetryConcurrency: 5}
            """)
    )

    budget = cluster.circuit_breakers.thresholds[0].retry_budget
    assert budget.budget_percent.value == 25
    assert budget.min_retry_concurrency.value == 5


def test_an_empty_retry_budget_still_turns_the_budget_on() -> None:
    cluster = reviews_cluster(destination_rule("trafficPolicy: {retryBudget: {}}"))

    thresholds = cluster.circuit_breakers.thresholds[0]
    assert thresholds.HasField("retry_budget")
    assert thresholds.retry_budget.min_retry_concurrency.value == 3


def test_outlier_detection_maps_field_by_field_with_success_rate_disabled() -> None:
    cluster = reviews_cluster(
        destination_rule("""
            trafficPolicy:
              outlierDetection:
                consecutive5xxErrors: 7
                consecutiveGatewayErrors: 3
                interval: 5s
                baseEjectionTime: 1m
                maxEjectionPercent: 50
                minHealthPercent: 30
            """)
    )

    outlier = cluster.outlier_detection
    assert (outlier.consecutive_5xx.value, outlier.enforcing_consecutive_5xx.value) == (7, 100)
    assert (
        outlier.consecutive_gateway_failure.value,
        outlier.enforcing_consecutive_gateway_failure.value,
    ) == (3, 100)
    assert outlier.interval == seconds(5)
    assert outlier.base_ejection_time == seconds(60)
    assert outlier.max_ejection_percent.value == 50
    assert outlier.HasField("enforcing_success_rate")
    assert outlier.enforcing_success_rate.value == 0
    assert cluster.common_lb_config.healthy_panic_threshold.value == 30


def test_zero_consecutive_errors_turn_that_detection_off() -> None:
    outlier = reviews_cluster(
        destination_rule("""
            trafficPolicy:
              outlierDetection: {consecutive5xxErrors: 0, consecutiveGatewayErrors: 0}
            """)
    ).outlier_detection

    assert outlier.HasField("enforcing_consecutive_5xx")
    assert outlier.enforcing_consecutive_5xx.value == 0
    assert outlier.HasField("enforcing_consecutive_gateway_failure")
    assert outlier.enforcing_consecutive_gateway_failure.value == 0


def test_outlier_detection_disables_the_panic_threshold_unless_min_health_percent_says() -> None:
    with_outlier = reviews_cluster(destination_rule("trafficPolicy: {outlierDetection: {}}"))

    assert with_outlier.common_lb_config.HasField("healthy_panic_threshold")
    assert with_outlier.common_lb_config.healthy_panic_threshold.value == 0
    assert not reviews_cluster().HasField("outlier_detection")


def test_local_origin_errors_are_counted_apart_when_split() -> None:
    outlier = reviews_cluster(
        destination_rule("""
            trafficPolicy:
              outlierDetection:
                splitExternalLocalOriginErrors: true
                consecutiveLocalOriginFailures: 4
            """)
    ).outlier_detection

    assert outlier.split_external_local_origin_errors is True
    assert outlier.consecutive_local_origin_failure.value == 4
    assert outlier.enforcing_consecutive_local_origin_failure.value == 100
    assert outlier.HasField("enforcing_local_origin_success_rate")
    assert outlier.enforcing_local_origin_success_rate.value == 0


PORT_LEVEL = destination_rule(
    """
trafficPolicy:
  loadBalancer: {simple: ROUND_ROBIN}
  outlierDetection: {consecutive5xxErrors: 3}
  portLevelSettings:
  - port: {number: 9090}
    loadBalancer: {simple: RANDOM}
""",
    name="details",
    host=DETAILS,
)


def test_port_level_settings_override_the_top_level_policy_for_that_port_only() -> None:
    snapshot = mesh(PORT_LEVEL)

    assert snapshot.clusters[cluster_name(8080, "", DETAILS)].lb_policy == (
        cluster_pb2.Cluster.ROUND_ROBIN
    )
    assert snapshot.clusters[cluster_name(9090, "", DETAILS)].lb_policy == (
        cluster_pb2.Cluster.RANDOM
    )
    assert (
        snapshot.clusters[cluster_name(8080, "", DETAILS)].outlier_detection.consecutive_5xx.value
        == 3
    )


def test_port_level_settings_do_not_inherit_the_top_level_policy() -> None:
    snapshot = mesh(PORT_LEVEL)

    assert not snapshot.clusters[cluster_name(9090, "", DETAILS)].HasField("outlier_detection")


def test_a_subset_policy_overrides_the_top_level_one_field_by_field() -> None:
    snapshot = mesh(
        destination_rule("""
            trafficPolicy:
              loadBalancer: {simple: ROUND_ROBIN}
              outlierDetection: {consecutive5xxErrors: 3}
            subsets:
            - {name: v1, labels: {version: v1}}
            - name: v2
              labels: {version: v2}
              trafficPolicy:
                loadBalancer: {simple: RANDOM}
                connectionPool: {tcp: {maxConnections: 7}}
            """)
    )

    v1 = snapshot.clusters[f"outbound|8080|v1|{REVIEWS}"]
    v2 = snapshot.clusters[f"outbound|8080|v2|{REVIEWS}"]
    assert (v1.lb_policy, v2.lb_policy) == (
        cluster_pb2.Cluster.ROUND_ROBIN,
        cluster_pb2.Cluster.RANDOM,
    )
    assert v2.outlier_detection.consecutive_5xx.value == 3
    assert v2.circuit_breakers.thresholds[0].max_connections.value == 7
    assert v1.circuit_breakers.thresholds[0].max_connections.value == MAX_UINT32


# -- locality -------------------------------------------------------------------------------------

OUTLIER = destination_rule("trafficPolicy: {outlierDetection: {consecutive5xxErrors: 5}}")


def test_with_outlier_detection_priorities_fall_away_from_the_clients_locality() -> None:
    snapshot = mesh(OUTLIER, node=EAST)

    assert priorities(snapshot) == {
        "us-east/zone-a/rack-1": 0,  # the client's own subzone
        "us-east/zone-a/rack-2": 1,  # its zone
        "us-east/zone-b": 2,  # its region
        "ap-south/zone-d": 3,  # anywhere else
        "eu-west/zone-c": 3,
    }


def test_failover_orders_the_other_regions() -> None:
    snapshot = mesh(
        destination_rule("""
            trafficPolicy:
              outlierDetection: {consecutive5xxErrors: 5}
              loadBalancer:
                localityLbSetting:
                  failover: [{from: us-east, to: eu-west}]
            """),
        node=EAST,
    )

    assert priorities(snapshot) == {
        "us-east/zone-a/rack-1": 0,
        "us-east/zone-a/rack-2": 1,
        "us-east/zone-b": 2,
        "eu-west/zone-c": 3,
        "ap-south/zone-d": 4,
    }


def test_a_client_elsewhere_sees_its_own_locality_first() -> None:
    snapshot = mesh(OUTLIER, node=Node(namespace="shop", locality=Locality.parse("eu-west/zone-c")))

    assert priorities(snapshot) == {
        "eu-west/zone-c": 0,
        "ap-south/zone-d": 1,
        "us-east/zone-a/rack-1": 1,
        "us-east/zone-a/rack-2": 1,
        "us-east/zone-b": 1,
    }


@pytest.mark.parametrize(
    "documents",
    [
        [],
        [destination_rule("trafficPolicy: {loadBalancer: {simple: ROUND_ROBIN}}")],
        [
            destination_rule("""
                trafficPolicy:
                  outlierDetection: {consecutive5xxErrors: 5}
                  loadBalancer: {localityLbSetting: {enabled: false}}
                """)
        ],
    ],
    ids=["no-rule", "no-outlier-detection", "locality-lb-disabled"],
)
def test_without_outlier_detection_or_with_locality_lb_off_all_localities_share_priority_0(
    documents: list[str],
) -> None:
    snapshot = mesh(*documents, node=EAST)

    assert set(priorities(snapshot).values()) == {0}


DISTRIBUTE = destination_rule("""
trafficPolicy:
  outlierDetection: {consecutive5xxErrors: 5}
  loadBalancer:
    localityLbSetting:
      distribute:
      - from: us-east/zone-a/*
        to:
          "us-east/zone-a/*": 70
          "us-east/zone-b/*": 10
          "eu-west/*": 10
          "ap-south/*": 10
""")


def test_distribute_weights_localities_for_clients_it_is_from() -> None:
    snapshot = mesh(DISTRIBUTE, node=EAST)

    cluster = snapshot.clusters[REVIEWS_CLUSTER]
    assert cluster.common_lb_config.HasField("locality_weighted_lb_config")
    assert locality_shares(snapshot) == {
        "us-east/zone-a/rack-1": 0.35,  # 70 split between the zone's two subzones
        "us-east/zone-a/rack-2": 0.35,
        "us-east/zone-b": 0.1,
        "eu-west/zone-c": 0.1,
        "ap-south/zone-d": 0.1,
    }
    assert set(priorities(snapshot).values()) == {0}


def test_distribute_leaves_clients_it_is_not_from_alone() -> None:
    snapshot = mesh(DISTRIBUTE, node=Node(namespace="shop", locality=Locality.parse("eu-west/z")))

    assert set(locality_shares(snapshot).values()) == {0.2}


def test_distribute_sends_nothing_to_localities_it_does_not_name() -> None:
    snapshot = mesh(
        destination_rule("""
            trafficPolicy:
              loadBalancer:
                localityLbSetting:
                  distribute: [{from: "us-east/*", to: {"us-east/*": 100}}]
            """),
        node=EAST,
    )

    for group in snapshot.endpoints[REVIEWS_CLUSTER].endpoints:
        assert group.load_balancing_weight.value >= 1 or not group.lb_endpoints
    assert addresses(snapshot, REVIEWS_CLUSTER) == {"10.0.0.1", "10.0.0.2", "10.0.0.3"}


def test_distribute_splits_a_wildcards_share_by_endpoint_weight() -> None:
    snapshot = mesh(
        destination_rule("""
            trafficPolicy:
              loadBalancer:
                localityLbSetting:
                  distribute: [{from: "us-east/*", to: {"us-east/*": 80, "eu-west/*": 10,
                                                        "ap-south/*": 10}}]
            """),
        node=EAST,
        base=MESH.replace("locality: us-east/zone-a/rack-2", "locality: us-east/zone-a/rack-1"),
    )

    shares = locality_shares(snapshot)
    # rack-1 now has two endpoints and zone-b one: Istio gives rack-1 twice zone-b's share.
    assert shares["us-east/zone-a/rack-1"] == pytest.approx(2 * shares["us-east/zone-b"], rel=0.05)


# -- libmesh annotations --------------------------------------------------------------------------


def test_success_rate_ejection_is_turned_on_by_its_annotation() -> None:
    cluster = reviews_cluster(
        destination_rule(
            "trafficPolicy: {outlierDetection: {consecutive5xxErrors: 5}}",
            annotations={
                "libmesh.io/outlier-success-rate": "stdevFactor=1.5,minimumHosts=3,requestVolume=20"
            },
        )
    )

    outlier = cluster.outlier_detection
    assert outlier.enforcing_success_rate.value == 100
    assert outlier.success_rate_stdev_factor.value == 1500
    assert outlier.success_rate_minimum_hosts.value == 3
    assert outlier.success_rate_request_volume.value == 20
    assert outlier.consecutive_5xx.value == 5


FAILURE_PERCENTAGE = "threshold=50,minimumHosts=2,requestVolume=10"


def test_failure_percentage_ejection_is_turned_on_by_its_annotation() -> None:
    cluster = reviews_cluster(
        destination_rule(
            "trafficPolicy: {loadBalancer: {simple: ROUND_ROBIN}}",
            annotations={"libmesh.io/outlier-failure-percentage": FAILURE_PERCENTAGE},
        )
    )

    outlier = cluster.outlier_detection
    assert outlier.enforcing_failure_percentage.value == 100
    assert outlier.failure_percentage_threshold.value == 50
    assert outlier.failure_percentage_minimum_hosts.value == 2
    assert outlier.failure_percentage_request_volume.value == 10
    assert outlier.enforcing_success_rate.value == 0


def test_per_host_connection_limits_come_from_their_annotation() -> None:
    cluster = reviews_cluster(
        destination_rule(
            "trafficPolicy: {connectionPool: {tcp: {maxConnections: 100}}}",
            annotations={"libmesh.io/per-host-max-connections": "10"},
        )
    )

    [per_host] = cluster.circuit_breakers.per_host_thresholds
    assert per_host.max_connections.value == 10
    assert cluster.circuit_breakers.thresholds[0].max_connections.value == 100


def test_annotations_apply_to_a_destination_rule_without_a_traffic_policy() -> None:
    cluster = reviews_cluster(
        destination_rule(SUBSETS, annotations={"libmesh.io/per-host-max-connections": "10"})
    )

    [per_host] = cluster.circuit_breakers.per_host_thresholds
    assert per_host.max_connections.value == 10


# -- visibility and names -------------------------------------------------------------------------


def test_a_service_exported_to_its_own_namespace_is_invisible_elsewhere() -> None:
    private = MESH.replace(
        "  hosts: [ratings.shop.svc.cluster.local]",
        '  hosts: [ratings.shop.svc.cluster.local]\n  exportTo: ["."]',
    )

    inside = mesh(base=private, node=SHOP)
    outside = mesh(base=private, node=Node(namespace="default"))

    assert f"{RATINGS}:9080" in inside.listeners
    assert cluster_name(9080, "", RATINGS) in inside.clusters
    assert f"{RATINGS}:9080" not in outside.listeners
    assert not [n for n in outside.clusters if n.endswith(RATINGS)]
    assert REVIEWS_LISTENER in outside.listeners


def test_a_virtual_service_exported_to_its_own_namespace_routes_only_that_namespace() -> None:
    document = virtual_service("- route: [{destination: {host: ratings}}]", extra='exportTo: ["."]')

    inside = only_route(mesh(document, node=SHOP))
    outside = only_route(mesh(document, node=Node(namespace="default")))

    assert inside.route.cluster == cluster_name(9080, "", RATINGS)
    assert (outside.name, outside.route.cluster) == ("default", REVIEWS_CLUSTER)


def test_a_destination_rule_exported_to_its_own_namespace_applies_only_there() -> None:
    document = destination_rule('exportTo: ["."]\ntrafficPolicy: {loadBalancer: {simple: RANDOM}}')

    assert reviews_cluster(document, node=SHOP).lb_policy == cluster_pb2.Cluster.RANDOM
    assert reviews_cluster(document, node=Node(namespace="default")).lb_policy == (
        cluster_pb2.Cluster.LEAST_REQUEST
    )


def test_the_clients_own_destination_rule_wins_over_the_services() -> None:
    documents = [
        destination_rule("trafficPolicy: {loadBalancer: {simple: ROUND_ROBIN}}"),
        destination_rule(
            "trafficPolicy: {loadBalancer: {simple: RANDOM}}",
            namespace="default",
            name="reviews-from-default",
        ),
    ]

    assert reviews_cluster(*documents, node=Node(namespace="default")).lb_policy == (
        cluster_pb2.Cluster.RANDOM
    )
    assert reviews_cluster(*documents, node=SHOP).lb_policy == cluster_pb2.Cluster.ROUND_ROBIN


def test_a_destination_rule_from_an_unrelated_namespace_does_not_apply() -> None:
    document = destination_rule(
        "trafficPolicy: {loadBalancer: {simple: RANDOM}}", namespace="team-b"
    )

    assert reviews_cluster(document, node=Node(namespace="default")).lb_policy == (
        cluster_pb2.Cluster.LEAST_REQUEST
    )


def test_short_host_names_resolve_in_the_namespace_of_the_resource_that_writes_them() -> None:
    snapshot = mesh(
        """
    apiVersion: networking.istio.io/v1
    kind: VirtualService
    metadata: {name: reviews, namespace: shop}
    spec:
      hosts: [reviews]
      http:
      - route: [{destination: {host: ratings}}]
    ---
    apiVersion: networking.istio.io/v1
    kind: DestinationRule
    metadata: {name: ratings, namespace: shop}
    spec:
      host: ratings
      trafficPolicy: {loadBalancer: {simple: RANDOM}}
    """,
        node=Node(namespace="default"),
    )

    assert only_route(snapshot).route.cluster == cluster_name(9080, "", RATINGS)
    assert snapshot.clusters[cluster_name(9080, "", RATINGS)].lb_policy == (
        cluster_pb2.Cluster.RANDOM
    )


def test_a_short_host_in_another_namespace_names_another_service() -> None:
    snapshot = mesh(
        """
    apiVersion: networking.istio.io/v1
    kind: VirtualService
    metadata: {name: reviews, namespace: default}
    spec:
      hosts: [reviews]
      http:
      - route: [{destination: {host: ratings}}]
    """,
        node=Node(namespace="default"),
    )

    assert only_route(snapshot).name == "default"
    assert only_route(snapshot).route.cluster == REVIEWS_CLUSTER


EXTERNAL = """
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: payments, namespace: shop}
spec:
  hosts: [api.payments.example]
  location: MESH_EXTERNAL
  resolution: DNS
  ports:
  - {number: 443, name: tls, protocol: TLS}
  - {number: 5432, name: postgres, protocol: TCP}
  - {number: 80, name: http, protocol: HTTP}
"""


def test_tls_and_tcp_ports_get_clusters_but_no_http_listener() -> None:
    snapshot = mesh(EXTERNAL)

    assert {n for n in snapshot.clusters if n.endswith("api.payments.example")} == {
        "outbound|443||api.payments.example",
        "outbound|5432||api.payments.example",
        "outbound|80||api.payments.example",
    }
    assert [n for n in snapshot.listeners if n.startswith("api.payments.example")] == [
        "api.payments.example:80"
    ]


def test_a_dns_service_resolves_its_own_host_name() -> None:
    cluster = mesh(EXTERNAL).clusters["outbound|443||api.payments.example"]

    assert cluster.type == cluster_pb2.Cluster.STRICT_DNS
    [group] = cluster.load_assignment.endpoints
    [endpoint] = group.lb_endpoints
    address = endpoint.endpoint.address.socket_address
    assert (address.address, address.port_value) == ("api.payments.example", 443)


def test_a_service_resolved_by_the_caller_is_an_original_destination_cluster() -> None:
    cluster = mesh(EXTERNAL.replace("resolution: DNS", "resolution: NONE")).clusters[
        "outbound|80||api.payments.example"
    ]

    assert cluster.type == cluster_pb2.Cluster.ORIGINAL_DST
    assert cluster.lb_policy == cluster_pb2.Cluster.CLUSTER_PROVIDED


# -- the snapshot version -------------------------------------------------------------------------


def test_the_version_is_stable_for_the_same_input_and_changes_with_the_config() -> None:
    canary = virtual_service("""
        - route:
          - {destination: {host: reviews, subset: v1}, weight: 90}
          - {destination: {host: reviews, subset: v2}, weight: 10}
        """)
    rules = destination_rule(SUBSETS)

    first = mesh(rules, canary)
    again = mesh(rules, canary)
    shifted = mesh(rules, canary.replace("weight: 90", "weight: 50").replace("10}", "50}"))

    assert first.version == again.version
    assert shifted.version != first.version
    assert mesh().version != first.version


def test_the_version_follows_what_the_client_receives() -> None:
    plain = mesh(SOURCE_ROUTED, node=SHOP)
    same = mesh(SOURCE_ROUTED, node=Node(namespace="shop", id="another-client"))
    productpage = mesh(
        SOURCE_ROUTED, node=Node(namespace="shop", labels=FrozenMap({"app": "productpage"}))
    )

    assert same.version == plain.version
    assert productpage.version != plain.version
