"""What is requests' own about the requests adapter, against real servers on 127.0.0.1.

The mesh's behaviour through requests is tests/integration/test_data_plane.py (its ``connect``
fixture runs every test with requests too); here: streaming, timeouts, errors a requests user
catches, hosts outside the mesh, cookies, redirects the Session follows, ``response.libmesh``.
"""

from __future__ import annotations

import gzip
import json
import random
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest
import requests

import libmesh
from libmesh.transport import (
    MeshAdapter,
    MeshResponse,
    RequestsUpstreamConnectError,
    RequestsUpstreamError,
    RequestsUpstreamReset,
    RequestsUpstreamTimeout,
)
from tests.conftest import Backends, service, unused_port

URL = "http://reviews.shop.svc.cluster.local:8080"
FILES = "http://files.shop.svc.cluster.local:8080"
REVIEWS = "outbound|8080||reviews.shop.svc.cluster.local"
FILES_CLUSTER = "outbound|8080||files.shop.svc.cluster.local"
MeshDir = Callable[..., Path]
StartBackends = Callable[[int], Backends]


# -- a server for what tests/backend.py does not do: paced chunks, gzip, cookies -----------------


class FileServer(ThreadingHTTPServer):
    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.release = threading.Event()  # the test has the first chunk: send the rest
        self.released_in_time = False

    @property
    def port(self) -> int:
        return int(self.server_address[1])


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: FileServer

    def do_GET(self) -> None:
        if self.path == "/stream":
            self.send_response(200)
            self.send_header("content-type", "text/plain")
            self.send_header("transfer-encoding", "chunked")
            self.end_headers()
            self._chunk(b"first part\n")
            self.server.released_in_time = self.server.release.wait(5)
            self._chunk(b"second part\n")
            self.wfile.write(b"0\r\n\r\n")
        elif self.path == "/gzip":
            body = gzip.compress(json.dumps({"compressed": True}).encode())
            self._reply(body, ("content-encoding", "gzip"), ("content-type", "application/json"))
        elif self.path == "/login":
            cookies = ("set-cookie", "session=s1; Path=/"), ("set-cookie", "theme=dark")
            self._reply(b"welcome", *cookies)
        elif self.path == "/truncated":
            self.send_response(200)
            self.send_header("content-length", "100")
            self.end_headers()
            self.wfile.write(b"only ten b")
            self.close_connection = True
        else:
            self._reply(self.headers.get("cookie", "").encode())

    def _chunk(self, data: bytes) -> None:
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))

    def _reply(self, body: bytes, *headers: tuple[str, str]) -> None:
        self.send_response(200)
        for name, value in headers:
            self.send_header(name, value)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def file_server() -> Iterator[FileServer]:
    server = FileServer()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.release.set()
    server.shutdown()
    server.server_close()
    thread.join(timeout=5)


@pytest.fixture
def sessions() -> Iterator[Callable[[libmesh.Mesh], requests.Session]]:
    """``mesh.session()``, closed (with its mesh) at the end."""
    made: list[tuple[libmesh.Mesh, requests.Session]] = []

    def make(mesh: libmesh.Mesh) -> requests.Session:
        session = mesh.session()
        made.append((mesh, session))
        return session

    yield make
    for mesh, session in made:
        session.close()
        mesh.close()


Sessions = Callable[[libmesh.Mesh], requests.Session]


def mesh_of(path: Path, **kwargs: object) -> libmesh.Mesh:
    options: dict[str, object] = {"namespace": "shop", "watch": False, "rng": random.Random(7)}
    options.update(kwargs)
    return libmesh.Mesh.from_files(path, **options)  # type: ignore[arg-type]


def virtual_service(body: str) -> str:
    return f"""
    apiVersion: networking.istio.io/v1
    kind: VirtualService
    metadata: {{name: reviews, namespace: shop}}
    spec:
      hosts: [reviews]
      http:
      {body}
    """


# -- streaming -----------------------------------------------------------------------------------


def test_stream_true_hands_over_chunks_as_they_arrive_and_closing_ends_the_call(
    file_server: FileServer, mesh_dir: MeshDir, sessions: Sessions
) -> None:
    mesh = mesh_of(mesh_dir(service("files", "shop", [file_server.port])))
    session = sessions(mesh)
    breaker = None

    with session.get(FILES + "/stream", stream=True) as response:
        breaker = mesh.engine.clusters[FILES_CLUSTER].breaker
        assert (breaker.in_flight, breaker.calls) == (1, 1)  # the call lasts as long as the body
        chunks = response.iter_content(chunk_size=len(b"first part\n"))
        first = next(chunks)  # the server holds the second part back until we have this one
        file_server.release.set()
        rest = b"".join(chunks)

    assert first == b"first part\n"
    assert rest == b"second part\n"
    assert file_server.released_in_time
    assert (breaker.in_flight, breaker.calls) == (0, 0)


