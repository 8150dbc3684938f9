"""Authorization from YAML to a decision: AuthorizationPolicy documents are translated to Envoy's
HTTP RBAC filters (as Istio's pilot translates them), the filters go through the wire (serialized
and parsed back, as meshd would send them), and the evaluator decides requests with them.

The first part checks what a user of each AuthorizationPolicy field observes; the second the
order of actions and which policies apply to a workload; the third the evaluator's reading of
RBAC protos it did not make itself; the last runs every AuthorizationPolicy of Istio's corpus.
"""

from __future__ import annotations

import re
import textwrap
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
from envoy.config.core.v3 import address_pb2, extension_pb2
from envoy.config.rbac.v3 import rbac_pb2
from envoy.config.route.v3 import route_components_pb2 as rc
from envoy.extensions.filters.http.rbac.v3 import rbac_pb2 as http_rbac_pb2
from envoy.extensions.filters.http.router.v3 import router_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm,
)
from envoy.type.matcher.v3 import filter_state_pb2, metadata_pb2, string_pb2, value_pb2
from envoy.type.v3 import range_pb2
from google.api.expr.v1alpha1 import syntax_pb2
from google.protobuf import any_pb2, wrappers_pb2

from libmesh.config import AuthorizationPolicyAction, load, load_text
from libmesh.policy import Authorizer, AuthzConfigError, AuthzRequest, Decision
from libmesh.xds import RbacFilters, policy_applies, rbac_filters, rbac_policy_name

CORPUS = Path(__file__).parents[2].parent / "shared" / "istio-corpus"
CORPUS_FILES = sorted(
    path
    for folder in ("valid", "analyzers", "nonconformant")
    for path in (CORPUS / folder).glob("*.yaml")
    if re.search(r"^kind:\s*\"?AuthorizationPolicy", path.read_text(), re.MULTILINE)
)

SLEEP = "spiffe://cluster.local/ns/foo/sa/sleep"
OTHER = "spiffe://cluster.local/ns/foo/sa/other"
BAR = "spiffe://cluster.local/ns/bar/sa/client"
HTTPBIN = {"app": "httpbin", "version": "v1"}


def policy(
    spec: str,
    *,
    name: str = "p",
    namespace: str = "foo",
    annotations: str = "",
) -> str:
    """One AuthorizationPolicy document; ``spec`` is YAML text (indented as written)."""
    body = textwrap.indent(textwrap.dedent(spec).strip(), "  ")
    meta = f"  annotations: {annotations}\n" if annotations else ""
    return (
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\n"
        f"metadata:\n  name: {name}\n  namespace: {namespace}\n{meta}spec:\n{body}\n"
    )


def translate(
    *documents: str,
    namespace: str = "foo",
    labels: Mapping[str, str] = HTTPBIN,
    allow_invalid: bool = False,
    **options: Any,
) -> RbacFilters:
    result = load_text("---\n".join(documents))
    resources = list(result.config)
    if allow_invalid:
        resources += list(result.rejected)
    else:
        assert result.errors == (), [e.format() for e in result.errors]
    return rbac_filters(resources, namespace=namespace, labels=labels, **options)


def over_the_wire(filters: RbacFilters) -> Authorizer:
    """Compile the filters as a connected client would: from the HTTP filters of its listener,
    after serialization."""
    chain = [hcm.HttpFilter.FromString(f.SerializeToString()) for f in filters.http_filters()]
    router = any_pb2.Any()
    router.Pack(router_pb2.Router())
    chain.append(hcm.HttpFilter(name="envoy.filters.http.router", typed_config=router))
    return Authorizer.from_http_filters(chain)


def authorizer(*documents: str, **options: Any) -> Authorizer:
    return over_the_wire(translate(*documents, **options))


def request(**fields: Any) -> AuthzRequest:
    fields.setdefault("principal", SLEEP)
    fields.setdefault("source_ip", "10.0.0.7")
    fields.setdefault("destination_ip", "10.0.0.1")
    fields.setdefault("destination_port", 8000)
    fields.setdefault("host", "httpbin.foo.svc.cluster.local")
    return AuthzRequest(**fields)


def allowed(authz: Authorizer, **fields: Any) -> bool:
    return authz.check(request(**fields)).allowed


# -- sources -------------------------------------------------------------------------------------


def test_no_policy_allows_everything() -> None:
    filters = translate()
    decision = over_the_wire(filters).check(request(principal="", method="DELETE"))
    assert filters.filters == ()
    assert decision.allowed
    assert decision.policy == ""


