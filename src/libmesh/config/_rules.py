"""Istio's value rules, as pure functions: each returns ``None`` when a value is acceptable and
otherwise the reason it is not, worded for the person who has to fix it.

The rules follow istio/istio ``pkg/config/validation`` (hosts, labels, ports, headers, retryOn,
exportTo, localities, JWT and authorization attributes); comments mark where libmesh is
deliberately stricter.
"""

from __future__ import annotations

import functools
import ipaddress
import json
import re
from collections.abc import Iterable
from http import HTTPStatus
from urllib.parse import urlsplit

import re2

__all__ = [
    "GRPC_STATUS_NAMES",
    "HTTP_METHODS",
    "RETRY_ON_POLICIES",
    "check_authz_port",
    "check_condition_key",
    "check_condition_value",
    "check_cors_header_name",
    "check_exact_ip",
    "check_export_to",
    "check_fqdn",
    "check_header_name",
    "check_header_operation_name",
    "check_header_value",
    "check_http_status",
    "check_ip_or_cidr",
    "check_jwks",
    "check_jwks_uri",
    "check_label_key",
    "check_label_value",
    "check_localities",
    "check_path_template",
    "check_port",
    "check_port_name",
    "check_protocol",
    "check_regex",
    "check_retry_on",
    "check_service_account",
    "check_strict_header_name",
    "check_unix_address",
    "check_wildcard_domain",
    "compile_re2",
    "is_dns1123_label",
    "is_ip",
    "is_jwt_claim_route",
    "is_number",
    "is_prime",
    "parse_protocol",
]

_DNS1123_LABEL = re.compile(r"^[a-zA-Z0-9](?:[-a-zA-Z0-9]*[a-zA-Z0-9])?$")
_WILDCARD_LABEL = re.compile(r"^(\*|(\*|\*-)?[a-zA-Z0-9](?:[-a-zA-Z0-9]*[a-zA-Z0-9])?)$")
_LABEL_KEY = re.compile(
    r"^([a-zA-Z0-9](?:[-a-zA-Z0-9]*[a-zA-Z0-9])?(?:\.[a-zA-Z0-9](?:[-a-zA-Z0-9]*[a-zA-Z0-9])?)*/)?"
    r"((?:[A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])$"
)
_LABEL_VALUE = re.compile(r"^((?:[A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")
_HEADER_NAME = re.compile(r"^[!#$%&'*+\-.^_`|~A-Za-z0-9]+$")
_STRICT_HEADER_NAME = re.compile(r"^[-A-Za-z0-9]+$")
_HEADER_VALUE_CHARS = re.compile(r"^[^\x00-\x08\x0A-\x1F\x7F]*$")
_PSEUDO_HEADERS = frozenset({":method", ":scheme", ":authority", ":path", ":status"})

MAX_REGEX_LENGTH = 1024

HTTP_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "CONNECT", "OPTIONS", "TRACE")

GRPC_STATUS_NAMES = (
    "OK", "CANCELLED", "UNKNOWN", "INVALID_ARGUMENT", "DEADLINE_EXCEEDED", "NOT_FOUND",
    "ALREADY_EXISTS", "PERMISSION_DENIED", "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION",
    "ABORTED", "OUT_OF_RANGE", "UNIMPLEMENTED", "INTERNAL", "UNAVAILABLE", "DATA_LOSS",
    "UNAUTHENTICATED",
)  # fmt: skip

# Envoy's x-envoy-retry-on and x-envoy-retry-grpc-on conditions, as Istio accepts them.
RETRY_ON_POLICIES = (
    "5xx", "gateway-error", "reset", "reset-before-request", "connect-failure", "retriable-4xx",
    "refused-stream", "retriable-status-codes", "retriable-headers", "envoy-ratelimited",
    "http3-post-connect-failure", "cancelled", "deadline-exceeded", "internal",
    "resource-exhausted", "unavailable",
)  # fmt: skip

_PROTOCOLS = {
    "tcp": "TCP", "udp": "UDP", "grpc": "GRPC", "grpc-web": "GRPC-Web", "http": "HTTP",
    "http_proxy": "HTTP_PROXY", "http2": "HTTP2", "https": "HTTPS", "tls": "TLS",
    "mongo": "Mongo", "redis": "Redis", "mysql": "MySQL",
}  # fmt: skip
HTTP_PROTOCOLS = frozenset({"HTTP", "HTTP2", "HTTP_PROXY", "GRPC", "GRPC-Web"})
TLS_PROTOCOLS = frozenset({"HTTPS", "TLS"})
TCP_PROTOCOLS = frozenset({"TCP", "HTTPS", "TLS", "Mongo", "Redis", "MySQL"})


