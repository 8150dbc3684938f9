"""Tracing with OpenTelemetry: which headers carry a trace, and the spans libmesh makes.

libmesh uses the OpenTelemetry API only: spans go to whatever tracer provider the application
configured (OTLP, Zipkin, Jaeger, the console…), and with none configured they cost next to
nothing while the trace context still passes through, as an Envoy without a tracer propagates
it. Incoming requests are read in W3C tracecontext, then B3 (single ``b3`` header or the
``x-b3-*`` set); outgoing ones carry the formats in :class:`Propagation` — by default W3C and
B3 multi-header, what OpenTelemetry and Zipkin (and so Istio's Zipkin setup) read.

Spans, as OpenTelemetry's HTTP conventions lay them out for a client that resends:

- inbound: one ``SERVER`` span per request, a child of the caller's context — unless
  OpenTelemetry's own server instrumentation already made one, which libmesh then annotates;
- outbound: one ``INTERNAL`` span per logical call (``reviews.shop.svc.cluster.local:8080/*``,
  Envoy's name for it) and one ``CLIENT`` span per attempt under it, whose context is what the
  attempt carries upstream. OpenTelemetry's httpx/requests/grpc instrumentations are
  suppressed inside an attempt, so nothing is recorded twice.
"""

from __future__ import annotations

import itertools
import os
import random
import sys
from collections.abc import Mapping, MutableMapping, Sequence
from dataclasses import dataclass
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.context import _SUPPRESS_HTTP_INSTRUMENTATION_KEY as _SUPPRESS_HTTP
from opentelemetry.context import Context
from opentelemetry.propagators.b3 import B3MultiFormat, B3SingleFormat
from opentelemetry.propagators.textmap import Getter, Setter, TextMapPropagator
from opentelemetry.trace import SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

__all__ = [
    "REQUEST_ID",
    "Propagation",
    "ServerSpan",
    "new_request_id",
    "suppressed_instrumentation",
    "tracer",
    "tracing_enabled",
]

REQUEST_ID = "x-request-id"
_FORMATS: dict[str, TextMapPropagator] = {
    "tracecontext": TraceContextTextMapPropagator(),
    "b3multi": B3MultiFormat(),
    "b3": B3SingleFormat(),
}
_TRACECONTEXT = _FORMATS["tracecontext"]
_B3 = _FORMATS["b3multi"]  # reads the single ``b3`` header too


_TRACERS: dict[int, trace.Tracer] = {}


def tracer() -> trace.Tracer:
    """libmesh's tracer from the current provider (cached per provider)."""
    provider = trace.get_tracer_provider()
    found = _TRACERS.get(id(provider))
    if found is None:
        from .. import __version__

        found = _TRACERS[id(provider)] = provider.get_tracer("libmesh", __version__)
    return found


class _MappingGetter(Getter[Mapping[str, str]]):
    """Reads header mappings whose keys are lower-case (ASGI, grpc metadata, or any
    case-insensitive mapping such as httpx's and requests' headers)."""

    def get(self, carrier: Mapping[str, str], key: str) -> list[str] | None:
        value = carrier.get(key)
        return None if value is None else [value]

    def keys(self, carrier: Mapping[str, str]) -> list[str]:
        return list(carrier.keys())


class _MappingSetter(Setter[MutableMapping[str, str]]):
    def set(self, carrier: MutableMapping[str, str], key: str, value: str) -> None:
        carrier[key] = value


_GETTER = _MappingGetter()
_NO_CONTEXT = Context()  # immutable: one serves every request without a trace
_SETTER = _MappingSetter()


@dataclass(frozen=True, slots=True)
class Propagation:
    """Which trace headers outgoing requests carry: any of ``tracecontext`` (W3C),
    ``b3multi`` (``x-b3-traceid``, …) and ``b3`` (the single header)."""

    formats: Sequence[str] = ("tracecontext", "b3multi")

    def __post_init__(self) -> None:
        unknown = [f for f in self.formats if f not in _FORMATS]
        if unknown:
            raise ValueError(
                f"unknown trace propagation format {', '.join(unknown)}; "
                f"choose from {', '.join(_FORMATS)}"
            )

    @classmethod
    def from_environment(cls, environ: Mapping[str, str]) -> Propagation:
        """``LIBMESH_PROPAGATORS=tracecontext,b3``; else OpenTelemetry's own
        ``OTEL_PROPAGATORS`` (the formats libmesh knows among them), so that libmesh and the
        application's other instrumentation speak the same; else the default."""
        own = environ.get("LIBMESH_PROPAGATORS")
        if own:
            return cls(tuple(p.strip() for p in own.split(",") if p.strip()))
        known = tuple(
            p.strip()
            for p in environ.get("OTEL_PROPAGATORS", "").split(",")
            if p.strip() in _FORMATS
        )
        return cls(known) if known else cls()

    def extract(self, headers: Mapping[str, str]) -> Context:
        """The caller's trace context, from whichever format it sent (W3C first)."""
        if "traceparent" in headers:
            return _TRACECONTEXT.extract(headers, getter=_GETTER)
        if "b3" in headers or "x-b3-traceid" in headers:
            return _B3.extract(headers, getter=_GETTER)
        return _NO_CONTEXT

    def inject(self, headers: MutableMapping[str, str], context: Context | None = None) -> None:
        for name in self.formats:
            _FORMATS[name].inject(headers, context=context, setter=_SETTER)


