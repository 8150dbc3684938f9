"""Authorization: Envoy's HTTP RBAC filters, evaluated in-process.

The input is the RBAC filters themselves (``envoy.extensions.filters.http.rbac.v3.RBAC``), not
Istio's policies: whether they come from :func:`libmesh.xds.rbac_filters` in local mode or from
meshd over xDS, the same code decides, exactly as Envoy would for the same resources.

:meth:`Authorizer.from_filters` compiles the filters once (regexes compiled, every matcher turned
into a small closure); :meth:`Authorizer.check` then runs on every inbound request. The filters
act in chain order, as Envoy's do:

* ``DENY``: the request is denied when one of its policies matches;
* ``ALLOW``: the request is denied unless one of its policies matches (no policies: denied);
* ``LOG``: nothing is denied; a match marks the request as audited (Envoy's
  ``access_log_hint``).

The first filter that denies ends the chain. With Istio's order (AUDIT, DENY, ALLOW) that gives
Istio's rule: a DENY match denies; otherwise, if there is an ALLOW filter, only a match allows;
with no ALLOW filter everything else is allowed; AUDIT never changes the decision. A filter
without ``rules`` enforces nothing; its ``shadow_rules`` (Istio's ``istio.io/dry-run``) are
evaluated and reported in :attr:`Decision.dry_run`, never enforced. Policies within a filter are
tried in the lexicographic order of their names, as Envoy documents, so the policy a decision
names is deterministic.

Matchers follow Envoy: a header is looked up by its lower-case name, ``host`` and
``:authority`` are the same header, and a missing header matches nothing (an inverted matcher
neither, unless it tests presence); ``url_path`` and ``uri_template`` see the path without query
and fragment, with its dot segments resolved (``/public/../admin`` is ``/admin``, as after the
RFC 3986 normalization Istio configures Envoy with by default); ``authenticated`` matches only
a peer that presented a certificate, its ``principal_name`` the peer's SPIFFE ID;
``direct_remote_ip`` (and the deprecated ``source_ip``) is the physical peer and ``remote_ip``
the original client; metadata matchers read the JWT payload under
``envoy.filters.http.jwt_authn`` / ``payload`` (where Istio's translation looks) and the
request's attributes under ``istio_authn`` (where older Istio versions looked).

Anything the evaluator cannot enforce exactly (CEL conditions, matcher extensions, custom
principals, filter-state keys other than Istio's peer principal, the ``matcher`` trees) is
rejected when compiling, with an :class:`AuthzConfigError` naming the filter and the policy, so
that a client NACKs the resource instead of enforcing something else. Nothing is silently
allowed.
"""

from __future__ import annotations

import dataclasses
import functools
import ipaddress
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import re2
from envoy.config.core.v3 import address_pb2
from envoy.config.rbac.v3 import rbac_pb2
from envoy.config.route.v3 import route_components_pb2 as rc
from envoy.extensions.filters.http.rbac.v3 import rbac_pb2 as http_rbac_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm,
)
from envoy.extensions.path.match.uri_template.v3 import uri_template_match_pb2
from envoy.type.matcher.v3 import metadata_pb2, path_pb2, string_pb2, value_pb2

from .._exceptions import ConfigError
from .._frozen import EMPTY
from ..config._rules import compile_re2
from ..xds._rbac import JWT_AUTHN_FILTER, JWT_PAYLOAD_KEY, RBAC_FILTER, compile_uri_template
from ._routing import string_matcher

__all__ = ["Authorizer", "AuthzConfigError", "AuthzRequest", "Decision", "DryRun"]

RBAC_TYPE_URL = "type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBAC"
# The filter state key under which Istio's ambient proxies keep the peer's principal.
PEER_PRINCIPAL_FILTER_STATE = "io.istio.peer_principal"
ISTIO_AUTHN_FILTER = "istio_authn"
_ACTION_NAMES = {rbac_pb2.RBAC.ALLOW: "ALLOW", rbac_pb2.RBAC.DENY: "DENY", rbac_pb2.RBAC.LOG: "LOG"}


class AuthzConfigError(ConfigError):
    """An RBAC filter that the evaluator cannot enforce exactly; a client NACKs it."""


