"""What a user sees for a mistake in Istio YAML: the line, the field, and what is wrong.

Each case below is one small document with one mistake. Loading it must report exactly one
error, on the line of the offending key (counted in the YAML as written, starting at 1), with
the field path ``meshctl validate`` prints (``spec.http[0].route[0].weight``, map entries as
``headers[x-user]``) and a message that says what is wrong. The resource is then rejected.
"""

from __future__ import annotations

from textwrap import dedent

import pytest

from libmesh.config import Finding, LoadResult, Severity, load_text

FILE = "mesh.yaml"


def load(text: str) -> LoadResult:
    return load_text(dedent(text), file=FILE)


def report(result: LoadResult) -> str:
    return "\n".join(finding.format(with_code=True) for finding in result.findings)


def the_only_error(result: LoadResult) -> Finding:
    assert len(result.errors) == 1, f"expected exactly one error, got:\n{report(result)}"
    return result.errors[0]


# -- VirtualService --------------------------------------------------------------------------------

VIRTUAL_SERVICE = [
    pytest.param(
        """\
        apiVersion: networking.istio.io/v1
        kind: VirtualService
        metadata:
          name: reviews
        spec:
          hosts: [reviews]
          http:
          - route:
            - destination:
                host: reviews
              wieght: 100
        """,
        11,
        "spec.http[0].route[0].wieght",
        "unknown field 'wieght'; did you mean 'weight'?",
        id="vs-misspelt-weight-suggests-weight",
    ),
    pytest.param(
        """\
        apiVersion: networking.istio.io/v1
        kind: VirtualService
        metadata:
          name: reviews
        spec:
          host: [reviews]
          http:
          - route:
            - destination:
                host: reviews
        """,
        6,
        "spec.host",
        "did you mean 'hosts'?",
        id="vs-host-instead-of-hosts",
    ),
    pytest.param(
        """\
        apiVersion: networking.istio.io/v1
        kind: VirtualService
        metadata:
          name: reviews
        spec:
          hosts: reviews
          http:
          - route:
            - destination:
                host: reviews
        """,
        6,
        "spec.hosts",
        "expected a list, found a string; write it as a list item: '- reviews'",
        id="vs-hosts-not-a-list",
    ),
    pytest.param(
        """\
        apiVersion: networking.istio.io/v1
        kind: VirtualService
        metadata:
          name: reviews
        spec:
          hosts: [reviews]
          http:
          - retries:
              attempts: three
            route:
            - destination:
                host: reviews
        """,
        9,
        "spec.http[0].retries.attempts",
        "expected an integer, found a string ('three')",
        id="vs-attempts-not-an-integer",
    ),
    pytest.param(
        """\
        apiVersion: networking.istio.io/v1
        kind: VirtualService
        metadata:
          name: reviews
        spec:
          hosts: [reviews]
          http:
          - redirect:
              derivePort: from_request_port
        """,
        9,
        "spec.http[0].redirect.derivePort",
        "did you mean 'FROM_REQUEST_PORT'?",
        id="vs-enum-in-lower-case",
    ),
    pytest.param(
        """\
        apiVersion: networking.istio.io/v1
        kind: VirtualService
        metadata:
          name: reviews
        spec:
          hosts: [reviews]
          http:
          - match:
            - uri:
                exact: /login
                prefix: /log
            route:
            - destination:
                host: reviews
        """,
        11,
        "spec.http[0].match[0].uri.prefix",
        "'exact' and 'prefix' cannot be set together",
        id="vs-uri-exact-and-prefix",
    ),
    pytest.param(
        """\
        apiVersion: networking.istio.io/v1
        kind: VirtualService
        metadata:
          name: reviews
        spec:
          hosts: [reviews]
          http:
          - fault:
              abort:
                httpStatus: 503
                grpcStatus: UNAVAILABLE
            route:
            - destination:
                host: reviews
        """,
        11,
        "spec.http[0].fault.abort.grpcStatus",
        "'httpStatus' and 'grpcStatus' cannot be set together",
        id="vs-abort-http-and-grpc-status",
    ),
    pytest.param(
        """\
        apiVersion: networking.istio.io/v1
        kind: VirtualService
        metadata:
          name: reviews
        spec:
          hosts: [reviews]
          http:
          - route:
            - destination:
                host: reviews
                host: ratings
        """,
        11,
        "spec.http[0].route[0].destination.host",
        "'host' is given twice (first on line 10)",
        id="vs-duplicate-key",
    ),
    pytest.param(
        """\
        apiVersion: networking.istio.io/v1
        kind: VirtualService
        metadata:
          name: reviews
        spec:
          hosts: [reviews]
          http:
          - route:
            - destination: {host: reviews, subset: v1}
              weight: 70
            - destination: {host: reviews, subset: v2}
              weight: 20
        """,
        8,
        "spec.http[0].route",
        "total 90; they must total 100",
        id="vs-weights-do-not-total-100",
    ),
    pytest.param(
        """\
        apiVersion: networking.istio.io/v1
        kind: VirtualService
        metadata:
          name: reviews
        spec:
          hosts: [reviews]
          http:
          - match:
            - uri:
                regex: "/api/(?!internal).*"
            route:
            - destination:
                host: reviews
        """,
        10,
        "spec.http[0].match[0].uri.regex",
        "is not a valid RE2 regex",
        id="vs-regex-with-lookahead",
    ),
    pytest.param(
        """\
        apiVersion: networking.istio.io/v1
        kind: VirtualService
        metadata:
          name: reviews
        spec:
          hosts: [reviews]
          http:
          - match:
            - headers:
                x-user:
                  regex: '(a+)\\1'
            route:
            - destination:
                host: reviews
        """,
        11,
        "spec.http[0].match[0].headers[x-user].regex",
        "which has no backreferences or lookaround",
        id="vs-header-regex-with-backreference",
    ),
    pytest.param(
        """\
        apiVersion: networking.istio.io/v1
        kind: VirtualService
        metadata:
          name: reviews
        spec:
          hosts: [reviews]
          http:
          - timeout: 5 seconds
            route:
            - destination:
                host: reviews
        """,
        8,
        "spec.http[0].timeout",
        "'5 seconds' is not a duration",
        id="vs-timeout-malformed",
    ),
    pytest.param(
        """\
        apiVersion: networking.istio.io/v1
        kind: VirtualService
        metadata:
          name: reviews
        spec:
          hosts: [reviews]
          http:
          - timeout: 5
            route:
            - destination:
                host: reviews
        """,
        8,
        "spec.http[0].timeout",
        "a duration needs a unit: write '5s' for seconds",
        id="vs-timeout-without-unit",
    ),
    pytest.param(
        """\
        apiVersion: networking.istio.io/v1
        kind: VirtualService
        metadata:
          name: reviews
        spec:
          hosts: [reviews]
          http:
          - retries:
              attempts: 3
              perTryTimeout: 0s
            route:
            - destination:
                host: reviews
        """,
        10,
        "spec.http[0].retries.perTryTimeout",
        "shorter than the 1ms minimum",
        id="vs-per-try-timeout-below-1ms",
    ),
    pytest.param(
        """\
        apiVersion: networking.istio.io/v1
        kind: VirtualService
        metadata:
          name: reviews
        spec:
          hosts: [reviews]
          http:
          - retries:
              attempts: 3
              retryOn: 5xx,connect-failure,timeout
            route:
            - destination:
                host: reviews
        """,
        10,
        "spec.http[0].retries.retryOn",
        "'timeout' is not a retry condition",
        id="vs-unknown-retry-on-condition",
    ),
    pytest.param(
        """\
        apiVersion: networking.istio.io/v1
        kind: VirtualService
        metadata:
          name: reviews
        spec:
          hosts: [reviews]
          http:
          - retries:
              attempts: 0
              retryOn: 5xx
            route:
            - destination:
                host: reviews
        """,
        9,
        "spec.http[0].retries.attempts",
        "attempts is 0, which disables retries",
        id="vs-retry-settings-with-zero-attempts",
    ),
    pytest.param(
        """\
        apiVersion: networking.istio.io/v1
        kind: VirtualService
        metadata:
          name: reviews
        spec:
          hosts: [reviews]
          http:
          - fault:
              abort:
                httpStatus: 503
                percentage:
                  value: 150
            route:
            - destination:
                host: reviews
        """,
        12,
        "spec.http[0].fault.abort.percentage.value",
        "percentage 150 is neither 0 nor in the range 0.0001..100",
        id="vs-abort-percentage-above-100",
    ),
    pytest.param(
        """\
        apiVersion: networking.istio.io/v1
        kind: VirtualService
        metadata:
          name: reviews
        spec:
          hosts: [reviews]
          http:
          - mirror:
              host: shadow
            mirrorPercentage:
              value: -5
            route:
            - destination:
                host: reviews
        """,
        11,
        "spec.http[0].mirrorPercentage.value",
        "percentage -5 is neither 0 nor in the range",
        id="vs-mirror-percentage-negative",
    ),
    pytest.param(
        """\
        apiVersion: networking.istio.io/v1
        kind: VirtualService
        metadata:
          name: reviews
        spec:
          hosts: [reviews.def_ault]
          http:
          - route:
            - destination:
                host: reviews
        """,
        6,
        "spec.hosts[0]",
        "label 'def_ault' is not a DNS-1123 label",
        id="vs-host-with-underscore",
    ),
    pytest.param(
        """\
        apiVersion: networking.istio.io/v1
        kind: VirtualService
        metadata:
          name: reviews
        spec:
          hosts: [reviews]
          http:
          - route:
            - destination:
                host: "*"
        """,
        10,
        "spec.http[0].route[0].destination.host",
        "'*' is not a valid destination host",
        id="vs-wildcard-destination",
    ),
    pytest.param(
        """\
        apiVersion: networking.istio.io/v1
        kind: VirtualService
        metadata:
          name: reviews
        spec:
          hosts: [reviews]
          http:
          - route:
            - destination:
                host: reviews
                port:
                  number: 70000
        """,
        12,
        "spec.http[0].route[0].destination.port.number",
        "port 70000 is not in the range 1..65535",
        id="vs-destination-port-out-of-range",
    ),
    pytest.param(
        """\
        apiVersion: networking.istio.io/v1
        kind: VirtualService
        metadata:
          name: reviews
        spec:
          hosts: [reviews]
          http:
          - match:
            - headers:
                "x user":
                  exact: bob
            route:
            - destination:
                host: reviews
        """,
        10,
        "spec.http[0].match[0].headers[x user]",
        "'x user' is not a valid header name",
        id="vs-header-name-with-space",
    ),
    pytest.param(
        """\
        apiVersion: networking.istio.io/v1
        kind: VirtualService
        metadata:
          name: reviews
        spec:
          hosts: [reviews]
          http:
          - match:
            - sourceLabels:
                "-app": web
            route:
            - destination:
                host: reviews
        """,
        10,
        "spec.http[0].match[0].sourceLabels[-app]",
        "invalid label key '-app'",
        id="vs-source-label-key-starts-with-dash",
    ),
    pytest.param(
        """\
        apiVersion: networking.istio.io/v1
        kind: VirtualService
        metadata:
          name: reviews
        spec:
          hosts: [reviews]
          http:
          - redirect:
              uri: /new
            route:
            - destination:
                host: reviews
        """,
        10,
        "spec.http[0].route",
        "a route that redirects cannot also have route destinations",
        id="vs-redirect-and-route",
    ),
    pytest.param(
        """\
        apiVersion: networking.istio.io/v1
        kind: VirtualService
        metadata:
          name: reviews
        spec:
          hosts: [reviews]
          http:
          - redirect:
              uri: /new
              redirectCode: 200
        """,
        10,
        "spec.http[0].redirect.redirectCode",
        "200 is not a redirect code",
        id="vs-redirect-code-not-3xx",
    ),
    pytest.param(
        """\
        apiVersion: networking.istio.io/v1
        kind: VirtualService
        metadata:
          name: reviews
        spec:
          hosts: [reviews]
          http:
          - directResponse:
              status: 700
        """,
        9,
        "spec.http[0].directResponse.status",
        "HTTP status 700 is not in the range 200..599",
        id="vs-direct-response-status-out-of-range",
    ),
    pytest.param(
        """\
        apiVersion: networking.istio.io/v1
        kind: VirtualService
        metadata:
          name: reviews
        spec:
          hosts: [reviews]
          http:
          - fault:
              abort:
                grpcStatus: NOPE
            route:
            - destination:
                host: reviews
        """,
        10,
        "spec.http[0].fault.abort.grpcStatus",
        "'NOPE' is not a gRPC status",
        id="vs-unknown-grpc-status",
    ),
    pytest.param(
        """\
        apiVersion: networking.istio.io/v1
        kind: VirtualService
        metadata:
          name: reviews
        spec:
          hosts: [reviews]
          http:
          - corsPolicy:
              allowMethods: [GET, FETCH]
            route:
            - destination:
                host: reviews
        """,
        9,
        "spec.http[0].corsPolicy.allowMethods[1]",
        "'FETCH' is not an HTTP method",
        id="vs-cors-unknown-method",
    ),
    pytest.param(
        """\
        apiVersion: networking.istio.io/v1
        kind: VirtualService
        metadata:
          name: reviews
        spec:
          hosts: [reviews]
          http:
          - headers:
              request:
                set:
                  ":path": /x
            route:
            - destination:
                host: reviews
        """,
        11,
        "spec.http[0].headers.request.set[:path]",
        "names starting with ':' are reserved",
        id="vs-set-pseudo-header",
    ),
    pytest.param(
        """\
        apiVersion: networking.istio.io/v1
        kind: VirtualService
        metadata:
          name: reviews
        spec:
          hosts: [reviews]
          tcp:
          - match:
            - sourceSubnet: 10.0.0.0/33
            route:
            - destination:
                host: reviews
        """,
        9,
        "spec.tcp[0].match[0].sourceSubnet",
        "'10.0.0.0/33' is not a valid CIDR block",
        id="vs-tcp-source-subnet-invalid",
    ),
    pytest.param(
        """\
        apiVersion: networking.istio.io/v1
        kind: VirtualService
        metadata:
          name: reviews
        spec:
          hosts: [reviews.example.com]
          tls:
          - match:
            - sniHosts: [ratings.example.com]
            route:
            - destination:
                host: reviews.example.com
        """,
        9,
        "spec.tls[0].match[0].sniHosts[0]",
        "is not within any of this VirtualService's hosts",
        id="vs-sni-host-outside-hosts",
    ),
    pytest.param(
        """\
        apiVersion: networking.istio.io/v2
        kind: VirtualService
        metadata:
          name: reviews
        spec:
          hosts: [reviews]
          http:
          - route:
            - destination:
                host: reviews
        """,
        1,
        "apiVersion",
        "networking.istio.io/v2 does not serve VirtualService",
        id="vs-unknown-api-version",
    ),
    pytest.param(
        """\
        apiVersion: networking.istio.io/v1
        kind: VirtualService
        metadata:
          name: Reviews_v1
        spec:
          hosts: [reviews]
          http:
          - route:
            - destination:
                host: reviews
        """,
        4,
        "metadata.name",
        "name 'Reviews_v1' is invalid",
        id="vs-name-not-dns-1123",
    ),
    pytest.param(
        """\
        apiVersion: networking.istio.io/v1
        kind: VirtualService
        metadata:
          name: reviews
        spec:
          hosts: [reviews]
          exportTo: ["*", "."]
          http:
          - route:
            - destination:
                host: reviews
        """,
        7,
        "spec.exportTo",
        "exportTo cannot mix '*' (everyone) with other entries",
        id="vs-export-to-everyone-and-here",
    ),
]