def test_closing_a_streamed_response_unread_ends_the_call(
    start_backends: StartBackends, mesh_dir: MeshDir, sessions: Sessions
) -> None:
    backends = start_backends(1)
    mesh = mesh_of(mesh_dir(service("reviews", "shop", backends.ports)))
    session = sessions(mesh)

    response = session.get(URL + "/x", stream=True)
    breaker = mesh.engine.clusters[REVIEWS].breaker
    in_flight = (breaker.in_flight, breaker.calls)
    start = response.raw.read(13)
    response.close()

    assert in_flight == (1, 1)
    assert start == b'{"instance": '
    assert (breaker.in_flight, breaker.calls) == (0, 0)
    assert response.raw.closed


def test_without_stream_the_body_is_read_and_the_call_ends_before_send_returns(
    start_backends: StartBackends, mesh_dir: MeshDir, sessions: Sessions
) -> None:
    backends = start_backends(1)
    mesh = mesh_of(mesh_dir(service("reviews", "shop", backends.ports)))
    adapter = sessions(mesh).get_adapter(URL)
    prepared = requests.Request("GET", URL + "/x").prepare()

    response = adapter.send(prepared)

    breaker = mesh.engine.clusters[REVIEWS].breaker
    assert (breaker.in_flight, breaker.calls) == (0, 0)
    assert response.raw.closed
    assert response.json()["path"] == "/x"


def test_content_encoding_is_decoded_as_requests_decodes_it(
    file_server: FileServer, mesh_dir: MeshDir, sessions: Sessions
) -> None:
    session = sessions(mesh_of(mesh_dir(service("files", "shop", [file_server.port]))))

    decoded = session.get(FILES + "/gzip")
    with session.get(FILES + "/gzip", stream=True) as raw:
        as_sent = raw.raw.read()

    assert decoded.headers["content-encoding"] == "gzip"
    assert decoded.json() == {"compressed": True}
    assert gzip.decompress(as_sent) == b'{"compressed": true}'  # raw.read() is what was sent


def test_a_body_cut_short_is_requests_chunked_encoding_error_and_ends_the_call(
    file_server: FileServer, mesh_dir: MeshDir, sessions: Sessions
) -> None:
    mesh = mesh_of(mesh_dir(service("files", "shop", [file_server.port])))
    session = sessions(mesh)

    with pytest.raises(requests.exceptions.ChunkedEncodingError):
        session.get(FILES + "/truncated")

    breaker = mesh.engine.clusters[FILES_CLUSTER].breaker
    assert (breaker.in_flight, breaker.calls) == (0, 0)


# -- what the mesh did, and requests' own fields --------------------------------------------------


def test_response_libmesh_says_what_the_mesh_did_and_requests_fields_are_set(
    start_backends: StartBackends, mesh_dir: MeshDir, sessions: Sessions
) -> None:
    backends = start_backends(1)
    backends.behave(0, status=503, fail_first=2)
    path = mesh_dir(
        service("reviews", "shop", backends.ports),
        virtual_service(
            """
      - name: flaky-reviews
        route: [{destination: {host: reviews}}]
        retries: {attempts: 3, retryOn: 5xx}
            """
        ),
    )
    session = sessions(mesh_of(path))

    response = session.get(URL + "/flaky", params={"q": "1"})

    assert isinstance(response, MeshResponse)
    assert response.libmesh == libmesh.MeshInfo(
        response_flags="-",
        attempts=3,
        route="flaky-reviews",
        cluster=REVIEWS,
        upstream_host=f"127.0.0.1:{backends.ports[0]}",
    )
    assert response.status_code == 200
    assert response.url == URL + "/flaky?q=1"
    assert response.request.url == response.url
    assert response.headers["Content-Type"] == response.headers["content-type"]
    assert response.encoding == "utf-8"  # requests' rule for application/json
    assert response.json()["host"] == "reviews.shop.svc.cluster.local:8080"


def test_a_local_reply_has_libmesh_too(mesh_dir: MeshDir, sessions: Sessions) -> None:
    path = mesh_dir(
        service("reviews", "shop", [unused_port()]),
        virtual_service("- directResponse: {status: 418, body: {string: teapot}}"),
    )
    session = sessions(mesh_of(path))

    response = session.get(URL + "/x")

    assert response.status_code == 418
    assert response.text == "teapot"
    assert isinstance(response, MeshResponse)
    assert response.libmesh is not None
    assert response.libmesh.attempts == 0  # answered by the mesh itself


