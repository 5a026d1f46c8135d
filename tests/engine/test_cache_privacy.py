"""A prefix left in a slot by another chat is reused, but only the chat's own reuse is reported."""

from __future__ import annotations

from ktulhu.engine.model import Model
from ktulhu.engine.sampling import SamplingParams

GREEDY = SamplingParams(temperature=0.0, max_tokens=8)


async def test_only_a_chats_own_cached_prefix_is_reported(smol_model: Model, running_engine) -> None:
    prompt = smol_model.tokenize("<|im_start|>user\nWhat is the capital of France?<|im_end|>\n", special=True)
    async with running_engine(smol_model, KTULHU_SLOTS="1") as engine:

        async def run(tokens: list[int], chat_id: str):
            with engine.generate(tokens, GREEDY, chat_id=chat_id) as gen:
                await gen.text()
            return gen.metrics

        first = await run(prompt, "alice")
        other = await run(prompt + prompt[-3:], "mallory")  # shares alice's prefix in the one slot
        again = await run(prompt + prompt[-3:] + prompt[-2:], "mallory")
    assert first.cached_tokens == first.own_cached_tokens == 0
    assert other.cached_tokens >= len(prompt) - 1 and other.own_cached_tokens == 0
    assert again.own_cached_tokens == again.cached_tokens > 0
