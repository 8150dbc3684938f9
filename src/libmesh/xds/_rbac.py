"""AuthorizationPolicy to Envoy RBAC: the HTTP RBAC filters Istio gives a workload's inbound side.

A pure function, written the way Istio's pilot writes it (``pilot/pkg/security/authz/builder``
and ``authz/model`` in istio/istio), so that what libmesh enforces in-process, what meshd serves
over xDS and what a real Envoy would enforce are the same thing:

* **Which policies apply.** A policy in the root namespace applies mesh-wide, one in the
  workload's namespace applies to it; either way its ``selector.matchLabels`` must be a subset of
  the workload's labels (no selector: every workload). Policies that attach with ``targetRef`` /
  ``targetRefs`` are for gateways and waypoints, not for a workload's own inbound side: they are
  skipped, with a notice.
* **One filter per action**, in Istio's order: AUDIT (an RBAC with action ``LOG``), DENY, ALLOW.
  CUSTOM (external authorization) is not supported: the policy is skipped with a notice. No ALLOW
  policy means no ALLOW filter, so everything not denied is allowed; an ALLOW filter that exists
  allows only what one of its policies matches.
* **One RBAC policy per rule**, named ``ns[<namespace>]-policy[<name>]-rule[<index>]``. A policy
  without rules becomes one policy that never matches (``rule[0]``): an ALLOW policy with
  ``rules: []`` alone denies everything, one with ``rules: [{}]`` allows everything.
* **Within a rule** the ``from`` entries are ORed (one RBAC principal each), the ``to`` entries
  are ORed (one RBAC permission each), and ``when`` conditions are ANDed into every one of them.
  Inside an entry every field is ANDed, a field's values are ORed, and a ``not*`` field is the
  negation of the OR of its values.
* **Matchers** are Istio's: a value ``*`` matches anything non-empty, ``abc*`` is a prefix,
  ``*abc`` a suffix; principals are matched against the peer's SPIFFE ID with ``spiffe://``
  prepended; ``namespaces`` with the regex ``.*/ns/<ns>/.*`` on it; ``serviceAccounts`` with
  ``spiffe://.+/ns/<ns>/(.+/|)sa/<sa>(/.+)?``; ``requestPrincipals``, ``request.auth.*`` and
  claims with metadata matchers on the JWT payload that ``envoy.filters.http.jwt_authn`` stores
  (key ``payload``); hosts case-insensitively on ``:authority``; methods on ``:method``; paths on
  the URL path without its query, with ``{*}`` / ``{**}`` templates as Envoy's
  ``uri_template`` matcher; ports as ``destination_port``.
* **Trust domains.** As Istio's trust-domain migration does, a principal whose trust domain is
  ``cluster.local`` (or the local trust domain or one of its aliases) is matched in the local
  trust domain and every alias.
* **Invalid values fail safe, as in Istio.** A value that cannot be translated (a bad CIDR, a
  port out of range, an unsupported path template, a malformed key) makes an ALLOW rule be
  dropped (it allows less), while in a DENY or AUDIT rule only that value is ignored, so the rule
  matches more (deny policies fail closed). Every such case is a notice.

Two places where libmesh goes its own way, both documented here: literal text inside the regexes
it generates is escaped (Istio inserts it unescaped, so a ``.`` in ``cluster.local`` matches any
character); and a ``when`` key that Istio does not know (Istio's validation rejects it before
translation, and so does libmesh's loader, so this only concerns policies built in code) drops
an ALLOW rule but is ignored in a DENY or AUDIT rule, like any other invalid value.
``source.trustDomains`` (newer than Istio's builder) matches the peer's SPIFFE ID with
``spiffe://<trust domain>/``.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from envoy.config.core.v3 import address_pb2, extension_pb2
from envoy.config.rbac.v3 import rbac_pb2
from envoy.config.route.v3 import route_components_pb2 as rc
from envoy.extensions.filters.http.rbac.v3 import rbac_pb2 as http_rbac_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm,
)
from envoy.extensions.path.match.uri_template.v3 import uri_template_match_pb2
from envoy.type.matcher.v3 import metadata_pb2, path_pb2, regex_pb2, string_pb2, value_pb2
from google.protobuf import any_pb2, wrappers_pb2

from ..config import (
    AuthorizationPolicy,
    AuthorizationPolicyAction,
    Condition,
    Resource,
    Rule,
    labels_match,
    where,
)
from ..config._source import Location

__all__ = [
    "DRY_RUN_ANNOTATION",
    "JWT_AUTHN_FILTER",
    "RBAC_FILTER",
    "RbacFilters",
    "compile_uri_template",
    "policy_applies",
    "rbac_filters",
    "rbac_policy_name",
]

RBAC_FILTER = "envoy.filters.http.rbac"
# Envoy's JWT filter, and the key under which it stores a validated token's payload.
JWT_AUTHN_FILTER = "envoy.filters.http.jwt_authn"
JWT_PAYLOAD_KEY = "payload"
# Istio's annotation that turns a policy into a shadow ("dry run") policy.
DRY_RUN_ANNOTATION = "istio.io/dry-run"
URI_TEMPLATE_EXTENSION = "uri-template"
SPIFFE_PREFIX = "spiffe://"
DEFAULT_TRUST_DOMAIN = "cluster.local"
_SHADOW_PREFIXES = {
    rbac_pb2.RBAC.ALLOW: "istio_dry_run_allow_",
    rbac_pb2.RBAC.DENY: "istio_dry_run_deny_",
}
_ACTIONS = (  # Istio's filter order
    (AuthorizationPolicyAction.AUDIT, rbac_pb2.RBAC.LOG),
    (AuthorizationPolicyAction.DENY, rbac_pb2.RBAC.DENY),
    (AuthorizationPolicyAction.ALLOW, rbac_pb2.RBAC.ALLOW),
)


@dataclass(frozen=True, slots=True)
class RbacFilters:
    """The RBAC filters for one workload's inbound HTTP side, in filter-chain order, and a
    notice for every policy (or part of one) that was skipped or changed on the way.

    ``filters`` are ``envoy.extensions.filters.http.rbac.v3.RBAC`` messages: what meshd puts in
    the inbound listener, and what :meth:`libmesh.policy.Authorizer.from_filters` compiles.
    """

    filters: tuple[http_rbac_pb2.RBAC, ...] = ()
    notices: tuple[str, ...] = ()

    def http_filters(self) -> tuple[hcm.HttpFilter, ...]:
        """The filters as HTTP connection manager entries, each named ``envoy.filters.http.rbac``
        as Istio names them."""
        result = []
        for config in self.filters:
            typed = any_pb2.Any()
            typed.Pack(config)
            result.append(hcm.HttpFilter(name=RBAC_FILTER, typed_config=typed))
        return tuple(result)


def rbac_policy_name(namespace: str, name: str, rule: int) -> str:
    """Istio's name for the RBAC policy built from one rule of an AuthorizationPolicy."""
    return f"ns[{namespace}]-policy[{name}]-rule[{rule}]"


