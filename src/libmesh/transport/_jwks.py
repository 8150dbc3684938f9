"""Fetching the JWKS that RequestAuthentication's ``jwksUri`` names: cached for the provider's
``cache_duration``, fetched again (at most once a second per URI) when a token names a ``kid``
the cached keys lack — an issuer that rotated its keys is followed without a restart. A fetch
that fails keeps the keys already held; with none, the token is refused with Envoy's message."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import httpx

from ..policy._jwt import Jwks, JwtError, JwtRule

__all__ = ["JwksCache"]

_REFETCH_INTERVAL = 1.0  # seconds between two fetches of one URI because of an unknown kid


class JwksCache:
    """One process's JWKS documents, by URI (sync and asyncio callers share it)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._held: dict[str, tuple[Jwks, float]] = {}  # uri -> keys, when fetched
        self._failed: dict[str, tuple[str, float]] = {}  # uri -> why, when (no keys held)
        self._lock = threading.Lock()

    def _fresh(self, rule: JwtRule) -> Jwks | None:
        held = self._held.get(rule.jwks_uri)
        if held is not None and self._clock() - held[1] < rule.cache_duration:
            return held[0]
        return None

    def _may_refetch(self, rule: JwtRule) -> bool:
        held = self._held.get(rule.jwks_uri)
        return held is None or self._clock() - held[1] >= _REFETCH_INTERVAL

    def _recently_failed(self, rule: JwtRule) -> None:
        """Raise at once while the last fetch failed less than a second ago and no keys are
        held: requests do not each wait for an issuer that is down."""
        failed = self._failed.get(rule.jwks_uri)
        if failed is not None and self._clock() - failed[1] < _REFETCH_INTERVAL:
            raise JwtError(f"Jwks remote fetch is failed ({rule.jwks_uri}: {failed[0]})")

    def _store(self, rule: JwtRule, text: str | None, error: str) -> Jwks:
        with self._lock:
            if text is not None:
                try:
                    jwks = Jwks.parse(text)
                except JwtError as exc:
                    error = str(exc)
                else:
                    self._held[rule.jwks_uri] = (jwks, self._clock())
                    self._failed.pop(rule.jwks_uri, None)
                    return jwks
            held = self._held.get(rule.jwks_uri)
            if held is None:
                self._failed[rule.jwks_uri] = (error, self._clock())
        if held is not None:
            return held[0]  # the last good keys stay in use
        raise JwtError(f"Jwks remote fetch is failed ({rule.jwks_uri}: {error})")

    def get(self, rule: JwtRule, *, refetch: bool = False) -> Jwks:
        """The keys for ``rule`` (inline, cached or fetched now); ``refetch``: a token named an
        unknown kid, fetch again unless that was just done."""
        if rule.jwks is not None:
            return rule.jwks
        fresh = self._fresh(rule)
        if fresh is not None and not (refetch and self._may_refetch(rule)):
            return fresh
        self._recently_failed(rule)
        try:
            response = httpx.get(rule.jwks_uri, timeout=rule.fetch_timeout)
            response.raise_for_status()
        except httpx.HTTPError as exc:
            return self._store(rule, None, str(exc) or type(exc).__name__)
        return self._store(rule, response.text, "")

    async def aget(self, rule: JwtRule, *, refetch: bool = False) -> Jwks:
        """:meth:`get`, without blocking the event loop."""
        if rule.jwks is not None:
            return rule.jwks
        fresh = self._fresh(rule)
        if fresh is not None and not (refetch and self._may_refetch(rule)):
            return fresh
        self._recently_failed(rule)
        try:
            async with httpx.AsyncClient(timeout=rule.fetch_timeout) as client:
                response = await client.get(rule.jwks_uri)
            response.raise_for_status()
        except httpx.HTTPError as exc:
            return self._store(rule, None, str(exc) or type(exc).__name__)
        return self._store(rule, response.text, "")
