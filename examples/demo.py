"""The libmesh demo, on the embedded default: the example shop in examples/mesh/.

Run it with ./scripts/demo.sh. It needs nothing running: it checks the mesh, starts the shop's
backends on local ports (one of the reviews v1 instances is broken), starts meshd on the mesh's
directory and connects this app to it, sends traffic through libmesh's httpx transport, and
prints what the mesh did: the canary split, the retries that hid the broken instance, its
ejection, the injected faults. Then it shifts the canary by editing the YAML file — meshd pushes
the change and the split follows — and shows a broken edit being refused while the last good
configuration keeps serving.
"""

from __future__ import annotations

import http.server
import json
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

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


class Meshd:
    """meshd in a child process, serving the mesh directory; its log is kept for the demo."""

    def __init__(self, mesh_dir: Path) -> None:
        self.lines: list[str] = []
        self.process = subprocess.Popen(
            [sys.executable, "-m", "meshd", "--config-dir", str(mesh_dir),
             "--ca-dir", str(mesh_dir.parent / "ca"), "--secure-xds-address", "127.0.0.1:0",
             "--xds-address", "127.0.0.1:0", "--admin-address", "127.0.0.1:0"],
            stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )  # fmt: skip
        self.xds_address = self.admin_address = ""
        started = threading.Event()

        def read() -> None:
            assert self.process.stderr is not None
            for line in self.process.stderr:
                self.lines.append(line.rstrip())
                if match := re.search(r"xDS \(ADS over gRPC\)\s+(\S+)", line):
                    self.xds_address = match.group(1)
                if match := re.search(r"admin \(HTTP\)\s+http://([^/]+)/", line):
                    self.admin_address = match.group(1)
                    started.set()
            started.set()

        threading.Thread(target=read, daemon=True).start()
        if not started.wait(30) or not self.admin_address:
            self.stop()
            raise SystemExit("meshd did not start:\n" + "\n".join(self.lines))

    def wait_for_line(self, text: str, timeout: float = 10) -> list[str]:
        """The log lines from the first one containing ``text`` on."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for index, line in enumerate(self.lines):
                if text in line:
                    time.sleep(0.2)  # the rest of the message
                    return self.lines[index:]
            time.sleep(0.02)
        raise SystemExit(f"meshd did not log {text!r}:\n" + "\n".join(self.lines))

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=10)


@contextmanager
def running_meshd(mesh_dir: Path) -> Iterator[Meshd]:
    meshd = Meshd(mesh_dir)
    try:
        yield meshd
    finally:
        meshd.stop()


def reviews_split(client: httpx.Client, requests: int) -> Counter[str]:
    """Which subset answered each of ``requests`` calls to reviews."""
    split: Counter[str] = Counter()
    for _ in range(requests):
        response = client.get("http://reviews.shop.svc.cluster.local:8080/reviews/1")
        split[response.extensions["libmesh"].cluster.split("|")[2]] += 1
    return split


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
    print("3. 1000 requests to reviews (canary: 90% v1, 10% v2):")
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
    print(f"4. 200 chaos requests to ratings (delay 20%, abort 10%): {dict(sorted(chaos.items()))}")


def wait_for_new_version(mesh: libmesh.Mesh, version: str, timeout: float = 10) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = mesh.xds_status
        assert status is not None
        if status.applied_version != version:
            return status.applied_version
        time.sleep(0.005)
    raise SystemExit("meshd's change did not reach the app")


def shift_canary(mesh: libmesh.Mesh, mesh_dir: Path) -> None:
    path = mesh_dir / "reviews.yaml"
    status = mesh.xds_status
    assert status is not None
    before = status.applied_version
    saved = time.monotonic()
    path.write_text(path.read_text().replace("weight: 90", "weight: 50").replace(
        "weight: 10", "weight: 50"))  # fmt: skip
    version = wait_for_new_version(mesh, before)
    took = (time.monotonic() - saved) * 1000
    print(
        "5. The canary goes to 50/50 by editing reviews.yaml: meshd pushed it and this app "
        f"applied it {took:.0f} ms after the file was saved (version {version})."
    )
    with mesh.client(timeout=5) as client:
        split = reviews_split(client, 1000)
    print("   1000 requests to reviews now: " + ", ".join(
        f"subset {subset}: {count}" for subset, count in sorted(split.items())))  # fmt: skip


def show_proxy_status(meshd: Meshd) -> None:
    run = subprocess.run(
        [sys.executable, "-m", "meshd._meshctl", "proxy-status",
         "--admin-address", meshd.admin_address],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    print("6. meshctl proxy-status: every client and whether it took the last version:")
    for line in (run.stdout or run.stderr).splitlines():
        print("     " + line)


def show_refusal(mesh: libmesh.Mesh, meshd: Meshd, mesh_dir: Path) -> None:
    path = mesh_dir / "reviews.yaml"
    original = path.read_text()
    broken = original.replace(
        "weight: 50\n    - destination: {host: reviews, subset: v2}",
        "weight: 55\n    - destination: {host: reviews, subset: v2}",
    )
    broken = broken.replace("perTryTimeout", "perTryTimout")
    path.write_text(broken)  # fmt: skip
    lines = meshd.wait_for_line("configuration change rejected")
    print("7. An edit with two mistakes: meshd refuses it and says where, in its log:")
    for line in lines[:4]:
        print("     " + line.split(" ", 1)[1].strip().replace(str(mesh_dir) + "/", "mesh/"))
    status = mesh.xds_status
    assert status is not None
    with mesh.client(timeout=5) as client:
        split = reviews_split(client, 100)
    print(
        f"   The app keeps version {status.applied_version}, the last good one: 100 requests "
        + ", ".join(f"subset {subset}: {count}" for subset, count in sorted(split.items()))
    )
    path.write_text(original)


def main() -> int:
    with tempfile.TemporaryDirectory() as scratch:
        mesh_dir = Path(scratch) / "mesh"
        shutil.copytree(MESH, mesh_dir)
        servers = start_backends(mesh_dir)
        try:
            if not check(mesh_dir):
                return 1
            with running_meshd(mesh_dir) as meshd:
                mesh = libmesh.Mesh.connect(
                    meshd.xds_address,
                    namespace="shop",
                    labels={"app": "frontend"},
                    node_id="frontend-demo.shop",
                    state_file=None,
                    rng=random.Random(1),
                )
                try:
                    status = mesh.xds_status
                    assert status is not None
                    print(
                        f"2. meshd serves examples/mesh at {meshd.xds_address}; this app "
                        f"connected and applied version {status.applied_version}."
                    )
                    send_traffic(mesh)
                    shift_canary(mesh, mesh_dir)
                    show_proxy_status(meshd)
                    show_refusal(mesh, meshd, mesh_dir)
                finally:
                    mesh.close()
        finally:
            for server in servers:
                server.shutdown()
                server.server_close()
    print("\nNext: ./scripts/test.sh runs the whole test suite; README.md explains each feature.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
