"""The shop, running: meshd, a FastAPI frontend, a Flask orders service and a grpc inventory,
each joined to the mesh with one line, tracing to a local collector.

    .venv/bin/python examples/services/run.py

It starts everything on free ports of 127.0.0.1, checks out a few items (frontend → orders →
inventory, and orders → frontend for the price), then prints one request's trace, the Istio
metrics each side recorded, and stops everything.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
from collector import Collector, tree  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Shop:
    """The shop's processes; ``with Shop() as shop:`` starts them and stops them all."""

    def __init__(self, propagators: str = "", access_log: Path | None = None) -> None:
        self.collector = Collector()
        self.ports = {
            "FRONTEND_PORT": free_port(),
            "ORDERS_PORT": free_port(),
            "INVENTORY_PORT": free_port(),
            "INVENTORY_METRICS_PORT": free_port(),
        }
        self.processes: list[subprocess.Popen[str]] = []
        self.meshd_log: list[str] = []
        self.propagators = propagators
        self.access_log = access_log
        self.scratch = Path(tempfile.mkdtemp(prefix="shop-"))

    @property
    def frontend(self) -> str:
        return f"http://127.0.0.1:{self.ports['FRONTEND_PORT']}"

    @property
    def orders(self) -> str:
        return f"http://127.0.0.1:{self.ports['ORDERS_PORT']}"

    @property
    def inventory_metrics(self) -> str:
        return f"http://127.0.0.1:{self.ports['INVENTORY_METRICS_PORT']}"

    def __enter__(self) -> Shop:
        try:
            self._start()
        except BaseException:
            self.__exit__()
            raise
        return self

    def _start(self) -> None:
        meshd = subprocess.Popen(
            [sys.executable, "-m", "meshd", "--config-dir", str(HERE / "mesh"),
             "--ca-dir", str(self.scratch / "ca"), "--secure-xds-address", "127.0.0.1:0",
             "--xds-address", "127.0.0.1:0", "--admin-address", "127.0.0.1:0",
             "--registration-grace", "1s"],
            stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )  # fmt: skip
        self.processes.append(meshd)
        address = self._meshd_address(meshd)
        env = {
            **os.environ,
            **{k: str(v) for k, v in self.ports.items()},
            "LIBMESH_XDS_ADDRESS": address,
            "OTEL_EXPORTER_OTLP_ENDPOINT": self.collector.endpoint,
            "OTEL_BSP_SCHEDULE_DELAY": "100",
        }
        if self.propagators:  # OpenTelemetry's variable: FastAPI's own spans read it too
            env["OTEL_PROPAGATORS"] = self.propagators
        if self.access_log is not None:
            env["LIBMESH_ACCESS_LOG"] = str(self.access_log)
        for service in ("inventory", "orders", "frontend"):
            self.processes.append(
                subprocess.Popen([sys.executable, str(HERE / f"{service}.py")], env=env)
            )
        deadline = time.monotonic() + 30
        while True:  # every instance registered and reachable through the mesh
            try:
                if httpx.get(f"{self.frontend}/checkout/probe", timeout=5).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline or any(p.poll() is not None for p in self.processes):
                raise RuntimeError("the shop did not start:\n" + "\n".join(self.meshd_log))
            time.sleep(0.2)

    def _meshd_address(self, meshd: subprocess.Popen[str]) -> str:
        found = threading.Event()
        address: list[str] = []

        def read() -> None:
            assert meshd.stderr is not None
            for line in meshd.stderr:
                self.meshd_log.append(line.rstrip())
                if match := re.search(r"xDS \(ADS over gRPC\)\s+(\S+)", line):
                    address.append(match.group(1))
                    found.set()
            found.set()

        threading.Thread(target=read, daemon=True).start()
        if not found.wait(30) or not address:
            raise RuntimeError("meshd did not start:\n" + "\n".join(self.meshd_log))
        return address[0]

    def __exit__(self, *exc: object) -> None:
        for process in reversed(self.processes):
            process.terminate()
        for process in self.processes:
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
            if process.stderr is not None:
                process.stderr.close()
        self.collector.close()
        shutil.rmtree(self.scratch, ignore_errors=True)


def main() -> None:
    with Shop() as shop:
        for item in ("book", "lamp", "mug"):
            response = httpx.get(f"{shop.frontend}/checkout/{item}", timeout=10)
            print(f"GET /checkout/{item} -> {response.status_code} {response.json()}")
        traceparent = "00-" + "ab" * 16 + "-" + "cd" * 8 + "-01"
        httpx.get(f"{shop.frontend}/checkout/pen", headers={"traceparent": traceparent})
        spans = shop.collector.wait_for("ab" * 16, 9)
        print("\nThe trace of GET /checkout/pen, across the three services:")
        for line in tree(spans):
            print("  " + line)
        print("\nIstio's metrics, as each side reported them (requests_total):")
        for name, url in (("frontend", shop.frontend), ("orders", shop.orders),
                          ("inventory", shop.inventory_metrics)):  # fmt: skip
            text = httpx.get(f"{url}/metrics/", timeout=5, follow_redirects=True).text
            for line in text.splitlines():
                if line.startswith("istio_requests_total{"):
                    labels = dict(re.findall(r'(\w+)="([^"]*)"', line))
                    print(
                        f"  {name}: reporter={labels['reporter']} "
                        f"{labels['source_workload']} -> {labels['destination_service_name']} "
                        f"({labels['request_protocol']}, {labels['response_code']}): "
                        f"{line.rsplit(' ', 1)[1]}"
                    )


if __name__ == "__main__":
    main()
