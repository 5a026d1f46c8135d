"""Speculative decoding (prompt-lookup drafts) on the real default model: greedy replies are the same
with it as without it, token for token, and the KV cache holds exactly what the slots say.

The step costs are fixed (those of a fast accelerator) rather than measured, so every draft looked up
is verified, drafts that fail included, and no run depends on the machine's speed.
"""

from __future__ import annotations

import llama_cpp
import pytest
import trio
from prometheus_client import REGISTRY

from ktulhu.engine.engine import Engine
from ktulhu.engine.model import Model
from ktulhu.engine.prompt import ChatMessage
from ktulhu.engine.request import EngineEvents, Generation
from ktulhu.engine.sampling import SamplingParams
from ktulhu.engine.step_cost import StepCost
from ktulhu.metrics import ENGINE_EVENTS

GREEDY = SamplingParams(temperature=0.0, max_tokens=64)
QUOTE = ("Repeat the following paragraph exactly: The lighthouse keeper climbed the spiral stairs every evening "
         "at dusk, carrying a can of oil and a cloth to polish the great lens. Ships far out at sea trusted the "
         "steady beam to guide them past the rocks.")
SPELLING = ("Correct the spelling in: Teh quick brwon fox jumpd over the lazzy dog becuase it was bored and wanted "
            "to play in teh garden.")
ORDINARY = "Explain how rain forms, step by step."  # its drafts (common word pairs) fail
LIST = "List the days of the week."  # some drafts hold, some fail
MODES = ("off", "ngram")
SPEC_SERIES = ("ktulhu_spec_decode_num_draft_tokens_total", "ktulhu_spec_decode_num_accepted_tokens_total")


@pytest.fixture(autouse=True)
def fixed_step_costs(monkeypatch: pytest.MonkeyPatch) -> None:
    def calibrate(cls, measure, *, n_batch: int, step_target_s: float) -> StepCost:
        return cls(n_batch, step_target_s, decode_step_s=0.02, prefill_token_s=1e-6)

    monkeypatch.setattr(StepCost, "calibrate", classmethod(calibrate))
    monkeypatch.setattr(StepCost, "learn", lambda self, generating, prefilled, elapsed: None)


async def reply(engine: Engine, messages: list[ChatMessage], params: SamplingParams = GREEDY,
                chat_id: str | None = None) -> tuple[Generation, str]:
    with await engine.chat(messages, params, chat_id=chat_id) as gen:
        text = await gen.text()
    return gen, text


def ask(question: str) -> list[ChatMessage]:
    return [ChatMessage("user", question)]


def outcome(gen: Generation, text: str) -> tuple[str, int, str]:
    return text, gen.metrics.generated_tokens, gen.finished.reason


def drafts(engine: Engine) -> tuple[int, int]:
    """(draft tokens verified, accepted) so far."""
    stats = engine.stats().workers[0]
    return stats.draft_tokens, stats.accepted_tokens


def check_cache(engine: Engine) -> None:
    """Every slot's cached tokens are the positions llama.cpp's KV cache really holds."""
    [worker] = engine._workers
    for slot in worker.slots:
        assert llama_cpp.llama_memory_seq_pos_min(worker.mem, slot.sid) == (0 if slot.cached else -1)
        assert llama_cpp.llama_memory_seq_pos_max(worker.mem, slot.sid) == len(slot.cached) - 1


async def test_greedy_replies_are_the_same_with_drafts_and_drafts_are_verified(
        smol_model: Model, running_engine) -> None:
    seen: dict[str, list] = {}
    counted: dict[str, list[tuple[int, int]]] = {}
    reported: list[tuple[int, int]] = []
    events = EngineEvents(drafted=lambda drafted, accepted: reported.append((drafted, accepted)))
    for mode in MODES:
        async with running_engine(smol_model, events, KTULHU_SLOTS="2", KTULHU_SPECULATIVE=mode) as engine:
            seen[mode], counted[mode] = [], []
            for question in (QUOTE, SPELLING, ORDINARY):
                before = drafts(engine)
                gen, text = await reply(engine, ask(question))
                after = drafts(engine)
                counted[mode].append((after[0] - before[0], after[1] - before[1]))
                seen[mode].append(outcome(gen, text))
                check_cache(engine)
    assert seen["ngram"] == seen["off"]  # texts, token counts, finish reasons
    (quote_drafted, quote_accepted), _, (ordinary_drafted, ordinary_accepted) = counted["ngram"]
    assert quote_accepted > quote_drafted / 2 > 0  # the quoting reply took most of its drafts
    assert ordinary_drafted > 2 * ordinary_accepted  # the ordinary one was drafted for, mostly in vain
    assert counted["off"] == [(0, 0)] * 3
    assert [sum(column) for column in zip(*reported)] == [sum(column) for column in zip(*counted["ngram"])]


