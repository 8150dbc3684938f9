"""Host names as Istio reads them: short names, wildcards and how two hosts overlap."""

from __future__ import annotations

from ._rules import is_ip

__all__ = ["DEFAULT_DOMAIN", "host_matches", "is_subset_of", "resolve_host"]

DEFAULT_DOMAIN = "cluster.local"


def resolve_host(host: str, namespace: str, domain: str = DEFAULT_DOMAIN) -> str:
    """Istio's short-name rule: a host without a dot is a service in the resource's namespace.

    ``reviews`` in namespace ``shop`` is ``reviews.shop.svc.cluster.local``. A host with a dot,
    a wildcard or an IP address is taken as written (so ``reviews.shop`` is *not* expanded,
    exactly as in Istio).
    """
    # A name without dots or colons cannot be an IP address: spare the parse on the hot path.
    if not host or "." in host or host.startswith("*") or (":" in host and is_ip(host)):
        return host
    return f"{host}.{namespace}.svc.{domain}"


def host_matches(a: str, b: str) -> bool:
    """Whether two hosts, either possibly a wildcard, can name the same service."""
    a_wild, b_wild = a.startswith("*"), b.startswith("*")
    if a_wild and b_wild:
        shorter, longer = (a, b) if len(a) < len(b) else (b, a)
        return longer[1:].endswith(shorter[1:])
    if a_wild:
        return b.endswith(a[1:])
    if b_wild:
        return a.endswith(b[1:])
    return a == b


def is_subset_of(a: str, b: str) -> bool:
    """Whether every name host ``a`` covers is also covered by host ``b``."""
    a_wild, b_wild = a.startswith("*"), b.startswith("*")
    if a_wild and not b_wild:
        return False
    if a_wild and b_wild:
        return len(a) >= len(b) and a[1:].endswith(b[1:])
    if b_wild:
        return a.endswith(b[1:])
    return a == b
