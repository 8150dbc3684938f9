"""meshd: the directory store, the registry, the snapshot cache, the ADS server and the admin
pages, on one event loop.

A change on disk is loaded once the files stop changing, validated, and either accepted (it
becomes the configuration every client is pushed) or rejected (reported with file and line in
the log, the metrics and ``/debug/configz``, while the last good configuration keeps
serving). Changes, and workloads registering or leaving, are debounced: a burst of them is one
push.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from cryptography import x509

from libmesh import __version__
from libmesh.config import Finding, Loader, LoadResult, Registry, analyze
from libmesh.identity import SpiffeId

from ._admin import AdminServer, Page
from ._ads import Connection, XdsServer
from ._ca import CAError, CertificateAuthority
from ._cache import SnapshotCache
from ._certificates import CertificateService
from ._metrics import SHORT_TYPES, Metrics
from ._registrations import Registrations
from ._tokens import TokenError, TokenIssuer

__all__ = ["Meshd", "Settings", "StartupError"]

logger = logging.getLogger("meshd")


class StartupError(Exception):
    """meshd cannot start: the message says why and what to do."""


@dataclass(frozen=True)
class Settings:
    config_dir: Path
    xds_address: str = "127.0.0.1:15010"
    admin_address: str = "127.0.0.1:15014"
    poll_interval: float = 0.1  # how often the store is checked for changes
    settle: float = 0.05  # how long files must stay unchanged before a change is loaded
    debounce: float = 0.1  # a push waits for this much quiet ...
    debounce_max: float = 1.0  # ... but no longer than this after the first change
    registration_grace: float = 10.0  # a disconnected workload stays an endpoint this long
    root_namespace: str = "istio-system"
    # the certificate authority's directory (root, its key, the token key); None: no CA
    ca_dir: Path | None = None
    trust_domain: str = "cluster.local"
    # xDS and the CA over TLS with meshd's own certificate (Istio's 15012); None: not served
    secure_xds_address: str | None = None


@dataclass
class Rejection:
    at: float  # wall clock
    errors: tuple[Finding, ...]


@dataclass
class _Pending:
    first: float | None = None  # monotonic time of the first change not pushed yet
    last: float = 0.0
    reasons: set[str] = field(default_factory=set)


def _certificate_service(settings: Settings) -> CertificateService:
    """The CA and its token issuer, from ``settings.ca_dir`` (made there on first start)."""
    assert settings.ca_dir is not None
    try:
        ca = CertificateAuthority.load_or_create(settings.ca_dir, settings.trust_domain)
        tokens = TokenIssuer.load_or_create(settings.ca_dir)
    except (CAError, TokenError, OSError) as exc:
        raise StartupError(f"--ca-dir {settings.ca_dir}: {exc}") from exc
    return CertificateService(ca, tokens)


def split_address(address: str, flag: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit() or int(port) > 65535:
        raise StartupError(
            f"{flag} must be HOST:PORT (for example 127.0.0.1:15010), not {address!r}"
        )
    return host.strip("[]"), int(port)


class Meshd:
    def __init__(self, settings: Settings, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.settings = settings
        self.clock = clock
        self.metrics = Metrics()
        self.loader = Loader(settings.config_dir)
        self.cache = SnapshotCache(
            root_namespace=settings.root_namespace, trust_domain=settings.trust_domain
        )
        self.registrations = Registrations(grace=settings.registration_grace, clock=clock)
        self.xds = XdsServer(
            self.cache,
            self.metrics,
            identifier=f"meshd {__version__}",
            on_connect=self._on_connect,
            on_disconnect=self._on_disconnect,
            on_health=self._on_health,
        )
        self.secure_xds_port = 0
        self.certificates: CertificateService | None = None
        self.admin = AdminServer(
            {
                "/": self._index,
                "/metrics": self._metrics_page,
                "/ready": self._ready,
                "/debug/syncz": self._syncz,
                "/debug/configz": self._configz,
                "/debug/registryz": self._registryz,
            }
        )
        self.config: LoadResult | None = None
        self.config_registry = Registry()
        self.loaded_at = 0.0
        self.rejection: Rejection | None = None
        self.analysis: list[Finding] = []
        self.xds_port = 0
        self.admin_port = 0
        self._pending = _Pending()
        self._wake_pusher = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._grpc: grpc.aio.Server | None = None
        self._analysis: asyncio.Future[None] | None = None

    # life cycle -------------------------------------------------------------------------------

    async def start(self) -> None:
        """Load the store, then listen. Raises :class:`StartupError` when the configuration has
        errors or an address cannot be bound."""
        xds_host, xds_port = split_address(self.settings.xds_address, "--xds-address")
        admin_host, admin_port = split_address(self.settings.admin_address, "--admin-address")
        directory = self.settings.config_dir
        if not directory.is_dir():
            raise StartupError(f"--config-dir {directory}: no such directory")
        result = await asyncio.to_thread(self.loader.load)
        for finding in result.findings:
            (logger.error if finding.is_error else logger.warning)("%s", finding.format())
        if not result.ok:
            raise StartupError(
                f"the configuration in {directory} has {len(result.errors)} "
                f"error{'s' if len(result.errors) != 1 else ''} (listed above); fix them, or "
                f"check with: meshctl validate -f {directory}"
            )
        self._accept(result)
        self._rebuild()
        self._grpc = grpc.aio.server(
            options=[
                ("grpc.max_send_message_length", -1),
                ("grpc.max_receive_message_length", 16 * 1024 * 1024),
                ("grpc.keepalive_time_ms", 30_000),
                ("grpc.keepalive_permit_without_calls", 1),
                ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
                ("grpc.so_reuseport", 0),
            ]
        )
        self._grpc.add_generic_rpc_handlers((self.xds.handler(),))
        if self.settings.ca_dir is not None:
            self.certificates = _certificate_service(self.settings)
            self._grpc.add_generic_rpc_handlers((self.certificates.handler(),))
        try:
            self.xds_port = self._grpc.add_insecure_port(f"{xds_host}:{xds_port}")
        except RuntimeError as exc:
            raise StartupError(
                f"cannot listen for xDS on {self.settings.xds_address}: {exc}"
            ) from exc
        secure = self.settings.secure_xds_address
        if secure and self.certificates is not None:
            self.secure_xds_port = self._add_secure_port(secure, self.certificates)
        await self._grpc.start()
        try:
            self.admin_port = await self.admin.start(admin_host, admin_port)
        except OSError as exc:
            await self._grpc.stop(None)
            raise StartupError(
                f"cannot listen for the admin pages on {self.settings.admin_address}: "
                f"{exc.strerror or exc}"
            ) from exc
        self._tasks = [
            asyncio.create_task(self._watch(), name="meshd-watch"),
            asyncio.create_task(self._pusher(), name="meshd-push"),
            asyncio.create_task(self._expire_registrations(), name="meshd-registrations"),
        ]

    def _add_secure_port(self, address: str, certificates: CertificateService) -> int:
        """Serve xDS and the CA over TLS with meshd's own certificate, to clients that present
        an SVID of this trust domain (mutual TLS): they renew it there without a token. (grpcio
        either requires and verifies a client certificate or never asks for one; a first SVID
        comes with a token on the plaintext address.)"""
        host, port = split_address(address, "--secure-xds-address")
        ca = certificates.ca
        meshd_id = SpiffeId.for_workload(ca.trust_domain, self.settings.root_namespace, "meshd")

        served: dict[str, Any] = {"generation": ca.generation, "renew_at": 0.0}

        def configuration() -> Any:
            key, chain = ca.serving_certificate(sorted({host, "localhost", "meshd"}), meshd_id)
            leaf = x509.load_pem_x509_certificate(chain)
            start, end = leaf.not_valid_before_utc.timestamp(), leaf.not_valid_after_utc.timestamp()
            served["renew_at"] = start + (end - start) / 2  # as workloads renew theirs
            return grpc.ssl_server_certificate_configuration(
                [(key, chain)], root_certificates=ca.bundle_pem().encode("ascii")
            )

        def fetch() -> Any:
            """Asked before each handshake: after a root rotation, meshd's own certificate
            comes from the new signer and clients of either root are trusted; past half its
            lifetime, it is renewed."""
            ca.refresh()
            if ca.generation == served["generation"] and time.time() < served["renew_at"]:
                return None
            served["generation"] = ca.generation
            return configuration()

        credentials = grpc.dynamic_ssl_server_credentials(
            configuration(), fetch, require_client_authentication=True
        )
        assert self._grpc is not None
        try:
            return self._grpc.add_secure_port(f"{host}:{port}", credentials)
        except RuntimeError as exc:
            raise StartupError(f"cannot listen for xDS over TLS on {address}: {exc}") from exc

    async def stop(self) -> None:
        if self._analysis is not None:
            self._analysis.cancel()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.admin.stop()
        if self._grpc is not None:
            await self._grpc.stop(grace=0.5)

    # configuration ----------------------------------------------------------------------------

    def _accept(self, result: LoadResult) -> None:
        self.config = result
        self.config_registry = Registry.build(result.config, result.services)
        self.loaded_at = time.time()
        self.rejection = None
        self.metrics.config_errors.set(0)
        self.metrics.config_last_reload_successful.set(1)
        self.metrics.config_loads.inc(result="accepted")
        self.metrics.services.set(len(self.config_registry.services))
        self.metrics.virtual_services.set(len(result.config.of_kind("VirtualService")))
        self.metrics.destination_rules.set(len(result.config.of_kind("DestinationRule")))
        # Analysis across resources only warns: it runs off the event loop, after the push.
        self._analysis = asyncio.ensure_future(self._analyze(result))

    async def _analyze(self, result: LoadResult) -> None:
        try:
            findings = await asyncio.to_thread(analyze, result)
        except Exception:
            logger.exception("meshd: analyzing the configuration failed")
            return
        if result is not self.config:
            return  # a newer configuration is being analyzed
        previous = {f.format() for f in self.analysis}
        self.analysis = findings
        for finding in findings:
            if finding.format() not in previous:
                logger.warning("meshd: %s", finding.format(with_code=True))

    def _reject(self, result: LoadResult) -> None:
        errors = result.errors
        self.rejection = Rejection(time.time(), errors)
        self.metrics.config_errors.set(len(errors))
        self.metrics.config_last_reload_successful.set(0)
        self.metrics.config_loads.inc(result="rejected")
        logger.error(
            "meshd: configuration change rejected (%d error%s); still serving the configuration "
            "loaded at %s",
            len(errors),
            "s" if len(errors) != 1 else "",
            time.strftime("%H:%M:%S", time.localtime(self.loaded_at)),
        )
        for finding in sorted(errors, key=lambda f: (f.location.file, f.location.line)):
            logger.error("meshd:   %s", finding.format())

    async def _watch(self) -> None:
        settings = self.settings
        while True:
            await asyncio.sleep(settings.poll_interval)
            try:
                if not await asyncio.to_thread(self.loader.changed):
                    continue
                changed_at = self.clock()
                seen = await asyncio.to_thread(self.loader.fingerprint)
                while True:  # let a burst of writes settle before reading
                    await asyncio.sleep(settings.settle)
                    now = await asyncio.to_thread(self.loader.fingerprint)
                    if now == seen:
                        break
                    seen = now
                result = await asyncio.to_thread(self.loader.load)
                if not result.ok:
                    self._reject(result)
                    continue
                self._accept(result)
                self._changed("config", changed_at)
            except Exception:  # the store must keep being watched whatever happens
                logger.exception("meshd: reading the configuration failed")

    # registry ---------------------------------------------------------------------------------

    def _on_connect(self, connection: Connection) -> None:
        if connection.registration is None:
            return
        before = self.registrations.workloads
        address = _peer_ip(connection.peer)
        connection.registration_key = self.registrations.connect(
            connection.node, connection.registration, address
        )
        self.metrics.registered.set(len(self.registrations.workloads))
        if self.registrations.workloads != before:
            self._changed("endpoint", self.clock())

    def _on_disconnect(self, connection: Connection) -> None:
        if connection.registration_key is not None:
            self.registrations.disconnect(connection.registration_key)

    def _on_health(self, connection: Connection, healthy: bool, message: str) -> None:
        key = connection.registration_key
        if key is not None and self.registrations.report_health(key, healthy, message):
            self._changed("endpoint", self.clock())

    async def _expire_registrations(self) -> None:
        while True:
            wait = self.registrations.next_expiry()
            await asyncio.sleep(min(wait + 0.01, 1.0) if wait is not None else 1.0)
            if self.registrations.expire():
                self.metrics.registered.set(len(self.registrations.workloads))
                self._changed("endpoint", self.clock())

    # pushing ----------------------------------------------------------------------------------

    def _changed(self, reason: str, at: float) -> None:
        pending = self._pending
        if pending.first is None:
            pending.first = at
        pending.last = self.clock()
        pending.reasons.add(reason)
        self._wake_pusher.set()

    def _rebuild(self) -> None:
        registry = self.config_registry.with_workloads(self.registrations.workloads)
        assert self.config is not None
        self.cache.set(self.config.config, registry)

    async def _pusher(self) -> None:
        settings = self.settings
        while True:
            await self._wake_pusher.wait()
            pending = self._pending
            assert pending.first is not None
            while True:  # debounce: wait for quiet, but not forever
                now = self.clock()
                quiet = now - pending.last
                if quiet >= settings.debounce or now - pending.first >= settings.debounce_max:
                    break
                await asyncio.sleep(
                    min(settings.debounce - quiet, settings.debounce_max - (now - pending.first))
                )
            self._wake_pusher.clear()
            first, reasons = pending.first, pending.reasons
            self._pending = _Pending()
            for reason in sorted(reasons):
                self.metrics.push_triggers.inc(type=reason)
            started = time.perf_counter()
            try:
                self._rebuild()
                keys = {self.cache.key(c.node) for c in self.xds.connections.values()}
                await self._translate(keys)
            except Exception:
                logger.exception("meshd: building the new snapshots failed; clients keep theirs")
                continue
            self.xds.push(changed_at=first)
            built = total = 0
            for key in keys:
                snapshot = self.cache.cached(key)
                if snapshot is not None:
                    built += snapshot.translated[0]
                    total += snapshot.translated[1]
            logger.info(
                "meshd: pushing to %d client%s (%s; %d kind%s of client; translated %d of %d "
                "service ports in %.0f ms, %.0f ms after the change)",
                len(self.xds.connections),
                "" if len(self.xds.connections) == 1 else "s",
                " and ".join(sorted(reasons)) + " change",
                len(keys),
                "" if len(keys) == 1 else "s",
                built,
                total,
                (time.perf_counter() - started) * 1000,
                (self.clock() - first) * 1000,
            )

    async def _translate(self, keys: set[Any]) -> None:
        """Translate for every kind of connected client, off the event loop."""

        def translate_all() -> None:
            for key in keys:
                started = time.perf_counter()
                self.cache.get(key)
                self.metrics.translate_time.observe(time.perf_counter() - started)

        await asyncio.to_thread(translate_all)

    # admin pages ------------------------------------------------------------------------------

    def _index(self) -> Page:
        pages = "\n".join(sorted(self.admin.routes))
        return Page(200, "text/plain", f"meshd {__version__}\n\n{pages}\n".encode())

    def _metrics_page(self) -> Page:
        body = self.metrics.registry.render().encode()
        return Page(200, "text/plain; version=0.0.4; charset=utf-8", body)

    def _ready(self) -> Page:
        if self.config is None or self.xds_port == 0:
            return Page(503, "text/plain", b"not ready: the configuration is not loaded yet\n")
        return Page(200, "text/plain", b"ready\n")

    def _syncz(self) -> Page:
        clients = []
        for connection in sorted(self.xds.connections.values(), key=lambda c: c.id):
            node = connection.node
            types: dict[str, dict[str, Any]] = {}
            for type_url, short in SHORT_TYPES.items():
                state = connection.types.get(type_url)
                if state is None:
                    types[short] = {"status": "NOT SENT", "subscribed": None}
                    continue
                types[short] = {
                    "status": state.status,
                    "subscribed": "*" if state.names is None else sorted(state.names),
                    "sent_version": state.version,
                    "sent_nonce": state.nonce,
                    "sent_at": state.sent_at or None,
                    "acked_version": state.acked,
                    "nack": None
                    if state.nack is None
                    else {
                        "version": state.nack.version,
                        "error": state.nack.error,
                        "at": state.nack.at,
                    },
                }
            clients.append(
                {
                    "id": connection.id,
                    "node": node.id,
                    "namespace": node.namespace,
                    "labels": dict(node.labels),
                    "locality": str(node.locality),
                    "flavor": node.flavor,
                    "peer": connection.peer,
                    "protocol": "delta" if connection.delta else "sotw",
                    "connected_at": connection.connected_at,
                    "registered": None
                    if connection.registration_key is None
                    else "/".join(connection.registration_key),
                    "types": types,
                }
            )
        return _json({"control_plane": f"meshd {__version__}", "clients": clients})

    def _configz(self) -> Page:
        result = self.config
        resources = [] if result is None else result.config.resources
        return _json(
            {
                "config_dir": str(self.settings.config_dir),
                "loaded_at": self.loaded_at,
                "files": [] if result is None else list(result.files),
                "resources": [
                    {
                        "kind": r.kind,
                        "namespace": r.namespace,
                        "name": r.name,
                        "location": str(r.location),
                    }
                    for r in resources
                ],
                "warnings": [
                    f.format()
                    for f in (result.findings if result is not None else ())
                    if not f.is_error
                ],
                "analysis": [f.format(with_code=True) for f in self.analysis],
                "rejected_change": None
                if self.rejection is None
                else {
                    "at": self.rejection.at,
                    "errors": [f.format() for f in self.rejection.errors],
                },
            }
        )

    def _registryz(self) -> Page:
        registry = self.cache.registry
        registered = {(w.namespace, w.name) for w in self.registrations.workloads}
        services = []
        for service in registry.services:
            services.append(
                {
                    "host": service.host,
                    "namespace": service.namespace,
                    "ports": [
                        {"number": p.number, "name": p.name, "protocol": p.protocol}
                        for p in service.ports
                    ],
                    "endpoints": [
                        {
                            "name": w.name,
                            "address": w.address,
                            "ports": dict(w.ports),
                            "labels": dict(w.labels),
                            "locality": w.locality,
                            "healthy": w.healthy,
                            "registered": (w.namespace, w.name) in registered,
                        }
                        for w in registry.workloads_of(service)
                    ],
                }
            )
        return _json({"services": services})


def _json(document: Any) -> Page:
    return Page(200, "application/json", (json.dumps(document, indent=2) + "\n").encode())


def _peer_ip(peer: str) -> str:
    """``ipv4:127.0.0.1:5000`` → ``127.0.0.1``; ``ipv6:[::1]:5000`` → ``::1``."""
    _, _, rest = peer.partition(":")
    host = rest.rpartition(":")[0]
    return host.strip("[]")
