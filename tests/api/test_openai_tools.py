"""OpenAI function calling on `/v1/chat/completions` (`ktulhu.api.tool_calls`).

Driven by the official `openai` client over loopback against the real server and the tiny default
model, greedy (temperature 0), so every reply is deterministic: a forced call comes back as
`tool_calls` whose arguments follow the tool's schema, the call and its result sent back yield a
reply, a stream's deltas add up to the same call, `tool_choice: "none"` is a plain reply, bad tool
declarations are 400s naming the field. Also without the server: the history's rendering, the
reply reader, the remote worker's body, and the tools checker on random input (a `Problem` naming a
field, never anything else).
"""

from __future__ import annotations

import json
from typing import Any

import openai
import orjson
import pytest
from hypothesis import given, settings as hsettings, strategies as st

from ktulhu.api.problems import Problem
from ktulhu.api.tool_calls import ToolPlan, parse_tools
from ktulhu.engine.remote import RemoteEngine
from ktulhu.engine.sampling import check_grammar
from ktulhu.http.openai import parse_request
from ktulhu.settings import load_settings
from tests.paths import REPO

from api.helpers import JSON_VALUES, openai_client
from auth.helpers import bearer, client, make_user, snapshot

ENV = {"LLAMA_CLI_MAX_TOKENS": "16", "KTULHU_LOGIN_RATE": "0"}
_SETTINGS = load_settings(environ={"JWT_SECRET": "s" * 40}, root=REPO)

WEATHER_PARAMETERS = {"type": "object", "additionalProperties": False, "required": ["city"],
                      "properties": {"city": {"type": "string", "maxLength": 20}}}
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "The current weather in a city.",
                                            "parameters": WEATHER_PARAMETERS}}
CLOCK = {"type": "function", "function": {"name": "get_time", "description": "The current time."}}
QUESTION = [{"role": "user", "content": "What is the weather in Paris?"}]
NAMED = {"type": "function", "function": {"name": "get_weather"}}
#: Room for the call's JSON, whatever tokens the model spells it with.
CALL_TOKENS = 160



async def _ask(sdk: openai.AsyncOpenAI, messages: list[dict] = QUESTION, **fields: Any):
    fields.setdefault("temperature", 0)
    fields.setdefault("max_tokens", CALL_TOKENS)
    return await sdk.chat.completions.create(model="any", messages=messages, **fields)


def _assert_weather_call(call) -> dict[str, Any]:
    """A `get_weather` call whose arguments are JSON that its schema accepts; returns them."""
    assert call.type == "function" and call.id.startswith("call_") and len(call.id) > 8, call
    assert call.function.name == "get_weather", call
    arguments = json.loads(call.function.arguments)
    assert isinstance(arguments, dict) and set(arguments) == {"city"}, arguments
    assert isinstance(arguments["city"], str) and len(arguments["city"]) <= 20, arguments
    return arguments


# --- against the server ---------------------------------------------------------------------------

