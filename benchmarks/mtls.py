"""What the mesh's mutual TLS costs a request, in steady state (connections reused).

    .venv/bin/python benchmarks/mtls.py              # about 30 s
    .venv/bin/python benchmarks/mtls.py --json

One meshd (with its CA) and one FastAPI workload served by ``libmesh.serve`` (PERMISSIVE: it
takes plaintext and mTLS on one port, so both cases hit the same server process). One client
process with an SVID calls the same workload under two names: ``pay`` (auto mTLS: the
workload is labelled ``security.istio.io/tlsMode: istio``) and ``pay-plain`` (a
DestinationRule with ``tls: DISABLE``). Sequential requests on keep-alive connections through
libmesh's httpx transport, in interleaved rounds after a warm-up (so the handshake is paid
once and the steady state is measured); p50 and p99 latency and client CPU per request, with
the mTLS/plaintext ratio. Issue 6 names no target for this one: the figure is reported.
"""

from __future__ import annotations

import argparse
import json
import os
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

import libmesh

ROOT = Path(__file__).parents[1]
PLAIN_HOST = """
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: pay-plain, namespace: shop}
spec:
  hosts: [pay-plain.shop.svc.cluster.local]
  location: MESH_INTERNAL
  resolution: STATIC
  ports: [{number: 8080, name: http, protocol: HTTP}]
  workloadSelector: {labels: {app: pay}}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: pay-plain, namespace: shop}
spec:
  host: pay-plain.shop.svc.cluster.local
  trafficPolicy: {tls: {mode: DISABLE}}
"""
CASES = {
    "plaintext": "http://pay-plain.shop.svc.cluster.local:8080/balance",
    "mtls": "http://pay.shop.svc.cluster.local:8080/balance",
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def token(ca_dir: Path, account: str) -> str:
    return subprocess.run(
        [sys.executable, "-m", "meshd._meshctl", "token", "create", "-n", "shop", "-s", account,
         "--ttl", "10m", "--ca-dir", str(ca_dir)],
        capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip


def wait_for(check: Any, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out waiting for {what}")
        time.sleep(0.1)


def measure(client: Any, url: str, requests: int) -> dict[str, float]:
    times = []
    cpu = time.process_time()
    for _ in range(requests):
        started = time.perf_counter()
        response = client.get(url)
        times.append(time.perf_counter() - started)
        assert response.status_code == 200, response.text
    cpu = time.process_time() - cpu
    times.sort()
    return {
        "p50_us": times[len(times) // 2] * 1e6,
        "p99_us": times[int(len(times) * 0.99)] * 1e6,
        "cpu_us": cpu / requests * 1e6,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--requests", type=int, default=1000, help="per case and round")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    scratch = Path(tempfile.mkdtemp(prefix="mtls-bench-"))
    config, ca_dir = scratch / "mesh", scratch / "ca"
    shutil.copytree(ROOT / "examples" / "mtls" / "mesh", config)
    (config / "pay-plain.yaml").write_text(textwrap.dedent(PLAIN_HOST))
    xds, pay_port = free_port(), free_port()
    processes: list[subprocess.Popen[bytes]] = []
    rounds: dict[str, list[dict[str, float]]] = {case: [] for case in CASES}
    try:
        meshd = subprocess.Popen(
            [sys.executable, "-m", "meshd", "--config-dir", str(config),
             "--ca-dir", str(ca_dir), "--xds-address", f"127.0.0.1:{xds}",
             "--admin-address", "127.0.0.1:0", "--secure-xds-address", "127.0.0.1:0"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        processes.append(meshd)
        wait_for(lambda: (ca_dir / "root-cert.pem").exists(), "meshd's CA")
        address = f"127.0.0.1:{xds}"
        pay = subprocess.Popen(
            [sys.executable, str(ROOT / "examples" / "mtls" / "pay.py"), address, str(pay_port)],
            env={**os.environ, "LIBMESH_TOKEN": token(ca_dir, "pay")},
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        processes.append(pay)
        mesh = libmesh.Mesh.connect(
            address, namespace="shop", service_account="web", token=token(ca_dir, "web"),
            state_file=None,
        )  # fmt: skip
        for host in ("pay", "pay-plain"):
            cluster = f"outbound|8080||{host}.shop.svc.cluster.local"
            wait_for(lambda c=cluster: (s := mesh.engine.cluster(c)) and s.hosts, host)
        with mesh.client() as client:
            for url in CASES.values():
                measure(client, url, args.requests)  # warm-up: connections made, code warm
            for index in range(args.rounds):
                order = list(CASES.items())
                for case, url in order if index % 2 == 0 else order[::-1]:
                    rounds[case].append(measure(client, url, args.requests))
        mesh.close()
    finally:
        for process in reversed(processes):
            process.terminate()
            process.wait(timeout=15)
        shutil.rmtree(scratch, ignore_errors=True)

    result: dict[str, Any] = {
        case: {k: statistics.median(r[k] for r in runs) for k in runs[0]}
        for case, runs in rounds.items()
    }
    plain, mtls = result["plaintext"], result["mtls"]
    result["ratios"] = {k.removesuffix("_us"): mtls[k] / plain[k] for k in plain}
    out = sys.stderr if args.json else sys.stdout
    print(
        f"libmesh httpx transport -> FastAPI on libmesh.serve, {args.rounds} interleaved rounds "
        f"x {args.requests} sequential keep-alive requests per case (medians of the rounds):",
        file=out,
    )
    for case in CASES:
        r = result[case]
        print(f"  {case:9}  p50 {r['p50_us']:7.1f} us  p99 {r['p99_us']:7.1f} us  "
              f"client CPU {r['cpu_us']:6.1f} us/request", file=out)  # fmt: skip
    ratios = result["ratios"]
    print(f"  mTLS / plaintext: p50 x{ratios['p50']:.3f} (+{mtls['p50_us'] - plain['p50_us']:.1f} "
          f"us), p99 x{ratios['p99']:.3f}, client CPU x{ratios['cpu']:.3f}", file=out)  # fmt: skip
    if args.json:
        print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
