"""Analysis of a small mesh declared without Kubernetes: ServiceEntries, WorkloadEntries, rules
and policies. Each test breaks one thing and checks the finding a user would read."""

from __future__ import annotations

import textwrap

from libmesh.config import Finding, analyze, load_text

REGISTRY = """
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: reviews, namespace: shop}
spec:
  hosts: [reviews.shop.svc.cluster.local]
  location: MESH_INTERNAL
  resolution: STATIC
  ports: [{number: 8080, name: http, protocol: HTTP}]
  workloadSelector: {labels: {app: reviews}}
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {name: reviews-v1, namespace: shop}
spec:
  address: 10.0.0.1
  labels: {app: reviews, version: v1}
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {name: reviews-v2, namespace: shop}
spec:
  address: 10.0.0.2
  labels: {app: reviews, version: v2}
"""


def findings_for(text: str, analyzer: str) -> list[Finding]:
    result = load_text(textwrap.dedent(REGISTRY) + "---\n" + textwrap.dedent(text), "mesh.yaml")
    assert result.errors == (), [e.format() for e in result.errors]
    return analyze(result, only=[analyzer])


def line_of(text: str, needle: str) -> int:
    full = textwrap.dedent(REGISTRY) + "---\n" + textwrap.dedent(text)
    return next(i for i, line in enumerate(full.splitlines(), 1) if needle in line)


def test_a_clean_mesh_has_no_findings() -> None:
    mesh = """
    apiVersion: networking.istio.io/v1
    kind: DestinationRule
    metadata: {name: reviews, namespace: shop}
    spec:
      host: reviews
      subsets:
      - {name: v1, labels: {version: v1}}
      - {name: v2, labels: {version: v2}}
    ---
    apiVersion: networking.istio.io/v1
    kind: VirtualService
    metadata: {name: reviews, namespace: shop}
    spec:
      hosts: [reviews]
      http:
      - route:
        - {destination: {host: reviews, subset: v1}, weight: 75}
        - {destination: {host: reviews, subset: v2}, weight: 25}
    """
    result = load_text(textwrap.dedent(REGISTRY) + "---\n" + textwrap.dedent(mesh))

    assert analyze(result) == []


def test_a_subset_whose_labels_select_no_workload_is_an_error() -> None:
    rule = """
    apiVersion: networking.istio.io/v1
    kind: DestinationRule
    metadata: {name: reviews, namespace: shop}
    spec:
      host: reviews
      subsets:
      - name: v1
        labels: {version: v1}
      - name: v3
        labels: {version: v3}
    """

    [finding] = findings_for(rule, "destinationrule.hosts-and-subsets")

    assert finding.code.id == "IST0173"
    assert finding.is_error
    assert finding.path == "spec.subsets[1].labels"
    assert finding.location.line == line_of(rule, "labels: {version: v3}")
    assert "'v3' (app=reviews, version=v3) selects none of the 2 workloads" in finding.message
    assert {str(r) for r in finding.related} == {
        "WorkloadEntry shop/reviews-v1",
        "WorkloadEntry shop/reviews-v2",
    }


def test_a_destination_rule_for_an_unknown_host_is_reported() -> None:
    rule = """
    apiVersion: networking.istio.io/v1
    kind: DestinationRule
    metadata: {name: ratings, namespace: shop}
    spec:
      host: ratings
    """

    [finding] = findings_for(rule, "destinationrule.hosts-and-subsets")

    assert finding.code.id == "IST0174"
    assert "host ratings (ratings.shop.svc.cluster.local) matches no service" in finding.message


def test_two_destination_rules_for_one_host_that_both_set_a_traffic_policy_conflict() -> None:
    rules = """
    apiVersion: networking.istio.io/v1
    kind: DestinationRule
    metadata: {name: reviews, namespace: shop}
    spec:
      host: reviews
      trafficPolicy: {loadBalancer: {simple: ROUND_ROBIN}}
      subsets: [{name: v1, labels: {version: v1}}]
    ---
    apiVersion: networking.istio.io/v1
    kind: DestinationRule
    metadata: {name: reviews-tuning, namespace: shop}
    spec:
      host: reviews.shop.svc.cluster.local
      trafficPolicy: {loadBalancer: {simple: LEAST_REQUEST}}
      subsets: [{name: v1, labels: {version: v1}}]
    """

    [finding] = findings_for(rules, "destinationrule.merged")

    assert finding.code.id == "LM0101"
    assert finding.is_error
    assert str(finding.resource) == "DestinationRule shop/reviews-tuning"
    assert [str(r) for r in finding.related] == ["DestinationRule shop/reviews"]
    assert "its trafficPolicy is ignored and its subsets v1 are ignored" in finding.message


