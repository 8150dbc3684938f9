"""gRPC through libmesh-proxy's Python engine: grpcio clients that know nothing of libmesh call
gRPC servers through the proxy's outbound side (HTTP/2 cleartext), and through a second proxy's
inbound side over mTLS. Status codes and trailers arrive intact, streams flow both ways as they
are sent, and retries, faults, deadlines and authorization apply as the YAML says."""

from __future__ import annotations

import json
import queue
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import httpx
import pytest

from tests.conftest import unused_port
from tests.integration.test_mtls import token
from tests.integration.test_proxy import caller_proxy, strict_service
from tests.meshd_process import MeshdProcess
from tests.proxy_process import ProxyProcess

from .conftest import GrpcBackends
from .test_grpc_xds import TARGET, echo_mesh

StartProxy = Callable[..., ProxyProcess]
StartGrpcBackends = Callable[[int], GrpcBackends]

ROUTE = """
- match: [{headers: {x-fault: {exact: "yes"}}}]
  fault: {abort: {grpcStatus: RESOURCE_EXHAUSTED, percentage: {value: 100}}}
  route: [{destination: {host: echo, subset: v1}}]
- route: [{destination: {host: echo, subset: v1}}]
  retries: {attempts: 3, retryOn: unavailable}
"""


def _code(call: Callable[[], object]) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as failed:
        call()
    error = failed.value
    return error.code(), error.details()  # type: ignore[attr-defined]


def _until_answered(call: Callable[[], bytes]) -> bytes:
    deadline = time.monotonic() + 20
    while True:
        try:
            return call()
        except grpc.RpcError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def test_a_grpcio_client_calls_grpc_servers_through_the_python_engine(
    start_grpc_backends: StartGrpcBackends, start_proxy: StartProxy, tmp_path: Path
) -> None:
    backends = start_grpc_backends(2)
    (tmp_path / "mesh").mkdir()
    (tmp_path / "mesh" / "mesh.yaml").write_text(echo_mesh(backends.ports, ROUTE))
    proxy = start_proxy(
        "--config-dir", str(tmp_path / "mesh"), "--namespace", "shop", "--outbound", "0",
        "--admin", "0", "--route", f"0={TARGET}",
    )  # fmt: skip
    # a program dialing the proxy names the service as the authority; a port bound to the
    # service needs nothing
    named = grpc.insecure_channel(
        f"127.0.0.1:{proxy.port('outbound')}", options=[("grpc.default_authority", TARGET)]
    )
    bound = grpc.insecure_channel(f"127.0.0.1:{proxy.port('route')}")
    # grpcio's own proxy support (the http_proxy variable, or this option) opens a CONNECT
    # tunnel to the service's name
    proxied = grpc.insecure_channel(
        TARGET, options=[("grpc.http_proxy", f"http://127.0.0.1:{proxy.port('outbound')}")]
    )
    with named, bound, proxied:
        who = named.unary_unary("/test.Echo/Who")
        first = _until_answered(lambda: who(b"", timeout=5))
        through_route = bound.unary_unary("/test.Echo/Who")(b"", timeout=5)
        through_connect = proxied.unary_unary("/test.Echo/Who")(b"", timeout=5)
        aborted = _code(lambda: who(b"", metadata=[("x-fault", "yes")], timeout=5))

        backends.behave(0, fail_every=2, code="UNAVAILABLE")
        retried = [who(b"", timeout=5) for _ in range(4)]
        calls_made = backends.calls(0)
        backends.behave(0, fail_every=2, code="PERMISSION_DENIED")  # not retried: not asked
        denied = _code(lambda: who(b"", timeout=5))
        backends.behave(0)

        count = named.unary_stream("/test.Echo/Count")
        counted = count(b"5", timeout=5)
        streamed = list(counted)
        trailers = dict(counted.trailing_metadata() or ())  # type: ignore[attr-defined]

        # each message is answered before the next is sent: nothing waits for the stream's end
        said: queue.Queue[bytes | None] = queue.Queue()

        def saying() -> Iterator[bytes]:
            while (word := said.get()) is not None:
                yield word

        chat = named.stream_stream("/test.Echo/Chat")(saying(), timeout=10)
        answers = []
        for word in (b"one", b"two", b"three"):
            said.put(word)
            answers.append(next(chat))
        said.put(None)
        assert list(chat) == []

        sleep = named.unary_unary("/test.Echo/Sleep")
        late = _code(lambda: sleep(b"3", timeout=0.5))
        large = named.unary_unary("/test.Echo/Size")(b"x" * 3_000_000, timeout=10)

    metrics = httpx.get(proxy.url("admin", "/stats/prometheus")).text

    assert first == b"instance-0"
    assert through_route == b"instance-0"
    assert through_connect == b"instance-0"
    assert aborted[0] is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert retried == [b"instance-0"] * 4  # every other call failed UNAVAILABLE, and was retried
    assert calls_made == 8
    assert denied[0] is grpc.StatusCode.PERMISSION_DENIED
    assert "fails call 1 on purpose" in denied[1]
    assert streamed == [b"instance-0 says 0", *(b"instance-0 says %d" % i for i in range(1, 5))]
    assert trailers["x-counted"] == "5"  # trailing metadata passes the proxy
    assert answers == [b"ONE", b"TWO", b"THREE"]
    assert late[0] is grpc.StatusCode.DEADLINE_EXCEEDED
    assert large == b"3000000"
    assert 'grpc_response_status="0"' in metrics  # read from the trailers
    assert 'grpc_response_status="7"' in metrics


