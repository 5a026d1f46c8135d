"""Sign-in routes (original §2.2): email registration and login, Google and Apple ID tokens.

Every route answers `{"jwt", "user_id", "email"}` (`email`: the account's email, null when it has
none; never a provider id). Login answers the same `401 invalid_credentials` for an unknown email,
a wrong password and an account without a password, after the same amount of work, and is
rate-limited per client address and per email (`KTULHU_LOGIN_RATE` per minute; 429 with
`Retry-After`). Registration is rate-limited per client address.
"""

from __future__ import annotations

import hashlib
import logging
import math
from typing import Any

from quart import Blueprint, Response, current_app
from werkzeug.exceptions import HTTPException

from ..api.problems import Problem
from ..app_state import current_runtime
from ..auth import oidc
from ..auth.passwords import (MAX_PASSWORD, PolicyError, check_new_password, hash_password, normalise_email,
                              valid_email)
from ..auth.signin import EmailTaken, create_email_user, email_login, oauth_user
from ..auth.tokens import issue_token
from ..store.keys import is_valid_id
from ..store.records import User
from .errors import ApiError, json_body, json_error, json_response
from .identity import client_address

__all__ = ["blueprint"]

log = logging.getLogger("ktulhu.http.auth")

blueprint = Blueprint("auth", __name__, url_prefix="/api/auth")

MAX_BODY = 64 * 1024
_INVALID = "Invalid credentials"
_JWKS_KEY = "ktulhu.jwks"


@blueprint.errorhandler(Problem)
async def _problem(problem: Problem) -> Response:
    return json_error(problem.status, problem.code, problem.message, headers=problem.headers)


@blueprint.errorhandler(Exception)
async def _unexpected(error: Exception) -> Response:
    if isinstance(error, ApiError):
        return error.get_response()
    if isinstance(error, HTTPException):
        code = (error.name or "error").lower().replace(" ", "_")
        return json_error(error.code or 500, code, error.description or error.name or "error")
    log.exception("sign-in request failed")
    return json_error(500, "internal_error", "the request failed on the server; it has been logged")


# --- shared ---------------------------------------------------------------------------------------


def _device_hash(body: dict[str, Any]) -> str | None:
    """The optional `device_hash`; empty means none. Checked before anything changes."""
    value = body.get("device_hash")
    if value is None or value == "":
        return None
    if not is_valid_id(value):
        raise Problem(422, "invalid_body", "`device_hash` must be 1-128 characters from A-Z a-z 0-9 _ -")
    return value


async def _rate(scope: str, subject: str) -> None:
    """Spend one of `subject`'s sign-in tokens; 429 with Retry-After when none is left."""
    runtime = current_runtime()
    rate = runtime.settings.login_rate
    if not rate:
        return
    store = runtime.store
    assert store is not None
    decision = await store.aio.take_rate_token(scope, subject, capacity=rate, refill_per_s=rate / 60)
    if not decision.allowed:
        retry = max(1, math.ceil(decision.retry_after_ms / 1000))
        raise Problem(429, "rate_limited", "too many sign-in attempts; try again later",
                      headers={"Retry-After": str(retry)})


async def _give_back(scope: str, subject: str) -> None:
    """Return a token spent by `_rate` (a successful login does not count against the email)."""
    runtime = current_runtime()
    rate = runtime.settings.login_rate
    if rate:
        assert runtime.store is not None
        await runtime.store.aio.take_rate_token(scope, subject, capacity=rate, refill_per_s=rate / 60, cost=-1)


def _email_subject(email: str) -> str:
    # A fixed-size key whatever the caller sent (the raw address never becomes a key component).
    return hashlib.sha256(email.encode("utf-8", "surrogatepass")).hexdigest()[:40]


async def _signed_in(user: User, device_hash: str | None) -> Response:
    runtime = current_runtime()
    if device_hash is not None:
        assert runtime.store is not None
        await runtime.store.aio.add_device_for_user(user.id, device_hash)
    token = issue_token(runtime.settings, user.id)
    return json_response({"jwt": token, "user_id": user.id, "email": user.email})


# --- email ----------------------------------------------------------------------------------------

_EMAIL_SPEC = {"email": ((str,), True), "password": ((str,), True), "device_hash": ((str, None), False)}


@blueprint.post("/register")
async def register() -> Response:
    runtime = current_runtime()
    body = await json_body(_EMAIL_SPEC, max_bytes=MAX_BODY)
    device_hash = _device_hash(body)
    email = normalise_email(body["email"])
    if not valid_email(email):
        raise Problem(422, "invalid_email", "`email` is not a valid email address")
    try:
        check_new_password(body["password"], runtime.settings.min_password)
    except PolicyError as exc:
        raise Problem(422, exc.code, exc.message) from None
    await _rate("register", client_address())
    try:
        user = await create_email_user(runtime, email, await hash_password(body["password"]))
    except EmailTaken:
        raise Problem(400, "email_taken", "Email already registered") from None
    return await _signed_in(user, device_hash)


@blueprint.post("/login")
async def login() -> Response:
    runtime = current_runtime()
    body = await json_body(_EMAIL_SPEC, max_bytes=MAX_BODY)
    device_hash = _device_hash(body)
    email = normalise_email(body["email"])
    subject = _email_subject(email)
    await _rate("login_ip", client_address())
    await _rate("login_email", subject)
    password = body["password"]
    usable = valid_email(email) and 0 < len(password) <= MAX_PASSWORD
    user = await email_login(runtime, email if usable else "", password if usable else "")
    if user is None:
        raise Problem(401, "invalid_credentials", _INVALID)
    await _give_back("login_email", subject)
    return await _signed_in(user, device_hash)


# --- Google and Apple -----------------------------------------------------------------------------


def _jwks(provider: oidc.Provider) -> oidc.JwksCache:
    """This app's key cache for `provider` (rebuilt when the URL or TTL setting changed)."""
    settings = current_runtime().settings
    caches: dict[str, oidc.JwksCache] = current_app.extensions.setdefault(_JWKS_KEY, {})
    url = provider.jwks_url(settings)
    cache = caches.get(provider.name)
    if cache is None or cache.url != url or cache.ttl != settings.jwks_ttl:
        cache = caches[provider.name] = oidc.JwksCache(url, settings.jwks_ttl)
    return cache


async def _oauth(provider: oidc.Provider) -> Response:
    runtime = current_runtime()
    body = await json_body({"id_token": ((str,), True), "device_hash": ((str, None), False)}, max_bytes=MAX_BODY)
    device_hash = _device_hash(body)
    if not provider.client_id(runtime.settings):
        raise Problem(400, f"{provider.name}_disabled", f"{provider.title} login disabled")
    try:
        token = await oidc.verify_id_token(provider, runtime.settings, _jwks(provider), body["id_token"])
    except oidc.InvalidIdToken as exc:
        raise Problem(401, "invalid_id_token", str(exc)) from None
    except oidc.JwksUnavailable as exc:
        log.warning("%s signing keys unavailable: %s", provider.title, exc)
        raise Problem(502, "jwks_unavailable",
                      f"{provider.title}'s signing keys could not be fetched; try again shortly ({exc})") from None
    user = await oauth_user(runtime, token)
    return await _signed_in(user, device_hash)


@blueprint.post("/google")
async def google() -> Response:
    return await _oauth(oidc.GOOGLE)


@blueprint.post("/apple")
async def apple() -> Response:
    return await _oauth(oidc.APPLE)