# -- names ---------------------------------------------------------------------------------------


def is_number(text: str) -> bool:
    """ASCII digits only: ``str.isdigit`` also accepts '²' and other scripts' digits."""
    return text.isascii() and text.isdigit()


def is_dns1123_label(value: str) -> bool:
    return len(value) <= 63 and bool(_DNS1123_LABEL.match(value))


def _dns_preconditions(name: str) -> str | None:
    if len(name.encode()) > 255:
        return f"domain name {name!r} is too long (at most 255 characters)"
    if not name:
        return "an empty domain name is not allowed"
    return None


def _dns1123_labels(name: str, domain: str) -> str | None:
    parts = name.split(".")
    top = parts[-1]
    if is_number(top.lstrip("+-")):
        return f"domain name {domain!r} is invalid: its top-level domain {top!r} is all digits"
    for i, label in enumerate(parts):
        if i == len(parts) - 1 and label == "":
            continue  # a trailing dot: "istio.io."
        if not is_dns1123_label(label):
            return f"domain name {domain!r} is invalid: label {label!r} is not a DNS-1123 label"
    return None


def check_fqdn(name: str) -> str | None:
    """A domain name without wildcards; a single label (``reviews``) is allowed."""
    return _dns_preconditions(name) or _dns1123_labels(name, name)


def check_wildcard_domain(name: str) -> str | None:
    """A domain name whose first label may be a wildcard: ``*``, ``*.example.com``, ``reviews``."""
    problem = _dns_preconditions(name)
    if problem:
        return problem
    first, dot, rest = name.partition(".")
    if not (len(first) <= 63 and _WILDCARD_LABEL.match(first)):
        hint = " (a wildcard may only be the first label, as in '*.example.com')"
        return f"domain name {name!r} is invalid: label {first!r} is not a DNS-1123 label" + (
            hint if "*" in first else ""
        )
    return _dns1123_labels(rest, name) if dot else None


def is_partial_wildcard(host: str) -> bool:
    return "*" in host and host != "*" and not host.startswith("*.")


def is_ip(value: str) -> bool:
    try:
        ipaddress.ip_address(value)
    except ValueError:
        return False
    return True


def check_exact_ip(value: str) -> str | None:
    return None if is_ip(value) else f"{value!r} is not a valid IP address"


def check_ip_or_cidr(value: str) -> str | None:
    if value.count("/") == 1:
        try:
            ipaddress.ip_network(value, strict=False)
        except ValueError:
            return f"{value!r} is not a valid CIDR block"
        return None
    return check_exact_ip(value)


def check_unix_address(path: str) -> str | None:
    if not path:
        return "a unix address must not be empty"
    if path.startswith("@"):
        return None
    if not path.startswith("/") or path.endswith("/"):
        return f"{path} is not an absolute path to a file"
    return None


def check_port(number: int) -> str | None:
    return None if 1 <= number <= 65535 else f"port {number} is not in the range 1..65535"


def check_port_name(name: str) -> str | None:
    if is_dns1123_label(name):
        return None
    return f"port name {name!r} is invalid: it must be a DNS-1123 label such as 'http-web'"


def parse_protocol(value: str | None) -> str | None:
    """The canonical protocol name, or ``None`` when unset or unknown."""
    return _PROTOCOLS.get((value or "").lower())


def check_protocol(value: str) -> str | None:
    if not value or parse_protocol(value):
        return None
    known = ", ".join(sorted(set(_PROTOCOLS.values())))
    return f"unsupported protocol {value!r}; use one of {known}"


# -- labels --------------------------------------------------------------------------------------


def check_label_key(key: str) -> str | None:
    m = _LABEL_KEY.match(key)
    if not m:
        return f"invalid label key {key!r}"
    prefix, name = m.group(1), m.group(2)
    if prefix and len(prefix) - 1 > 253:
        return f"invalid label key {key!r}: its DNS prefix is longer than 253 characters"
    if len(name) > 63:
        return f"invalid label key {key!r}: its name is longer than 63 characters"
    return None


