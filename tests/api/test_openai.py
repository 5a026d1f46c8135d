"""The OpenAI-compatible API, driven by the official `openai` package and by raw HTTP: completions,
SSE streaming, errors in OpenAI's format, grammars, quotas, and cancellation on disconnect."""

from __future__ import annotations

import json
import logging

import httpx
import openai
import pytest
import trio
from hypothesis import given, settings as hsettings, strategies as st
from prometheus_client import REGISTRY

from ktulhu.api.problems import Problem
from ktulhu.http.openai import parse_messages, parse_stop

from api.helpers import openai_client
from auth.helpers import bearer, client, make_user, snapshot

pytestmark = pytest.mark.model

ENV = {"LLAMA_CLI_MAX_TOKENS": "16", "KTULHU_LOGIN_RATE": "0", "KTULHU_FREE_GENERATIONS": "3"}
#: Forces exactly 300 characters: the reply can neither end early nor stop on its own.
LONG_GRAMMAR = 'root ::= [a-z]{300}'



async def test_official_client(live_server) -> None:
    async with live_server(**ENV) as server:
        runtime = server.runtime
        user, token = make_user(runtime, role="paid")
        async with client(server) as http:
            key = (await http.post("/external/api/keys", headers=bearer(token), json={"name": "sdk"})).json()["key"]
        sdk = openai_client(server, key)
        models = await sdk.models.list()
        name = runtime.settings.model_file.stem
        assert [m.id for m in models.data] == [name]
        assert (await sdk.models.retrieve(name)).id == name

        completion = await sdk.chat.completions.create(
            model="anything", messages=[{"role": "system", "content": "You are brief."},
                                        {"role": "user", "content": "Say hi."}],
            temperature=0, max_tokens=8, seed=7, stop=["\n\n"])
        assert completion.object == "chat.completion" and completion.model == name
        choice = completion.choices[0]
        assert choice.message.role == "assistant" and choice.message.content
        assert choice.finish_reason in ("stop", "length")
        assert completion.usage.completion_tokens >= 1
        assert completion.usage.total_tokens == completion.usage.prompt_tokens + completion.usage.completion_tokens
        # temperature 0 is deterministic: the same answer again
        again = await sdk.chat.completions.create(
            model=name, messages=[{"role": "system", "content": "You are brief."}, {"role": "user", "content": "Say hi."}],
            temperature=0, max_tokens=8, seed=7, stop=["\n\n"])
        assert again.choices[0].message.content == choice.message.content

        # streaming: role first, content deltas, a finish reason, usage on request
        stream = await sdk.chat.completions.create(
            model=name, messages=[{"role": "user", "content": [{"type": "text", "text": "Count to five."}]}],
            temperature=0, max_tokens=8, stream=True, stream_options={"include_usage": True})
        chunks = [chunk async for chunk in stream]
        assert chunks[0].choices[0].delta.role == "assistant"
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
        assert text and finishes in (["stop"], ["length"])
        assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens >= 1

        # a grammar (llama-server's extension) constrains the reply
        constrained = await sdk.chat.completions.create(
            model=name, messages=[{"role": "user", "content": "Is the sky blue?"}], max_tokens=8,
            extra_body={"grammar": 'root ::= "yes" | "no"'})
        assert constrained.choices[0].message.content in ("yes", "no")

        # errors arrive as the SDK's typed exceptions
        with pytest.raises(openai.AuthenticationError):
            await openai_client(server, "ktk_" + "0" * 32 + "_" + "A" * 43).models.list()
        with pytest.raises(openai.BadRequestError) as bad:
            await sdk.chat.completions.create(model=name, messages=[{"role": "wizard", "content": "x"}])
        assert bad.value.body["param"] == "messages[0].role"
        with pytest.raises(openai.BadRequestError) as bad:
            await sdk.chat.completions.create(model=name, messages=[{"role": "user", "content": "x"}],
                                              extra_body={"grammar": "root ::= undefined_rule"})
        assert "grammar" in bad.value.message
        with pytest.raises(openai.NotFoundError):
            await sdk.models.retrieve("gpt-4")
        await sdk.close()


