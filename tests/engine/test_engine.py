"""The batching engine on real llama.cpp: equivalence, prefix reuse, cancel, admission, stops."""

from __future__ import annotations

import logging
import random

import pytest
import trio
import trio.testing

from ktulhu.engine.engine import Engine
from ktulhu.engine.model import Model
from ktulhu.engine.prompt import ChatMessage, ContextTooLong
from ktulhu.engine.request import Busy, EngineClosed, Generation
from ktulhu.engine.sampling import SamplingParams

GREEDY = SamplingParams(temperature=0.0, max_tokens=24)
QUESTIONS = ["What is the capital of France?", "Write a haiku about the sea.", "Name three colours.",
             "Привет! Как дела?"]


async def run_to_end(gen: Generation) -> tuple[Generation, str]:
    with gen:
        text = await gen.text()
    return gen, text


async def chat(engine: Engine, messages: list[ChatMessage], params: SamplingParams = GREEDY,
               chat_id: str | None = None) -> tuple[Generation, str]:
    return await run_to_end(await engine.chat(messages, params, chat_id=chat_id))


async def test_batched_greedy_equals_single_sequence(smol_model: Model, running_engine) -> None:
    async with running_engine(smol_model, KTULHU_SLOTS="1") as single:
        alone = [(await chat(single, [ChatMessage("user", q)]))[1] for q in QUESTIONS]
    together: dict[int, str] = {}
    async with running_engine(smol_model, KTULHU_SLOTS="4") as batched:

        async def one(i: int) -> None:
            together[i] = (await chat(batched, [ChatMessage("user", QUESTIONS[i])]))[1]

        async with trio.open_nursery() as nursery:
            for i in range(len(QUESTIONS)):
                nursery.start_soon(one, i)
        steps = batched.stats().workers[0].steps
    assert [together[i] for i in range(len(QUESTIONS))] == alone
    assert all(alone) and len(set(alone)) == len(alone)
    assert steps < 24 * len(QUESTIONS) // 2  # the sequences really shared steps


async def test_follow_up_turn_prefills_only_the_new_tokens(smol_model: Model, running_engine) -> None:
    turn1 = [ChatMessage("user", "Tell me about cats.")]
    async with running_engine(smol_model, KTULHU_SLOTS="2") as engine:
        first, answer = await chat(engine, turn1, chat_id="chat-1")
        await chat(engine, [ChatMessage("user", "Unrelated: what is 2+2?")], chat_id="chat-2")
        turn2 = [*turn1, ChatMessage("assistant", answer), ChatMessage("user", "And dogs?")]
        warm, _ = await chat(engine, turn2, chat_id="chat-1")
    # everything up to the reply (the previous prompt and the reply's tokens) came from the cache
    assert warm.metrics.cached_tokens >= first.metrics.prompt_tokens + first.metrics.generated_tokens // 2
    assert warm.metrics.prompt_tokens - warm.metrics.cached_tokens < 20


async def test_prefix_reuse_gives_the_same_tokens_as_a_cold_prefill(smol_model: Model, running_engine) -> None:
    """Greedy output after a reused prefix equals the output after prefilling everything.

    Both prefixes are computed by prefill (the first request samples one token, which is never
    decoded), each prompt in one chunk (a long step target), so the comparison is exact: llama.cpp's
    CPU kernels round differently for other batch shapes.
    """
    turn1 = [ChatMessage("user", "Tell me about cats.")]
    turn2 = [*turn1, ChatMessage("assistant", "Cats are small carnivores."), ChatMessage("user", "And dogs?")]
    one_chunk = {"KTULHU_SLOTS": "2", "KTULHU_STEP_TARGET_MS": "10000"}
    async with running_engine(smol_model, **one_chunk) as engine:
        await chat(engine, turn1, SamplingParams(temperature=0.0, max_tokens=1), chat_id="c")
        warm, warm_text = await chat(engine, turn2, chat_id="c")
    async with running_engine(smol_model, **one_chunk) as fresh:
        cold, cold_text = await chat(fresh, turn2, chat_id="c")
    assert warm.metrics.cached_tokens > 30 and cold.metrics.cached_tokens == 0
    assert warm_text == cold_text


