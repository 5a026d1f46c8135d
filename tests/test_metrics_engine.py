"""Engine metrics named like vLLM's and llama-server's: prompt tokens, prefix cache queries and hits,
queue and end-to-end latency, finish reasons, decode steps and batch sizes.

Real requests go through the real engine (greedy, a few tokens); every assertion compares counter
deltas read with `REGISTRY.get_sample_value` to the request's own figures, never to durations."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx
import orjson
import pytest
import trio
from prometheus_client import REGISTRY

from ktulhu import metrics
from ktulhu.engine.engine import Engine
from ktulhu.engine.model import Model
from ktulhu.engine.prompt import ChatMessage
from ktulhu.engine.remote import RemoteEngine
from ktulhu.engine.sampling import SamplingParams
from ktulhu.settings import load_settings
from tests.paths import REPO

from auth.helpers import bearer, client, make_user

pytestmark = pytest.mark.model

#: A prompt the default model answers at length: a few tokens always end at max_tokens.
COUNTING = [ChatMessage("system", "You are a helpful assistant."),
            ChatMessage("user", "Count from one to fifty in words, separated by commas.")]
MAX_TOKENS = 5
WAIT_S = 120

#: Every series `docs/admin.md` documents in its vLLM / llama-server table.
DOCUMENTED = (
    "ktulhu_prompt_tokens_total", "ktulhu_engine_generated_tokens_total", "ktulhu_prefix_cache_queries_total",
    "ktulhu_prefix_cache_hits_total", "ktulhu_decode_steps_total", "ktulhu_request_success_total",
    "ktulhu_request_queue_time_seconds_bucket", "ktulhu_engine_ttft_seconds_bucket",
    "ktulhu_e2e_request_latency_seconds_bucket", "ktulhu_engine_inter_token_seconds_bucket",
    "ktulhu_request_prompt_tokens_bucket", "ktulhu_request_generation_tokens_bucket", "ktulhu_batch_size_bucket",
    "ktulhu_prefill_chunk_tokens_bucket", "ktulhu_request_overhead_seconds_bucket",
)

COUNTERS = ("ktulhu_prompt_tokens_total", "ktulhu_prefix_cache_queries_total", "ktulhu_prefix_cache_hits_total",
            "ktulhu_decode_steps_total", "ktulhu_engine_generated_tokens_total")
HISTOGRAMS = ("ktulhu_request_queue_time_seconds", "ktulhu_e2e_request_latency_seconds",
              "ktulhu_request_prompt_tokens", "ktulhu_request_generation_tokens", "ktulhu_batch_size",
              "ktulhu_prefill_chunk_tokens", "ktulhu_engine_ttft_seconds", "ktulhu_request_overhead_seconds")
REASONS = ("stop", "length", "cancelled", "error")


def snapshot() -> dict[str, float]:
    """The process's current values of every series these tests look at."""
    values: dict[str, float] = {}
    for name in COUNTERS:
        values[name] = REGISTRY.get_sample_value(name) or 0.0
    for name in HISTOGRAMS:
        for suffix in ("_count", "_sum"):
            values[name + suffix] = REGISTRY.get_sample_value(name + suffix) or 0.0
    for reason in REASONS:
        values[f"success:{reason}"] = REGISTRY.get_sample_value(
            "ktulhu_request_success_total", {"finished_reason": reason}) or 0.0
    return values


