"""grpcio client interceptors that route calls through the mesh, and channels for grpcio's own
xDS client.

``mesh.grpc_channel("reviews:8080")`` and ``mesh.grpc_aio_channel(...)`` behave the same: a call
is an HTTP/2 ``POST /<service>/<method>`` to the channel's target, with its metadata as headers,
so the engine routes it as Envoy would (VirtualService matches on the method's path and on
metadata, subsets, weights). Each endpoint the engine picks gets one real grpcio channel, cached
per interceptor and closed with it; the interceptor sends each attempt there itself, and goes to
``continuation`` only for targets the mesh does not know (they pass through untouched).

How the engine's steps map onto a call:

- ``Attempt``: one call on the endpoint's channel. Its deadline is the attempt's timeout (the
  per-try timeout, else what is left of the route's), never later than the caller's own
  ``timeout``. The outcome goes back to the engine: a status from the server is a response
  (``call.responded`` with the status Envoy's outlier detection would see for it), and a call
  that never reached the server is a failure (``call.failed``):

  =================================  ==========================================================
  DEADLINE_EXCEEDED on our deadline  ``Failure.TIMEOUT``
  UNAVAILABLE, channel not READY     ``Failure.CONNECT_FAILURE`` when the channel is in
                                     TRANSIENT_FAILURE (no connection could be made: grpcio
                                     fails calls at once in that state), else ``Failure.RESET``
                                     (the connection the call used went away)
  anything else                      the server's own status
  =================================  ==========================================================

  The channel's connectivity state, read right after the failure, tells the two UNAVAILABLEs
  apart: a status the server sent arrives on a READY connection, while grpcio's own "failed to
  connect to all addresses" comes from a channel that has none. The text is only a fallback,
  for a channel whose state cannot be read: alone, it would take a server that relays another
  service's connection error for a dead endpoint — and a tie-breaker for a channel already in
  TRANSIENT_FAILURE again after the call's own connection was cut ("Cancelling all calls",
  "Socket closed", …: a reset).
- ``Backoff``: sleep (instant under :func:`libmesh.set_testing`), then the next step.
- ``LocalReply`` / ``Fail``: the mesh ends the call itself, with a :class:`MeshRpcError` whose
  code is the fault's gRPC status, or the HTTP status mapped as gRPC maps it (404 →
  UNIMPLEMENTED, 503 → UNAVAILABLE, …), DEADLINE_EXCEEDED for timeouts, UNAVAILABLE for
  connection failures. Its details and its trailing metadata (``x-libmesh-response-flags``) carry
  Envoy's response flags.

Unary-unary calls get the whole policy, retries included (a route that hedges gets plain
per-try retries: attempts are not raced). Streaming calls get routing, endpoint choice, circuit
breaking and faults, as one attempt finished when the stream ends: a request stream cannot be
replayed, so there are no retries, and no per-try timeout cuts a long stream. The sync
interceptor runs a unary call's attempts before it returns, so ``future()`` on a mesh-routed
unary call returns a finished future. Mirrors, response header rules and ``authority``
rewrites are not applied to gRPC calls.

grpcio gives an interceptor no serializers: they live in the continuation grpcio builds (a
closure in ``grpc._interceptor``, a ``functools.partial`` in ``grpc.aio``), where
:func:`_codec` reads them. Interceptors after the mesh's in a chain are skipped for the calls it
routes, so it goes last (:meth:`MeshClientInterceptor.intercept` puts it next to the channel);
``grpc.aio`` needs one interceptor object per kind of call
(:meth:`AsyncMeshClientInterceptor.interceptors`).
"""

from __future__ import annotations

import asyncio
import base64
import functools
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING, Any

import grpc
import grpc.aio

from .._exceptions import ConfigError, MeshError
from .._testing import asleep as _asleep
from .._testing import sleep as _sleep
from ..identity._spiffe import SpiffeId, SpiffeIdError
from ..identity._tls import _pem
from ..policy import (
    DELIVER,
    Attempt,
    Backoff,
    Call,
    Engine,
    Fail,
    Failure,
    Host,
    LocalReply,
    RequestInfo,
)
from ..policy._routing import HeaderOps
from ..policy._upstream_tls import TlsKind, UpstreamTls
from ..telemetry import ClientCall
from ..telemetry._tracing import suppressed_instrumentation
from ._httpx import EngineSource

__all__ = [
    "RESPONSE_FLAGS_KEY",
    "AsyncMeshClientInterceptor",
    "MeshClientInterceptor",
    "MeshRpcError",
    "xds_aio_channel",
    "xds_bootstrap",
    "xds_channel",
]

logger = logging.getLogger("libmesh")

RESPONSE_FLAGS_KEY = "x-libmesh-response-flags"

if TYPE_CHECKING:
    _Future = grpc.Future[Any]
else:
    _Future = grpc.Future

Metadata = tuple[tuple[str, str | bytes], ...]
Codec = tuple[Any, Any]  # (request serializer, response deserializer)

_StatusCode = grpc.StatusCode
_CODES = {code.value[0]: code for code in _StatusCode}
# gRPC's table for a response without grpc-status (doc/http-grpc-status-mapping.md).
_HTTP_TO_GRPC = {
    400: _StatusCode.INTERNAL,
    401: _StatusCode.UNAUTHENTICATED,
    403: _StatusCode.PERMISSION_DENIED,
    404: _StatusCode.UNIMPLEMENTED,
    429: _StatusCode.UNAVAILABLE,
    502: _StatusCode.UNAVAILABLE,
    503: _StatusCode.UNAVAILABLE,
    504: _StatusCode.UNAVAILABLE,
}
_FAIL_CODES = {"timeout": _StatusCode.DEADLINE_EXCEEDED}
_CLOCK_SLACK = 0.001  # grpcio's deadline clock and ours may disagree by this much


# -- what callers get ----------------------------------------------------------------------------


class MeshRpcError(MeshError, grpc.aio.AioRpcError, grpc.Call, _Future):  # type: ignore[misc]
    """A gRPC call the mesh ended itself: no route, no healthy upstream, overflow, an injected
    fault, a timeout, or connection failures.

    It is caught as grpcio's own errors are (``grpc.RpcError``, ``grpc.aio.AioRpcError``) and,
    like grpcio's failed sync calls, it is also the call's ``grpc.Call`` and ``grpc.Future`` (and
    a response stream that raises it). ``response_flags`` holds Envoy's response flags
    (``UF,URX``), also in the trailing metadata as ``x-libmesh-response-flags`` and in
    ``details()``.
    """

    def __init__(
        self,
        code: grpc.StatusCode,
        details: str,
        *,
        response_flags: str,
        attempts: int = 0,
        aio: bool = False,
    ) -> None:
        trailing = ((RESPONSE_FLAGS_KEY, response_flags),) if response_flags else ()
        super().__init__(
            code,
            grpc.aio.Metadata() if aio else (),  # type: ignore[arg-type]
            grpc.aio.Metadata(*trailing) if aio else trailing,  # type: ignore[arg-type]
            details,
            f"{code.name}: {details}",
        )
        self.response_flags = response_flags
        self.attempts = attempts

    def __reduce__(self) -> tuple[Any, ...]:
        aio = isinstance(self.trailing_metadata(), grpc.aio.Metadata)
        rebuild = functools.partial(
            MeshRpcError, response_flags=self.response_flags, attempts=self.attempts, aio=aio
        )
        return rebuild, (self.code(), self.details())

    # grpc.Call: a finished call
    def is_active(self) -> bool:
        return False

    def time_remaining(self) -> float:
        return 0.0

    def cancel(self) -> bool:
        return False

    def add_callback(self, callback: Callable[[], None]) -> bool:
        return False

    # grpc.Future: a future that failed
    def cancelled(self) -> bool:
        return False

    def running(self) -> bool:
        return False

    def done(self) -> bool:
        return True

    def result(self, timeout: float | None = None) -> Any:
        raise self

    def exception(self, timeout: float | None = None) -> Exception | None:
        return self

    def traceback(self, timeout: float | None = None) -> TracebackType | None:
        return self.__traceback__

    def add_done_callback(self, fn: Callable[[Any], None]) -> None:
        fn(self)

    # a failed response stream, for unary-stream and stream-stream calls
    def __iter__(self) -> MeshRpcError:
        return self

    def __next__(self) -> Any:
        raise self


