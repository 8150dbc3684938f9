"""The proxy's pure pieces: the URL it builds for the service (the same as httpx's parse), the
headers it passes on, and the x-forwarded-client-cert it writes."""

from __future__ import annotations

import hashlib

import httpx
import pytest

from libmesh.proxy import forwarded_headers, xfcc
from libmesh.proxy._forward import forwarded_entries, service_url
from libmesh.transport._httpx import wire_headers, wire_request


@pytest.mark.parametrize(
    "target",
    [
        b"/",
        b"/items",
        b"/items?id=7&sort=-price",
        b"/a/b/c?",
        b"/search?q=a+b&x=%20y",  # percent-encoded: httpx's parse
        b"/a/./b/../c",  # dot segments: httpx's parse
        b"/caf\xc3\xa9",  # not ASCII: httpx's parse
        b"/path;param=1:@!$&'()*,=",
    ],
)
@pytest.mark.parametrize(
    "authority", ["reviews.shop.svc.cluster.local:8080", "reviews", "10.0.0.1"]
)
def test_the_service_url_is_what_httpx_would_parse(authority: str, target: bytes) -> None:
    expected = httpx.URL(f"http://{authority}{target.decode('latin-1')}")

    url = service_url(authority, target)

    assert url == expected
    assert (url.host, url.port, url.raw_path, url.query) == (
        expected.host,
        expected.port,
        expected.raw_path,
        expected.query,
    )


def test_a_bad_authority_is_refused_as_httpx_refuses_it() -> None:
    with pytest.raises(httpx.InvalidURL):
        service_url("reviews:notaport", b"/")


def test_hop_by_hop_headers_and_those_connection_names_stay_behind() -> None:
    headers = [
        (b"Host", b"a"),
        (b"Connection", b"keep-alive, X-Trace-Hop"),
        (b"X-Trace-Hop", b"1"),
        (b"Proxy-Connection", b"keep-alive"),
        (b"Transfer-Encoding", b"chunked"),
        (b"x-keep", b"yes"),
    ]
    assert forwarded_headers(headers) == [(b"Host", b"a"), (b"x-keep", b"yes")]
    assert forwarded_headers(headers, drop=frozenset({b"x-keep"})) == [(b"Host", b"a")]


def test_connection_close_is_told_and_te_trailers_kept_unless_connection_names_it() -> None:
    def entries(pairs: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes, bytes]]:
        return [(name, name.lower(), value) for name, value in pairs]

    kept, tokens = forwarded_entries(entries([(b"Connection", b"Close"), (b"TE", b"trailers")]))
    assert tokens == {b"close"}
    assert kept == [(b"TE", b"te", b"trailers")]  # gRPC's, kept end to end
    kept, tokens = forwarded_entries(entries([(b"Connection", b"TE"), (b"TE", b"trailers")]))
    assert (kept, tokens) == ([], {b"te"})


@pytest.mark.parametrize(
    ("method", "headers", "body"),
    [
        ("GET", [(b"Host", b"a:8080"), (b"Accept", b"*/*")], b""),
        ("GET", [(b"Accept", b"*/*")], b""),  # no Host: the URL's
        ("POST", [(b"Host", b"a:8080")], b""),  # an empty POST says Content-Length: 0
        ("PUT", [(b"host", b"a:8080"), (b"content-type", b"text/plain")], b"some body"),
        ("POST", [(b"Host", b"a:8080"), (b"Content-Length", b"4")], b"body"),
        ("DELETE", [(b"Host", b"a:8080"), (b"X-Caf\xc3\xa9", b"\xff")], b"gone"),
    ],
)
def test_a_request_off_the_wire_is_the_one_httpx_would_make(
    method: str, headers: list[tuple[bytes, bytes]], body: bytes
) -> None:
    url = httpx.URL("http://a:8080/items?x=1")
    expected = httpx.Request(method, url, headers=headers, content=body)

    request = wire_request(method, url, [(n, n.lower(), v) for n, v in headers], body)

    assert sorted(request.headers.multi_items()) == sorted(expected.headers.multi_items())
    assert sorted(request.headers.raw) == sorted(expected.headers.raw)
    assert (request.method, request.url, request.content) == (method, url, body)
    assert b"".join(request.stream) == body  # type: ignore[arg-type]
    made = httpx.Headers()
    wire_headers(made, headers)
    assert (made.raw, made.multi_items()) == (headers, httpx.Headers(headers).multi_items())


def test_xfcc_is_envoys_by_hash_uri() -> None:
    der = b"certificate bytes"
    value = xfcc("spiffe://td/ns/a/sa/server", "spiffe://td/ns/a/sa/client", der)
    assert value == (
        b"By=spiffe://td/ns/a/sa/server;Hash=" + hashlib.sha256(der).hexdigest().encode()
        + b";URI=spiffe://td/ns/a/sa/client"
    )  # fmt: skip
