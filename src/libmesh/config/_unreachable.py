"""Rules that can never match: Istio's IST0130 (unreachable rule) and IST0131 (ineffective match).

The algorithm is Istio's own (``analyzeUnreachableHTTPRules`` and its TCP/TLS twins), so that
``meshctl analyze`` reports exactly what ``istioctl analyze`` reports for the same file.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from ._findings import Codes
from ._networking import HTTPMatchRequest, HTTPRoute, StringMatch
from ._validate import Cursor

__all__ = ["analyze_unreachable_rules"]


def analyze_unreachable_rules(c: Cursor) -> None:
    for field in ("http", "tcp", "tls"):
        _analyze(c, field)


def _rule_name(route: Any, index: int) -> str:
    if isinstance(route, HTTPRoute) and route.name:
        return f'"{route.name}"'
    return f"#{index}"


def _match_name(match: Any, index: int) -> str:
    if isinstance(match, HTTPMatchRequest) and match.name:
        return f'"{match.name}"'
    return f"#{index}"


def _match_key(match: Any) -> Any:
    """The match with everything that does not select traffic cleared (name, false, 0)."""
    if isinstance(match, HTTPMatchRequest):
        return dataclasses.replace(
            match, name=None, ignore_uri_case=match.ignore_uri_case or None, port=match.port or None
        )
    return dataclasses.replace(match, port=match.port or None)


def _analyze(c: Cursor, field: str) -> None:
    routes = getattr(c.node, field)
    seen: dict[Any, int] = {}
    catch_all = -1
    prefixed: list[_PrefixMatch] = []
    for i, route in enumerate(routes):
        rule = c.child(field, i)
        if not route.match:
            if catch_all >= 0:
                _unreachable(rule, _rule_name(route, i), "only the last rule can have no matches")
            catch_all = i
            continue
        duplicates = 0
        for j, match in enumerate(route.match):
            if catch_all >= 0:
                _unreachable(rule, _rule_name(route, i), "route without matches defined before")
                continue
            key = _match_key(match)
            if key in seen:
                first = seen[key]
                rule.child("match", j).add(
                    Codes.VIRTUAL_SERVICE_INEFFECTIVE_MATCH,
                    f"rule {_rule_name(route, i)} match {_match_name(match, j)} is not used "
                    f"(duplicate/overlapping match in rule {_rule_name(routes[first], first)})",
                )
                duplicates += 1
                continue
            seen[key] = i
            if isinstance(match, HTTPMatchRequest):
                candidate = _PrefixMatch.of(
                    rule.child("match", j), match, _rule_name(route, i), _match_name(match, j)
                )
                if candidate is not None:
                    prefixed.append(candidate)
        if duplicates == len(route.match):
            _unreachable(rule, _rule_name(route, i), "all matches used by prior rules")
    for a_index, a in enumerate(prefixed):
        for b in prefixed[a_index + 1 :]:
            if b.prefix != a.prefix and a.covers(b):
                b.cursor.add(
                    Codes.VIRTUAL_SERVICE_INEFFECTIVE_MATCH,
                    f"rule {b.rule} match {b.match} of prefix {b.prefix} is not used "
                    f"(duplicate/overlapping match in rule {a.match} of prefix {a.prefix} on "
                    f"{a.rule})",
                )


def _unreachable(rule: Cursor, name: str, reason: str) -> None:
    rule.add(Codes.VIRTUAL_SERVICE_UNREACHABLE_RULE, f"rule {name} not used ({reason})")


def _exact_or_prefix(match: StringMatch | None) -> str:
    if match is None:
        return ""
    if match.exact:
        return "exact:" + match.exact
    if match.prefix:
        return "prefix:" + match.prefix
    return ""


def _covered(a: str, b: str) -> bool:
    return a == b or a.startswith(b)


@dataclass(frozen=True)
class _PrefixMatch:
    cursor: Cursor
    rule: str
    match: str
    prefix: str
    port: int
    method: str
    authority: str
    headers: dict[str, str]
    query_params: dict[str, str]
    without_headers: dict[str, str]

    @classmethod
    def of(cls, cursor: Cursor, m: HTTPMatchRequest, rule: str, match: str) -> _PrefixMatch | None:
        if m.uri is None or not m.uri.prefix:
            return None
        return cls(
            cursor=cursor,
            rule=rule,
            match=match,
            prefix=m.uri.prefix,
            port=m.port or 0,
            # A match without a method is compared as GET, as Istio does.
            method=_exact_or_prefix(m.method) or "exact:GET",
            authority=_exact_or_prefix(m.authority),
            headers={k: _exact_or_prefix(v) for k, v in m.headers.items()},
            query_params={k: _exact_or_prefix(v) for k, v in m.query_params.items()},
            without_headers={k: _exact_or_prefix(v) for k, v in m.without_headers.items()},
        )

    def covers(self, later: _PrefixMatch) -> bool:
        if not later.prefix.startswith(self.prefix) or later.port != self.port:
            return False
        if not (_covered(self.method, later.method) and _covered(self.authority, later.authority)):
            return False
        for mine, theirs in (
            (self.headers, later.headers),
            (self.query_params, later.query_params),
            (self.without_headers, later.without_headers),
        ):
            if len(mine) != len(theirs):
                return False
            if any(k not in theirs or not _covered(v, theirs[k]) for k, v in mine.items()):
                return False
        return True