# -- DestinationRule -------------------------------------------------------------------------------

DESTINATION_RULE = [
    pytest.param(
        """\
        apiVersion: networking.istio.io/v1
        kind: DestinationRule
        metadata:
          name: reviews
        spec:
          host: reviews
          trafficPolicy:
            loadBalancer:
              simpel: ROUND_ROBIN
        """,
        9,
        "spec.trafficPolicy.loadBalancer.simpel",
        "unknown field 'simpel'; did you mean 'simple'?",
        id="dr-misspelt-simple",
    ),
    pytest.param(
        """\
        apiVersion: networking.istio.io/v1
        kind: DestinationRule
        metadata:
          name: reviews
        spec:
          host: reviews
          trafficPolicy:
            loadBalancer:
              simple: FASTEST
        """,
        9,
        "spec.trafficPolicy.loadBalancer.simple",
        "'FASTEST' is not allowed; use one of UNSPECIFIED, LEAST_CONN, RANDOM",
        id="dr-unknown-load-balancer",
    ),
    pytest.param(
        """\
        apiVersion: networking.istio.io/v1
        kind: DestinationRule
        metadata:
          name: reviews
        spec:
          host: reviews
          trafficPolicy:
            loadBalancer:
              simple: ROUND_ROBIN
              consistentHash:
                useSourceIp: true
        """,
        10,
        "spec.trafficPolicy.loadBalancer.consistentHash",
        "'simple' and 'consistentHash' cannot be set together",
        id="dr-simple-and-consistent-hash",
    ),
    pytest.param(
        """\
        apiVersion: networking.istio.io/v1
        kind: DestinationRule
        metadata:
          name: reviews
        spec:
          host: reviews
          trafficPolicy:
            loadBalancer:
              consistentHash:
                httpCookie: {ttl: 10s}
        """,
        10,
        "spec.trafficPolicy.loadBalancer.consistentHash.httpCookie.name",
        "'name' is required",
        id="dr-cookie-without-name",
    ),
    pytest.param(
        """\
        apiVersion: networking.istio.io/v1
        kind: DestinationRule
        metadata:
          name: reviews
        spec:
          host: reviews
          trafficPolicy:
            loadBalancer:
              warmup: {aggression: 2}
        """,
        9,
        "spec.trafficPolicy.loadBalancer.warmup.duration",
        "'duration' is required",
        id="dr-warmup-without-duration",
    ),
    pytest.param(
        """\
        apiVersion: networking.istio.io/v1
        kind: DestinationRule
        metadata:
          name: reviews
        spec:
          host: reviews
          trafficPolicy:
            outlierDetection:
              outlierDetectionHttpErrorCodes: [503, 700]
        """,
        9,
        "spec.trafficPolicy.outlierDetection.outlierDetectionHttpErrorCodes[1]",
        "700 is out of range; it must be between 100 and 599",
        id="dr-error-code-out-of-range",
    ),
    pytest.param(
        """\
        apiVersion: networking.istio.io/v1
        kind: DestinationRule
        metadata:
          name: reviews
        spec:
          host: reviews
          trafficPolicy:
            outlierDetection:
              maxEjectionPercent: 150
        """,
        9,
        "spec.trafficPolicy.outlierDetection.maxEjectionPercent",
        "150 is not a percentage in the range 0..100",
        id="dr-max-ejection-percent-above-100",
    ),
    pytest.param(
        """\
        apiVersion: networking.istio.io/v1
        kind: DestinationRule
        metadata:
          name: reviews
        spec:
          host: reviews
          trafficPolicy:
            retryBudget:
              percent: 120
        """,
        9,
        "spec.trafficPolicy.retryBudget.percent",
        "120 is out of range; it must be between 0 and 100",
        id="dr-retry-budget-above-100",
    ),
    pytest.param(
        """\
        apiVersion: networking.istio.io/v1
        kind: DestinationRule
        metadata:
          name: reviews
        spec:
          host: reviews
          trafficPolicy:
            outlierDetection:
              interval: 0s
        """,
        9,
        "spec.trafficPolicy.outlierDetection.interval",
        "duration 0s is shorter than the 1ms minimum",
        id="dr-interval-below-1ms",
    ),
    pytest.param(
        """\
        apiVersion: networking.istio.io/v1
        kind: DestinationRule
        metadata:
          name: reviews
        spec:
          host: reviews
          trafficPolicy:
            outlierDetection:
              baseEjectionTime: 30 s
        """,
        9,
        "spec.trafficPolicy.outlierDetection.baseEjectionTime",
        "'30 s' is not a duration",
        id="dr-duration-with-space",
    ),
    pytest.param(
        """\
        apiVersion: networking.istio.io/v1
        kind: DestinationRule
        metadata:
          name: reviews
        spec:
          host: reviews
          trafficPolicy:
            connectionPool:
              tcp:
                connectTimeout: 1.5ms
        """,
        10,
        "spec.trafficPolicy.connectionPool.tcp.connectTimeout",
        "finer than the supported millisecond precision",
        id="dr-connect-timeout-below-millisecond-precision",
    ),
    pytest.param(
        """\
        apiVersion: networking.istio.io/v1
        kind: DestinationRule
        metadata:
          name: reviews
        spec:
          host: reviews
          trafficPolicy:
            connectionPool:
              http:
                http2MaxRequests: -5
        """,
        10,
        "spec.trafficPolicy.connectionPool.http.http2MaxRequests",
        "-5 is negative; the limit must be 0 or more",
        id="dr-negative-connection-limit",
    ),
    pytest.param(
        """\
        apiVersion: networking.istio.io/v1
        kind: DestinationRule
        metadata:
          name: reviews
        spec:
          host: reviews
          trafficPolicy:
            outlierDetection:
              consecutiveLocalOriginFailures: 5
        """,
        9,
        "spec.trafficPolicy.outlierDetection.consecutiveLocalOriginFailures",
        "only counts when splitExternalLocalOriginErrors is true",
        id="dr-local-origin-failures-without-split",
    ),
    pytest.param(
        """\
        apiVersion: networking.istio.io/v1
        kind: DestinationRule
        metadata:
          name: reviews
        spec:
          host: reviews
          subsets:
          - name: v1
            labels: {version: v1}
          - name: v1
            labels: {version: v2}
        """,
        10,
        "spec.subsets[1]",
        "subset 'v1' is defined twice",
        id="dr-duplicate-subset",
    ),
    pytest.param(
        """\
        apiVersion: networking.istio.io/v1
        kind: DestinationRule
        metadata:
          name: reviews
        spec:
          host: reviews
          subsets:
          - name: V_1
            labels: {version: v1}
        """,
        8,
        "spec.subsets[0].name",
        "subset name 'V_1' is not a DNS-1123 label",
        id="dr-subset-name-invalid",
    ),
    pytest.param(
        """\
        apiVersion: networking.istio.io/v1
        kind: DestinationRule
        metadata:
          name: reviews
        spec:
          host: reviews
          subsets:
          - name: v1
            labels:
              "version/": v1
        """,
        10,
        "spec.subsets[0].labels[version/]",
        "invalid label key 'version/'",
        id="dr-subset-label-key-invalid",
    ),
    pytest.param(
        """\
        apiVersion: networking.istio.io/v1
        kind: DestinationRule
        metadata:
          name: reviews
        spec:
          host: reviews
          subsets:
          - name: v1
            labels:
              version: "v1 beta"
        """,
        10,
        "spec.subsets[0].labels[version]",
        "invalid label value 'v1 beta'",
        id="dr-subset-label-value-invalid",
    ),
    pytest.param(
        """\
        apiVersion: networking.istio.io/v1
        kind: DestinationRule
        metadata:
          name: reviews
        spec:
          host: reviews..default
        """,
        6,
        "spec.host",
        "domain name 'reviews..default' is invalid",
        id="dr-host-with-empty-label",
    ),
    pytest.param(
        """\
        apiVersion: networking.istio.io/v1
        kind: DestinationRule
        metadata:
          name: reviews
        spec:
          host: reviews
          trafficPolicy:
            tls:
              mode: MUTUAL
              privateKey: /etc/key.pem
        """,
        9,
        "spec.trafficPolicy.tls.mode",
        "mode MUTUAL needs clientCertificate",
        id="dr-mutual-tls-without-certificate",
    ),
    pytest.param(
        """\
        apiVersion: networking.istio.io/v1
        kind: DestinationRule
        metadata:
          name: reviews
        spec:
          host: reviews
          trafficPolicy:
            tls:
              mode: SIMPLE
              caCertificates: /etc/ca.pem
              insecureSkipVerify: true
        """,
        11,
        "spec.trafficPolicy.tls.insecureSkipVerify",
        "cannot be used with insecureSkipVerify",
        id="dr-ca-certificates-with-insecure-skip-verify",
    ),
    pytest.param(
        """\
        apiVersion: networking.istio.io/v1
        kind: DestinationRule
        metadata:
          name: reviews
        spec:
          host: reviews
          trafficPolicy:
            loadBalancer:
              localityLbSetting:
                distribute:
                - from: us-west/zone1/*
                  to:
                    "us-west/zone1/*": 80
                    "us-west/zone2/*": 10
            outlierDetection:
              consecutive5xxErrors: 5
        """,
        12,
        "spec.trafficPolicy.loadBalancer.localityLbSetting.distribute[0].to",
        "the locality weights total 90; they must total 100",
        id="dr-locality-weights-do-not-total-100",
    ),
    pytest.param(
        """\
        apiVersion: networking.istio.io/v1
        kind: DestinationRule
        metadata:
          name: reviews
        spec:
          host: reviews
          trafficPolicy:
            loadBalancer:
              consistentHash:
                httpHeaderName: x-user
                maglev:
                  tableSize: 1000
        """,
        12,
        "spec.trafficPolicy.loadBalancer.consistentHash.maglev.tableSize",
        "must be a prime number",
        id="dr-maglev-table-size-not-prime",
    ),
    pytest.param(
        """\
        apiVersion: networking.istio.io/v1
        kind: DestinationRule
        metadata:
          name: reviews
        spec:
          host: reviews
          trafficPolicy:
            portLevelSettings:
            - port: {number: 80}
              loadBalancer: {simple: RANDOM}
            - port: {number: 80}
              loadBalancer: {simple: LEAST_REQUEST}
        """,
        11,
        "spec.trafficPolicy.portLevelSettings[1]",
        "port 80 has two port-level traffic policies",
        id="dr-two-policies-for-one-port",
    ),
    pytest.param(
        """\
        apiVersion: networking.istio.io/v1
        kind: DestinationRule
        metadata:
          name: reviews
        spec:
          host: reviews
          trafficPolicy: {}
        """,
        7,
        "spec.trafficPolicy",
        "a trafficPolicy must set at least one field",
        id="dr-empty-traffic-policy",
    ),
    pytest.param(
        """\
        apiVersion: networking.istio.io/v1
        kind: DestinationRule
        metadata:
          name: reviews
        spec:
          host: reviews
          workloadSelector:
            matchLabels:
              app: "*"
        """,
        9,
        "spec.workloadSelector.matchLabels[app]",
        "wildcards are not supported in selectors",
        id="dr-wildcard-in-workload-selector",
    ),
    pytest.param(
        """\
        apiVersion: networking.istio.io/v1
        kind: DestinationRule
        metadata:
          name: reviews
        spec:
          host: reviews
          exportTo: ["~"]
        """,
        7,
        "spec.exportTo",
        "exportTo '~' (no one) is only allowed on a ServiceEntry",
        id="dr-export-to-no-one",
    ),
]

