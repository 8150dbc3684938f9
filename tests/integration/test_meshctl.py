"""meshctl as a user runs it: a real process, its output lines and its exit code."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).parents[2] / "examples" / "mesh"


def meshctl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "meshd._meshctl", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text).lstrip())
    return path


BROKEN = """
    apiVersion: networking.istio.io/v1
    kind: VirtualService
    metadata:
      name: reviews
      namespace: shop
    spec:
      hosts: [reviews]
      http:
      - route:
        - destination: {host: reviews, subset: v1}
          weight: 90
        - destination: {host: reviews, subset: v2}
          wieght: 10
        timeout: 500us
    """


def test_validate_passes_the_example_mesh() -> None:
    run = meshctl("validate", "-f", str(EXAMPLES))

    assert run.returncode == 0, run.stdout + run.stderr
    assert run.stdout == ""
    assert run.stderr.startswith("OK: 12 resources in 4 files")


def test_validate_prints_one_line_per_problem_and_fails(tmp_path: Path) -> None:
    path = write(tmp_path, "reviews.yaml", BROKEN)

    run = meshctl("validate", "-f", str(path))

    assert run.returncode == 1
    # The misspelt weight is reported, not its consequence (a total of 90).
    assert run.stdout.splitlines() == [
        f"{path}:13: VirtualService shop/reviews: spec.http[0].route[1].wieght: unknown field "
        "'wieght'; did you mean 'weight'?",
        f"{path}:14: VirtualService shop/reviews: spec.http[0].timeout: duration 500us is "
        "shorter than the 1ms minimum",
    ]
    assert "FAILED: 2 errors in 1 resource in 1 file" in run.stderr


def test_validate_exits_zero_when_there_are_only_warnings(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "old.yaml",
        """
        apiVersion: networking.istio.io/v1beta1
        kind: DestinationRule
        metadata: {name: reviews}
        spec:
          host: reviews
          trafficPolicy:
            outlierDetection: {consecutiveErrors: 5}
        """,
    )

    run = meshctl("validate", "-f", str(path))

    assert run.returncode == 0
    assert run.stdout == (
        f"{path}:7: DestinationRule default/reviews: spec.trafficPolicy.outlierDetection."
        "consecutiveErrors: warning: 'consecutiveErrors' is deprecated; use "
        "consecutive5xxErrors\n"
    )


def test_validate_reads_directories_recursively_and_reports_yaml_syntax_errors(
    tmp_path: Path,
) -> None:
    (tmp_path / "nested").mkdir()
    write(tmp_path, "nested/bad.yaml", "kind: [unclosed\n")
    write(tmp_path, "notes.txt", "not yaml, not read")

    run = meshctl("validate", "-f", str(tmp_path))

    assert run.returncode == 1
    [line] = run.stdout.splitlines()
    assert line.startswith(f"{tmp_path / 'nested' / 'bad.yaml'}:2: document 1: -: ")
    assert "this is not valid YAML" in line


def test_validate_json_output_is_a_document_for_machines(tmp_path: Path) -> None:
    path = write(tmp_path, "reviews.yaml", BROKEN)

    run = meshctl("validate", "-f", str(path), "-o", "json")

    assert run.returncode == 1
    document = json.loads(run.stdout)
    assert document["files"] == 1
    first = document["findings"][0]
    assert first["code"] == "IST0106"
    assert first["severity"] == "error"
    assert first["resource"] == {"kind": "VirtualService", "namespace": "shop", "name": "reviews"}
    assert (first["file"], first["line"]) == (str(path), 13)
    assert first["path"] == "spec.http[0].route[1].wieght"


def test_analyze_reports_cross_resource_problems_with_codes(tmp_path: Path) -> None:
    write(
        tmp_path,
        "mesh.yaml",
        """
        apiVersion: networking.istio.io/v1
        kind: ServiceEntry
        metadata: {name: reviews, namespace: shop}
        spec:
          hosts: [reviews.shop.svc.cluster.local]
          ports: [{number: 8080, name: http, protocol: HTTP}]
          resolution: STATIC
          workloadSelector: {labels: {app: reviews}}
        ---
        apiVersion: networking.istio.io/v1
        kind: VirtualService
        metadata: {name: reviews, namespace: shop}
        spec:
          hosts: [reviews]
          http:
          - route:
            - destination: {host: reviews, subset: v3}
        """,
    )

    run = meshctl("analyze", "-f", str(tmp_path))

    assert run.returncode == 1
    assert run.stdout.splitlines() == [
        f"{tmp_path / 'mesh.yaml'}:17: VirtualService shop/reviews: "
        "spec.http[0].route[0].destination.subset: error [IST0101] route subset 'v3' of host "
        "'reviews' is not defined by any DestinationRule; no DestinationRule defines subsets "
        "for it"
    ]


def test_analyze_failure_threshold_can_fail_on_warnings(tmp_path: Path) -> None:
    write(
        tmp_path,
        "dr.yaml",
        """
        apiVersion: networking.istio.io/v1
        kind: DestinationRule
        metadata: {name: db}
        spec:
          host: db.example.com
          trafficPolicy: {tls: {mode: SIMPLE}}
        """,
    )

    relaxed = meshctl("analyze", "-f", str(tmp_path))
    strict = meshctl("analyze", "-f", str(tmp_path), "--failure-threshold", "warning")

    assert relaxed.returncode == 0
    assert strict.returncode == 1
    assert "[IST0128]" in strict.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["validate"], "the following arguments are required: -f/--filename"),
        (["validate", "-f", "/nonexistent/mesh"], "/nonexistent/mesh: no such file or directory"),
        (["frobnicate"], "invalid choice: 'frobnicate'"),
    ],
)
def test_usage_errors_exit_two_with_a_message(args: list[str], message: str) -> None:
    run = meshctl(*args)

    assert run.returncode == 2
    assert message in run.stderr