class _UnaryOutcome(grpc.Call, _Future):
    """A finished sync unary call: the response, and grpcio's call for everything else."""

    def __init__(self, response: Any, call: grpc.Call) -> None:
        self._response = response
        self._call = call

    def initial_metadata(self) -> Any:
        return self._call.initial_metadata()

    def trailing_metadata(self) -> Any:
        return self._call.trailing_metadata()

    def code(self) -> grpc.StatusCode:
        return self._call.code()

    def details(self) -> str:
        return self._call.details()

    def is_active(self) -> bool:
        return False

    def time_remaining(self) -> float:
        return self._call.time_remaining()

    def cancel(self) -> bool:
        return False

    def add_callback(self, callback: Callable[[], None]) -> bool:
        return self._call.add_callback(callback)

    def cancelled(self) -> bool:
        return False

    def running(self) -> bool:
        return False

    def done(self) -> bool:
        return True

    def result(self, timeout: float | None = None) -> Any:
        return self._response

    def exception(self, timeout: float | None = None) -> Exception | None:
        return None

    def traceback(self, timeout: float | None = None) -> TracebackType | None:
        return None

    def add_done_callback(self, fn: Callable[[Any], None]) -> None:
        fn(self)


# -- shared logic --------------------------------------------------------------------------------


def _split_target(name: str) -> tuple[str, int | None]:
    if name.startswith("["):
        host, _, rest = name[1:].partition("]")
        port = rest.removeprefix(":")
    else:
        host, colon, port = name.rpartition(":")
        if not colon:
            host, port = name, ""
    return host, int(port) if port.isdigit() else None


def _text(value: str | bytes) -> str:
    return value if isinstance(value, str) else value.decode("ascii", "replace")


def _headers(metadata: Iterable[tuple[str, str | bytes]] | None) -> dict[str, str]:
    """The call as an HTTP/2 request's headers: what VirtualService header matches read."""
    headers = {"content-type": "application/grpc", "te": "trailers"}
    for key, value in metadata or ():
        # binary metadata travels base64-encoded, as a proxy sees it
        text = base64.b64encode(value).decode("ascii") if isinstance(value, bytes) else value
        name = key.lower()
        headers[name] = f"{headers[name]},{text}" if name in headers else text
    return headers


def _apply_header_ops(
    metadata: Iterable[tuple[str, str | bytes]] | None, ops: HeaderOps
) -> list[tuple[str, str | bytes]]:
    result = [(k, v) for k, v in metadata or () if k not in ops.remove]
    for name, value, append in ops.add:
        if not append:
            result = [(k, v) for k, v in result if k != name]
        result.append((name, value))
    return result


def _response_headers(*metadata: Any) -> dict[str, str]:
    headers: dict[str, str] = {}
    for part in metadata:
        for key, value in part or ():
            if isinstance(value, str):
                headers[key] = value
    return headers


def _address(host: Host) -> str:
    if host.uds is not None:
        return f"unix:{host.uds}"
    return f"[{host.address}]:{host.port}" if ":" in host.address else f"{host.address}:{host.port}"


def _codec_sync(continuation: Any) -> Codec:
    """The serializers grpcio's intercepted channel keeps in the continuation's closure: its
    ``self`` is the multi-callable, whose thunk closes over them (so it holds however many
    interceptors are stacked)."""
    multicallable = _closure_value(continuation, "self")
    thunk = multicallable._thunk
    return _closure_value(thunk, "request_serializer"), _closure_value(
        thunk, "response_deserializer"
    )


def _codec_aio(continuation: Any) -> Codec:
    """``functools.partial(_run_interceptor, interceptors, method, serializer, deserializer)``."""
    if not isinstance(continuation, functools.partial) or len(continuation.args) < 4:
        raise TypeError(f"unexpected continuation {continuation!r}")
    if continuation.args[0]:
        logger.debug("libmesh: interceptors after the mesh's are skipped for routed calls")
    return continuation.args[2], continuation.args[3]


def _closure_value(function: Any, name: str) -> Any:
    code = function.__code__
    return function.__closure__[code.co_freevars.index(name)].cell_contents


def _codec(continuation: Any, aio: bool) -> Codec | MeshRpcError:
    try:
        return _codec_aio(continuation) if aio else _codec_sync(continuation)
    except (AttributeError, IndexError, TypeError, ValueError) as exc:
        return MeshRpcError(
            _StatusCode.INTERNAL,
            f"libmesh cannot find the serializers of this call in grpcio {grpc.__version__}'s "
            f"interceptor continuation ({exc}); this grpcio version is not supported by "
            "libmesh's interceptors: use an httpx transport, or xds_channel()",
            response_flags="",
            aio=aio,
        )


def _connectivity(channel: Any) -> grpc.ChannelConnectivity | None:
    """A channel's state, read from grpc core without waiting; ``None`` if it cannot be read."""
    if isinstance(channel, grpc.aio.Channel):
        return channel.get_state(try_to_connect=False)
    check = getattr(getattr(channel, "_channel", None), "check_connectivity_state", None)
    if check is None:
        return None
    state = check(False)
    return next((s for s in grpc.ChannelConnectivity if s.value[0] == state), None)


def _failure_of(
    code: grpc.StatusCode,
    details: str | None,
    channel: Any,
    timeout: float | None,
    elapsed: float,
) -> Failure | None:
    """Why an attempt never got the server's answer, or ``None`` when ``code`` is the server's
    own status (see the module docstring)."""
    if code is _StatusCode.DEADLINE_EXCEEDED:
        if timeout is not None and elapsed >= timeout - _CLOCK_SLACK:
            return Failure.TIMEOUT
        return None
    if code is not _StatusCode.UNAVAILABLE:
        return None
    state = _connectivity(channel)
    if state is None:
        if (details or "").startswith("failed to connect to all addresses"):
            return Failure.CONNECT_FAILURE
        return None
    if state is grpc.ChannelConnectivity.READY:
        return None
    if state is grpc.ChannelConnectivity.TRANSIENT_FAILURE and not any(
        mark in (details or "") for mark in _CUT_OFF
    ):
        return Failure.CONNECT_FAILURE
    return Failure.RESET


# What grpc-core says of a call whose connection went away under it. By the time the state is
# read, grpcio may already have tried to reconnect to the stopped server and failed (the channel
# in TRANSIENT_FAILURE): these say the call itself had gone out, a reset, not a connect failure.
_CUT_OFF = ("Cancelling all calls", "Socket closed", "Connection reset", "Broken pipe", "GOAWAY")


