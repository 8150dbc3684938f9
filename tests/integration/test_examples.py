"""The README's demo, run as a user runs it."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parents[2]


def test_the_demo_runs_meshd_and_shows_the_canary_its_shift_and_a_refused_edit() -> None:
    run = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "demo.py")],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )

    assert run.returncode == 0, run.stderr
    out = run.stdout
    assert "1. Checked 12 resources: 0 problems." in out
    assert "subset v1 200: 900" in out
    assert "subset v2 200: 100" in out
    assert "were retried on a healthy one; the caller saw no error" in out
    assert "(ejections: 1)" in out
    assert "Testers (x-canary: always) are routed to v2: status {200}" in out
    assert "aborted (503)" in out
    assert "this app connected and applied version" in out
    # the canary shift, made by editing the file meshd serves
    assert "1000 requests to reviews now: subset v1: 500, subset v2: 500" in out
    assert re.search(r"frontend-demo\.shop\s+SYNCED\s+SYNCED\s+SYNCED\s+SYNCED\s+shop", out)
    # a broken edit is refused with file and line, and the last good version keeps serving
    assert "meshd: configuration change rejected (2 errors)" in out
    assert "mesh/reviews.yaml:25: VirtualService shop/reviews: spec.http[1].retries.perTry" in out
    assert "the last good one: 100 requests subset v1: 50, subset v2: 50" in out


def test_the_mtls_example_goes_from_permissive_to_strict_with_an_authorization_policy() -> None:
    run = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "mtls" / "run.py")],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )

    assert run.returncode == 0, run.stderr
    out = run.stdout
    web = '200 {"balance":42,"caller":"spiffe://cluster.local/ns/shop/sa/web"}'
    assert f"1. PERMISSIVE (the default)\n   web   GET  pay -> {web}" in out
    assert 'plain GET  pay -> 200 {"balance":42,"caller":""}' in out
    assert f"2. STRICT, and only shop/web may GET\n   web   GET  pay -> {web}" in out
    assert "web   POST pay -> 403 RBAC: access denied" in out
    assert "batch GET  pay -> 403 RBAC: access denied" in out
    assert "plain GET  pay -> refused" in out
    assert "refused a plaintext connection" in out  # pay's log says why
    # gRPC beside it: libmesh's grpc client over mTLS, a plain grpcio client only while PERMISSIVE
    ledger = "web   gRPC pay -> balance 42 for spiffe://cluster.local/ns/shop/sa/web"
    assert out.count(ledger) == 2
    assert "plain gRPC pay -> balance 42 for \n" in out
    # (refused per call on the connection it kept from before, or per connection on a new one)
    refused = r"plain gRPC pay -> (UNAUTHENTICATED mutual TLS required: port \d+ is STRICT|UNAVAIL)"
    assert re.search(refused, out)


def test_the_proxy_example_puts_nginx_and_curl_in_the_mesh_beside_fastapi() -> None:
    run = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "proxy" / "run.py")],
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )

    assert run.returncode == 0, run.stderr
    out = run.stdout
    assert "20 calls: catalog v1 16, v2 4 (the canary: 80/20)" in out
    assert re.search(
        r"one answer: web \(called by spiffe://cluster.local/ns/shop/sa/curl\) got from "
        r"catalog: catalog v\d, called by By=spiffe://cluster.local/ns/shop/sa/catalog;"
        r"Hash=[0-9a-f]{64};URI=spiffe://cluster.local/ns/shop/sa/web\n",
        out,
    )
    assert "2. curl straight to catalog's port, without mTLS\n   -> refused" in out
    assert (
        "3. curl as shop/curl to catalog (only shop/web may call it)\n   -> RBAC: access denied"
        in out
    )