def test_allow_by_principal_admits_that_peer_only() -> None:
    authz = authorizer(
        policy("""
        rules:
        - from:
          - source:
              principals: ["cluster.local/ns/foo/sa/sleep"]
        """)
    )
    decision = authz.check(request(principal=SLEEP))
    assert decision == Decision(
        True,
        "ns[foo]-policy[p]-rule[0]",
        "allowed: matched ALLOW policy ns[foo]-policy[p]-rule[0]",
    )
    denied = authz.check(request(principal=OTHER))
    assert not denied.allowed
    assert denied.reason == "rbac_access_denied_matched_policy[none]"
    assert not allowed(authz, principal="")  # plaintext: no peer identity


@pytest.mark.parametrize(
    ("pattern", "peer", "expected"),
    [
        ("*", SLEEP, True),
        ("*", "", False),  # '*' needs an authenticated peer
        ("cluster.local/ns/foo/*", SLEEP, True),
        ("cluster.local/ns/foo/*", BAR, False),
        ("*/sa/sleep", SLEEP, True),
        ("*/sa/sleep", "spiffe://cluster.local/ns/bar/sa/sleepy", False),
    ],
)
def test_principal_wildcards(pattern: str, peer: str, expected: bool) -> None:
    authz = authorizer(policy(f'rules: [{{from: [{{source: {{principals: ["{pattern}"]}}}}]}}]'))
    assert allowed(authz, principal=peer) is expected


def test_principals_follow_the_trust_domain_and_its_aliases() -> None:
    document = policy(
        'rules: [{from: [{source: {principals: ["cluster.local/ns/foo/sa/sleep"]}}]}]'
    )
    authz = authorizer(document, trust_domain="corp.example", trust_domain_aliases=["old.example"])
    assert allowed(authz, principal="spiffe://corp.example/ns/foo/sa/sleep")
    assert allowed(authz, principal="spiffe://old.example/ns/foo/sa/sleep")
    assert not allowed(authz, principal="spiffe://evil.example/ns/foo/sa/sleep")


def test_namespaces_match_the_peer_namespace_exactly() -> None:
    authz = authorizer(policy('rules: [{from: [{source: {namespaces: ["bar"]}}]}]'))
    assert allowed(authz, principal=BAR)
    assert not allowed(authz, principal="spiffe://cluster.local/ns/barn/sa/client")
    assert not allowed(authz, principal=SLEEP)
    assert not allowed(authz, principal="")


def test_service_accounts_in_both_forms() -> None:
    authz = authorizer(
        policy('rules: [{from: [{source: {serviceAccounts: ["sleep", "bar/client"]}}]}]')
    )
    assert allowed(authz, principal=SLEEP)  # 'sleep' is in the policy's namespace
    assert allowed(authz, principal=BAR)
    assert not allowed(authz, principal="spiffe://cluster.local/ns/foo/sa/sleepy")
    assert not allowed(authz, principal="spiffe://cluster.local/ns/bar/sa/sleep")


def test_not_principals_deny_everyone_else() -> None:
    authz = authorizer(
        policy("""
        action: DENY
        rules:
        - from:
          - source:
              notPrincipals: ["cluster.local/ns/foo/sa/sleep"]
        """)
    )
    assert allowed(authz, principal=SLEEP)
    assert not allowed(authz, principal=OTHER)
    assert not allowed(authz, principal="")


def test_ip_blocks_read_the_peer_and_remote_ip_blocks_the_original_client() -> None:
    authz = authorizer(
        policy("""
        rules:
        - from:
          - source:
              ipBlocks: ["10.0.0.0/24"]
              notIpBlocks: ["10.0.0.13"]
          - source:
              remoteIpBlocks: ["203.0.113.0/24"]
        """)
    )
    assert allowed(authz, source_ip="10.0.0.7")
    assert not allowed(authz, source_ip="10.0.0.13")
    assert not allowed(authz, source_ip="10.0.1.7")
    # a client behind a proxy: the peer is the proxy, the original client is trusted XFF
    assert allowed(authz, source_ip="192.0.2.1", remote_ip="203.0.113.9")
    assert not allowed(authz, source_ip="192.0.2.1", remote_ip="198.51.100.9")
    # without a separate original client, the peer is the client
    assert allowed(authz, source_ip="203.0.113.9")


def test_request_principals_need_a_validated_token() -> None:
    authz = authorizer(
        policy("""
        rules:
        - from:
          - source:
              requestPrincipals: ["https://issuer.example/alice", "other-issuer/*"]
        """)
    )
    alice = {"iss": "https://issuer.example", "sub": "alice"}
    assert allowed(authz, jwt_claims=alice)
    assert allowed(authz, jwt_claims={"iss": "other-issuer", "sub": "anyone"})
    assert not allowed(authz, jwt_claims={"iss": "https://issuer.example", "sub": "bob"})
    assert not allowed(authz, jwt_claims=None)


