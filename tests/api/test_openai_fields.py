"""Every OpenAI field of `/v1/chat/completions` is honoured or refused, never dropped unseen.

Driven by the official `openai` client over loopback against the real server and model (greedy,
so every reply is deterministic): the sampling fields reach llama.cpp's samplers (`logit_bias`,
penalties, `top_k`, `min_p`, `repeat_penalty`), `response_format` constrains the reply, unsupported
features are 400s naming the field, `finish_reason` says how the reply really ended (a generation
the server stopped is an error, not `stop`), usage reports the caller's own cached prompt tokens.
Also: the same fields on to a llama-server worker in remote mode, and the body checker on random
bodies (a `Problem` naming a field, never anything else).
"""

from __future__ import annotations

import json
from typing import Any

import attrs
import httpx
import openai
import orjson
import pytest
import trio
from hypothesis import given, settings as hsettings, strategies as st

from ktulhu.api.problems import Problem
from ktulhu.engine.prompt import ChatMessage
from ktulhu.engine.remote import RemoteEngine
from ktulhu.engine.sampling import SamplingParams
from ktulhu.http.openai import ChatRequest, parse_request
from ktulhu.settings import load_settings
from tests.paths import REPO

from api.helpers import JSON_VALUES, openai_client
from auth.helpers import bearer, client, make_user, snapshot

pytestmark = pytest.mark.model

ENV = {"LLAMA_CLI_MAX_TOKENS": "16", "KTULHU_LOGIN_RATE": "0"}
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
#: A prompt the model answers with a short JSON object under `json_object` (it ends by itself).
JSON_QUESTION = [{"role": "user", "content": 'Give a JSON object with a single key "answer" for: what is 2+2?'}]
CAT = [{"role": "user", "content": "Describe a cat as JSON with name and age."}]
CAT_SCHEMA = {"type": "object", "additionalProperties": False, "required": ["name", "age"],
              "properties": {"name": {"type": "string", "maxLength": 12},
                             "age": {"type": "integer", "minimum": 0, "maximum": 30}}}
CAT_FORMAT = {"type": "json_schema", "json_schema": {"name": "cat", "strict": True, "schema": CAT_SCHEMA}}
#: Forces 300 letters: the reply is still running when the test stops it.
LONG_GRAMMAR = "root ::= [a-z]{300}"



async def _ask(sdk: openai.AsyncOpenAI, messages: list[dict] = QUESTION, **fields: Any):
    fields.setdefault("temperature", 0)
    fields.setdefault("max_tokens", 16)
    return await sdk.chat.completions.create(model="any", messages=messages, **fields)


def _text(completion) -> str:
    return completion.choices[0].message.content


def _assert_cat(text: str) -> None:
    cat = json.loads(text)
    assert isinstance(cat, dict) and set(cat) == {"name", "age"}, cat
    assert isinstance(cat["name"], str) and len(cat["name"]) <= 12, cat
    assert isinstance(cat["age"], int) and not isinstance(cat["age"], bool) and 0 <= cat["age"] <= 30, cat


# --- sampling fields ------------------------------------------------------------------------------


