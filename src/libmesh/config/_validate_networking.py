"""Istio's validation rules for VirtualService, DestinationRule, ServiceEntry and WorkloadEntry.

Follows istio/istio ``pkg/config/validation`` rule for rule; where libmesh is stricter than
Istio the comment says so and why.
"""

from __future__ import annotations

from collections.abc import Iterable

from ._findings import Codes
from ._hosts import host_matches, is_subset_of
from ._networking import (
    ClientTLSSettings,
    ConnectionPoolSettings,
    DestinationRule,
    HTTPRoute,
    LoadBalancerSettings,
    OutlierDetection,
    Percent,
    Resolution,
    ServiceEntry,
    StringMatch,
    TLSMode,
    VirtualService,
    WorkloadEntry,
)
from ._rules import (
    GRPC_STATUS_NAMES,
    HTTP_METHODS,
    TCP_PROTOCOLS,
    check_cors_header_name,
    check_export_to,
    check_fqdn,
    check_header_name,
    check_header_operation_name,
    check_header_value,
    check_http_status,
    check_ip_or_cidr,
    check_label_key,
    check_label_value,
    check_localities,
    check_port,
    check_port_name,
    check_protocol,
    check_regex,
    check_retry_on,
    check_unix_address,
    check_wildcard_domain,
    is_dns1123_label,
    is_ip,
    is_jwt_claim_route,
    is_partial_wildcard,
    is_prime,
    parse_protocol,
)
from ._unreachable import analyze_unreachable_rules
from ._validate import Cursor

__all__ = [
    "check_labels",
    "check_workload_selector",
    "validate_destination_rule",
    "validate_service_entry",
    "validate_virtual_service",
    "validate_workload_entry",
]

_MAX_DIRECT_RESPONSE = 1024 * 1024
_WARN_DIRECT_RESPONSE = 100 * 1024

# -- shared --------------------------------------------------------------------------------------


def check_labels(c: Cursor, field: str) -> None:
    for key, value in getattr(c.node, field).items():
        c.check(check_label_key(key), field, key)
        c.check(check_label_value(value), field, key)


def check_workload_selector(c: Cursor, field: str, labels_field: str) -> None:
    """A policy selector: no empty keys, no wildcards; a selector without labels selects all."""
    if getattr(c.node, field) is None:
        return
    selector = c.child(field)
    labels = getattr(selector.node, labels_field)
    for key, value in labels.items():
        if not key:
            selector.error("an empty label key is not allowed in a selector", labels_field, key)
        if "*" in key or "*" in value:
            selector.error(
                f"wildcards are not supported in selectors ({key}={value})", labels_field, key
            )
    if not labels:
        selector.warning("this selector has no labels, so it selects every workload")


def _check_percentage(c: Cursor, field: str) -> None:
    percent: Percent | None = getattr(c.node, field)
    if percent is None or percent.value is None:
        return
    value = percent.value
    if value < 0 or value > 100 or 0 < value < 0.0001:
        c.child(field).error(
            f"percentage {value:g} is neither 0 nor in the range 0.0001..100", "value"
        )


def _check_ms_precision(c: Cursor, field: str) -> None:
    duration = getattr(c.node, field)
    # Below 1ms the decoder already reported the minimum; one finding per mistake is enough.
    if duration is not None and duration.nanos >= 1_000_000 and duration.nanos % 1_000_000:
        c.error(f"duration {duration} is finer than the supported millisecond precision", field)


def check_destination(c: Cursor) -> None:
    destination = c.node
    if destination.host == "*":
        c.error("'*' is not a valid destination host: name one service", "host")
    else:
        c.check(check_wildcard_domain(destination.host), "host")
    if destination.subset and not is_dns1123_label(destination.subset):
        c.error(f"subset name {destination.subset!r} is not a DNS-1123 label", "subset")
    if destination.port is not None:
        c.child("port").check(check_port(destination.port.number or 0), "number")


# -- VirtualService ------------------------------------------------------------------------------


