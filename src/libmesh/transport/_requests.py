"""A ``requests`` transport adapter that routes requests through the mesh.

``mesh.session()`` (or ``session.mount("http://", mesh.requests_adapter())``) gives a
``requests.Session`` whose requests the mesh routes, retries, times out and balances exactly as it
does for httpx, because the adapter *is* the sync httpx transport underneath: each
``PreparedRequest`` becomes an ``httpx.Request``, :class:`~libmesh.MeshTransport` handles it, and
the ``httpx.Response`` becomes a ``requests.Response``. No policy decision is made here, so the
two clients cannot drift apart.

What stays requests' own: the Session follows redirects, keeps cookies and applies auth and
hooks; ``response.raw`` is a ``urllib3.HTTPResponse`` over the httpx byte stream (never preloaded),
so ``stream=True``, ``iter_content``, ``raw.read`` and content decoding behave as with requests'
own adapter, and closing the response ends the mesh's call. What the mesh did is
``response.libmesh`` (a :class:`~libmesh.MeshInfo`, ``None`` for hosts the mesh does not know).

Errors are translated at this one boundary: the mesh's own become ``RequestsUpstream*`` errors,
which are both the libmesh error and the requests error a requests user already catches; httpx's
errors for hosts outside the mesh become the plain requests error requests would have raised.

requests is an optional dependency (``libmesh[requests]``): only this module imports it.
"""

from __future__ import annotations

import http.client
import io
import ssl
from collections.abc import Callable, Iterator
from http.cookiejar import CookieJar
from typing import Any, cast

import httpx
import requests
import urllib3
from requests.adapters import HTTPAdapter
from requests.cookies import extract_cookies_to_jar
from requests.structures import CaseInsensitiveDict
from requests.utils import get_encoding_from_headers

from .._exceptions import (
    UpstreamConnectError,
    UpstreamError,
    UpstreamReset,
    UpstreamTimeout,
)
from ._httpx import EngineSource, MeshInfo, MeshTransport

__all__ = [
    "MeshAdapter",
    "MeshResponse",
    "RequestsUpstreamConnectError",
    "RequestsUpstreamError",
    "RequestsUpstreamReset",
    "RequestsUpstreamTimeout",
]

_Timeout = float | tuple[float | None, float | None] | urllib3.Timeout | None

_CHUNK = 64 * 1024

# requests' own, so cookies are taken as requests takes them (typed here: its stubs leave it bare).
_extract_cookies: Callable[[CookieJar, requests.PreparedRequest, Any], None] = (
    extract_cookies_to_jar
)


# -- errors --------------------------------------------------------------------------------------


class RequestsUpstreamError(UpstreamError, requests.RequestException):
    """An :class:`~libmesh.UpstreamError` from the requests adapter, also a
    ``requests.RequestException``. ``request`` is the ``PreparedRequest``, as on every error a
    requests user catches; the ``httpx.Request`` the mesh sent is on ``__cause__``."""

    # httpx's errors and requests' both own ``request``, with types no value satisfies at once;
    # requests' wins because only requests users see these errors.
    request: requests.PreparedRequest  # type: ignore[assignment]

    def __init__(
        self,
        message: str,
        *,
        request: requests.PreparedRequest,
        response_flags: str,
        attempts: int,
    ) -> None:
        # httpx's constructor chain ends in OSError's, which never reaches requests': run
        # requests' (it sets ``request`` and ``response``), then what UpstreamError adds.
        requests.RequestException.__init__(self, message, request=request)
        self.response_flags = response_flags
        self.attempts = attempts


class RequestsUpstreamConnectError(
    RequestsUpstreamError, UpstreamConnectError, requests.ConnectionError
):
    """No endpoint of the service accepted a connection (flags UF, URX)."""


class RequestsUpstreamTimeout(RequestsUpstreamError, UpstreamTimeout, requests.ReadTimeout):
    """The route's timeout (or the last try's) passed before a response arrived (flag UT).

    A ``ReadTimeout``, not a ``ConnectTimeout``: requests users take the latter to mean "nothing
    was sent, retry freely", and by the time the route's timeout passes the request has usually
    reached the service (an attempt that cannot connect in time is a connection failure, UF)."""


class RequestsUpstreamReset(RequestsUpstreamError, UpstreamReset, requests.ConnectionError):
    """The connection broke before the response headers arrived (flags UC, UR)."""