def policy_applies(
    policy: Resource[AuthorizationPolicy],
    *,
    namespace: str,
    labels: Mapping[str, str],
    root_namespace: str = "istio-system",
) -> bool:
    """Whether ``policy`` applies to the inbound side of a workload with these ``labels`` in
    ``namespace`` (Istio's ``ListAuthorizationPolicies``). Policies with ``targetRef(s)`` never
    apply to a workload directly."""
    if policy.namespace not in (namespace, root_namespace):
        return False
    spec = policy.spec
    if spec.target_ref is not None or spec.target_refs:
        return False
    return spec.selector is None or labels_match(spec.selector.match_labels, labels)


def rbac_filters(
    policies: Iterable[Resource[Any]],
    *,
    namespace: str,
    labels: Mapping[str, str],
    root_namespace: str = "istio-system",
    trust_domain: str = DEFAULT_TRUST_DOMAIN,
    trust_domain_aliases: Sequence[str] = (),
) -> RbacFilters:
    """The RBAC filters Istio builds for a workload with ``labels`` in ``namespace``.

    ``policies`` may hold any resources (a whole :class:`~libmesh.config.ConfigSet`); only the
    AuthorizationPolicies that apply are read. See the module documentation for the semantics.
    """
    notices: list[str] = []
    by_action: dict[AuthorizationPolicyAction, list[Resource[AuthorizationPolicy]]] = {}
    for resource in policies:
        if resource.kind != "AuthorizationPolicy" or not isinstance(
            resource.spec, AuthorizationPolicy
        ):
            continue
        spec = resource.spec
        if spec.target_ref is not None or spec.target_refs:
            if resource.namespace in (namespace, root_namespace):
                notices.append(
                    _notice(
                        resource,
                        where(spec, "target_refs" if spec.target_refs else "target_ref"),
                        "spec.targetRefs" if spec.target_refs else "spec.targetRef",
                        "attaches the policy to a gateway or waypoint, not to a workload's "
                        "inbound side; ignored here (use selector to apply it to workloads)",
                    )
                )
            continue
        if not policy_applies(
            resource, namespace=namespace, labels=labels, root_namespace=root_namespace
        ):
            continue
        action = spec.action or AuthorizationPolicyAction.ALLOW
        if action is AuthorizationPolicyAction.CUSTOM:
            notices.append(
                _notice(
                    resource,
                    where(spec, "action"),
                    "spec.action",
                    "action CUSTOM is not supported by libmesh; ignored",
                )
            )
            continue
        by_action.setdefault(action, []).append(resource)

    bundle = (trust_domain, *trust_domain_aliases)
    filters = []
    for action, rbac_action in _ACTIONS:
        selected = by_action.get(action)
        if selected:
            filters.append(_build_filter(selected, rbac_action, bundle, notices))
    return RbacFilters(tuple(filters), tuple(notices))


# -- one filter ----------------------------------------------------------------------------------


