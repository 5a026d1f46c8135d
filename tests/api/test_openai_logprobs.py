"""`logprobs` / `top_logprobs` on `/v1/chat/completions`, as OpenAI returns them.

Driven by the official `openai` client over loopback against the real server and model (greedy,
so every reply is deterministic): an entry for every generated token, the sampled token the most
likely one under greedy, the alternatives sorted and counted as asked, the tokens spelling the
reply, streamed chunks carrying the entries of their own tokens; invalid values are 400s naming the
field; requests without `logprobs` unchanged. Also: a llama-server worker in remote mode, a worker
that ignores `logprobs` (a clear error, never a reply silently without them), and the pieces.
"""

from __future__ import annotations

import math
from typing import Any

import httpx
import numpy as np
import openai
import orjson
import pytest
import trio

from ktulhu.engine.prompt import ChatMessage
from ktulhu.engine.remote import RemoteEngine
from ktulhu.engine.request import EngineError, Finished, Generation, RequestMetrics, TokenLogprob
from ktulhu.engine.sampling import SamplingParams, token_logprobs
from ktulhu.settings import load_settings
from tests.paths import REPO

from api.helpers import openai_client
from auth.helpers import bearer, client, make_user

ENV = {"LLAMA_CLI_MAX_TOKENS": "16", "KTULHU_LOGIN_RATE": "0"}
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
MAX_TOKENS = 6



async def _ask(sdk: openai.AsyncOpenAI, **fields: Any):
    fields.setdefault("temperature", 0)
    fields.setdefault("max_tokens", MAX_TOKENS)
    return await sdk.chat.completions.create(model="any", messages=QUESTION, **fields)


def _check_entries(content, text: str, top: int) -> None:
    """Every token has an entry <= 0, the greedy token is the most likely, the alternatives are
    `top` sorted ones, and the tokens spell `text`."""
    assert content, "no logprobs entries"
    for entry in content:
        assert entry.logprob <= 0, entry
        assert entry.token == bytes(entry.bytes).decode("utf-8", "replace")
        assert len(entry.top_logprobs) == top, entry
        values = [alt.logprob for alt in entry.top_logprobs]
        assert values == sorted(values, reverse=True), values
        assert all(v <= 0 for v in values)
        if top:
            # greedy: the sampled token is the argmax of the distribution the logprobs come from
            assert entry.logprob == pytest.approx(values[0], abs=1e-5), entry
            assert entry.top_logprobs[0].bytes == entry.bytes, entry
            total = sum(math.exp(v) for v in values)
            assert 0 < total <= 1 + 1e-4, total
    assert b"".join(bytes(e.bytes) for e in content).decode("utf-8") == text
    assert "".join(e.token for e in content) == text  # no character of this reply spans two tokens


