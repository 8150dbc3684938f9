"""The mesh: an engine, and where its configuration comes from.

Connected to meshd (or any xDS control plane)::

    mesh = libmesh.Mesh.connect("127.0.0.1:15010", namespace="shop", labels={"app": "frontend"})
    client = httpx.Client(transport=mesh.transport())

or in local mode, from Istio YAML files translated in-process and reloaded when they change::

    mesh = libmesh.Mesh.from_files("mesh/", namespace="shop", labels={"app": "frontend"})

The same translator as meshd's runs in local mode, and the engine is built only from xDS
resources in both, so a process behaves the same whichever way it is configured.
"""

from __future__ import annotations

import asyncio
import datetime
import hashlib
import logging
import os
import random
import socket
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
import grpc.aio
import httpx

from ._exceptions import ConfigError, ConfigTimeout
from ._frozen import FrozenMap
from .config import Loader, LoadResult, Registry
from .identity import IdentityError, WorkloadIdentity
from .identity._tls import TlsContexts
from .policy import ClusterStats, Engine
from .telemetry import Telemetry
from .transport import (
    AsyncMeshClientInterceptor,
    AsyncMeshTransport,
    MeshClientInterceptor,
    MeshTransport,
)
from .transport._grpc import mesh_aio_channel, mesh_channel
from .xds import Locality, Node, Registration, Snapshot, TranslationCache, translate
from .xds._client import XdsClient, XdsStatus

if TYPE_CHECKING:
    import requests

    from .transport import MeshAdapter

__all__ = ["DEFAULT", "Mesh", "node_from_environment"]

logger = logging.getLogger("libmesh")
_SETTLE = 0.05  # seconds a changed file must stay unchanged before it is read (as meshd does)

DEFAULT_XDS_ADDRESS = "127.0.0.1:15010"


class _Default:
    def __repr__(self) -> str:
        return "DEFAULT"


DEFAULT: Any = _Default()  # "not passed": distinct from None, which turns a feature off


def _default_node_id(labels: Mapping[str, str], namespace: str | None) -> str:
    """Unique per process, readable in ``meshctl proxy-status``: ``app-host-pid.namespace``."""
    app = labels.get("app", "libmesh")
    namespace = namespace or os.environ.get("LIBMESH_NAMESPACE", "default")
    return f"{app}-{socket.gethostname()}-{os.getpid()}.{namespace}"


def node_from_environment(
    *,
    namespace: str | None = None,
    labels: Mapping[str, str] | None = None,
    locality: str | None = None,
    service_account: str | None = None,
    node_id: str | None = None,
) -> Node:
    """Who this process is, from arguments or else ``LIBMESH_NAMESPACE``, ``LIBMESH_LABELS``
    (``app=reviews,version=v1``), ``LIBMESH_LOCALITY`` (``region/zone/subzone``) and
    ``LIBMESH_SERVICE_ACCOUNT``."""
    env = os.environ
    if labels is None:
        raw = env.get("LIBMESH_LABELS", "")
        labels = dict(p.split("=", 1) for p in raw.split(",") if "=" in p)
    return Node(
        id=node_id or env.get("LIBMESH_NODE_ID", "") or _default_node_id(labels, namespace),
        namespace=namespace or env.get("LIBMESH_NAMESPACE", "default"),
        labels=FrozenMap(labels),
        locality=Locality.parse(locality if locality is not None else env.get("LIBMESH_LOCALITY")),
        service_account=service_account or env.get("LIBMESH_SERVICE_ACCOUNT", "default"),
    )


