"""libmesh's lean HTTP/2 pool against real grpcio servers on 127.0.0.1 (h2c, and TLS with
ALPN): unary and streamed calls with their trailers, flow control both ways, multiplexing and
a server's stream limit, resets from either side, graceful and abrupt shutdowns, and the
errors httpx's callers expect."""

from __future__ import annotations

import asyncio
import datetime
import functools
import ipaddress
import os
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from concurrent import futures
from types import SimpleNamespace
from typing import Any

import grpc
import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from libmesh.transport._http2 import Http2Endpoint

Test = Callable[[], Coroutine[Any, Any, None]]


def on_a_loop(test: Test) -> Callable[[], None]:
    @functools.wraps(test)
    def run() -> None:
        asyncio.run(test())

    return run


def on_uvloop(test: Test) -> Callable[[], None]:
    @functools.wraps(test)
    def run() -> None:
        uvloop = pytest.importorskip("uvloop")
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            runner.run(test())

    return run


class Echo:
    """The ``test.Echo`` service each server runs, and what it saw of its callers."""

    def __init__(self) -> None:
        self.release = threading.Event()  # lets Ticks send the rest of its messages
        self.cancelled: list[str] = []  # the peers of the calls that ended without an answer
        self.call_ended = threading.Event()
        self.flooded = 0  # the 64 KiB messages Flood has handed to grpcio

    def handlers(self) -> grpc.GenericRpcHandler:
        return grpc.method_handlers_generic_handler(
            "test.Echo",
            {
                "Unary": grpc.unary_unary_rpc_method_handler(lambda m, _: b"echo:" + m),
                "Fail": grpc.unary_unary_rpc_method_handler(self.fail),
                "Slow": grpc.unary_unary_rpc_method_handler(self.slow),
                "Ticks": grpc.unary_stream_rpc_method_handler(self.ticks),
                "Forever": grpc.unary_stream_rpc_method_handler(self.forever),
                "Flood": grpc.unary_stream_rpc_method_handler(self.flood),
                "Chat": grpc.stream_stream_rpc_method_handler(self.chat),
            },
        )

    def fail(self, message: bytes, context: grpc.ServicerContext) -> bytes:
        context.abort(grpc.StatusCode.NOT_FOUND, f"no such thing: {message.decode()}")
        raise AssertionError("abort raises")

    def slow(self, message: bytes, context: grpc.ServicerContext) -> bytes:
        """Answers with the caller's address after the seconds it was sent, unless cancelled."""
        deadline = time.monotonic() + float(message)
        while time.monotonic() < deadline and context.is_active():
            time.sleep(0.01)
        if not context.is_active():
            self.cancelled.append(context.peer())
            self.call_ended.set()
        return context.peer().encode()

    def ticks(self, message: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
        yield b"first"
        self.release.wait(5)
        yield b"second"
        yield b"third"

    def forever(self, message: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
        context.add_callback(self.call_ended.set)  # only a cancellation ends this call
        while context.is_active():
            yield context.peer().encode()
            time.sleep(0.01)

    def flood(self, message: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
        while context.is_active():
            self.flooded += 1
            yield bytes(64 * 1024)

    def chat(self, messages: Iterator[bytes], context: grpc.ServicerContext) -> Iterator[bytes]:
        for message in messages:
            yield b"re:" + message


class Server:
    """A grpcio server on 127.0.0.1 (h2c, or TLS with ``credentials``); stopped on exit."""

    def __init__(
        self, *options: tuple[str, Any], credentials: grpc.ServerCredentials | None = None
    ) -> None:
        self.echo = Echo()
        self._executor = futures.ThreadPoolExecutor(max_workers=64)
        self.grpc = grpc.server(self._executor, options=options)
        self.grpc.add_generic_rpc_handlers((self.echo.handlers(),))
        if credentials is None:
            self.port = self.grpc.add_insecure_port("127.0.0.1:0")
        else:
            self.port = self.grpc.add_secure_port("127.0.0.1:0", credentials)

    def __enter__(self) -> Server:
        self.grpc.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.echo.release.set()
        self.grpc.stop(None).wait(5)
        self._executor.shutdown(wait=False)


def grpc_frame(message: bytes) -> bytes:
    return b"\x00" + len(message).to_bytes(4, "big") + message


def call(
    port: int,
    method: str,
    content: bytes | AsyncIterator[bytes] = b"",
    *,
    scheme: str = "http",
    read: float = 5.0,
) -> httpx.Request:
    return httpx.Request(
        "POST",
        f"{scheme}://localhost:{port}/test.Echo/{method}",
        headers={"content-type": "application/grpc", "te": "trailers"},
        content=grpc_frame(content) if isinstance(content, bytes) else content,
        extensions={"timeout": {"connect": 5, "read": read, "write": 5}},
    )


class Answer:
    """A response's gRPC messages as they arrive, then its status."""

    def __init__(self, response: httpx.Response) -> None:
        assert isinstance(response.stream, httpx.AsyncByteStream)
        self.response = response
        self._stream = response.stream
        self._chunks = aiter(response.stream)
        self._buffer = bytearray()

    async def message(self) -> bytes | None:
        while True:
            if len(self._buffer) >= 5:
                end = 5 + int.from_bytes(self._buffer[1:5], "big")
                if len(self._buffer) >= end:
                    message = bytes(self._buffer[5:end])
                    del self._buffer[:end]
                    return message
            try:
                self._buffer += await anext(self._chunks)
            except StopAsyncIteration:
                assert not self._buffer, "the body ended inside a message"
                return None

    async def messages(self) -> list[bytes]:
        found = []
        while (message := await self.message()) is not None:
            found.append(message)
        await self._stream.aclose()
        return found

    @property
    def trailers(self) -> dict[bytes, bytes]:
        return dict(self.response.extensions["trailers"])


async def unary(pool: Http2Endpoint, request: httpx.Request) -> bytes:
    answer = Answer(await pool.handle_async_request(request))
    messages = await answer.messages()
    assert answer.response.status_code == 200
    assert answer.trailers[b"grpc-status"] == b"0", answer.trailers
    assert len(messages) == 1
    return messages[0]


@on_a_loop
async def test_a_unary_call_has_its_answer_then_grpc_status_in_the_trailers() -> None:
    with Server() as server:
        pool = Http2Endpoint("127.0.0.1", server.port)
        response = await pool.handle_async_request(call(server.port, "Unary", b"hello"))
        answer = Answer(response)
        messages = await answer.messages()
        await pool.aclose()
    assert (response.status_code, response.extensions["http_version"]) == (200, b"HTTP/2")
    assert response.headers["content-type"] == "application/grpc"
    assert messages == [b"echo:hello"]
    assert answer.trailers[b"grpc-status"] == b"0"


@on_a_loop
async def test_a_failed_call_is_trailers_only_its_status_in_the_headers() -> None:
    with Server() as server:
        pool = Http2Endpoint("127.0.0.1", server.port)
        answer = Answer(await pool.handle_async_request(call(server.port, "Fail", b"thing")))
        messages = await answer.messages()
        await pool.aclose()
    # grpcio answers a failure with one HEADERS frame that ends the stream: no trailers follow
    assert (answer.response.status_code, messages, answer.trailers) == (200, [], {})
    assert answer.response.headers["grpc-status"] == str(grpc.StatusCode.NOT_FOUND.value[0])
    assert answer.response.headers["grpc-message"] == "no such thing: thing"


@on_a_loop
async def test_streamed_messages_arrive_as_the_server_sends_them() -> None:
    with Server() as server:
        pool = Http2Endpoint("127.0.0.1", server.port)
        answer = Answer(await pool.handle_async_request(call(server.port, "Ticks")))
        first = await answer.message()
        released_before_the_first = server.echo.release.is_set()
        trailers_before_the_end = list(answer.response.extensions["trailers"])
        server.echo.release.set()
        rest = await answer.messages()
        await pool.aclose()
    assert (first, released_before_the_first, rest) == (b"first", False, [b"second", b"third"])
    assert trailers_before_the_end == []  # the trailers list fills as they arrive, at the end
    assert answer.trailers[b"grpc-status"] == b"0"


@on_a_loop
async def test_a_streamed_request_goes_out_message_by_message() -> None:
    async def upload() -> AsyncIterator[bytes]:
        for word in (b"one", b"two", b"three"):
            yield grpc_frame(word)
            await asyncio.sleep(0.01)

    with Server() as server:
        pool = Http2Endpoint("127.0.0.1", server.port)
        answer = Answer(await pool.handle_async_request(call(server.port, "Chat", upload())))
        messages = await answer.messages()
        await pool.aclose()
    assert messages == [b"re:one", b"re:two", b"re:three"]
    assert answer.trailers[b"grpc-status"] == b"0"


@on_a_loop
async def test_two_megabytes_each_way_pass_the_flow_control_windows() -> None:
    payload = os.urandom(2 * 1024 * 1024)
    with Server() as server:
        pool = Http2Endpoint("127.0.0.1", server.port)
        echoed = await unary(pool, call(server.port, "Unary", payload))
        again = await unary(pool, call(server.port, "Unary", payload))  # windows handed back
        await pool.aclose()
    assert echoed == again == b"echo:" + payload


@on_a_loop
async def test_a_reader_that_falls_behind_holds_its_server_back_and_no_other_stream() -> None:
    with Server() as server:
        pool = Http2Endpoint("127.0.0.1", server.port)
        flood = await pool.handle_async_request(call(server.port, "Flood"))
        await asyncio.sleep(0.5)  # nobody reads
        held_back_at = server.echo.flooded
        peers = await asyncio.gather(
            *(unary(pool, call(server.port, "Slow", b"0")) for _ in range(10))
        )
        assert isinstance(flood.stream, httpx.AsyncByteStream)
        read = 0
        async for chunk in flood.stream:
            read += len(chunk)
            if read > 8 * 1024 * 1024:
                break
        await flood.aclose()
        await pool.aclose()
    # the stream's window (1 MiB) and grpcio's own buffers, not an unbounded flood
    assert held_back_at < 40
    assert len(set(peers)) == 1  # the other calls went through on the same connection
    assert server.echo.flooded > held_back_at  # reading lets it go on


@on_a_loop
async def test_fifty_concurrent_calls_share_one_connection() -> None:
    with Server() as server:
        pool = Http2Endpoint("127.0.0.1", server.port)
        started = time.monotonic()
        peers = await asyncio.gather(
            *(unary(pool, call(server.port, "Slow", b"0.3")) for _ in range(50))
        )
        elapsed = time.monotonic() - started
        await pool.aclose()
    assert len(set(peers)) == 1  # one connection: the calls were streams on it
    assert elapsed < 7.5  # side by side, not one after the other (15 s)


@on_a_loop
async def test_a_server_allowing_one_stream_gets_a_connection_per_concurrent_call() -> None:
    with Server(("grpc.max_concurrent_streams", 1)) as server:
        pool = Http2Endpoint("127.0.0.1", server.port)
        started = time.monotonic()
        peers = await asyncio.gather(
            *(unary(pool, call(server.port, "Slow", b"1")) for _ in range(5))
        )
        elapsed = time.monotonic() - started
        later = await unary(pool, call(server.port, "Slow", b"0"))
        await pool.aclose()
    assert len(set(peers)) == 5  # no stream refused: each call had a connection of its own
    assert elapsed < 3.5  # side by side (5 s one after the other)
    assert later in peers  # and the connections stay for the next calls


@on_a_loop
async def test_an_idle_connection_past_its_keep_alive_is_replaced() -> None:
    with Server() as server:
        pool = Http2Endpoint("127.0.0.1", server.port, keepalive_expiry=0.2)
        first = await unary(pool, call(server.port, "Slow", b"0"))
        soon = await unary(pool, call(server.port, "Slow", b"0"))
        await asyncio.sleep(0.3)
        later = await unary(pool, call(server.port, "Slow", b"0"))
        await pool.aclose()
    assert first == soon != later


@on_a_loop
async def test_a_refused_connection_is_a_connect_error() -> None:
    with socket.socket() as bound:  # a port nothing accepts on
        bound.bind(("127.0.0.1", 0))
        port = bound.getsockname()[1]
        pool = Http2Endpoint("127.0.0.1", port)
        with pytest.raises(httpx.ConnectError) as refused:
            await pool.handle_async_request(call(port, "Unary", b"x"))
    assert refused.value.request.url.path == "/test.Echo/Unary"


@on_a_loop
async def test_a_slow_answer_is_a_read_timeout_and_its_stream_is_reset() -> None:
    with Server() as server:
        pool = Http2Endpoint("127.0.0.1", server.port)
        with pytest.raises(httpx.ReadTimeout):
            await pool.handle_async_request(call(server.port, "Slow", b"5", read=0.3))
        reset_seen = await asyncio.to_thread(server.echo.call_ended.wait, 3)
        after = await unary(pool, call(server.port, "Slow", b"0"))
        await pool.aclose()
    assert reset_seen
    assert server.echo.cancelled == [after.decode()]  # and the connection carries on


@on_a_loop
async def test_a_cancelled_call_resets_its_stream() -> None:
    with Server() as server:
        pool = Http2Endpoint("127.0.0.1", server.port)
        waiting = asyncio.ensure_future(pool.handle_async_request(call(server.port, "Slow", b"5")))
        await asyncio.sleep(0.3)
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        reset_seen = await asyncio.to_thread(server.echo.call_ended.wait, 3)
        await pool.aclose()
    assert reset_seen
    assert len(server.echo.cancelled) == 1


@on_a_loop
async def test_closing_a_streamed_answer_early_resets_the_stream() -> None:
    with Server() as server:
        pool = Http2Endpoint("127.0.0.1", server.port)
        answer = Answer(await pool.handle_async_request(call(server.port, "Forever")))
        peer = await answer.message()
        await answer.response.aclose()
        reset_seen = await asyncio.to_thread(server.echo.call_ended.wait, 3)
        next_call = await unary(pool, call(server.port, "Slow", b"0"))
        await pool.aclose()
    assert reset_seen  # the only way Forever ends
    assert next_call == peer  # on the same connection


@on_a_loop
async def test_a_server_stopping_answers_its_running_calls_unavailable() -> None:
    with Server() as server:
        pool = Http2Endpoint("127.0.0.1", server.port)
        running = asyncio.ensure_future(pool.handle_async_request(call(server.port, "Slow", b"5")))
        await asyncio.sleep(0.3)
        await asyncio.to_thread(server.grpc.stop, 0)
        answer = Answer(await running)
        messages = await answer.messages()
        await pool.aclose()
    # grpcio does not drop its calls: it answers each, trailers-only
    assert (answer.response.status_code, messages) == (200, [])
    assert answer.response.headers["grpc-status"] == str(grpc.StatusCode.UNAVAILABLE.value[0])


KILLABLE_SERVER = """
import time
from concurrent import futures
import grpc

def forever(message, context):
    while True:
        yield b"tick"
        time.sleep(0.01)

handlers = {
    "Slow": grpc.unary_unary_rpc_method_handler(lambda message, context: time.sleep(60)),
    "Forever": grpc.unary_stream_rpc_method_handler(forever),
}
server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("test.Echo", handlers),))
print(server.add_insecure_port("127.0.0.1:0"), flush=True)
server.start()
server.wait_for_termination()
"""


@on_a_loop
async def test_a_server_killed_mid_call_fails_it_with_a_transport_error() -> None:
    process = subprocess.Popen(
        [sys.executable, "-c", KILLABLE_SERVER], stdout=subprocess.PIPE, text=True
    )
    try:
        assert process.stdout is not None
        port = int(process.stdout.readline())
        pool = Http2Endpoint("127.0.0.1", port)
        unanswered = asyncio.ensure_future(pool.handle_async_request(call(port, "Slow", b"")))
        streaming = Answer(await pool.handle_async_request(call(port, "Forever")))
        assert await streaming.message() == b"tick"
        process.kill()
        with pytest.raises(httpx.RemoteProtocolError, match="without answering"):
            await unanswered
        with pytest.raises(httpx.ReadError, match="mid-answer"):
            await streaming.messages()
        await pool.aclose()
    finally:
        process.kill()
        process.wait()
        assert process.stdout is not None
        process.stdout.close()


@on_a_loop
async def test_a_graceful_shutdown_lets_the_running_call_finish_and_takes_no_new_one() -> None:
    with Server() as server:
        pool = Http2Endpoint("127.0.0.1", server.port)
        running = asyncio.ensure_future(unary(pool, call(server.port, "Slow", b"0.5")))
        await asyncio.sleep(0.2)
        stopped = server.grpc.stop(5)  # GOAWAY: finish what runs, take nothing new
        peer = await running  # (unary asserts grpc-status 0)
        with pytest.raises(httpx.ConnectError):  # not sent on the connection going away
            await pool.handle_async_request(call(server.port, "Unary", b"late"))
        await asyncio.to_thread(stopped.wait, 5)
        await pool.aclose()
    assert peer.startswith(b"ipv")


# TLS --------------------------------------------------------------------------------------------


def certificates() -> tuple[bytes, bytes, bytes]:
    """A CA, and a server certificate it signed for localhost and 127.0.0.1, with its key."""
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "libmesh test CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), False)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    names = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False
        )
        .sign(ca_key, hashes.SHA256())
    )
    return (
        ca.public_bytes(serialization.Encoding.PEM),
        cert.public_bytes(serialization.Encoding.PEM),
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
    )


def client_tls(ca: bytes, alpn: list[str]) -> SimpleNamespace:
    """What the mesh transport hands its endpoints: a context, and how to check a peer."""
    context = ssl.create_default_context(cadata=ca.decode())
    context.set_alpn_protocols(alpn)
    return SimpleNamespace(
        context=lambda: context, sni="localhost", name_from_host=False, check=lambda _: None
    )


async def a_call_over_tls() -> bytes:
    ca, cert, key = certificates()
    credentials = grpc.ssl_server_credentials([(key, cert)])
    with Server(credentials=credentials) as server:
        pool = Http2Endpoint("127.0.0.1", server.port, tls=client_tls(ca, ["h2"]))
        echoed = await unary(pool, call(server.port, "Unary", b"secret", scheme="https"))
        await pool.aclose()
    return echoed


@on_a_loop
async def test_a_call_over_tls() -> None:
    assert await a_call_over_tls() == b"echo:secret"


@on_a_loop
async def test_a_tls_server_choosing_http1_in_alpn_is_a_connect_error() -> None:
    ca, cert, key = certificates()
    server_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_context.set_alpn_protocols(["http/1.1"])
    with tempfile.TemporaryDirectory() as directory:  # (load_cert_chain reads files)
        chain = os.path.join(directory, "server.pem")
        with open(chain, "wb") as f:
            f.write(cert + key)
        server_context.load_cert_chain(chain)

    async def hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.close()

    server = await asyncio.start_server(hang_up, "127.0.0.1", 0, ssl=server_context)
    port = server.sockets[0].getsockname()[1]
    pool = Http2Endpoint("127.0.0.1", port, tls=client_tls(ca, ["h2", "http/1.1"]))
    with pytest.raises(httpx.ConnectError, match=r"chose http/1\.1 instead of h2"):
        await pool.handle_async_request(call(port, "Unary", b"x", scheme="https"))
    server.close()
    await server.wait_closed()


@on_uvloop
async def test_under_uvloop_calls_tls_and_flow_control_work_alike() -> None:
    payload = os.urandom(2 * 1024 * 1024)
    with Server() as server:
        pool = Http2Endpoint("127.0.0.1", server.port)
        echoed = await unary(pool, call(server.port, "Unary", payload))
        peers = await asyncio.gather(
            *(unary(pool, call(server.port, "Slow", b"0.1")) for _ in range(10))
        )
        await pool.aclose()
    assert echoed == b"echo:" + payload
    assert len(set(peers)) == 1
    assert await a_call_over_tls() == b"echo:secret"
