"""What a workload accepts from its callers, read from its ``virtualInbound`` listener as Envoy
reads filter chains: a chain naming the connection's destination port is preferred to one that
names none, then the chain must match the connection's transport (``tls`` or ``raw_buffer``).
No chain: the connection is refused (plaintext to a STRICT port, TLS to a DISABLE one)."""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from envoy.config.listener.v3 import listener_components_pb2, listener_pb2
from envoy.extensions.filters.http.jwt_authn.v3 import config_pb2 as jwt_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)

from ._authz import Authorizer
from ._jwt import JwtPolicy

__all__ = ["INBOUND_LISTENER", "InboundPolicy", "MtlsMode"]

INBOUND_LISTENER = "virtualInbound"


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


PERMISSIVE = InboundPolicy()
