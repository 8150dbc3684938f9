"""What a workload accepts from its callers, read from its ``virtualInbound`` listener as Envoy
reads filter chains: a chain naming the connection's destination port is preferred to one that
names none, then the chain must match the connection's transport (``tls`` or ``raw_buffer``).
No chain: the connection is refused (plaintext to a STRICT port, TLS to a DISABLE one)."""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from envoy.config.listener.v3 import listener_components_pb2, listener_pb2
from envoy.extensions.filters.http.jwt_authn.v3 import config_pb2 as jwt_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)

from ..xds._inbound import INBOUND_LISTENER
from ._authz import Authorizer, AuthzRequest, Decision
from ._jwt import JwtPolicy, ValidatedJwt

__all__ = [
    "INBOUND_LISTENER",
    "NOTHING",
    "Arrival",
    "Authenticated",
    "InboundPolicy",
    "MtlsMode",
    "Refusal",
]


class MtlsMode(enum.Enum):
    """PeerAuthentication's modes, as the chains of a port express them."""

    STRICT = "STRICT"  # mutual TLS only
    PERMISSIVE = "PERMISSIVE"  # mutual TLS or plaintext, on one port
    DISABLE = "DISABLE"  # plaintext only

    @classmethod
    def of(cls, transports: frozenset[str]) -> MtlsMode:
        if transports == {"tls"}:
            return cls.STRICT
        if "tls" in transports:
            return cls.PERMISSIVE
        return cls.DISABLE


_NOBODY = Authorizer()  # no policy: everyone allowed


@dataclass(frozen=True, slots=True)
class InboundPolicy:
    """Per destination port (``None``: every other port), the transports accepted and who
    may call (the chains' RBAC filters)."""

    transports: Mapping[int | None, frozenset[str]] = field(
        default_factory=lambda: {None: frozenset({"tls", "raw_buffer"})}
    )
    authorizers: Mapping[int | None, Authorizer] = field(default_factory=dict)
    authentication: Mapping[int | None, JwtPolicy] = field(default_factory=dict)

    @classmethod
    def of(cls, listener: listener_pb2.Listener) -> InboundPolicy:
        """Raises :class:`ValueError` (or ``AuthzConfigError``) for what libmesh cannot
        enforce: the listener is then NACKed, never half-applied."""
        transports: dict[int | None, set[str]] = {}
        authorizers: dict[int | None, Authorizer] = {}
        authentication: dict[int | None, JwtPolicy] = {}
        for chain in listener.filter_chains:
            match = chain.filter_chain_match
            port = match.destination_port.value if match.HasField("destination_port") else None
            kind = match.transport_protocol or "raw_buffer"
            if kind not in ("tls", "raw_buffer"):
                raise ValueError(
                    f"filter chain {chain.name!r}: transport_protocol {kind!r} is not one "
                    "libmesh knows (tls, raw_buffer)"
                )
            transports.setdefault(port, set()).add(kind)
            if port not in authorizers:
                filters = _http_filters(chain)
                authorizers[port] = Authorizer.from_http_filters(filters)
                jwt = _jwt_policy(filters)
                if jwt is not None:
                    authentication[port] = jwt
        return cls(
            {port: frozenset(kinds) for port, kinds in transports.items()},
            {port: a for port, a in authorizers.items() if not a.empty},
            authentication,
        )

    def jwt(self, port: int | None) -> JwtPolicy | None:
        """Which tokens ``port`` checks (RequestAuthentication); ``None``: none."""
        found = self.authentication.get(port) if port is not None else None
        return found if found is not None else self.authentication.get(None)

    def authorizer(self, port: int | None) -> Authorizer:
        """Who may call ``port`` (AuthorizationPolicy); ``check`` it per request."""
        found = self.authorizers.get(port) if port is not None else None
        if found is None:
            found = self.authorizers.get(None, _NOBODY)
        return found

    def _for(self, port: int | None) -> frozenset[str]:
        found = self.transports.get(port) if port is not None else None
        if found is None:
            found = self.transports.get(None, frozenset())
        return found

    def mode(self, port: int | None) -> MtlsMode:
        return MtlsMode.of(self._for(port))

    def accepts(self, port: int | None, tls: bool) -> bool:
        """Whether a connection to ``port`` over mutual TLS (or plaintext) is accepted."""
        return ("tls" if tls else "raw_buffer") in self._for(port)


