"""OpenAI-compatible API: `POST /v1/chat/completions` (with SSE streaming) and `GET /v1/models`.

Same engine and quotas as the rest of the server; auth by app JWT or API key as the Bearer
credential (the OpenAI SDKs' `api_key`). Errors use OpenAI's shape
`{"error": {"message", "type", "param", "code"}}`. The `model` field picks one of the models of
KTULHU_MODELS (loaded on first use; the answer names the model that ran); the default model's name,
no name, or, while KTULHU_MODELS is unset, any name is the default model (LLAMA_CLI_MODEL); with
KTULHU_MODELS set an unknown name is a 404 `model_not_found`. In remote mode the field is ignored. Like llama-server, a non-standard `grammar` field
(GBNF) constrains the reply, and `top_k`, `min_p`, `repeat_penalty` tune the sampling.

No field is dropped unseen: each one the server knows is honoured (sampling, `logit_bias`,
`response_format` as a grammar, `logprobs`/`top_logprobs`, `tools`/`tool_choice` as in
`ktulhu.api.tool_calls`) or, where it asks for something not done here (legacy `functions`,
several choices), refused with a 400 naming it, like every unknown field. Only fields that change
nothing here (`user`, `store`, `metadata`, `parallel_tool_calls` ...) pass.
A reply ends with `finish_reason` `stop` or `length` only when it really ended so; otherwise it is
an error (in a stream, an `error` event).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import Any

import attrs
import trio
from quart import Blueprint, Response
from werkzeug.exceptions import HTTPException

from ..api.caller import authenticate
from ..api.generation import SSE_DONE, PaidGeneration, begin, sse_event, sse_response
from ..api.problems import Problem
from ..api.tool_calls import ToolPlan, assistant_calls, parse_tools, tool_result
from ..app_state import current_runtime
from ..engine.prompt import ChatMessage
from ..engine.request import TokenLogprob
from ..engine.sampling import LOGIT_BIAS_MAX, TOP_LOGPROBS_MAX, SamplingParams, json_grammar
from ..nurseries.runtime import Runtime
from ..settings import Settings
from ..store.errors import StoreError
from .errors import ApiError, json_body, json_response

__all__ = ["ChatRequest", "blueprint", "model_name", "parse_messages", "parse_request", "parse_stop"]

log = logging.getLogger("ktulhu.http.openai")

blueprint = Blueprint("openai", __name__, url_prefix="/v1")

MAX_BODY = 4 << 20
MAX_MESSAGES = 1000
#: OpenAI's upper bound on temperature (the engine itself accepts up to 5).
MAX_TEMPERATURE = 2.0
_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
_FINISH = {"eos": "stop", "stop": "stop", "length": "length"}

_ANY_NUMBER = (float, None)
#: Every request field this server knows, with its JSON types (None: null). Any other field is
#: refused (400 `unknown_parameter`): a field silently dropped would change the reply unseen.
_FIELDS: dict[str, tuple[type | None, ...]] = {
    "messages": (list,),
    "model": (str, None),
    # honoured
    "temperature": _ANY_NUMBER, "top_p": _ANY_NUMBER, "top_k": (int, None), "min_p": _ANY_NUMBER,
    "repeat_penalty": _ANY_NUMBER, "presence_penalty": _ANY_NUMBER, "frequency_penalty": _ANY_NUMBER,
    "logit_bias": (dict, None), "max_tokens": (int, None), "max_completion_tokens": (int, None),
    "stop": (str, list, None), "seed": (int, None), "stream": (bool, None), "stream_options": (dict, None),
    "n": (int, None), "grammar": (str, None), "response_format": (dict, None),
    "tools": (list, None), "tool_choice": (str, dict, None), "logprobs": (bool, None), "top_logprobs": (int, None),
    # accepted where they ask for nothing this server would do differently, refused otherwise
    "user": (str, None), "store": (bool, None), "metadata": (dict, None), "service_tier": (str, None),
    "parallel_tool_calls": (bool, None), "functions": (list, None), "function_call": (str, dict, None),
}
#: Keys a message may carry besides `role` and `content`, when null or empty: what an SDK echoes
#: back from an earlier answer's message.
_MESSAGE_ECHOES = ("refusal", "tool_calls", "function_call", "audio", "annotations")
_TYPE_NAMES = {str: "a string", bool: "true or false", int: "a whole number", float: "a number",
               list: "an array", dict: "an object", type(None): "null"}


@attrs.frozen
class ChatRequest:
    """A checked `/v1/chat/completions` body."""

    messages: list[ChatMessage]
    params: SamplingParams
    stream: bool
    include_usage: bool
    #: The tools offered to the model (None: none, or `tool_choice: "none"`).
    tools: ToolPlan | None = None


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
    """OpenAI chat messages -> engine messages; raises `Problem` naming the message at fault.
    An assistant's `tool_calls` and `tool` results become text (`ktulhu.api.tool_calls`): a
    result is a user turn, consecutive results one turn."""
    if not raw:
        raise Problem(400, "invalid_value", "messages must hold at least one message", param="messages")
    if len(raw) > MAX_MESSAGES:
        raise Problem(400, "invalid_value", f"messages must hold at most {MAX_MESSAGES} messages", param="messages")
    messages: list[ChatMessage] = []
    total = 0
    calls: dict[str, str] = {}  # tool call id -> function name, from the assistant messages so far
    previous_tool = False
    for i, item in enumerate(raw):
        where = f"messages[{i}]"
        if not isinstance(item, dict):
            raise Problem(400, "invalid_type", f"{where} must be an object", param=where)
        role = item.get("role")
        if role == "tool":
            text = tool_result(item, where, _content(item.get("content"), where), calls)
            total += len(text)
            if total > max_chars:
                raise Problem(413, "context_too_long", f"the messages hold more than {max_chars} characters",
                              param="messages")
            if previous_tool:
                text = f"{messages.pop().content}\n\n{text}"
            messages.append(ChatMessage("user", text))
            previous_tool = True
            continue
        previous_tool = False
        if role == "function":
            raise Problem(400, "unsupported_value", f"{where}.role `function` (the legacy function calling) is not "
                          "supported: send tool results as `tool` messages", param=f"{where}.role")
        if not isinstance(role, str) or role not in _ROLES:
            raise Problem(400, "invalid_value", f"{where}.role must be one of system, developer, user, assistant",
                          param=f"{where}.role")
        for key, value in item.items():
            if key in ("role", "content") or (key in _MESSAGE_ECHOES and value in (None, [], "")):
                continue
            if key == "name" and isinstance(value, str) and len(value) <= 64:
                continue  # a participant's name: accepted and not rendered, as llama-server does
            if key == "tool_calls" and role == "assistant":
                continue  # rendered below
            if key in ("tool_calls", "function_call"):
                raise Problem(400, "unsupported_value", f"{where}.{key} is not supported here (tool calls are the "
                              "assistant's `tool_calls`)", param=f"{where}.{key}")
            raise Problem(400, "unknown_parameter", f"{where}.{_shown(key)} is not supported by this server (a "
                          "message holds role and content)", param=f"{where}.{_shown(key)}")
        text = _content(item.get("content"), where)
        if role == "assistant" and item.get("tool_calls") not in (None, [], ""):
            text = assistant_calls(item["tool_calls"], where, text, calls)
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


def parse_request(body: dict[str, Any], settings: Settings, *, max_chars: int,
                  n_vocab: int | None = None) -> ChatRequest:
    """Check a whole body: every field known and of its type (else 400 `unknown_parameter`, 422
    `invalid_body`), every value usable, every feature asked for one this server has (else 400
    `unsupported_parameter`/`unsupported_value`). `n_vocab`, when known, bounds `logit_bias`'s ids.
    Raises `Problem` with `param` naming the field."""
    for name in body:
        if name not in _FIELDS:
            raise Problem(400, "unknown_parameter", f"unknown parameter `{_shown(name)}`: this server does not "
                          "support it, and will not ignore it", param=_shown(name))
    if "messages" not in body:
        raise Problem(422, "invalid_body", "`messages` is required", param="messages")
    for name, value in body.items():
        _check_type(name, value, _FIELDS[name])
    _refuse_unsupported(body)
    tools = parse_tools(body)
    messages = parse_messages(body["messages"], max_chars)
    if tools is not None:
        messages = tools.apply(messages)
    params = _params(body, settings, n_vocab)
    if tools is not None:
        params = attrs.evolve(params, grammar=tools.grammar, response_format=tools.response_format)
    return ChatRequest(messages, params, stream=body.get("stream") is True,
                       include_usage=include_usage(body), tools=tools)


def include_usage(body: dict[str, Any]) -> bool:
    """`stream_options.include_usage`, its other keys checked; raises `Problem` naming a bad one."""
    options = body.get("stream_options") or {}
    for key, value in options.items():
        if key not in ("include_usage", "include_obfuscation"):
            raise Problem(400, "unknown_parameter", f"unknown parameter `stream_options.{_shown(key)}`",
                          param=f"stream_options.{_shown(key)}")
        if value is not None and not isinstance(value, bool):
            raise Problem(400, "invalid_type", f"`stream_options.{key}` must be true or false",
                          param=f"stream_options.{key}")
    return options.get("include_usage") is True


def token_ids(values: list[Any], param: str, n_vocab: int | None) -> tuple[int, ...]:
    """`values` as token ids, each from 0 to `n_vocab - 1` (when known); raises `Problem` naming `param[i]`."""
    limit = n_vocab if n_vocab is not None else 2**31
    for i, token in enumerate(values):
        if isinstance(token, bool) or not isinstance(token, int) or not 0 <= token < limit:
            raise Problem(400, "invalid_value", f"{param}[{i}] must be a token id from 0 to {limit - 1}, got "
                          f"{str(token)[:40]}", param=f"{param}[{i}]")
    return tuple(values)


def _shown(name: str) -> str:
    """A field name as an error repeats it: a hostile body's 1 MB key is not echoed whole."""
    return name if len(name) <= 64 else name[:64] + "..."