# -- ServiceEntry ----------------------------------------------------------------------------------

SERVICE_ENTRY = [
    pytest.param(
        """\
        apiVersion: networking.istio.io/v1
        kind: ServiceEntry
        metadata:
          name: payments
        spec:
          hosts: [payments.example.com]
          ports:
          - {number: 443, name: https, protocol: TLS}
          resolution: STATICALLY
        """,
        9,
        "spec.resolution",
        "'STATICALLY' is not allowed; use one of NONE, STATIC, DNS",
        id="se-unknown-resolution",
    ),
    pytest.param(
        """\
        apiVersion: networking.istio.io/v1
        kind: ServiceEntry
        metadata:
          name: payments
        spec:
          hosts: [payments.example.com]
          location: EXTERNAL
          ports:
          - {number: 443, name: https, protocol: TLS}
          resolution: DNS
        """,
        7,
        "spec.location",
        "use one of MESH_EXTERNAL, MESH_INTERNAL",
        id="se-unknown-location",
    ),
    pytest.param(
        """\
        apiVersion: networking.istio.io/v1
        kind: ServiceEntry
        metadata:
          name: payments
        spec:
          hosts: [payments.example.com]
          ports:
          - {number: 443, name: https, protocol: TLS}
          resolution: DNS
          resolution: STATIC
        """,
        10,
        "spec.resolution",
        "'resolution' is given twice (first on line 9)",
        id="se-duplicate-key",
    ),
    pytest.param(
        """\
        apiVersion: networking.istio.io/v1
        kind: ServiceEntry
        metadata:
          name: payments
        spec:
          hosts: [payments.example.com]
          ports:
          - {number: 443, name: https, protocol: TLS}
          resolution: NONE
          endpoints:
          - address: 10.0.0.1
        """,
        10,
        "spec.endpoints",
        "resolution NONE takes no endpoints",
        id="se-endpoints-with-resolution-none",
    ),
    pytest.param(
        """\
        apiVersion: networking.istio.io/v1
        kind: ServiceEntry
        metadata:
          name: payments
        spec:
          hosts: [payments.example.com]
          ports:
          - {number: 443, name: https, protocol: TLS}
          resolution: STATIC
          endpoints:
          - address: 10.0.0.1
          - address: pay.example.com
        """,
        12,
        "spec.endpoints[1].address",
        "must be an IP address with resolution STATIC",
        id="se-host-name-endpoint-with-resolution-static",
    ),
    pytest.param(
        """\
        apiVersion: networking.istio.io/v1
        kind: ServiceEntry
        metadata:
          name: payments
        spec:
          hosts: [payments.example.com]
          ports:
          - {number: 443, name: https, protocol: TLS}
          resolution: DNS_ROUND_ROBIN
          endpoints:
          - address: a.example.com
          - address: b.example.com
        """,
        10,
        "spec.endpoints",
        "resolution DNS_ROUND_ROBIN takes at most one endpoint",
        id="se-round-robin-with-two-endpoints",
    ),
    pytest.param(
        """\
        apiVersion: networking.istio.io/v1
        kind: ServiceEntry
        metadata:
          name: payments
        spec:
          hosts: [payments.internal]
          ports:
          - {number: 8080, name: http, protocol: HTTP}
          resolution: STATIC
          workloadSelector:
            labels: {app: payments}
          endpoints:
          - address: 10.0.0.1
        """,
        12,
        "spec.endpoints",
        "set either workloadSelector or endpoints, not both",
        id="se-workload-selector-and-endpoints",
    ),
    pytest.param(
        """\
        apiVersion: networking.istio.io/v1
        kind: ServiceEntry
        metadata:
          name: payments
        spec:
          hosts: [payments.example.com]
          ports:
          - number: 70000
            name: https
            protocol: TLS
          resolution: DNS
        """,
        8,
        "spec.ports[0].number",
        "port 70000 is not in the range 1..65535",
        id="se-port-out-of-range",
    ),
    pytest.param(
        """\
        apiVersion: networking.istio.io/v1
        kind: ServiceEntry
        metadata:
          name: payments
        spec:
          hosts: [payments.example.com]
          ports:
          - {number: 443, name: https, protocol: TLS}
          - {number: 443, name: tls, protocol: TLS}
          resolution: DNS
        """,
        9,
        "spec.ports[1].number",
        "port 443 is already defined by ports[0]",
        id="se-duplicate-port-number",
    ),
    pytest.param(
        """\
        apiVersion: networking.istio.io/v1
        kind: ServiceEntry
        metadata:
          name: payments
        spec:
          hosts: [payments.example.com]
          ports:
          - {number: 443, name: https, protocol: HTTPS2}
          resolution: DNS
        """,
        8,
        "spec.ports[0].protocol",
        "unsupported protocol 'HTTPS2'",
        id="se-unknown-protocol",
    ),
    pytest.param(
        """\
        apiVersion: networking.istio.io/v1
        kind: ServiceEntry
        metadata:
          name: payments
        spec:
          hosts: [payments.example.com]
          ports:
          - {number: 443, name: HTTPS_Port, protocol: TLS}
          resolution: DNS
        """,
        8,
        "spec.ports[0].name",
        "port name 'HTTPS_Port' is invalid",
        id="se-port-name-invalid",
    ),
    pytest.param(
        """\
        apiVersion: networking.istio.io/v1
        kind: ServiceEntry
        metadata:
          name: payments
        spec:
          hosts: ["*"]
          ports:
          - {number: 443, name: https, protocol: TLS}
          resolution: DNS
        """,
        6,
        "spec.hosts[0]",
        "'*' is not a valid ServiceEntry host",
        id="se-wildcard-host",
    ),
    pytest.param(
        """\
        apiVersion: networking.istio.io/v1
        kind: ServiceEntry
        metadata:
          name: payments
        spec:
          hosts: ["*.example.com"]
          ports:
          - {number: 443, name: https, protocol: TLS}
          resolution: DNS
        """,
        6,
        "spec.hosts[0]",
        "with resolution DNS and no endpoints, host '*.example.com' must be a domain name",
        id="se-wildcard-host-resolved-by-dns",
    ),
    pytest.param(
        """\
        apiVersion: networking.istio.io/v1
        kind: ServiceEntry
        metadata:
          name: payments
        spec:
          hosts: [payments.example.com]
          addresses: [10.1.0.0/16]
          ports:
          - {number: 443, name: https, protocol: TLS}
          resolution: DNS
        """,
        7,
        "spec.addresses",
        "CIDR addresses are allowed only with resolution NONE or STATIC",
        id="se-cidr-address-with-dns",
    ),
    pytest.param(
        """\
        apiVersion: networking.istio.io/v1
        kind: ServiceEntry
        metadata:
          name: payments
        spec:
          hosts: [payments.example.com]
          addresses: [10.1.0.300]
          ports:
          - {number: 443, name: https, protocol: TLS}
          resolution: DNS
        """,
        7,
        "spec.addresses[0]",
        "'10.1.0.300' is not a valid IP address",
        id="se-address-invalid",
    ),
    pytest.param(
        """\
        apiVersion: networking.istio.io/v1
        kind: ServiceEntry
        metadata:
          name: payments
        spec:
          hosts: [payments.example.com]
          ports:
          - {number: 443, name: https, protocol: TLS}
          resolution: STATIC
          endpoints:
          - address: 10.0.0.1
            ports:
              http: 8080
        """,
        13,
        "spec.endpoints[0].ports[http]",
        "port 'http' is not a port of this ServiceEntry (https)",
        id="se-endpoint-names-unknown-port",
    ),
    pytest.param(
        """\
        apiVersion: networking.istio.io/v1
        kind: ServiceEntry
        metadata:
          name: payments
        spec:
          hosts: [a.example.com, b.example.com]
          ports:
          - {number: 5432, name: tcp-db, protocol: TCP}
          resolution: DNS
        """,
        8,
        "spec.ports[0]",
        "several hosts need HTTP or TLS ports",
        id="se-two-hosts-on-a-tcp-port",
    ),
    pytest.param(
        """\
        apiVersion: networking.istio.io/v1
        kind: ServiceEntry
        metadata:
          name: payments
        spec:
          hosts: [payments.internal]
          ports:
          - {number: 80, name: http, protocol: HTTP}
          - {number: 81, name: http-alt, protocol: HTTP}
          resolution: STATIC
          endpoints:
          - address: unix:///var/run/pay.sock
        """,
        12,
        "spec.endpoints[0].address",
        "a unix socket endpoint needs a ServiceEntry with exactly one port",
        id="se-unix-endpoint-with-two-ports",
    ),
    pytest.param(
        """\
        apiVersion: networking.istio.io/v1
        kind: ServiceEntry
        metadata:
          name: payments
        spec:
          hosts: [payments.example.com]
          ports:
          - {number: 443, name: https, protocol: TLS}
          resolution: DNS
          endpoints:
          - address: pay_1.example.com
        """,
        11,
        "spec.endpoints[0].address",
        "must be a domain name or an IP address",
        id="se-dns-endpoint-address-invalid",
    ),
    pytest.param(
        """\
        apiVersion: networking.istio.io/v1
        kind: ServiceEntry
        metadata:
          name: payments
        spec:
          hosts: [payments.example.com]
          exportTo: [".", Team_A]
          ports:
          - {number: 443, name: https, protocol: TLS}
          resolution: DNS
        """,
        7,
        "spec.exportTo",
        "exportTo entry 'Team_A' is invalid",
        id="se-export-to-invalid-namespace",
    ),
]

