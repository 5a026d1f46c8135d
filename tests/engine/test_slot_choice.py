"""The slot-reuse policy on plain records: which idle slot a request takes, and when a copy of
another slot's cached prefix pays. No model: the policy only reads cached tokens, chats and ages."""

from __future__ import annotations

import itertools
import math

import attrs
import pytest

from hypothesis import given
from hypothesis import strategies as st

from ktulhu.engine.slot_choice import (COPY_MARGIN, MIN_COPIED_TOKENS, choose_slot, common_prefix, copy_source,
                                      min_copied_tokens, runs)

SYSTEM = list(range(100, 100 + 2 * MIN_COPIED_TOKENS))  # a system prompt long enough to be worth a copy


@attrs.define(eq=False)
class Slot:
    name: str
    cached: list[int] = attrs.field(factory=list)
    chat_id: str | None = None
    last_used: float = 0.0
    sid: int = attrs.field(factory=itertools.count().__next__)


def test_common_prefix() -> None:
    assert common_prefix([], [1, 2]) == 0
    assert common_prefix([1, 2, 3], [1, 2, 4]) == 2
    assert common_prefix([1, 2], [1, 2, 3]) == 2
    assert common_prefix([5], [6]) == 0


def test_a_follow_up_turn_goes_where_its_previous_turn_is_cached() -> None:
    empty = Slot("empty")
    mine = Slot("mine", [1, 2, 3], chat_id="a")
    assert choose_slot([empty, mine], [1, 2, 3, 4, 5], "a") is mine
    # the same without a chat id: a cache that is a whole prefix of the prompt is as good
    assert choose_slot([empty, mine], [1, 2, 3, 4, 5], None) is mine


def test_the_same_chat_keeps_its_slot_when_its_last_reply_is_replaced() -> None:
    mine = Slot("mine", [1, 2, 3, 7, 8], chat_id="a")  # the reply being regenerated differs
    assert choose_slot([Slot("empty"), mine], [1, 2, 3, 9], "a") is mine


def test_the_longest_cached_prefix_wins_then_the_most_recent() -> None:
    short = Slot("short", [1, 2], last_used=5.0)
    long = Slot("long", [1, 2, 3], last_used=1.0)
    assert choose_slot([short, long], [1, 2, 3, 4], None) is long
    older = Slot("older", [1, 2, 3], last_used=0.5)
    newer = Slot("newer", [1, 2, 3], last_used=2.0)
    assert choose_slot([older, newer], [1, 2, 3, 4], None) is newer


def test_a_shared_prefix_alone_does_not_claim_another_chats_slot() -> None:
    other = Slot("other", [*SYSTEM, 1, 2], chat_id="b")  # only the system prompt is common
    empty = Slot("empty")
    assert choose_slot([other, empty], [*SYSTEM, 3, 4], "a") is empty
    # an empty slot of the same chat is merely empty: the first empty slot is taken
    first = Slot("first")
    assert choose_slot([first, Slot("same", chat_id="a")], [1, 2], "a") is first


def test_without_an_empty_slot_the_least_recently_used_is_evicted() -> None:
    old = Slot("old", [7, 8], chat_id="b", last_used=1.0)
    recent = Slot("recent", [9], chat_id="c", last_used=3.0)
    assert choose_slot([recent, old], [1, 2], "a") is old


@pytest.mark.parametrize("min_saved", [MIN_COPIED_TOKENS, 40])
@pytest.mark.parametrize(("extra", "pays"), [(0, True), (-1, False)])
def test_a_copy_pays_only_when_it_saves_enough_prefill(min_saved: int, extra: int, pays: bool) -> None:
    prompt = list(range(1000, 1000 + 200))
    saved = min_saved + extra
    target = Slot("target", prompt[:10] + [0])  # its own cache shares 10 tokens
    donor = Slot("donor", prompt[:10 + saved] + [0, 0])
    assert copy_source(target, [target, donor], prompt, min_saved) == ((donor, 10 + saved) if pays else None)


def test_what_a_copy_must_save_follows_its_measured_cost() -> None:
    assert min_copied_tokens(0.0, 0.004) == MIN_COPIED_TOKENS  # free copies still evict: a floor
    assert min_copied_tokens(0.070, 0.0035) == math.ceil(COPY_MARGIN * 20)  # 70 ms = 20 prompt tokens
    assert min_copied_tokens(0.001, 0.0) >= MIN_COPIED_TOKENS  # an unmeasured prefill cost: no division by 0


def test_the_copy_comes_from_the_longest_prefix_never_from_the_target_or_an_empty_slot() -> None:
    prompt = [*SYSTEM, 1, 2, 3, 4]
    target = Slot("target")
    shorter = Slot("shorter", [*SYSTEM, 9])
    longer = Slot("longer", [*SYSTEM, 1, 2, 8])
    same = Slot("same", [*SYSTEM, 1, 2, 7])
    assert copy_source(target, [Slot("empty"), target, shorter, longer, same], prompt) == (longer, len(SYSTEM) + 2)
    # the target's own cache is never its donor, however long
    target.cached = list(prompt)
    assert copy_source(target, [target], prompt) is None


def test_runs_count_the_decode_passes_of_a_step() -> None:
    assert runs(set()) == 0
    assert runs({3}) == runs({3, 4, 5, 6}) == 1
    assert runs({1, 3, 4, 6}) == 3


def test_a_new_chat_takes_a_slot_next_to_the_generating_ones() -> None:
    """Each slot is a KV stream, and llama.cpp decodes consecutive streams in one pass."""
    slots = [Slot(f"s{i}", sid=i) for i in range(8)]
    assert choose_slot(slots[:2] + slots[3:], [1, 2], None, busy={2}) is slots[1]  # empty: the nearest
    assert choose_slot(slots[:2] + slots[3:], [1, 2], None) is slots[0]  # nothing generating: the first
    for i, slot in enumerate(slots):  # now all hold other chats, slot 7 the oldest
        slot.cached, slot.chat_id, slot.last_used = [50 + i], f"c{i}", 10.0 - i
    idle = [s for s in slots if s.sid not in {3, 4}]
    assert choose_slot(idle, [1, 2], None, busy={3, 4}) is slots[5]  # evicted: beside 3-4, older than 2
    assert choose_slot(idle, [1, 2], None) is slots[7]  # nothing generating: the least recently used
    # a chat's own cache still comes first, wherever it is
    assert choose_slot(idle, [57, 1], "c7", busy={3, 4}) is slots[7]


@given(st.sets(st.integers(0, 11), max_size=11), st.lists(st.floats(0, 100), min_size=12, max_size=12),
       st.lists(st.booleans(), min_size=12, max_size=12))
def test_the_choice_never_costs_a_decode_pass_another_slot_of_its_kind_would_save(
        busy: set[int], ages: list[float], holds: list[bool]) -> None:
    slots = [Slot(f"s{i}", [90 + i] if holds[i] else [], f"c{i}", ages[i], sid=i) for i in range(12)]
    idle = [s for s in slots if s.sid not in busy]
    chosen = choose_slot(idle, [1, 2], "new", busy=busy)
    same_kind = [s for s in idle if bool(s.cached) == bool(chosen.cached)]
    assert not chosen.cached or not any(not s.cached for s in idle)  # an empty slot before an eviction
    assert runs(busy | {chosen.sid}) == min(runs(busy | {s.sid}) for s in same_kind)
