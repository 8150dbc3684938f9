"""What libmesh's inbound middleware costs an application, and what tracing costs a call.

    sudo apt-get install wrk
    .venv/bin/python benchmarks/middleware.py            # about 1 minute
    .venv/bin/python benchmarks/middleware.py --json

1. **Over the network** (issue 5's target: at most 10% at p50): the same FastAPI app with an
   empty endpoint, served by uvicorn (one worker, each in its own process), bare and with
   ``app.add_middleware(MeshMiddleware, mesh=...)``; wrk at fixed concurrency, in interleaved
   rounds, wrk pinned to one CPU and the apps to the other; p50 and p99 latency, requests/s and
   the server's CPU time per request, with the ratio to the bare app.
2. **In the process**: time per request for the ASGI app (FastAPI) and the WSGI app (Flask),
   bare and with libmesh's middleware, called directly (no server, no socket): the middleware's
   own CPU cost.
3. **Tracing on a client call**: libmesh's httpx client against an in-memory network, without a
   tracer provider (trace context passed through, no spans) and with OpenTelemetry's SDK
   (a span per call and per attempt, batched to an exporter that drops them).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Any

import httpcore
import httpx

APP = """
import sys
from fastapi import FastAPI
from fastapi.responses import PlainTextResponse
import libmesh, uvicorn
from libmesh.telemetry import Telemetry
from libmesh.xds import Node

app = FastAPI()

@app.get("/", response_class=PlainTextResponse)
async def empty() -> str:
    return ""

# Both apps import libmesh and make its telemetry (a libmesh user has both either way): the
# difference is the middleware alone.
telemetry = Telemetry(Node(namespace="bench", labels={"app": "bench"}))
if sys.argv[2] == "mesh":
    app.add_middleware(libmesh.middleware.MeshMiddleware, telemetry=telemetry)
uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), log_level="error", access_log=False)
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _pinned(cpu: int) -> list[str]:
    """Run on one CPU: wrk on the first, the apps (one measured at a time) on the second, so
    that the scheduler moving them around does not add its noise to a difference of a few
    percent. Nothing is pinned where taskset or a second CPU is missing."""
    if shutil.which("taskset") is None or (os.cpu_count() or 1) < 2:
        return []
    return ["taskset", "-c", str(cpu)]


