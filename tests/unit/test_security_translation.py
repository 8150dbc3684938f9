"""mTLS and PeerAuthentication as xDS: DestinationRule TLS modes and auto mTLS on clusters,
the workload's ``virtualInbound`` listener, and what the engine reads back from them."""

from __future__ import annotations

import textwrap
from typing import Any

import pytest

from libmesh.config import FrozenMap, Registry, load_text
from libmesh.policy import Engine
from libmesh.policy._inbound import InboundPolicy, MtlsMode
from libmesh.policy._upstream_tls import TlsKind, UpstreamTls, transport_sockets
from libmesh.xds import Node, Snapshot, translate
from libmesh.xds._inbound import INBOUND_LISTENER

PAY = "pay.shop.svc.cluster.local"
CLUSTER = f"outbound|8080||{PAY}"
SERVICE = """
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: pay, namespace: shop}
spec:
  hosts: [pay.shop.svc.cluster.local]
  location: MESH_INTERNAL
  resolution: STATIC
  ports: [{number: 8080, name: http, protocol: HTTP}]
  subjectAltNames: [spiffe://cluster.local/ns/shop/sa/pay-legacy]
  endpoints:
  - {address: 10.0.0.1, serviceAccount: pay, labels: {security.istio.io/tlsMode: istio}}
  - {address: 10.0.0.2}
"""
NODE = Node(namespace="shop", labels=FrozenMap({"app": "pay"}))


def snapshot(*documents: str, node: Node = NODE) -> Snapshot:
    text = "\n---\n".join(textwrap.dedent(d).strip() for d in (SERVICE, *documents))
    result = load_text(text, "mesh.yaml")
    assert result.errors == (), [e.format() for e in result.errors]
    return translate(result.config, Registry.build(result.config, result.services), node)


def endpoint_tls(snap: Snapshot) -> dict[str, UpstreamTls | None]:
    engine = Engine(snap)
    cluster = engine.cluster(CLUSTER)
    assert cluster is not None
    return {h.address: cluster.tls.for_endpoint(h.tls_match) for h in cluster.hosts}


SANS = frozenset(
    {"spiffe://cluster.local/ns/shop/sa/pay", "spiffe://cluster.local/ns/shop/sa/pay-legacy"}
)


def test_auto_mtls_for_endpoints_that_terminate_it_plaintext_for_the_others() -> None:
    tls = endpoint_tls(snapshot())
    secured = tls["10.0.0.1"]
    assert secured is not None
    assert secured.kind is TlsKind.MESH
    assert secured.subject_alt_names == SANS  # service accounts and subjectAltNames
    assert secured.sni == f"outbound_.8080_._.{PAY}"
    assert tls["10.0.0.2"] is None


def test_grpc_gets_no_auto_mtls_but_istio_mutual_with_certificate_providers() -> None:
    grpc = Node(namespace="shop", flavor="grpc")
    assert not snapshot(node=grpc).clusters[CLUSTER].transport_socket_matches
    rule = """
    apiVersion: networking.istio.io/v1
    kind: DestinationRule
    metadata: {name: pay, namespace: shop}
    spec: {host: pay.shop.svc.cluster.local, trafficPolicy: {tls: {mode: ISTIO_MUTUAL}}}
    """
    cluster = snapshot(rule, node=grpc).clusters[CLUSTER]
    tls = transport_sockets(cluster).for_endpoint({})
    assert tls is not None
    assert tls.kind is TlsKind.MESH
    assert tls.subject_alt_names == SANS