def validate_virtual_service(c: Cursor) -> None:
    vs: VirtualService = c.node
    is_delegate = not vs.hosts
    if is_delegate:
        if vs.gateways:
            c.error(
                "a delegate VirtualService (one without hosts) cannot name gateways", "gateways"
            )
        if vs.tls:
            c.error("a delegate VirtualService (one without hosts) cannot have tls routes", "tls")
        if vs.tcp:
            c.error("a delegate VirtualService (one without hosts) cannot have tcp routes", "tcp")
    _check_gateway_names(c, "gateways", warn_legacy=True)
    applies_to_gateway = bool(vs.gateways) and "mesh" not in vs.gateways
    if not applies_to_gateway:
        for i, http in enumerate(vs.http):
            for j, match in enumerate(http.match):
                for field in ("headers", "without_headers"):
                    for key in getattr(match, field):
                        if is_jwt_claim_route(key):
                            c.child("http", i).child("match", j).error(
                                f"routing on JWT claims ({key}) works only for gateways, "
                                "and this VirtualService applies to the mesh",
                                field,
                                key,
                            )
    hosts_valid = True
    for i, host in enumerate(vs.hosts):
        problem = check_wildcard_domain(host)
        if problem and not is_ip(host):
            c.error(problem, "hosts", i)
            hosts_valid = False
        elif host == "*" and not applies_to_gateway:
            c.error(
                "the wildcard host '*' is not allowed for mesh traffic; name the hosts", "hosts", i
            )
    if hosts_valid:
        for i, a in enumerate(vs.hosts):
            for b in vs.hosts[i + 1 :]:
                if host_matches(a, b):
                    c.error(f"hosts {a!r} and {b!r} overlap; list each host once", "hosts", i)
    if not (vs.http or vs.tcp or vs.tls):
        c.error("a VirtualService needs at least one http, tcp or tls route")
    for _, http_route in c.items("http"):
        _validate_http_route(http_route, is_delegate=is_delegate)
    for _, tls_route in c.items("tls"):
        _validate_tls_route(tls_route, vs)
    for _, tcp_route in c.items("tcp"):
        _validate_tcp_route(tcp_route)
    for problem in check_export_to(vs.export_to, c.resource.namespace, service_entry=False):
        c.error(problem, "export_to")
    analyze_unreachable_rules(c)


def _check_gateway_names(c: Cursor, field: str, *, warn_legacy: bool) -> None:
    for i, name in enumerate(getattr(c.node, field)):
        namespace, slash, gateway = name.partition("/")
        if not slash:
            if "." in name and warn_legacy:
                parts = name.split(".")
                c.warning(
                    f"gateway {name!r} uses the legacy format; prefer namespace/name: "
                    f"'{parts[1]}/{parts[0]}'",
                    field,
                    i,
                )
            c.check(check_fqdn(name), field, i)
            continue
        if not namespace or not gateway:
            c.error(f"gateway {name!r}: both the namespace and the name must be given", field, i)
        elif not is_dns1123_label(namespace):
            c.error(f"gateway {name!r}: {namespace!r} is not a valid namespace", field, i)
        elif not is_dns1123_label(gateway):
            c.error(f"gateway {name!r}: {gateway!r} is not a valid gateway name", field, i)


def _validate_http_route(c: Cursor, *, is_delegate: bool) -> None:
    route: HTTPRoute = c.node
    is_root = not is_delegate and route.delegate is not None
    if is_root:
        if route.redirect is not None:
            c.error("a route that delegates cannot also redirect", "redirect")
        if route.route:
            c.error("a route that delegates cannot also have destinations", "route")
    else:
        if is_delegate and route.delegate is not None:
            c.error("a delegate VirtualService cannot delegate again", "delegate")
        _check_route_conflicts(c)
    for _, match in c.items("match"):
        _validate_http_match(match)
    if route.headers is not None:
        _check_header_operations(c.child("headers"))
    for _, destination in c.items("route"):
        if destination.node.headers is not None:
            _check_header_operations(destination.child("headers"))
    if route.cors_policy is not None:
        _validate_cors(c.child("cors_policy"))
    if route.rewrite is not None:
        _validate_rewrite(c.child("rewrite"))
    _check_authority_written_once(c)
    if route.redirect is not None:
        _validate_redirect(c.child("redirect"))
    if route.direct_response is not None:
        _validate_direct_response(c.child("direct_response"))
    if route.mirror is not None:
        check_destination(c.child("mirror"))
    if route.mirror_percent is not None and route.mirror_percent > 100:
        c.error(
            f"mirrorPercent is {route.mirror_percent}; at most 100 is allowed", "mirror_percent"
        )
    _check_percentage(c, "mirror_percentage")
    for _, mirror in c.items("mirrors"):
        check_destination(mirror.child("destination"))
        _check_percentage(mirror, "percentage")
    if route.fault is not None:
        _validate_fault(c.child("fault"))
    if route.retries is not None:
        _validate_retries(c.child("retries"))
    _check_ms_precision(c, "timeout")
    _validate_route_destinations(c, "route")


def _check_route_conflicts(c: Cursor) -> None:
    route: HTTPRoute = c.node
    if route.redirect is not None:
        for field, what in (
            ("route", "route destinations"),
            ("fault", "fault injection"),
            ("rewrite", "a rewrite"),
            ("direct_response", "a direct response"),
        ):
            if getattr(route, field):
                c.error(f"a route that redirects cannot also have {what}", field)
    elif route.direct_response is not None:
        for field, what in (
            ("route", "route destinations"),
            ("fault", "fault injection"),
            ("rewrite", "a rewrite"),
        ):
            if getattr(route, field):
                c.error(f"a route with a direct response cannot also have {what}", field)
    elif not route.route:
        c.error(
            "this HTTP route needs a 'route' (destinations), a 'redirect' or a 'directResponse'"
        )
    if route.mirror is not None and route.mirrors:
        c.error("set either mirror or mirrors, not both", "mirrors")


