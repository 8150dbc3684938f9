"""Access logs: one JSON line per request, with the field names of Istio's JSON access log
(Envoy's command operators), so the queries and parsers written for Istio's logs keep working.

Off by default. ``Mesh(..., access_log=...)``, ``mesh.telemetry.access_log = AccessLog(...)``
or ``LIBMESH_ACCESS_LOG`` (a path, or ``-`` for standard output) turn it on.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from collections.abc import Sequence
from typing import IO, Any

__all__ = ["DEFAULT_FIELDS", "AccessLog", "AccessLogEntry"]

# Istio's default JSON access-log fields, in its order, plus the trace id.
DEFAULT_FIELDS = (
    "start_time",
    "route_name",
    "method",
    "path",
    "protocol",
    "response_code",
    "response_flags",
    "bytes_received",
    "bytes_sent",
    "duration",
    "upstream_service_time",
    "x_forwarded_for",
    "user_agent",
    "request_id",
    "authority",
    "upstream_host",
    "upstream_cluster",
    "downstream_remote_address",
    "trace_id",
    "grpc_status",
    "reporter",
)


class AccessLogEntry(dict[str, Any]):
    """One request's fields; missing ones are logged as ``null``, as Envoy's ``-``."""


def format_start_time(epoch: float) -> str:
    """Envoy's ``%START_TIME%``: RFC 3339 in UTC with milliseconds."""
    seconds = int(epoch)
    millis = int((epoch - seconds) * 1000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{millis:03d}Z"


class AccessLog:
    """Writes entries as JSON lines to ``stream`` (a text file object) or to the file at
    ``path`` (appended). ``fields`` chooses and orders the fields (from
    :data:`DEFAULT_FIELDS`)."""

    def __init__(
        self,
        stream: IO[str] | None = None,
        *,
        path: str | None = None,
        fields: Sequence[str] = DEFAULT_FIELDS,
    ) -> None:
        unknown = [f for f in fields if f not in DEFAULT_FIELDS]
        if unknown:
            raise ValueError(
                f"unknown access log field {', '.join(unknown)}; "
                f"the fields are {', '.join(DEFAULT_FIELDS)}"
            )
        if stream is not None and path is not None:
            raise ValueError("give an access log a stream or a path, not both")
        self._owned = path is not None and path != "-"
        if path == "-" or (stream is None and path is None):
            stream = sys.stdout
        elif path is not None:
            stream = open(path, "a", encoding="utf-8")  # noqa: SIM115 - closed by close()
        self._stream: IO[str] = stream  # type: ignore[assignment]
        self.fields = tuple(fields)
        self._lock = threading.Lock()

    @classmethod
    def from_environment(cls, value: str | None) -> AccessLog | None:
        return cls(path=value) if value else None

    def write(self, entry: AccessLogEntry) -> None:
        line = json.dumps({f: entry.get(f) for f in self.fields}, separators=(",", ":"))
        with self._lock:
            self._stream.write(line + "\n")
            self._stream.flush()

    def close(self) -> None:
        if self._owned:
            self._stream.close()
