"""Durations in Istio's syntax: Go's ``time.ParseDuration`` (``1h30m``, ``1.5s``, ``250ms``)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

__all__ = ["Duration", "parse_duration", "seconds_argument"]

_UNITS_NS = {
    "ns": 1,
    "us": 1_000,
    "µs": 1_000,  # U+00B5 micro sign
    "μs": 1_000,  # U+03BC Greek mu
    "ms": 1_000_000,
    "s": 1_000_000_000,
    "m": 60 * 1_000_000_000,
    "h": 3600 * 1_000_000_000,
}
_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|μs|ms|s|m|h)")
_MAX_NS = 2**63 - 1


@dataclass(frozen=True, slots=True, order=True)
class Duration:
    """A non-negative span of time, exact to the nanosecond."""

    nanos: int
    text: str = field(default="", compare=False)

    @property
    def seconds(self) -> float:
        return self.nanos / 1e9

    @classmethod
    def of(cls, *, seconds: float = 0, millis: float = 0) -> Duration:
        nanos = round(seconds * 1e9 + millis * 1e6)
        return cls(nanos, _format(nanos))

    def __str__(self) -> str:
        return self.text or _format(self.nanos)


def parse_duration(text: str) -> Duration:
    """Parse a Go-style duration; raise ``ValueError`` with a readable reason when it is not one.

    Istio reads durations the way Go does: a sequence of decimal numbers, each with a unit
    (``ns``, ``us``, ``ms``, ``s``, ``m``, ``h``), such as ``300ms`` or ``1h45m``. A sign is
    refused here because no Istio duration may be negative.
    """
    if not isinstance(text, str) or not text:
        raise ValueError("a duration must be a non-empty string such as '1s' or '250ms'")
    if text[0] in "+-":
        raise ValueError(f"duration {text!r} must not be signed")
    if text == "0":
        return Duration(0, text)
    pos, total = 0, 0
    while pos < len(text):
        m = _PART.match(text, pos)
        if m is None:
            raise ValueError(
                f"{text!r} is not a duration: use a number with a unit, such as '1s', '250ms' "
                "or '1h30m' (units: ns, us, ms, s, m, h)"
            )
        number, unit = m.groups()
        whole, _, frac = number.partition(".")
        scale = _UNITS_NS[unit]
        total += int(whole or "0") * scale
        if frac:
            total += int(frac) * scale // 10 ** len(frac)
        pos = m.end()
    if total > _MAX_NS:
        raise ValueError(f"duration {text!r} is too long")
    return Duration(total, text)


def seconds_argument(text: str) -> float:
    """An argparse ``type``: a duration (``10s``, ``500ms``) in seconds, or a usage error."""
    import argparse

    try:
        return parse_duration(text).seconds
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc  # it says how to write one


def _format(nanos: int) -> str:
    if nanos % 1_000_000_000 == 0:
        return f"{nanos // 1_000_000_000}s"
    if nanos % 1_000_000 == 0:
        return f"{nanos // 1_000_000}ms"
    if nanos % 1_000 == 0:
        return f"{nanos // 1_000}us"
    return f"{nanos}ns"