@dataclass(frozen=True, slots=True, kw_only=True)
class AuthzRequest:
    """An inbound request as RBAC sees it.

    ``principal`` is the peer's SPIFFE ID (``spiffe://cluster.local/ns/a/sa/b``) when it
    presented a client certificate, ``""`` for plaintext. ``source_ip`` is the physical peer;
    ``remote_ip`` the original client (from ``x-forwarded-for`` or PROXY protocol, when the
    caller trusts them), the peer when not given. ``path`` is ``:path`` as received; path
    matchers see it without query and fragment and with dot segments resolved. ``headers``
    must have lower-case names, repeated headers joined with ``,``. ``jwt_claims`` is the
    payload of the token that RequestAuthentication validated (``None``: no token); Istio's
    request principal is its ``iss/sub``.
    """

    method: str = "GET"
    path: str = "/"
    host: str = ""
    headers: Mapping[str, str] = EMPTY
    principal: str = ""
    source_ip: str = ""
    remote_ip: str = ""
    destination_ip: str = ""
    destination_port: int = 0
    sni: str = ""
    jwt_claims: Mapping[str, Any] | None = None

    @property
    def request_principal(self) -> str:
        """Istio's ``request.auth.principal``: ``iss/sub`` of the validated JWT, or ``""``."""
        claims = self.jwt_claims
        if claims is None:
            return ""
        return f"{claims.get('iss', '')}/{claims.get('sub', '')}"


@dataclass(frozen=True, slots=True)
class DryRun:
    """What one filter's shadow rules would have decided: ``action`` is ``ALLOW`` or ``DENY``,
    ``policy`` the shadow policy that matched (``""``: none)."""

    action: str
    allowed: bool
    policy: str


@dataclass(frozen=True, slots=True)
class Decision:
    """The outcome of :meth:`Authorizer.check`.

    ``policy`` is the DENY policy that denied, or the ALLOW policy that allowed; ``""`` when the
    request was denied because no ALLOW policy matched, or allowed with no ALLOW filter.
    ``audited`` says an AUDIT (``LOG``) policy matched, ``audit_policy`` which. ``reason`` is a
    line for logs; for denials it is Envoy's response code details
    (``rbac_access_denied_matched_policy[<policy>]``, or ``[none]``).
    """

    allowed: bool
    policy: str
    reason: str
    audited: bool = False
    audit_policy: str = ""
    dry_run: tuple[DryRun, ...] = ()


class Authorizer:
    """Compiled RBAC filters; immutable, so one instance serves every request and thread."""

    __slots__ = ("_filters",)

    def __init__(self, filters: Sequence[_Filter] = ()) -> None:
        self._filters = tuple(filters)

    @classmethod
    def from_filters(cls, filters: Iterable[http_rbac_pb2.RBAC]) -> Authorizer:
        """Compile HTTP RBAC filter configurations, in filter-chain order.

        :class:`AuthzConfigError` when one uses something the evaluator does not implement."""
        return cls([_compile_filter(f, i) for i, f in enumerate(filters)])

    @classmethod
    def from_http_filters(cls, filters: Iterable[hcm.HttpFilter]) -> Authorizer:
        """Compile the RBAC filters of an HTTP connection manager's filter chain (the others,
        and filters disabled by default, are skipped). An RBAC filter whose configuration is not
        inline (discovered over ECDS, or a typed struct) is an :class:`AuthzConfigError`: it
        cannot be skipped without allowing what it would deny."""
        configs = []
        for index, http_filter in enumerate(filters):
            if http_filter.disabled:
                continue
            typed = http_filter.typed_config
            if typed.type_url == RBAC_TYPE_URL:
                config = http_rbac_pb2.RBAC()
                typed.Unpack(config)
                configs.append(config)
            elif http_filter.name == RBAC_FILTER or RBAC_TYPE_URL in {
                "type.googleapis.com/" + t.rpartition("/")[2]
                for t in http_filter.config_discovery.type_urls
            }:
                raise AuthzConfigError(
                    f"HTTP filter #{index} {http_filter.name!r}: an RBAC filter needs its "
                    f"configuration inline as {RBAC_TYPE_URL} (the resource is rejected)"
                )
        return cls.from_filters(configs)

    @property
    def empty(self) -> bool:
        """No filters: every request is allowed, and nothing needs looking at."""
        return not self._filters

    @property
    def enforces(self) -> bool:
        """Whether any filter can deny a request."""
        return any(
            f.rules is not None and f.rules.action != rbac_pb2.RBAC.LOG for f in self._filters
        )

    def check(self, request: AuthzRequest) -> Decision:
        """Whether ``request`` may proceed, and why."""
        context = _Context(request)
        audit_policy: str | None = None
        dry_run: list[DryRun] | None = None
        decision = _ALLOWED_WITHOUT_ALLOW_FILTER
        for compiled in self._filters:
            if compiled.shadow is not None:
                if dry_run is None:
                    dry_run = []
                dry_run.append(compiled.shadow.dry_run(context))
            engine = compiled.rules
            if engine is None:
                continue
            matched = engine.first_match(context)
            if engine.action == rbac_pb2.RBAC.DENY:
                if matched is not None:
                    decision = engine.outcomes[matched]
                    break
            elif engine.action == rbac_pb2.RBAC.ALLOW:
                if matched is None:
                    decision = _DENIED_WITHOUT_MATCH
                    break
                decision = engine.outcomes[matched]
            elif matched is not None and audit_policy is None:
                audit_policy = matched
        if audit_policy is None and dry_run is None:
            return decision
        return dataclasses.replace(
            decision,
            audited=audit_policy is not None,
            audit_policy=audit_policy or "",
            dry_run=tuple(dry_run or ()),
        )