def test_not_request_principals_star_requires_a_token() -> None:
    authz = authorizer(
        policy("""
        action: DENY
        rules:
        - from:
          - source:
              notRequestPrincipals: ["*"]
        """)
    )
    assert not allowed(authz, jwt_claims=None)
    assert allowed(authz, jwt_claims={"iss": "i", "sub": "s"})


# -- operations ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("paths", "path", "denied"),
    [
        ('["/admin"]', "/admin", True),
        ('["/admin"]', "/admin?debug=1", True),  # the query is not part of the path
        ('["/admin"]', "/admin/users", False),
        ('["/admin/*"]', "/admin/users", True),
        ('["/admin/*"]', "/administrator", False),
        ('["*.php"]', "/x/index.php", True),
        ('["*.php"]', "/x/index.html", False),
        ('["*"]', "/anything", True),
        ('["/api/{*}/items"]', "/api/v1/items", True),
        ('["/api/{*}/items"]', "/api/v1/extra/items", False),
        ('["/files/{**}"]', "/files/a/b/c.txt", True),
        ('["/files/{**}"]', "/static/a", False),
    ],
)
def test_deny_by_path(paths: str, path: str, denied: bool) -> None:
    authz = authorizer(
        policy(f"action: DENY\nrules: [{{to: [{{operation: {{paths: {paths}}}}}]}}]")
    )
    assert allowed(authz, path=path) is not denied


def test_paths_are_matched_after_dot_segments_are_resolved() -> None:
    authz = authorizer(
        policy('rules: [{to: [{operation: {paths: ["/public/*"]}}]}]', name="public"),
        DENY_ADMIN,
    )
    assert allowed(authz, path="/public/logo.png")
    assert not allowed(authz, path="/public/../admin")  # not public: it is /admin
    assert not allowed(authz, path="/public/%2e%2e/admin")
    assert allowed(authz, path="/x/../public/./a")


def test_not_paths_allow_only_the_listed_paths_without_identity() -> None:
    authz = authorizer(
        policy("""
        action: DENY
        rules:
        - from:
          - source:
              notPrincipals: ["cluster.local/ns/foo/sa/sleep"]
          to:
          - operation:
              notPaths: ["/healthz", "/public/*"]
        """)
    )
    assert allowed(authz, principal="", path="/healthz")
    assert allowed(authz, principal="", path="/public/logo.png")
    assert not allowed(authz, principal="", path="/private")
    assert allowed(authz, principal=SLEEP, path="/private")


def test_methods_hosts_and_ports() -> None:
    authz = authorizer(
        policy("""
        rules:
        - to:
          - operation:
              methods: ["GET", "HEAD"]
              hosts: ["httpbin.foo.svc.cluster.local", "*.example.com"]
              ports: ["8000"]
        """)
    )
    assert allowed(authz, method="GET")
    assert allowed(authz, method="HEAD", host="HTTPBIN.foo.svc.cluster.local")  # case-insensitive
    assert allowed(authz, method="GET", host="api.Example.com")
    assert not allowed(authz, method="POST")
    assert not allowed(authz, method="GET", host="evil.test")
    assert not allowed(authz, method="GET", host="")
    assert not allowed(authz, method="GET", destination_port=9000)


def test_from_entries_are_ored_and_fields_inside_one_are_anded() -> None:
    authz = authorizer(
        policy("""
        rules:
        - from:
          - source: {namespaces: ["bar"], ipBlocks: ["10.1.0.0/16"]}
          - source: {principals: ["cluster.local/ns/foo/sa/sleep"]}
          to:
          - operation: {methods: ["GET"]}
          - operation: {paths: ["/upload"]}
        """)
    )
    assert allowed(authz, principal=BAR, source_ip="10.1.2.3", method="GET")
    assert not allowed(authz, principal=BAR, source_ip="10.0.0.7", method="GET")  # AND
    assert allowed(authz, principal=SLEEP, method="POST", path="/upload")  # OR of to entries
    assert not allowed(authz, principal=SLEEP, method="POST", path="/other")


# -- conditions ----------------------------------------------------------------------------------


def test_claims_condition_matches_a_claim_or_an_element_of_a_list_claim() -> None:
    authz = authorizer(
        policy("""
        rules:
        - when:
          - key: request.auth.claims[groups]
            values: ["admins", "ops-*"]
          - key: request.auth.claims[org][team]
            notValues: ["contractors"]
        """)
    )
    assert allowed(authz, jwt_claims={"groups": ["dev", "admins"], "org": {"team": "core"}})
    assert allowed(authz, jwt_claims={"groups": "ops-eu"})
    assert not allowed(authz, jwt_claims={"groups": ["dev"]})
    assert not allowed(authz, jwt_claims={"groups": "admins", "org": {"team": "contractors"}})
    assert not allowed(authz, jwt_claims=None)


