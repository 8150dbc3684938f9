"""grpcio through the mesh: ``mesh.grpc_channel`` and ``mesh.grpc_aio_channel`` against real gRPC
servers on 127.0.0.1, each test run with the sync and the asyncio channel; and grpcio's own xDS
client configured by ``xds_channel`` against a real meshd.

The servers run in the test process (they are told to fail, hang or wait by the test, and count
their calls); the mesh is built from YAML files, as a user's would be.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import os
import random
import subprocess
import sys
import textwrap
import threading
import time
from collections import Counter
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import pytest

import libmesh
from libmesh.transport import RESPONSE_FLAGS_KEY, MeshRpcError, xds_bootstrap, xds_channel
from tests.conftest import unused_port
from tests.meshd_process import MeshdProcess

TARGET = "echo.shop.svc.cluster.local:8080"
CLUSTER = "outbound|8080||echo.shop.svc.cluster.local"
WHO, CHUNKS, COLLECT, CHAT = (f"/test.Echo/{m}" for m in ("Who", "Chunks", "Collect", "Chat"))
# Real serializers: a call that lost them on its way to the endpoint would answer bytes.
CODEC: dict[str, Any] = {"request_serializer": str.encode, "response_deserializer": bytes.decode}


# -- gRPC servers ---------------------------------------------------------------------------------


class Instance:
    """One echo server: answers with its name; can fail, be slow or hold calls, as told."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.calls = 0
        self.fail_every = 0  # 1: every call fails; 2: the 1st, 3rd, 5th...
        self.code = grpc.StatusCode.UNAVAILABLE
        self.slow_every = 0
        self.slow_seconds = 0.0
        self.hold = False  # calls wait until released
        self.held = threading.Event()
        self.release = threading.Event()
        self.stopping = threading.Event()
        self._lock = threading.Lock()

    def who(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        with self._lock:
            self.calls += 1
            number = self.calls
        if self.hold:
            self.held.set()
            self.release.wait(10)
        if self.slow_every and (number - 1) % self.slow_every == 0:
            self.stopping.wait(self.slow_seconds)
        if self.fail_every and (number - 1) % self.fail_every == 0:
            context.abort(self.code, f"{self.name} fails call {number} on purpose")
        return self.name.encode()

    def chunks(self, request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
        with self._lock:
            self.calls += 1
        for _ in range(3):
            yield self.name.encode()

    def collect(self, requests: Iterator[bytes], context: grpc.ServicerContext) -> bytes:
        with self._lock:
            self.calls += 1
        return f"{self.name}:{sum(1 for _ in requests)}".encode()

    def chat(self, requests: Iterator[bytes], context: grpc.ServicerContext) -> Iterator[bytes]:
        with self._lock:
            self.calls += 1
        for _ in requests:
            yield self.name.encode()


@dataclass
class Echo:
    instances: list[Instance]
    ports: list[int]
    servers: list[grpc.Server]
    pools: list[concurrent.futures.ThreadPoolExecutor]

    def stop(self, index: int) -> None:
        self.instances[index].stopping.set()
        self.instances[index].release.set()
        self.servers[index].stop(None).wait(5)
        self.pools[index].shutdown(wait=True)


@pytest.fixture
def start_echo() -> Iterator[Callable[[int], Echo]]:
    started: list[Echo] = []

    def start(count: int) -> Echo:
        echo = Echo([], [], [], [])
        for i in range(count):
            instance = Instance(f"instance-{i}")
            pool = concurrent.futures.ThreadPoolExecutor(max_workers=16)
            server = grpc.server(pool)
            handlers = {
                "Who": grpc.unary_unary_rpc_method_handler(instance.who),
                "Chunks": grpc.unary_stream_rpc_method_handler(instance.chunks),
                "Collect": grpc.stream_unary_rpc_method_handler(instance.collect),
                "Chat": grpc.stream_stream_rpc_method_handler(instance.chat),
            }
            server.add_generic_rpc_handlers(
                (grpc.method_handlers_generic_handler("test.Echo", handlers),)
            )
            echo.ports.append(server.add_insecure_port("127.0.0.1:0"))
            server.start()
            echo.instances.append(instance)
            echo.servers.append(server)
            echo.pools.append(pool)
        started.append(echo)
        return echo

    yield start
    for echo in started:
        for i in range(len(echo.servers)):
            echo.stop(i)


# -- the mesh -------------------------------------------------------------------------------------


def echo_mesh(ports: list[int], http: str, traffic_policy: str = "") -> str:
    """The echo gRPC service with instance i as subset v{i+1}, and the given route rules."""
    entries = "\n---\n".join(
        f"""
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {{name: echo-v{i + 1}, namespace: shop}}
spec: {{address: 127.0.0.1, ports: {{grpc: {port}}}, labels: {{app: echo, version: v{i + 1}}}}}
"""
        for i, port in enumerate(ports)
    )
    subsets = ", ".join(
        f"{{name: v{i + 1}, labels: {{version: v{i + 1}}}}}" for i in range(len(ports))
    )
    policy = textwrap.indent(textwrap.dedent(traffic_policy).strip(), "    ")
    return f"""
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: echo, namespace: shop}}
spec:
  hosts: [echo.shop.svc.cluster.local]
  location: MESH_INTERNAL
  resolution: STATIC
  ports: [{{number: 8080, name: grpc, protocol: GRPC}}]
  workloadSelector: {{labels: {{app: echo}}}}
---
{entries}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: echo, namespace: shop}}
spec:
  host: echo
  subsets: [{subsets}]
{"  trafficPolicy:" + chr(10) + policy if policy else ""}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: echo, namespace: shop}}
spec:
  hosts: [echo]
  http:
{textwrap.indent(textwrap.dedent(http).strip(), "  ")}
"""


def make_mesh(
    tmp_path: Path, ports: list[int], http: str, traffic_policy: str = ""
) -> libmesh.Mesh:
    directory = tmp_path / "mesh"
    directory.mkdir(exist_ok=True)
    (directory / "mesh.yaml").write_text(echo_mesh(ports, http, traffic_policy))
    return libmesh.Mesh.from_files(directory, namespace="shop", watch=False, rng=random.Random(1))


def to(subset: str) -> str:
    return f"route: [{{destination: {{host: echo, subset: {subset}}}}}]"


def flags(error: grpc.RpcError) -> str:
    return str(dict(error.trailing_metadata() or ()).get(RESPONSE_FLAGS_KEY, ""))  # type: ignore[arg-type]


def assert_idle(mesh: libmesh.Mesh) -> None:
    """Every attempt and call has given its circuit-breaker slots back."""
    deadline = time.monotonic() + 5  # a stream's end is noted just after the caller sees it
    while True:
        busy = {
            name: (c.breaker.in_flight, c.breaker.calls, c.breaker.retries)
            for name, c in mesh.engine.clusters.items()
            if (c.breaker.in_flight, c.breaker.calls, c.breaker.retries) != (0, 0, 0)
        }
        if not busy or time.monotonic() > deadline:
            assert not busy
            return
        time.sleep(0.01)


# -- callers --------------------------------------------------------------------------------------


class Caller:
    """Calls through a mesh with a sync grpcio channel, or a grpc.aio one on its own loop."""

    def __init__(self, mesh: libmesh.Mesh, mode: str) -> None:
        self.mesh = mesh
        self.mode = mode
        self._channels: list[Any] = []
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=8)
        if mode == "aio":
            self._loop = asyncio.new_event_loop()
            self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
            self._thread.start()
        self.channel = self.open(TARGET)

    def _run(self, coroutine: Coroutine[Any, Any, Any]) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(timeout=60)

    def open(self, target: str) -> Any:
        if self.mode == "sync":
            channel = self.mesh.grpc_channel(target)
        else:

            async def make() -> grpc.aio.Channel:
                return self.mesh.grpc_aio_channel(target)

            channel = self._run(make())
        self._channels.append(channel)
        return channel

    def user_channel(self, seen: list[str]) -> Any:
        """A channel built as a user would: another interceptor first, the mesh's last."""
        if self.mode == "sync":
            interceptor = self.mesh.grpc_interceptor(TARGET)
            # intercept() puts the mesh's interceptor next to the real channel
            channel = grpc.intercept_channel(
                interceptor.intercept(grpc.insecure_channel(TARGET)), Recorder(seen)
            )
        else:

            async def make() -> Any:
                mesh = self.mesh.grpc_aio_interceptor(TARGET)
                interceptors = [AsyncRecorder(seen), *mesh.interceptors()]
                return (grpc.aio.insecure_channel(TARGET, interceptors=interceptors), mesh)

            channel = self._run(make())
        self._channels.append(channel)
        return channel[0] if isinstance(channel, tuple) else channel

    def _start(self, channel: Any, metadata: tuple[tuple[str, str], ...], timeout: float) -> Any:
        who = channel.unary_unary(WHO, **CODEC)
        if self.mode == "sync":
            return self._pool.submit(who, "hi", metadata=metadata, timeout=timeout)

        async def call() -> str:
            return str(await who("hi", metadata=metadata, timeout=timeout))

        return asyncio.run_coroutine_threadsafe(call(), self._loop)

    def start(self, *, metadata: tuple[tuple[str, str], ...] = (), timeout: float = 10.0) -> Any:
        """A call in the background: a future of its answer."""
        return self._start(self.channel, metadata, timeout)

    def call(
        self,
        *,
        metadata: tuple[tuple[str, str], ...] = (),
        timeout: float = 10.0,
        channel: Any = None,
    ) -> str:
        answer = self._start(channel or self.channel, metadata, timeout).result(timeout=60)
        assert isinstance(answer, str)
        return answer

    def error(self, **kwargs: Any) -> grpc.RpcError:
        with pytest.raises(grpc.RpcError) as caught:
            self.call(**kwargs)
        return caught.value

    def outcomes(self, count: int, **kwargs: Any) -> Counter[str]:
        """Who answered each call, or the failed call's code."""
        outcomes: Counter[str] = Counter()
        for _ in range(count):
            try:
                outcomes[self.call(**kwargs)] += 1
            except grpc.RpcError as error:
                outcomes[error.code().name] += 1
        return outcomes

    def stream(self, kind: str, metadata: tuple[tuple[str, str], ...] = ()) -> Any:
        """A streaming call: the answers of Chunks (unary-stream) or Chat (stream-stream), or
        Collect's (stream-unary)."""
        method = {"unary_stream": CHUNKS, "stream_unary": COLLECT, "stream_stream": CHAT}[kind]
        multicallable = getattr(self.channel, kind)(method, **CODEC)
        request: Any = "hi" if kind == "unary_stream" else iter(["a", "b", "c"])
        if self.mode == "sync":
            answer = multicallable(request, metadata=metadata, timeout=10)
            return answer if kind == "stream_unary" else list(answer)

        async def call() -> Any:
            answer = multicallable(request, metadata=metadata, timeout=10)
            if kind == "stream_unary":
                return await answer
            return [message async for message in answer]

        return self._run(call())

    def close(self) -> None:
        for channel in self._channels:
            if self.mode == "sync":
                channel.close()
            elif isinstance(channel, tuple):
                aio_channel, interceptor = channel
                self._run(aio_channel.close())
                self._run(interceptor.aclose())
            else:
                self._run(channel.close())
        self._pool.shutdown(wait=True)
        if self.mode == "aio":
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=5)
            self._loop.close()
        self.mesh.close()