def _check_type(name: str, value: Any, types: tuple[type | None, ...]) -> None:
    allowed = tuple(type(None) if t is None else t for t in types)
    if isinstance(value, bool):  # a bool is an int in Python; JSON true is never a number here
        ok = bool in allowed
    elif isinstance(value, int) and float in allowed:
        ok = True
    else:
        ok = isinstance(value, allowed)
    if not ok:
        names = " or ".join(_TYPE_NAMES[t] for t in allowed)
        raise Problem(422, "invalid_body", f"`{name}` must be {names}", param=name)


def _unsupported(name: str, what: str) -> Problem:
    return Problem(400, "unsupported_parameter", f"`{name}`: {what}", param=name)


def _refuse_unsupported(body: dict[str, Any]) -> None:
    """Fields asking for what this server does not do: a 400 naming them, never a reply without it."""
    n = body.get("n")
    if n is not None and n != 1:
        code = "invalid_value" if n < 1 else "unsupported_value"
        raise Problem(400, code, f"n must be 1: this server returns one choice per request, got {n}", param="n")
    if body.get("functions"):
        raise _unsupported("functions", "the legacy function calling is not supported; declare them as `tools`")
    if body.get("function_call") not in (None, "none", "auto"):
        raise _unsupported("function_call", "no functions can be called here: only `none` or `auto` is accepted")
    if body.get("service_tier") not in (None, "auto", "default"):
        raise _unsupported("service_tier", "this server has one service tier: `auto` or `default`")