def _build_filter(
    policies: Sequence[Resource[AuthorizationPolicy]],
    action: rbac_pb2.RBAC.Action.ValueType,
    bundle: tuple[str, ...],
    notices: list[str],
) -> http_rbac_pb2.RBAC:
    """Istio's ``Builder.build`` for one action: enforced policies in ``rules``, dry-run ones in
    ``shadow_rules``; a field is left unset when no policy goes into it."""
    enforced = rbac_pb2.RBAC(action=action)
    shadow = rbac_pb2.RBAC(action=action)
    has_enforced = has_shadow = False
    for resource in policies:
        if _is_dry_run(resource, notices):
            target, has_shadow = shadow, True
        else:
            target, has_enforced = enforced, True
        spec = resource.spec
        for index, rule in enumerate(spec.rules):
            name = rbac_policy_name(resource.namespace, resource.name, index)
            built = _RuleBuilder(resource, rule, index, action, bundle, notices).build()
            if built is not None:
                target.policies[name].CopyFrom(built)
        if not spec.rules:
            name = rbac_policy_name(resource.namespace, resource.name, 0)
            target.policies[name].CopyFrom(_match_never())
    result = http_rbac_pb2.RBAC()
    if has_enforced:
        result.rules.CopyFrom(enforced)
    if has_shadow:
        result.shadow_rules.CopyFrom(shadow)
    # Istio derives the prefix from the shadow rules' action, and a nil RBAC reads as ALLOW.
    result.shadow_rules_stat_prefix = _SHADOW_PREFIXES.get(
        action if has_shadow else rbac_pb2.RBAC.ALLOW, ""
    )
    return result


def _is_dry_run(resource: Resource[AuthorizationPolicy], notices: list[str]) -> bool:
    value = resource.metadata.annotations.get(DRY_RUN_ANNOTATION)
    if value is None:
        return False
    # Go's strconv.ParseBool, which Istio uses.
    if value in ("1", "t", "T", "true", "TRUE", "True"):
        return True
    if value not in ("0", "f", "F", "false", "FALSE", "False"):
        notices.append(
            _notice(
                resource,
                where(resource.metadata, "annotations", DRY_RUN_ANNOTATION),
                f"metadata.annotations[{DRY_RUN_ANNOTATION}]",
                f"{value!r} is not a boolean; the policy is enforced (write 'true' or 'false')",
            )
        )
    return False


def _match_never() -> rbac_pb2.Policy:
    return rbac_pb2.Policy(
        permissions=[rbac_pb2.Permission(not_rule=rbac_pb2.Permission(any=True))],
        principals=[rbac_pb2.Principal(not_id=rbac_pb2.Principal(any=True))],
    )


def _notice(resource: Resource[Any], at: Location, field: str, message: str) -> str:
    place = at or resource.location
    head = f"{place}: " if place else ""
    return f"{head}AuthorizationPolicy {resource.namespace}/{resource.name}: {field}: {message}"


# -- one rule ------------------------------------------------------------------------------------


class _InvalidValue(ValueError):
    """A value (or key) that has no RBAC translation."""


@dataclass(frozen=True, slots=True)
class _Attribute:
    """One field of a source or operation, or one condition: values, not-values, and how to
    translate them: ``one`` value at a time (ORed), or ``every`` value at once (Istio's
    "extended" generators). Both raise :class:`_InvalidValue`. ``field`` names it in notices."""

    field: str
    values: tuple[str, ...]
    not_values: tuple[str, ...]
    one: Callable[[str], Any] | None = None
    every: Callable[[Sequence[str]], Any] | None = None