class Recorder(grpc.UnaryUnaryClientInterceptor):
    def __init__(self, seen: list[str]) -> None:
        self.seen = seen

    def intercept_unary_unary(
        self, continuation: Any, client_call_details: grpc.ClientCallDetails, request: Any
    ) -> Any:
        self.seen.append(client_call_details.method)
        return continuation(client_call_details, request)


class AsyncRecorder(grpc.aio.UnaryUnaryClientInterceptor):
    def __init__(self, seen: list[str]) -> None:
        self.seen = seen

    async def intercept_unary_unary(
        self, continuation: Any, client_call_details: grpc.aio.ClientCallDetails, request: Any
    ) -> Any:
        method = client_call_details.method
        self.seen.append(method.decode() if isinstance(method, bytes) else method)
        return await continuation(client_call_details, request)


Connect = Callable[[libmesh.Mesh], Caller]
StartEcho = Callable[[int], Echo]


@pytest.fixture(params=["sync", "aio"])
def connect(request: pytest.FixtureRequest) -> Iterator[Connect]:
    callers: list[Caller] = []

    def make(mesh: libmesh.Mesh) -> Caller:
        caller = Caller(mesh, request.param)
        callers.append(caller)
        return caller

    yield make
    for caller in callers:
        caller.close()


@pytest.fixture
def instant() -> Iterator[None]:
    libmesh.set_testing(True)
    yield
    libmesh.set_testing(False)