_ALLOWED_WITHOUT_ALLOW_FILTER = Decision(
    True, "", "allowed: no DENY policy matched and no ALLOW policy applies"
)
_DENIED_WITHOUT_MATCH = Decision(False, "", "rbac_access_denied_matched_policy[none]")


def _outcome(action: int, policy: str) -> Decision:
    """The decision a match of ``policy`` makes in a filter with ``action``."""
    if action == rbac_pb2.RBAC.DENY:
        return Decision(False, policy, f"rbac_access_denied_matched_policy[{policy}]")
    return Decision(True, policy, f"allowed: matched ALLOW policy {policy}")


# -- the request, as matchers read it ------------------------------------------------------------

_MISSING: Any = object()


class _Context:
    """Per-check values computed once: the URL path, and (when asked) metadata."""

    __slots__ = ("_metadata", "request", "url_path")

    def __init__(self, request: AuthzRequest) -> None:
        self.request = request
        path = request.path
        if "?" in path or "#" in path:
            path = path.partition("?")[0].partition("#")[0]
        if "%" in path:
            path = _decode_unreserved(path)
        if "/." in path or "%2" in path:
            path = _remove_dot_segments(path)
        self.url_path = path
        self._metadata: dict[str, Any] | None = None

    def metadata(self, filter_name: str) -> Any:
        """The dynamic metadata of one filter, as Envoy would hold it for this request."""
        if self._metadata is None:
            self._metadata = {}
        found = self._metadata.get(filter_name, _MISSING)
        if found is _MISSING:
            found = self._metadata[filter_name] = _metadata_of(self.request, filter_name)
        return found


_PERCENT = re.compile(r"%([0-9A-Fa-f]{2})")
_UNRESERVED = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")


def _decode_unreserved(path: str) -> str:
    """RFC 3986 section 6.2.2.2, as Envoy's path normalization (Istio's default) does: an
    encoded unreserved character is that character (``/%61dmin`` is ``/admin``, which is what
    the application's router sees); reserved ones such as ``%2F`` stay encoded."""

    def decode(match: re.Match[str]) -> str:
        character = chr(int(match.group(1), 16))
        return character if character in _UNRESERVED else match.group(0)

    return _PERCENT.sub(decode, path)


def _remove_dot_segments(path: str) -> str:
    """RFC 3986 section 5.2.4, reading ``%2e`` as ``.`` as Envoy's path normalization does."""
    if not path.startswith("/"):
        return path
    kept: list[str] = []
    segments = path[1:].split("/")
    for segment in segments:
        dots = segment.replace("%2e", ".").replace("%2E", ".") if "%" in segment else segment
        if dots == ".":
            continue
        if dots == "..":
            if kept:
                kept.pop()
            continue
        kept.append(segment)
    last = segments[-1].replace("%2e", ".").replace("%2E", ".")
    if last in (".", ".."):
        kept.append("")
    return "/" + "/".join(kept)