class _RuleBuilder:
    """Istio's ``authz/model``: a rule's conditions are merged into every principal (from) and
    permission (to), and each side is the AND of its attributes."""

    def __init__(
        self,
        resource: Resource[AuthorizationPolicy],
        rule: Rule,
        index: int,
        action: rbac_pb2.RBAC.Action.ValueType,
        bundle: tuple[str, ...],
        notices: list[str],
    ) -> None:
        self.resource = resource
        self.rule = rule
        self.index = index
        self.action = action
        self.bundle = bundle
        self.notices = notices

    def build(self) -> rbac_pb2.Policy | None:
        """The RBAC policy of the rule; ``None`` when an ALLOW rule cannot be built exactly."""
        try:
            return self._build()
        except _InvalidValue as exc:
            self._report(str(exc), "the rule is skipped, so it allows nothing")
            return None

    def _build(self) -> rbac_pb2.Policy:
        rule = self.rule
        permission_conditions: list[_Attribute] = []
        principal_conditions: list[_Attribute] = []
        for i, condition in enumerate(rule.when):
            side = self._condition(condition, i)
            if side is None:
                continue
            kind, attribute = side
            (permission_conditions if kind == "to" else principal_conditions).append(attribute)

        principals = []
        for i, entry in enumerate(rule.from_):
            attributes = self._source_attributes(entry.source, i) if entry.source else []
            principals.append(self._principal([*attributes, *principal_conditions]))
        if not rule.from_:
            principals.append(self._principal(principal_conditions))

        permissions = []
        for i, to in enumerate(rule.to):
            attributes = self._operation_attributes(to.operation, i) if to.operation else []
            permissions.append(self._permission([*attributes, *permission_conditions]))
        if not rule.to:
            permissions.append(self._permission(permission_conditions))
        return rbac_pb2.Policy(permissions=permissions, principals=principals)

    # -- sides -----------------------------------------------------------------------------------

    def _principal(self, attributes: Sequence[_Attribute]) -> rbac_pb2.Principal:
        ids = [
            p
            for a in attributes
            for p in self._translate(a, _or_ids, lambda p: rbac_pb2.Principal(not_id=p))
        ]
        return rbac_pb2.Principal(
            and_ids=rbac_pb2.Principal.Set(ids=ids or [rbac_pb2.Principal(any=True)])
        )

    def _permission(self, attributes: Sequence[_Attribute]) -> rbac_pb2.Permission:
        rules = [
            p
            for a in attributes
            for p in self._translate(a, _or_rules, lambda p: rbac_pb2.Permission(not_rule=p))
        ]
        return rbac_pb2.Permission(
            and_rules=rbac_pb2.Permission.Set(rules=rules or [rbac_pb2.Permission(any=True)])
        )

    def _translate(
        self,
        attribute: _Attribute,
        either: Callable[[list[Any]], Any],
        negate: Callable[[Any], Any],
    ) -> list[Any]:
        """``OR(values)`` and ``NOT(OR(not_values))``; an invalid value fails an ALLOW rule and
        is left out of a DENY or AUDIT one."""
        result = []
        for values, negated in ((attribute.values, False), (attribute.not_values, True)):
            if not values:
                continue
            field = f"{attribute.field}{'.notValues' if negated else ''}"
            if attribute.every is not None:
                try:
                    matcher = attribute.every(values)
                except _InvalidValue as exc:
                    self._lenient(field, exc)
                    continue
                result.append(negate(matcher) if negated else matcher)
                continue
            assert attribute.one is not None
            alternatives = []
            for value in values:
                try:
                    alternatives.append(attribute.one(value))
                except _InvalidValue as exc:
                    self._lenient(field, exc)
            if alternatives:
                combined = either(alternatives)
                result.append(negate(combined) if negated else combined)
        return result

    def _lenient(self, field: str, exc: _InvalidValue) -> None:
        if self.action == rbac_pb2.RBAC.ALLOW:
            raise _InvalidValue(f"{field}: {exc}") from exc
        verb = "denies" if self.action == rbac_pb2.RBAC.DENY else "audits"
        self._report(f"{field}: {exc}", f"the value is ignored, so the rule {verb} more")

    def _report(self, problem: str, consequence: str) -> None:
        self.notices.append(
            _notice(
                self.resource,
                where(self.resource.spec, "rules", self.index),
                f"spec.rules[{self.index}]",
                f"{problem}; {consequence}",
            )
        )

    # -- attributes ------------------------------------------------------------------------------

    def _source_attributes(self, source: Any, i: int) -> list[_Attribute]:
        namespace = self.resource.namespace
        at = f"from[{i}].source."
        candidates = [
            _Attribute(
                at + "principals",
                self._migrate(source.principals),
                self._migrate(source.not_principals),
                one=_source_principal,
            ),
            _Attribute(
                at + "requestPrincipals",
                source.request_principals,
                source.not_request_principals,
                every=_request_principals,
            ),
            _Attribute(
                at + "trustDomains",
                source.trust_domains,
                source.not_trust_domains,
                one=_trust_domain,
            ),
            _Attribute(
                at + "serviceAccounts",
                source.service_accounts,
                source.not_service_accounts,
                one=lambda v: _service_account(namespace, v),
            ),
            _Attribute(
                at + "namespaces", source.namespaces, source.not_namespaces, one=_source_namespace
            ),
            _Attribute(
                at + "remoteIpBlocks",
                source.remote_ip_blocks,
                source.not_remote_ip_blocks,
                one=_remote_ip,
            ),
            _Attribute(at + "ipBlocks", source.ip_blocks, source.not_ip_blocks, one=_source_ip),
        ]
        return [a for a in candidates if a.values or a.not_values]

    def _operation_attributes(self, operation: Any, i: int) -> list[_Attribute]:
        at = f"to[{i}].operation."
        candidates = [
            _Attribute(at + "hosts", operation.hosts, operation.not_hosts, one=_host),
            _Attribute(at + "methods", operation.methods, operation.not_methods, one=_method),
            _Attribute(at + "paths", operation.paths, operation.not_paths, one=_path),
            _Attribute(at + "ports", operation.ports, operation.not_ports, one=_destination_port),
        ]
        return [a for a in candidates if a.values or a.not_values]

    def _condition(self, condition: Condition, i: int) -> tuple[str, _Attribute] | None:
        key = condition.key
        field = f"when[{i}]"
        values, not_values = condition.values, condition.not_values
        if not values and not not_values:
            return None

        def attribute(
            one: Callable[[str], Any] | None = None,
            every: Callable[[Sequence[str]], Any] | None = None,
        ) -> _Attribute:
            return _Attribute(field, values, not_values, one=one, every=every)

        if key == "destination.ip":
            return "to", attribute(one=_destination_ip)
        if key == "destination.port":
            return "to", attribute(one=_destination_port)
        if key == "connection.sni":
            return "to", attribute(one=_sni)
        if key.startswith("experimental.envoy.filters."):
            return "to", attribute(every=lambda vs: _envoy_filter_metadata(key, vs))
        if key == "source.ip":
            return "from", attribute(one=_source_ip)
        if key == "remote.ip":
            return "from", attribute(one=_remote_ip)
        if key == "source.namespace":
            return "from", attribute(one=_source_namespace)
        if key == "source.serviceAccount":
            namespace = self.resource.namespace
            return "from", attribute(one=lambda v: _service_account(namespace, v))
        if key == "source.principal":
            return "from", _Attribute(
                field,
                self._migrate(values),
                self._migrate(not_values),
                one=_source_principal,
            )
        if key == "request.auth.principal":
            return "from", attribute(every=_request_principals)
        if key == "request.auth.audiences":
            return "from", attribute(every=lambda vs: _claim_principal(("aud",), vs))
        if key == "request.auth.presenter":
            return "from", attribute(every=lambda vs: _claim_principal(("azp",), vs))
        if key.startswith("request.auth.claims"):
            return "from", attribute(every=lambda vs: _claims(key, vs))
        if key.startswith("request.experimental.inline.headers"):
            return "from", attribute(one=lambda v: _inline_header(key, v))
        if key.startswith("request.headers"):
            return "from", attribute(one=lambda v: _request_header(key, v))
        self._lenient(field + ".key", _InvalidValue(f"unknown condition key {key!r}"))
        return None

    def _migrate(self, principals: Sequence[str]) -> tuple[str, ...]:
        return _with_trust_domain_aliases(principals, self.bundle)