# -- routing --------------------------------------------------------------------------------------


def test_weighted_split_to_subsets_is_exact(
    tmp_path: Path, start_echo: StartEcho, connect: Connect
) -> None:
    echo = start_echo(2)
    http = """
    - route:
      - {destination: {host: echo, subset: v1}, weight: 90}
      - {destination: {host: echo, subset: v2}, weight: 10}
    """
    caller = connect(make_mesh(tmp_path, echo.ports, http))

    assert caller.outcomes(100) == {"instance-0": 90, "instance-1": 10}
    assert [i.calls for i in echo.instances] == [90, 10]


def test_metadata_matches_route_like_headers(
    tmp_path: Path, start_echo: StartEcho, connect: Connect
) -> None:
    echo = start_echo(2)
    http = f"""
    - match: [{{headers: {{x-version: {{exact: v2}}}}}}]
      {to("v2")}
    - match: [{{uri: {{prefix: /test.Echo/}}}}]
      {to("v1")}
    """
    caller = connect(make_mesh(tmp_path, echo.ports, http))

    assert caller.outcomes(10, metadata=(("x-version", "v2"),)) == {"instance-1": 10}
    assert caller.outcomes(10) == {"instance-0": 10}


def test_a_target_the_mesh_does_not_know_passes_through(
    tmp_path: Path, start_echo: StartEcho, connect: Connect
) -> None:
    echo = start_echo(1)
    caller = connect(make_mesh(tmp_path, echo.ports, f"- {to('v1')}"))

    direct = caller.open(f"127.0.0.1:{echo.ports[0]}")

    assert caller.call(channel=direct) == "instance-0"
    assert caller.mesh.stats()[CLUSTER].upstream_rq_total == 0