@pytest.mark.model
async def test_a_call_and_its_result_round_trip(live_server) -> None:
    async with live_server(**ENV) as server:
        _, token = make_user(server.runtime, role="paid")
        sdk = openai_client(server, token)
        for choice in ("required", NAMED):
            called = await _ask(sdk, tools=[WEATHER, CLOCK] if choice == NAMED else [WEATHER], tool_choice=choice)
            choice0 = called.choices[0]
            assert choice0.finish_reason == "tool_calls", choice0
            assert choice0.message.content is None and len(choice0.message.tool_calls) == 1, choice0.message
            _assert_weather_call(choice0.message.tool_calls[0])
            assert called.usage.completion_tokens > 0
        again = await _ask(sdk, tools=[WEATHER, CLOCK], tool_choice=NAMED)
        assert again.choices[0].message.tool_calls[0].function == choice0.message.tool_calls[0].function  # greedy

        # the assistant's message sent back as the SDK returned it, then the tool's result
        call = choice0.message.tool_calls[0]
        history = [*QUESTION, choice0.message.model_dump(),
                   {"role": "tool", "tool_call_id": call.id, "content": '{"temperature_c": 21, "sky": "clear"}'}]
        answer = await _ask(sdk, history, tools=[WEATHER], tool_choice="none", max_tokens=24)
        assert answer.choices[0].finish_reason in ("stop", "length")
        assert answer.choices[0].message.content and not answer.choices[0].message.tool_calls

        # under `auto` the model chooses, and either choice comes back well formed
        chosen = await _ask(sdk, history, tools=[WEATHER], max_tokens=48)
        message = chosen.choices[0].message
        if message.tool_calls:
            assert chosen.choices[0].finish_reason == "tool_calls" and message.content is None
            _assert_weather_call(message.tool_calls[0])
        else:
            assert chosen.choices[0].finish_reason in ("stop", "length") and isinstance(message.content, str)
        await sdk.close()


@pytest.mark.model
async def test_a_streamed_call_adds_up_to_the_same_call(live_server) -> None:
    async with live_server(**ENV) as server:
        _, token = make_user(server.runtime, role="paid")
        sdk = openai_client(server, token)
        whole = (await _ask(sdk, tools=[WEATHER], tool_choice=NAMED)).choices[0].message.tool_calls[0]

        stream = await _ask(sdk, tools=[WEATHER], tool_choice=NAMED, stream=True,
                            stream_options={"include_usage": True})
        chunks = [chunk async for chunk in stream]
        finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
        assert finishes == ["tool_calls"] and chunks[-1].usage is not None
        deltas = [d for c in chunks if c.choices for d in (c.choices[0].delta.tool_calls or [])]
        assert deltas and {d.index for d in deltas} == {0} and deltas[0].id and deltas[0].type == "function"
        assert "".join(d.function.arguments or "" for d in deltas) == whole.function.arguments
        assert not "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)

        # the SDK's own accumulator puts the deltas together into the call
        async with sdk.chat.completions.stream(model="any", messages=QUESTION, tools=[WEATHER], tool_choice=NAMED,
                                               temperature=0, max_tokens=CALL_TOKENS) as helper:
            final = await helper.get_final_completion()
        call = final.choices[0].message.tool_calls[0]
        assert final.choices[0].finish_reason == "tool_calls"
        assert (call.function.name, call.function.arguments) == (whole.function.name, whole.function.arguments)
        _assert_weather_call(call)

        # a text reply (`tool_choice: "none"`) streams as content, as always
        plain = await _ask(sdk, tools=[WEATHER], tool_choice="none", max_tokens=8, stream=True)
        text = "".join([c.choices[0].delta.content or "" async for c in plain if c.choices])
        assert text
        await sdk.close()


@pytest.mark.model
async def test_tool_choice_none_is_a_plain_reply(live_server) -> None:
    async with live_server(**ENV) as server:
        _, token = make_user(server.runtime, role="paid")
        sdk = openai_client(server, token)
        plain = await _ask(sdk, max_tokens=12)
        none = await _ask(sdk, tools=[WEATHER], tool_choice="none", max_tokens=12)
        assert none.choices[0].message.content == plain.choices[0].message.content  # nothing rendered, no grammar
        assert not none.choices[0].message.tool_calls and none.choices[0].finish_reason in ("stop", "length")
        await sdk.close()


