"""The engine: everything the data plane decides, built only from xDS resources.

:class:`Engine` compiles a :class:`~libmesh.xds.Snapshot` into route tables and live cluster
state. Each request becomes a :class:`Call`, a sans-I/O state machine: the transport asks it what
to do next (reply locally, wait, send an attempt to a host) and tells it what happened (a
response, a failure). Sync and async transports drive the same calls, so they cannot differ in
behaviour; nothing here touches a socket, a thread or an event loop.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.config.route.v3 import route_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm,
)
from google.protobuf.message import Message

from ..config._rules import is_number
from ..xds import CLUSTER, ENDPOINT, LISTENER, ROUTE, Snapshot
from ._balancer import Host, hash_key
from ._cluster import Admission, ClusterKind, ClusterState
from ._inbound import INBOUND_LISTENER, PERMISSIVE, InboundPolicy
from ._request import RequestView
from ._retry import Failure, RetryPolicy
from ._routing import DirectResponse, Forward, HeaderOps, Redirect, RouteTable

__all__ = ["DELIVER", "Attempt", "Backoff", "Call", "Deliver", "Engine", "Fail", "LocalReply"]


@dataclass(frozen=True, slots=True)
class LocalReply:
    """A response the mesh makes itself: a redirect, a direct response, an injected abort, or
    Envoy's 404 (no route), 503 (no healthy upstream, overflow)."""

    status: int
    body: bytes = b""
    headers: tuple[tuple[str, str], ...] = ()
    flags: str = ""


@dataclass(slots=True)
class Attempt:
    """One try: send the request to ``host`` of ``cluster`` within ``timeout`` seconds."""

    number: int
    cluster: ClusterState
    host: Host
    timeout: float | None
    per_try: bool  # the timeout is the per-try timeout (a retry may follow), not the route's
    retry: bool
    path: str | None  # the rewritten path and query, or None to send the request's own
    authority: str | None
    headers: HeaderOps


@dataclass(frozen=True, slots=True)
class Backoff:
    """Wait this long, then ask the call for the next attempt."""

    seconds: float


class Deliver:
    """This attempt's response is the call's response (a singleton: the transport knows the
    attempt)."""

    __slots__ = ()


DELIVER = Deliver()


@dataclass(frozen=True, slots=True)
class Fail:
    """The call failed without a response: ``kind`` is ``connect``, ``timeout`` or ``reset``."""

    kind: str
    flags: str
    message: str


Step = Attempt | Backoff | Deliver | Fail | LocalReply