def check_label_value(value: str) -> str | None:
    if _LABEL_VALUE.match(value):
        return None
    return (
        f"invalid label value {value!r}: use letters, digits, '-', '_' and '.', "
        "beginning and ending with a letter or digit"
    )


# -- HTTP ----------------------------------------------------------------------------------------


def is_jwt_claim_route(key: str) -> bool:
    lowered = key.lower()
    prefix = "@request.auth.claims"
    if not lowered.startswith(prefix):
        return False
    rest = key[len(prefix) :]
    if rest.startswith(".") and len(rest) > 1:
        return True
    return rest.startswith("[") and rest.endswith("]") and len(rest) > 2


def check_header_name(name: str) -> str | None:
    """A header to match on: a token, a pseudo-header, or a JWT claim route."""
    if not name:
        return "a header name cannot be empty"
    if is_jwt_claim_route(name) or name in _PSEUDO_HEADERS or _HEADER_NAME.match(name):
        return None
    return f"{name!r} is not a valid header name"


def check_cors_header_name(name: str) -> str | None:
    if name == "*":
        return None
    if not name:
        return "a header name cannot be empty"
    return None if _HEADER_NAME.match(name) else f"{name!r} is not a valid header name"


def check_strict_header_name(name: str) -> str | None:
    if not name:
        return "a header name cannot be empty"
    if _STRICT_HEADER_NAME.match(name):
        return None
    return f"{name!r} is not a valid header name (letters, digits and '-' only)"


def check_header_operation_name(name: str, *, authority_allowed: bool) -> str | None:
    """A header to set, add or remove. Only request ``set``/``add`` may write Host/:authority."""
    if not name:
        return "a header name cannot be empty"
    lowered = name.lower()
    if authority_allowed:
        if name.startswith(":") and lowered != ":authority":
            return f"header {name!r} cannot be written: names starting with ':' are reserved"
        return None
    if lowered == "host":
        return f"header {name!r} cannot be written here: the Host header is set by routing"
    if name.startswith(":"):
        return f"header {name!r} cannot be written: names starting with ':' are reserved"
    return None


def check_header_value(value: str) -> str | None:
    """A header value, which may use Envoy's ``%VARIABLE%`` substitutions."""
    if not _HEADER_VALUE_CHARS.match(value):
        return f"header value {value!r} contains control characters"
    problem = _envoy_format_problem(value)
    return f"header value {value!r}: {problem}" if problem else None


def _envoy_format_problem(value: str) -> str | None:
    # Envoy's substitution-format parser: literals, %%, %VAR%, %VAR(["arg", ...])%.
    state = "literal"
    i = 0
    start = 0
    while i < len(value):
        c = value[i]
        if state == "literal":
            if c == "%":
                if i == len(value) - 1:
                    return "an unescaped '%' at the end (write '%%' for a literal percent sign)"
                if value[i + 1] == "%":
                    i += 1
                else:
                    state, start = "variable", i
        elif state == "variable":
            if c == "%":
                state = "literal"
            elif c == "(":
                state = "expect_array"
        elif state == "expect_array":
            if c == "[":
                state = "expect_string"
            elif c != " ":
                state = "string"
        elif state == "expect_string":
            if c == '"':
                state = "string"
            elif c != " ":
                return "expected '\"' to start an argument"
        elif state == "string":
            if c == "\\":
                if i == len(value) - 1:
                    return "an unterminated backslash in an argument"
                i += 1
            elif c == ")":
                state = "expect_variable_end"
            elif c == '"':
                state = "expect_delimiter_or_end"
        elif state == "expect_delimiter_or_end":
            if c == ",":
                state = "expect_string"
            elif c == "]":
                state = "expect_args_end"
            elif c != " ":
                return "expected ',', ']' or a space between arguments"
        elif state == "expect_args_end":
            if c == ")":
                state = "expect_variable_end"
            elif c != " ":
                return f"expected ')' after the arguments, found {c!r}"
        elif state == "expect_variable_end":
            if c == "%":
                state = "literal"
            elif c != " ":
                return "expected '%' to end the variable"
        i += 1
    if state != "literal":
        return f"the variable {value[start:]!r} is not terminated with '%'"
    return None


def check_http_status(status: int) -> str | None:
    if 200 <= status <= 599:
        return None
    return f"HTTP status {status} is not in the range 200..599"