def wait_until_up(port: int) -> None:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            time.sleep(0.1)
    raise RuntimeError(f"the app on port {port} did not start")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def wrk(port: int, seconds: float, connections: int, pid: int) -> dict[str, float]:
    cpu_before = cpu_seconds(pid)
    out = subprocess.run(
        [*_pinned(0), "wrk", "-t1", f"-c{connections}", f"-d{seconds:g}s", "--latency",
         f"http://127.0.0.1:{port}/"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    latency = dict(re.findall(r"^\s+(50|99)%\s+([\d.]+\w+)", out, re.MULTILINE))
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    total = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    cpu_us = (cpu_seconds(pid) - cpu_before) / total * 1e6
    return {"p50_us": _us(latency["50"]), "p99_us": _us(latency["99"]), "rps": rps,
            "cpu_us": cpu_us}  # fmt: skip


def _us(text: str) -> float:
    number, unit = re.fullmatch(r"([\d.]+)(\w+)", text).groups()  # type: ignore[union-attr]
    return float(number) * {"us": 1, "ms": 1000, "s": 1_000_000}[unit]


def over_the_network(args: argparse.Namespace) -> dict[str, Any]:
    if shutil.which("wrk") is None:
        return {"skipped": "wrk is not installed (sudo apt-get install wrk)"}
    with tempfile.TemporaryDirectory() as scratch:
        script = Path(scratch) / "app.py"
        script.write_text(APP)
        ports = {"bare": free_port(), "mesh": free_port()}
        processes = [
            subprocess.Popen([*_pinned(1), sys.executable, str(script), str(port), kind])
            for kind, port in ports.items()
        ]
        try:
            for port in ports.values():
                wait_until_up(port)
            pids = {kind: p.pid for kind, p in zip(ports, processes, strict=True)}
            for kind, port in ports.items():
                wrk(port, 1, args.connections, pids[kind])  # warm-up
            rounds: dict[str, list[dict[str, float]]] = {"bare": [], "mesh": []}
            for index in range(args.rounds):
                order = list(ports.items()) if index % 2 == 0 else list(ports.items())[::-1]
                for kind, port in order:
                    rounds[kind].append(wrk(port, args.seconds, args.connections, pids[kind]))
        finally:
            for process in processes:
                process.terminate()
                process.wait(timeout=10)
    result: dict[str, Any] = {}
    for kind, runs in rounds.items():
        result[kind] = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
    # Each ratio is taken within a round, between the two runs side by side, and the median
    # over the rounds reported (with the lowest and highest): this machine's speed drifts
    # between rounds by as much as the 10% the target allows, much less between neighbours.
    for key, figure in (("p50_ratio", "p50_us"), ("rps_ratio", "rps"), ("cpu_ratio", "cpu_us")):
        each = [
            mesh[figure] / bare[figure]
            for mesh, bare in zip(rounds["mesh"], rounds["bare"], strict=True)
        ]
        result[key] = statistics.median(each)
        result[key + "_range"] = [min(each), max(each)]
    return result


def in_process(args: argparse.Namespace) -> dict[str, Any]:
    from fastapi import FastAPI
    from fastapi.responses import PlainTextResponse
    from flask import Flask

    import libmesh
    from libmesh.telemetry import Telemetry
    from libmesh.xds import Node

    telemetry = Telemetry(Node(namespace="bench", labels={"app": "bench"}))

    def fastapi_app(meshed: bool) -> Any:
        app = FastAPI()

        @app.get("/", response_class=PlainTextResponse)
        async def empty() -> str:
            return ""

        if meshed:
            app.add_middleware(libmesh.middleware.MeshMiddleware, telemetry=telemetry)
        return app

    def flask_app(meshed: bool) -> Any:
        app = Flask("bench")
        app.add_url_rule("/", "empty", lambda: "")
        if meshed:
            app.wsgi_app = libmesh.middleware.MeshWSGIMiddleware(  # type: ignore[method-assign]
                app.wsgi_app, telemetry=telemetry
            )
        return app

    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "GET",
        "scheme": "http", "path": "/", "raw_path": b"/", "query_string": b"", "root_path": "",
        "headers": [(b"host", b"bench:8000"), (b"user-agent", b"bench")],
        "client": ("127.0.0.1", 5000), "server": ("127.0.0.1", 8000),
    }  # fmt: skip

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Any) -> None:
        pass

    async def asgi_rounds(app: Any, n: int) -> float:
        started = time.perf_counter()
        for _ in range(n):
            await app(dict(scope), receive, send)
        return (time.perf_counter() - started) / n * 1e6

    environ = {
        "REQUEST_METHOD": "GET", "PATH_INFO": "/", "QUERY_STRING": "", "SERVER_NAME": "bench",
        "SERVER_PORT": "8000", "SERVER_PROTOCOL": "HTTP/1.1", "HTTP_HOST": "bench:8000",
        "wsgi.url_scheme": "http", "REMOTE_ADDR": "127.0.0.1",
    }  # fmt: skip

    def wsgi_rounds(app: Any, n: int) -> float:
        import io

        def start_response(status: str, headers: Any, exc_info: Any = None) -> Any:
            return None

        started = time.perf_counter()
        for _ in range(n):
            env = dict(environ, **{"wsgi.input": io.BytesIO(), "wsgi.errors": sys.stderr})
            body = app(env, start_response)
            for _chunk in body:
                pass
            close = getattr(body, "close", None)
            if close is not None:
                close()
        return (time.perf_counter() - started) / n * 1e6

    result: dict[str, Any] = {}
    n = args.calls
    for name, bare, meshed, rounds_of in (
        ("asgi (FastAPI)", fastapi_app(False), fastapi_app(True),
         lambda app: asyncio.run(asgi_rounds(app, n))),
        ("wsgi (Flask)", flask_app(False).wsgi_app, flask_app(True).wsgi_app,
         lambda app: wsgi_rounds(app, n)),
    ):  # fmt: skip
        times: dict[str, list[float]] = {"bare": [], "mesh": []}
        rounds_of(bare)
        rounds_of(meshed)  # warm-up
        for _ in range(args.rounds):
            times["bare"].append(rounds_of(bare))
            times["mesh"].append(rounds_of(meshed))
        bare_us, mesh_us = statistics.median(times["bare"]), statistics.median(times["mesh"])
        result[name] = {"bare_us": bare_us, "mesh_us": mesh_us, "added_us": mesh_us - bare_us,
                        "ratio": mesh_us / bare_us}  # fmt: skip
    return result


CANNED = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Type: text/plain\r\n\r\nok"