class Call:
    """One request through the mesh. Not thread-safe: one transport call drives it."""

    __slots__ = (
        "_cluster",
        "_deadline",
        "_engine",
        "_hash",
        "_outstanding",
        "_retries_left",
        "_retry_reserved",
        "_tried",
        "abort",
        "attempts",
        "cookie",
        "decision",
        "delay",
        "failure_reason",
        "flags",
        "replayable",
        "request",
        "service",
        "started",
    )

    def __init__(
        self, engine: Engine, decision: Forward, request: RequestView, service: str = ""
    ) -> None:
        self._engine = engine
        self.decision = decision
        self.request = request
        self.service = service  # the listener's host:port, the service the caller named
        self.started = engine.clock()
        self._deadline = self.started + decision.timeout if decision.timeout else None
        retry = decision.retry
        self._retries_left = retry.num_retries if retry is not None else 0
        self._tried: set[str] = set()
        self._outstanding = 0
        self.attempts = 0
        self.failure_reason = ""  # what the transport said of the last failed attempt
        self.flags: list[str] = []
        self.replayable = True
        self.cookie: tuple[str, str] | None = None  # (name, Set-Cookie value) to add
        self._cluster: ClusterState | None = None
        self._retry_reserved = False
        self._hash = self._hash_key() if decision.hash_policies else None
        self.delay, self.abort = self._fault() if decision.fault is not None else (0.0, None)

    # faults and mirrors ------------------------------------------------------------------------

    def _fault(self) -> tuple[float, LocalReply | None]:
        fault = self.decision.fault
        if fault is None:
            return 0.0, None
        rng = self._engine.rng
        delay = fault.delay if fault.delay and rng.random() < fault.delay_fraction else 0.0
        if delay:
            self.flags.append("DI")
        abort = None
        if fault.abort_fraction and rng.random() < fault.abort_fraction:
            self.flags.append("FI")
            if fault.abort_grpc_status is not None:
                abort = LocalReply(
                    200,
                    headers=(
                        ("content-type", "application/grpc"),
                        ("grpc-status", str(fault.abort_grpc_status)),
                        ("grpc-message", "fault filter abort"),
                    ),
                    flags="FI",
                )
            else:
                abort = LocalReply(fault.abort_status or 503, b"fault filter abort", flags="FI")
        return delay, abort

    def mirrors(self) -> list[tuple[ClusterState, Host]]:
        """Hosts to send a copy of the request to, fire-and-forget, as sampled now."""
        targets = []
        for mirror in self.decision.mirrors:
            if mirror.fraction < 1.0 and self._engine.rng.random() >= mirror.fraction:
                continue
            cluster = self._engine.cluster(mirror.cluster)
            if cluster is None:
                continue
            host = cluster.pick(None, None, 1)
            if host is not None:
                targets.append((cluster, host))
        return targets

    # attempts ----------------------------------------------------------------------------------

    def _hash_key(self) -> int | None:
        for policy in self.decision.hash_policies:
            value: str | None = None
            if policy.kind == "header":
                value = self.request.header(policy.name)
            elif policy.kind == "query":
                value = self.request.query_param(policy.name)
            elif policy.kind == "source_ip":
                value = self.request.source_ip or "local"
            elif policy.kind == "cookie":
                value = self.request.cookie(policy.name)
                if value is None and policy.cookie_ttl is not None:
                    value = f"{self._engine.rng.getrandbits(64):016x}"
                    attributes = f"; Max-Age={int(policy.cookie_ttl)}" if policy.cookie_ttl else ""
                    path = f"; Path={policy.cookie_path}" if policy.cookie_path else ""
                    self.cookie = (
                        policy.name,
                        f'{policy.name}="{value}"{attributes}{path}; HttpOnly',
                    )
            if value is not None:
                return hash_key(value)
        return None

    def next(self) -> Step:
        """The next thing to do: an attempt, or the end of the call."""
        engine = self._engine
        now = engine.clock()
        if self._deadline is not None and now >= self._deadline:
            return self._timed_out()
        cluster = self._cluster
        if cluster is None:
            # The cluster is chosen once per request: retries stay within it, as in Envoy.
            cluster = engine.cluster(self.decision.picker.pick())
            if cluster is None:
                return self._local(LocalReply(503, b"no cluster found", flags="NC"))
            self._cluster = cluster
            cluster.breaker.begin_call()
        step = self._attempt(cluster, now)
        return self._local(step) if isinstance(step, LocalReply) else step

    def _attempt(self, cluster: ClusterState, now: float) -> Attempt | LocalReply:
        """Pick a host and admit an attempt to it, or say why not (without ending the call)."""
        retry = self.attempts > 0
        if cluster.kind is ClusterKind.ORIGINAL_DESTINATION:
            address, _, port = self.request.authority.rpartition(":")
            host: Host | None = cluster.original_destination(
                address or self.request.authority, int(port) if is_number(port) else 80
            )
        else:
            policy = self.decision.retry
            avoid = policy is not None and policy.avoid_previous_hosts and bool(self._tried)
            host = cluster.pick(
                self._hash,
                (lambda h: h.key not in self._tried) if avoid else None,
                policy.host_selection_attempts if (policy is not None and avoid) else 1,
            )
        if host is None:
            return LocalReply(503, b"no healthy upstream", flags="UH")
        if cluster.breaker.admit(host) is Admission.OVERFLOW:
            cluster.stats.upstream_rq_pending_overflow += 1
            return LocalReply(
                503, _OVERFLOW_BODY, headers=(("x-envoy-overloaded", "true"),), flags="UO"
            )
        self._retry_reserved = False  # the attempt now holds the retry it was given
        self.attempts += 1
        self._outstanding += 1
        self._tried.add(host.key)
        stats = cluster.stats
        stats.upstream_rq_total += 1
        if retry:
            stats.upstream_rq_retry += 1
        decision = self.decision
        per_try = decision.retry.per_try_timeout if decision.retry is not None else None
        remaining = self._deadline - now if self._deadline is not None else None
        if per_try is not None and decision.hedge_on_per_try_timeout and self.hedging:
            per_try = None  # the transport's hedge timer fires instead; the attempt runs on
        timeout, is_per_try = _earliest(per_try, remaining)
        ops = decision.cluster_headers.get(cluster.name) if decision.cluster_headers else None
        return Attempt(
            number=self.attempts,
            cluster=cluster,
            host=host,
            timeout=timeout,
            per_try=is_per_try,
            retry=retry,
            path=self._rewritten_path() if decision.rewrites else None,
            authority=decision.host_rewrite,
            headers=ops[0] if ops is not None else decision.request_headers,
        )

    # hedging -----------------------------------------------------------------------------------

    @property
    def hedging(self) -> bool:
        """Whether a per-try timeout starts another attempt beside the slow one (Envoy's
        ``hedge_on_per_try_timeout``) instead of abandoning it."""
        retry = self.decision.retry
        return (
            self.decision.hedge_on_per_try_timeout
            and retry is not None
            and retry.per_try_timeout is not None
            and self.replayable
        )

    @property
    def hedge_delay(self) -> float | None:
        """How long to wait for an attempt before hedging it."""
        retry = self.decision.retry
        return retry.per_try_timeout if retry is not None else None

    def hedge(self) -> Attempt | None:
        """Another attempt to race the outstanding ones, if retries and limits allow one."""
        if self._retries_left <= 0 or self._cluster is None:
            return None
        if not self._cluster.breaker.reserve_retry():
            self._cluster.stats.upstream_rq_retry_overflow += 1
            return None
        self._retry_reserved = True
        self._retries_left -= 1
        step = self._attempt(self._cluster, self._engine.clock())
        if isinstance(step, Attempt):
            return step
        self._cluster.breaker.release_retry()  # no host for a hedge: the others race on
        self._retry_reserved = False
        return None

    def abandon(self, attempt: Attempt) -> None:
        """A raced attempt lost (or failed while another is still running): free its slot."""
        self._release(attempt)

    @property
    def wants_grpc_status(self) -> bool:
        retry = self.decision.retry
        return retry is not None and retry.grpc

    @property
    def outstanding(self) -> int:
        return self._outstanding

    def _local(self, reply: LocalReply) -> LocalReply:
        self.flags.append(reply.flags)
        self._end()
        return reply

    def _rewritten_path(self) -> str | None:
        decision = self.decision
        path = self.request.path
        if decision.prefix_rewrite is not None:
            # Envoy replaces the matched prefix; for exact and regex matches, the whole path.
            matched = len(decision.matched_prefix) if decision.matched_prefix is not None else None
            path = decision.prefix_rewrite + (path[matched:] if matched is not None else "")
            if not path.startswith("/"):
                path = "/" + path
        elif decision.regex_rewrite is not None:
            pattern, substitution = decision.regex_rewrite
            path = pattern.sub(substitution, path)  # type: ignore[attr-defined]
        else:
            return None
        query = self.request.query
        return f"{path}?{query}" if query else path

    def _timed_out(self) -> Fail:
        self.flags.append("UT")
        self._end()
        return Fail("timeout", "UT", "upstream request timeout")

    # outcomes ----------------------------------------------------------------------------------

    def responded(
        self,
        attempt: Attempt,
        status: int,
        headers: Mapping[str, str],
        grpc_status: int | None = None,
    ) -> Step:
        """The attempt got response headers: deliver them, or retry. For gRPC, ``status`` is
        the HTTP status (200) and ``grpc_status`` the call's; outlier detection and the
        statistics see the gRPC status mapped to HTTP, as Envoy reports it (UNAVAILABLE is a
        503), while retries read both as they are."""
        observed = status
        if status == 200 and grpc_status:
            observed = _HTTP_OF_GRPC.get(grpc_status, 500)
        self._observe(attempt, status=observed)
        policy = self.decision.retry
        if policy is not None and policy.retries_status(status, headers, grpc_status):
            step = self._maybe_retry(attempt, policy)
            if step is not None:
                return step
            if self._retries_left <= 0 and self.replayable:
                self.flags.append("URX")  # Envoy: the retry limit is why this answer stands
        return DELIVER

    def failed(self, attempt: Attempt, failure: Failure) -> Step:
        """The attempt got no response."""
        self._observe(attempt, failure=failure)
        timeout = failure is Failure.TIMEOUT
        if timeout and not attempt.per_try:
            self._release(attempt)
            return self._timed_out()
        policy = self.decision.retry
        if policy is not None and policy.retries_failure(failure):
            step = self._maybe_retry(attempt, policy)
            if step is not None:
                return step
        self._release(attempt)
        self._end()
        if timeout:
            self.flags.append("UT")
            return Fail("timeout", "UT", "upstream request timeout")
        flag = {Failure.CONNECT_FAILURE: "UF", Failure.RESET: "UC", Failure.REFUSED_STREAM: "UR"}[
            failure
        ]
        if self.attempts > 1:
            self.flags.append("URX")
        self.flags.append(flag)
        kind = "connect" if failure is Failure.CONNECT_FAILURE else "reset"
        return Fail(kind, flag, _FAILURE_MESSAGES[failure])

    def _observe(
        self, attempt: Attempt, *, status: int | None = None, failure: Failure | None = None
    ) -> None:
        """Tell outlier detection and the statistics how an attempt went."""
        cluster, host = attempt.cluster, attempt.host
        detector, stats = cluster.detector, cluster.stats
        if status is not None:
            if detector is not None:
                if detector.config.split_external_local_origin_errors:
                    detector.report_local_success(host)
                detector.report_status(host, status)
            if status >= 500:
                stats.upstream_rq_5xx += 1
            elif 200 <= status < 300:
                stats.upstream_rq_2xx += 1
        elif failure is not None:
            if failure is Failure.TIMEOUT:
                stats.upstream_rq_timeout += 1
            elif failure is Failure.CONNECT_FAILURE:
                stats.upstream_cx_connect_fail += 1
            if detector is not None:
                detector.report_local_failure(host, timeout=failure is Failure.TIMEOUT)

    def race_settles(
        self,
        attempt: Attempt,
        others_racing: bool,
        *,
        status: int | None = None,
        headers: Mapping[str, str] | None = None,
        grpc_status: int | None = None,
        failure: Failure | None = None,
    ) -> bool:
        """One of several racing attempts came back. It settles the race when it is the last
        one running or a final response (one that would not be retried); otherwise it is
        noted and its slot freed, and the others race on. A settling attempt is then handed
        to :meth:`responded` or :meth:`failed` as usual."""
        if not others_racing:
            return True
        policy = self.decision.retry
        if status is not None and (
            policy is None or not policy.retries_status(status, headers or {}, grpc_status)
        ):
            return True
        self._observe(attempt, status=status, failure=failure)
        self._release(attempt)
        return False

    def _maybe_retry(self, attempt: Attempt, policy: RetryPolicy) -> Backoff | None:
        if self._retries_left <= 0 or not self.replayable:
            return None
        cluster = attempt.cluster
        if not cluster.breaker.reserve_retry():
            # max_retries or the retry budget: the failure stands, the upstream is spared.
            cluster.stats.upstream_rq_retry_overflow += 1
            return None
        self._retry_reserved = True
        self._retries_left -= 1
        self._release(attempt)
        delay = policy.backoff(self.attempts, self._engine.rng)
        if self._deadline is not None:
            delay = min(delay, max(0.0, self._deadline - self._engine.clock()))
        return Backoff(delay)

    def _release(self, attempt: Attempt) -> None:
        attempt.cluster.breaker.release(attempt.host, retry=attempt.retry)
        self._outstanding -= 1

    def _end(self) -> None:
        cluster, self._cluster = self._cluster, None
        if cluster is not None:
            if self._retry_reserved:
                cluster.breaker.release_retry()
                self._retry_reserved = False
            cluster.breaker.end_call()

    def finish(self, attempt: Attempt) -> None:
        """The delivered response has been read or closed: free its slot, end the call."""
        if self._outstanding > 0:
            cluster = self._cluster
            if cluster is not None and not self._retry_reserved:
                # The common end: one lock for the attempt's slot and the call's.
                self._cluster = None
                cluster.breaker.release(attempt.host, retry=attempt.retry, end_call=True)
                self._outstanding -= 1
                return
            self._release(attempt)
            self._end()

    def cancel(self, attempt: Attempt | None = None) -> None:
        """The caller gave up (an exception, a cancellation): free ``attempt``'s slot if it
        was in flight, and the call's, reporting nothing against the upstream."""
        if attempt is not None and self._outstanding > 0:
            self._release(attempt)
        self._end()

    def response_headers(self, attempt: Attempt) -> HeaderOps:
        decision = self.decision
        ops = (
            decision.cluster_headers.get(attempt.cluster.name) if decision.cluster_headers else None
        )
        return ops[1] if ops is not None else decision.response_headers


