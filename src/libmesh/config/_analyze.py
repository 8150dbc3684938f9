"""Cross-resource analysis (placeholder, filled in next)."""

from __future__ import annotations

from ._findings import Finding
from ._loader import LoadResult


def analyze(result: LoadResult) -> list[Finding]:
    return []
