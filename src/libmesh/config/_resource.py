"""The Kubernetes-style envelope around every spec, and the table of kinds libmesh reads."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from .._frozen import EMPTY, FrozenMap
from ._networking import DestinationRule, ServiceEntry, VirtualService, WorkloadEntry
from ._schema import Int64, Message, optional
from ._security import AuthorizationPolicy, PeerAuthentication, RequestAuthentication
from ._source import NOWHERE, Location

__all__ = [
    "DEFAULT_NAMESPACE",
    "KINDS",
    "Kind",
    "ObjectMeta",
    "Resource",
    "ResourceRef",
]

DEFAULT_NAMESPACE = "default"

SpecT = TypeVar("SpecT", bound=Message)


@dataclass(frozen=True, slots=True, kw_only=True)
class ObjectMeta(Message):
    """Kubernetes ``metadata``. Server-populated fields are accepted so that the output of
    ``kubectl get -o yaml`` loads as it is; libmesh reads only name, namespace, labels and
    annotations."""

    name: str | None = None
    generate_name: str | None = None
    namespace: str | None = None
    labels: FrozenMap[str, str] = EMPTY
    annotations: FrozenMap[str, str] = EMPTY
    uid: str | None = None
    resource_version: str | None = None
    generation: Int64 | None = None
    self_link: str | None = None
    creation_timestamp: str | None = None
    deletion_timestamp: str | None = None
    deletion_grace_period_seconds: Int64 | None = None
    finalizers: tuple[str, ...] = ()
    owner_references: Any = optional()
    managed_fields: Any = optional()


@dataclass(frozen=True, slots=True, order=True)
class ResourceRef:
    """Names one resource: ``VirtualService default/reviews``."""

    kind: str
    namespace: str
    name: str

    def __str__(self) -> str:
        return f"{self.kind} {self.namespace}/{self.name}"


@dataclass(frozen=True, slots=True, kw_only=True)
class Resource(Generic[SpecT]):
    """One loaded resource: its envelope, its typed spec and where it was written."""

    api_version: str
    kind: str
    metadata: ObjectMeta
    spec: SpecT
    status: Any = None
    _at: Location = field(default=NOWHERE, repr=False, compare=False)

    @property
    def name(self) -> str:
        return self.metadata.name or ""

    @property
    def namespace(self) -> str:
        return self.metadata.namespace or DEFAULT_NAMESPACE

    @property
    def ref(self) -> ResourceRef:
        return ResourceRef(self.kind, self.namespace, self.name or "<unnamed>")

    @property
    def location(self) -> Location:
        return self._at


@dataclass(frozen=True, slots=True)
class Kind:
    group: str
    name: str
    versions: tuple[str, ...]
    spec: type[Message]

    def accepts(self, api_version: str) -> bool:
        group, _, version = api_version.rpartition("/")
        return group == self.group and version in self.versions


_NETWORKING = ("v1", "v1beta1", "v1alpha3")
_SECURITY = ("v1", "v1beta1")

KINDS: FrozenMap[str, Kind] = FrozenMap(
    (kind.name, kind)
    for kind in (
        Kind("networking.istio.io", "VirtualService", _NETWORKING, VirtualService),
        Kind("networking.istio.io", "DestinationRule", _NETWORKING, DestinationRule),
        Kind("networking.istio.io", "ServiceEntry", _NETWORKING, ServiceEntry),
        Kind("networking.istio.io", "WorkloadEntry", _NETWORKING, WorkloadEntry),
        Kind("security.istio.io", "PeerAuthentication", _SECURITY, PeerAuthentication),
        Kind("security.istio.io", "AuthorizationPolicy", _SECURITY, AuthorizationPolicy),
        Kind("security.istio.io", "RequestAuthentication", _SECURITY, RequestAuthentication),
    )
)
