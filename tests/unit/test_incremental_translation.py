"""Incremental translation gives exactly what a fresh translation gives.

A :class:`TranslationCache` lets ``translate`` reuse what it built for a service port when
nothing that piece read has changed. The property: after any sequence of edits (documents
added, removed or replaced; resources that stay are the same objects, as the loader keeps
them), the cached translation equals a translation from scratch, resource for resource and
version for version; and an unchanged mesh is not translated again at all.
"""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from libmesh.config import ConfigSet, Registry, Resource, load, load_text
from libmesh.xds import Locality, Node, TranslationCache, translate

CORPUS = Path(__file__).parents[2].parent / "shared" / "istio-corpus" / "valid"

POOL_TEXT = """
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: reviews, namespace: shop}
spec:
  hosts: [reviews.shop.svc.cluster.local]
  location: MESH_INTERNAL
  resolution: STATIC
  ports: [{number: 8080, name: http, protocol: HTTP}, {number: 9090, name: grpc, protocol: GRPC}]
  workloadSelector: {labels: {app: reviews}}
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: ratings, namespace: shop}
spec:
  hosts: [ratings.shop.svc.cluster.local]
  location: MESH_INTERNAL
  resolution: STATIC
  ports: [{number: 8080, name: http, protocol: HTTP}]
  endpoints:
  - {address: 10.0.9.1, labels: {version: v1}}
  - {address: 10.0.9.2, labels: {version: v2}}
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {name: reviews-1, namespace: shop}
spec: {address: 10.0.0.1, labels: {app: reviews, version: v1}, locality: us-east/a}
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {name: reviews-2, namespace: shop}
spec: {address: 10.0.0.2, labels: {app: reviews, version: v2}, locality: us-west/b}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: reviews, namespace: shop}
spec:
  host: reviews
  trafficPolicy:
    loadBalancer: {consistentHash: {httpHeaderName: x-user}}
    outlierDetection: {consecutive5xxErrors: 3}
  subsets: [{name: v1, labels: {version: v1}}, {name: v2, labels: {version: v2}}]
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: everything, namespace: shop}
spec:
  host: "*.shop.svc.cluster.local"
  trafficPolicy: {connectionPool: {http: {http1MaxPendingRequests: 7}}}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: ratings, namespace: shop}
spec:
  host: ratings
  subsets: [{name: v1, labels: {version: v1}}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: reviews, namespace: shop}
spec:
  hosts: [reviews]
  http:
  - route:
    - {destination: {host: reviews, subset: v1}, weight: 80}
    - {destination: {host: reviews, subset: v2}, weight: 20}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: reviews-canary, namespace: shop}
spec:
  hosts: [reviews]
  http:
  - match: [{headers: {x-canary: {exact: "yes"}}}]
    route: [{destination: {host: reviews, subset: v2}}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: ratings, namespace: shop}
spec:
  hosts: [ratings]
  http:
  - match: [{sourceLabels: {app: frontend}}]
    route: [{destination: {host: reviews}}]
  - delegate: {name: ratings-routes, namespace: shop}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: ratings-routes, namespace: shop}
spec:
  http:
  - retries: {attempts: 5}
    route: [{destination: {host: ratings, subset: v1}}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: ratings-routes, namespace: shop}
spec:
  http:
  - timeout: 2s
    route: [{destination: {host: ratings}}]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: reviews, namespace: shop}
spec:
  hosts: [reviews.shop.svc.cluster.local]
  location: MESH_INTERNAL
  resolution: STATIC
  ports: [{number: 9090, name: grpc, protocol: GRPC}, {number: 8080, name: http, protocol: HTTP2}]
  workloadSelector: {labels: {app: reviews}}
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: ratings, namespace: shop}
spec:
  hosts: [ratings.shop.svc.cluster.local]
  location: MESH_INTERNAL
  resolution: DNS
  ports: [{number: 8080, name: http, protocol: HTTP}]
  endpoints:
  - {address: 10.0.9.1, labels: {version: v1}}
  - {address: 10.0.9.2, labels: {version: v2}}
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: db, namespace: shop}
spec:
  hosts: [db.shop.svc.cluster.local]
  location: MESH_INTERNAL
  resolution: STATIC
  ports: [{number: 5432, name: tcp, protocol: TCP}]
  endpoints: [{address: 10.0.7.1}]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: db, namespace: shop}
spec:
  hosts: [db.shop.svc.cluster.local]
  location: MESH_INTERNAL
  resolution: DNS
  ports: [{number: 5432, name: tcp, protocol: TCP}]
  endpoints: [{address: 10.0.7.1}]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: details, namespace: shop}
spec:
  hosts: [details.shop.svc.cluster.local]
  location: MESH_INTERNAL
  resolution: STATIC
  ports: [{number: 80, name: http, protocol: HTTP}]
  endpoints: [{address: 10.0.8.1}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: details, namespace: shop}
spec:
  hosts: [details]
  http:
  - route: [{destination: {host: reviews}}]
"""


