"""llama-server's tokenizer routes: `POST /tokenize` and `POST /detokenize`.

    /tokenize    {"content": "...", "add_special": false, "parse_special": true, "with_pieces": false}
                 -> {"tokens": [ids]} or, with pieces, {"tokens": [{"id": 1, "piece": "..."}]}
    /detokenize  {"tokens": [ids]} -> {"content": "..."}

Same credential as `/v1` (an app token or API key as the Bearer), errors in OpenAI's shape naming the
field. A piece that is not valid UTF-8 on its own (part of a character) is its list of bytes, as
llama-server sends it. The tokenizer runs on worker threads; in remote mode the first healthy
worker's routes answer (501 when the worker has none, e.g. vLLM or Ollama).
"""

from __future__ import annotations

from typing import Any

from quart import Blueprint, Response

from ..api.caller import authenticate
from ..api.generation import running
from ..api.problems import Problem
from ..app_state import current_runtime
from ..engine.prompt import PromptError
from ..engine.remote import WorkerLacks
from ..engine.request import EngineError
from ..refusals import http_problem
from . import openai
from .errors import json_body, json_response

__all__ = ["blueprint", "parse_detokenize", "parse_tokenize"]

blueprint = Blueprint("tokenize", __name__)
blueprint.register_error_handler(Exception, openai._error)  # OpenAI's error shape, as /v1

_TOKENIZE_FIELDS = {"content": (str,), "add_special": (bool, None), "parse_special": (bool, None),
                    "with_pieces": (bool, None)}
_DETOKENIZE_FIELDS = {"tokens": (list,)}


def _check_fields(body: dict[str, Any], fields: dict[str, tuple[type | None, ...]], required: str) -> None:
    for name in body:
        if name not in fields:
            raise Problem(400, "unknown_parameter", f"unknown parameter `{openai._shown(name)}`",
                          param=openai._shown(name))
    if required not in body:
        raise Problem(422, "invalid_body", f"`{required}` is required", param=required)
    for name, value in body.items():
        openai._check_type(name, value, fields[name])


def parse_tokenize(body: dict[str, Any], *, max_chars: int) -> tuple[str, bool, bool, bool]:
    """(content, add_special, parse_special, with_pieces); raises `Problem` naming the field."""
    _check_fields(body, _TOKENIZE_FIELDS, "content")
    content = body["content"]
    if len(content) > max_chars:
        raise Problem(413, "content_too_long", f"content holds more than {max_chars} characters", param="content")
    parse_special = body.get("parse_special")
    return content, body.get("add_special") is True, parse_special is not False, body.get("with_pieces") is True


def parse_detokenize(body: dict[str, Any], *, max_tokens: int, n_vocab: int | None) -> list[int]:
    """The token ids, each from 0 to `n_vocab - 1` (when known); raises `Problem` naming `tokens[i]`."""
    _check_fields(body, _DETOKENIZE_FIELDS, "tokens")
    tokens = body["tokens"]
    if len(tokens) > max_tokens:
        raise Problem(413, "content_too_long", f"tokens holds more than {max_tokens} ids", param="tokens")
    return list(openai.token_ids(tokens, "tokens", n_vocab))



def _engine_problem(exc: EngineError | PromptError, param: str) -> Problem:
    if isinstance(exc, WorkerLacks):
        return Problem(501, "not_implemented", str(exc))
    if isinstance(exc, PromptError):
        return Problem(400, "invalid_value", str(exc), param=param)
    return http_problem(exc, param, task="tokenizer")


def _piece(data: bytes) -> str | list[int]:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return list(data)


@blueprint.post("/tokenize")
async def tokenize() -> Response:
    await authenticate()
    runtime = current_runtime()
    body = await json_body({}, max_bytes=openai.MAX_BODY)
    content, add_special, parse_special, with_pieces = parse_tokenize(
        body, max_chars=runtime.settings.max_prompt_chars * 4)
    engine = running(runtime, runtime.engine)
    try:
        tokens = await engine.tokenize(content, add_special=add_special, parse_special=parse_special,
                                       with_pieces=with_pieces)
    except (EngineError, PromptError) as exc:
        raise _engine_problem(exc, "content") from None
    if with_pieces:
        return json_response({"tokens": [{"id": token, "piece": _piece(piece)} for token, piece in tokens]})
    return json_response({"tokens": tokens})


@blueprint.post("/detokenize")
async def detokenize() -> Response:
    await authenticate()
    runtime = current_runtime()
    body = await json_body({}, max_bytes=openai.MAX_BODY)
    engine = running(runtime, runtime.engine)
    try:
        n_vocab = await engine.vocab_size()
        tokens = parse_detokenize(body, max_tokens=runtime.settings.max_prompt_chars * 4, n_vocab=n_vocab)
        content = await engine.detokenize(tokens)
    except (EngineError, PromptError) as exc:
        raise _engine_problem(exc, "tokens") from None
    return json_response({"content": content})
