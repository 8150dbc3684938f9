"""Route matching and route decisions, compiled once per configuration from RouteConfigurations.

Matching follows Envoy's RouteMatch: the path (prefix, exact, RE2 regex, optionally
case-insensitive), headers (exact, prefix, suffix, contains, regex, presence, inverted) and query
parameters; the first route that matches wins.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from envoy.config.route.v3 import route_components_pb2 as rc
from envoy.config.route.v3 import route_pb2
from envoy.extensions.filters.http.fault.v3 import fault_pb2
from envoy.type.matcher.v3 import string_pb2

from ..config._rules import compile_re2
from ._request import RequestView
from ._retry import RetryPolicy
from ._units import fraction, seconds

__all__ = [
    "NO_HEADERS",
    "DirectResponse",
    "FaultPolicy",
    "Forward",
    "HashPolicy",
    "HeaderOps",
    "MirrorPolicy",
    "Redirect",
    "RouteTable",
    "WeightedPicker",
]

FAULT_FILTER = "envoy.filters.http.fault"

Matcher = Callable[[str], bool]


def string_matcher(m: string_pb2.StringMatcher) -> Matcher:
    kind = m.WhichOneof("match_pattern")
    fold = m.ignore_case
    if kind == "exact":
        want = m.exact.lower() if fold else m.exact
        return (lambda v: v.lower() == want) if fold else (lambda v: v == want)
    if kind == "prefix":
        want = m.prefix.lower() if fold else m.prefix
        return (lambda v: v.lower().startswith(want)) if fold else (lambda v: v.startswith(want))
    if kind == "suffix":
        want = m.suffix.lower() if fold else m.suffix
        return (lambda v: v.lower().endswith(want)) if fold else (lambda v: v.endswith(want))
    if kind == "contains":
        want = m.contains.lower() if fold else m.contains
        return (lambda v: want in v.lower()) if fold else (lambda v: want in v)
    if kind == "safe_regex":
        regex = compile_re2(m.safe_regex.regex)
        return lambda v: regex.fullmatch(v) is not None
    return lambda v: True


@dataclass(frozen=True, slots=True)
class _HeaderCheck:
    name: str
    matcher: Matcher | None  # None: presence
    invert: bool

    def __call__(self, request: RequestView) -> bool:
        value = request.header(self.name)
        if self.matcher is None:
            found = value is not None
        else:
            found = value is not None and self.matcher(value)
        return found != self.invert


def _header_check(h: rc.HeaderMatcher) -> _HeaderCheck:
    kind = h.WhichOneof("header_match_specifier")
    matcher: Matcher | None
    if kind == "string_match":
        matcher = string_matcher(h.string_match)
    elif kind == "exact_match":
        want = h.exact_match
        matcher = want.__eq__
    elif kind == "prefix_match":
        matcher = _starts(h.prefix_match)
    elif kind == "suffix_match":
        matcher = _ends(h.suffix_match)
    elif kind == "safe_regex_match":
        regex = compile_re2(h.safe_regex_match.regex)
        matcher = lambda v: regex.fullmatch(v) is not None  # noqa: E731
    elif kind == "present_match":
        matcher = None
        if not h.present_match:
            return _HeaderCheck(h.name.lower(), None, not h.invert_match)
    else:
        matcher = None
    return _HeaderCheck(h.name.lower(), matcher, h.invert_match)


def _starts(prefix: str) -> Matcher:
    return lambda v: v.startswith(prefix)


def _ends(suffix: str) -> Matcher:
    return lambda v: v.endswith(suffix)


@dataclass(frozen=True, slots=True)
class _QueryCheck:
    name: str
    matcher: Matcher | None

    def __call__(self, request: RequestView) -> bool:
        value = request.query_param(self.name)
        if value is None:
            return False
        return self.matcher is None or self.matcher(value)


def _path_matcher(match: rc.RouteMatch) -> Matcher | None:
    """The path test of a route; ``None`` when every path matches (``prefix: /``)."""
    sensitive = not match.HasField("case_sensitive") or match.case_sensitive.value
    kind = match.WhichOneof("path_specifier")
    if kind == "prefix":
        prefix = match.prefix if sensitive else match.prefix.lower()
        if prefix == "/":
            return None
        return _starts(prefix) if sensitive else (lambda p: p.lower().startswith(prefix))
    if kind == "path":
        path = match.path if sensitive else match.path.lower()
        return path.__eq__ if sensitive else (lambda p: p.lower() == path)
    if kind == "safe_regex":
        regex = compile_re2(match.safe_regex.regex)
        return lambda p: regex.fullmatch(p) is not None
    if kind == "path_separated_prefix":
        prefix = match.path_separated_prefix
        return lambda p: p == prefix or p.startswith(prefix + "/")
    return lambda p: True


# -- decisions ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class HeaderOps:
    """Header rewriting: (name, value, append) to add, names to remove."""

    add: tuple[tuple[str, str, bool], ...] = ()
    remove: tuple[str, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.add or self.remove)

    @classmethod
    def of(cls, adds: Sequence[object], removes: Sequence[str]) -> HeaderOps:
        ops = []
        for option in adds:
            header = option.header  # type: ignore[attr-defined]
            append = option.append_action == option.APPEND_IF_EXISTS_OR_ADD  # type: ignore[attr-defined]
            ops.append((header.key, header.value, append))
        return cls(tuple(ops), tuple(removes)) if ops or removes else NO_HEADERS

    def merged(self, other: HeaderOps) -> HeaderOps:
        if other is NO_HEADERS:
            return self
        if self is NO_HEADERS:
            return other
        return HeaderOps(self.add + other.add, self.remove + other.remove)


NO_HEADERS = HeaderOps()  # nothing to change: hot paths test ``is NO_HEADERS``


@dataclass(frozen=True, slots=True)
class FaultPolicy:
    delay: float = 0.0
    delay_fraction: float = 0.0  # 0..1
    abort_status: int | None = None
    abort_grpc_status: int | None = None
    abort_fraction: float = 0.0

    @classmethod
    def of(cls, fault: fault_pb2.HTTPFault) -> FaultPolicy:
        delay = seconds(fault.delay.fixed_delay) if fault.delay.HasField("fixed_delay") else 0.0
        kind = fault.abort.WhichOneof("error_type") if fault.HasField("abort") else None
        return cls(
            delay=delay,
            delay_fraction=fraction(fault.delay.percentage) if delay else 0.0,
            abort_status=fault.abort.http_status if kind == "http_status" else None,
            abort_grpc_status=fault.abort.grpc_status if kind == "grpc_status" else None,
            abort_fraction=fraction(fault.abort.percentage) if kind else 0.0,
        )


@dataclass(frozen=True, slots=True)
class MirrorPolicy:
    cluster: str
    fraction: float  # 0..1


@dataclass(frozen=True, slots=True)
class HashPolicy:
    kind: str  # "header", "cookie", "source_ip", "query"
    name: str = ""
    cookie_ttl: float | None = None
    cookie_path: str = ""


class WeightedPicker:
    """Smooth weighted round robin (nginx's): exact long-run proportions, evenly interleaved,
    so that 90/10 sends exactly 9 of every 10 requests to the first target."""

    __slots__ = ("_current", "_lock", "_targets", "_total", "_weights")

    def __init__(self, targets: Sequence[tuple[str, int]]) -> None:
        self._targets = [name for name, _ in targets]
        self._weights = [weight for _, weight in targets]
        self._total = sum(self._weights)
        self._current = [0] * len(targets)
        self._lock = threading.Lock()

    @property
    def targets(self) -> list[tuple[str, int]]:
        return list(zip(self._targets, self._weights, strict=True))

    def pick(self) -> str:
        if len(self._targets) == 1 or self._total == 0:
            return self._targets[0]
        with self._lock:
            best = 0
            current = self._current
            for i, weight in enumerate(self._weights):
                current[i] += weight
                if current[i] > current[best]:
                    best = i
            current[best] -= self._total
        return self._targets[best]


@dataclass(frozen=True, slots=True)
class Forward:
    """Send the request upstream."""

    route_name: str
    picker: WeightedPicker
    cluster_headers: dict[str, tuple[HeaderOps, HeaderOps]]  # request, response: merged
    timeout: float | None
    retry: RetryPolicy | None
    hash_policies: tuple[HashPolicy, ...]
    mirrors: tuple[MirrorPolicy, ...]
    fault: FaultPolicy | None
    request_headers: HeaderOps
    response_headers: HeaderOps
    prefix_rewrite: str | None
    matched_prefix: str | None
    regex_rewrite: tuple[object, str] | None
    host_rewrite: str | None
    hedge_on_per_try_timeout: bool
    hedge_initial_requests: int

    @property
    def rewrites(self) -> bool:
        return self.prefix_rewrite is not None or self.regex_rewrite is not None


@dataclass(frozen=True, slots=True)
class Redirect:
    route_name: str
    status: int
    scheme: str | None
    host: str | None
    port: int | None
    path: str | None
    prefix_rewrite: str | None
    matched_prefix: str | None
    strip_query: bool

    def location(self, request: RequestView) -> str:
        host, _, port = request.authority.partition(":")
        if self.host:
            host = self.host
        if self.port:
            port = str(self.port)
        scheme = self.scheme or request.scheme
        path = request.path
        if self.path is not None:
            path = self.path
        elif self.prefix_rewrite is not None and self.matched_prefix is not None:
            path = self.prefix_rewrite + path[len(self.matched_prefix) :]
        default_port = {"http": "80", "https": "443"}.get(scheme)
        authority = host if not port or port == default_port else f"{host}:{port}"
        query = "" if self.strip_query or not request.query else "?" + request.query
        return f"{scheme}://{authority}{path}{query}"


@dataclass(frozen=True, slots=True)
class DirectResponse:
    route_name: str
    status: int
    body: bytes
    fault: FaultPolicy | None
    response_headers: HeaderOps


Decision = Forward | Redirect | DirectResponse

_REDIRECT_STATUS = {0: 301, 1: 302, 2: 303, 3: 307, 4: 308}


@dataclass(frozen=True, slots=True)
class _Route:
    path: Matcher | None
    checks: tuple[Callable[[RequestView], bool], ...]
    decision: Decision

    def matches(self, request: RequestView) -> bool:
        if self.path is not None and not self.path(request.path):
            return False
        return all(check(request) for check in self.checks)


@dataclass
class RouteTable:
    """The routes of one listener (``host:port``), in order."""

    name: str
    routes: list[_Route] = field(default_factory=list)

    @classmethod
    def compile(cls, config: route_pb2.RouteConfiguration) -> RouteTable:
        table = cls(config.name)
        for vhost in config.virtual_hosts:
            for route in vhost.routes:
                table.routes.append(_compile_route(route))
        return table

    def match(self, request: RequestView) -> Decision | None:
        for route in self.routes:
            if route.path is None and not route.checks:
                return route.decision  # a catch-all: nothing about the request to look at
            if route.matches(request):
                return route.decision
        return None


def _compile_route(route: rc.Route) -> _Route:
    match = route.match
    checks: list[Callable[[RequestView], bool]] = [_header_check(h) for h in match.headers]
    for q in match.query_parameters:
        kind = q.WhichOneof("query_parameter_match_specifier")
        checks.append(
            _QueryCheck(q.name, string_matcher(q.string_match) if kind == "string_match" else None)
        )
    prefix = match.prefix if match.WhichOneof("path_specifier") == "prefix" else None
    fault = None
    if FAULT_FILTER in route.typed_per_filter_config:
        proto = fault_pb2.HTTPFault()
        route.typed_per_filter_config[FAULT_FILTER].Unpack(proto)
        fault = FaultPolicy.of(proto)
    response_headers = HeaderOps.of(route.response_headers_to_add, route.response_headers_to_remove)
    request_headers = HeaderOps.of(route.request_headers_to_add, route.request_headers_to_remove)
    kind = route.WhichOneof("action")
    decision: Decision
    if kind == "redirect":
        r = route.redirect
        decision = Redirect(
            route_name=route.name,
            status=_REDIRECT_STATUS.get(r.response_code, 301),
            scheme=r.scheme_redirect or ("https" if r.https_redirect else None),
            host=r.host_redirect or None,
            port=r.port_redirect or None,
            path=r.path_redirect
            if r.WhichOneof("path_rewrite_specifier") == "path_redirect"
            else None,
            prefix_rewrite=r.prefix_rewrite
            if r.WhichOneof("path_rewrite_specifier") == "prefix_rewrite"
            else None,
            matched_prefix=prefix,
            strip_query=r.strip_query,
        )
    elif kind == "direct_response":
        d = route.direct_response
        body_kind = d.body.WhichOneof("specifier") if d.HasField("body") else None
        body = (
            d.body.inline_string.encode()
            if body_kind == "inline_string"
            else d.body.inline_bytes
            if body_kind == "inline_bytes"
            else b""
        )
        decision = DirectResponse(route.name, d.status, body, fault, response_headers)
    else:
        decision = _forward(route, prefix, fault, request_headers, response_headers)
    return _Route(_path_matcher(match), tuple(checks), decision)


def _forward(
    route: rc.Route,
    prefix: str | None,
    fault: FaultPolicy | None,
    request_headers: HeaderOps,
    response_headers: HeaderOps,
) -> Forward:
    action = route.route
    cluster_headers: dict[str, tuple[HeaderOps, HeaderOps]] = {}
    if action.WhichOneof("cluster_specifier") == "weighted_clusters":
        targets = []
        for entry in action.weighted_clusters.clusters:
            targets.append((entry.name, entry.weight.value))
            ops = HeaderOps.of(entry.request_headers_to_add, entry.request_headers_to_remove)
            response = HeaderOps.of(entry.response_headers_to_add, entry.response_headers_to_remove)
            if ops or response:
                # Route-level operations first, then the destination's, as Envoy applies them.
                cluster_headers[entry.name] = (
                    request_headers.merged(ops),
                    response_headers.merged(response),
                )
        picker = WeightedPicker(targets)
    else:
        picker = WeightedPicker([(action.cluster, 1)])
    timeout = seconds(action.timeout) if action.HasField("timeout") else 15.0  # Envoy's default
    hash_policies = []
    for policy in action.hash_policy:
        kind = policy.WhichOneof("policy_specifier")
        if kind == "header":
            hash_policies.append(HashPolicy("header", policy.header.header_name.lower()))
        elif kind == "cookie":
            ttl = seconds(policy.cookie.ttl) if policy.cookie.HasField("ttl") else None
            hash_policies.append(HashPolicy("cookie", policy.cookie.name, ttl, policy.cookie.path))
        elif kind == "connection_properties":
            hash_policies.append(HashPolicy("source_ip"))
        elif kind == "query_parameter":
            hash_policies.append(HashPolicy("query", policy.query_parameter.name))
    mirrors = tuple(
        MirrorPolicy(
            m.cluster,
            fraction(m.runtime_fraction.default_value) if m.HasField("runtime_fraction") else 1.0,
        )
        for m in action.request_mirror_policies
    )
    regex_rewrite = None
    if action.HasField("regex_rewrite"):
        regex_rewrite = (
            compile_re2(action.regex_rewrite.pattern.regex),
            action.regex_rewrite.substitution,
        )
    hedge = action.hedge_policy
    return Forward(
        route_name=route.name,
        picker=picker,
        cluster_headers=cluster_headers,
        timeout=timeout or None,
        retry=RetryPolicy.of(action.retry_policy) if action.HasField("retry_policy") else None,
        hash_policies=tuple(hash_policies),
        mirrors=mirrors,
        fault=fault,
        request_headers=request_headers,
        response_headers=response_headers,
        prefix_rewrite=action.prefix_rewrite or None,
        matched_prefix=prefix,
        regex_rewrite=regex_rewrite,
        host_rewrite=action.host_rewrite_literal or None,
        hedge_on_per_try_timeout=action.HasField("hedge_policy") and hedge.hedge_on_per_try_timeout,
        hedge_initial_requests=hedge.initial_requests.value
        if hedge.HasField("initial_requests")
        else 1,
    )