def tracing_cost(args: argparse.Namespace) -> dict[str, Any]:
    """libmesh's client with and without an OpenTelemetry SDK; the network is httpcore's
    in-memory backend, so only the process's own work is measured."""
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult

    import libmesh

    class Drop(SpanExporter):
        def export(self, spans: Any) -> SpanExportResult:
            return SpanExportResult.SUCCESS

    with tempfile.TemporaryDirectory() as scratch:
        Path(scratch, "mesh.yaml").write_text(textwrap.dedent("""
            apiVersion: networking.istio.io/v1
            kind: ServiceEntry
            metadata: {name: bench, namespace: bench}
            spec:
              hosts: [bench.bench.svc.cluster.local]
              location: MESH_INTERNAL
              resolution: STATIC
              ports: [{number: 8080, name: http, protocol: HTTP}]
              endpoints: [{address: 127.0.0.1}]
            """))  # fmt: skip
        mesh = libmesh.Mesh.from_files(scratch, namespace="bench", watch=False)
    client = mesh.client()
    url = "http://bench.bench.svc.cluster.local:8080/"
    n = args.calls
    backend = httpcore.MockBackend([CANNED] * (n * (2 * args.rounds + 4)))

    def use_mock() -> None:
        for transport in client._transport._endpoints.values():  # type: ignore[attr-defined]
            pool = transport._pool
            pool.close()
            pool._network_backend._backend = backend

    def rounds() -> list[float]:
        times = []
        for _ in range(args.rounds):
            started = time.perf_counter()
            for _ in range(n):
                client.get(url)
            times.append((time.perf_counter() - started) / n * 1e6)
        return times

    with contextlib.suppress(httpx.HTTPError):
        client.get(url)  # nothing listens: this makes the endpoint transport, to swap below
    use_mock()
    for _ in range(n):
        client.get(url)  # warm-up
    without = statistics.median(rounds())
    provider = TracerProvider()
    provider.add_span_processor(BatchSpanProcessor(Drop()))
    trace.set_tracer_provider(provider)
    with_tracing = statistics.median(rounds())
    provider.shutdown()
    client.close()
    mesh.close()
    return {"without_us": without, "with_sdk_us": with_tracing,
            "added_us": with_tracing - without}  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--seconds", type=float, default=3.0, help="per wrk run")
    parser.add_argument("--connections", type=int, default=8)
    parser.add_argument("--calls", type=int, default=3000, help="per in-process round")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    os.environ.pop("LIBMESH_ACCESS_LOG", None)
    result = {
        "network": over_the_network(args),
        "in_process": in_process(args),
        "tracing": tracing_cost(args),
    }
    out = sys.stderr if args.json else sys.stdout
    network = result["network"]
    print(
        f"1. FastAPI on uvicorn, empty endpoint, wrk -t1 -c{args.connections}, "
        f"{args.rounds} interleaved rounds of {args.seconds:g} s:",
        file=out,
    )
    if "skipped" in network:
        print(f"   skipped: {network['skipped']}", file=out)
    else:
        for kind in ("bare", "mesh"):
            r = network[kind]
            print(f"   {kind:5} p50 {r['p50_us']:7.0f} us  p99 {r['p99_us']:7.0f} us  "
                  f"{r['rps']:8.0f} req/s  server CPU {r['cpu_us']:6.1f} us/request",
                  file=out)  # fmt: skip
        low, high = network["p50_ratio_range"]
        print(f"   with MeshMiddleware (each ratio within a round, median over the rounds): "
              f"p50 x{network['p50_ratio']:.3f} (rounds x{low:.3f}-x{high:.3f}; target <= 1.10), "
              f"req/s x{network['rps_ratio']:.3f}, server CPU per request "
              f"x{network['cpu_ratio']:.3f}", file=out)  # fmt: skip
    print("2. In the process (no server), per request:", file=out)
    for name, r in result["in_process"].items():
        print(f"   {name:15} bare {r['bare_us']:6.1f} us  with libmesh {r['mesh_us']:6.1f} us  "
              f"(+{r['added_us']:.1f} us, x{r['ratio']:.2f})", file=out)  # fmt: skip
    t = result["tracing"]
    print(f"3. A client call through libmesh: {t['without_us']:.1f} us without a tracer "
          f"provider, {t['with_sdk_us']:.1f} us with OpenTelemetry's SDK "
          f"(+{t['added_us']:.1f} us for 2 spans)", file=out)  # fmt: skip
    if args.json:
        print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
