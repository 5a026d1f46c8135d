"""Resolve a request's credential to a `Principal`: anonymous, a user (JWT or API key), or the admin."""

from __future__ import annotations

import enum
from typing import TYPE_CHECKING

import attrs

from ..store.records import User
from ..settings import Settings
from .api_keys import authenticate_key, looks_like_key
from .key_file import match_static_key
from .operator_keys import keyfile_account
from ..store.keys import is_valid_id
from .tokens import InvalidToken, verify_claims

if TYPE_CHECKING:
    from ..store import Store

__all__ = ["ANONYMOUS", "SESSIONS_AFTER", "AuthError", "Kind", "Principal", "authenticate_bearer", "bearer_token",
           "sessions_after"]


class Kind(enum.Enum):
    ANONYMOUS = "anonymous"
    USER = "user"
    ADMIN = "admin"


@attrs.frozen
class Principal:
    """Who is calling. `user` is set for `Kind.USER` (the record as loaded for this request);
    `api_key` says the credential was an API key (stored, or from `KTULHU_API_KEYS_FILE`), which may
    call the APIs but not manage credentials."""

    kind: Kind
    user: User | None = None
    api_key: bool = False

    @property
    def user_id(self) -> str | None:
        return self.user.id if self.user is not None else None

    @property
    def is_admin(self) -> bool:
        return self.kind is Kind.ADMIN

    @classmethod
    def anonymous(cls) -> Principal:
        return cls(Kind.ANONYMOUS)


ANONYMOUS = Principal.anonymous()


class AuthError(Exception):
    """A credential was presented and is not valid. `code` is the machine-readable reason."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def bearer_token(authorization: str | None) -> str | None:
    """The credential of an `Authorization: Bearer <credential>` header; None when absent.

    Raises `AuthError("invalid_token")` for a header that is present but not a Bearer credential."""
    if authorization is None:
        return None
    scheme, _, credential = authorization.strip().partition(" ")
    if scheme.lower() != "bearer" or not credential.strip():
        raise AuthError("invalid_token", "Authorization must be `Bearer <token or API key>`")
    return credential.strip()


async def authenticate_bearer(store: Store, settings: Settings, credential: str) -> Principal:
    """A user principal for an app JWT or API key; raises `AuthError` when it is not valid.

    A key of `KTULHU_API_KEYS_FILE` acts as its service account (made at its first use)."""
    if looks_like_key(credential):
        user = await store.aio.run(authenticate_key, store, credential)
        if user is None:
            raise AuthError("invalid_api_key", "API key is not valid or was revoked")
        return Principal(Kind.USER, user, api_key=True)
    static_keys = settings.static_keys
    if static_keys:
        static = match_static_key(static_keys, credential)
        if static is not None:
            user = await store.aio.run(keyfile_account, store, static)
            if user is None:
                raise AuthError("invalid_api_key", "API key is not valid or was revoked")
            return Principal(Kind.USER, user, api_key=True)
    try:
        claims = verify_claims(settings, credential)
    except InvalidToken:
        raise AuthError("invalid_token", "token is not valid or has expired") from None
    jti = claims.get("jti")
    if jti is not None and await store.aio.run(store.is_token_revoked, jti):
        raise AuthError("invalid_token", "token was signed out; sign in again")
    user_id = claims["sub"]
    user = await store.aio.load_user(user_id) if is_valid_id(user_id) else None
    if user is None:
        raise AuthError("user_not_found", "the token's user no longer exists")
    if claims["iat"] < sessions_after(user):
        raise AuthError("invalid_token", "token was revoked; sign in again")
    return Principal(Kind.USER, user)


#: `User.meta` key: app JWTs issued before this Unix time (seconds) are no longer accepted.
SESSIONS_AFTER = "sessions_after"


def sessions_after(user: User) -> float:
    """The time before which the user's app JWTs are revoked (0: none are)."""
    meta = user.meta if isinstance(user.meta, dict) else {}
    value = meta.get(SESSIONS_AFTER)
    return value if isinstance(value, (int, float)) and not isinstance(value, bool) else 0