def _validate_http_match(c: Cursor) -> None:
    for key, match in c.entries("headers"):
        c.check(check_header_name(key), "headers", key)
        _check_string_match(match, require_prefix=True)
    for key, match in c.entries("without_headers"):
        c.check(check_header_name(key), "without_headers", key)
        if match.node.regex != "*":
            _check_string_match(match, require_prefix=True)
    if c.node.uri is not None:
        _check_string_match(c.child("uri"), require_prefix=False)
    for field in ("scheme", "method", "authority"):
        if getattr(c.node, field) is not None:
            _check_string_match(c.child(field), require_prefix=True)
    for _, match in c.entries("query_params"):
        _check_string_match(match, require_prefix=True)
    if c.node.port:
        c.check(check_port(c.node.port), "port")
    check_labels(c, "source_labels")
    _check_gateway_names(c, "gateways", warn_legacy=False)
    namespace = c.node.source_namespace
    if namespace and not is_dns1123_label(namespace):
        c.error(f"sourceNamespace {namespace!r} is not a valid namespace name", "source_namespace")


def _check_string_match(c: Cursor, *, require_prefix: bool) -> None:
    match: StringMatch = c.node
    if match.prefix is not None and match.prefix == "" and require_prefix:
        c.error("a prefix match must not be empty", "prefix")
    if match.regex is not None:
        c.check(check_regex(match.regex), "regex")


def _check_header_operations(c: Cursor) -> None:
    for direction in ("request", "response"):
        if getattr(c.node, direction) is None:
            continue
        ops = c.child(direction)
        for field in ("set", "add"):
            for name, value in getattr(ops.node, field).items():
                ops.check(
                    check_header_operation_name(name, authority_allowed=direction == "request"),
                    field,
                    name,
                )
                ops.check(check_header_value(value), field, name)
        for i, name in enumerate(ops.node.remove):
            ops.check(check_header_operation_name(name, authority_allowed=False), "remove", i)


def _check_authority_written_once(c: Cursor) -> None:
    route: HTTPRoute = c.node
    writers: list[tuple[str, Cursor, str, str | None]] = []
    if route.rewrite is not None and route.rewrite.authority:
        writers.append((route.rewrite.authority, c.child("rewrite"), "authority", None))
    if route.headers is not None and route.headers.request is not None:
        request = c.child("headers").child("request")
        for field in ("set", "add"):
            for name, value in getattr(request.node, field).items():
                if name.lower() in (":authority", "host"):
                    writers.append((value, request, field, name))
    if len(writers) > 1:
        first = writers[0][0]
        value, cursor, field, key = writers[1]
        cursor.error(
            f"the authority is written more than once (first {first!r}, then {value!r}); "
            "write it in one place",
            field,
            key,
        )


def _validate_cors(c: Cursor) -> None:
    for i, origin in c.items("allow_origins"):
        match: StringMatch = origin.node
        value = (
            match.exact
            if match.exact is not None
            else match.prefix
            if match.prefix is not None
            else match.regex
        )
        if not value:
            c.error(
                "an allowed origin needs a non-empty exact, prefix or regex", "allow_origins", i
            )
        elif match.regex is not None:
            origin.check(check_regex(match.regex), "regex")
    for i, method in enumerate(c.node.allow_methods):
        if method not in (*HTTP_METHODS, "*"):
            c.error(
                f"{method!r} is not an HTTP method; use one of {', '.join(HTTP_METHODS)} or '*'",
                "allow_methods",
                i,
            )
    for field in ("allow_headers", "expose_headers"):
        for i, name in enumerate(getattr(c.node, field)):
            c.check(check_cors_header_name(name), field, i)
    if c.node.max_age is not None and c.node.max_age.nanos % 1_000_000_000:
        c.error(
            "maxAge is applied in whole seconds; write it as seconds, such as '3600s'", "max_age"
        )


def _validate_rewrite(c: Cursor) -> None:
    rewrite = c.node
    if rewrite.uri is not None and rewrite.uri_regex_rewrite is not None:
        c.error("set either uri or uriRegexRewrite, not both", "uri_regex_rewrite")
        return
    if not (rewrite.uri or rewrite.uri_regex_rewrite is not None or rewrite.authority):
        c.error("a rewrite needs at least one of uri, uriRegexRewrite or authority")
    if rewrite.uri_regex_rewrite is not None:
        regex = c.child("uri_regex_rewrite")
        if not regex.node.match or not regex.node.rewrite:
            regex.error("uriRegexRewrite needs both match and rewrite")
        if regex.node.match:
            regex.check(check_regex(regex.node.match), "match")


