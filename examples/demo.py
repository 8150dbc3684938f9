"""The libmesh demo, on the embedded default: the example shop in examples/mesh/.

Run it with ./scripts/demo.sh. It needs nothing running: it checks the mesh, starts the shop's
backends on local ports (one of the reviews v1 instances is broken), sends traffic through
libmesh's httpx transport, and prints what the mesh did: the canary split, the retries that hid
the broken instance, its ejection, the injected faults. Then it shows a broken change being
refused, with the line to fix.
"""

from __future__ import annotations

import http.server
import json
import random
import re
import shutil
import sys
import tempfile
import threading
from collections import Counter
from pathlib import Path

import libmesh
from libmesh import config

MESH = Path(__file__).parent / "mesh"
BROKEN_INSTANCE = "reviews-v1-b"


class Backend(http.server.BaseHTTPRequestHandler):
    """One instance of a shop service: answers with its name, or 500 if it is the broken one."""

    protocol_version = "HTTP/1.1"
    # One write per response, without Nagle: small split writes meet delayed ACKs (40 ms).
    wbufsize = 65536
    disable_nagle_algorithm = True

    def do_GET(self) -> None:
        name = self.server.name  # type: ignore[attr-defined]
        status = 500 if name == BROKEN_INSTANCE else 200
        body = json.dumps({"instance": name}).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


def start_backends(mesh_dir: Path) -> list[http.server.ThreadingHTTPServer]:
    """Start one server per WorkloadEntry, on free ports written back into the mesh copy."""
    registry = mesh_dir / "registry.yaml"
    text = registry.read_text()
    servers = []
    for name in re.findall(r"^  name: ([\w-]+)$", text, flags=re.MULTILINE):
        if not name.startswith(("reviews-", "ratings-")):
            continue
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Backend)
        server.name = name  # type: ignore[attr-defined]
        server.daemon_threads = True
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        port = server.server_address[1]
        # Point this instance's WorkloadEntry at the port it really listens on.
        text = re.sub(
            rf"(name: {name}\n(?:.*\n)*?  ports: {{http: )\d+", rf"\g<1>{port}", text, count=1
        )
    registry.write_text(text)
    return servers


def check(mesh_dir: Path) -> bool:
    result = config.load(mesh_dir)
    problems = [*result.findings, *config.analyze(result)]
    for finding in problems:
        print("  " + finding.format(with_code=True))
    print(f"1. Checked {len(result.config)} resources: {len(problems)} problems.")
    return not any(f.is_error for f in problems)


def send_traffic(mesh: libmesh.Mesh) -> None:
    reviews: Counter[str] = Counter()
    retried = 0
    with mesh.client(timeout=5) as client:
        for _ in range(1000):
            response = client.get("http://reviews.shop.svc.cluster.local:8080/reviews/1")
            info = response.extensions["libmesh"]
            reviews[f"{info.cluster.split('|')[2]} {response.status_code}"] += 1
            retried += info.attempts > 1
        testers = {client.get("http://reviews:8080/", headers={"x-canary": "always"}).status_code}
        chaos: Counter[str] = Counter()
        for _ in range(200):
            response = client.get(
                "http://ratings.shop.svc.cluster.local:8080/", headers={"x-chaos": "on"}
            )
            flags = response.extensions["libmesh"].response_flags
            chaos[
                "aborted (503)" if "FI" in flags else "delayed" if "DI" in flags else "normal"
            ] += 1
    stats = mesh.stats()
    v1 = stats["outbound|8080|v1|reviews.shop.svc.cluster.local"]
    print("2. 1000 requests to reviews (canary: 90% v1, 10% v2):")
    for key, count in sorted(reviews.items()):
        print(f"     subset {key}: {count}")
    print(
        f"   {retried} requests met the broken v1 instance and were retried on a healthy one;"
        f" the caller saw no error."
    )
    print(
        f"   The broken instance was ejected after 5 consecutive 5xx "
        f"(ejections: {v1.outlier_ejections}); per-instance requests: {dict(v1.by_host)}"
    )
    print(f"   Testers (x-canary: always) are routed to v2: status {testers}.")
    print(f"3. 200 chaos requests to ratings (delay 20%, abort 10%): {dict(sorted(chaos.items()))}")


def show_refusal(mesh_dir: Path) -> None:
    path = mesh_dir / "reviews.yaml"
    original = path.read_text()
    broken = original.replace("weight: 10", "weight: 15").replace("perTryTimeout", "perTryTimout")
    broken = broken.replace("subset: v2}\n      weight", "subset: v3}\n      weight")
    path.write_text(broken)
    result = config.load(mesh_dir)
    findings = [*result.findings, *config.analyze(result)]
    print("4. A change with three mistakes is refused before it reaches traffic:")
    for finding in sorted(findings, key=lambda f: f.location.line):
        print("     " + finding.format(with_code=True).replace(str(mesh_dir) + "/", "mesh/"))
    path.write_text(original)


def main() -> int:
    with tempfile.TemporaryDirectory() as scratch:
        mesh_dir = Path(scratch) / "mesh"
        shutil.copytree(MESH, mesh_dir)
        servers = start_backends(mesh_dir)
        try:
            if not check(mesh_dir):
                return 1
            mesh = libmesh.Mesh.from_files(
                mesh_dir, namespace="shop", watch=False, rng=random.Random(1)
            )
            send_traffic(mesh)
            show_refusal(mesh_dir)
        finally:
            for server in servers:
                server.shutdown()
                server.server_close()
    print("\nNext: ./scripts/test.sh runs the whole test suite; README.md explains each feature.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
