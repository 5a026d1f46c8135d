"""App JWTs: HS256 tokens this server issues at sign-in and accepts on every authenticated route.

Claims are `sub` (user id), `iat`, `exp`, `iss`, `aud` and `jti` (a random token id, so that one
token can be signed out: `POST /api/auth/logout`). Verification pins the algorithm to HS256 (so
`none` and key-confusion tokens are refused) and requires every claim but `jti` (tokens issued
before it existed stay valid until they expire).
"""

from __future__ import annotations

import secrets
import time
from typing import Any

import jwt

from ..settings import Settings
from ..store.keys import is_valid_id

__all__ = ["ALGORITHM", "InvalidToken", "issue_token", "verify_claims", "verify_token"]

ALGORITHM = "HS256"
#: Clock skew tolerated on `exp` and `iat`, as the original allowed.
LEEWAY_S = 60


class InvalidToken(Exception):
    """The token is malformed, tampered with, expired, or was not issued by this server."""


def issue_token(settings: Settings, user_id: str, *, now: float | None = None) -> str:
    issued = int(time.time() if now is None else now)
    claims = {
        "sub": user_id,
        "iat": issued,
        "exp": issued + settings.jwt_ttl,
        "iss": settings.jwt_issuer,
        "aud": settings.jwt_audience,
        "jti": secrets.token_urlsafe(16),
    }
    return jwt.encode(claims, settings.jwt_secret, algorithm=ALGORITHM)


def verify_token(settings: Settings, token: str) -> str:
    """The user id (`sub`) of a valid token; raises `InvalidToken` otherwise."""
    return verify_claims(settings, token)["sub"]


def verify_claims(settings: Settings, token: str) -> dict[str, Any]:
    """The claims of a valid token (`sub` a non-empty string, `iat` a number); raises `InvalidToken`."""
    if not isinstance(token, str) or not token or len(token) > 8192:
        raise InvalidToken("malformed token")
    try:
        claims = jwt.decode(
            token,
            settings.jwt_secret,
            algorithms=[ALGORITHM],
            audience=settings.jwt_audience,
            issuer=settings.jwt_issuer,
            leeway=LEEWAY_S,
            options={"require": ["sub", "iat", "exp", "iss", "aud"]},
        )
    except jwt.PyJWTError as exc:
        raise InvalidToken(str(exc)) from None
    sub = claims["sub"]
    if not isinstance(sub, str) or not sub:
        raise InvalidToken("token has no subject")
    if isinstance(claims["iat"], bool) or not isinstance(claims["iat"], (int, float)):
        raise InvalidToken("token has no valid issue time")
    if "jti" in claims and not is_valid_id(claims["jti"]):
        raise InvalidToken("token has no valid id")
    return claims