def _attempt_timeout(call: Call, attempt: Attempt, deadline: float | None) -> float | None:
    """The attempt's timeout, cut to the caller's deadline. When the caller's deadline is the
    nearer one, the attempt's timeout is no longer a per-try timeout: when it passes, the call
    is over whatever the retry policy says."""
    hedge = call.hedge_delay if call.hedging else None
    if hedge is not None and (attempt.timeout is None or hedge < attempt.timeout):
        # The interceptors do not race attempts: where the route hedges on the per-try
        # timeout, a slow attempt is cut there and retried instead.
        attempt.timeout, attempt.per_try = hedge, True
    if deadline is not None:
        remaining = deadline - time.monotonic()
        if attempt.timeout is None or remaining < attempt.timeout:
            attempt.timeout = remaining
            attempt.per_try = False
    return attempt.timeout


def _stream_timeout(call: Call, attempt: Attempt, deadline: float | None) -> float | None:
    """A stream lives until it ends: only the route's timeout and the caller's deadline bound
    it; a per-try timeout would cut every long stream."""
    attempt.per_try = False
    timeouts = [call.decision.timeout or None]
    if deadline is not None:
        timeouts.append(deadline - time.monotonic())
    return min((t for t in timeouts if t is not None), default=None)


_LOCAL_MESSAGES = {"NR": "no route", "UH": "no healthy upstream", "NC": "no cluster found"}


class _Unsecured(Exception):
    """The cluster asks for TLS that this client cannot give the endpoint: refused rather than
    sent in plaintext (the message says why)."""


@dataclass(frozen=True, slots=True)
class _Security:
    """How to secure a channel to one endpoint: the credentials, the name the server's
    certificate must carry (``grpc.ssl_target_name_override``), and what they were made from
    (the SVID: a rotated one makes new channels)."""

    credentials: Callable[[], Any]  # made only for a new channel (key serialization, files)
    name: str | None
    made_from: object


def _security(source: Any, tls: UpstreamTls | None) -> _Security | None:
    """The cluster's TLS for an endpoint, as grpcio's channel credentials (``None``:
    plaintext). grpcio checks the server's certificate by host name only, so the mesh's
    ``ISTIO_MUTUAL`` checks the server's SPIFFE ID through its DNS form, which meshd's CA puts
    in every SVID beside the URI SAN (``SpiffeId.dns_name``)."""
    if tls is None:
        return None
    if tls.kind is not TlsKind.MESH:  # DestinationRule SIMPLE / MUTUAL: TLS origination
        return _Security(
            lambda: grpc.ssl_channel_credentials(
                _read(tls.ca_file), _read(tls.key_file), _read(tls.cert_file)
            ),
            tls.sni or next(iter(tls.subject_alt_names), None),
            tls,
        )
    identity = getattr(source, "identity", None)
    svid = identity.current() if identity is not None else None
    if svid is None:
        raise _Unsecured(
            "the upstream requires the mesh's mTLS (ISTIO_MUTUAL) and this process has no "
            "workload identity (Mesh.connect(token=...))"
        )
    assert identity is not None
    expected = sorted(tls.subject_alt_names)
    if len(expected) != 1:
        raise _Unsecured(
            f"libmesh's grpc client checks one server identity, and this cluster accepts "
            f"{len(expected) or 'any'}{': ' + ', '.join(expected) if expected else ''}: name "
            "one in the DestinationRule's subjectAltNames, or dial libmesh.xds_channel()"
        )
    try:
        name = SpiffeId.parse(expected[0]).dns_name
    except SpiffeIdError as exc:
        raise _Unsecured(f"cannot check the server's identity {expected[0]!r}: {exc}") from exc
    if name is None:
        raise _Unsecured(f"{expected[0]} has no DNS form for grpcio to check")
    bundle = identity.bundle

    def credentials() -> Any:
        return grpc.ssl_channel_credentials(_pem(bundle).encode(), svid.key_pem(), svid.chain_pem())

    # (a rotated SVID or trust bundle: new channels; compared by identity first, so cheaply)
    return _Security(credentials, name, (svid, bundle))


def _read(path: str | None) -> bytes | None:
    if path is None:
        return None
    with open(path, "rb") as file:
        return file.read()


class _Channels:
    """An interceptor's channels, one per endpoint and security; a channel made with an SVID
    that has since rotated is replaced, and closed a while later (calls on it finish)."""

    GRACE = 30.0

    def __init__(
        self, make: Callable[[str, Sequence[tuple[str, Any]], Any], Any], *, aio: bool = False
    ) -> None:
        self._make = make  # (address, options, credentials or None) -> channel
        self._aio = aio
        self._made: dict[tuple[str, str | None], tuple[object, Any]] = {}
        self._lock = threading.Lock()
        self._closing: set[asyncio.Task[None]] = set()

    def get(self, source: Any, attempt: Attempt, options: Sequence[tuple[str, Any]]) -> Any:
        host = attempt.host
        security = _security(source, attempt.cluster.tls.for_endpoint(host.tls_match))
        key = (host.key, security.name if security is not None else None)
        made_from = security.made_from if security is not None else None
        found = self._made.get(key)
        if found is not None and found[0] == made_from:
            return found[1]
        with self._lock:
            found = self._made.get(key)
            if found is not None and found[0] == made_from:
                return found[1]
            if security is not None and security.name is not None:
                # grpcio checks each call's authority against the server's certificate too,
                # so the calls on such a channel name the server's identity as their authority
                options = [
                    *((k, v) for k, v in options if k != "grpc.default_authority"),
                    ("grpc.default_authority", security.name),
                    ("grpc.ssl_target_name_override", security.name),
                ]
            channel = self._make(
                _address(host), options, security.credentials() if security else None
            )
            self._made[key] = (made_from, channel)
        if found is not None:
            self.retire(found[1])
        return channel

    def retire(self, channel: Any) -> None:
        if self._aio:  # (called on the interceptor's loop: closed there, later)
            loop = asyncio.get_running_loop()
            loop.call_later(self.GRACE, self._close_later, loop, channel)
            return
        timer = threading.Timer(self.GRACE, _close_quietly, (channel,))
        timer.daemon = True
        timer.start()

    def _close_later(self, loop: asyncio.AbstractEventLoop, channel: Any) -> None:
        task = loop.create_task(channel.close())
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    def drain(self) -> list[Any]:
        with self._lock:
            made, self._made = self._made, {}
        return [channel for _, channel in made.values()]


def _close_quietly(channel: Any) -> None:
    try:
        channel.close()
    except Exception:  # a channel already closed with its interceptor
        logger.debug("closing a retired channel failed", exc_info=True)