async def test_cancel_during_prefill_and_during_decode_frees_the_slot(
    smol_model: Model, running_engine, caplog: pytest.LogCaptureFixture
) -> None:
    long_prompt = [ChatMessage("user", "Summarise: " + "the quick brown fox jumps over the lazy dog. " * 150)]
    # a long step target: the whole prompt is one 512-token prefill step, which the cancel interrupts
    async with running_engine(smol_model, KTULHU_SLOTS="1", LLAMA_CLI_CTX="4096",
                              KTULHU_STEP_TARGET_MS="10000") as engine:
        with await engine.chat(long_prompt, SamplingParams(max_tokens=200)) as in_prefill:
            with trio.fail_after(30):
                while in_prefill.metrics.admitted is None:
                    await trio.sleep(0.001)
        # leaving `with` cancelled it while its 1,500-token prompt was being prefilled
        with trio.fail_after(30):
            assert await in_prefill.text() == ""
        assert in_prefill.finished.reason == "cancelled" and in_prefill.metrics.first_token is None
        assert engine.stats().workers[0].aborted_steps >= 1
        # the interrupted step is expected: llama.cpp's messages about it stay out of warnings/errors
        assert not [r for r in caplog.records if r.name == "ktulhu.llama" and r.levelno >= logging.WARNING]

        decoding = engine.generate((await engine.build_prompt([ChatMessage("user", "Count to a hundred.")], 300)).tokens,
                                   SamplingParams(max_tokens=300))
        with decoding:
            async for _ in decoding:
                break
        with trio.fail_after(30):
            while decoding.finished is None:
                await trio.sleep(0.001)
        assert decoding.finished.reason == "cancelled"
        assert 0 < decoding.metrics.generated_tokens < 300
        assert decoding.metrics.cancel_latency is not None and decoding.metrics.cancel_latency < 5
        # the single slot is free again: the next request runs
        _, text = await chat(engine, [ChatMessage("user", "Hi")])
        assert text
        assert engine.stats().busy_slots == 0


async def test_full_queue_answers_busy_at_once_and_queues_nothing(tiny_model: Model, running_engine) -> None:
    async with running_engine(tiny_model, KTULHU_SLOTS="1", KTULHU_QUEUE="2") as engine:
        long = SamplingParams(temperature=0.0, max_tokens=2000)
        held = []
        with pytest.raises(Busy, match="busy"):
            for _ in range(10):
                held.append(engine.generate([1, 100, 101], long))
                await trio.testing.wait_all_tasks_blocked()
        # one generating, one held by the feeder waiting for the slot, two in the channel
        assert len(held) == 4
        assert engine.stats().queue_depth == 2
        for gen in held:
            gen.cancel()
        with trio.fail_after(30):
            for gen in held:
                await gen.text()
        assert {gen.finished.reason for gen in held} == {"cancelled"}
        assert engine.stats().busy_slots == 0 and engine.stats().queue_depth == 0