# -- WorkloadEntry ---------------------------------------------------------------------------------

WORKLOAD_ENTRY = [
    pytest.param(
        """\
        apiVersion: networking.istio.io/v1
        kind: WorkloadEntry
        metadata:
          name: vm-1
        spec:
          address: 10.0.0.300
        """,
        6,
        "spec.address",
        "address '10.0.0.300' must be an IP address or a domain name",
        id="we-ipv4-address-out-of-range",
    ),
    pytest.param(
        """\
        apiVersion: networking.istio.io/v1
        kind: WorkloadEntry
        metadata:
          name: vm-1
        spec:
          address: "fe80::1::2"
        """,
        6,
        "spec.address",
        "address 'fe80::1::2' must be an IP address or a domain name",
        id="we-ipv6-address-invalid",
    ),
    pytest.param(
        """\
        apiVersion: networking.istio.io/v1
        kind: WorkloadEntry
        metadata:
          name: vm-1
        spec:
          address: vm_1.example.com
        """,
        6,
        "spec.address",
        "address 'vm_1.example.com' must be an IP address or a domain name",
        id="we-host-name-with-underscore",
    ),
    pytest.param(
        """\
        apiVersion: networking.istio.io/v1
        kind: WorkloadEntry
        metadata:
          name: vm-1
        spec:
          labels:
            app: payments
        """,
        5,
        "spec.address",
        "a WorkloadEntry needs an address",
        id="we-without-address",
    ),
    pytest.param(
        """\
        apiVersion: networking.istio.io/v1
        kind: WorkloadEntry
        metadata:
          name: vm-1
        spec:
          address: unix://var/run/app.sock
        """,
        6,
        "spec.address",
        "var/run/app.sock is not an absolute path",
        id="we-unix-address-relative",
    ),
    pytest.param(
        """\
        apiVersion: networking.istio.io/v1
        kind: WorkloadEntry
        metadata:
          name: vm-1
        spec:
          address: unix:///var/run/app.sock
          ports:
            http: 8080
        """,
        7,
        "spec.ports",
        "a unix socket workload cannot have ports",
        id="we-unix-address-with-ports",
    ),
    pytest.param(
        """\
        apiVersion: networking.istio.io/v1
        kind: WorkloadEntry
        metadata:
          name: vm-1
        spec:
          address: 10.0.0.1
          ports:
            http: 70000
        """,
        8,
        "spec.ports[http]",
        "port 70000 is not in the range 1..65535",
        id="we-port-out-of-range",
    ),
    pytest.param(
        """\
        apiVersion: networking.istio.io/v1
        kind: WorkloadEntry
        metadata:
          name: vm-1
        spec:
          address: 10.0.0.1
          ports:
            http: 0
        """,
        8,
        "spec.ports[http]",
        "port 0 is not in the range 1..65535",
        id="we-port-zero",
    ),
    pytest.param(
        """\
        apiVersion: networking.istio.io/v1
        kind: WorkloadEntry
        metadata:
          name: vm-1
        spec:
          address: 10.0.0.1
          ports:
            HTTP_Web: 8080
        """,
        8,
        "spec.ports[HTTP_Web]",
        "port name 'HTTP_Web' is invalid",
        id="we-port-name-invalid",
    ),
    pytest.param(
        """\
        apiVersion: networking.istio.io/v1
        kind: WorkloadEntry
        metadata:
          name: vm-1
        spec:
          address: 10.0.0.1
          labels:
            "app/name/x": payments
        """,
        8,
        "spec.labels[app/name/x]",
        "invalid label key 'app/name/x'",
        id="we-label-key-with-two-slashes",
    ),
    pytest.param(
        """\
        apiVersion: networking.istio.io/v1
        kind: WorkloadEntry
        metadata:
          name: vm-1
        spec:
          address: 10.0.0.1
          labels:
            app: -payments
        """,
        8,
        "spec.labels[app]",
        "invalid label value '-payments'",
        id="we-label-value-starts-with-dash",
    ),
    pytest.param(
        """\
        apiVersion: networking.istio.io/v1
        kind: WorkloadEntry
        metadata:
          name: vm-1
        spec:
          address: 10.0.0.1
          labels:
            canary: true
        """,
        8,
        "spec.labels[canary]",
        'expected a string, found a boolean; quote it to keep it as text: "true"',
        id="we-label-value-boolean",
    ),
    pytest.param(
        """\
        apiVersion: networking.istio.io/v1
        kind: WorkloadEntry
        metadata:
          name: vm-1
        spec:
          address: 10.0.0.1
          labels:
          - app=payments
        """,
        8,
        "spec.labels",
        "expected a mapping, found a list",
        id="we-labels-as-a-list",
    ),
    pytest.param(
        """\
        apiVersion: networking.istio.io/v1
        kind: WorkloadEntry
        metadata:
          name: vm-1
        spec:
          address: 10.0.0.1
          weight: heavy
        """,
        7,
        "spec.weight",
        "expected an integer, found a string ('heavy')",
        id="we-weight-not-an-integer",
    ),
    pytest.param(
        """\
        apiVersion: networking.istio.io/v1
        kind: WorkloadEntry
        metadata:
          name: vm-1
        spec:
          address: 10.0.0.1
          serviceAcount: payments
        """,
        7,
        "spec.serviceAcount",
        "unknown field 'serviceAcount'; did you mean 'serviceAccount'?",
        id="we-misspelt-service-account",
    ),
]