def test_header_condition_with_not_values_as_in_istio_docs() -> None:
    """istio.io authz-deny: deny GET unless the request carries ``x-token: admin``."""
    authz = authorizer((CORPUS / "valid" / "docs-authz-deny-2.yaml").read_text())
    assert not allowed(authz, method="GET")
    assert not allowed(authz, method="GET", headers={"x-token": "guest"})
    assert allowed(authz, method="GET", headers={"x-token": "admin"})
    assert allowed(authz, method="POST")


def test_header_condition_wildcards() -> None:
    authz = authorizer(
        policy("""
        rules:
        - when:
          - key: request.headers[X-Foo]
            values: ["bar-*"]
          - key: request.headers[x-present]
            values: ["*"]
        """)
    )
    assert allowed(authz, headers={"x-foo": "bar-1", "x-present": ""})
    assert not allowed(authz, headers={"x-foo": "baz", "x-present": "1"})
    assert not allowed(authz, headers={"x-foo": "bar-1"})


def test_source_and_destination_conditions() -> None:
    authz = authorizer(
        policy("""
        rules:
        - when:
          - {key: source.namespace, values: ["foo", "bar"]}
          - {key: source.principal, notValues: ["cluster.local/ns/foo/sa/other"]}
          - {key: source.ip, values: ["10.0.0.0/8"]}
          - {key: destination.ip, values: ["10.0.0.1"]}
          - {key: destination.port, values: ["8000", "8443"]}
          - {key: connection.sni, values: ["*.svc.cluster.local"]}
        """)
    )
    sni = "outbound_.8000_._.httpbin.foo.svc.cluster.local"
    assert allowed(authz, principal=SLEEP, sni=sni)
    assert allowed(authz, principal=BAR, sni=sni, destination_port=8443)
    assert not allowed(authz, principal=OTHER, sni=sni)
    assert not allowed(authz, principal="spiffe://cluster.local/ns/baz/sa/x", sni=sni)
    assert not allowed(authz, principal=SLEEP, sni=sni, source_ip="192.168.0.1")
    assert not allowed(authz, principal=SLEEP, sni=sni, destination_ip="10.0.0.2")
    assert not allowed(authz, principal=SLEEP, sni=sni, destination_port=9000)
    assert not allowed(authz, principal=SLEEP, sni="example.com")


def test_request_auth_conditions() -> None:
    authz = authorizer(
        policy("""
        rules:
        - when:
          - {key: request.auth.principal, values: ["https://issuer.example/*"]}
          - {key: request.auth.audiences, values: ["shop"]}
          - {key: request.auth.presenter, notValues: ["untrusted-app"]}
        """)
    )
    token = {"iss": "https://issuer.example", "sub": "alice", "aud": ["web", "shop"]}
    assert allowed(authz, jwt_claims=token)
    assert allowed(authz, jwt_claims={**token, "aud": "shop", "azp": "mobile"})
    assert not allowed(authz, jwt_claims={**token, "aud": "web"})
    assert not allowed(authz, jwt_claims={**token, "azp": "untrusted-app"})
    assert not allowed(authz, jwt_claims={**token, "iss": "https://other.example"})


def test_jwt_docs_example_needs_principal_and_group() -> None:
    authz = authorizer(
        (CORPUS / "valid" / "docs-authz-jwt-3.yaml").read_text(), labels={"app": "httpbin"}
    )
    issuer = "testing@secure.istio.io"
    assert allowed(authz, jwt_claims={"iss": issuer, "sub": issuer, "groups": ["group1"]})
    assert not allowed(authz, jwt_claims={"iss": issuer, "sub": issuer, "groups": ["group2"]})
    assert not allowed(authz, jwt_claims=None)


# -- actions and their order ---------------------------------------------------------------------

ALLOW_GET = policy("rules: [{to: [{operation: {methods: [GET]}}]}]", name="allow-get")
DENY_ADMIN = policy(
    'action: DENY\nrules: [{to: [{operation: {paths: ["/admin*"]}}]}]', name="deny-admin"
)


