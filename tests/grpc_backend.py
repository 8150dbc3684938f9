"""Small gRPC servers for the interop tests, run as their own process.

    python tests/grpc_backend.py N       # serve N instances on free ports of 127.0.0.1

It prints one JSON line with the ports, then serves until stdin closes. Each instance answers
``/test.Echo/Who`` with its name, and can be told to misbehave:

    /test.Echo/Behave  {"fail_every": 2, "code": "UNAVAILABLE"}   every 2nd call fails
    /test.Echo/Stats   -> {"calls": 12}

and for streams, metadata and sizes:

    /test.Echo/Count     b"3" -> "<name> says 0", … "<name> says 2", trailing x-counted: 3
    /test.Echo/Chat      each message back in capitals, as it arrives
    /test.Echo/Metadata  -> the call's metadata as a JSON object
    /test.Echo/Sleep     b"2" -> answers after 2 seconds
    /test.Echo/Size      -> the request's length in bytes
"""

from __future__ import annotations

import json
import sys
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from typing import Any

import grpc


class Instance:
    def __init__(self, name: str) -> None:
        self.name = name
        self.calls = 0
        self.fail_every = 0
        self.code = grpc.StatusCode.UNAVAILABLE
        self.lock = threading.Lock()

    def who(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        with self.lock:
            self.calls += 1
            failing = self.fail_every and self.calls % self.fail_every == 1
        if failing:
            context.abort(self.code, f"{self.name} fails call {self.calls} on purpose")
        return self.name.encode()

    def behave(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        settings: dict[str, Any] = json.loads(request or b"{}")
        with self.lock:
            self.fail_every = int(settings.get("fail_every", 0))
            self.code = grpc.StatusCode[settings.get("code", "UNAVAILABLE")]
            self.calls = 0
        return b"{}"

    def stats(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        return json.dumps({"calls": self.calls}).encode()

    def count(self, request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
        for i in range(int(request)):
            yield f"{self.name} says {i}".encode()
        context.set_trailing_metadata((("x-counted", request.decode()),))

    def chat(self, requests: Iterator[bytes], context: grpc.ServicerContext) -> Iterator[bytes]:
        for message in requests:
            yield message.upper()

    def metadata(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        return json.dumps(dict(context.invocation_metadata())).encode()

    def sleep(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        time.sleep(float(request))
        return b"awake"

    def size(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        return str(len(request)).encode()


def serve(count: int) -> None:
    servers = []
    ports = []
    for i in range(count):
        instance = Instance(f"instance-{i}")
        server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=8),
            options=[("grpc.max_receive_message_length", 16 << 20)],
        )
        handlers = {
            "Who": grpc.unary_unary_rpc_method_handler(instance.who),
            "Behave": grpc.unary_unary_rpc_method_handler(instance.behave),
            "Stats": grpc.unary_unary_rpc_method_handler(instance.stats),
            "Count": grpc.unary_stream_rpc_method_handler(instance.count),
            "Chat": grpc.stream_stream_rpc_method_handler(instance.chat),
            "Metadata": grpc.unary_unary_rpc_method_handler(instance.metadata),
            "Sleep": grpc.unary_unary_rpc_method_handler(instance.sleep),
            "Size": grpc.unary_unary_rpc_method_handler(instance.size),
        }
        server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler("test.Echo", handlers),)
        )
        ports.append(server.add_insecure_port("127.0.0.1:0"))
        server.start()
        servers.append(server)
    print(json.dumps({"ports": ports}), flush=True)
    sys.stdin.read()  # until the test closes our stdin
    for server in servers:
        server.stop(None)


if __name__ == "__main__":
    serve(int(sys.argv[1]))