def _requests_error(exc: httpx.HTTPError, request: requests.PreparedRequest) -> Exception:
    """The exception a requests user expects for ``exc``."""
    if isinstance(exc, UpstreamError):
        if isinstance(exc, UpstreamConnectError):
            mesh_error: type[RequestsUpstreamError] = RequestsUpstreamConnectError
        elif isinstance(exc, UpstreamTimeout):
            mesh_error = RequestsUpstreamTimeout
        elif isinstance(exc, UpstreamReset):
            mesh_error = RequestsUpstreamReset
        else:
            mesh_error = RequestsUpstreamError
        return mesh_error(
            str(exc), request=request, response_flags=exc.response_flags, attempts=exc.attempts
        )
    # Outside the mesh: what requests' own adapter raises for the same failure.
    if isinstance(exc, (httpx.ConnectTimeout, httpx.PoolTimeout)):  # nothing was sent
        return requests.ConnectTimeout(exc, request=request)
    if isinstance(exc, httpx.ReadTimeout):
        return requests.ReadTimeout(exc, request=request)
    if isinstance(exc, httpx.TimeoutException):
        return requests.Timeout(exc, request=request)
    if isinstance(exc, httpx.ProxyError):
        return requests.exceptions.ProxyError(exc, request=request)
    if isinstance(exc, httpx.UnsupportedProtocol):
        return requests.exceptions.InvalidSchema(exc, request=request)
    if _caused_by(exc, ssl.SSLError):
        return requests.exceptions.SSLError(exc, request=request)
    return requests.ConnectionError(exc, request=request)


def _caused_by(exc: BaseException, kind: type[BaseException]) -> bool:
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, kind):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


# -- requests to httpx ---------------------------------------------------------------------------


def _timeouts(timeout: _Timeout) -> dict[str, float | None]:
    """requests' ``timeout`` as httpx's ``timeout`` extension.

    requests' read timeout bounds every socket operation after connecting, sending included;
    waiting for a pooled connection counts as connecting (nothing has been sent)."""
    connect: float | None
    read: float | None
    if isinstance(timeout, tuple):
        try:
            connect, read = timeout
        except ValueError:
            raise ValueError(
                f"Invalid timeout {timeout}. Pass a (connect, read) timeout tuple, "
                "or a single float to set both timeouts to the same value."
            ) from None
    elif isinstance(timeout, urllib3.Timeout):
        connect = urllib3.Timeout.resolve_default_timeout(timeout.connect_timeout)
        read = urllib3.Timeout.resolve_default_timeout(timeout.read_timeout)
    else:
        connect = read = timeout
    return {"connect": connect, "read": read, "write": read, "pool": connect}


def _body_chunks(body: Any) -> Iterator[bytes]:
    """A streamed body (a file or an iterable) as bytes, which is all httpx sends."""
    if hasattr(body, "read"):
        while chunk := body.read(_CHUNK):
            yield chunk.encode("utf-8") if isinstance(chunk, str) else chunk
    else:
        for chunk in body:
            yield chunk.encode("utf-8") if isinstance(chunk, str) else chunk


def _httpx_request(request: requests.PreparedRequest, timeout: _Timeout) -> httpx.Request:
    body: Any = request.body
    content: bytes | Iterator[bytes] | None
    if body is None or isinstance(body, bytes):
        content = body
    elif isinstance(body, str):
        content = body.encode("utf-8")  # as urllib3 encodes a str body
    elif isinstance(body, (bytearray, memoryview)):
        content = bytes(body)
    else:
        # Not replayable, so the mesh sends it once and never retries it (as with httpx).
        content = _body_chunks(body)
    try:
        return httpx.Request(
            request.method or "GET",
            request.url or "",
            headers=list(request.headers.items()),
            content=content,
            extensions={"timeout": _timeouts(timeout)},
        )
    except httpx.InvalidURL as exc:
        raise requests.exceptions.InvalidURL(exc, request=request) from exc


# -- httpx to requests ---------------------------------------------------------------------------


class _ResponseBody(io.RawIOBase):
    """An httpx response's raw (still encoded) bytes as the file urllib3 reads. Closing it closes
    the httpx response, which is what ends the mesh's call and frees its circuit-breaker slot."""

    def __init__(self, response: httpx.Response) -> None:
        self._response = response
        self._chunks = self._raw(response)
        self._pending = memoryview(b"")

    @staticmethod
    def _raw(response: httpx.Response) -> Iterator[bytes]:
        if response.is_stream_consumed:
            # Local replies (direct responses, aborts, overflows) come read, and never encoded.
            yield response.content
        else:
            yield from response.iter_raw()

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        while not self._pending:
            try:
                chunk = next(self._chunks, None)
            except httpx.TimeoutException as exc:
                # urllib3 turns these into its ReadTimeoutError and ProtocolError, which requests
                # turns into the errors its users expect while reading a body.
                raise TimeoutError(f"reading the response body: {exc}") from exc
            except httpx.TransportError as exc:
                raise ConnectionError(f"reading the response body: {exc}") from exc
            if chunk is None:
                return 0
            self._pending = memoryview(chunk)
        target = memoryview(buffer).cast("B")
        size = min(len(target), len(self._pending))
        target[:size] = self._pending[:size]
        self._pending = self._pending[size:]
        return size

    def close(self) -> None:
        if not self.closed:
            try:
                self._response.close()
            finally:
                super().close()