def test_a_users_own_channel_with_other_interceptors(
    tmp_path: Path, start_echo: StartEcho, connect: Connect
) -> None:
    echo = start_echo(2)
    caller = connect(make_mesh(tmp_path, echo.ports, f"- {to('v2')}"))
    seen: list[str] = []

    channel = caller.user_channel(seen)

    assert caller.call(channel=channel) == "instance-1"
    assert seen == [WHO]


# -- retries and timeouts ------------------------------------------------------------------------


def test_unavailable_is_retried_and_the_caller_never_sees_it(
    tmp_path: Path, start_echo: StartEcho, connect: Connect
) -> None:
    echo = start_echo(1)
    echo.instances[0].fail_every = 2
    http = f"""
    - retries: {{attempts: 3, retryOn: unavailable}}
      {to("v1")}
    """
    caller = connect(make_mesh(tmp_path, echo.ports, http))

    assert caller.outcomes(20) == {"instance-0": 20}
    assert echo.instances[0].calls == 40  # every call failed once and was retried
    assert (
        caller.mesh.stats()["outbound|8080|v1|echo.shop.svc.cluster.local"].upstream_rq_retry == 20
    )
    assert_idle(caller.mesh)


def test_the_last_answer_stands_when_retries_run_out(
    tmp_path: Path, start_echo: StartEcho, connect: Connect, instant: None
) -> None:
    echo = start_echo(1)
    echo.instances[0].fail_every = 1
    echo.instances[0].code = grpc.StatusCode.UNAVAILABLE
    http = f"""
    - retries: {{attempts: 2, retryOn: unavailable}}
      {to("v1")}
    """
    caller = connect(make_mesh(tmp_path, echo.ports, http))

    error = caller.error()

    assert not isinstance(error, MeshRpcError)  # the server's own answer, as grpcio gives it
    assert error.code() is grpc.StatusCode.UNAVAILABLE
    assert error.details() == "instance-0 fails call 3 on purpose"
    assert echo.instances[0].calls == 3
    assert_idle(caller.mesh)


