"""OpenAI's embeddings, `POST /v1/embeddings`, as llama-server and vLLM serve them.

    {"model": "any", "input": "text" | ["text", ...] | [ids] | [[ids], ...],
     "encoding_format": "float" | "base64", "dimensions": N}
    -> {"object": "list", "data": [{"object": "embedding", "index": i, "embedding": [floats] | "<base64>"}],
        "model": "...", "usage": {"prompt_tokens": N, "total_tokens": N}}

Same credential as `/v1/chat/completions` (an app token or API key as the Bearer); no generation
quota is spent. Vectors have unit L2 norm; base64 is their little-endian float32 bytes, as OpenAI
sends them. At most `MAX_INPUTS` inputs, none empty; `dimensions` only as the model's own size
(embeddings are not shortened). Errors in OpenAI's shape name the field (`input[3]`). How the
vectors are computed (locally or by a worker) is `ktulhu.engine.embeddings`.
"""

from __future__ import annotations

import base64
from typing import Any

import attrs
import numpy as np
import orjson
import trio
from quart import Blueprint, Response

from ..api.caller import authenticate
from ..api.generation import running
from ..api.problems import Problem
from ..app_state import current_runtime
from ..engine.embeddings import CannotEmbed, EmbeddingInputError, Embeddings
from ..engine.request import EngineError
from ..refusals import http_problem
from . import openai
from .errors import json_body

__all__ = ["MAX_INPUTS", "EmbeddingRequest", "blueprint", "parse_embeddings"]

blueprint = Blueprint("embeddings", __name__, url_prefix="/v1")
blueprint.register_error_handler(Exception, openai._error)  # OpenAI's error shape, as the chat route

#: Most inputs in one request (OpenAI's limit).
MAX_INPUTS = 2048
#: Token ids are below this when the vocabulary size is not known here (remote workers that do not say).
_ANY_TOKEN = 2**31
#: Every field this route knows, with its JSON types (None: null); any other is a 400 naming it.
_FIELDS: dict[str, tuple[type | None, ...]] = {
    "input": (str, list), "model": (str, None), "encoding_format": (str, None), "dimensions": (int, None),
    "user": (str, None),
}
_KINDS = "a string, a list of strings, a list of token ids or a list of lists of token ids"


@attrs.frozen
class EmbeddingRequest:
    """A checked `/v1/embeddings` body: each input a non-empty string or non-empty token ids."""

    inputs: tuple[str | tuple[int, ...], ...]
    base64: bool = False
    dimensions: int | None = None


def _is_id(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _shown_value(value: Any) -> str:
    """A JSON value as an error repeats it, short (a 10,000-digit number is not spelled out)."""
    if _is_id(value) and abs(value) >= 10**18:
        return "a number too large for a token id"
    try:
        return orjson.dumps(value).decode()[:40]
    except TypeError:
        return type(value).__name__


def _token_ids(values: list[Any], where: str, limit: int) -> tuple[int, ...]:
    if not values:
        raise Problem(400, "invalid_value", f"{where} must hold at least one token id", param=where)
    for j, token in enumerate(values):
        if not _is_id(token) or not 0 <= token < limit:
            at = f"{where}[{j}]" if where != "input" else f"input[{j}]"
            raise Problem(400, "invalid_value", f"{at} must be a token id from 0 to {limit - 1}, got "
                          f"{_shown_value(token)}", param=at)
    return tuple(values)


def _inputs(value: Any, limit: int) -> tuple[str | tuple[int, ...], ...]:
    if isinstance(value, str):
        if not value:
            raise Problem(400, "invalid_value", "input must not be an empty string", param="input")
        return (value,)
    if not value:
        raise Problem(400, "invalid_value", "input must hold at least one item", param="input")
    if len(value) > MAX_INPUTS:
        raise Problem(400, "invalid_value", f"input holds {len(value)} items; at most {MAX_INPUTS} are accepted",
                      param="input")
    first = value[0]
    if _is_id(first):  # one input given as token ids
        return (_token_ids(value, "input", limit),)
    inputs: list[str | tuple[int, ...]] = []
    for i, item in enumerate(value):
        where = f"input[{i}]"
        if isinstance(first, str) and isinstance(item, str):
            if not item:
                raise Problem(400, "invalid_value", f"{where} must not be an empty string", param=where)
            inputs.append(item)
        elif isinstance(first, list) and isinstance(item, list):
            inputs.append(_token_ids(item, where, limit))
        else:
            raise Problem(400, "invalid_type", f"input must be {_KINDS}; {where} is not like input[0]", param=where)
    return tuple(inputs)


def parse_embeddings(body: dict[str, Any], *, n_vocab: int | None = None) -> EmbeddingRequest:
    """The checked request; raises `Problem` (400 or 422) naming the field at fault. Token ids are
    checked against `n_vocab` when given (else only that they are ids)."""
    for name in body:
        if name not in _FIELDS:
            raise Problem(400, "unknown_parameter", f"unknown parameter `{openai._shown(name)}`",
                          param=openai._shown(name))
    if "input" not in body:
        raise Problem(422, "invalid_body", "`input` is required", param="input")
    for name, value in body.items():
        openai._check_type(name, value, _FIELDS[name])
    encoding = body.get("encoding_format")
    if encoding not in (None, "float", "base64"):
        raise Problem(400, "invalid_value", "encoding_format must be float or base64", param="encoding_format")
    dimensions = body.get("dimensions")
    if dimensions is not None and dimensions < 1:
        raise Problem(400, "invalid_value", "dimensions must be at least 1", param="dimensions")
    inputs = _inputs(body["input"], n_vocab if n_vocab is not None else _ANY_TOKEN)
    return EmbeddingRequest(inputs, encoding == "base64", dimensions)


def _answer(result: Embeddings, as_base64: bool) -> bytes:
    """The JSON answer (built on a worker thread: it can run to megabytes)."""
    if as_base64:
        vectors: list[Any] = [base64.b64encode(v.astype("<f4").tobytes()).decode("ascii") for v in result.vectors]
    else:
        vectors = [np.ascontiguousarray(v, dtype=np.float32) for v in result.vectors]
    return orjson.dumps({
        "object": "list",
        "data": [{"object": "embedding", "index": i, "embedding": v} for i, v in enumerate(vectors)],
        "model": result.model,
        "usage": {"prompt_tokens": result.prompt_tokens, "total_tokens": result.prompt_tokens},
    }, option=orjson.OPT_SERIALIZE_NUMPY)


@blueprint.post("/embeddings")
async def embeddings() -> Response:
    await authenticate()
    runtime = current_runtime()
    body = await json_body({}, max_bytes=openai.MAX_BODY)
    parse_embeddings(body)  # a bad body is the caller's to fix whatever the engine's state
    embedder = running(runtime, runtime.embedder)
    try:
        request = parse_embeddings(body, n_vocab=await embedder.vocab_size())
        result = await embedder.embed(request.inputs, dimensions=request.dimensions)
    except EmbeddingInputError as exc:
        raise Problem(400, exc.code, str(exc), param=exc.param) from None
    except CannotEmbed as exc:
        raise Problem(400, "model_cannot_embed", str(exc), param="model") from None
    except EngineError as exc:
        raise http_problem(exc, "input", task="embedding") from None
    payload = await trio.to_thread.run_sync(_answer, result, request.base64)
    return Response(payload, status=200, content_type="application/json")
