"""The libmesh demo, on the embedded default: the example shop in examples/mesh/.

Run it with ./scripts/demo.sh. It needs no running service: it loads the mesh, shows what
libmesh understood, and shows how a broken change is refused, with the line to fix.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

from libmesh import config

MESH = Path(__file__).parent / "mesh"


def show_mesh(result: config.LoadResult) -> None:
    registry = config.Registry.build(result.config, result.services)
    print(f"Loaded {len(result.config)} resources from {len(result.files)} files in {MESH}:")
    for service in registry.services:
        ports = ", ".join(f"{p.number}/{p.protocol or 'TCP'}" for p in service.ports)
        workloads = registry.workloads_of(service)
        count = f"{len(workloads)} workload{'s' if len(workloads) != 1 else ''}"
        print(f"  service {service.host} ({ports}): {count}")
    for vs in result.config.of_kind("VirtualService"):
        for route in vs.spec.http:
            targets = ", ".join(
                f"{d.destination.subset or '*'}={d.weight if d.weight is not None else 100}%"
                for d in route.route
            )
            label = route.name or "default"
            print(f"  route {vs.namespace}/{vs.name} [{label}] -> {targets}")


def show_refusal(original: str) -> None:
    broken = original.replace("weight: 10", "weight: 15").replace("perTryTimeout", "perTryTimout")
    broken = broken.replace("subset: v2}\n      weight", "subset: v3}\n      weight")
    print("\nA change with three mistakes in reviews.yaml is refused before it reaches traffic:")
    with tempfile.TemporaryDirectory() as scratch:
        edited = Path(scratch) / "mesh"
        shutil.copytree(MESH, edited)
        (edited / "reviews.yaml").write_text(broken)
        result = config.load(edited)
        findings = [*result.findings, *config.analyze(result)]
    for finding in sorted(findings, key=lambda f: f.location.line):
        print("  " + finding.format(with_code=True).replace(scratch + "/", ""))


def main() -> int:
    result = config.load(MESH)
    problems = [*result.findings, *config.analyze(result)]
    for finding in problems:
        print(finding.format(with_code=True))
    if any(f.is_error for f in problems):
        return 1
    show_mesh(result)
    show_refusal((MESH / "reviews.yaml").read_text())
    print("\nNext: ./scripts/test.sh runs the whole test suite.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
