"""httpx transports that route requests through the mesh.

``httpx.Client(transport=mesh.transport())`` and ``httpx.AsyncClient(transport=
mesh.async_transport())`` behave the same: the URL names a service (``http://reviews.shop.svc.
cluster.local:8080/…``, or a short name in the caller's namespace), the engine decides, and the
request goes to a real endpoint through a real httpx transport per endpoint (so connection pooling
and OpenTelemetry's httpx instrumentation work per attempt). The Host header stays the service's
name. Hosts the mesh does not know go straight through.

Both twins share everything but waiting and sending, which live in ``_send``/``_asend`` and
``_sleep``/``_asleep``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import logging
import ssl
import threading
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from typing import Any, NamedTuple, Protocol

import httpcore
import httpx

from .._exceptions import UpstreamConnectError, UpstreamError, UpstreamReset, UpstreamTimeout
from .._testing import asleep as _asleep
from .._testing import sleep as _sleep
from ..config._rules import is_number
from ..identity._tls import PeerError, TlsContexts, check_peer
from ..policy import (
    DELIVER,
    Attempt,
    Backoff,
    Call,
    ClusterState,
    Engine,
    Fail,
    Failure,
    Host,
    LocalReply,
    RequestView,
)
from ..policy._routing import NO_HEADERS, HeaderOps
from ..policy._upstream_tls import TlsKind, UpstreamTls
from ..telemetry import ClientCall, Telemetry
from ..telemetry._tracing import suppressed_instrumentation

__all__ = ["AsyncMeshTransport", "MeshInfo", "MeshTransport"]

logger = logging.getLogger("libmesh")


class EngineSource(Protocol):
    """Anything that holds the current engine and its telemetry (a :class:`~libmesh.Mesh`)."""

    @property
    def engine(self) -> Engine: ...

    telemetry: Telemetry


class MeshInfo(NamedTuple):
    """What the mesh did with a request, at ``response.extensions["libmesh"]``."""

    response_flags: str
    attempts: int
    route: str
    cluster: str
    upstream_host: str


# -- shared logic --------------------------------------------------------------------------------


class _RequestView(RequestView):
    """An httpx request as the engine reads it, computed only as far as routing looks."""

    __slots__ = ("_request",)

    def __init__(self, request: httpx.Request) -> None:
        self._request = request

    @property
    def method(self) -> str:
        return self._request.method

    @property
    def authority(self) -> str:
        return self._request.headers.get("host") or self._request.url.netloc.decode("ascii")

    @property
    def path(self) -> str:
        return self._request.url.path

    @property
    def query(self) -> str:
        return self._request.url.query.decode("ascii")

    @property
    def scheme(self) -> str:
        return self._request.url.scheme

    @property
    def headers(self) -> httpx.Headers:
        return self._request.headers


def _apply_header_ops(headers: httpx.Headers, ops: HeaderOps) -> None:
    for name in ops.remove:
        if name in headers:
            del headers[name]
    for name, value, append in ops.add:
        if append and name in headers:
            headers[name] = headers[name] + "," + value
        else:
            headers[name] = value


def _local_response(reply: LocalReply, request: httpx.Request) -> httpx.Response:
    headers = list(reply.headers)
    if reply.body and not any(k == "content-type" for k, _ in headers):
        headers.append(("content-type", "text/plain"))
    return httpx.Response(
        reply.status,
        headers=headers,
        content=reply.body,
        request=request,
        extensions={"libmesh": MeshInfo(reply.flags, 0, "", "", "")},
    )


def _is_replayable(request: httpx.Request) -> bool:
    return isinstance(request.stream, httpx.ByteStream)


def _earlier(first: float | None, second: float | None) -> float | None:
    """The shorter of two timeouts, ``None`` meaning none."""
    if first is None:
        return second
    return first if second is None or first < second else second


def _header(headers: httpx.Headers, name: bytes) -> str | None:
    """The first value of header ``name`` (lower-case). Reads httpx's header list directly:
    ``Headers.get`` builds lists and decodes every entry, several microseconds per lookup on
    a path that makes a handful of them per request."""
    entries = getattr(headers, "_list", None)
    if entries is None:  # pragma: no cover - another httpx layout: the public way
        value = headers.get(name.decode("latin-1"))
        return None if value is None else str(value)
    for _, key, value in entries:
        if key == name:
            return bytes(value).decode("latin-1")
    return None


def wire_headers(headers: httpx.Headers, pairs: Iterable[tuple[bytes, bytes]]) -> None:
    """Fill the empty ``headers`` with ``pairs`` (byte names and values, as parsed off the
    wire) exactly as ``httpx.Headers(pairs)`` would, without its per-entry type checks: a
    proxy makes two of these per request."""
    _fill(headers, [(name, name.lower(), value) for name, value in pairs])


def _fill(headers: httpx.Headers, entries: list[tuple[bytes, bytes, bytes]]) -> None:
    if hasattr(headers, "_list"):
        headers._list = entries
    else:  # pragma: no cover - another httpx layout
        headers.update(httpx.Headers([(name, value) for name, _, value in entries]))


def wire_request(
    method: str, url: httpx.URL, headers: list[tuple[bytes, bytes, bytes]], body: bytes
) -> httpx.Request:
    """``httpx.Request(method, url, headers=..., content=body)`` for a request read off the
    wire, at a third of its cost: httpx's own constructor normalizes every header and scans
    the list once for each header it might add (Host, Content-Length). ``headers`` are
    (name, name in lower case, value), as ``httpx.Headers`` keeps them."""
    has_host = has_length = False
    for _, lowered, _ in headers:
        if lowered == b"host":
            has_host = True
        elif lowered == b"content-length" or lowered == b"transfer-encoding":
            has_length = True
    entries = headers
    if not has_length and (body or method in ("POST", "PUT", "PATCH")):
        length = b"%d" % len(body)
        entries = [(b"Content-Length", b"content-length", length), *entries]
    if not has_host:
        entries = [(b"Host", b"host", url.netloc), *entries]
    request = httpx.Request(method, url, stream=httpx.ByteStream(body))
    _fill(request.headers, entries)
    request._content = body  # what read() keeps: the body is whole, a retry can send it again
    return request


def _set_headers(headers: httpx.Headers, pairs: list[tuple[str, str]]) -> None:
    """Set each header of ``pairs`` (lower-case names), replacing any of the same name, as
    ``headers[name] = value`` does but without its per-call scans."""
    entries = getattr(headers, "_list", None)
    if entries is None:  # pragma: no cover - another httpx layout: the public way
        for name, value in pairs:
            headers[name] = value
        return
    names = {name.encode("latin-1") for name, _ in pairs}
    for entry in entries:
        if entry[1] in names:
            entries[:] = [entry for entry in entries if entry[1] not in names]
            break
    for name, value in pairs:
        raw = name.encode("latin-1")
        entries.append((raw, raw, value.encode("latin-1")))


def _failure_of(exc: httpx.TransportError) -> Failure:
    if isinstance(exc, (httpx.ConnectError, httpx.ConnectTimeout)):
        return Failure.CONNECT_FAILURE
    if isinstance(exc, httpx.TimeoutException):
        return Failure.TIMEOUT
    if "REFUSED_STREAM" in str(exc):
        return Failure.REFUSED_STREAM
    return Failure.RESET


def _is_grpc(request: httpx.Request) -> bool:
    content_type = _header(request.headers, b"content-type")
    return content_type is not None and content_type.startswith("application/grpc")


def _grpc_status(call: Call, response: httpx.Response) -> int | None:
    """The gRPC status in the response headers, looked up only if a retry policy needs it."""
    if not call.wants_grpc_status:
        return None
    value = _header(response.headers, b"grpc-status")
    return int(value) if value is not None and is_number(value) else None


class _Base:
    """What the sync and async transports share: preparing attempts and finishing responses."""

    def __init__(self, source: EngineSource) -> None:
        self._source = source
        self._originated: dict[UpstreamTls, ssl.SSLContext] = {}

    def tls(self, tls: UpstreamTls | None) -> _Tls | None:
        """How to secure connections for ``tls`` (a cluster's choice for an endpoint)."""
        return _tls_for(tls, getattr(self._source, "tls", None), self._originate)

    def _originate(self, tls: UpstreamTls) -> ssl.SSLContext:
        context = self._originated.get(tls)
        if context is None:
            context = self._originated[tls] = _originate_context(tls)
        return context

    def _prepare(self, request: httpx.Request, attempt: Attempt) -> Any:
        """Shape the request for one attempt; returns what ``_restore`` needs.

        The URL keeps naming the service: the endpoint's transport connects to the endpoint
        whatever the URL says, so neither the Host header nor the URL need rewriting."""
        extensions = request.extensions
        saved: tuple[Any, Any, Any] = (None, None, extensions.get("timeout"))
        if attempt.path is not None or attempt.headers is not NO_HEADERS or attempt.authority:
            saved = (request.url, request.headers, saved[2])
            if attempt.path is not None:
                request.url = request.url.copy_with(raw_path=attempt.path.encode("ascii"))
            request.headers = httpx.Headers(request.headers)
            _apply_header_ops(request.headers, attempt.headers)
            if attempt.authority:
                request.headers["host"] = attempt.authority
        timeout = attempt.timeout
        connect = _earlier(attempt.cluster.settings.connect_timeout, timeout)
        # The caller's own timeouts (httpx's, or requests') still bound each operation: the
        # route's timeout can only make them shorter.
        caller = saved[2]
        if caller is None:  # (a proxy's requests: none of their own)
            extensions["timeout"] = {
                "connect": connect, "read": timeout, "write": timeout, "pool": timeout
            }  # fmt: skip
        else:
            extensions["timeout"] = {
                "connect": _earlier(connect, caller.get("connect")),
                "read": _earlier(timeout, caller.get("read")),
                "write": _earlier(timeout, caller.get("write")),
                "pool": _earlier(timeout, caller.get("pool")),
            }
        return saved

    def _observe(self, call: Call, request: httpx.Request) -> ClientCall:
        headers = request.headers
        grpc = _is_grpc(request)
        return self._source.telemetry.client_call(
            service=call.service,
            method=request.method,
            path=request.url.path,
            protocol="grpc" if grpc else "http",
            request_id=_header(headers, b"x-request-id"),
        )

    @staticmethod
    def _report(
        observed: ClientCall,
        call: Call,
        request: httpx.Request,
        *,
        status: int,
        flags: str,
        attempt: Attempt | None = None,
        response: httpx.Response | None = None,
        response_bytes: int = 0,
    ) -> None:
        """The call is over: one metric sample, the spans end, one access-log line."""
        headers = response.headers if response is not None else None
        grpc_status = (_header(headers, b"grpc-status") or "") if headers is not None else ""
        if not grpc_status and response is not None:  # an HTTP/2 answer's trailers, once read
            trailers = response.extensions.get("trailers") or ()
            grpc_status = next((v.decode() for k, v in trailers if k == b"grpc-status"), "")
        observed.finish(
            status=status,
            flags=flags or "-",
            grpc_status=grpc_status,
            request_bytes=len(request.content) if call.replayable else 0,
            response_bytes=response_bytes,
            upstream_host=attempt.host.key if attempt is not None else "",
            cluster=attempt.cluster.name if attempt is not None else "",
            route=call.decision.route_name,
            destination_labels=attempt.host.labels if attempt is not None else None,
            response_headers=headers,
        )

    @staticmethod
    def _abandon(call: Call, observed: ClientCall) -> None:
        """The caller went away mid-call: the call's slots are freed (an interrupted attempt
        has already given back its own) and the call is counted with Envoy's flag DC."""
        call.cancel()
        observed.finish(status=0, flags="DC")

    def _when_read(
        self,
        observed: ClientCall,
        call: Call,
        attempt: Attempt,
        request: httpx.Request,
        response: httpx.Response,
    ) -> Callable[[int], None]:
        """What happens once the caller has read (or closed) the response body."""

        def done(read: int) -> None:
            call.finish(attempt)
            self._report(
                observed, call, request, status=response.status_code,
                flags=",".join(call.flags), attempt=attempt, response=response,
                response_bytes=read,
            )  # fmt: skip

        return done

    @staticmethod
    def _restore(request: httpx.Request, saved: Any) -> None:
        url, headers, timeout = saved
        if url is not None:
            request.url = url
            request.headers = headers
        if timeout is None:
            request.extensions.pop("timeout", None)
        else:
            request.extensions["timeout"] = timeout

    @staticmethod
    def _finish_response(
        response: httpx.Response, call: Call, attempt: Attempt, request: httpx.Request
    ) -> httpx.Response:
        operations = call.response_headers(attempt)
        if operations is not NO_HEADERS:
            _apply_header_ops(response.headers, operations)
        if call.cookie is not None:
            response.headers.setdefault("set-cookie", call.cookie[1])
        response.extensions["libmesh"] = MeshInfo(
            ",".join(call.flags) or "-",
            call.attempts,
            call.decision.route_name,
            attempt.cluster.name,
            attempt.host.key,
        )
        return response

    @staticmethod
    def _error(step: Fail, call: Call, request: httpx.Request) -> Exception:
        flags = ",".join(call.flags)
        reason = call.failure_reason
        message = (
            f"{step.message}{f', transport failure reason: {reason}' if reason else ''} "
            f"({flags}; {call.attempts} attempt{'s' if call.attempts != 1 else ''})"
        )
        cls = {"connect": UpstreamConnectError, "timeout": UpstreamTimeout}.get(
            step.kind, UpstreamReset
        )
        return cls(message, request=request, response_flags=flags, attempts=call.attempts)

    @staticmethod
    def _copy(request: httpx.Request) -> httpx.Request:
        """An independent request for one of several racing attempts."""
        return httpx.Request(
            request.method,
            request.url,
            headers=request.headers,
            content=request.content,
            extensions=dict(request.extensions),
        )

    @staticmethod
    def _mirror_request(request: httpx.Request) -> httpx.Request:
        authority = request.headers.get("host", "")
        name, _, port = authority.partition(":")
        headers = httpx.Headers(request.headers)
        headers["host"] = f"{name}-shadow" + (f":{port}" if port else "")
        return httpx.Request(request.method, request.url, headers=headers, content=request.content)


# -- endpoint transports ------------------------------------------------------------------------


class _Tls(NamedTuple):
    """How connections to one endpoint are secured: the context (asked per connection, so a
    rotated SVID is used from the next connection on), and who the server must be."""

    context: Callable[[], ssl.SSLContext]
    sni: str | None
    check: Callable[[Any], object]  # raises PeerError when the server is not who it must be
    name_from_host: bool = False  # no SNI given: the request's host is the name (origination)


def _tls_for(
    tls: UpstreamTls | None, contexts: TlsContexts | None, originate: Callable[[UpstreamTls], Any]
) -> _Tls | None:
    if tls is None:
        return None
    if tls.kind is TlsKind.MESH:
        alpn = tls.alpn

        def mesh_context() -> ssl.SSLContext:
            if contexts is None:
                raise ssl.SSLError(
                    "the upstream requires the mesh's mTLS (ISTIO_MUTUAL) and this process has "
                    "no workload identity (Mesh.connect(token=...))"
                )
            return contexts.client(alpn)

        expected = tls.subject_alt_names
        return _Tls(
            mesh_context, tls.sni or None, lambda ssl_object: check_peer(ssl_object, expected)
        )
    context = originate(tls)
    return _Tls(
        lambda: context, tls.sni or None, lambda peer: _check_names(peer, tls), name_from_host=True
    )


def _originate_context(tls: UpstreamTls) -> ssl.SSLContext:
    """DestinationRule SIMPLE and MUTUAL: the named CA (else the system's), the named client
    certificate; the server's names are checked against ``subjectAltNames`` when given, else
    against the SNI — the DestinationRule's, else the host the request names (Istio's auto SNI
    and SAN validation)."""
    context = ssl.create_default_context(cafile=tls.ca_file)
    context.check_hostname = tls.verify and not tls.subject_alt_names
    if not tls.verify:
        context.verify_mode = ssl.CERT_NONE
    if tls.cert_file:
        context.load_cert_chain(tls.cert_file, tls.key_file)
    context.set_alpn_protocols(list(tls.alpn))
    return context


def _check_names(ssl_object: Any, tls: UpstreamTls) -> None:
    if not tls.verify or not tls.subject_alt_names:
        return
    presented = {value for _, value in ssl_object.getpeercert().get("subjectAltName", ())}
    if not presented & tls.subject_alt_names:
        raise PeerError(
            f"the server presented {', '.join(sorted(presented)) or 'no subject alternative names'}"
            f", none of the expected {', '.join(sorted(tls.subject_alt_names))}"
        )


def _server_name(tls: _Tls, host: str) -> str | None:
    """The SNI: the cluster's, else (TLS origination) the host the request names."""
    return tls.sni or (host if tls.name_from_host else None)


def _secured(stream: Any, tls: _Tls, host: str, timeout: float | None) -> Any:
    try:
        secure = stream.start_tls(
            tls.context(), server_hostname=_server_name(tls, host), timeout=timeout
        )
    except (ssl.SSLError, httpcore.ConnectError) as exc:
        stream.close()
        raise httpcore.ConnectError(f"TLS error: {_tls_reason(exc)}") from exc
    try:
        tls.check(secure.get_extra_info("ssl_object"))
    except ssl.SSLError as exc:
        secure.close()
        raise httpcore.ConnectError(f"TLS error: {_tls_reason(exc)}") from exc
    return secure


async def _asecured(stream: Any, tls: _Tls, host: str, timeout: float | None) -> Any:
    try:
        secure = await stream.start_tls(
            tls.context(), server_hostname=_server_name(tls, host), timeout=timeout
        )
    except (ssl.SSLError, httpcore.ConnectError) as exc:
        await stream.aclose()
        raise httpcore.ConnectError(f"TLS error: {_tls_reason(exc)}") from exc
    try:
        tls.check(secure.get_extra_info("ssl_object"))
    except ssl.SSLError as exc:
        await secure.aclose()
        raise httpcore.ConnectError(f"TLS error: {_tls_reason(exc)}") from exc
    return secure


def _tls_reason(exc: BaseException) -> str:
    while isinstance(exc, httpcore.ConnectError) and exc.__context__ is not None:
        exc = exc.__context__  # httpcore's wrapper: the SSL error is underneath
    if isinstance(exc, ssl.SSLError) and getattr(exc, "verify_message", None):
        return f"{exc.reason}: {exc.verify_message}"  # type: ignore[attr-defined]
    return str(exc.args[-1] if isinstance(exc, ssl.SSLError) and exc.args else exc)


def _no_tls_on_unix_sockets(path: str, tls: _Tls | None) -> None:
    if tls is not None:
        raise httpcore.ConnectError(
            f"TLS error: the cluster asks for TLS to unix:{path}, which libmesh does not "
            "secure (refused rather than sent in plaintext)"
        )


class _ToEndpoint(httpcore.NetworkBackend):
    """Connects to one endpoint, whatever host the request names (with TLS when the
    cluster's transport socket asks for it)."""

    def __init__(
        self, backend: httpcore.NetworkBackend, host: Host, tls: _Tls | None = None
    ) -> None:
        self._backend = backend
        self._address = host.address
        self._port = host.port
        self._tls = tls

    def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.NetworkStream:
        stream = self._backend.connect_tcp(
            self._address, self._port, timeout, local_address, socket_options
        )
        return stream if self._tls is None else _secured(stream, self._tls, host, timeout)

    def connect_unix_socket(
        self, path: str, timeout: float | None = None, socket_options: Iterable[Any] | None = None
    ) -> httpcore.NetworkStream:
        _no_tls_on_unix_sockets(path, self._tls)
        return self._backend.connect_unix_socket(path, timeout, socket_options)

    def sleep(self, seconds: float) -> None:
        self._backend.sleep(seconds)


class _AsyncToEndpoint(httpcore.AsyncNetworkBackend):
    def __init__(
        self, backend: httpcore.AsyncNetworkBackend, host: Host, tls: _Tls | None = None
    ) -> None:
        self._backend = backend
        self._address = host.address
        self._port = host.port
        self._tls = tls

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        stream = await self._backend.connect_tcp(
            self._address, self._port, timeout, local_address, socket_options
        )
        return stream if self._tls is None else await _asecured(stream, self._tls, host, timeout)

    async def connect_unix_socket(
        self, path: str, timeout: float | None = None, socket_options: Iterable[Any] | None = None
    ) -> httpcore.AsyncNetworkStream:
        _no_tls_on_unix_sockets(path, self._tls)
        return await self._backend.connect_unix_socket(path, timeout, socket_options)

    async def sleep(self, seconds: float) -> None:
        await self._backend.sleep(seconds)


class _EndpointTransport(httpx.HTTPTransport):
    """A real httpx transport whose connections all go to one endpoint. Requests keep the
    service's URL (and so its Host header); only the socket goes to the endpoint."""

    def __init__(self, host: Host, tls: _Tls | None = None, **options: Any) -> None:
        super().__init__(uds=host.uds, **options)
        pool = self._pool
        pool._network_backend = _ToEndpoint(pool._network_backend, host, tls)


class _AsyncEndpointTransport(httpx.AsyncHTTPTransport):
    def __init__(self, host: Host, tls: _Tls | None = None, **options: Any) -> None:
        super().__init__(uds=host.uds, **options)
        pool = self._pool
        pool._network_backend = _AsyncToEndpoint(pool._network_backend, host, tls)


# -- sync ----------------------------------------------------------------------------------------


class _FinishingStream(httpx.SyncByteStream):
    """The response body; when it is closed, the call ends (``done`` gets the bytes read)."""

    def __init__(self, stream: httpx.SyncByteStream, done: Callable[[int], None]) -> None:
        self._stream = stream
        self._done: Callable[[int], None] | None = done
        self._read = 0

    def __iter__(self) -> Iterator[bytes]:
        for chunk in self._stream:
            self._read += len(chunk)
            yield chunk

    def close(self) -> None:
        try:
            self._stream.close()
        finally:
            if self._done is not None:
                done, self._done = self._done, None
                done(self._read)


class MeshTransport(httpx.BaseTransport):
    """A sync httpx transport that applies the mesh's routing and resilience policies."""

    def __init__(self, source: EngineSource, **transport_options: Any) -> None:
        self._base = _Base(source)
        self._options = transport_options
        self._endpoints: dict[tuple[str, str, UpstreamTls | None], _EndpointTransport] = {}
        self._passthrough = httpx.HTTPTransport(**transport_options)
        self._mirrors: concurrent.futures.ThreadPoolExecutor | None = None
        self._race_pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._lock = threading.Lock()

    def _endpoint(self, cluster: ClusterState, host: Host) -> _EndpointTransport:
        tls = cluster.tls.for_endpoint(host.tls_match)
        key = (cluster.name, host.key, tls)
        transport = self._endpoints.get(key)
        if transport is None:
            with self._lock:
                transport = self._endpoints.get(key)
                if transport is None:
                    transport = self._endpoints[key] = _EndpointTransport(
                        host,
                        self._base.tls(tls),
                        **_endpoint_options(cluster, self._options),
                    )
        return transport

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        engine = self._base._source.engine
        started = engine.start(request.url.host, request.url.port, _RequestView(request))
        if started is None:
            return self._passthrough.handle_request(request)
        if isinstance(started, LocalReply):
            return _local_response(started, request)
        call = started
        call.replayable = _is_replayable(request)
        observed = self._base._observe(call, request)
        try:
            return self._drive(call, request, observed)
        except BaseException as exc:
            if not isinstance(exc, UpstreamError):  # the mesh's own failures are reported
                self._base._abandon(call, observed)
            raise

    def _drive(self, call: Call, request: httpx.Request, observed: ClientCall) -> httpx.Response:
        base = self._base
        if call.delay:
            _sleep(call.delay)
        if call.abort is not None:
            base._report(observed, call, request, status=call.abort.status, flags=call.abort.flags)
            return _local_response(call.abort, request)
        if call.replayable and call.decision.mirrors:
            self._send_mirrors(call, request)
        while True:
            step: Any = call.next()
            while isinstance(step, Attempt):
                if call.decision.hedge_on_per_try_timeout and call.hedging:
                    step = self._race(call, step, request, observed)
                else:
                    step = self._try(call, step, request, observed)
                if isinstance(step, httpx.Response):
                    return step
            if isinstance(step, Backoff):
                _sleep(step.seconds)
                continue
            if isinstance(step, LocalReply):
                base._report(observed, call, request, status=step.status, flags=step.flags)
                return _local_response(step, request)
            if isinstance(step, Fail):
                base._report(observed, call, request, status=0, flags=",".join(call.flags))
                raise base._error(step, call, request)
            raise AssertionError(step)  # pragma: no cover

    def _try(
        self, call: Call, attempt: Attempt, request: httpx.Request, observed: ClientCall
    ) -> Any:
        transport = self._endpoint(attempt.cluster, attempt.host)
        saved = self._base._prepare(request, attempt)
        _set_headers(request.headers, observed.attempt(attempt.host.key, attempt.cluster.name))
        try:
            with suppressed_instrumentation():
                response = transport.handle_request(request)
        except httpx.TransportError as exc:
            failure = _failure_of(exc)
            call.failure_reason = str(exc)
            observed.attempt_done(error=failure.name)
            return call.failed(attempt, failure)
        except BaseException:  # cancelled, interrupted: the caller is gone
            call.cancel(attempt)
            raise
        finally:
            self._base._restore(request, saved)
        if observed.traced:
            grpc_status = _header(response.headers, b"grpc-status") or ""
            observed.attempt_done(response.status_code, grpc_status)
        return self._settle(call, attempt, response, request, observed)

    def _race(
        self, call: Call, first: Attempt, request: httpx.Request, observed: ClientCall
    ) -> Any:
        """Hedging: each time an attempt outlasts the per-try timeout, another one races it;
        the first final response wins, the others are abandoned."""
        pool = self._racers()
        racing: dict[concurrent.futures.Future[Any], Attempt] = {}

        def launch(attempt: Attempt) -> None:
            copy = self._base._copy(request)
            racing[pool.submit(self._send_one, attempt, copy)] = attempt

        launch(first)
        timer = call.hedge_delay
        while racing:
            done, _ = concurrent.futures.wait(
                racing, timeout=timer, return_when=concurrent.futures.FIRST_COMPLETED
            )
            if not done:
                hedge = call.hedge()
                if hedge is None:
                    timer = None
                else:
                    launch(hedge)
                continue
            for future in done:
                attempt = racing.pop(future)
                outcome = future.result()
                if _settles(call, attempt, outcome, bool(racing)):
                    for loser_future, loser in racing.items():
                        loser_future.add_done_callback(_abandon(call, loser))
                    return self._settle(call, attempt, outcome, request, observed)
                if isinstance(outcome, httpx.Response):
                    _discard(outcome)
        raise AssertionError("a race ends with a settled attempt")  # pragma: no cover

    def _send_one(self, attempt: Attempt, request: httpx.Request) -> httpx.Response | Failure:
        transport = self._endpoint(attempt.cluster, attempt.host)
        self._base._prepare(request, attempt)
        try:
            return transport.handle_request(request)
        except httpx.TransportError as exc:
            return _failure_of(exc)

    def _settle(
        self,
        call: Call,
        attempt: Attempt,
        outcome: httpx.Response | Failure,
        request: httpx.Request,
        observed: ClientCall,
    ) -> Any:
        if not isinstance(outcome, httpx.Response):
            return call.failed(attempt, outcome)
        step = call.responded(
            attempt, outcome.status_code, outcome.headers, _grpc_status(call, outcome)
        )
        if step is DELIVER:
            outcome.stream = _FinishingStream(
                outcome.stream,  # type: ignore[arg-type]
                self._base._when_read(observed, call, attempt, request, outcome),
            )
            return self._base._finish_response(outcome, call, attempt, request)
        _discard(outcome)
        return step

    def _racers(self) -> concurrent.futures.ThreadPoolExecutor:
        if self._race_pool is None:
            with self._lock:
                if self._race_pool is None:
                    self._race_pool = concurrent.futures.ThreadPoolExecutor(
                        max_workers=32, thread_name_prefix="libmesh-hedge"
                    )
        return self._race_pool

    def _send_mirrors(self, call: Call, request: httpx.Request) -> None:
        targets = call.mirrors()
        if not targets:
            return
        if self._mirrors is None:
            with self._lock:
                if self._mirrors is None:
                    self._mirrors = concurrent.futures.ThreadPoolExecutor(
                        max_workers=4, thread_name_prefix="libmesh-mirror"
                    )
        for cluster, host in targets:
            shadow = self._base._mirror_request(request)
            self._mirrors.submit(self._mirror, self._endpoint(cluster, host), shadow)

    @staticmethod
    def _mirror(transport: httpx.BaseTransport, request: httpx.Request) -> None:
        try:
            response = transport.handle_request(request)
            response.read()
            response.close()
        except Exception:  # a mirror must never affect the real request
            logger.debug("mirror request to %s failed", request.url, exc_info=True)

    def close(self) -> None:
        with self._lock:
            endpoints, self._endpoints = self._endpoints, {}
            pools = [self._mirrors, self._race_pool]
            self._mirrors = self._race_pool = None
        for transport in endpoints.values():
            transport.close()
        self._passthrough.close()
        for pool in pools:
            if pool is not None:
                pool.shutdown(wait=False)


def _settles(
    call: Call, attempt: Attempt, outcome: httpx.Response | Failure, others_racing: bool
) -> bool:
    """Whether a racer's outcome ends the race; if not, the call counts it as lost."""
    if isinstance(outcome, httpx.Response):
        status = outcome.status_code
        return call.race_settles(
            attempt, others_racing, status=status, headers=outcome.headers,
            grpc_status=_grpc_status(call, outcome),
        )  # fmt: skip
    return call.race_settles(attempt, others_racing, failure=outcome)


def _discard(response: httpx.Response) -> None:
    with contextlib.suppress(httpx.HTTPError):
        response.read()
    response.close()


def _abandon(call: Call, attempt: Attempt) -> Callable[[concurrent.futures.Future[Any]], None]:
    """When a losing racer finally returns, drop its response and free its slot."""

    def done(future: concurrent.futures.Future[Any]) -> None:
        outcome = future.result()
        if isinstance(outcome, httpx.Response):
            _discard(outcome)
        call.abandon(attempt)

    return done


def _endpoint_options(cluster: ClusterState, options: dict[str, Any]) -> dict[str, Any]:
    settings = cluster.settings
    limits = cluster.breaker.limits
    per_host = limits.per_host_max_connections or limits.max_connections
    keepalive = settings.idle_timeout if settings.idle_timeout is not None else 5.0
    merged = {k: v for k, v in options.items() if k not in ("limits", "uds")}
    merged["limits"] = httpx.Limits(
        max_connections=min(per_host, 10_000),
        max_keepalive_connections=min(per_host, 100),
        keepalive_expiry=keepalive,
    )
    return merged


# -- async ---------------------------------------------------------------------------------------


class _AsyncFinishingStream(httpx.AsyncByteStream):
    """``stream``, counting what is read; ``done(bytes read)`` once it is closed. Its own
    iterator (no async generator: asyncio tracks each one it starts, a cost per request)."""

    def __init__(self, stream: httpx.AsyncByteStream, done: Callable[[int], None]) -> None:
        self._stream = stream
        self._chunks: AsyncIterator[bytes] | None = None
        self._done: Callable[[int], None] | None = done
        self._read = 0

    def __aiter__(self) -> AsyncIterator[bytes]:
        self._chunks = self._stream.__aiter__()
        return self

    async def __anext__(self) -> bytes:
        assert self._chunks is not None
        chunk = await self._chunks.__anext__()
        self._read += len(chunk)
        return chunk

    async def aclose(self) -> None:
        try:
            await self._stream.aclose()
        finally:
            if self._done is not None:
                done, self._done = self._done, None
                done(self._read)


class AsyncMeshTransport(httpx.AsyncBaseTransport):
    """The asyncio twin of :class:`MeshTransport`."""

    def __init__(
        self, source: EngineSource, *, connection_pool: str = "httpx", **transport_options: Any
    ) -> None:
        """``connection_pool``: ``"httpx"`` (httpcore's, with ``transport_options`` for each
        ``httpx.AsyncHTTPTransport``), or ``"libmesh"``: a lean HTTP/1.1 pool per endpoint
        (:mod:`libmesh.transport._http1`, needs httptools), what libmesh-proxy uses."""
        if connection_pool not in ("httpx", "libmesh"):
            raise ValueError(f"connection_pool is 'httpx' or 'libmesh', not {connection_pool!r}")
        self._base = _Base(source)
        self._options = transport_options
        self._lean = connection_pool == "libmesh"
        self._endpoints: dict[
            tuple[str, str, UpstreamTls | None, bool], httpx.AsyncBaseTransport
        ] = {}
        self._passthrough = httpx.AsyncHTTPTransport(**transport_options)
        self._tasks: set[asyncio.Task[None]] = set()

    def _endpoint(
        self, cluster: ClusterState, host: Host, request: httpx.Request
    ) -> httpx.AsyncBaseTransport:
        http2 = self._http2(cluster, request)
        tls = cluster.tls.for_endpoint(host.tls_match)
        key = (cluster.name, host.key, tls, http2)
        transport = self._endpoints.get(key)
        if transport is None:
            if self._lean:
                from ._http1 import Http1Endpoint
                from ._http2 import Http2Endpoint

                idle = cluster.settings.idle_timeout
                if http2 and tls is not None:
                    tls = dataclasses.replace(tls, alpn=("h2",))
                transport = (Http2Endpoint if http2 else Http1Endpoint)(
                    host.address,
                    host.port,
                    uds=host.uds,
                    tls=self._base.tls(tls),
                    keepalive_expiry=idle if idle is not None else 5.0,
                )
            else:
                transport = _AsyncEndpointTransport(
                    host, self._base.tls(tls), **_endpoint_options(cluster, self._options)
                )
            self._endpoints[key] = transport
        return transport

    def _http2(self, cluster: ClusterState, request: httpx.Request) -> bool:
        """Whether the lean pool speaks HTTP/2 to the endpoint: the cluster says so (a gRPC or
        HTTP/2 port, ``h2UpgradePolicy``), or the request is gRPC, which exists only there."""
        return self._lean and (cluster.settings.http2 or _is_grpc(request))

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        engine = self._base._source.engine
        started = engine.start(request.url.host, request.url.port, _RequestView(request))
        if started is None:
            return await self._passthrough.handle_async_request(request)
        if isinstance(started, LocalReply):
            return _local_response(started, request)
        call = started
        call.replayable = _is_replayable(request)
        observed = self._base._observe(call, request)
        try:
            return await self._drive(call, request, observed)
        except BaseException as exc:
            if not isinstance(exc, UpstreamError):  # the mesh's own failures are reported
                self._base._abandon(call, observed)
            raise

    async def _drive(
        self, call: Call, request: httpx.Request, observed: ClientCall
    ) -> httpx.Response:
        base = self._base
        if call.delay:
            await _asleep(call.delay)
        if call.abort is not None:
            base._report(observed, call, request, status=call.abort.status, flags=call.abort.flags)
            return _local_response(call.abort, request)
        if call.replayable and call.decision.mirrors:
            self._send_mirrors(call, request)
        while True:
            step: Any = call.next()
            while isinstance(step, Attempt):
                if call.decision.hedge_on_per_try_timeout and call.hedging:
                    step = await self._race(call, step, request, observed)
                else:
                    step = await self._try(call, step, request, observed)
                if isinstance(step, httpx.Response):
                    return step
            if isinstance(step, Backoff):
                await _asleep(step.seconds)
                continue
            if isinstance(step, LocalReply):
                base._report(observed, call, request, status=step.status, flags=step.flags)
                return _local_response(step, request)
            if isinstance(step, Fail):
                base._report(observed, call, request, status=0, flags=",".join(call.flags))
                raise base._error(step, call, request)
            raise AssertionError(step)  # pragma: no cover

    async def _try(
        self, call: Call, attempt: Attempt, request: httpx.Request, observed: ClientCall
    ) -> Any:
        transport = self._endpoint(attempt.cluster, attempt.host, request)
        saved = self._base._prepare(request, attempt)
        _set_headers(request.headers, observed.attempt(attempt.host.key, attempt.cluster.name))
        try:
            with suppressed_instrumentation():
                response = await transport.handle_async_request(request)
        except httpx.TransportError as exc:
            failure = _failure_of(exc)
            call.failure_reason = str(exc)
            observed.attempt_done(error=failure.name)
            return call.failed(attempt, failure)
        except BaseException:  # cancelled, interrupted: the caller is gone
            call.cancel(attempt)
            raise
        finally:
            self._base._restore(request, saved)
        if observed.traced:
            grpc_status = _header(response.headers, b"grpc-status") or ""
            observed.attempt_done(response.status_code, grpc_status)
        return await self._settle(call, attempt, response, request, observed)

    async def _race(
        self, call: Call, first: Attempt, request: httpx.Request, observed: ClientCall
    ) -> Any:
        """Hedging, as in the sync twin; losing attempts are cancelled."""
        racing: dict[asyncio.Task[Any], Attempt] = {}

        def launch(attempt: Attempt) -> None:
            copy = self._base._copy(request)
            racing[asyncio.ensure_future(self._send_one(attempt, copy))] = attempt

        launch(first)
        timer = call.hedge_delay
        try:
            while racing:
                done, _ = await asyncio.wait(
                    racing, timeout=timer, return_when=asyncio.FIRST_COMPLETED
                )
                if not done:
                    hedge = call.hedge()
                    if hedge is None:
                        timer = None
                    else:
                        launch(hedge)
                    continue
                for task in done:
                    attempt = racing.pop(task)
                    outcome = task.result()
                    if _settles(call, attempt, outcome, bool(racing)):
                        return await self._settle(call, attempt, outcome, request, observed)
                    if isinstance(outcome, httpx.Response):
                        await _adiscard(outcome)
            raise AssertionError("a race ends with a settled attempt")  # pragma: no cover
        finally:
            for task, loser in racing.items():
                task.cancel()
                call.abandon(loser)

    async def _send_one(self, attempt: Attempt, request: httpx.Request) -> httpx.Response | Failure:
        transport = self._endpoint(attempt.cluster, attempt.host, request)
        self._base._prepare(request, attempt)
        try:
            return await transport.handle_async_request(request)
        except httpx.TransportError as exc:
            return _failure_of(exc)

    async def _settle(
        self,
        call: Call,
        attempt: Attempt,
        outcome: httpx.Response | Failure,
        request: httpx.Request,
        observed: ClientCall,
    ) -> Any:
        if not isinstance(outcome, httpx.Response):
            return call.failed(attempt, outcome)
        step = call.responded(
            attempt, outcome.status_code, outcome.headers, _grpc_status(call, outcome)
        )
        if step is DELIVER:
            outcome.stream = _AsyncFinishingStream(
                outcome.stream,  # type: ignore[arg-type]
                self._base._when_read(observed, call, attempt, request, outcome),
            )
            return self._base._finish_response(outcome, call, attempt, request)
        await _adiscard(outcome)
        return step

    def _send_mirrors(self, call: Call, request: httpx.Request) -> None:
        for cluster, host in call.mirrors():
            shadow = self._base._mirror_request(request)
            endpoint = self._endpoint(cluster, host, shadow)
            task = asyncio.ensure_future(self._mirror(endpoint, shadow))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    @staticmethod
    async def _mirror(transport: httpx.AsyncBaseTransport, request: httpx.Request) -> None:
        try:
            response = await transport.handle_async_request(request)
            await response.aread()
            await response.aclose()
        except Exception:  # a mirror must never affect the real request
            logger.debug("mirror request to %s failed", request.url, exc_info=True)

    async def aclose(self) -> None:
        endpoints, self._endpoints = self._endpoints, {}
        for transport in endpoints.values():
            await transport.aclose()
        await self._passthrough.aclose()
        for task in list(self._tasks):
            task.cancel()


async def _adiscard(response: httpx.Response) -> None:
    with contextlib.suppress(httpx.HTTPError):
        await response.aread()
    await response.aclose()