def _number(body: dict[str, Any], name: str, lo: float, hi: float, what: str) -> float | None:
    value = body.get(name)
    if value is not None and not (math.isfinite(value) and lo <= value <= hi):
        raise Problem(400, "invalid_value", f"{name} must be {what}, got {value!r}", param=name)
    return value


def _top_logprobs(body: dict[str, Any]) -> int | None:
    """`logprobs`/`top_logprobs` -> the alternatives reported per token (None: no log probabilities)."""
    top = body.get("top_logprobs")
    if body.get("logprobs") is not True:
        if top is not None:
            raise Problem(400, "invalid_value", "top_logprobs needs `logprobs: true`", param="top_logprobs")
        return None
    if top is not None and not 0 <= top <= TOP_LOGPROBS_MAX:
        raise Problem(400, "invalid_value", f"top_logprobs must be a whole number from 0 to {TOP_LOGPROBS_MAX}, "
                      f"got {top}", param="top_logprobs")
    return top or 0


def _logit_bias(value: dict[str, Any] | None, n_vocab: int | None) -> dict[int, float] | None:
    """OpenAI's `{"<token id>": bias}` -> {id: bias}; each bias from -100 to 100 (-100 bans)."""
    if not value:
        return None
    if len(value) > LOGIT_BIAS_MAX:
        raise Problem(400, "invalid_value", f"logit_bias may hold at most {LOGIT_BIAS_MAX} tokens",
                      param="logit_bias")
    limit = n_vocab if n_vocab is not None else 2**31
    biases = {}
    for key, bias in value.items():
        if not (key.isascii() and key.isdigit() and len(key) <= 10 and int(key) < limit):
            raise Problem(400, "invalid_value", f"logit_bias keys must be token ids from 0 to {limit - 1} (as "
                          f"strings), got {key[:40]!r}", param="logit_bias")
        if isinstance(bias, bool) or not isinstance(bias, (int, float)) or not -100 <= bias <= 100:
            raise Problem(400, "invalid_value", f"logit_bias values must be numbers from -100 to 100, got "
                          f"{str(bias)[:40]} for token {key}", param="logit_bias")
        biases[int(key)] = float(bias)
    return biases