# -- trust domains -------------------------------------------------------------------------------


def _with_trust_domain_aliases(
    principals: Sequence[str], bundle: tuple[str, ...]
) -> tuple[str, ...]:
    """Istio's ``trustdomain.Bundle.ReplaceTrustDomainAliases``: a principal in the local trust
    domain, one of its aliases, or ``cluster.local`` stands for the same identity in each of them.
    Principals whose trust domain is ``*``, or that are not ``td/ns/<ns>/sa/<sa>``, are kept."""
    result: list[str] = []
    for principal in principals:
        parts = principal.split("/")
        if len(parts) != 5 or parts[0] == "*":
            result.append(principal)
            continue
        domain = parts[0]
        if not (domain == DEFAULT_TRUST_DOMAIN or any(_wild(domain, td) for td in bundle)):
            result.append(principal)
            continue
        for td in bundle:
            if domain.startswith("*") and td.endswith(domain[1:]):
                replaced = principal
            else:
                replaced = "/".join([td, *parts[1:]])
            if replaced not in result:
                result.append(replaced)
    return tuple(result)


def _wild(text: str, pattern: str) -> bool:
    """Istio's ``stringMatch`` for one pattern: exact, ``*``, ``prefix*`` or ``*suffix``."""
    if pattern == "*" or text == pattern:
        return True
    if pattern.endswith("*") and text.startswith(pattern[:-1]):
        return True
    return pattern.startswith("*") and text.endswith(pattern[1:])


# -- matchers ------------------------------------------------------------------------------------

_RE2_SPECIAL = frozenset("\\.+*?()|[]{}^$")


def _quote(text: str) -> str:
    """``text`` as an RE2 literal."""
    return "".join("\\" + c if c in _RE2_SPECIAL else c for c in text)


def _wildcard_regex(text: str) -> str:
    """``*`` as ``.*``, the rest literal."""
    return ".*".join(_quote(part) for part in text.split("*"))


def _regex(pattern: str) -> string_pb2.StringMatcher:
    return string_pb2.StringMatcher(safe_regex=regex_pb2.RegexMatcher(regex=pattern))


def _string_matcher(value: str, prefix: str = "") -> string_pb2.StringMatcher:
    """Istio's ``StringMatcherWithPrefix``: ``*`` is any non-empty string (the prefix is not
    required then), ``*x`` a suffix, ``x*`` a prefix, anything else exact."""
    if value == "*":
        return _regex(".+")
    if value.startswith("*"):
        if not prefix:
            return string_pb2.StringMatcher(suffix=value[1:])
        return _regex(_quote(prefix) + ".*" + _quote(value[1:]))
    if value.endswith("*"):
        return string_pb2.StringMatcher(prefix=prefix + value[:-1])
    return string_pb2.StringMatcher(exact=prefix + value)


def _header_matcher(name: str, value: str, *, ignore_case: bool = False) -> rc.HeaderMatcher:
    """Istio's ``HeaderMatcher`` (and, with ``ignore_case``, ``HostMatcher``)."""
    if value == "*":
        return rc.HeaderMatcher(name=name, present_match=True)
    if value.startswith("*"):
        match = string_pb2.StringMatcher(suffix=value[1:], ignore_case=ignore_case)
    elif value.endswith("*"):
        match = string_pb2.StringMatcher(prefix=value[:-1], ignore_case=ignore_case)
    else:
        match = string_pb2.StringMatcher(exact=value, ignore_case=ignore_case)
    return rc.HeaderMatcher(name=name, string_match=match)


