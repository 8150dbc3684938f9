"""libmesh-proxy and nginx as real processes, for tests: started on free ports of 127.0.0.1,
their output kept, stopped at the end."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from tests.conftest import unused_port

_LISTENER = re.compile(r"^\s+(outbound|route|inbound|admin)\s+(\S+):(\d+)\s")


class ProxyProcess:
    """``python -m libmesh.proxy ARGS``; ``ports[kind]`` are the ports it listens on, in the
    order of its banner."""

    def __init__(self, args: list[str], env: dict[str, str] | None = None) -> None:
        self.lines: list[str] = []
        self.ports: dict[str, list[int]] = {}
        self._ready = threading.Event()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "libmesh.proxy", *args],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    @classmethod
    def start(
        cls, *args: str, env: dict[str, str] | None = None, timeout: float = 30
    ) -> ProxyProcess:
        proxy = cls(list(args), env)
        if not proxy._ready.wait(timeout) or not proxy.ports:
            proxy.stop()
            raise RuntimeError(f"libmesh-proxy did not start:\n{proxy.log}")
        return proxy

    def _read(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            self.lines.append(line)
            found = _LISTENER.match(line)
            if found:
                self.ports.setdefault(found[1], []).append(int(found[3]))
            elif line.startswith("libmesh-proxy: "):  # "ready", or why it did not start
                self._ready.set()
        self._ready.set()

    @property
    def log(self) -> str:
        return "".join(self.lines)

    def port(self, kind: str) -> int:
        return self.ports[kind][0]

    def url(self, kind: str, path: str = "/") -> str:
        return f"http://127.0.0.1:{self.port(kind)}{path}"

    def terminate(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)

    def wait(self, timeout: float) -> int:
        code = self.process.wait(timeout)
        self._finish()
        return code

    def _finish(self) -> None:
        self._reader.join(5)
        if self.process.stderr is not None:
            self.process.stderr.close()

    def stop(self) -> None:
        self.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self._finish()


class Nginx:
    """nginx in the foreground, one process, answering every request with what it saw of the
    mesh: ``nginx saw xfcc=<x-forwarded-client-cert> uri=<request uri>``."""

    def __init__(self, directory: Path) -> None:
        binary = find_nginx()
        if binary is None:
            raise RuntimeError("these tests need nginx: apt-get install nginx-light")
        directory.mkdir(parents=True, exist_ok=True)
        self.port = unused_port()
        self.directory = directory
        temp = " ".join(
            f"{kind}_temp_path {directory}/{kind};"
            for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
        )
        (directory / "nginx.conf").write_text(
            f"daemon off; master_process off; worker_processes 1;\n"
            f"pid {directory}/nginx.pid; error_log {directory}/error.log warn;\n"
            f"events {{ worker_connections 1024; }}\n"
            f"http {{ access_log off; {temp}\n"
            f"  server {{ listen 127.0.0.1:{self.port};\n"
            f"    location / {{ default_type text/plain;\n"
            f'      return 200 "nginx saw xfcc=$http_x_forwarded_client_cert uri=$request_uri\\n";'
            f" }} }} }}\n"
        )
        self.process = subprocess.Popen(
            [binary, "-p", str(directory), "-c", str(directory / "nginx.conf")],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"nginx exited: {(directory / 'error.log').read_text()}")
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port)):
                return
            time.sleep(0.05)
        self.stop()
        raise RuntimeError("nginx did not start listening")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGQUIT)  # graceful
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def find_nginx() -> str | None:
    found = shutil.which("nginx")
    if found:
        return found
    for candidate in ("/usr/sbin/nginx", "/usr/local/sbin/nginx", "/usr/local/nginx/sbin/nginx"):
        if os.access(candidate, os.X_OK):
            return candidate
    return None


def curl(*args: str, timeout: float = 20) -> subprocess.CompletedProcess[str]:
    """curl as a program outside the mesh would run it (``-s``: no progress)."""
    binary = shutil.which("curl")
    if binary is None:
        raise RuntimeError("these tests need curl: apt-get install curl")
    return subprocess.run(
        [binary, "-s", "--max-time", str(timeout), *args],
        capture_output=True,
        text=True,
        timeout=timeout + 5,
        check=False,
    )
