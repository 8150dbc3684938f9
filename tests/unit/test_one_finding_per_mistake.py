"""One mistake, one finding, at the right place: a value the decoder could not read is not
reported again by the rules that would have checked it, and every finding has a file and line."""

from __future__ import annotations

import textwrap

import pytest

from libmesh.config import load_text


def findings(yaml_text: str) -> list[tuple[int, str, str]]:
    result = load_text(textwrap.dedent(yaml_text), "mesh.yaml")
    for finding in result.findings:
        assert finding.location.file == "mesh.yaml"
        assert finding.location.line >= 1
    return [(f.location.line, f.path, f.message) for f in result.findings]


VS = """\
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: reviews}
spec:
  hosts: [reviews]
  http:
  - route:
    - destination: {host: reviews, subset: v1}
      weight: {weight_a}
    - destination: {host: reviews, subset: v2}
      weight: {weight_b}
"""


@pytest.mark.parametrize(
    ("weight_a", "weight_b", "path"),
    [
        ('"50"', "50", "spec.http[0].route[0].weight"),
        ("50.5", "50", "spec.http[0].route[0].weight"),
    ],
)
def test_an_unreadable_weight_is_not_also_reported_as_a_wrong_total(
    weight_a: str, weight_b: str, path: str
) -> None:
    text = VS.replace("{weight_a}", weight_a).replace("{weight_b}", weight_b)

    [(line, reported_path, message)] = findings(text)

    assert (line, reported_path) == (9, path)
    assert message.startswith("expected an integer")


def test_a_missing_required_field_is_reported_once() -> None:
    text = """\
    apiVersion: networking.istio.io/v1
    kind: DestinationRule
    metadata: {name: reviews}
    spec:
      subsets: [{name: v1}]
    """

    assert findings(text) == [(5, "spec.host", "'host' is required")]


def test_a_mirror_without_destination_is_reported_at_the_mirror() -> None:
    text = """\
    apiVersion: networking.istio.io/v1
    kind: VirtualService
    metadata: {name: reviews}
    spec:
      hosts: [reviews]
      http:
      - route: [{destination: {host: reviews}}]
        mirrors:
        - percentage: {value: 10}
    """

    assert findings(text) == [
        (9, "spec.http[0].mirrors[0].destination", "'destination' is required")
    ]


def test_a_map_key_given_twice_is_named_as_a_map_entry() -> None:
    text = """\
    apiVersion: networking.istio.io/v1
    kind: WorkloadEntry
    metadata: {name: vm}
    spec:
      address: 10.0.0.1
      labels:
        app: a
        app: b
    """

    [(line, path, message)] = findings(text)

    assert (line, path) == (8, "spec.labels[app]")
    assert message == "'app' is given twice (first on line 7); YAML keeps only the last"


def test_an_unknown_condition_key_is_reported_once_at_the_key() -> None:
    text = """\
    apiVersion: security.istio.io/v1
    kind: AuthorizationPolicy
    metadata: {name: api}
    spec:
      rules:
      - when:
        - key: request.header[x-user]
          values: [alice]
    """

    [(line, path, message)] = findings(text)

    assert (line, path) == (7, "spec.rules[0].when[0].key")
    assert message.startswith("unknown condition key 'request.header[x-user]'")


def test_ranges_are_printed_as_whole_numbers() -> None:
    text = """\
    apiVersion: networking.istio.io/v1
    kind: WorkloadEntry
    metadata: {name: vm}
    spec:
      address: 10.0.0.1
      weight: -1
    """

    assert findings(text) == [
        (6, "spec.weight", "-1 is out of range; it must be between 0 and 4294967295")
    ]


def test_an_empty_audience_is_reported_once() -> None:
    text = """\
    apiVersion: security.istio.io/v1
    kind: RequestAuthentication
    metadata: {name: jwt}
    spec:
      jwtRules:
      - issuer: https://issuer.example.com
        audiences: [""]
    """

    assert findings(text) == [(7, "spec.jwtRules[0].audiences[0]", "must not be empty")]


def test_an_explicitly_empty_to_list_is_refused_rather_than_matching_everything() -> None:
    text = """\
    apiVersion: security.istio.io/v1
    kind: AuthorizationPolicy
    metadata: {name: api}
    spec:
      rules:
      - to: []
    """

    [(line, path, message)] = findings(text)

    assert (line, path) == (6, "spec.rules[0].to")
    assert message.startswith("'to' is empty")


def test_a_jwt_timeout_must_be_whole_milliseconds() -> None:
    text = """\
    apiVersion: security.istio.io/v1
    kind: RequestAuthentication
    metadata: {name: jwt}
    spec:
      jwtRules:
      - issuer: https://issuer.example.com
        timeout: 1500us
    """

    [(line, path, message)] = findings(text)

    assert (line, path) == (7, "spec.jwtRules[0].timeout")
    assert "millisecond precision" in message