async def test_raw_http_errors_and_quota(live_server) -> None:
    async with live_server(**ENV) as server:
        runtime = server.runtime
        user, token = make_user(runtime)
        before = snapshot(runtime)
        async with client(server) as http:
            cases = [
                ({"Content-Type": "text/plain"}, b'{"messages": []}', 415, None),
                ({}, b'{"messages": [', 400, None),
                ({}, b'[]', 422, None),
                ({}, b'{}', 422, "messages"),
                ({}, b'{"messages": "hi"}', 422, "messages"),
                ({}, b'{"messages": []}', 400, "messages"),
                ({}, b'{"messages": [1]}', 400, "messages[0]"),
                ({}, b'{"messages": [{"role": "user", "content": 5}]}', 400, "messages[0].content"),
                ({}, b'{"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}', 400, "messages[0].content"),
                ({}, b'{"messages": [{"role": "assistant", "content": "x"}]}', 400, "messages"),
                ({}, b'{"messages": [{"role": "user", "content": "x"}], "temperature": 3}', 400, "temperature"),
                ({}, b'{"messages": [{"role": "user", "content": "x"}], "temperature": "hot"}', 422, "temperature"),
                ({}, b'{"messages": [{"role": "user", "content": "x"}], "top_p": 1.5}', 400, "top_p"),
                ({}, b'{"messages": [{"role": "user", "content": "x"}], "max_tokens": 0}', 400, "max_tokens"),
                ({}, b'{"messages": [{"role": "user", "content": "x"}], "stop": [1]}', 400, "stop"),
                ({}, b'{"messages": [{"role": "user", "content": "x"}], "stop": ["a","b","c","d","e"]}', 400, "stop"),
                ({}, b'{"messages": [{"role": "user", "content": "x"}], "seed": -5}', 400, "seed"),
                ({}, b'{"messages": [{"role": "user", "content": "x"}], "n": 2}', 400, "n"),
                ({}, b'{"messages": [{"role": "user", "content": "x"}], "stream": "no"}', 422, "stream"),
                ({}, b'{"messages": [{"role": "user", "content": "x"}], "grammar": "root ::= ("}', 400, None),
                ({}, b'{"messages": [{"role": "user", "content": "' + b"x" * (5 << 20) + b'"}]}', 413, None),
            ]
            for headers, raw, status, param in cases:
                r = await http.post("/v1/chat/completions", content=raw,
                                    headers={"Content-Type": "application/json", **headers, **bearer(token)})
                assert r.status_code == status, (raw[:80], r.status_code, r.text[:300])
                error = r.json()["error"]
                assert set(error) == {"message", "type", "param", "code"} and error["message"] and error["type"]
                if param is not None:
                    assert error["param"] == param, (raw[:80], error)
            assert snapshot(runtime) == before
            # the free quota is shared with /external/api and answered as OpenAI's insufficient_quota
            ok = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
            for _ in range(3):
                assert (await http.post("/v1/chat/completions", json=ok, headers=bearer(token))).status_code == 200
            r = await http.post("/v1/chat/completions", json=ok, headers=bearer(token))
            assert r.status_code == 429 and r.json()["error"]["code"] == "insufficient_quota"
            assert runtime.store.load_user(user.id).generation_count == 3
            r = await http.post("/external/api/generate", json={"prompt": "hi"}, headers=bearer(token))
            assert r.status_code == 403


async def _open_stream_and_leave(server, path: str, headers: dict, payload: dict, events: int) -> list[bytes]:
    """Read `events` SSE events of a streaming answer, then drop the connection."""
    got: list[bytes] = []
    async with httpx.AsyncClient(base_url=server.url, timeout=60) as http:
        async with http.stream("POST", path, json=payload, headers=headers) as response:
            assert response.status_code == 200
            async for line in response.aiter_lines():
                if line.startswith("data: "):
                    got.append(line.encode())
                    if len(got) >= events:
                        break
    return got


async def _idle_within(runtime, seconds: float) -> None:
    """Until no generation is queued or running. A generation is counted by reason as it ends, on
    the trio thread, after its slot is freed and before the engine can be idle."""
    with trio.fail_after(seconds):
        await runtime.engine.get().wait_idle()


def _cancelled_count() -> float:
    return REGISTRY.get_sample_value("ktulhu_engine_generations_total", {"reason": "cancelled"}) or 0.0


async def test_client_disconnect_cancels_generation(live_server, caplog) -> None:
    caplog.set_level(logging.ERROR, logger="ktulhu")

    async with live_server(**ENV) as server:
        runtime = server.runtime
        user, token = make_user(runtime, role="paid")
        payload = {"messages": [{"role": "user", "content": "Write letters."}], "max_tokens": 400, "stream": True,
                   "grammar": LONG_GRAMMAR}
        before = _cancelled_count()
        got = await _open_stream_and_leave(server, "/v1/chat/completions", bearer(token), payload, events=4)
        assert len(got) == 4 and b"[DONE]" not in got[-1]
        # the 300-character reply was still running when we left; its slot is freed promptly
        # the 400-token reply was still running when we left: it ends cancelled and frees its slot
        await _idle_within(runtime, 5)
        assert _cancelled_count() == before + 1
        # the external API's stream as well
        free, free_token = make_user(runtime)
        got = await _open_stream_and_leave(
            server, "/external/api/generate", bearer(free_token),
            {"prompt": "Count from 1 to 500, separated by commas.", "stream": True, "max_tokens": 400,
             "temperature": 0}, events=4)
        assert json.loads(got[0][6:])["user_id"] == free.id
        await _idle_within(runtime, 5)
        assert _cancelled_count() == before + 2
        # a reply that reached the caller counts against the quota
        assert runtime.store.load_user(free.id).generation_count == 1
    errors = [(r.name, r.getMessage(), r.exc_text) for r in caplog.records if r.levelno >= logging.ERROR]
    assert not errors, errors