def delta(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    return {name: after[name] - before[name] for name in after}


@pytest.fixture(scope="module")
def model() -> Model:
    model = Model.load(load_settings(environ={}, root=REPO))
    yield model
    model.close()


@asynccontextmanager
async def local_engine(model: Model) -> AsyncIterator[Engine]:
    """One decode worker with one slot: every request lands in the same cache, one sequence per step."""
    settings = load_settings(environ={"LLAMA_CLI_THREADS": "1", "KTULHU_SLOTS": "1", "KTULHU_ENGINE_WORKERS": "1"},
                             root=REPO)
    engine = Engine(model, settings, events=metrics.ENGINE_EVENTS)  # as the engine service makes it
    async with trio.open_nursery() as nursery:
        await nursery.start(engine.run)
        yield engine
        nursery.cancel_scope.cancel()


async def run_chat(engine: Engine, chat_id: str):
    params = SamplingParams.defaults(engine.settings, max_tokens=MAX_TOKENS, temperature=0.0)
    with trio.fail_after(WAIT_S):
        with await engine.chat(COUNTING, params, chat_id=chat_id) as gen:
            await gen.text()
    assert gen.finished is not None
    return gen.finished


async def test_local_requests_steps_and_prefix_cache(model: Model) -> None:
    async with local_engine(model) as engine:
        # A cold prompt: all of it looked up, none found, all of it prefilled.
        before = snapshot()
        first = await run_chat(engine, "metrics-chat")
        d = delta(before, snapshot())
        m = first.metrics
        assert first.reason == "length" and m.generated_tokens == MAX_TOKENS
        assert m.prompt_tokens > 0 and m.cached_tokens == 0
        assert d["ktulhu_prompt_tokens_total"] == m.prompt_tokens
        assert d["ktulhu_prefix_cache_queries_total"] == m.prompt_tokens
        assert d["ktulhu_prefix_cache_hits_total"] == 0
        assert d["ktulhu_engine_generated_tokens_total"] == MAX_TOKENS
        assert d["success:length"] == 1 and d["success:stop"] == d["success:cancelled"] == d["success:error"] == 0
        for name in ("ktulhu_request_queue_time_seconds", "ktulhu_e2e_request_latency_seconds",
                     "ktulhu_request_prompt_tokens", "ktulhu_request_generation_tokens", "ktulhu_engine_ttft_seconds"):
            assert d[name + "_count"] == 1, name
        assert d["ktulhu_request_prompt_tokens_sum"] == m.prompt_tokens
        assert d["ktulhu_request_generation_tokens_sum"] == MAX_TOKENS
        # One sequence: every step samples at most one token, every step holds exactly one sequence.
        steps = d["ktulhu_decode_steps_total"]
        assert steps >= MAX_TOKENS
        assert d["ktulhu_batch_size_count"] == steps and d["ktulhu_batch_size_sum"] == steps
        assert d["ktulhu_prefill_chunk_tokens_sum"] == m.prompt_tokens
        assert d["ktulhu_prefill_chunk_tokens_count"] >= 1

        # The same prompt again: all but its last token comes from the slot's cache.
        before = snapshot()
        again = await run_chat(engine, "metrics-chat")
        d = delta(before, snapshot())
        m2 = again.metrics
        assert m2.prompt_tokens == m.prompt_tokens and m2.cached_tokens == m.prompt_tokens - 1
        assert d["ktulhu_prompt_tokens_total"] == m2.prompt_tokens
        assert d["ktulhu_prefix_cache_queries_total"] == m2.prompt_tokens
        assert d["ktulhu_prefix_cache_hits_total"] == m2.cached_tokens
        assert d["ktulhu_prefill_chunk_tokens_sum"] == 1 and d["ktulhu_prefill_chunk_tokens_count"] == 1
        assert d["ktulhu_batch_size_count"] == d["ktulhu_batch_size_sum"] == d["ktulhu_decode_steps_total"]
        assert d["ktulhu_decode_steps_total"] >= MAX_TOKENS and d["success:length"] == 1

        # Cancelled before it reached a slot: counted as cancelled and in e2e, never as prompt or queue.
        before = snapshot()
        params = SamplingParams.defaults(engine.settings, max_tokens=MAX_TOKENS, temperature=0.0)
        prompt = await engine.build_prompt(COUNTING, MAX_TOKENS)
        gen = engine.generate(prompt.tokens, params)
        gen.cancel()  # no checkpoint since `generate`: the feeder has not taken it yet
        with trio.fail_after(WAIT_S):
            await gen.text()
        d = delta(before, snapshot())
        assert gen.finished is not None and gen.finished.reason == "cancelled"
        assert d["success:cancelled"] == 1 and d["ktulhu_e2e_request_latency_seconds_count"] == 1
        assert d["ktulhu_prompt_tokens_total"] == d["ktulhu_prefix_cache_queries_total"] == 0
        assert d["ktulhu_request_queue_time_seconds_count"] == 0 and d["ktulhu_decode_steps_total"] == 0


def _sse(*events: object) -> bytes:
    return b"".join(b"data: " + (e if isinstance(e, bytes) else orjson.dumps(e)) + b"\n\n" for e in events)


async def test_remote_requests_use_the_workers_usage() -> None:
    """Remote mode: what the front-end sees (usage, cached tokens, slot wait, finish) feeds the same
    series; decode steps and batch sizes stay the worker's own."""
    stream = _sse(
        {"choices": [{"delta": {"content": "One"}, "finish_reason": None}]},
        {"choices": [{"delta": {"content": ", two"}, "finish_reason": "length"}]},
        {"choices": [], "usage": {"prompt_tokens": 40, "completion_tokens": 2, "total_tokens": 42,
                                  "prompt_tokens_details": {"cached_tokens": 32}}},
        b"[DONE]",
    )

    async def worker(request: httpx.Request) -> httpx.Response:
        if request.method == "POST" and request.url.path == "/v1/chat/completions":
            return httpx.Response(200, headers={"content-type": "text/event-stream"}, content=stream)
        if request.url.path == "/v1/models":
            return httpx.Response(200, json={"data": [{"id": "fake"}]})
        return httpx.Response(200, json={"status": "ok"})

    settings = load_settings(environ={"KTULHU_WORKERS": "http://worker.test:8080|slots=1"}, root=REPO)
    engine = RemoteEngine(settings, transport=httpx.MockTransport(worker), events=metrics.ENGINE_EVENTS)
    async with trio.open_nursery() as nursery:
        await nursery.start(engine.run)
        before = snapshot()
        params = SamplingParams(temperature=0.0, max_tokens=2)
        with trio.fail_after(WAIT_S):
            with await engine.chat(COUNTING, params, chat_id="remote-metrics") as gen:
                assert await gen.text() == "One, two"
        d = delta(before, snapshot())
        nursery.cancel_scope.cancel()
    assert gen.finished is not None and gen.finished.reason == "length"
    assert d["ktulhu_prompt_tokens_total"] == d["ktulhu_prefix_cache_queries_total"] == 40
    assert d["ktulhu_prefix_cache_hits_total"] == 32
    assert d["success:length"] == 1
    assert d["ktulhu_request_queue_time_seconds_count"] == d["ktulhu_e2e_request_latency_seconds_count"] == 1
    assert d["ktulhu_request_prompt_tokens_sum"] == 40 and d["ktulhu_request_generation_tokens_sum"] == 2
    assert d["ktulhu_decode_steps_total"] == d["ktulhu_batch_size_count"] == 0


async def test_openai_usage_matches_metrics_and_names_are_served(live_server) -> None:
    """Through `/v1/chat/completions`: the counters move by the usage the client is shown, and
    `/metrics` serves every documented name."""
    async with live_server(KTULHU_LOGIN_RATE="0", KTULHU_ANON_RATE="0") as server:
        _, token = make_user(server.runtime, role="paid")
        async with client(server) as http:
            key = (await http.post("/external/api/keys", headers=bearer(token), json={"name": "m"})).json()["key"]
            body = {"model": "any", "temperature": 0, "max_tokens": MAX_TOKENS,
                    "messages": [{"role": m.role, "content": m.content} for m in COUNTING]}
            before = snapshot()
            usages = []
            for _ in range(2):  # the same conversation twice: the second finds the first's prompt cached
                response = await http.post("/v1/chat/completions", headers=bearer(key), json=body)
                assert response.status_code == 200, response.text
                reply = response.json()
                assert reply["choices"][0]["finish_reason"] == "length"
                usages.append(reply["usage"])
            d = delta(before, snapshot())
            prompt = sum(u["prompt_tokens"] for u in usages)
            assert d["ktulhu_prompt_tokens_total"] == d["ktulhu_prefix_cache_queries_total"] == prompt
            cached = usages[1]["prompt_tokens_details"]["cached_tokens"]
            assert cached == usages[1]["prompt_tokens"] - 1
            assert d["ktulhu_prefix_cache_hits_total"] == cached
            assert d["ktulhu_engine_generated_tokens_total"] == sum(u["completion_tokens"] for u in usages)
            assert d["success:length"] == 2
            assert d["ktulhu_batch_size_count"] == d["ktulhu_decode_steps_total"] >= 2 * MAX_TOKENS
            # each request's time before the engine (parsing, quota, prompt) was measured once
            assert d["ktulhu_request_overhead_seconds_count"] == 2 and d["ktulhu_request_overhead_seconds_sum"] > 0

            text = (await http.get("/metrics")).text
    for name in DOCUMENTED:
        assert f"\n{name}" in text, name
    for reason in REASONS:
        assert f'ktulhu_request_success_total{{finished_reason="{reason}"}}' in text
