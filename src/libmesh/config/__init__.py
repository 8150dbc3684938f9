"""Istio configuration: the typed model, loading, validation and analysis.

Load files or directories of Istio YAML; every resource comes back typed and immutable, every
problem as a :class:`Finding` that names its file, line, resource and field::

    from libmesh import config

    result = config.load("mesh/")
    for finding in result.findings:
        print(finding.format())
    for vs in result.config.of_kind("VirtualService"):
        print(vs.name, [r.destination.host for h in vs.spec.http for r in h.route])
"""

from .._duration import Duration
from .._frozen import FrozenMap
from ._analyze import ANALYZERS, analyze
from ._findings import Code, Codes, Finding, Severity
from ._hosts import resolve_host
from ._kubernetes import KubernetesService, KubernetesServicePort
from ._loader import ConfigSet, Loader, LoadResult, load, load_text
from ._mesh import MeshSettings, load_mesh_settings
from ._networking import *  # noqa: F403 - the model is part of the public surface
from ._networking import __all__ as _networking_all
from ._registry import Registry, RegistryService, ServicePortInfo, Workload, labels_match
from ._resource import DEFAULT_NAMESPACE, KINDS, Kind, ObjectMeta, Resource, ResourceRef
from ._schema import Message
from ._security import *  # noqa: F403
from ._security import __all__ as _security_all
from ._source import Location
from ._where import where

__all__ = [
    "ANALYZERS",
    "DEFAULT_NAMESPACE",
    "KINDS",
    "Code",
    "Codes",
    "ConfigSet",
    "Duration",
    "Finding",
    "FrozenMap",
    "Kind",
    "KubernetesService",
    "KubernetesServicePort",
    "LoadResult",
    "Loader",
    "Location",
    "MeshSettings",
    "Message",
    "ObjectMeta",
    "Registry",
    "RegistryService",
    "Resource",
    "ResourceRef",
    "ServicePortInfo",
    "Severity",
    "Workload",
    "analyze",
    "labels_match",
    "load",
    "load_mesh_settings",
    "load_text",
    "resolve_host",
    "where",
    *_networking_all,
    *_security_all,
]