@pytest.mark.parametrize(
    ("tls", "expected"),
    [
        ("{mode: DISABLE}", {"10.0.0.1": None, "10.0.0.2": None}),
        (
            "{mode: ISTIO_MUTUAL, subjectAltNames: [spiffe://cluster.local/ns/shop/sa/x]}",
            {
                "10.0.0.1": UpstreamTls(TlsKind.MESH, f"outbound_.8080_._.{PAY}",
                                        frozenset({"spiffe://cluster.local/ns/shop/sa/x"}),
                                        alpn=("http/1.1",)),
                "10.0.0.2": UpstreamTls(TlsKind.MESH, f"outbound_.8080_._.{PAY}",
                                        frozenset({"spiffe://cluster.local/ns/shop/sa/x"}),
                                        alpn=("http/1.1",)),
            },
        ),
        (
            "{mode: SIMPLE, caCertificates: /etc/ca.pem, sni: pay.example.com}",
            dict.fromkeys(("10.0.0.1", "10.0.0.2"),
                          UpstreamTls(TlsKind.ORIGINATE, "pay.example.com", ca_file="/etc/ca.pem",
                                      alpn=("http/1.1",))),
        ),
        (
            "{mode: MUTUAL, clientCertificate: /c.pem, privateKey: /k.pem}",
            dict.fromkeys(("10.0.0.1", "10.0.0.2"),
                          UpstreamTls(TlsKind.ORIGINATE, cert_file="/c.pem", key_file="/k.pem",
                                      alpn=("http/1.1",))),
        ),
    ],
)  # fmt: skip
def test_destination_rule_tls_modes(tls: str, expected: dict[str, UpstreamTls | None]) -> None:
    rule = f"""
    apiVersion: networking.istio.io/v1
    kind: DestinationRule
    metadata: {{name: pay, namespace: shop}}
    spec: {{host: pay.shop.svc.cluster.local, trafficPolicy: {{tls: {tls}}}}}
    """
    assert endpoint_tls(snapshot(rule)) == expected


def peer_authentication(name: str, namespace: str, spec: str) -> str:
    return f"""
    apiVersion: security.istio.io/v1
    kind: PeerAuthentication
    metadata: {{name: {name}, namespace: {namespace}}}
    spec: {spec}
    """


def inbound(*documents: str, node: Node = NODE) -> InboundPolicy:
    return InboundPolicy.of(snapshot(*documents, node=node).listeners[INBOUND_LISTENER])


def test_peer_authentication_is_permissive_by_default() -> None:
    policy = inbound()
    assert policy.mode(8080) is MtlsMode.PERMISSIVE
    assert policy.accepts(8080, tls=False)
    assert policy.accepts(8080, tls=True)


def test_workload_over_namespace_over_mesh_and_unset_inherits() -> None:
    mesh_wide = peer_authentication("default", "istio-system", "{mtls: {mode: STRICT}}")
    namespace = peer_authentication("default", "shop", "{mtls: {mode: UNSET}}")
    assert inbound(mesh_wide, namespace).mode(80) is MtlsMode.STRICT
    workload = peer_authentication(
        "pay", "shop",
        "{selector: {matchLabels: {app: pay}}, mtls: {mode: DISABLE},"
        " portLevelMtls: {'9000': {mode: STRICT}, '9001': {mode: UNSET}}}",
    )  # fmt: skip
    policy = inbound(mesh_wide, namespace, workload)
    assert policy.mode(80) is MtlsMode.DISABLE
    assert policy.mode(9000) is MtlsMode.STRICT
    assert policy.mode(9001) is MtlsMode.DISABLE
    assert not policy.accepts(80, tls=True)
    assert not policy.accepts(9000, tls=False)
    # another workload of the namespace: the selector does not match it
    other = Node(namespace="shop", labels=FrozenMap({"app": "web"}))
    assert inbound(mesh_wide, namespace, workload, node=other).mode(80) is MtlsMode.STRICT
    # a namespace's policy does not reach other namespaces
    elsewhere = Node(namespace="billing")
    strict_shop = peer_authentication("default", "shop", "{mtls: {mode: STRICT}}")
    assert inbound(strict_shop, node=elsewhere).mode(80) is MtlsMode.PERMISSIVE


def test_authorization_policies_reach_the_inbound_listener() -> None:
    policy = """
    apiVersion: security.istio.io/v1
    kind: AuthorizationPolicy
    metadata: {name: only-web, namespace: shop}
    spec:
      selector: {matchLabels: {app: pay}}
      rules: [{from: [{source: {principals: [cluster.local/ns/shop/sa/web]}}]}]
    """
    from libmesh.policy._authz import AuthzRequest

    authorizer = inbound(policy).authorizer(8080)
    web = AuthzRequest(principal="spiffe://cluster.local/ns/shop/sa/web")
    assert authorizer.check(web).allowed
    assert not authorizer.check(AuthzRequest(principal="spiffe://cluster.local/ns/x/sa/y")).allowed
    assert inbound().authorizer(8080).empty