class _Shared:
    """What the sync and async interceptors share: starting calls, shaping attempts, settling
    their outcomes with the engine and the telemetry, and making errors."""

    def __init__(self, source: EngineSource, target: str, options: Sequence[tuple[str, Any]]):
        self.source = source
        self.target = target.removeprefix("dns:///")
        self.host, self.port = _split_target(self.target)
        self.options = list(options)
        if not any(key == "grpc.default_authority" for key, _ in self.options):
            # Each endpoint's channel names the service as its authority, as Envoy and the
            # httpx transports do.
            self.options.append(("grpc.default_authority", self.target))

    def begin(
        self, details: Any, continuation: Any, *, aio: bool, stream: bool
    ) -> _Begun | MeshRpcError | None:
        """A call the mesh routes, an error the mesh answers at once, or ``None`` for a target
        it does not know."""
        method = _text(details.method)
        engine: Engine = self.source.engine
        started = engine.start(
            self.host,
            self.port,
            RequestInfo("POST", self.target, method, headers=_headers(details.metadata)),
        )
        if started is None:
            return None
        if isinstance(started, LocalReply):
            return self.local_error(started, None, None, aio)
        started.replayable = not stream
        codec = _codec(continuation, aio)
        if isinstance(codec, MeshRpcError):
            return codec
        given = next((v for k, v in details.metadata or () if k == "x-request-id"), None)
        observed = self.source.telemetry.client_call(
            service=started.service,
            method="POST",
            path=method,
            protocol="grpc",
            request_id=given if isinstance(given, str) else None,
        )
        deadline = time.monotonic() + details.timeout if details.timeout is not None else None
        wait = started.delay
        outlasted = deadline is not None and wait >= deadline - time.monotonic()
        if deadline is not None and outlasted:
            wait = max(deadline - time.monotonic(), 0.0)  # wait as long as the caller does
        return _Begun(started, codec, observed, deadline, wait, outlasted)

    def after_delay(self, begun: _Begun, aio: bool) -> MeshRpcError | None:
        """The error that ends the call before any attempt: the caller's deadline passed during
        the injected delay, or an injected abort."""
        call = begun.call
        if begun.outlasted:
            flags = ",".join(call.flags)
            code = _StatusCode.DEADLINE_EXCEEDED
            begun.observed.finish(status=0, flags=flags, grpc_status=str(code.value[0]))
            return MeshRpcError(
                code,
                f"the call's deadline passed during an injected delay (response flags: {flags})",
                response_flags=flags,
                aio=aio,
            )
        if call.abort is None:
            return None
        return self.local_error(call.abort, call, begun.observed, aio)

    def only_attempt(self, begun: _Begun, aio: bool) -> Attempt | MeshRpcError:
        """A stream's one attempt, or why there is none (no healthy upstream, overflow, …)."""
        step = begun.call.next()
        if isinstance(step, Attempt):
            return step
        if isinstance(step, (LocalReply, Fail)):
            return self.error(step, begun, aio)
        raise AssertionError(step)  # pragma: no cover - a first step is one of these

    def refused(
        self, begun: _Begun, attempt: Attempt, refused: _Unsecured, aio: bool
    ) -> MeshRpcError:
        """A stream whose endpoint cannot be secured as its cluster asks: failed, as a
        connection failure (streams have one attempt)."""
        call = begun.call
        call.failure_reason = f"TLS error: {refused}"
        step = call.failed(attempt, Failure.CONNECT_FAILURE)
        if not isinstance(step, Fail):
            call.cancel()
        message = (
            "upstream connect error or disconnect/reset before headers. reset reason: "
            f"connection failure, transport failure reason: TLS error: {refused}"
        )
        return self.fail_error(Fail("connect", "UF", message), call, begun.observed, aio)

    def error(self, step: LocalReply | Fail, begun: _Begun, aio: bool) -> MeshRpcError:
        if isinstance(step, LocalReply):
            return self.local_error(step, begun.call, begun.observed, aio)
        return self.fail_error(step, begun.call, begun.observed, aio)

    @staticmethod
    def method(details: Any, attempt: Attempt) -> str:
        if attempt.path is not None:
            return attempt.path.partition("?")[0]
        return _text(details.method)

    @staticmethod
    def metadata(details: Any, attempt: Attempt, observed: ClientCall) -> Metadata:
        """The attempt's metadata: the route's header rules applied, and the trace context,
        request id and peer metadata the telemetry adds."""
        metadata = _apply_header_ops(details.metadata, attempt.headers)
        added = dict(observed.attempt(attempt.host.key, attempt.cluster.name))
        return (*((k, v) for k, v in metadata if k not in added), *added.items())

    def settle(
        self,
        begun: _Begun,
        attempt: Attempt,
        code: grpc.StatusCode,
        details: str | None,
        channel: Any,
        timeout: float | None,
        elapsed: float,
        headers: dict[str, str],
    ) -> Any:
        """Tell the engine (and the telemetry) how an attempt ended: the engine's next step,
        or ``DELIVER`` once the call is over with this attempt's answer."""
        call, observed = begun.call, begun.observed
        failure = _failure_of(code, details, channel, timeout, elapsed)
        if failure is not None:
            observed.attempt_done(error=failure.name)
            return call.failed(attempt, failure)
        grpc_status = str(code.value[0])
        observed.attempt_done(200, grpc_status)
        # As Envoy sees a gRPC answer: HTTP 200 with a grpc-status (the engine maps that
        # status to HTTP for outlier detection: UNAVAILABLE counts as a 503).
        step = call.responded(attempt, 200, headers, grpc_status=code.value[0])
        if step is DELIVER:
            call.finish(attempt)
            observed.finish(
                status=200,
                flags=",".join(call.flags) or "-",
                grpc_status=grpc_status,
                upstream_host=attempt.host.key,
                cluster=attempt.cluster.name,
                route=call.decision.route_name,
                destination_labels=attempt.host.labels,
                response_headers=headers,
            )
        return step

    def stream_ended(
        self,
        begun: _Begun,
        attempt: Attempt,
        code: grpc.StatusCode,
        details: str | None,
        channel: Any,
        timeout: float | None,
        elapsed: float,
        headers: dict[str, str],
    ) -> None:
        """A stream's one attempt is over, however it ended; the caller has grpcio's answer."""
        step = self.settle(begun, attempt, code, details, channel, timeout, elapsed, headers)
        if step is not DELIVER:  # a failure the engine has ended the call with
            flags = ",".join(begun.call.flags)
            begun.observed.finish(status=0, flags=flags, grpc_status=str(code.value[0]))

    def local_error(
        self, reply: LocalReply, call: Call | None, observed: ClientCall | None, aio: bool
    ) -> MeshRpcError:
        headers = dict(reply.headers)
        grpc_status = headers.get("grpc-status")
        if grpc_status is not None and grpc_status.isdigit():
            code = _CODES.get(int(grpc_status), _StatusCode.UNKNOWN)
            message = headers.get("grpc-message") or reply.body.decode(errors="replace")
        else:
            code = _HTTP_TO_GRPC.get(reply.status, _StatusCode.UNKNOWN)
            message = reply.body.decode(errors="replace") or _LOCAL_MESSAGES.get(
                reply.flags, f"HTTP status {reply.status}"
            )
            if reply.flags == "NR":
                message = f"no route of {self.target} matches the call"
        flags = ",".join(f for f in call.flags if f) if call is not None else reply.flags
        if observed is not None:
            observed.finish(status=reply.status, flags=flags, grpc_status=str(code.value[0]))
        return MeshRpcError(
            code, f"{message} (response flags: {flags or '-'})", response_flags=flags, aio=aio
        )

    @staticmethod
    def fail_error(step: Fail, call: Call, observed: ClientCall, aio: bool) -> MeshRpcError:
        flags = ",".join(f for f in call.flags if f)
        code = _FAIL_CODES.get(step.kind, _StatusCode.UNAVAILABLE)
        observed.finish(status=0, flags=flags, grpc_status=str(code.value[0]))
        attempts = f"{call.attempts} attempt{'s' if call.attempts != 1 else ''}"
        reason = call.failure_reason
        message = step.message
        if reason and "transport failure reason" not in message:
            message = f"{message}, transport failure reason: {reason}"
        return MeshRpcError(
            code,
            f"{message} (response flags: {flags}; {attempts})",
            response_flags=flags,
            attempts=call.attempts,
            aio=aio,
        )