def test_deny_beats_allow() -> None:
    authz = authorizer(ALLOW_GET, DENY_ADMIN)
    denied = authz.check(request(method="GET", path="/admin"))
    assert not denied.allowed
    assert denied.policy == "ns[foo]-policy[deny-admin]-rule[0]"
    assert denied.reason == "rbac_access_denied_matched_policy[ns[foo]-policy[deny-admin]-rule[0]]"
    assert (
        authz.check(request(method="GET", path="/")).policy == "ns[foo]-policy[allow-get]-rule[0]"
    )
    assert not allowed(authz, method="POST", path="/")


def test_deny_only_allows_the_rest() -> None:
    authz = authorizer(DENY_ADMIN)
    assert allowed(authz, method="POST", path="/x", principal="")
    assert not allowed(authz, path="/admin/x")


def test_empty_allow_policy_denies_everything() -> None:
    authz = authorizer(
        (CORPUS / "valid" / "docs-authz-http-1.yaml").read_text(), namespace="default"
    )
    assert not allowed(authz, method="GET")
    assert not allowed(authz, principal="", method="OPTIONS")


def test_allow_with_an_empty_rule_allows_everything() -> None:
    authz = authorizer(
        policy("rules: []", name="nothing"),
        policy("rules: [{}]", name="everything"),
    )
    decision = authz.check(request(principal="", method="DELETE"))
    assert decision.allowed
    assert decision.policy == "ns[foo]-policy[everything]-rule[0]"


def test_audit_marks_requests_and_never_decides() -> None:
    audit = policy(
        'action: AUDIT\nrules: [{to: [{operation: {methods: ["DELETE"]}}]}]', name="audit"
    )
    filters = translate(audit, ALLOW_GET)
    assert [f.rules.action for f in filters.filters] == [rbac_pb2.RBAC.LOG, rbac_pb2.RBAC.ALLOW]
    authz = over_the_wire(filters)
    deleted = authz.check(request(method="DELETE"))
    assert not deleted.allowed  # AUDIT alone does not allow
    assert deleted.audited
    assert deleted.audit_policy == "ns[foo]-policy[audit]-rule[0]"
    fetched = authz.check(request(method="GET"))
    assert fetched.allowed
    assert not fetched.audited
    only_audit = authorizer(audit)
    assert only_audit.check(request(method="DELETE")).allowed
    assert only_audit.check(request(method="DELETE")).audited


def test_filters_come_in_istio_order() -> None:
    audit = policy("action: AUDIT\nrules: [{}]", name="audit")
    filters = translate(ALLOW_GET, DENY_ADMIN, audit)
    actions = [f.rules.action for f in filters.filters]
    assert actions == [rbac_pb2.RBAC.LOG, rbac_pb2.RBAC.DENY, rbac_pb2.RBAC.ALLOW]
    assert all(f.name == "envoy.filters.http.rbac" for f in filters.http_filters())


def test_dry_run_policies_are_reported_not_enforced() -> None:
    dry = policy(
        'action: DENY\nrules: [{to: [{operation: {methods: ["GET"]}}]}]',
        name="would-deny",
        annotations='{"istio.io/dry-run": "true"}',
    )
    filters = translate(dry)
    (only,) = filters.filters
    assert not only.HasField("rules")
    assert only.shadow_rules_stat_prefix == "istio_dry_run_deny_"
    decision = over_the_wire(filters).check(request(method="GET"))
    assert decision.allowed
    assert [(d.action, d.allowed, d.policy) for d in decision.dry_run] == [
        ("DENY", False, "ns[foo]-policy[would-deny]-rule[0]")
    ]


def test_custom_action_is_reported_and_ignored() -> None:
    custom = policy(
        """
        action: CUSTOM
        provider: {name: ext-authz}
        rules: [{to: [{operation: {paths: ["/headers"]}}]}]
        """,
        name="ext",
    )
    filters = translate(custom)
    assert filters.filters == ()
    (notice,) = filters.notices
    assert "AuthorizationPolicy foo/ext" in notice
    assert "action CUSTOM is not supported by libmesh; ignored" in notice
    assert notice.startswith("<string>:")  # where the policy was written


def test_deny_policy_without_rules_matches_nothing() -> None:
    filters = translate(policy("action: DENY"), allow_invalid=True)  # the loader reports it
    (deny,) = filters.filters
    assert list(deny.rules.policies) == ["ns[foo]-policy[p]-rule[0]"]
    assert allowed(over_the_wire(filters), principal="", path="/admin")


# -- which policies apply ------------------------------------------------------------------------


def test_root_namespace_policies_apply_everywhere() -> None:
    mesh_wide = policy(DENY_ADMIN.split("spec:\n", 1)[1], name="mesh", namespace="istio-system")
    for namespace in ("foo", "bar", "istio-system"):
        authz = authorizer(mesh_wide, namespace=namespace, labels={})
        assert not allowed(authz, path="/admin")
        assert allowed(authz, path="/")