def _validate_redirect(c: Cursor) -> None:
    redirect = c.node
    if not (
        redirect.uri
        or redirect.prefix_rewrite
        or redirect.authority
        or redirect.scheme
        or redirect.port
        or redirect.derive_port is not None
    ):
        c.error(
            "a redirect must change at least one of uri, prefixRewrite, authority, scheme or port"
        )
    if redirect.uri is not None and redirect.prefix_rewrite is not None:
        c.error("set either uri or prefixRewrite, not both", "prefix_rewrite")
    if redirect.redirect_code and not 300 <= redirect.redirect_code <= 399:
        c.error(
            f"{redirect.redirect_code} is not a redirect code; use a 3xx code such as 301",
            "redirect_code",
        )
    if redirect.scheme and redirect.scheme not in ("http", "https"):
        c.error(f"redirect scheme {redirect.scheme!r} must be 'http' or 'https'", "scheme")
    if redirect.port:
        c.check(check_port(redirect.port), "port")


def _validate_direct_response(c: Cursor) -> None:
    response = c.node
    body = response.body
    if body is not None:
        size = len(body.string_.encode()) if body.string_ is not None else len(body.bytes_ or b"")
        if size > _MAX_DIRECT_RESPONSE:
            c.error(f"the body is {size} bytes; direct responses must be smaller than 1MB", "body")
        elif size > _WARN_DIRECT_RESPONSE:
            c.warning(
                f"the body is {size} bytes; large direct responses slow config pushes", "body"
            )
    c.check(check_http_status(response.status), "status")


def _validate_fault(c: Cursor) -> None:
    fault = c.node
    if fault.abort is None and fault.delay is None:
        c.error("fault injection needs an abort, a delay, or both")
    if fault.abort is not None:
        abort = c.child("abort")
        _check_percentage(abort, "percentage")
        if abort.node.grpc_status is not None and abort.node.grpc_status not in GRPC_STATUS_NAMES:
            abort.error(
                f"{abort.node.grpc_status!r} is not a gRPC status; use one of "
                + ", ".join(GRPC_STATUS_NAMES),
                "grpc_status",
            )
        if abort.node.http2_error is not None:
            abort.error(
                "HTTP/2 error aborts are not supported; use httpStatus or grpcStatus", "http2_error"
            )
        if abort.node.http_status is not None:
            abort.check(check_http_status(abort.node.http_status), "http_status")
        if (abort.node.http_status, abort.node.grpc_status, abort.node.http2_error) == (
            None,
            None,
            None,
        ):
            # Istio drops this warning; an abort that aborts nothing deserves an error.
            abort.error("an abort needs httpStatus or grpcStatus")
    if fault.delay is not None:
        delay = c.child("delay")
        _check_percentage(delay, "percentage")
        _check_ms_precision(delay, "fixed_delay")
        if delay.node.exponential_delay is not None:
            delay.error("exponentialDelay is not supported; use fixedDelay", "exponential_delay")
        if delay.node.fixed_delay is None and delay.node.exponential_delay is None:
            delay.error("a delay needs fixedDelay")
        if delay.node.percent is not None and not 0 <= delay.node.percent <= 100:
            delay.error(f"percent {delay.node.percent} is not in the range 0..100", "percent")


def _validate_retries(c: Cursor) -> None:
    retries = c.node
    if retries.attempts is not None and retries.attempts < 0:
        c.error("attempts cannot be negative", "attempts")
    if not retries.attempts and (
        retries.per_try_timeout is not None
        or retries.retry_on
        or retries.retry_remote_localities is not None
    ):
        c.error("retry settings are given but attempts is 0, which disables retries", "attempts")
    _check_ms_precision(c, "per_try_timeout")
    _check_ms_precision(c, "backoff")
    if retries.retry_on is not None:
        for problem in check_retry_on(retries.retry_on):
            c.error(problem, "retry_on")


def _validate_route_destinations(c: Cursor, field: str) -> None:
    destinations = getattr(c.node, field)
    for _, destination in c.items(field):
        check_destination(destination.child("destination"))
        weight = destination.node.weight
        if weight is not None and not 0 <= weight <= 100:
            destination.error(f"weight {weight} is not in the range 0..100", "weight")
    if len(destinations) > 1:
        # Stricter than Istio, which normalises any total: a total that is not 100 is a
        # mistake far more often than an intent, and it silently shifts traffic.
        total = sum(d.weight or 0 for d in destinations)
        if total != 100:
            c.error(
                f"the weights of these {len(destinations)} destinations total {total}; "
                "they must total 100",
                field,
            )
    elif len(destinations) == 1:
        weight = destinations[0].weight
        if weight is not None and weight != 100:
            c.child(field, 0).warning(
                f"weight {weight} is ignored: a single destination receives all traffic",
                "weight",
            )