@dataclass(frozen=True, slots=True)
class _Begun:
    call: Call
    codec: Codec
    observed: ClientCall
    deadline: float | None  # the caller's, on the monotonic clock
    wait: float  # the injected delay, cut to the deadline
    outlasted: bool  # the delay outlasts the deadline


def _sync_channel(address: str, options: Sequence[tuple[str, Any]], credentials: Any) -> Any:
    if credentials is None:
        return grpc.insecure_channel(address, options)
    return grpc.secure_channel(address, credentials, options)


def _aio_channel(address: str, options: Sequence[tuple[str, Any]], credentials: Any) -> Any:
    if credentials is None:
        return grpc.aio.insecure_channel(address, options)
    return grpc.aio.secure_channel(address, credentials, options)


def _abandon(begun: _Begun, attempt: Attempt | None) -> None:
    """The caller went away (an exception, a cancellation): free what the call holds without
    reporting anything against the upstream."""
    begun.call.cancel(attempt)
    begun.observed.finish(status=0, flags="DC")  # Envoy's "downstream connection termination"


# -- sync ----------------------------------------------------------------------------------------


class MeshClientInterceptor(
    grpc.UnaryUnaryClientInterceptor,
    grpc.UnaryStreamClientInterceptor,
    grpc.StreamUnaryClientInterceptor,
    grpc.StreamStreamClientInterceptor,
):
    """A grpcio client interceptor that applies the mesh's policies to calls to ``target``
    (``host:port`` as the channel dials it; short names resolve in the mesh's namespace).

    ``options`` are grpcio channel options for the channel made to each endpoint. Close the
    interceptor (or the channel from :meth:`intercept`) to close those channels.
    """

    def __init__(
        self, source: EngineSource, target: str, *, options: Sequence[tuple[str, Any]] = ()
    ) -> None:
        self._shared = _Shared(source, target, options)
        self._channels = _Channels(_sync_channel)

    def intercept(self, channel: grpc.Channel) -> grpc.Channel:
        """``grpc.intercept_channel(channel, self)``, closing this interceptor with it."""
        return _MeshChannel(grpc.intercept_channel(channel, self), self)

    def _endpoint(self, attempt: Attempt) -> grpc.Channel:
        shared = self._shared
        return self._channels.get(shared.source, attempt, shared.options)  # type: ignore[no-any-return]

    def close(self) -> None:
        for channel in self._channels.drain():
            channel.close()

    # unary-unary -------------------------------------------------------------------------------

    def intercept_unary_unary(
        self,
        continuation: Callable[[grpc.ClientCallDetails, Any], Any],
        client_call_details: grpc.ClientCallDetails,
        request: Any,
    ) -> Any:
        shared = self._shared
        begun = shared.begin(client_call_details, continuation, aio=False, stream=False)
        if begun is None:
            return continuation(client_call_details, request)
        if isinstance(begun, MeshRpcError):
            return begun
        _sleep(begun.wait)
        ended = shared.after_delay(begun, aio=False)
        if ended is not None:
            return ended
        call = begun.call
        attempt: Attempt | None = None
        try:
            step: Any = call.next()
            while True:
                while isinstance(step, Attempt):
                    attempt = step
                    step = self._try(attempt, client_call_details, request, begun)
                    attempt = None
                if isinstance(step, Backoff):
                    _sleep(step.seconds)
                    step = call.next()
                elif isinstance(step, (LocalReply, Fail)):
                    return shared.error(step, begun, aio=False)
                else:
                    return step
        except BaseException:
            _abandon(begun, attempt)
            raise

    def _try(
        self, attempt: Attempt, details: grpc.ClientCallDetails, request: Any, begun: _Begun
    ) -> Any:
        """One attempt: the engine's next step, or what the caller gets."""
        shared, call = self._shared, begun.call
        timeout = _attempt_timeout(call, attempt, begun.deadline)
        if timeout is not None and timeout <= 0:
            return call.failed(attempt, Failure.TIMEOUT)
        try:
            channel = self._endpoint(attempt)
        except _Unsecured as refused:
            call.failure_reason = f"TLS error: {refused}"
            return call.failed(attempt, Failure.CONNECT_FAILURE)
        rpc = channel.unary_unary(shared.method(details, attempt), *begun.codec)
        metadata = shared.metadata(details, attempt, begun.observed)
        sent = time.monotonic()
        try:
            with suppressed_instrumentation():
                response, rpc_call = rpc.with_call(
                    request,
                    timeout=timeout,
                    metadata=metadata,
                    credentials=details.credentials,
                    wait_for_ready=details.wait_for_ready,
                    compression=details.compression,
                )
        except grpc.RpcError as error:
            failed: Any = error  # grpcio's failed call: a Call and a Future too
            step = shared.settle(
                begun, attempt, failed.code(), failed.details(), channel, timeout,
                time.monotonic() - sent,
                _response_headers(failed.initial_metadata(), failed.trailing_metadata()),
            )  # fmt: skip
            return failed if step is DELIVER else step
        step = shared.settle(
            begun, attempt, _StatusCode.OK, None, channel, timeout, time.monotonic() - sent,
            _response_headers(rpc_call.initial_metadata(), rpc_call.trailing_metadata()),
        )  # fmt: skip
        # not delivered: a retry policy that retries an OK answer (retriable-headers)
        return _UnaryOutcome(response, rpc_call) if step is DELIVER else step

    # streams -----------------------------------------------------------------------------------

    def intercept_unary_stream(
        self,
        continuation: Callable[[grpc.ClientCallDetails, Any], Any],
        client_call_details: grpc.ClientCallDetails,
        request: Any,
    ) -> Any:
        return self._stream("unary_stream", continuation, client_call_details, request)

    def intercept_stream_unary(
        self,
        continuation: Callable[[grpc.ClientCallDetails, Any], Any],
        client_call_details: grpc.ClientCallDetails,
        request_iterator: Any,
    ) -> Any:
        return self._stream("stream_unary", continuation, client_call_details, request_iterator)

    def intercept_stream_stream(
        self,
        continuation: Callable[[grpc.ClientCallDetails, Any], Any],
        client_call_details: grpc.ClientCallDetails,
        request_iterator: Any,
    ) -> Any:
        return self._stream("stream_stream", continuation, client_call_details, request_iterator)

    def _stream(
        self,
        kind: str,
        continuation: Callable[[grpc.ClientCallDetails, Any], Any],
        details: grpc.ClientCallDetails,
        request: Any,
    ) -> Any:
        shared = self._shared
        begun = shared.begin(details, continuation, aio=False, stream=True)
        if begun is None:
            return continuation(details, request)
        if isinstance(begun, MeshRpcError):
            return begun
        _sleep(begun.wait)
        ended = shared.after_delay(begun, aio=False)
        if ended is not None:
            return ended
        attempt = shared.only_attempt(begun, aio=False)
        if isinstance(attempt, MeshRpcError):
            return attempt
        timeout = _stream_timeout(begun.call, attempt, begun.deadline)
        try:
            channel = self._endpoint(attempt)
        except _Unsecured as refused:
            return shared.refused(begun, attempt, refused, aio=False)
        method = shared.method(details, attempt)
        metadata = shared.metadata(details, attempt, begun.observed)
        sent = time.monotonic()
        try:
            multicallable = getattr(channel, kind)(method, *begun.codec)
            invoke = multicallable.future if kind == "stream_unary" else multicallable
            with suppressed_instrumentation():
                rpc = invoke(
                    request,
                    timeout=timeout,
                    metadata=metadata,
                    credentials=details.credentials,
                    wait_for_ready=details.wait_for_ready,
                    compression=details.compression,
                )
        except BaseException:
            _abandon(begun, attempt)
            raise

        def finished(done: Any) -> None:
            shared.stream_ended(
                begun, attempt, done.code(), done.details(), channel, timeout,
                time.monotonic() - sent,
                _response_headers(done.initial_metadata(), done.trailing_metadata()),
            )  # fmt: skip

        rpc.add_done_callback(finished)
        return rpc