class _Original:
    """The part of http.client's response that urllib3 and requests read besides the body:
    the headers as a message (requests takes cookies from them) and whether it is closed."""

    def __init__(self, msg: http.client.HTTPMessage, body: io.IOBase) -> None:
        self.msg = msg
        self._body = body

    def isclosed(self) -> bool:
        return self._body.closed

    def close(self) -> None:
        self._body.close()


_VERSIONS = {"HTTP/1.0": 10, "HTTP/1.1": 11, "HTTP/2": 20, "HTTP/3": 30}


def _urllib3_response(
    response: httpx.Response, request: requests.PreparedRequest
) -> urllib3.HTTPResponse:
    headers = urllib3.HTTPHeaderDict()
    msg = http.client.HTTPMessage()
    for name, value in response.headers.multi_items():
        headers.add(name, value)
        msg[name] = value
    body = io.BufferedReader(_ResponseBody(response), buffer_size=_CHUNK)
    version = response.extensions.get("http_version", b"HTTP/1.1").decode("ascii")
    return urllib3.HTTPResponse(
        body=body,
        headers=headers,
        status=response.status_code,
        version=_VERSIONS.get(version, 11),
        version_string=version,
        reason=response.reason_phrase,
        # As requests' own adapter: nothing is read until asked, and raw.read() gives the bytes
        # as sent unless decode_content=True (iter_content and .content always decode).
        preload_content=False,
        decode_content=False,
        # urllib3 only calls isclosed() and close() on it; requests only reads msg.
        original_response=cast(Any, _Original(msg, body)),
        msg=msg,
        request_method=request.method,
        request_url=request.url,
    )


class MeshResponse(requests.Response):
    """A ``requests.Response`` that says what the mesh did with the request."""

    __attrs__ = [*requests.Response.__attrs__, "libmesh"]

    def __init__(self) -> None:
        super().__init__()
        #: Flags, attempts, route, cluster and endpoint; ``None`` for hosts outside the mesh.
        self.libmesh: MeshInfo | None = None


# -- the adapter ---------------------------------------------------------------------------------


class MeshAdapter(HTTPAdapter):
    """A requests transport adapter that applies the mesh's routing and resilience policies.

    ``transport_options`` go to each underlying ``httpx.HTTPTransport`` (as for
    :class:`~libmesh.MeshTransport`), so TLS settings (``verify``, ``cert``) are the adapter's,
    not each request's. Retries are the mesh's: the adapter never retries on its own.
    """

    def __init__(self, source: EngineSource, **transport_options: Any) -> None:
        super().__init__()
        self._transport = MeshTransport(source, **transport_options)
        self._verify = transport_options.get("verify", True)
        self._cert = transport_options.get("cert")

    def send(
        self,
        request: requests.PreparedRequest,
        stream: bool = False,
        timeout: _Timeout = None,
        verify: bool | str = True,
        cert: Any = None,
        proxies: Any = None,
    ) -> MeshResponse:
        """Send ``request`` through the mesh. ``proxies`` (which a Session fills from
        ``HTTP_PROXY`` and the like) are not used: the mesh connects to each endpoint itself, as
        a sidecar would, and hosts outside the mesh are reached directly."""
        if request.url is not None and request.url.lower().startswith("https:"):
            self._check_tls(verify, cert)
        outgoing = _httpx_request(request, timeout)
        try:
            answer = self._transport.handle_request(outgoing)
        except httpx.TransportError as exc:
            raise _requests_error(exc, request) from exc
        response = self.build_response(request, _urllib3_response(answer, request))
        response.libmesh = answer.extensions.get("libmesh")
        if not stream:
            # What the Session would do next; done here so the call has ended when send returns,
            # whoever calls it.
            _ = response.content
        return response

    def _check_tls(self, verify: bool | str, cert: Any) -> None:
        # httpx fixes TLS settings per transport; ignoring a request's verify=False or client
        # certificate would silently change what it trusts or proves.
        if verify != self._verify or cert != self._cert:
            raise ValueError(
                f"this MeshAdapter was made with verify={self._verify!r}, cert={self._cert!r} "
                f"and cannot send a request with verify={verify!r}, cert={cert!r}: pass them "
                "when making it (mesh.requests_adapter(verify=..., cert=...))"
            )

    def build_response(
        self, req: requests.PreparedRequest, resp: urllib3.BaseHTTPResponse
    ) -> MeshResponse:
        """As ``HTTPAdapter.build_response``, into a :class:`MeshResponse`."""
        response = MeshResponse()
        response.status_code = resp.status
        response.headers = CaseInsensitiveDict(resp.headers)
        response.encoding = get_encoding_from_headers(response.headers)
        response.raw = resp
        response.reason = resp.reason or ""
        url: Any = req.url
        response.url = url.decode("utf-8") if isinstance(url, bytes) else url
        _extract_cookies(response.cookies, req, resp)
        response.request = req
        response.connection = self
        return response

    def close(self) -> None:
        """Close the mesh transport's connections (and requests' unused pool manager)."""
        try:
            self._transport.close()
        finally:
            super().close()