def test_namespace_policies_stay_in_their_namespace() -> None:
    assert allowed(authorizer(DENY_ADMIN, namespace="bar"), path="/admin")


def test_selector_must_match_the_workload_labels() -> None:
    selected = policy(
        """
        selector: {matchLabels: {app: httpbin}}
        action: DENY
        rules: [{}]
        """
    )
    assert not allowed(authorizer(selected, labels={"app": "httpbin", "version": "v1"}))
    assert allowed(authorizer(selected, labels={"app": "reviews"}))
    assert allowed(authorizer(selected, labels={}))


def test_policies_with_target_refs_are_for_gateways() -> None:
    targeted = policy(
        """
        targetRefs:
        - {kind: Gateway, group: gateway.networking.k8s.io, name: waypoint}
        action: DENY
        rules: [{}]
        """
    )
    filters = translate(targeted)
    assert filters.filters == ()
    assert any("targetRef" in n and "gateway or waypoint" in n for n in filters.notices)


# -- invalid rules fail safe ---------------------------------------------------------------------


def test_invalid_value_drops_an_allow_rule_but_widens_a_deny_rule() -> None:
    bad_allow = policy(
        'rules: [{from: [{source: {ipBlocks: ["10.0.0.0/8", "not-an-ip"]}}]}]', name="bad-allow"
    )
    filters = translate(bad_allow, allow_invalid=True)
    assert not allowed(over_the_wire(filters), source_ip="10.0.0.7")  # nothing allowed
    assert any("not-an-ip" in n and "allows nothing" in n for n in filters.notices)

    bad_deny = policy(
        """
        action: DENY
        rules:
        - from: [{source: {ipBlocks: ["not-an-ip"]}}]
          to: [{operation: {paths: ["/admin"]}}]
        """,
        name="bad-deny",
    )
    filters = translate(bad_deny, allow_invalid=True)
    authz = over_the_wire(filters)
    assert not allowed(authz, path="/admin", source_ip="192.168.1.1")  # from any address
    assert allowed(authz, path="/")
    assert any("denies more" in n for n in filters.notices)


def test_unknown_condition_key_fails_closed() -> None:
    unknown = 'rules: [{when: [{key: "request.regex.headers[x]", values: ["a"]}]}]'
    allow = translate(policy(unknown), allow_invalid=True)
    assert not allowed(over_the_wire(allow))
    deny = translate(policy("action: DENY\n" + unknown), allow_invalid=True)
    assert not allowed(over_the_wire(deny))
    assert any("unknown condition key 'request.regex.headers[x]'" in n for n in deny.notices)


# -- the evaluator on RBAC it did not make -------------------------------------------------------


def rbac(
    *principals: rbac_pb2.Principal,
    permission: rbac_pb2.Permission | None = None,
    action: int = rbac_pb2.RBAC.ALLOW,
) -> Authorizer:
    config = rbac_pb2.RBAC(action=action)
    config.policies["p"].CopyFrom(
        rbac_pb2.Policy(
            permissions=[permission or rbac_pb2.Permission(any=True)],
            principals=list(principals) or [rbac_pb2.Principal(any=True)],
        )
    )
    return Authorizer.from_filters([http_rbac_pb2.RBAC(rules=config)])


def test_header_matchers_follow_envoy_for_missing_headers() -> None:
    inverted_exact = rc.HeaderMatcher(
        name="X-Team", string_match=string_pb2.StringMatcher(exact="a"), invert_match=True
    )
    authz = rbac(rbac_pb2.Principal(header=inverted_exact))
    assert allowed(authz, headers={"x-team": "b"})
    assert not allowed(authz, headers={"x-team": "a"})
    assert not allowed(authz)  # missing: an inverted value match does not match either
    absent = rbac(rbac_pb2.Principal(header=rc.HeaderMatcher(name="x-team", present_match=False)))
    assert allowed(absent)
    assert not allowed(absent, headers={"x-team": "a"})
    ranged = rbac(
        rbac_pb2.Principal(
            header=rc.HeaderMatcher(name="x-n", range_match=range_pb2.Int64Range(start=1, end=5))
        )
    )
    assert allowed(ranged, headers={"x-n": "4"})
    assert not allowed(ranged, headers={"x-n": "5"})


