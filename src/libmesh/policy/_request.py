"""What the engine needs to know about a request, independent of the client library."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import parse_qsl

__all__ = ["RequestInfo"]


@dataclass(frozen=True, slots=True)
class RequestInfo:
    """A request as routing sees it. ``headers`` must look names up case-insensitively (as
    ``httpx.Headers`` does) and join repeated values with commas, as Envoy matches them."""

    method: str
    authority: str  # host[:port] as the caller wrote it
    path: str  # without the query string
    query: str = ""
    scheme: str = "http"
    headers: Mapping[str, str] | None = None
    source_ip: str = ""

    def header(self, name: str) -> str | None:
        if name == ":method":
            return self.method
        if name == ":authority":
            return self.authority
        if name == ":scheme":
            return self.scheme
        if name == ":path":
            return self.path + ("?" + self.query if self.query else "")
        return None if self.headers is None else self.headers.get(name)

    def query_param(self, name: str) -> str | None:
        for key, value in parse_qsl(self.query, keep_blank_values=True):
            if key == name:
                return value
        return None

    def cookie(self, name: str) -> str | None:
        raw = self.header("cookie")
        if not raw:
            return None
        for part in raw.split(";"):
            key, _, value = part.strip().partition("=")
            if key == name:
                return value
        return None
