"""meshctl: check configuration before it reaches a data plane, and inspect the mesh.

meshctl validate -f mesh/            every resource, on its own: schema and Istio's rules
meshctl analyze  -f mesh/            the same, plus checks across resources
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import TextIO

from libmesh import ConfigError, __version__
from libmesh.config import Finding, LoadResult, Severity, analyze, load, load_mesh_settings

__all__ = ["main"]

EXIT_OK = 0
EXIT_FINDINGS = 1
EXIT_USAGE = 2


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    code: int = args.run(args, sys.stdout, sys.stderr)
    return code


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="meshctl",
        description="Check libmesh (Istio-style) configuration and inspect the mesh.",
    )
    parser.add_argument("--version", action="version", version=f"meshctl {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    validate = commands.add_parser(
        "validate",
        help="check each resource against Istio's schema and validation rules",
        description=(
            "Check each resource against Istio's schema and validation rules. Prints one line "
            "per problem, 'file:line: Kind namespace/name: field.path: message', and exits "
            "non-zero when there is an error (warnings alone exit 0)."
        ),
    )
    _add_input_options(validate)
    validate.set_defaults(run=_validate)

    analyze_cmd = commands.add_parser(
        "analyze",
        help="validate, then check resources against each other, like istioctl analyze",
        description=(
            "Validate, then check resources against each other: routes to subsets or hosts "
            "that do not exist, conflicting VirtualServices or DestinationRules, TLS settings "
            "that contradict PeerAuthentication, selectors that match no workload. Each "
            "finding carries a stable code (Istio's IST codes where Istio has the check)."
        ),
    )
    _add_input_options(analyze_cmd)
    analyze_cmd.add_argument(
        "--failure-threshold",
        choices=[str(s) for s in Severity],
        default="error",
        help="the lowest severity that makes the exit code non-zero (default: error)",
    )
    analyze_cmd.add_argument(
        "--mesh-config",
        metavar="FILE",
        help="an Istio MeshConfig YAML file (rootNamespace, DNS auto-allocation)",
    )
    analyze_cmd.set_defaults(run=_analyze)
    return parser


def _add_input_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "-f",
        "--filename",
        dest="paths",
        action="append",
        required=True,
        metavar="PATH",
        help="a YAML file or a directory (read recursively); repeat for several",
    )
    parser.add_argument(
        "-o",
        "--output",
        choices=["text", "json"],
        default="text",
        help="text: one line per finding (default); json: a document for machines",
    )


def _missing_paths(paths: Sequence[str], err: TextIO) -> bool:
    from pathlib import Path

    missing = [p for p in paths if not Path(p).exists()]
    for path in missing:
        err.write(f"meshctl: {path}: no such file or directory\n")
    return bool(missing)


def _validate(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    if _missing_paths(args.paths, err):
        return EXIT_USAGE
    result = load(args.paths)
    findings = sorted(result.findings, key=_order)
    _report(findings, result, args.output, out, err, with_code=False)
    return EXIT_FINDINGS if any(f.is_error for f in findings) else EXIT_OK


def _analyze(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    if _missing_paths(args.paths, err):
        return EXIT_USAGE
    try:
        mesh = load_mesh_settings(args.mesh_config) if args.mesh_config else None
    except ConfigError as exc:
        err.write(f"meshctl: {exc}\n")
        return EXIT_USAGE
    result = load(args.paths)
    findings = sorted([*result.findings, *analyze(result, mesh=mesh)], key=_order)
    _report(findings, result, args.output, out, err, with_code=True)
    threshold = Severity[args.failure_threshold.upper()]
    return EXIT_FINDINGS if any(f.level >= threshold for f in findings) else EXIT_OK


def _order(finding: Finding) -> tuple[str, int, int, str]:
    loc = finding.location
    return (loc.file, loc.line, loc.column, finding.message)


def _report(
    findings: Sequence[Finding],
    result: LoadResult,
    output: str,
    out: TextIO,
    err: TextIO,
    *,
    with_code: bool,
) -> None:
    if output == "json":
        document = {
            "files": len(result.files),
            "resources": len(result.config) + len(result.rejected),
            "findings": [f.to_json() for f in findings],
        }
        json.dump(document, out, indent=2)
        out.write("\n")
        return
    for finding in findings:
        out.write(finding.format(with_code=with_code) + "\n")
    err.write(_summary(findings, result) + "\n")


def _summary(findings: Sequence[Finding], result: LoadResult) -> str:
    counts = {level: sum(1 for f in findings if f.level is level) for level in Severity}
    resources = len(result.config) + len(result.rejected)
    scope = f"{_plural(resources, 'resource')} in {_plural(len(result.files), 'file')}"
    if not findings:
        return f"OK: {scope}, no problems found"
    parts = [
        _plural(counts[level], str(level))
        for level in (Severity.ERROR, Severity.WARNING, Severity.INFO)
        if counts[level]
    ]
    verdict = "FAILED" if counts[Severity.ERROR] else "OK"
    return f"{verdict}: {', '.join(parts)} in {scope}"


def _plural(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


if __name__ == "__main__":
    raise SystemExit(main())
