"""Small gRPC servers for the interop tests, run as their own process.

    python tests/grpc_backend.py N       # serve N instances on free ports of 127.0.0.1

It prints one JSON line with the ports, then serves until stdin closes. Each instance answers
``/test.Echo/Who`` with its name, and can be told to misbehave:

    /test.Echo/Behave  {"fail_every": 2, "code": "UNAVAILABLE"}   every 2nd call fails
    /test.Echo/Stats   -> {"calls": 12}
"""

from __future__ import annotations

import json
import sys
import threading
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


def serve(count: int) -> None:
    servers = []
    ports = []
    for i in range(count):
        instance = Instance(f"instance-{i}")
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
        handlers = {
            "Who": grpc.unary_unary_rpc_method_handler(instance.who),
            "Behave": grpc.unary_unary_rpc_method_handler(instance.behave),
            "Stats": grpc.unary_unary_rpc_method_handler(instance.stats),
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