# -- timeouts and errors -------------------------------------------------------------------------


def test_the_route_timeout_is_an_upstream_timeout_and_a_requests_read_timeout(
    start_backends: StartBackends, mesh_dir: MeshDir, sessions: Sessions
) -> None:
    backends = start_backends(1)
    backends.behave(0, delay=2)
    path = mesh_dir(
        service("reviews", "shop", backends.ports),
        virtual_service("- {route: [{destination: {host: reviews}}], timeout: 200ms}"),
    )
    session = sessions(mesh_of(path))

    started = time.monotonic()
    with pytest.raises(requests.Timeout) as raised:
        session.get(URL + "/slow")

    error = raised.value
    assert time.monotonic() - started < 1.5
    assert isinstance(error, RequestsUpstreamTimeout)
    assert isinstance(error, requests.ReadTimeout)
    assert isinstance(error, libmesh.UpstreamTimeout)
    assert isinstance(error, httpx.TimeoutException)
    assert (error.response_flags, error.attempts) == ("UT", 1)
    assert isinstance(error.request, requests.PreparedRequest)
    assert error.request.url == URL + "/slow"
    assert error.response is None
    assert isinstance(error.__cause__, libmesh.UpstreamTimeout)


def test_a_requests_timeout_tuple_bounds_a_call_to_a_mesh_host(
    start_backends: StartBackends, mesh_dir: MeshDir, sessions: Sessions
) -> None:
    backends = start_backends(1)
    backends.behave(0, delay=1)
    session = sessions(mesh_of(mesh_dir(service("reviews", "shop", backends.ports))))

    started = time.monotonic()
    with pytest.raises(requests.ReadTimeout) as raised:
        session.get(URL + "/slow", timeout=(1, 0.2))

    assert time.monotonic() - started < 0.8
    assert isinstance(raised.value, RequestsUpstreamTimeout)
    assert raised.value.response_flags == "UT"


def test_an_unreachable_service_is_a_requests_connection_error_with_envoy_flags(
    mesh_dir: MeshDir, sessions: Sessions
) -> None:
    session = sessions(mesh_of(mesh_dir(service("reviews", "shop", [unused_port()]))))

    with pytest.raises(requests.ConnectionError) as raised:
        session.get(URL + "/x")

    error = raised.value
    assert isinstance(error, RequestsUpstreamConnectError)
    assert isinstance(error, libmesh.UpstreamConnectError)
    assert isinstance(error, httpx.ConnectError)
    assert isinstance(error, ConnectionError)
    assert (error.response_flags, error.attempts) == ("URX,UF", 3)
    assert "URX,UF" in str(error)


@pytest.mark.parametrize(
    ("error_class", "requests_class", "libmesh_class"),
    [
        (RequestsUpstreamConnectError, requests.ConnectionError, libmesh.UpstreamConnectError),
        (RequestsUpstreamTimeout, requests.ReadTimeout, libmesh.UpstreamTimeout),
        (RequestsUpstreamReset, requests.ConnectionError, libmesh.UpstreamReset),
    ],
)
def test_the_requests_flavoured_errors_can_be_made_and_are_both_kinds(
    error_class: type[RequestsUpstreamError],
    requests_class: type[Exception],
    libmesh_class: type[Exception],
) -> None:
    prepared = requests.Request("GET", URL + "/x").prepare()

    error = error_class("no healthy upstream", request=prepared, response_flags="UF", attempts=2)

    assert isinstance(error, requests_class)
    assert isinstance(error, libmesh_class)
    assert isinstance(error, libmesh.MeshError)
    assert isinstance(error, httpx.TransportError)
    assert str(error) == "no healthy upstream"
    assert error.request is prepared
    assert error.response is None
    assert (error.response_flags, error.attempts) == ("UF", 2)
    with pytest.raises(requests_class):
        raise error


# -- hosts outside the mesh ----------------------------------------------------------------------


def test_a_host_outside_the_mesh_passes_through_with_plain_requests_errors(
    start_backends: StartBackends, mesh_dir: MeshDir, sessions: Sessions
) -> None:
    backends = start_backends(2)
    session = sessions(mesh_of(mesh_dir(service("reviews", "shop", backends.ports[:1]))))
    direct = f"http://127.0.0.1:{backends.ports[1]}"

    response = session.get(direct + "/direct")
    with pytest.raises(requests.ConnectionError) as refused:
        session.get(f"http://127.0.0.1:{unused_port()}/x")
    backends.behave(1, delay=1)
    started = time.monotonic()
    with pytest.raises(requests.ReadTimeout) as slow:
        session.get(direct + "/slow", timeout=(1, 0.2))

    assert response.json()["instance"] == "instance-1"
    assert isinstance(response, MeshResponse)
    assert response.libmesh is None
    assert not isinstance(refused.value, libmesh.MeshError)
    assert isinstance(refused.value.__cause__, httpx.ConnectError)
    assert refused.value.request is not None
    assert not isinstance(slow.value, libmesh.MeshError)
    assert time.monotonic() - started < 0.8


