"""OpenAI-compatible API: `POST /v1/chat/completions` (with SSE streaming) and `GET /v1/models`.

Same engine and quotas as the rest of the server; auth by app JWT or API key as the Bearer
credential (the OpenAI SDKs' `api_key`). Errors use OpenAI's shape
`{"error": {"message", "type", "param", "code"}}`. The `model` field is accepted and ignored: the
server runs one model, named in every answer. Like llama-server, a non-standard `grammar` field
(GBNF) constrains the reply.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import Any

import orjson
from quart import Blueprint, Response
from werkzeug.exceptions import HTTPException

from ..api.caller import authenticate
from ..api.generation import PaidGeneration, begin, sse_response
from ..api.problems import Problem
from ..app_state import current_runtime
from ..engine.prompt import ChatMessage
from ..engine.sampling import SamplingParams
from ..store.errors import StoreError
from .errors import ApiError, json_body, json_response

__all__ = ["blueprint", "model_name", "parse_messages", "parse_stop"]

log = logging.getLogger("ktulhu.http.openai")

blueprint = Blueprint("openai", __name__, url_prefix="/v1")

MAX_BODY = 4 << 20
MAX_MESSAGES = 1000
#: OpenAI's upper bound on temperature (the engine itself accepts up to 5).
MAX_TEMPERATURE = 2.0
_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
_FINISH = {"eos": "stop", "stop": "stop", "length": "length"}

_SPEC = {
    "messages": ((list,), True),
    "model": ((str, None), False),
    "temperature": ((float, None), False),
    "top_p": ((float, None), False),
    "max_tokens": ((int, None), False),
    "max_completion_tokens": ((int, None), False),
    "stop": ((str, list, None), False),
    "seed": ((int, None), False),
    "stream": ((bool, None), False),
    "stream_options": ((dict, None), False),
    "n": ((int, None), False),
    "grammar": ((str, None), False),
}


# --- errors ---------------------------------------------------------------------------------------

_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
          404: "not_found_error", 409: "invalid_request_error", 413: "invalid_request_error",
          415: "invalid_request_error", 422: "invalid_request_error", 429: "rate_limit_error"}


def openai_error(status: int, code: str | None, message: str, *, param: str | None = None,
                 type_: str | None = None, headers: dict[str, str] | None = None) -> Response:
    kind = type_ or _TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return json_response({"error": {"message": message, "type": kind, "param": param, "code": code}}, status, headers)


@blueprint.errorhandler(Exception)
async def _error(error: Exception) -> Response:
    if isinstance(error, Problem):
        if error.code == "free_quota_exceeded":  # OpenAI's spelling of "no quota left"
            return openai_error(429, "insufficient_quota", error.message, type_="insufficient_quota")
        if error.code in ("login_required", "invalid_token", "invalid_api_key", "user_not_found"):
            return openai_error(401, "invalid_api_key", error.message, type_="invalid_request_error")
        return openai_error(error.status, error.code, error.message, param=error.param, headers=error.headers)
    if isinstance(error, ApiError):  # a body that is not JSON, too large, or of the wrong shape
        return openai_error(error.code, error.error_code, error.message, param=_param_of(error.message),
                            headers=error.extra_headers)
    if isinstance(error, StoreError):  # disk full, I/O error: the store service is reopening it
        return openai_error(503, "store_unavailable", f"the store cannot be used right now: {error}",
                            type_="server_error", headers={"Retry-After": "5"})
    if isinstance(error, HTTPException):
        headers = {"Connection": "close"} if error.code == 413 else None  # the unread body would follow
        return openai_error(error.code or 500, None, error.description or error.name or "error", headers=headers)
    log.exception("OpenAI-compatible request failed")
    return openai_error(500, "internal_error", "the request failed on the server; it has been logged")


def _param_of(message: str) -> str | None:
    start = message.find("`")
    end = message.find("`", start + 1)
    return message[start + 1:end] if 0 <= start < end else None


# --- parsing --------------------------------------------------------------------------------------


def _content(value: Any, where: str) -> str:
    """A message's `content`: a string, null, or a list of `{"type": "text", "text": ...}` parts."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        texts = []
        for i, part in enumerate(value):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise Problem(400, "invalid_value", f"{where}.content[{i}] must be a text part "
                              '({"type": "text", "text": "..."}); other content types are not supported',
                              param=f"{where}.content")
            texts.append(part["text"])
        return "".join(texts)
    raise Problem(400, "invalid_type", f"{where}.content must be a string or a list of text parts",
                  param=f"{where}.content")


def parse_messages(raw: list[Any], max_chars: int) -> list[ChatMessage]:
    """OpenAI chat messages -> engine messages; raises `Problem` naming the message at fault."""
    if not raw:
        raise Problem(400, "invalid_value", "messages must hold at least one message", param="messages")
    if len(raw) > MAX_MESSAGES:
        raise Problem(400, "invalid_value", f"messages must hold at most {MAX_MESSAGES} messages", param="messages")
    messages: list[ChatMessage] = []
    total = 0
    for i, item in enumerate(raw):
        where = f"messages[{i}]"
        if not isinstance(item, dict):
            raise Problem(400, "invalid_type", f"{where} must be an object", param=where)
        role = item.get("role")
        if not isinstance(role, str) or role not in _ROLES:
            raise Problem(400, "invalid_value", f"{where}.role must be one of system, developer, user, assistant",
                          param=f"{where}.role")
        text = _content(item.get("content"), where)
        total += len(text)
        if total > max_chars:
            raise Problem(413, "context_too_long", f"the messages hold more than {max_chars} characters",
                          param="messages")
        messages.append(ChatMessage(_ROLES[role], text))
    if messages[-1].role == "assistant":
        raise Problem(400, "invalid_value", "the last message must not be the assistant's", param="messages")
    return messages