def _validate_tls_route(c: Cursor, vs: VirtualService) -> None:
    if not c.node.match:
        c.error("a TLS route needs at least one match", "match")
    for _, match in c.items("match"):
        if not match.node.sni_hosts:
            match.error("a TLS match needs at least one SNI host", "sni_hosts")
        for i, sni in enumerate(match.node.sni_hosts):
            problem = check_wildcard_domain(sni)
            if problem and is_ip(sni):
                match.warning(
                    f"{sni!r} is an IP address; SNI carries host names, and most clients never "
                    "send an IP",
                    "sni_hosts",
                    i,
                )
            elif problem:
                match.error(problem, "sni_hosts", i)
            elif not any(is_subset_of(sni, host) for host in vs.hosts):
                match.error(
                    f"SNI host {sni!r} is not within any of this VirtualService's hosts: "
                    + ", ".join(vs.hosts),
                    "sni_hosts",
                    i,
                )
        _check_l4_match(match)
    if not c.node.route:
        c.error("a TLS route needs at least one destination", "route")
    _validate_route_destinations(c, "route")


def _validate_tcp_route(c: Cursor) -> None:
    for _, match in c.items("match"):
        _check_l4_match(match)
        if match.node.source_subnet:
            match.check(check_ip_or_cidr(match.node.source_subnet), "source_subnet")
    if not c.node.route:
        c.error("a TCP route needs at least one destination", "route")
    _validate_route_destinations(c, "route")


def _check_l4_match(c: Cursor) -> None:
    for i, subnet in enumerate(c.node.destination_subnets):
        c.check(check_ip_or_cidr(subnet), "destination_subnets", i)
    if c.node.port:
        c.check(check_port(c.node.port), "port")
    check_labels(c, "source_labels")
    _check_gateway_names(c, "gateways", warn_legacy=False)


# -- DestinationRule -----------------------------------------------------------------------------


def validate_destination_rule(c: Cursor) -> None:
    rule: DestinationRule = c.node
    c.check(check_wildcard_domain(rule.host), "host")
    if rule.traffic_policy is not None:
        _validate_traffic_policy(c.child("traffic_policy"))
    seen: set[str] = set()
    for i, subset in c.items("subsets"):
        name = subset.node.name
        if name in seen:
            c.error(f"subset {name!r} is defined twice", "subsets", i)
        seen.add(name)
        if not name:
            subset.error("a subset needs a name", "name")
        elif not is_dns1123_label(name):
            subset.error(f"subset name {name!r} is not a DNS-1123 label", "name")
        check_labels(subset, "labels")
        if subset.node.traffic_policy is not None:
            _validate_traffic_policy(subset.child("traffic_policy"))
    for problem in check_export_to(rule.export_to, c.resource.namespace, service_entry=False):
        c.error(problem, "export_to")
    if rule.workload_selector is not None and rule.export_to:
        namespace = c.resource.namespace
        exported = {namespace if e == "." else e for e in rule.export_to}
        if namespace not in exported:
            c.error(
                "a DestinationRule with a workloadSelector must be exported to its own namespace",
                "export_to",
            )
        elif len(exported) > 1:
            c.error(
                "a DestinationRule with a workloadSelector cannot be exported to other namespaces",
                "export_to",
            )
    check_workload_selector(c, "workload_selector", "match_labels")


def _validate_traffic_policy(c: Cursor) -> None:
    policy = c.node
    if not any(
        (
            policy.outlier_detection,
            policy.connection_pool,
            policy.load_balancer,
            policy.tls,
            policy.port_level_settings,
            policy.tunnel,
            policy.proxy_protocol,
            policy.retry_budget,
        )
    ):
        c.error("a trafficPolicy must set at least one field")
        return
    if policy.tunnel is not None and policy.proxy_protocol is not None:
        c.error("set either tunnel or proxyProtocol, not both", "proxy_protocol")
        return
    _validate_policy_parts(c)
    for _, port_policy in c.items("port_level_settings"):
        if port_policy.node.port is None:
            port_policy.error("a port-level traffic policy needs a port", "port")
        else:
            port_policy.child("port").check(check_port(port_policy.node.port.number or 0), "number")
        if not any(
            (
                port_policy.node.outlier_detection,
                port_policy.node.connection_pool,
                port_policy.node.load_balancer,
                port_policy.node.tls,
            )
        ):
            port_policy.error(
                "a port-level traffic policy must set at least one field besides port"
            )
        _validate_policy_parts(port_policy)
    ports = [p.port.number for p in policy.port_level_settings if p.port is not None]
    for i, p in enumerate(policy.port_level_settings):
        if (
            p.port is not None
            and ports.count(p.port.number) > 1
            and ports.index(p.port.number) != i
        ):
            c.error(
                f"port {p.port.number} has two port-level traffic policies",
                "port_level_settings",
                i,
            )
    if policy.tunnel is not None:
        tunnel = c.child("tunnel")
        if tunnel.node.protocol not in (None, "", "CONNECT", "POST"):
            tunnel.error("the tunnel protocol must be 'CONNECT' or 'POST'", "protocol")
        host = tunnel.node.target_host
        if check_fqdn(host) and not is_ip(host):
            tunnel.error(
                f"tunnel target host {host!r} must be a domain name or an IP address", "target_host"
            )
        tunnel.check(check_port(tunnel.node.target_port), "target_port")