# -- PeerAuthentication ----------------------------------------------------------------------------

PEER_AUTHENTICATION = [
    pytest.param(
        """\
        apiVersion: security.istio.io/v1
        kind: PeerAuthentication
        metadata:
          name: strict
          namespace: shop
        spec:
          mtls:
            mode: STRICT
          portLevelMtls:
            8080:
              mode: DISABLE
        """,
        9,
        "spec.portLevelMtls",
        "portLevelMtls needs a selector with labels",
        id="pa-port-level-mtls-without-selector",
    ),
    pytest.param(
        """\
        apiVersion: security.istio.io/v1
        kind: PeerAuthentication
        metadata:
          name: strict
          namespace: shop
        spec:
          selector:
            matchLabels: {app: web}
          portLevelMtls:
            http:
              mode: DISABLE
        """,
        10,
        "spec.portLevelMtls[http]",
        "'http' is not a port number in the range 1..65535",
        id="pa-port-level-mtls-keyed-by-name",
    ),
    pytest.param(
        """\
        apiVersion: security.istio.io/v1
        kind: PeerAuthentication
        metadata:
          name: strict
          namespace: shop
        spec:
          selector:
            matchLabels: {app: web}
          portLevelMtls:
            70000:
              mode: DISABLE
        """,
        10,
        "spec.portLevelMtls[70000]",
        "'70000' is not a port number in the range 1..65535",
        id="pa-port-level-mtls-port-out-of-range",
    ),
    pytest.param(
        """\
        apiVersion: security.istio.io/v1
        kind: PeerAuthentication
        metadata:
          name: strict
          namespace: shop
        spec:
          selector:
            matchLabels: {app: web}
          portLevelMtls:
          - port: 8080
            mode: DISABLE
        """,
        10,
        "spec.portLevelMtls",
        "expected a mapping, found a list",
        id="pa-port-level-mtls-as-a-list",
    ),
    pytest.param(
        """\
        apiVersion: security.istio.io/v1
        kind: PeerAuthentication
        metadata:
          name: strict
          namespace: shop
        spec:
          mtls:
            mode: strict
        """,
        8,
        "spec.mtls.mode",
        "'strict' is not allowed; did you mean 'STRICT'?",
        id="pa-mode-in-lower-case",
    ),
    pytest.param(
        """\
        apiVersion: security.istio.io/v1
        kind: PeerAuthentication
        metadata:
          name: strict
          namespace: shop
        spec:
          mtls:
            mode: REQUIRED
        """,
        8,
        "spec.mtls.mode",
        "use one of UNSET, DISABLE, PERMISSIVE, STRICT",
        id="pa-unknown-mode",
    ),
    pytest.param(
        """\
        apiVersion: security.istio.io/v1
        kind: PeerAuthentication
        metadata:
          name: strict
          namespace: shop
        spec:
          mTLS:
            mode: STRICT
        """,
        7,
        "spec.mTLS",
        "unknown field 'mTLS'; did you mean 'mtls'?",
        id="pa-misspelt-mtls",
    ),
    pytest.param(
        """\
        apiVersion: security.istio.io/v1
        kind: PeerAuthentication
        metadata:
          name: strict
          namespace: shop
        spec:
          mtls: STRICT
        """,
        7,
        "spec.mtls",
        "expected a mapping of fields, found a string",
        id="pa-mtls-as-a-string",
    ),
    pytest.param(
        """\
        apiVersion: security.istio.io/v1
        kind: PeerAuthentication
        metadata:
          name: strict
          namespace: shop
        spec:
          mtls:
            mode: STRICT
            mode: PERMISSIVE
        """,
        9,
        "spec.mtls.mode",
        "'mode' is given twice (first on line 8)",
        id="pa-duplicate-key",
    ),
    pytest.param(
        """\
        apiVersion: security.istio.io/v1
        kind: PeerAuthentication
        metadata:
          name: strict
          namespace: shop
        spec:
          selector:
            matchLabels:
              app: "web-*"
          mtls:
            mode: STRICT
        """,
        9,
        "spec.selector.matchLabels[app]",
        "wildcards are not supported in selectors",
        id="pa-wildcard-in-selector",
    ),
    pytest.param(
        """\
        apiVersion: security.istio.io/v1
        kind: PeerAuthentication
        metadata:
          name: strict
          namespace: shop
        spec:
          selector:
            matchLabels:
              "": web
          mtls:
            mode: STRICT
        """,
        9,
        "spec.selector.matchLabels[]",
        "an empty label key is not allowed in a selector",
        id="pa-empty-label-key-in-selector",
    ),
    pytest.param(
        """\
        apiVersion: security.istio.io/v1
        kind: PeerAuthentication
        metadata:
          name: strict
          namespace: Shop
        spec:
          mtls:
            mode: STRICT
        """,
        5,
        "metadata.namespace",
        "namespace 'Shop' is invalid",
        id="pa-namespace-in-upper-case",
    ),
    pytest.param(
        """\
        apiVersion: security.istio.io/v1alpha1
        kind: PeerAuthentication
        metadata:
          name: strict
        spec:
          mtls:
            mode: STRICT
        """,
        1,
        "apiVersion",
        "security.istio.io/v1alpha1 does not serve PeerAuthentication",
        id="pa-unknown-api-version",
    ),
]

