"""`Engine.wait_idle`: awaited, not polled. It returns at once when nothing is queued or running,
blocks while a generation is queued or running, and returns once the last one ends however it
ends (finished, cancelled while queued or running, failed as the engine stops). Every wait is
bounded only so that a broken mechanism fails instead of hanging."""

from __future__ import annotations

import trio
import trio.testing

from ktulhu.engine.model import Model
from ktulhu.engine.sampling import SamplingParams
from tests.idle import idle_waiter

#: Runs until cancelled: on the tiny model with `ONE_LONG_SLOT` it would take seconds to fill the
#: slot's context, far longer than a test waits before it cancels it.
ENDLESS = SamplingParams(temperature=0.0, max_tokens=100_000, ignore_eos=True)
ONE_LONG_SLOT = {"KTULHU_SLOTS": "1", "LLAMA_CLI_CTX": "4096"}
PROMPT = [1, 100, 101]
WAIT_S = 30


async def ended(*gens) -> None:
    with trio.fail_after(WAIT_S):
        for gen in gens:
            async for _ in gen:
                pass


async def test_an_idle_engine_returns_at_once(tiny_model: Model, running_engine) -> None:
    async with running_engine(tiny_model) as engine, idle_waiter(engine) as idle:
        assert idle.is_set()


async def test_it_waits_for_the_running_and_the_queued_generation(tiny_model: Model, running_engine) -> None:
    async with running_engine(tiny_model, **ONE_LONG_SLOT) as engine:
        first = engine.generate(PROMPT, ENDLESS)
        second = engine.generate(PROMPT, ENDLESS)  # queued for the only slot
        async with idle_waiter(engine) as idle:
            assert not idle.is_set()
            first.cancel()
            await ended(first)
            await trio.testing.wait_all_tasks_blocked()
            assert not idle.is_set() and second.finished is None  # the second took the slot
            second.cancel()
            await ended(second)
            with trio.fail_after(WAIT_S):
                await idle.wait()
        assert first.finished.reason == second.finished.reason == "cancelled"


async def test_a_generation_cancelled_while_queued_counts_as_ended(tiny_model: Model, running_engine) -> None:
    async with running_engine(tiny_model, **ONE_LONG_SLOT) as engine:
        running = engine.generate(PROMPT, ENDLESS)
        queued = engine.generate(PROMPT, ENDLESS)
        async with idle_waiter(engine) as idle:
            queued.cancel()  # dropped when it reaches the slot, never admitted
            running.cancel()
            await ended(running, queued)
            with trio.fail_after(WAIT_S):
                await idle.wait()
        assert queued.finished.reason == "cancelled" and queued.metrics.admitted is None


async def test_it_returns_when_a_reply_finishes(tiny_model: Model, running_engine) -> None:
    async with running_engine(tiny_model) as engine:
        gen = engine.generate(PROMPT, SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True))
        async with idle_waiter(engine) as idle:
            await ended(gen)
            with trio.fail_after(WAIT_S):
                await idle.wait()
        assert gen.finished.reason == "length"


async def test_generations_failed_by_the_engine_stopping_leave_it_idle(tiny_model: Model, running_engine) -> None:
    async with running_engine(tiny_model, **ONE_LONG_SLOT, KTULHU_QUEUE="4") as engine:
        gens = [engine.generate(PROMPT, ENDLESS) for _ in range(3)]  # one running, two queued
        await trio.testing.wait_all_tasks_blocked()
    assert all(gen.finished is not None and gen.finished.reason == "error" for gen in gens)
    async with idle_waiter(engine) as idle:
        assert idle.is_set()
