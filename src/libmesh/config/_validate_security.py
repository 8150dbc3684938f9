"""Istio's validation rules for PeerAuthentication, AuthorizationPolicy, RequestAuthentication."""

from __future__ import annotations

from ._rules import (
    check_authz_port,
    check_condition_key,
    check_condition_value,
    check_ip_or_cidr,
    check_jwks,
    check_jwks_uri,
    check_path_template,
    check_service_account,
    check_strict_header_name,
    is_number,
)
from ._security import (
    AuthorizationPolicy,
    AuthorizationPolicyAction,
    RequestAuthentication,
    Rule,
)
from ._validate import Cursor
from ._validate_networking import check_workload_selector

__all__ = [
    "validate_authorization_policy",
    "validate_peer_authentication",
    "validate_request_authentication",
]

# Which (group, kind) a policy's targetRef may name.
_TARGET_KINDS = {
    ("", "Service"),
    ("core", "Service"),
    ("networking.istio.io", "ServiceEntry"),
    ("gateway.networking.k8s.io", "Gateway"),
    ("gateway.networking.k8s.io", "GatewayClass"),
}


def _check_targets(c: Cursor) -> None:
    node = c.node
    chosen = [
        f
        for f, given in (
            ("selector", node.selector is not None),
            ("target_ref", node.target_ref is not None),
            ("target_refs", bool(node.target_refs)),
        )
        if given
    ]
    if len(chosen) > 1:
        c.error("set only one of selector, targetRef and targetRefs", chosen[1])
    check_workload_selector(c, "selector", "match_labels")
    refs = [(c.child("target_ref"), node.target_ref)] if node.target_ref is not None else []
    refs += [(cursor, cursor.node) for _, cursor in c.items("target_refs")]
    for cursor, ref in refs:
        if ref.namespace:
            cursor.error(
                "cross-namespace targetRef is not supported; remove namespace", "namespace"
            )
        if (ref.group or "", ref.kind) not in _TARGET_KINDS:
            cursor.error(
                "targetRef may name a Service, a ServiceEntry or a Gateway, not "
                f"{ref.group or 'core'}/{ref.kind}",
                "kind",
            )


# -- PeerAuthentication --------------------------------------------------------------------------


def validate_peer_authentication(c: Cursor) -> None:
    policy = c.node
    if policy.port_level_mtls and (policy.selector is None or not policy.selector.match_labels):
        c.error(
            "portLevelMtls needs a selector with labels: mesh-wide and namespace-wide policies "
            "cannot set per-port modes",
            "port_level_mtls",
        )
    for key in policy.port_level_mtls:
        if not (is_number(key) and 1 <= int(key) <= 65535):
            c.error(f"{key!r} is not a port number in the range 1..65535", "port_level_mtls", key)
    check_workload_selector(c, "selector", "match_labels")


# -- AuthorizationPolicy -------------------------------------------------------------------------

_SOURCE_LISTS = (
    "principals", "not_principals", "request_principals", "not_request_principals",
    "namespaces", "not_namespaces", "ip_blocks", "not_ip_blocks", "remote_ip_blocks",
    "not_remote_ip_blocks", "service_accounts", "not_service_accounts", "trust_domains",
    "not_trust_domains",
)  # fmt: skip
_OPERATION_LISTS = (
    "hosts", "not_hosts", "ports", "not_ports", "methods", "not_methods", "paths", "not_paths",
)  # fmt: skip
_CUSTOM_UNSUPPORTED_SOURCES = (
    "namespaces", "not_namespaces", "service_accounts", "not_service_accounts", "principals",
    "not_principals", "request_principals", "not_request_principals",
)  # fmt: skip


def validate_authorization_policy(c: Cursor) -> None:
    policy: AuthorizationPolicy = c.node
    _check_targets(c)
    action = policy.action or AuthorizationPolicyAction.ALLOW
    if action is AuthorizationPolicyAction.CUSTOM:
        _check_custom(c)
    elif policy.provider is not None:
        c.error(
            f"provider is only used with action CUSTOM, and this policy's action is {action.value}",
            "provider",
        )
    if action is AuthorizationPolicyAction.DENY and not policy.rules:
        c.error(
            "a DENY policy without rules never matches; add an empty rule '{}' to deny every "
            "request",
            "action",
        )
    for _, rule in c.items("rules"):
        _check_rule(rule, action)


def _check_custom(c: Cursor) -> None:
    policy: AuthorizationPolicy = c.node
    if not policy.rules:
        c.error(
            "a CUSTOM policy without rules never triggers; add an empty rule '{}' to send every "
            "request to the provider",
            "action",
        )
    elif policy.provider is None or not policy.provider.name:
        c.error("action CUSTOM needs provider.name", "provider")
    for _, rule in c.items("rules"):
        for _, source in rule.items("from_"):
            if source.node.source is None:
                continue
            src = source.child("source")
            for field in _CUSTOM_UNSUPPORTED_SOURCES:
                if getattr(src.node, field):
                    src.error("this source field is not supported with action CUSTOM", field)
        for _, condition in rule.items("when"):
            key = condition.node.key
            if key in (
                "source.namespace",
                "source.serviceAccount",
                "source.principal",
            ) or key.startswith("request.auth."):
                condition.error(f"condition key {key!r} is not supported with action CUSTOM", "key")


