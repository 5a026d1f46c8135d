"""`POST /v1/completions` (OpenAI's legacy completions), `GET /health` and `/v1/models`' context size
(the tokenizer routes are in test_tokenize.py; remote mode covers both here).

Driven by the official `openai` client over loopback against the real server and model (greedy, so
every reply is deterministic): a raw prompt as text or as token ids, streamed or not, stop strings,
finish reasons, usage; refused fields are 400s naming them. Also: the same through a llama-server
worker in remote mode, and the body checker on random bodies (a `Problem` naming a field, never
anything else).
"""

from __future__ import annotations

from typing import Any

import attrs
import httpx
import openai
import orjson
import pytest
import trio
from hypothesis import given, settings as hsettings, strategies as st

from ktulhu.api.problems import Problem
from ktulhu.engine.remote import RemoteEngine
from ktulhu.engine.sampling import SamplingParams
from ktulhu.http.completions import CompletionRequest, parse_completion
from ktulhu.settings import load_settings
from tests.paths import REPO

from api.helpers import JSON_VALUES, openai_client
from auth.helpers import bearer, client, make_user, snapshot

pytestmark = pytest.mark.model

ENV = {"LLAMA_CLI_MAX_TOKENS": "16", "KTULHU_LOGIN_RATE": "0"}
PROMPT = "The capital of France is Paris. The capital of Germany is"



async def _complete(sdk: openai.AsyncOpenAI, prompt: Any = PROMPT, **fields: Any):
    fields.setdefault("temperature", 0)
    fields.setdefault("max_tokens", 8)
    return await sdk.completions.create(model="any", prompt=prompt, **fields)


async def _streamed(sdk: openai.AsyncOpenAI, prompt: Any = PROMPT, **fields: Any) -> tuple[str, list[str], Any]:
    """(text, finish reasons, the last chunk) of a streamed completion with usage."""
    stream = await _complete(sdk, prompt, stream=True, stream_options={"include_usage": True}, **fields)
    chunks = [chunk async for chunk in stream]
    assert all(c.object == "text_completion" for c in chunks)
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    return text, finishes, chunks[-1]


async def test_completions_official_client(live_server) -> None:
    async with live_server(**ENV) as server:
        runtime = server.runtime
        name = runtime.settings.model_file.stem
        _, token = make_user(runtime, role="paid")
        sdk = openai_client(server, token)

        completion = await _complete(sdk)
        assert completion.object == "text_completion" and completion.model == name
        assert completion.id.startswith("cmpl-")
        text = completion.choices[0].text
        assert text and completion.choices[0].finish_reason == "length"
        assert completion.usage.completion_tokens == 8
        assert completion.usage.total_tokens == completion.usage.prompt_tokens + 8
        assert (await _complete(sdk)).choices[0].text == text  # greedy: deterministic

        streamed, finishes, last = await _streamed(sdk)
        assert streamed == text and finishes == ["length"]
        assert last.choices == [] and last.usage.completion_tokens == 8

        # the prompt as token ids (what /tokenize gives) is the same prompt; so is a list of one
        async with client(server) as http:
            r = await http.post("/tokenize", json={"content": PROMPT, "add_special": True}, headers=bearer(token))
            assert r.status_code == 200, r.text
            ids = r.json()["tokens"]
        assert (await _complete(sdk, ids)).choices[0].text == text
        assert (await _complete(sdk, [ids])).choices[0].text == text
        assert (await _complete(sdk, [PROMPT])).choices[0].text == text
        assert (await _complete(sdk, ids)).usage.prompt_tokens == len(ids) == completion.usage.prompt_tokens

        # a stop string ends the text before it, with finish_reason stop, streamed or not
        assert len(text.strip()) >= 4, text
        stop = text.strip()[2:4]
        expected = text[:text.find(stop)]
        stopped = await _complete(sdk, stop=[stop])
        assert stopped.choices[0].text == expected and stopped.choices[0].finish_reason == "stop"
        streamed, finishes, _ = await _streamed(sdk, stop=stop)
        assert streamed == expected and finishes == ["stop"]
        await sdk.close()