def test_request_authentication_becomes_jwt_authn_with_istios_defaults() -> None:
    rule = """
    apiVersion: security.istio.io/v1
    kind: RequestAuthentication
    metadata: {name: jwt, namespace: shop}
    spec:
      selector: {matchLabels: {app: pay}}
      jwtRules:
      - issuer: https://issuer.example
        jwks: '{"keys": [{"kty": "EC", "crv": "P-256", "kid": "k",
                "x": "f83OJ3D2xF1Bg8vub9tLe1gHMzV76e8Tus9uPHvRVEU",
                "y": "x_FEzRu9m36HLN_tue659LNpXW6pCyStikYjKIWI5a0"}]}'
      - issuer: https://other.example
        jwksUri: https://other.example/keys
        fromHeaders: [{name: x-token}]
        forwardOriginalToken: true
    """
    jwt = inbound(rule).jwt(8080)
    assert jwt is not None
    assert jwt.allow_missing  # a request without a token is authorization's business
    inline, remote = jwt.rules
    assert inline.issuer == "https://issuer.example"
    assert inline.jwks is not None
    assert inline.from_headers == (("authorization", "Bearer "),)
    assert inline.from_params == ("access_token",)
    assert not inline.forward
    assert remote.jwks_uri == "https://other.example/keys"
    assert remote.from_headers == (("x-token", ""),)
    assert remote.from_params == ()
    assert remote.forward
    other = Node(namespace="shop", labels=FrozenMap({"app": "web"}))
    assert inbound(rule, node=other).jwt(8080) is None


def test_the_inbound_verdicts_every_server_applies() -> None:
    from libmesh.policy._inbound import (
        Arrival,
        Authenticated,
        authorize,
        refuse_plaintext,
    )

    strict = inbound(peer_authentication("default", "shop", "{mtls: {mode: STRICT}}"))
    plaintext = Arrival(method="GET", path="/", host="pay", port=8080)
    refusal = refuse_plaintext(strict, plaintext)
    assert refusal is not None
    assert (refusal.status, refusal.grpc_status) == (403, "UNAUTHENTICATED")
    assert refusal.message == "mutual TLS required: port 8080 is STRICT (PeerAuthentication)"
    web = Arrival(method="GET", path="/", principal="spiffe://cluster.local/ns/shop/sa/web")
    assert refuse_plaintext(strict, web) is None

    refusal, decision = authorize(strict, plaintext, Authenticated(error="Jwt is expired"))
    assert refusal is not None
    assert (refusal.status, refusal.message) == (401, "Jwt is expired")
    assert refusal.headers == (
        ("www-authenticate", 'Bearer realm="http://pay/", error="invalid_token"'),
    )
    policy = """
    apiVersion: security.istio.io/v1
    kind: AuthorizationPolicy
    metadata: {name: only-web, namespace: shop}
    spec:
      rules: [{from: [{source: {principals: [cluster.local/ns/shop/sa/web]}}]}]
    """
    only_web = inbound(policy)
    refusal, decision = authorize(only_web, plaintext, Authenticated())
    assert refusal is not None
    assert (refusal.status, refusal.grpc_status, refusal.message) == (
        403, "PERMISSION_DENIED", "RBAC: access denied",
    )  # fmt: skip
    assert decision is not None
    assert not decision.allowed
    assert authorize(only_web, web, Authenticated())[0] is None


def _envoy_inbound(*documents: str, sds: bool = True) -> tuple[Any, Any]:
    node = Node(
        namespace="shop",
        labels=FrozenMap({"app": "pay"}),
        flavor="envoy",
        http_proxy_address="",
        inbound=(("127.0.0.1:15006", "127.0.0.1:8080"),),
        sds=sds,
    )
    snap = snapshot(*documents, node=node)
    assert "http_proxy" not in snap.listeners  # LIBMESH_HTTP_PROXY_ADDRESS: off
    return snap.listeners.get("inbound_127.0.0.1_15006"), snap.clusters.get("inbound|15006||")