def _check_rule(c: Cursor, action: AuthorizationPolicyAction) -> None:
    rule = c.node
    for _, source_cursor in c.items("from_"):
        if source_cursor.node.source is None:
            source_cursor.error("each 'from' entry needs a source", "source")
            continue
        _check_source(source_cursor.child("source"))
    for _, to in c.items("to"):
        if to.node.operation is None:
            to.error("each 'to' entry needs an operation", "operation")
            continue
        _check_operation(to.child("operation"))
    for field in ("from_", "to"):
        if not getattr(rule, field) and field in rule._field_at:
            name = "from" if field == "from_" else field
            c.error(f"'{name}' is empty; remove it, or list what it should match", field)
    for _, condition in c.items("when"):
        node = condition.node
        if not node.key:
            condition.error("a condition needs a key", "key")
            continue
        if not condition.check(check_condition_key(node.key), "key"):
            continue
        if not node.values and not node.not_values:
            condition.error(f"condition {node.key!r} needs values or notValues")
        for field in ("values", "not_values"):
            for i, value in enumerate(getattr(node, field)):
                condition.check(check_condition_value(node.key, value), field, i)
    if action is AuthorizationPolicyAction.DENY and _denies_all_tcp(rule):
        c.warning(
            "this DENY rule uses only HTTP attributes, so it denies all traffic to TCP ports "
            "in its scope; name the ports it applies to"
        )


def _check_source(c: Cursor) -> None:
    source = c.node
    if not any(getattr(source, f) for f in _SOURCE_LISTS):
        c.error("a source must set at least one field")
        return
    if (
        source.principals or source.not_principals or source.namespaces or source.not_namespaces
    ) and (source.service_accounts or source.not_service_accounts):
        c.error(
            "serviceAccounts cannot be combined with principals or namespaces", "service_accounts"
        )
    for field in _SOURCE_LISTS:
        values = getattr(source, field)
        for i, value in enumerate(values):
            if field.endswith("service_accounts"):
                c.check(check_service_account(value), field, i)
            elif value == "":
                c.error("an empty value is not allowed", field, i)
            elif field.endswith("ip_blocks"):
                c.check(check_ip_or_cidr(value), field, i)


def _check_operation(c: Cursor) -> None:
    operation = c.node
    if not any(getattr(operation, f) for f in _OPERATION_LISTS):
        c.error("an operation must set at least one field")
        return
    for field in _OPERATION_LISTS:
        for i, value in enumerate(getattr(operation, field)):
            if value == "":
                c.error("an empty value is not allowed", field, i)
            elif field.endswith("ports"):
                c.check(check_authz_port(value), field, i)
            elif field.endswith("paths"):
                c.check(check_path_template(value), field, i)


def _denies_all_tcp(rule: Rule) -> bool:
    sources = [f.source for f in rule.from_ if f.source is not None]
    operations = [t.operation for t in rule.to if t.operation is not None]
    l4_source_fields = (
        "principals",
        "not_principals",
        "ip_blocks",
        "not_ip_blocks",
        "namespaces",
        "not_namespaces",
        "remote_ip_blocks",
        "not_remote_ip_blocks",
        "service_accounts",
        "not_service_accounts",
    )
    if (
        sources
        and not operations
        and not any(getattr(s, f) for s in sources for f in l4_source_fields)
    ):
        return True
    return bool(operations) and not any(o.ports or o.not_ports for o in operations)


# -- RequestAuthentication -----------------------------------------------------------------------


def validate_request_authentication(c: Cursor) -> None:
    policy: RequestAuthentication = c.node
    _check_targets(c)
    issuers: dict[str, int] = {}
    for i, rule_cursor in c.items("jwt_rules"):
        rule = rule_cursor.node
        # Stricter than current Istio, which accepts a jwksUri alone: the issuer is what a
        # token is matched against, and without it any issuer's token is accepted.
        if not rule.issuer:
            rule_cursor.error(
                "every JWT rule needs an issuer (the 'iss' claim it accepts)", "issuer"
            )
        elif rule.issuer in issuers:
            rule_cursor.error(
                f"issuer {rule.issuer!r} already has a rule (jwtRules[{issuers[rule.issuer]}])",
                "issuer",
            )
        else:
            issuers[rule.issuer] = i
        if rule.timeout is not None and rule.timeout.nanos % 1_000_000:
            rule_cursor.error(
                f"timeout {rule.timeout} is finer than the supported millisecond precision",
                "timeout",
            )
        if rule.jwks_uri:
            rule_cursor.check(check_jwks_uri(rule.jwks_uri), "jwks_uri")
        if rule.jwks:
            rule_cursor.check(check_jwks(rule.jwks), "jwks")
        if rule.jwks_uri and rule.jwks:
            rule_cursor.error("set either jwks or jwksUri, not both", "jwks")
        for j, audience in enumerate(rule.audiences):
            if not audience:
                rule_cursor.error("an audience must not be empty", "audiences", j)
        for _, header in rule_cursor.items("from_headers"):
            if not header.node.name:
                header.error("a header location needs a name", "name")
        for field in ("from_params", "from_cookies"):
            for j, value in enumerate(getattr(rule, field)):
                if not value:
                    rule_cursor.error("a token location must not be empty", field, j)
        for _, claim in rule_cursor.items("output_claim_to_headers"):
            if not claim.node.claim or not claim.node.header:
                claim.error("outputClaimToHeaders needs both header and claim")
            elif claim.node.header:
                claim.check(check_strict_header_name(claim.node.header), "header")
        if rule.output_payload_to_header:
            rule_cursor.check(
                check_strict_header_name(rule.output_payload_to_header), "output_payload_to_header"
            )
    if not policy.jwt_rules:
        c.warning(
            "this RequestAuthentication has no jwtRules, so it accepts no tokens", "jwt_rules"
        )