def _validate_policy_parts(c: Cursor) -> None:
    node = c.node
    if node.outlier_detection is not None:
        _validate_outlier_detection(c.child("outlier_detection"))
    if node.connection_pool is not None:
        _validate_connection_pool(c.child("connection_pool"))
    if node.load_balancer is not None:
        _validate_load_balancer(c.child("load_balancer"), node.outlier_detection)
    if node.tls is not None:
        _validate_client_tls(c.child("tls"))


def _validate_outlier_detection(c: Cursor) -> None:
    od: OutlierDetection = c.node
    _check_ms_precision(c, "base_ejection_time")
    _check_ms_precision(c, "interval")
    if od.consecutive_local_origin_failures and not od.split_external_local_origin_errors:
        c.error(
            "consecutiveLocalOriginFailures only counts when splitExternalLocalOriginErrors is "
            "true",
            "consecutive_local_origin_failures",
        )
    for field in ("max_ejection_percent", "min_health_percent"):
        value = getattr(od, field)
        if value is not None and not 0 <= value <= 100:
            c.error(f"{value} is not a percentage in the range 0..100", field)


def _validate_connection_pool(c: Cursor) -> None:
    pool: ConnectionPoolSettings = c.node
    if pool.http is None and pool.tcp is None:
        c.error("a connectionPool needs http or tcp settings")
        return
    if pool.http is not None:
        http = c.child("http")
        for field in (
            "http1_max_pending_requests",
            "http2_max_requests",
            "max_requests_per_connection",
            "max_retries",
            "max_concurrent_streams",
        ):
            value = getattr(http.node, field)
            if value is not None and value < 0:
                http.error(f"{value} is negative; the limit must be 0 or more", field)
        _check_ms_precision(http, "idle_timeout")
        if (
            http.node.h2_upgrade_policy is not None
            and http.node.h2_upgrade_policy.value == "UPGRADE"
            and http.node.use_client_protocol
        ):
            http.error(
                "useClientProtocol cannot be true when h2UpgradePolicy is UPGRADE",
                "use_client_protocol",
            )
    if pool.tcp is not None:
        tcp = c.child("tcp")
        if tcp.node.max_connections is not None and tcp.node.max_connections < 0:
            tcp.error(
                f"{tcp.node.max_connections} is negative; the limit must be 0 or more",
                "max_connections",
            )
        _check_ms_precision(tcp, "connect_timeout")
        _check_ms_precision(tcp, "max_connection_duration")
        if tcp.node.tcp_keepalive is not None:
            keepalive = tcp.child("tcp_keepalive")
            _check_ms_precision(keepalive, "time")
            _check_ms_precision(keepalive, "interval")


def _validate_load_balancer(c: Cursor, outlier: OutlierDetection | None) -> None:
    lb: LoadBalancerSettings = c.node
    if lb.consistent_hash is not None:
        ch = c.child("consistent_hash")
        if ch.node.minimum_ring_size and (
            ch.node.ring_hash is not None or ch.node.maglev is not None
        ):
            ch.error(
                "set either the deprecated minimumRingSize or ringHash/maglev, not both",
                "minimum_ring_size",
            )
        if ch.node.maglev is not None:
            size = ch.node.maglev.table_size or 0
            maglev = ch.child("maglev")
            if size == 0:
                maglev.error("maglev needs a tableSize (a prime, such as 65537)", "table_size")
            elif size >= 5000011:
                maglev.error("the maglev tableSize must be smaller than 5000011", "table_size")
            elif not is_prime(size):
                maglev.error(
                    f"the maglev tableSize {size} must be a prime number, such as 65537",
                    "table_size",
                )
    if lb.locality_lb_setting is not None:
        _validate_locality_lb(c.child("locality_lb_setting"), outlier)
    if lb.warmup is not None:
        warmup = c.child("warmup")
        if warmup.node.aggression is not None and warmup.node.aggression < 1:
            warmup.error("aggression must be 1 or more", "aggression")