def _response_format(value: dict[str, Any] | None, grammar: str | None) -> tuple[str | None, str | None]:
    """`response_format` -> (grammar, the object as JSON for remote workers); (None, None) for text."""
    if value is None:
        return None, None
    kind = value.get("type")
    if kind == "text":
        return None, None
    if kind not in ("json_object", "json_schema"):
        raise Problem(400, "invalid_value", "response_format.type must be text, json_object or json_schema",
                      param="response_format.type")
    if grammar is not None:
        raise Problem(400, "invalid_value", "send either `grammar` or `response_format`, not both",
                      param="response_format")
    schema = None
    if kind == "json_schema":
        spec = value.get("json_schema")
        if not isinstance(spec, dict):
            raise Problem(400, "invalid_value", "response_format.json_schema must be an object with the `schema`",
                          param="response_format.json_schema")
        schema = spec.get("schema", {})
        if not isinstance(schema, dict):
            raise Problem(400, "invalid_value", "response_format.json_schema.schema must be a JSON schema object",
                          param="response_format.json_schema.schema")
    try:
        made = json_grammar(schema)
    except ValueError as exc:
        param = "response_format.json_schema.schema" if kind == "json_schema" else "response_format"
        raise Problem(400, "invalid_value", f"{param}: {exc}", param=param) from None
    return made, json.dumps(value)


