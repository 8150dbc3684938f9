"""Real Istio YAML from ../shared/istio-corpus: what Istio accepts loads, what it rejects is
rejected for the same reason, and analysis reports what ``istioctl analyze`` reports."""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pytest

from libmesh.config import KINDS, Codes, Finding, analyze, load, load_mesh_settings

CORPUS = Path(__file__).parents[2].parent / "shared" / "istio-corpus"
VALID = sorted((CORPUS / "valid").glob("*.yaml"))
ANALYZER_DATA = CORPUS / "analyzers"


@pytest.mark.parametrize("path", VALID, ids=lambda p: p.name)
def test_valid_istio_config_loads_without_errors(path: Path) -> None:
    result = load(path)

    assert result.errors == ()
    assert len(result.config) + len(result.rejected) > 0 or _only_other_kinds(result.findings)
    for finding in result.findings:
        # Warnings are allowed: other kinds are skipped, deprecated fields and unreachable
        # rules are pointed out. None of them may stop the file from loading.
        assert not finding.is_error, finding.format()
        assert finding.location.file == str(path)
        assert finding.location.line >= 1
    for resource in result.config:
        assert isinstance(resource.spec, KINDS[resource.kind].spec)


def _only_other_kinds(findings: tuple[Finding, ...]) -> bool:
    return all(f.code is Codes.UNSUPPORTED_KIND for f in findings)


def test_other_kinds_in_the_valid_corpus_are_skipped_with_a_warning_naming_them() -> None:
    result = load(CORPUS / "valid" / "samples_bookinfo_networking_bookinfo-gateway.yaml")

    skipped = [f for f in result.findings if f.code is Codes.UNSUPPORTED_KIND]
    assert [str(f.resource) for f in skipped] == ["Gateway default/bookinfo-gateway"]
    assert skipped[0].location.line == 1
    assert "skipped" in skipped[0].message
    assert [r.name for r in result.config] == ["bookinfo"]


NONCONFORMANT = {
    # file: (line, field path, what the message must say), per the corpus README
    "samples_bookinfo_networking_virtual-service-ratings-test-abort_062bdf2e.yaml": (
        15,
        "spec.http[0].fault.abort.percent",
        "unknown field 'percent'; did you mean 'percentage'?",
    ),
    "samples_websockets_route_161915eb.yaml": (
        33,
        "spec.http[0].websocketUpgrade",
        "unknown field 'websocketUpgrade'",
    ),
    "docs-authz-jwt-1.yaml": (12, "spec.jwtRules[0].jwksUri", "must use http:// or https://"),
}


@pytest.mark.parametrize("name", sorted(NONCONFORMANT))
def test_nonconformant_istio_config_is_rejected_for_its_reason(name: str) -> None:
    line, path, message = NONCONFORMANT[name]

    result = load(CORPUS / "nonconformant" / name)

    assert [(e.location.line, e.path) for e in result.errors] == [(line, path)]
    assert message in result.errors[0].message
    assert len(result.config) == 0


def test_every_nonconformant_file_is_covered() -> None:
    assert {p.name for p in (CORPUS / "nonconformant").glob("*.yaml")} == set(NONCONFORMANT)


# -- istioctl analyze cases ----------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    number: int
    name: str
    files: tuple[str, ...]
    mesh_config: str | None
    analyzer: str
    expected: tuple[tuple[str, str], ...]  # (code, "Kind namespace/name")


def _expected_cases() -> list[Case]:
    """The table of EXPECTED.md, read as data, so the test follows the corpus exactly."""
    text = (ANALYZER_DATA / "EXPECTED.md").read_text()
    section = text.split("## Expected messages per test case", 1)[1].split("\n## ", 1)[0]
    cases: list[Case] = []
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 7 or not line.startswith("|") or cells[0] in ("#", "---"):
            continue
        number, name, inputs, analyzer, _, code, resource = cells
        if number:
            files = tuple(re.findall(r"`([^`]+\.yaml)`", inputs.split("mesh config:")[0]))
            mesh = re.findall(r"mesh config: `([^`]+)`", inputs)
            cases.append(
                Case(int(number), name, files, mesh[0] if mesh else None, analyzer.strip("`"), ())
            )
        if code.startswith("IST"):
            kind, _, full = resource.partition(" ")
            namespaced = full if "/" in full else f"default/{full}"
            last = cases[-1]
            cases[-1] = Case(
                last.number, last.name, last.files, last.mesh_config, last.analyzer,
                (*last.expected, (code, f"{kind} {namespaced}")),
            )  # fmt: skip
    return cases


CASES = _expected_cases()