@pytest.mark.model
async def test_logprobs_of_every_token(live_server) -> None:
    async with live_server(**ENV) as server:
        _, token = make_user(server.runtime, role="paid")
        sdk = openai_client(server, token)

        full = await _ask(sdk, logprobs=True, top_logprobs=20)
        text = full.choices[0].message.content
        content = full.choices[0].logprobs.content
        assert full.choices[0].finish_reason == "length"
        assert len(content) == full.usage.completion_tokens == MAX_TOKENS
        _check_entries(content, text, 20)
        assert full.choices[0].logprobs.refusal is None

        # fewer alternatives, or none: the same tokens and log probabilities
        three = await _ask(sdk, logprobs=True, top_logprobs=3)
        assert three.choices[0].message.content == text
        _check_entries(three.choices[0].logprobs.content, text, 3)
        bare = await _ask(sdk, logprobs=True)
        _check_entries(bare.choices[0].logprobs.content, text, 0)
        for a, b, c in zip(content, bare.choices[0].logprobs.content, three.choices[0].logprobs.content, strict=True):
            assert a.bytes == b.bytes == c.bytes and a.logprob == pytest.approx(b.logprob, abs=1e-3)
            assert [t.bytes for t in a.top_logprobs[:3]] == [t.bytes for t in c.top_logprobs]

        # a stop string: the reply ends before it, and so do the entries (its own tokens have none)
        stop = text[len(text) // 2:][:3]
        stopped = await _ask(sdk, logprobs=True, stop=[stop])
        reply = stopped.choices[0].message.content
        assert stopped.choices[0].finish_reason == "stop" and reply == text[:text.find(stop)]
        spelled = b"".join(bytes(e.bytes) for e in stopped.choices[0].logprobs.content)
        assert spelled.startswith(reply.encode()) and stop.encode() not in spelled, (reply, spelled)

        # streamed: each content chunk carries the entries of its own tokens; together the same
        stream = await _ask(sdk, logprobs=True, top_logprobs=3, stream=True)
        streamed = []
        pieces = []
        async for chunk in stream:
            if not chunk.choices:
                continue
            choice = chunk.choices[0]
            if choice.delta.content:
                assert choice.logprobs is not None and choice.logprobs.content, chunk
                assert b"".join(bytes(e.bytes) for e in choice.logprobs.content).decode() == choice.delta.content
                pieces.append(choice.delta.content)
            if choice.logprobs is not None:
                streamed += choice.logprobs.content
        assert "".join(pieces) == text
        _check_entries(streamed, text, 3)
        for a, b in zip(streamed, three.choices[0].logprobs.content, strict=True):
            assert a.bytes == b.bytes and a.logprob == pytest.approx(b.logprob, abs=1e-3)
            assert [t.bytes for t in a.top_logprobs] == [t.bytes for t in b.top_logprobs]

        # without logprobs nothing changes: `logprobs` is null, streamed and not
        plain = await _ask(sdk)
        assert plain.choices[0].message.content == text and plain.choices[0].logprobs is None
        off = await _ask(sdk, logprobs=False)
        assert off.choices[0].logprobs is None
        stream = await _ask(sdk, stream=True)
        assert all([c.choices[0].logprobs is None async for c in stream if c.choices])
        async with client(server) as http:
            body = {"model": "any", "messages": QUESTION, "temperature": 0, "max_tokens": 2}
            raw = (await http.post("/v1/chat/completions", json=body, headers=bearer(token))).json()
            assert "logprobs" in raw["choices"][0] and raw["choices"][0]["logprobs"] is None
        await sdk.close()


@pytest.mark.model
async def test_invalid_logprobs_fields_are_400s_naming_them(live_server) -> None:
    async with live_server(**ENV) as server:
        _, token = make_user(server.runtime, role="paid")
        sdk = openai_client(server, token)
        for fields in ({"logprobs": True, "top_logprobs": 21}, {"logprobs": True, "top_logprobs": -1},
                       {"top_logprobs": 2}, {"logprobs": False, "top_logprobs": 0}):
            with pytest.raises(openai.BadRequestError) as bad:
                await _ask(sdk, **fields)
            assert bad.value.param == "top_logprobs" and "top_logprobs" in bad.value.message, fields
        async with client(server) as http:
            body = {"messages": QUESTION, "max_tokens": 2, "logprobs": "yes"}
            r = await http.post("/v1/chat/completions", json=body, headers=bearer(token))
            assert r.status_code == 422 and r.json()["error"]["param"] == "logprobs"
        await sdk.close()


# --- remote mode ----------------------------------------------------------------------------------




@pytest.mark.model
async def test_remote_mode_relays_the_workers_logprobs(live_server, llama_worker) -> None:
    env = {**ENV, "KTULHU_WORKERS": f"{llama_worker.url}|slots=1", "LLAMA_CLI_MODEL": "models/not-here.gguf"}
    async with live_server(**env) as server:
        assert server.runtime.engine.get().__class__ is RemoteEngine
        _, token = make_user(server.runtime, role="paid")
        sdk = openai_client(server, token)
        for top in (0, 5):
            reply = await _ask(sdk, logprobs=True, top_logprobs=top)
            text = reply.choices[0].message.content
            _check_entries(reply.choices[0].logprobs.content, text, top)
        stream = await _ask(sdk, logprobs=True, top_logprobs=2, stream=True)
        streamed, pieces = [], []
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].logprobs is not None:
                streamed += chunk.choices[0].logprobs.content
            if chunk.choices and chunk.choices[0].delta.content:
                pieces.append(chunk.choices[0].delta.content)
        assert "".join(pieces) == text
        _check_entries(streamed, text, 2)
        assert (await _ask(sdk)).choices[0].logprobs is None
        await sdk.close()


