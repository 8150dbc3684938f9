"""Programs that are not Python in the mesh: nginx and curl beside a FastAPI service.

    .venv/bin/python examples/proxy/run.py            (needs nginx and curl)

meshd serves examples/proxy/mesh/shop.yaml (STRICT mTLS, an 80/20 canary for catalog, and who
may call whom). catalog is nginx, two versions, each with a libmesh-proxy in front of it
(``--inbound``: mTLS terminated, the caller checked, its SPIFFE ID handed to nginx in
x-forwarded-client-cert). web is a FastAPI app with libmesh. curl calls web through a
libmesh-proxy of its own (``--outbound``, as HTTP_PROXY) with the identity shop/curl:

    curl -> libmesh-proxy =mTLS=> web (FastAPI) =mTLS=> libmesh-proxy -> nginx (v1 or v2)
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).parent
WEB = "http://web.shop.svc.cluster.local:8080/"
CATALOG = "http://catalog.shop.svc.cluster.local:8080/items"


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


def wait_for(check: Callable[[], Any], what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out waiting for {what}")
        time.sleep(0.1)


def listening(port: int) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) == 0


def nginx_config(directory: Path, port: int, version: str) -> Path:
    directory.mkdir()
    kinds = ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    temp = " ".join(f"{kind}_temp_path {directory}/{kind};" for kind in kinds)
    path = directory / "nginx.conf"
    path.write_text(
        f"daemon off; master_process off; pid {directory}/nginx.pid;\n"
        f"error_log {directory}/error.log warn; events {{}}\n"
        f"http {{ access_log off; {temp}\n"
        f"  server {{ listen 127.0.0.1:{port}; location / {{ default_type text/plain;\n"
        f'    return 200 "catalog {version}, called by $http_x_forwarded_client_cert\\n";'
        f" }} }} }}\n"
    )
    return path


def curl(*args: str) -> str:
    done = subprocess.run(["curl", "-s", "--max-time", "10", *args], capture_output=True, text=True)
    return done.stdout if done.returncode == 0 else f"refused (curl exit code {done.returncode})"


def main() -> int:
    nginx = shutil.which("nginx") or (
        "/usr/sbin/nginx" if os.path.exists("/usr/sbin/nginx") else ""
    )
    if not nginx or not shutil.which("curl"):
        raise SystemExit("this example runs nginx and curl: sudo apt-get install nginx-light curl")
    scratch = Path(tempfile.mkdtemp(prefix="proxy-example-"))
    config, ca_dir = scratch / "mesh", scratch / "ca"
    shutil.copytree(HERE / "mesh", config)
    xds = free_port()
    address = f"127.0.0.1:{xds}"
    processes: list[subprocess.Popen[Any]] = []
    log = (scratch / "processes.log").open("w")  # all their output, shown when something fails

    def start(*argv: str, **options: Any) -> subprocess.Popen[Any]:
        process = subprocess.Popen(argv, stdout=log, stderr=log, **options)
        processes.append(process)
        return process

    try:
        start(sys.executable, "-m", "meshd", "--config-dir", str(config), "--ca-dir", str(ca_dir),
              "--xds-address", address, "--admin-address", "127.0.0.1:0",
              "--secure-xds-address", "127.0.0.1:0", "--debounce", "50ms")  # fmt: skip
        wait_for(lambda: (ca_dir / "root-cert.pem").exists(), "meshd's CA")
        proxy = [sys.executable, "-m", "libmesh.proxy", "--xds-address", address,
                 "--namespace", "shop", "--admin", "off"]  # fmt: skip
        inbound = {}
        for version in ("v1", "v2"):
            nginx_port, inbound[version] = free_port(), free_port()
            start(nginx, "-c", str(nginx_config(scratch / version, nginx_port, version)))
            start(*proxy, "--service-account", "catalog", "--token", token(ca_dir, "catalog"),
                  "--label", "app=catalog", "--label", f"version={version}",
                  "--label", "security.istio.io/tlsMode=istio", "--outbound", "off",
                  "--inbound", f"{inbound[version]}={nginx_port}",
                  "--register", f"http={inbound[version]}")  # fmt: skip
        web_port, curl_proxy = free_port(), free_port()
        start(sys.executable, str(HERE / "web.py"), address, str(web_port),
              env={**os.environ, "LIBMESH_TOKEN": token(ca_dir, "web")})  # fmt: skip
        start(*proxy, "--service-account", "curl", "--token", token(ca_dir, "curl"),
              "--outbound", str(curl_proxy))  # fmt: skip
        for port in (*inbound.values(), web_port, curl_proxy):
            wait_for(lambda p=port: listening(p), f"port {port}")
        via = ("-x", f"http://127.0.0.1:{curl_proxy}")
        wait_for(lambda: curl(*via, WEB).startswith("web"), "web and catalog to be registered")

        answers = [curl(*via, WEB) for _ in range(20)]
        split = Counter(m[1] for a in answers if (m := re.search(r"catalog (v\d)", a)))
        print("1. curl -> libmesh-proxy =mTLS=> web (FastAPI) =mTLS=> libmesh-proxy -> nginx")
        print(f"   20 calls: catalog v1 {split['v1']}, v2 {split['v2']} (the canary: 80/20)")
        print(f"   one answer: {answers[0].strip()}")
        plaintext = curl(f"http://127.0.0.1:{inbound['v1']}/items")
        print("2. curl straight to catalog's port, without mTLS")
        print(f"   -> {plaintext}")
        print("3. curl as shop/curl to catalog (only shop/web may call it)")
        print(f"   -> {curl(*via, CATALOG)}")
    except SystemExit:
        log.flush()
        print((scratch / "processes.log").read_text(), file=sys.stderr)
        raise
    finally:
        for process in reversed(processes):
            process.terminate()
            process.wait(timeout=30)
        log.close()
        shutil.rmtree(scratch, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