def _pool() -> list[Resource[Any]]:
    """Each document parsed once: a document that stays is the same object, as with the
    loader, which keeps the resources of files that did not change."""
    resources = []
    for document in textwrap.dedent(POOL_TEXT).split("\n---\n"):
        result = load_text(document)
        assert result.ok, [e.format() for e in result.errors]
        resources.extend(result.config.resources)
    return resources


POOL = _pool()
NODES = [
    Node(namespace="shop", labels={"app": "frontend"}),  # type: ignore[arg-type]
    Node(namespace="shop", locality=Locality.parse("us-east/a")),
    Node(namespace="default", flavor="envoy"),
    Node(namespace="shop", flavor="grpc"),
]


def _config(chosen: list[int]) -> ConfigSet:
    seen: set[object] = set()
    resources = []
    for index in chosen:  # a later duplicate of a name is dropped, as the loader does
        resource = POOL[index]
        if resource.ref not in seen:
            seen.add(resource.ref)
            resources.append(resource)
    return ConfigSet(tuple(resources))


def _translate_both(config: ConfigSet, node: Node, cache: TranslationCache) -> None:
    registry = Registry.build(config.resources)
    incremental = translate(config, registry, node, cache=cache)
    fresh = translate(config, Registry.build(config.resources), node)
    assert incremental.version == fresh.version
    assert incremental.resources == fresh.resources


@settings(max_examples=100, deadline=None, derandomize=True)
@given(
    node=st.sampled_from(NODES),
    steps=st.lists(
        st.lists(st.integers(0, len(POOL) - 1), max_size=len(POOL)), min_size=1, max_size=6
    ),
)
def test_any_sequence_of_edits_translates_as_from_scratch(
    node: Node, steps: list[list[int]]
) -> None:
    cache = TranslationCache()
    for chosen in steps:
        _translate_both(_config(chosen), node, cache)


REVIEWS, RATINGS, RATINGS_ROUTES_2S, REVIEWS_GRPC_FIRST, RATINGS_DNS = 0, 1, 11, 12, 13
DB, DB_DNS = 14, 15
VARIANTS = (RATINGS_ROUTES_2S, REVIEWS_GRPC_FIRST, RATINGS_DNS, DB_DNS)
BASE = [i for i in range(len(POOL)) if i not in VARIANTS]


def test_an_unchanged_mesh_is_not_translated_again_and_an_edit_only_where_it_reads() -> None:
    everything = BASE
    config = _config(everything)
    cache = TranslationCache()
    node = Node(namespace="shop")
    first = translate(config, Registry.build(config.resources), node, cache=cache)
    assert cache.reused == 0

    again = translate(config, Registry.build(config.resources), node, cache=cache)
    assert cache.built == 0
    assert again.version == first.version

    # Swap the delegate ratings reads: only ratings' port is translated again.
    edited = _config([i if i != RATINGS_ROUTES_2S - 1 else RATINGS_ROUTES_2S for i in everything])
    _translate_both(edited, node, cache)
    assert cache.built == 1
    assert cache.reused == 4  # reviews' two ports, db, details


def test_a_route_to_another_service_follows_that_services_ports() -> None:
    # details routes to reviews without a port: the first port of reviews decides.
    node = Node(namespace="shop")
    cache = TranslationCache()
    _translate_both(_config(BASE), node, cache)

    swapped = _config([REVIEWS_GRPC_FIRST if i == REVIEWS else i for i in BASE])
    _translate_both(swapped, node, cache)


def test_a_service_that_changes_alone_is_translated_again() -> None:
    node = Node(namespace="shop")
    cache = TranslationCache()
    _translate_both(_config(BASE), node, cache)

    _translate_both(_config([RATINGS_DNS if i == RATINGS else i for i in BASE]), node, cache)
    # a TCP service has no routes: nothing it reads but itself changes
    _translate_both(_config([DB_DNS if i == DB else i for i in BASE]), node, cache)


def test_a_cache_used_for_another_node_starts_over() -> None:
    config = _config(list(range(len(POOL))))
    cache = TranslationCache()
    translate(config, Registry.build(config.resources), Node(namespace="shop"), cache=cache)

    _translate_both(config, Node(namespace="other"), cache)
    assert cache.reused == 0


def test_every_corpus_file_translates_the_same_through_a_warm_cache() -> None:
    for path in sorted(CORPUS.glob("*.yaml")):
        result = load(path)
        cache = TranslationCache()
        registry = Registry.build(result.config, result.services)
        first = translate(result.config, registry, Node(), cache=cache)
        second = translate(result.config, registry, Node(), cache=cache)
        assert (second.version, second.resources) == (first.version, first.resources), path
        assert cache.built == 0, path