def test_an_envoys_inbound_port_applies_the_workloads_policies_in_front_of_the_program() -> None:
    from envoy.extensions.filters.network.http_connection_manager.v3 import (
        http_connection_manager_pb2 as hcm,
    )

    strict = peer_authentication(
        "pay", "shop", "{selector: {matchLabels: {app: pay}}, mtls: {mode: STRICT}}"
    )
    only_web = """
    apiVersion: security.istio.io/v1
    kind: AuthorizationPolicy
    metadata: {name: only-web, namespace: shop}
    spec:
      selector: {matchLabels: {app: pay}}
      rules: [{from: [{source: {principals: [cluster.local/ns/shop/sa/web]}}]}]
    """
    listener, cluster = _envoy_inbound(strict, only_web)
    (chain,) = listener.filter_chains
    manager = hcm.HttpConnectionManager()
    chain.filters[0].typed_config.Unpack(manager)

    assert listener.address.socket_address.port_value == 15006
    assert [f.name for f in listener.listener_filters] == ["envoy.filters.listener.tls_inspector"]
    assert chain.filter_chain_match.transport_protocol == "tls"  # STRICT: mTLS only
    assert [f.name for f in manager.http_filters] == [
        "envoy.filters.http.rbac",
        "envoy.filters.http.router",
    ]
    assert manager.forward_client_cert_details == hcm.HttpConnectionManager.SANITIZE_SET
    assert manager.set_current_client_cert_details.uri
    route = manager.route_config.virtual_hosts[0].routes[0].route
    assert route.cluster == cluster.name
    address = cluster.load_assignment.endpoints[0].lb_endpoints[0].endpoint.address
    assert (address.socket_address.address, address.socket_address.port_value) == (
        "127.0.0.1",
        8080,
    )
    permissive, _ = _envoy_inbound()
    assert [c.filter_chain_match.transport_protocol for c in permissive.filter_chains] == [
        "tls",
        "raw_buffer",
    ]
    no_certificates, no_cluster = _envoy_inbound(strict, sds=False)
    # STRICT without SDS: nobody, not plaintext — and no listener at all, as Envoy refuses one
    # without filter chains (the port then refuses connections)
    assert no_certificates is None
    assert no_cluster is None


def test_an_envoys_inbound_ports_come_from_its_node_metadata() -> None:
    from envoy.config.core.v3 import base_pb2

    from libmesh.xds._node import NodeError, node_from_proto

    proto = base_pb2.Node(id="nginx.shop", user_agent_name="envoy")
    proto.metadata.update(
        {"LIBMESH_INBOUND": "0.0.0.0:15006=127.0.0.1:8080, 127.0.0.1:15007=127.0.0.1:9090",
         "LIBMESH_HTTP_PROXY_ADDRESS": "off"}
    )  # fmt: skip
    node, _ = node_from_proto(proto)
    assert node.inbound == (
        ("0.0.0.0:15006", "127.0.0.1:8080"),
        ("127.0.0.1:15007", "127.0.0.1:9090"),
    )
    assert node.http_proxy_address == ""
    proto.metadata.update({"LIBMESH_ROUTES": "127.0.0.1:9001=pay.shop.svc.cluster.local:8080"})
    assert node_from_proto(proto)[0].routes == (
        ("127.0.0.1:9001", "pay.shop.svc.cluster.local:8080"),
    )
    proto.metadata.update({"LIBMESH_ROUTES": "127.0.0.1:9001"})
    with pytest.raises(NodeError, match="LIBMESH_ROUTES must be LISTEN=HOST:PORT,"):
        node_from_proto(proto)
    proto.metadata.update({"LIBMESH_ROUTES": ""})
    proto.metadata.update({"LIBMESH_INBOUND": "15006=8080"})
    with pytest.raises(NodeError, match="LIBMESH_INBOUND: '15006' is not host:port"):
        node_from_proto(proto)
