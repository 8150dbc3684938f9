"""Bootstrap tokens: what a workload presents, the first time, to get the SVID for one
identity (``meshctl token create --namespace shop --service-account reviews --ttl 1h``).

A token is a compact JWS (HS256) signed with meshd's token key — a random secret kept beside
the CA's root in ``token-key`` (mode 0600): ``{"iss": "meshd", "sub": <SPIFFE ID>, "iat", "exp",
"jti"}``. Whoever can read the key can mint tokens, as whoever can read the CA key can mint
certificates.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import secrets
import time
from collections.abc import Callable
from pathlib import Path

from libmesh.identity import SpiffeId, SpiffeIdError

from ._ca import private_problem, write_private

__all__ = ["TOKEN_KEY", "TokenError", "TokenIssuer"]

TOKEN_KEY = "token-key"
_HEADER = {"alg": "HS256", "typ": "JWT"}


class TokenError(ValueError):
    """A token that proves nothing; the message says why (never the token itself)."""


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class TokenIssuer:
    """Makes and checks bootstrap tokens with one secret."""

    def __init__(self, secret: bytes, *, clock: Callable[[], float] = time.time) -> None:
        if len(secret) < 32:
            raise ValueError("a token key has at least 32 bytes")
        self._secret = secret
        self._clock = clock

    @classmethod
    def load_or_create(
        cls, directory: Path, *, clock: Callable[[], float] = time.time
    ) -> TokenIssuer:
        path = directory / TOKEN_KEY
        if not path.exists():
            directory.mkdir(parents=True, exist_ok=True)
            write_private(path, secrets.token_bytes(32).hex().encode("ascii"))
        problem = private_problem(path, "the token key")
        if problem:
            raise TokenError(problem)
        return cls(bytes.fromhex(path.read_text().strip()), clock=clock)

    def create(self, identity: SpiffeId, ttl: float) -> str:
        if ttl <= 0:
            raise ValueError(f"a token's lifetime must be positive, not {ttl} s")
        now = int(self._clock())
        claims = {
            "iss": "meshd",
            "sub": str(identity),
            "iat": now,
            "exp": now + int(ttl),
            "jti": secrets.token_hex(8),
        }
        signing_input = f"{_b64(json.dumps(_HEADER).encode())}.{_b64(json.dumps(claims).encode())}"
        return f"{signing_input}.{_b64(self._sign(signing_input))}"

    def verify(self, token: str) -> SpiffeId:
        """The identity ``token`` proves; :class:`TokenError` when it proves none."""
        parts = token.split(".")
        if len(parts) != 3:
            raise TokenError("the token is not a compact JWS (three dot-separated parts)")
        signing_input = f"{parts[0]}.{parts[1]}"
        try:
            signature = _unb64(parts[2])
            header = json.loads(_unb64(parts[0]))
            claims = json.loads(_unb64(parts[1]))
        except (binascii.Error, ValueError) as exc:
            raise TokenError("the token is not valid base64url JSON") from exc
        if header != _HEADER:
            raise TokenError("the token was not made by meshd (unexpected header)")
        if not hmac.compare_digest(signature, self._sign(signing_input)):
            raise TokenError("the token's signature does not verify (not made by this meshd)")
        if not isinstance(claims, dict) or claims.get("iss") != "meshd":
            raise TokenError("the token was not issued by meshd")
        expires = claims.get("exp")
        if not isinstance(expires, int) or self._clock() >= expires:
            raise TokenError("the token has expired")
        try:
            return SpiffeId.parse(str(claims.get("sub", "")))
        except SpiffeIdError as exc:
            raise TokenError(f"the token names no identity: {exc}") from exc

    def _sign(self, signing_input: str) -> bytes:
        return hmac.new(self._secret, signing_input.encode("ascii"), hashlib.sha256).digest()
