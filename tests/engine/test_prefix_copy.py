"""A prompt that lands on another slot starts from a copy of the longest cached prefix: cell by cell
(a short cache) or the whole stream (a long one), the same either way."""

from __future__ import annotations

import math

import pytest

from ktulhu.engine.model import Model
from ktulhu.engine.sampling import SamplingParams
from ktulhu.engine.slot_choice import MIN_COPIED_TOKENS

GREEDY = SamplingParams(temperature=0.0, max_tokens=12)
SYSTEM = ("<|im_start|>system\nYou are Ktulhu, a friendly and helpful assistant. Answer clearly and concisely, "
          "in the language the user writes in. Prefer short paragraphs and plain words.<|im_end|>\n")


def chat(model: Model, question: str) -> list[int]:
    return model.tokenize(f"{SYSTEM}<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n", special=True)


@pytest.mark.parametrize("whole_stream", [False, True])
async def test_a_shared_system_prompt_is_copied_not_prefilled(smol_model: Model, running_engine,
                                                             whole_stream: bool) -> None:
    first, second = chat(smol_model, "What is the capital of France?"), chat(smol_model, "Name a large ocean.")
    shared = next(i for i, (a, b) in enumerate(zip(first, second)) if a != b)
    assert shared >= MIN_COPIED_TOKENS

    async def run(engine, tokens: list[int], chat_id: str):
        with engine.generate(tokens, GREEDY, chat_id=chat_id) as gen:
            text = await gen.text()
        return text, gen.metrics

    async with running_engine(smol_model, KTULHU_SLOTS="2") as engine:
        [worker] = engine._workers
        assert math.isfinite(worker.cell_copy_s)  # llama.cpp took the calibration's cell copy
        # the path is set, not left to the two timings: each copy takes the cheaper one
        if whole_stream:
            worker.cell_copy_s = math.inf
        else:
            worker.stream_copy_s = math.inf
        await run(engine, first, "alice")
        async with running_engine(smol_model, KTULHU_SLOTS="2") as fresh:  # the reference: prefilled whole
            expected, cold = await run(fresh, second, "bob")
        # bob's prompt goes to the empty slot, which starts from alice's system prompt
        text, warm = await run(engine, second, "bob")
        assert worker.prefix_copies == 1
        assert warm.cached_tokens == shared and warm.own_cached_tokens == 0  # alice's prefix is not bob's own
        assert cold.cached_tokens == 0
        assert text == expected  # the copied KV gives the same greedy reply as a full prefill
        # alice's own cache was left whole: her follow-up still reuses all of it
        _, again = await run(engine, first + smol_model.tokenize(" Thanks!", special=False), "alice")
        assert again.own_cached_tokens >= len(first)
