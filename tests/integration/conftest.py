"""``connect`` sends requests through a mesh with httpx's sync client or its async one (each
test runs both ways). The backends, meshd and YAML helpers are in tests/conftest.py."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Coroutine, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest

import libmesh


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
