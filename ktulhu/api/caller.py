"""Who calls an integrator route: a user, by app JWT or API key (`Authorization: Bearer ...`)."""

from __future__ import annotations

import attrs
from quart import request

from ..app_state import current_runtime
from ..auth.principal import AuthError, authenticate_bearer, bearer_token
from ..store.records import User
from .problems import Problem

__all__ = ["Caller", "authenticate"]


@attrs.frozen
class Caller:
    user: User
    #: "jwt" or "api_key"
    via: str


async def authenticate(*, allow_api_key: bool = True) -> Caller:
    """The request's user; raises `Problem` 401 (`login_required`, `invalid_token`, `invalid_api_key`,
    `user_not_found`) or 403 (`jwt_required`: an API key where only a sign-in token is accepted)."""
    header = request.headers.get("Authorization")
    if header is None or not header.strip():
        raise Problem(401, "login_required", "send `Authorization: Bearer <app token or API key>`")
    try:
        credential = bearer_token(header)
        assert credential is not None
        runtime = current_runtime()
        principal = await authenticate_bearer(runtime.store, runtime.settings, credential)
    except AuthError as exc:
        raise Problem(401, exc.code, exc.message) from None
    assert principal.user is not None
    via = "api_key" if principal.api_key else "jwt"
    if via == "api_key" and not allow_api_key:
        raise Problem(403, "jwt_required", "API keys cannot manage credentials; use the app token from sign-in")
    return Caller(principal.user, via)