def _params(body: dict[str, Any], settings: Settings, n_vocab: int | None) -> SamplingParams:
    temperature = _number(body, "temperature", 0, MAX_TEMPERATURE, f"from 0 to {MAX_TEMPERATURE}")
    top_p = _number(body, "top_p", 0, 1, "from 0 to 1")
    min_p = _number(body, "min_p", 0, 1, "from 0 to 1")
    presence = _number(body, "presence_penalty", -2, 2, "from -2 to 2")
    frequency = _number(body, "frequency_penalty", -2, 2, "from -2 to 2")
    repeat = _number(body, "repeat_penalty", 0, 10, "above 0 and at most 10 (1 = off)")
    if repeat == 0:
        raise Problem(400, "invalid_value", "repeat_penalty must be above 0 and at most 10 (1 = off)",
                      param="repeat_penalty")
    top_k = body.get("top_k")
    if top_k is not None and not 0 <= top_k <= 1_000_000:
        raise Problem(400, "invalid_value", f"top_k must be a whole number from 0 to 1000000 (0 = off), got {top_k}",
                      param="top_k")
    max_tokens = body.get("max_completion_tokens")
    name = "max_completion_tokens"
    if max_tokens is None:
        max_tokens, name = body.get("max_tokens"), "max_tokens"
    if max_tokens is not None and max_tokens < 1:
        raise Problem(400, "invalid_value", f"{name} must be at least 1", param=name)
    seed = body.get("seed")
    if seed is not None and not 0 <= seed < 2**32:
        raise Problem(400, "invalid_value", f"seed must be a whole number from 0 to {2**32 - 1}", param="seed")
    grammar, response_format = _response_format(body.get("response_format"), body.get("grammar"))
    grammar = grammar or body.get("grammar")
    logprobs = _top_logprobs(body)
    try:
        return SamplingParams.defaults(
            settings, temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p, repeat_penalty=repeat,
            presence_penalty=presence, frequency_penalty=frequency,
            logit_bias=_logit_bias(body.get("logit_bias"), n_vocab),
            max_tokens=None if max_tokens is None else min(max_tokens, 1 << 20),
            seed=seed, stop=parse_stop(body.get("stop")) or None, grammar=grammar, response_format=response_format,
            logprobs=logprobs,
        )
    except ValueError as exc:
        text = str(exc)
        param = text.split(" ", 1)[0] if text.split(" ", 1)[0] in _FIELDS else None
        raise Problem(400, "invalid_value", text, param=param) from None


def _vocab_size(runtime: Runtime) -> int | None:
    """The local model's vocabulary size (None in remote mode, or while no engine runs)."""
    model = getattr(runtime.engine.current, "model", None)
    info = getattr(model, "info", None)
    return getattr(info, "n_vocab", None)


def _cache_key(user_id: str, messages: list[ChatMessage]) -> str:
    """The engine's `chat_id` of a request: the caller and how the conversation begins, so that a
    follow-up request finds (and is told about, as `cached_tokens`) what its predecessor cached."""
    system = next((m.content for m in messages if m.role == "system"), "")
    first = next((m.content for m in messages if m.role == "user"), "")
    digest = hashlib.blake2b(f"{system}\x00{first}".encode("utf-8", "replace"), digest_size=12).hexdigest()
    return f"v1:{user_id}:{digest}"


def model_name() -> str:
    return current_runtime().settings.model_file.stem


# --- routes ---------------------------------------------------------------------------------------


@blueprint.get("/models")
async def models() -> Response:
    await authenticate()
    pool = current_runtime().models.current
    if pool is not None:
        return json_response({"object": "list", "data": [await _pool_card(entry) for entry in pool.describe()]})
    return json_response({"object": "list", "data": [await _model_card()]})


@blueprint.get("/models/<path:model_id>")
async def model(model_id: str) -> Response:
    await authenticate()
    pool = current_runtime().models.current
    if pool is not None:
        entry = next((e for e in pool.describe() if e["name"] == model_id), None)
        if entry is None:
            raise Problem(404, "model_not_found", f"the model `{model_id}` does not exist; this server serves "
                          + ", ".join(f"`{name}`" for name in pool.names), param="model")
        return json_response(await _pool_card(entry))
    if model_id != model_name():
        raise Problem(404, "model_not_found", f"the model `{model_id}` does not exist; this server runs "
                      f"`{model_name()}`", param="model")
    return json_response(await _model_card())


async def _pool_card(entry: dict[str, Any]) -> dict[str, Any]:
    """A model of the pool: as `_model_card` while loaded; unloaded, its configured context per
    slot (the loaded one may be less: never more than the GGUF was trained for)."""
    settings = entry["settings"]
    path = settings.model_file
    try:
        created = int((await trio.to_thread.run_sync(path.stat)).st_mtime)
    except OSError:
        created = 0
    engine = entry["engine"]
    size: dict[str, Any] = {"max_model_len": settings.ctx}
    if engine is not None:
        info = engine.model.info
        size = {"max_model_len": engine.n_ctx_seq,
                "meta": {"n_ctx": engine.n_ctx_seq, "n_ctx_train": info.n_ctx_train, "n_vocab": info.n_vocab,
                         "n_params": info.n_params, "size": info.size_bytes}}
    return {"id": entry["name"], "object": "model", "created": created, "owned_by": "ktulhu", **size,
            "loaded": entry["loaded"]}


