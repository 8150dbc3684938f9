"""SPIFFE IDs, as the SPIFFE ID standard defines them, in Istio's shape
(``spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>``)."""

from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = ["SpiffeId", "SpiffeIdError"]

# The SPIFFE ID standard: a trust domain is lower-case letters, digits, dots, dashes and
# underscores; a path segment is letters, digits, dots, dashes and underscores, and never "."
# or "..".
_TRUST_DOMAIN = re.compile(r"[a-z0-9._-]+")
_SEGMENT = re.compile(r"[A-Za-z0-9._-]+")
_DNS_LABEL = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")


class SpiffeIdError(ValueError):
    """A string that is not a SPIFFE ID; the message says which rule it breaks."""


@dataclass(frozen=True, slots=True)
class SpiffeId:
    """A workload identity: ``trust_domain`` and ``path`` (``/ns/shop/sa/reviews``)."""

    trust_domain: str
    path: str

    @classmethod
    def parse(cls, text: str) -> SpiffeId:
        if not text.startswith("spiffe://"):
            raise SpiffeIdError(f"{text!r} is not a SPIFFE ID: it must start with spiffe://")
        rest = text[len("spiffe://") :]
        trust_domain, slash, path = rest.partition("/")
        if not trust_domain:
            raise SpiffeIdError(f"{text!r} has no trust domain")
        if not _TRUST_DOMAIN.fullmatch(trust_domain):
            raise SpiffeIdError(
                f"{text!r}: the trust domain may hold only lower-case letters, digits, '.', "
                "'-' and '_'"
            )
        if any(c in text for c in "?#"):
            raise SpiffeIdError(f"{text!r}: a SPIFFE ID has no query or fragment")
        full_path = slash + path
        if full_path:
            for segment in path.split("/"):
                if not segment:
                    raise SpiffeIdError(f"{text!r} has an empty path segment (or ends with /)")
                if segment in (".", ".."):
                    raise SpiffeIdError(f"{text!r}: a path segment may not be '.' or '..'")
                if not _SEGMENT.fullmatch(segment):
                    raise SpiffeIdError(
                        f"{text!r}: path segment {segment!r} may hold only letters, digits, "
                        "'.', '-' and '_'"
                    )
        return cls(trust_domain, full_path)

    @classmethod
    def for_workload(cls, trust_domain: str, namespace: str, service_account: str) -> SpiffeId:
        """Istio's identity for a service account: ``spiffe://td/ns/<ns>/sa/<sa>``."""
        return cls.parse(f"spiffe://{trust_domain}/ns/{namespace}/sa/{service_account}")

    @property
    def namespace(self) -> str | None:
        """The namespace of an Istio-shaped ID, else ``None``."""
        parts = self.path.split("/")
        return parts[2] if len(parts) == 5 and parts[1] == "ns" and parts[3] == "sa" else None

    @property
    def service_account(self) -> str | None:
        parts = self.path.split("/")
        return parts[4] if len(parts) == 5 and parts[1] == "ns" and parts[3] == "sa" else None

    @property
    def dns_name(self) -> str | None:
        """The DNS name meshd's CA also puts in an Istio-shaped SVID —
        ``<sa>.<ns>.spiffe.<trust-domain>`` — so that a TLS client that checks only host names
        (grpcio's ``ssl_channel_credentials``) can still check the server's SPIFFE ID: the CA
        gives that name to that identity only. ``None`` when the ID has no such form (not
        Istio-shaped, or not a valid host name)."""
        namespace, account = self.namespace, self.service_account
        if namespace is None or account is None:
            return None
        # each one lower-case label, never folded or split: two identities never share a name
        if not (_DNS_LABEL.fullmatch(namespace) and _DNS_LABEL.fullmatch(account)):
            return None
        name = f"{account}.{namespace}.spiffe.{self.trust_domain}"
        if len(name) > 253 or not all(_DNS_LABEL.fullmatch(label) for label in name.split(".")):
            return None
        return name

    def __str__(self) -> str:
        return f"spiffe://{self.trust_domain}{self.path}"