def _http_filters(chain: listener_components_pb2.FilterChain) -> Sequence[hcm_pb2.HttpFilter]:
    for network_filter in chain.filters:
        manager = hcm_pb2.HttpConnectionManager()
        if network_filter.typed_config.Unpack(manager):
            return list(manager.http_filters)
    return []


def _jwt_policy(filters: Sequence[hcm_pb2.HttpFilter]) -> JwtPolicy | None:
    for http_filter in filters:
        config = jwt_pb2.JwtAuthentication()
        if not http_filter.disabled and http_filter.typed_config.Unpack(config):
            return JwtPolicy.of(config)
    return None


@dataclass(frozen=True, slots=True)
class Arrival:
    """An inbound request as the server saw it. ``path`` is the path the application routes
    on (decoded by the server), ``query`` the raw query string; ``principal`` the caller's
    SPIFFE ID when its certificate was verified, else ``""``; ``port`` the port it came to."""

    method: str
    path: str
    query: str = ""
    host: str = ""
    headers: Mapping[str, str] = field(default_factory=dict)
    principal: str = ""
    source_ip: str = ""
    destination_ip: str = ""
    port: int | None = None


@dataclass(frozen=True, slots=True)
class Authenticated:
    """What RequestAuthentication made of a request (the token check itself needs the issuer's
    keys, so the transports run it). ``error``: refuse with 401 and this message."""

    jwt: ValidatedJwt | None = None
    error: str = ""
    # headers the app must not see from the caller: the token's, when it is not forwarded, and
    # every claim header a provider writes (a caller's own would pose as a verified claim)
    remove_headers: tuple[str, ...] = ()
    add_headers: tuple[tuple[str, str], ...] = ()

    @property
    def principal(self) -> str:
        return self.jwt.principal if self.jwt is not None else ""

    @property
    def claims(self) -> Mapping[str, Any] | None:
        return self.jwt.claims if self.jwt is not None else None


NOTHING = Authenticated()


@dataclass(frozen=True, slots=True)
class Refusal:
    """How a request is refused, as Envoy answers it: an HTTP status, or for gRPC a status
    name, and the message (the body)."""

    status: int
    grpc_status: str
    message: str
    headers: tuple[tuple[str, str], ...] = ()


RBAC_DENIED = "RBAC: access denied"  # Envoy's body for a request its RBAC filter denies


def refuse_plaintext(policy: InboundPolicy, arrival: Arrival) -> Refusal | None:
    """PeerAuthentication: a plaintext request (no verified client certificate) to a port that
    requires mutual TLS. The server in front did not terminate the mesh's mTLS, so nothing is
    known of the caller: refused, as Envoy would refuse the connection."""
    if arrival.principal or policy.accepts(arrival.port, tls=False):
        return None
    mode = policy.mode(arrival.port).value
    where = f"port {arrival.port}" if arrival.port is not None else "this workload"
    return Refusal(
        403, "UNAUTHENTICATED", f"mutual TLS required: {where} is {mode} (PeerAuthentication)"
    )


def authorize(
    policy: InboundPolicy, arrival: Arrival, authenticated: Authenticated
) -> tuple[Refusal | None, Decision | None]:
    """RequestAuthentication's verdict, then AuthorizationPolicy's: (the refusal or ``None``,
    the authorization decision when a policy was consulted, for the log)."""
    if authenticated.error:
        challenge = f'Bearer realm="http://{arrival.host}{arrival.path}", error="invalid_token"'
        refusal = Refusal(
            401, "UNAUTHENTICATED", authenticated.error, (("www-authenticate", challenge),)
        )
        return refusal, None
    authorizer = policy.authorizer(arrival.port)
    if authorizer.empty:
        return None, None
    decision = authorizer.check(
        AuthzRequest(
            method=arrival.method,
            path=f"{arrival.path}?{arrival.query}" if arrival.query else arrival.path,
            host=arrival.host,
            headers=arrival.headers,
            principal=arrival.principal,
            source_ip=arrival.source_ip,
            destination_ip=arrival.destination_ip,
            destination_port=arrival.port or 0,
            jwt_claims=authenticated.claims,
        )
    )
    if decision.allowed:
        return None, decision
    return Refusal(403, "PERMISSION_DENIED", RBAC_DENIED), decision


PERMISSIVE = InboundPolicy()