def test_metadata_invert_and_destination_port_range() -> None:
    not_admin = metadata_pb2.MetadataMatcher(
        filter="envoy.filters.http.jwt_authn",
        path=[
            metadata_pb2.MetadataMatcher.PathSegment(key="payload"),
            metadata_pb2.MetadataMatcher.PathSegment(key="admin"),
        ],
        value=value_pb2.ValueMatcher(bool_match=True),
        invert=True,
    )
    ports = rbac_pb2.Permission(destination_port_range=range_pb2.Int32Range(start=8000, end=8080))
    authz = rbac(rbac_pb2.Principal(metadata=not_admin), permission=ports)
    assert allowed(authz, jwt_claims={"admin": False})
    assert allowed(authz, jwt_claims=None)
    assert not allowed(authz, jwt_claims={"admin": True})
    assert not allowed(authz, jwt_claims={}, destination_port=8080)


def test_legacy_istio_authn_metadata_and_peer_principal_filter_state() -> None:
    legacy = metadata_pb2.MetadataMatcher(
        filter="istio_authn",
        path=[metadata_pb2.MetadataMatcher.PathSegment(key="request.auth.principal")],
        value=value_pb2.ValueMatcher(string_match=string_pb2.StringMatcher(exact="iss/alice")),
    )
    assert allowed(
        rbac(rbac_pb2.Principal(metadata=legacy)), jwt_claims={"iss": "iss", "sub": "alice"}
    )
    assert not allowed(rbac(rbac_pb2.Principal(metadata=legacy)), jwt_claims=None)
    state = filter_state_pb2.FilterStateMatcher(
        key="io.istio.peer_principal", string_match=string_pb2.StringMatcher(suffix="/sa/sleep")
    )
    authz = rbac(rbac_pb2.Principal(filter_state=state))
    assert allowed(authz, principal=SLEEP)
    assert not allowed(authz, principal=OTHER)


def test_unset_prefix_len_covers_every_address_as_in_envoy() -> None:
    authz = rbac(
        rbac_pb2.Principal(direct_remote_ip=address_pb2.CidrRange(address_prefix="10.9.9.9"))
    )
    assert allowed(authz, source_ip="192.168.3.4")
    assert not allowed(authz, source_ip="::1")
    exact = address_pb2.CidrRange(
        address_prefix="10.9.9.9", prefix_len=wrappers_pb2.UInt32Value(value=32)
    )
    assert not allowed(rbac(rbac_pb2.Principal(direct_remote_ip=exact)), source_ip="10.9.9.8")


def test_regexes_use_re2_semantics() -> None:
    regex = string_pb2.StringMatcher(
        safe_regex={"regex": r"spiffe://[a-z.]+/ns/(foo|bar)/sa/\w+"}  # not a plain glob
    )
    authz = rbac(rbac_pb2.Principal(authenticated={"principal_name": regex}))
    assert allowed(authz, principal=BAR)
    assert not allowed(authz, principal="spiffe://cluster.local/ns/baz/sa/x")
    glob = rbac(
        rbac_pb2.Principal(
            authenticated={"principal_name": {"safe_regex": {"regex": ".+/ns/foo/.+"}}}
        )
    )
    assert allowed(glob, principal=SLEEP)
    assert not allowed(glob, principal="spiffe://x/ns/foo/\n")  # '.' never matches a newline
    assert not allowed(glob, principal="/ns/foo/x")


@pytest.mark.parametrize(
    ("build", "names"),
    [
        (
            lambda: rbac_pb2.Policy(
                permissions=[
                    rbac_pb2.Permission(
                        matcher=extension_pb2.TypedExtensionConfig(name="custom.matcher")
                    )
                ],
                principals=[rbac_pb2.Principal(any=True)],
            ),
            "permission kind 'matcher' is not supported",
        ),
        (
            lambda: rbac_pb2.Policy(
                permissions=[rbac_pb2.Permission(any=True)],
                principals=[rbac_pb2.Principal(any=True)],
                condition=syntax_pb2.Expr(),
            ),
            "CEL conditions are not supported",
        ),
        (
            lambda: rbac_pb2.Policy(
                permissions=[rbac_pb2.Permission(any=True)],
                principals=[
                    rbac_pb2.Principal(
                        and_ids=rbac_pb2.Principal.Set(
                            ids=[rbac_pb2.Principal(custom=extension_pb2.TypedExtensionConfig())]
                        )
                    )
                ],
            ),
            "principals[0].and_ids.ids[0]: principal kind 'custom' is not supported",
        ),
        (
            lambda: rbac_pb2.Policy(
                permissions=[
                    rbac_pb2.Permission(url_path={"path": {"safe_regex": {"regex": "(unclosed"}}})
                ],
                principals=[rbac_pb2.Principal(any=True)],
            ),
            "is not a valid RE2 regex",
        ),
    ],
)
def test_unsupported_rbac_is_rejected_naming_the_policy(build: Any, names: str) -> None:
    config = rbac_pb2.RBAC(action=rbac_pb2.RBAC.DENY)
    config.policies["ns[foo]-policy[strange]-rule[0]"].CopyFrom(build())
    with pytest.raises(AuthzConfigError) as caught:
        Authorizer.from_filters([http_rbac_pb2.RBAC(), http_rbac_pb2.RBAC(rules=config)])
    message = str(caught.value)
    assert "RBAC filter #1 rules: policy 'ns[foo]-policy[strange]-rule[0]'" in message
    assert names in message
    assert isinstance(caught.value, ValueError)


