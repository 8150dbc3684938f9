"""What the engine needs to know about a request, independent of the client library."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import parse_qsl

__all__ = ["RequestInfo", "RequestView"]


class RequestView:
    """A request as routing reads it. Transports subclass this to read their own request
    objects lazily; :class:`RequestInfo` holds the values outright.

    ``headers`` must look names up case-insensitively (as ``httpx.Headers`` does) and join
    repeated values with commas, as Envoy matches them.
    """

    __slots__ = ()

    @property
    def method(self) -> str:
        raise NotImplementedError

    @property
    def authority(self) -> str:
        """host[:port] as the caller wrote it."""
        raise NotImplementedError

    @property
    def path(self) -> str:
        """The path, without the query string."""
        raise NotImplementedError

    @property
    def query(self) -> str:
        raise NotImplementedError

    @property
    def scheme(self) -> str:
        raise NotImplementedError

    @property
    def headers(self) -> Mapping[str, str] | None:
        raise NotImplementedError

    @property
    def source_ip(self) -> str:
        return ""

    def header(self, name: str) -> str | None:
        if name == ":method":
            return self.method
        if name == ":authority":
            return self.authority
        if name == ":scheme":
            return self.scheme
        if name == ":path":
            return self.path + ("?" + self.query if self.query else "")
        headers = self.headers
        return None if headers is None else headers.get(name)

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
                # a quoted value means the text inside the quotes, as Envoy parses cookies
                if len(value) >= 2 and value[0] == value[-1] == '"':
                    return value[1:-1]
                return value
        return None


@dataclass(slots=True)
class RequestInfo(RequestView):
    """A request described by its values, for tests and for transports without a request
    object of their own."""

    method: str
    authority: str
    path: str
    query: str = ""
    scheme: str = "http"
    headers: Mapping[str, str] | None = None
    source_ip: str = ""