def _validate_locality_lb(c: Cursor, outlier: OutlierDetection | None) -> None:
    setting = c.node
    if setting.distribute and setting.failover:
        c.error("set either distribute or failover, not both", "failover")
        return
    topology = {
        "topology.kubernetes.io/region",
        "topology.kubernetes.io/zone",
        "topology.istio.io/subzone",
    }
    if setting.failover and topology.intersection(setting.failover_priority):
        c.error(
            "failover cannot be combined with region, zone or subzone labels in failoverPriority",
            "failover_priority",
        )
        return
    for _, distribute in c.items("distribute"):
        weights = distribute.node.to
        if any(not 1 <= w <= 100 for w in weights.values()):
            distribute.error("each locality weight must be in the range 1..100", "to")
        elif sum(weights.values()) != 100:
            distribute.error(
                f"the locality weights total {sum(weights.values())}; they must total 100", "to"
            )
        else:
            distribute.check(check_localities(weights), "to")
    c.check(check_localities(d.from_ or "" for d in setting.distribute), "distribute")
    if (setting.failover or setting.failover_priority) and outlier is None:
        c.warning(
            "failover needs outlierDetection in the same traffic policy to detect unhealthy "
            "endpoints"
        )
    for _, failover in c.items("failover"):
        src, dst = failover.node.from_ or "", failover.node.to or ""
        if src == dst:
            failover.error("failover must be between two different regions", "to")
        if "/" in src or "/" in dst:
            failover.error("failover is between regions: write a region without zone", "to")
        if "*" in src or "*" in dst:
            failover.error("failover regions cannot contain '*'", "to")


def _validate_client_tls(c: Cursor) -> None:
    tls: ClientTLSSettings = c.node
    if tls.insecure_skip_verify:
        if tls.mode is TLSMode.SIMPLE and (
            tls.ca_certificates or tls.credential_name or tls.subject_alt_names
        ):
            c.error(
                "caCertificates, credentialName and subjectAltNames cannot be used with "
                "insecureSkipVerify",
                "insecure_skip_verify",
            )
        if tls.mode is TLSMode.MUTUAL and (tls.ca_certificates or tls.subject_alt_names):
            c.error(
                "caCertificates and subjectAltNames cannot be used with insecureSkipVerify",
                "insecure_skip_verify",
            )
    if tls.mode in (TLSMode.SIMPLE, TLSMode.MUTUAL) and tls.credential_name:
        if tls.client_certificate or tls.ca_certificates or tls.private_key or tls.ca_crl:
            c.error(
                "with credentialName, do not set clientCertificate, privateKey, caCertificates or "
                "caCrl",
                "credential_name",
            )
        return
    if tls.mode is TLSMode.MUTUAL:
        if not tls.client_certificate:
            c.error("mode MUTUAL needs clientCertificate", "mode")
        if not tls.private_key:
            c.error("mode MUTUAL needs privateKey", "mode")


# -- ServiceEntry and WorkloadEntry --------------------------------------------------------------


def validate_service_entry(c: Cursor) -> None:
    se: ServiceEntry = c.node
    selector = se.workload_selector
    if selector is not None:
        selector_cursor = c.child("workload_selector")
        bad = False
        for key, value in selector.labels.items():
            if not key or "*" in key or "*" in value:
                selector_cursor.error(
                    f"invalid selector label {key}={value}: no empty keys or wildcards",
                    "labels",
                    key,
                )
                bad = True
        if bad:
            return
        if not selector.labels:
            selector_cursor.warning(
                "this workloadSelector has no labels, so it selects every workload in the namespace"
            )
    if selector is not None and se.endpoints:
        c.error("set either workloadSelector or endpoints, not both", "endpoints")
    if not se.hosts:
        c.error("a ServiceEntry needs at least one host", "hosts")
    for i, host in enumerate(se.hosts):
        if host == "*":
            c.error("'*' is not a valid ServiceEntry host: name the hosts", "hosts", i)
            continue
        if c.check(check_wildcard_domain(host), "hosts", i) and is_partial_wildcard(host):
            c.warning(
                f"partial wildcard {host!r} is not supported; use '*.' followed by a domain",
                "hosts",
                i,
            )
    resolution = se.resolution or Resolution.NONE
    for i, address in enumerate(se.addresses):
        c.check(check_ip_or_cidr(address), "addresses", i)
    if any("/" in a for a in se.addresses) and resolution not in (
        Resolution.NONE,
        Resolution.STATIC,
    ):
        c.error("CIDR addresses are allowed only with resolution NONE or STATIC", "addresses")
    names: dict[str, int] = {}
    numbers: dict[int, int] = {}
    for i, port in c.items("ports"):
        name, number = port.node.name, port.node.number
        if name in names:
            port.error(f"port name {name!r} is already used by ports[{names[name]}]", "name")
        names.setdefault(name, i)
        if number in numbers:
            port.error(f"port {number} is already defined by ports[{numbers[number]}]", "number")
        numbers.setdefault(number, i)
        if port.node.target_port is not None:
            port.check(check_port(port.node.target_port), "target_port")
        port.check(check_port_name(name), "name")
        port.check(check_protocol(port.node.protocol or ""), "protocol")
        port.check(check_port(number), "number")
    if resolution is Resolution.NONE:
        if se.endpoints:
            c.error("resolution NONE takes no endpoints; use STATIC or DNS", "endpoints")
        if selector is not None:
            c.warning("workloadSelector has no effect with resolution NONE", "workload_selector")
    elif resolution is Resolution.STATIC:
        for _, endpoint in c.items("endpoints"):
            _validate_endpoint(
                endpoint, set(names), allow_fqdn=False, single_port=len(se.ports) == 1
            )
    elif resolution in (Resolution.DNS, Resolution.DNS_ROUND_ROBIN):
        if not se.endpoints:
            for i, host in enumerate(se.hosts):
                if host != "*" and check_fqdn(host):
                    c.error(
                        f"with resolution {resolution.value} and no endpoints, host {host!r} must "
                        "be a domain name",
                        "hosts",
                        i,
                    )
        if resolution is Resolution.DNS_ROUND_ROBIN and len(se.endpoints) > 1:
            c.error("resolution DNS_ROUND_ROBIN takes at most one endpoint", "endpoints")
        for _, endpoint in c.items("endpoints"):
            _validate_dns_endpoint(endpoint, set(names))
        if selector is not None:
            c.warning(
                f"workloadSelector has no effect with resolution {resolution.value}",
                "workload_selector",
            )
        first_tcp = next((p for p in se.ports if parse_protocol(p.protocol) in TCP_PROTOCOLS), None)
        if se.addresses and first_tcp is not None and len(se.hosts) > 1:
            c.warning(
                "with addresses and a TCP port, only one host can be told apart; list one host",
                "hosts",
            )
    elif resolution is Resolution.DYNAMIC_DNS:
        c.add(
            Codes.UNSUPPORTED_FEATURE,
            "resolution DYNAMIC_DNS is not supported by libmesh; this ServiceEntry has no "
            "endpoints",
            "resolution",
        )
    if resolution is not Resolution.NONE and len(se.hosts) > 1:
        for i, service_port in enumerate(se.ports):
            protocol = parse_protocol(service_port.protocol)
            if protocol is None or protocol not in {
                "HTTP",
                "HTTP2",
                "HTTP_PROXY",
                "GRPC",
                "GRPC-Web",
                "HTTPS",
                "TLS",
            }:
                c.error(
                    "several hosts need HTTP or TLS ports, so that requests can be told apart",
                    "ports",
                    i,
                )
                break
    for problem in check_export_to(se.export_to, c.resource.namespace, service_entry=True):
        c.error(problem, "export_to")


