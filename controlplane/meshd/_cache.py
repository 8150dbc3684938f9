"""Snapshots, one per kind of node, in the form they are served.

As in go-control-plane, the server knows nothing of how a snapshot is made: the cache
translates the current configuration and registry once per *translation key* (the parts of a
node translation reads), serializes each resource once, and builds each distinct response once.
Two thousand clients in one namespace cost one translation and, on a change, one response.
"""

from __future__ import annotations

import hashlib
import itertools
import threading
from collections.abc import Mapping
from dataclasses import dataclass

from envoy.config.core.v3 import base_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.service.discovery.v3 import discovery_pb2
from google.protobuf import any_pb2

from libmesh.config import ConfigSet, Registry
from libmesh.xds import (
    CLUSTER,
    LISTENER,
    TYPE_URLS,
    Node,
    Snapshot,
    TranslationCache,
    labels_read,
    translate,
    translation_key,
)
from libmesh.xds._inbound import GRPC_SERVER_TEMPLATE, grpc_server_listener_for

__all__ = ["NodeSnapshot", "Prepared", "Served", "SnapshotCache", "Subscription", "add_nonce"]

# LDS and CDS responses carry the state of the world: a resource left out is deleted.
# RDS and EDS responses may carry only what changed.
STATE_OF_THE_WORLD = frozenset({LISTENER, CLUSTER})

# None: every resource of the type (a wildcard subscription); else the names asked for.
Subscription = frozenset[str] | None

_NONCE_TAG = bytes(
    [discovery_pb2.DiscoveryResponse.DESCRIPTOR.fields_by_name["nonce"].number << 3 | 2]
)
_DELTA_NONCE_TAG = bytes(
    [discovery_pb2.DeltaDiscoveryResponse.DESCRIPTOR.fields_by_name["nonce"].number << 3 | 2]
)


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def add_nonce(response: bytes, nonce: str, *, delta: bool = False) -> bytes:
    """A serialized response with its nonce: responses are built once and shared, and the
    nonce, the one field that differs per stream, is appended (protobuf fields may come in any
    order)."""
    value = nonce.encode()
    return response + (_DELTA_NONCE_TAG if delta else _NONCE_TAG) + _varint(len(value)) + value


_NONCES = itertools.count(1)


@dataclass(frozen=True, slots=True)
class Prepared:
    """A response ready for the wire, and the nonce it carries."""

    nonce: str
    body: bytes


@dataclass(frozen=True, slots=True)
class Served:
    """One resource as it goes on the wire, with a version that changes with its content."""

    version: str
    resource: any_pb2.Any


class NodeSnapshot:
    """The resources for one translation key, serialized, with the responses built from them."""

    def __init__(self, resources: Mapping[str, Mapping[str, Served]], version: str) -> None:
        self.version = version
        self.resources = resources
        self.translated = (0, 0)  # service ports translated anew, of all
        self._responses: dict[tuple[object, ...], Prepared | None] = {}
        self._lock = threading.Lock()

    @classmethod
    def of(cls, snapshot: Snapshot, previous: NodeSnapshot | None = None) -> NodeSnapshot:
        """``snapshot`` in served form; a resource unchanged since ``previous`` is shared with
        it rather than encoded again."""
        serialized = snapshot.serialized or {}
        served: dict[str, dict[str, Served]] = {}
        for type_url in TYPE_URLS:
            by_name: dict[str, Served] = {}
            served[type_url] = by_name
            before = previous.resources.get(type_url, {}) if previous is not None else {}
            wire = serialized.get(type_url, {})
            for name, message in snapshot.of_type(type_url).items():
                value = wire.get(name)
                if value is None:
                    value = message.SerializeToString(deterministic=True)
                old = before.get(name)
                if old is not None and old.resource.value == value:
                    by_name[name] = old
                    continue
                version = hashlib.sha256(value).hexdigest()[:16]
                by_name[name] = Served(version, any_pb2.Any(type_url=type_url, value=value))
        return cls(served, snapshot.version)

    def select(self, type_url: str, names: Subscription) -> Mapping[str, Served]:
        everything = self.resources.get(type_url, {})
        if names is None:
            return everything
        if type_url == LISTENER and GRPC_SERVER_TEMPLATE in everything:
            for name in names:
                if name not in everything:
                    self._grpc_server_listener(everything, name)
        return {n: everything[n] for n in names if n in everything}

    def _grpc_server_listener(self, listeners: Mapping[str, Served], name: str) -> None:
        """A grpcio xDS server names its listener by its address: made from the template."""
        template = listener_pb2.Listener()
        template.ParseFromString(listeners[GRPC_SERVER_TEMPLATE].resource.value)
        listener = grpc_server_listener_for(template, name)
        if listener is None:
            return
        value = listener.SerializeToString(deterministic=True)
        served = Served(
            hashlib.sha256(value).hexdigest()[:16], any_pb2.Any(type_url=LISTENER, value=value)
        )
        with self._lock:
            listeners[name] = served  # type: ignore[index]

    def response(
        self,
        type_url: str,
        names: Subscription,
        before: NodeSnapshot | None,
        before_names: Subscription,
        *,
        identifier: str,
    ) -> Prepared | None:
        """The state-of-the-world response that takes a client holding ``before`` (what it was
        last sent, for ``before_names``) to this snapshot; ``None`` when it already has
        everything. Built once per distinct transition and shared, nonce included, by every
        stream that makes it: a nonce need only be unique within a stream, and each stream is
        sent a given response at most once."""
        key = (type_url, names, before.version if before else None, before_names)
        with self._lock:
            if key in self._responses:
                return self._responses[key]
        body = self._build(type_url, names, before, before_names, identifier)
        prepared = None
        if body is not None:
            nonce = str(next(_NONCES))
            prepared = Prepared(nonce, add_nonce(body, nonce))
        with self._lock:
            self._responses[key] = prepared
        return prepared

    def _build(
        self,
        type_url: str,
        names: Subscription,
        before: NodeSnapshot | None,
        before_names: Subscription,
        identifier: str,
    ) -> bytes | None:
        current = self.select(type_url, names)
        previous = before.select(type_url, before_names) if before is not None else None
        if type_url in STATE_OF_THE_WORLD:
            unchanged = (
                previous is not None
                and names == before_names
                and {n: s.version for n, s in current.items()}
                == {n: s.version for n, s in previous.items()}
            )
            if unchanged:
                return None
            sending = list(current.values())
        else:
            previous = previous or {}
            sending = [
                served
                for name, served in current.items()
                if name not in previous or previous[name].version != served.version
            ]
            if not sending:
                return None
        message = discovery_pb2.DiscoveryResponse(
            version_info=self.version,
            type_url=type_url,
            control_plane=base_pb2.ControlPlane(identifier=identifier),
        )
        message.resources.extend(s.resource for s in sending)
        data: bytes = message.SerializeToString()
        return data

    def delta_response(
        self,
        type_url: str,
        names: Subscription,
        known: Mapping[str, str],
        *,
        identifier: str,
    ) -> tuple[bytes | None, dict[str, str]]:
        """The delta response that takes a client knowing ``known`` (name → version) to this
        snapshot, without its nonce, and what the client will know after it."""
        current = self.select(type_url, names)
        message = discovery_pb2.DeltaDiscoveryResponse(
            system_version_info=self.version,
            type_url=type_url,
            control_plane=base_pb2.ControlPlane(identifier=identifier),
        )
        after: dict[str, str] = {}
        for name, served in current.items():
            after[name] = served.version
            if known.get(name) != served.version:
                message.resources.add(name=name, version=served.version).resource.CopyFrom(
                    served.resource
                )
        removed = sorted(n for n in known if n not in current)
        message.removed_resources.extend(removed)
        if not message.resources and not removed:
            return None, after
        return message.SerializeToString(), after