# -- AuthorizationPolicy ---------------------------------------------------------------------------

AUTHORIZATION_POLICY = [
    pytest.param(
        """\
        apiVersion: security.istio.io/v1
        kind: AuthorizationPolicy
        metadata:
          name: api
          namespace: shop
        spec:
          action: REJECT
          rules:
          - {}
        """,
        7,
        "spec.action",
        "'REJECT' is not allowed; use one of ALLOW, DENY, AUDIT, CUSTOM",
        id="ap-unknown-action",
    ),
    pytest.param(
        """\
        apiVersion: security.istio.io/v1
        kind: AuthorizationPolicy
        metadata:
          name: api
          namespace: shop
        spec:
          action: DENY
        """,
        7,
        "spec.action",
        "a DENY policy without rules never matches",
        id="ap-deny-without-rules",
    ),
    pytest.param(
        """\
        apiVersion: security.istio.io/v1
        kind: AuthorizationPolicy
        metadata:
          name: api
          namespace: shop
        spec:
          action: CUSTOM
          rules:
          - {}
        """,
        6,
        "spec.provider",
        "action CUSTOM needs provider.name",
        id="ap-custom-without-provider",
    ),
    pytest.param(
        """\
        apiVersion: security.istio.io/v1
        kind: AuthorizationPolicy
        metadata:
          name: api
          namespace: shop
        spec:
          provider:
            name: ext-authz
          rules:
          - {}
        """,
        7,
        "spec.provider",
        "provider is only used with action CUSTOM",
        id="ap-provider-with-allow",
    ),
    pytest.param(
        """\
        apiVersion: security.istio.io/v1
        kind: AuthorizationPolicy
        metadata:
          name: api
          namespace: shop
        spec:
          action: CUSTOM
          provider:
            name: ext-authz
          rules:
          - from:
            - source:
                namespaces: [shop]
        """,
        13,
        "spec.rules[0].from[0].source.namespaces",
        "this source field is not supported with action CUSTOM",
        id="ap-custom-with-namespaces",
    ),
    pytest.param(
        """\
        apiVersion: security.istio.io/v1
        kind: AuthorizationPolicy
        metadata:
          name: api
          namespace: shop
        spec:
          rules:
            from:
            - source:
                namespaces: [shop]
        """,
        8,
        "spec.rules",
        "expected a list, found a mapping",
        id="ap-rules-as-a-mapping",
    ),
    pytest.param(
        """\
        apiVersion: security.istio.io/v1
        kind: AuthorizationPolicy
        metadata:
          name: api
          namespace: shop
        spec:
          rules:
          - form:
            - source:
                namespaces: [shop]
        """,
        8,
        "spec.rules[0].form",
        "unknown field 'form'; did you mean 'from'?",
        id="ap-misspelt-from",
    ),
    pytest.param(
        """\
        apiVersion: security.istio.io/v1
        kind: AuthorizationPolicy
        metadata:
          name: api
          namespace: shop
        spec:
          rules:
          - from:
            - {}
        """,
        9,
        "spec.rules[0].from[0].source",
        "each 'from' entry needs a source",
        id="ap-from-without-source",
    ),
    pytest.param(
        """\
        apiVersion: security.istio.io/v1
        kind: AuthorizationPolicy
        metadata:
          name: api
          namespace: shop
        spec:
          rules:
          - from:
            - source: {}
        """,
        9,
        "spec.rules[0].from[0].source",
        "a source must set at least one field",
        id="ap-empty-source",
    ),
    pytest.param(
        """\
        apiVersion: security.istio.io/v1
        kind: AuthorizationPolicy
        metadata:
          name: api
          namespace: shop
        spec:
          rules:
          - to:
            - operation: {}
        """,
        9,
        "spec.rules[0].to[0].operation",
        "an operation must set at least one field",
        id="ap-empty-operation",
    ),
    pytest.param(
        """\
        apiVersion: security.istio.io/v1
        kind: AuthorizationPolicy
        metadata:
          name: api
          namespace: shop
        spec:
          rules:
          - from:
            - source:
                namespaces: [""]
        """,
        10,
        "spec.rules[0].from[0].source.namespaces[0]",
        "an empty value is not allowed",
        id="ap-empty-namespace",
    ),
    pytest.param(
        """\
        apiVersion: security.istio.io/v1
        kind: AuthorizationPolicy
        metadata:
          name: api
          namespace: shop
        spec:
          rules:
          - from:
            - source:
                ipBlocks: ["10.0.0.0/8", "192.168.1.256"]
        """,
        10,
        "spec.rules[0].from[0].source.ipBlocks[1]",
        "'192.168.1.256' is not a valid IP address",
        id="ap-ip-block-invalid",
    ),
    pytest.param(
        """\
        apiVersion: security.istio.io/v1
        kind: AuthorizationPolicy
        metadata:
          name: api
          namespace: shop
        spec:
          rules:
          - from:
            - source:
                remoteIpBlocks: ["1.2.3.4/"]
        """,
        10,
        "spec.rules[0].from[0].source.remoteIpBlocks[0]",
        "'1.2.3.4/' is not a valid CIDR block",
        id="ap-remote-ip-block-without-prefix-length",
    ),
    pytest.param(
        """\
        apiVersion: security.istio.io/v1
        kind: AuthorizationPolicy
        metadata:
          name: api
          namespace: shop
        spec:
          rules:
          - from:
            - source:
                principals: [cluster.local/ns/shop/sa/web]
                serviceAccounts: [shop/web]
        """,
        11,
        "spec.rules[0].from[0].source.serviceAccounts",
        "serviceAccounts cannot be combined with principals or namespaces",
        id="ap-service-accounts-with-principals",
    ),
    pytest.param(
        """\
        apiVersion: security.istio.io/v1
        kind: AuthorizationPolicy
        metadata:
          name: api
          namespace: shop
        spec:
          rules:
          - from:
            - source:
                serviceAccounts: ["shop/*"]
        """,
        10,
        "spec.rules[0].from[0].source.serviceAccounts[0]",
        "wildcards are not allowed in service accounts",
        id="ap-wildcard-service-account",
    ),
    pytest.param(
        """\
        apiVersion: security.istio.io/v1
        kind: AuthorizationPolicy
        metadata:
          name: api
          namespace: shop
        spec:
          rules:
          - to:
            - operation:
                ports: ["8080", "http"]
        """,
        10,
        "spec.rules[0].to[0].operation.ports[1]",
        "'http' is not a port number (0..65535)",
        id="ap-port-by-name",
    ),
    pytest.param(
        """\
        apiVersion: security.istio.io/v1
        kind: AuthorizationPolicy
        metadata:
          name: api
          namespace: shop
        spec:
          rules:
          - to:
            - operation:
                paths: ["/api/{**}/{*}"]
        """,
        10,
        "spec.rules[0].to[0].operation.paths[0]",
        "'{**}' must be the last operator",
        id="ap-path-template-operator-after-double-star",
    ),
    pytest.param(
        """\
        apiVersion: security.istio.io/v1
        kind: AuthorizationPolicy
        metadata:
          name: api
          namespace: shop
        spec:
          rules:
          - when:
            - key: source.ip
              values: [10.0.0.0/33]
        """,
        10,
        "spec.rules[0].when[0].values[0]",
        "'10.0.0.0/33' is not a valid CIDR block",
        id="ap-when-source-ip-invalid",
    ),
    pytest.param(
        """\
        apiVersion: security.istio.io/v1
        kind: AuthorizationPolicy
        metadata:
          name: api
          namespace: shop
        spec:
          rules:
          - when:
            - key: remote.ip
              notValues: ["10.0.0.1/40"]
        """,
        10,
        "spec.rules[0].when[0].notValues[0]",
        "'10.0.0.1/40' is not a valid CIDR block",
        id="ap-when-remote-ip-not-values-invalid",
    ),
    pytest.param(
        """\
        apiVersion: security.istio.io/v1
        kind: AuthorizationPolicy
        metadata:
          name: api
          namespace: shop
        spec:
          rules:
          - when:
            - key: destination.port
              values: ["99999"]
        """,
        10,
        "spec.rules[0].when[0].values[0]",
        "'99999' is not a port number (0..65535)",
        id="ap-when-destination-port-out-of-range",
    ),
    pytest.param(
        """\
        apiVersion: security.istio.io/v1
        kind: AuthorizationPolicy
        metadata:
          name: api
          namespace: shop
        spec:
          rules:
          - when:
            - key: request.auth.principal
        """,
        9,
        "spec.rules[0].when[0]",
        "condition 'request.auth.principal' needs values or notValues",
        id="ap-when-without-values",
    ),
    pytest.param(
        """\
        apiVersion: security.istio.io/v1
        kind: AuthorizationPolicy
        metadata:
          name: api
          namespace: shop
        spec:
          selector:
            matchLabels: {app: web}
          targetRef:
            kind: Service
            name: web
          rules:
          - {}
        """,
        9,
        "spec.targetRef",
        "set only one of selector, targetRef and targetRefs",
        id="ap-selector-and-target-ref",
    ),
    pytest.param(
        """\
        apiVersion: security.istio.io/v1
        kind: AuthorizationPolicy
        metadata:
          name: api
          namespace: shop
        spec:
          targetRef:
            kind: Deployment
            name: web
          rules:
          - {}
        """,
        8,
        "spec.targetRef.kind",
        "targetRef may name a Service, a ServiceEntry or a Gateway, not core/Deployment",
        id="ap-target-ref-to-a-deployment",
    ),
]

