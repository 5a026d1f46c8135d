"""llama-server's tokenizer routes, `POST /tokenize` and `POST /detokenize`, on the real model: round
trips, pieces, control tokens, ids outside the vocabulary refused naming `tokens[i]`, the same
credential as /v1; and the body checkers on random bodies (a `Problem` naming a field, never else).
Remote mode (the first worker's routes) is in test_completions.py with its llama-server fixture.
"""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from hypothesis import given, settings as hsettings, strategies as st

from ktulhu.api.problems import Problem
from ktulhu.http.tokenize import parse_detokenize, parse_tokenize

from api.helpers import JSON_VALUES
from auth.helpers import bearer, client, make_user

ENV = {"LLAMA_CLI_MAX_TOKENS": "16", "KTULHU_LOGIN_RATE": "0"}


@pytest.mark.model
async def test_tokenize_detokenize(live_server) -> None:
    async with live_server(**ENV) as server:
        runtime = server.runtime
        n_vocab = runtime.engine.get().model.info.n_vocab
        _, token = make_user(runtime)
        text = "Hello, world! Grüße <|im_end|> 🐱"
        async with client(server) as http:
            async def post(path: str, body: Any, credential: str | None = token) -> httpx.Response:
                return await http.post(path, json=body, headers=bearer(credential) if credential else {})

            r = await post("/tokenize", {"content": text})
            assert r.status_code == 200, r.text
            tokens = r.json()["tokens"]
            assert tokens and all(isinstance(t, int) and 0 <= t < n_vocab for t in tokens)
            r = await post("/detokenize", {"tokens": tokens})
            assert r.status_code == 200 and r.json() == {"content": text}
            # the control token's text is one token unless parse_special is off
            plain = (await post("/tokenize", {"content": text, "parse_special": False})).json()["tokens"]
            assert len(plain) > len(tokens)
            assert (await post("/detokenize", {"tokens": plain})).json()["content"] == text

            r = await post("/tokenize", {"content": text, "with_pieces": True})
            pieces = r.json()["tokens"]
            assert [p["id"] for p in pieces] == tokens
            spelled = b"".join(p["piece"].encode() if isinstance(p["piece"], str) else bytes(p["piece"])
                               for p in pieces)
            assert spelled.decode() == text
            assert any(isinstance(p["piece"], list) for p in pieces)  # the cat's bytes span tokens
            assert (await post("/tokenize", {"content": ""})).json() == {"tokens": []}
            assert (await post("/detokenize", {"tokens": []})).json() == {"content": ""}

            for bad, param in [([-1], "tokens[0]"), ([5, 10**9], "tokens[1]"), (["x"], "tokens[0]"),
                               ([True], "tokens[0]"), ([1.5], "tokens[0]"), ([n_vocab], "tokens[0]")]:
                r = await post("/detokenize", {"tokens": bad})
                assert r.status_code == 400 and r.json()["error"]["param"] == param, (bad, r.text)
            for path, body, status, param in [
                ("/detokenize", {"tokens": "1 2"}, 422, "tokens"), ("/detokenize", {}, 422, "tokens"),
                ("/tokenize", {"content": 5}, 422, "content"), ("/tokenize", {}, 422, "content"),
                ("/tokenize", {"content": "x", "with_pieces": "yes"}, 422, "with_pieces"),
                ("/tokenize", {"content": "x", "wizard": 1}, 400, "wizard"),
                ("/tokenize", {"content": "x" * (runtime.settings.max_prompt_chars * 4 + 1)}, 413, "content"),
            ]:
                r = await post(path, body)
                assert r.status_code == status and r.json()["error"]["param"] == param, (path, body, r.text)
            assert (await post("/tokenize", {"content": "x"}, credential=None)).status_code == 401
            assert (await post("/detokenize", {"tokens": [1]}, credential="nope")).status_code == 401


_json = JSON_VALUES
_tokenize_bodies = st.fixed_dictionaries({}, optional={
    "content": st.text(max_size=30) | _json, "add_special": _json, "parse_special": _json, "with_pieces": _json,
    "wizard": _json})
_detokenize_bodies = st.fixed_dictionaries({}, optional={
    "tokens": st.lists(st.integers(-5, 60_000) | _json, max_size=5) | _json, "content": _json})


def _named(problem: Problem, body: dict[str, Any], required: str) -> None:
    assert problem.status in (400, 413, 422) and problem.message, problem
    name = problem.param and problem.param.split("[")[0]
    assert name in body or name == required not in body, (problem.param, body)


@hsettings(max_examples=500, deadline=None)
@given(_tokenize_bodies)
def test_any_tokenize_body_is_parsed_or_refused_naming_a_field(body: dict[str, Any]) -> None:
    try:
        content, add_special, parse_special, with_pieces = parse_tokenize(body, max_chars=20)
    except Problem as problem:
        _named(problem, body, "content")
        return
    assert content == body["content"] and len(content) <= 20
    assert all(isinstance(flag, bool) for flag in (add_special, parse_special, with_pieces))


@hsettings(max_examples=500, deadline=None)
@given(_detokenize_bodies, st.sampled_from([None, 49152]))
def test_any_detokenize_body_is_parsed_or_refused_naming_a_field(body: dict[str, Any], n_vocab: int | None) -> None:
    try:
        tokens = parse_detokenize(body, max_tokens=4, n_vocab=n_vocab)
    except Problem as problem:
        _named(problem, body, "tokens")
        return
    assert len(tokens) <= 4 and all(type(t) is int and 0 <= t < (n_vocab or 2**31) for t in tokens)