def test_a_slow_attempt_is_cut_by_the_per_try_timeout_and_retried(
    tmp_path: Path, start_echo: StartEcho, connect: Connect
) -> None:
    echo = start_echo(1)
    echo.instances[0].slow_every, echo.instances[0].slow_seconds = 2, 5.0
    http = f"""
    - retries: {{attempts: 2, perTryTimeout: 200ms, retryOn: "unavailable,reset"}}
      {to("v1")}
    """
    caller = connect(make_mesh(tmp_path, echo.ports, http))

    started = time.monotonic()
    assert caller.outcomes(3) == {"instance-0": 3}

    assert time.monotonic() - started < 3  # three cut attempts, not three 5 s waits
    assert echo.instances[0].calls == 6
    assert (
        caller.mesh.stats()["outbound|8080|v1|echo.shop.svc.cluster.local"].upstream_rq_timeout == 3
    )
    assert_idle(caller.mesh)


def test_the_route_timeout_and_the_callers_own_end_the_call(
    tmp_path: Path, start_echo: StartEcho, connect: Connect
) -> None:
    echo = start_echo(1)
    echo.instances[0].slow_every, echo.instances[0].slow_seconds = 1, 5.0
    caller = connect(make_mesh(tmp_path, echo.ports, f"- timeout: 1s\n  {to('v1')}"))

    started = time.monotonic()
    route = caller.error()
    route_took = time.monotonic() - started
    started = time.monotonic()
    own = caller.error(timeout=0.2)
    own_took = time.monotonic() - started

    assert route.code() is grpc.StatusCode.DEADLINE_EXCEEDED
    assert flags(route) == "UT"
    assert "UT" in (route.details() or "")
    assert 1.0 <= route_took < 2.5
    assert own.code() is grpc.StatusCode.DEADLINE_EXCEEDED
    assert own_took < 0.8  # the caller's 0.2 s, not the route's 1 s
    assert_idle(caller.mesh)


# -- faults ---------------------------------------------------------------------------------------


def test_injected_aborts_answer_with_a_grpc_status(
    tmp_path: Path, start_echo: StartEcho, connect: Connect
) -> None:
    echo = start_echo(1)
    http = f"""
    - match: [{{headers: {{x-fault: {{exact: grpc}}}}}}]
      fault: {{abort: {{grpcStatus: RESOURCE_EXHAUSTED, percentage: {{value: 100}}}}}}
      {to("v1")}
    - match: [{{headers: {{x-fault: {{exact: http}}}}}}]
      fault: {{abort: {{httpStatus: 403, percentage: {{value: 100}}}}}}
      {to("v1")}
    - {to("v1")}
    """
    caller = connect(make_mesh(tmp_path, echo.ports, http))

    by_grpc_status = caller.error(metadata=(("x-fault", "grpc"),))
    by_http_status = caller.error(metadata=(("x-fault", "http"),))

    assert isinstance(by_grpc_status, MeshRpcError)
    assert by_grpc_status.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert by_http_status.code() is grpc.StatusCode.PERMISSION_DENIED  # 403, as gRPC maps it
    assert flags(by_grpc_status) == flags(by_http_status) == "FI"
    assert "FI" in (by_http_status.details() or "")
    assert echo.instances[0].calls == 0  # aborted calls never left the process
    assert caller.call() == "instance-0"