async def test_refused_fields_are_400s_naming_them(live_server) -> None:
    async with live_server(**ENV) as server:
        runtime = server.runtime
        _, token = make_user(runtime)
        before = snapshot(runtime)
        sdk = openai_client(server, token)
        cases: list[tuple[dict[str, Any], str]] = [
            ({"suffix": "the end"}, "suffix"), ({"logprobs": 1}, "logprobs"), ({"best_of": 2}, "best_of"),
            ({"n": 2}, "n"), ({"echo": True}, "echo"), ({"prompt": ["one", "two"]}, "prompt"),
            ({"prompt": [1, -1]}, "prompt[1]"), ({"prompt": [10**9]}, "prompt[0]"), ({"prompt": ["x", 1]}, "prompt[0]"),
            ({"prompt": ""}, "prompt"), ({"temperature": 3}, "temperature"), ({"max_tokens": 0}, "max_tokens"),
            ({"stop": ["a", "b", "c", "d", "e"]}, "stop"), ({"extra_body": {"wizard": 1}}, "wizard"),
            ({"extra_body": {"messages": []}}, "messages"),
        ]
        for fields, param in cases:
            fields = {"prompt": PROMPT, **fields}
            with pytest.raises(openai.BadRequestError) as bad:
                await sdk.completions.create(model="any", **fields)
            assert bad.value.param == param, (fields, bad.value.body)
        async with client(server) as http:
            r = await http.post("/v1/completions", json={"max_tokens": 2}, headers=bearer(token))
            assert r.status_code == 422 and r.json()["error"]["param"] == "prompt"
            r = await http.post("/v1/completions", json={"prompt": 5}, headers=bearer(token))
            assert r.status_code == 422 and r.json()["error"]["param"] == "prompt"
            r = await http.post("/v1/completions", json={"prompt": "x" * (runtime.settings.max_prompt_chars * 4 + 1)},
                                headers=bearer(token))
            assert r.status_code == 413 and r.json()["error"]["param"] == "prompt"
            r = await http.post("/v1/completions", json={"prompt": "hi"})
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        assert snapshot(runtime) == before  # nothing refused was paid for
        await sdk.close()


async def test_health_and_models_context_size(live_server) -> None:
    async with live_server(**ENV) as server:
        runtime = server.runtime
        _, token = make_user(runtime)
        async with client(server) as http:
            r = await http.get("/health")
            assert r.status_code == 200 and r.json() == {"status": "ok"}
            name, state = next(iter(runtime.readiness.components.items()))
            runtime.readiness.mark(name, "starting")
            try:
                r = await http.get("/health")
            finally:
                runtime.readiness.components[name] = state
            assert r.status_code == 503 and r.json()["status"] == "loading" and name in r.json()["error"]["message"]
            assert (await http.get("/health")).status_code == 200

            card = (await http.get("/v1/models", headers=bearer(token))).json()["data"][0]
            engine = runtime.engine.get()
            assert card["max_model_len"] == engine.n_ctx_seq == card["meta"]["n_ctx"]
            assert card["meta"]["n_ctx_train"] == engine.model.info.n_ctx_train
            assert card["meta"]["n_vocab"] == engine.model.info.n_vocab
        sdk = openai_client(server, token)
        listed = (await sdk.models.list()).data[0]
        assert listed.max_model_len == runtime.engine.get().n_ctx_seq  # the SDK keeps the extra fields
        assert (await sdk.models.retrieve(listed.id)).max_model_len == listed.max_model_len
        await sdk.close()


# --- remote mode ----------------------------------------------------------------------------------




async def test_remote_mode_completions_and_tokenizer(live_server, llama_worker) -> None:
    env = {**ENV, "KTULHU_WORKERS": f"{llama_worker.url}|slots=1", "LLAMA_CLI_MODEL": "models/not-here.gguf"}
    async with live_server(**env) as server, httpx.AsyncClient(base_url=llama_worker.url, timeout=30) as worker:
        assert server.runtime.engine.get().__class__ is RemoteEngine
        _, token = make_user(server.runtime, role="paid")
        sdk = openai_client(server, token)
        completion = await _complete(sdk)
        text = completion.choices[0].text
        assert text and completion.choices[0].finish_reason == "length"
        assert completion.usage.completion_tokens == 8
        streamed, finishes, last = await _streamed(sdk)
        assert streamed == text and finishes == ["length"] and last.usage.completion_tokens == 8
        direct = await worker.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 8, "temperature": 0})
        assert direct.json()["choices"][0]["text"] == text

        async with client(server) as http:
            r = await http.post("/tokenize", json={"content": PROMPT, "add_special": True}, headers=bearer(token))
            ids = r.json()["tokens"]
            direct = await worker.post("/tokenize", json={"content": PROMPT, "add_special": True})
            assert ids == direct.json()["tokens"]
            r = await http.post("/detokenize", json={"tokens": ids}, headers=bearer(token))
            assert r.json()["content"].strip() == PROMPT
            r = await http.post("/tokenize", json={"content": "Grüße", "with_pieces": True}, headers=bearer(token))
            assert "".join(p["piece"] for p in r.json()["tokens"] if isinstance(p["piece"], str)) == "Grüße"
            r = await http.post("/detokenize", json={"tokens": [10**9]}, headers=bearer(token))
            assert r.status_code == 400 and r.json()["error"]["param"] == "tokens[0]"
            card = (await http.get("/v1/models", headers=bearer(token))).json()["data"][0]
            assert card["max_model_len"] > 0 and card["meta"]["n_vocab"] > 0
        assert (await _complete(sdk, ids)).choices[0].text == text
        stop = text.strip()[2:4]
        stopped = await _complete(sdk, stop=[stop])
        assert stopped.choices[0].text == text[:text.find(stop)] and stopped.choices[0].finish_reason == "stop"
        with pytest.raises(openai.BadRequestError) as bad:
            await _complete(sdk, echo=True)
        assert bad.value.param == "echo"
        await sdk.close()


# --- the body checkers, property-based ------------------------------------------------------------