async def test_concurrent_replies_draft_beside_sampled_ones_and_keep_their_solo_text(
        smol_model: Model, running_engine) -> None:
    """Replies whose greedy text does not depend on the batch's shape (llama.cpp's CPU kernels round
    differently for other shapes, which flips near ties in some replies, with speculation or without)."""
    greedy = (QUOTE, SPELLING, LIST)
    async with running_engine(smol_model, KTULHU_SLOTS="1") as solo:
        alone = [outcome(*await reply(solo, ask(question))) for question in greedy]
    together: dict[int, tuple[str, int, str]] = {}
    async with running_engine(smol_model, KTULHU_SLOTS="4", KTULHU_SPECULATIVE="ngram") as engine:

        async def one(i: int, question: str, params: SamplingParams) -> None:
            together[i] = outcome(*await reply(engine, ask(question), params))

        async with trio.open_nursery() as nursery:
            for i, question in enumerate(greedy):
                nursery.start_soon(one, i, question, GREEDY)
            nursery.start_soon(one, len(greedy), QUOTE, SamplingParams(temperature=0.8, seed=7, max_tokens=64))
        drafted, accepted = drafts(engine)
        check_cache(engine)
    assert [together[i] for i in range(len(greedy))] == alone
    sampled_text, sampled_tokens, sampled_reason = together[len(greedy)]
    assert sampled_text and sampled_tokens > 0 and sampled_reason in ("eos", "length")
    assert accepted > 0 and drafted > 0


async def test_max_tokens_and_stop_strings_end_a_drafted_reply_where_they_would_without(
        smol_model: Model, running_engine) -> None:
    cut = [SamplingParams(temperature=0.0, max_tokens=n) for n in (5, 9, 14)]
    seen: dict[str, list] = {}
    for mode in MODES:
        async with running_engine(smol_model, KTULHU_SLOTS="2", KTULHU_SPECULATIVE=mode) as engine:
            _, full = await reply(engine, ask(QUOTE))
            stop = SamplingParams(temperature=0.0, max_tokens=64, stop=("spiral stairs",))
            seen[mode] = []
            for params in (*cut, stop):
                gen, text = await reply(engine, ask(QUOTE), params)
                seen[mode].append(outcome(gen, text))
                check_cache(engine)
    assert seen["ngram"] == seen["off"]
    assert [(tokens, reason) for _, tokens, reason in seen["ngram"][:3]] == [(5, "length"), (9, "length"),
                                                                            (14, "length")]
    text, _, reason = seen["ngram"][3]
    assert reason == "stop" and text == full[:full.index("spiral stairs")] and "lighthouse keeper" in text


async def test_a_follow_up_turn_reuses_the_cache_a_speculative_reply_left(smol_model: Model, running_engine) -> None:
    turn1 = ask(QUOTE)
    seen: dict[str, tuple] = {}
    for mode in MODES:
        async with running_engine(smol_model, KTULHU_SLOTS="2", KTULHU_SPECULATIVE=mode) as engine:
            first, answer = await reply(engine, turn1, chat_id="chat")
            check_cache(engine)
            turn2 = [*turn1, ChatMessage("assistant", answer),
                     ChatMessage("user", "Now repeat only its first sentence.")]
            warm, text = await reply(engine, turn2, chat_id="chat")
            check_cache(engine)
            # the whole first turn came from the cache: its prompt and its reply
            assert warm.metrics.cached_tokens >= first.metrics.prompt_tokens + first.metrics.generated_tokens
            seen[mode] = (outcome(first, answer), outcome(warm, text))
    assert seen["ngram"] == seen["off"]


async def test_a_cancel_between_drafted_steps_frees_the_slot_with_its_cache_consistent(
        smol_model: Model, running_engine) -> None:
    async with running_engine(smol_model, KTULHU_SLOTS="1", KTULHU_SPECULATIVE="ngram") as engine:
        with await engine.chat(ask(QUOTE), GREEDY) as gen:
            async for _ in gen:
                if drafts(engine)[1] > 0:  # a draft was accepted: cancel in the middle of the quote
                    break
        with trio.fail_after(30):
            await gen.text()
        assert gen.finished.reason == "cancelled" and gen.metrics.generated_tokens < 64
        check_cache(engine)
        _, text = await reply(engine, ask(SPELLING))  # the only slot is free again
        assert text


def test_draft_counters_reach_the_vllm_named_metrics() -> None:
    before = [REGISTRY.get_sample_value(name) or 0.0 for name in SPEC_SERIES]
    ENGINE_EVENTS.report(ENGINE_EVENTS.drafted, 5, 3)
    after = [REGISTRY.get_sample_value(name) or 0.0 for name in SPEC_SERIES]
    assert [b - a for a, b in zip(before, after)] == [5, 3]
