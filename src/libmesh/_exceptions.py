"""The libmesh exception tree.

Every error libmesh raises derives from :class:`MeshError`, and also from the standard
exception a caller would catch for that situation::

    MeshError
     └── ConfigError (ValueError)       configuration that cannot be used as it is
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .config import Finding

__all__ = ["ConfigError", "MeshError"]


class MeshError(Exception):
    """Base of every error libmesh raises."""


class ConfigError(MeshError, ValueError):
    """Configuration was rejected; ``findings`` says what, where, and how to fix it."""

    def __init__(self, message: str, findings: Sequence[Finding] = ()) -> None:
        lines = [message, *(f.format() for f in findings if f.is_error)]
        super().__init__("\n  ".join(lines))
        self.findings = tuple(findings)