def _cidr(value: str) -> address_pb2.CidrRange:
    try:
        if "/" in value:
            network = ipaddress.ip_network(value, strict=False)
            address, length = str(network.network_address), network.prefixlen
        else:
            ip = ipaddress.ip_address(value)
            address, length = str(ip), ip.max_prefixlen
    except ValueError as exc:
        raise _InvalidValue(f"{value!r} is not an IP address or CIDR block") from exc
    return address_pb2.CidrRange(
        address_prefix=address, prefix_len=wrappers_pb2.UInt32Value(value=length)
    )


def _authenticated(match: string_pb2.StringMatcher) -> rbac_pb2.Principal:
    return rbac_pb2.Principal(authenticated=rbac_pb2.Principal.Authenticated(principal_name=match))


def _or_ids(ids: list[rbac_pb2.Principal]) -> rbac_pb2.Principal:
    return rbac_pb2.Principal(or_ids=rbac_pb2.Principal.Set(ids=ids))


def _or_rules(rules: list[rbac_pb2.Permission]) -> rbac_pb2.Permission:
    return rbac_pb2.Permission(or_rules=rbac_pb2.Permission.Set(rules=rules))


def _source_principal(value: str) -> rbac_pb2.Principal:
    return _authenticated(_string_matcher(value, SPIFFE_PREFIX))


def _source_namespace(value: str) -> rbac_pb2.Principal:
    return _authenticated(_regex(f".*/ns/{_wildcard_regex(value)}/.*"))


def _service_account(policy_namespace: str, value: str) -> rbac_pb2.Principal:
    """Istio 1.22+: ``sa`` (in the policy's namespace) or ``ns/sa``."""
    namespace, slash, account = value.partition("/")
    if not slash:
        namespace, account = policy_namespace, value
    if not namespace or not account or "/" in account or "*" in value:
        raise _InvalidValue(f"{value!r} is not 'serviceAccount' or 'namespace/serviceAccount'")
    return _authenticated(
        _regex(f"spiffe://.+/ns/{_quote(namespace)}/(.+/|)sa/{_quote(account)}(/.+)?")
    )


def _trust_domain(value: str) -> rbac_pb2.Principal:
    domain = ".+" if value == "*" else "[^/]*".join(_quote(p) for p in value.split("*"))
    return _authenticated(_regex(f"spiffe://{domain}/.*"))


def _source_ip(value: str) -> rbac_pb2.Principal:
    return rbac_pb2.Principal(direct_remote_ip=_cidr(value))


def _remote_ip(value: str) -> rbac_pb2.Principal:
    return rbac_pb2.Principal(remote_ip=_cidr(value))


def _destination_ip(value: str) -> rbac_pb2.Permission:
    return rbac_pb2.Permission(destination_ip=_cidr(value))


def _destination_port(value: str) -> rbac_pb2.Permission:
    if not value.isdigit() or int(value) > 65535:
        raise _InvalidValue(f"{value!r} is not a port number (0..65535)")
    return rbac_pb2.Permission(destination_port=int(value))


def _sni(value: str) -> rbac_pb2.Permission:
    return rbac_pb2.Permission(requested_server_name=_string_matcher(value))


def _host(value: str) -> rbac_pb2.Permission:
    return rbac_pb2.Permission(header=_header_matcher(":authority", value, ignore_case=True))


def _method(value: str) -> rbac_pb2.Permission:
    return rbac_pb2.Permission(header=_header_matcher(":method", value))


def _path(value: str) -> rbac_pb2.Permission:
    if "{*}" in value or "{**}" in value:
        template = value.replace("{**}", "**").replace("{*}", "*")
        try:
            compile_uri_template(template)
        except ValueError as exc:
            raise _InvalidValue(f"path template {value!r}: {exc}") from exc
        typed = any_pb2.Any()
        typed.Pack(uri_template_match_pb2.UriTemplateMatchConfig(path_template=template))
        return rbac_pb2.Permission(
            uri_template=extension_pb2.TypedExtensionConfig(
                name=URI_TEMPLATE_EXTENSION, typed_config=typed
            )
        )
    return rbac_pb2.Permission(url_path=path_pb2.PathMatcher(path=_string_matcher(value)))


def _bracketed(key: str, prefix: str) -> str:
    rest = key[len(prefix) :]
    if len(rest) < 3 or not rest.startswith("[") or not rest.endswith("]"):
        raise _InvalidValue(f"key {key!r} must name an entry, as in '{prefix}[name]'")
    return rest[1:-1]


def _request_header(key: str, value: str) -> rbac_pb2.Principal:
    name = _bracketed(key, "request.headers")
    return rbac_pb2.Principal(header=_header_matcher(name.lower(), value))


