"""``connect`` sends requests through a mesh with httpx's sync client, its async one, or a
``requests.Session`` (each test runs all three ways). The backends, meshd and YAML helpers are in
tests/conftest.py."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Coroutine, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest
import requests

import libmesh
from libmesh.transport import MeshResponse


def as_httpx(response: requests.Response) -> httpx.Response:
    """A requests response as the httpx one the tests assert on, with what the mesh did in
    ``extensions["libmesh"]`` (absent for hosts outside the mesh, as with httpx)."""
    assert isinstance(response, MeshResponse)
    extensions = {} if response.libmesh is None else {"libmesh": response.libmesh}
    # requests has decoded the body already: its length and encoding no longer apply.
    headers = [
        (name, value)
        for name, value in response.headers.items()
        if name.lower() not in ("content-encoding", "content-length")
    ]
    prepared = response.request
    return httpx.Response(
        response.status_code,
        headers=headers,
        content=response.content,
        request=httpx.Request(prepared.method or "GET", prepared.url or ""),
        extensions=extensions,
    )


class Caller:
    """Sends requests through a mesh, with httpx's sync or async client or with requests."""

    def __init__(self, mesh: libmesh.Mesh, mode: str) -> None:
        self.mesh = mesh
        self.mode = mode
        if mode == "sync":
            self._client = mesh.client(timeout=10)
        elif mode == "requests":
            self._session = mesh.session()
        else:
            self._loop = asyncio.new_event_loop()
            self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
            self._thread.start()
            self._async_client = self._run(self._make_async_client())

    async def _make_async_client(self) -> httpx.AsyncClient:
        return self.mesh.async_client(timeout=10)

    def _run(self, coroutine: Coroutine[Any, Any, Any]) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(timeout=60)

    def _send(self, method: str, url: str, **kwargs: Any) -> httpx.Response:
        """One request from the calling thread, with httpx's sync client or with requests."""
        if self.mode == "sync":
            return self._client.request(method, url, **kwargs)
        if "content" in kwargs:
            kwargs["data"] = kwargs.pop("content")
        # As httpx's client: redirects are answers (tests/integration/test_requests_adapter.py
        # shows the Session following them).
        kwargs.setdefault("allow_redirects", False)
        return as_httpx(self._session.request(method, url, timeout=10, **kwargs))

    def request(self, method: str, url: str, **kwargs: Any) -> httpx.Response:
        if self.mode != "async":
            return self._send(method, url, **kwargs)
        return self._run(self._async_client.request(method, url, **kwargs))  # type: ignore[no-any-return]

    def get(self, url: str, **kwargs: Any) -> httpx.Response:
        return self.request("GET", url, **kwargs)

    def gets(self, count: int, url: str, **kwargs: Any) -> list[httpx.Response]:
        if self.mode != "async":
            return [self._send("GET", url, **kwargs) for _ in range(count)]

        async def many() -> list[httpx.Response]:
            return [await self._async_client.get(url, **kwargs) for _ in range(count)]

        return self._run(many())  # type: ignore[no-any-return]

    def concurrently(self, count: int, url: str, **kwargs: Any) -> list[httpx.Response | Exception]:
        """``count`` requests at once; each result is a response or the exception raised."""
        if self.mode != "async":

            def one(_: int) -> httpx.Response | Exception:
                try:
                    return self._send("GET", url, **kwargs)
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
        if self.mode != "async":

            def loop(_: int) -> list[httpx.Response]:
                return [self._send("GET", url, **kwargs) for _ in range(each)]

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
        elif self.mode == "requests":
            self._session.close()
        else:
            self._run(self._async_client.aclose())
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=5)
            self._loop.close()
        self.mesh.close()


@pytest.fixture(params=["sync", "async", "requests"])
def connect(request: pytest.FixtureRequest) -> Iterator[Callable[[libmesh.Mesh], Caller]]:
    callers: list[Caller] = []

    def make(mesh: libmesh.Mesh) -> Caller:
        caller = Caller(mesh, request.param)
        callers.append(caller)
        return caller

    yield make
    for caller in callers:
        caller.close()