def test_an_injected_delay_waits_except_under_set_testing(
    tmp_path: Path, start_echo: StartEcho, connect: Connect
) -> None:
    echo = start_echo(1)
    http = f"""
    - fault: {{delay: {{fixedDelay: 400ms, percentage: {{value: 100}}}}}}
      {to("v1")}
    """
    caller = connect(make_mesh(tmp_path, echo.ports, http))

    started = time.monotonic()
    assert caller.call() == "instance-0"
    delayed = time.monotonic() - started
    libmesh.set_testing(True)
    try:
        started = time.monotonic()
        assert caller.call() == "instance-0"
        instant = time.monotonic() - started
    finally:
        libmesh.set_testing(False)

    assert delayed >= 0.4
    assert instant < 0.3


# -- circuit breaking, outlier detection, connection failures ------------------------------------


def test_calls_beyond_the_limit_overflow_with_unavailable(
    tmp_path: Path, start_echo: StartEcho, connect: Connect
) -> None:
    echo = start_echo(1)
    echo.instances[0].hold = True
    caller = connect(
        make_mesh(
            tmp_path, echo.ports, f"- {to('v1')}", "connectionPool: {http: {http2MaxRequests: 1}}"
        )
    )

    first = caller.start()
    assert echo.instances[0].held.wait(10)
    overflowed = [caller.error() for _ in range(3)]
    echo.instances[0].release.set()

    assert first.result(timeout=10) == "instance-0"
    for error in overflowed:
        assert isinstance(error, MeshRpcError)
        assert error.code() is grpc.StatusCode.UNAVAILABLE
        assert flags(error) == "UO"
        assert "overflow" in (error.details() or "")
    assert echo.instances[0].calls == 1
    stats = caller.mesh.stats()["outbound|8080|v1|echo.shop.svc.cluster.local"]
    assert stats.upstream_rq_pending_overflow == 3
    assert_idle(caller.mesh)


def test_outlier_detection_ejects_the_failing_instance(
    tmp_path: Path, start_echo: StartEcho, connect: Connect
) -> None:
    echo = start_echo(2)
    echo.instances[0].fail_every = 1
    policy = """
    loadBalancer: {simple: ROUND_ROBIN}
    outlierDetection:
      {consecutive5xxErrors: 1, interval: 1s, baseEjectionTime: 60s, maxEjectionPercent: 100}
    """
    http = """
    - retries: {attempts: 0}
      route: [{destination: {host: echo}}]
    """
    caller = connect(make_mesh(tmp_path, echo.ports, http, policy))

    assert caller.outcomes(20) == {"UNAVAILABLE": 1, "instance-1": 19}
    assert caller.mesh.ejected_hosts() == {CLUSTER: [f"127.0.0.1:{echo.ports[0]}"]}


def test_a_dead_endpoint_is_a_connect_failure_retried_on_the_other(
    tmp_path: Path, start_echo: StartEcho, connect: Connect, instant: None
) -> None:
    echo = start_echo(1)
    http = """
    - retries: {attempts: 2, retryOn: connect-failure}
      route: [{destination: {host: echo}}]
    """
    ports = [unused_port(), echo.ports[0]]
    caller = connect(make_mesh(tmp_path, ports, http, "loadBalancer: {simple: ROUND_ROBIN}"))

    assert caller.outcomes(10) == {"instance-0": 10}
    stats = caller.mesh.stats()[CLUSTER]
    assert stats.upstream_cx_connect_fail >= 1  # the dead one failed to connect...
    assert stats.upstream_rq_retry == stats.upstream_cx_connect_fail  # ...and each was retried

    echo.stop(0)
    error = caller.error()  # now no endpoint accepts a connection

    assert isinstance(error, MeshRpcError)
    assert error.code() is grpc.StatusCode.UNAVAILABLE
    assert set(flags(error).split(",")) == {"UF", "URX"}
    assert "connection failure" in (error.details() or "")
    assert_idle(caller.mesh)