def test_filter_without_rules_enforces_nothing() -> None:
    authz = Authorizer.from_filters([http_rbac_pb2.RBAC()])
    assert allowed(authz, principal="")
    deny_all = Authorizer.from_filters([http_rbac_pb2.RBAC(rules=rbac_pb2.RBAC())])
    assert not allowed(deny_all)  # present and empty: ALLOW with no policy denies


def test_rbac_filter_without_inline_configuration_is_rejected() -> None:
    discovered = hcm.HttpFilter(name="envoy.filters.http.rbac")
    discovered.config_discovery.type_urls.append(
        "type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBAC"
    )
    with pytest.raises(AuthzConfigError, match="needs its configuration inline"):
        Authorizer.from_http_filters([discovered])
    disabled = hcm.HttpFilter(name="envoy.filters.http.rbac", disabled=True)
    assert allowed(Authorizer.from_http_filters([disabled]))


# -- Istio's corpus ------------------------------------------------------------------------------


def corpus_workloads(path: Path) -> Iterator[tuple[str, dict[str, str]]]:
    """A workload for each policy of the file: its namespace and the labels it selects."""
    result = load(path)
    for resource in (*result.config, *result.rejected):
        if resource.kind == "AuthorizationPolicy":
            selector = resource.spec.selector
            yield resource.namespace, dict(selector.match_labels) if selector else {}


@pytest.mark.parametrize("path", CORPUS_FILES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_every_corpus_policy_translates_and_compiles(path: Path) -> None:
    """For a workload selected by each policy: every policy that applies is there, one RBAC
    policy per rule under Istio's name (unless a notice says why not), and the filters compile
    and decide."""
    result = load(path)
    resources = [*result.config, *result.rejected]
    workloads = list(corpus_workloads(path))
    assert workloads
    for namespace, labels in workloads:
        filters = rbac_filters(resources, namespace=namespace, labels=labels)
        expected = {
            rbac_policy_name(r.namespace, r.name, i): f"{r.namespace}/{r.name}: spec.rules[{i}]"
            for r in resources
            if r.kind == "AuthorizationPolicy"
            and policy_applies(r, namespace=namespace, labels=labels)
            and r.spec.action is not AuthorizationPolicyAction.CUSTOM
            for i in range(max(1, len(r.spec.rules)))
        }
        built = {
            name
            for config in filters.filters
            for rules in (config.rules, config.shadow_rules)
            for name in rules.policies
        }
        missing = {name for name in expected if name not in built}
        assert built <= expected.keys()
        for name in missing:
            assert any(expected[name] in notice for notice in filters.notices), name
        decision = over_the_wire(filters).check(request(principal="", path="/", method="GET"))
        assert decision.reason.startswith("allowed") is decision.allowed


def test_percent_encoded_unreserved_characters_cannot_dodge_a_path_rule() -> None:
    """Envoy normalizes the path as Istio configures it (RFC 3986: unreserved characters
    decoded, dot segments removed) before RBAC looks at it; the app's router decodes too."""
    from libmesh.policy import Authorizer, AuthzRequest
    from libmesh.xds import rbac_filters

    result = load_text(
        textwrap.dedent("""
        apiVersion: security.istio.io/v1
        kind: AuthorizationPolicy
        metadata: {name: no-admin, namespace: shop}
        spec:
          action: DENY
          rules: [{to: [{operation: {paths: ["/admin/*"]}}]}]
        """),
        "policy.yaml",
    )
    filters = rbac_filters(result.config.resources, namespace="shop", labels={})
    authorizer = Authorizer.from_filters(filters.filters)
    for path in (
        "/admin/x",
        "/%61dmin/x",
        "/%41dmin/x".replace("%41", "%61"),
        "/public/../admin/x",
        "/public/%2e%2e/admin/x",
    ):
        assert not authorizer.check(AuthzRequest(path=path)).allowed, path
    assert authorizer.check(AuthzRequest(path="/admin%2Fx")).allowed  # %2F stays encoded
    assert authorizer.check(AuthzRequest(path="/public/x")).allowed