def _sse(*events: object) -> bytes:
    return b"".join(b"data: " + (e if isinstance(e, bytes) else orjson.dumps(e)) + b"\n\n" for e in events)


async def test_a_worker_without_logprobs_ends_in_an_error() -> None:
    """A worker that ignores `logprobs` (it answers text only): an error, not a reply without them."""
    sent: list[dict] = []
    stream = _sse({"choices": [{"delta": {"content": "Paris"}, "finish_reason": None}]},
                  {"choices": [{"delta": {}, "finish_reason": "stop"}]}, b"[DONE]")

    async def worker(request: httpx.Request) -> httpx.Response:
        if request.method == "POST":
            sent.append(orjson.loads(request.content))
            return httpx.Response(200, headers={"content-type": "text/event-stream"}, content=stream)
        return httpx.Response(200, json={"data": [{"id": "fake"}]})

    settings = load_settings(environ={"KTULHU_WORKERS": "http://worker.test:8080|slots=1"}, root=REPO)
    engine = RemoteEngine(settings, transport=httpx.MockTransport(worker))
    async with trio.open_nursery() as nursery:
        await nursery.start(engine.run)
        with trio.fail_after(30):
            gen = await engine.chat([ChatMessage("user", "hi")], SamplingParams(temperature=0, logprobs=0))
            with gen, pytest.raises(EngineError, match="no log probabilities"):
                await gen.text()
            plain = await engine.chat([ChatMessage("user", "hi")], SamplingParams(temperature=0))
            with plain:
                assert await plain.text() == "Paris"
        nursery.cancel_scope.cancel()
    # asked for with at least one alternative: llama-server returns none for `top_logprobs: 0`
    assert sent[0]["logprobs"] is True and sent[0]["top_logprobs"] == 1
    assert "logprobs" not in sent[1] and "top_logprobs" not in sent[1]


# --- the pieces -----------------------------------------------------------------------------------


def test_token_logprobs_is_log_softmax() -> None:
    rng = np.random.default_rng(7)
    logits = rng.normal(0, 4, 5000).astype(np.float32)
    logits[123] = -np.inf  # a banned token
    expected = logits.astype(np.float64) - np.log(np.exp(logits.astype(np.float64)).sum())
    logprob, top = token_logprobs(logits, 42, 20)
    assert logprob == pytest.approx(expected[42], abs=1e-4)
    order = np.argsort(-expected)[:20]
    assert [i for i, _ in top] == list(order)
    assert [lp for _, lp in top] == pytest.approx(list(expected[order]), abs=1e-4)
    assert token_logprobs(logits, 123, 0) == (-math.inf, [])


async def test_each_piece_hands_out_the_entries_of_its_tokens() -> None:
    gen = Generation((1,), SamplingParams(logprobs=1), None, RequestMetrics(0.0, 1))
    a, b, c = TokenLogprob(b"\xc3", -0.5), TokenLogprob(b"\xa9", -0.1), TokenLogprob(b"!", -1.0)
    gen.deliver("", None, [a])  # a token whose text waits for its next byte
    gen.deliver("é", None, [b])
    assert await gen.__anext__() == "é" and gen.take_logprobs() == [a, b]
    assert gen.take_logprobs() == []
    gen.deliver("", Finished("eos", gen.metrics), [c])  # an entry without visible text, at the end
    with pytest.raises(StopAsyncIteration):
        await gen.__anext__()
    assert gen.take_logprobs() == [c]