def test_two_destination_rules_that_only_add_subsets_are_merged_with_a_warning() -> None:
    rules = """
    apiVersion: networking.istio.io/v1
    kind: DestinationRule
    metadata: {name: reviews-v1, namespace: shop}
    spec:
      host: reviews
      subsets: [{name: v1, labels: {version: v1}}]
    ---
    apiVersion: networking.istio.io/v1
    kind: DestinationRule
    metadata: {name: reviews-v2, namespace: shop}
    spec:
      host: reviews
      subsets: [{name: v2, labels: {version: v2}}]
    """

    [finding] = findings_for(rules, "destinationrule.merged")

    assert finding.code.id == "LM0102"
    assert not finding.is_error
    assert "merged" in finding.message


def test_plaintext_to_a_workload_that_requires_mtls_is_an_error() -> None:
    config = """
    apiVersion: security.istio.io/v1
    kind: PeerAuthentication
    metadata: {name: default, namespace: shop}
    spec:
      mtls: {mode: STRICT}
    ---
    apiVersion: networking.istio.io/v1
    kind: DestinationRule
    metadata: {name: reviews, namespace: shop}
    spec:
      host: reviews
      trafficPolicy:
        tls: {mode: DISABLE}
    """

    [finding] = findings_for(config, "destinationrule.tls-vs-peerauthentication")

    assert finding.code.id == "IST0113"
    assert finding.path == "spec.trafficPolicy.tls.mode"
    assert finding.location.line == line_of(config, "tls: {mode: DISABLE}")
    assert [str(r) for r in finding.related] == ["PeerAuthentication shop/default"]
    assert "requires mTLS (STRICT)" in finding.message


def test_a_permissive_port_exception_lets_plaintext_through() -> None:
    config = """
    apiVersion: security.istio.io/v1
    kind: PeerAuthentication
    metadata: {name: default, namespace: shop}
    spec:
      mtls: {mode: STRICT}
    ---
    apiVersion: security.istio.io/v1
    kind: PeerAuthentication
    metadata: {name: reviews, namespace: shop}
    spec:
      selector: {matchLabels: {app: reviews}}
      portLevelMtls:
        8080: {mode: PERMISSIVE}
    ---
    apiVersion: networking.istio.io/v1
    kind: DestinationRule
    metadata: {name: reviews, namespace: shop}
    spec:
      host: reviews
      trafficPolicy:
        tls: {mode: DISABLE}
    """

    assert findings_for(config, "destinationrule.tls-vs-peerauthentication") == []


def test_policy_selectors_that_match_no_declared_workload_are_reported() -> None:
    config = """
    apiVersion: security.istio.io/v1
    kind: AuthorizationPolicy
    metadata: {name: ratings-only, namespace: shop}
    spec:
      selector: {matchLabels: {app: ratings}}
      rules: [{}]
    ---
    apiVersion: security.istio.io/v1
    kind: RequestAuthentication
    metadata: {name: jwt, namespace: shop}
    spec:
      selector: {matchLabels: {app: reviews, version: v1}}
      jwtRules: [{issuer: "https://issuer.example.com"}]
    """

    [finding] = findings_for(config, "policy.selectors")

    assert finding.code.id == "IST0127"
    assert str(finding.resource) == "AuthorizationPolicy shop/ratings-only"
    assert finding.path == "spec.selector.matchLabels"
    assert "no workload in namespace shop has the labels app=ratings" in finding.message


def test_conflicting_virtual_services_name_each_other() -> None:
    config = """
    apiVersion: networking.istio.io/v1
    kind: VirtualService
    metadata: {name: reviews, namespace: shop}
    spec:
      hosts: [reviews]
      http: [{route: [{destination: {host: reviews}}]}]
    ---
    apiVersion: networking.istio.io/v1
    kind: VirtualService
    metadata: {name: reviews-canary, namespace: shop}
    spec:
      hosts: [reviews.shop.svc.cluster.local]
      http: [{route: [{destination: {host: reviews}}]}]
    """

    findings = findings_for(config, "virtualservice.conflicting-hosts")

    assert [(str(f.resource), [str(r) for r in f.related]) for f in findings] == [
        ("VirtualService shop/reviews", ["VirtualService shop/reviews-canary"]),
        ("VirtualService shop/reviews-canary", ["VirtualService shop/reviews"]),
    ]
    assert all(f.path == "metadata.name" for f in findings)


def test_a_destination_port_the_service_does_not_have_is_reported() -> None:
    config = """
    apiVersion: networking.istio.io/v1
    kind: VirtualService
    metadata: {name: reviews, namespace: shop}
    spec:
      hosts: [reviews]
      http: [{route: [{destination: {host: reviews, port: {number: 9090}}}]}]
    """

    [finding] = findings_for(config, "virtualservice.destination-hosts")

    assert finding.code.id == "IST0101"
    assert finding.path == "spec.http[0].route[0].destination.port"
    assert "'reviews:9090' not found: the service's ports are 8080" in finding.message
    assert [str(r) for r in finding.related] == ["ServiceEntry shop/reviews"]