def check_retry_on(value: str) -> list[str]:
    """Every retryOn condition that neither Envoy nor Istio knows; empty when all are valid."""
    problems = []
    for token in value.split(","):
        if token in RETRY_ON_POLICIES:
            continue
        if is_number(token) and _is_http_status(int(token)):
            continue
        if token.strip() in RETRY_ON_POLICIES:
            problems.append(f"{token!r} has spaces around it; write the conditions as '5xx,reset'")
            continue
        problems.append(
            f"{token!r} is not a retry condition; use HTTP status codes or: "
            + ", ".join(RETRY_ON_POLICIES)
        )
    return problems


def _is_http_status(code: int) -> bool:
    try:
        HTTPStatus(code)
    except ValueError:
        return False
    return True


# -- regexes -------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=4096)
def compile_re2(pattern: str) -> re2._Regexp:
    """Compile with RE2, the engine Envoy uses: what validates is what data planes run."""
    options = re2.Options()
    options.log_errors = False
    return re2.compile(pattern, options)


def check_regex(pattern: str) -> str | None:
    if not pattern:
        return "a regex match must not be empty"
    if len(pattern) > MAX_REGEX_LENGTH:
        return (
            f"the regex is {len(pattern)} characters long; at most {MAX_REGEX_LENGTH} are allowed"
        )
    try:
        compile_re2(pattern)
    except re2.error as exc:
        reason = exc.args[0].decode() if exc.args and isinstance(exc.args[0], bytes) else str(exc)
        return (
            f"{pattern!r} is not a valid RE2 regex ({reason}); Envoy uses RE2 syntax, which has no "
            "backreferences or lookaround: https://github.com/google/re2/wiki/Syntax"
        )
    return None


# -- exportTo, localities ------------------------------------------------------------------------


def check_export_to(values: Iterable[str], namespace: str, *, service_entry: bool) -> list[str]:
    problems: list[str] = []
    seen: set[str] = set()
    values = list(values)
    for value in values:
        key = namespace if value == "." else value
        if key in seen:
            problems.append(
                f"exportTo lists the current namespace {namespace!r} twice ('.' and by name)"
                if value == "."
                else f"exportTo lists {value!r} twice"
            )
            continue
        seen.add(key)
        if value in (".", "*") or (value == "~" and service_entry):
            continue
        if value == "~":
            problems.append("exportTo '~' (no one) is only allowed on a ServiceEntry")
        elif not is_dns1123_label(value):
            problems.append(
                f"exportTo entry {value!r} is invalid: use '.', '*', '~' or a namespace name"
            )
    if "*" in values and len(values) > 1:
        problems.append("exportTo cannot mix '*' (everyone) with other entries")
    if "~" in values and len(values) > 1:
        problems.append("exportTo cannot mix '~' (no one) with other entries")
    return problems


def check_localities(localities: Iterable[str]) -> str | None:
    """Locality patterns ``region/zone/subzone`` (maybe ending in ``*``) that do not overlap."""
    seen: list[list[str]] = []
    for locality in localities:
        if locality.count("*") > 1 or ("*" in locality and not locality.endswith("*")):
            return f"locality {locality!r}: at most one '*' is allowed, and only at the end"
        parts = locality.split("/")
        if any(p == "" for p in parts):
            return f"locality {locality!r} must not contain an empty region, zone or subzone"
        for earlier in seen:
            if _localities_overlap(earlier, parts):
                return f"locality {locality!r} overlaps one specified before it"
        seen.append(parts)
    return None


def _localities_overlap(a: list[str], b: list[str]) -> bool:
    for x, y in zip(a, b, strict=False):
        if x == "*" or y == "*":
            return True
        if x != y:
            return False
    return True


def is_prime(n: int) -> bool:
    if n < 2:
        return False
    if n < 4:
        return True
    if n % 2 == 0:
        return False
    i = 3
    while i * i <= n:
        if n % i == 0:
            return False
        i += 2
    return True


# -- security ------------------------------------------------------------------------------------


def check_jwks_uri(uri: str) -> str | None:
    try:
        parts = urlsplit(uri)
        _ = parts.port  # raises for a non-numeric port
    except ValueError as exc:
        return f"jwksUri {uri!r} is not a valid URL: {exc}"
    if parts.scheme not in ("http", "https"):
        return f"jwksUri {uri!r} must use http:// or https://"
    if not parts.netloc:
        return f"jwksUri {uri!r} has no host"
    return None


