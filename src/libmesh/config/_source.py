"""Where a value came from: every resource and field remembers its file and line."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["NOWHERE", "Location"]


@dataclass(frozen=True, slots=True, order=True)
class Location:
    """A position in a source file; ``line`` and ``column`` are 1-based, 0 when unknown."""

    file: str
    line: int = 0
    column: int = 0

    def __str__(self) -> str:
        return f"{self.file}:{self.line}" if self.line else self.file

    def __bool__(self) -> bool:
        return bool(self.file)


NOWHERE = Location("")