def test_a_connection_lost_mid_call_is_a_reset(
    tmp_path: Path, start_echo: StartEcho, connect: Connect
) -> None:
    echo = start_echo(1)
    echo.instances[0].hold = True
    caller = connect(make_mesh(tmp_path, echo.ports, f"- {to('v1')}"))

    held = caller.start()
    assert echo.instances[0].held.wait(10)
    echo.servers[0].stop(None)  # the server goes away with the call in flight
    with pytest.raises(grpc.RpcError) as caught:
        held.result(timeout=10)
    echo.instances[0].release.set()

    assert isinstance(caught.value, MeshRpcError)
    assert caught.value.code() is grpc.StatusCode.UNAVAILABLE
    assert flags(caught.value) == "UC"  # not retried: Istio's default retryOn has no reset
    assert "connection termination" in (caught.value.details() or "")
    assert_idle(caller.mesh)


def test_sync_calls_are_grpc_calls_and_futures(tmp_path: Path, start_echo: StartEcho) -> None:
    echo = start_echo(1)
    http = f"""
    - match: [{{headers: {{x-fault: {{exact: "yes"}}}}}}]
      fault: {{abort: {{httpStatus: 503, percentage: {{value: 100}}}}}}
      {to("v1")}
    - {to("v1")}
    """
    with make_mesh(tmp_path, echo.ports, http) as mesh, mesh.grpc_channel(TARGET) as channel:
        who = channel.unary_unary(WHO, **CODEC)

        answer, call = who.with_call("hi")
        future = who.future("hi")
        failed = who.future("hi", metadata=(("x-fault", "yes"),))

        assert answer == "instance-0"
        assert isinstance(call, grpc.Call)
        assert isinstance(call, grpc.Future)
        assert call.code() is grpc.StatusCode.OK
        assert future.result(timeout=10) == "instance-0"
        assert future.done()
        assert isinstance(failed, MeshRpcError)
        assert isinstance(failed, grpc.Call)
        assert isinstance(failed, grpc.Future)
        assert failed.exception() is failed
        assert failed.code() is grpc.StatusCode.UNAVAILABLE
        with pytest.raises(grpc.RpcError):
            failed.result()


# -- streams --------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["unary_stream", "stream_unary", "stream_stream"])
def test_a_streaming_call_is_routed_to_its_subset(
    tmp_path: Path, start_echo: StartEcho, connect: Connect, kind: str
) -> None:
    echo = start_echo(2)
    http = f"""
    - match: [{{headers: {{x-fault: {{exact: "yes"}}}}}}]
      fault: {{abort: {{grpcStatus: RESOURCE_EXHAUSTED, percentage: {{value: 100}}}}}}
      {to("v1")}
    - match: [{{headers: {{x-version: {{exact: v2}}}}}}]
      {to("v2")}
    - {to("v1")}
    """
    caller = connect(make_mesh(tmp_path, echo.ports, http))

    to_v2 = caller.stream(kind, (("x-version", "v2"),))
    to_v1 = caller.stream(kind)
    with pytest.raises(grpc.RpcError) as aborted:
        caller.stream(kind, (("x-fault", "yes"),))

    if kind == "stream_unary":
        assert (to_v2, to_v1) == ("instance-1:3", "instance-0:3")
    else:
        assert (to_v2, to_v1) == (["instance-1"] * 3, ["instance-0"] * 3)
    assert aborted.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert [i.calls for i in echo.instances] == [1, 1]
    assert_idle(caller.mesh)  # each stream gave its slot back when it ended


# -- grpcio's own xDS client ---------------------------------------------------------------------