class _MeshChannel(grpc.Channel):
    """An intercepted channel whose ``close`` also closes the interceptor's endpoint channels."""

    def __init__(self, channel: grpc.Channel, interceptor: MeshClientInterceptor) -> None:
        self._channel = channel
        self._interceptor = interceptor

    def subscribe(
        self, callback: Callable[[grpc.ChannelConnectivity], None], try_to_connect: bool = False
    ) -> None:
        self._channel.subscribe(callback, try_to_connect=try_to_connect)

    def unsubscribe(self, callback: Callable[[grpc.ChannelConnectivity], None]) -> None:
        self._channel.unsubscribe(callback)

    def unary_unary(self, method: str, *args: Any, **kwargs: Any) -> Any:
        return self._channel.unary_unary(method, *args, **kwargs)

    def unary_stream(self, method: str, *args: Any, **kwargs: Any) -> Any:
        return self._channel.unary_stream(method, *args, **kwargs)

    def stream_unary(self, method: str, *args: Any, **kwargs: Any) -> Any:
        return self._channel.stream_unary(method, *args, **kwargs)

    def stream_stream(self, method: str, *args: Any, **kwargs: Any) -> Any:
        return self._channel.stream_stream(method, *args, **kwargs)

    def close(self) -> None:
        try:
            self._channel.close()
        finally:
            self._interceptor.close()

    def __enter__(self) -> _MeshChannel:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc_val: BaseException | None,
        exc_tb: TracebackType | None,
    ) -> None:
        self.close()


def mesh_channel(
    source: EngineSource,
    target: str,
    options: Sequence[tuple[str, Any]] | None = None,
    compression: grpc.Compression | None = None,
) -> grpc.Channel:
    """``grpc.insecure_channel(target)`` through the mesh (see :meth:`Mesh.grpc_channel`)."""
    interceptor = MeshClientInterceptor(source, target, options=options or ())
    return interceptor.intercept(grpc.insecure_channel(target, options, compression))


# -- async ---------------------------------------------------------------------------------------


class AsyncMeshClientInterceptor(
    grpc.aio.UnaryUnaryClientInterceptor,
    grpc.aio.UnaryStreamClientInterceptor,
    grpc.aio.StreamUnaryClientInterceptor,
    grpc.aio.StreamStreamClientInterceptor,
):
    """The ``grpc.aio`` twin of :class:`MeshClientInterceptor`. Give a channel all of
    :meth:`interceptors`, last: ``grpc.aio.insecure_channel(target, interceptors=[...,
    *interceptor.interceptors()])``, and ``await interceptor.aclose()`` when the channel is
    closed. Its endpoint channels belong to the event loop of its first call."""

    def __init__(
        self, source: EngineSource, target: str, *, options: Sequence[tuple[str, Any]] = ()
    ) -> None:
        self._shared = _Shared(source, target, options)
        self._channels = _Channels(_aio_channel, aio=True)
        self._watchers: set[asyncio.Task[None]] = set()

    def interceptors(self) -> list[grpc.aio.ClientInterceptor]:
        """This interceptor, once per kind of call: ``grpc.aio`` registers an interceptor for
        the first kind it implements only (grpc/grpc#31442), so one object alone would leave
        streaming calls out of the mesh."""
        return [self, _UnaryStream(self), _StreamUnary(self), _StreamStream(self)]

    def _endpoint(self, attempt: Attempt) -> grpc.aio.Channel:
        shared = self._shared
        return self._channels.get(shared.source, attempt, shared.options)  # type: ignore[no-any-return]

    async def aclose(self) -> None:
        for task in list(self._watchers):
            task.cancel()
        for channel in self._channels.drain():
            await channel.close()

    # unary-unary -------------------------------------------------------------------------------

    async def intercept_unary_unary(
        self,
        continuation: Callable[[grpc.aio.ClientCallDetails, Any], Any],
        client_call_details: grpc.aio.ClientCallDetails,
        request: Any,
    ) -> Any:
        shared = self._shared
        begun = shared.begin(client_call_details, continuation, aio=True, stream=False)
        if begun is None:
            return await continuation(client_call_details, request)
        if isinstance(begun, MeshRpcError):
            raise begun
        await _asleep(begun.wait)
        ended = shared.after_delay(begun, aio=True)
        if ended is not None:
            raise ended
        call = begun.call
        attempt: Attempt | None = None
        try:
            step: Any = call.next()
            while True:
                while isinstance(step, Attempt):
                    attempt = step
                    step = await self._try(attempt, client_call_details, request, begun)
                    attempt = None
                if isinstance(step, Backoff):
                    await _asleep(step.seconds)
                    step = call.next()
                elif isinstance(step, (LocalReply, Fail)):
                    raise shared.error(step, begun, aio=True)
                else:
                    return step
        except MeshRpcError:
            raise
        except BaseException:  # cancelled by the caller, most likely
            _abandon(begun, attempt)
            raise

    async def _try(
        self, attempt: Attempt, details: grpc.aio.ClientCallDetails, request: Any, begun: _Begun
    ) -> Any:
        shared, call = self._shared, begun.call
        timeout = _attempt_timeout(call, attempt, begun.deadline)
        if timeout is not None and timeout <= 0:
            return call.failed(attempt, Failure.TIMEOUT)
        try:
            channel = self._endpoint(attempt)
        except _Unsecured as refused:
            call.failure_reason = f"TLS error: {refused}"
            return call.failed(attempt, Failure.CONNECT_FAILURE)
        rpc = channel.unary_unary(shared.method(details, attempt), *begun.codec)
        metadata = shared.metadata(details, attempt, begun.observed)
        sent = time.monotonic()
        with suppressed_instrumentation():
            rpc_call = rpc(
                request,
                timeout=timeout,
                metadata=metadata,
                credentials=details.credentials,
                wait_for_ready=details.wait_for_ready,
            )
            try:
                await rpc_call
            except grpc.aio.AioRpcError as error:
                code, message = error.code(), error.details()
                headers = _response_headers(error.initial_metadata(), error.trailing_metadata())
            except BaseException:
                rpc_call.cancel()
                raise
            else:
                code, message = _StatusCode.OK, None
                headers = _response_headers(
                    await rpc_call.initial_metadata(), await rpc_call.trailing_metadata()
                )
        step = shared.settle(
            begun, attempt, code, message, channel, timeout, time.monotonic() - sent, headers
        )
        # awaiting a delivered call gives its answer, or raises grpcio's own error
        return rpc_call if step is DELIVER else step

    # streams -----------------------------------------------------------------------------------

    async def intercept_unary_stream(
        self,
        continuation: Callable[[grpc.aio.ClientCallDetails, Any], Any],
        client_call_details: grpc.aio.ClientCallDetails,
        request: Any,
    ) -> Any:
        return await self._stream("unary_stream", continuation, client_call_details, request)

    async def intercept_stream_unary(
        self,
        continuation: Callable[[grpc.aio.ClientCallDetails, Any], Any],
        client_call_details: grpc.aio.ClientCallDetails,
        request_iterator: Any,
    ) -> Any:
        return await self._stream(
            "stream_unary", continuation, client_call_details, request_iterator
        )

    async def intercept_stream_stream(
        self,
        continuation: Callable[[grpc.aio.ClientCallDetails, Any], Any],
        client_call_details: grpc.aio.ClientCallDetails,
        request_iterator: Any,
    ) -> Any:
        return await self._stream(
            "stream_stream", continuation, client_call_details, request_iterator
        )

    async def _stream(
        self,
        kind: str,
        continuation: Callable[[grpc.aio.ClientCallDetails, Any], Any],
        details: grpc.aio.ClientCallDetails,
        request: Any,
    ) -> Any:
        shared = self._shared
        begun = shared.begin(details, continuation, aio=True, stream=True)
        if begun is None:
            return await continuation(details, request)
        if isinstance(begun, MeshRpcError):
            raise begun
        await _asleep(begun.wait)
        ended = shared.after_delay(begun, aio=True)
        if ended is not None:
            raise ended
        attempt = shared.only_attempt(begun, aio=True)
        if isinstance(attempt, MeshRpcError):
            raise attempt
        timeout = _stream_timeout(begun.call, attempt, begun.deadline)
        try:
            channel = self._endpoint(attempt)
        except _Unsecured as refused:
            raise shared.refused(begun, attempt, refused, aio=True) from None
        metadata = shared.metadata(details, attempt, begun.observed)
        sent = time.monotonic()
        try:
            multicallable = getattr(channel, kind)(shared.method(details, attempt), *begun.codec)
            with suppressed_instrumentation():
                rpc = multicallable(
                    request,
                    timeout=timeout,
                    metadata=metadata,
                    credentials=details.credentials,
                    wait_for_ready=details.wait_for_ready,
                )
        except BaseException:
            _abandon(begun, attempt)
            raise
        watcher = asyncio.create_task(self._watch(begun, attempt, rpc, channel, timeout, sent))
        self._watchers.add(watcher)
        watcher.add_done_callback(self._watchers.discard)
        return rpc

    async def _watch(
        self,
        begun: _Begun,
        attempt: Attempt,
        rpc: Any,
        channel: grpc.aio.Channel,
        timeout: float | None,
        sent: float,
    ) -> None:
        """Settle the attempt when the stream ends, however it ends."""
        try:
            code = await rpc.code()
            details = await rpc.details()
            headers = _response_headers(await rpc.initial_metadata(), await rpc.trailing_metadata())
        except asyncio.CancelledError:
            _abandon(begun, attempt)
            raise
        self._shared.stream_ended(
            begun, attempt, code, details, channel, timeout, time.monotonic() - sent, headers
        )