ECHO_MESH = strict_service("echo", "grpc", "GRPC", caller="web")


def test_grpc_between_two_proxies_is_mutual_tls_and_authorized(
    start_meshd: Callable[..., MeshdProcess],
    start_grpc_backends: StartGrpcBackends,
    start_proxy: StartProxy,
    mesh_dir: Callable[..., Path],
) -> None:
    mesh_dir(ECHO_MESH)
    meshd = start_meshd()
    backend = start_grpc_backends(1)
    inbound = unused_port()
    start_proxy(
        "--xds-address", meshd.xds_address, "--namespace", "shop", "--service-account", "echo",
        "--label", "app=echo", "--label", "security.istio.io/tlsMode=istio",
        "--token", token(meshd, "shop", "echo"),
        "--inbound", f"{inbound}=127.0.0.1:{backend.ports[0]}", "--register", f"grpc={inbound}",
        "--outbound", "off", "--admin", "off",
    )  # fmt: skip
    web = caller_proxy(start_proxy, meshd, "web")
    intruder = caller_proxy(start_proxy, meshd, "intruder")

    def channel(proxy: ProxyProcess) -> grpc.Channel:
        address = f"127.0.0.1:{proxy.port('outbound')}"
        return grpc.insecure_channel(address, options=[("grpc.default_authority", TARGET)])

    with channel(web) as allowed, channel(intruder) as refused:
        who = allowed.unary_unary("/test.Echo/Who")
        first = _until_answered(lambda: who(b"", timeout=5))
        seen = json.loads(allowed.unary_unary("/test.Echo/Metadata")(b"", timeout=5))
        count = allowed.unary_stream("/test.Echo/Count")(b"3", timeout=5)
        streamed = list(count)
        trailers = dict(count.trailing_metadata() or ())  # type: ignore[attr-defined]
        denied = _code(lambda: refused.unary_unary("/test.Echo/Who")(b"", timeout=5))
    with grpc.insecure_channel(f"127.0.0.1:{inbound}") as plaintext:
        direct = _code(lambda: plaintext.unary_unary("/test.Echo/Who")(b"", timeout=5))

    assert first == b"instance-0"
    xfcc = seen["x-forwarded-client-cert"]
    assert xfcc.startswith("By=spiffe://cluster.local/ns/shop/sa/echo;Hash=")
    assert xfcc.endswith(";URI=spiffe://cluster.local/ns/shop/sa/web")
    assert streamed == [b"instance-0 says %d" % i for i in range(3)]
    assert trailers["x-counted"] == "3"
    assert denied[0] is grpc.StatusCode.PERMISSION_DENIED
    assert "RBAC: access denied" in denied[1]
    assert direct[0] is grpc.StatusCode.UNAVAILABLE  # STRICT: plaintext is not served