XDS_CLIENT = """
import asyncio, json, sys
from collections import Counter

import grpc

from libmesh import ConfigError
from libmesh.transport import xds_aio_channel, xds_channel

address, target = sys.argv[1:]
identity = {"xds_address": address, "namespace": "shop", "node_id": "xds-helper.shop"}
result = {}
channel = xds_channel(target, **identity)  # open while the test looks at meshd
who = channel.unary_unary("/test.Echo/Who")
result["sync"] = Counter(who(b"", timeout=10).decode() for _ in range(10))

async def calls():
    async with xds_aio_channel(target, **identity) as channel:
        who = channel.unary_unary("/test.Echo/Who")
        return Counter([(await who(b"", timeout=10)).decode() for _ in range(10)])

result["aio"] = asyncio.run(calls())
try:
    xds_channel(target, **{**identity, "namespace": "other"})
except ConfigError as error:
    result["refused"] = str(error)
print(json.dumps(result), flush=True)
sys.stdin.read()
channel.close()
"""


def test_xds_channel_lets_grpcio_follow_meshd(tmp_path: Path, start_echo: StartEcho) -> None:
    echo = start_echo(2)
    (tmp_path / "mesh").mkdir()
    (tmp_path / "mesh" / "mesh.yaml").write_text(echo_mesh(echo.ports, f"- {to('v2')}"))
    meshd = MeshdProcess.start(tmp_path / "mesh")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GRPC_XDS_", "LIBMESH_"))}
    client = subprocess.Popen(
        [sys.executable, "-c", XDS_CLIENT, meshd.xds_address, TARGET],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
        env=env,
    )  # fmt: skip
    try:
        assert client.stdout is not None
        line = client.stdout.readline()
        assert line, "the xds_channel client died"
        result = json.loads(line)
        status = meshd.client("xds-helper.shop")
    finally:
        assert client.stdin is not None
        client.stdin.close()
        client.wait(timeout=10)
        assert client.stdout is not None
        client.stdout.close()
        meshd.stop()

    assert result["sync"] == result["aio"] == {"instance-1": 10}
    assert "GRPC_XDS_BOOTSTRAP_CONFIG already holds another xDS bootstrap" in result["refused"]
    assert status["flavor"] == "grpc"
    assert status["namespace"] == "shop"
    assert {t: s["status"] for t, s in status["types"].items()} == dict.fromkeys(
        ("cds", "eds", "lds", "rds"), "SYNCED"
    )


def test_xds_channel_will_not_be_silently_ignored(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LIBMESH_NAMESPACE", "shop")
    monkeypatch.setenv("LIBMESH_LABELS", "app=checkout,version=v1")
    monkeypatch.delenv("GRPC_XDS_BOOTSTRAP", raising=False)
    bootstrap = xds_bootstrap(xds_address="127.0.0.1:15010", node_id="checkout-1.shop")
    other = tmp_path / "other.json"
    other.write_text(json.dumps({**bootstrap, "node": {"id": "someone-else"}}))

    monkeypatch.setenv("GRPC_XDS_BOOTSTRAP_CONFIG", json.dumps({"xds_servers": []}))
    with pytest.raises(libmesh.ConfigError, match="GRPC_XDS_BOOTSTRAP_CONFIG already holds"):
        xds_channel(TARGET, xds_address="127.0.0.1:15010", node_id="checkout-1.shop")
    monkeypatch.setenv("GRPC_XDS_BOOTSTRAP", str(other))
    with pytest.raises(libmesh.ConfigError, match=f"GRPC_XDS_BOOTSTRAP names {other}"):
        xds_channel(TARGET, xds_address="127.0.0.1:15010", node_id="checkout-1.shop")

    assert bootstrap["xds_servers"][0]["server_uri"] == "127.0.0.1:15010"
    assert bootstrap["node"] == {
        "id": "checkout-1.shop",
        "metadata": {
            "NAMESPACE": "shop",
            "LABELS": {"app": "checkout", "version": "v1"},
            "SERVICE_ACCOUNT": "default",
        },
    }
