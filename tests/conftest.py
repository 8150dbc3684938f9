"""Fixtures for tests against real servers on 127.0.0.1.

``start_backends(n)`` runs tests/backend.py in its own process with ``n`` instances; ``service``
declares them as a ServiceEntry with WorkloadEntries; ``mesh_dir`` writes a mesh as YAML;
``start_meshd`` runs the control plane on a directory.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.meshd_process import MeshdProcess

BACKEND = Path(__file__).parent / "backend.py"


@dataclass
class Backends:
    ports: list[int]
    process: subprocess.Popen[str]

    def _url(self, index: int, path: str) -> str:
        return f"http://127.0.0.1:{self.ports[index]}{path}"

    def behave(self, index: int, **behaviour: Any) -> None:
        params = {k: (int(v) if isinstance(v, bool) else v) for k, v in behaviour.items()}
        httpx.post(self._url(index, "/_backend/behave"), params=params).raise_for_status()

    def stats(self, index: int) -> dict[str, Any]:
        response = httpx.get(self._url(index, "/_backend/stats"))
        response.raise_for_status()
        result: dict[str, Any] = response.json()
        return result

    def requests(self, index: int) -> int:
        return int(self.stats(index)["requests"])

    def clear(self) -> None:
        for i in range(len(self.ports)):
            httpx.post(self._url(i, "/_backend/clear")).raise_for_status()

    def stop(self) -> None:
        if self.process.stdin is not None:
            self.process.stdin.close()
        try:
            self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        if self.process.stdout is not None:
            self.process.stdout.close()


@pytest.fixture
def start_backends() -> Iterator[Callable[[int], Backends]]:
    started: list[Backends] = []

    def start(count: int) -> Backends:
        process = subprocess.Popen(
            [sys.executable, str(BACKEND), str(count)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert process.stdout is not None
        line = process.stdout.readline()
        backends = Backends(json.loads(line)["ports"], process)
        started.append(backends)
        return backends

    yield start
    for backends in started:
        backends.stop()


def unused_port() -> int:
    """A port nothing listens on (bound and released), for connection failures."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def service(
    name: str,
    namespace: str,
    ports: list[int],
    *,
    labels: list[dict[str, str]] | None = None,
    localities: list[str] | None = None,
    port: int = 8080,
) -> str:
    """A ServiceEntry for ``name.namespace`` on ``port``, with a WorkloadEntry per backend port."""
    docs = [
        f"""
        apiVersion: networking.istio.io/v1
        kind: ServiceEntry
        metadata: {{name: {name}, namespace: {namespace}}}
        spec:
          hosts: [{name}.{namespace}.svc.cluster.local]
          location: MESH_INTERNAL
          resolution: STATIC
          ports: [{{number: {port}, name: http, protocol: HTTP}}]
          workloadSelector: {{labels: {{app: {name}}}}}
        """
    ]
    for i, backend_port in enumerate(ports):
        extra = (labels or [{}] * len(ports))[i]
        all_labels = {"app": name, **extra}
        label_text = ", ".join(f"{k}: {v}" for k, v in all_labels.items())
        locality = (localities or [""] * len(ports))[i]
        docs.append(
            f"""
            apiVersion: networking.istio.io/v1
            kind: WorkloadEntry
            metadata: {{name: {name}-{i}, namespace: {namespace}}}
            spec:
              address: 127.0.0.1
              ports: {{http: {backend_port}}}
              labels: {{{label_text}}}
              locality: "{locality}"
            """
        )
    return "\n---\n".join(textwrap.dedent(d).strip() for d in docs)


@pytest.fixture
def mesh_dir(tmp_path: Path) -> Callable[..., Path]:
    def write(*documents: str) -> Path:
        text = "\n---\n".join(textwrap.dedent(d).strip() for d in documents)
        (tmp_path / "mesh.yaml").write_text(text + "\n")
        return tmp_path

    return write


@pytest.fixture
def start_meshd(tmp_path: Path) -> Iterator[Callable[..., MeshdProcess]]:
    """Start meshd on a directory (default: ``mesh_dir``'s) with free ports; stopped at the end."""
    started: list[MeshdProcess] = []

    def start(config_dir: Path | None = None, *args: str) -> MeshdProcess:
        process = MeshdProcess.start(config_dir or tmp_path, *args)
        started.append(process)
        return process

    yield start
    for process in started:
        process.stop()


@pytest.fixture
def start_proxy(tmp_path: Path) -> Iterator[Callable[..., Any]]:
    """Start libmesh-proxy with these arguments (tests/proxy_process.py); stopped at the end."""
    from tests.proxy_process import ProxyProcess

    started: list[ProxyProcess] = []

    def start(*args: str, env: dict[str, str] | None = None) -> ProxyProcess:
        # saved configuration goes to the test's directory, not ~/.cache
        environment = {"LIBMESH_STATE_DIR": str(tmp_path / "state"), **(env or {})}
        proxy = ProxyProcess.start(*args, env=environment)
        started.append(proxy)
        return proxy

    yield start
    for proxy in started:
        proxy.stop()
