"""libmesh's annotations: the settings Envoy has and Istio's API does not expose.

Istio extends its API with annotations; libmesh does the same, under ``libmesh.io/``, for a few
Envoy features users ask for and Istio lacks. Each value is ``key=value`` pairs separated by
commas, validated like any field (``meshctl validate`` reports a bad one with its line)::

    metadata:
      annotations:
        libmesh.io/outlier-success-rate: "stdevFactor=1.9,minimumHosts=5,requestVolume=100"
        libmesh.io/per-host-max-connections: "10"
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from .._duration import Duration, parse_duration

__all__ = [
    "ANNOTATIONS",
    "FailurePercentage",
    "Hedge",
    "SuccessRate",
    "annotation_problems",
    "read_annotation",
]

PREFIX = "libmesh.io/"


@dataclass(frozen=True, slots=True)
class SuccessRate:
    """Envoy's success-rate ejection: hosts far below the cluster's mean are ejected."""

    stdev_factor: float = 1.9
    minimum_hosts: int = 5
    request_volume: int = 100
    enforcing: int = 100


@dataclass(frozen=True, slots=True)
class FailurePercentage:
    """Envoy's failure-percentage ejection: hosts failing at least ``threshold`` % are ejected."""

    threshold: int = 85
    minimum_hosts: int = 5
    request_volume: int = 50
    enforcing: int = 100


@dataclass(frozen=True, slots=True)
class Hedge:
    """Envoy's request hedging: extra attempts raced against the first."""

    initial_requests: int = 1
    additional_request_chance: float = 0.0
    on_per_try_timeout: bool = True


def _pairs(text: str, fields: Mapping[str, Callable[[str], Any]]) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        key, eq, raw = part.partition("=")
        key = key.strip()
        if not eq:
            raise ValueError(f"{part!r} is not key=value")
        if key not in fields:
            close = difflib.get_close_matches(key, list(fields), n=1)
            hint = (
                f"; did you mean {close[0]!r}?" if close else f"; the keys are {', '.join(fields)}"
            )
            raise ValueError(f"unknown key {key!r}{hint}")
        try:
            values[key] = fields[key](raw.strip())
        except ValueError as exc:
            raise ValueError(f"{key}: {exc}") from exc
    return values


def _count(raw: str) -> int:
    value = int(raw)
    if value < 0:
        raise ValueError(f"{value} is negative")
    return value


def _percent(raw: str) -> int:
    value = int(raw)
    if not 0 <= value <= 100:
        raise ValueError(f"{value} is not a percentage in 0..100")
    return value


def _fraction(raw: str) -> float:
    value = float(raw)
    if not 0 <= value <= 100:
        raise ValueError(f"{value} is not a percentage in 0..100")
    return value


def _positive_float(raw: str) -> float:
    value = float(raw)
    if value <= 0:
        raise ValueError(f"{value} must be greater than 0")
    return value


def _bool(raw: str) -> bool:
    if raw.lower() in ("true", "false"):
        return raw.lower() == "true"
    raise ValueError(f"{raw!r} is not true or false")


def _success_rate(text: str) -> SuccessRate:
    v = _pairs(
        text,
        {
            "stdevFactor": _positive_float,
            "minimumHosts": _count,
            "requestVolume": _count,
            "enforcing": _percent,
        },
    )
    return SuccessRate(
        stdev_factor=v.get("stdevFactor", 1.9),
        minimum_hosts=v.get("minimumHosts", 5),
        request_volume=v.get("requestVolume", 100),
        enforcing=v.get("enforcing", 100),
    )


def _failure_percentage(text: str) -> FailurePercentage:
    v = _pairs(
        text,
        {
            "threshold": _percent,
            "minimumHosts": _count,
            "requestVolume": _count,
            "enforcing": _percent,
        },
    )
    return FailurePercentage(
        threshold=v.get("threshold", 85),
        minimum_hosts=v.get("minimumHosts", 5),
        request_volume=v.get("requestVolume", 50),
        enforcing=v.get("enforcing", 100),
    )


def _hedge(text: str) -> Hedge:
    v = _pairs(
        text,
        {
            "initialRequests": _count,
            "additionalRequestChance": _fraction,
            "onPerTryTimeout": _bool,
        },
    )
    hedge = Hedge(
        initial_requests=v.get("initialRequests", 1),
        additional_request_chance=v.get("additionalRequestChance", 0.0),
        on_per_try_timeout=v.get("onPerTryTimeout", True),
    )
    if hedge.initial_requests < 1:
        raise ValueError("initialRequests must be at least 1")
    return hedge


def _duration(text: str) -> Duration:
    return parse_duration(text.strip())


def _limit(text: str) -> int:
    value = int(text.strip())
    if value < 1:
        raise ValueError(f"{value} must be at least 1")
    return value


@dataclass(frozen=True, slots=True)
class _Annotation:
    kinds: tuple[str, ...]
    parse: Callable[[str], Any]
    help: str


ANNOTATIONS: dict[str, _Annotation] = {
    PREFIX + "outlier-success-rate": _Annotation(
        ("DestinationRule",), _success_rate, "stdevFactor, minimumHosts, requestVolume, enforcing"
    ),
    PREFIX + "outlier-failure-percentage": _Annotation(
        ("DestinationRule",),
        _failure_percentage,
        "threshold, minimumHosts, requestVolume, enforcing",
    ),
    PREFIX + "outlier-max-ejection-time": _Annotation(
        ("DestinationRule",), _duration, "a duration such as '300s'"
    ),
    PREFIX + "per-host-max-connections": _Annotation(
        ("DestinationRule",), _limit, "a number of connections, at least 1"
    ),
    PREFIX + "per-host-max-requests": _Annotation(
        ("DestinationRule",), _limit, "a number of concurrent requests, at least 1"
    ),
    PREFIX + "hedge": _Annotation(
        ("VirtualService",), _hedge, "initialRequests, additionalRequestChance, onPerTryTimeout"
    ),
}


def annotation_problems(kind: str, annotations: Mapping[str, str]) -> list[tuple[str, str]]:
    """``(annotation, problem)`` for each libmesh annotation that cannot be used as written."""
    problems = []
    for name, value in annotations.items():
        if not name.startswith(PREFIX):
            continue
        spec = ANNOTATIONS.get(name)
        if spec is None:
            close = difflib.get_close_matches(name, list(ANNOTATIONS), n=1)
            hint = f"did you mean {close[0]!r}?" if close else "see the README for the list"
            problems.append((name, f"unknown libmesh annotation {name!r}; {hint}"))
            continue
        if kind not in spec.kinds:
            problems.append((name, f"{name} has no effect on a {kind}; use it on {spec.kinds[0]}"))
            continue
        try:
            spec.parse(value)
        except ValueError as exc:
            problems.append((name, f"{name}: {exc} (expected {spec.help})"))
    return problems


def read_annotation(annotations: Mapping[str, str], name: str) -> Any:
    """The parsed value of a libmesh annotation, or None when absent (or invalid)."""
    raw = annotations.get(PREFIX + name)
    if raw is None:
        return None
    try:
        return ANNOTATIONS[PREFIX + name].parse(raw)
    except ValueError:
        return None
