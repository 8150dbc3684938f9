"""meshctl: check configuration before it reaches a data plane, and inspect the mesh.

meshctl validate -f mesh/            every resource, on its own: schema and Istio's rules
meshctl analyze  -f mesh/            the same, plus checks across resources
meshctl proxy-status                 each client of a running meshd: SYNCED, STALE or NACKED
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

from cryptography.hazmat.primitives import hashes

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

    status = commands.add_parser(
        "proxy-status",
        help="show whether each client of a running meshd has its latest configuration",
        description=(
            "Ask a running meshd which clients are connected and, per resource type, whether "
            "each accepted the last configuration it was sent (SYNCED), rejected it (NACKED, "
            "with the client's error), has not answered yet (STALE) or was sent nothing (NOT "
            "SENT). Exits 1 when a client rejected its configuration."
        ),
    )
    status.add_argument(
        "name",
        nargs="?",
        help="only clients whose node id starts with this",
    )
    status.add_argument(
        "--admin-address",
        default="127.0.0.1:15014",
        metavar="HOST:PORT",
        help="meshd's admin address (default: 127.0.0.1:15014)",
    )
    status.add_argument("-o", "--output", choices=["text", "json"], default="text")
    status.set_defaults(run=_proxy_status)

    token = commands.add_parser(
        "token",
        help="bootstrap tokens: what a workload presents to get its first SVID",
        description="Bootstrap tokens, signed with the token key in meshd's CA directory.",
    )
    token_commands = token.add_subparsers(dest="token_command", metavar="COMMAND")
    create = token_commands.add_parser(
        "create",
        help="print a token that gets one identity's SVID from meshd",
        description=(
            "Print a token that proves spiffe://<trust-domain>/ns/<namespace>/sa/"
            "<service-account> to meshd's certificate API until it expires. Reads the token "
            "key from meshd's CA directory: run it where meshd runs, as its user."
        ),
    )
    create.add_argument("--namespace", "-n", required=True)
    create.add_argument("--service-account", "-s", required=True)
    create.add_argument(
        "--ttl", default="1h", help="how long the token is valid, e.g. 10m, 1h (default: 1h)"
    )
    create.add_argument(
        "--ca-dir",
        type=Path,
        default=None,
        metavar="DIR",
        help="meshd's --ca-dir (default: meshd's default)",
    )
    create.add_argument("--trust-domain", default="cluster.local")
    create.set_defaults(run=_token_create)
    token.set_defaults(run=lambda args, out, err: _usage(token, err))

    ca = commands.add_parser(
        "ca",
        help="meshd's certificate authority: rotate its root",
        description="meshd's certificate authority, in its CA directory.",
    )
    ca_commands = ca.add_subparsers(dest="ca_command", metavar="COMMAND")
    rotate = ca_commands.add_parser(
        "rotate",
        help="replace the root in three steps, without breaking a connection",
        description=(
            "Replace the CA's root with an overlap, as the running meshd follows (no restart): "
            "'prepare' makes the next root and trusts it beside the current one; once every "
            "workload has renewed its SVID (half its lifetime), 'activate' signs with it and "
            "keeps trusting the old one; once the SVIDs the old root signed have expired (their "
            "lifetime), 'finish' stops trusting it."
        ),
    )
    rotate.add_argument("step", choices=["prepare", "activate", "finish"])
    rotate.add_argument(
        "--ca-dir", type=Path, default=None, metavar="DIR",
        help="meshd's --ca-dir (default: meshd's default)",
    )  # fmt: skip
    rotate.add_argument("--trust-domain", default="cluster.local")
    rotate.set_defaults(run=_ca_rotate)
    ca.set_defaults(run=lambda args, out, err: _usage(ca, err))
    return parser


def _usage(parser: argparse.ArgumentParser, err: TextIO) -> int:
    parser.print_help(err)
    return EXIT_USAGE


def _token_create(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    from libmesh._duration import parse_duration
    from libmesh.identity import SpiffeId, SpiffeIdError

    from ._main import _default_ca_dir
    from ._tokens import TOKEN_KEY, TokenError, TokenIssuer

    ca_dir = args.ca_dir or _default_ca_dir()
    try:
        ttl = parse_duration(args.ttl).seconds
        identity = SpiffeId.for_workload(args.trust_domain, args.namespace, args.service_account)
    except (ValueError, SpiffeIdError) as exc:
        err.write(f"meshctl: {exc}\n")
        return EXIT_USAGE
    if not (ca_dir / TOKEN_KEY).exists():
        err.write(
            f"meshctl: no token key in {ca_dir}: start meshd with --ca-dir {ca_dir} first, "
            "or give meshd's --ca-dir\n"
        )
        return EXIT_FINDINGS
    try:
        issuer = TokenIssuer.load_or_create(ca_dir)
    except (TokenError, OSError) as exc:
        err.write(f"meshctl: {exc}\n")
        return EXIT_FINDINGS
    out.write(issuer.create(identity, ttl) + "\n")
    return EXIT_OK


def _ca_rotate(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    from ._ca import CAError, rotate_activate, rotate_finish, rotate_prepare
    from ._main import _default_ca_dir

    ca_dir = args.ca_dir or _default_ca_dir()
    try:
        if args.step == "prepare":
            root = rotate_prepare(ca_dir, args.trust_domain)
            then = "now trusted beside the current root; activate once every workload renewed"
        elif args.step == "activate":
            root = rotate_activate(ca_dir)
            then = "now signs; the previous root stays trusted until 'finish'"
        else:
            root = rotate_finish(ca_dir)
            then = "is no longer trusted"
    except (CAError, OSError) as exc:
        err.write(f"meshctl: {exc}\n")
        return EXIT_FINDINGS
    fingerprint = root.fingerprint(hashes.SHA256()).hex()[:16]
    out.write(f"root {fingerprint} (valid until {root.not_valid_after_utc:%Y-%m-%d}) {then}\n")
    return EXIT_OK


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


_TYPES = ("cds", "lds", "eds", "rds")


def _proxy_status(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    import httpx

    url = f"http://{args.admin_address}/debug/syncz"
    try:
        response = httpx.get(url, timeout=10)
        response.raise_for_status()
        document = response.json()
    except httpx.HTTPError as exc:
        err.write(
            f"meshctl: cannot read {url}: {exc}\n"
            "  is meshd running, and is --admin-address its admin address?\n"
        )
        return EXIT_USAGE
    clients = [
        c for c in document["clients"] if not args.name or str(c["node"]).startswith(args.name)
    ]
    if args.output == "json":
        json.dump(clients, out, indent=2)
        out.write("\n")
    else:
        _status_table(clients, out)
    nacked = any(c["types"][t]["status"] == "NACKED" for c in clients for t in _TYPES)
    if not clients:
        err.write(
            "no clients are connected" + (f" matching {args.name!r}" if args.name else "") + "\n"
        )
    return EXIT_FINDINGS if nacked else EXIT_OK


def _status_table(clients: Sequence[dict[str, Any]], out: TextIO) -> None:
    header = ["NAME", *(t.upper() for t in _TYPES), "NAMESPACE", "CLIENT"]
    rows = []
    errors = []
    for client in clients:
        types = client["types"]
        rows.append(
            [
                client["node"] or client["id"],
                *(types[t]["status"].replace(" ", "_") for t in _TYPES),
                client["namespace"],
                client["flavor"] + (" (delta)" if client["protocol"] == "delta" else ""),
            ]
        )
        for t in _TYPES:
            nack = types[t].get("nack")
            if types[t]["status"] == "NACKED" and nack:
                errors.append(
                    f"{client['node'] or client['id']}: {t.upper()} version {nack['version']} "
                    f"rejected: {nack['error']}"
                )
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        out.write("  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
        out.write("\n")
    if errors:
        out.write("\n" + "\n".join(errors) + "\n")


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
