"""The README's demo, run as a user runs it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parents[2]


def test_the_demo_shows_the_canary_the_retries_the_ejection_and_the_faults() -> None:
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
    assert "spec.http[1].retries.perTryTimout: error [IST0106] unknown field" in out