def _metadata_of(request: AuthzRequest, filter_name: str) -> Any:
    """What ``envoy.filters.http.jwt_authn`` stores for a validated token (its payload), and what
    the ``istio_authn`` filter of older Istio versions stored about the request."""
    claims = request.jwt_claims
    if filter_name == JWT_AUTHN_FILTER:
        return _MISSING if claims is None else {JWT_PAYLOAD_KEY: claims}
    if filter_name != ISTIO_AUTHN_FILTER:
        return _MISSING
    authn: dict[str, Any] = {}
    if request.principal:
        authn["source.principal"] = request.principal.removeprefix("spiffe://")
        namespace = _namespace_of(request.principal)
        if namespace:
            authn["source.namespace"] = namespace
    if claims is not None:
        authn["request.auth.principal"] = request.request_principal
        if "aud" in claims:
            authn["request.auth.audiences"] = claims["aud"]
        if "azp" in claims:
            authn["request.auth.presenter"] = claims["azp"]
        authn["request.auth.claims"] = claims
    return authn


def _namespace_of(spiffe_id: str) -> str:
    parts = spiffe_id.split("/")
    for i, part in enumerate(parts[:-1]):
        if part == "ns":
            return parts[i + 1]
    return ""


@functools.lru_cache(maxsize=4096)
def _ip(text: str) -> tuple[int, int] | None:
    """``(version, integer)`` of an address; ``None`` when it is not one."""
    try:
        address = ipaddress.ip_address(text.strip("[]"))
    except ValueError:
        return None
    return address.version, int(address)


# -- compiling -----------------------------------------------------------------------------------

Check = Callable[[_Context], bool]
TextCheck = Callable[[str], bool]


def _always(context: _Context) -> bool:
    return True


class _Unsupported(Exception):
    """Raised while compiling; becomes an AuthzConfigError that names the policy."""

    def __init__(self, where: str, message: str) -> None:
        super().__init__(f"{where}: {message}")


@dataclass(frozen=True, slots=True)
class _Engine:
    """One RBAC (``rules`` or ``shadow_rules``): policies in name order."""

    action: int
    policies: tuple[tuple[str, Check], ...]
    outcomes: Mapping[str, Decision]

    def first_match(self, context: _Context) -> str | None:
        for name, matches in self.policies:
            if matches(context):
                return name
        return None

    def dry_run(self, context: _Context) -> DryRun:
        matched = self.first_match(context)
        if self.action == rbac_pb2.RBAC.DENY:
            allowed = matched is None
        elif self.action == rbac_pb2.RBAC.ALLOW:
            allowed = matched is not None
        else:
            allowed = True
        return DryRun(_ACTION_NAMES[self.action], allowed, matched or "")


@dataclass(frozen=True, slots=True)
class _Filter:
    rules: _Engine | None
    shadow: _Engine | None


def _compile_filter(config: http_rbac_pb2.RBAC, index: int) -> _Filter:
    where = f"RBAC filter #{index}"
    if not isinstance(config, http_rbac_pb2.RBAC):
        raise AuthzConfigError(
            f"{where}: expected envoy.extensions.filters.http.rbac.v3.RBAC, got "
            f"{type(config).__name__}"
        )
    for field in ("matcher", "shadow_matcher"):
        if config.HasField(field):
            raise AuthzConfigError(
                f"{where}: {field}: RBAC match trees are not supported by libmesh's "
                "authorizer; express the policies in 'rules' instead (the resource is rejected)"
            )
    rules = _compile_rbac(config.rules, f"{where} rules") if config.HasField("rules") else None
    shadow = (
        _compile_rbac(config.shadow_rules, f"{where} shadow_rules")
        if config.HasField("shadow_rules")
        else None
    )
    return _Filter(rules, shadow)


def _compile_rbac(rbac: rbac_pb2.RBAC, where: str) -> _Engine:
    if rbac.action not in _ACTION_NAMES:
        raise AuthzConfigError(f"{where}: unknown action {rbac.action}")
    policies = []
    for name in sorted(rbac.policies):
        try:
            policies.append((name, _compile_policy(rbac.policies[name])))
        except _Unsupported as exc:
            raise AuthzConfigError(
                f"{where}: policy {name!r}: {exc}; libmesh cannot enforce it exactly, so the "
                "resource is rejected"
            ) from exc
    outcomes = {name: _outcome(rbac.action, name) for name, _ in policies}
    return _Engine(rbac.action, tuple(policies), outcomes)