def _inline_header(key: str, value: str) -> rbac_pb2.Principal:
    """Istio's ``HeaderMatcherWithRegex``: the value as one element of a comma-joined header."""
    name = _bracketed(key, "request.experimental.inline.headers")
    if value == "*":
        return rbac_pb2.Principal(header=rc.HeaderMatcher(name=name.lower(), present_match=True))
    if value.startswith("*"):
        regex = ".*" + _quote(value[1:])
    elif value.endswith("*"):
        regex = _quote(value[:-1]) + ".*"
    else:
        regex = _quote(value)
    pattern = f"^{regex}$|^{regex},.*|.*,{regex},.*|.*,{regex}$"
    return rbac_pb2.Principal(
        header=rc.HeaderMatcher(
            name=name.lower(), safe_regex_match=regex_pb2.RegexMatcher(regex=pattern)
        )
    )


def _claim_path(claims: Sequence[str]) -> list[metadata_pb2.MetadataMatcher.PathSegment]:
    return [metadata_pb2.MetadataMatcher.PathSegment(key=key) for key in (JWT_PAYLOAD_KEY, *claims)]


def _string_or(values: Sequence[str]) -> value_pb2.ValueMatcher:
    """Istio's ``StringOrMatcher``."""
    matchers = [value_pb2.ValueMatcher(string_match=_string_matcher(v)) for v in values]
    if len(matchers) == 1:
        return matchers[0]
    return value_pb2.ValueMatcher(or_match=value_pb2.OrMatcher(value_matchers=matchers))


def _claim_principal(claims: Sequence[str], values: Sequence[str]) -> rbac_pb2.Principal:
    """Istio's ``MetadataListValueMatcherForJWTClaims``: the claim matches when it is one of the
    values, or is a list holding one of them."""
    value = _string_or(values)
    either = value_pb2.ValueMatcher(
        or_match=value_pb2.OrMatcher(
            value_matchers=[
                value_pb2.ValueMatcher(list_match=value_pb2.ListMatcher(one_of=value)),
                value,
            ]
        )
    )
    return rbac_pb2.Principal(
        metadata=metadata_pb2.MetadataMatcher(
            filter=JWT_AUTHN_FILTER, path=_claim_path(claims), value=either
        )
    )


def _claims(key: str, values: Sequence[str]) -> rbac_pb2.Principal:
    """``request.auth.claims[a]`` or, for nested claims, ``request.auth.claims[a][b]``."""
    rest = key[len("request.auth.claims") :]
    names: list[str] = []
    while rest:
        close = rest.find("]")
        if not rest.startswith("[") or close < 2 or "[" in rest[1:close]:
            raise _InvalidValue(
                f"key {key!r} must name a claim, as in 'request.auth.claims[groups]' or "
                "'request.auth.claims[a][b]'"
            )
        names.append(rest[1:close])
        rest = rest[close + 1 :]
    if not names:
        raise _InvalidValue(f"key {key!r} must name a claim, as in 'request.auth.claims[groups]'")
    return _claim_principal(names, values)


_MATCH_ANY_TEXT = _regex(".+")


def _jwt_claim(claim: str, match: string_pb2.StringMatcher) -> rbac_pb2.Principal:
    return rbac_pb2.Principal(
        metadata=metadata_pb2.MetadataMatcher(
            filter=JWT_AUTHN_FILTER,
            path=_claim_path((claim,)),
            value=value_pb2.ValueMatcher(string_match=match),
        )
    )


def _request_principals(values: Sequence[str]) -> rbac_pb2.Principal:
    """Istio's ``requestPrincipalGenerator``: ``iss/sub`` split at the last ``/`` (an issuer may
    be a URL), each half matched on its own claim, with ``*`` wildcards at either end."""
    alternatives = []
    for value in values:
        cut = value.rfind("/")
        found = cut >= 0
        issuer, subject = (value[:cut], value[cut + 1 :]) if found else (value, "")
        if value == "*":
            match_issuer, match_subject = _MATCH_ANY_TEXT, _MATCH_ANY_TEXT
        elif value.startswith("*"):
            if found:
                match_issuer = (
                    _MATCH_ANY_TEXT
                    if issuer == "*"
                    else string_pb2.StringMatcher(suffix=issuer[1:])
                )
                match_subject = string_pb2.StringMatcher(exact=subject)
            else:
                match_issuer = _MATCH_ANY_TEXT
                match_subject = string_pb2.StringMatcher(suffix=value[1:])
        elif value.endswith("*"):
            if found:
                match_issuer = string_pb2.StringMatcher(exact=issuer)
                match_subject = (
                    _MATCH_ANY_TEXT
                    if subject == "*"
                    else string_pb2.StringMatcher(prefix=subject[:-1])
                )
            else:
                match_issuer = string_pb2.StringMatcher(prefix=value[:-1])
                match_subject = _MATCH_ANY_TEXT
        else:
            match_issuer = string_pb2.StringMatcher(exact=issuer)
            match_subject = string_pb2.StringMatcher(exact=subject)
        alternatives.append(
            rbac_pb2.Principal(
                and_ids=rbac_pb2.Principal.Set(
                    ids=[_jwt_claim("iss", match_issuer), _jwt_claim("sub", match_subject)]
                )
            )
        )
    return alternatives[0] if len(alternatives) == 1 else _or_ids(alternatives)


