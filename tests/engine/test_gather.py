"""A burst is prefilled together: an idle decode worker that gets a prompt while others are on their
way (`Arrivals`) waits for them, and a request counted on its way that never comes only ends the
wait. The count itself: from arrival to the engine, whatever way a request leaves."""

from __future__ import annotations

import pytest
import trio

from ktulhu.engine.arrivals import Arrivals
from ktulhu.engine.engine import Engine
from ktulhu.engine.model import Model
from ktulhu.engine.request import EngineEvents
from ktulhu.engine.sampling import SamplingParams
from ktulhu.settings import load_settings
from tests.paths import REPO

GREEDY = SamplingParams(temperature=0.0, max_tokens=4)


def test_the_count_wakes_its_waiters_when_it_falls_to_zero() -> None:
    arrivals, woken = Arrivals(), []
    with arrivals.waking(lambda: woken.append(arrivals.count)):
        with arrivals.expecting():
            arrivals.enter()
            assert arrivals.count == 2
            arrivals.leave()
            assert woken == []
        assert arrivals.count == 0 and woken == [0]
        with pytest.raises(ValueError), arrivals.expecting():  # a refused request leaves too
            raise ValueError("bad body")
        assert arrivals.count == 0 and woken == [0, 0]
    with arrivals.expecting():
        pass
    assert woken == [0, 0]  # unsubscribed with its block


class Steps:
    """The (sequences, prefilled tokens) of every step, in order."""

    def __init__(self) -> None:
        self.seen: list[tuple[int, int]] = []

    def step(self, sequences: int, prefilled: int) -> None:
        self.seen.append((sequences, prefilled))


async def _engine_run(model: Model, steps: Steps, body) -> None:
    settings = load_settings(environ={"LLAMA_CLI_THREADS": "1", "KTULHU_SLOTS": "4"}, root=REPO)
    engine = Engine(model, settings, events=EngineEvents(step=steps.step), gather_max_s=600.0)
    async with trio.open_nursery() as nursery:
        await nursery.start(engine.run)
        [worker] = engine._workers
        # The wait's other bound is the step the admitted prompts would take: made long here, so that
        # only the count can end a wait (a broken wake-up fails the test's own timeout below).
        worker.costs.prefill_token_s = 10.0
        with trio.fail_after(120):
            await body(engine)
        nursery.cancel_scope.cancel()


def _prompts(model: Model) -> tuple[list[int], list[int]]:
    # short: together within one step's budget, so the first step shows who was admitted before it
    return model.tokenize("Tell me about the sea.", special=False), model.tokenize("And the mountains?", special=False)


async def test_a_prompt_that_arrives_during_the_wait_shares_the_first_step(smol_model: Model) -> None:
    steps = Steps()
    first, second = _prompts(smol_model)

    async def body(engine: Engine) -> None:
        with engine.arrivals.expecting():  # the second request, being authenticated and built
            a = engine.generate(first, GREEDY)
            await trio.sleep(0.05)  # without the wait, the worker starts the first prompt alone meanwhile
            b = engine.generate(second, GREEDY)
        with a, b:
            await a.text()
            await b.text()
        assert engine.arrivals.count == 0

    await _engine_run(smol_model, steps, body)
    assert steps.seen[0] == (2, len(first) + len(second)), steps.seen


async def test_an_arrival_that_never_comes_only_ends_the_wait(smol_model: Model) -> None:
    steps = Steps()
    first, _ = _prompts(smol_model)

    async def body(engine: Engine) -> None:
        with engine.arrivals.expecting():  # a request being authenticated, then refused
            gen = engine.generate(first, GREEDY)
            await trio.sleep(0.05)
        with gen:
            await gen.text()
            assert gen.metrics.generated_tokens == GREEDY.max_tokens
        assert engine.arrivals.count == 0

    await _engine_run(smol_model, steps, body)
    assert steps.seen[0][0] == 1, steps.seen  # it went alone once the count fell to zero