def _compile_policy(policy: rbac_pb2.Policy) -> Check:
    for field in ("condition", "checked_condition", "cel_config"):
        if policy.HasField(field):
            raise _Unsupported(field, "CEL conditions are not supported")
    if not policy.permissions or not policy.principals:
        # Envoy's validation requires both; an empty list can match nothing.
        raise _Unsupported("permissions" if not policy.permissions else "principals", "is empty")
    permission = _any_of(
        [_permission(p, f"permissions[{i}]") for i, p in enumerate(policy.permissions)]
    )
    principal = _any_of(
        [_principal(p, f"principals[{i}]") for i, p in enumerate(policy.principals)]
    )
    if permission is _always:
        return principal
    if principal is _always:
        return permission

    def matches(context: _Context) -> bool:
        return permission(context) and principal(context)

    return matches


def _all_of(checks: list[Check]) -> Check:
    checks = [c for c in checks if c is not _always]
    if not checks:
        return _always
    if len(checks) == 1:
        return checks[0]
    if len(checks) == 2:
        first, second = checks

        def both(context: _Context) -> bool:
            return first(context) and second(context)

        return both
    every = tuple(checks)

    def all_match(context: _Context) -> bool:
        for check in every:  # noqa: SIM110 - a loop is faster than all() over a generator
            if not check(context):
                return False
        return True

    return all_match


def _any_of(checks: list[Check]) -> Check:
    if any(c is _always for c in checks):
        return _always
    if len(checks) == 1:
        return checks[0]
    alternatives = tuple(checks)

    def any_match(context: _Context) -> bool:
        for check in alternatives:  # noqa: SIM110 - a loop is faster than any() over a generator
            if check(context):
                return True
        return False

    return any_match


def _negate(check: Check) -> Check:
    def negated(context: _Context) -> bool:
        return not check(context)

    return negated


def _permission(p: rbac_pb2.Permission, at: str) -> Check:
    kind = p.WhichOneof("rule")
    if kind == "any":
        return _always
    if kind == "and_rules":
        return _all_of(
            [_permission(r, f"{at}.and_rules.rules[{i}]") for i, r in enumerate(p.and_rules.rules)]
        )
    if kind == "or_rules":
        return _any_of(
            [_permission(r, f"{at}.or_rules.rules[{i}]") for i, r in enumerate(p.or_rules.rules)]
        )
    if kind == "not_rule":
        return _negate(_permission(p.not_rule, f"{at}.not_rule"))
    if kind == "header":
        return _header(p.header, f"{at}.header")
    if kind == "url_path":
        return _url_path(p.url_path, f"{at}.url_path")
    if kind == "destination_ip":
        return _address_in(p.destination_ip, lambda r: r.destination_ip, f"{at}.destination_ip")
    if kind == "destination_port":
        port = p.destination_port
        return lambda context: context.request.destination_port == port
    if kind == "destination_port_range":
        start, end = p.destination_port_range.start, p.destination_port_range.end
        return lambda context: start <= context.request.destination_port < end
    if kind == "metadata":
        return _metadata(p.metadata, f"{at}.metadata")
    if kind == "requested_server_name":
        name = _string(p.requested_server_name, f"{at}.requested_server_name")
        return lambda context: name(context.request.sni)
    if kind == "uri_template":
        return _uri_template(p.uri_template, f"{at}.uri_template")
    if kind is None:
        raise _Unsupported(at, "a permission must set one rule")
    raise _Unsupported(at, f"permission kind {kind!r} is not supported")