def check_jwks(text: str) -> str | None:
    try:
        document = json.loads(text)
    except ValueError as exc:
        return f"jwks is not valid JSON: {exc}"
    keys = document.get("keys") if isinstance(document, dict) and "keys" in document else [document]
    if not isinstance(keys, list) or not all(isinstance(k, dict) and "kty" in k for k in keys):
        return 'jwks must be a JSON Web Key or a JWK Set ({"keys": [{"kty": ...}]})'
    return None


def check_service_account(value: str) -> str | None:
    if not value:
        return "an empty value is not allowed"
    if "*" in value:
        return f"{value!r}: wildcards are not allowed in service accounts"
    if value.count("/") > 1:
        return f"{value!r}: expected 'serviceAccount' or 'namespace/serviceAccount'"
    if len(value) > 320:
        return f"{value!r} is longer than 320 characters"
    namespace, slash, account = value.rpartition("/")
    if slash and not namespace:
        return f"{value!r}: the namespace before '/' is empty"
    if not account:
        return f"{value!r}: the service account after '/' is empty"
    return None


def check_authz_port(value: str) -> str | None:
    if is_number(value) and int(value) <= 65535:
        return None
    return f"{value!r} is not a port number (0..65535)"


def check_path_template(path: str) -> str | None:
    """Istio's path templates: ``{*}`` matches one segment, ``{**}`` the rest (last only)."""
    if "{*}" not in path and "{**}" not in path:
        return None
    segments = path.strip("/").split("/")
    seen_double = False
    for segment in segments:
        if segment in ("{*}", "{**}"):
            if seen_double:
                return f"path {path!r}: '{{**}}' must be the last operator"
            seen_double = segment == "{**}"
            continue
        if "{" in segment or "}" in segment:
            return f"path {path!r}: segment {segment!r} has '{{' or '}}' outside a path template"
        if not re.fullmatch(r"[a-zA-Z0-9\-._~%!$&'()+,;:@=]+", segment):
            return (
                f"path {path!r}: segment {segment!r} has characters a path template does not allow"
            )
    return None


_MAP_KEY_ATTRIBUTES = (
    "request.headers",
    "request.experimental.inline.headers",
    "request.auth.claims",
    "experimental.envoy.filters.",
)
_IP_ATTRIBUTES = ("source.ip", "remote.ip", "destination.ip")
_FREE_ATTRIBUTES = (
    "source.namespace",
    "source.principal",
    "request.auth.principal",
    "request.auth.audiences",
    "request.auth.presenter",
    "connection.sni",
)
CONDITION_KEYS = (
    "request.headers[<name>]",
    "source.ip",
    "remote.ip",
    "source.namespace",
    "source.principal",
    "source.serviceAccount",
    "request.auth.principal",
    "request.auth.audiences",
    "request.auth.presenter",
    "request.auth.claims[<claim>]",
    "destination.ip",
    "destination.port",
    "connection.sni",
    "experimental.envoy.filters.*[<key>]",
)


def check_condition_key(key: str) -> str | None:
    """The key of one ``when`` condition of an AuthorizationPolicy."""
    if key.startswith(_MAP_KEY_ATTRIBUTES):
        open_at = key.find("[")
        if open_at <= 0 or not key.endswith("]") or open_at == len(key) - 2:
            return f"key {key!r} must name an entry, as in 'request.headers[x-user]'"
        return None
    if key in _IP_ATTRIBUTES or key in _FREE_ATTRIBUTES:
        return None
    if key in ("destination.port", "source.serviceAccount"):
        return None
    if key == "destination.namespace":
        return "'destination.namespace' is replaced by the policy's metadata.namespace"
    if key.startswith("destination.labels"):
        return "'destination.labels' is replaced by the policy's selector"
    if key in ("destination.name", "destination.user"):
        return f"{key!r} was only supported in v1alpha1"
    return f"unknown condition key {key!r}; the keys are: " + ", ".join(CONDITION_KEYS)


def check_condition_value(key: str, value: str) -> str | None:
    """One value of a ``when`` condition whose key is valid."""
    if value == "":
        return "an empty value is not allowed"
    if key in _IP_ATTRIBUTES:
        return check_ip_or_cidr(value)
    if key == "destination.port":
        return check_authz_port(value)
    if key == "source.serviceAccount":
        return check_service_account(value)
    return None