BAD = [
    ({"tools": [{"type": "function", "function": {"name": "a b"}}]}, "tools[0].function.name"),
    ({"tools": [{"type": "function", "function": {"name": "x" * 65}}]}, "tools[0].function.name"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}, {"type": "function", "function": {"name": "f"}}]},
     "tools[1].function.name"),
    ({"tools": [{"type": "retrieval"}]}, "tools[0].type"),
    ({"tools": [{"type": "function"}]}, "tools[0].function"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": []}}]}, "tools[0].function.parameters"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "string", "minLength": 10**9}}}]},
     "tools[0].function.parameters"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"$ref": "https://x.test/s"}}}]},
     "tools[0].function.parameters"),
    ({"tools": [{"type": "function", "function": {"name": "f", "extra": 1}}]}, "tools[0].function.extra"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}] * 129}, "tools"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
     "tool_choice.function.name"),
    ({"tools": [WEATHER], "tool_choice": "sometimes"}, "tool_choice"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": [WEATHER], "grammar": 'root ::= "a"'}, "grammar"),
    ({"tools": [WEATHER], "response_format": {"type": "json_object"}}, "response_format"),
    ({"tools": [WEATHER], "logprobs": True}, "logprobs"),
    ({"functions": [{"name": "f"}]}, "functions"),
    ({"messages": [{"role": "tool", "content": "42"}]}, "messages[0].tool_call_id"),
    ({"messages": [{"role": "tool", "content": "42", "tool_call_id": "c1", "x": 1}]}, "messages[0].x"),
    ({"messages": [{"role": "function", "name": "f", "content": "42"}]}, "messages[0].role"),
    ({"messages": [{"role": "assistant", "tool_calls": [{"id": "c1", "type": "function"}]}, *QUESTION]},
     "messages[0].tool_calls[0].function"),
    ({"messages": [{"role": "assistant", "tool_calls": [{"id": "c1", "function": {"name": "f", "arguments": {}}}]},
                   *QUESTION]}, "messages[0].tool_calls[0].function.arguments"),
    ({"messages": [{"role": "user", "content": "hi", "tool_calls": [{"id": "c1"}]}]}, "messages[0].tool_calls"),
]


@pytest.mark.model
async def test_bad_tools_are_400s_naming_the_field(live_server) -> None:
    async with live_server(**ENV, KTULHU_FREE_GENERATIONS="1") as server:
        runtime = server.runtime
        _, token = make_user(runtime)
        before = snapshot(runtime)
        async with client(server) as http:
            for fields, param in BAD:
                body = {"messages": QUESTION, "max_tokens": 2, **fields}
                r = await http.post("/v1/chat/completions", json=body, headers=bearer(token))
                assert r.status_code == 400, (param, r.status_code, r.text[:300])
                error = r.json()["error"]
                assert error["param"] == param and error["type"] == "invalid_request_error", (param, error)
        assert snapshot(runtime) == before  # nothing generated, nothing paid
        sdk = openai_client(server, token)
        with pytest.raises(openai.BadRequestError) as bad:
            await _ask(sdk, tools=[WEATHER], tool_choice={"type": "function", "function": {"name": "get_time"}})
        assert bad.value.param == "tool_choice.function.name"
        await sdk.close()




@pytest.mark.model
async def test_remote_mode_calls_tools_the_same_way(live_server, llama_worker) -> None:
    """The worker is sent the reply schema as a `response_format`: it needs no tool support."""
    env = {**ENV, "KTULHU_WORKERS": f"{llama_worker.url}|slots=1", "LLAMA_CLI_MODEL": "models/not-here.gguf"}
    async with live_server(**env) as server:
        assert server.runtime.engine.get().__class__ is RemoteEngine
        _, token = make_user(server.runtime, role="paid")
        sdk = openai_client(server, token)
        called = await _ask(sdk, tools=[WEATHER, CLOCK], tool_choice=NAMED)
        assert called.choices[0].finish_reason == "tool_calls"
        call = called.choices[0].message.tool_calls[0]
        _assert_weather_call(call)
        history = [*QUESTION, called.choices[0].message.model_dump(),
                   {"role": "tool", "tool_call_id": call.id, "content": "21C, clear"}]
        answer = await _ask(sdk, history, tools=[WEATHER], tool_choice="none", max_tokens=16)
        assert answer.choices[0].message.content and answer.choices[0].finish_reason in ("stop", "length")
        await sdk.close()