class Mesh:
    """The in-process data plane: an engine, and the configuration that feeds it."""

    def __init__(self, engine: Engine, node: Node) -> None:
        self._engine = engine
        self.node = node
        self._loader: Loader | None = None
        self._xds: XdsClient | None = None
        self._translation = TranslationCache()  # a reload translates what changed
        self._watcher: threading.Thread | None = None
        self._stop = threading.Event()
        self.last_result: LoadResult | None = None
        self.identity: WorkloadIdentity | None = None  # the SVID, with Mesh.connect(token=)
        self.tls: TlsContexts | None = None  # TLS contexts presenting that SVID
        self.telemetry = Telemetry(
            node,
            clusters=lambda: self._engine.clusters,
            config_version=lambda: self._engine.version,
        )

    @classmethod
    def from_snapshot(cls, snapshot: Snapshot, node: Node | None = None) -> Mesh:
        return cls(Engine(snapshot), node or Node())

    @classmethod
    def from_files(
        cls,
        *paths: str | os.PathLike[str],
        namespace: str | None = None,
        labels: Mapping[str, str] | None = None,
        locality: str | None = None,
        service_account: str | None = None,
        watch: bool = True,
        poll_interval: float = 1.0,
        clock: Callable[[], float] | None = None,
        rng: random.Random | None = None,
    ) -> Mesh:
        """A mesh configured from YAML files or directories (read recursively).

        Raises :class:`ConfigError` when the configuration has errors: a process should not
        start on configuration it would misapply. With ``watch`` (the default), a background
        thread re-reads the files when they change; a change with errors is reported in the
        log and ignored, and the last good configuration keeps serving. ``clock`` (monotonic
        seconds) and ``rng`` replace time and randomness, for tests.
        """
        node = node_from_environment(
            namespace=namespace, labels=labels, locality=locality, service_account=service_account
        )
        mesh = cls(Engine(clock=clock or time.monotonic, rng=rng), node)
        mesh._loader = Loader(paths)
        result = mesh.reload()
        if not result.ok:
            raise ConfigError(
                f"the mesh configuration in {', '.join(mesh._loader.paths)} has errors",
                result.errors,
            )
        if watch:
            mesh.watch(poll_interval)
        return mesh

    @classmethod
    def connect(
        cls,
        address: str | None = None,
        *,
        namespace: str | None = None,
        labels: Mapping[str, str] | None = None,
        locality: str | None = None,
        service_account: str | None = None,
        node_id: str | None = None,
        ports: Mapping[str, int] | None = None,
        workload_address: str = "",
        wait: float | None = 10.0,
        state_file: str | os.PathLike[str] | None = DEFAULT,
        token: str | None = None,
        trust_domain: str | None = None,
        svid_ttl: float = 24 * 3600,
        clock: Callable[[], float] | None = None,
        rng: random.Random | None = None,
    ) -> Mesh:
        """A mesh configured by meshd (or any xDS v3 control plane) at ``address`` (default:
        ``LIBMESH_XDS_ADDRESS``, else ``127.0.0.1:15010``), over one background ADS stream.

        Waits up to ``wait`` seconds for the first configuration (``None``: as long as it
        takes; ``0``: not at all, requests pass through untouched until it arrives) and raises
        :class:`ConfigTimeout` when none came. Each configuration is saved to ``state_file``
        (default: a file per workload under ``LIBMESH_STATE_DIR`` or ``~/.cache/libmesh``;
        ``None`` saves nothing); when the control plane cannot be reached, the saved one is
        served at once, until the control plane is back.

        With a bootstrap ``token`` (default: ``LIBMESH_TOKEN``; ``meshctl token create``), the
        process also gets its SVID — ``spiffe://<trust_domain>/ns/<namespace>/sa/
        <service_account>`` — from meshd's CA (asking for ``svid_ttl`` seconds of lifetime) and
        keeps it current (``mesh.identity``, rotated at about half the lifetime); mesh
        connections present it (auto mTLS, ``ISTIO_MUTUAL``), and so does :func:`libmesh.serve`.

        With ``ports`` (``{"http": 8080}``, by service port name), this process registers
        itself: while it is connected, it is an endpoint of the services whose selector matches
        its ``labels``, at ``workload_address`` (default: the address it connects from).
        """
        address = address or os.environ.get("LIBMESH_XDS_ADDRESS") or DEFAULT_XDS_ADDRESS
        node = node_from_environment(
            namespace=namespace,
            labels=labels,
            locality=locality,
            service_account=service_account,
            node_id=node_id,
        )
        registration = (
            Registration(
                name=node.id.removesuffix(f".{node.namespace}"),
                address=workload_address,
                ports=FrozenMap(ports),
            )
            if ports
            else None
        )
        path = _default_state_file(address, node) if state_file is DEFAULT else state_file
        engine = Engine(clock=clock or time.monotonic, rng=rng)
        mesh = cls(engine, node)
        from . import __version__

        client = XdsClient(
            address,
            node,
            engine.update,
            check=engine.check,
            registration=registration,
            state_file=Path(path) if path is not None else None,
            version=__version__,
        )
        mesh._xds = client
        token = token or os.environ.get("LIBMESH_TOKEN")
        if token:
            from .identity import SpiffeId, WorkloadIdentity

            mesh.use_identity(
                WorkloadIdentity(
                    address,
                    SpiffeId.for_workload(
                        trust_domain or _trust_domain(), node.namespace, node.service_account
                    ),
                    token=token,
                    ttl=datetime.timedelta(seconds=svid_ttl),
                ).start()
            )
        client.start()
        if (wait is None or wait > 0) and not client.wait(wait):
            client.close()
            saved = f"no configuration saved in {path}" if path else "no saved configuration"
            raise ConfigTimeout(
                f"no configuration from the control plane at {address} within {wait}s "
                f"({client.status.last_error or 'no answer'}), and {saved}; is meshd "
                "running there (LIBMESH_XDS_ADDRESS)?"
            )
        if mesh.identity is not None and (wait is None or wait > 0):
            try:
                mesh.identity.wait(wait)
            except IdentityError as exc:
                mesh.close()
                raise ConfigTimeout(str(exc)) from exc
        return mesh

    @classmethod
    async def aconnect(cls, address: str | None = None, **options: Any) -> Mesh:
        """:meth:`connect`, without blocking the event loop while it waits."""
        return await asyncio.to_thread(cls.connect, address, **options)

    def use_identity(self, identity: WorkloadIdentity) -> None:
        """Present ``identity``'s SVID on mesh connections (ISTIO_MUTUAL, auto mTLS) and in
        :func:`libmesh.serve`; ``Mesh.connect(token=...)`` does this itself."""
        self.identity = identity
        self.tls = TlsContexts(identity)
        self.telemetry.watch_identity(identity)

    @property
    def trust_domain(self) -> str:
        """The mesh's trust domain: the identity's, else ``LIBMESH_TRUST_DOMAIN``, else
        ``cluster.local``."""
        if self.identity is not None:
            return self.identity.identity.trust_domain
        return _trust_domain()

    @property
    def xds_status(self) -> XdsStatus | None:
        """The control-plane connection's state, or ``None`` in local mode."""
        return self._xds.status if self._xds is not None else None

    def report_health(self, healthy: bool, message: str = "") -> None:
        """Tell the control plane whether this (self-registered) workload can take traffic;
        meshd marks its endpoint healthy or unhealthy in every client's EDS."""
        if self._xds is None:
            raise RuntimeError("report_health needs a mesh from Mesh.connect")
        self._xds.report_health(healthy, message)

    @property
    def engine(self) -> Engine:
        return self._engine

    # configuration -----------------------------------------------------------------------------

    def reload(self) -> LoadResult:
        """Re-read the files. Applies the configuration only when it has no errors."""
        if self._loader is None:
            raise RuntimeError("this mesh was not made from files: there is nothing to reload")
        result = self._loader.load()
        self.last_result = result
        for finding in result.findings:
            log = logger.error if finding.is_error else logger.warning
            log("%s", finding.format())
        if not result.ok:
            logger.error(
                "libmesh: configuration rejected (%d errors); still serving version %s",
                len(result.errors),
                self._engine.version or "(none)",
            )
            return result
        self.apply(result)
        return result

    def apply(self, result: LoadResult) -> None:
        registry = Registry.build(result.config, result.services)
        snapshot = translate(
            result.config,
            registry,
            self.node,
            trust_domain=self.trust_domain,
            cache=self._translation,
        )
        if snapshot.version != self._engine.version:
            self._engine.update(snapshot)
            logger.info("libmesh: configuration version %s applied", snapshot.version)

    def watch(self, poll_interval: float = 1.0) -> None:
        """Reload when the files change, checking every ``poll_interval`` seconds."""
        loader = self._loader
        if self._watcher is not None or loader is None:
            return

        def settled() -> bool:
            """Wait until the files stop changing (a file being written is seen half-written
            otherwise); False when the mesh closes first."""
            seen = loader.fingerprint()
            while not self._stop.wait(_SETTLE):
                now = loader.fingerprint()
                if now == seen:
                    return True
                seen = now
            return False

        def loop() -> None:
            while not self._stop.wait(poll_interval):
                try:
                    if loader.changed() and settled():
                        self.reload()
                except Exception:  # the watcher must survive anything a file system does
                    logger.exception("libmesh: reloading the configuration failed")

        self._watcher = threading.Thread(target=loop, name="libmesh-config-watch", daemon=True)
        self._watcher.start()

    def close(self) -> None:
        self._stop.set()
        if self._xds is not None:
            self._xds.close()
        if self.identity is not None:
            self.identity.close()
        if self._watcher is not None:
            self._watcher.join(timeout=5)
            self._watcher = None

    def __enter__(self) -> Mesh:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # clients -----------------------------------------------------------------------------------

    def transport(self, **options: Any) -> MeshTransport:
        """A sync httpx transport; ``options`` go to each underlying ``httpx.HTTPTransport``."""
        return MeshTransport(self, **options)

    def async_transport(self, **options: Any) -> AsyncMeshTransport:
        return AsyncMeshTransport(self, **options)

    def client(self, **options: Any) -> httpx.Client:
        """An ``httpx.Client`` on this mesh; ``options`` go to the client."""
        return httpx.Client(transport=self.transport(), **options)

    def async_client(self, **options: Any) -> httpx.AsyncClient:
        return httpx.AsyncClient(transport=self.async_transport(), **options)

    def requests_adapter(self, **options: Any) -> MeshAdapter:
        """A ``requests`` transport adapter on this mesh (needs ``libmesh[requests]``);
        ``options`` go to each underlying ``httpx.HTTPTransport``, as for :meth:`transport`."""
        from .transport._requests import MeshAdapter

        return MeshAdapter(self, **options)

    def session(self, **options: Any) -> requests.Session:
        """A ``requests.Session`` whose ``http://`` requests go through this mesh; ``options``
        go to :meth:`requests_adapter`."""
        import requests

        session = requests.Session()
        session.mount("http://", self.requests_adapter(**options))
        # https:// keeps requests' own adapter until the mesh originates TLS itself: mTLS with
        # SPIFFE identities comes with the security work.
        return session

    def grpc_channel(
        self,
        target: str,
        options: Sequence[tuple[str, Any]] | None = None,
        compression: grpc.Compression | None = None,
    ) -> grpc.Channel:
        """``grpc.insecure_channel(target, options, compression)`` with the mesh's policies
        applied to its calls (``target`` is ``host:port``; short names resolve in this mesh's
        namespace). Closing it closes the channels it made to each endpoint."""
        return mesh_channel(self, target, options, compression)

    def grpc_aio_channel(
        self,
        target: str,
        options: Sequence[tuple[str, Any]] | None = None,
        compression: grpc.Compression | None = None,
    ) -> grpc.aio.Channel:
        """The ``grpc.aio`` twin of :meth:`grpc_channel`."""
        return mesh_aio_channel(self, target, options, compression)

    def grpc_interceptor(
        self, target: str, *, options: Sequence[tuple[str, Any]] = ()
    ) -> MeshClientInterceptor:
        """The interceptor for a channel to ``target`` made otherwise: ``interceptor.intercept(
        grpc.secure_channel(...))``, or ``grpc.intercept_channel(channel, ..., interceptor)``
        (last in the chain) and ``interceptor.close()`` with the channel. ``options`` go to
        the channel made to each endpoint."""
        return MeshClientInterceptor(self, target, options=options)

    def grpc_aio_interceptor(
        self, target: str, *, options: Sequence[tuple[str, Any]] = ()
    ) -> AsyncMeshClientInterceptor:
        """For ``grpc.aio.insecure_channel(target, interceptors=[...,
        *interceptor.interceptors()])``; ``await interceptor.aclose()`` with the channel."""
        return AsyncMeshClientInterceptor(self, target, options=options)

    # what happened -----------------------------------------------------------------------------

    def stats(self) -> dict[str, ClusterStats]:
        """Counters per cluster, with the requests each endpoint has received."""
        stats = {}
        for name, cluster in self._engine.clusters.items():
            cluster.stats.by_host = {h.key: h.requests for h in cluster.hosts if h.requests}
            stats[name] = cluster.stats
        return stats

    def ejected_hosts(self) -> dict[str, list[str]]:
        return {
            name: [h.key for h in cluster.hosts if h.monitor.ejected]
            for name, cluster in self._engine.clusters.items()
            if any(h.monitor.ejected for h in cluster.hosts)
        }


def _default_state_file(address: str, node: Node) -> Path:
    """One file per workload and control plane, stable across restarts of the process."""
    identity = "|".join(
        [
            address,
            node.namespace,
            node.service_account,
            *sorted(f"{k}={v}" for k, v in node.labels.items()),
        ]
    )
    digest = hashlib.sha256(identity.encode()).hexdigest()[:16]
    base = os.environ.get("LIBMESH_STATE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "libmesh"
    )
    return Path(base) / f"xds-{node.namespace}-{digest}.state"


def _trust_domain() -> str:
    return os.environ.get("LIBMESH_TRUST_DOMAIN") or "cluster.local"