# Which libmesh analyzer does the work of each Istio analyzer in EXPECTED.md. "load" means the
# loader itself reports it (validation and deprecation findings, as Istio's schema analyzer).
ANALYZER_FOR = {
    "deprecation.FieldAnalyzer": "load",
    "schema.CollectionValidationAnalyzer(VirtualService)": "load",
    "virtualservice.ConflictingMeshGatewayHostsAnalyzer": "virtualservice.conflicting-hosts",
    "virtualservice.DestinationHostAnalyzer": "virtualservice.destination-hosts",
    "virtualservice.DestinationRuleAnalyzer": "virtualservice.destination-subsets",
    "destinationrule.CaCertificateAnalyzer": "destinationrule.ca-certificates",
    "destinationrule.PodNotSelectedAnalyzer": "destinationrule.hosts-and-subsets",
    "serviceentry.ProtocolAddressesAnalyzer": "serviceentry.addresses",
    "conditions.ConditionAnalyzer": "status.conditions",
}

# Cases that need what libmesh deliberately does not have, each with its reason.
OUT_OF_SCOPE = {
    2: "Sidecar analyzer: Sidecar is not a kind libmesh reads",
    3: "Sidecar analyzer: Sidecar is not a kind libmesh reads",
    8: "Gateway analyzer: libmesh has no Gateway kind (no ingress gateways)",
    9: "needs Gateway resources and the Kubernetes Pods of the gateway",
    10: "Gateway analyzer (Kubernetes Gateway API internal gateway names)",
    11: "needs Kubernetes Pods and Namespaces (libmesh's workloads are WorkloadEntries)",
    24: "Gateway analyzer: libmesh has no Gateway kind",
    25: "Gateway analyzer: libmesh has no Gateway kind",
    26: "Gateway analyzer: libmesh has no Gateway kind",
    29: "ingress-gateway semantics (IST0140): libmesh has no ingress gateway",
    30: "needs Kubernetes Pods (Gateway API selectors)",
    35: "needs Kubernetes Pods (libmesh's workloads are WorkloadEntries)",
    36: "needs Kubernetes Pods and Nodes for topology labels",
    37: "needs Kubernetes Pods and Nodes for topology labels",
    39: "Gateway analyzer: libmesh has no Gateway kind",
    40: "Gateway analyzer: libmesh has no Gateway kind",
    41: "Gateway analyzer: libmesh has no Gateway kind",
    42: "Gateway analyzer: libmesh has no Gateway kind",
}

# Expected rows about kinds libmesh does not read, within cases that are otherwise in scope.
OTHER_KIND_ROWS = {"Sidecar", "Service", "Gateway", "HTTPRoute", "GRPCRoute"}

# EXPECTED.md lists this row twice, but the copied testdata has one bogus destination in that
# VirtualService (the corpus notes that upstream revisions differ); it is expected once here.
KNOWN_DUPLICATE_ROWS = {(6, ("IST0101", "VirtualService default/reviews-bogushost"))}


def _findings_of(case: Case) -> list[Finding]:
    result = load([ANALYZER_DATA / f for f in case.files])
    engine = ANALYZER_FOR[case.analyzer]
    codes = {code for code, _ in case.expected} or {"IST0130", "IST0131", "IST0002"}
    if engine == "load":
        return [f for f in result.findings if f.code.id in codes]
    mesh = load_mesh_settings(ANALYZER_DATA / case.mesh_config) if case.mesh_config else None
    return analyze(result, only=[engine], mesh=mesh)


IN_SCOPE = [c for c in CASES if c.number not in OUT_OF_SCOPE]


@pytest.mark.parametrize("case", IN_SCOPE, ids=lambda c: f"{c.number}-{c.name}")
def test_analysis_reports_what_istioctl_analyze_reports(case: Case) -> None:
    expected = Counter(row for row in case.expected if row[1].split()[0] not in OTHER_KIND_ROWS)
    for number, row in KNOWN_DUPLICATE_ROWS:
        if number == case.number:
            expected[row] = 1

    findings = _findings_of(case)

    assert Counter((f.code.id, str(f.resource)) for f in findings) == expected
    for finding in findings:
        assert finding.location.line >= 1
        assert finding.path


def test_the_corpus_cases_are_all_accounted_for() -> None:
    assert [c.number for c in CASES] == list(range(1, 43))
    assert set(OUT_OF_SCOPE) <= {c.number for c in CASES}
    assert {c.analyzer for c in IN_SCOPE} <= set(ANALYZER_FOR)
    assert sum(len(c.expected) for c in IN_SCOPE) >= 40
