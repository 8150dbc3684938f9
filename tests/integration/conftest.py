"""Fixtures for tests against real servers on 127.0.0.1.

``start_backends(n)`` runs tests/backend.py in its own process with ``n`` instances; ``mesh_dir``
writes a mesh as YAML; ``caller`` sends requests through a mesh with httpx's sync client or its
async one (each test runs both ways).
"""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys
import textwrap
import threading
from collections.abc import Callable, Coroutine, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

import libmesh

BACKEND = Path(__file__).parents[1] / "backend.py"


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


class Caller:
    """Sends requests through a mesh, with httpx's sync or async client."""

    def __init__(self, mesh: libmesh.Mesh, mode: str) -> None:
        self.mesh = mesh
        self.mode = mode
        if mode == "sync":
            self._client = mesh.client(timeout=10)
        else:
            self._loop = asyncio.new_event_loop()
            self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
            self._thread.start()
            self._async_client = self._run(self._make_async_client())

    async def _make_async_client(self) -> httpx.AsyncClient:
        return self.mesh.async_client(timeout=10)

    def _run(self, coroutine: Coroutine[Any, Any, Any]) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(timeout=60)

    def request(self, method: str, url: str, **kwargs: Any) -> httpx.Response:
        if self.mode == "sync":
            return self._client.request(method, url, **kwargs)
        return self._run(self._async_client.request(method, url, **kwargs))  # type: ignore[no-any-return]

    def get(self, url: str, **kwargs: Any) -> httpx.Response:
        return self.request("GET", url, **kwargs)

    def gets(self, count: int, url: str, **kwargs: Any) -> list[httpx.Response]:
        if self.mode == "sync":
            return [self._client.get(url, **kwargs) for _ in range(count)]

        async def many() -> list[httpx.Response]:
            return [await self._async_client.get(url, **kwargs) for _ in range(count)]

        return self._run(many())  # type: ignore[no-any-return]

    def concurrently(self, count: int, url: str, **kwargs: Any) -> list[httpx.Response | Exception]:
        """``count`` requests at once; each result is a response or the exception raised."""
        if self.mode == "sync":

            def one(_: int) -> httpx.Response | Exception:
                try:
                    return self._client.get(url, **kwargs)
                except Exception as exc:
                    return exc

            with ThreadPoolExecutor(max_workers=count) as pool:
                return list(pool.map(one, range(count)))

        async def all_at_once() -> list[httpx.Response | Exception]:
            results = await asyncio.gather(
                *(self._async_client.get(url, **kwargs) for _ in range(count)),
                return_exceptions=True,
            )
            return list(results)  # type: ignore[arg-type]

        return self._run(all_at_once())  # type: ignore[no-any-return]

    def workers(self, workers: int, each: int, url: str, **kwargs: Any) -> list[httpx.Response]:
        """``workers`` concurrent loops, each sending ``each`` requests one after another."""
        if self.mode == "sync":

            def loop(_: int) -> list[httpx.Response]:
                return [self._client.get(url, **kwargs) for _ in range(each)]

            with ThreadPoolExecutor(max_workers=workers) as pool:
                return [r for batch in pool.map(loop, range(workers)) for r in batch]

        async def loop_async() -> list[httpx.Response]:
            return [await self._async_client.get(url, **kwargs) for _ in range(each)]

        async def all_loops() -> list[httpx.Response]:
            batches = await asyncio.gather(*(loop_async() for _ in range(workers)))
            return [r for batch in batches for r in batch]

        return self._run(all_loops())  # type: ignore[no-any-return]

    def close(self) -> None:
        if self.mode == "sync":
            self._client.close()
        else:
            self._run(self._async_client.aclose())
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=5)
            self._loop.close()
        self.mesh.close()


@pytest.fixture(params=["sync", "async"])
def connect(request: pytest.FixtureRequest) -> Iterator[Callable[[libmesh.Mesh], Caller]]:
    callers: list[Caller] = []

    def make(mesh: libmesh.Mesh) -> Caller:
        caller = Caller(mesh, request.param)
        callers.append(caller)
        return caller

    yield make
    for caller in callers:
        caller.close()
