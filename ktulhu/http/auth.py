"""Sign-in routes (original §2.2): email registration and login, Google and Apple ID tokens, and
sign-out.

Every sign-in route answers `{"jwt", "user_id", "email"}` (`email`: the account's email, null when
it has none; never a provider id). Login answers the same `401 invalid_credentials` for an unknown
email, a wrong password and an account without a password, after the same amount of work. Failed
logins are rate-limited per client address and per (email, address) (`KTULHU_LOGIN_RATE` per
minute; 429 with `Retry-After`); registration per client address. `POST /api/auth/logout` signs
out the presented app JWT.
"""

from __future__ import annotations

import logging
import math
from typing import Any

from quart import Blueprint, Response, current_app, request
from werkzeug.exceptions import HTTPException

from ..api.caller import authenticate
from ..api.problems import Problem
from ..app_state import current_runtime
from ..auth import oidc
from ..auth.passwords import (MAX_PASSWORD, PolicyError, check_new_password, hash_password, normalise_email,
                              valid_email)
from ..auth.principal import SESSIONS_AFTER, bearer_token, sessions_after
from ..auth.ratelimit import hashed_subject, retry_after_s, spend
from ..auth.signin import EmailTaken, create_email_user, email_login, oauth_user
from ..auth.tokens import LEEWAY_S, issue_token, verify_claims
from ..store import Store
from ..store.accounts import RateDecision
from ..store.errors import StoreError
from ..store.keys import is_valid_id
from ..store.records import User
from .errors import ApiError, framework_error, json_body, json_error, json_response, store_unavailable
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
        return framework_error(error)
    if isinstance(error, StoreError):
        return store_unavailable(error)
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


def _rate_limited(decision: RateDecision | None) -> None:
    """429 with Retry-After when `decision` says the bucket was empty."""
    if decision is not None and not decision.allowed:
        raise Problem(429, "rate_limited", "too many sign-in attempts; try again later",
                      headers={"Retry-After": str(retry_after_s(decision))})


def _refuse_if_empty(peek: RateDecision | None, rate: int) -> None:
    """429 when a peek (`cost` 0) found less than one token left, with the time until there is one."""
    if peek is not None and peek.tokens_left < 1:
        retry = max(1, math.ceil((1 - peek.tokens_left) * 60 / rate))
        raise Problem(429, "rate_limited", "too many sign-in attempts; try again later",
                      headers={"Retry-After": str(retry)})


def _store() -> Store:
    store = current_runtime().store
    return store


async def _signed_in(user: User, device_hash: str | None) -> Response:
    runtime = current_runtime()
    if device_hash is not None:
        await runtime.store.aio.add_device_for_user(user.id, device_hash)
    token = issue_token(runtime.settings, user.id)
    return json_response({"jwt": token, "user_id": user.id, "email": user.email})


# --- email ----------------------------------------------------------------------------------------

_EMAIL_SPEC = {"email": ((str,), True), "password": ((str,), True), "device_hash": ((str, None), False)}


@blueprint.post("/register")
async def register() -> Response:
    """Original's answers (200 with a token, 400 `email_taken`): a client needs the new account's
    token, which cannot be faked for a taken email without mail. Probing is bounded instead: every
    attempt spends the address's registration budget, a taken email also spends its failed-sign-in
    budget, and while that budget is empty every registration from the address gets 429 (so the
    429 itself tells nothing about the email)."""
    runtime = current_runtime()
    store = _store()
    rate = runtime.settings.login_rate
    body = await json_body(_EMAIL_SPEC, max_bytes=MAX_BODY)
    device_hash = _device_hash(body)
    email = normalise_email(body["email"])
    if not valid_email(email):
        raise Problem(422, "invalid_email", "`email` is not a valid email address")
    try:
        check_new_password(body["password"], runtime.settings.min_password)
    except PolicyError as exc:
        raise Problem(422, exc.code, exc.message) from None
    address = client_address()
    _rate_limited(await spend(store, "register", address, rate))
    _refuse_if_empty(await spend(store, "login_ip", address, rate, cost=0), rate)
    # Recorded always; whether the pool limits anything is decided at each generation (the setting).
    pool = hashed_subject("free_pool", address)
    try:
        user = await create_email_user(runtime.store, email, await hash_password(body["password"]), pool=pool)
    except EmailTaken:
        await spend(store, "login_ip", address, rate)
        raise Problem(400, "email_taken", "Email already registered") from None
    return await _signed_in(user, device_hash)


@blueprint.post("/login")
async def login() -> Response:
    """Only failed attempts count, in two buckets: the client address's (any email) and the
    (email, address) pair's. Failures from other addresses never lock the owner out. The address's
    token is taken before the password is checked (so concurrent guesses cannot exceed it) and given
    back on success."""
    runtime = current_runtime()
    store = _store()
    rate = runtime.settings.login_rate
    body = await json_body(_EMAIL_SPEC, max_bytes=MAX_BODY)
    device_hash = _device_hash(body)
    email = normalise_email(body["email"])
    address = client_address()
    pair = hashed_subject(email, address)
    _rate_limited(await spend(store, "login_ip", address, rate))
    pair_left = await spend(store, "login_email", pair, rate, cost=0)
    if pair_left is not None and pair_left.tokens_left < 1:
        await spend(store, "login_ip", address, rate, cost=-1)  # not an attempt: nothing was checked
        _refuse_if_empty(pair_left, rate)
    password = body["password"]
    usable = valid_email(email) and 0 < len(password) <= MAX_PASSWORD
    user = await email_login(runtime.store, email if usable else "", password if usable else "")
    if user is None:
        await spend(store, "login_email", pair, rate)
        raise Problem(401, "invalid_credentials", _INVALID)
    await spend(store, "login_ip", address, rate, cost=-1)
    return await _signed_in(user, device_hash)


@blueprint.post("/logout")
async def logout() -> Response:
    """Sign out the presented app JWT: it is refused from now on, on every route and on `/ws`.
    A token from before token ids existed (no `jti`) signs out every token issued up to it."""
    runtime = current_runtime()
    store = _store()
    caller = await authenticate(allow_api_key=False)  # 401 for a bad token, 403 for an API key
    credential = bearer_token(request.headers.get("Authorization"))
    assert credential is not None
    claims = verify_claims(runtime.settings, credential)  # valid: authenticate checked it
    jti = claims.get("jti")
    if jti is not None:
        expires_ms = (int(claims["exp"]) + LEEWAY_S) * 1000
        await store.aio.run(store.revoke_token, jti, expires_ms)
    else:
        cutoff = int(claims["iat"]) + 1

        def change(user: User) -> User:
            if not isinstance(user.meta, dict):
                user.meta = {"email": user.email, "auth_methods": []}
            user.meta[SESSIONS_AFTER] = max(sessions_after(user), cutoff)
            return user

        await store.aio.update_user(caller.user.id, change)
    return json_response({"signed_out": True})


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
    user = await oauth_user(runtime.store, token)
    return await _signed_in(user, device_hash)


@blueprint.post("/google")
async def google() -> Response:
    return await _oauth(oidc.GOOGLE)


@blueprint.post("/apple")
async def apple() -> Response:
    return await _oauth(oidc.APPLE)
