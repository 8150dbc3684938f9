"""meshd as a real process, for tests: started on free ports, its log kept, stopped at the end."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

_ADDRESS = re.compile(r"xDS \(ADS over gRPC\)\s+(\S+):(\d+)")
_SECURE = re.compile(r"xDS \+ CA over TLS\s+(\S+)")
_ADMIN = re.compile(r"admin \(HTTP\)\s+http://(\S+):(\d+)/")


class MeshdProcess:
    def __init__(self, config_dir: Path, args: tuple[str, ...]) -> None:
        self.config_dir = config_dir
        self.args = args
        # the CA's files live as long as this object (a restarted meshd finds its root again)
        self.ca_dir = Path(tempfile.mkdtemp(prefix="meshd-ca-"))
        weakref.finalize(self, shutil.rmtree, self.ca_dir, ignore_errors=True)
        self.lines: list[str] = []
        self.xds_port = 0
        self.admin_port = 0
        self.secure_xds_port = 0
        self.process: subprocess.Popen[str] | None = None
        self._reader: threading.Thread | None = None

    @classmethod
    def start(
        cls, config_dir: Path, *args: str, xds_port: int = 0, admin_port: int = 0
    ) -> MeshdProcess:
        meshd = cls(config_dir, args)
        meshd._launch(xds_port, admin_port)
        return meshd

    @property
    def xds_address(self) -> str:
        return f"127.0.0.1:{self.xds_port}"

    @property
    def admin_url(self) -> str:
        return f"http://127.0.0.1:{self.admin_port}"

    def _launch(self, xds_port: int, admin_port: int) -> None:
        command = [
            sys.executable,
            "-m",
            "meshd",
            "--config-dir",
            str(self.config_dir),
            "--xds-address",
            f"127.0.0.1:{xds_port}",
            "--admin-address",
            f"127.0.0.1:{admin_port}",
            "--ca-dir",
            str(self.ca_dir),
            "--secure-xds-address",
            f"127.0.0.1:{self.secure_xds_port}",
            *self.args,
        ]
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.process = subprocess.Popen(
            command, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=env
        )
        ready = threading.Event()
        process = self.process

        def read() -> None:
            assert process.stderr is not None
            for line in process.stderr:
                self.lines.append(line.rstrip("\n"))
                if match := _ADDRESS.search(line):
                    self.xds_port = int(match.group(2))
                if match := _ADMIN.search(line):
                    self.admin_port = int(match.group(2))
                if match := _SECURE.search(line):  # the banner's last line
                    if match.group(1) != "off":
                        self.secure_xds_port = int(match.group(1).rpartition(":")[2])
                    ready.set()
            ready.set()

        self._reader = threading.Thread(target=read, daemon=True)
        self._reader.start()
        if not ready.wait(timeout=30) or not self.admin_port:
            self.stop()
            raise RuntimeError("meshd did not start:\n" + self.log)

    @property
    def log(self) -> str:
        return "\n".join(self.lines)

    # admin pages ------------------------------------------------------------------------------

    def get(self, path: str) -> httpx.Response:
        return httpx.get(self.admin_url + path, timeout=10)

    def json(self, path: str) -> Any:
        response = self.get(path)
        response.raise_for_status()
        return response.json()

    def metric(self, name: str, **labels: str) -> float:
        """A sample of /metrics, 0 when absent."""
        wanted = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
        series = f"{name}{{{wanted}}}" if labels else name
        for line in self.get("/metrics").text.splitlines():
            if line.startswith("#"):
                continue
            key, _, value = line.rpartition(" ")
            if key == series:
                return float(value)
        return 0.0

    def clients(self) -> list[dict[str, Any]]:
        return list(self.json("/debug/syncz")["clients"])

    def client(self, node_id: str) -> dict[str, Any]:
        matches = [c for c in self.clients() if c["node"] == node_id]
        assert len(matches) == 1, f"{node_id} in {[c['node'] for c in self.clients()]}"
        return matches[0]

    def wait_until(
        self, condition: Callable[[], Any], timeout: float = 10.0, what: str = "the condition"
    ) -> Any:
        deadline = time.monotonic() + timeout
        while True:
            result = condition()
            if result:
                return result
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}; meshd's log:\n{self.log}")
            time.sleep(0.05)

    def wait_for_log(self, text: str, timeout: float = 10.0) -> str:
        return str(
            self.wait_until(
                lambda: next((line for line in self.lines if text in line), None),
                timeout,
                f"{text!r} in the log",
            )
        )

    # life cycle -------------------------------------------------------------------------------

    def kill(self) -> None:
        """Die without warning (SIGKILL), as a crashed control plane does."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def restart(self) -> None:
        """Start again on the same ports."""
        self.stop()
        self._launch(self.xds_port, self.admin_port)

    def stop(self) -> None:
        process = self.process
        if process is None:
            return
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        if self._reader is not None:
            self._reader.join(timeout=5)
        if process.stderr is not None:
            process.stderr.close()