def _principal(p: rbac_pb2.Principal, at: str) -> Check:
    kind = p.WhichOneof("identifier")
    if kind == "any":
        return _always
    if kind == "and_ids":
        return _all_of(
            [_principal(i, f"{at}.and_ids.ids[{n}]") for n, i in enumerate(p.and_ids.ids)]
        )
    if kind == "or_ids":
        return _any_of([_principal(i, f"{at}.or_ids.ids[{n}]") for n, i in enumerate(p.or_ids.ids)])
    if kind == "not_id":
        return _negate(_principal(p.not_id, f"{at}.not_id"))
    if kind == "authenticated":
        return _authenticated(p.authenticated, f"{at}.authenticated")
    if kind in ("source_ip", "direct_remote_ip"):
        return _address_in(getattr(p, kind), lambda r: r.source_ip, f"{at}.{kind}")
    if kind == "remote_ip":
        return _address_in(p.remote_ip, lambda r: r.remote_ip or r.source_ip, f"{at}.remote_ip")
    if kind == "header":
        return _header(p.header, f"{at}.header")
    if kind == "url_path":
        return _url_path(p.url_path, f"{at}.url_path")
    if kind == "metadata":
        return _metadata(p.metadata, f"{at}.metadata")
    if kind == "filter_state":
        state = p.filter_state
        if (
            state.key != PEER_PRINCIPAL_FILTER_STATE
            or state.WhichOneof("matcher") != "string_match"
        ):
            raise _Unsupported(
                f"{at}.filter_state",
                f"only a string match on {PEER_PRINCIPAL_FILTER_STATE!r} is supported",
            )
        name = _string(state.string_match, f"{at}.filter_state.string_match")
        return lambda context: bool(context.request.principal) and name(context.request.principal)
    if kind is None:
        raise _Unsupported(at, "a principal must set one identifier")
    raise _Unsupported(at, f"principal kind {kind!r} is not supported")


def _authenticated(authenticated: rbac_pb2.Principal.Authenticated, at: str) -> Check:
    if not authenticated.HasField("principal_name"):
        return lambda context: bool(context.request.principal)
    name = _string(authenticated.principal_name, f"{at}.principal_name")

    def peer_is(context: _Context) -> bool:
        principal = context.request.principal
        return bool(principal) and name(principal)

    return peer_is


def _address_in(
    cidr: address_pb2.CidrRange, address_of: Callable[[AuthzRequest], str], at: str
) -> Check:
    try:
        network = ipaddress.ip_address(cidr.address_prefix)
    except ValueError as exc:
        raise _Unsupported(at, f"{cidr.address_prefix!r} is not an IP address") from exc
    # Envoy reads an unset prefix_len as 0.
    length = cidr.prefix_len.value if cidr.HasField("prefix_len") else 0
    if length > network.max_prefixlen:
        raise _Unsupported(at, f"prefix_len {length} is longer than the address")
    version = network.version
    shift = network.max_prefixlen - length
    want = int(network) >> shift

    def inside(context: _Context) -> bool:
        parsed = _ip(address_of(context.request))
        return parsed is not None and parsed[0] == version and parsed[1] >> shift == want

    return inside


def _header_value(name: str) -> Callable[[AuthzRequest], str | None]:
    if name in (":authority", "host"):
        return lambda r: r.host or None
    if name == ":method":
        return lambda r: r.method
    if name == ":path":
        return lambda r: r.path
    return lambda r: r.headers.get(name)


def _header(h: rc.HeaderMatcher, at: str) -> Check:
    """Envoy's ``HeaderUtility::matchHeaders``."""
    value_of = _header_value(h.name.lower())
    invert = bool(h.invert_match)
    kind = h.WhichOneof("header_match_specifier")
    if kind == "present_match":
        present = bool(h.present_match)
        if h.treat_missing_header_as_empty:
            return lambda context: present != invert
        return lambda context: ((value_of(context.request) is not None) == present) != invert
    test: TextCheck
    if kind is None:
        test = lambda v: True  # noqa: E731 - Envoy: no specifier matches any present value
    elif kind == "exact_match":
        want = h.exact_match
        test = (lambda v: v == want) if want else (lambda v: True)
    elif kind == "prefix_match":
        prefix = h.prefix_match
        test = lambda v: v.startswith(prefix)  # noqa: E731
    elif kind == "suffix_match":
        suffix = h.suffix_match
        test = lambda v: v.endswith(suffix)  # noqa: E731
    elif kind == "contains_match":
        part = h.contains_match
        test = lambda v: part in v  # noqa: E731
    elif kind == "safe_regex_match":
        test = _regex(h.safe_regex_match.regex, f"{at}.safe_regex_match")
    elif kind == "string_match":
        test = _string(h.string_match, f"{at}.string_match")
    elif kind == "range_match":
        start, end = h.range_match.start, h.range_match.end
        test = lambda v: _int_in(v, start, end)  # noqa: E731
    else:
        raise _Unsupported(at, f"header match {kind!r} is not supported")
    missing_as_empty = h.treat_missing_header_as_empty

    def header_matches(context: _Context) -> bool:
        value = value_of(context.request)
        if value is None:
            if not missing_as_empty:
                return False
            value = ""
        return test(value) != invert

    return header_matches