_SETTINGS = load_settings(environ={"JWT_SECRET": "s" * 40}, root=REPO)
_json = JSON_VALUES
_token = st.integers(-5, 60_000) | _json
_FIELD_VALUES = {
    "prompt": st.text(max_size=20) | st.lists(_token, max_size=4) | st.lists(st.text(max_size=5), max_size=3)
    | st.lists(st.lists(_token, max_size=3), max_size=2) | _json,
    "temperature": st.floats(-1, 3) | _json, "top_p": st.floats(-0.5, 1.5) | _json,
    "top_k": st.integers(-10, 2_000_000) | _json, "min_p": st.floats(-1, 2) | _json,
    "repeat_penalty": st.floats(-1, 12) | _json, "presence_penalty": st.floats(-3, 3) | _json,
    "frequency_penalty": st.floats(-3, 3) | _json,
    "logit_bias": st.dictionaries(st.integers(-5, 60_000).map(str), st.integers(-200, 200), max_size=3) | _json,
    "max_tokens": st.integers(-2, 5_000_000) | _json, "stop": _json, "seed": st.integers(-5, 2**33) | _json,
    "stream": st.booleans() | _json,
    "stream_options": st.fixed_dictionaries({}, optional={"include_usage": _json, "x": _json}) | _json,
    "grammar": st.sampled_from(['root ::= "a"', "(", ""]) | _json, "user": _json, "model": _json,
    "n": st.integers(0, 3) | _json, "best_of": st.integers(0, 3) | _json, "suffix": _json,
    "logprobs": st.integers(0, 3) | _json, "echo": _json, "messages": _json, "unknown_field": _json,
}
_fields = st.lists(st.sampled_from(sorted(_FIELD_VALUES)).flatmap(
    lambda name: st.tuples(st.just(name), _FIELD_VALUES[name])), max_size=5)


@hsettings(max_examples=1000, deadline=None)
@given(_fields, st.sampled_from([None, 49152]))
def test_any_completion_body_is_parsed_or_refused_naming_a_field(fields: list, n_vocab: int | None) -> None:
    body = dict(fields)
    try:
        request = parse_completion(body, _SETTINGS, max_chars=10_000, n_vocab=n_vocab)
    except Problem as problem:
        assert problem.status in (400, 413, 422) and problem.message, problem
        name = problem.param and problem.param.split(".")[0].split("[")[0]
        assert name in body or name == "prompt" not in body, (problem.param, body)
        return
    assert isinstance(request, CompletionRequest) and isinstance(request.params, SamplingParams)
    attrs.validate(request.params)
    assert request.params.include_thinking
    prompt = request.prompt
    if isinstance(prompt, str):
        assert prompt
    else:
        assert prompt and all(type(t) is int and 0 <= t < (n_vocab or 2**31) for t in prompt)


# --- remote mode without a worker process: the body, text chunks, a worker without /tokenize -------


def test_remote_completion_body_and_text_chunks() -> None:
    from ktulhu.engine.remote import _choice

    settings = load_settings(environ={"KTULHU_WORKERS": "http://127.0.0.1:9|slots=1", "JWT_SECRET": "s" * 40},
                             root=REPO)
    engine = RemoteEngine(settings)
    request = parse_completion({"prompt": [1, 2, 3], "stop": "x", "seed": 4, "top_k": 2}, settings, max_chars=100)
    body = orjson.loads(engine._body(engine.workers[0], (), request.params, prompt=list(request.prompt)))
    assert body["prompt"] == [1, 2, 3] and "messages" not in body and body["stream"] is True
    assert body["stop"] == ["x"] and body["seed"] == 4 and body["top_k"] == 2
    worker = engine.workers[0]
    chunk = {"object": "text_completion", "choices": [{"text": "Hi", "index": 0, "finish_reason": None}]}
    assert _choice(chunk, worker, False) == ("Hi", None)
    chunk["choices"][0].update(text="", finish_reason="length")
    assert _choice(chunk, worker, False) == ("", "length")


async def test_remote_worker_without_tokenizer_is_told_apart() -> None:
    from ktulhu.engine.remote import WorkerLacks

    def answer(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/health":
            return httpx.Response(200, json={"status": "ok"})
        if request.url.path == "/v1/models":
            return httpx.Response(200, json={"data": [{"id": "m"}]})
        return httpx.Response(404, json={"error": {"message": "not found"}})

    settings = load_settings(environ={"KTULHU_WORKERS": "http://127.0.0.1:9|slots=1", "JWT_SECRET": "s" * 40},
                             root=REPO)
    engine = RemoteEngine(settings, transport=httpx.MockTransport(answer))
    async with trio.open_nursery() as nursery:
        await nursery.start(engine.run)
        with pytest.raises(WorkerLacks, match="/tokenize"):
            await engine.tokenize("hi", add_special=False)
        with pytest.raises(WorkerLacks, match="/detokenize"):
            await engine.detokenize([1])
        assert await engine.vocab_size() is None and await engine.model_meta() is None
        nursery.cancel_scope.cancel()
