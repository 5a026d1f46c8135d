"""The integrator API (original §2.3): one-shot generation, profile, usage, API keys, and the
original's credential routes.

Every route needs `Authorization: Bearer <app JWT or API key>`; managing keys and credentials
needs the app JWT (an API key cannot mint or revoke keys). Errors are `{"error", "message"}`.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import Any

from quart import Blueprint, Response
from werkzeug.exceptions import HTTPException

from ..api.caller import Caller, authenticate
from ..api.generation import PaidGeneration, begin, routed_system_prompt, sse_event, sse_response
from ..api.problems import Problem
from ..app_state import current_runtime
from ..auth import legacy_credentials
from ..auth.api_keys import MAX_LIVE_KEYS, TooManyKeys, create_key, list_keys, revoke_all_keys, revoke_key, split_key
from ..auth.quota import usage
from ..engine.prompt import ChatMessage
from ..engine.sampling import SamplingParams
from ..settings import Settings
from ..store.errors import StoreError
from ..store.records import ApiKey, User
from .errors import ApiError, framework_error, json_body, json_error, json_response, store_unavailable

__all__ = ["blueprint"]

log = logging.getLogger("ktulhu.http.external")

blueprint = Blueprint("external", __name__, url_prefix="/external/api")

MAX_KEY_NAME = 100
MAX_CREDENTIAL_CHARS = 512
#: Generation parameters a caller may pass (all optional; the server's LLAMA_CLI_* defaults otherwise).
_GENERATE_SPEC = {
    "prompt": ((str,), True),
    "intent": ((str, None), False),
    "language": ((str, None), False),
    "system_prompt": ((str, None), False),
    "stream": ((bool, None), False),
    "max_tokens": ((int, None), False),
    "temperature": ((float, None), False),
    "top_p": ((float, None), False),
    "seed": ((int, None), False),
    "model": ((str, None), False),
}


@blueprint.errorhandler(Problem)
async def _problem(problem: Problem) -> Response:
    return json_error(problem.status, problem.code, problem.message, headers=problem.headers)


@blueprint.errorhandler(Exception)
async def _unexpected(error: Exception) -> Response:
    if isinstance(error, ApiError):  # the app's JSON errors (bodies, auth)
        return error.get_response()
    if isinstance(error, HTTPException):
        return framework_error(error)
    if isinstance(error, StoreError):
        return store_unavailable(error)
    log.exception("external API request failed")
    return json_error(500, "internal_error", "the request failed on the server; it has been logged")


def _profile(caller: User, count: int | None = None) -> dict[str, Any]:
    return usage(current_runtime().settings, caller, count)


# --- generation -----------------------------------------------------------------------------------


def _language(value: Any) -> str | None:
    if value is None or not value.strip():
        return None
    value = value.strip()
    if len(value) > 35 or not all((c.isascii() and c.isalnum()) or c in "-_" for c in value):
        raise Problem(422, "invalid_body", "`language` must be a language tag such as en, pt-BR or ru")
    return value


@blueprint.post("/generate")
async def generate() -> Response:
    """Single-turn generation with intent routing; `"stream": true` answers with SSE."""
    caller = await authenticate()
    runtime = current_runtime()
    # an authenticated request is on its way until the engine has its prompt (`Arrivals`)
    with runtime.arrivals.expecting():
        settings = runtime.settings
        body = await json_body(_GENERATE_SPEC)
        prompt = body["prompt"].strip()
        if not prompt:
            raise Problem(400, "prompt_required", "`prompt` must not be empty")
        if len(prompt) > settings.max_prompt_chars:
            raise Problem(413, "prompt_too_long", f"`prompt` must be at most {settings.max_prompt_chars} characters")
        custom = (body.get("system_prompt") or "").strip()
        if len(custom) > settings.max_prompt_chars:
            raise Problem(413, "prompt_too_long",
                          f"`system_prompt` must be at most {settings.max_prompt_chars} characters")
        language = _language(body.get("language"))
        try:
            params = SamplingParams.defaults(settings, max_tokens=body.get("max_tokens"),
                                             temperature=body.get("temperature"), top_p=body.get("top_p"),
                                             seed=body.get("seed"))
        except ValueError as exc:
            raise Problem(422, "invalid_body", str(exc)) from None
        if not usage(settings, caller.user)["can_generate"]:  # spare the router; `begin` decides atomically
            raise Problem(403, "free_quota_exceeded", "the free plan's generations are used up; upgrade to continue")
        route, routed_prompt = await routed_system_prompt(runtime, prompt, language)
        system_text = custom or routed_prompt
        messages = [ChatMessage("system", system_text), ChatMessage("user", prompt)]
        paid = await begin(runtime, caller.user, messages, params, model=body.get("model"))
    head = {
        "request_id": str(uuid.uuid4()),
        "user_id": caller.user.id,
        "role": caller.user.role,
        "system_prompt": custom,
        "intent": route.prompt_key if route is not None else None,
        "language": route.language if route is not None else language,
    }
    if body.get("stream"):
        return sse_response(_stream(settings, paid, head, caller.user), paid)
    with paid:
        output = (await paid.text()).strip()
    return json_response(_result(settings, head, paid, output, caller.user))


def _result(settings: Settings, head: dict[str, Any], paid: PaidGeneration, output: str, user: User
            ) -> dict[str, Any]:
    # (also called from the SSE body, which runs outside the app context)
    counts = usage(settings, user, paid.generation_count)
    return {**head, "output": output, "finish_reason": paid.finish_reason,
            "generation_count": counts["generation_count"], "generation_limit": counts["generation_limit"],
            "generations_remaining": counts["generations_remaining"]}


async def _stream(settings: Settings, paid: PaidGeneration, head: dict[str, Any], user: User
                  ) -> AsyncIterator[bytes]:
    """`start`, then `token` events, then `done` (the non-streaming answer) or `error`."""
    with paid:
        yield sse_event(head, "start")
        parts: list[str] = []
        try:
            async with aclosing(paid.pieces()) as pieces:
                async for piece in pieces:
                    parts.append(piece)
                    yield sse_event({"request_id": head["request_id"], "token": piece}, "token")
        except Problem as problem:
            yield sse_event({"request_id": head["request_id"], "error": problem.code, "message": problem.message},
                            "error")
            return
        yield sse_event(_result(settings, head, paid, "".join(parts).strip(), user), "done")


# --- profile and usage ----------------------------------------------------------------------------


@blueprint.get("/profile")
async def profile() -> Response:
    caller = await authenticate()
    user = caller.user
    counts = _profile(user)
    return json_response({"user_id": user.id, "email": user.email, "created_ts": user.created_ts, "role": user.role,
                          "can_generate": counts["can_generate"], "generation_count": counts["generation_count"],
                          "generation_limit": counts["generation_limit"],
                          "generations_remaining": counts["generations_remaining"]})


@blueprint.get("/usage")
async def usage_route() -> Response:
    caller = await authenticate()
    counts = _profile(caller.user)
    return json_response({"user_id": caller.user.id, "generation_count": counts["generation_count"],
                          "generation_limit": counts["generation_limit"],
                          "generations_remaining": counts["generations_remaining"]})


# --- API keys -------------------------------------------------------------------------------------


def _key_json(record: ApiKey) -> dict[str, Any]:
    return {"id": record.id, "name": record.name, "created_ts": record.created_ts,
            "last_used_ts": record.last_used_ts, "revoked": record.revoked,
            "legacy": record.extra.get("legacy") is True}


async def _jwt_caller() -> Caller:
    return await authenticate(allow_api_key=False)


@blueprint.post("/keys")
async def create_api_key() -> Response:
    """A new API key; the full key is in this answer only."""
    caller = await _jwt_caller()
    body = await json_body({"name": ((str, None), False)}, optional_body=True, max_bytes=4096)
    name = (body.get("name") or "").strip() or None
    if name is not None and (len(name) > MAX_KEY_NAME or any(ord(c) < 32 for c in name)):
        raise Problem(422, "invalid_body", f"`name` must be at most {MAX_KEY_NAME} printable characters")
    store = current_runtime().store
    try:
        record, key = await store.aio.run(create_key, store, caller.user.id, name, limit=MAX_LIVE_KEYS)
    except TooManyKeys as exc:
        raise Problem(409, "too_many_keys", str(exc)) from None
    return json_response({**_key_json(record), "key": key}, 201)


@blueprint.get("/keys")
async def list_api_keys() -> Response:
    caller = await _jwt_caller()
    store = current_runtime().store
    records = await store.aio.run(list_keys, store, caller.user.id)
    return json_response({"keys": [_key_json(r) for r in records]})


@blueprint.delete("/keys/<key_id>")
async def revoke_api_key(key_id: str) -> Response:
    caller = await _jwt_caller()
    store = current_runtime().store
    record = await store.aio.run(revoke_key, store, caller.user.id, key_id)
    if record is None:
        raise Problem(404, "key_not_found", "you have no API key with this id")
    return json_response({"id": record.id, "revoked": True})


# --- the original's credential routes -------------------------------------------------------------


async def _credential_pair() -> tuple[str, str]:
    body = await json_body({"api_key": ((str,), True), "api_secret": ((str,), True)}, max_bytes=8192)
    api_key, api_secret = body["api_key"].strip(), body["api_secret"].strip()
    if not api_key or not api_secret:
        raise Problem(400, "credentials_required", "`api_key` and `api_secret` must not be empty")
    if len(api_key) > MAX_CREDENTIAL_CHARS or len(api_secret) > MAX_CREDENTIAL_CHARS:
        raise Problem(422, "invalid_body", f"`api_key` and `api_secret` must be at most {MAX_CREDENTIAL_CHARS} characters")
    return api_key, api_secret


async def _store_pair(user_id: str, api_key: str, api_secret: str) -> None:
    store = current_runtime().store
    key_hash, secret_hash = await legacy_credentials.hash_pair(api_key, api_secret)

    def change(user: User) -> User:
        user.api_key, user.api_secret = key_hash, secret_hash
        return user

    if await store.aio.update_user(user_id, change) is None:
        raise Problem(401, "user_not_found", "the account no longer exists")


@blueprint.post("/credentials/generate")
async def generate_credentials() -> Response:
    """A new API key, answered as the original's pair: `api_key` + "_" + `api_secret` is the Bearer key.
    It replaces the pair made by an earlier call (that key is revoked)."""
    caller = await _jwt_caller()
    store = current_runtime().store
    await store.aio.run(revoke_all_keys, store, caller.user.id, legacy_only=True)
    try:
        _, key = await store.aio.run(create_key, store, caller.user.id, "credentials", legacy=True,
                                     limit=MAX_LIVE_KEYS)
    except TooManyKeys as exc:
        raise Problem(409, "too_many_keys", str(exc)) from None
    api_key, api_secret = split_key(key)
    await _store_pair(caller.user.id, api_key, api_secret)
    return json_response({"api_key": api_key, "api_secret": api_secret})


@blueprint.post("/credentials")
async def store_credentials() -> Response:
    """Store a caller-chosen pair (hashed) for later `validate` calls."""
    caller = await _jwt_caller()
    api_key, api_secret = await _credential_pair()
    await _store_pair(caller.user.id, api_key, api_secret)
    return json_response({"stored": True})


@blueprint.post("/credentials/validate")
async def validate_credentials() -> Response:
    """Whether the pair equals the caller's stored one (constant-time; plaintext records get hashed)."""
    caller = await _jwt_caller()
    api_key, api_secret = await _credential_pair()
    valid = await legacy_credentials.matches(caller.user, api_key, api_secret)
    if valid and not legacy_credentials.is_hashed(caller.user):
        await _store_pair(caller.user.id, api_key, api_secret)
    return json_response({"valid": valid})