# --- without the server ---------------------------------------------------------------------------


def test_history_with_calls_and_results_is_rendered_as_text() -> None:
    history = [{"role": "system", "content": "Be brief."}, *QUESTION,
               {"role": "assistant", "content": None, "refusal": None, "tool_calls": [
                   {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'}},
                   {"id": "call_2", "type": "function", "function": {"name": "get_time", "arguments": "not json"}}]},
               {"role": "tool", "tool_call_id": "call_1", "content": "21C"},
               {"role": "tool", "tool_call_id": "call_2", "content": [{"type": "text", "text": "noon"}]}]
    chat = parse_request({"messages": history, "tools": [WEATHER, CLOCK]}, _SETTINGS, max_chars=10_000)
    roles = [m.role for m in chat.messages]
    assert roles == ["system", "user", "assistant", "user"]
    system, _, assistant, results = (m.content for m in chat.messages)
    assert system.startswith("Be brief.\n\n") and '"name": "get_weather"' in system and '"response"' in system
    assert [json.loads(line) for line in assistant.splitlines()] == [
        {"tool_call": {"name": "get_weather", "arguments": {"city": "Paris"}}},
        {"tool_call": {"name": "get_time", "arguments": "not json"}}]
    assert results == "Tool result for call call_1 (get_weather):\n21C\n\nTool result for call call_2 (get_time):\nnoon"
    assert chat.tools is not None and chat.params.grammar == chat.tools.grammar

    # `none`: the history is still read, but no tool is offered and nothing constrains the reply
    plain = parse_request({"messages": history, "tools": [WEATHER], "tool_choice": "none"}, _SETTINGS, max_chars=10_000)
    assert plain.tools is None and plain.params.grammar is None and plain.messages[0].content == "Be brief."


def test_the_reply_is_read_back() -> None:
    plan = parse_tools({"tools": [WEATHER, CLOCK]})
    assert isinstance(plan, ToolPlan) and plan.choice == "auto"
    called = plan.reply('{"tool_call": {"name": "get_weather", "arguments": {"city": "Oslo"}}} ', "stop")
    assert called.finish_reason == "tool_calls" and called.content is None
    assert called.call["function"] == {"name": "get_weather", "arguments": '{"city":"Oslo"}'}
    assert called.message()["tool_calls"] == [called.call]
    assert [d["tool_calls"][0]["function"]["arguments"] for d in called.deltas()] == ["", '{"city":"Oslo"}']
    text = plan.reply('{"response": "Hi \\u00e9"}', "stop")
    assert (text.content, text.call, text.finish_reason) == ("Hi \u00e9", None, "stop")
    assert text.deltas() == [{"content": "Hi \u00e9"}]
    # cut short by max_tokens: what there is, and `length`
    assert plan.reply('{"response": "Hello wor', "length").content == "Hello wor"
    assert plan.reply('{"response": "caf\\u00', "length").content == "caf"
    cut = plan.reply('{"tool_call": {"name": "get_wea', "length")
    assert (cut.content, cut.call, cut.finish_reason) == ('{"tool_call": {"name": "get_wea', None, "length")


def test_the_grammar_offers_what_tool_choice_says() -> None:
    auto = parse_tools({"tools": [WEATHER, CLOCK]})
    required = parse_tools({"tools": [WEATHER, CLOCK], "tool_choice": "required"})
    named = parse_tools({"tools": [WEATHER, CLOCK], "tool_choice": {"type": "function", "function": {"name": "get_time"}}})
    assert '"\\"response\\""' in auto.grammar and "get_time" in auto.grammar
    assert '"\\"response\\""' not in required.grammar and "get_weather" in required.grammar
    assert "get_weather" not in named.grammar and "get_time" in named.grammar
    assert parse_tools({"tools": [WEATHER], "tool_choice": "none"}) is None and parse_tools({"tools": []}) is None
    # a pydantic-style schema with `$defs` keeps its references in the combined schema
    nested = {"type": "function", "function": {"name": "book", "parameters": {
        "type": "object", "properties": {"where": {"$ref": "#/$defs/Place"}}, "required": ["where"],
        "$defs": {"Place": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}}}
    plan = parse_tools({"tools": [WEATHER, nested]})
    check_grammar(plan.grammar)
    assert "t1-Place" in plan.grammar


def test_remote_workers_get_the_reply_schema() -> None:
    settings = load_settings(environ={"KTULHU_WORKERS": "http://127.0.0.1:9|slots=1", "JWT_SECRET": "s" * 40},
                             root=REPO)
    engine = RemoteEngine(settings)
    chat = parse_request({"messages": QUESTION, "tools": [WEATHER], "tool_choice": "required"}, settings,
                         max_chars=1000)
    body = orjson.loads(engine._body(engine.workers[0], chat.messages, chat.params))
    schema = body["response_format"]["json_schema"]["schema"]
    assert body["response_format"]["type"] == "json_schema" and "grammar" not in body
    assert schema["oneOf"][0]["properties"]["tool_call"]["properties"]["arguments"] == WEATHER_PARAMETERS
    assert body["messages"][0]["role"] == "system" and "get_weather" in body["messages"][0]["content"]


_json = JSON_VALUES
_schema = st.recursive(
    st.fixed_dictionaries({}, optional={
        "type": st.sampled_from(["string", "integer", "object", "array"]) | _json,
        "maxLength": st.integers(-5, 50) | _json, "enum": st.lists(_json, max_size=3),
        "$ref": st.sampled_from(["#/$defs/a", "#/definitions/b", "#/properties/x", "#", "https://x.test"]) | _json}),
    lambda inner: st.fixed_dictionaries({"type": st.just("object")}, optional={
        "properties": st.dictionaries(st.text(max_size=6), inner, max_size=3),
        "required": st.lists(st.text(max_size=6), max_size=3) | _json,
        "$defs": st.dictionaries(st.sampled_from(["a", "b", "c"]), inner, max_size=2) | _json,
        "definitions": st.dictionaries(st.sampled_from(["a", "b"]), inner, max_size=2)}),
    max_leaves=6)
_name = st.sampled_from(["get_weather", "f", "a-b_9", "", "a b", "x" * 65, "é"]) | _json
_function = st.fixed_dictionaries({}, optional={
    "name": _name, "description": st.text(max_size=20) | _json, "parameters": _schema | _json,
    "strict": st.booleans() | _json, "other": _json})
_tool = st.fixed_dictionaries({}, optional={"type": st.sampled_from(["function", "code"]) | _json,
                                            "function": _function | _json}) | _json
_choice = (st.sampled_from([None, "none", "auto", "required", "any"])
           | st.fixed_dictionaries({}, optional={"type": st.sampled_from(["function", "x"]) | _json,
                                                 "function": st.fixed_dictionaries({}, optional={"name": _name})
                                                 | _json}) | _json)


@hsettings(max_examples=400, deadline=None)
@given(st.lists(_tool, max_size=3), _choice)
def test_any_tools_are_accepted_or_refused_naming_a_field(tools: list[Any], choice: Any) -> None:
    body = {"tools": tools, "tool_choice": choice}
    if not isinstance(choice, (str, dict, type(None))):
        return  # the body's type check (422) comes first
    try:
        plan = parse_tools(body)
    except Problem as problem:
        assert problem.status == 400 and problem.message, problem
        assert problem.param and problem.param.split(".")[0].split("[")[0] in body, problem.param
        return
    if plan is None:
        assert choice == "none" or not tools
        return
    check_grammar(plan.grammar)
    assert plan.choice in ("auto", "required") or plan.choice in {t.name for t in plan.tools}
    assert json.loads(plan.response_format)["json_schema"]["schema"]["oneOf"]
