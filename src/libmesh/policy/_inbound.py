"""What a workload accepts from its callers, read from its ``virtualInbound`` listener as Envoy
reads filter chains: a chain naming the connection's destination port is preferred to one that
names none, then the chain must match the connection's transport (``tls`` or ``raw_buffer``).
No chain: the connection is refused (plaintext to a STRICT port, TLS to a DISABLE one)."""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field

from envoy.config.listener.v3 import listener_components_pb2, listener_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)

from ._authz import Authorizer

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

    @classmethod
    def of(cls, listener: listener_pb2.Listener) -> InboundPolicy:
        """Raises :class:`ValueError` (or ``AuthzConfigError``) for what libmesh cannot
        enforce: the listener is then NACKed, never half-applied."""
        transports: dict[int | None, set[str]] = {}
        authorizers: dict[int | None, Authorizer] = {}
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
                authorizers[port] = _authorizer(chain)
        return cls(
            {port: frozenset(kinds) for port, kinds in transports.items()},
            {port: a for port, a in authorizers.items() if not a.empty},
        )

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


def _authorizer(chain: listener_components_pb2.FilterChain) -> Authorizer:
    for network_filter in chain.filters:
        manager = hcm_pb2.HttpConnectionManager()
        if network_filter.typed_config.Unpack(manager):
            return Authorizer.from_http_filters(manager.http_filters)
    return _NOBODY


PERMISSIVE = InboundPolicy()