class _UnaryStream(grpc.aio.UnaryStreamClientInterceptor):
    def __init__(self, mesh: AsyncMeshClientInterceptor) -> None:
        self._mesh = mesh

    async def intercept_unary_stream(
        self,
        continuation: Callable[[grpc.aio.ClientCallDetails, Any], Any],
        client_call_details: grpc.aio.ClientCallDetails,
        request: Any,
    ) -> Any:
        return await self._mesh.intercept_unary_stream(continuation, client_call_details, request)


class _StreamUnary(grpc.aio.StreamUnaryClientInterceptor):
    def __init__(self, mesh: AsyncMeshClientInterceptor) -> None:
        self._mesh = mesh

    async def intercept_stream_unary(
        self,
        continuation: Callable[[grpc.aio.ClientCallDetails, Any], Any],
        client_call_details: grpc.aio.ClientCallDetails,
        request_iterator: Any,
    ) -> Any:
        return await self._mesh.intercept_stream_unary(
            continuation, client_call_details, request_iterator
        )


class _StreamStream(grpc.aio.StreamStreamClientInterceptor):
    def __init__(self, mesh: AsyncMeshClientInterceptor) -> None:
        self._mesh = mesh

    async def intercept_stream_stream(
        self,
        continuation: Callable[[grpc.aio.ClientCallDetails, Any], Any],
        client_call_details: grpc.aio.ClientCallDetails,
        request_iterator: Any,
    ) -> Any:
        return await self._mesh.intercept_stream_stream(
            continuation, client_call_details, request_iterator
        )


class _AsyncMeshChannel(grpc.aio.Channel):
    """A ``grpc.aio`` channel whose ``close`` also closes the interceptor's endpoint channels."""

    def __init__(self, channel: grpc.aio.Channel, interceptor: AsyncMeshClientInterceptor):
        self._channel = channel
        self._interceptor = interceptor

    async def __aenter__(self) -> _AsyncMeshChannel:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc_val: BaseException | None,
        exc_tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self, grace: float | None = None) -> None:
        try:
            await self._channel.close(grace)
        finally:
            await self._interceptor.aclose()

    def get_state(self, try_to_connect: bool = False) -> grpc.ChannelConnectivity:
        return self._channel.get_state(try_to_connect)

    async def wait_for_state_change(self, last_observed_state: grpc.ChannelConnectivity) -> None:
        await self._channel.wait_for_state_change(last_observed_state)

    async def channel_ready(self) -> None:
        await self._channel.channel_ready()

    def unary_unary(self, method: str, *args: Any, **kwargs: Any) -> Any:
        return self._channel.unary_unary(method, *args, **kwargs)

    def unary_stream(self, method: str, *args: Any, **kwargs: Any) -> Any:
        return self._channel.unary_stream(method, *args, **kwargs)

    def stream_unary(self, method: str, *args: Any, **kwargs: Any) -> Any:
        return self._channel.stream_unary(method, *args, **kwargs)

    def stream_stream(self, method: str, *args: Any, **kwargs: Any) -> Any:
        return self._channel.stream_stream(method, *args, **kwargs)


def mesh_aio_channel(
    source: EngineSource,
    target: str,
    options: Sequence[tuple[str, Any]] | None = None,
    compression: grpc.Compression | None = None,
) -> grpc.aio.Channel:
    """``grpc.aio.insecure_channel(target)`` through the mesh (see
    :meth:`Mesh.grpc_aio_channel`)."""
    interceptor = AsyncMeshClientInterceptor(source, target, options=options or ())
    channel = grpc.aio.insecure_channel(
        target, options, compression, interceptors=interceptor.interceptors()
    )
    return _AsyncMeshChannel(channel, interceptor)


# -- grpcio's own xDS client -------------------------------------------------------------------