# -- cookies and redirects -----------------------------------------------------------------------


def test_the_session_keeps_cookies_the_service_sets(
    file_server: FileServer, mesh_dir: MeshDir, sessions: Sessions
) -> None:
    session = sessions(mesh_of(mesh_dir(service("files", "shop", [file_server.port]))))

    login = session.get(FILES + "/login")
    echoed = session.get(FILES + "/echo")

    assert login.cookies.get_dict() == {"session": "s1", "theme": "dark"}
    assert session.cookies.get_dict() == {"session": "s1", "theme": "dark"}
    assert sorted(echoed.text.split("; ")) == ["session=s1", "theme=dark"]


AFFINITY_COOKIE = """
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: reviews, namespace: shop}
spec:
  host: reviews
  trafficPolicy:
    loadBalancer:
      consistentHash: {httpCookie: {name: affinity, ttl: 3600s}}
"""


def test_a_mesh_made_affinity_cookie_keeps_a_session_on_one_host(
    start_backends: StartBackends, mesh_dir: MeshDir, sessions: Sessions
) -> None:
    backends = start_backends(4)
    mesh = mesh_of(mesh_dir(service("reviews", "shop", backends.ports), AFFINITY_COOKIE))
    homes = set()
    for _ in range(8):
        session = sessions(mesh)
        first = session.get(URL + "/x")
        after = [session.get(URL + "/x").json() for _ in range(10)]

        assert first.headers["set-cookie"].startswith('affinity="')
        cookie = f"affinity={session.cookies['affinity']}"
        assert {a["headers"]["cookie"] for a in after} == {cookie}
        assert len({a["instance"] for a in after}) == 1
        homes |= {a["instance"] for a in after}

    assert len(homes) >= 2  # each session has its own cookie, and so its own host


def test_a_session_stays_on_the_host_of_its_first_request(
    start_backends: StartBackends, mesh_dir: MeshDir, sessions: Sessions
) -> None:
    backends = start_backends(4)
    mesh = mesh_of(mesh_dir(service("reviews", "shop", backends.ports), AFFINITY_COOKIE))

    for _ in range(8):
        session = sessions(mesh)
        assert len({session.get(URL + "/x").json()["instance"] for _ in range(3)}) == 1


def test_the_session_follows_the_mesh_redirects(
    start_backends: StartBackends, mesh_dir: MeshDir, sessions: Sessions
) -> None:
    backends = start_backends(1)
    path = mesh_dir(
        service("reviews", "shop", backends.ports),
        virtual_service(
            """
      - match: [{uri: {prefix: /old/}}]
        redirect: {uri: /new/, redirectCode: 308}
      - route: [{destination: {host: reviews}}]
            """
        ),
    )
    session = sessions(mesh_of(path))

    response = session.get(URL + "/old/page?q=1")
    not_followed = session.get(URL + "/old/page", allow_redirects=False)

    assert response.status_code == 200
    assert response.url == URL + "/new/?q=1"
    assert response.json()["path"] == "/new/?q=1"
    assert [r.status_code for r in response.history] == [308]
    assert not_followed.status_code == 308
    assert not_followed.is_redirect
    assert backends.requests(0) == 1


# -- the adapter and the session -----------------------------------------------------------------


def test_mesh_session_mounts_the_adapter_for_http_only(
    mesh_dir: MeshDir, sessions: Sessions
) -> None:
    session = sessions(mesh_of(mesh_dir(service("reviews", "shop", [unused_port()]))))

    assert isinstance(session.get_adapter("http://reviews:8080/"), MeshAdapter)
    assert not isinstance(session.get_adapter("https://reviews:8443/"), MeshAdapter)


def test_tls_settings_a_request_asks_for_are_not_silently_ignored(
    mesh_dir: MeshDir, sessions: Sessions
) -> None:
    mesh = mesh_of(mesh_dir(service("reviews", "shop", [unused_port()])))
    session = sessions(mesh)
    session.mount("https://", mesh.requests_adapter())

    with pytest.raises(ValueError, match=r"mesh.requests_adapter\(verify=..., cert=...\)"):
        session.get(f"https://127.0.0.1:{unused_port()}/", verify=False)


def test_importing_libmesh_does_not_import_requests() -> None:
    code = "import sys, libmesh; sys.exit('requests' in sys.modules)"

    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0