async def _model_card() -> dict[str, Any]:
    path = current_runtime().settings.model_file
    try:
        created = int(path.stat().st_mtime)
    except OSError:
        created = 0
    return {"id": model_name(), "object": "model", "created": created, "owned_by": "ktulhu",
            **await _context_size(current_runtime())}


async def _context_size(runtime: Runtime) -> dict[str, Any]:
    """The context a request may fill, as vLLM (`max_model_len`) and llama-server (`meta`) say it:
    the local engine's slot; in remote mode what the first healthy worker's `/v1/models` says.
    Nothing while no engine runs."""
    engine = runtime.engine.current
    model = getattr(engine, "model", None)
    if model is not None:  # the local engine
        info = model.info
        return {"max_model_len": engine.n_ctx_seq,
                "meta": {"n_ctx": engine.n_ctx_seq, "n_ctx_train": info.n_ctx_train, "n_vocab": info.n_vocab,
                         "n_params": info.n_params, "size": info.size_bytes}}
    meta = await engine.model_meta() if hasattr(engine, "model_meta") else None
    if not meta:
        return {}
    n_ctx = meta.get("n_ctx") or meta.get("n_ctx_train")
    return {**({"max_model_len": n_ctx} if isinstance(n_ctx, int) else {}), "meta": meta}


@blueprint.post("/chat/completions")
async def chat_completions() -> Response:
    caller = await authenticate()
    runtime = current_runtime()
    # an authenticated request is on its way until the engine has its prompt (`Arrivals`)
    with runtime.arrivals.expecting():
        body = await json_body({}, max_bytes=MAX_BODY)
        chat = parse_request(body, runtime.settings, max_chars=runtime.settings.max_prompt_chars * 4,
                             n_vocab=_vocab_size(runtime))
        paid = await begin(runtime, caller.user, chat.messages, chat.params,
                           chat_id=_cache_key(caller.user.id, chat.messages), model=body.get("model"))
    meta = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": paid.model or model_name()}
    if chat.stream:
        return sse_response(_stream(paid, meta, chat.include_usage, chat.tools), paid)
    with paid:
        text, tokens = await _reply(paid)  # a generation that did not finish raises `Problem` (an error answer)
    message, finish = {"role": "assistant", "content": text}, _finish_reason(paid)
    if chat.tools is not None:  # the reply's JSON: a tool call or a text
        reply = chat.tools.reply(text, finish)
        message, finish = reply.message(), reply.finish_reason
    return json_response({
        **{"id": meta["id"], "object": "chat.completion", "created": meta["created"], "model": meta["model"]},
        "choices": [{"index": 0, "message": message,
                     "logprobs": _logprobs(paid, tokens), "finish_reason": finish}],
        "usage": paid.usage,
        "system_fingerprint": None,
    })


async def _reply(paid: PaidGeneration) -> tuple[str, list[TokenLogprob]]:
    """The whole reply and its tokens' log-probability entries (none unless asked for)."""
    parts: list[str] = []
    tokens: list[TokenLogprob] = []
    async with aclosing(paid.pieces()) as pieces:
        async for piece in pieces:
            parts.append(piece)
            tokens += paid.generation.take_logprobs()
    tokens += paid.generation.take_logprobs()
    return "".join(parts), tokens


def _logprobs(paid: PaidGeneration, tokens: list[TokenLogprob]) -> dict[str, Any] | None:
    """OpenAI's `choices[].logprobs` for `tokens`: null when the request did not ask. Each token's
    `bytes` are its own (a character may span tokens); `token` is them decoded, a split character
    as U+FFFD."""
    if paid.generation.params.logprobs is None:
        return None
    return {"content": [{**_token(entry.data, entry.logprob),
                         "top_logprobs": [_token(data, logprob) for data, logprob in entry.top]}
                        for entry in tokens], "refusal": None}


