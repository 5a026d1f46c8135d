"""The router service: off-thread classification, micro-batching, timeouts and failures."""

from __future__ import annotations

import threading
import time

import trio
import trio.testing

from ktulhu.router.labels import HEADS, Head, HeadSet
from ktulhu.router.service import Router


class FakeModel:
    """Stands in for IntentModel: answers ASKING/technical/INFO, records its batches."""

    heads = {name: HEADS[name] for name in ("speech_act", "domain", "expectation", "support")}
    device = "cpu"
    max_length = 64

    def __init__(self, *, delay: float = 0.0, error: Exception | None = None, gate: threading.Event | None = None):
        self.delay, self.error, self.gate = delay, error, gate
        self.batches: list[list[str]] = []

    def predict(self, texts):
        self.batches.append(list(texts))
        if self.gate is not None:
            self.gate.wait(5)
        if self.delay:
            time.sleep(self.delay)
        if self.error is not None:
            raise self.error
        return [HeadSet(Head("ASKING", 0.9), Head("technical", 0.8), Head("INFO", 0.7), None,
                        Head("NO_SUPPORT", 0.95)) for _ in texts]


async def test_classify_without_batcher():
    model = FakeModel()
    router = Router(model=model)
    result = await router.classify("what is TCP?", "ru-RU")
    assert result.prompt_key == "reasoning"
    assert result.routing_path == "TaskLayer"
    assert result.language == "ru"
    assert model.batches == [["what is TCP?"]]


async def test_empty_input_skips_the_model():
    model = FakeModel()
    result = await Router(model=model).classify("   ", "es")
    assert result.routing_path == "EmptyInput" and result.language == "es"
    assert model.batches == []


async def test_without_model_every_message_gets_the_default_in_its_language():
    router = Router.unavailable("no router model at models/intent_router")
    result = await router.classify("hola, ¿qué tal?", "es-ES")
    assert result.prompt_key == "chat_casual"
    assert result.language == "es"
    assert result.notes[0] == "default routing result"
    assert "router unavailable" in result.notes[1]


async def test_timeout_yields_default_with_hinted_language():
    gate = threading.Event()
    router = Router(model=FakeModel(gate=gate), timeout=0.2)
    started = trio.current_time()
    try:
        result = await router.classify("what is TCP?", "pt-BR")
    finally:
        gate.set()
    assert trio.current_time() - started < 2.0
    assert result.language == "pt"
    assert result.prompt_key == "chat_casual"
    assert result.notes == ("default routing result", "router timed out after 0.2 s")
    assert router.statistics().timeouts == 1


async def test_timeout_with_batcher_does_not_block_other_work():
    gate = threading.Event()
    router = Router(model=FakeModel(gate=gate), timeout=0.3)
    ticks = 0

    async def ticker():
        nonlocal ticks
        while True:
            ticks += 1
            await trio.sleep(0.01)

    async with trio.open_nursery() as nursery:
        await nursery.start(router.run)
        nursery.start_soon(ticker)
        result = await router.classify("what is TCP?", "ru")
        gate.set()
        nursery.cancel_scope.cancel()
    assert result.language == "ru" and "timed out" in result.notes[1]
    assert ticks >= 10


async def test_failure_yields_default():
    router = Router(model=FakeModel(error=RuntimeError("onnx exploded")))
    result = await router.classify("what is TCP?", "en")
    assert result.prompt_key == "chat_casual"
    assert result.notes[1] == "router failed: RuntimeError"
    assert router.statistics().failures == 1


async def test_concurrent_requests_are_batched():
    gate = threading.Event()
    model = FakeModel(gate=gate)
    router = Router(model=model, limiter=trio.CapacityLimiter(1), max_batch=8)
    results = {}

    async def one(i):
        results[i] = await router.classify(f"question {i}?", "en")

    async with trio.open_nursery() as nursery:
        await nursery.start(router.run)
        async with trio.open_nursery() as callers:
            for i in range(20):
                callers.start_soon(one, i)
            await trio.sleep(0.2)  # first batch is stuck on the gate; the rest queue up
            gate.set()
        nursery.cancel_scope.cancel()
    assert len(results) == 20 and all(r.prompt_key == "reasoning" for r in results.values())
    sizes = [len(b) for b in model.batches]
    assert sum(sizes) == 20
    assert max(sizes) == 8  # capped by max_batch
    assert len(model.batches) < 20
    stats = router.statistics()
    assert stats.classified == 20 and stats.max_batch_seen == 8 and stats.queued == 0


async def test_results_match_their_requests():
    class Echo(FakeModel):
        def predict(self, texts):
            self.batches.append(list(texts))
            return [HeadSet(Head("ASKING" if t.endswith("?") else "SHARING", 0.9), Head("general", 0.9),
                            Head("INFO", 0.9), None, Head("NO_SUPPORT", 0.9)) for t in texts]

    router = Router(model=Echo(), max_batch=4)
    out = {}

    async def one(text):
        out[text] = (await router.classify(text, "en")).speech_act.label

    async with trio.open_nursery() as nursery:
        await nursery.start(router.run)
        async with trio.open_nursery() as callers:
            for i in range(12):
                callers.start_soon(one, f"text {i}" + ("?" if i % 2 else ""))
        nursery.cancel_scope.cancel()
    assert all(label == ("ASKING" if text.endswith("?") else "SHARING") for text, label in out.items())


async def test_waiting_callers_fall_back_when_the_batcher_stops():
    gate = threading.Event()
    router = Router(model=FakeModel(gate=gate), limiter=trio.CapacityLimiter(1), timeout=5)
    results = []

    async def one():
        results.append(await router.classify("what is TCP?", "es"))

    try:
        async with trio.open_nursery() as outer:
            async with trio.open_nursery() as batcher:
                await batcher.start(router.run)
                outer.start_soon(one)
                outer.start_soon(one)
                await trio.sleep(0.1)
                batcher.cancel_scope.cancel()
    finally:
        gate.set()
    assert len(results) == 2
    assert all(r.language == "es" and r.prompt_key == "chat_casual" for r in results)


def test_classify_sync():
    router = Router(model=FakeModel())
    assert router.classify_sync("what is TCP?", None).prompt_key == "reasoning"
    assert Router.unavailable("x").classify_sync("hi", "ru").language == "ru"
