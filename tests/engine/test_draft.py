"""Prompt-lookup drafts and the draft plan, without a model."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ktulhu.engine.draft import ACCEPTANCE_EMA, PRIOR_ACCEPTANCE, Drafter, can_draft, plan_drafts
from ktulhu.engine.sampling import SamplingParams

# a small alphabet, so that n-grams recur
tokens_lists = st.lists(st.integers(0, 3), max_size=40)
longest = st.integers(2, 5)
limits = st.integers(0, 8)


def occurrences(tokens: list[int], n: int) -> list[int]:
    """Positions right after each earlier occurrence of the last `n` tokens that has a token after it."""
    if len(tokens) < n:
        return []
    return [start for start in range(n, len(tokens)) if tokens[start - n:start] == tokens[-n:]]


@given(tokens_lists, longest, limits)
def test_a_draft_continues_the_latest_earlier_occurrence_of_the_longest_recurring_ngram(
        tokens: list[int], ngram: int, limit: int) -> None:
    draft = Drafter.create(tokens, ngram).propose(limit)
    assert len(draft) <= limit
    for n in range(ngram, 1, -1):
        starts = occurrences(tokens, n)
        if starts:
            start = starts[-1]
            assert draft == tokens[start:start + limit]
            return
    assert draft == []  # no n-gram of the tail occurred before


@given(tokens_lists, tokens_lists, longest, limits)
def test_extending_a_drafter_equals_creating_it_over_all_the_tokens(
        head: list[int], tail: list[int], ngram: int, limit: int) -> None:
    grown = Drafter.create(head, ngram)
    grown.extend(tail)
    assert grown.propose(limit) == Drafter.create(head + tail, ngram).propose(limit)


def test_drafts_of_a_quoted_text() -> None:
    drafter = Drafter.create([7, 1, 2, 3, 4, 5, 9, 1, 2], 3)
    assert drafter.propose(2) == [3, 4]  # "1 2" occurred before: what followed it
    drafter.extend([3])
    assert drafter.propose(10) == [4, 5, 9, 1, 2, 3]  # "1 2 3" now; never past the tokens held
    assert Drafter.create([1, 2, 3, 4], 3).propose(4) == []  # nothing recurs
    assert Drafter.create([1, 2, 1], 3).propose(4) == []  # single tokens are not looked up


def test_acceptance_learns_from_the_tokens_compared_up_to_the_first_difference() -> None:
    drafter = Drafter.create([], 3)
    drafter.observe([5, 6, 7], [5, 6, 8])  # two hits, then a miss; nothing after it counts
    expected = PRIOR_ACCEPTANCE
    for hit in (1, 1, 0):
        expected += ACCEPTANCE_EMA * (hit - expected)
    assert drafter.acceptance == pytest.approx(expected)
    before = drafter.acceptance
    drafter.observe([], [4])  # no draft: nothing learnt
    drafter.observe([4, 4], [4])  # a draft not sent: its first token against the model's
    assert drafter.acceptance == pytest.approx(before + ACCEPTANCE_EMA * (1 - before))


def test_only_plain_greedy_requests_draft() -> None:
    greedy = SamplingParams(temperature=0.0)
    assert can_draft(greedy) and can_draft(SamplingParams(temperature=0.0, stop=("x",), max_tokens=3))
    for changed in ({"temperature": 0.7}, {"grammar": 'root ::= "a"'}, {"logit_bias": {5: 2.0}},
                    {"repeat_penalty": 1.1}, {"presence_penalty": 0.5}, {"frequency_penalty": 0.5},
                    {"logprobs": 0}):
        assert not can_draft(SamplingParams(**{"temperature": 0.0, **changed}))


CPU = {"step_s": 0.017, "token_s": 0.0072}  # measured: one stream's step, one more token in it (2 cores)
GPU = {"step_s": 0.01, "token_s": 1e-5}


def test_a_cpu_drafts_only_for_replies_whose_drafts_come_true() -> None:
    assert plan_drafts([(0.2, 4)], streams=1, room=100, **CPU) == [0]
    assert plan_drafts([(0.95, 4)], streams=1, room=100, **CPU) == [4]
    # measured with eight streams: a draft token costs what a stream's own token does, so none pays
    busy = {"step_s": 0.07, "token_s": 0.0088}
    assert plan_drafts([(0.99, 4)] * 8, streams=8, room=100, **busy) == [0] * 8
    assert plan_drafts([(0.99, 4)] * 8, streams=8, room=100, step_s=0.07, token_s=0.005) != [0] * 8


def test_a_gpu_verifies_whatever_is_proposed_within_the_room() -> None:
    assert plan_drafts([(0.3, 4), (0.9, 2), (0.5, 0)], streams=3, room=100, **GPU) == [4, 2, 0]
    assert plan_drafts([(0.3, 4), (0.9, 3)], streams=2, room=3, **GPU) == [0, 3]  # the likeliest first


@given(st.lists(st.tuples(st.floats(0, 1), st.integers(0, 16)), max_size=8), st.integers(0, 40),
       st.floats(1e-4, 0.2), st.floats(1e-6, 0.02))
def test_a_plan_stays_within_the_proposals_and_the_room_and_never_lowers_the_expected_rate(
        offers: list[tuple[float, int]], room: int, step_s: float, token_s: float) -> None:
    streams = max(len(offers), 1)
    lengths = plan_drafts(offers, streams=streams, step_s=step_s, token_s=token_s, room=room)
    assert all(0 <= length <= proposed for length, (_, proposed) in zip(lengths, offers))
    assert sum(lengths) <= room
    expected = streams + sum(acceptance ** k for (acceptance, _), n in zip(offers, lengths) for k in range(1, n + 1))
    assert expected / (step_s + sum(lengths) * token_s) >= streams / step_s * (1 - 1e-9)