class SnapshotCache:
    """The current configuration and registry, and a snapshot per translation key made from
    them on first use. Thread-safe: translation may run off the event loop."""

    def __init__(
        self, *, root_namespace: str = "istio-system", trust_domain: str = "cluster.local"
    ) -> None:
        self.root_namespace = root_namespace
        self.trust_domain = trust_domain
        self._config = ConfigSet()
        self._registry = Registry()
        self._labels: frozenset[str] = frozenset()
        self._snapshots: dict[Node, NodeSnapshot] = {}
        self._lock = threading.Lock()
        self._building: dict[Node, threading.Lock] = {}
        # kept across generations, for incremental translation and shared encodings
        self._translations: dict[Node, TranslationCache] = {}
        self._previous: dict[Node, NodeSnapshot] = {}
        self.generation = 0

    @property
    def registry(self) -> Registry:
        return self._registry

    def set(self, config: ConfigSet, registry: Registry) -> None:
        """New inputs: every snapshot is made again when next asked for."""
        with self._lock:
            self._config = config
            self._registry = registry
            self._labels = labels_read(config)
            # What the last generation built seeds the next; kinds of client that no longer
            # connect are forgotten.
            self._previous = dict(self._snapshots)
            self._translations = {
                key: cache for key, cache in self._translations.items() if key in self._previous
            }
            self._snapshots = {}
            self._building = {}
            self.generation += 1

    def key(self, node: Node) -> Node:
        return translation_key(node, self._labels)

    def cached(self, key: Node) -> NodeSnapshot | None:
        return self._snapshots.get(key)

    def get(self, key: Node) -> NodeSnapshot:
        """The snapshot for ``key``, translating it if this generation has none yet."""
        with self._lock:
            snapshot = self._snapshots.get(key)
            if snapshot is not None:
                return snapshot
            building = self._building.setdefault(key, threading.Lock())
            generation = self.generation
            config, registry = self._config, self._registry
        with building:  # one translation per key, however many streams ask at once
            with self._lock:
                snapshot = self._snapshots.get(key)
            if snapshot is not None:
                return snapshot
            with self._lock:
                translation = self._translations.setdefault(key, TranslationCache())
                previous = self._previous.get(key)
            translated = translate(
                config,
                registry,
                key,
                root_namespace=self.root_namespace,
                trust_domain=self.trust_domain,
                cache=translation,
            )
            snapshot = NodeSnapshot.of(translated, previous)
            snapshot.translated = (translation.built, translation.built + translation.reused)
            with self._lock:
                if self.generation == generation:
                    self._snapshots[key] = snapshot
            return snapshot