# -- RequestAuthentication -------------------------------------------------------------------------

REQUEST_AUTHENTICATION = [
    pytest.param(
        """\
        apiVersion: security.istio.io/v1
        kind: RequestAuthentication
        metadata:
          name: jwt
          namespace: shop
        spec:
          jwtRules:
          - jwksUri: https://auth.example.com/.well-known/jwks.json
        """,
        8,
        "spec.jwtRules[0].issuer",
        "every JWT rule needs an issuer",
        id="ra-rule-without-issuer",
    ),
    pytest.param(
        """\
        apiVersion: security.istio.io/v1
        kind: RequestAuthentication
        metadata:
          name: jwt
          namespace: shop
        spec:
          jwtRules:
          - issuer: https://auth.example.com
          - issuer: https://auth.example.com
            audiences: [shop]
        """,
        9,
        "spec.jwtRules[1].issuer",
        "issuer 'https://auth.example.com' already has a rule (jwtRules[0])",
        id="ra-two-rules-for-one-issuer",
    ),
    pytest.param(
        """\
        apiVersion: security.istio.io/v1
        kind: RequestAuthentication
        metadata:
          name: jwt
          namespace: shop
        spec:
          jwtRules:
          - issuer: https://auth.example.com
            jwksUri: auth.example.com/jwks.json
        """,
        9,
        "spec.jwtRules[0].jwksUri",
        "must use http:// or https://",
        id="ra-jwks-uri-without-scheme",
    ),
    pytest.param(
        """\
        apiVersion: security.istio.io/v1
        kind: RequestAuthentication
        metadata:
          name: jwt
          namespace: shop
        spec:
          jwtRules:
          - issuer: https://auth.example.com
            jwksUri: ftp://auth.example.com/jwks.json
        """,
        9,
        "spec.jwtRules[0].jwksUri",
        "jwksUri 'ftp://auth.example.com/jwks.json' must use http:// or https://",
        id="ra-jwks-uri-ftp",
    ),
    pytest.param(
        """\
        apiVersion: security.istio.io/v1
        kind: RequestAuthentication
        metadata:
          name: jwt
          namespace: shop
        spec:
          jwtRules:
          - issuer: https://auth.example.com
            jwksUri: https://auth.example.com:port/jwks.json
        """,
        9,
        "spec.jwtRules[0].jwksUri",
        "is not a valid URL",
        id="ra-jwks-uri-with-non-numeric-port",
    ),
    pytest.param(
        """\
        apiVersion: security.istio.io/v1
        kind: RequestAuthentication
        metadata:
          name: jwt
          namespace: shop
        spec:
          jwtRules:
          - issuer: https://auth.example.com
            jwksUri: https://auth.example.com/jwks.json
            jwks: '{"keys": [{"kty": "RSA", "n": "x", "e": "AQAB"}]}'
        """,
        10,
        "spec.jwtRules[0].jwks",
        "set either jwks or jwksUri, not both",
        id="ra-jwks-and-jwks-uri",
    ),
    pytest.param(
        """\
        apiVersion: security.istio.io/v1
        kind: RequestAuthentication
        metadata:
          name: jwt
          namespace: shop
        spec:
          jwtRules:
          - issuer: https://auth.example.com
            jwks: '{"keys": [}'
        """,
        9,
        "spec.jwtRules[0].jwks",
        "jwks is not valid JSON",
        id="ra-jwks-not-json",
    ),
    pytest.param(
        """\
        apiVersion: security.istio.io/v1
        kind: RequestAuthentication
        metadata:
          name: jwt
          namespace: shop
        spec:
          jwtRules:
          - issuer: https://auth.example.com
            jwks: '{"keys": [{"n": "abc"}]}'
        """,
        9,
        "spec.jwtRules[0].jwks",
        "jwks must be a JSON Web Key or a JWK Set",
        id="ra-jwks-key-without-kty",
    ),
    pytest.param(
        """\
        apiVersion: security.istio.io/v1
        kind: RequestAuthentication
        metadata:
          name: jwt
          namespace: shop
        spec:
          jwtRules:
          - issuer: https://auth.example.com
            audience: [shop]
        """,
        9,
        "spec.jwtRules[0].audience",
        "unknown field 'audience'; did you mean 'audiences'?",
        id="ra-misspelt-audiences",
    ),
    pytest.param(
        """\
        apiVersion: security.istio.io/v1
        kind: RequestAuthentication
        metadata:
          name: jwt
          namespace: shop
        spec:
          jwtRules:
          - issuer: https://auth.example.com
            forwardOriginalToken: "yes"
        """,
        9,
        "spec.jwtRules[0].forwardOriginalToken",
        "expected true or false, found a string ('yes')",
        id="ra-forward-original-token-not-a-boolean",
    ),
    pytest.param(
        """\
        apiVersion: security.istio.io/v1
        kind: RequestAuthentication
        metadata:
          name: jwt
          namespace: shop
        spec:
          jwtRules:
          - issuer: https://auth.example.com
            timeout: 0.5ms
        """,
        9,
        "spec.jwtRules[0].timeout",
        "duration 0.5ms is shorter than the 1ms minimum",
        id="ra-timeout-below-1ms",
    ),
    pytest.param(
        """\
        apiVersion: security.istio.io/v1
        kind: RequestAuthentication
        metadata:
          name: jwt
          namespace: shop
        spec:
          jwtRules:
          - issuer: https://auth.example.com
            outputPayloadToHeader: "x_jwt payload"
        """,
        9,
        "spec.jwtRules[0].outputPayloadToHeader",
        "'x_jwt payload' is not a valid header name",
        id="ra-payload-header-name-invalid",
    ),
    pytest.param(
        """\
        apiVersion: security.istio.io/v1
        kind: RequestAuthentication
        metadata:
          name: jwt
          namespace: shop
        spec:
          selector:
            matchLabels: {app: web}
          targetRefs:
          - kind: Service
            name: web
          jwtRules:
          - issuer: https://auth.example.com
        """,
        9,
        "spec.targetRefs",
        "set only one of selector, targetRef and targetRefs",
        id="ra-selector-and-target-refs",
    ),
    pytest.param(
        """\
        apiVersion: security.istio.io/v1
        kind: RequestAuthentication
        metadata:
          name: jwt
          namespace: shop
        spec:
          targetRef:
            kind: Service
            name: web
            namespace: other
          jwtRules:
          - issuer: https://auth.example.com
        """,
        10,
        "spec.targetRef.namespace",
        "cross-namespace targetRef is not supported",
        id="ra-target-ref-in-another-namespace",
    ),
]