def _int_in(text: str, start: int, end: int) -> bool:
    """absl's ``SimpleAtoi`` (surrounding spaces and a sign allowed, nothing else), then the
    half-open range."""
    text = text.strip()
    digits = text[1:] if text[:1] in ("+", "-") else text
    if not (digits.isascii() and digits.isdigit()):
        return False
    return start <= int(text) < end


def _url_path(m: path_pb2.PathMatcher, at: str) -> Check:
    if m.WhichOneof("rule") != "path":
        raise _Unsupported(at, "a path matcher must set 'path'")
    test = _string(m.path, f"{at}.path")
    return lambda context: test(context.url_path)


def _uri_template(config: Any, at: str) -> Check:
    template = uri_template_match_pb2.UriTemplateMatchConfig()
    if not config.typed_config.Is(template.DESCRIPTOR):
        raise _Unsupported(at, f"extension {config.typed_config.type_url!r} is not supported")
    config.typed_config.Unpack(template)
    try:
        pattern = re.compile(compile_uri_template(template.path_template))
    except ValueError as exc:
        raise _Unsupported(at, f"path template {template.path_template!r}: {exc}") from exc
    return lambda context: pattern.fullmatch(context.url_path) is not None


# -- strings -------------------------------------------------------------------------------------


def _string(m: string_pb2.StringMatcher, at: str) -> TextCheck:
    """Envoy's ``StringMatcher``: ``ignore_case`` folds exact, prefix, suffix and contains, never
    a regex."""
    kind = m.WhichOneof("match_pattern")
    if kind in ("exact", "prefix", "suffix", "contains"):
        return string_matcher(m)  # the routes' own: one reading of Envoy's matcher
    if kind == "safe_regex":
        return _regex(m.safe_regex.regex, f"{at}.safe_regex")
    if kind is None:
        raise _Unsupported(at, "a string matcher must set one pattern")
    raise _Unsupported(at, f"string match {kind!r} is not supported")


def _regex(pattern: str, at: str) -> TextCheck:
    """A full match, with RE2's semantics. Patterns that are literals joined by ``.*`` / ``.+``
    (what Istio's translation mostly generates) are matched without a regex engine; the rest with
    RE2, linear in the input as in Envoy."""
    try:
        compiled = compile_re2(pattern)
    except re2.error as exc:
        detail = exc.args[0].decode() if exc.args and isinstance(exc.args[0], bytes) else exc
        raise _Unsupported(at, f"{pattern!r} is not a valid RE2 regex ({detail})") from exc
    slow = _re2_full_match(compiled)
    glob = _glob(pattern)
    if glob is None:
        return slow
    return _glob_matcher(*glob, slow)


def _re2_full_match(compiled: Any) -> TextCheck:
    # The wrapper's fullmatch() builds a match object in Python; the pybind object under it
    # answers the same question several times faster.
    raw = getattr(compiled, "_regexp", None)
    anchor = getattr(getattr(re2, "_Anchor", None), "ANCHOR_BOTH", None)
    if raw is None or anchor is None:
        return lambda v: compiled.fullmatch(v) is not None

    def full_match(text: str) -> bool:
        data = text.encode()
        return bool(raw.Match(anchor, data, 0, len(data))[0][0] >= 0)

    return full_match


_REGEX_SYNTAX = frozenset("\\.+*?()|[]{}^$")