def _token(data: bytes, logprob: float) -> dict[str, Any]:
    return {"token": data.decode("utf-8", "replace"), "logprob": logprob, "bytes": list(data)}


def _finish_reason(paid: PaidGeneration) -> str:
    """`stop` (end of turn, a stop string) or `length`; `pieces()` has raised for anything else."""
    reason = _FINISH.get(paid.finish_reason or "")
    if reason is None:
        raise Problem(500, "generation_failed", f"the generation ended without finishing ({paid.finish_reason})")
    return reason


def _error_event(status: int, code: str | None, message: str, param: str | None = None) -> bytes:
    """OpenAI's mid-stream error: `data: {"error": {...}}`, then `data: [DONE]`."""
    kind = _TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return sse_event({"error": {"message": message, "type": kind, "param": param, "code": code}}) + SSE_DONE


def _chunk(meta: dict[str, Any], delta: dict[str, Any], finish: str | None,
           logprobs: dict[str, Any] | None = None) -> bytes:
    return sse_event({**_chunk_head(meta),
                      "choices": [{"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish}]})


def _chunk_head(meta: dict[str, Any]) -> dict[str, Any]:
    return {"id": meta["id"], "object": "chat.completion.chunk", "created": meta["created"], "model": meta["model"],
            "system_fingerprint": None}


async def event_stream(paid: PaidGeneration, events: AsyncIterator[bytes],
                       usage_head: dict[str, Any] | None) -> AsyncIterator[bytes]:
    """How every OpenAI stream ends: after `events` (the chunks, the last one with the finish reason)
    an optional usage chunk (`usage_head` plus `usage`, `choices` empty), then `data: [DONE]`. A
    reply that did not finish (an engine failure, a generation the server stopped: `events` raises
    `Problem`) has no finish reason: it ends with an `error` object event (typed like the HTTP error
    it would have been; the headers left when the request was admitted), then `[DONE]`."""
    with paid:
        try:
            async with aclosing(events) as inner:
                async for event in inner:
                    yield event
        except Problem as problem:
            yield _error_event(problem.status, problem.code, problem.message, problem.param)
            return
        except Exception:  # noqa: BLE001 - a bug must end the stream as an error, not as a short reply
            log.exception("OpenAI-compatible stream failed")
            yield _error_event(500, "internal_error", "the request failed on the server; it has been logged")
            return
        if usage_head is not None:
            yield sse_event({**usage_head, "choices": [], "usage": paid.usage})
        yield SSE_DONE


def _stream(paid: PaidGeneration, meta: dict[str, Any], include_usage: bool,
            tools: ToolPlan | None = None) -> AsyncIterator[bytes]:
    """The chat completion chunks as an `event_stream`."""
    return event_stream(paid, _chunks(paid, meta, tools), _chunk_head(meta) if include_usage else None)


async def _chunks(paid: PaidGeneration, meta: dict[str, Any], tools: ToolPlan | None) -> AsyncIterator[bytes]:
    """Role first, then content deltas, then the finish reason (a grammar no token completes is the
    request's fault: `invalid_request_error`). With `tools`, the reply's JSON is read whole first:
    its tool call (or text) comes at the end."""
    yield _chunk(meta, {"role": "assistant", "content": None if tools else ""}, None)
    buffered: list[str] = []
    async with aclosing(paid.pieces()) as pieces:
        async for piece in pieces:
            if tools is not None:
                buffered.append(piece)
                continue
            yield _chunk(meta, {"content": piece}, None, _logprobs(paid, paid.generation.take_logprobs()))
    rest = paid.generation.take_logprobs()  # tokens that added no visible text at the end
    if rest:
        yield _chunk(meta, {"content": ""}, None, _logprobs(paid, rest))
    finish = _finish_reason(paid)
    if tools is not None:
        reply = tools.reply("".join(buffered), finish)
        for delta in reply.deltas():
            yield _chunk(meta, delta, None)
        finish = reply.finish_reason
    yield _chunk(meta, {}, finish)