@pytest.mark.parametrize(
    ("text", "line", "path", "message"),
    [
        *VIRTUAL_SERVICE,
        *DESTINATION_RULE,
        *SERVICE_ENTRY,
        *WORKLOAD_ENTRY,
        *PEER_AUTHENTICATION,
        *AUTHORIZATION_POLICY,
        *REQUEST_AUTHENTICATION,
    ],
)
def test_a_mistake_is_reported_on_its_line_and_field(
    text: str, line: int, path: str, message: str
) -> None:
    result = load(text)

    error = the_only_error(result)
    where = (error.location.file, error.location.line, error.path)
    assert where == (FILE, line, path), report(result)
    assert message in error.message
    assert error.code.id == "IST0106"
    assert error.level is Severity.ERROR
    assert len(result.config) == 0
    assert len(result.rejected) == 1


# -- documents that are not resources --------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "line", "code", "message"),
    [
        pytest.param(
            """\
            apiVersion: networking.istio.io/v1
            kind: VirtualService
            metadata:
              name: reviews
            spec:
              hosts: [reviews
              http: []
            """,
            7,
            "LM0002",
            "this is not valid YAML: expected ',' or ']'",
            id="unclosed-flow-list",
        ),
        pytest.param(
            """\
            apiVersion: networking.istio.io/v1
            kind: VirtualService
            metadata:
              name: reviews
            spec:
              hosts: [reviews]
              http:
              - route:
                - destination:
            \t    host: reviews
            """,
            10,
            "LM0002",
            "found character '\\t' that cannot start any token",
            id="tab-indentation",
        ),
        pytest.param(
            """\
            - apiVersion: networking.istio.io/v1
              kind: VirtualService
            """,
            1,
            "LM0003",
            "a resource must be a mapping with apiVersion, kind, metadata and spec",
            id="list-instead-of-resource",
        ),
        pytest.param(
            """\
            apiVersion: networking.istio.io/v1
            metadata:
              name: reviews
            """,
            1,
            "LM0003",
            "this document has no kind; it is not a resource",
            id="document-without-kind",
        ),
    ],
)
def test_a_document_that_is_not_a_resource_is_an_error(
    text: str, line: int, code: str, message: str
) -> None:
    result = load(text)

    error = the_only_error(result)
    assert (error.location.line, error.code.id) == (line, code), report(result)
    assert message in error.message
    assert len(result.config) == 0


# -- several problems at once ----------------------------------------------------------------------


def test_every_document_in_a_file_is_checked() -> None:
    result = load(
        """\
        apiVersion: networking.istio.io/v1
        kind: VirtualService
        metadata:
          name: reviews
        spec:
          hosts: [reviews]
          http:
          - route:
            - destination: {host: reviews, subset: v1}
              weight: 50
            - destination: {host: reviews, subset: v2}
              weight: 40
        ---
        apiVersion: networking.istio.io/v1
        kind: DestinationRule
        metadata:
          name: reviews
        spec:
          host: reviews
          trafficPolicy:
            loadBalancer:
              simple: FASTEST
        ---
        apiVersion: security.istio.io/v1
        kind: AuthorizationPolicy
        metadata:
          name: api
          namespace: shop
        spec:
          action: DENY
        """
    )

    assert [(str(e.resource), e.location.line, e.path) for e in result.errors] == [
        ("VirtualService default/reviews", 8, "spec.http[0].route"),
        ("DestinationRule default/reviews", 22, "spec.trafficPolicy.loadBalancer.simple"),
        ("AuthorizationPolicy shop/api", 30, "spec.action"),
    ]
    assert len(result.config) == 0
    assert len(result.rejected) == 3


def test_every_mistake_in_one_document_is_reported() -> None:
    result = load(
        """\
        apiVersion: networking.istio.io/v1
        kind: VirtualService
        metadata:
          name: reviews
        spec:
          hosts: [reviews]
          http:
          - match:
            - uri:
                regex: "/api/(?!internal).*"
            retries:
              attempts: 3
              retryOn: 5xx,timeout
            route:
            - destination: {host: reviews, subset: v1}
              weight: 110
            - destination: {host: reviews, subset: v2}
              weight: -10
              mirorr: true
        """
    )

    found = sorted((e.location.line, e.path) for e in result.errors)
    assert found == [
        (10, "spec.http[0].match[0].uri.regex"),
        (13, "spec.http[0].retries.retryOn"),
        (16, "spec.http[0].route[0].weight"),
        (18, "spec.http[0].route[1].weight"),
        (19, "spec.http[0].route[1].mirorr"),
    ], report(result)


def test_a_valid_resource_still_loads_next_to_an_invalid_one() -> None:
    result = load(
        """\
        apiVersion: networking.istio.io/v1
        kind: WorkloadEntry
        metadata:
          name: vm-1
        spec:
          address: 10.0.0.300
        ---
        apiVersion: networking.istio.io/v1
        kind: WorkloadEntry
        metadata:
          name: vm-2
        spec:
          address: 10.0.0.2
        """
    )

    assert [(e.location.line, e.path) for e in result.errors] == [(6, "spec.address")]
    assert [r.name for r in result.config] == ["vm-2"]
    assert [r.name for r in result.rejected] == ["vm-1"]
    assert not result.ok


def test_warnings_alone_do_not_make_a_file_invalid() -> None:
    result = load(
        """\
        apiVersion: networking.istio.io/v1
        kind: DestinationRule
        metadata:
          name: reviews
        spec:
          host: reviews
          trafficPolicy:
            outlierDetection:
              consecutiveErrors: 5
        ---
        apiVersion: networking.istio.io/v1
        kind: Gateway
        metadata:
          name: ingress
        spec:
          selector: {istio: ingressgateway}
        """
    )

    assert [(f.code.id, f.location.line, f.path) for f in result.findings] == [
        ("IST0002", 9, "spec.trafficPolicy.outlierDetection.consecutiveErrors"),
        ("LM0001", 11, ""),
    ]
    assert all(f.level is Severity.WARNING for f in result.findings)
    assert "'consecutiveErrors' is deprecated; use consecutive5xxErrors" in (
        result.findings[0].message
    )
    assert result.errors == ()
    assert result.ok
    assert [r.name for r in result.config] == ["reviews"]


def test_a_deprecated_field_with_a_bad_value_is_warned_about_and_rejected() -> None:
    result = load(
        """\
        apiVersion: networking.istio.io/v1
        kind: VirtualService
        metadata:
          name: reviews
        spec:
          hosts: [reviews]
          http:
          - mirror:
              host: shadow
            mirrorPercent: 150
            route:
            - destination:
                host: reviews
        """
    )

    assert [(f.level, f.location.line, f.path) for f in result.findings] == [
        (Severity.WARNING, 10, "spec.http[0].mirrorPercent"),
        (Severity.ERROR, 10, "spec.http[0].mirrorPercent"),
    ]
    assert "mirrorPercent is 150; at most 100 is allowed" in the_only_error(result).message
    assert not result.ok


def test_a_finding_prints_as_meshctl_validate_prints_it() -> None:
    result = load(
        """\
        apiVersion: networking.istio.io/v1
        kind: VirtualService
        metadata:
          name: reviews
          namespace: shop
        spec:
          hosts: [reviews]
          http:
          - route:
            - destination:
                host: reviews
              wieght: 100
        """
    )

    assert the_only_error(result).format() == (
        "mesh.yaml:12: VirtualService shop/reviews: spec.http[0].route[0].wieght: "
        "unknown field 'wieght'; did you mean 'weight'?"
    )
