"""OpenAI's legacy completions, `POST /v1/completions`: a raw prompt continued, no chat template.

The prompt is a string (tokenised with the model's BOS and control tokens parsed, as llama-server
does) or a list of token ids (taken as they are); a list of one string, or of one list of ids, is
that prompt. Same auth, quota, errors and sampling fields as `/v1/chat/completions` (`max_tokens`,
`temperature`, `top_p`, `stop`, `seed`, llama-server's `top_k`, `min_p`, `grammar` ...), answered as
`text_completion` objects, streamed as SSE on `stream: true`. What this server does not do (several
prompts, `n` or `best_of` above 1, `suffix`, `logprobs`, `echo`) is refused with a 400 naming the
field, like any unknown field. In remote mode the prompt goes to a worker's `/v1/completions`.
"""

from __future__ import annotations

import hashlib
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import Any

import attrs
from quart import Blueprint, Response

from ..api.caller import authenticate
from ..api.generation import PaidGeneration, begin, sse_event, sse_response
from ..api.problems import Problem
from ..app_state import current_runtime
from ..engine.sampling import SamplingParams
from ..settings import Settings
from . import openai
from .errors import json_body, json_response

__all__ = ["CompletionRequest", "blueprint", "parse_completion"]

blueprint = Blueprint("completions", __name__, url_prefix="/v1")
blueprint.register_error_handler(Exception, openai._error)  # OpenAI's error shape, as the chat route

_NUMBER = (float, None)
#: Every field this route knows, with its JSON types (None: null); any other is a 400 naming it.
_FIELDS: dict[str, tuple[type | None, ...]] = {
    "prompt": (str, list),
    "model": (str, None),
    # honoured (the sampling fields as `/v1/chat/completions` reads them)
    "temperature": _NUMBER, "top_p": _NUMBER, "top_k": (int, None), "min_p": _NUMBER,
    "repeat_penalty": _NUMBER, "presence_penalty": _NUMBER, "frequency_penalty": _NUMBER,
    "logit_bias": (dict, None), "max_tokens": (int, None), "stop": (str, list, None), "seed": (int, None),
    "stream": (bool, None), "stream_options": (dict, None), "grammar": (str, None), "user": (str, None),
    # refused unless they ask for nothing: one choice, no suffix, no log probabilities, no echo
    "n": (int, None), "best_of": (int, None), "suffix": (str, None), "logprobs": (int, None),
    "echo": (bool, None),
}


@attrs.frozen
class CompletionRequest:
    """A checked `/v1/completions` body: the prompt as text or as token ids."""

    prompt: str | tuple[int, ...]
    params: SamplingParams
    stream: bool
    include_usage: bool


def parse_completion(body: dict[str, Any], settings: Settings, *, max_chars: int,
                     n_vocab: int | None = None) -> CompletionRequest:
    """Check a whole body (every field known, of its type, usable, asking for what this server does);
    raises `Problem` (400/413/422) with `param` naming the field."""
    for name in body:
        if name not in _FIELDS:
            raise Problem(400, "unknown_parameter", f"unknown parameter `{openai._shown(name)}`: this server does "
                          "not support it, and will not ignore it", param=openai._shown(name))
    if "prompt" not in body:
        raise Problem(422, "invalid_body", "`prompt` is required", param="prompt")
    for name, value in body.items():
        openai._check_type(name, value, _FIELDS[name])
    _refuse_unsupported(body)
    prompt = _prompt(body["prompt"], max_chars, n_vocab)
    usage = openai.include_usage(body)
    # A raw prompt is the caller's own text: a thinking block in the reply is not hidden from it.
    params = attrs.evolve(openai._params(body, settings, n_vocab), include_thinking=True)
    return CompletionRequest(prompt, params, stream=body.get("stream") is True, include_usage=usage)