def parse_stop(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise Problem(400, "invalid_type", "stop must be a string or a list of strings", param="stop")
    stops = [s for s in stops if s]
    if len(stops) > 4:
        raise Problem(400, "invalid_value", "stop may hold at most 4 sequences", param="stop")
    return tuple(stops)


def _params(body: dict[str, Any]) -> SamplingParams:
    settings = current_runtime().settings
    temperature = body.get("temperature")
    if temperature is not None and not 0 <= temperature <= MAX_TEMPERATURE:
        raise Problem(400, "invalid_value", f"temperature must be from 0 to {MAX_TEMPERATURE}", param="temperature")
    max_tokens = body.get("max_completion_tokens")
    if max_tokens is None:
        max_tokens = body.get("max_tokens")
    if max_tokens is not None and max_tokens < 1:
        raise Problem(400, "invalid_value", "max_tokens must be at least 1", param="max_tokens")
    if body.get("n") not in (None, 1):
        raise Problem(400, "invalid_value", "only n=1 is supported", param="n")
    extra: dict[str, Any] = {}
    if body.get("grammar") is not None:
        extra["grammar"] = body["grammar"]
    try:
        return SamplingParams.defaults(
            settings, temperature=temperature, top_p=body.get("top_p"),
            max_tokens=None if max_tokens is None else min(max_tokens, 1 << 20),
            seed=body.get("seed"), stop=parse_stop(body.get("stop")) or None, **extra,
        )
    except ValueError as exc:
        text = str(exc)
        param = text.split(" ", 1)[0] if text.split(" ", 1)[0] in _SPEC else None
        raise Problem(400, "invalid_value", text, param=param) from None


def model_name() -> str:
    return current_runtime().settings.model_file.stem


# --- routes ---------------------------------------------------------------------------------------


@blueprint.get("/models")
async def models() -> Response:
    await authenticate()
    return json_response({"object": "list", "data": [_model_card()]})


@blueprint.get("/models/<path:model_id>")
async def model(model_id: str) -> Response:
    await authenticate()
    if model_id != model_name():
        raise Problem(404, "model_not_found", f"the model `{model_id}` does not exist; this server runs "
                      f"`{model_name()}`", param="model")
    return json_response(_model_card())


def _model_card() -> dict[str, Any]:
    path = current_runtime().settings.model_file
    try:
        created = int(path.stat().st_mtime)
    except OSError:
        created = 0
    return {"id": model_name(), "object": "model", "created": created, "owned_by": "ktulhu"}


@blueprint.post("/chat/completions")
async def chat_completions() -> Response:
    caller = await authenticate()
    runtime = current_runtime()
    body = await json_body(_SPEC, max_bytes=MAX_BODY)
    messages = parse_messages(body["messages"], runtime.settings.max_prompt_chars * 4)
    params = _params(body)
    options = body.get("stream_options") or {}
    include_usage = options.get("include_usage") is True
    paid = await begin(runtime, caller.user, messages, params)
    meta = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": model_name()}
    if body.get("stream"):
        return sse_response(_stream(paid, meta, include_usage), paid)
    with paid:
        text = await paid.text()
    return json_response({
        **{"id": meta["id"], "object": "chat.completion", "created": meta["created"], "model": meta["model"]},
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                     "logprobs": None, "finish_reason": _FINISH.get(paid.finish_reason or "", "stop")}],
        "usage": paid.usage,
        "system_fingerprint": None,
    })


def _chunk(meta: dict[str, Any], delta: dict[str, Any], finish: str | None) -> bytes:
    payload = {"id": meta["id"], "object": "chat.completion.chunk", "created": meta["created"],
               "model": meta["model"], "system_fingerprint": None,
               "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}
    return b"data: " + orjson.dumps(payload) + b"\n\n"


async def _stream(paid: PaidGeneration, meta: dict[str, Any], include_usage: bool) -> AsyncIterator[bytes]:
    """`data: {chunk}` events (role first, then content deltas, then the finish reason), an
    optional usage chunk, then `data: [DONE]`. A failure mid-stream is an `error` object event
    (typed like the HTTP error it would have been: a grammar no token completes is the request's
    fault, `invalid_request_error`; the headers left when the request was admitted)."""
    with paid:
        yield _chunk(meta, {"role": "assistant", "content": ""}, None)
        try:
            async with aclosing(paid.pieces()) as pieces:
                async for piece in pieces:
                    yield _chunk(meta, {"content": piece}, None)
        except Problem as problem:
            kind = _TYPES.get(problem.status, "server_error")
            error = {"error": {"message": problem.message, "type": kind, "param": None, "code": problem.code}}
            yield b"data: " + orjson.dumps(error) + b"\n\n"
            yield b"data: [DONE]\n\n"
            return
        yield _chunk(meta, {}, _FINISH.get(paid.finish_reason or "", "stop"))
        if include_usage:
            usage = {"id": meta["id"], "object": "chat.completion.chunk", "created": meta["created"],
                     "model": meta["model"], "system_fingerprint": None, "choices": [], "usage": paid.usage}
            yield b"data: " + orjson.dumps(usage) + b"\n\n"
        yield b"data: [DONE]\n\n"