def _envoy_filter_metadata(key: str, values: Sequence[str]) -> rbac_pb2.Permission:
    """``experimental.envoy.filters.<filter>[<key>]``: a value of another filter's dynamic
    metadata; ``[v]`` matches a list holding ``v``."""
    body = key[len("experimental.") :]
    if not body.endswith("]") or "[" not in body:
        raise _InvalidValue(f"key {key!r} must look like 'experimental.envoy.filters.a.b[c]'")
    filter_name, _, entry = body[:-1].partition("[")
    matchers = []
    for value in values:
        if value.startswith("[") and value.endswith("]"):
            one_of = value_pb2.ValueMatcher(string_match=_string_matcher(value.strip("[]")))
            matchers.append(value_pb2.ValueMatcher(list_match=value_pb2.ListMatcher(one_of=one_of)))
        else:
            matchers.append(value_pb2.ValueMatcher(string_match=_string_matcher(value)))
    either = (
        matchers[0]
        if len(matchers) == 1
        else value_pb2.ValueMatcher(or_match=value_pb2.OrMatcher(value_matchers=matchers))
    )
    return rbac_pb2.Permission(
        metadata=metadata_pb2.MetadataMatcher(
            filter=filter_name,
            path=[metadata_pb2.MetadataMatcher.PathSegment(key=entry)],
            value=either,
        )
    )


# -- URI templates -------------------------------------------------------------------------------

# RFC 3986 pchar without '*' and '=', as Envoy's uri_template library allows in literals.
_LITERAL = "a-zA-Z0-9\\-._~%!$&'()+,;:@"
_LITERAL_CHARS = frozenset(
    "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-._~%!$&'()+,;:@"
)
_PATH_GLOB = f"[{_LITERAL}]+"
_TEXT_GLOB = f"[{_LITERAL}/]*"


def _literal(text: str) -> str:
    if not text or not set(text) <= _LITERAL_CHARS:
        raise ValueError(f"{text!r} is not a valid literal")
    return re.escape(text)


def _variable(body: str, seen_text_glob: bool) -> tuple[str, bool]:
    name, equals, match = body.partition("=")
    if not name[:1].isalpha() or not all(c.isalnum() or c == "_" for c in name):
        raise ValueError(f"invalid variable name {name!r}")
    if len(name) > 16:
        raise ValueError(f"variable name {name!r} is longer than 16 characters")
    if not equals:
        if seen_text_glob:
            raise ValueError("'*' after '**'")
        return _PATH_GLOB, False
    if not match:
        raise ValueError(f"variable {name!r} has an empty match")
    parts = []
    text_glob = False
    for piece in match.split("/"):
        if piece in ("*", "**"):
            if seen_text_glob or text_glob:
                raise ValueError("an operator after '**'")
            text_glob = piece == "**"
            parts.append(_TEXT_GLOB if text_glob else _PATH_GLOB)
        else:
            parts.append(_literal(piece))
    return "/".join(parts), text_glob


def compile_uri_template(template: str) -> str:
    """The regex (Python ``re`` syntax, to be full-matched) of an Envoy ``uri_template`` path
    template: ``*`` is one path segment, ``**`` any number of them (last operator only),
    ``{name}`` / ``{name=a/*}`` variables; a literal after the last operator in the same segment
    is a suffix (``/**.mpd``). :class:`ValueError` when Envoy would reject the template."""
    if not template.startswith("/") or not template.isprintable() or " " in template:
        raise ValueError("a path template starts with '/' and has no spaces")
    rest = template[1:]
    segments: list[str] = []
    suffix = ""
    seen_text_glob = False
    variables: set[str] = set()
    while rest:
        if rest.startswith("*"):
            operator = "**" if rest.startswith("**") else "*"
            if seen_text_glob:
                raise ValueError("an operator after '**'")
            seen_text_glob = operator == "**"
            segments.append(_TEXT_GLOB if seen_text_glob else _PATH_GLOB)
            rest = rest[len(operator) :]
        elif rest.startswith("{"):
            body, close, after = rest[1:].partition("}")
            if not close:
                raise ValueError("unmatched '{'")
            name = body.partition("=")[0]
            if name in variables:
                raise ValueError(f"variable {name!r} is repeated")
            variables.add(name)
            if len(variables) > 5:
                raise ValueError("more than 5 variables")
            regex, text_glob = _variable(body, seen_text_glob)
            seen_text_glob = seen_text_glob or text_glob
            segments.append(f"(?:{regex})")
            rest = after
        else:
            literal, _, _ = rest.partition("/")
            segments.append(_literal(literal))
            rest = rest[len(literal) :]
        if not rest:
            break
        if rest == "/":
            segments.append("")
            break
        if rest.startswith("/"):
            rest = rest[1:]
            continue
        if "/" in rest:
            raise ValueError("a literal after an operator must end the template")
        suffix = _literal(rest)
        break
    return "/" + "/".join(segments) + suffix