def _refuse_unsupported(body: dict[str, Any]) -> None:
    for name in ("n", "best_of"):
        value = body.get(name)
        if value is not None and value != 1:
            code = "invalid_value" if value < 1 else "unsupported_value"
            raise Problem(400, code, f"{name} must be 1: this server returns one choice per request, got {value}",
                          param=name)
    if body.get("suffix"):
        raise Problem(400, "unsupported_parameter", "`suffix`: insertion (fill-in-the-middle) is not supported by "
                      "this server; send the request without it", param="suffix")
    if body.get("logprobs") is not None:
        raise Problem(400, "unsupported_parameter", "`logprobs`: log probabilities are not returned by this "
                      "server; leave it out", param="logprobs")
    if body.get("echo"):
        raise Problem(400, "unsupported_parameter", "`echo`: the prompt is not repeated in the reply by this "
                      "server; send `echo: false` or leave it out", param="echo")


def _prompt(value: str | list[Any], max_chars: int, n_vocab: int | None) -> str | tuple[int, ...]:
    """A string, a list of token ids, or a list holding one of either."""
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], (str, list)):
        value = value[0]
    if isinstance(value, str):
        if not value:
            raise Problem(400, "invalid_value", "prompt must not be empty", param="prompt")
        if len(value) > max_chars:
            raise Problem(413, "context_too_long", f"the prompt holds more than {max_chars} characters",
                          param="prompt")
        return value
    if not value:
        raise Problem(400, "invalid_value", "prompt must not be empty", param="prompt")
    if len(value) > 1 and all(isinstance(item, (str, list)) for item in value):
        raise Problem(400, "unsupported_value", f"prompt holds {len(value)} prompts: this server completes one "
                      "prompt per request", param="prompt")
    if len(value) > max_chars:
        raise Problem(413, "context_too_long", f"the prompt holds more than {max_chars} tokens", param="prompt")
    return openai.token_ids(value, "prompt", n_vocab)


def _cache_key(user_id: str, prompt: str | tuple[int, ...]) -> str:
    """The engine's `chat_id`: the caller and how the prompt begins (slot affinity, own cached tokens)."""
    head = prompt[:2048] if isinstance(prompt, str) else ",".join(map(str, prompt[:512]))
    return f"v1c:{user_id}:{hashlib.blake2b(head.encode('utf-8', 'replace'), digest_size=12).hexdigest()}"


@blueprint.post("/completions")
async def completions() -> Response:
    caller = await authenticate()
    runtime = current_runtime()
    # an authenticated request is on its way until the engine has its prompt (`Arrivals`)
    with runtime.arrivals.expecting():
        body = await json_body({}, max_bytes=openai.MAX_BODY)
        request = parse_completion(body, runtime.settings, max_chars=runtime.settings.max_prompt_chars * 4,
                                   n_vocab=openai._vocab_size(runtime))
        paid = await begin(runtime, caller.user, (), request.params, prompt=request.prompt,
                           chat_id=_cache_key(caller.user.id, request.prompt), model=body.get("model"))
    meta = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
            "model": paid.model or openai.model_name()}
    if request.stream:
        return sse_response(_stream(paid, meta, request.include_usage), paid)
    with paid:
        text = await paid.text()  # a generation that did not finish raises `Problem` (an error answer)
    return json_response({
        **meta, "choices": [{"text": text, "index": 0, "logprobs": None, "finish_reason": openai._finish_reason(paid)}],
        "usage": paid.usage, "system_fingerprint": None,
    })


def _chunk(meta: dict[str, Any], text: str, finish: str | None) -> bytes:
    choice = {"text": text, "index": 0, "logprobs": None, "finish_reason": finish}
    return sse_event({**meta, "choices": [choice], "system_fingerprint": None})


def _stream(paid: PaidGeneration, meta: dict[str, Any], include_usage: bool) -> AsyncIterator[bytes]:
    """Chunks with the text, a last one with the finish reason, as an `openai.event_stream`."""
    return openai.event_stream(paid, _chunks(paid, meta),
                               {**meta, "system_fingerprint": None} if include_usage else None)


async def _chunks(paid: PaidGeneration, meta: dict[str, Any]) -> AsyncIterator[bytes]:
    async with aclosing(paid.pieces()) as pieces:
        async for piece in pieces:
            yield _chunk(meta, piece, None)
    yield _chunk(meta, "", openai._finish_reason(paid))