def _validate_endpoint(
    c: Cursor, service_ports: set[str], *, allow_fqdn: bool, single_port: bool
) -> None:
    entry: WorkloadEntry = c.node
    address = entry.address or ""
    if address.startswith("unix://"):
        c.check(check_unix_address(address[len("unix://") :]), "address")
        if entry.ports:
            c.error("a unix socket endpoint cannot have ports", "ports")
        if not single_port:
            c.error("a unix socket endpoint needs a ServiceEntry with exactly one port", "address")
    elif not address:
        if not entry.network:
            c.error("an endpoint needs an address", "address")
    elif not is_ip(address):
        c.error(
            f"endpoint address {address!r} must be an IP address with resolution STATIC", "address"
        )
    _check_endpoint_ports(c, service_ports)
    check_labels(c, "labels")


def _check_endpoint_ports(c: Cursor, service_ports: set[str]) -> None:
    """An endpoint's ports are named after the ServiceEntry's ports, with valid numbers."""
    for name, number in c.node.ports.items():
        if name not in service_ports:
            c.error(
                f"port {name!r} is not a port of this ServiceEntry "
                f"({', '.join(sorted(service_ports)) or 'none'})",
                "ports",
                name,
            )
        c.check(check_port_name(name), "ports", name)
        c.check(check_port(number), "ports", name)


def _validate_dns_endpoint(c: Cursor, service_ports: set[str]) -> None:
    entry: WorkloadEntry = c.node
    address = entry.address or ""
    if not is_ip(address) and (not address or check_fqdn(address)):
        c.error(f"endpoint address {address!r} must be a domain name or an IP address", "address")
    check_labels(c, "labels")
    _check_endpoint_ports(c, service_ports)


def validate_workload_entry(c: Cursor) -> None:
    entry: WorkloadEntry = c.node
    address = entry.address or ""
    if not address:
        if not entry.network:
            c.error(
                "a WorkloadEntry needs an address (an IP, a host name or unix:///path)", "address"
            )
            return
        c.warning(
            f"no address: this workload is reached through network {entry.network!r}'s gateway",
            "address",
        )
    if address.startswith("unix://"):
        c.check(check_unix_address(address[len("unix://") :]), "address")
        if entry.ports:
            c.error("a unix socket workload cannot have ports", "ports")
    elif address and not is_ip(address) and check_fqdn(address):
        c.error(f"address {address!r} must be an IP address or a domain name", "address")
    for name, number in entry.ports.items():
        c.check(check_port_name(name), "ports", name)
        c.check(check_port(number), "ports", name)
    check_labels(c, "labels")


def _names(values: Iterable[str]) -> str:
    return ", ".join(sorted(values))
