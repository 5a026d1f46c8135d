"""The step-cost model without a model: calibration samples and measured steps in, prefill chunk
sizes out."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ktulhu.engine.step_cost import EMA, MIN_PREFILL_CHUNK, TAIL_SHARE, StepCost


def test_calibration_times_a_minimal_prefill_then_a_one_token_step() -> None:
    asked: list[int] = []

    def measure(n_tokens: int) -> float:
        asked.append(n_tokens)
        return {MIN_PREFILL_CHUNK: 0.064, 1: 0.02}[n_tokens]

    costs = StepCost.calibrate(measure, n_batch=512, step_target_s=0.1)
    assert asked == [MIN_PREFILL_CHUNK, 1]
    assert costs.prefill_token_s == pytest.approx(0.001) and costs.decode_step_s == pytest.approx(0.02)
    # alone, a step may prefill what the target allows; beside streams, what their decode leaves
    assert costs.prefill_budget(0) == 100
    assert costs.prefill_budget(3) == 80


def test_slow_prefill_keeps_the_minimal_chunk_and_fast_prefill_fills_the_batch() -> None:
    cpu = StepCost(512, 0.1, decode_step_s=0.05, prefill_token_s=0.01)  # 10 ms a token: 5 would fit
    assert cpu.prefill_budget(2) == MIN_PREFILL_CHUNK
    gpu = StepCost(512, 0.1, decode_step_s=0.005, prefill_token_s=1e-6)
    assert gpu.prefill_budget(2) == 510  # what n_batch leaves beside the two streams' tokens
    overloaded = StepCost(512, 0.1, decode_step_s=0.3, prefill_token_s=1e-4)  # decoding alone is too long
    assert overloaded.prefill_budget(4) == MIN_PREFILL_CHUNK
    uncalibrated = StepCost(512, 0.1)
    assert uncalibrated.prefill_budget(0) == 512


def test_steps_without_prefill_teach_the_decode_cost() -> None:
    costs = StepCost(512, 0.1, decode_step_s=0.02, prefill_token_s=0.001)
    costs.learn(generating=4, prefilled=0, elapsed=0.04)
    assert costs.decode_step_s == pytest.approx(0.02 + EMA * 0.02)
    assert costs.prefill_token_s == 0.001


def test_prefill_steps_teach_the_token_cost_net_of_the_decode_share() -> None:
    costs = StepCost(512, 0.1, decode_step_s=0.02, prefill_token_s=0.001)
    costs.learn(generating=2, prefilled=100, elapsed=0.32)  # (0.32 - 0.02) / 100 = 3 ms a token
    assert costs.prefill_token_s == pytest.approx(0.001 + EMA * 0.002)
    alone = StepCost(512, 0.1, decode_step_s=0.02, prefill_token_s=0.001)
    alone.learn(generating=0, prefilled=100, elapsed=0.3)  # no stream: the whole step was prefill
    assert alone.prefill_token_s == pytest.approx(0.001 + EMA * 0.002)
    fast = StepCost(512, 0.1, decode_step_s=0.02, prefill_token_s=0.001)
    fast.learn(generating=1, prefilled=100, elapsed=0.01)  # faster than the decode estimate: never negative
    assert fast.prefill_token_s == pytest.approx(0.001 * (1 - EMA))
    assert fast.decode_step_s == 0.02


def test_the_chunk_follows_a_change_of_speed() -> None:
    costs = StepCost(512, 0.1, decode_step_s=0.01, prefill_token_s=0.0001)  # calibrated on an idle machine
    assert costs.prefill_budget(1) == 512 - 1
    for _ in range(60):  # then prefill slows down to 1 ms a token (a busy CPU)
        costs.learn(generating=1, prefilled=200, elapsed=0.01 + 0.2)
    assert costs.prefill_budget(1) == 90


@given(decode=st.floats(0.0, 10.0), token=st.floats(0.0, 1.0), target=st.floats(0.001, 10.0),
       generating=st.integers(0, 256))
def test_the_budget_stays_between_the_minimal_chunk_and_the_batch(decode: float, token: float, target: float,
                                                                   generating: int) -> None:
    budget = StepCost(512, target, decode_step_s=decode, prefill_token_s=token).prefill_budget(generating)
    assert MIN_PREFILL_CHUNK <= budget <= 512 - generating


def test_draft_tokens_take_their_share_of_the_step_like_prompt_tokens() -> None:
    costs = StepCost(512, 0.1, decode_step_s=0.02, prefill_token_s=0.001)
    assert costs.draft_room(4) == 80  # the 80 ms the streams leave
    assert costs.prefill_budget(4, drafted=10) == 70  # and what drafts leave of them goes to prefill
    assert costs.prefill_budget(4, drafted=30) == MIN_PREFILL_CHUNK  # never less than the minimal chunk
    crowded = StepCost(512, 0.1, decode_step_s=0.02, prefill_token_s=1e-6)
    assert crowded.draft_room(256) == 512 - 256 - MIN_PREFILL_CHUNK  # a minimal prefill chunk still fits
    assert StepCost(512, 0.1, decode_step_s=0.3, prefill_token_s=0.001).draft_room(8) == 0  # no time to spare


@given(decode=st.floats(0.0, 10.0), token=st.floats(0.0, 1.0), target=st.floats(0.001, 10.0),
       generating=st.integers(0, 256))
def test_drafts_and_prefill_together_fit_the_batch(decode: float, token: float, target: float,
                                                   generating: int) -> None:
    costs = StepCost(512, target, decode_step_s=decode, prefill_token_s=token)
    drafted = costs.draft_room(generating)
    assert drafted >= 0
    assert MIN_PREFILL_CHUNK <= costs.prefill_budget(generating, drafted) <= 512 - generating - drafted


#: A 2-core CPU with the default model: 9 ms a step of streams, 2.5 ms a prompt token (100 ms target).
CPU = StepCost(512, 0.1, decode_step_s=0.009, prefill_token_s=0.0025)


def test_a_burst_of_arrivals_is_prefilled_whole_in_one_step() -> None:
    # one stream started a moment before seven short prompts: all seven go in, not 64 tokens a step
    assert CPU.plan_prefill([19] * 7, generating=1) == [19] * 7
    # no stream at all: every whole prompt that fits the batch; the next waits rather than make the
    # step longer without giving a first token
    assert CPU.plan_prefill([200, 200, 200], generating=0) == [200, 200, 0]


def test_streams_keep_their_pace_beside_fewer_waiting_requests() -> None:
    assert CPU.plan_prefill([300], generating=7) == [MIN_PREFILL_CHUNK]
    assert CPU.plan_prefill([19, 19, 300, 300], generating=7) == [19, 19, MIN_PREFILL_CHUNK - 38, 0]
    # a long prompt alone in a burst is chunked all the same: finishing it takes several steps anyway
    assert CPU.plan_prefill([2000, 2000], generating=1) == [MIN_PREFILL_CHUNK, 0]
    # one waiting prompt keeps to the budget, streams or not: whole, it would save only the steps' fixed cost
    assert CPU.plan_prefill([300], generating=0) == [MIN_PREFILL_CHUNK]
    assert CPU.plan_prefill([300], generating=1) == [MIN_PREFILL_CHUNK]


def test_a_started_prompt_with_only_a_tail_left_is_finished() -> None:
    tail = int(MIN_PREFILL_CHUNK * TAIL_SHARE)
    assert CPU.plan_prefill([MIN_PREFILL_CHUNK + tail], generating=4) == [MIN_PREFILL_CHUNK + tail]
    assert CPU.plan_prefill([MIN_PREFILL_CHUNK + tail + 1], generating=4) == [MIN_PREFILL_CHUNK]
    # a prompt the budget does not reach is not started for its tail
    assert CPU.plan_prefill([MIN_PREFILL_CHUNK, 5], generating=4) == [MIN_PREFILL_CHUNK, 0]


@given(waiting=st.lists(st.integers(1, 3000), min_size=1, max_size=32), generating=st.integers(0, 64),
       drafted=st.integers(0, 64), decode=st.floats(0.0, 1.0), token=st.floats(0.0, 0.1))
def test_a_plan_fits_the_batch_and_always_makes_progress(waiting: list[int], generating: int, drafted: int,
                                                          decode: float, token: float) -> None:
    costs = StepCost(512, 0.1, decode_step_s=decode, prefill_token_s=token)
    plan = costs.plan_prefill(waiting, generating, drafted)
    room = 512 - generating - drafted
    assert len(plan) == len(waiting)
    assert all(0 <= chunk <= pending for chunk, pending in zip(plan, waiting))
    assert sum(plan) <= room
    assert sum(plan) >= min(sum(waiting), room, MIN_PREFILL_CHUNK)
    # a prompt is only started once every older one is finished in this step
    started = [i for i, chunk in enumerate(plan) if chunk]
    assert all(plan[i] == waiting[i] for i in started[:-1])