def _glob(pattern: str) -> tuple[tuple[str, ...], tuple[int, ...]] | None:
    """``pattern`` as literals and the minimum length of the wildcard before each one, when it
    is only literals and ``.*`` / ``.+``; ``None`` otherwise."""
    literals = [""]
    gaps: list[int] = []
    i = 0
    wildcard_open = False
    while i < len(pattern):
        c = pattern[i]
        if c == "\\":
            if i + 1 >= len(pattern) or pattern[i + 1].isalnum() or pattern[i + 1] == "_":
                return None
            c = pattern[i + 1]
            i += 2
        elif c == "." and i + 1 < len(pattern) and pattern[i + 1] in "*+":
            minimum = 1 if pattern[i + 1] == "+" else 0
            if i + 2 < len(pattern) and pattern[i + 2] in "*+?{":
                return None
            if wildcard_open:
                gaps[-1] += minimum
            else:
                gaps.append(minimum)
                literals.append("")
                wildcard_open = True
            i += 2
            continue
        elif c in _REGEX_SYNTAX:
            return None
        else:
            i += 1
        literals[-1] += c
        wildcard_open = False
    return tuple(literals), tuple(gaps)


def _glob_matcher(literals: tuple[str, ...], gaps: tuple[int, ...], slow: TextCheck) -> TextCheck:
    if not gaps:
        (only,) = literals
        return only.__eq__
    first, last, middle = literals[0], literals[-1], literals[1:-1]

    def glob_match(text: str) -> bool:
        if "\n" in text:  # '.' does not match a newline: leave it to RE2
            return slow(text)
        if not text.startswith(first) or not text.endswith(last):
            return False
        position, end = len(first), len(text) - len(last)
        if end < position:
            return False
        for literal, gap in zip(middle, gaps, strict=False):
            found = text.find(literal, position + gap, end)
            if found < 0:
                return False
            position = found + len(literal)
        return end - position >= gaps[-1]

    return glob_match


# -- metadata ------------------------------------------------------------------------------------


def _metadata(m: metadata_pb2.MetadataMatcher, at: str) -> Check:
    """Envoy's ``MetadataMatcher``: the value at ``filter`` / ``path``, then ``invert``."""
    keys = []
    for i, segment in enumerate(m.path):
        if segment.WhichOneof("segment") != "key":
            raise _Unsupported(f"{at}.path[{i}]", "a path segment must be a key")
        keys.append(segment.key)
    if not m.HasField("value"):
        raise _Unsupported(at, "a metadata matcher needs a value matcher")
    test = _value(m.value, f"{at}.value")
    filter_name, invert, path = str(m.filter), bool(m.invert), tuple(keys)

    def metadata_matches(context: _Context) -> bool:
        value = context.metadata(filter_name)
        for key in path:
            value = value.get(key, _MISSING) if isinstance(value, Mapping) else _MISSING
        return test(value) != invert

    return metadata_matches


def _value(m: value_pb2.ValueMatcher, at: str) -> Callable[[Any], bool]:
    """Envoy's ``ValueMatcher`` over JSON values (a JWT payload's numbers are all doubles to
    Envoy, so ints and floats both count as numbers)."""
    kind = m.WhichOneof("match_pattern")
    if kind == "string_match":
        test = _string(m.string_match, f"{at}.string_match")
        return lambda v: isinstance(v, str) and test(v)
    if kind == "or_match":
        alternatives = [
            _value(v, f"{at}.or_match.value_matchers[{i}]")
            for i, v in enumerate(m.or_match.value_matchers)
        ]
        return lambda v: any(alternative(v) for alternative in alternatives)
    if kind == "list_match":
        if m.list_match.WhichOneof("match_pattern") != "one_of":
            raise _Unsupported(f"{at}.list_match", "a list matcher must set one_of")
        element = _value(m.list_match.one_of, f"{at}.list_match.one_of")
        return lambda v: isinstance(v, (list, tuple)) and any(element(e) for e in v)
    if kind == "present_match":
        if not m.present_match:
            return lambda v: False
        return lambda v: v is not _MISSING
    if kind == "null_match":
        return lambda v: v is None
    if kind == "bool_match":
        want = m.bool_match
        return lambda v: isinstance(v, bool) and v == want
    if kind == "double_match":
        double = m.double_match
        if double.WhichOneof("match_pattern") == "exact":
            exact = double.exact
            return lambda v: _is_number(v) and float(v) == exact
        if double.WhichOneof("match_pattern") == "range":
            start, end = double.range.start, double.range.end
            return lambda v: _is_number(v) and start <= float(v) < end
        raise _Unsupported(f"{at}.double_match", "a double matcher must set exact or range")
    if kind is None:
        raise _Unsupported(at, "a value matcher must set one pattern")
    raise _Unsupported(at, f"value match {kind!r} is not supported")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