async def test_stop_strings_end_the_reply_before_the_stop(smol_model: Model, running_engine) -> None:
    question = [ChatMessage("user", QUESTIONS[0])]
    async with running_engine(smol_model) as engine:
        _, full = await chat(engine, question)
        stop = full[len(full) // 2: len(full) // 2 + 3]
        cut = full.index(stop)
        gen, text = await chat(engine, question, SamplingParams(temperature=0.0, max_tokens=24, stop=(stop,)))
    assert text == full[:cut] and gen.finished.reason == "stop"


async def test_eos_max_tokens_and_seeds(smol_model: Model, running_engine) -> None:
    question = [ChatMessage("user", "Write a long story about a dragon.")]
    async with running_engine(smol_model) as engine:
        gen, _ = await chat(engine, question, SamplingParams(temperature=0.0, max_tokens=5))
        assert gen.finished.reason == "length" and gen.metrics.generated_tokens == 5
        gen, text = await chat(engine, [ChatMessage("user", "Say just: OK")], SamplingParams(temperature=0.0, max_tokens=200))
        assert gen.finished.reason == "eos" and "<|im_end|>" not in text and "<|im_start|>" not in text
        seeded = SamplingParams(temperature=1.0, max_tokens=16, seed=1234)
        same = {(await chat(engine, question, seeded))[1] for _ in range(2)}
        assert len(same) == 1
        unseeded = SamplingParams(temperature=1.0, top_k=0, top_p=1.0, max_tokens=16)
        varied = {(await chat(engine, question, unseeded))[1] for _ in range(4)}
        assert len(varied) > 1  # a fresh seed per request


async def test_prompt_too_long_for_a_slot_is_refused(tiny_model: Model, running_engine) -> None:
    async with running_engine(tiny_model, LLAMA_CLI_CTX="256") as engine:
        with pytest.raises(ContextTooLong):
            engine.generate(list(range(3, 259)), GREEDY)
        for hostile in ([], [1, 267], [1, -1]):
            with pytest.raises(ValueError):
                engine.generate(hostile, GREEDY)
        assert engine.stats().queue_depth == 0


async def test_waiting_requests_end_with_a_clear_error_when_the_engine_stops(tiny_model: Model, running_engine) -> None:
    async with running_engine(tiny_model, KTULHU_SLOTS="1", KTULHU_QUEUE="4") as engine:
        gens = [engine.generate([1, 100], SamplingParams(temperature=0.0, max_tokens=100000)) for _ in range(3)]
        await trio.testing.wait_all_tasks_blocked()
    for gen in gens:
        with pytest.raises(EngineClosed):
            await gen.text()
    with pytest.raises(EngineClosed):
        engine.generate([1, 100], GREEDY)


@pytest.mark.parametrize("seed", range(3))
async def test_random_submits_and_cancels_leave_every_slot_free(tiny_model: Model, running_engine, seed: int) -> None:
    """1,000 random operations: generate, cancel early, cancel late, read partly; then all is idle."""
    rng = random.Random(seed)
    tasks_before = task_count()
    async with running_engine(tiny_model, KTULHU_SLOTS="4", KTULHU_QUEUE="8", LLAMA_CLI_CTX="512") as engine:
        outcomes = {"finished": 0, "busy": 0}

        async def client(ops: int) -> None:
            for _ in range(ops):
                prompt = [1] + [rng.randrange(3, 267) for _ in range(rng.randrange(1, 80))]
                params = SamplingParams(temperature=rng.choice([0.0, 0.8]), max_tokens=rng.randrange(1, 12))
                try:
                    gen = engine.generate(prompt, params, chat_id=rng.choice([None, "a", "b"]))
                except Busy:
                    outcomes["busy"] += 1
                    await trio.sleep(0)
                    continue
                action = rng.random()
                with gen:
                    if action < 0.2:
                        continue  # cancelled before it was read
                    if action < 0.4:
                        async for _ in gen:
                            break  # cancelled after the first piece
                        continue
                    await gen.text()
                    outcomes["finished"] += 1

        async with trio.open_nursery() as nursery:
            for _ in range(10):
                nursery.start_soon(client, 100)
        with trio.fail_after(30):
            while engine.stats().busy_slots or engine.stats().queue_depth:
                await trio.sleep(0.01)
        stats = engine.stats()
        assert stats.busy_slots == 0 and stats.queue_depth == 0
        assert outcomes["finished"] > 100
    assert task_count() == tasks_before  # the engine's feeders, decode waits and clients all ended


def task_count() -> int:
    """Every task alive in this trio run."""
    pending = [trio.lowlevel.current_root_task()]
    seen = 0
    while pending:
        task = pending.pop()
        seen += 1
        for nursery in task.child_nurseries:
            pending.extend(nursery.child_tasks)
    return seen


async def test_ignore_eos_and_drop_cache(smol_model: Model, running_engine) -> None:
    question = [ChatMessage("user", "Say just: OK")]
    async with running_engine(smol_model, KTULHU_SLOTS="1") as engine:
        gen, _ = await chat(engine, question, SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True))
        assert gen.finished.reason == "length" and gen.metrics.generated_tokens == 40
        again, _ = await chat(engine, question, SamplingParams(temperature=0.0, max_tokens=4))
        assert again.metrics.cached_tokens == again.metrics.prompt_tokens - 1
        assert engine.stats().workers[0].kv_tokens > 0
        engine.drop_cache()
        cold, _ = await chat(engine, question, SamplingParams(temperature=0.0, max_tokens=4))
        assert cold.metrics.cached_tokens == 0