def new_request_id() -> str:
    """A request id shaped like the random UUID Envoy generates for ``x-request-id``: 80
    random bits drawn once per process (reseeded after a fork) and a 48-bit counter — unique
    across processes as a random UUID is, several times cheaper to make on every request
    (a forked child draws its own: ``os.register_at_fork`` below)."""
    return f"{_state.prefix}{next(_state.counter) & 0xFFFFFFFFFFFF:012x}"


class _RequestIds:
    __slots__ = ("counter", "prefix")

    def __init__(self) -> None:
        self.reseed()

    def reseed(self) -> None:
        bits = random.SystemRandom().getrandbits(80)
        text = f"{bits:020x}"
        # version 4 and the RFC 4122 variant, where a UUID carries them
        self.prefix = (
            f"{text[:8]}-{text[8:12]}-4{text[13:16]}-{8 | (int(text[16], 16) & 3):x}{text[17:20]}-"
        )
        self.counter = itertools.count(random.SystemRandom().getrandbits(32))


_state = _RequestIds()
os.register_at_fork(after_in_child=_state.reseed)


def tracing_enabled() -> bool:
    """Whether the application installed a tracer provider (an SDK). Without one, spans
    would all be no-ops: libmesh then only passes the caller's trace context along.

    Asked on every request: OpenTelemetry sets its provider once per process, so the answer
    is read from the module global it sets when that is there, else through the public call."""
    if _GLOBAL_PROVIDER_KNOWN:
        return trace._TRACER_PROVIDER is not None
    return not isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider)


# (a provider named by OTEL_PYTHON_TRACER_PROVIDER is made on the first public call only)
_GLOBAL_PROVIDER_KNOWN = hasattr(trace, "_TRACER_PROVIDER") and not os.environ.get(
    "OTEL_PYTHON_TRACER_PROVIDER"
)


def _instrumented_server_span() -> trace.Span | None:
    """The server span OpenTelemetry's own instrumentation (ASGI, WSGI, grpc) opened for this
    request, if it did."""
    span = trace.get_current_span()
    if span.is_recording() and getattr(span, "kind", None) is SpanKind.SERVER:
        return span
    return None


def _continues(span: trace.Span, parent: Context) -> bool:
    """Whether another instrumentation's server span continues the caller's trace: it may not
    read the caller's format (B3, when OpenTelemetry is set up for W3C only), and then libmesh's
    own span must carry the trace on."""
    caller = trace.get_current_span(parent).get_span_context()
    return not caller.is_valid or span.get_span_context().trace_id == caller.trace_id


class ServerSpan:
    """The span of one inbound request, current between ``enter`` and ``exit`` (a plain
    object rather than a context manager: this runs for every request)."""

    __slots__ = ("_token", "owned", "span")

    def __init__(self) -> None:
        self.span: trace.Span | None = None
        self._token: object = None
        self.owned = False

    def enter(self, name: str, parent: Context, attributes: dict[str, Any]) -> None:
        """With a tracer: libmesh's span, or another instrumentation's that it annotates."""
        existing = _instrumented_server_span()
        if existing is not None and _continues(existing, parent):
            existing.set_attributes(attributes)
            self.span = existing
            return
        span = tracer().start_span(
            name, context=parent, kind=SpanKind.SERVER, attributes=attributes
        )
        self.span = span
        self._token = otel_context.attach(trace.set_span_in_context(span, parent))
        self.owned = True

    def pass_through(self, parent: Context) -> None:
        """Without a tracer: the caller's context is current, for outbound calls to carry."""
        self._token = otel_context.attach(parent)

    def exit(self, error: BaseException | None) -> None:
        if self._token is not None:
            otel_context.detach(self._token)  # type: ignore[arg-type]
            self._token = None
            span = self.span
            if span is not None and self.owned:
                if error is not None:
                    span.record_exception(error)
                    span.set_status(Status(StatusCode.ERROR, str(error)))
                span.end()


class _Suppressed:
    """Inside an attempt: OpenTelemetry's HTTP instrumentations stay silent (libmesh's
    attempt span is the client span). Nothing to do, and nothing done, until an
    instrumentation package has been imported."""

    __slots__ = ("_token",)

    def __enter__(self) -> None:
        if _instrumentation_loaded():
            self._token: object = otel_context.attach(otel_context.set_value(_SUPPRESS_HTTP, True))
        else:
            self._token = None

    def __exit__(self, *exc: object) -> None:
        if self._token is not None:
            otel_context.detach(self._token)  # type: ignore[arg-type]


def _instrumentation_loaded() -> bool:
    return "opentelemetry.instrumentation.utils" in sys.modules


def suppressed_instrumentation() -> _Suppressed:
    return _Suppressed()