async def test_quota_race_is_exact(live_server) -> None:
    async with live_server(**{**ENV, "KTULHU_FREE_GENERATIONS": "7"}) as server:
        runtime = server.runtime
        user, token = make_user(runtime)
        statuses: list[int] = []
        async with httpx.AsyncClient(base_url=server.url, timeout=120,
                                     limits=httpx.Limits(max_connections=100)) as http:

            async def one(i: int) -> None:
                path, payload = (("/external/api/generate", {"prompt": f"hi {i}", "max_tokens": 1}) if i % 2 else
                                 ("/v1/chat/completions", {"messages": [{"role": "user", "content": f"hi {i}"}],
                                                           "max_tokens": 1}))
                r = await http.post(path, json=payload, headers=bearer(token))
                statuses.append(r.status_code)

            async with trio.open_nursery() as nursery:
                for i in range(100):
                    nursery.start_soon(one, i)
        assert statuses.count(200) == 7, sorted(statuses)
        assert sorted(set(statuses) - {200}) <= [403, 429] and len(statuses) == 100
        assert runtime.store.load_user(user.id).generation_count == 7


# --- request parsing, property-based ---------------------------------------------------------------

_json = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
                     lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
                     max_leaves=12)
_message = st.fixed_dictionaries({"role": st.sampled_from(["system", "user", "assistant", "developer", "tool", ""]) | _json,
                                  "content": st.text(max_size=40) | _json})


@hsettings(max_examples=300, deadline=None)
@given(st.lists(_message | _json, max_size=6))
def test_parse_messages_accepts_or_names_the_problem(raw) -> None:
    try:
        messages = parse_messages(raw, 10_000)
    except Problem as problem:
        assert 400 <= problem.status < 500 and problem.param and problem.message
        return
    assert messages and messages[-1].role != "assistant"
    assert all(m.role in ("system", "user", "assistant") and isinstance(m.content, str) for m in messages)


@hsettings(max_examples=200, deadline=None)
@given(_json)
def test_parse_stop_accepts_or_names_the_problem(value) -> None:
    try:
        stops = parse_stop(value)
    except Problem as problem:
        assert problem.status == 400 and problem.param == "stop"
        return
    assert isinstance(stops, tuple) and all(isinstance(s, str) and s for s in stops) and len(stops) <= 4


async def test_busy_engine_refunds_the_reservation(live_server) -> None:
    env = {**ENV, "KTULHU_FREE_GENERATIONS": "5", "KTULHU_SLOTS": "1", "LLAMA_CLI_CTX_POOL": "1", "KTULHU_QUEUE": "1"}
    async with live_server(**env) as server:
        runtime = server.runtime
        user, token = make_user(runtime)
        long = {"messages": [{"role": "user", "content": "Write letters."}], "max_tokens": 400, "stream": True,
                "grammar": LONG_GRAMMAR}
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as http:
            async with http.stream("POST", "/v1/chat/completions", json=long, headers=bearer(token)) as first, \
                    http.stream("POST", "/v1/chat/completions", json=long, headers=bearer(token)) as second, \
                    http.stream("POST", "/external/api/generate", headers=bearer(token),
                                json={"prompt": "Write a long story.", "stream": True, "max_tokens": 400}) as third:
                # all three are admitted: one decoding, one taken by the feeder for the next free slot,
                # one in the admission queue (of one)
                assert first.status_code == second.status_code == third.status_code == 200
                r = await http.post("/v1/chat/completions", headers=bearer(token),
                                    json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
                assert r.status_code == 503 and r.json()["error"]["code"] == "server_busy"
                assert r.headers["Retry-After"] == "1"
                r = await http.post("/external/api/generate", headers=bearer(token), json={"prompt": "hi"})
                assert r.status_code == 503 and r.json()["error"] == "server_busy"
                # the two refused requests were refunded; the three admitted ones are paid for
                assert runtime.store.load_user(user.id).generation_count == 3
        await _idle_within(runtime, 5)