_OVERFLOW_BODY = (
    b"upstream connect error or disconnect/reset before headers. reset reason: overflow"
)
_FAILURE_MESSAGES = {
    Failure.CONNECT_FAILURE: "upstream connect error or disconnect/reset before headers. "
    "reset reason: connection failure",
    Failure.RESET: "upstream connect error or disconnect/reset before headers. "
    "reset reason: connection termination",
    Failure.REFUSED_STREAM: "upstream connect error or disconnect/reset before headers. "
    "reset reason: remote refused stream reset",
}


def _earliest(per_try: float | None, remaining: float | None) -> tuple[float | None, bool]:
    if per_try is None:
        return remaining, False
    if remaining is None or per_try < remaining:
        return per_try, True
    return remaining, False


@dataclass
class _Tables:
    routes: dict[str, RouteTable] = field(default_factory=dict)  # by listener name
    domains: dict[str, RouteTable] = field(default_factory=dict)
    ports: dict[str, list[int]] = field(default_factory=dict)  # host -> ports with listeners


class Engine:
    """The compiled mesh. ``update`` swaps in new configuration atomically; clusters that stay
    keep their live state (ejections, counters, in-flight requests)."""

    def __init__(
        self,
        snapshot: Snapshot | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
    ) -> None:
        self.clock = clock
        self.rng = rng or random.Random()
        self._clusters: dict[str, ClusterState] = {}
        self._tables = _Tables()
        self._compiled: dict[str, tuple[route_pb2.RouteConfiguration, RouteTable]] = {}
        self._lock = threading.Lock()
        self.version = ""
        self.snapshot: Snapshot | None = None  # the configuration in force (config dumps)
        self.inbound = PERMISSIVE  # what callers may send this workload (PeerAuthentication)
        if snapshot is not None:
            self.update(snapshot)

    def check(self, type_url: str, resource: Message) -> str | None:
        """Why the engine could not use ``resource`` (an xDS resource of ``type_url``), or
        ``None`` when it can: a data plane NACKs what it cannot apply."""
        try:
            if type_url == LISTENER:
                assert isinstance(resource, listener_pb2.Listener)
                if resource.name == INBOUND_LISTENER:
                    InboundPolicy.of(resource)
                elif _route_name(resource) is None:
                    return (
                        "libmesh reads listeners with an api_listener whose HTTP connection "
                        "manager names its routes (rds)"
                    )
            elif type_url == ROUTE:
                assert isinstance(resource, route_pb2.RouteConfiguration)
                RouteTable.compile(resource)
            elif type_url == CLUSTER:
                assert isinstance(resource, cluster_pb2.Cluster)
                ClusterState(resource, self.clock, random.Random(0))
            elif type_url == ENDPOINT:
                assert isinstance(resource, endpoint_pb2.ClusterLoadAssignment)
                return _check_assignment(resource)
            else:
                return f"libmesh does not read {type_url}"
        except Exception as exc:  # whatever a resource makes the compiler raise is a rejection
            detail = exc.args[0] if exc.args else ""
            if isinstance(detail, bytes):  # re2 reports its errors as bytes
                detail = detail.decode(errors="replace")
            return f"{type(exc).__name__}: {detail}" if detail else type(exc).__name__
        return None

    def update(self, snapshot: Snapshot) -> None:
        tables = _Tables()
        compiled: dict[str, tuple[route_pb2.RouteConfiguration, RouteTable]] = {}
        for name, listener in snapshot.listeners.items():
            route_name = _route_name(listener) or name
            route_config = snapshot.routes.get(route_name)
            if route_config is None:
                continue
            # The same route configuration object as last time (a client's cache keeps the
            # ones that did not change) keeps its compiled table, and its weighted pickers'
            # place in their rotation.
            known = self._compiled.get(route_name)
            if known is not None and known[0] is route_config:
                table = known[1]
            else:
                table = RouteTable.compile(route_config)
            compiled[route_name] = (route_config, table)
            tables.routes[name] = table
            for vhost in route_config.virtual_hosts:
                for domain in vhost.domains:
                    tables.domains.setdefault(domain.lower(), table)
            host, _, port = name.rpartition(":")
            if is_number(port):
                tables.ports.setdefault(host, []).append(int(port))
        with self._lock:
            clusters = {}
            for name, proto in snapshot.clusters.items():
                state = self._clusters.get(name)
                if state is None:
                    state = ClusterState(proto, self.clock, self.rng)
                else:
                    state.configure(proto)
                assignment = snapshot.endpoints.get(name)
                if assignment is not None:
                    state.set_endpoints(assignment)
                clusters[name] = state
            self._clusters = clusters
            self._tables = tables
            self._compiled = compiled
            inbound = snapshot.listeners.get(INBOUND_LISTENER)
            self.inbound = InboundPolicy.of(inbound) if inbound is not None else PERMISSIVE
            self.version = snapshot.version
            self.snapshot = snapshot

    def cluster(self, name: str) -> ClusterState | None:
        return self._clusters.get(name)

    @property
    def clusters(self) -> Mapping[str, ClusterState]:
        return self._clusters

    def route_table(self, host: str, port: int | None) -> RouteTable | None:
        """The routes for a request to ``host:port``; ``None`` when the mesh does not know it.

        Without an explicit port, a service with a single HTTP port is found by its name alone.
        """
        domains = self._tables.domains
        host = host.lower()
        if port is not None:
            table = domains.get(f"{host}:{port}")
            if table is not None:
                return table
            if port not in (80, 443):
                return None
        table = domains.get(host)
        if table is None:
            return None
        return table

    def start(self, host: str, port: int | None, request: RequestView) -> Call | LocalReply | None:
        """Begin a request to ``host:port``: a call to drive, a local reply, or ``None`` to
        pass the request through untouched (a host the mesh does not know)."""
        table = self.route_table(host, port)
        if table is None:
            return None
        decision = table.match(request)
        if decision is None:
            return LocalReply(404, flags="NR")
        if isinstance(decision, Redirect):
            return LocalReply(decision.status, headers=(("location", decision.location(request)),))
        if isinstance(decision, DirectResponse):
            return LocalReply(decision.status, decision.body)
        return Call(self, decision, request, table.name)


