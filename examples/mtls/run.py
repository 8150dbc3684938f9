"""From zero to STRICT mTLS with an authorization policy, on one machine.

    .venv/bin/python examples/mtls/run.py

1. meshd starts with its CA; the pay service gets its SVID with a bootstrap token and serves
   with ``libmesh.serve`` (and gRPC beside it); the web client (its own SVID) calls it over
   HTTP and gRPC: auto mTLS, and pay sees the caller's SPIFFE ID. Plain clients still get
   in: the default is PERMISSIVE.
2. ``strict.yaml`` goes into meshd's directory: PeerAuthentication STRICT and an
   AuthorizationPolicy. Plaintext is refused; web may GET and call the Ledger; web's POST and
   another service account's GET get 403.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import httpx

import libmesh

HERE = Path(__file__).parent
PAY = "http://pay.shop.svc.cluster.local:8080/balance"
LEDGER = "pay.shop.svc.cluster.local:9090"


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


def wait_for(check: Callable[[], Any], what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out waiting for {what}")
        time.sleep(0.1)


def attempt(send: Callable[[], httpx.Response]) -> str:
    try:
        response = send()
    except httpx.HTTPError as exc:
        return f"refused ({type(exc).__name__})"
    return f"{response.status_code} {response.text}"


def call(channel: grpc.Channel) -> str:
    try:
        return bytes(channel.unary_unary("/pay.Ledger/Balance")(b"", timeout=5)).decode()
    except grpc.RpcError as exc:
        return f"{exc.code().name} {exc.details()}"  # type: ignore[attr-defined]


def main() -> int:
    scratch = Path(tempfile.mkdtemp(prefix="mtls-example-"))
    config, ca_dir = scratch / "mesh", scratch / "ca"
    shutil.copytree(HERE / "mesh", config)
    xds, pay_port, grpc_port = free_port(), free_port(), free_port()
    processes = []
    try:
        meshd = subprocess.Popen(
            [sys.executable, "-m", "meshd", "--config-dir", str(config), "--ca-dir", str(ca_dir),
             "--xds-address", f"127.0.0.1:{xds}", "--admin-address", "127.0.0.1:0",
             "--secure-xds-address", "127.0.0.1:0", "--debounce", "50ms"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        processes.append(meshd)
        wait_for(lambda: (ca_dir / "root-cert.pem").exists(), "meshd's CA")
        address = f"127.0.0.1:{xds}"
        pay_log = (scratch / "pay.log").open("w")
        pay = subprocess.Popen(
            [sys.executable, str(HERE / "pay.py"), address, str(pay_port), str(grpc_port)],
            env={**os.environ, "LIBMESH_TOKEN": token(ca_dir, "pay")},
            stderr=pay_log,
        )
        processes.append(pay)
        web = libmesh.Mesh.connect(address, namespace="shop", service_account="web",
                                   token=token(ca_dir, "web"), state_file=None)  # fmt: skip
        other = libmesh.Mesh.connect(address, namespace="shop", service_account="batch",
                                     token=token(ca_dir, "batch"), state_file=None)  # fmt: skip
        cluster = "outbound|8080||pay.shop.svc.cluster.local"
        for mesh in (web, other):
            wait_for(lambda m=mesh: (c := m.engine.cluster(cluster)) and c.hosts, "pay")
        direct = f"http://127.0.0.1:{pay_port}/balance"
        with (
            web.client() as web_client,
            other.client() as other_client,
            web.grpc_channel(LEDGER) as web_grpc,
            grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as plain_grpc,
        ):
            print("1. PERMISSIVE (the default)")
            print(f"   web   GET  pay -> {attempt(lambda: web_client.get(PAY))}")
            print(f"   plain GET  pay -> {attempt(lambda: httpx.get(direct, timeout=5))}")
            print(f"   web   gRPC pay -> {call(web_grpc)}")
            print(f"   plain gRPC pay -> {call(plain_grpc)}")

            shutil.copy(HERE / "strict.yaml", config / "strict.yaml")
            wait_for(lambda: other_client.get(PAY).status_code == 403, "the policy to apply")
            print("2. STRICT, and only shop/web may GET")
            print(f"   web   GET  pay -> {attempt(lambda: web_client.get(PAY))}")
            print(f"   web   POST pay -> {attempt(lambda: web_client.post(PAY))}")
            print(f"   batch GET  pay -> {attempt(lambda: other_client.get(PAY))}")
            print(f"   plain GET  pay -> {attempt(lambda: httpx.get(direct, timeout=5))}")
            print(f"   web   gRPC pay -> {call(web_grpc)}")
            print(f"   plain gRPC pay -> {call(plain_grpc)}")
        web.close()
        other.close()
        pay.terminate()
        pay.wait(timeout=15)
        print("3. pay's log:")
        print((scratch / "pay.log").read_text().rstrip())
    finally:
        for process in reversed(processes):
            process.terminate()
            process.wait(timeout=15)
        shutil.rmtree(scratch, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