def xds_bootstrap(
    *,
    xds_address: str | None = None,
    namespace: str | None = None,
    labels: Mapping[str, str] | None = None,
    locality: str | None = None,
    service_account: str | None = None,
    node_id: str | None = None,
    certificates: str | os.PathLike[str] | None = None,
) -> dict[str, Any]:
    """The bootstrap grpcio's xDS client needs to talk to meshd at ``xds_address`` (default:
    ``LIBMESH_XDS_ADDRESS``, else ``127.0.0.1:15010``), describing this process as
    ``Mesh.connect`` would (the same arguments and ``LIBMESH_*`` variables).

    ``certificates``: a directory where ``WorkloadIdentity.write_files`` keeps the SVID; it
    becomes the ``file_watcher`` certificate provider ``default`` that meshd's clusters and
    listeners name for mTLS (``ISTIO_MUTUAL``), as Istio's proxyless gRPC bootstrap has it."""
    from .._mesh import DEFAULT_XDS_ADDRESS, node_from_environment  # _mesh imports this module

    node = node_from_environment(
        namespace=namespace,
        labels=labels,
        locality=locality,
        service_account=service_account,
        node_id=node_id,
    )
    address = xds_address or os.environ.get("LIBMESH_XDS_ADDRESS") or DEFAULT_XDS_ADDRESS
    where = {
        key: value
        for key, value in (
            ("region", node.locality.region),
            ("zone", node.locality.zone),
            ("sub_zone", node.locality.subzone),
        )
        if value
    }
    node_json: dict[str, Any] = {
        "id": node.id,
        "metadata": {
            "NAMESPACE": node.namespace,
            "LABELS": dict(node.labels),
            "SERVICE_ACCOUNT": node.service_account,
        },
    }
    if where:
        node_json["locality"] = where
    bootstrap: dict[str, Any] = {
        "xds_servers": [
            {
                "server_uri": address,
                "channel_creds": [{"type": "insecure"}],
                "server_features": ["xds_v3"],
            }
        ],
        "node": node_json,
        # what a grpcio xDS server (grpc.server(..., xds=True)) asks meshd for
        "server_listener_resource_name_template": "grpc/server?xds.resource.listening_address=%s",
    }
    if certificates is not None:
        directory = os.path.abspath(certificates)
        bootstrap["certificate_providers"] = {
            "default": {
                "plugin_name": "file_watcher",
                "config": {
                    "certificate_file": os.path.join(directory, "cert-chain.pem"),
                    "private_key_file": os.path.join(directory, "key.pem"),
                    "ca_certificate_file": os.path.join(directory, "root-cert.pem"),
                    "refresh_interval": "1s",
                },
            }
        }
    return bootstrap


def _xds_credentials(certificates: object) -> grpc.ChannelCredentials | None:
    """grpcio's xDS credentials (TLS as the cluster says, plaintext otherwise) when the
    bootstrap names certificates."""
    if certificates is None:
        return None
    import grpc.experimental

    return grpc.xds_channel_credentials(
        fallback_credentials=grpc.experimental.insecure_channel_credentials()  # type: ignore[no-untyped-call]
    )


def _install_bootstrap(bootstrap: dict[str, Any]) -> None:
    """Hand grpcio the bootstrap through ``GRPC_XDS_BOOTSTRAP_CONFIG``, unless the process
    already names another one: grpcio reads its bootstrap once, so a second, different one would
    be silently ignored."""
    path = os.environ.get("GRPC_XDS_BOOTSTRAP")
    if path:
        try:
            with open(path, encoding="utf-8") as file:
                existing: Any = json.load(file)
        except (OSError, ValueError) as exc:
            existing = exc
        if existing != bootstrap:
            raise ConfigError(
                f"GRPC_XDS_BOOTSTRAP names {path}, which is not the bootstrap this channel "
                f"needs ({json.dumps(bootstrap)}); grpcio reads one bootstrap per process, and "
                "that file wins. Unset GRPC_XDS_BOOTSTRAP, or dial grpc.insecure_channel("
                "'xds:///…') yourself with the bootstrap it names"
            )
        return
    current = os.environ.get("GRPC_XDS_BOOTSTRAP_CONFIG")
    if current is not None:
        try:
            same = json.loads(current) == bootstrap
        except ValueError:
            same = False
        if not same:
            raise ConfigError(
                "GRPC_XDS_BOOTSTRAP_CONFIG already holds another xDS bootstrap "
                f"({current}), and grpcio reads one per process; this channel needs "
                f"{json.dumps(bootstrap)}. Give every xDS channel of the process the same "
                "xds_address, namespace, labels, locality, service_account and node_id"
            )
        return
    os.environ["GRPC_XDS_BOOTSTRAP_CONFIG"] = json.dumps(bootstrap, sort_keys=True)


def _xds_target(target: str) -> str:
    return target if target.startswith("xds:") else "xds:///" + target


def xds_channel(
    target: str,
    *,
    xds_address: str | None = None,
    namespace: str | None = None,
    labels: Mapping[str, str] | None = None,
    locality: str | None = None,
    service_account: str | None = None,
    node_id: str | None = None,
    certificates: str | os.PathLike[str] | None = None,
    options: Sequence[tuple[str, Any]] | None = None,
    compression: grpc.Compression | None = None,
) -> grpc.Channel:
    """A grpcio channel to ``target`` (``reviews.shop.svc.cluster.local:8080``) that grpcio's
    own xDS client configures from meshd: ``grpc.insecure_channel("xds:///" + target)`` with a
    bootstrap built from the arguments (see :func:`xds_bootstrap`).

    grpcio reads its bootstrap once per process: every call must describe the same node, and
    raises :class:`~libmesh.ConfigError` if ``GRPC_XDS_BOOTSTRAP`` or
    ``GRPC_XDS_BOOTSTRAP_CONFIG`` already names a different one. With ``certificates`` (the
    SVID's directory), the channel uses grpcio's xDS credentials: mTLS where meshd's cluster
    asks for it, with the server's SPIFFE ID checked against the cluster's SANs.
    """
    _install_bootstrap(
        xds_bootstrap(
            xds_address=xds_address,
            namespace=namespace,
            labels=labels,
            locality=locality,
            service_account=service_account,
            node_id=node_id,
            certificates=certificates,
        )
    )
    credentials = _xds_credentials(certificates)
    if credentials is not None:
        return grpc.secure_channel(_xds_target(target), credentials, options, compression)
    return grpc.insecure_channel(_xds_target(target), options, compression)


def xds_aio_channel(
    target: str,
    *,
    xds_address: str | None = None,
    namespace: str | None = None,
    labels: Mapping[str, str] | None = None,
    locality: str | None = None,
    service_account: str | None = None,
    node_id: str | None = None,
    certificates: str | os.PathLike[str] | None = None,
    options: Sequence[tuple[str, Any]] | None = None,
    compression: grpc.Compression | None = None,
    interceptors: Sequence[grpc.aio.ClientInterceptor] | None = None,
) -> grpc.aio.Channel:
    """The ``grpc.aio`` twin of :func:`xds_channel`."""
    _install_bootstrap(
        xds_bootstrap(
            xds_address=xds_address,
            namespace=namespace,
            labels=labels,
            locality=locality,
            service_account=service_account,
            node_id=node_id,
            certificates=certificates,
        )
    )
    credentials = _xds_credentials(certificates)
    if credentials is not None:
        return grpc.aio.secure_channel(
            _xds_target(target), credentials, options, compression, interceptors
        )
    return grpc.aio.insecure_channel(_xds_target(target), options, compression, interceptors)