# Envoy's Grpc::Utility::grpcToHttpStatus.
_HTTP_OF_GRPC = {
    1: 499, 2: 500, 3: 400, 4: 504, 5: 404, 6: 409, 7: 403, 8: 429, 9: 400, 10: 409, 11: 400,
    12: 501, 13: 500, 14: 503, 15: 500, 16: 401,
}  # fmt: skip


def _check_assignment(assignment: endpoint_pb2.ClusterLoadAssignment) -> str | None:
    for group in assignment.endpoints:
        for lb_endpoint in group.lb_endpoints:
            address = lb_endpoint.endpoint.address
            if address.HasField("pipe"):
                if not address.pipe.path:
                    return "an endpoint has an empty pipe path"
                continue
            socket = address.socket_address
            if not socket.address:
                return "an endpoint has no address"
            if not 1 <= socket.port_value <= 65535:
                return f"endpoint {socket.address} has port {socket.port_value}, not 1-65535"
    return None


def _route_name(listener: listener_pb2.Listener) -> str | None:
    if not listener.HasField("api_listener"):
        return None
    manager = hcm.HttpConnectionManager()
    if not listener.api_listener.api_listener.Unpack(manager):
        return None
    if manager.HasField("rds"):
        return str(manager.rds.route_config_name)
    if manager.HasField("route_config"):
        return str(manager.route_config.name)
    return None