async def test_sampling_fields_reach_the_samplers(live_server) -> None:
    async with live_server(**ENV) as server:
        model = server.runtime.engine.get().model
        _, token = make_user(server.runtime, role="paid")
        sdk = openai_client(server, token)

        base = await _ask(sdk)
        text = _text(base)
        # 16 tokens asked, 16 generated, no end of turn: `length`, and the fresh server had nothing cached
        assert base.choices[0].finish_reason == "length" and base.usage.completion_tokens == 16
        assert base.usage.prompt_tokens_details.cached_tokens == 0

        # logit_bias -100 bans the token the greedy reply starts with
        first = model.tokenize(text, special=False)[0]
        banned = _text(await _ask(sdk, logit_bias={str(first): -100}))
        assert banned != text and model.tokenize(banned, special=False)[0] != first, (text, banned)
        # a positive bias on a token the reply never starts with makes it start with it
        boosted = _text(await _ask(sdk, logit_bias={str(model.tokenize("Paris", special=False)[0]): 100}))
        assert boosted.startswith("Paris"), boosted

        # strong presence and frequency penalties change the greedy reply
        penalised = _text(await _ask(sdk, presence_penalty=2, frequency_penalty=2))
        assert penalised != text, penalised
        # llama.cpp's own repetition penalty, a llama-server extension
        repeated = _text(await _ask(sdk, extra_body={"repeat_penalty": 3.0}))
        assert repeated != text, repeated

        # top_k=1 and min_p=1 leave only the most likely token: a hot sampler turns greedy
        assert _text(await _ask(sdk, temperature=1.5, seed=11, extra_body={"top_k": 1})) == text
        assert _text(await _ask(sdk, temperature=1.5, seed=11, extra_body={"min_p": 1.0})) == text
        # neutral values change nothing
        neutral = await _ask(sdk, presence_penalty=0, frequency_penalty=0, logit_bias={}, seed=5,
                             extra_body={"top_k": 40, "min_p": 0.0, "repeat_penalty": 1.0})
        assert _text(neutral) == text

        # the same question again finds its own earlier prompt in the cache, and says so
        again = await _ask(sdk)
        assert _text(again) == text
        cached = again.usage.prompt_tokens_details.cached_tokens
        assert 0 < cached < again.usage.prompt_tokens
        # another caller's identical prompt is reused too, but not reported (it would tell what it was)
        _, other = make_user(server.runtime, role="paid")
        theirs = await _ask(openai_client(server, other))
        assert _text(theirs) == text and theirs.usage.prompt_tokens_details.cached_tokens == 0

        # streaming: exactly one finish reason, the true one, and the usage with its details
        stream = await _ask(sdk, max_tokens=4, stream=True, stream_options={"include_usage": True})
        chunks = [chunk async for chunk in stream]
        finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
        assert finishes == ["length"]
        assert chunks[-1].usage.completion_tokens == 4 and chunks[-1].usage.prompt_tokens_details.cached_tokens > 0
        await sdk.close()


async def test_response_format(live_server) -> None:
    async with live_server(**ENV) as server:
        _, token = make_user(server.runtime, role="paid")
        sdk = openai_client(server, token)
        plain = await _ask(sdk)
        assert _text(await _ask(sdk, response_format={"type": "text"})) == _text(plain)

        answer = await _ask(sdk, JSON_QUESTION, max_tokens=32, response_format={"type": "json_object"})
        assert answer.choices[0].finish_reason == "stop"
        assert isinstance(json.loads(_text(answer)), dict)

        cat = await _ask(sdk, CAT, max_tokens=32, response_format=CAT_FORMAT)
        assert cat.choices[0].finish_reason == "stop"
        _assert_cat(_text(cat))
        stream = await _ask(sdk, CAT, max_tokens=32, response_format=CAT_FORMAT, stream=True)
        chunks = [chunk async for chunk in stream]
        _assert_cat("".join(c.choices[0].delta.content or "" for c in chunks if c.choices))
        assert [c.choices[0].finish_reason for c in chunks if c.choices[0].finish_reason] == ["stop"]
        await sdk.close()


# --- refusals -------------------------------------------------------------------------------------

