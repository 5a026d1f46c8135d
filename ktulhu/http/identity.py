"""The caller of an HTTP request or WebSocket: admin (HTTP Basic), user (Bearer JWT or API key) or anonymous."""

from __future__ import annotations

from quart import request, websocket

from ..app_state import current_runtime
from ..auth.admin import check_admin
from ..auth.principal import ANONYMOUS, AuthError, Kind, Principal, authenticate_bearer, bearer_token
from .cors import refuse_cross_site_admin
from .errors import raise_error

__all__ = ["client_address", "request_principal", "websocket_credential", "websocket_principal"]


def client_address() -> str:
    return request.remote_addr or "unknown"


async def request_principal() -> Principal:
    """Resolve the request's `Authorization` header; a presented but bad credential is a 401 (or 429)."""
    runtime = current_runtime()
    header = request.headers.get("Authorization")
    if header is None:
        return ANONYMOUS
    if header.strip().lower().startswith("basic "):
        refuse_cross_site_admin()
        check = await check_admin(runtime.store, runtime.settings, header, client_address())
        if not check.ok:
            headers = {"WWW-Authenticate": 'Basic realm="Internal"'} if check.status == 401 else (
                {"Retry-After": str(check.retry_after)} if check.retry_after else None)
            code = {401: "unauthorized", 429: "rate_limited"}.get(check.status, "admin_not_configured")
            raise_error(check.status, code, check.message, headers)
        return Principal(Kind.ADMIN)
    try:
        credential = bearer_token(header)
        assert credential is not None
        return await authenticate_bearer(runtime.store, runtime.settings, credential)
    except AuthError as exc:
        raise_error(401, exc.code, exc.message)


def websocket_credential() -> str | None:
    """A WebSocket's credential: `Authorization: Bearer ...` or the `token` query parameter (browsers
    cannot set headers on WebSockets). Raises `AuthError` for a malformed header."""
    return bearer_token(websocket.headers.get("Authorization")) or websocket.args.get("token") or None


async def websocket_principal() -> Principal:
    """A WebSocket's caller; none = anonymous. Raises `AuthError` for a bad credential."""
    credential = websocket_credential()
    if credential is None:
        return ANONYMOUS
    runtime = current_runtime()
    return await authenticate_bearer(runtime.store, runtime.settings, credential)