MESSAGE = {"role": "user", "content": "hi"}
INVALID = [
    ({"top_k": -5}, "top_k"),
    ({"top_k": 2_000_000}, "top_k"),
    ({"min_p": 1.5}, "min_p"),
    ({"repeat_penalty": 0}, "repeat_penalty"),
    ({"repeat_penalty": 11}, "repeat_penalty"),
    ({"presence_penalty": 5}, "presence_penalty"),
    ({"frequency_penalty": -2.5}, "frequency_penalty"),
    ({"logit_bias": {"abc": 1}}, "logit_bias"),
    ({"logit_bias": {"-3": 1}}, "logit_bias"),
    ({"logit_bias": {"5": 1000}}, "logit_bias"),
    ({"logit_bias": {"5": "ban"}}, "logit_bias"),
    ({"logit_bias": {"99999999": -100}}, "logit_bias"),  # not in this model's vocabulary
    ({"logit_bias": {str(i): 1 for i in range(1025)}}, "logit_bias"),
    ({"seed": 2**32}, "seed"),
    ({"max_completion_tokens": 0}, "max_completion_tokens"),
    ({"response_format": {"type": "xml"}}, "response_format.type"),
    ({"response_format": {"type": "json_schema"}}, "response_format.json_schema"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": []}}},
     "response_format.json_schema.schema"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"$ref": "https://x.test/s"}}}},
     "response_format.json_schema.schema"),
    ({"response_format": {"type": "json_schema",
                          "json_schema": {"name": "x", "schema": {"type": "string", "minLength": 10**9}}}},
     "response_format.json_schema.schema"),
    ({"response_format": {"type": "json_object"}, "grammar": 'root ::= "a"'}, "response_format"),
    ({"stream_options": {"include_usage": "yes"}}, "stream_options.include_usage"),
    ({"top_logprobs": 3}, "top_logprobs"),
    ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
]
UNSUPPORTED = [
    ({"tools": [{"type": "function", "function": {"name": "f g", "parameters": {"type": "object"}}}]},
     "tools[0].function.name"),
    ({"functions": [{"name": "f"}]}, "functions"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tool_choice": {"type": "function", "function": {"name": "f"}}}, "tool_choice.function.name"),
    ({"function_call": {"name": "f"}}, "function_call"),
    ({"n": 2}, "n"),
    ({"service_tier": "flex"}, "service_tier"),
    ({"reasoning_effort": "low"}, "reasoning_effort"),
    ({"modalities": ["text", "audio"]}, "modalities"),
    ({"typical_p": 0.5}, "typical_p"),
    ({"stream_options": {"chunk_size": 3}}, "stream_options.chunk_size"),
    ({"messages": [{"role": "tool", "content": "42"}]}, "messages[0].tool_call_id"),
    ({"messages": [{"role": "function", "name": "f", "content": "42"}]}, "messages[0].role"),
    ({"messages": [{"role": "assistant", "content": None, "tool_calls": [{"id": "c1", "type": "function"}]},
                   MESSAGE]}, "messages[0].tool_calls[0].function"),
    ({"messages": [{"role": "user", "content": "hi", "name": "b" * 65}]}, "messages[0].name"),
    ({"messages": [{"role": "user", "content": "hi", "name": 7}]}, "messages[0].name"),
]


async def test_invalid_and_unsupported_fields_are_400s_naming_them(live_server) -> None:
    async with live_server(**ENV, KTULHU_FREE_GENERATIONS="1") as server:
        runtime = server.runtime
        user, token = make_user(runtime)
        before = snapshot(runtime)
        async with client(server) as http:
            for fields, param in [*INVALID, *UNSUPPORTED]:
                body = {"messages": [MESSAGE], "max_tokens": 2, **fields}
                r = await http.post("/v1/chat/completions", json=body, headers=bearer(token))
                assert r.status_code == 400, (fields, r.status_code, r.text[:300])
                error = r.json()["error"]
                assert error["param"] == param and error["type"] == "invalid_request_error", (fields, error)
                assert param.split(".")[0].split("[")[0] in error["message"], (fields, error)
        assert snapshot(runtime) == before  # nothing was generated, nothing paid

        # the official client's typed errors carry the same
        sdk = openai_client(server, token)
        with pytest.raises(openai.BadRequestError) as bad:
            await _ask(sdk, tools=[{"type": "function", "function": {"name": "lookup", "parameters": {}}}],
                       tool_choice={"type": "function", "function": {"name": "other"}})
        assert bad.value.param == "tool_choice.function.name" and bad.value.code == "invalid_value"
        with pytest.raises(openai.BadRequestError) as bad:
            await _ask(sdk, top_logprobs=2)
        assert bad.value.param == "top_logprobs"
        with pytest.raises(openai.BadRequestError) as bad:
            await _ask(sdk, extra_body={"top_k": -5})
        assert bad.value.param == "top_k"
        with pytest.raises(openai.BadRequestError) as bad:
            await _ask(sdk, extra_body={"mirostat": 2})
        assert bad.value.param == "mirostat" and bad.value.code == "unknown_parameter"
        assert snapshot(runtime) == before

        # fields that ask for nothing different pass, as does an answer's message sent back as is
        previous = {"role": "assistant", "content": "Hello.", "refusal": None, "tool_calls": None,
                    "function_call": None, "audio": None, "annotations": []}
        ok = await _ask(sdk, [MESSAGE, previous, {"role": "developer", "content": "Be brief."}, MESSAGE],
                        max_tokens=2, user="someone", store=False, metadata={"k": "v"}, tools=[],
                        tool_choice="none", parallel_tool_calls=False, logprobs=False, n=1,
                        presence_penalty=0, frequency_penalty=0, stream=False, service_tier="auto")
        assert ok.choices[0].finish_reason in ("stop", "length")
        assert runtime.store.load_user(user.id).generation_count == 1
        await sdk.close()


async def test_default_client_call(live_server) -> None:
    """What most programs send: the client's defaults only, streamed and not."""
    async with live_server(**ENV) as server:
        _, token = make_user(server.runtime, role="paid")
        sdk = openai_client(server, token)
        reply = await sdk.chat.completions.create(model="gpt-4o-mini", messages=QUESTION)
        assert _text(reply) and reply.choices[0].finish_reason in ("stop", "length")
        assert reply.usage.prompt_tokens_details is not None
        stream = await sdk.chat.completions.create(model="gpt-4o-mini", messages=QUESTION, stream=True)
        assert "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
        named = await sdk.chat.completions.create(  # a participant's name, as multi-agent clients send it
            model="gpt-4o-mini", messages=[{**QUESTION[0], "name": "alice_1"}], max_tokens=4)
        assert _text(named)
        await sdk.close()


# --- a generation the server stopped --------------------------------------------------------------


async def _running_generation(runtime):
    """The generation in a slot, once it has produced a token: polled (no timing asserted), as the
    engine signals a generation's end but not its first token."""
    with trio.fail_after(60):
        while True:
            for worker in runtime.engine.get()._workers:
                for slot in worker.slots:
                    gen = slot.gen
                    if gen is not None and gen.metrics.generated_tokens >= 1:
                        return gen
            await trio.sleep(0.01)


async def test_a_generation_stopped_by_the_server_is_an_error_not_stop(live_server) -> None:
    async with live_server(**ENV) as server:
        runtime = server.runtime
        user, token = make_user(runtime, role="paid")
        sdk = openai_client(server, token)
        long = {"max_tokens": 400, "extra_body": {"grammar": LONG_GRAMMAR}}

        # streamed: content, then an `error` event (the client raises it), and no finish reason
        stream = await _ask(sdk, **long, stream=True)
        chunks = []
        with pytest.raises(openai.APIError) as failed:
            async for chunk in stream:
                chunks.append(chunk)
                if len(chunks) == 2:  # role, first piece: the generation is running
                    (await _running_generation(runtime)).cancel()
        assert failed.value.code == "generation_cancelled" and failed.value.type == "server_error"
        assert "".join(c.choices[0].delta.content or "" for c in chunks)
        assert not any(c.choices[0].finish_reason for c in chunks)

        # not streamed: an error answer instead of a shorter reply
        outcome: dict[str, Any] = {}

        async def ask() -> None:
            with pytest.raises(openai.APIStatusError) as caught:
                await _ask(sdk, **long)
            outcome["error"] = caught.value

        async with trio.open_nursery() as nursery:
            nursery.start_soon(ask)
            (await _running_generation(runtime)).cancel()
        assert outcome["error"].status_code == 503 and outcome["error"].code == "generation_cancelled"
        await sdk.close()


# --- remote mode: the fields go on to the worker --------------------------------------------------


def test_remote_request_body_carries_the_fields() -> None:
    settings = load_settings(environ={"KTULHU_WORKERS": "http://127.0.0.1:9|slots=1", "JWT_SECRET": "s" * 40},
                             root=REPO)
    engine = RemoteEngine(settings)
    response_format = {"type": "json_schema", "json_schema": {"name": "cat", "schema": CAT_SCHEMA}}
    chat = parse_request({"messages": [MESSAGE], "top_k": 3, "min_p": 0.1, "repeat_penalty": 1.2, "seed": 9,
                          "presence_penalty": 0.5, "frequency_penalty": -0.5, "logit_bias": {"42": -100, "7": 3},
                          "response_format": response_format}, settings, max_chars=1000)
    body = orjson.loads(engine._body(engine.workers[0], chat.messages, chat.params))
    assert body["top_k"] == 3 and body["min_p"] == pytest.approx(0.1) and body["seed"] == 9
    assert body["repeat_penalty"] == pytest.approx(1.2) == body["repetition_penalty"]
    assert body["presence_penalty"] == 0.5 and body["frequency_penalty"] == -0.5
    assert body["logit_bias"] == {"7": 3.0, "42": -100.0}
    assert body["response_format"] == response_format and "grammar" not in body
    plain = parse_request({"messages": [MESSAGE], "grammar": 'root ::= "a"'}, settings, max_chars=1000)
    body = orjson.loads(engine._body(engine.workers[0], plain.messages, plain.params))
    assert body["grammar"] == 'root ::= "a"' and "response_format" not in body and "logit_bias" not in body




async def test_remote_mode_passes_the_fields_on(live_server, llama_worker) -> None:
    env = {**ENV, "KTULHU_WORKERS": f"{llama_worker.url}|slots=1", "LLAMA_CLI_MODEL": "models/not-here.gguf"}
    async with live_server(**env) as server, httpx.AsyncClient(base_url=llama_worker.url, timeout=30) as worker:
        assert server.runtime.engine.get().__class__ is RemoteEngine
        _, token = make_user(server.runtime, role="paid")
        sdk = openai_client(server, token)
        text = _text(await _ask(sdk))
        first = (await worker.post("/tokenize", json={"content": text})).json()["tokens"][0]
        banned = _text(await _ask(sdk, logit_bias={str(first): -100}))
        assert (await worker.post("/tokenize", json={"content": banned})).json()["tokens"][0] != first, banned
        assert _text(await _ask(sdk, presence_penalty=2, frequency_penalty=2)) != text
        assert _text(await _ask(sdk, temperature=1.5, seed=3, extra_body={"top_k": 1})) == text
        cat = await _ask(sdk, CAT, max_tokens=32, response_format=CAT_FORMAT)
        _assert_cat(_text(cat))
        await sdk.close()


# --- the body checker, property-based -------------------------------------------------------------

_SETTINGS = load_settings(environ={"JWT_SECRET": "s" * 40}, root=REPO)
_json = JSON_VALUES
_schema = st.recursive(
    st.fixed_dictionaries({}, optional={
        "type": st.sampled_from(["string", "integer", "number", "boolean", "null", "object", "array"]) | _json,
        "maxLength": st.integers(-5, 50) | _json, "minLength": st.integers(0, 10**10),
        "pattern": st.sampled_from(["^a+$", "[0-9]{2,4}", "(", "a{99999}", "^(ab|c)*$"]) | st.text(max_size=10),
        "enum": st.lists(_json, max_size=3), "format": st.sampled_from(["date", "uuid", "email", "x"]),
        "minimum": st.integers(-10**6, 10**6), "maximum": st.integers(-10**6, 10**6) | _json}),
    lambda inner: st.fixed_dictionaries({"type": st.just("object")}, optional={
        "properties": st.dictionaries(st.text(max_size=6), inner, max_size=3),
        "required": st.lists(st.text(max_size=6), max_size=3) | _json,
        "additionalProperties": st.booleans() | inner}) | st.fixed_dictionaries(
        {"type": st.just("array"), "items": inner}, optional={"minItems": st.integers(0, 5),
                                                              "maxItems": st.integers(0, 70000)})
    | st.fixed_dictionaries({"anyOf": st.lists(inner, max_size=3)}) | st.just({"$ref": "#/definitions/x"}),
    max_leaves=6)
_response_formats = st.integers(0, 9).flatmap(lambda i: (
    _json if i == 0 else
    st.fixed_dictionaries({"type": st.sampled_from(["text", "json_object", "json_schema", "yaml"])}) if i < 3 else
    st.fixed_dictionaries({"type": st.just("json_schema"), "json_schema": st.fixed_dictionaries(
        {"name": st.just("s")}, optional={"schema": _json if i == 3 else _schema, "strict": st.booleans()})})))
_FIELD_VALUES = {
    "temperature": st.floats(-1, 3) | _json, "top_p": st.floats(-0.5, 1.5) | _json,
    "top_k": st.integers(-10, 2_000_000) | _json, "min_p": st.floats(-1, 2) | _json,
    "repeat_penalty": st.floats(-1, 12) | _json, "presence_penalty": st.floats(-3, 3) | _json,
    "frequency_penalty": st.floats(-3, 3) | _json,
    "logit_bias": st.dictionaries(st.text(max_size=6) | st.integers(-5, 60_000).map(str),
                                  st.floats(-200, 200) | st.integers(-200, 200) | _json, max_size=4) | _json,
    "max_tokens": st.integers(-2, 5_000_000) | _json, "max_completion_tokens": st.integers(-2, 10) | _json,
    "stop": _json, "seed": st.integers(-5, 2**33) | _json, "stream": st.booleans() | _json,
    "stream_options": st.fixed_dictionaries({}, optional={"include_usage": _json, "x": _json}) | _json,
    "n": st.integers(0, 3) | _json, "grammar": st.sampled_from(['root ::= "a"', "(", ""]) | _json,
    "response_format": _response_formats, "user": _json, "store": _json, "metadata": _json,
    "service_tier": st.sampled_from(["auto", "flex"]) | _json, "tools": st.lists(_json, max_size=2) | _json,
    "tool_choice": st.sampled_from(["none", "auto", "required"]) | _json, "parallel_tool_calls": _json,
    "functions": _json, "function_call": _json, "logprobs": st.booleans() | _json,
    "top_logprobs": st.integers(0, 3) | _json, "model": st.text(max_size=8) | _json, "unknown_field": _json,
}
_message = st.fixed_dictionaries({"role": st.sampled_from(["system", "user", "assistant", "developer"]),
                                  "content": st.text(max_size=20)})
_odd_message = st.fixed_dictionaries({"role": st.sampled_from(["system", "user", "assistant", "tool", "function"]),
                                      "content": st.text(max_size=20) | _json},
                                     optional={"name": _json, "tool_calls": _json, "refusal": _json})
_messages = st.integers(0, 9).flatmap(lambda i: _json if i == 0 else st.lists(
    _odd_message if i == 1 else _message, max_size=3).map(lambda m: [*m, {"role": "user", "content": "hi"}]))
#: A few fields at a time, so that most bodies get past the first check to the later ones.
_fields = st.lists(st.sampled_from(sorted(_FIELD_VALUES)).flatmap(lambda name: st.tuples(st.just(name),
                                                                                        _FIELD_VALUES[name])),
                   max_size=4)
_bodies = st.builds(lambda messages, fields: {"messages": messages, **dict(fields)},
                    _messages, _fields)


@hsettings(max_examples=1000, deadline=None)
@given(_bodies, st.sampled_from([None, 49152]))
def test_any_body_is_parsed_or_refused_naming_a_field(body: dict[str, Any], n_vocab: int | None) -> None:
    try:
        chat = parse_request(body, _SETTINGS, max_chars=10_000, n_vocab=n_vocab)
    except Problem as problem:
        assert problem.status in (400, 413, 422) and problem.message, problem
        assert problem.param and problem.param.split(".")[0].split("[")[0] in body, (problem.param, body)
        return
    assert isinstance(chat, ChatRequest) and isinstance(chat.params, SamplingParams)
    attrs.validate(chat.params)
    assert all(isinstance(m, ChatMessage) for m in chat.messages) and chat.messages[-1].role == "user"
    params = chat.params
    assert all(0 <= token < (n_vocab or 2**31) and -100 <= bias <= 100 for token, bias in params.logit_bias)
    assert (params.response_format is None) or params.grammar is not None
